"""Adversarial losses, divergence read-outs and the GAN/AAE/ALI modules, against THEORY.md."""

import copy
import math

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from conftest import ReseedEachBatch
from scipy import integrate
from scipy.stats import norm
from torch.utils.data import DataLoader, TensorDataset

from varinf import (
    ADVERSARIAL_LOSSES,
    MLP,
    AAEModule,
    ALIModule,
    ConfigError,
    ConvEncoder,
    DeltaEncoderGuide,
    GANModule,
    GaussianEncoderGuide,
    GaussianLikelihood,
    LatentVariableModel,
    gradient_penalty,
    js,
    js_from_logits,
    kl,
    kl_data_model_from_logits,
    kl_model_data_from_logits,
    wasserstein_from_critic,
)
from varinf.adversarial import d_hinge, d_least_squares, d_minimax, d_wasserstein, g_minimax, g_non_saturating


def test_value_at_the_optimal_discriminator_is_2_js_minus_log_4():
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        p, q = torch.rand(2, 12, generator=generator, dtype=torch.float64).softmax(-1)
        optimal = p / (p + q)  # D*(x) = p_data / (p_data + p_g)
        value = (p * optimal.log()).sum() + (q * (1 - optimal).log()).sum()
        assert value.item() == pytest.approx(2 * js(p, q).item() - math.log(4), rel=1e-12)
    assert (0.5 * math.log(0.5) * 2) == pytest.approx(-math.log(4) / 2)  # p = q: D* = 1/2, V = -log 4


def test_readouts_from_optimal_logits_recover_kl_and_js_on_samples():
    generator = torch.Generator().manual_seed(1)
    p, q = torch.rand(2, 6, generator=generator, dtype=torch.float64).softmax(-1)
    logits = p.log() - q.log()  # logit D* = log p_data - log p_g
    real = logits[torch.multinomial(p, 400_000, replacement=True, generator=generator)]
    fake = logits[torch.multinomial(q, 400_000, replacement=True, generator=generator)]
    assert kl_data_model_from_logits(real).item() == pytest.approx(kl(p, q).item(), abs=0.01)
    assert kl_model_data_from_logits(fake).item() == pytest.approx(kl(q, p).item(), abs=0.01)
    assert js_from_logits(real, fake).item() == pytest.approx(js(p, q).item(), abs=0.005)


def test_loss_pairs_at_known_points():
    zero = torch.zeros(4)
    assert d_minimax(zero, zero).item() == pytest.approx(2 * math.log(2))
    assert g_minimax(zero).item() == pytest.approx(-math.log(2))
    assert g_non_saturating(zero).item() == pytest.approx(math.log(2))
    assert d_least_squares(torch.ones(3), torch.zeros(3)).item() == 0
    assert d_hinge(torch.full((3,), 2.0), torch.full((3,), -2.0)).item() == 0
    assert d_wasserstein(torch.tensor([3.0]), torch.tensor([1.0])).item() == -2
    # the non-saturating loss keeps its gradient where the saturating one vanishes (D(G(z)) -> 0)
    fake = torch.tensor([-10.0], requires_grad=True)
    (saturating,) = torch.autograd.grad(g_minimax(fake), fake)
    (non_saturating,) = torch.autograd.grad(g_non_saturating(fake), fake)
    assert abs(saturating.item()) < 1e-4 < abs(non_saturating.item())


