"""Guide of the KVAE (6.2, 6.12-6.15).

``kalman`` (the paper's): q(a_{1:T}, z_{1:T} | x_{1:T}) = p(z_{1:T} | a_{1:T}) prod_t q(a_t | x_t)
(6.12-6.13), with q(a_t | x_t) = N(mu(x_t), diag sigma^2(x_t)) from
e_a = MLP(x_t, 256, Tanh, 128, Tanh) and a linear Gaussian head (6.14-6.15, 13.1.2), and
p(z_{1:T} | a_{1:T}) the exact posterior of the model's LG-LDS by Kalman filtering and backward
sampling
(:class:`pyro_dvae.distributions.kalman.KalmanPosterior`).

Site order: ``a_1 .. a_T``, then ``z_T, z_{T-1}, .., z_1``; z_t is drawn from
p(z_t | z_{t+1}, a_{1:t}) (z_T from p(z_T | a_{1:T})), so the z block as a whole is conditioned on
a_{1:T}.  Masked (padded) a_t are missing observations of the filter.  Inside
:func:`~pyro_dvae.models.base.fused_sites` one site ``a`` and no z sites (see :meth:`KVAE.model`).
"""

from __future__ import annotations

from ..models.base import Guide
from ..nn import MLP, GaussianHead


class KVAEGuide(Guide):
    """Parameterises q(a_t | x_t) (6.14-6.15); z_{1:T} | a_{1:T} is the model's exact posterior."""

    name = "kalman"

    def __init__(self, model):
        super().__init__(model)
        self.encoder = MLP(model.x_dim, 256, "tanh", 128, "tanh")
        self.head = GaussianHead(128, model.a_dim)

    def guide(self, x, u=None, mask=None):
        loc, scale = self.head(self.encoder(x))
        a = self.sample_independent("a", x, mask, loc, scale)
        if self.model.fused():  # no z sites: they cancel with the model's (KVAE.model)
            return
        # shared with the model's p(a_t | a_{1:t-1}) and p(z | a) (one Kalman filter per step)
        self.model.exact_posterior(a.values, u, mask).sample_sites("z")


GUIDES = {g.name: g for g in (KVAEGuide,)}
