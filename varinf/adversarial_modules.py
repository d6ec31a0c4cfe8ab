"""The adversarial family as LightningModules: GAN, AAE and ALI/BiGAN.

Each model names the two distributions it matches (its "real" and "fake" sides) and estimates the
divergence between them with a discriminator or critic (THEORY.md, section 2):

| module | real side | fake side | discriminator sees |
| --- | --- | --- | --- |
| GANModule | x ~ p_data | x = G(z), z ~ p(z) | x |
| AAEModule | z ~ p(z) | z ~ q(z\\|x), x ~ p_data | z |
| ALIModule | (x, z), x ~ p_data, z ~ q(z\\|x) | (G(z), z), z ~ p(z) | (x, z) |

Training uses manual optimisation in named phases, a separate optimiser per network, and
``n_critic`` discriminator steps per generator step. Metric names are hierarchical:
``{stage}/D/loss``, ``{stage}/G/loss``, ``{stage}/divergence/{kl_data_model,kl_model_data,js,w1}``.
"""

import math
from collections.abc import Sequence
from contextlib import contextmanager

import torch
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from varinf.adversarial import ADVERSARIAL_LOSSES, DIVERGENCE_READOUTS, gradient_penalty
from varinf.errors import ConfigError
from varinf.guides import GaussianEncoderGuide, GuideFactory
from varinf.models import LatentVariableModel, ModelFactory
from varinf.modules import GenerativeModule, check_optimizer
from varinf.networks import MLP, NetworkFactory

ENCODER_NEEDS = ("posterior", "rsample")
"""What the AAE and ALI need of their guide: codes ``z ~ q(z|x)`` with gradients."""


