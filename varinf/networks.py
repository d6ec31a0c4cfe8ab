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

from varinf.errors import ConfigError, DataError

Shape = Sequence[int]
NetworkFactory = Callable[[Shape, Shape], nn.Module]
"""Builds a network from ``(in_shape, out_shape)``; in a recipe, a class path with ``init_args``."""

class Dropout(nn.Dropout):
    """``nn.Dropout`` that draws the same mask on every CPU: ``x * 1[u < 1 - p] / (1 - p)`` with
    ``u ~ U[0, 1)`` from ``torch.rand`` in float64. torch's CPU dropout draws its mask with MKL's
    generator on Intel processors and with torch's own elsewhere (``bernoulli_scalar_kernel``),
    so one seed gave two fits; this is torch's own draw, which AMD processors get, on every CPU.
    Other devices use torch's kernel. Without parameters, it loads ``nn.Dropout``'s checkpoints."""

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or not 0 < self.p < 1 or x.device.type != "cpu":
            return super().forward(x)
        keep = 1 - self.p
        return x * (torch.rand(x.shape, dtype=torch.float64) < keep).to(x.dtype).div_(keep)


class Maxout(nn.Module):
    """``h_j = max_k a_{jk}`` over ``pieces`` consecutive linear outputs per unit (Goodfellow et al. 2013)."""

    def __init__(self, pieces: int):
        super().__init__()
        self.pieces = pieces

    def forward(self, x: Tensor) -> Tensor:
        return x.unflatten(-1, (-1, self.pieces)).amax(-1)


ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "elu": nn.ELU, "leaky_relu": nn.LeakyReLU, "softplus": nn.Softplus}
"""Nonlinearities by name; ``"maxout"`` (:class:`Maxout`) is the other choice of :class:`MLP`."""


class MLP(nn.Module):
    """Multi-layer perceptron: flatten ``in_shape``, hidden layers with an activation, reshape to ``out_shape``.

    Args:
        in_shape: shape of one input, e.g. ``(1, 28, 28)`` or ``(50,)``.
        out_shape: shape of one output.
        hidden: widths of the hidden layers.
        activation: name of the nonlinearity between layers; ``"maxout"`` makes each hidden unit
            the maximum of ``pieces`` linear units (the GAN paper's discriminator).
        pieces: linear pieces per maxout unit.
        normalization: ``"batch"`` adds batch normalisation before each hidden activation (a
            common choice for MLP generators; not for a gradient-penalised critic).
        dropout: dropout probability after each hidden activation (a common regulariser of
            discriminators; Goodfellow et al. 2014).
        input_dropout: dropout probability on the inputs.
        spectral_norm: divide each weight matrix by its largest singular value, estimated by one
            power iteration per step (Miyato et al. 2018): a discriminator that cannot sharpen
            without bound.
    """

    def __init__(
        self,
        in_shape: Shape,
        out_shape: Shape,
        hidden: Sequence[int] = (500, 500),
        activation: Literal["relu", "tanh", "elu", "leaky_relu", "softplus", "maxout"] = "relu",
        pieces: int = 5,
        normalization: Literal["batch", "none"] = "none",
        dropout: float = 0.0,
        input_dropout: float = 0.0,
        spectral_norm: bool = False,
    ):
        super().__init__()
        if activation not in {*ACTIVATIONS, "maxout"}:
            raise ConfigError(f"activation must be one of {sorted({*ACTIVATIONS, 'maxout'})}, got {activation!r}.")
        if not (isinstance(pieces, int) and pieces >= 1):
            raise ConfigError(f"pieces must be a positive integer, got {pieces!r}.")
        _normalization(normalization, 1, 1)  # refuses an unknown kind, hidden layers or not
        self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)
        widths = [math.prod(self.in_shape), *hidden, math.prod(self.out_shape)]
        expand = pieces if activation == "maxout" else 1  # linear units feeding each hidden unit
        linear_widths = [width * expand for width in hidden] + [widths[-1]]
        layers: list[nn.Module] = [Dropout(input_dropout)] if input_dropout > 0 else []
        for index, (width_in, width_out) in enumerate(zip(widths[:-1], linear_widths)):
            if index > 0:  # the hidden units between two linear maps
                if normalization != "none":
                    layers.append(_normalization(normalization, width_in * expand, 1))
                layers.append(Maxout(pieces) if activation == "maxout" else ACTIVATIONS[activation]())
                if dropout > 0:
                    layers.append(Dropout(dropout))
            layers.append(nn.Linear(width_in, width_out))
        if spectral_norm:
            layers = [nn.utils.parametrizations.spectral_norm(layer) if isinstance(layer, nn.Linear) else layer for layer in layers]
        self.layers = nn.Sequential(*layers)
        self.in_features = widths[0]

    def forward(self, x: Tensor) -> Tensor:
        batch_shape = _batch_shape(self, x)
        return self.layers(x.reshape(-1, self.in_features)).reshape(*batch_shape, *self.out_shape)


