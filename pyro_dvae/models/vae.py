"""VAE: the frame-wise baseline of Table 13.1 (chapter 2).

Generative model, frames independent:  p(x_{1:T}, z_{1:T}) = prod_t p(x_t | z_t) p(z_t),
p(z_t) = N(0, I) (2.2),  p(x_t | z_t) with decoder d_x(z_t) (2.3-2.5).

Architecture: the paper gives none for its VAE baseline; we use the VAE of its KVAE (13.1.2):
decoder MLP(z_t, 128, Tanh, 256, Tanh), encoder MLP(x_t, 256, Tanh, 128, Tanh) (guides/vae.py).
"""

from __future__ import annotations

from torch import nn

from ..nn import MLP
from .base import DVAE


class VAE(DVAE):
    """Frame-wise VAE: z_t iid N(0, I), x_t | z_t."""

    name = "vae"

    def __init__(self, x_dim=257, z_dim=16, likelihood="is", u_dim=0):
        super().__init__(x_dim, z_dim, likelihood, u_dim)
        #: parameterises p(x_t | z_t) (2.3)
        self.decoder = MLP(z_dim, 128, "tanh", 256, "tanh")
        self.x_out = nn.Linear(256, self.num_params)

    def emission(self, z, ctx, x, u):
        return self.x_out(self.decoder(z))
