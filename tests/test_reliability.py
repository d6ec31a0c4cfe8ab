"""Faults: NaNs stop training before a bad checkpoint, killed fits resume exactly, runs repeat."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO
from pytorch_lightning import Callback

from varinf import ALIModule, ConfigError, DataError, MNISTDataModule, NumericalError, load_module, modules
from varinf.callbacks import AtomicCheckpointIO
from varinf.cli import fit, main
from varinf.evaluation import datamodule_from_checkpoint

BUDGET = ["--trainer.limit_val_batches=2", "--trainer.limit_test_batches=1", "--trainer.enable_progress_bar=false"]
RECIPES = {  # recipe: extra settings for a short fit
    "vae_mnist": ["--trainer.max_epochs=3", "--trainer.limit_train_batches=60"],
    "gan_mnist": ["--trainer.max_epochs=3", "--trainer.limit_train_batches=60"],
    "gan_sn_mnist": ["--trainer.max_epochs=3", "--trainer.limit_train_batches=60"],  # with an EMA of the weights
}


def fit_command(recipe: str, save_dir: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-c", "from varinf.cli import main; main()", "fit", "--config", str(REPO / "recipes" / f"{recipe}.yaml"),
        *RECIPES[recipe], *BUDGET, f"--trainer.logger.init_args.save_dir={save_dir}", *extra,
    ]


def final_state(save_dir: Path, recipe: str) -> dict[str, torch.Tensor]:
    (checkpoint,) = save_dir.glob(f"{recipe}/version_*/checkpoints/last.ckpt")
    return torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]


def metric_rows(save_dir: Path, recipe: str) -> list[dict[str, float]]:
    """The rows of a run's metrics.csv, each with the values it has."""
    (path,) = save_dir.glob(f"{recipe}/version_*/metrics.csv")
    with path.open(newline="") as file:
        return [{key: float(value) for key, value in row.items() if value} for row in csv.DictReader(file)]


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_a_fit_killed_mid_epoch_resumes_to_the_same_result(tmp_path, recipe):
    """SIGKILL during the second epoch, then --resume: the final weights equal those of an
    uninterrupted fit with the same seed (data order, binarisation and noise included)."""
    subprocess.run(fit_command(recipe, tmp_path / "whole"), check=True, capture_output=True)
    killed = subprocess.Popen(fit_command(recipe, tmp_path / "killed"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first_checkpoint = tmp_path / "killed" / recipe / "version_0" / "checkpoints" / "last.ckpt"  # written atomically
    while not first_checkpoint.exists():
        assert killed.poll() is None, "the fit ended before it could be killed"
        time.sleep(0.05)
    time.sleep(0.3)  # into the second epoch
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    resumed = subprocess.run(fit_command(recipe, tmp_path / "killed", "--resume"), capture_output=True, text=True, check=False)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    whole, again = final_state(tmp_path / "whole", recipe), final_state(tmp_path / "killed", recipe)
    assert whole.keys() == again.keys()
    for name in whole:
        torch.testing.assert_close(again[name], whole[name], rtol=1e-5, atol=1e-6, msg=name)
    # the metrics log goes on from the checkpoint: the same rows as the uninterrupted fit's, none lost or repeated
    logged, logged_again = metric_rows(tmp_path / "whole", recipe), metric_rows(tmp_path / "killed", recipe)
    assert [row.keys() for row in logged_again] == [row.keys() for row in logged] and len(logged) > 3
    for row, row_again in zip(logged, logged_again):
        assert row_again == pytest.approx(row, rel=1e-5, abs=1e-6)


def test_resume_without_a_run_names_the_folder(tmp_path):
    result = subprocess.run(fit_command("vae_mnist", tmp_path, "--resume"), capture_output=True, text=True, check=False)
    assert result.returncode != 0 and "no run to resume" in result.stderr and str(tmp_path) in result.stderr
    assert "Traceback" not in result.stderr


class PoisonAt(Callback):
    """Makes a parameter (or only its gradient) NaN at one training step."""

    def __init__(self, step: int, gradient_only: bool = False):
        self.step, self.gradient_only = step, gradient_only

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            parameter = next(pl_module.model.decoder.parameters())
            if self.gradient_only:
                parameter.register_hook(lambda grad: grad * float("nan"))
            else:
                with torch.no_grad():
                    parameter.fill_(float("nan"))


@pytest.mark.parametrize(
    "step, gradient_only, expected",
    [
        (7, False, "the training loss at step 7 (first bad: reconstruction (site 'x'))"),
        # a NaN gradient at step 7 makes the parameter NaN in that step's update, and the loss of step 8
        (7, True, "the training loss at step 8 (first bad: reconstruction (site 'x'))"),
        # at the epoch's last step no loss sees it: the parameter check before the checkpoint does
        (9, True, "the parameters model.decoder"),
    ],
)
def test_a_nan_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, step, gradient_only, expected):
    poison = json.dumps([{"class_path": "test_reliability.PoisonAt", "init_args": {"step": step, "gradient_only": gradient_only}}])
    with pytest.raises(NumericalError) as error:  # steps 5 to 9 are the second epoch, after one checkpoint
        fit(["fit", "--config", str(REPO / "recipes" / "vae_mnist.yaml"), "--trainer.max_epochs=3", "--trainer.limit_train_batches=5",
             *BUDGET, f"--trainer.logger.init_args.save_dir={tmp_path}", f"--trainer.callbacks={poison}"])
    message = str(error.value)
    assert expected in message and "model.decoder" in message  # the bad term and step, and the bad parameter
    assert "last.ckpt" in message and "--resume" in message
    checkpoint = tmp_path / "vae_mnist" / "version_0" / "checkpoints" / "last.ckpt"
    stored = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert stored["global_step"] == 5 and all(torch.isfinite(value).all() for value in stored["state_dict"].values())
    load_module(str(checkpoint))  # whole and loadable


STEPS_STARTED: list[int] = []


class RecordSteps(Callback):
    """Appends each training step's number to ``STEPS_STARTED``."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        STEPS_STARTED.append(trainer.global_step)


@pytest.mark.parametrize("log_every_n_steps", [1000, 0])  # longer than the epoch; 0: no step logging
def test_a_nan_stops_training_within_max_unchecked_steps_whatever_the_logging_interval(tmp_path, monkeypatch, log_every_n_steps):
    """With a logging interval longer than the epoch, or none, a NaN at step 2 still stops the fit
    once MAX_UNCHECKED_STEPS (here 4) losses wait unchecked, not at the epoch's end. No checkpoint
    exists yet, so the message says to fit again, not to resume."""
    monkeypatch.setattr(modules, "MAX_UNCHECKED_STEPS", 4)
    STEPS_STARTED.clear()
    callbacks = json.dumps([{"class_path": "test_reliability.PoisonAt", "init_args": {"step": 2}}, {"class_path": "test_reliability.RecordSteps"}])
    with pytest.raises(NumericalError, match="the training loss at step 2") as error:
        fit(["fit", "--config", str(REPO / "recipes" / "vae_mnist.yaml"), "--trainer.max_epochs=1", "--trainer.limit_train_batches=40",
             f"--trainer.log_every_n_steps={log_every_n_steps}", *BUDGET, f"--trainer.logger.init_args.save_dir={tmp_path}",
             f"--trainer.callbacks={callbacks}"])
    assert STEPS_STARTED == [0, 1, 2, 3]
    assert "before its first checkpoint; fit again" in str(error.value) and "--resume" not in str(error.value)


def test_a_nan_in_a_gan_names_each_phase_loss_at_its_first_bad_step(tmp_path):
    """Each optimiser step counts: the generator poisoned at step 6 spoils the discriminator's loss of
    that batch (step 6) and then the generator's own (step 7)."""
    poison = json.dumps([{"class_path": "test_reliability.PoisonAt", "init_args": {"step": 6}}])
    with pytest.raises(NumericalError) as error:
        fit(["fit", "--config", str(REPO / "recipes" / "gan_mnist.yaml"), "--trainer.max_epochs=2", "--trainer.limit_train_batches=5",
             *BUDGET, f"--trainer.logger.init_args.save_dir={tmp_path}", f"--trainer.callbacks={poison}"])
    assert "the discriminator loss at step 6; the generator loss at step 7; the parameters model.decoder" in str(error.value)


def test_the_same_recipe_and_seed_give_identical_results(tmp_path):
    results = []
    for run in ("first", "second"):
        cli = fit(["fit", "--config", str(REPO / "recipes" / "vae_mnist.yaml"), "--trainer.max_epochs=2", "--trainer.limit_train_batches=5",
                   *BUDGET, f"--trainer.logger.init_args.save_dir={tmp_path / run}"])
        results.append((float(cli.trainer.callback_metrics["test/negative_elbo"]), cli.model.state_dict()))
    assert results[0][0] == results[1][0]
    assert all(torch.equal(results[0][1][name], results[1][1][name]) for name in results[0][1])


def test_a_checkpoint_write_cut_short_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    checkpoint_io, target = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    checkpoint_io.save_checkpoint({"global_step": 1}, target)

    def dying_save(obj, file):  # the process dies halfway through writing
        file.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        checkpoint_io.save_checkpoint({"global_step": 2}, target)
    monkeypatch.undo()
    assert torch.load(target, weights_only=True) == {"global_step": 1}
    assert [path.name for path in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary file left behind


@pytest.mark.parametrize(
    "recipe, override, message",
    [
        ("vae_mnist", "--model.init_args.optimizer.init_args.lr=0", "optimizer: the learning rate must be > 0, got lr=0"),
        ("vae_mnist", "--model.init_args.optimizer.init_args.lr=-0.001", "optimizer: Invalid learning rate: -0.001"),
        ("gan_mnist", "--model.init_args.n_critic=0", "n_critic must be at least 1, got 0"),
        ("vae_mnist", "--model.init_args.latent_dim=0", "latent_dim >= 1"),
        ("vae_mnist", "--data.init_args.binarize=none", "BernoulliLikelihood needs binary data"),
        ("vae_mnist", "--model.init_args.guide.class_path=varinf.NoSuchGuide", "NoSuchGuide"),
        ("aae_mnist", "--model.init_args.guide.class_path=varinf.FlowGuide", None),  # has what the AAE needs: fits
        ("vae_mnist", "--model.init_args.guide.class_path=varinf.DeltaEncoderGuide", "needs a guide with density"),
        ("vae_mnist", "--trainer.max_epochs=-5", "`max_epochs` must be a non-negative integer or -1"),
        ("vae_mnist", "--model.init_args.beta=.nan", "a finite beta > 0, a finite kl_warmup_epochs >= 0"),
        ("vae_mnist", "--model.init_args.kl_warmup_epochs=.inf", "a finite beta > 0, a finite kl_warmup_epochs >= 0"),
        ("vae_mnist", "--model.init_args.guide.init_args.scale_floor=-0.5", "scale_floor must be a finite number >= 0, got -0.5"),
        ("ali_mnist", "--model.init_args.loss=minimax", "would play the same game as `loss: non_saturating`"),
        ("vae_mnist", "--model.init_args.data_shape=[0, 28, 28]", "data_shape must be a positive int or a non-empty sequence of them, such as [1, 28, 28]; got [0, 28, 28]"),
        ("dcgan_mnist", "--data=varinf.RingDataModule", "RingDataModule serves datapoints of shape (2,), but GANModule was built for (1, 28, 28)"),
    ],
)
def test_impossible_recipe_values_are_refused_before_training(tmp_path, capsys, recipe, override, message):
    arguments = ["fit", "--config", str(REPO / "recipes" / f"{recipe}.yaml"), "--trainer.fast_dev_run=true", *BUDGET,
                 f"--trainer.logger.init_args.save_dir={tmp_path}", override]
    if message is None:
        main(arguments)
        return
    with pytest.raises(SystemExit) as error:
        main(arguments)
    output = (str(error.value.code) if not isinstance(error.value.code, int) else "") + capsys.readouterr().err
    assert message in output and "Traceback" not in output
    assert not list(tmp_path.glob("**/*.ckpt"))  # refused before any training


def test_data_outside_the_declared_range_is_refused_naming_the_split():
    from varinf import MNISTDataModule

    class ScaledMNIST(MNISTDataModule):
        def load_splits(self):
            return {name: (images * 255, labels) for name, (images, labels) in super().load_splits().items()}

    with pytest.raises(DataError, match=r"train split of ScaledMNIST has values in \[0, 255\], outside \[0.0, 1.0\]"):
        ScaledMNIST(binarize="none").setup("fit")


def test_a_damaged_checkpoint_is_named_with_the_other_checkpoints_of_its_run(tmp_path, capsys):
    arguments = ["fit", "--config", str(REPO / "recipes" / "vae_mnist.yaml"), "--trainer.max_epochs=1", "--trainer.limit_train_batches=2",
                 *BUDGET, f"--trainer.logger.init_args.save_dir={tmp_path}"]
    main(arguments)
    last = tmp_path / "vae_mnist" / "version_0" / "checkpoints" / "last.ckpt"
    intact = last.read_bytes()
    not_a_checkpoint = tmp_path / "weights.pt"
    torch.save({"weights": torch.zeros(3)}, not_a_checkpoint)
    damages = {  # what replaces last.ckpt: the message that names it
        "truncated": (intact[:1000], "cannot be read"),
        "empty": (b"", "cannot be read"),
        "text": (b"epoch 3, loss 91.2\n", "cannot be read"),
        "another torch file": (not_a_checkpoint.read_bytes(), "is a torch file but not a checkpoint written by `varinf fit` (it has no state_dict, epoch"),
    }
    for damaged, message in damages.values():
        last.write_bytes(damaged)
        for command in (arguments + ["--resume"], ["evaluate", "--ckpt", str(last), "--metrics", "nll", "--k", "2"]):
            with pytest.raises(SystemExit) as error:
                main(command)
            assert f"{last} {message}" in str(error.value.code) and "best.ckpt" in str(error.value.code)


def test_a_data_folder_for_data_that_reads_no_files_is_refused(tmp_path):
    main(["fit", "--config", str(REPO / "recipes" / "gan_ring.yaml"), "--trainer.max_epochs=1", "--trainer.limit_train_batches=2", *BUDGET,
          f"--trainer.logger.init_args.save_dir={tmp_path}"])
    (last,) = tmp_path.glob("gan_ring/version_0/checkpoints/last.ckpt")
    with pytest.raises(SystemExit) as error:
        main(["evaluate", "--ckpt", str(last), "--data_dir", str(tmp_path), "--metrics", "parzen"])
    assert "--data_dir does not apply to this checkpoint's data, RingDataModule, which takes no data_dir: drop --data_dir." in str(error.value.code)


class MNISTWithKwargs(MNISTDataModule):
    """A user's datamodule that hands its other arguments, data_dir among them, to MNIST's."""

    def __init__(self, crop: int = 0, **kwargs):
        super().__init__(**kwargs)


def test_a_data_folder_reaches_data_that_takes_it_through_keyword_arguments(tmp_path):
    checkpoint = tmp_path / "last.ckpt"
    torch.save({"state_dict": {}, "epoch": 0, "pytorch-lightning_version": "2.6.6",
                "datamodule_hyper_parameters": {"_class_path": "test_reliability.MNISTWithKwargs", "binarize": "none"}}, checkpoint)
    assert datamodule_from_checkpoint(checkpoint, str(tmp_path)).data_dir == str(tmp_path)


def test_ali_with_loss_minimax_loads_but_refuses_to_fit():
    module = ALIModule(loss="minimax")  # as a checkpoint of it is rebuilt for evaluation or sampling
    module.setup("test")
    with pytest.raises(ConfigError, match="would play the same game as `loss: non_saturating`"):
        module.setup("fit")


@pytest.mark.parametrize("bad", [0, -3, [], [1, 0, 28], [1.5, 28], "28x28"])
def test_a_data_shape_that_is_not_positive_sizes_is_refused_by_name(bad):
    from varinf import VAEModule

    with pytest.raises(ConfigError, match=r"data_shape must be a positive int or a non-empty sequence of them"):
        VAEModule(data_shape=bad, latent_dim=2)


def test_an_int_data_shape_means_one_dimension_on_the_module_and_on_the_data(tmp_path):
    import pytorch_lightning as pl

    from varinf import GANModule, RingDataModule

    class FlatRing(RingDataModule):
        data_shape = 2  # a user's data module may give the size of flat datapoints as an int

    module = GANModule(data_shape=2, latent_dim=2)
    assert module.model.data_shape == (2,) and module.generate(module.sample_latents(3)).shape == (3, 2)
    before = [parameter.detach().clone() for parameter in module.model.parameters()]
    trainer = pl.Trainer(accelerator="cpu", max_steps=2, limit_val_batches=0, logger=False, default_root_dir=tmp_path,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, FlatRing(sizes=(64, 8, 8), batch_size=32))
    assert trainer.state.finished and any(not torch.equal(old, new) for old, new in zip(before, module.model.parameters()))
    with pytest.raises(ConfigError, match=r"FlatRing serves datapoints of shape \(2,\), but GANModule was built for \(3,\)"):
        pl.Trainer(accelerator="cpu", max_steps=1, logger=False, default_root_dir=tmp_path, enable_progress_bar=False,
                   enable_model_summary=False).fit(GANModule(data_shape=[3], latent_dim=2), FlatRing(sizes=(64, 8, 8)))
