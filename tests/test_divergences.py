"""The divergences against scipy and the identities of THEORY.md, section 3."""

import math

import numpy as np
import pytest
import torch
from scipy.spatial.distance import jensenshannon
from scipy.stats import entropy as scipy_entropy
from scipy.stats import wasserstein_distance

from varinf import (
    cross_entropy,
    entropy,
    js,
    kl,
    kl_normal_normal,
    kl_normal_standard_normal,
    monte_carlo_kl,
    wasserstein_1d,
)


def random_simplex(batch, n, zeros=True, seed=0):
    generator = torch.Generator().manual_seed(seed)
    p = torch.rand(batch, n, generator=generator, dtype=torch.float64)
    if zeros:
        p[torch.rand(batch, n, generator=generator) < 0.3] = 0
        p[:, 0] += 0.1  # keep every row non-empty
    return p / p.sum(-1, keepdim=True)


def test_entropy_matches_scipy_with_zeros():
    p = random_simplex(20, 7)
    expected = [scipy_entropy(row) for row in p.numpy()]
    np.testing.assert_allclose(entropy(p).numpy(), expected, rtol=1e-12)


def test_kl_matches_scipy_and_cross_entropy_identity():
    p, q = random_simplex(20, 7, zeros=True, seed=1), random_simplex(20, 7, zeros=False, seed=2)
    expected = [scipy_entropy(a, b) for a, b in zip(p.numpy(), q.numpy())]
    np.testing.assert_allclose(kl(p, q).numpy(), expected, rtol=1e-12)
    torch.testing.assert_close(cross_entropy(p, q), entropy(p) + kl(p, q))
    assert (cross_entropy(p, q) >= entropy(p)).all()


def test_kl_is_nonnegative_zero_iff_equal_and_asymmetric():
    p, q = random_simplex(50, 5, zeros=False, seed=3), random_simplex(50, 5, zeros=False, seed=4)
    assert (kl(p, q) > 0).all()
    torch.testing.assert_close(kl(p, p), torch.zeros(50, dtype=torch.float64))
    assert not torch.allclose(kl(p, q), kl(q, p))


def test_kl_is_infinite_where_q_vanishes_under_p_and_ignores_zero_p():
    p = torch.tensor([0.5, 0.5, 0.0])
    assert kl(p, torch.tensor([1.0, 0.0, 0.0])) == math.inf
    assert kl(p, torch.tensor([0.5, 0.5, 0.0])) == 0
    assert torch.isfinite(kl(torch.tensor([1.0, 0.0]), torch.tensor([0.5, 0.5])))
    assert entropy(torch.tensor([1.0, 0.0])) == 0


def test_js_matches_scipy_is_symmetric_and_bounded():
    p, q = random_simplex(30, 6, seed=5), random_simplex(30, 6, seed=6)
    expected = [jensenshannon(a, b) ** 2 for a, b in zip(p.numpy(), q.numpy())]
    np.testing.assert_allclose(js(p, q).numpy(), expected, rtol=1e-10)
    torch.testing.assert_close(js(p, q), js(q, p))
    assert ((js(p, q) >= 0) & (js(p, q) <= math.log(2))).all()


def test_js_is_log2_on_disjoint_supports_however_far_apart():
    for gap in (1, 10, 100):
        p, q = torch.zeros(2 * gap + 2), torch.zeros(2 * gap + 2)
        p[0], q[gap + 1] = 1.0, 1.0
        assert js(p, q).item() == pytest.approx(math.log(2), abs=1e-7)


def test_gaussian_kl_closed_form_matches_torch_and_monte_carlo():
    generator = torch.Generator().manual_seed(0)
    loc, scale = torch.randn(4, 3, generator=generator), torch.rand(4, 3, generator=generator) + 0.3
    q = torch.distributions.Normal(loc, scale)
    p = torch.distributions.Normal(torch.zeros(3), torch.ones(3))
    analytic = kl_normal_standard_normal(loc, scale)
    torch.testing.assert_close(analytic, torch.distributions.kl_divergence(q, p).sum(-1))
    torch.testing.assert_close(kl_normal_normal(loc, scale, torch.zeros(3), torch.ones(3)), analytic)
    z = q.sample((200_000,))
    differences = q.log_prob(z).sum(-1) - p.log_prob(z).sum(-1)
    estimate = monte_carlo_kl(q.log_prob(z).sum(-1), p.log_prob(z).sum(-1))
    standard_error = differences.std(0) / math.sqrt(len(z))
    assert ((estimate - analytic).abs() < 4 * standard_error).all()


def test_kl_between_two_diagonal_gaussians_matches_torch():
    generator = torch.Generator().manual_seed(1)
    args = [torch.randn(5, 4, generator=generator), torch.rand(5, 4, generator=generator) + 0.2,
            torch.randn(5, 4, generator=generator), torch.rand(5, 4, generator=generator) + 0.2]
    p, q = torch.distributions.Normal(args[0], args[1]), torch.distributions.Normal(args[2], args[3])
    torch.testing.assert_close(kl_normal_normal(*args), torch.distributions.kl_divergence(p, q).sum(-1))


def test_standard_normal_prior_has_a_registered_closed_form_kl_and_is_rebuilt_after_moving():
    from varinf import StandardNormalPrior

    generator = torch.Generator().manual_seed(2)
    loc, scale = torch.randn(6, 4, generator=generator), torch.rand(6, 4, generator=generator) + 0.2
    prior, general = StandardNormalPrior(4)(), torch.distributions.Independent(torch.distributions.Normal(torch.zeros(4), torch.ones(4)), 1)
    gaussian = torch.distributions.Independent(torch.distributions.Normal(loc, scale), 1)
    expected = torch.distributions.kl_divergence(gaussian, general)
    torch.testing.assert_close(torch.distributions.kl_divergence(gaussian, prior), expected)
    torch.testing.assert_close(torch.distributions.kl_divergence(gaussian, prior.expand([6])), expected)  # in a plate
    laplace = torch.distributions.Independent(torch.distributions.Laplace(loc, scale), 1)  # no closed form here: torch's route
    torch.testing.assert_close(torch.distributions.kl_divergence(laplace, prior), torch.distributions.kl_divergence(laplace, general))
    module = StandardNormalPrior(4)
    assert module() is module()  # built once...
    module.double()
    assert module().base_dist.loc.dtype == module().base_dist.scale.dtype == torch.float64  # ...and again after its buffers moved


@pytest.mark.parametrize("sizes", [(500, 500), (300, 700), (1, 9)])
def test_wasserstein_matches_scipy(sizes):
    generator = torch.Generator().manual_seed(sum(sizes))
    x = torch.randn(sizes[0], generator=generator, dtype=torch.float64)
    y = 2 * torch.randn(sizes[1], generator=generator, dtype=torch.float64) + 1
    assert wasserstein_1d(x, y).item() == pytest.approx(wasserstein_distance(x.numpy(), y.numpy()), rel=1e-9)


def test_wasserstein_of_shifted_gaussians_is_the_mean_gap():
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(3, 100_000, generator=generator)
    shifts = torch.tensor([[0.5], [2.0], [10.0]])
    estimate = wasserstein_1d(x, torch.randn(3, 100_000, generator=generator) + shifts)
    torch.testing.assert_close(estimate, shifts.squeeze(1), atol=0.02, rtol=0)
