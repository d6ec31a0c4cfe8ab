"""Recompute a VAE checkpoint's test ELBO with independent plain-PyTorch code, and compare.

Reads only the checkpoint's tensors and its recipe (no varinf model code): an MLP encoder and
decoder made of ``layers.{i}.weight/bias``, ReLU or tanh between layers, a diagonal Gaussian
posterior with scale ``softplus(s) + scale_floor``, a Bernoulli likelihood and the closed-form KL to
N(0, I). A checkpoint of any other VAE is refused, naming what this script does not recompute.

    python benchmarks/independent_elbo.py --ckpt runs/vae_mnist/version_0/checkpoints/best.ckpt
"""

import argparse

import torch
import torch.nn.functional as F


ACTIVATIONS = {"relu": torch.relu, "tanh": torch.tanh}


def mlp_from_state(state: dict, prefix: str, activation: str = "relu"):
    """The forward function of an MLP stored under ``prefix`` in a state dict: its linear layers in
    index order (parameter-free layers between them, such as dropout, are identities at test time)."""
    indices = sorted({int(key[len(prefix):].split(".")[0]) for key in state if key.startswith(prefix)})
    weights = [(state[f"{prefix}{i}.weight"], state[f"{prefix}{i}.bias"]) for i in indices]

    def forward(h):
        for i, (weight, bias) in enumerate(weights):
            h = F.linear(h if i == 0 else ACTIVATIONS[activation](h), weight, bias)
        return h

    return forward


def recomputable_settings(hyper_parameters: dict) -> dict:
    """The encoder's and decoder's activations and the posterior's scale floor, read from a ``varinf
    fit`` checkpoint's recipe; exits naming the setting if the VAE is not one this script recomputes."""
    def refuse(what):
        raise SystemExit(f"independent_elbo.py recomputes MLP VAEs with a Bernoulli likelihood and an N(0, I) prior only; this checkpoint has {what}.")

    if hyper_parameters.get("_class_path") != "varinf.VAEModule":
        refuse(f"module {hyper_parameters.get('_class_path', 'not from a recipe')!r}")
    guide, model = hyper_parameters["guide"], hyper_parameters["model"]
    if guide["class_path"] != "varinf.GaussianEncoderGuide":
        refuse(f"guide {guide['class_path']!r}")
    for part, key in (("likelihood", "varinf.BernoulliLikelihood"), ("prior", "varinf.StandardNormalPrior")):
        chosen = model["init_args"].get(part, {"class_path": key})
        if (chosen if isinstance(chosen, str) else chosen["class_path"]) != key:
            refuse(f"{part} {chosen!r}")
    activations = {}
    for name, network in (("encoder", guide["init_args"]["encoder"]), ("decoder", model["init_args"]["decoder"])):
        settings = network.get("init_args", {})
        if network["class_path"] != "varinf.MLP" or settings.get("normalization", "none") != "none" or settings.get("spectral_norm"):
            refuse(f"{name} {network!r}")
        activations[name] = settings.get("activation", "relu")
        if activations[name] not in ACTIVATIONS:
            refuse(f"{name} activation {activations[name]!r}")
    return {**activations, "scale_floor": guide["init_args"].get("scale_floor", 1e-3)}


def independent_negative_elbo(state: dict, x: torch.Tensor, scale_floor: float = 1e-3, seed: int = 0, encoder: str = "relu", decoder: str = "relu") -> torch.Tensor:
    """``-ELBO(x) = -log Bernoulli(x | decoder(z)) + KL(N(mu, sigma^2) || N(0, I))``, one z per x;
    ``encoder`` and ``decoder`` name the networks' activations."""
    encoder = mlp_from_state(state, "guide.encoder.layers.", encoder)
    decoder = mlp_from_state(state, "model.decoder.layers.", decoder)
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
        theirs = independent_negative_elbo(state, x, **recomputable_settings(checkpoint["hyper_parameters"])).mean().item()
    ours = float(negative_elbo(load_module(args.ckpt).eval().objective, data.test_dataloader()))
    print(f"test -ELBO, {len(x)} images, {data.describe_binarization()}:")
    print(f"  varinf:      {ours:.3f} nats")
    print(f"  independent: {theirs:.3f} nats")
    print(f"  difference:  {abs(ours - theirs):.3f} nats")


if __name__ == "__main__":
    main()
