"""Seeded blocks of random draws that leave the caller's random state as it was."""

from contextlib import contextmanager

import torch


@contextmanager
def seeded(seed: int, device: torch.device | None = None):
    """Within the block, torch's random draws (on the CPU, and on ``device`` if it is a GPU) come
    from ``seed``; the global random state is restored after it."""
    devices = [device.index or 0] if device is not None and device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
