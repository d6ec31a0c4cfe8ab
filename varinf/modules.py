"""LightningModules that train varinf models, and loading them back from checkpoints."""

import ctypes
import importlib
import math
import os
import random
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
from pytorch_lightning.utilities import rank_zero_only
from torch import Tensor
from torchmetrics import Metric

from varinf.callbacks import ImageGrids
from varinf.errors import ConfigError, DataError, NumericalError
from varinf.guides import (
    GaussianEncoderGuide,
    GuideFactory,
    attach_guide,
    posterior_location,
    require_capabilities,
)
from varinf.likelihoods import BernoulliLikelihood
from varinf.metrics import ActiveUnits, EpochMeans
from varinf.models import LatentVariableModel, ModelFactory, as_data_shape
from varinf.objectives import ELBOLoss, IWAELoss, KLEstimator

RNG_STATES_KEY = "varinf_rng_states"
MAX_UNCHECKED_STEPS = 1000
"""A watched loss is checked for NaN and inf, and recorded values are added to the epoch means, at least this
often (in steps), whatever ``log_every_n_steps`` is."""


def skip_a_failing_nvml_check() -> None:
    """Lightning sets ``PYTORCH_NVML_BASED_CUDA_CHECK=1`` (a CUDA availability check through NVML,
    which does not poison forked processes). Where NVML cannot be loaded (no NVIDIA driver) torch
    then tries to load it afresh at every check, i.e. every optimiser step (~0.2 ms), before
    falling back to its default check. There, ask the default check directly: the same answer."""
    if os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK") != "1":
        return
    try:
        ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "0"


skip_a_failing_nvml_check()


