"""Guides, priors and the IWAE objective against closed forms and identities."""

import math
from functools import partial
from pathlib import Path

import pytest
import pytorch_lightning as pl
import scipy.stats
import torch
from pytorch_lightning.loggers import CSVLogger
from test_objectives import B, NOISE, data

from varinf import (
    MLP,
    ConfigError,
    DataError,
    DeltaEncoderGuide,
    ELBOLoss,
    FlowGuide,
    FullCovarianceGaussianGuide,
    GaussianEncoderGuide,
    GaussianLikelihood,
    LatentVariableModel,
    MixtureOfGaussiansPrior,
    MNISTDataModule,
    NormalPrior,
    VAEModule,
    VampPrior,
)
from varinf.divergences import kl_mvn_diagonal_normal
from varinf.guides import posterior_location
from varinf.priors import DiagonalNormalMixture
from varinf.objectives import IWAELoss

W_FULL = torch.tensor([[1.0, 0.5], [0.3, 2.0], [0.2, -0.4]])  # non-orthogonal: a full-covariance posterior
LINEAR = partial(MLP, hidden=())


def linear_gaussian_full(exact: bool = True):
    """``p(z) = N(0, I)``, ``p(x|z) = N(W z + b, 0.25 I)``, and a full-covariance linear guide set
    to the exact posterior ``N(S W^T (x - b) / sigma^2, S)``, ``S = (I + W^T W / sigma^2)^-1``."""
    model = LatentVariableModel((3,), 2, decoder=LINEAR, likelihood=lambda: GaussianLikelihood(scale=NOISE))
    guide = FullCovarianceGaussianGuide((3,), 2, encoder=LINEAR)
    covariance = torch.linalg.inv(torch.eye(2) + W_FULL.T @ W_FULL / NOISE**2)
    gain, cholesky = covariance @ W_FULL.T / NOISE**2, torch.linalg.cholesky(covariance)
    with torch.no_grad():
        model.decoder.layers[0].weight.copy_(W_FULL)
        model.decoder.layers[0].bias.copy_(B)
        encoder = guide.encoder.layers[0]
        encoder.weight.zero_()
        encoder.weight[:2] = gain
        encoder.bias[:2] = -gain @ B
        # tril entries in torch.tril_indices order: (0, 0), (1, 0), (1, 1); diagonal through softplus
        raw_diagonal = torch.log(torch.expm1(cholesky.diagonal() - guide.scale_floor))
        encoder.bias[2:] = torch.stack([raw_diagonal[0], cholesky[1, 0], raw_diagonal[1]])
        if not exact:
            encoder.bias[:2] += 0.7
    return model, guide


def full_covariance_evidence(x):
    return torch.distributions.MultivariateNormal(B, W_FULL @ W_FULL.T + NOISE**2 * torch.eye(3)).log_prob(x)


def test_full_covariance_guide_at_the_exact_posterior_gives_the_evidence():
    """With q = p(z|x), log p(x, z) - log q(z|x) = log p(x) for every z: the Monte-Carlo ELBO and
    the IWAE bound are exact for any number of samples."""
    model, guide = linear_gaussian_full()
    x = data()
    expected = -full_covariance_evidence(x).mean()
    assert ELBOLoss(model, guide, kl="monte_carlo")(x).item() == pytest.approx(expected.item(), rel=1e-5)
    for k in (1, 4):
        assert IWAELoss(model, guide, num_samples=k)(x).item() == pytest.approx(expected.item(), rel=1e-5)


def test_full_covariance_kl_to_a_diagonal_gaussian_is_closed_form_and_used_by_the_elbo():
    generator = torch.Generator().manual_seed(0)
    loc, loc_q = torch.randn(2, 5, 4, generator=generator)
    scale_tril = torch.randn(5, 4, 4, generator=generator).tril(-1) + torch.diag_embed(torch.rand(5, 4, generator=generator) + 0.5)
    scale_q = torch.rand(5, 4, generator=generator) + 0.5
    reference = torch.distributions.kl_divergence(
        torch.distributions.MultivariateNormal(loc, scale_tril=scale_tril),
        torch.distributions.MultivariateNormal(loc_q, scale_tril=torch.diag_embed(scale_q)),
    )
    torch.testing.assert_close(kl_mvn_diagonal_normal(loc, scale_tril, loc_q, scale_q), reference)
    model, guide = linear_gaussian_full(exact=False)
    x = data()
    q = guide.posterior(x)
    expected = torch.distributions.kl_divergence(
        torch.distributions.MultivariateNormal(q.loc, scale_tril=q.scale_tril),
        torch.distributions.MultivariateNormal(torch.zeros(2), torch.eye(2)),
    ).mean()
    assert ELBOLoss(model, guide, kl="analytic").terms(x).kl.item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("flow", ["iaf", "coupling"])
