"""VAEModule, checkpoints and the command line, on the CPU with small budgets."""

import csv
import json
import math
import os
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, ReseedEachBatch, last_logged

from varinf import MLP, ConfigError, GaussianEncoderGuide, GaussianLikelihood, LatentVariableModel, VAEModule, load_module
from varinf.callbacks import ImageGrids, save_samples
from varinf.cli import fit, main

RECIPE = REPO / "recipes" / "vae_mnist.yaml"
SMALL = [
    "--trainer.max_epochs=2",
    "--trainer.limit_train_batches=3",  # 3 x 128 = 384 training images
    "--trainer.limit_val_batches=1",
    "--trainer.limit_test_batches=1",
    "--trainer.enable_progress_bar=false",
]


def small_vae(seed=0):
    torch.manual_seed(seed)
    network = lambda i, o: MLP(i, o, hidden=(32,))  # noqa: E731
    return VAEModule(
        latent_dim=4,
        model=lambda shape, dim: LatentVariableModel(shape, dim, decoder=network),
        guide=lambda shape, dim: GaussianEncoderGuide(shape, dim, encoder=network),
    )


def test_two_vaes_in_one_process_share_no_parameters():
    first, second = small_vae(0), small_vae(1)
    assert not {id(p) for p in first.parameters()} & {id(p) for p in second.parameters()}
    before = [p.detach().clone() for p in second.parameters()]
    optimizer = first.configure_optimizers()
    x = torch.bernoulli(torch.full((16, 1, 28, 28), 0.2))
    for _ in range(3):
        optimizer.zero_grad()
        first.objective(x).backward()
        optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(before, second.parameters()))
    assert all(p.grad is None for p in second.parameters())


def test_kl_warmup_ramps_linearly_to_beta():
    module = VAEModule(beta=2.0, kl_warmup_epochs=2)

    class Trainer:
        num_training_batches = 10

    module._trainer = Trainer()
    weights = []
    for step in (0, 9, 19, 50):
        module.__dict__["_global_step"] = step
        type(module).global_step = property(lambda self: self.__dict__["_global_step"])
        weights.append(module.kl_weight())
    del type(module).global_step
    assert weights == pytest.approx([2.0 * 1 / 20, 2.0 * 10 / 20, 2.0, 2.0])


@pytest.mark.parametrize("grad_clip", [None, 0.5])
def test_vae_steps_equal_a_hand_written_adam_loop(grad_clip):
    """Three batches of VAEModule training through a Trainer against zero_grad, backward, clip
    (torch's clip_grad_norm_), Adam step on a copy of the module, with the same draws."""
    import copy

    import pytorch_lightning as pl
    from torch.utils.data import DataLoader, TensorDataset

    module = small_vae()
    module.grad_clip = grad_clip
    reference = copy.deepcopy(module)
    data = torch.bernoulli(torch.full((48, 1, 28, 28), 0.3))
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[ReseedEachBatch()])
    module.configure_callbacks = list
    trainer.fit(module, train_dataloaders=DataLoader(TensorDataset(data, torch.zeros(48)), batch_size=16))

    optimizer = reference.configure_optimizers()
    for batch_idx, x in enumerate(data.split(16)):
        torch.manual_seed(batch_idx)
        loss = reference.objective(x)
        optimizer.zero_grad()
        loss.backward()
        if grad_clip is not None:
            norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), grad_clip)
            assert norm > grad_clip  # the clip is active
        optimizer.step()
    assert trainer.global_step == 3
    for (name, parameter), expected in zip(module.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(parameter, expected, rtol=1e-5, atol=1e-6, msg=name)


class NormRecordingAdam(torch.optim.Adam):
    """Adam that records the gradient norm its update receives."""

    def __init__(self, params, **kwargs):
        super().__init__(params, **kwargs)
        self.norms = []

    def step(self, closure=None):
        if closure is not None:  # Lightning's closure runs the hooks, clipping among them
            closure()
        self.norms.append(torch.linalg.vector_norm(torch.stack([p.grad.norm() for group in self.param_groups for p in group["params"]])).item())
        return super().step()


@pytest.mark.parametrize("fused", [False, True])
def test_grad_clip_bounds_the_true_gradient_norm_under_a_gradient_scaler(fused):
    """Under 16-mixed (a GPU's, with its GradScaler; forced here on the CPU) the gradients are
    multiplied by the loss scale until the scaler unscales them inside ``optimizer.step()``; the
    clip must act after that, on the true norm, or training silently crawls at max_norm / scale.
    A fused Adam unscales only inside its own step, so clipping it is refused with the fix."""
    import pytorch_lightning as pl
    from pytorch_lightning.plugins.precision import MixedPrecision
    from torch.utils.data import DataLoader, TensorDataset

    module = small_vae()
    module.grad_clip, module.optimizer_factory = 0.01, lambda params: NormRecordingAdam(params, lr=1e-3, fused=fused)
    module.configure_callbacks = list
    precision = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=16.0))
    trainer = pl.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, plugins=[precision])
    data = DataLoader(TensorDataset(torch.bernoulli(torch.full((48, 1, 28, 28), 0.3)), torch.zeros(48)), batch_size=16)
    if fused:
        with pytest.raises(ConfigError, match="fused: false"):
            trainer.fit(module, train_dataloaders=data)
        return
    trainer.fit(module, train_dataloaders=data)
    assert trainer.precision_plugin.scaler.get_scale() >= 16.0  # every step was taken, none skipped for an overflow
    assert trainer.optimizers[0].norms == pytest.approx([0.01] * 3, rel=1e-3)


