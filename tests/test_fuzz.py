"""Property-based tests: random and malformed configs, files and tensors fed to the public entry
points fail only with varinf's documented errors (a recipe error exits with a message, never a
traceback from inside a library)."""

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import REPO
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from varinf import (
    MLP,
    ConfigError,
    ConvDecoder,
    ConvEncoder,
    DataError,
    ELBOLoss,
    GaussianEncoderGuide,
    GaussianLikelihood,
    LatentVariableModel,
    NormalPrior,
)
from varinf.cli import main
from varinf.data import read_idx
from varinf.objectives import IWAELoss

DOCUMENTED = (ConfigError, DataError)
SETTINGS = [
    "model.init_args.latent_dim", "model.init_args.beta", "model.init_args.num_particles", "model.init_args.kl",
    "model.init_args.objective", "model.init_args.kl_warmup_epochs", "model.init_args.optimizer.init_args.lr",
    "model.init_args.guide.class_path", "model.init_args.model.init_args.likelihood", "data.init_args.batch_size",
    "data.init_args.binarize", "data.init_args.val_size", "data.init_args.data_dir", "trainer.max_epochs", "not_a_key",
]
VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 3) | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=2),
    max_leaves=5,
)


@settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(SETTINGS), value=VALUES)
def test_malformed_recipe_settings_exit_with_a_message(tmp_path, capsys, key, value):
    argv = ["fit", "--config", str(REPO / "recipes" / "vae_mnist.yaml"), f"--{key}={json.dumps(value)}", "--trainer.fast_dev_run=true",
            "--trainer.enable_progress_bar=false", f"--trainer.logger.init_args.save_dir={tmp_path}"]
    try:
        main(argv)  # a setting that happens to be valid fits one batch
    except SystemExit as exit:
        message = str(exit.code) if not isinstance(exit.code, int) else capsys.readouterr().err
        assert exit.code != 0 and "Traceback" not in message and message.strip(), message


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=st.binary(max_size=64), dims=st.integers(1, 3), gz=st.booleans())
def test_malformed_idx_files_raise_data_errors(tmp_path, payload, dims, gz):
    path = Path(tmp_path) / ("file.gz" if gz else "file")
    path.write_bytes(payload)
    try:
        array = read_idx(path, dims)
    except DataError as error:
        assert str(path) in str(error)
    else:  # a payload that happens to be a valid IDX file reads as its header says
        assert array.ndim == dims and array.dtype.name == "uint8"


@settings(max_examples=40, deadline=None, derandomize=True)
@given(shape=st.lists(st.integers(0, 4), min_size=0, max_size=4), iwae=st.booleans())
def test_batches_of_any_shape_are_accepted_or_refused_with_a_data_error(shape, iwae):
    model, guide = LatentVariableModel((3,), 2), GaussianEncoderGuide((3,), 2)
    objective = IWAELoss(model, guide, num_samples=2) if iwae else ELBOLoss(model, guide)
    x = torch.rand(shape).round()
    try:
        loss = objective(x)
    except DOCUMENTED:
        assert tuple(shape[1:]) != (3,) or shape[0] == 0
    else:
        assert tuple(shape[1:]) == (3,) and loss.shape == ()


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    batch=st.lists(st.integers(0, 3), max_size=2),
    item=st.sampled_from([(1, 4, 4), (1, 4, 4), (4, 4), (1, 4, 5), (16,), (2, 4, 4), ()]),
    network=st.sampled_from(["mlp", "conv_encoder", "conv_decoder"]),
)
def test_networks_refuse_inputs_that_do_not_end_in_their_input_shape(batch, item, network):
    in_shape = (16,) if network == "conv_decoder" else (1, 4, 4)
    built = {
        "mlp": lambda: MLP(in_shape, (2,), hidden=(3,)),
        "conv_encoder": lambda: ConvEncoder(in_shape, (2,), channels=2),
        "conv_decoder": lambda: ConvDecoder(in_shape, (1, 4, 4), channels=2, normalization="none"),
    }[network]()
    shape = (*batch, *item)
    try:
        out = built(torch.rand(shape))
    except DataError as error:
        assert shape[len(shape) - len(in_shape):] != in_shape or len(shape) < len(in_shape)
        assert f"{type(built).__name__} expects inputs of shape (..., {', '.join(map(str, in_shape))}), got {shape}" in str(error)
    else:
        assert shape[len(shape) - len(in_shape):] == in_shape and out.shape == (*shape[: len(shape) - len(in_shape)], *built.out_shape)


@pytest.mark.parametrize("build, message", [
    (lambda: GaussianLikelihood(scale=float("nan")), "finite scale > 0"),
    (lambda: GaussianLikelihood(scale=float("inf")), "finite scale > 0"),
    (lambda: NormalPrior(2, scale=float("inf")), "finite positive scale"),
    (lambda: GaussianEncoderGuide((3,), 2, scale_floor=float("nan")), "scale_floor must be a finite number >= 0"),
    (lambda: MLP((3,), (2,), hidden=(4,), normalization="layer"), "normalization must be 'batch' or 'none', got 'layer'"),
    (lambda: MLP((3,), (2,), hidden=(), normalization="layer"), "normalization must be 'batch' or 'none', got 'layer'"),
    (lambda: ConvEncoder((1, 4, 4), (2,), normalization="layer"), "normalization must be 'batch' or 'none', got 'layer'"),
])
def test_non_finite_or_unknown_settings_are_refused(build, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        build()