def test_flow_guide_density_is_the_change_of_variables(flow):
    """log q(z) = log N(z_0; mu, sigma) - log |det dz/dz_0|, with the Jacobian by autograd."""
    torch.manual_seed(0)
    guide = FlowGuide((3,), 4, encoder=partial(MLP, hidden=(8,)), flow=flow, num_flows=3, hidden=(16,))
    x = torch.randn(1, 3)
    q = guide.posterior(x)
    z0 = q.base_dist.sample()

    def push(base_point):
        for transform in q.transforms:
            base_point = transform(base_point)
        return base_point

    jacobian = torch.autograd.functional.jacobian(lambda point: push(point[None])[0], z0[0])
    z = push(z0)
    expected = q.base_dist.log_prob(z0) - torch.linalg.slogdet(jacobian).logabsdet
    torch.testing.assert_close(q.log_prob(z), expected, rtol=1e-4, atol=1e-4)
    assert q.rsample((6,)).shape == (6, 1, 4) and posterior_location(q).shape == (1, 4)


@pytest.mark.parametrize("guide", [GaussianEncoderGuide, FullCovarianceGaussianGuide, partial(FlowGuide, num_flows=2, hidden=(16,))])
@pytest.mark.parametrize("objective", ["elbo", "iwae"])
def test_kl_weight_composes_with_every_guide_and_objective(guide, objective):
    """loss = reconstruction + beta * KL for one sample (IWAE with k = 1 is the ELBO)."""
    module = VAEModule(data_shape=(3,), latent_dim=2, guide=partial(guide, encoder=LINEAR), objective=objective,
                       model=partial(LatentVariableModel, decoder=LINEAR, likelihood=lambda: GaussianLikelihood(scale=NOISE)))
    module.objective.kl_weight = 0.3
    torch.manual_seed(1)
    terms = module.objective.terms(data())
    assert terms.loss.item() == pytest.approx((terms.reconstruction + 0.3 * terms.kl).item(), rel=1e-5)


def test_mixture_prior_kl_falls_back_to_monte_carlo_and_matches_the_closed_form_it_reduces_to():
    """A one-component mixture at N(0, I) is N(0, I): the Monte-Carlo KL over many particles
    approaches the analytic KL of the plain Gaussian prior."""
    model_factory = partial(LatentVariableModel, decoder=LINEAR, likelihood=lambda: GaussianLikelihood(scale=NOISE),
                            prior=partial(MixtureOfGaussiansPrior, num_components=1))
    model = model_factory((3,), 2)
    with torch.no_grad():
        model.prior.locs.zero_()
    guide = GaussianEncoderGuide((3,), 2, encoder=LINEAR)
    x = data(4)
    torch.manual_seed(0)
    monte_carlo = ELBOLoss(model, guide, kl="analytic", num_particles=20_000).terms(x).kl
    analytic = torch.distributions.kl_divergence(guide.posterior(x), torch.distributions.Independent(torch.distributions.Normal(torch.zeros(2), torch.ones(2)), 1)).mean()
    assert monte_carlo.item() == pytest.approx(analytic.item(), abs=0.02)