def test_lightning_gradient_clipping_is_refused_naming_the_module_setting(tmp_path):
    with pytest.raises(SystemExit) as error:
        main(["fit", "--config", str(RECIPE), *SMALL, f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}", "--trainer.gradient_clip_val=1.0"])
    assert "gradient_clip_val=1.0 does not apply" in str(error.value.code) and "--model.init_args.grad_clip=1.0" in str(error.value.code)
    with pytest.raises(ConfigError, match="grad_clip must be a positive"):
        VAEModule(grad_clip=0)


def test_the_nvml_cuda_check_is_skipped_only_where_nvml_cannot_load(monkeypatch):
    import ctypes

    from varinf.modules import skip_a_failing_nvml_check

    try:
        ctypes.CDLL("libnvidia-ml.so.1")
        loadable = True
    except OSError:
        loadable = False
    answer = torch.cuda.is_available()
    monkeypatch.setenv("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    skip_a_failing_nvml_check()
    assert (os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] == "1") == loadable
    assert torch.cuda.is_available() == answer
    monkeypatch.setenv("PYTORCH_NVML_BASED_CUDA_CHECK", "0")  # a user's choice is left alone
    skip_a_failing_nvml_check()
    assert os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] == "0"


def test_invalid_module_settings_are_rejected():
    with pytest.raises(ValueError, match="beta > 0"):
        VAEModule(beta=0)


def run_fit(tmp_path: Path, *extra: str):
    return fit(["fit", "--config", str(RECIPE), *SMALL, f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}", *extra])


def test_the_final_sample_grid_is_drawn_in_evaluation_mode(tmp_path):
    """Lightning returns the module to training mode before ``on_fit_end``; the final grids (which
    the benchmarks publish) must be drawn as the checkpoint is evaluated: without dropout."""
    import pytorch_lightning as pl

    from varinf import RingDataModule

    torch.manual_seed(0)
    module = VAEModule(data_shape=(2,), latent_dim=2, model=lambda shape, dim: LatentVariableModel(
        shape, dim, decoder=lambda i, o: MLP(i, o, hidden=(8,), dropout=0.5), likelihood=GaussianLikelihood))
    modes, generate = [], module.generate
    module.generate = lambda z: (modes.append(module.training), generate(z))[1]
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=RingDataModule(sizes=(64, 64, 64), batch_size=32))
    assert modes == [False, False]  # the grid after the validation epoch, then the final one
    assert module.training and (tmp_path / "images" / "samples.png").is_file()


