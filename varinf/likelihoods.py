"""Observation models p(x | decoder output): each maps the decoder's output to a distribution over x.

A likelihood is an ``nn.Module`` built with no positional arguments (in a recipe: its class path,
with ``init_args`` for its settings) whose forward takes the decoder output, shaped like x, and
returns a distribution with one independent factor per pixel. The model adds ``to_event``.
"""

from collections.abc import Callable

import pyro.distributions as dist
import torch
from torch import Tensor, nn

from varinf.errors import ConfigError


class BernoulliLikelihood(nn.Module):
    """``p(x|z) = prod_d Bernoulli(x_d; sigmoid(l_d))`` with logits ``l`` from the decoder (binary x)."""

    def forward(self, logits: Tensor) -> dist.TorchDistribution:
        return dist.Bernoulli(logits=logits, validate_args=False)


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
        if scale <= 0:
            raise ConfigError(f"GaussianLikelihood needs scale > 0, got {scale}.")
        log_scale = torch.tensor(float(scale)).log()
        if learn_scale:
            self.log_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_scale", log_scale)

    def forward(self, loc: Tensor) -> dist.TorchDistribution:
        return dist.Normal(loc, self.log_scale.exp(), validate_args=False)


LikelihoodFactory = Callable[[], nn.Module]
"""Builds a likelihood; in a recipe, a class path such as ``varinf.GaussianLikelihood``."""
