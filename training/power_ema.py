"""EDM2's power-function EMA: the profiles a run keeps while training, and any other EMA length rebuilt afterwards.

A power-function EMA with exponent γ > 0 averages the raw weights θ_1 … θ_T of the first T optimizer steps with
weights that grow as τ^γ over the run so far: in continuous time p_T(τ) = (γ+1)·τ^γ / T^(γ+1) on [0, T]. Its width
relative to its own length, σ_rel = std(τ)/T, is fixed by γ alone:

    σ_rel² = (γ+1) / ((γ+2)²·(γ+3)),   i.e. γ is the largest real root of γ³ + 7γ² + (16 − σ_rel⁻²)γ + 12 − σ_rel⁻²

(σ_rel 0.05 ↔ γ ≈ 16.97, 0.10 ↔ γ ≈ 6.94; σ_rel < 1/√12 ≈ 0.2887, the uniform average γ = 0).  It is accumulated
with one buffer per profile: after step t, θ̂ ← β_t·θ̂ + (1 − β_t)·θ_t with β_t = (1 − 1/t)^(γ+1).  β_1 = 0 forgets
the initial weights at once, and the product of the β's telescopes, so the EMA stored after T steps is exactly

    θ̂_T = Σ_{k ≤ T} w_{γ,T}(k)·θ_k,    w_{γ,T}(k) = (k^(γ+1) − (k−1)^(γ+1)) / T^(γ+1)

(`profile_weights`: the continuous profile integrated over step k; the weights sum to 1).

Post-hoc reconstruction.  Every stored profile i (exponent γ_i, stored after T_i steps) is such a known weighted
average of the same raw weights, so a combination Σ_i x_i·θ̂_i has the weighting Σ_i x_i·w_i(k) over the steps.  For
a target (γ*, T*) the coefficients minimise Σ_k (Σ_i x_i·w_i(k) − w*(k))² over the steps k ≤ T*, among the
combinations whose coefficients sum to 1 (an average of weights stays an average): the normal equations of that
least-squares problem with its constraint, G·x + λ·1 = b, 1ᵀx = 1, where G_ij = Σ_k w_i(k)·w_j(k) and
b_i = Σ_k w_i(k)·w*(k) are sums over the run's steps, computed exactly in float64 in chunks.  EDM2 solves the same
normal equations with the continuous profiles' closed-form inner products and rescales the solution to sum 1
afterwards; here the sums are over the discrete steps the trainer actually took, so a target that is itself a
stored profile is reproduced exactly (to float64 rounding), and the constraint is part of the solve.  The
residual r(k) = Σ_i x_i·w_i(k) − w*(k) says how good the reconstruction is: for any weights,
|θ_rec − θ*| ≤ Σ_k |r(k)|·max_k |θ_k| element by element (`Reconstruction.residual_l1`).

Only profiles stored at or before T* take part (later ones average steps the target has not seen).  Profiles
stored at a few geometric snapshot marks reconstruct poorly far from the stored σ_rel (relative L2 residual ~0.3
at σ_rel 0.02 from 4 marks); `training.ema.profile_every_images` stores them densely, as EDM2 does.

Memory and disk: one fp32 copy of the weights per profile on every training process (the classic EMA is one), and
the same per stored point on disk: snapshots carry every profile (its first one doubles as the snapshot's `ema`,
shared storage, no extra bytes), profile files (ema_profiles/profile-<images>.pt) carry the profiles only.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

SIGMA_REL_MAX = 12 ** -0.5          # the uniform average (γ = 0): the widest power profile
PROFILE_DIR = "ema_profiles"
STEP_CHUNK = 1 << 16                # steps per chunk of the exact Gram sums


# ---------------------------------------------------------------------------------------------------------------
# σ_rel ↔ γ, the per-step β and the exact weights of a stored profile
# ---------------------------------------------------------------------------------------------------------------

def gamma_to_sigma_rel(gamma: float) -> float:
    """σ_rel = sqrt((γ+1) / ((γ+2)²(γ+3))) of the power profile with exponent γ."""
    g = float(gamma)
    return math.sqrt((g + 1) / ((g + 2) ** 2 * (g + 3)))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent γ > 0 of relative width σ_rel ∈ (0, 1/√12): the largest real root of the cubic (module doc),
    polished by Newton steps on σ_rel² (the cubic's root is well separated from the others there)."""
    s = float(sigma_rel)
    if not 0.0 < s < SIGMA_REL_MAX:
        raise ValueError(f"σ_rel must lie in (0, {SIGMA_REL_MAX:.4f}) (1/√12, the uniform average), got {s}")
    t = s ** -2
    g = float(max(np.roots([1.0, 7.0, 16.0 - t, 12.0 - t]).real))
    for _ in range(3):  # f(γ) = (γ+3)(γ+2)² − t(γ+1) = 0
        f = (g + 3) * (g + 2) ** 2 - t * (g + 1)
        df = (g + 2) ** 2 + 2 * (g + 3) * (g + 2) - t
        g -= f / df
    return g