def random_states() -> dict:
    """The Python, numpy and torch (CPU and CUDA) random states, as plain values and tensors that
    ``torch.load(weights_only=True)`` reads back. Pyro draws from torch's generators."""
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached_gaussian),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_random_states(states: dict) -> None:
    """Restore what :func:`random_states` returned."""
    random.setstate(tuple(tuple(part) if isinstance(part, list) else part for part in states["python"]))
    kind, keys, position, has_gauss, cached_gaussian = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached_gaussian))
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class GenerativeModule(pl.LightningModule):
    """What every varinf LightningModule shares: the model side ``self.model`` (a
    :class:`~varinf.models.LatentVariableModel`), optionally a guide ``self.guide``, sampling and
    reconstructing, and the default callbacks.

    Every epoch rewrites ``last.ckpt``; subclasses may set ``checkpoint_monitor``, the validation
    metric (lower is better) that picks ``best.ckpt``. Subclasses step their optimisers in
    ``training_step`` with :meth:`optimizer_update` (Lightning's manual optimisation); learning-rate
    schedulers advance once per epoch.
    """

    checkpoint_monitor: str | None = None
    ddp_strategy = "ddp"
    """What ``strategy: ddp`` in a recipe runs as (Lightning's strategy name)."""
    progress_bar_metrics: tuple[str, ...] = ()
    """Names of the recorded metrics shown on the progress bar."""

    def __init__(self):
        super().__init__()
        self._max_grad_norm: float | None = None  # of the optimiser stepping (optimizer_update)
        self._epoch_metrics: dict[str, Metric] = {}
        self._records: dict[tuple[str, tuple[str, ...]], list[tuple[Tensor, int]]] = {}
        self._unchecked: dict[str, list[tuple[int, Tensor]]] = {}
        self._watched_parts: dict[str, list[str]] = {}
        self._log_this_step = False
        self.automatic_optimization = False

    def configure_callbacks(self):
        # last.ckpt is its own checkpoint, rewritten every epoch: Lightning's save_last only
        # refreshes it when a top-k checkpoint is saved, i.e. when the monitored metric improves.
        latest = ModelCheckpoint(filename="last", enable_version_counter=False)
        if not self.checkpoint_monitor:
            return [latest, ImageGrids()]
        best = ModelCheckpoint(monitor=self.checkpoint_monitor, mode="min", filename="best", enable_version_counter=False)
        return [best, latest, ImageGrids()]  # the first is Lightning's checkpoint_callback: ckpt_path="best"

    def setup(self, stage: str) -> None:
        """Refuse data whose datapoints have another shape than the model's. Before a fit, a prior
        that starts from data (a VampPrior's pseudo-inputs) takes its starting points from the
        training split. Lightning restores a checkpoint after ``setup``, so a resumed fit keeps the
        checkpoint's prior."""
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        served, built = getattr(datamodule, "data_shape", None), as_data_shape(self.model.data_shape)
        if served is not None and (served := as_data_shape(served)) != built:
            raise ConfigError(
                f"{type(datamodule).__name__} serves datapoints of shape {served}, but {type(self).__name__} was built for "
                f"{built}. Fix: set the model's data_shape to {list(served)} (with networks for that shape, as "
                "in the recipes for that data), or choose data of the model's shape."
            )
        initialise = getattr(getattr(self.model, "prior", None), "initialise_from_data", None)
        if stage == "fit" and initialise is not None and hasattr(datamodule, "splits"):
            datamodule.setup(stage)
            initialise(datamodule.splits["train"][0])

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self.raise_if_not_finite()
        checkpoint[RNG_STATES_KEY] = random_states()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._resumed_rng_states = checkpoint.get(RNG_STATES_KEY)

    def on_train_start(self) -> None:
        """On resuming, restore the random states of the checkpoint (Python, numpy, torch and so
        Pyro), after the sanity check has drawn from them: the data order, binarisation and
        samples then continue exactly as in an uninterrupted run."""
        if getattr(self, "_resumed_rng_states", None) is not None:
            set_random_states(self._resumed_rng_states)
            self._resumed_rng_states = None

    # --- epoch metrics and numerical checks, kept on the device: no host sync per step ----------
    def epoch_metric(self, key: str, make: Callable[[], Metric]) -> Metric:
        """The torchmetrics ``Metric`` accumulating ``key`` over the current epoch, on the module's
        device (made at first use); logged and reset at the epoch's end."""
        metric = self._epoch_metrics.get(key)
        if metric is None:
            metric = self._epoch_metrics[key] = make().to(self.device)
        elif metric.device != self.device:  # the module moved (a GPU fit after a CPU evaluation, say)
            metric.to(self.device)
        return metric

    def record(self, stage: str, values: dict[str, Tensor], batch_size: int) -> None:
        """Keep this batch's means of ``{stage}/{name}`` for the epoch means (:class:`EpochMeans`),
        with neither a Lightning ``log`` call nor a host sync: one stack per step, added to the
        metric every ``log_every_n_steps`` batches and at the epoch's end (:meth:`add_records`).
        In training they are also logged as ``train/{name}_step`` every ``log_every_n_steps``
        batches (when Lightning writes step metrics). Outside a Trainer (a step called by hand)
        nothing is recorded, as with Lightning's ``log``."""
        if self._trainer is None:
            return
        rows = self._records.setdefault((stage, tuple(values)), [])
        rows.append((torch.stack(list(values.values())).detach(), batch_size))
        if len(rows) >= MAX_UNCHECKED_STEPS:
            self.add_records(stage)
        if stage == "train" and self._log_this_step:
            for name, value in values.items():
                self.log(f"train/{name}_step", value.detach(), on_step=True, on_epoch=False, prog_bar=name in self.progress_bar_metrics)

    def add_records(self, stage: str) -> None:
        """Add the batches recorded in ``stage`` since the last call to its epoch means."""
        for (recorded_stage, names), rows in self._records.items():
            if recorded_stage == stage and rows:
                values, sizes = zip(*rows)
                rows.clear()
                weights = torch.tensor(sizes, dtype=torch.float64, device=self.device)
                self.epoch_metric(f"{stage}/means", EpochMeans).update(names, torch.stack(values), weights)

    def log_epoch_metrics(self, stage: str) -> None:
        """Log the epoch values of every metric of ``stage`` (reduced across processes), then reset them."""
        self.add_records(stage)
        for key, metric in self._epoch_metrics.items():
            if key.startswith(f"{stage}/") and metric.update_count:
                value = metric.compute()
                for name, mean in (value.items() if isinstance(value, dict) else [(key.partition("/")[2], value)]):
                    # already reduced across processes by torchmetrics; sync_dist re-averages equal values
                    self.log(f"{stage}/{name}", mean, prog_bar=name in self.progress_bar_metrics, sync_dist=True)
                metric.reset()

    def watch_finite(self, name: str, values: Tensor, parts: Sequence[str] | None = None) -> None:
        """Keep this step's ``values`` (named ``name``; entry i is ``parts[i]`` if given) for the
        next :meth:`raise_if_not_finite`, which finds the first step where one held a NaN or inf:
        no arithmetic and no host sync per step."""
        unchecked = self._unchecked.setdefault(name, [])
        unchecked.append((self.global_step, values.detach()))
        if parts is not None:
            self._watched_parts[name] = list(parts)
        if len(unchecked) >= MAX_UNCHECKED_STEPS:
            self.raise_if_not_finite()

    def raise_if_not_finite(self) -> None:
        """Stop training if any watched loss went NaN or inf, or any parameter holds one: called
        every ``log_every_n_steps`` batches, at each epoch's end and before every checkpoint, so no
        checkpoint holds a NaN. The error names each bad loss with its first bad step (and, of a
        loss watched in parts, the first part that went bad), the bad parameters, and the last good
        checkpoint.

        Gradients are not watched per step: an optimiser step with a NaN or inf gradient leaves a
        NaN parameter (Adam's and SGD's updates, and norm clipping, all propagate it), which the
        next loss and this check both see. Under ``16-mixed`` the loss scaler skips such steps."""
        bad = []
        for name, unchecked in self._unchecked.items():
            if not unchecked:
                continue
            steps, values = zip(*unchecked)
            unchecked.clear()
            not_finite = (~torch.isfinite(torch.stack([value.reshape(-1) for value in values]))).tolist()
            first = next((row for row, flags in enumerate(not_finite) if any(flags)), None)
            if first is not None:
                bad.append((steps[first], name, not_finite[first].index(True)))
        parts = [
            f"{name} at step {step}" + (f" (first bad: {self._watched_parts[name][index]})" if name in self._watched_parts else "")
            for step, name, index in sorted(bad)
        ]
        named = list(self.named_parameters())
        finite = torch.stack([torch.isfinite(parameter).all() for _, parameter in named]).tolist() if named else []
        bad_parameters = [name for (name, _), ok in zip(named, finite) if not ok]
        if bad_parameters:
            parts.append(f"the parameters {', '.join(bad_parameters[:5])}{' and others' if len(bad_parameters) > 5 else ''}")
        if parts:
            raise NumericalError(f"NaN or inf in training at epoch {self.current_epoch}: {'; '.join(parts)}. {self._stopped_hint()}")

    def on_train_batch_start(self, batch, batch_idx) -> None:
        # Lightning writes step metrics when (batches done + 1) % log_every_n_steps == 0, never when it is 0
        every = self.trainer.log_every_n_steps
        self._log_this_step = every > 0 and (self.trainer.fit_loop.total_batch_idx + 1) % every == 0

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self._log_this_step:
            self.raise_if_not_finite()
            self.add_records("train")

    def on_train_epoch_start(self) -> None:
        self._epoch_started = time.perf_counter()

    def on_train_epoch_end(self) -> None:
        self.raise_if_not_finite()
        self.log_epoch_metrics("train")
        schedulers = self.lr_schedulers() or []  # learning-rate schedules advance once per epoch
        for scheduler in schedulers if isinstance(schedulers, list) else [schedulers]:
            scheduler.step()
        self.print_epoch_summary()

    def on_validation_epoch_end(self) -> None:
        self.log_epoch_metrics("val")

    def on_test_epoch_end(self) -> None:
        self.log_epoch_metrics("test")

    @rank_zero_only
    def print_epoch_summary(self) -> None:
        """One line per epoch with the epoch metrics, when no progress bar is shown (for example
        when the output is not a terminal)."""
        if self.trainer.progress_bar_callback is not None:
            return
        by_stage: dict[str, list[str]] = {}
        for name, value in sorted(self.trainer.callback_metrics.items()):
            stage, _, metric = name.rpartition("/")
            if stage and not metric.endswith("_step") and value.numel() == 1:
                by_stage.setdefault(stage, []).append(f"{metric} {float(value):.2f}")
        shown = " | ".join(f"{stage}: {', '.join(values)}" for stage, values in by_stage.items())
        elapsed = time.perf_counter() - self._epoch_started
        print(f"epoch {self.current_epoch + 1}/{self.trainer.max_epochs} ({elapsed:.1f} s) | {shown}", flush=True)

    def optimizer_update(self, optimizer, loss: Tensor, max_grad_norm: float | None = None) -> None:
        """One optimiser update: zero the gradients, backpropagate ``loss`` (through Lightning, so
        mixed precision and DDP apply), clip the gradient norm to ``max_grad_norm`` if given, step.
        Manual optimisation gives one code path for one optimiser or several, and costs less per
        step than Lightning's automatic optimisation (its closure and hooks)."""
        optimizer.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        self._max_grad_norm = max_grad_norm
        optimizer.step()

    def on_before_optimizer_step(self, optimizer) -> None:
        """Clip here, inside ``optimizer.step()``: under ``16-mixed`` the gradient scaler has unscaled
        the gradients by now, so the norm clipped is the true one, not one multiplied by the scale."""
        if self._max_grad_norm is None:
            return
        if self.trainer.scaler is not None and optimizer.defaults.get("fused"):
            raise ConfigError(
                f"grad_clip needs the true gradient norm, but under precision {self.trainer.precision} a fused "
                f"{type(optimizer).__name__} unscales its gradients only inside its step. Fix: set `fused: false` in the "
                "optimiser's init_args, use `precision: bf16-mixed` (no gradient scaling), or drop grad_clip."
            )
        self.clip_gradients(optimizer, gradient_clip_val=self._max_grad_norm, gradient_clip_algorithm="norm")

    def _stopped_hint(self) -> str:
        callbacks = self.trainer.checkpoint_callbacks if self._trainer is not None else []
        last = next((callback.best_model_path for callback in callbacks if Path(callback.best_model_path).name == "last.ckpt"), "")
        cures = "lowering the learning rate, clipping gradients (grad_clip) or checking the recipe's settings and the data"
        if not last:
            return f"Training stopped before its first checkpoint; fit again after {cures}."
        return f"Training stopped without a further step or checkpoint. The last good checkpoint is {last}; resume from it with --resume after {cures}."

    def build_guide(self, guide: GuideFactory, needs: Sequence[str]) -> None:
        """Build ``self.guide`` for ``self.model``, check that it has the capabilities ``needs``, and
        hand it to a prior built from it (a VampPrior)."""
        self.guide = guide(self.model.data_shape, self.model.latent_dim)
        require_capabilities(self.guide, needs, type(self).__name__)
        attach_guide(self.model.prior, self.guide)

    @torch.no_grad()
    def sample_latents(self, num_samples: int) -> Tensor:
        """``z ~ p(z)``, shape ``(num_samples, latent_dim)``, on the module's device."""
        return self.model.prior().sample((num_samples,))

    @torch.no_grad()
    def generate(self, z: Tensor) -> Tensor:
        """Decode latents to data: the mean of ``p(x|z)`` (a GAN's generator output)."""
        return self.model.generate(z)

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """Decode the posterior mean of each x (for modules with an encoder, ``self.guide``)."""
        return self.model.generate(posterior_location(self.guide.posterior(x)))


