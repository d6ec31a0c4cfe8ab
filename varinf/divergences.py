"""Information measures and divergences as pure, batched torch functions.

Probability vectors live on the last dimension; every other dimension is a batch dimension.
Natural logarithms throughout, so results are in nats. The formulas follow THEORY.md, section 1.
"""

import torch
from torch import Tensor
from torch.distributions import Independent, MultivariateNormal, Normal, kl_divergence, register_kl
from torch.special import xlogy

from varinf.priors import StandardNormal


def entropy(p: Tensor) -> Tensor:
    """Shannon entropy ``H(p) = -sum_i p_i log p_i``, with ``0 log 0 = 0``.

    Args:
        p: probabilities, shape ``(..., n)``, summing to one over the last dimension.
    Returns:
        ``H(p)``, shape ``(...)``.
    """
    return -xlogy(p, p).sum(-1)


def cross_entropy(p: Tensor, q: Tensor) -> Tensor:
    """Cross-entropy ``H(p, q) = -sum_i p_i log q_i >= H(p)``.

    Terms with ``p_i = 0`` contribute 0; it is ``+inf`` where ``q_i = 0 < p_i``.

    Args:
        p, q: probabilities, shape ``(..., n)`` (broadcastable).
    Returns:
        ``H(p, q)``, shape ``(...)``.
    """
    return -xlogy(p, q).sum(-1)


def kl(p: Tensor, q: Tensor) -> Tensor:
    """Kullback-Leibler divergence ``KL(p || q) = sum_i p_i log(p_i / q_i) = H(p, q) - H(p)``.

    Non-negative, zero iff ``p = q``, not symmetric; ``+inf`` where ``q_i = 0 < p_i``.

    Args:
        p, q: probabilities, shape ``(..., n)`` (broadcastable).
    Returns:
        ``KL(p || q)``, shape ``(...)``.
    """
    return (xlogy(p, p) - xlogy(p, q)).sum(-1)


def js(p: Tensor, q: Tensor) -> Tensor:
    """Jensen-Shannon divergence ``JS(p, q) = KL(p || m)/2 + KL(q || m)/2`` with ``m = (p + q)/2``.

    Symmetric, in ``[0, log 2]``, and exactly ``log 2`` when p and q have disjoint supports.

    Args:
        p, q: probabilities, shape ``(..., n)`` (broadcastable).
    Returns:
        ``JS(p, q)``, shape ``(...)``.
    """
    m = (p + q) / 2
    return (kl(p, m) + kl(q, m)) / 2


def kl_normal_standard_normal(loc: Tensor, scale: Tensor) -> Tensor:
    """Closed-form ``KL(N(mu, diag sigma^2) || N(0, I)) = 1/2 sum_j (mu_j^2 + sigma_j^2 - log sigma_j^2 - 1)``.

    Kingma & Welling (2014), appendix B.

    Args:
        loc: means ``mu``, shape ``(..., d)``.
        scale: standard deviations ``sigma > 0``, shape ``(..., d)``.
    Returns:
        The KL summed over the ``d`` latent dimensions, shape ``(...)``.
    """
    return 0.5 * (loc.square() + scale.square() - 2 * scale.log() - 1).sum(-1)


def kl_normal_normal(loc_p: Tensor, scale_p: Tensor, loc_q: Tensor, scale_q: Tensor) -> Tensor:
    """Closed-form KL between diagonal Gaussians ``p = N(mu_p, sigma_p^2)`` and ``q = N(mu_q, sigma_q^2)``.

    ``KL(p || q) = sum_j [log(sigma_q / sigma_p) + (sigma_p^2 + (mu_p - mu_q)^2) / (2 sigma_q^2) - 1/2]``.

    Args:
        loc_p, scale_p, loc_q, scale_q: shape ``(..., d)`` (broadcastable).
    Returns:
        The KL summed over the last dimension, shape ``(...)``.
    """
    variance_ratio = (scale_p / scale_q).square()
    mahalanobis = ((loc_p - loc_q) / scale_q).square()
    return 0.5 * (variance_ratio + mahalanobis - 1 - variance_ratio.log()).sum(-1)


