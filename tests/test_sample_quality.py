"""analysis/sample_quality.py: the Fréchet distance on known Gaussians, the feature classifier, FID's guard."""

import numpy as np
import pytest
import scipy.linalg
import torch

from analysis.sample_quality import (
    classifier_features,
    frechet_distance,
    frechet_distance_features,
    load_classifier,
    load_inception,
    main,
    save_classifier,
    score_samples,
    train_classifier,
)


def random_rotation(d, rng):
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.sign(np.diag(r))


def test_frechet_closed_form_1d_and_commuting():
    # 1-D: (μ1 − μ2)² + (s1 − s2)²
    assert frechet_distance([1.0], [[4.0]], [-0.5], [[0.25]]) == pytest.approx(1.5**2 + (2 - 0.5) ** 2)
    # commuting covariances U·diag(a)·Uᵀ, U·diag(b)·Uᵀ: ‖Δμ‖² + Σ(√a − √b)²
    rng = np.random.default_rng(0)
    u = random_rotation(5, rng)
    a, b = rng.uniform(0.1, 3, 5), rng.uniform(0.1, 3, 5)
    mu1, mu2 = rng.standard_normal(5), rng.standard_normal(5)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu1, u @ np.diag(a) @ u.T, mu2, u @ np.diag(b) @ u.T) == pytest.approx(expected, rel=1e-9)
    # identical distributions: 0; symmetric in its arguments
    c = u @ np.diag(a) @ u.T
    assert frechet_distance(mu1, c, mu1, c) == pytest.approx(0, abs=1e-9)


def test_frechet_general_against_scipy_sqrtm():
    rng = np.random.default_rng(1)
    m1, m2 = rng.standard_normal((6, 6)), rng.standard_normal((6, 6))
    c1, c2 = m1 @ m1.T + 0.1 * np.eye(6), m2 @ m2.T + 0.1 * np.eye(6)
    mu1, mu2 = rng.standard_normal(6), rng.standard_normal(6)
    ref = ((mu1 - mu2) ** 2).sum() + np.trace(c1 + c2 - 2 * np.real(scipy.linalg.sqrtm(c1 @ c2)))
    got = frechet_distance(mu1, c1, mu2, c2)
    assert got == pytest.approx(ref, rel=1e-8)
    assert frechet_distance(mu2, c2, mu1, c1) == pytest.approx(got, rel=1e-8)
    # a singular covariance (rank 1) still works: N(0, diag(1, 0)) vs N(0, diag(4, 0)) → (2 − 1)²
    assert frechet_distance([0, 0], np.diag([1.0, 0.0]), [0, 0], np.diag([4.0, 0.0])) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="shapes"):
        frechet_distance(mu1, c1, mu2[:3], c2)


def test_frechet_from_samples_converges_to_closed_form():
    rng = np.random.default_rng(2)
    n = 40_000
    f1 = rng.standard_normal((n, 3)) * [1.0, 2.0, 0.5]
    f2 = rng.standard_normal((n, 3)) * [1.5, 2.0, 1.0] + [1.0, 0.0, 0.0]
    expected = 1.0 + 0.5**2 + 0 + 0.5**2
    assert frechet_distance_features(f1, f2) == pytest.approx(expected, abs=0.03)


@pytest.fixture(scope="module")
def digits():
    from training.dataset import load_dataset

    ds = load_dataset("digits")
    return ds.x.numpy(), ds.labels.numpy()


@pytest.fixture(scope="module")
def classifier(digits):
    x, y = digits
    return train_classifier(x, y, epochs=15, seed=0)


def test_classifier_learns_digits_and_roundtrips(classifier, digits, tmp_path):
    model, info = classifier
    assert info["holdout_accuracy"] > 0.9 and info["num_classes"] == 10
    x, _ = digits
    path = tmp_path / "clf.pt"
    save_classifier(model, info, path)
    again = load_classifier(path)
    f1, f2 = classifier_features(model, x[:50]), classifier_features(again, x[:50])
    assert f1.shape == (50, 128) and np.array_equal(f1, f2)


def test_fd_grows_with_corruption(classifier, digits):
    model, _ = classifier
    x, _ = digits
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(x))
    clean = score_samples(x[perm[:800]], x, model)
    noisy = [score_samples(x[perm[:800]] + s * rng.standard_normal(x[:800].shape).astype(np.float32), x, model)
             for s in (0.3, 1.0)]
    assert clean["fd_classifier"] < noisy[0]["fd_classifier"] < noisy[1]["fd_classifier"]
    # a subset of the training set is about as far from it as the split floor is (same order)
    assert clean["fd_classifier"] < 3 * clean["fd_classifier_split_floor"] + 1e-6


def test_classifier_needs_labels(digits):
    with pytest.raises(ValueError, match="labels"):
        train_classifier(digits[0][:20], None)


def test_missing_inception_weights_is_a_clear_error(tmp_path):
    missing = tmp_path / "pt_inception.pt"
    with pytest.raises(FileNotFoundError, match="Inception weights not found: .*pt_inception.pt"):
        load_inception(missing)
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        main(["score", "--classifier", str(tmp_path / "c.pt"), "--data", str(tmp_path / "d.npz"),
              "--samples", str(tmp_path / "s.npz"), "--inception", str(missing), "--out", str(tmp_path / "o.json")])
