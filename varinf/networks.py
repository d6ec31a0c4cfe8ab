"""Networks: plain ``nn.Module``s that map tensors to distribution parameters or logits.

They know nothing about inference; the Pyro model and guide bind their outputs to distributions.
Every network is built as ``Network(in_shape, out_shape, **settings)`` and maps a tensor of shape
``(*batch, *in_shape)`` to ``(*batch, *out_shape)``, so a recipe can swap one for another by
class path (see :data:`NetworkFactory`).
"""

import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor, nn

Shape = Sequence[int]
NetworkFactory = Callable[[Shape, Shape], nn.Module]
"""Builds a network from ``(in_shape, out_shape)``; in a recipe, a class path with ``init_args``."""

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "elu": nn.ELU, "leaky_relu": nn.LeakyReLU, "softplus": nn.Softplus}


class MLP(nn.Module):
    """Multi-layer perceptron: flatten ``in_shape``, hidden layers with an activation, reshape to ``out_shape``.

    Args:
        in_shape: shape of one input, e.g. ``(1, 28, 28)`` or ``(50,)``.
        out_shape: shape of one output.
        hidden: widths of the hidden layers.
        activation: name of the nonlinearity between layers.
    """

    def __init__(
        self,
        in_shape: Shape,
        out_shape: Shape,
        hidden: Sequence[int] = (500, 500),
        activation: Literal["relu", "tanh", "elu", "leaky_relu", "softplus"] = "relu",
    ):
        super().__init__()
        self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)
        widths = [math.prod(self.in_shape), *hidden, math.prod(self.out_shape)]
        layers: list[nn.Module] = []
        for i, (width_in, width_out) in enumerate(zip(widths[:-1], widths[1:])):
            if i > 0:
                layers.append(ACTIVATIONS[activation]())
            layers.append(nn.Linear(width_in, width_out))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        batch_shape = x.shape[: x.dim() - len(self.in_shape)]
        if tuple(x.shape[len(batch_shape) :]) != self.in_shape:
            raise ValueError(f"{type(self).__name__} expects inputs of shape (..., {', '.join(map(str, self.in_shape))}), got {tuple(x.shape)}.")
        return self.layers(x.reshape(*batch_shape, -1)).reshape(*batch_shape, *self.out_shape)
