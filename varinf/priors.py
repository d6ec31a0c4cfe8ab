"""Priors ``p(z)``: modules whose forward returns the distribution over z (event ``(latent_dim,)``).

Built as ``prior(latent_dim)``; their tensors follow the module's device. The KL from a guide is
closed form where ``torch.distributions.kl_divergence`` knows the pair and Monte Carlo otherwise
(mixtures), without any change to the objective.
"""

import math
from collections.abc import Callable, Sequence
from typing import Literal

import pyro.distributions as dist
import torch
from torch import Tensor, nn
from torch.distributions import constraints
from torch.nn.functional import log_softmax, softplus

from varinf.errors import ConfigError, DataError


class DiagonalNormalMixture(dist.TorchDistribution):
    """``p(z) = sum_k pi_k N(z; mu_k, diag sigma_k^2)``, one distribution over z (event ``(D,)``).

    The same density as ``MixtureSameFamily(Categorical, Normal(...).to_event(1))``, computed with
    matrix products instead of a ``(..., K, D)`` tensor: with ``w_k = sigma_k^-2``,
    ``sum_d (z_d - mu_kd)^2 w_kd = z^2 . w_k - 2 z . (mu_k w_k) + mu_k^2 . w_k``. The three terms
    cancel, so they are summed in float64. A VAE step with a 100-component VampPrior then costs
    1.5 steps with N(0, I) instead of 1.7 with ``MixtureSameFamily`` (784-500-500-50, batch 128,
    one thread; ``benchmarks/step_costs.py``).

    Args:
        locs, scales: ``(K, D)`` component means and standard deviations.
        logits: ``(K,)`` unnormalised log mixing weights.
    """

    arg_constraints = {}
    support = constraints.real_vector

    def __init__(self, locs: Tensor, scales: Tensor, logits: Tensor):
        self.locs, self.scales, self.logits = locs, scales, logits
        super().__init__(batch_shape=torch.Size(), event_shape=locs.shape[-1:], validate_args=False)

    def log_prob(self, z: Tensor) -> Tensor:
        precision = self.scales.double().pow(-2)
        locs, z64 = self.locs.double(), z.double()
        squared_distance = z64.pow(2) @ precision.T - 2 * z64 @ (locs * precision).T + (locs.pow(2) * precision).sum(-1)
        log_normaliser = -self.scales.double().log().sum(-1) - 0.5 * self.locs.shape[-1] * math.log(2 * math.pi)
        log_components = log_softmax(self.logits.double(), -1) + log_normaliser - 0.5 * squared_distance
        return torch.logsumexp(log_components, -1).to(z.dtype)

    def sample(self, sample_shape: torch.Size = torch.Size()) -> Tensor:
        with torch.no_grad():
            k = dist.Categorical(logits=self.logits, validate_args=False).sample(sample_shape)
            return self.locs[k] + self.scales[k] * torch.randn_like(self.locs[k])


class StandardNormal(dist.Independent):
    """``N(0, I)``: an ``Independent(Normal(0, 1), 1)`` whose type tells ``kl_divergence`` that the
    closed form to the standard normal applies (:mod:`varinf.divergences` registers it). Built by
    :class:`StandardNormalPrior` only: its base must be ``Normal(0, 1)``."""


class NormalPrior(nn.Module):
    """``p(z) = N(0, scale^2 I)`` over ``latent_dim`` dimensions; the AAE paper's MNIST prior has
    scale 5 (Makhzani et al. 2015). The KL from a Gaussian guide is closed form.

    Args:
        scale: the standard deviation of every dimension.
    """

    distribution_type: type[dist.Independent] = dist.Independent
    """The class of the returned distribution, which selects the closed-form KL that applies."""

    def __init__(self, latent_dim: int, scale: float = 1.0):
        super().__init__()
        if not 0 < scale < math.inf:
            raise ConfigError(f"NormalPrior needs a finite positive scale; got {scale}.")
        self.register_buffer("loc", torch.zeros(latent_dim))
        self.register_buffer("scale", torch.full((latent_dim,), float(scale)))
        self._distribution: dist.Independent | None = None

    def forward(self) -> dist.TorchDistribution:
        """The same distribution object every call, built again only after the buffers moved (to
        another device or dtype): it is constant, and building it costs more than the KL."""
        if self._distribution is None or self._distribution.base_dist.loc is not self.loc:
            self._distribution = self.distribution_type(dist.Normal(self.loc, self.scale, validate_args=False), 1)
        return self._distribution


class StandardNormalPrior(NormalPrior):
    """``p(z) = N(0, I)`` over ``latent_dim`` dimensions, typed :class:`StandardNormal`."""

    distribution_type = StandardNormal

    def __init__(self, latent_dim: int):
        super().__init__(latent_dim, 1.0)


