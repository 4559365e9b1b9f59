"""VAE: the frame-wise baseline of Table 13.1 (chapter 2).

Generative model, frames independent:  p(x_{1:T}, z_{1:T}) = prod_t p(x_t | z_t) p(z_t),
p(z_t) = N(0, I) (2.2),  p(x_t | z_t) with decoder d_x(z_t) (2.3-2.5).

Architecture: the paper gives none for its VAE baseline; we use the VAE of its KVAE (13.1.2):
decoder MLP(z_t, 128, Tanh, 256, Tanh), encoder MLP(x_t, 256, Tanh, 128, Tanh) (guides/vae.py).
Options: ``dense_x_z`` (encoder widths, default 256,128), ``dense_z_x`` (decoder widths, default
the reverse of ``dense_x_z``), ``activation``; the authors' released VAE is
``dense_x_z=256,128,64,32``.
"""

from __future__ import annotations

from .base import DVAE


class VAE(DVAE):
    """Frame-wise VAE: z_t iid N(0, I), x_t | z_t."""

    name = "vae"

    architecture = {"dense_x_z": (256, 128), "dense_z_x": None, "activation": "tanh"}

    def __init__(self, x_dim=257, z_dim=16, likelihood="is", u_dim=0, **architecture):
        super().__init__(x_dim, z_dim, likelihood, u_dim, **architecture)
        if self.arch["dense_z_x"] is None:  # the mirror of the encoder
            self.arch["dense_z_x"] = self.arch["dense_x_z"][::-1]
        #: parameterises p(x_t | z_t) (2.3)
        self.decoder = self.mlp(z_dim, "dense_z_x")
        self.x_out = self.output_layer(self.decoder.out_dim)

    def emission(self, z, ctx, x, u):
        return self.x_out(self.decoder(z))
