"""The evaluation suite against closed forms, scipy and brute force."""

import json
import math

import numpy as np
import pytest
import torch
from scipy import integrate, linalg
from scipy.special import logsumexp
from scipy.stats import multivariate_normal, norm
from torch import nn

from varinf import ConfigError, DataError
from varinf.adversarial import (
    fit_density_ratio,
    js_from_logits,
    kl_data_model_from_logits,
    kl_model_data_from_logits,
)
from varinf.classifier import DEFAULT_WEIGHTS, accuracy, card_path, load_classifier
from varinf.data import MNISTDataModule
from varinf.evaluation import METRICS, Evaluation, run_metrics, supported_metrics
from varinf.metrics import class_coverage, knn_precision_recall, parzen_log_likelihood


def test_parzen_log_likelihood_matches_scipy_gaussian_mixture():
    generator = torch.Generator().manual_seed(0)
    centers, points = torch.randn(50, 3, generator=generator), torch.randn(20, 3, generator=generator)
    sigmas = torch.tensor([0.3, 1.0])
    ours = parzen_log_likelihood(points, centers, sigmas, chunk=7)
    for row, sigma in zip(ours, sigmas.tolist()):
        densities = np.stack([multivariate_normal(c, sigma**2 * np.eye(3)).logpdf(points.numpy()) for c in centers.numpy()])
        np.testing.assert_allclose(row.numpy(), logsumexp(densities, 0) - math.log(50), rtol=1e-10)


def brute_force_precision_recall(real, fake, k):
    def radius(points):
        distances = np.linalg.norm(points[:, None] - points[None], axis=-1)
        return np.sort(distances, 1)[:, k]  # column 0 is the point itself

    def inside(points, centers):
        distances = np.linalg.norm(points[:, None] - centers[None], axis=-1)
        return np.mean([(row <= radius(centers)).any() for row in distances])

    return inside(fake, real), inside(real, fake)


def test_knn_precision_recall_matches_brute_force_and_limits():
    generator = torch.Generator().manual_seed(0)
    real = torch.randn(300, 4, generator=generator, dtype=torch.float64)
    fake = 1.5 * torch.randn(250, 4, generator=generator, dtype=torch.float64) + 0.5
    ours = knn_precision_recall(real, fake, k=3, chunk=64)
    precision, recall = brute_force_precision_recall(real.numpy(), fake.numpy(), 3)
    assert ours == pytest.approx({"precision": precision, "recall": recall}, abs=1e-6)
    assert knn_precision_recall(real, real, k=3) == {"precision": 1.0, "recall": 1.0}
    assert knn_precision_recall(real, real + 100, k=3) == {"precision": 0.0, "recall": 0.0}


def test_class_coverage_counts_classes_and_kl_to_uniform():
    predicted = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    coverage = class_coverage(predicted, num_classes=4)
    shares = np.array([0.5, 0.3, 0.2])
    assert coverage["classes_covered"] == 3 and coverage["histogram"] == [0.5, 0.3, 0.2, 0.0]
    assert coverage["kl_to_uniform"] == pytest.approx(float((shares * np.log(shares * 4)).sum()))


class IdentityFeatures(nn.Module):
    """Stands in for the classifier: its 'features' are the data itself (the metric's compute is
    called directly, past the check that asks for MNIST images)."""

    num_features = 3

    def __init__(self):
        super().__init__()
        self.features = nn.Flatten()
        self.features.num_features = 3


def gaussian_evaluation(real, fake):
    batches = iter(fake.split(1000))  # Evaluation draws its samples 1000 at a time
    evaluation = Evaluation(sample=lambda n: next(batches), data={"test": real, "val": real}, num_samples=len(fake))
    evaluation.__dict__["classifier"] = IdentityFeatures()
    return evaluation


def test_fid_is_the_frechet_distance_of_the_feature_gaussians():
    """FID = ||m1 - m2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), by scipy's sqrtm on the sample moments."""
    generator = torch.Generator().manual_seed(0)
    real = torch.randn(4000, 3, generator=generator)
    fake = torch.randn(4000, 3, generator=generator) @ torch.tensor([[1.0, 0.5, 0], [0, 1, 0], [0, 0, 2]]) + 1
    row = METRICS["fid"].compute(gaussian_evaluation(real, fake))
    r, f = real.double().numpy(), fake.double().numpy()
    s1, s2 = np.cov(r, rowvar=False), np.cov(f, rowvar=False)
    exact = np.sum((r.mean(0) - f.mean(0)) ** 2) + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    assert row["fid"] == pytest.approx(exact, rel=1e-6)


def test_kid_is_near_zero_for_one_distribution_and_positive_for_two():
    generator = torch.Generator().manual_seed(0)
    real, same, shifted = (torch.randn(2000, 3, generator=generator) for _ in range(3))
    equal = METRICS["kid"].compute(gaussian_evaluation(real, same))
    different = METRICS["kid"].compute(gaussian_evaluation(real, shifted + 1))
    assert abs(equal["kid"]) < 3 * equal["kid_std"] + 1e-3
    # the cubic kernel MMD^2 of a mean shift: (1 + 3/d ... ) is positive and many stds from zero
    assert different["kid"] > 10 * different["kid_std"] > 0


