"""Metrics: accumulated over an epoch (torchmetrics, so they reduce across processes), and the
sample-based metrics of the evaluation suite as functions of samples or their features."""

import math

import torch
from torch import Tensor
from torchmetrics import Metric

from varinf.divergences import kl


class EpochMeans(Metric):
    """Batch-size-weighted means of named scalars (a loss and its parts, say) over an epoch:
    ``mean_name = sum_b w_b v_b,name / sum_b w_b``. torchmetrics' MeanMetric keeps one scalar per
    object, and one update per name costs more than the step's arithmetic. An update adds many
    batches at once (rows of values, one weight each); names get a slot when first seen (up to
    ``capacity``), so a name updated with different companions is pooled. Updates never sync with
    the host.

    Args:
        capacity: the most names one object holds.
    """

    full_state_update = False

    def __init__(self, capacity: int = 32):
        super().__init__()
        self.add_state("totals", torch.zeros(capacity, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("weights", torch.zeros(capacity, dtype=torch.float64), dist_reduce_fx="sum")
        self.slots: dict[str, int] = {}

    def update(self, names: tuple[str, ...], rows: Tensor, weights: Tensor) -> None:
        """Add ``rows`` (one row of ``len(names)`` values per batch) with the batches' ``weights``."""
        if len(self.slots.keys() | set(names)) > len(self.totals):
            raise ValueError(f"EpochMeans holds at most {len(self.totals)} names; raise its capacity.")
        index = torch.tensor([self.slots.setdefault(name, len(self.slots)) for name in names], device=self.totals.device)
        weights = weights.to(self.totals)
        self.totals.index_add_(0, index, weights @ rows.to(self.totals))
        self.weights.index_add_(0, index, weights.sum().expand(len(names)))

    def compute(self) -> dict[str, Tensor]:
        means = (self.totals / self.weights).float()
        return {name: means[slot] for name, slot in self.slots.items()}


class ActiveUnits(Metric):
    """Number of active latent units: dimensions j with ``Cov_x(E_q[z_j | x]) > threshold``.

    Burda, Grosse & Salakhutdinov (2016), section 5.2, with their threshold 0.01.

    Args:
        latent_dim: dimension of z.
        threshold: variance above which a unit counts as active.
    """

    full_state_update = False

    def __init__(self, latent_dim: int, threshold: float = 0.01):
        super().__init__()
        self.threshold = threshold
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros(latent_dim, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total_squares", torch.zeros(latent_dim, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, posterior_mean: Tensor) -> None:
        means = posterior_mean.reshape(-1, self.total.shape[0]).double()
        self.count += means.shape[0]
        self.total += means.sum(0)
        self.total_squares += means.square().sum(0)

    def compute(self) -> Tensor:
        mean = self.total / self.count
        variance = self.total_squares / self.count - mean.square()
        return (variance > self.threshold).sum().float()


def mode_coverage(samples: Tensor, centers: Tensor, std: float, num_stds: float = 3.0, min_share: float = 0.1) -> dict[str, float]:
    """Mode coverage of samples from a mixture with known, well-separated modes.

    A sample is *high quality* when it lies within ``num_stds`` standard deviations of its nearest
    mode centre (Srivastava et al. 2017, VEEGAN, section 5.1); a mode is *covered* when it holds at
    least ``min_share`` of its fair share (``n / num_modes``) of the high-quality samples.

    Args:
        samples: shape ``(n, d)``.
        centers: mode centres, shape ``(num_modes, d)``.
        std: the standard deviation of each mode.
    Returns:
        ``modes_covered`` (count) and ``high_quality`` (fraction of samples).
    """
    distances = torch.cdist(samples.float(), centers.to(samples.device).float())
    nearest_distance, nearest = distances.min(1)
    good = nearest_distance <= num_stds * std
    counts = torch.bincount(nearest[good], minlength=len(centers))
    fair_share = len(samples) / len(centers)
    return {"modes_covered": float((counts >= min_share * fair_share).sum()), "high_quality": float(good.float().mean())}


def _squared_distances(a: Tensor, b: Tensor) -> Tensor:
    """``||a_i - b_j||^2`` for flattened rows, in float64."""
    a, b = a.flatten(1).double(), b.flatten(1).double()
    return (a.square().sum(1, keepdim=True) + b.square().sum(1) - 2 * a @ b.T).clamp_min(0)


def parzen_log_likelihood(points: Tensor, centers: Tensor, sigmas: Tensor, chunk: int = 500) -> Tensor:
    """Log-density of ``points`` under an isotropic Gaussian kernel density on ``centers``,
    for each kernel width: ``log p(x) = logsumexp_i(-||x - mu_i||^2 / 2 sigma^2) - log n - (d/2) log(2 pi sigma^2)``.

    Breuleux, Bengio & Vincent (2011); the protocol of Goodfellow et al. (2014), ``parzen_ll.py``.

    Returns:
        Shape ``(len(sigmas), len(points))``, in nats.
    """
    sigmas = sigmas.double().to(points.device)
    dimension = points[0].numel()
    rows = []
    for start in range(0, len(points), chunk):
        distances = _squared_distances(points[start : start + chunk], centers)
        rows.append(torch.logsumexp(-distances / (2 * sigmas.square()[:, None, None]), -1))
    normalizer = math.log(len(centers)) + dimension / 2 * torch.log(2 * math.pi * sigmas.square())
    return torch.cat(rows, 1) - normalizer[:, None]


def knn_precision_recall(real: Tensor, fake: Tensor, k: int = 3, chunk: int = 2000) -> dict[str, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019): each set's manifold is the union
    of balls around its points reaching their k-th nearest neighbour; precision is the fraction of
    fake points inside the real manifold, recall the fraction of real points inside the fake one."""

    def radii(features: Tensor) -> Tensor:
        return torch.cat([torch.cdist(features[i : i + chunk], features).kthvalue(k + 1, 1).values for i in range(0, len(features), chunk)])

    def inside(points: Tensor, centers: Tensor, center_radii: Tensor) -> Tensor:
        return torch.cat([(torch.cdist(points[i : i + chunk], centers) <= center_radii).any(1) for i in range(0, len(points), chunk)])

    real, fake = real.flatten(1).float(), fake.flatten(1).float()
    return {
        "precision": float(inside(fake, real, radii(real)).float().mean()),
        "recall": float(inside(real, fake, radii(fake)).float().mean()),
    }


def class_coverage(predicted: Tensor, num_classes: int = 10, min_share: float = 0.1) -> dict:
    """Class histogram of samples labelled by a classifier: the classes *covered* (holding at least
    ``min_share`` of their fair share ``n / num_classes``, as in :func:`mode_coverage`) and
    ``KL(histogram || uniform)`` in nats (Srivastava et al. 2017; Metz et al. 2017)."""
    counts = torch.bincount(predicted.flatten(), minlength=num_classes).double()
    histogram = counts / counts.sum()
    return {
        "classes_covered": int((counts >= min_share * counts.sum() / num_classes).sum()),
        "kl_to_uniform": float(kl(histogram, torch.full_like(histogram, 1 / num_classes))),
        "histogram": [round(float(share), 4) for share in histogram],
    }