def monte_carlo_kl(log_p: Tensor, log_q: Tensor, dim: int = 0) -> Tensor:
    """Monte-Carlo estimate ``KL(p || q) ~ 1/S sum_s [log p(x_s) - log q(x_s)]`` with ``x_s ~ p``.

    Unbiased; its standard error shrinks as ``1/sqrt(S)``.

    Args:
        log_p, log_q: log-densities of both distributions at the same samples drawn from p.
        dim: the sample dimension to average over.
    Returns:
        The estimate, with ``dim`` reduced.
    """
    return (log_p - log_q).mean(dim)


def wasserstein_1d(x: Tensor, y: Tensor) -> Tensor:
    """Wasserstein-1 distance between the empirical distributions of two 1-D samples.

    ``W1 = integral |F_x(t) - F_y(t)| dt``; for equal sizes this is ``mean |sort(x) - sort(y)|``.
    Matches ``scipy.stats.wasserstein_distance``.

    Args:
        x: samples, shape ``(..., n)``.
        y: samples, shape ``(..., m)``, same batch shape as ``x``.
    Returns:
        ``W1``, shape ``(...)``.
    """
    x, y = x.sort(-1).values, y.sort(-1).values
    if x.shape[-1] == y.shape[-1]:
        return (x - y).abs().mean(-1)
    points = torch.cat([x, y], -1).sort(-1).values
    widths = points.diff(dim=-1)
    left = points[..., :-1].contiguous()
    cdf_x = torch.searchsorted(x, left, right=True).to(x.dtype) / x.shape[-1]
    cdf_y = torch.searchsorted(y, left, right=True).to(x.dtype) / y.shape[-1]
    return ((cdf_x - cdf_y).abs() * widths).sum(-1)



def kl_mvn_diagonal_normal(loc_p: Tensor, scale_tril_p: Tensor, loc_q: Tensor, scale_q: Tensor) -> Tensor:
    """``KL(N(m, L L^T) || N(mu, diag s^2))`` in closed form:

    ``1/2 [ sum_ij L_ij^2 / s_i^2 + sum_i (mu_i - m_i)^2 / s_i^2 - d + 2 sum_i log s_i - 2 sum_i log L_ii ]``.

    Args:
        loc_p, scale_tril_p: mean ``(..., d)`` and lower-triangular scale ``(..., d, d)`` of p.
        loc_q, scale_q: mean and standard deviations ``(..., d)`` of the diagonal q.
    """
    variance_q = scale_q.square()
    trace = (scale_tril_p.square() / variance_q.unsqueeze(-1)).sum((-2, -1))
    mahalanobis = ((loc_q - loc_p).square() / variance_q).sum(-1)
    log_det_ratio = 2 * scale_q.log().sum(-1) - 2 * scale_tril_p.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    return 0.5 * (trace + mahalanobis - loc_p.shape[-1] + log_det_ratio)


@register_kl(MultivariateNormal, Independent)
def _kl_mvn_independent(p: MultivariateNormal, q: Independent) -> Tensor:
    """Registers :func:`kl_mvn_diagonal_normal` with ``torch.distributions.kl_divergence`` (so
    Pyro's ``TraceMeanField_ELBO`` uses it) when q is a diagonal Gaussian over one event dimension."""
    if not (isinstance(q.base_dist, Normal) and q.reinterpreted_batch_ndims == 1):
        raise NotImplementedError
    return kl_mvn_diagonal_normal(p.loc, p.scale_tril, q.base_dist.loc, q.base_dist.scale)


@register_kl(Independent, StandardNormal)
def _kl_independent_standard_normal(p: Independent, q: StandardNormal) -> Tensor:
    """Registers :func:`kl_normal_standard_normal` with ``kl_divergence`` for a diagonal Gaussian p
    over one event dimension (the VAE's posterior and prior): fewer operations than torch's general
    Gaussian KL with the prior's zeros and ones. Any other p takes torch's general route."""
    if isinstance(p.base_dist, Normal) and p.reinterpreted_batch_ndims == 1:
        return kl_normal_standard_normal(p.base_dist.loc, p.base_dist.scale)
    return kl_divergence(p, Independent(q.base_dist, q.reinterpreted_batch_ndims))