def test_recipe_smoke_fit_writes_metrics_grids_and_checkpoints(tmp_path):
    cli = run_fit(tmp_path, "--trainer.log_every_n_steps=2")
    run = Path(cli.trainer.log_dir)
    assert (run / "checkpoints" / "best.ckpt").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    for image in ("samples.png", "reconstructions.png", "samples_epoch_000.png", "samples_epoch_001.png"):
        assert (run / "images" / image).stat().st_size > 1000
    logged = last_logged(run)
    for name in ("train/negative_elbo", "train/kl", "train/reconstruction", "train/loss_step",
                 "val/negative_elbo", "val/reconstruction", "val/kl", "val/active_units", "test/negative_elbo"):
        assert math.isfinite(logged[name]), name
    assert logged["test/negative_elbo"] == pytest.approx(logged["test/reconstruction"] + logged["test/kl"], rel=1e-5)
    assert 0 <= logged["val/active_units"] <= 50
    assert logged["val/negative_elbo"] < 784 * math.log(2)  # better than a coin-flip model


def test_last_checkpoint_is_the_latest_epoch_when_the_monitored_metric_stops_improving(tmp_path, monkeypatch):
    """Lightning's save_last refreshes last.ckpt only with a new best; resuming must not lose epochs."""
    monkeypatch.setattr(VAEModule, "checkpoint_monitor", "epoch")  # lower is better: epoch 0 stays the best
    cli = run_fit(tmp_path, "--trainer.max_epochs=3")
    folder = Path(cli.trainer.log_dir) / "checkpoints"
    assert sorted(path.name for path in folder.iterdir()) == ["best.ckpt", "last.ckpt"]
    epochs = {name: torch.load(folder / name, map_location="cpu", weights_only=False)["epoch"] for name in ("best.ckpt", "last.ckpt")}
    assert epochs == {"best.ckpt": 0, "last.ckpt": 2}


def test_checkpoint_round_trip_gives_identical_elbo_and_samples(tmp_path):
    cli = run_fit(tmp_path)
    trained = cli.model.eval()
    reloaded = load_module(str(Path(cli.trainer.log_dir) / "checkpoints" / "last.ckpt")).eval()
    assert type(reloaded) is VAEModule
    x = next(iter(cli.datamodule.val_dataloader()))[0][:100]
    results = []
    for module in (trained, reloaded):
        torch.manual_seed(7)
        with torch.no_grad():
            results.append((module.objective(x), module.generate(module.sample_latents(16))))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_evaluate_and_sample_commands(tmp_path, capsys):
    cli = run_fit(tmp_path)
    checkpoint = Path(cli.trainer.log_dir) / "checkpoints" / "best.ckpt"
    main(["evaluate", "--ckpt", str(checkpoint), "--k", "20", "--metrics", "nll", "parzen", "modes", "fid", "--num_samples", "500"])
    rows = {row["metric"]: row for row in map(json.loads, (checkpoint.parent.parent / "evaluation.jsonl").read_text().splitlines())}
    nll = rows["nll"]
    assert nll["num_test_points"] == 10_000 and "dynamic binarisation" in nll["binarization"]
    assert "IWAE" in nll["estimator"] and nll["units"] == "nats per datapoint" and nll["k"] == 20
    assert nll["nll"] < nll["negative_elbo"]  # more samples, tighter bound
    assert any(rows["parzen"]["sigma"] == pytest.approx(sigma) for sigma in torch.logspace(-1, 0, 10).tolist())
    assert sum(rows["modes"]["histogram"]) == pytest.approx(1, abs=1e-3) and rows["fid"]["fid"] > 0
    assert all(row["num_samples"] == 500 and row["checkpoint"] == str(checkpoint) for row in rows.values())
    main(["sample", "--ckpt", str(checkpoint), "--n", "16", "--out", str(tmp_path / "grid.png")])
    assert (tmp_path / "grid.png").stat().st_size > 500


