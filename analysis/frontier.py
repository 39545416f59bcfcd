"""Which snapshots a fit uses: the compute frontier, each model's final snapshot, the largest model.

A study fits the compute axis on ONE frontier, chosen on the total loss — the snapshots whose total L is strictly
below every total L reached with less compute — and reuses it for every σ and quantity (choosing it per quantity on
noisy values would bias it low). The same rule serves one row of losses (``lower_envelope``) and every replicate at
once (``frontier_mask``); a snapshot whose loss is not finite (left out of a replicate) is never on it.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd


def lower_envelope(compute, loss) -> np.ndarray:
    """Indices of the compute-optimal frontier, sorted by compute.

    A point is on the frontier when its loss is strictly below every loss reached at lower compute (ties in
    compute: only the lowest loss can qualify; ties in loss: the cheaper point wins). Non-finite points are ignored.
    Use ``compute[idx], loss[idx]`` for the frontier's coordinates.
    """
    c = np.asarray(compute, dtype=np.float64)
    l = np.asarray(loss, dtype=np.float64)
    if c.ndim != 1 or l.ndim != 1:
        raise ValueError(f"compute and loss must be one-dimensional, got shapes {c.shape} and {l.shape}")
    if c.shape != l.shape:
        raise ValueError(f"compute and loss must have the same length, got {c.size} and {l.size}")
    ok = np.flatnonzero(np.isfinite(c) & np.isfinite(l))
    order = ok[np.lexsort((l[ok], c[ok]))]  # by compute, then loss
    frontier, best = [], math.inf
    for i in order:
        if l[i] < best:
            frontier.append(int(i))
            best = l[i]
    return np.asarray(frontier, dtype=np.int64)


def frontier_mask(flops: np.ndarray, total_loss: np.ndarray) -> np.ndarray:
    """[R, S] bool: snapshot s is on row r's compute frontier (``lower_envelope`` for every row at once).

    Snapshots of equal compute are taken as one group: only the group's lowest finite loss can be on the frontier,
    and only if it is below every loss reached with less compute."""
    flops = np.asarray(flops, dtype=np.float64)
    total_loss = np.atleast_2d(np.asarray(total_loss, dtype=np.float64))
    order = np.argsort(flops, kind="stable")
    mask = np.zeros(total_loss.shape, dtype=bool)
    best = np.full(total_loss.shape[0], np.inf)
    rows = np.arange(total_loss.shape[0])
    for group in np.split(order, np.flatnonzero(np.diff(flops[order]) != 0) + 1):
        v = np.where(np.isfinite(total_loss[:, group]), total_loss[:, group], np.inf)
        j = np.argmin(v, axis=1)                     # the first of equal losses: the lexsort order of lower_envelope
        low = v[rows, j]
        on = low < best
        mask[rows[on], group[j[on]]] = True
        best = np.where(on, low, best)
    return mask


def final_mask(snapshots: pd.DataFrame) -> np.ndarray:
    """[S] bool: each model's last snapshot."""
    last = snapshots.groupby("model", sort=False)["images_seen"].transform("max")
    return (snapshots["images_seen"] == last).to_numpy()


def largest_model_mask(params: np.ndarray, available: np.ndarray) -> np.ndarray:
    """[R, S] bool: the snapshots of each row's largest model among its available snapshots (the model an
    extrapolation test holds out)."""
    params = np.asarray(params, dtype=np.float64)
    available = np.atleast_2d(available)
    top = np.where(available, params, -np.inf).max(axis=1, keepdims=True)
    return available & (params == top)
