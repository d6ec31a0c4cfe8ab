"""Guides: the data side ``p~(x) q_phi(z|x)`` of every varinf model, and the interface they share.

A guide is a :class:`~pyro.nn.PyroModule` built as ``guide(data_shape, latent_dim)`` whose
``forward(x)`` samples the latent site :data:`~varinf.models.LATENT` inside the plate
:data:`~varinf.models.DATA_PLATE`. That is all the ELBO needs (the KL is analytic where
``torch.distributions.kl_divergence`` knows the pair, Monte Carlo otherwise). Optional
capabilities, declared in the class attribute ``capabilities``, unlock the rest:

============= ============================================== ===================================
capability     what the guide provides                        what needs it
============= ============================================== ===================================
``density``    q(z|x) has a density, read by Pyro's ELBO       the ELBO (VAE), IWAE, ``nll``
``posterior``  ``posterior(x)``: q(z|x) as a distribution,     reconstructions, AAE, ALI, IWAE,
               batch shape ``(B,)``, event ``(latent_dim,)``   ``nll``, VampPrior
``rsample``    ``posterior(x).rsample()`` is reparameterised   AAE, ALI, IWAE
``log_prob``   ``posterior(x).log_prob(z)`` of any z, not      VampPrior (its components are
               only of the guide's own samples                 posteriors of pseudo-inputs)
============= ============================================== ===================================

A guide that declares nothing is taken as a plain Pyro guide: ``density`` only. Objectives check
what they need when the module is built (:func:`require_capabilities`), so a missing capability
is a clear error before training, not a failure inside Pyro.
"""

import math
from collections.abc import Callable, Iterable, Sequence

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions.transforms import (
    Permute,
    conditional_affine_autoregressive,
    conditional_affine_coupling,
)
from pyro.nn import PyroModule
from torch import Tensor, nn
from torch.nn.functional import softplus

from varinf.errors import ConfigError
from varinf.models import DATA_PLATE, LATENT, as_data_shape, check_data_shape
from varinf.networks import MLP, NetworkFactory

CAPABILITIES = {
    "density": "a density q(z|x) at its samples (not a point mass)",
    "posterior": "a posterior(x) method returning q(z|x) as a distribution with batch shape (B,) and event shape (latent_dim,)",
    "rsample": "reparameterised samples from posterior(x) (rsample)",
    "log_prob": "posterior(x).log_prob(z) for any z, not only the guide's own samples",
}
"""The optional guide capabilities, by name, with what each means."""


def guide_capabilities(guide: nn.Module) -> frozenset[str]:
    """What a guide declares it can do (``density`` only if it declares nothing)."""
    return frozenset(getattr(guide, "capabilities", {"density"}))


def require_capabilities(guide: nn.Module, needs: Iterable[str], user: str) -> None:
    """Raise a :class:`ConfigError` naming every capability in ``needs`` that ``guide`` lacks."""
    missing = [need for need in needs if need not in guide_capabilities(guide)]
    if missing:
        wanted = "; ".join(f"{name} ({CAPABILITIES[name]})" for name in missing)
        raise ConfigError(
            f"{user} needs a guide with {wanted}, but {type(guide).__name__} does not declare it in its `capabilities`. "
            "Choose a guide that has it (e.g. varinf.GaussianEncoderGuide) or implement it (README: 'Writing a guide')."
        )


def attach_guide(prior: nn.Module, guide: nn.Module) -> None:
    """Give a prior that is built from the guide (one with ``guide_needs``, e.g. a VampPrior) the
    module's guide, after checking the guide has what the prior needs."""
    if hasattr(prior, "guide_needs"):
        require_capabilities(guide, prior.guide_needs, type(prior).__name__)
        prior.attach_guide(guide)


def posterior_location(q: dist.Distribution) -> Tensor:
    """A point estimate of z under q: its mean, or for a flow (whose mean has no closed form) the
    image of its base distribution's mean."""
    try:
        return q.mean
    except NotImplementedError:
        if not isinstance(q, dist.TransformedDistribution):
            raise
        z = posterior_location(q.base_dist)
        for transform in q.transforms:
            z = transform(z)
        return z


