"""Intervals from a study's replicate rows (analysis.resample): the evaluation noise alone, and the total.

Every statistic is computed on every row: the estimate (row 0), bootstrap replicates of the evaluation triples
("evaluation"), the same replicates with each size's seed runs resampled too ("seed", where a size has several
seeds), and the study with one model left out ("jackknife", one row per size). From them, at 95%:

- evaluation noise only: the basic bootstrap interval [2θ̂ − q97.5, 2θ̂ − q2.5] of the evaluation replicates. A
  replicate carries the evaluation noise twice (the set's own, then the resample's), so a statistic the noise
  biases — ρ drops with every bit of noise — sits lower in the replicates than the estimate; the basic interval
  reflects the replicates about the estimate and so corrects that bias (the percentile interval goes the wrong
  way, and shifting it to the estimate corrects only half).
- total: the bootstrap part (the seed replicates where there are seeds, else the evaluation ones) widened by the
  leave-one-model-out jackknife, in quadrature on each side of the basic interval's centre: the jackknife's
  standard error √((M−1)/M·Σ(θ₋ₘ − θ̄)²) times Student's t with M − 1 degrees of freedom. The models of a study are
  its few independent pieces of evidence — the snapshots of one run share its seed and its misfit — and only
  leaving models out sees that. The total interval also always contains every leave-one-model-out value.

Statistics with a bounded range are handled in a space where they are not: ρ through Fisher's z = atanh ρ (so an
interval never passes 1), exponent ratios and floors are clipped to their range. ρ's intervals end at 1: every
noise — the evaluation set's, a run's seed, a snapshot's — only lowers ρ, and with one training run per size the
data cannot tell seed noise from misfit, so they cannot exclude a law the loss follows exactly (on simulated studies
whose law is nearly exact, noise pulls ρ from 0.9999 to 0.998, far more than a bootstrap's reflection can undo).
Where more than 2.5% of the bootstrap rows have no value, there is no interval (a percentile would then be a
guess).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from scipy import special

LEVEL = 95.0
MAX_INVALID_FRACTION = 0.025
MIN_JACKKNIFE = 3            # models a jackknife needs (leave-one-out values)


def _forward(v, transform):
    v = np.asarray(v, dtype=np.float64)
    if transform == "fisher":
        return np.arctanh(np.clip(v, -1 + 1e-15, 1 - 1e-15))
    return v


def _backward(v, transform):
    return np.tanh(v) if transform == "fisher" else v


_QUANTILES = [(100 - LEVEL) / 2, 50.0, (100 + LEVEL) / 2]


def _percentiles(draws: np.ndarray):
    """2.5/50/97.5 percentiles of the finite values along the last axis, and the fraction that is not finite."""
    draws = np.atleast_2d(draws)
    bad = ~np.isfinite(draws)
    if draws.shape[-1] == 0 or bad.all():
        q = np.full((3, draws.shape[0]), np.nan)
    elif not bad.any():
        q = np.percentile(draws, _QUANTILES, axis=-1)
    else:
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)   # rows without a value stay NaN
            q = np.nanpercentile(np.where(bad, np.nan, draws), _QUANTILES, axis=-1)
    return q[0], q[1], q[2], bad.mean(axis=-1) if draws.shape[-1] else np.zeros(draws.shape[0])


def basic_interval(estimate, draws, *, transform=None, bounds=None) -> tuple[float, float]:
    """The basic bootstrap 95% interval of one statistic: (lo, hi), NaN where there is none."""
    lo, hi, _ = _basic(np.atleast_1d(estimate), np.atleast_2d(draws), transform)
    lo, hi = _clip(_backward(lo, transform), bounds), _clip(_backward(hi, transform), bounds)
    return float(lo[0]), float(hi[0])


def percentile_interval(draws, *, bounds=None) -> tuple[float, float]:
    """The plain percentile 95% interval (2.5 and 97.5 percentiles) of bootstrap draws: the single fits' resamples
    of their points (analysis.single_fits), where the statistic's own noise is the resampled one."""
    lo, _, hi, bad = _percentiles(np.atleast_2d(draws))
    if bad[0] > MAX_INVALID_FRACTION:
        return math.nan, math.nan
    return float(_clip(lo, bounds)[0]), float(_clip(hi, bounds)[0])


def _basic(est, draws, transform):
    """(lo, hi, centre) in the transformed space; rows [B] of estimates and draws [B, R]."""
    t = _forward(est, transform)
    q_lo, q_med, q_hi, bad = _percentiles(_forward(draws, transform))
    missing = ~np.isfinite(t) | (bad > MAX_INVALID_FRACTION)
    nan = np.where(missing, np.nan, 1.0)
    return (2 * t - q_hi) * nan, (2 * t - q_lo) * nan, (2 * t - q_med) * nan


def jackknife(values, transform=None):
    """(half-width, standard error, number of values) of the leave-one-model-out values [B, M] (NaN = not
    available): t_{M−1} · √((M−1)/M · Σ(θ₋ₘ − θ̄)²); NaN with fewer than MIN_JACKKNIFE values."""
    t = _forward(np.atleast_2d(values), transform)
    ok = np.isfinite(t)
    m = ok.sum(axis=-1)
    mean = np.where(ok, t, 0.0).sum(-1) / np.maximum(m, 1)
    ss = np.where(ok, (t - mean[..., None]) ** 2, 0.0).sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        se = np.sqrt((m - 1) / m * ss)
        half = special.stdtrit(np.maximum(m - 1, 1), (100 + LEVEL) / 200) * se
    enough = m >= MIN_JACKKNIFE
    return np.where(enough, half, np.nan), np.where(enough, se, np.nan), m


def _clip(v, bounds):
    if bounds is None:
        return v
    return np.clip(v, bounds[0], bounds[1])


