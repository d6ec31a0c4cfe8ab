"""Recompute a VAE checkpoint's test ELBO with independent plain-PyTorch code, and compare.

Reads only the checkpoint's tensors (no varinf model code): an MLP encoder and decoder made of
``layers.{i}.weight/bias``, ReLU between layers, a diagonal Gaussian posterior with scale
``softplus(s) + floor``, a Bernoulli likelihood and the closed-form KL to N(0, I).

    python benchmarks/independent_elbo.py --ckpt runs/vae_mnist/version_0/checkpoints/best.ckpt
"""

import argparse

import torch
import torch.nn.functional as F


def mlp_from_state(state: dict, prefix: str):
    """The forward function of an MLP stored under ``prefix`` in a state dict (ReLU between layers)."""
    count = len([key for key in state if key.startswith(prefix) and key.endswith(".weight")])
    weights = [(state[f"{prefix}{2 * i}.weight"], state[f"{prefix}{2 * i}.bias"]) for i in range(count)]

    def forward(h):
        for i, (weight, bias) in enumerate(weights):
            h = F.linear(h if i == 0 else torch.relu(h), weight, bias)
        return h

    return forward


def independent_negative_elbo(state: dict, x: torch.Tensor, scale_floor: float = 1e-3, seed: int = 0) -> torch.Tensor:
    """``-ELBO(x) = -log Bernoulli(x | decoder(z)) + KL(N(mu, sigma^2) || N(0, I))``, one z per x."""
    encoder = mlp_from_state(state, "guide.encoder.layers.")
    decoder = mlp_from_state(state, "model.decoder.layers.")
    x = x.reshape(len(x), -1)
    loc, raw_scale = encoder(x).reshape(len(x), 2, -1).unbind(1)
    scale = F.softplus(raw_scale) + scale_floor
    generator = torch.Generator().manual_seed(seed)
    z = loc + scale * torch.randn(loc.shape, generator=generator)
    logits = decoder(z)
    log_likelihood = -F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(-1)
    kl = 0.5 * (loc**2 + scale**2 - 2 * torch.log(scale) - 1).sum(-1)
    return kl - log_likelihood


def main() -> None:
    from varinf import MNISTDataModule, load_module
    from varinf.evaluation import negative_elbo

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--data_dir", default=None)
    args = parser.parse_args()
    checkpoint = torch.load(args.ckpt, map_location="cpu", weights_only=True)
    data = MNISTDataModule(data_dir=args.data_dir, **{k: v for k, v in checkpoint["datamodule_hyper_parameters"].items() if k in ("binarize", "seed", "val_size")})
    data.setup("test")
    x = data.splits["test"][0]
    state = checkpoint["state_dict"]
    with torch.no_grad():
        theirs = independent_negative_elbo(state, x).mean().item()
    ours = float(negative_elbo(load_module(args.ckpt).eval().objective, data.test_dataloader()))
    print(f"test -ELBO, {len(x)} images, {data.describe_binarization()}:")
    print(f"  varinf:      {ours:.3f} nats")
    print(f"  independent: {theirs:.3f} nats")
    print(f"  difference:  {abs(ours - theirs):.3f} nats")


if __name__ == "__main__":
    main()
