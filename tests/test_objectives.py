"""The ELBO and the IWAE bound against closed forms: a linear-Gaussian model whose evidence
log p(x) and exact posterior are known, and hand-written -ELBO on the same latent draws."""

import math

import pyro
import pytest
import torch

from varinf import (
    MLP,
    ConfigError,
    DataError,
    ELBOLoss,
    GaussianEncoderGuide,
    GaussianLikelihood,
    LatentVariableModel,
    importance_sampled_nll,
    iwae_bound,
    kl_normal_standard_normal,
    log_importance_weights,
)

NOISE = 0.5
W = torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]])  # orthogonal columns: a diagonal posterior
B = torch.tensor([0.1, -0.2, 0.3])


def linear_gaussian(exact_guide: bool = True):
    """``p(z) = N(0, I)``, ``p(x|z) = N(Wz + b, 0.25 I)``, and a linear encoder, exact if asked."""
    model = LatentVariableModel((3,), 2, decoder=lambda i, o: MLP(i, o, hidden=()), likelihood=lambda: GaussianLikelihood(scale=NOISE))
    guide = GaussianEncoderGuide((3,), 2, encoder=lambda i, o: MLP(i, o, hidden=()))
    covariance = torch.linalg.inv(torch.eye(2) + W.T @ W / NOISE**2)
    gain = covariance @ W.T / NOISE**2
    with torch.no_grad():
        model.decoder.layers[0].weight.copy_(W)
        model.decoder.layers[0].bias.copy_(B)
        encoder = guide.encoder.layers[0]
        encoder.weight.zero_()
        encoder.weight[:2] = gain
        encoder.bias[:2] = -gain @ B
        scale = covariance.diagonal().sqrt() - guide.scale_floor
        encoder.bias[2:] = torch.log(torch.expm1(scale))
        if not exact_guide:
            encoder.bias[:2] += 0.7
            encoder.bias[2:] += 0.5
    return model, guide


def evidence(x):
    """Closed-form ``log p(x) = log N(x; b, W W^T + sigma^2 I)``."""
    return torch.distributions.MultivariateNormal(B, W @ W.T + NOISE**2 * torch.eye(3)).log_prob(x)


def data(n=64, seed=0):
    return torch.randn(n, 3, generator=torch.Generator().manual_seed(seed)) * 1.5


def test_importance_sampling_with_the_exact_posterior_recovers_the_evidence_for_any_k_and_chunking():
    model, guide = linear_gaussian()
    x = data()
    for k, max_points in [(1, 64), (7, 100), (50, 64 * 50)]:
        nll = importance_sampled_nll(model, guide, [(x[:40], None), (x[40:], None)], k, max_points)
        torch.testing.assert_close(nll, -evidence(x), atol=1e-4, rtol=1e-5)


def test_monte_carlo_elbo_with_the_exact_posterior_equals_the_evidence():
    model, guide = linear_gaussian()
    x = data()
    loss = ELBOLoss(model, guide, kl="monte_carlo")(x)
    assert loss.item() == pytest.approx(-evidence(x).mean().item(), abs=1e-4)


def test_analytic_elbo_matches_a_hand_written_elbo_on_the_same_draw():
    model, guide = linear_gaussian(exact_guide=False)
    x = data()
    objective = ELBOLoss(model, guide, kl="analytic")
    for weight in (1.0, 0.3):
        objective.kl_weight = weight
        torch.manual_seed(3)
        terms = objective.terms(x)
        torch.manual_seed(3)
        q = guide.posterior(x)
        z = q.rsample()
        reconstruction = -model.observation(z).log_prob(x)
        kl = kl_normal_standard_normal(q.base_dist.loc, q.base_dist.scale)
        assert terms.loss.item() == pytest.approx((reconstruction + weight * kl).mean().item(), rel=1e-5)
        assert terms.reconstruction.item() == pytest.approx(reconstruction.mean().item(), rel=1e-4)
        assert terms.kl.item() == pytest.approx(kl.mean().item(), rel=1e-5)
        assert terms.negative_elbo.item() == pytest.approx((reconstruction + kl).mean().item(), rel=1e-5)


def test_analytic_and_monte_carlo_elbo_agree_in_expectation_and_bound_the_evidence():
    model, guide = linear_gaussian(exact_guide=False)
    x = data()
    analytic = ELBOLoss(model, guide, kl="analytic", num_particles=4000)(x).item()
    monte_carlo = ELBOLoss(model, guide, kl="monte_carlo", num_particles=4000)(x).item()
    assert analytic == pytest.approx(monte_carlo, abs=0.05)
    assert analytic > -evidence(x).mean().item() + 0.1  # a wrong guide leaves a gap KL(q || p(z|x))


def test_iwae_with_one_sample_is_the_elbo_on_the_same_draw():
    model, guide = linear_gaussian(exact_guide=False)
    x = data()
    torch.manual_seed(5)
    elbo_loss = ELBOLoss(model, guide, kl="monte_carlo")(x)
    torch.manual_seed(5)
    bound = iwae_bound(log_importance_weights(model, guide, x, 1))
    assert elbo_loss.item() == pytest.approx(-bound.mean().item(), rel=1e-5)