def test_gradient_penalty_of_a_linear_critic_is_closed_form_and_fp32_under_autocast():
    weights = torch.tensor([3.0, 4.0])  # ||grad f|| = 5 everywhere
    critic = lambda x: x @ weights  # noqa: E731
    real, fake = torch.randn(64, 2), torch.randn(64, 2)
    assert gradient_penalty(critic, real, fake).item() == pytest.approx(16.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        penalty = gradient_penalty(critic, real.bfloat16(), fake.bfloat16())
    assert penalty.dtype == torch.float32 and penalty.item() == pytest.approx(16.0)


def test_maxout_mlp_is_the_max_over_pieces_of_linear_units():
    """Goodfellow et al. (2013): h_j = max_k (W_jk x + b_jk), then the output layer on h."""
    torch.manual_seed(0)
    network = MLP((6,), (2,), hidden=(4, 3), activation="maxout", pieces=5, input_dropout=0.2, dropout=0.5).eval()
    first, second, output = [layer for layer in network.layers if isinstance(layer, torch.nn.Linear)]
    assert (first.out_features, second.out_features, output.out_features) == (20, 15, 2)
    x = torch.randn(7, 6)
    hidden = (x @ first.weight.T + first.bias).reshape(7, 4, 5).max(-1).values
    hidden = (hidden @ second.weight.T + second.bias).reshape(7, 3, 5).max(-1).values
    torch.testing.assert_close(network(x), hidden @ output.weight.T + output.bias)
    network.train()  # dropout on the inputs and hidden units: a different function
    assert not torch.allclose(network(x), network.eval()(x))
    with pytest.raises(ConfigError, match="pieces"):
        MLP((6,), (2,), activation="maxout", pieces=0)


def _cpu_vendor() -> str:
    try:
        return next(line.split(":")[1].strip() for line in open("/proc/cpuinfo") if line.startswith("vendor_id"))
    except (OSError, StopIteration):
        return "unknown"


@pytest.mark.parametrize("shape, p", [((64, 512), 0.2), ((3, 7, 5), 0.5), ((100, 1000), 0.3)])
def test_dropout_draws_its_mask_from_torch_rand_the_same_on_every_cpu(shape, p):
    """x * 1[u < 1 - p] / (1 - p) with u from torch.rand in float64, consuming the generator as
    torch's own dropout kernel does; on processors where torch does not use MKL's generator
    (all but Intel), bit for bit torch's dropout, so fits made there are unchanged."""
    from varinf.networks import Dropout

    x, dropout = torch.randn(shape), Dropout(p).train()
    torch.manual_seed(1)
    dropped, after = dropout(x), torch.rand(3)
    torch.manual_seed(1)
    keep = torch.rand(shape, dtype=torch.float64) < 1 - p
    assert torch.equal(dropped, x * (keep.float() / (1 - p)))  # the scaled mask, as torch scales it
    assert torch.equal(after, torch.rand(3))  # the generator is where torch's dropout leaves it
    assert abs(keep.double().mean().item() - (1 - p)) < 5 * math.sqrt(p * (1 - p) / keep.numel())
    assert torch.equal(dropout.eval()(x), x)
    if _cpu_vendor() != "GenuineIntel":
        torch.manual_seed(1)
        assert torch.equal(dropped, torch.nn.functional.dropout(x, p, training=True))


def test_spectral_norm_mlp_has_unit_largest_singular_values():
    """Miyato et al. (2018): W / sigma_max(W), sigma_max by power iteration, which converges over steps."""
    torch.manual_seed(0)
    network = MLP((6,), (2,), hidden=(16, 8), spectral_norm=True)
    for _ in range(50):  # each training-mode forward runs one power iteration
        network(torch.randn(4, 6))
    linears = [layer for layer in network.layers if isinstance(layer, torch.nn.Linear)]
    assert len(linears) == 3
    for layer in linears:
        assert torch.linalg.matrix_norm(layer.weight.detach(), ord=2).item() == pytest.approx(1.0, abs=1e-3)
    assert torch.linalg.matrix_norm(layer.parametrizations.weight.original.detach(), ord=2).item() != pytest.approx(1.0, abs=0.05)


def train_discriminator(loss, real_sampler, fake_sampler, steps=2000, penalty_weight=0.0, betas=(0.9, 0.999)):
    torch.manual_seed(0)
    network = MLP((1,), (1,), hidden=(64, 64), activation="leaky_relu")
    critic = lambda x: network(x).squeeze(-1)  # noqa: E731
    if penalty_weight:
        # In 1-D a two-sided gradient penalty walls off slope +1 from slope -1 (|f'| = 0 costs
        # lambda in between), so start the critic on the side that separates real from fake.
        with torch.no_grad():
            if critic(real_sampler(4096)).mean() < critic(fake_sampler(4096)).mean():
                network.layers[-1].weight.neg_(), network.layers[-1].bias.neg_()
    optimizer = torch.optim.Adam(network.parameters(), lr=1e-3, betas=betas)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    for _ in range(steps):
        real, fake = real_sampler(1024), fake_sampler(1024)
        value = loss(critic(real), critic(fake))
        if penalty_weight:
            value = value + penalty_weight * gradient_penalty(critic, real, fake)
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
        schedule.step()
    with torch.no_grad():
        return critic(real_sampler(200_000)), critic(fake_sampler(200_000))


def test_trained_discriminator_recovers_kl_and_js_of_two_gaussians():
    """N(0, 1) vs N(1, 1): KL = 1/2 both ways; JS by quadrature. Tolerance 0.05 nats (JS 0.01)."""
    real_out, fake_out = train_discriminator(d_minimax, lambda n: torch.randn(n, 1), lambda n: torch.randn(n, 1) + 1)
    p, q = norm(0, 1).pdf, norm(1, 1).pdf
    m = lambda x: (p(x) + q(x)) / 2  # noqa: E731
    js_exact = integrate.quad(lambda x: 0.5 * p(x) * np.log(p(x) / m(x)) + 0.5 * q(x) * np.log(q(x) / m(x)), -12, 13)[0]
    assert kl_data_model_from_logits(real_out).item() == pytest.approx(0.5, abs=0.05)
    assert kl_model_data_from_logits(fake_out).item() == pytest.approx(0.5, abs=0.05)
    assert js_from_logits(real_out, fake_out).item() == pytest.approx(js_exact, abs=0.01)


@pytest.mark.parametrize("penalty_weight", [10.0, 100.0])
def test_gradient_penalised_critic_recovers_the_mean_gap(penalty_weight):
    """W1(N(0, 1), N(2, 1)) = |m1 - m2| = d = 2. The penalised problem max_s d s - lambda (s - 1)^2
    over critic slopes s is solved at s = 1 + d / (2 lambda): the estimate is d (1 + d / (2 lambda)),
    2.2 at the usual lambda = 10 and 2.02 at lambda = 100. Tolerance 0.05."""
    real_out, fake_out = train_discriminator(
        d_wasserstein, lambda n: torch.randn(n, 1), lambda n: torch.randn(n, 1) + 2, penalty_weight=penalty_weight, betas=(0.5, 0.9)
    )
    gap = 2.0
    assert wasserstein_from_critic(real_out, fake_out).item() == pytest.approx(gap * (1 + gap / (2 * penalty_weight)), abs=0.05)


def small_aae(guide=GaussianEncoderGuide, **kwargs):
    network = lambda i, o: MLP(i, o, hidden=(16,))  # noqa: E731
    return AAEModule(
        latent_dim=4,
        model=lambda shape, dim: LatentVariableModel(shape, dim, decoder=network),
        guide=lambda shape, dim: guide(shape, dim, encoder=network),
        discriminator=network,
        **kwargs,
    )


@pytest.mark.parametrize("guide", [GaussianEncoderGuide, DeltaEncoderGuide])
def test_aae_phases_train_exactly_their_networks(guide):
    module = small_aae(guide)
    x = torch.rand(8, 1, 28, 28)
    networks = {"encoder": module.guide, "decoder": module.model, "discriminator": module.discriminator}
    expected = {"autoencoder": {"encoder", "decoder"}, "discriminator": {"discriminator"}, "encoder": {"encoder"}}
    phases = module.per_batch_phases(x) + module.generator_phases(x)
    assert [name for name, _ in phases] == ["autoencoder", "discriminator", "encoder"]  # the paper's order
    for name, phase in phases:
        module.zero_grad(set_to_none=True)
        with module.trainable(name):
            phase().backward()
        got = {net for net, m in networks.items() if any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())}
        assert got == expected[name], name
        assert all(p.requires_grad for p in module.parameters())  # restored afterwards