def test_normal_prior_has_scipys_density_and_the_closed_form_kl_from_a_gaussian_guide():
    """``KL(N(mu, sigma^2) || N(0, s^2)) = sum_j log(s / sigma_j) + (sigma_j^2 + mu_j^2) / (2 s^2) - 1/2``."""
    scale = 5.0
    prior = NormalPrior(2, scale=scale)()
    z = torch.randn(6, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * 4
    expected = scipy.stats.norm(0.0, scale).logpdf(z.numpy()).sum(-1)
    torch.testing.assert_close(prior.log_prob(z.float()), torch.as_tensor(expected, dtype=torch.float32))
    guide = GaussianEncoderGuide((3,), 2, encoder=LINEAR)
    x = data(4)
    loc, sigma = guide.gaussian_parameters(x)
    closed_form = (torch.log(scale / sigma) + (sigma**2 + loc**2) / (2 * scale**2) - 0.5).sum(-1)
    torch.testing.assert_close(torch.distributions.kl_divergence(guide.posterior(x), prior), closed_form)
    with pytest.raises(ConfigError, match="positive scale"):
        NormalPrior(2, scale=0.0)


def test_diagonal_normal_mixture_has_the_density_gradient_and_samples_of_torchs_mixture():
    """The matrix-product density equals ``MixtureSameFamily`` (computed per component in float64)
    in value and gradient, also for narrow components far from z; its samples have the mixture's
    mean and per-dimension distribution (Kolmogorov-Smirnov against the mixture's CDF)."""
    torch.manual_seed(0)
    locs = (3 * torch.randn(6, 4, dtype=torch.float64)).requires_grad_()
    scales = torch.tensor([0.002, 0.05, 0.3, 1.0, 2.0, 0.01], dtype=torch.float64)[:, None].expand(6, 4).clone().requires_grad_()
    logits = torch.randn(6, dtype=torch.float64).requires_grad_()
    z = torch.cat([locs.detach()[:3] + 0.001, 4 * torch.randn(2, 7, 4, dtype=torch.float64).reshape(14, 4)]).requires_grad_()
    reference = torch.distributions.MixtureSameFamily(torch.distributions.Categorical(logits=logits),
                                                      torch.distributions.Independent(torch.distributions.Normal(locs, scales), 1))
    fast = DiagonalNormalMixture(locs, scales, logits)
    expected, got = reference.log_prob(z), fast.log_prob(z)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-6)
    grads = torch.autograd.grad(got.sum(), (z, locs, scales, logits))
    for mine, theirs in zip(grads, torch.autograd.grad(expected.sum(), (z, locs, scales, logits))):
        torch.testing.assert_close(mine, theirs, rtol=1e-7, atol=1e-6)
    # float32 inputs keep float32 outputs, batched over leading dimensions
    assert fast.log_prob(z.detach().float().reshape(17, 1, 4)).shape == (17, 1)
    samples = DiagonalNormalMixture(locs.detach()[:, :1], scales.detach()[:, :1], logits.detach()).sample((20_000,))[:, 0]
    weights = torch.softmax(logits.detach(), 0)
    mixture_cdf = lambda v: (weights.numpy() * scipy.stats.norm.cdf(v[:, None], locs.detach()[:, 0].numpy(), scales.detach()[:, 0].numpy())).sum(-1)
    assert scipy.stats.kstest(samples.numpy(), mixture_cdf).pvalue > 0.01


def test_vamp_prior_is_the_mean_of_the_guides_posteriors_at_its_pseudo_inputs():
    module = VAEModule(data_shape=(3,), latent_dim=2, guide=partial(GaussianEncoderGuide, encoder=LINEAR),
                       model=partial(LatentVariableModel, decoder=LINEAR, prior=partial(VampPrior, num_pseudo_inputs=7, data_shape=(3,))))
    z = torch.randn(5, 2)
    components = module.guide.posterior(module.model.prior.pseudo_inputs())
    expected = torch.logsumexp(components.log_prob(z[:, None]), -1) - math.log(7)
    torch.testing.assert_close(module.model.prior().log_prob(z), expected)
    # the pseudo-inputs learn through the ELBO; the guide's parameters are not registered twice
    module.objective(torch.bernoulli(torch.rand(4, 3))).backward()
    assert module.model.prior.raw_pseudo_inputs.grad.abs().sum() > 0
    names = [name for name, _ in module.named_parameters()]
    assert not any(name.startswith("model.prior.") and "guide" in name for name in names)


def vamp_fit(tmp_path, init: str, steps: int, ckpt_path: str | None = None, weights: dict | None = None) -> VAEModule:
    small = partial(MLP, hidden=(16,))
    module = VAEModule(latent_dim=3, guide=partial(GaussianEncoderGuide, encoder=small),
                       model=partial(LatentVariableModel, decoder=small, prior=partial(VampPrior, num_pseudo_inputs=5, init=init)))
    if weights is not None:
        module.load_state_dict(weights)
    trainer = pl.Trainer(max_steps=steps, limit_train_batches=steps, limit_val_batches=1, enable_progress_bar=False, enable_model_summary=False,
                         logger=CSVLogger(tmp_path, name="vamp", version=0), default_root_dir=tmp_path)
    trainer.fit(module, MNISTDataModule(binarize="dynamic", batch_size=32), ckpt_path=ckpt_path, weights_only=False)  # hparams hold partials
    return module