def test_independent_elbo_implementation_agrees_with_varinf(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("independent_elbo", REPO / "benchmarks" / "independent_elbo.py")
    independent = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(independent)
    cli = run_fit(tmp_path, "--model.init_args.guide.init_args.encoder.init_args.activation=tanh",
                  "--model.init_args.model.init_args.decoder.init_args.dropout=0.2")
    module = cli.model.eval()
    recipe = torch.load(Path(cli.trainer.log_dir) / "checkpoints" / "last.ckpt", weights_only=True)["hyper_parameters"]
    settings = independent.recomputable_settings(recipe)
    assert settings == {"encoder": "tanh", "decoder": "relu", "scale_floor": 1e-3}
    x = cli.datamodule.splits["test"][0][:2000]
    with torch.no_grad():
        ours = module.objective.terms(x).negative_elbo.item()
        theirs = independent.independent_negative_elbo(module.state_dict(), x, **settings).mean().item()
    assert ours == pytest.approx(theirs, abs=0.5)
    recipe["model"]["init_args"]["prior"] = {"class_path": "varinf.NormalPrior", "init_args": {"scale": 5.0}}
    with pytest.raises(SystemExit, match="prior"):
        independent.recomputable_settings(recipe)


@pytest.mark.parametrize(
    "override, named",
    [
        ("--model.init_args.latnt_dim=3", "latnt_dim"),
        ("--model.init_args.latent_dim=three", "latent_dim"),
        ("--data.init_args.binarize=sometimes", "binarize"),
        ("--model.init_args.guide.init_args.encoder.init_args.hiden=[3]", "hiden"),
    ],
)
def test_unknown_keys_and_wrong_types_are_rejected_naming_the_key(tmp_path, capsys, override, named):
    with pytest.raises(SystemExit) as error:
        run_fit(tmp_path, override)
    assert error.value.code != 0
    assert named in capsys.readouterr().err


def test_recipe_is_short_and_names_its_parts():
    recipe = yaml.safe_load(RECIPE.read_text())
    assert recipe["model"]["class_path"] == "varinf.VAEModule"
    assert recipe["data"]["class_path"] == "varinf.MNISTDataModule"


def test_missing_data_exits_with_the_fix(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VARINF_DATA_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(SystemExit) as error:
        main(["fit", "--config", str(RECIPE), *SMALL, f"--trainer.logger.init_args.save_dir={tmp_path}"])
    assert "is missing" in str(error.value.code) and "Fix:" in str(error.value.code)


def test_active_units_counts_dimensions_whose_posterior_mean_varies():
    from varinf import ActiveUnits

    metric = ActiveUnits(latent_dim=3)
    generator = torch.Generator().manual_seed(0)
    means = torch.randn(1000, 3, generator=generator) * torch.tensor([1.0, 0.05, 0.2])
    for chunk in means.split(300):
        metric.update(chunk)
    expected = (means.var(0, unbiased=False) > 0.01).sum()
    assert metric.compute().item() == expected.item() == 2


def test_epoch_means_are_batch_weighted_means_of_each_name_whenever_it_was_updated():
    from varinf.metrics import EpochMeans

    metric = EpochMeans()
    generator = torch.Generator().manual_seed(0)
    batches = [(int(size), torch.randn(3, generator=generator)) for size in torch.randint(1, 50, (20,), generator=generator)]
    for first in range(0, 20, 6):  # added in chunks of batches, as a module adds its records
        chunk = [(step, *batches[step]) for step in range(first, min(first + 6, 20))]
        for with_generator in (False, True):  # a generator step (G/loss too) every third batch
            rows = [(size, values) for step, size, values in chunk if (step % 3 == 0) == with_generator]
            names = ("D/loss", "js", "G/loss") if with_generator else ("D/loss", "js")
            if rows:
                sizes, values = zip(*rows)
                metric.update(names, torch.stack(values)[:, : len(names)], torch.tensor(sizes))
    means = metric.compute()

    def weighted(index, steps):
        sizes = torch.tensor([batches[s][0] for s in steps], dtype=torch.float64)
        values = torch.stack([batches[s][1][index] for s in steps]).double()
        return float((sizes * values).sum() / sizes.sum())

    every, third = range(20), range(0, 20, 3)
    assert float(means["D/loss"]) == pytest.approx(weighted(0, every), rel=1e-6)
    assert float(means["js"]) == pytest.approx(weighted(1, every), rel=1e-6)
    assert float(means["G/loss"]) == pytest.approx(weighted(2, third), rel=1e-6)


def test_logged_epoch_means_are_batch_weighted_means_of_every_step():
    """The step values a VAEModule records, added to its epoch means in chunks (every
    ``log_every_n_steps`` batches and at the epoch's end), log as their batch-weighted means."""
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader, TensorDataset

    module = small_vae()
    seen = {"train": [], "val": []}
    terms = module.objective.terms

    def recorded_terms(x):
        result = terms(x)
        seen["train" if module.training else "val"].append((x.shape[0], result.loss.detach(), result.kl))
        return result

    module.objective.terms = recorded_terms
    data = torch.bernoulli(torch.full((70, 1, 28, 28), 0.3))
    loader = DataLoader(TensorDataset(data, torch.zeros(70)), batch_size=16)  # 4 batches of 16 and one of 6
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, log_every_n_steps=2, num_sanity_val_steps=0)
    module.configure_callbacks = list
    trainer.fit(module, train_dataloaders=loader, val_dataloaders=loader)
    for stage, steps in seen.items():
        assert len(steps) == 5
        sizes = torch.tensor([size for size, _, _ in steps], dtype=torch.float64)
        for name, index in (("loss", 1), ("kl", 2)):
            values = torch.stack([step[index] for step in steps]).double()
            expected = float((sizes * values).sum() / sizes.sum())
            assert float(trainer.callback_metrics[f"{stage}/{name}"]) == pytest.approx(expected, rel=1e-6), (stage, name)


@pytest.mark.parametrize("recipe", ["gan_mnist", "gan_sn_mnist", "wgan_gp_mnist", "dcgan_mnist", "aae_mnist", "aae_paper_mnist", "ali_mnist", "gan_ring", "wgan_gp_ring"])
def test_every_adversarial_recipe_fits_from_the_cli_and_logs_its_divergences(tmp_path, recipe):
    batches = 10
    cli = fit([
        "fit", "--config", str(REPO / "recipes" / f"{recipe}.yaml"), "--trainer.max_epochs=1",
        f"--trainer.limit_train_batches={batches}", "--trainer.limit_val_batches=1", "--trainer.limit_test_batches=1",
        "--trainer.enable_progress_bar=false", "--trainer.log_every_n_steps=5", f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
    ])
    module, run = cli.model, Path(cli.trainer.log_dir)
    assert module.generator_steps == batches // module.n_critic
    steps = {  # optimiser steps taken, from each optimiser's own state
        name: max(int(state["step"]) for state in optimizer.state.values())
        for name, optimizer in zip(module.optimizer_factories, cli.trainer.optimizers)
    }
    generator = "encoder" if recipe.startswith("aae") else "generator"
    assert steps["discriminator"] == batches == module.n_critic * steps[generator]
    assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "images" / "samples.png").stat().st_size > 1000
    with (run / "metrics.csv").open() as file:
        columns = set(next(csv.reader(file)))
    expected = {"w1"} if module.loss.readout == "critic" else {"kl_data_model", "kl_model_data", "js"}
    for stage in ("train", "val"):
        assert {f"{stage}/divergence/{name}" for name in expected} <= columns
        assert f"{stage}/D/loss" in columns
    assert "train/D/loss_step" in columns  # training metrics are also logged per step
    assert type(load_module(str(run / "checkpoints" / "last.ckpt"))) is type(module)