def test_gan_and_ali_phases_train_exactly_their_networks():
    network = lambda i, o: MLP(i, o, hidden=(16,))  # noqa: E731
    model = lambda shape, dim: LatentVariableModel(shape, dim, decoder=network)  # noqa: E731
    gan = GANModule(latent_dim=4, model=model, discriminator=network)
    ali = ALIModule(latent_dim=4, model=model, guide=lambda s, d: GaussianEncoderGuide(s, d, encoder=network), discriminator=network)
    x = torch.rand(8, 1, 28, 28)
    for module, trained in ((gan, {"generator": ["model"]}), (ali, {"generator": ["model", "guide"]})):
        for name, phase in module.per_batch_phases(x) + module.generator_phases(x):
            module.zero_grad(set_to_none=True)
            with module.trainable(name):
                phase().backward()
            with_grad = {child for child, m in module.named_children() if any(p.grad is not None for p in m.parameters())}
            assert with_grad == set(trained.get(name, ["discriminator"])), (type(module).__name__, name)


@pytest.mark.parametrize("n_critic", [1, 2])
def test_gan_steps_equal_a_hand_written_loop_that_reuses_its_fakes(n_critic):
    """Two batches of varinf's GAN training step against the loop of the PyTorch DCGAN example:
    draw the fakes once, step the discriminator on them detached, then (on a generator turn) the
    generator through them. Same draws, same updates, to float precision."""
    network = lambda i, o: MLP(i, o, hidden=(16,), normalization="batch")  # noqa: E731
    sgd = lambda parameters: torch.optim.SGD(parameters, lr=0.1)  # noqa: E731
    torch.manual_seed(0)
    module = GANModule(data_shape=(2,), latent_dim=3, model=lambda shape, dim: LatentVariableModel(shape, dim, decoder=network, likelihood=GaussianLikelihood),
                       discriminator=lambda i, o: MLP(i, o, hidden=(16,)), n_critic=n_critic, generator_optimizer=sgd, discriminator_optimizer=sgd)
    model, discriminator = copy.deepcopy(module.model), copy.deepcopy(module.discriminator)
    data = torch.randn(32, 2)
    loader = DataLoader(TensorDataset(data, torch.zeros(32)), batch_size=16)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[ReseedEachBatch()])
    module.configure_callbacks = list
    trainer.fit(module, train_dataloaders=loader)

    generator_optimizer, discriminator_optimizer = sgd(model.parameters()), sgd(discriminator.parameters())
    for batch_idx, x in enumerate(data.split(16)):
        torch.manual_seed(batch_idx)
        fake = model.generate(model.prior().sample((16,)))
        discriminator_loss = module.loss.discriminator(discriminator(x).flatten(), discriminator(fake.detach()).flatten())
        discriminator_optimizer.zero_grad()
        discriminator_loss.backward()
        discriminator_optimizer.step()
        if (batch_idx + 1) % n_critic == 0:
            generator_loss = module.loss.generator(discriminator(fake).flatten())
            generator_optimizer.zero_grad()
            generator_loss.backward()
            generator_optimizer.step()
    assert module.generator_steps == 2 // n_critic
    for trained, reference in ((module.model, model), (module.discriminator, discriminator)):
        for (name, parameter), expected in zip(trained.state_dict().items(), reference.state_dict().values()):
            torch.testing.assert_close(parameter, expected, rtol=1e-6, atol=1e-7, msg=name)
    assert module._drawn is None  # the generator's graph is not kept past the batch