class AdversarialModule(GenerativeModule):
    """Shared machinery: a discriminator (or critic) that tells the real side from the fake side.

    Subclasses build ``self.model`` (the generative side), ``self.discriminator`` and
    ``self.optimizer_factories`` (optimiser name -> (factory, networks it trains)), and implement
    ``sides(x) -> (real, fake)``. A phase is a pair (optimiser name, loss thunk);
    ``per_batch_phases`` run on every batch, ``generator_phases`` every ``n_critic``. The sides are
    drawn once per batch (:meth:`batch_sides`) and shared by the discriminator and generator phases.

    Args:
        loss: name of the adversarial loss (:data:`varinf.adversarial.ADVERSARIAL_LOSSES`).
        n_critic: discriminator steps per generator step.
        gradient_penalty_weight: lambda of the WGAN-GP penalty (used with ``wasserstein_gp``).
        weight_clip: clip every discriminator weight to ``[-c, c]`` after each step (WGAN: 0.01).
        grad_clip: maximum gradient norm per optimiser name, e.g. ``{discriminator: 1.0}``.
        scheduler: builds a learning-rate scheduler for every optimiser, stepped once per epoch.
        max_generator_steps: stop after this many generator steps (a budget independent of
            ``n_critic``, unlike Lightning's ``max_steps``, which counts every optimiser step).
    """

    ddp_strategy = "ddp_find_unused_parameters_true"
    """Each phase trains some networks only, so under DDP the others get no gradient in it."""
    generator_optimizer = "generator"
    """The optimiser of the generator phase, whose networks draw the fake side."""

    def __init__(
        self,
        loss: str,
        n_critic: int,
        gradient_penalty_weight: float,
        weight_clip: float | None,
        grad_clip: dict[str, float] | None,
        scheduler: LRSchedulerCallable | None,
        max_generator_steps: int | None,
    ):
        super().__init__()
        if loss not in ADVERSARIAL_LOSSES:
            raise ConfigError(f"Unknown adversarial loss {loss!r}; choose one of {sorted(ADVERSARIAL_LOSSES)}.")
        if n_critic < 1:
            raise ConfigError(f"n_critic must be at least 1, got {n_critic}.")
        if max_generator_steps is not None and max_generator_steps < 1:
            raise ConfigError(f"max_generator_steps must be at least 1 (or null for no limit), got {max_generator_steps}.")
        if not gradient_penalty_weight >= 0:
            raise ConfigError(f"gradient_penalty_weight must be >= 0 (WGAN-GP: 10), got {gradient_penalty_weight!r}.")
        if weight_clip is not None and not weight_clip > 0:
            raise ConfigError(f"weight_clip must be a positive bound c for the critic's weights in [-c, c] (WGAN: 0.01) or null, got {weight_clip!r}.")
        for name, max_norm in (grad_clip or {}).items():
            if not max_norm > 0:
                raise ConfigError(f"grad_clip of the {name} optimiser must be a positive gradient norm (or leave {name} out), got {max_norm!r}.")
        self.loss = ADVERSARIAL_LOSSES[loss]
        self.n_critic, self.gradient_penalty_weight, self.weight_clip = n_critic, gradient_penalty_weight, weight_clip
        self.grad_clip, self.scheduler_factory = dict(grad_clip or {}), scheduler
        self.max_generator_steps = max_generator_steps
        self.generator_steps = 0
        self._batch_size, self._evaluation_stage = None, "val"
        self._generator_turn = False
        self._drawn: tuple[Tensor, bool, tuple[Tensor, Tensor]] | None = None  # (batch, with gradients, sides)

    def check_settings(self) -> None:
        """Reject, before training, batch normalisation in a gradient-penalised critic (the penalty
        is per sample, and batch norm makes each output depend on the whole batch; Gulrajani et
        al. 2017, section 4), a Wasserstein critic without a Lipschitz constraint (weight clipping,
        spectral normalisation or a gradient penalty), gradient clipping of unknown optimisers and
        bad optimiser settings."""
        if self.loss.gradient_penalty and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.discriminator.modules()):
            raise ConfigError(
                f"The discriminator of {type(self).__name__} uses batch normalisation, which a gradient-penalised critic "
                "(loss: wasserstein_gp) must not have. Fix: set `normalization: none` in the discriminator's init_args, "
                "or choose a loss without a gradient penalty."
            )
        lipschitz = self.loss.gradient_penalty or self.weight_clip is not None or any(map(nn.utils.parametrize.is_parametrized, self.discriminator.modules()))
        if self.loss.readout == "critic" and not lipschitz:
            raise ConfigError(
                f"A Wasserstein critic must be Lipschitz (its value is a W1 estimate only then), but {type(self).__name__}'s has no "
                "constraint. Fix: set `weight_clip: 0.01` (WGAN), `spectral_norm: true` in the discriminator's init_args, "
                "or `loss: wasserstein_gp` (a gradient penalty)."
            )
        unknown = set(self.grad_clip) - set(self.optimizer_factories)
        if unknown:
            raise ConfigError(f"grad_clip names unknown optimisers {sorted(unknown)}; the optimisers are {sorted(self.optimizer_factories)}.")
        for name, (factory, _) in self.optimizer_factories.items():
            check_optimizer(factory, f"{name}_optimizer")

    def discriminate(self, side: Tensor) -> Tensor:
        """Discriminator logits (or critic values), one per sample."""
        return self.discriminator(side).reshape(side.shape[0])

    def batch_sides(self, x: Tensor, with_gradients: bool) -> tuple[Tensor, Tensor]:
        """The real and fake sides of the batch ``x``, drawn once per batch and shared: the
        discriminator phase takes them detached, and on a generator turn (every ``n_critic``
        batches) the generator phase backpropagates through the same draws, as a hand-written GAN
        loop reuses its fakes. Drawn with gradients for the generator phase's networks on request
        (by the discriminator phase on a generator turn), else without any."""
        drawn = self._drawn
        if drawn is None or drawn[0] is not x or (with_gradients and not drawn[1]):
            if with_gradients:
                with self.trainable(self.generator_optimizer):
                    sides = self.sides(x)
            else:
                with torch.no_grad():
                    sides = self.sides(x)
            drawn = self._drawn = (x, with_gradients, sides)
        return drawn[2]

    def discriminator_phase(self, x: Tensor) -> Tensor:
        """The discriminator's loss on the real side against detached fakes (plus its penalty)."""
        real, fake = (side.detach() for side in self.batch_sides(x, with_gradients=self._generator_turn))
        real_out, fake_out = self.discriminate(real), self.discriminate(fake)
        loss = self.loss.discriminator(real_out, fake_out)
        logged = {"D/loss": loss, **self.divergences(real_out.detach(), fake_out.detach())}
        if self.loss.gradient_penalty:
            logged["D/gradient_penalty"] = penalty = gradient_penalty(self.discriminate, real, fake)
            loss = loss + self.gradient_penalty_weight * penalty
        self._log(logged)
        return loss

    def divergences(self, real_out: Tensor, fake_out: Tensor) -> dict[str, Tensor]:
        """The divergence estimates that this loss's discriminator outputs support, by metric name."""
        return {f"divergence/{name}": readout(real_out, fake_out) for name, readout in DIVERGENCE_READOUTS[self.loss.readout].items()}

    def _log(self, values: dict[str, Tensor]) -> None:
        self.record("train" if self.training else self._evaluation_stage, values, self._batch_size)

    # --- the training loop -------------------------------------------------------------------
    def configure_optimizers(self):
        optimizers = [factory(nn.ModuleList(networks).parameters()) for factory, networks in self.optimizer_factories.values()]
        if self.scheduler_factory is None:
            return optimizers
        return optimizers, [self.scheduler_factory(optimizer) for optimizer in optimizers]

    def optimizer(self, name: str):
        return self.optimizers()[list(self.optimizer_factories).index(name)]

    @contextmanager
    def trainable(self, name: str):
        """Within the block, only the networks of optimiser ``name`` take gradients."""
        trained = {id(p) for network in self.optimizer_factories[name][1] for p in network.parameters()}
        flags = [(p, p.requires_grad) for p in self.parameters()]
        for parameter, _ in flags:
            parameter.requires_grad_(id(parameter) in trained)
        try:
            yield
        finally:
            for parameter, flag in flags:
                parameter.requires_grad_(flag)

    def optimization_step(self, name: str, phase) -> None:
        """Run one phase with only optimiser ``name``'s networks trainable, then step it."""
        optimizer = self.optimizer(name)
        with self.trainable(name):
            loss = phase()
            self.watch_finite(f"the {name} loss", loss)
            self.optimizer_update(optimizer, loss, self.grad_clip.get(name))

    def per_batch_phases(self, x: Tensor) -> list:
        """The phases run on every batch, as ``(optimiser name, loss thunk)``: the discriminator's."""
        return [("discriminator", lambda: self.discriminator_phase(x))]

    def generator_phase(self, x: Tensor) -> Tensor:
        """The generator's loss on the batch's fakes."""
        _, fake = self.batch_sides(x, with_gradients=True)
        loss = self.loss.generator(self.discriminate(fake))
        self._log({"G/loss": loss})
        return loss

    def generator_phases(self, x: Tensor) -> list:
        """The phases run every ``n_critic`` batches: the generator's."""
        return [(self.generator_optimizer, lambda: self.generator_phase(x))]

    def training_step(self, batch, batch_idx):
        x, _ = batch
        self._batch_size = x.shape[0]
        self._generator_turn = (batch_idx + 1) % self.n_critic == 0
        for name, phase in self.per_batch_phases(x):
            self.optimization_step(name, phase)
        if self.weight_clip is not None:
            with torch.no_grad():
                for parameter in self.discriminator.parameters():
                    parameter.clamp_(-self.weight_clip, self.weight_clip)
        if self._generator_turn:
            for name, phase in self.generator_phases(x):
                self.optimization_step(name, phase)
            self.generator_steps += 1
            if self.max_generator_steps is not None and self.generator_steps >= self.max_generator_steps:
                self.trainer.should_stop = True
        self._drawn = None  # frees the generator's graph

    def evaluation_step(self, batch, stage: str) -> None:
        x, _ = batch
        self._batch_size, self._evaluation_stage = x.shape[0], stage
        real, fake = self.sides(x)
        real_out, fake_out = self.discriminate(real), self.discriminate(fake)
        self._log({"D/loss": self.loss.discriminator(real_out, fake_out), **self.divergences(real_out, fake_out)})

    def validation_step(self, batch, batch_idx):
        self.evaluation_step(batch, "val")

    def test_step(self, batch, batch_idx):
        self.evaluation_step(batch, "test")

    def on_save_checkpoint(self, checkpoint):
        super().on_save_checkpoint(checkpoint)
        checkpoint["generator_steps"] = self.generator_steps

    def on_load_checkpoint(self, checkpoint):
        super().on_load_checkpoint(checkpoint)
        self.generator_steps = checkpoint.get("generator_steps", 0)