def test_weight_averaging_keeps_the_average_in_the_checkpoint_and_tests_it(tmp_path, recwarn):
    """gan_sn_mnist keeps an EMA of its weights: the checkpoint's state_dict is the average (what
    load_module, evaluate and sample read), its current_model_state the weights that trained, and
    the test after fitting sees the average too, without Lightning's warning that the callback is missing."""
    cli = fit([
        "fit", "--config", str(REPO / "recipes" / "gan_sn_mnist.yaml"), "--trainer.max_epochs=1", "--trainer.limit_train_batches=10",
        "--trainer.limit_val_batches=1", "--trainer.limit_test_batches=1", "--trainer.enable_progress_bar=false",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
    ])
    assert not [str(warning.message) for warning in recwarn if "callbacks used to create the checkpoint" in str(warning.message)]
    path = Path(cli.trainer.log_dir) / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    averaged, trained = checkpoint["state_dict"], checkpoint["current_model_state"]
    assert any(not torch.equal(averaged[name], trained[name]) for name in averaged if name.startswith("model.decoder"))
    for source in (cli.model, load_module(str(path))):
        for name, value in source.state_dict().items():
            torch.testing.assert_close(value, averaged[name], rtol=0, atol=0, msg=name)
    # the epoch's sample grid shows the average too: redrawn from the final (averaged) weights, byte for byte
    save_samples(ImageGrids()._samples(cli.model.eval()), tmp_path / "redrawn.png")
    assert (tmp_path / "redrawn.png").read_bytes() == (path.parent.parent / "images" / "samples_epoch_000.png").read_bytes()


