"""Offline sample quality: the Fréchet distance between generated and training samples in a feature space.

    FD = ‖μ₁ − μ₂‖² + tr(Σ₁ + Σ₂ − 2(Σ₁^½ Σ₂ Σ₁^½)^½)        (FID when the features are Inception-v3 pool3)

Features.  By default a small MLP classifier trained here on the dataset's labels (its held-out accuracy is
recorded with it; seconds on a CPU for digits); its penultimate activations (128-d) are the feature space — the "FID of small
data".  It is saved to the study folder so every model of a study is scored in the same space.  Inception
features (real FID) only when the user points `--inception` at local weights: a TorchScript file (called as
`module(images)` on float images in [0, 255], [B, 3, 299, 299], returning [B, 2048] features), or a torchvision
inception_v3 state dict if torchvision is installed.  Nothing is ever downloaded.

Caveat: the reference is the *training* set, so a model that copies training images scores FD ≈ the split noise
floor (also reported: the FD between two disjoint halves of the training set at the same sample size).

CLI:
  python -m analysis.sample_quality train-classifier --data results/S/data/dataset.npz --out CLASSIFIER.pt
  python -m analysis.sample_quality score --classifier CLASSIFIER.pt --data DATASET.npz
        (--snapshot SNAPSHOT.pt [--num 1000 --steps 18] | --samples SAMPLES.npz) [--inception PATH] --out SCORE.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from models.sampler import sample_snapshot
from study.atomic import atomic_path
from study.integrity import load_torch
from training.dataset import DatasetError, check_images, open_dataset

# torchvision is no dependency: it is imported only to rebuild an Inception state dict (load_inception).


# --------------------------------------------------------------------------------------------------------------
# Fréchet distance
# --------------------------------------------------------------------------------------------------------------

def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and covariance [D, D] (unbiased, float64) of features [N, D]."""
    f = np.asarray(features, np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"feature_statistics: need features of shape [N >= 2, D], got {list(f.shape)}")
    return f.mean(axis=0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def _sqrt_psd(c: np.ndarray) -> np.ndarray:
    vals, vecs = np.linalg.eigh(0.5 * (c + c.T))
    return (vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T


def frechet_distance(mu1, cov1, mu2, cov2) -> float:
    """Fréchet (2-Wasserstein²) distance between N(μ₁, Σ₁) and N(μ₂, Σ₂).

    tr((Σ₁Σ₂)^½) is computed as Σ √λ of the symmetric PSD matrix Σ₁^½ Σ₂ Σ₁^½ (same eigenvalues as Σ₁Σ₂), which is
    stable where scipy's sqrtm of the non-symmetric product can return complex noise."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    cov1, cov2 = np.atleast_2d(np.asarray(cov1, np.float64)), np.atleast_2d(np.asarray(cov2, np.float64))
    d = mu1.shape[0]
    if mu2.shape != (d,) or cov1.shape != (d, d) or cov2.shape != (d, d):
        raise ValueError(f"frechet_distance: shapes disagree: mu1 {mu1.shape}, cov1 {cov1.shape}, mu2 {mu2.shape}, "
                         f"cov2 {cov2.shape}")
    s1 = _sqrt_psd(cov1)
    mid = s1 @ cov2 @ s1
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh(0.5 * (mid + mid.T)), 0, None)).sum()
    fd = float(((mu1 - mu2) ** 2).sum() + np.trace(cov1) + np.trace(cov2) - 2 * tr_sqrt)
    return max(fd, 0.0)


def frechet_distance_features(f1, f2) -> float:
    return frechet_distance(*feature_statistics(f1), *feature_statistics(f2))


# --------------------------------------------------------------------------------------------------------------
# the small feature classifier
# --------------------------------------------------------------------------------------------------------------

class FeatureClassifier(nn.Module):
    """MLP on flattened inputs: in → 256 → 128 (features) → classes.  Shape-agnostic, tiny, trains in seconds."""

    def __init__(self, in_dim: int, num_classes: int, hidden: tuple[int, int] = (256, 128)):
        super().__init__()
        self.in_dim, self.num_classes, self.hidden = int(in_dim), int(num_classes), tuple(int(h) for h in hidden)
        self.body = nn.Sequential(nn.Linear(self.in_dim, self.hidden[0]), nn.ReLU(),
                                  nn.Linear(self.hidden[0], self.hidden[1]), nn.ReLU())
        self.head = nn.Linear(self.hidden[1], self.num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.reshape(x.shape[0], -1).to(torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def train_classifier(x, labels, *, epochs: int = 40, batch_size: int = 128, lr: float = 1e-3,
                     holdout: float = 0.1, seed: int = 0) -> tuple[FeatureClassifier, dict]:
    """Train a FeatureClassifier on (x [N, …] in [−1, 1], labels [N]); returns it (eval mode) and
    {train_accuracy, holdout_accuracy, epochs, num_classes}.  Deterministic given `seed`."""
    x = torch.as_tensor(np.asarray(x), dtype=torch.float32)
    if labels is None:
        raise ValueError("sample_quality: the feature classifier needs class labels; this dataset has none "
                         "(use --inception with local Inception weights instead)")
    y = torch.as_tensor(np.asarray(labels), dtype=torch.int64).reshape(-1)
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"sample_quality: {x.shape[0]} images but {y.shape[0]} labels")
    x = x.reshape(x.shape[0], -1)
    gen = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(x.shape[0], generator=gen)
    n_hold = int(round(holdout * x.shape[0]))
    hold, train = perm[:n_hold], perm[n_hold:]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        model = FeatureClassifier(x.shape[1], int(y.max()) + 1)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a net this small runs fastest on one thread (and does not fight other jobs)
    try:
        _fit(model, opt, x, y, train, epochs, batch_size, gen)
    finally:
        torch.set_num_threads(threads)
    model.eval()
    with torch.no_grad():
        acc = lambda idx: float((model(x[idx]).argmax(1) == y[idx]).float().mean()) if idx.numel() else float("nan")
        info = {"train_accuracy": acc(train), "holdout_accuracy": acc(hold), "epochs": int(epochs),
                "num_classes": model.num_classes, "in_dim": model.in_dim}
    return model, info


def _fit(model, opt, x, y, train, epochs, batch_size, gen) -> None:
    for _ in range(int(epochs)):
        order = train[torch.randperm(train.numel(), generator=gen)]
        for start in range(0, order.numel(), int(batch_size)):
            idx = order[start:start + int(batch_size)]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()


def save_classifier(model: FeatureClassifier, info: dict, path) -> None:
    with atomic_path(path) as tmp:
        torch.save({"state_dict": model.state_dict(), "in_dim": model.in_dim, "num_classes": model.num_classes,
                    "hidden": list(model.hidden), "info": info}, tmp)


def load_classifier(path) -> FeatureClassifier:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"feature classifier not found: {path} (make it with "
                                f"`python -m analysis.sample_quality train-classifier`)")
    ck = load_torch(path)
    model = FeatureClassifier(ck["in_dim"], ck["num_classes"], tuple(ck["hidden"]))
    model.load_state_dict(ck["state_dict"])
    return model.eval()


@torch.no_grad()
def classifier_features(model: FeatureClassifier, x, batch_size: int = 2048) -> np.ndarray:
    x = torch.as_tensor(np.asarray(x), dtype=torch.float32)
    if x[0].numel() != model.in_dim:
        raise ValueError(f"sample_quality: images have {x[0].numel()} values each but the classifier expects "
                         f"{model.in_dim}")
    return torch.cat([model.features(x[i:i + batch_size]) for i in range(0, x.shape[0], batch_size)]).numpy()


# --------------------------------------------------------------------------------------------------------------
# Inception (user-supplied weights only)
# --------------------------------------------------------------------------------------------------------------

def load_inception(path, device="cpu"):
    """Inception-v3 feature extractor from a local file; never downloads.  TorchScript first, then a torchvision
    inception_v3 state dict (needs torchvision).  Returns a callable images[B, 3, 299, 299] in [0, 255] → [B, 2048]."""
    if path is None or not Path(path).is_file():
        raise FileNotFoundError(f"Inception weights not found: {path!s} — FID needs a local TorchScript or "
                                f"state-dict file passed as --inception (weights are never downloaded)")
    try:
        return torch.jit.load(str(path), map_location=device).eval()
    except RuntimeError:
        pass
    state = torch.load(path, map_location=device, weights_only=True)
    try:
        import torchvision
    except ImportError:
        raise RuntimeError(f"{path} is a state dict, which needs torchvision's inception_v3 (not installed); "
                           f"pass a TorchScript file instead") from None
    net = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False)
    net.load_state_dict(state)
    net.fc = nn.Identity()
    return net.to(device).eval()


@torch.no_grad()
def inception_features(extractor, x, batch_size: int = 100, device="cpu") -> np.ndarray:
    """Images in [−1, 1], [N, C, H, W] (C = 1 or 3) → Inception features; grey images are repeated to RGB."""
    x = torch.as_tensor(np.asarray(x), dtype=torch.float32)
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"inception_features: need images [N, 1 or 3, H, W], got {list(x.shape)}")
    out = []
    for i in range(0, x.shape[0], batch_size):
        b = x[i:i + batch_size].to(device)
        b = b.expand(-1, 3, -1, -1) if b.shape[1] == 1 else b
        b = nn.functional.interpolate((b.clamp(-1, 1) + 1) * 127.5, size=(299, 299), mode="bilinear",
                                      align_corners=False)
        out.append(extractor(b).reshape(b.shape[0], -1).double().cpu())
    return torch.cat(out).numpy()


# --------------------------------------------------------------------------------------------------------------
# scoring
# --------------------------------------------------------------------------------------------------------------

def score_samples(samples, reference, classifier: FeatureClassifier, *, inception=None, seed: int = 0) -> dict:
    """FD of `samples` vs the `reference` (training) set in the classifier's feature space (+ FID with an
    Inception extractor), and the split floor: FD between two disjoint random halves of the reference, each of the
    samples' size (or half the reference when that is smaller)."""
    samples = np.clip(np.asarray(samples, np.float32), -1, 1)   # images live in [−1, 1]
    reference = np.asarray(reference, np.float32)
    f_ref = classifier_features(classifier, reference)
    out = {"num_samples": int(samples.shape[0]), "num_reference": int(reference.shape[0]),
           "fd_classifier": frechet_distance_features(classifier_features(classifier, samples), f_ref)}
    m = min(samples.shape[0], reference.shape[0] // 2)
    perm = np.random.default_rng(seed).permutation(reference.shape[0])
    out["fd_classifier_split_floor"] = frechet_distance_features(f_ref[perm[:m]], f_ref[perm[m:2 * m]])
    if inception is not None:
        out["fid_inception"] = frechet_distance_features(inception_features(inception, samples),
                                                         inception_features(inception, reference))
    return out


def _load_npz_x(path):
    """(x float32 [N, C, H, W], labels numpy [N] or None) of a dataset or samples file through training.dataset's reader
    (uint8 datasets become u/127.5 − 1, float samples stay as given)."""
    data = check_images(open_dataset(path))
    return data.float32(), (None if data.labels is None else data.labels.numpy())


def _read_or_exit(path):
    """_load_npz_x, or exit with the dataset's one-line error (training.dataset.DatasetError names the file)."""
    try:
        return _load_npz_x(path)
    except DatasetError as e:
        sys.exit(f"error: {e}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m analysis.sample_quality", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    tc = sub.add_parser("train-classifier", help="train the feature classifier on a dataset's labels")
    tc.add_argument("--data", required=True, help="dataset .npz (x, labels)")
    tc.add_argument("--out", required=True)
    tc.add_argument("--epochs", type=int, default=40)
    tc.add_argument("--seed", type=int, default=0)
    sc = sub.add_parser("score", help="Fréchet distance of samples (or a snapshot's samples) to the dataset")
    sc.add_argument("--classifier", required=True)
    sc.add_argument("--data", required=True)
    src = sc.add_mutually_exclusive_group(required=True)
    src.add_argument("--snapshot", help="training snapshot: sample it with Heun (EDM Alg. 1)")
    src.add_argument("--samples", help=".npz with generated samples in 'x'")
    sc.add_argument("--num", type=int, default=1000)
    sc.add_argument("--steps", type=int, default=18)
    sc.add_argument("--seed", type=int, default=0)
    sc.add_argument("--inception", default=None, help="local Inception TorchScript/state-dict file for FID")
    sc.add_argument("--out", required=True, help="score .json")
    args = ap.parse_args(argv)

    if args.cmd == "train-classifier":
        x, labels = _read_or_exit(args.data)
        model, info = train_classifier(x, labels, epochs=args.epochs, seed=args.seed)
        save_classifier(model, info, args.out)
        print(json.dumps(info))
        return
    inception = load_inception(args.inception) if args.inception is not None else None
    x, labels = _read_or_exit(args.data)
    meta = {}
    if args.snapshot:
        snap = load_torch(args.snapshot)
        cond = int(snap["arch"].get("label_dim", 0) or 0) > 0
        lab = None
        if cond and labels is not None:  # conditional net: labels drawn from the data's class frequencies
            lab = np.random.default_rng(args.seed).choice(labels, size=args.num)
        samples = sample_snapshot(args.snapshot, args.num, num_steps=args.steps, shape=x.shape[1:], labels=lab,
                                  seed=args.seed)
        meta = {"snapshot": str(args.snapshot), "steps": args.steps, "model": snap.get("model"),
                "images_seen": snap.get("images_seen")}
    else:
        samples, _ = _read_or_exit(args.samples)
        meta = {"samples": str(args.samples)}
    result = {**meta, **score_samples(samples, x, load_classifier(args.classifier), inception=inception,
                                      seed=args.seed)}
    out = Path(args.out)
    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