def _batch_shape(network: nn.Module, x: Tensor) -> tuple[int, ...]:
    """The leading dimensions of ``x``, which must end in ``network.in_shape``; else a
    :class:`DataError` naming the network and both shapes."""
    batch_shape = tuple(x.shape[: max(x.dim() - len(network.in_shape), 0)])
    if tuple(x.shape[len(batch_shape) :]) != network.in_shape:
        raise DataError(f"{type(network).__name__} expects inputs of shape (..., {', '.join(map(str, network.in_shape))}), got {tuple(x.shape)}.")
    return batch_shape


def _normalization(kind: str, channels: int, dims: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels) if dims == 2 else nn.BatchNorm1d(channels)
    if kind == "none":
        return nn.Identity()
    raise ConfigError(f"normalization must be 'batch' or 'none', got {kind!r}.")


class ConvEncoder(nn.Module):
    """DCGAN-style convolutional network from images to a vector (Radford et al. 2016).

    Two stride-2 4x4 convolutions (``channels``, ``2 * channels``) with leaky ReLUs, then a linear
    layer: a discriminator (``out_shape=(1,)``) or an encoder (``out_shape=(2, latent_dim)``).
    Image sides must be divisible by 4 (28x28 MNIST gives 7x7 features).

    Args:
        in_shape: ``(C, H, W)``.
        out_shape: shape of one output.
        channels: width of the first convolution.
        normalization: ``"batch"`` or ``"none"`` (use none in a gradient-penalised critic).
    """

    def __init__(self, in_shape: Shape, out_shape: Shape, channels: int = 64, normalization: Literal["batch", "none"] = "none"):
        super().__init__()
        self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)
        c, h, w = self.in_shape
        if h % 4 or w % 4:
            raise ConfigError(f"ConvEncoder needs image sides divisible by 4, got {self.in_shape}.")
        self.layers = nn.Sequential(
            nn.Conv2d(c, channels, 4, 2, 1),
            nn.LeakyReLU(0.2),
            nn.Conv2d(channels, 2 * channels, 4, 2, 1),
            _normalization(normalization, 2 * channels, 2),
            nn.LeakyReLU(0.2),
            nn.Flatten(),
            nn.Linear(2 * channels * (h // 4) * (w // 4), math.prod(self.out_shape)),
        )

    def forward(self, x: Tensor) -> Tensor:
        batch_shape = _batch_shape(self, x)
        return self.layers(x.reshape(-1, *self.in_shape)).reshape(*batch_shape, *self.out_shape)


class ConvDecoder(nn.Module):
    """DCGAN-style convolutional generator from a vector to images (Radford et al. 2016).

    A linear layer to ``2 * channels`` maps of a quarter of the image size, then two stride-2 4x4
    transposed convolutions, with ReLUs; the output is unbounded (logits or means).

    Args:
        in_shape: shape of one input, e.g. ``(latent_dim,)``.
        out_shape: ``(C, H, W)`` with H and W divisible by 4.
        channels: width of the last hidden layer.
        normalization: ``"batch"`` (the DCGAN default) or ``"none"``.
    """

    def __init__(self, in_shape: Shape, out_shape: Shape, channels: int = 64, normalization: Literal["batch", "none"] = "batch"):
        super().__init__()
        self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)
        c, h, w = self.out_shape
        if h % 4 or w % 4:
            raise ConfigError(f"ConvDecoder needs image sides divisible by 4, got {self.out_shape}.")
        self.layers = nn.Sequential(
            nn.Linear(math.prod(self.in_shape), 2 * channels * (h // 4) * (w // 4)),
            _normalization(normalization, 2 * channels * (h // 4) * (w // 4), 1),
            nn.ReLU(),
            nn.Unflatten(1, (2 * channels, h // 4, w // 4)),
            nn.ConvTranspose2d(2 * channels, channels, 4, 2, 1),
            _normalization(normalization, channels, 2),
            nn.ReLU(),
            nn.ConvTranspose2d(channels, c, 4, 2, 1),
        )

    def forward(self, z: Tensor) -> Tensor:
        batch_shape = _batch_shape(self, z)
        return self.layers(z.reshape(-1, math.prod(self.in_shape))).reshape(*batch_shape, *self.out_shape)