def test_generator_step_budget_stops_training(tmp_path):
    cli = fit([
        "fit", "--config", str(REPO / "recipes" / "gan_ring.yaml"), "--model.init_args.max_generator_steps=7",
        "--trainer.max_epochs=3", "--trainer.enable_progress_bar=false", f"--trainer.logger.init_args.save_dir={tmp_path}",
    ])
    assert cli.model.generator_steps == 7 == cli.trainer.fit_loop.epoch_loop.batch_progress.total.completed


def test_batch_norm_critic_is_rejected_from_the_command_line(tmp_path):
    with pytest.raises(ConfigError, match="normalization: none"):
        fit([
            "fit", "--config", str(REPO / "recipes" / "wgan_gp_mnist.yaml"),
            "--model.init_args.discriminator={class_path: varinf.ConvEncoder, init_args: {normalization: batch}}",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
        ])


def test_iwae_paper_recipe_follows_the_papers_learning_rate_schedule(tmp_path):
    """Burda et al. (2016): lr 1e-3 * 10^(-i/7) during stage i, which lasts 3^i epochs."""
    cli = fit([
        "fit", "--config", str(REPO / "recipes" / "vae_iwae_paper_mnist.yaml"), "--trainer.max_epochs=5",
        "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=1", "--trainer.limit_test_batches=1",
        "--trainer.enable_progress_bar=false", f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
    ])
    assert [layer.out_features for layer in cli.model.guide.encoder.layers if isinstance(layer, torch.nn.Linear)] == [200, 200, 100]
    # after 5 epochs: stage 0 (1 epoch) and stage 1 (3 epochs) are done, so stage 2 has begun
    assert cli.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-3 * 10 ** (-2 / 7))