def test_vamp_pseudo_inputs_start_at_training_images_and_loaded_ones_are_kept(tmp_path):
    data = MNISTDataModule(binarize="dynamic")
    data.setup("fit")
    images = data.splits["train"][0][torch.randperm(len(data.splits["train"][0]), generator=torch.Generator().manual_seed(0))[:5]]
    fitted = vamp_fit(tmp_path, "data", steps=1)
    # one Adam step (lr 1e-3) away from logit(0.1 + 0.8 x) of 5 seeded training images
    torch.testing.assert_close(fitted.model.prior.raw_pseudo_inputs.detach(), torch.logit(0.1 + 0.8 * images), atol=1.1e-3, rtol=0)
    noise = VampPrior(3, num_pseudo_inputs=5).raw_pseudo_inputs.detach()
    torch.testing.assert_close(vamp_fit(tmp_path / "noise", "noise", steps=1).model.prior.raw_pseudo_inputs.detach(), noise, atol=1.1e-3, rtol=0)
    checkpoint = tmp_path / "vamp" / "version_0" / "checkpoints" / "last.ckpt"
    saved = torch.load(checkpoint, weights_only=False)["state_dict"]["model.prior.raw_pseudo_inputs"]
    resumed = vamp_fit(tmp_path, "data", steps=1, ckpt_path=str(checkpoint))  # already done: restores, trains nothing
    assert torch.equal(resumed.model.prior.raw_pseudo_inputs.detach(), saved)
    assert not torch.equal(saved, torch.logit(0.1 + 0.8 * images))
    # fine-tuning loaded weights (a new fit, not a resume) starts from the loaded pseudo-inputs
    weights = {key: torch.full_like(saved, 2.0) if key.endswith("prior.raw_pseudo_inputs") else value for key, value in fitted.state_dict().items()}
    tuned = vamp_fit(tmp_path / "tuned", "data", steps=1, weights=weights)
    torch.testing.assert_close(tuned.model.prior.raw_pseudo_inputs.detach(), torch.full_like(saved, 2.0), atol=1.1e-3, rtol=0)


def test_vamp_data_initialisation_refuses_images_of_another_shape():
    with pytest.raises(DataError, match=r"needs at least 5 training images of shape \(1, 28, 28\).*init: noise"):
        VampPrior(3, num_pseudo_inputs=5).initialise_from_data(torch.rand(100, 2))
    with pytest.raises(ConfigError, match="init must be 'data' or 'noise'"):
        VampPrior(3, init="random")


def test_missing_capabilities_are_refused_when_the_module_is_built():
    with pytest.raises(ConfigError, match="VAEModule needs a guide with density"):
        VAEModule(guide=DeltaEncoderGuide)
    with pytest.raises(ConfigError, match="VampPrior needs a guide with log_prob.*FlowGuide"):
        VAEModule(guide=FlowGuide, model=partial(LatentVariableModel, prior=VampPrior))

    class PlainPyroGuide(torch.nn.Module):  # declares nothing: a density, but no posterior()
        def __init__(self, data_shape, latent_dim):
            super().__init__()

    with pytest.raises(ConfigError, match="VAEModule needs a guide with posterior.*rsample"):
        VAEModule(guide=PlainPyroGuide, objective="iwae")
    ELBOLoss(LatentVariableModel((1, 28, 28), 4), PlainPyroGuide((1, 28, 28), 4))  # the ELBO needs only a density


GUIDES_AND_PRIORS = [  # a VampPrior needs a guide with log_prob, which flows lack
    (guide, prior)
    for guide in (GaussianEncoderGuide, FullCovarianceGaussianGuide, partial(FlowGuide, num_flows=2, hidden=(16,)))
    for prior in (None, partial(NormalPrior, scale=5.0), partial(MixtureOfGaussiansPrior, num_components=3), partial(VampPrior, num_pseudo_inputs=4, data_shape=(3,)))
    if not (isinstance(guide, partial) and prior is not None and prior.func is VampPrior)
]


