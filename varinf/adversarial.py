"""Adversarial losses: small pure functions of discriminator logits or critic values.

Each loss is a pair, one for the discriminator (or critic) and one for the generator, registered
by name in :data:`ADVERSARIAL_LOSSES` so that a recipe selects it with ``loss: <name>``.
``real`` holds the outputs on samples of the "real" side, ``fake`` on the "fake" side; for a GAN
these are data and generated images, for an AAE prior and encoded latents, for ALI the data and
model joints. A new loss is one new pair and one registry entry.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor
from torch.nn.functional import relu, softplus

from varinf.networks import MLP
from varinf.seeding import seeded


def d_minimax(real: Tensor, fake: Tensor) -> Tensor:
    """``-E_real log D - E_fake log(1 - D)`` with ``D = sigmoid(logit)`` (Goodfellow et al. 2014)."""
    return softplus(-real).mean() + softplus(fake).mean()


def g_minimax(fake: Tensor) -> Tensor:
    """Saturating generator loss ``E_fake log(1 - D)``: the minimax game's own."""
    return -softplus(fake).mean()


def g_non_saturating(fake: Tensor) -> Tensor:
    """Non-saturating generator loss ``-E_fake log D`` (Goodfellow et al. 2014, section 3)."""
    return softplus(-fake).mean()


def d_least_squares(real: Tensor, fake: Tensor) -> Tensor:
    """LSGAN discriminator ``1/2 E_real (D - 1)^2 + 1/2 E_fake D^2`` (Mao et al. 2017)."""
    return 0.5 * ((real - 1).square().mean() + fake.square().mean())


def g_least_squares(fake: Tensor) -> Tensor:
    """LSGAN generator ``1/2 E_fake (D - 1)^2``."""
    return 0.5 * (fake - 1).square().mean()


def d_hinge(real: Tensor, fake: Tensor) -> Tensor:
    """Hinge discriminator ``E_real max(0, 1 - D) + E_fake max(0, 1 + D)`` (Lim & Ye 2017; Miyato et al. 2018)."""
    return relu(1 - real).mean() + relu(1 + fake).mean()


def g_critic(fake: Tensor) -> Tensor:
    """Generator loss ``-E_fake f`` against a critic: hinge and Wasserstein GANs."""
    return -fake.mean()


def d_wasserstein(real: Tensor, fake: Tensor) -> Tensor:
    """Critic loss ``E_fake f - E_real f``, minus the Kantorovich-Rubinstein estimate of W1 (Arjovsky et al. 2017)."""
    return fake.mean() - real.mean()


def gradient_penalty(critic: Callable[[Tensor], Tensor], real: Tensor, fake: Tensor) -> Tensor:
    """WGAN-GP penalty ``E[(||grad f(x_hat)|| - 1)^2]`` on random interpolates (Gulrajani et al. 2017).

    ``x_hat = u real + (1 - u) fake`` with one ``u ~ U(0, 1)`` per sample; the gradient norm is over
    all dimensions of a sample. Computed in float32 with autocast off, and with an out-of-place
    ``autograd.grad(create_graph=True)``, so that it works under mixed precision and DDP.
    """
    with torch.autocast(real.device.type, enabled=False):
        u = torch.rand(real.shape[0], *[1] * (real.dim() - 1), device=real.device)
        interpolates = (u * real.float() + (1 - u) * fake.float()).requires_grad_(True)
        (gradients,) = torch.autograd.grad(critic(interpolates).sum(), interpolates, create_graph=True)
        return (gradients.flatten(1).norm(dim=1) - 1).square().mean()


def kl_data_model_from_logits(real: Tensor) -> Tensor:
    """``KL(p_data || p_model) ~ E_data[logit]``: the logit of D* is ``log p_data(x) - log p_model(x)``."""
    return real.mean()


def kl_model_data_from_logits(fake: Tensor) -> Tensor:
    """``KL(p_model || p_data) ~ -E_model[logit]``."""
    return -fake.mean()


def js_from_logits(real: Tensor, fake: Tensor) -> Tensor:
    """``JS(p_data, p_model) ~ (V + log 4) / 2`` with ``V = E_data log D + E_model log(1 - D)``.

    Exact at the optimal discriminator, where ``V(D*, G) = 2 JS - log 4`` (Goodfellow et al. 2014).
    """
    return (math.log(4) - d_minimax(real, fake)) / 2