class MixtureOfGaussiansPrior(nn.Module):
    """A learnable mixture ``p(z) = sum_k pi_k N(mu_k, diag sigma_k^2)`` (e.g. Dilokthanakul et
    al. 2016; Tomczak & Welling 2018, section 3). Trained by the ELBO through its Monte-Carlo KL;
    the AAE only samples it, so there it stays at its initialisation.

    Args:
        num_components: K.
        spread: standard deviation of the initial component means.
    """

    def __init__(self, latent_dim: int, num_components: int = 10, spread: float = 1.0):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.locs = nn.Parameter(spread * torch.randn(num_components, latent_dim, generator=generator))
        self.raw_scales = nn.Parameter(torch.full((num_components, latent_dim), 0.5413))  # softplus^-1(1)
        self.logits = nn.Parameter(torch.zeros(num_components))

    def forward(self) -> dist.TorchDistribution:
        return DiagonalNormalMixture(self.locs, softplus(self.raw_scales) + 1e-3, self.logits)


class VampPrior(nn.Module):
    """The variational mixture of posteriors ``p(z) = (1/K) sum_k q(z | u_k)`` with K learnable
    pseudo-inputs ``u_k`` (Tomczak & Welling 2018). It needs the module's guide, with a
    ``posterior`` whose ``log_prob`` takes any z; the VAE, AAE and ALI modules attach it
    (:func:`varinf.guides.attach_guide`).

    Pseudo-inputs are ``sigmoid(raw)``. With ``init: data`` they start at K random training images
    squashed to [0.1, 0.9] (``raw = logit(0.1 + 0.8 x)``, off the flat ends of the sigmoid), set by
    the module before fitting: the prior is then a mixture of posteriors of real digits from the
    first step (at seed 0 it leads the N(0, I) VAE by 1.8 nats of validation -ELBO after 8
    epochs, where noise-initialised pseudo-inputs trail it by 2.7). ``init: noise`` starts them
    near 1/2 with small noise, as in the paper.

    Args:
        num_pseudo_inputs: K (the paper uses 500 on MNIST).
        data_shape: shape of one pseudo-input, as of one datapoint.
        init: ``data`` or ``noise``.
    """

    def __init__(
        self, latent_dim: int, num_pseudo_inputs: int = 500, data_shape: Sequence[int] = (1, 28, 28),
        init: Literal["data", "noise"] = "data",
    ):
        super().__init__()
        if init not in ("data", "noise"):
            raise ConfigError(f"VampPrior init must be 'data' or 'noise', got {init!r}.")
        generator = torch.Generator().manual_seed(0)
        self.raw_pseudo_inputs = nn.Parameter(0.1 * torch.randn(num_pseudo_inputs, *data_shape, generator=generator))
        self.init = init
        self.initialised = False
        """Set by :meth:`initialise_from_data` or by loading weights: loaded pseudo-inputs are kept."""
        self._guide: tuple[nn.Module, ...] = ()  # a plain tuple: the guide's parameters stay the guide's

    guide_needs = ("posterior", "log_prob")

    def attach_guide(self, guide: nn.Module) -> None:
        self._guide = (guide,)

    def initialise_from_data(self, images: Tensor) -> None:
        """With ``init: data``, start the pseudo-inputs at K of ``images`` (values in [0, 1]),
        drawn with a fixed seed, so that every process of a distributed run draws the same. Once
        only: not after an earlier initialisation or over loaded weights (a fine-tuned model)."""
        if self.init != "data" or self.initialised:
            return
        count, shape = self.raw_pseudo_inputs.shape[0], tuple(self.raw_pseudo_inputs.shape[1:])
        if tuple(images.shape[1:]) != shape or len(images) < count or images.min() < 0 or images.max() > 1:
            raise DataError(
                f"VampPrior(init='data') needs at least {count} training images of shape {shape} with values in [0, 1]; "
                f"got {tuple(images.shape)}. Set the prior's data_shape to the data's, or `init: noise`."
            )
        chosen = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:count]
        with torch.no_grad():
            self.raw_pseudo_inputs.copy_(torch.logit(0.1 + 0.8 * images[chosen.to(images.device)]))
        self.initialised = True

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self.initialised = True

    def pseudo_inputs(self) -> Tensor:
        return torch.sigmoid(self.raw_pseudo_inputs)

    def forward(self) -> dist.TorchDistribution:
        if not self._guide:
            raise RuntimeError("VampPrior has no guide: use it in a module with an encoder (VAEModule or AAEModule).")
        components = self._guide[0].posterior(self.pseudo_inputs())
        uniform = torch.zeros(components.batch_shape, device=self.raw_pseudo_inputs.device)
        if isinstance(components, dist.Independent) and isinstance(components.base_dist, dist.Normal):
            return DiagonalNormalMixture(components.base_dist.loc, components.base_dist.scale, uniform)
        return dist.MixtureSameFamily(dist.Categorical(logits=uniform, validate_args=False), components, validate_args=False)


PriorFactory = Callable[[int], nn.Module]
"""Builds a prior from ``latent_dim``; its forward returns a distribution with event shape ``(latent_dim,)``."""
