"""Guide of the VAE baseline: q(z_t | x_t), frame by frame (2.6-2.7)."""

from __future__ import annotations

from ..nn import GaussianHead
from ..models.base import Guide


class VAEGuide(Guide):
    """Parameterises q(z_t | x_t) with MLP(x_t, 256, Tanh, 128, Tanh) (option ``dense_x_z``) and a
    linear Gaussian head."""

    name = "frame"

    def __init__(self, model):
        super().__init__(model)
        self.encoder = model.mlp(model.x_dim, "dense_x_z")
        self.head = GaussianHead(self.encoder.out_dim, model.z_dim)

    def guide(self, x, u=None, mask=None):
        loc, scale = self.head(self.encoder(x))
        self.sample_independent("z", x, mask, loc, scale)
