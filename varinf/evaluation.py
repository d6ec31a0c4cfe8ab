"""The evaluation suite: metrics registered by name, computed from one shared :class:`Evaluation`.

``varinf evaluate --ckpt PATH --metrics nll parzen fid ...`` runs them on a checkpoint; each
appends one JSON line with its results and settings. Sample-based metrics compare the model's
samples (decoder means: pixel probabilities for a Bernoulli decoder) with the grey-level MNIST
test images, so every model is measured on one scale.
"""

import inspect
import json
import math
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn.functional import normalize
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from varinf.adversarial import DIVERGENCE_READOUTS, fit_density_ratio
from varinf.classifier import MNISTClassifier, load_classifier
from varinf.errors import ConfigError
from varinf.guides import guide_capabilities
from varinf.metrics import class_coverage, knn_precision_recall, parzen_log_likelihood
from varinf.modules import default_device, import_class, load_module, read_checkpoint
from varinf.objectives import log_importance_weights
from varinf.seeding import seeded


@torch.no_grad()
def importance_sampled_nll(model, guide, batches: Iterable, num_samples: int = 5000, max_points: int = 5000) -> Tensor:
    """``-log p(x)`` per datapoint, estimated by the IWAE bound with ``num_samples`` samples.

    ``log p(x) >= log (1/K) sum_k p(x, z_k) / q(z_k|x)`` (Burda et al., 2016); the log-sum-exp is
    taken per datapoint, streamed over chunks of samples so that at most ``max_points``
    (sample, datapoint) pairs are decoded at once, whatever K.

    Args:
        model, guide: the model side (with ``log_joint``) and the guide (with ``posterior``).
        batches: iterable of ``(x, label)`` batches.
        num_samples: K, importance samples per datapoint.
        max_points: the memory budget, in decoded (sample, datapoint) pairs.
    Returns:
        The NLL estimate of every datapoint, in nats.
    """
    results = []
    for x, _ in batches:
        chunk = max(1, min(num_samples, max_points // x.shape[0]))
        log_sum = torch.full((x.shape[0],), -math.inf, device=x.device)
        for start in range(0, num_samples, chunk):
            log_weights = log_importance_weights(model, guide, x, min(chunk, num_samples - start))
            log_sum = torch.logaddexp(log_sum, torch.logsumexp(log_weights, 0))
        results.append(math.log(num_samples) - log_sum)
    return torch.cat(results)


@torch.no_grad()
def negative_elbo(objective, batches: Iterable) -> Tensor:
    """``-ELBO(x)`` averaged over all batches, in nats per datapoint (KL weight 1)."""
    objective.kl_weight = 1.0
    total, count = 0.0, 0
    for x, _ in batches:
        total += objective.terms(x).negative_elbo * x.shape[0]
        count += x.shape[0]
    return total / count


def evaluate_likelihood(module, datamodule, num_samples: int = 5000, max_points: int = 5000) -> dict:
    """Test ``-ELBO`` and importance-sampled NLL of a VAE-like module, with the settings used."""
    module.eval()
    datamodule.setup("test")
    nll = importance_sampled_nll(module.model, module.guide, datamodule.test_dataloader(), num_samples, max_points)
    return {
        "nll": float(nll.mean()),
        "nll_stderr": float(nll.std() / math.sqrt(len(nll))),
        "negative_elbo": float(negative_elbo(module.objective, datamodule.test_dataloader())),
        "num_test_points": len(nll),
        "estimator": f"IWAE bound, k={num_samples} importance samples from q(z|x) per datapoint",
        "binarization": datamodule.describe_binarization(),
        "units": "nats per datapoint",
    }


@dataclass
class Evaluation:
    """A model under evaluation and what its metrics share, each computed once.

    Args:
        sample: draws ``n`` model samples shaped like the data (images in [0, 1]).
        data: grey-level images by split (``train``, ``val``, ``test``).
        module: the fitted module, for metrics that need an encoder and a likelihood.
        datamodule: the module's data as in training (binarised as it was), for ``nll``.
        num_samples: model samples for the sample-based metrics (10k in the papers' protocols).
        k: importance samples per test point for ``nll``.
        max_points: (sample, datapoint) pairs decoded at once by ``nll``.
        classifier_path: the MNIST classifier's weights (default: the one shipped with varinf).
        seed: seeds the model samples.
    """

    sample: Callable[[int], Tensor]
    data: dict[str, Tensor]
    module: object = None
    datamodule: object = None
    num_samples: int = 10_000
    k: int = 5000
    max_points: int = 5000
    classifier_path: str | None = None
    seed: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def draw(self, num_samples: int, seed: int) -> Tensor:
        """``num_samples`` model samples, drawn in batches under their own seed."""
        with seeded(seed, self.device), torch.no_grad():
            return torch.cat([self.sample(min(1000, num_samples - start)) for start in range(0, num_samples, 1000)]).to(self.device)

    @cached_property
    def samples(self) -> Tensor:
        return self.draw(self.num_samples, self.seed)

    @cached_property
    def classifier(self) -> MNISTClassifier:
        return load_classifier(self.classifier_path, self.device)

    @torch.no_grad()
    def features(self, images: Tensor) -> Tensor:
        """Penultimate classifier features of ``images``, in batches."""
        return torch.cat([self.classifier.features(batch) for batch in images.split(1000)])

    @cached_property
    def sample_features(self) -> Tensor:
        return self.features(self.samples)

    @cached_property
    def test_features(self) -> Tensor:
        return self.features(self.data["test"])

    @property
    def capabilities(self) -> set[str]:
        """What the metrics may need: ``likelihood`` (an explicit likelihood, i.e. an ELBO or IWAE
        objective, and a guide with a ``posterior`` density to importance-sample from) and
        ``mnist_images`` (28x28 images, for the classifier-based metrics)."""
        capabilities = set()
        if hasattr(self.module, "objective") and {"posterior", "density"} <= guide_capabilities(getattr(self.module, "guide", None)):
            capabilities.add("likelihood")
        if tuple(self.data["test"].shape[1:]) == (1, 28, 28):
            capabilities.add("mnist_images")
        return capabilities


def datamodule_from_checkpoint(checkpoint_path: str | Path, data_dir: str | None = None):
    """The datamodule a checkpoint was fitted with (its saved hyperparameters), optionally
    reading the data from another folder."""
    hparams = dict(read_checkpoint(checkpoint_path).get("datamodule_hyper_parameters", {}))
    hparams.pop("_instantiator", None)
    data_class = import_class(hparams.pop("_class_path", "varinf.MNISTDataModule"))
    if data_dir is not None:
        parameters = inspect.signature(data_class).parameters.values()
        if not any(parameter.name == "data_dir" or parameter.kind is parameter.VAR_KEYWORD for parameter in parameters):
            raise ConfigError(f"--data_dir does not apply to this checkpoint's data, {data_class.__name__}, which takes no data_dir: drop --data_dir.")
        hparams["data_dir"] = data_dir
    return data_class(**hparams)


def unbinarized_images(datamodule) -> dict[str, Tensor]:
    """The datamodule's splits (same split, same seed) without binarisation: the reference data of
    the sample-based metrics."""
    if getattr(datamodule, "binarize", "none") != "none":
        datamodule = type(datamodule)(**{**datamodule.hparams, "binarize": "none"})
    return {name: images for name, (images, _) in datamodule.load_splits().items()}


def evaluation_from_checkpoint(checkpoint_path: str | Path, data_dir: str | None = None, device: torch.device | None = None, **settings) -> Evaluation:
    """An :class:`Evaluation` of a checkpoint written by ``varinf fit``; ``settings`` are
    :class:`Evaluation` fields (``num_samples``, ``k``, ...)."""
    device = device or default_device()
    module = load_module(checkpoint_path, map_location=device).eval()
    datamodule = datamodule_from_checkpoint(checkpoint_path, data_dir)
    datamodule.setup("test")
    datamodule.splits = {name: (x.to(device), y.to(device)) for name, (x, y) in datamodule.splits.items()}
    data = {name: images.to(device) for name, images in unbinarized_images(datamodule).items()}
    return Evaluation(lambda n: module.generate(module.sample_latents(n)), data, module, datamodule, device=device, **settings)


@dataclass(frozen=True)
class MetricSpec:
    compute: Callable[[Evaluation], dict]
    needs: frozenset[str] = frozenset()


METRICS: dict[str, MetricSpec] = {}
"""The evaluation metrics by name; add one with :func:`register_metric`."""

NEEDS = {"likelihood": "a model with an encoder and an explicit likelihood (e.g. VAEModule)", "mnist_images": "28x28 MNIST-like images"}


def register_metric(name: str, needs: Iterable[str] = ()):
    """Register ``compute(evaluation) -> dict of results and settings`` as metric ``name``;
    ``needs`` names the :attr:`Evaluation.capabilities` it requires."""

    def register(compute: Callable[[Evaluation], dict]) -> Callable[[Evaluation], dict]:
        METRICS[name] = MetricSpec(compute, frozenset(needs))
        return compute

    return register


def supported_metrics(evaluation: Evaluation) -> list[str]:
    """The registered metrics that apply to this model and data."""
    return [name for name, spec in METRICS.items() if spec.needs <= evaluation.capabilities]


def run_metrics(evaluation: Evaluation, names: Iterable[str]) -> list[dict]:
    """Compute each named metric; one dict per metric with its name, results, settings and seconds."""
    names = list(names)
    for name in names:
        if name not in METRICS:
            raise ConfigError(f"Unknown metric {name!r}; choose from {sorted(METRICS)}.")
        for missing in METRICS[name].needs - evaluation.capabilities:
            raise ConfigError(f"Metric {name!r} needs {NEEDS[missing]}, which this evaluation lacks ({type(evaluation.module).__name__}). Metrics that apply: {supported_metrics(evaluation)}.")
    rows = []
    for name in names:
        started = time.perf_counter()
        results = METRICS[name].compute(evaluation)
        rows.append({"metric": name, **results, "seconds": round(time.perf_counter() - started, 1)})
    return rows


@register_metric("nll", needs=["likelihood"])
def nll_metric(evaluation: Evaluation) -> dict:
    """Importance-sampled test NLL, the IWAE bound with k samples (Burda et al. 2016, Table 1)."""
    return {"k": evaluation.k, **evaluate_likelihood(evaluation.module, evaluation.datamodule, evaluation.k, evaluation.max_points)}


@register_metric("parzen")
def parzen_metric(evaluation: Evaluation) -> dict:
    """Parzen-window log-likelihood of the test images under a Gaussian kernel density on the
    samples; the width is chosen from logspace(-1, 0, 10) on 1,000 held-out training images
    (Goodfellow et al. 2014; Makhzani et al. 2015; goodfeli/adversarial ``parzen_ll.py``)."""
    sigmas = torch.logspace(-1, 0, 10, dtype=torch.float64)
    held_out = evaluation.data["val"][:1000]
    validation = parzen_log_likelihood(held_out, evaluation.samples, sigmas).mean(1)
    sigma = sigmas[validation.argmax().item()]
    test = parzen_log_likelihood(evaluation.data["test"], evaluation.samples, sigma[None])[0]
    return {
        "parzen": float(test.mean()),
        "parzen_stderr": float(test.std() / math.sqrt(len(test))),
        "sigma": float(sigma),
        "settings": f"{len(evaluation.samples)} samples, sigma from logspace(-1, 0, 10) on {len(held_out)} held-out training images, {len(test)} grey-level test images",
        "units": "nats per datapoint",
    }


class _Float64Features(nn.Module):
    """The classifier's features, returned in float64 so that torchmetrics accumulates in float64."""

    def __init__(self, features: nn.Module):
        super().__init__()
        self.features, self.num_features = features, features.num_features

    def forward(self, images: Tensor) -> Tensor:
        return self.features(images).double()


def _image_distance(metric_class, evaluation: Evaluation, **kwargs):
    """A torchmetrics image-distance metric on classifier features, computed in float64."""
    with warnings.catch_warnings():  # KID's note that it keeps all features: 10k x 128 here
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        metric = metric_class(feature=_Float64Features(evaluation.classifier.features), **kwargs).to(evaluation.device)
    for batch in evaluation.data["test"].split(1000):
        metric.update(batch, real=True)
    for batch in evaluation.samples.split(1000):
        metric.update(batch, real=False)
    return metric.compute()


@register_metric("fid", needs=["mnist_images"])
def fid_metric(evaluation: Evaluation) -> dict:
    """Frechet distance between Gaussians fitted to classifier features of the test images and of
    the samples (Heusel et al. 2017), via torchmetrics' FrechetInceptionDistance in float64."""
    fid = _image_distance(FrechetInceptionDistance, evaluation)
    return {"fid": float(fid), "settings": f"varinf MNIST classifier features ({MNISTClassifier.num_features}-d), {len(evaluation.samples)} samples vs {len(evaluation.data['test'])} test images"}


@register_metric("kid", needs=["mnist_images"])
def kid_metric(evaluation: Evaluation) -> dict:
    """Kernel distance (squared MMD, cubic polynomial kernel) on classifier features, mean and std
    over 100 subsets of 1,000 (Binkowski et al. 2018; of all the samples when there are fewer), via
    torchmetrics' KernelInceptionDistance. The subsets are drawn from the evaluation's seed, so the
    value is reproducible."""
    subset_size = min(1000, len(evaluation.samples), len(evaluation.data["test"]))
    with seeded(evaluation.seed, evaluation.device):
        mean, std = _image_distance(KernelInceptionDistance, evaluation, subsets=100, subset_size=subset_size)
    return {"kid": float(mean), "kid_std": float(std), "settings": f"varinf MNIST classifier features, 100 subsets of {subset_size}"}


@register_metric("precision_recall", needs=["mnist_images"])
def precision_recall_metric(evaluation: Evaluation) -> dict:
    """k-NN precision and recall, k = 3 (Kynkaanniemi et al. 2019), on L2-normalised classifier
    features. Normalised, because in the raw ReLU features images that activate little (noise,
    blur) sit near the origin, inside the k-NN ball of some faint real digit: uniform noise would
    score precision 1."""
    real, fake = (normalize(features, dim=1) for features in (evaluation.test_features, evaluation.sample_features))
    return {**knn_precision_recall(real, fake, k=3), "settings": "k=3, L2-normalised varinf MNIST classifier features, samples vs test images"}


@register_metric("modes", needs=["mnist_images"])
def modes_metric(evaluation: Evaluation) -> dict:
    """The classes of the samples by the MNIST classifier: classes covered and KL to uniform."""
    with torch.no_grad():
        predicted = torch.cat([evaluation.classifier(batch).argmax(1) for batch in evaluation.samples.split(1000)])
    return {**class_coverage(predicted), "settings": f"{len(predicted)} samples; a class is covered with at least 10% of its fair share"}


@register_metric("divergences")
def divergences_metric(evaluation: Evaluation) -> dict:
    """Post-hoc KL and JS between data and model: a fresh discriminator, trained on held-out
    images (the validation split) against fresh samples, read out on the test images against the
    evaluation samples (THEORY.md section 2; the read-outs of :data:`DIVERGENCE_READOUTS`)."""
    real_train = evaluation.data["val"]
    logit = fit_density_ratio(real_train.flatten(1), evaluation.draw(len(real_train), evaluation.seed + 1).flatten(1))
    real, fake = logit(evaluation.data["test"].flatten(1)), logit(evaluation.samples.flatten(1))
    readouts = DIVERGENCE_READOUTS["density_ratio"]
    return {
        **{name: float(readout(real, fake)) for name, readout in readouts.items()},
        "settings": f"MLP discriminator 784-256-256-1 on pixels, trained on {len(real_train)} validation images vs as many samples, read out on test images vs {len(evaluation.samples)} samples",
        "units": "nats",
    }


def append_results(path: Path, results: dict) -> None:
    """Append one JSON line of results (with their settings) to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as file:
        file.write(json.dumps(results) + "\n")