def checked_scale_floor(scale_floor: float) -> float:
    """``scale_floor``, the smallest posterior standard deviation, refused unless finite and >= 0."""
    if not 0 <= scale_floor < math.inf:
        raise ConfigError(f"scale_floor must be a finite number >= 0, got {scale_floor!r}.")
    return scale_floor


class _AmortizedGuide(PyroModule):
    """Shared plumbing: check the batch shape, then sample ``posterior(x)`` at the latent site."""

    capabilities = frozenset({"density", "posterior", "rsample", "log_prob"})

    def __init__(self, data_shape: Sequence[int], latent_dim: int):
        super().__init__()
        self.data_shape, self.latent_dim = as_data_shape(data_shape), latent_dim

    def posterior(self, x: Tensor) -> dist.TorchDistribution:
        raise NotImplementedError

    def encode(self, x: Tensor) -> Tensor:
        """The encoder's output in float32: under mixed precision the network runs in 16 bits,
        while the distribution built from its output, and so every density, stays in 32."""
        return self.encoder(x).float()

    def forward(self, x: Tensor) -> Tensor:
        check_data_shape(x, self.data_shape, "The guide")
        with pyro.plate(DATA_PLATE, x.shape[0]):
            return pyro.sample(LATENT, self.posterior(x))


class GaussianEncoderGuide(_AmortizedGuide):
    """``q_phi(z|x) = N(mu(x), diag sigma(x)^2)``: amortised and reparameterised.

    The encoder network outputs ``(mu, s)`` and ``sigma = softplus(s) + scale_floor``, which keeps
    the scale positive without a constrained output (Kingma & Welling, 2014).

    Args:
        data_shape: shape of one datapoint x.
        latent_dim: dimension of z.
        encoder: builds the encoder network ``data_shape -> (2, latent_dim)``.
        scale_floor: smallest posterior standard deviation.
    """

    def __init__(self, data_shape: Sequence[int], latent_dim: int, encoder: NetworkFactory = MLP, scale_floor: float = 1e-3):
        super().__init__(data_shape, latent_dim)
        self.scale_floor = checked_scale_floor(scale_floor)
        self.encoder = encoder(self.data_shape, (2, latent_dim))

    def gaussian_parameters(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(mu(x), sigma(x))``, each ``(B, latent_dim)``."""
        loc, raw_scale = self.encode(x).unbind(-2)
        return loc, softplus(raw_scale) + self.scale_floor

    def posterior(self, x: Tensor) -> dist.TorchDistribution:
        return dist.Normal(*self.gaussian_parameters(x), validate_args=False).to_event(1)


class FullCovarianceGaussianGuide(_AmortizedGuide):
    """``q_phi(z|x) = N(mu(x), L(x) L(x)^T)`` with a full lower-triangular ``scale_tril`` L whose
    diagonal is ``softplus(.) + scale_floor``; the KL to a diagonal Gaussian prior is closed form
    (:func:`varinf.divergences.kl_mvn_diagonal_normal`).

    Args:
        encoder: builds the network ``data_shape -> (latent_dim + latent_dim (latent_dim + 1) / 2,)``.
        scale_floor: smallest diagonal entry of L.
    """

    def __init__(self, data_shape: Sequence[int], latent_dim: int, encoder: NetworkFactory = MLP, scale_floor: float = 1e-3):
        super().__init__(data_shape, latent_dim)
        self.scale_floor = checked_scale_floor(scale_floor)
        self.encoder = encoder(self.data_shape, (latent_dim + latent_dim * (latent_dim + 1) // 2,))
        self.register_buffer("tril_indices", torch.tril_indices(latent_dim, latent_dim), persistent=False)

    def posterior(self, x: Tensor) -> dist.TorchDistribution:
        out = self.encode(x)
        d = self.latent_dim
        loc, entries = out[..., :d], out[..., d:]
        rows, columns = self.tril_indices
        scale_tril = out.new_zeros(*out.shape[:-1], d, d)
        scale_tril[..., rows, columns] = entries
        diagonal = softplus(scale_tril.diagonal(dim1=-2, dim2=-1)) + self.scale_floor
        scale_tril = scale_tril.tril(-1) + torch.diag_embed(diagonal)
        return dist.MultivariateNormal(loc, scale_tril=scale_tril, validate_args=False)


FLOWS = {"iaf": conditional_affine_autoregressive, "coupling": conditional_affine_coupling}


class FlowGuide(_AmortizedGuide):
    """A diagonal Gaussian pushed through ``num_flows`` normalising-flow steps conditioned on x:
    inverse autoregressive flow (``flow: iaf``, Kingma et al. 2016) or affine coupling
    (``flow: coupling``, Dinh et al. 2017, with the halves swapped between steps), built from
    Pyro's conditional transforms.

    The encoder outputs ``(mu, s, h)``: the base ``N(mu, diag softplus(s)^2)`` and a context h that
    conditions every step. ``log q(z|x) = log N(z_0) - sum_t log |det dz_t/dz_(t-1)|``; Pyro caches
    each sample's inverse, so the ELBO and IWAE are as cheap as sampling. The KL is Monte Carlo.
    The density of other z (``log_prob``) would need the IAF's sequential inverse, so it is not
    declared: a VampPrior needs a Gaussian guide.

    Args:
        encoder: builds the network ``data_shape -> (3, latent_dim)``.
        flow: ``iaf`` or ``coupling``.
        num_flows: number of flow steps.
        hidden: hidden widths of each step's network.
        scale_floor: smallest standard deviation of the base Gaussian.
    """

    capabilities = frozenset({"density", "posterior", "rsample"})  # log_prob of other z: not batched here

    def __init__(
        self, data_shape: Sequence[int], latent_dim: int, encoder: NetworkFactory = MLP, flow: str = "iaf",
        num_flows: int = 2, hidden: Sequence[int] = (320, 320), scale_floor: float = 1e-3,
    ):
        super().__init__(data_shape, latent_dim)
        if flow not in FLOWS or num_flows < 1:
            raise ConfigError(f"FlowGuide needs flow in {sorted(FLOWS)} and num_flows >= 1; got flow={flow!r}, num_flows={num_flows}.")
        self.scale_floor, self.flow = checked_scale_floor(scale_floor), flow
        self.encoder = encoder(self.data_shape, (3, latent_dim))
        self.steps = nn.ModuleList(FLOWS[flow](latent_dim, latent_dim, hidden_dims=list(hidden)) for _ in range(num_flows))
        self.register_buffer("reverse", torch.arange(latent_dim - 1, -1, -1), persistent=False)

    def posterior(self, x: Tensor) -> dist.TorchDistribution:
        loc, raw_scale, context = self.encode(x).unbind(-2)
        base = dist.Normal(loc, softplus(raw_scale) + self.scale_floor, validate_args=False).to_event(1)
        transforms = []
        for index, step in enumerate(self.steps):
            if self.flow == "coupling" and index > 0:
                transforms.append(Permute(self.reverse))
            transforms.append(step.condition(context))
        return dist.TransformedDistribution(base, transforms, validate_args=False)


class DeltaEncoderGuide(_AmortizedGuide):
    """A deterministic encoder ``z = f(x)``: ``q(z|x)`` is a point mass (Pyro's ``Delta``), the
    original AAE's encoder (Makhzani et al. 2015). It has no density, so it serves the AAE and
    ALI but not the ELBO.

    Args:
        encoder: builds the network ``data_shape -> (latent_dim,)``.
    """

    capabilities = frozenset({"posterior", "rsample"})

    def __init__(self, data_shape: Sequence[int], latent_dim: int, encoder: NetworkFactory = MLP):
        super().__init__(data_shape, latent_dim)
        self.encoder = encoder(self.data_shape, (latent_dim,))

    def posterior(self, x: Tensor) -> dist.TorchDistribution:
        return dist.Delta(self.encode(x), event_dim=1, validate_args=False)


GuideFactory = Callable[[Sequence[int], int], nn.Module]
"""Builds a guide from ``(data_shape, latent_dim)``; in a recipe, a class path with ``init_args``."""
