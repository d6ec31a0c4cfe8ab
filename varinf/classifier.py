"""The MNIST classifier behind the sample-based metrics (FID, KID, precision/recall, modes).

Trained once by ``varinf train-classifier`` and shipped with the package beside a card (JSON)
that holds its SHA-256, its test accuracy and how it was trained; loading checks the checksum.
Nothing is ever downloaded.
"""

import hashlib
import json
import time
from pathlib import Path

import torch
from torch import Tensor, nn

from varinf.data import MNISTDataModule
from varinf.errors import DataError
from varinf.networks import Dropout

DEFAULT_WEIGHTS = Path(__file__).parent / "weights" / "mnist_classifier.pt"


class MNISTClassifier(nn.Module):
    """A small convnet (LeNet-style: two 5x5 conv + max-pool blocks, 128 hidden units) for
    28x28 grey-level digits in [0, 1].

    ``features`` maps images to the 128 penultimate (post-ReLU) activations, the feature space of
    FID, KID and precision/recall; ``forward`` returns the ten class logits.
    """

    num_features = 128

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * 4 * 4, self.num_features), nn.ReLU(),
        )
        self.features.num_features = self.num_features  # read by torchmetrics' FID and KID
        self.head = nn.Sequential(Dropout(0.5), nn.Linear(self.num_features, 10))

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.features(images))


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def card_path(weights: Path) -> Path:
    return Path(weights).with_suffix(".json")


@torch.no_grad()
def accuracy(classifier: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 1000) -> float:
    classifier.eval()
    correct = sum(
        int((classifier(images[i : i + batch_size]).argmax(1) == labels[i : i + batch_size]).sum())
        for i in range(0, len(images), batch_size)
    )
    return correct / len(images)


def train_classifier(out: Path = DEFAULT_WEIGHTS, data_dir: str | None = None, epochs: int = 10, seed: int = 0) -> dict:
    """Train the classifier on the 55k MNIST training images (grey levels) with Adam, batch 128,
    learning rate 1e-3 halved every three epochs; save its weights to ``out`` and its card beside.

    Returns:
        The card: checksum, accuracies and settings.
    """
    torch.manual_seed(seed)
    splits = MNISTDataModule(data_dir, binarize="none", seed=seed).load_splits()
    (train_x, train_y), (test_x, test_y) = splits["train"], splits["test"]
    classifier = MNISTClassifier()
    optimizer = torch.optim.Adam(classifier.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)
    started = time.perf_counter()
    for epoch in range(epochs):
        classifier.train()
        for batch in torch.randperm(len(train_x)).split(128):
            loss = nn.functional.cross_entropy(classifier(train_x[batch]), train_y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        scheduler.step()
        print(f"classifier epoch {epoch + 1}/{epochs}: val accuracy {accuracy(classifier, *splits['val']):.4f}", flush=True)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(classifier.state_dict(), out)
    card = {
        "sha256": sha256(out),
        "test_accuracy": accuracy(classifier, test_x, test_y),
        "val_accuracy": accuracy(classifier, *splits["val"]),
        "training": f"55k MNIST training images (grey levels), Adam 1e-3 halved every 3 epochs, batch 128, {epochs} epochs, seed {seed}",
        "seconds": round(time.perf_counter() - started, 1),
        "torch": torch.__version__,
    }
    card_path(out).write_text(json.dumps(card, indent=2) + "\n")
    return card


def load_classifier(path: str | Path | None = None, device: torch.device | str = "cpu") -> MNISTClassifier:
    """The trained classifier (eval mode), after checking its weights against the checksum in its card."""
    path = Path(path) if path is not None else DEFAULT_WEIGHTS
    fix = f"train it with `varinf train-classifier --out {path}` (about 2 minutes on a CPU)"
    if not path.is_file() or not card_path(path).is_file():
        raise DataError(f"No trained MNIST classifier at {path} (weights and a .json card are needed); {fix}.")
    expected = json.loads(card_path(path).read_text())["sha256"]
    if sha256(path) != expected:
        raise DataError(f"The classifier weights {path} do not match the checksum in {card_path(path)}: the file is corrupt or was changed; {fix}.")
    classifier = MNISTClassifier()
    classifier.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return classifier.to(device).eval()