OBJECTIVES = {"elbo": ELBOLoss, "iwae": IWAELoss}
"""The likelihood objectives a VAEModule trains with, by name."""

LOSS_PARTS = ("reconstruction (site 'x')", "kl (site 'z')", "the weighted sum")
"""What the watched training loss vector holds, the parts first so a bad part is named."""


class VAEModule(GenerativeModule):
    """A VAE trained by maximising the ELBO: the data side ``p~(x) q(z|x)`` (the guide) against the
    model side ``p(z) p(x|z)`` (the model), Kingma & Welling (2014).

    Train, validation and test share one step. Logged, in nats per datapoint: ``{stage}/loss``
    (what is minimised), ``{stage}/negative_elbo``, ``{stage}/reconstruction`` (``-E_q log p(x|z)``),
    ``{stage}/kl`` (``KL(q(z|x) || p(z))``), and ``val/active_units`` and ``test/active_units``.

    Args:
        data_shape: shape of one datapoint.
        latent_dim: dimension of z.
        model: builds the model side from ``(data_shape, latent_dim)``.
        guide: builds the guide from ``(data_shape, latent_dim)``.
        objective: ``"elbo"`` (:class:`~varinf.objectives.ELBOLoss`) or ``"iwae"``
            (:class:`~varinf.objectives.IWAELoss`, which needs a guide with ``posterior`` and ``rsample``).
        kl: ELBO only: ``"analytic"`` (``TraceMeanField_ELBO``; closed form where registered, Monte
            Carlo otherwise) or ``"monte_carlo"`` (``Trace_ELBO``).
        num_particles: samples of z per datapoint: the ELBO's particles, or IWAE's K.
        beta: weight of the KL term (beta-VAE, Higgins et al. 2017); 1 is the ELBO.
        kl_warmup_epochs: ramp the KL weight linearly from ~0 to ``beta`` over this many epochs
            (Bowman et al. 2016; Sonderby et al. 2016); 0 disables warm-up.
        optimizer: builds the torch optimiser from the parameters.
        scheduler: builds a learning-rate scheduler from the optimiser, stepped once per epoch.
        grad_clip: maximum gradient norm (clipping before each optimiser step); None disables it.
    """

    checkpoint_monitor = "val/negative_elbo"
    progress_bar_metrics = ("negative_elbo",)

    def __init__(
        self,
        data_shape: Sequence[int] = (1, 28, 28),
        latent_dim: int = 50,
        model: ModelFactory = LatentVariableModel,
        guide: GuideFactory = GaussianEncoderGuide,
        objective: Literal["elbo", "iwae"] = "elbo",
        kl: KLEstimator = "analytic",
        num_particles: int = 1,
        beta: float = 1.0,
        kl_warmup_epochs: float = 0.0,
        optimizer: OptimizerCallable = torch.optim.Adam,
        scheduler: LRSchedulerCallable | None = None,
        grad_clip: float | None = None,
    ):
        super().__init__()
        if grad_clip is not None and not grad_clip > 0:
            raise ConfigError(f"grad_clip must be a positive gradient norm (or null), got {grad_clip!r}.")
        if not 0 < beta < math.inf or not 0 <= kl_warmup_epochs < math.inf or num_particles < 1 or latent_dim < 1 or objective not in OBJECTIVES:
            raise ConfigError(
                f"VAEModule needs a finite beta > 0, a finite kl_warmup_epochs >= 0, num_particles >= 1, latent_dim >= 1 and objective in {sorted(OBJECTIVES)}; "
                f"got beta={beta}, kl_warmup_epochs={kl_warmup_epochs}, num_particles={num_particles}, latent_dim={latent_dim}, objective={objective!r}."
            )
        self.save_hyperparameters()
        self.model = model(data_shape, latent_dim)
        self.build_guide(guide, OBJECTIVES[objective].needs)
        if objective == "iwae":
            self.objective = IWAELoss(self.model, self.guide, num_samples=num_particles)
        else:
            self.objective = ELBOLoss(self.model, self.guide, kl=kl, num_particles=num_particles)
        self.beta, self.kl_warmup_epochs = beta, kl_warmup_epochs
        check_optimizer(optimizer, "optimizer")
        self.optimizer_factory, self.scheduler_factory, self.grad_clip = optimizer, scheduler, grad_clip

    def setup(self, stage: str) -> None:
        """Refuse a Bernoulli likelihood on data that is not binary (grey levels without a declared
        binarisation): its log-likelihood would be silently wrong."""
        super().setup(stage)
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        if not isinstance(self.model.likelihood, BernoulliLikelihood) or datamodule is None:
            return
        binarize = getattr(datamodule, "binarize", None)
        if binarize is None:
            datamodule.setup(stage)
            data = datamodule.splits["train"][0]
            binary = bool(((data == 0) | (data == 1)).all())
        else:
            binary = binarize != "none"
        if not binary:
            raise ConfigError(
                f"BernoulliLikelihood needs binary data, but {type(datamodule).__name__} serves grey levels"
                + (" (binarize: none)" if binarize == "none" else "")
                + ". Set the data's `binarize: dynamic` (or static), or use varinf.ContinuousBernoulliLikelihood for grey levels."
            )

    def kl_weight(self) -> float:
        """The KL weight for the current step: ``beta * min(1, step / warm-up steps)``."""
        if self.kl_warmup_epochs == 0 or self._trainer is None:
            return self.beta
        warmup_steps = self.kl_warmup_epochs * self.trainer.num_training_batches
        return self.beta * min(1.0, (self.global_step + 1) / warmup_steps)

    def step(self, batch: tuple[Tensor, Tensor], stage: str) -> Tensor:
        x, _ = batch
        self.objective.kl_weight = self.kl_weight() if stage == "train" else 1.0
        terms = self.objective.terms(x)
        if stage == "train":
            self.watch_finite("the training loss", torch.stack([terms.reconstruction, terms.kl, terms.loss]), LOSS_PARTS)
        if stage != "train":  # a property of the fitted encoder, read on held-out data
            self.epoch_metric(f"{stage}/active_units", lambda: ActiveUnits(self.model.latent_dim)).update(terms.posterior_mean)
        self.record(stage, {"loss": terms.loss, "negative_elbo": terms.negative_elbo, "reconstruction": terms.reconstruction, "kl": terms.kl}, x.shape[0])
        return terms.loss

    def training_step(self, batch, batch_idx):
        loss = self.step(batch, "train")
        self.optimizer_update(self.optimizers(), loss, self.grad_clip)
        return loss

    def validation_step(self, batch, batch_idx):
        self.step(batch, "val")

    def test_step(self, batch, batch_idx):
        self.step(batch, "test")

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        return [optimizer], [self.scheduler_factory(optimizer)]