def test_batch_norm_in_a_gradient_penalised_critic_is_rejected_with_the_fix():
    with pytest.raises(ConfigError, match="normalization: none"):
        GANModule(loss="wasserstein_gp", discriminator=lambda i, o: ConvEncoder(i, o, normalization="batch"))
    GANModule(loss="wasserstein_gp", discriminator=lambda i, o: ConvEncoder(i, o, normalization="none"))
    GANModule(loss="non_saturating", discriminator=lambda i, o: ConvEncoder(i, o, normalization="batch"))


def test_a_wasserstein_critic_without_a_lipschitz_constraint_is_rejected_with_the_fixes():
    with pytest.raises(ConfigError, match="weight_clip: 0.01"):
        GANModule(loss="wasserstein")
    GANModule(loss="wasserstein", weight_clip=0.01)
    GANModule(loss="wasserstein", discriminator=lambda i, o: MLP(i, o, hidden=(8,), spectral_norm=True))
    GANModule(loss="wasserstein_gp")
    GANModule(loss="hinge")  # no W1 read-out, no constraint required


def test_unknown_loss_and_optimiser_names_are_rejected():
    with pytest.raises(ConfigError, match="choose one of"):
        GANModule(loss="wasserstein_gp_typo")
    with pytest.raises(ConfigError, match="grad_clip names unknown"):
        GANModule(grad_clip={"critic": 1.0})


@pytest.mark.parametrize("setting, match", [
    ({"weight_clip": -0.01}, "weight_clip must be a positive"),  # clamp_(0.01, -0.01) would set every weight to -0.01
    ({"weight_clip": 0.0}, "weight_clip must be a positive"),
    ({"grad_clip": {"discriminator": 0.0}}, "grad_clip of the discriminator optimiser"),  # Lightning skips a clip <= 0
    ({"gradient_penalty_weight": -10.0}, "gradient_penalty_weight must be >= 0"),
    ({"gradient_penalty_weight": float("nan")}, "gradient_penalty_weight must be >= 0"),
    ({"max_generator_steps": 0}, "max_generator_steps must be at least 1"),
])
def test_out_of_range_adversarial_settings_are_rejected(setting, match):
    with pytest.raises(ConfigError, match=match):
        GANModule(**setting)


def test_every_registered_loss_has_a_readout_rule():
    readouts = {name: loss.readout for name, loss in ADVERSARIAL_LOSSES.items()}
    assert readouts["minimax"] == readouts["non_saturating"] == "density_ratio"
    assert readouts["wasserstein"] == readouts["wasserstein_gp"] == "critic"
    assert ADVERSARIAL_LOSSES["wasserstein_gp"].gradient_penalty and not ADVERSARIAL_LOSSES["wasserstein"].gradient_penalty
