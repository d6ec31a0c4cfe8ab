"""Test-set evaluation of likelihood models: the ELBO and the importance-sampled log-likelihood."""

import json
import math
import time
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import Tensor

from varinf.objectives import log_importance_weights


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
    started = time.perf_counter()
    nll = importance_sampled_nll(module.model, module.guide, datamodule.test_dataloader(), num_samples, max_points)
    return {
        "test/negative_elbo": float(negative_elbo(module.objective, datamodule.test_dataloader())),
        f"test/nll_iwae_k{num_samples}": float(nll.mean()),
        f"test/nll_iwae_k{num_samples}_stderr": float(nll.std() / math.sqrt(len(nll))),
        "num_test_points": len(nll),
        "estimator": f"IWAE bound, k={num_samples} importance samples from q(z|x) per datapoint",
        "binarization": datamodule.describe_binarization(),
        "units": "nats per datapoint",
        "seconds": round(time.perf_counter() - started, 1),
    }


def append_results(path: Path, results: dict) -> None:
    """Append one JSON line of results (with their settings) to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as file:
        file.write(json.dumps(results) + "\n")