class GANModule(AdversarialModule):
    """GAN: matches the data distribution p_data(x) and the generator's p_g(x) (Goodfellow et al. 2014).

    The generator is the model side's ``generate(z)`` (the mean of ``p(x|z)``, e.g. sigmoid
    outputs), with ``z ~ p(z)``. The discriminator sees x.

    Args:
        data_shape, latent_dim: shapes of x and z.
        model: builds the model side (prior and generator network).
        discriminator: builds the discriminator network ``data_shape -> (1,)``.
        loss: ``minimax``, ``non_saturating``, ``least_squares``, ``hinge``, ``wasserstein``
            (pair it with ``weight_clip: 0.01`` and RMSprop 5e-5) or ``wasserstein_gp``.
        generator_optimizer, discriminator_optimizer: build each network's optimiser.
        Others: see :class:`AdversarialModule`.
    """

    def __init__(
        self,
        data_shape: Sequence[int] = (1, 28, 28),
        latent_dim: int = 64,
        model: ModelFactory = LatentVariableModel,
        discriminator: NetworkFactory = MLP,
        loss: str = "non_saturating",
        n_critic: int = 1,
        gradient_penalty_weight: float = 10.0,
        weight_clip: float | None = None,
        grad_clip: dict[str, float] | None = None,
        generator_optimizer: OptimizerCallable = torch.optim.Adam,
        discriminator_optimizer: OptimizerCallable = torch.optim.Adam,
        scheduler: LRSchedulerCallable | None = None,
        max_generator_steps: int | None = None,
    ):
        super().__init__(loss, n_critic, gradient_penalty_weight, weight_clip, grad_clip, scheduler, max_generator_steps)
        self.save_hyperparameters()
        self.model = model(data_shape, latent_dim)
        self.discriminator = discriminator(self.model.data_shape, (1,))
        self.optimizer_factories = {
            "discriminator": (discriminator_optimizer, [self.discriminator]),
            "generator": (generator_optimizer, [self.model]),
        }
        self.check_settings()

    def sides(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x, self.model.generate(self.model.prior().sample((x.shape[0],)))



class AAEModule(AdversarialModule):
    """Adversarial autoencoder: the VAE's reconstruction term, with ``KL(q(z|x) || p(z))`` replaced
    by an adversarial divergence between the aggregate posterior ``q(z) = E_p~ q(z|x)`` and the
    prior ``p(z)`` (Makhzani et al. 2015). The encoder is the same guide class as the VAE's.

    Three phases per generator step: reconstruction (encoder and decoder), the discriminator on
    z (prior samples real, encoded samples fake), then the encoder as generator.

    Args:
        data_shape, latent_dim: shapes of x and z.
        model: builds the model side (prior, decoder, likelihood).
        guide: builds the encoder ``q(z|x)``.
        discriminator: builds the discriminator network ``(latent_dim,) -> (1,)``.
        autoencoder_optimizer: for the reconstruction phase (encoder and decoder).
        discriminator_optimizer: for the discriminator phase.
        encoder_optimizer: for the regularisation phase (the encoder as generator).
        Others: see :class:`AdversarialModule`.
    """

    # No checkpoint_monitor: like the GAN, the AAE is judged by its samples, so its last epoch is
    # what is evaluated (its best reconstruction comes many epochs before q(z) matches p(z)).
    generator_optimizer = "encoder"
    """The encoder is the AAE's generator: its codes are made to look like prior samples."""

    def __init__(
        self,
        data_shape: Sequence[int] = (1, 28, 28),
        latent_dim: int = 8,
        model: ModelFactory = LatentVariableModel,
        guide: GuideFactory = GaussianEncoderGuide,
        discriminator: NetworkFactory = MLP,
        loss: str = "non_saturating",
        n_critic: int = 1,
        gradient_penalty_weight: float = 10.0,
        weight_clip: float | None = None,
        grad_clip: dict[str, float] | None = None,
        autoencoder_optimizer: OptimizerCallable = torch.optim.Adam,
        discriminator_optimizer: OptimizerCallable = torch.optim.Adam,
        encoder_optimizer: OptimizerCallable = torch.optim.Adam,
        scheduler: LRSchedulerCallable | None = None,
        max_generator_steps: int | None = None,
    ):
        super().__init__(loss, n_critic, gradient_penalty_weight, weight_clip, grad_clip, scheduler, max_generator_steps)
        self.save_hyperparameters()
        self.model = model(data_shape, latent_dim)
        self.build_guide(guide, ENCODER_NEEDS)
        self.discriminator = discriminator((latent_dim,), (1,))
        self.optimizer_factories = {
            "autoencoder": (autoencoder_optimizer, [self.guide, self.model]),
            "discriminator": (discriminator_optimizer, [self.discriminator]),
            "encoder": (encoder_optimizer, [self.guide]),
        }
        self.check_settings()

    def sides(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.model.prior().sample((x.shape[0],)), self.guide.posterior(x).rsample()

    def reconstruction_phase(self, x: Tensor) -> Tensor:
        """``-E_q(z|x) log p(x|z)`` per datapoint, in nats."""
        loss = -self.model.observation(self.guide.posterior(x).rsample()).log_prob(x).mean()
        self._log({"reconstruction": loss})
        return loss

    def per_batch_phases(self, x: Tensor) -> list:
        """Reconstruction, then the discriminator on z."""
        return [("autoencoder", lambda: self.reconstruction_phase(x)), ("discriminator", lambda: self.discriminator_phase(x))]

    def evaluation_step(self, batch, stage: str) -> None:
        super().evaluation_step(batch, stage)
        self.reconstruction_phase(batch[0])


class ALIModule(AdversarialModule):
    """ALI / BiGAN: a discriminator on (x, z) pairs separates the data joint ``p~(x) q(z|x)`` from
    the model joint ``p(z) p(x|z)`` (Dumoulin et al. 2017; Donahue et al. 2017): the adversarial
    estimate of the joint divergence that the VAE bounds with the ELBO.

    The encoder and the generator are trained jointly against the discriminator, with the labels
    swapped (the discriminator's own loss with real and fake exchanged, as in the ALI paper).

    Args:
        data_shape, latent_dim: shapes of x and z.
        model: builds the model side (prior and generator network).
        guide: builds the encoder ``q(z|x)`` (the VAE's guide class).
        discriminator: builds the network ``(prod(data_shape) + latent_dim,) -> (1,)`` on
            flattened x concatenated with z.
        generator_optimizer: for the encoder and generator together.
        discriminator_optimizer: for the discriminator.
        Others: see :class:`AdversarialModule`.
    """

    def __init__(
        self,
        data_shape: Sequence[int] = (1, 28, 28),
        latent_dim: int = 64,
        model: ModelFactory = LatentVariableModel,
        guide: GuideFactory = GaussianEncoderGuide,
        discriminator: NetworkFactory = MLP,
        loss: str = "non_saturating",
        n_critic: int = 1,
        gradient_penalty_weight: float = 10.0,
        weight_clip: float | None = None,
        grad_clip: dict[str, float] | None = None,
        generator_optimizer: OptimizerCallable = torch.optim.Adam,
        discriminator_optimizer: OptimizerCallable = torch.optim.Adam,
        scheduler: LRSchedulerCallable | None = None,
        max_generator_steps: int | None = None,
    ):
        super().__init__(loss, n_critic, gradient_penalty_weight, weight_clip, grad_clip, scheduler, max_generator_steps)
        self.save_hyperparameters()
        self.model = model(data_shape, latent_dim)
        self.build_guide(guide, ENCODER_NEEDS)
        self.discriminator = discriminator((math.prod(self.model.data_shape) + latent_dim,), (1,))
        self.optimizer_factories = {
            "discriminator": (discriminator_optimizer, [self.discriminator]),
            "generator": (generator_optimizer, [self.guide, self.model]),
        }
        self.check_settings()

    def sides(self, x: Tensor) -> tuple[Tensor, Tensor]:
        z_data = self.guide.posterior(x).rsample()
        z_model = self.model.prior().sample((x.shape[0],))
        real = torch.cat([x.flatten(1), z_data], 1)
        fake = torch.cat([self.model.generate(z_model).flatten(1), z_model], 1)
        return real, fake

    def setup(self, stage: str) -> None:
        """Refuse to fit with ``loss: minimax``, which would play the same game here as
        ``non_saturating`` (a checkpoint of either still loads, for evaluation and sampling)."""
        if stage == "fit" and self.hparams.loss == "minimax":
            raise ConfigError(
                "ALIModule trains its encoder and generator on the discriminator's loss with real and fake swapped (the ALI paper's "
                "game), so `loss: minimax` would play the same game as `loss: non_saturating`. Fix: use `loss: non_saturating`."
            )
        super().setup(stage)

    def generator_phase(self, x: Tensor) -> Tensor:
        """Encoder and generator together: the discriminator's loss with real and fake swapped."""
        real, fake = self.batch_sides(x, with_gradients=True)
        loss = self.loss.discriminator(self.discriminate(fake), self.discriminate(real))
        self._log({"G/loss": loss})
        return loss