@pytest.mark.parametrize("recipe", ["iwae_mnist", "vae_iaf_mnist", "vae_vampprior_mnist"])
def test_every_likelihood_recipe_fits_from_the_cli(tmp_path, recipe):
    cli = fit(["fit", "--config", str(REPO / "recipes" / f"{recipe}.yaml"), *SMALL, f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}"])
    logged = cli.trainer.logged_metrics
    assert math.isfinite(float(logged["test/negative_elbo"])) and (Path(cli.trainer.log_dir) / "checkpoints" / "best.ckpt").is_file()


def test_user_guide_example_fits_and_evaluates_from_a_recipe_beside_it(tmp_path, monkeypatch):
    import sys

    monkeypatch.setattr(sys, "path", list(sys.path))  # the fit adds the recipe's folder; undo afterwards
    recipe = REPO / "recipes" / "examples" / "vae_low_rank_guide.yaml"
    cli = fit(["fit", "--config", str(recipe), *SMALL, f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}"])
    assert type(cli.model.guide).__name__ == "LowRankGaussianGuide"
    sys.path.remove(str(recipe.parent))
    sys.modules.pop("low_rank_guide")
    checkpoint = Path(cli.trainer.log_dir) / "checkpoints" / "best.ckpt"
    main(["evaluate", "--ckpt", str(checkpoint), "--metrics", "nll", "--k", "5"])  # imports the guide from the recipe's folder
    (row,) = map(json.loads, (checkpoint.parent.parent / "evaluation.jsonl").read_text().splitlines())
    assert row["nll"] < row["negative_elbo"] < 784 * math.log(2)


def test_mixed_precision_runs_the_networks_in_16_bits_and_the_densities_in_32():
    module = small_vae()
    x = torch.bernoulli(torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(0)))
    torch.manual_seed(1)
    full = module.objective.terms(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert module.model.decoder(torch.zeros(1, 4)).dtype == torch.bfloat16  # the networks do run in 16 bits
        torch.manual_seed(1)
        mixed = module.objective.terms(x)
    assert mixed.loss.dtype == mixed.kl.dtype == mixed.reconstruction.dtype == torch.float32
    assert mixed.loss.item() == pytest.approx(full.loss.item(), rel=1e-2)  # bf16 has 8 bits of mantissa


def test_gradient_penalty_stays_in_float32_under_mixed_precision():
    from varinf.adversarial import gradient_penalty

    critic = MLP((2,), (1,), hidden=(16,))
    real, fake = torch.randn(64, 2), torch.randn(64, 2)
    torch.manual_seed(0)
    full = gradient_penalty(critic, real, fake)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.manual_seed(0)
        mixed = gradient_penalty(critic, real.bfloat16(), fake.bfloat16())
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, full, rtol=1e-2, atol=1e-3)  # inputs rounded to bf16, penalty computed in fp32


@pytest.mark.parametrize("recipe", ["vae_mnist", "wgan_gp_ring", "gan_ring"])
def test_a_recipe_trains_in_mixed_precision(tmp_path, recipe):
    """bf16-mixed, what torch's CPU autocast supports (Lightning runs 16-mixed as bf16-mixed on a CPU)."""
    precision = "bf16-mixed"
    cli = fit(["fit", "--config", str(REPO / "recipes" / f"{recipe}.yaml"), f"--trainer.precision={precision}", "--trainer.max_epochs=1",
               "--trainer.limit_train_batches=5", "--trainer.limit_val_batches=1", "--trainer.limit_test_batches=1",
               "--trainer.enable_progress_bar=false", f"--trainer.logger.init_args.save_dir={tmp_path}"])
    metrics = cli.trainer.callback_metrics
    key = "test/negative_elbo" if recipe.startswith("vae") else "test/D/loss"  # the fit ends with a test run
    assert cli.trainer.precision == precision and math.isfinite(float(metrics[key]))


HOST_COPIES = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")


@contextmanager
def no_host_copies():
    """Within the block, every Tensor method that copies a value to the host (a device sync on a
    GPU, and Python branching on a tensor's value) raises, except inside torch's optimisers (whose
    step counters live on the host whatever the device)."""
    saved = {name: getattr(torch.Tensor, name) for name in HOST_COPIES}
    in_optimizer = [False]
    adam_step = torch.optim.Adam.step

    def step(*args, **kwargs):
        in_optimizer[0] = True
        try:
            return adam_step(*args, **kwargs)
        finally:
            in_optimizer[0] = False

    def refuse(name):
        def method(self, *args, **kwargs):
            if in_optimizer[0]:
                return saved[name](self, *args, **kwargs)
            raise AssertionError(f"a training step called Tensor.{name}, a host-device sync")
        return method

    torch.optim.Adam.step = step

    for name in HOST_COPIES:
        setattr(torch.Tensor, name, refuse(name))
    try:
        yield
    finally:
        torch.optim.Adam.step = adam_step
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


@pytest.mark.parametrize("kind", ["vae", "gan", "aae"])
def test_a_training_step_copies_nothing_to_the_host(kind):
    """What varinf runs per step (the step with its optimiser steps, metrics and NaN watches, and
    the gradient hook) never syncs with the device; values reach the host every
    log_every_n_steps batches, at epoch ends and at checkpoints."""
    import pytorch_lightning as pl

    from varinf import AAEModule, DeltaEncoderGuide, GANModule, MixtureOfGaussiansPrior, MNISTDataModule, RingDataModule

    network = lambda i, o: MLP(i, o, hidden=(32,))  # noqa: E731
    if kind == "vae":
        module, data = small_vae(), MNISTDataModule(binarize="dynamic", batch_size=32)
    elif kind == "aae":  # the paper recipe's deterministic encoder, and a prior sampled through a Categorical
        module = AAEModule(latent_dim=2, guide=lambda shape, dim: DeltaEncoderGuide(shape, dim, encoder=network), discriminator=network,
                           model=lambda shape, dim: LatentVariableModel(shape, dim, decoder=network, prior=MixtureOfGaussiansPrior))
        data = MNISTDataModule(binarize="dynamic", batch_size=32)
    else:
        module = GANModule(data_shape=(2,), latent_dim=2, model=lambda shape, dim: LatentVariableModel(shape, dim, decoder=network, likelihood=lambda: GaussianLikelihood()),
                           discriminator=network)
        data = RingDataModule(batch_size=32)
    calls = []
    for name in ("training_step", "on_before_optimizer_step", "on_train_batch_start"):
        original = getattr(module, name)

        def checked(*args, original=original, **kwargs):
            calls.append(original.__name__)
            with no_host_copies():
                return original(*args, **kwargs)

        setattr(module, name, checked)
    module.configure_callbacks = list
    trainer = pl.Trainer(accelerator="cpu", max_steps=9, limit_val_batches=0, log_every_n_steps=1000, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=data)
    assert calls.count("training_step") >= 3