def test_kid_of_fewer_than_1000_samples_is_the_unbiased_mmd_of_all_of_them():
    """With 500 samples and 500 test points every subset is the whole set: KID is the unbiased
    MMD^2 with the kernel k(x, y) = (x.y / d + 1)^3, computed here directly, with a std of 0."""
    generator = torch.Generator().manual_seed(0)
    real, fake = torch.randn(500, 3, generator=generator), torch.randn(500, 3, generator=generator) + 0.5
    row = METRICS["kid"].compute(gaussian_evaluation(real, fake))
    r, f = real.double().numpy(), fake.double().numpy()
    kernel = lambda a, b: (a @ b.T / 3 + 1) ** 3  # noqa: E731
    m = len(r)
    off_diagonal_mean = lambda k: (k.sum() - np.trace(k)) / (m * (m - 1))  # noqa: E731
    exact = off_diagonal_mean(kernel(r, r)) + off_diagonal_mean(kernel(f, f)) - 2 * kernel(r, f).mean()
    assert row["kid"] == pytest.approx(exact, rel=1e-6) and row["kid_std"] == pytest.approx(0, abs=1e-9)
    assert "100 subsets of 500" in row["settings"]


def test_kid_subsets_come_from_the_evaluation_seed_not_the_global_random_state():
    generator = torch.Generator().manual_seed(0)
    real, fake = torch.randn(2000, 3, generator=generator), torch.randn(2000, 3, generator=generator) + 0.1
    values = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        values.append(METRICS["kid"].compute(gaussian_evaluation(real, fake))["kid"])
    assert values[0] == values[1]
    other_seed = gaussian_evaluation(real, fake)
    other_seed.seed = 1
    assert METRICS["kid"].compute(other_seed)["kid"] != values[0]  # the subsets do depend on the seed


def test_post_hoc_discriminator_recovers_kl_and_js_of_two_gaussians():
    """N(0, I) vs N((1, 0), I) in 2-D, from 20k samples each: KL = 1/2 both ways and JS by
    quadrature (the second coordinate carries no information). Tolerance 0.05 nats (JS 0.015)."""
    generator = torch.Generator().manual_seed(0)
    shift = torch.tensor([1.0, 0.0])
    real_train, real_test = torch.randn(2, 20_000, 2, generator=generator)
    fake_train, fake_test = torch.randn(2, 20_000, 2, generator=generator) + shift
    logit = fit_density_ratio(real_train, fake_train, hidden=(64, 64), epochs=10)
    real, fake = logit(real_test), logit(fake_test)
    p, q = norm(0, 1).pdf, norm(1, 1).pdf
    m = lambda x: (p(x) + q(x)) / 2
    js_exact = integrate.quad(lambda x: 0.5 * p(x) * np.log(p(x) / m(x)) + 0.5 * q(x) * np.log(q(x) / m(x)), -12, 13)[0]
    assert kl_data_model_from_logits(real).item() == pytest.approx(0.5, abs=0.05)
    assert kl_model_data_from_logits(fake).item() == pytest.approx(0.5, abs=0.05)
    assert js_from_logits(real, fake).item() == pytest.approx(js_exact, abs=0.015)


def test_metrics_that_need_what_the_model_lacks_are_refused_by_name():
    evaluation = Evaluation(sample=lambda n: torch.randn(n, 2), data={"test": torch.randn(10, 2)})
    assert supported_metrics(evaluation) == ["parzen", "divergences"]
    with pytest.raises(ConfigError, match="'nll' needs a model with an encoder"):
        run_metrics(evaluation, ["nll"])
    with pytest.raises(ConfigError, match="'fid' needs 28x28"):
        run_metrics(evaluation, ["fid"])
    with pytest.raises(ConfigError, match="Unknown metric 'inception'"):
        run_metrics(evaluation, ["inception"])
    assert set(METRICS) >= {"nll", "parzen", "fid", "kid", "precision_recall", "modes", "divergences"}


def test_shipped_classifier_reaches_99_percent_and_its_checksum_is_checked(tmp_path):
    classifier = load_classifier()
    test_images, test_labels = MNISTDataModule(binarize="none").load_splits()["test"]
    assert accuracy(classifier, test_images, test_labels) >= 0.99
    assert json.loads(card_path(DEFAULT_WEIGHTS).read_text())["test_accuracy"] >= 0.99
    corrupt = tmp_path / "classifier.pt"
    corrupt.write_bytes(DEFAULT_WEIGHTS.read_bytes()[:-10] + b"0123456789")
    card_path(corrupt).write_text(card_path(DEFAULT_WEIGHTS).read_text())
    with pytest.raises(DataError, match="do not match the checksum.*varinf train-classifier"):
        load_classifier(corrupt)
    with pytest.raises(DataError, match="No trained MNIST classifier"):
        load_classifier(tmp_path / "missing.pt")


def test_precision_recall_separate_data_from_noise_on_classifier_features():
    """Training images score high precision and recall against the test images; uniform noise
    scores low precision (in the raw features it would score 1, inside a faint digit's ball)."""
    splits = MNISTDataModule(binarize="none").load_splits()
    test = splits["test"][0][:3000]
    rows = {}
    for name, images in (("train", splits["train"][0][:3000]), ("noise", torch.rand(3000, 1, 28, 28, generator=torch.Generator().manual_seed(0)))):
        batches = iter(images.split(1000))
        evaluation = Evaluation(sample=lambda n, batches=batches: next(batches), data={"test": test}, num_samples=3000)
        (rows[name],) = run_metrics(evaluation, ["precision_recall"])
    assert rows["train"]["precision"] > 0.7 and rows["train"]["recall"] > 0.7
    assert rows["noise"]["precision"] < 0.4 and rows["noise"]["recall"] < 0.05  # about 0.07 with 10k points