def check_optimizer(factory: OptimizerCallable, name: str) -> None:
    """Build the optimiser once on a probe parameter, so that a bad setting (a learning rate <= 0,
    say) is refused before training starts, with the recipe key named."""
    try:
        optimizer = factory([torch.nn.Parameter(torch.zeros(1))])
    except (ValueError, TypeError) as error:
        raise ConfigError(f"{name}: {error}.") from None
    for group in optimizer.param_groups:
        if "lr" in group and not float(group["lr"]) > 0:
            raise ConfigError(f"{name}: the learning rate must be > 0, got lr={group['lr']}.")


def import_class(class_path: str) -> type:
    """The class named by an import path such as ``varinf.VAEModule``."""
    module_name, _, class_name = class_path.rpartition(".")
    return getattr(importlib.import_module(module_name), class_name)


CHECKPOINT_KEYS = ("state_dict", "epoch", "pytorch-lightning_version")
"""Keys every Lightning checkpoint has; :func:`read_checkpoint` refuses a torch file without them."""


def read_checkpoint(path: str | Path) -> dict:
    """The contents of a checkpoint file (on the CPU), or a :class:`DataError` naming the file and
    the fix when it is missing, truncated, damaged or not a checkpoint written by ``varinf fit``."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a damaged file fails anywhere in the unpickler, with any exception type
        reason = ": ".join([type(error).__name__, *str(error).splitlines()[:1]])
        raise DataError(f"The checkpoint {path} cannot be read ({reason}): it is missing, truncated or not a checkpoint. {_other_checkpoints(path)}".rstrip()) from None
    missing = [key for key in CHECKPOINT_KEYS if not isinstance(checkpoint, dict) or key not in checkpoint]
    if missing:
        raise DataError(
            f"{path} is a torch file but not a checkpoint written by `varinf fit` (it has no {', '.join(missing)}): "
            f"pass a run's runs/<name>/version_N/checkpoints/last.ckpt. {_other_checkpoints(path)}".rstrip()
        )
    return checkpoint


def _other_checkpoints(path: str | Path) -> str:
    """A sentence naming the other checkpoints beside ``path`` (for an error about it), or ""."""
    others = sorted(str(other) for other in Path(path).parent.glob("*.ckpt") if other != Path(path))
    return f"Other checkpoints of this run: {', '.join(others)} (use one with --ckpt_path or --ckpt)." if others else ""


IMPORT_PATHS_KEY = "varinf_import_paths"
"""Checkpoint key of the recipe folders whose Python files the fitted classes came from."""


def default_device() -> torch.device:
    """Where ``varinf evaluate`` and ``varinf sample`` run: the GPU if there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_module(checkpoint_path: str, map_location: str | torch.device = "cpu") -> pl.LightningModule:
    """Rebuild the LightningModule stored in a checkpoint written by ``varinf fit`` (classes from
    files beside the recipe, such as a user's guide, are imported from the recipe's folder)."""
    checkpoint = read_checkpoint(checkpoint_path)
    for folder in checkpoint.get(IMPORT_PATHS_KEY, []):
        if folder not in sys.path:
            sys.path.append(folder)
    module_class = import_class(checkpoint.get("hyper_parameters", {}).get("_class_path", "varinf.VAEModule"))
    return module_class.load_from_checkpoint(checkpoint_path, map_location=map_location, weights_only=True)