@pytest.mark.parametrize(("guide", "prior"), GUIDES_AND_PRIORS)
@pytest.mark.parametrize(("kl", "num_particles"), [("analytic", 1), ("monte_carlo", 1), ("analytic", 3), ("monte_carlo", 3)])
def test_the_direct_elbo_equals_pyros_elbo_in_value_and_gradient(guide, prior, kl, num_particles):
    """The hot path (varinf's two-site programs, no tracing) computes what Pyro's TraceMeanField_ELBO
    / Trace_ELBO compute on the same random draws: the same loss, parts and gradients."""
    model = partial(LatentVariableModel, decoder=partial(MLP, hidden=(8,)), likelihood=lambda: GaussianLikelihood(scale=NOISE), **({"prior": prior} if prior else {}))
    module = VAEModule(data_shape=(3,), latent_dim=2, guide=partial(guide, encoder=partial(MLP, hidden=(8,))), model=model, kl=kl, num_particles=num_particles)
    objective = module.objective
    assert objective.direct
    objective.kl_weight = 0.7
    results = []
    for direct in (True, False):
        objective.direct = direct
        module.zero_grad()
        torch.manual_seed(3)
        terms = objective.terms(data())
        terms.loss.backward()
        results.append((terms, {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}))
    (direct, direct_grads), (pyro_terms, pyro_grads) = results
    for name in ("loss", "reconstruction", "kl"):
        torch.testing.assert_close(getattr(direct, name), getattr(pyro_terms, name), rtol=1e-5, atol=1e-5)
    # Pyro's particle plate repeats the posterior per particle; the direct path keeps one per datapoint
    torch.testing.assert_close(direct.posterior_mean, pyro_terms.posterior_mean.reshape(-1, *direct.posterior_mean.shape)[0])
    assert direct_grads.keys() == pyro_grads.keys() and len(direct_grads) > 0
    for name in direct_grads:
        torch.testing.assert_close(direct_grads[name], pyro_grads[name], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("num_particles", [1, 3])
@pytest.mark.parametrize("kl_weight", [1.0, 0.7])
def test_the_closed_form_vae_elbo_equals_the_distributions_and_pyros_in_value_and_gradient(num_particles, kl_weight):
    """The Gaussian-Bernoulli VAE's closed form (no distributions built) computes what the direct
    path and Pyro's TraceMeanField_ELBO compute on the same draws: loss, parts and gradients."""
    module = VAEModule(data_shape=(5,), latent_dim=2, guide=partial(GaussianEncoderGuide, encoder=partial(MLP, hidden=(8,))),
                       model=partial(LatentVariableModel, decoder=partial(MLP, hidden=(8,))), num_particles=num_particles)
    objective = module.objective
    assert objective.closed_form and objective.direct
    objective.kl_weight = kl_weight
    x = torch.bernoulli(torch.rand(40, 5, generator=torch.Generator().manual_seed(0)))
    results = []
    for closed_form, direct in ((True, True), (False, True), (False, False)):
        objective.closed_form, objective.direct = closed_form, direct
        module.zero_grad()
        torch.manual_seed(3)
        terms = objective.terms(x)
        terms.loss.backward()
        results.append((terms, {name: p.grad.clone() for name, p in module.named_parameters()}))
    (closed, closed_grads), *others = results
    for terms, grads in others:
        for name in ("loss", "reconstruction", "kl"):
            torch.testing.assert_close(getattr(closed, name), getattr(terms, name), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(closed.posterior_mean, terms.posterior_mean.reshape(-1, *closed.posterior_mean.shape)[0])
        for name in grads:
            torch.testing.assert_close(closed_grads[name], grads[name], rtol=1e-4, atol=1e-5)


def test_the_closed_form_is_taken_only_for_the_gaussian_bernoulli_vae_with_the_analytic_kl():
    class ScaledGuide(GaussianEncoderGuide):  # another q(z|x): must not be replaced by the Gaussian formulas
        def posterior(self, x):
            return super().posterior(2 * x)

    def objective(guide=GaussianEncoderGuide, kl="analytic", **model):
        return VAEModule(data_shape=(5,), latent_dim=2, guide=partial(guide, encoder=LINEAR), kl=kl,
                         model=partial(LatentVariableModel, decoder=LINEAR, **model)).objective

    assert objective().closed_form
    assert not objective(kl="monte_carlo").closed_form
    assert not objective(guide=ScaledGuide).closed_form and objective(guide=ScaledGuide).direct
    assert not objective(guide=FullCovarianceGaussianGuide).closed_form
    assert not objective(likelihood=GaussianLikelihood).closed_form
    assert not objective(prior=partial(MixtureOfGaussiansPrior, num_components=3)).closed_form
    assert not objective(prior=partial(NormalPrior, scale=5.0)).closed_form and objective(prior=partial(NormalPrior, scale=5.0)).direct


def test_a_guide_with_its_own_forward_runs_through_pyro(monkeypatch):
    """The direct path is only taken for programs whose structure varinf knows."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "recipes" / "examples"))
    from low_rank_guide import LowRankGaussianGuide

    module = VAEModule(data_shape=(3,), latent_dim=2, guide=partial(LowRankGaussianGuide, encoder=LINEAR), model=partial(LatentVariableModel, decoder=LINEAR))
    assert not module.objective.direct
