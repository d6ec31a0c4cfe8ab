"""Likelihood-based objectives: the ELBO through Pyro, and the importance-weighted bound.

``KL(p~(x) q(z|x) || p(z) p(x|z)) = E_p~[-ELBO(x)] - H(p~)`` (THEORY.md, section 2), so minimising
:class:`ELBOLoss` matches the data-side and model-side joints.
"""

import math
from typing import Literal, NamedTuple

import torch
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from pyro.poutine.messenger import Messenger
from pyro.poutine.scale_messenger import ScaleMessenger
from torch import Tensor, nn
from torch.distributions import Distribution, kl_divergence

from varinf.divergences import kl_normal_standard_normal
from varinf.errors import ConfigError
from varinf.guides import GaussianEncoderGuide, _AmortizedGuide, guide_capabilities, posterior_location, require_capabilities
from varinf.likelihoods import BernoulliLikelihood, bernoulli_log_likelihood
from varinf.models import LATENT, LatentVariableModel, check_data_shape
from varinf.priors import StandardNormalPrior

KLEstimator = Literal["analytic", "monte_carlo"]


class ELBOTerms(NamedTuple):
    """One batch of the ELBO, each a mean over the batch, in nats per datapoint.

    ``loss = reconstruction + kl_weight * kl`` is what is minimised; ``negative_elbo =
    reconstruction + kl`` is the bound itself, whatever the KL weight.
    """

    loss: Tensor
    reconstruction: Tensor
    kl: Tensor
    posterior_mean: Tensor

    @property
    def negative_elbo(self) -> Tensor:
        return self.reconstruction + self.kl


class _ScaleSite(ScaleMessenger):
    """``poutine.scale`` restricted to one sample site: multiplies its log-density by ``scale``."""

    def __init__(self, site: str, scale: float):
        super().__init__(scale)
        self.site = site

    def _process_message(self, msg):
        if msg["name"] == self.site:
            super()._process_message(msg)


class _RecordSite(Messenger):
    """Keeps the distribution and value of every visit to one site (guide first, then model)."""

    def __init__(self, site: str):
        super().__init__()
        self.site, self.visits = site, []

    def _postprocess_message(self, msg):
        if msg["name"] == self.site:
            self.visits.append((msg["fn"], msg["value"]))


def is_two_site_program(model: nn.Module, guide: nn.Module) -> bool:
    """Whether ``model`` and ``guide`` are varinf's own two-site programs: the guide samples
    ``z ~ guide.posterior(x)`` (reparameterised) and the model samples ``z ~ model.prior()`` and
    observes ``x ~ model.observation(z)``, each in the data plate and nothing else. Their ELBO is
    then known in closed form, without tracing them (:meth:`ELBOLoss.terms`)."""
    return (
        type(model).forward is LatentVariableModel.forward
        and type(guide).forward is _AmortizedGuide.forward
        and {"posterior", "rsample"} <= guide_capabilities(guide)
    )


def is_gaussian_bernoulli_vae(model: nn.Module, guide: nn.Module) -> bool:
    """Whether a two-site program is the VAE of Kingma & Welling (2014): the Gaussian encoder
    guide, the N(0, I) prior and the Bernoulli likelihood, none with its distribution overridden.
    Its analytic ELBO is then computed from mu, sigma and the logits (:meth:`ELBOLoss.closed_form_terms`)."""
    return (
        is_two_site_program(model, guide)
        and isinstance(guide, GaussianEncoderGuide) and type(guide).posterior is GaussianEncoderGuide.posterior
        and type(model).observation is LatentVariableModel.observation
        and isinstance(model.prior, StandardNormalPrior) and type(model.prior).forward is StandardNormalPrior.forward
        and type(model.likelihood).forward is BernoulliLikelihood.forward
    )


def kl_estimate(q: Distribution, p: Distribution, z: Tensor, analytic: bool) -> Tensor:
    """``KL(q || p)``: closed form when requested and registered, else ``log q(z) - log p(z)`` at ``z ~ q``."""
    if analytic:
        try:
            return kl_divergence(q, p)
        except NotImplementedError:
            pass
    return q.log_prob(z) - p.log_prob(z)