def intervals(values: np.ndarray, kinds, *, transform=None, bounds=None, extra_jackknife=(), total_upper=None) -> dict:
    """Both intervals of one statistic from its values on every row.

    ``values`` [rows] or [B, rows] (B studies stacked, each laid out as ``kinds`` [rows]). ``extra_jackknife``:
    further leave-one-model-out value sets [B, M'] whose variances add (e.g. the other family of a difference).
    ``total_upper``: the upper end of both intervals (ρ: 1, see above).
    Returns arrays [B] (scalars' shape for one study): estimate, eval_lo, eval_hi, lo, hi (total), and
    jackknife_se, n_jackknife, invalid (fraction of bootstrap rows without a value)."""
    values = np.asarray(values, dtype=np.float64)
    single = values.ndim == 1
    values = np.atleast_2d(values)
    kinds = np.asarray(kinds)
    est = values[:, 0]
    evaluation = values[:, kinds == "evaluation"]
    boot = values[:, kinds == "seed"] if (kinds == "seed").any() else evaluation
    jack_sets = [values[:, kinds == "jackknife"]] + [np.atleast_2d(j) for j in extra_jackknife]
    out = {"estimate": est}
    if evaluation.shape[1] == 0:
        nan = np.full(len(est), np.nan)
        out.update(eval_lo=nan, eval_hi=nan, lo=nan, hi=nan, jackknife_se=nan, n_jackknife=np.zeros(len(est)),
                   invalid=nan)
        return {k: v[0] for k, v in out.items()} if single else out
    e_lo, e_hi, e_centre = _basic(est, evaluation, transform)
    b_lo, b_hi, centre = (e_lo, e_hi, e_centre) if boot is evaluation else _basic(est, boot, transform)
    var, n_jack = np.zeros(len(est)), np.zeros(len(est))
    lows, highs = np.full(len(est), np.inf), np.full(len(est), -np.inf)
    for jk in jack_sets:
        half, se, m = jackknife(jk, transform)
        var = var + half ** 2
        n_jack = np.maximum(n_jack, m)
        t = _forward(jk, transform)
        if jk is jack_sets[0]:
            out["jackknife_se"] = se
            if jk.shape[-1]:  # a study of one model has no leave-one-model-out values
                lows = np.nanmin(np.where(np.isfinite(t), t, np.inf), axis=-1)
                highs = np.nanmax(np.where(np.isfinite(t), t, -np.inf), axis=-1)
    lo = centre - np.sqrt((centre - b_lo) ** 2 + var)
    hi = centre + np.sqrt((b_hi - centre) ** 2 + var)
    # never narrower than what leaving one model out moves
    lo, hi = np.minimum(lo, lows), np.maximum(hi, highs)
    _, _, _, bad = _percentiles(_forward(boot, transform))
    e_hi = _backward(e_hi, transform) if total_upper is None else np.where(np.isfinite(e_lo), total_upper, np.nan)
    out.update(eval_lo=_clip(_backward(e_lo, transform), bounds), eval_hi=_clip(e_hi, bounds),
               lo=_clip(_backward(lo, transform), bounds),
               hi=_clip(_backward(hi, transform), bounds) if total_upper is None else np.where(np.isfinite(lo),
                                                                                                 total_upper, np.nan),
               n_jackknife=n_jack, invalid=bad)
    return {k: v[0] for k, v in out.items()} if single else out


def interval_note(iv: dict) -> str:
    """Why an interval is missing ('' when both are there)."""
    if iv["invalid"] > MAX_INVALID_FRACTION:
        return f"no interval: {iv['invalid']:.0%} of replicates had no value"
    if np.isfinite(iv["eval_lo"]) and not np.isfinite(iv["lo"]):
        return f"no total interval: {int(iv['n_jackknife'])} leave-one-model-out values (need {MIN_JACKKNIFE})"
    return ""


def set_fields(row: dict, name: str, values, kinds, notes: list, *, allow: bool = True, transform=None,
               bounds=None, extra_jackknife=(), total_upper=None, mark_clipped: bool = False) -> dict:
    """row[name] = the estimate; row[name_ci_lo/hi] = the total interval (the headline); row[name_eval_ci_lo/hi]
    = evaluation noise only. Appends the reason for a missing interval to ``notes``, and with ``mark_clipped`` which
    end of the total interval was clipped to ``bounds`` (the feasible set: a floor between 0 and the smallest loss
    of its fit). Returns the interval dict."""
    values = np.asarray(values, dtype=np.float64)
    row[name] = float(values[0])
    iv = intervals(values, kinds, transform=transform, bounds=bounds, extra_jackknife=extra_jackknife,
                   total_upper=total_upper)
    if mark_clipped and allow and bounds is not None:
        raw = intervals(values, kinds, transform=transform, extra_jackknife=extra_jackknife, total_upper=total_upper)
        for end, side, bound in (("lo", "lower", bounds[0]), ("hi", "upper", bounds[1])):
            if np.isfinite(raw[end]) and (raw[end] < bound if end == "lo" else raw[end] > bound):
                notes.append(f"{name}: {side} end clipped at the feasible bound {bound:.4g} (unclipped "
                             f"{float(raw[end]):.4g})")
    if not allow:
        iv = {**iv, "eval_lo": math.nan, "eval_hi": math.nan, "lo": math.nan, "hi": math.nan}
    row[f"{name}_ci_lo"], row[f"{name}_ci_hi"] = float(iv["lo"]), float(iv["hi"])
    row[f"{name}_eval_ci_lo"], row[f"{name}_eval_ci_hi"] = float(iv["eval_lo"]), float(iv["eval_hi"])
    note = interval_note(iv) if allow else ""
    if note and note not in notes:
        notes.append(note)
    return iv
