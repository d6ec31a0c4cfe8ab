"""Metrics accumulated over an epoch or a dataset (torchmetrics, so they reduce across processes)."""

import torch
from torch import Tensor
from torchmetrics import Metric


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
