"""The two sides of every varinf model, as Pyro programs.

* Model side: ``p(z) p_theta(x|z)``, a Pyro model (:class:`LatentVariableModel`).
* Data side: ``p~(x) q_phi(z|x)``, a Pyro guide (:mod:`varinf.guides`).

Both sample the latent site :data:`LATENT` inside the plate :data:`DATA_PLATE`, so any guide
pairs with any model. Parameters are module-local (``pyro.settings module_local_params``): two
models in one process never share parameters through Pyro's global param store.
"""

from collections.abc import Callable, Sequence

import pyro
import pyro.distributions as dist
from pyro.nn import PyroModule
from torch import Tensor

from varinf.errors import ConfigError, DataError
from varinf.likelihoods import BernoulliLikelihood, LikelihoodFactory
from varinf.networks import MLP, NetworkFactory
from varinf.priors import PriorFactory, StandardNormalPrior

pyro.settings.set(module_local_params=True)

LATENT = "z"
"""Name of the latent sample site shared by models and guides."""
OBSERVED = "x"
"""Name of the observed sample site."""
DATA_PLATE = "data"
"""Name of the plate over datapoints."""


def as_data_shape(data_shape: int | Sequence[int]) -> tuple[int, ...]:
    """The shape of one datapoint as a tuple of positive ints; an int ``n`` means ``(n,)``."""
    shape = (data_shape,) if isinstance(data_shape, int) else data_shape
    if not isinstance(shape, Sequence) or not shape or not all(isinstance(size, int) and size > 0 for size in shape):
        raise ConfigError(f"data_shape must be a positive int or a non-empty sequence of them, such as [1, 28, 28]; got {data_shape!r}.")
    return tuple(shape)


def check_data_shape(x: Tensor, data_shape: Sequence[int], where: str) -> None:
    """Raise a clear error unless ``x`` is a batch of shape ``(B, *data_shape)``."""
    if tuple(x.shape[1:]) != tuple(data_shape):
        raise DataError(
            f"{where} expects a batch of shape (B, {', '.join(map(str, data_shape))}), got {tuple(x.shape)}. "
            "Set the module's data_shape to match the data, or reshape the batch."
        )


class LatentVariableModel(PyroModule):
    """Model side ``p(z) p_theta(x|z)``: a prior, a decoder network and a likelihood.

    Args:
        data_shape: shape of one datapoint x.
        latent_dim: dimension of z.
        decoder: builds the decoder network ``(latent_dim,) -> data_shape`` of likelihood parameters.
        likelihood: builds the observation model from the decoder output.
        prior: builds ``p(z)``.
    """

    def __init__(
        self,
        data_shape: Sequence[int],
        latent_dim: int,
        decoder: NetworkFactory = MLP,
        likelihood: LikelihoodFactory = BernoulliLikelihood,
        prior: PriorFactory = StandardNormalPrior,
    ):
        super().__init__()
        if latent_dim < 1:
            raise ConfigError(f"latent_dim must be at least 1, got {latent_dim}.")
        self.data_shape, self.latent_dim = as_data_shape(data_shape), latent_dim
        self.decoder = decoder((latent_dim,), self.data_shape)
        self.likelihood = likelihood()
        self.prior = prior(latent_dim)

    def observation(self, z: Tensor) -> dist.TorchDistribution:
        """``p_theta(x|z)``, with the data dimensions as its event; built in float32 from the
        decoder's output, which mixed precision computes in 16 bits."""
        return self.likelihood(self.decoder(z).float()).to_event(len(self.data_shape))

    def forward(self, x: Tensor | None = None, num_samples: int | None = None) -> Tensor:
        """Sample ``z ~ p(z)`` and ``x ~ p(x|z)`` (observed when ``x`` is given)."""
        if x is not None:
            check_data_shape(x, self.data_shape, "The model")
        with pyro.plate(DATA_PLATE, x.shape[0] if x is not None else num_samples):
            z = pyro.sample(LATENT, self.prior())
            return pyro.sample(OBSERVED, self.observation(z), obs=x)

    def log_joint(self, x: Tensor, z: Tensor) -> Tensor:
        """``log p(z) + log p(x|z)`` for z of shape ``(*batch, latent_dim)`` broadcasting against x."""
        return self.prior().log_prob(z) + self.observation(z).log_prob(x)

    def generate(self, z: Tensor) -> Tensor:
        """The mean of ``p(x|z)``: what a decoded latent looks like."""
        return self.observation(z).mean


ModelFactory = Callable[[Sequence[int], int], LatentVariableModel]
"""Builds the model side from ``(data_shape, latent_dim)``; in a recipe, a class path with ``init_args``."""