def wasserstein_from_critic(real: Tensor, fake: Tensor) -> Tensor:
    """``W1 ~ E_data f - E_model f`` for a (near) 1-Lipschitz critic f (Kantorovich-Rubinstein duality)."""
    return real.mean() - fake.mean()


DIVERGENCE_READOUTS = {
    "density_ratio": {
        "kl_data_model": lambda real, fake: kl_data_model_from_logits(real),
        "kl_model_data": lambda real, fake: kl_model_data_from_logits(fake),
        "js": js_from_logits,
    },
    "critic": {"w1": wasserstein_from_critic},
    None: {},
}
"""The divergence estimates each kind of discriminator output supports, by logged name."""


@dataclass(frozen=True)
class AdversarialLoss:
    """A named discriminator/generator loss pair.

    ``readout`` says what the discriminator's outputs estimate: ``"density_ratio"`` (logits of
    ``D* = p_data / (p_data + p_model)``, giving KL and JS estimates), ``"critic"`` (a Lipschitz
    critic, giving a W1 estimate) or ``None``. ``gradient_penalty`` marks WGAN-GP.
    """

    discriminator: Callable[[Tensor, Tensor], Tensor]
    generator: Callable[[Tensor], Tensor]
    readout: Literal["density_ratio", "critic"] | None = None
    gradient_penalty: bool = False


ADVERSARIAL_LOSSES = {
    "minimax": AdversarialLoss(d_minimax, g_minimax, "density_ratio"),
    "non_saturating": AdversarialLoss(d_minimax, g_non_saturating, "density_ratio"),
    "least_squares": AdversarialLoss(d_least_squares, g_least_squares),
    "hinge": AdversarialLoss(d_hinge, g_critic),
    "wasserstein": AdversarialLoss(d_wasserstein, g_critic, "critic"),
    "wasserstein_gp": AdversarialLoss(d_wasserstein, g_critic, "critic", gradient_penalty=True),
}


def fit_density_ratio(real: Tensor, fake: Tensor, hidden: tuple[int, ...] = (256, 256), epochs: int = 30, batch_size: int = 128, holdout: float = 0.2, seed: int = 0) -> Callable[[Tensor], Tensor]:
    """A fresh discriminator whose logit estimates ``log p_real(x) - log p_fake(x)``: an MLP trained
    with the minimax discriminator loss (logistic regression, Adam 1e-3), early-stopped on the
    held-out fraction ``holdout`` of each set. Its outputs feed :data:`DIVERGENCE_READOUTS`.

    Returns:
        The trained logit function (no gradients).
    """
    generator = torch.Generator().manual_seed(seed)
    with seeded(seed):
        network = MLP(real.shape[1:], (1,), hidden=hidden, activation="leaky_relu").to(real.device)
    optimizer = torch.optim.Adam(network.parameters(), lr=1e-3)

    def split(data: Tensor) -> tuple[Tensor, Tensor]:
        order = torch.randperm(len(data), generator=generator).to(data.device)
        cut = int(len(data) * (1 - holdout))
        return data[order[:cut]], data[order[cut:]]

    (real_train, real_held), (fake_train, fake_held) = split(real), split(fake)
    best_loss, best_state = math.inf, None
    for _ in range(epochs):
        network.train()
        real_order = torch.randperm(len(real_train), generator=generator).to(real.device)
        fake_order = torch.randperm(len(fake_train), generator=generator).to(real.device)
        for real_batch, fake_batch in zip(real_order.split(batch_size), fake_order.split(batch_size)):
            loss = d_minimax(network(real_train[real_batch]).squeeze(-1), network(fake_train[fake_batch]).squeeze(-1))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        network.eval()
        with torch.no_grad():
            held_loss = float(d_minimax(network(real_held).squeeze(-1), network(fake_held).squeeze(-1)))
        if held_loss < best_loss:
            best_loss, best_state = held_loss, {name: value.clone() for name, value in network.state_dict().items()}
    network.load_state_dict(best_state)
    network.eval()
    return torch.no_grad()(lambda x: network(x).squeeze(-1))
