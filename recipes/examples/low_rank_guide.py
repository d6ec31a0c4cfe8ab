"""A guide written as a user would, outside the package: q(z|x) = N(mu(x), diag d(x) + V(x) V(x)^T),
a diagonal plus low-rank covariance (Pyro's LowRankMultivariateNormal).

`vae_low_rank_guide.yaml`, beside this file, uses it by class path; the README's "Writing a guide"
walks through it.
"""

import pyro
import pyro.distributions as dist
from pyro.nn import PyroModule
from torch.nn.functional import softplus

from varinf import DATA_PLATE, LATENT, MLP, NetworkFactory


class LowRankGaussianGuide(PyroModule):
    # What this guide can do, so that every objective and metric that needs it accepts it.
    capabilities = frozenset({"density", "posterior", "rsample", "log_prob"})

    # Annotate the arguments: recipes are checked against these types, and `encoder` being a
    # NetworkFactory is what lets a recipe give it as a class path with init_args.
    def __init__(self, data_shape: tuple[int, ...], latent_dim: int, encoder: NetworkFactory = MLP, rank: int = 2):
        super().__init__()
        self.latent_dim, self.rank = latent_dim, rank
        # one network outputs the mean, the diagonal and the rank factors of every z
        self.encoder = encoder(tuple(data_shape), (2 + rank, latent_dim))

    def posterior(self, x):
        out = self.encoder(x)
        loc, raw_diagonal, factors = out[..., 0, :], out[..., 1, :], out[..., 2:, :]
        return dist.LowRankMultivariateNormal(loc, factors.transpose(-1, -2), softplus(raw_diagonal) + 1e-3)

    def forward(self, x):
        with pyro.plate(DATA_PLATE, x.shape[0]):
            return pyro.sample(LATENT, self.posterior(x))