def test_iwae_bound_is_non_decreasing_in_k_and_below_the_evidence():
    model, guide = linear_gaussian(exact_guide=False)
    x = data(n=400)
    torch.manual_seed(0)
    bounds = [iwae_bound(log_importance_weights(model, guide, x, k)).mean().item() for k in (1, 5, 50, 2000)]
    log_evidence = evidence(x).mean().item()
    assert bounds == sorted(bounds) and bounds[-1] < log_evidence + 0.01  # a stochastic bound: E[.] <= log p(x)
    assert log_evidence - bounds[-1] < 0.1 * (log_evidence - bounds[0])


def test_iwae_bound_is_a_log_mean_exp():
    log_weights = torch.log(torch.tensor([[1.0, 2.0], [3.0, 6.0]]))
    torch.testing.assert_close(iwae_bound(log_weights), torch.log(torch.tensor([2.0, 4.0])))
    assert iwae_bound(torch.tensor([[-1e4], [-1e4 + math.log(3)]], dtype=torch.float64)).item() == pytest.approx(-1e4 + math.log(2), rel=1e-9)


def test_kl_weight_scales_only_the_latent_site():
    model, guide = linear_gaussian(exact_guide=False)
    x = data()
    objective = ELBOLoss(model, guide, kl="analytic")
    losses = {}
    for weight in (1.0, 0.25):
        objective.kl_weight = weight
        torch.manual_seed(1)
        losses[weight] = objective.terms(x)
    torch.testing.assert_close(losses[1.0].reconstruction, losses[0.25].reconstruction)
    assert (losses[1.0].loss - losses[0.25].loss).item() == pytest.approx(0.75 * losses[1.0].kl.item(), rel=1e-5)


def test_wrong_shapes_and_settings_are_rejected_with_a_clear_message():
    model, guide = linear_gaussian()
    with pytest.raises(DataError, match=r"shape \(B, 3\)"):
        ELBOLoss(model, guide)(torch.zeros(4, 5))
    with pytest.raises(ConfigError, match="kl must be"):
        ELBOLoss(model, guide, kl="exact")
    with pytest.raises(ConfigError, match="scale > 0"):
        GaussianLikelihood(scale=0)


def test_learned_gaussian_scale_is_a_parameter_and_fixed_scale_is_not():
    assert any(True for _ in GaussianLikelihood(learn_scale=True).parameters())
    assert not any(True for _ in GaussianLikelihood(learn_scale=False).parameters())


def test_bernoulli_likelihood_is_the_binary_log_likelihood():
    from varinf import BernoulliLikelihood, ContinuousBernoulliLikelihood

    logits, x = torch.randn(5, 4), torch.randint(0, 2, (5, 4)).float()
    p = torch.sigmoid(logits)
    expected = x * p.log() + (1 - x) * (1 - p).log()
    torch.testing.assert_close(BernoulliLikelihood()(logits).log_prob(x), expected)
    # continuous Bernoulli: Bernoulli term plus log C(p), C = 2 artanh(1 - 2p) / (1 - 2p)
    y = torch.rand(5, 4)
    normaliser = torch.log(2 * torch.atanh(1 - 2 * p) / (1 - 2 * p))
    torch.testing.assert_close(ContinuousBernoulliLikelihood()(logits).log_prob(y), y * p.log() + (1 - y) * (1 - p).log() + normaliser, rtol=1e-4, atol=1e-4)


def test_bernoulli_image_density_equals_independent_bernoulli_pixels_with_the_same_gradient():
    from varinf import BernoulliLikelihood

    logits = torch.randn(3, 5, 1, 2, 2, requires_grad=True)  # K samples of z for 5 images: broadcast against x
    x = torch.randint(0, 2, (5, 1, 2, 2)).float()
    image = BernoulliLikelihood()(logits).to_event(3)
    reference = pyro.distributions.Bernoulli(logits=logits).to_event(3)
    assert (image.batch_shape, image.event_shape) == (reference.batch_shape, reference.event_shape)
    ours, theirs = image.log_prob(x), reference.log_prob(x)
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(torch.autograd.grad(ours.sum(), logits)[0], torch.autograd.grad(theirs.sum(), logits)[0])
    expanded = BernoulliLikelihood()(logits[0]).to_event(3).expand([4, 5])  # as a plate expands it
    torch.testing.assert_close(expanded.log_prob(x), reference.log_prob(x)[0].expand(4, 5))
    torch.testing.assert_close(image.mean, torch.sigmoid(logits))


def test_nothing_enters_pyros_global_param_store():
    pyro.clear_param_store()
    model, guide = linear_gaussian(exact_guide=False)
    ELBOLoss(model, guide)(data()).backward()
    assert len(pyro.get_param_store()) == 0