def power_beta(step: int, gamma: float) -> float:
    """β_t = (1 − 1/t)^(γ+1) for the update after step t ≥ 1 (0 at t = 1: the EMA starts at θ_1)."""
    return (1.0 - 1.0 / int(step)) ** (float(gamma) + 1.0)


def profile_weights(gamma: float, steps: int, k) -> np.ndarray:
    """w_{γ,T}(k) for the steps k (array, 1-based) of the profile stored after T = `steps` steps; 0 for k > T.
    Written as (k/T)^(γ+1)·(1 − (1 − 1/k)^(γ+1)) to avoid the cancellation of the difference of powers."""
    k = np.asarray(k, dtype=np.float64)
    g1 = float(gamma) + 1.0
    inside = k <= steps
    kk = np.where(inside, k, 1.0)
    with np.errstate(divide="ignore"):
        last = -np.expm1(g1 * np.log1p(-1.0 / kk))  # 1 − (1 − 1/k)^(γ+1); 1 at k = 1
    return np.where(inside, (kk / steps) ** g1 * last, 0.0)


# ---------------------------------------------------------------------------------------------------------------
# the training side: one fp32 copy of the weights per profile
# ---------------------------------------------------------------------------------------------------------------

class PowerEMA:
    """The power-function EMA profiles of one run, one fp32 module per σ_rel; `modules[0]` is the template itself
    (training.train's EMA copy), so a snapshot's `ema` is the first profile."""

    def __init__(self, template: torch.nn.Module, sigma_rels):
        self.sigma_rels = [float(s) for s in sigma_rels]
        self.gammas = [sigma_rel_to_gamma(s) for s in self.sigma_rels]
        self.modules = [template] + [copy.deepcopy(template) for _ in self.sigma_rels[1:]]
        self.steps = 0  # optimizer steps averaged so far

    @torch.no_grad()
    def update(self, net: torch.nn.Module) -> list[float]:
        """Average in the weights of `net` after one more optimizer step (fp32, reshaped to the EMA's shapes: a
        ZeRO run promotes scalars to [1]); buffers are copied. Returns each profile's β."""
        self.steps += 1
        betas = [power_beta(self.steps, g) for g in self.gammas]
        params = [p.detach().to(torch.float32) for p in net.parameters()]
        for module, beta in zip(self.modules, betas):
            for p_ema, p in zip(module.parameters(), params):
                p_ema.lerp_(p.reshape(p_ema.shape), 1.0 - beta)
            for b_ema, b in zip(module.buffers(), net.buffers()):
                b_ema.copy_(b)
        return betas

    def record(self, batch_size: int) -> dict:
        """What a snapshot or profile file stores: the σ_rel values, their γ, the steps averaged, the batch size
        and one state dict per profile (tensors shared with the modules: saving it copies nothing in memory)."""
        return {"sigma_rel": list(self.sigma_rels), "gamma": list(self.gammas), "steps": int(self.steps),
                "batch_size": int(batch_size), "profiles": [m.state_dict() for m in self.modules]}

    def state_dict(self) -> dict:
        return {"sigma_rel": list(self.sigma_rels), "steps": int(self.steps),
                "profiles": [m.state_dict() for m in self.modules]}

    def load_state_dict(self, state: dict, where: str = "state.pt") -> None:
        saved = [float(s) for s in state.get("sigma_rel", [])]
        if saved != self.sigma_rels:
            raise ValueError(f"{where}: its power EMA keeps σ_rel {saved}, this run {self.sigma_rels}")
        for module, sd in zip(self.modules, state["profiles"]):
            module.load_state_dict(sd)
        self.steps = int(state["steps"])