class ELBOLoss(nn.Module):
    """``-ELBO(x) = -E_q[log p(x|z)] + beta KL(q(z|x) || p(z))`` per datapoint, from Pyro's ELBO.

    The loss is the differentiable loss of Pyro's ``ELBOModule``: ``TraceMeanField_ELBO`` for an
    analytic KL, ``Trace_ELBO`` for a Monte-Carlo one. The KL weight (the attribute ``kl_weight``,
    which ``VAEModule`` sets from ``beta`` and ``kl_warmup_epochs``) is a ``poutine.scale`` on the
    latent site of model and guide on Pyro's path, and a product on the direct paths below.

    For varinf's own model and guides (:func:`is_two_site_program`) the same estimator is computed
    from their distributions directly, with the same random draws, skipping Pyro's tracing (the
    hot path of training; tests check loss and gradients equal Pyro's); for the Gaussian-Bernoulli
    VAE with the analytic KL (:func:`is_gaussian_bernoulli_vae`), from its closed form, without
    building the distributions. Any other program, such as a user's guide with its own
    ``forward``, runs through Pyro's ELBO.

    Args:
        model: the Pyro model ``p(z) p(x|z)``, called as ``model(x)``.
        guide: the Pyro guide ``q(z|x)``, called as ``guide(x)``.
        kl: ``"analytic"`` or ``"monte_carlo"``.
        num_particles: samples of z per datapoint (vectorised).
    """

    needs = ("density",)

    def __init__(self, model: nn.Module, guide: nn.Module, kl: KLEstimator = "analytic", num_particles: int = 1):
        super().__init__()
        require_capabilities(guide, self.needs, "The ELBO")
        if kl not in ("analytic", "monte_carlo"):
            raise ConfigError(f"kl must be 'analytic' or 'monte_carlo', got {kl!r}.")
        estimator = TraceMeanField_ELBO if kl == "analytic" else Trace_ELBO
        self.analytic = kl == "analytic"
        self.elbo = estimator(num_particles=num_particles, vectorize_particles=num_particles > 1, max_plate_nesting=1)(model, guide)
        self.num_particles = num_particles  # model and guide live in self.elbo (checkpoint keys objective.elbo.*)
        self.direct = is_two_site_program(model, guide)
        self.closed_form = self.analytic and is_gaussian_bernoulli_vae(model, guide)
        self.kl_weight = 1.0

    def forward(self, x: Tensor) -> Tensor:
        """The loss, in nats per datapoint."""
        return self.terms(x).loss

    def terms(self, x: Tensor) -> ELBOTerms:
        """The loss and its parts. The parts are read off the same run, without gradients."""
        if self.closed_form:
            return self.closed_form_terms(x)
        if self.direct:
            return self.direct_terms(x)
        recorder = _RecordSite(LATENT)
        with recorder, _ScaleSite(LATENT, self.kl_weight):
            loss = self.elbo(x) / x.shape[0]
        (q, z), (p, _) = recorder.visits
        with torch.no_grad():
            kl = kl_estimate(q, p, z, self.analytic).mean()
            reconstruction = loss.detach() - self.kl_weight * kl
        return ELBOTerms(loss, reconstruction, kl, posterior_location(q).detach())

    def direct_terms(self, x: Tensor) -> ELBOTerms:
        """What Pyro's ELBO computes for a two-site program, from the distributions themselves:
        ``-E_q log p(x|z) + beta KL(q || p)``, averaged over particles and the batch."""
        model, guide = self.elbo.model, self.elbo.guide
        check_data_shape(x, model.data_shape, "The ELBO")
        q = guide.posterior(x)
        z = q.rsample() if self.num_particles == 1 else q.rsample((self.num_particles,))
        reconstruction = -model.observation(z).log_prob(x).mean()
        kl = kl_estimate(q, model.prior(), z, self.analytic).mean()
        return self.weighted_terms(reconstruction, kl, posterior_location(q))

    def closed_form_terms(self, x: Tensor) -> ELBOTerms:
        """:meth:`direct_terms` of the Gaussian-Bernoulli VAE in closed form (Kingma & Welling 2014,
        appendices B and C.1): ``z = mu + sigma eps``, ``log p(x|z) = -sum_d BCE(l_d(z), x_d)`` and
        ``KL = 1/2 sum_j (mu_j^2 + sigma_j^2 - log sigma_j^2 - 1)``, from the tensors, with the same
        draws and values, without building the three distributions (the default recipe's hot path)."""
        model, guide = self.elbo.model, self.elbo.guide
        check_data_shape(x, model.data_shape, "The ELBO")
        loc, scale = guide.gaussian_parameters(x)
        shape = loc.shape if self.num_particles == 1 else (self.num_particles, *loc.shape)
        z = loc + torch.randn(shape, dtype=loc.dtype, device=loc.device) * scale
        reconstruction = -bernoulli_log_likelihood(model.decoder(z).float(), x, len(model.data_shape)).mean()
        return self.weighted_terms(reconstruction, kl_normal_standard_normal(loc, scale).mean(), loc)

    def weighted_terms(self, reconstruction: Tensor, kl: Tensor, posterior_mean: Tensor) -> ELBOTerms:
        """The loss ``reconstruction + beta kl`` (no multiplication in the graph when beta is 1) and its parts."""
        loss = reconstruction + (kl if self.kl_weight == 1 else self.kl_weight * kl)
        return ELBOTerms(loss, reconstruction.detach(), kl.detach(), posterior_mean.detach())


