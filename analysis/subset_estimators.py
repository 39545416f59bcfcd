"""The subset estimators' D̂ of one block of samples (analysis.optimal_loss builds `snis`, `dol`, `cdol` and `cdol-nn`
on them; its docstring defines each estimator): logits against a random subset of the data, the source-plus-subset
softmax of DOL and cDOL, and cdol-nn's exactly enumerated nearest neighbours with its variance correction.

The names keep the leading underscore they had inside analysis.optimal_loss: they are its estimators' parts, not an
interface for the rest of the study.
"""

from __future__ import annotations

import math

import torch

from analysis.centred_data import CentredData
from analysis.posterior import F32_LOGIT_TOL, default_chunk, logit_error_bound, no_tf32


def _subset_logits(data: CentredData, xq: torch.Tensor, sigma: float, subset: torch.Tensor) -> torch.Tensor:
    """Logits −‖x − x0_s‖²/2σ² of the queries against one subset, float64 [B, L] (float32 GEMM when safe)."""
    sig = torch.full((xq.shape[0],), sigma, dtype=torch.float64, device=xq.device)
    safe = bool((logit_error_bound(xq, sig, data) <= F32_LOGIT_TOL).all())
    dtype = torch.float32 if safe else torch.float64
    x, xs = xq.to(dtype), data.rows(subset, dtype)
    with no_tf32():
        g = (x @ xs.T).double()
    xs_sq = (xs.double() ** 2).sum(1) if dtype == torch.float64 else (xs ** 2).sum(1).double()
    dist = ((x.double() ** 2).sum(1)[:, None] + xs_sq[None, :] - 2.0 * g).clamp_(min=0)
    return dist.mul_(-0.5 / sigma ** 2)


def _subset_denoise(data: CentredData, estimator: str, xq, eps, src, sigma: float, subset, log_c: float):
    """D̂ (centred, float64 [B, D]) of one block under a subset estimator."""
    xs = data.rows(subset, torch.float64)
    logits = _subset_logits(data, xq, sigma, subset)
    if estimator == "snis":
        return torch.softmax(logits, dim=1) @ xs
    # DOL / cDOL: the source plus exactly L − 1 others — drop the source from the subset where it was drawn,
    # else drop the subset's last point.
    drop = subset[None, :] == src[:, None]
    drop[:, -1] |= ~drop.any(dim=1)
    others = logits.add_(log_c).masked_fill_(drop, -math.inf)
    src_logit = -0.5 * (eps ** 2).sum(1, keepdim=True)        # ‖x − x0_src‖² = σ²‖ε‖² exactly: no cancellation
    w = torch.softmax(torch.cat([src_logit, others], dim=1), dim=1)
    return w[:, :1] * data.rows(src, torch.float64) + w[:, 1:] @ xs


def _nn_count(subset_size: int, n: int) -> int:
    """K, the neighbours cdol-nn enumerates exactly: a quarter of the budget L, at most 64 (and ≤ N − 2)."""
    return int(max(1, min(64, (subset_size - 1) // 4, n - 2)))


def _knn_graph(data: CentredData, k: int, chunk: int | None) -> torch.Tensor:
    """[N, k] indices of each point's k nearest other points (float32 GEMM distances: the stratum only has to
    be near, not exactly the nearest — any fixed set per source keeps cdol-nn's sums unbiased).  O(N²·D), once
    per dataset, with a running top-k over data chunks."""
    out = torch.empty(data.n, k, dtype=torch.int64, device=data.device)
    ch = chunk or default_chunk(data.device, 1024, data.dim, data.n)
    for r0 in range(0, data.n, 1024):
        rows = data.chunk(r0, r0 + 1024, torch.float32)
        b = rows.shape[0]
        best_v = torch.full((b, k + 1), math.inf, device=data.device)
        best_i = torch.full((b, k + 1), -1, dtype=torch.int64, device=data.device)
        for c0 in range(0, data.n, ch):
            cols = data.chunk(c0, c0 + ch, torch.float32)
            with no_tf32():
                dist = (cols ** 2).sum(1)[None, :] - 2.0 * (rows @ cols.T)        # + ‖row‖², same per row
            idx = torch.arange(c0, c0 + cols.shape[0], device=data.device).expand(b, -1)
            v, pos = torch.cat([best_v, dist], 1).topk(k + 1, dim=1, largest=False)
            best_v, best_i = v, torch.cat([best_i, idx], 1).gather(1, pos)
        drop = best_i == torch.arange(r0, r0 + b, device=data.device)[:, None]   # the point itself …
        drop[:, -1] |= ~drop.any(dim=1)                                          # … or the farthest of k + 1
        out[r0:r0 + b] = best_i[~drop].view(b, k)
    return out


def _nn_denoise(data: CentredData, xq, eps, src, sigma: float, subset, knn, c_value):
    """cdol-nn's D̂ (centred, float64 [B, D]): the source and its K nearest neighbours exactly (C = 1), plus the
    random subset without them, weighted up by C = (N − 1 − K)/(its size) (stratified sampling: numerator and
    denominator of D* unbiased) or by the given C."""
    b, dim = xq.shape
    k = knn.shape[1]
    nb = knn.index_select(0, src)                                              # [B, K]
    x_nb = data.rows(nb.reshape(-1), torch.float64).view(b, k, dim)
    nb_logit = -((xq[:, None, :] - x_nb) ** 2).sum(-1) * (0.5 / sigma ** 2)   # exact differences
    xs = data.rows(subset, torch.float64)
    logits = _subset_logits(data, xq, sigma, subset)
    excl = (subset[None, :] == src[:, None]) | (subset[None, :, None] == nb[:, None, :]).any(-1)
    count = (subset.numel() - excl.sum(1)).clamp(min=1).double()
    c_row = (data.n - 1 - k) / count if c_value is None else torch.full_like(count, float(c_value))
    others = logits.add_(torch.log(c_row)[:, None]).masked_fill_(excl, -math.inf)
    src_logit = -0.5 * (eps ** 2).sum(1, keepdim=True)
    w = torch.softmax(torch.cat([src_logit, nb_logit, others], dim=1), dim=1)
    den = (w[:, :1] * data.rows(src, torch.float64) + torch.bmm(w[:, None, 1:k + 1], x_nb)[:, 0]
           + w[:, k + 1:] @ xs)
    # the sampled stratum makes D̂ = D* + noise, so ‖D̂‖² overestimates ‖D*‖² by tr Var(D̂) (the large-σ bias
    # ≈ variance/L of every subset estimator).  Delta method: D̂ − D* ≈ Σ_S π_n (x_n − D*), a sum of |S| iid
    # terms, whose variance the sample itself estimates: |S|/(|S|−1)·(Σ‖v_n‖² − ‖Σ v_n‖²/|S|), v_n = π_n(x_n − D̂)
    pi = w[:, k + 1:]
    cross = den @ xs.T                                                         # ⟨D̂, x_n⟩
    sq_dev = ((xs ** 2).sum(1)[None, :] - 2 * cross + (den ** 2).sum(1, keepdim=True)).clamp_(min=0)
    sum_v = pi @ xs - pi.sum(1, keepdim=True) * den
    s_count = count.clamp(min=2)
    var_tr = s_count / (s_count - 1) * ((pi ** 2 * sq_dev).sum(1) - (sum_v ** 2).sum(1) / s_count)
    return den, var_tr.clamp_(min=0)