def profile_path(out: Path, images_seen: int) -> Path:
    """A profile-only file of a run folder (training.ema.profile_every_images)."""
    return Path(out) / PROFILE_DIR / f"profile-{int(images_seen):09d}.pt"


def profile_marks(training: dict, total: int) -> list[int]:
    """Images-seen marks of the profile-only files: every training.ema.profile_every_images (rounded to whole
    batches), none when it is unset."""
    every = (training.get("ema") or {}).get("profile_every_images")
    if not every:
        return []
    batch = int(training["batch_size"])
    every = max(int(round(int(every) / batch)), 1) * batch
    return list(range(every, int(total) + 1, every))


# ---------------------------------------------------------------------------------------------------------------
# reconstruction
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class Reconstruction:
    """Coefficients of the stored profiles (in `sources` order) for one target, and the fit's residual over the
    steps: relative L2 ‖r‖/‖w*‖ and L1 Σ|r| (the bound factor of the module doc); `stored` and `target` are the
    (steps, γ) of the profiles combined and of the target."""
    coefficients: np.ndarray
    residual_rel_l2: float
    residual_l1: float
    stored: list
    target: tuple


def _step_chunks(last: int):
    for lo in range(1, int(last) + 1, STEP_CHUNK):
        yield np.arange(lo, min(lo + STEP_CHUNK, int(last) + 1), dtype=np.float64)


def solve_coefficients(stored, target) -> Reconstruction:
    """Least-squares coefficients x (Σ x = 1) with Σ_i x_i·w_{γ_i,T_i} ≈ w_{γ*,T*} over the steps.

    stored: [(steps T_i, γ_i)]; target: (T*, γ*). Every T_i must be ≤ T* (the caller selects them)."""
    stored = [(int(t), float(g)) for t, g in stored]
    t_out, g_out = int(target[0]), float(target[1])
    if not stored:
        raise ValueError("post-hoc EMA: no stored profile at or before the target")
    if max(t for t, _ in stored) > t_out:
        raise ValueError("post-hoc EMA: a stored profile is later than the target")
    n = len(stored)
    gram, rhs = np.zeros((n, n)), np.zeros(n)
    for k in _step_chunks(t_out):
        w = np.stack([profile_weights(g, t, k) for t, g in stored])
        w_out = profile_weights(g_out, t_out, k)
        gram += w @ w.T
        rhs += w @ w_out
    kkt = np.zeros((n + 1, n + 1))
    kkt[:n, :n], kkt[:n, n], kkt[n, :n] = gram, 1.0, 1.0
    x = np.linalg.lstsq(kkt, np.append(rhs, 1.0), rcond=None)[0][:n]
    sq, l1, norm = 0.0, 0.0, 0.0
    for k in _step_chunks(t_out):
        w_out = profile_weights(g_out, t_out, k)
        r = x @ np.stack([profile_weights(g, t, k) for t, g in stored]) - w_out
        sq, l1, norm = sq + float(r @ r), l1 + float(np.abs(r).sum()), norm + float(w_out @ w_out)
    return Reconstruction(coefficients=x, residual_rel_l2=math.sqrt(sq / norm), residual_l1=l1, stored=stored,
                          target=(t_out, g_out))


