"""Observation models p(x | decoder output): each maps the decoder's output to a distribution over x.

A likelihood is an ``nn.Module`` built with no positional arguments (in a recipe: its class path,
with ``init_args`` for its settings) whose forward takes the decoder output, shaped like x, and
returns a distribution with one independent factor per pixel. The model adds ``to_event``.
"""

import math
from collections.abc import Callable

import pyro.distributions as dist
import torch
from torch import Tensor, nn
from torch.nn.functional import binary_cross_entropy_with_logits

from varinf.errors import ConfigError


def bernoulli_log_likelihood(logits: Tensor, x: Tensor, event_dims: int) -> Tensor:
    """``log prod_d Bernoulli(x_d; sigmoid(l_d)) = -sum_d BCE(l_d, x_d)`` over the last
    ``event_dims`` dimensions, with ``logits`` and ``x`` broadcast against each other. Negated after
    the sum rather than pixel by pixel: one pass over the image less, forward and backward."""
    if logits.shape != x.shape:
        logits, x = torch.broadcast_tensors(logits, x)
    return -binary_cross_entropy_with_logits(logits, x, reduction="none").sum(tuple(range(-event_dims, 0)))


class IndependentBernoulli(dist.Independent):
    """``Independent(Bernoulli(logits=l))``, Bernoulli pixels taken as one event, with its density
    computed by :func:`bernoulli_log_likelihood`."""

    def log_prob(self, value: Tensor) -> Tensor:
        return bernoulli_log_likelihood(self.base_dist.logits, value, self.reinterpreted_batch_ndims)


class LogitBernoulli(dist.Bernoulli):
    """Pyro's ``Bernoulli(logits=l)``, whose ``to_event`` gives an :class:`IndependentBernoulli`."""

    def to_event(self, reinterpreted_batch_ndims: int | None = None) -> dist.TorchDistribution:
        if reinterpreted_batch_ndims is None:
            reinterpreted_batch_ndims = len(self.batch_shape)
        if reinterpreted_batch_ndims <= 0:
            return super().to_event(reinterpreted_batch_ndims)
        return IndependentBernoulli(self, reinterpreted_batch_ndims, validate_args=False)


class BernoulliLikelihood(nn.Module):
    """``p(x|z) = prod_d Bernoulli(x_d; sigmoid(l_d))`` with logits ``l`` from the decoder (binary x)."""

    def forward(self, logits: Tensor) -> dist.TorchDistribution:
        return LogitBernoulli(logits=logits, validate_args=False)


class ContinuousBernoulliLikelihood(nn.Module):
    """Continuous Bernoulli on x in [0, 1], with its normalising constant (Loaiza-Ganem & Cunningham, 2019)."""

    def forward(self, logits: Tensor) -> dist.TorchDistribution:
        return dist.ContinuousBernoulli(logits=logits, validate_args=False)


class GaussianLikelihood(nn.Module):
    """``p(x|z) = prod_d N(x_d; mu_d, sigma^2)`` with mean ``mu`` from the decoder.

    Args:
        scale: the standard deviation ``sigma`` (the initial value when learned).
        learn_scale: learn one shared ``log sigma`` by maximum likelihood (the sigma-VAE of
            Rybkin et al., 2021) instead of keeping it fixed.
    """

    def __init__(self, scale: float = 0.1, learn_scale: bool = False):
        super().__init__()
        if not 0 < scale < math.inf:
            raise ConfigError(f"GaussianLikelihood needs a finite scale > 0, got {scale}.")
        log_scale = torch.tensor(float(scale)).log()
        if learn_scale:
            self.log_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_scale", log_scale)

    def forward(self, loc: Tensor) -> dist.TorchDistribution:
        return dist.Normal(loc, self.log_scale.exp(), validate_args=False)


LikelihoodFactory = Callable[[], nn.Module]
"""Builds a likelihood; in a recipe, a class path such as ``varinf.GaussianLikelihood``."""
