"""Guide of the VAE baseline: q(z_t | x_t), frame by frame (2.6-2.7)."""

from __future__ import annotations

from ..nn import MLP, GaussianHead
from ..models.base import Guide


class VAEGuide(Guide):
    """Parameterises q(z_t | x_t) with MLP(x_t, 256, Tanh, 128, Tanh) and a linear Gaussian head."""

    name = "frame"

    def __init__(self, model):
        super().__init__(model)
        self.encoder = MLP(model.x_dim, 256, "tanh", 128, "tanh")
        self.head = GaussianHead(128, model.z_dim)

    def guide(self, x, u=None, mask=None):
        loc, scale = self.head(self.encoder(x))
        self.sample_independent("z", x, mask, loc, scale)