def stored_profiles(record: dict, where) -> list[tuple[int, float, float, int]]:
    """(steps, γ, σ_rel, index) of every profile a snapshot's or profile file's `ema_power` record holds."""
    try:
        steps, gammas, sigmas = int(record["steps"]), record["gamma"], record["sigma_rel"]
        if len(record["profiles"]) != len(gammas) or len(gammas) != len(sigmas) or steps < 1:
            raise ValueError("its lists differ in length")
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{where}: not a power-EMA record ({e})") from None
    return [(steps, float(g), float(s), i) for i, (g, s) in enumerate(zip(gammas, sigmas))]


def read_power_record(path) -> dict:
    """The `ema_power` record of a snapshot or profile file (checked against its sidecar, tensors only)."""
    from study.integrity import load_torch  # torch files are read through the project's safe reader

    data = load_torch(path, mmap=True)  # tensors are paged in as the sums read them
    if not isinstance(data, dict) or "ema_power" not in data:
        raise ValueError(f"{path}: holds no power-EMA profiles (trained with training.ema.kind: classic?)")
    return data["ema_power"]


def run_profile_files(run_dir) -> list[Path]:
    """Every file of a run folder that holds power-EMA profiles: its snapshots and its profile-only files."""
    run_dir = Path(run_dir)
    return sorted((run_dir / "snapshots").glob("snapshot-*.pt")) + sorted((run_dir / PROFILE_DIR).glob("*.pt"))


def read_profiles(files) -> list[tuple[Path, dict]]:
    """(path, `ema_power` record) of every file, read once for several reconstructions (`reconstruct(records=)`)."""
    return [(Path(f), read_power_record(f)) for f in files]


def reconstruct(files, sigma_rel: float, steps: int | None = None, *, use_sigma_rels=None,
                records=None) -> tuple[dict, Reconstruction]:
    """The EMA of relative width `sigma_rel` after `steps` optimizer steps (default: the latest stored), as an
    fp32 state dict, from the power-EMA profiles of `files` (snapshots and profile files of one run); only those
    stored at or before `steps` take part (and, given `use_sigma_rels`, only profiles of those σ_rel). Buffers
    come from a profile stored at `steps`. `records` (from read_profiles) stands in for reading `files`."""
    records = read_profiles(files) if records is None else records
    entries = [(p, rec, e) for p, rec in records for e in stored_profiles(rec, p)
               if use_sigma_rels is None or any(math.isclose(e[2], s, rel_tol=1e-12) for s in use_sigma_rels)]
    if not entries:
        raise ValueError("post-hoc EMA: no files given")
    steps = max(e[0] for _, _, e in entries) if steps is None else int(steps)
    use = [(p, rec, e) for p, rec, e in entries if e[0] <= steps]
    if not any(e[0] == steps for _, _, e in use):
        raise ValueError(f"post-hoc EMA: no stored profile at step {steps} (stored: "
                         f"{sorted({e[0] for _, _, e in entries})})")
    solution = solve_coefficients([(e[0], e[1]) for _, _, e in use], (steps, sigma_rel_to_gamma(sigma_rel)))
    last = next(rec["profiles"][e[3]] for _, rec, e in use if e[0] == steps)
    sums = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in last.items() if v.is_floating_point()}
    varies = dict.fromkeys(sums, False)  # buffers (copied by the trainer, equal in every profile) stay copies
    for (_, rec, e), x in zip(use, solution.coefficients):
        sd = rec["profiles"][e[3]]
        for k in sums:
            sums[k] += float(x) * sd[k].to(torch.float64)
            varies[k] = varies[k] or not torch.equal(sd[k], last[k])
    state = {k: (sums[k].to(v.dtype) if varies.get(k) else v.clone()) for k, v in last.items()}
    return state, solution