def log_importance_weights(model: nn.Module, guide: nn.Module, x: Tensor, num_samples: int) -> Tensor:
    """``log w_k = log p(x, z_k) - log q(z_k|x)`` for ``z_k ~ q(z|x)``, shape ``(num_samples, B)``.

    Uses ``guide.posterior(x)`` (a distribution over z with batch shape ``(B,)``) and
    ``model.log_joint(x, z)``.
    """
    q = guide.posterior(x)
    z = q.rsample((num_samples,))
    return model.log_joint(x, z) - q.log_prob(z)


def iwae_bound(log_weights: Tensor, dim: int = 0) -> Tensor:
    """Importance-weighted bound ``log (1/K) sum_k w_k <= log p(x)`` per datapoint (Burda et al., 2016).

    K = 1 gives the ELBO; the bound is non-decreasing in K and tends to ``log p(x)``.

    Args:
        log_weights: ``log w_k``, K samples along ``dim``.
    Returns:
        The bound, with ``dim`` reduced.
    """
    return torch.logsumexp(log_weights, dim) - math.log(log_weights.shape[dim])


class IWAELoss(nn.Module):
    """The negative importance-weighted bound (Burda et al. 2016) per datapoint, averaged:
    ``-(1/B) sum_b log (1/K) sum_k p(x_b|z_k) [p(z_k) / q(z_k|x_b)]^beta`` with ``z_k ~ q(z|x_b)``.

    The log-sum-exp runs over the K samples of each datapoint (Pyro's ``RenyiELBO`` pools the
    batch instead). K = 1 is the ELBO; ``kl_weight`` (beta) weights the log density ratio, so
    beta-IWAE and KL warm-up compose as in :class:`ELBOLoss`.

    Args:
        model: the model side, with ``observation(z)`` and ``prior()``.
        guide: a guide with ``posterior``, ``rsample`` and ``density``.
        num_samples: K.
    """

    needs = ("density", "posterior", "rsample")

    def __init__(self, model: nn.Module, guide: nn.Module, num_samples: int = 5):
        super().__init__()
        require_capabilities(guide, self.needs, "The IWAE objective")
        self.model, self.guide, self.num_samples = model, guide, num_samples
        self.kl_weight = 1.0

    def forward(self, x: Tensor) -> Tensor:
        """The loss, in nats per datapoint."""
        return self.terms(x).loss

    def terms(self, x: Tensor) -> ELBOTerms:
        """The loss, and the Monte-Carlo ELBO terms of the same K samples."""
        check_data_shape(x, self.model.data_shape, "The IWAE objective")
        q = self.guide.posterior(x)
        z = q.rsample((self.num_samples,))
        log_likelihood = self.model.observation(z).log_prob(x)
        log_ratio = self.model.prior().log_prob(z) - q.log_prob(z)
        loss = -iwae_bound(log_likelihood + self.kl_weight * log_ratio).mean()
        with torch.no_grad():
            reconstruction, kl = -log_likelihood.mean(), -log_ratio.mean()
        return ELBOTerms(loss, reconstruction, kl, posterior_location(q).detach())
