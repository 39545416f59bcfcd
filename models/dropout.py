"""Dropout whose masks are a pure function of (seed, the image's position in the training stream, layer, element).

torch's dropout draws from the global generator: every rank seeded alike draws the same masks, and a mask depends
on how a batch is split into micro-batches.  Here the keep/drop decision of element e of an image is a hash of
(training seed, the image's position p in the endless training stream, the layer's index, e):
  * ranks draw different masks, because their images sit at different stream positions;
  * splitting a batch into micro-batches, or over more processes, changes no mask;
  * a resumed run redraws exactly the masks of the interrupted one (no generator state to save).
The trainer names the stream positions of each forward with `dropout_stream(net, seed, positions)`; outside it
(evaluation never drops; a bare train-mode forward, e.g. the FLOP counter's) `StreamDropout` is torch's dropout.

The hash: 32-bit integer mixing (xor-shift-multiply, two multiplications per round, products below 2^63 so int64
arithmetic never overflows), keyed per image by (seed, layer, position) and applied in two keyed rounds to the
element index, so two images' masks are unrelated, not shifted copies of one sequence.  Integer arithmetic: the
same masks on every device and thread count.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch import nn
from torch.nn import functional as F

_MASK32 = 0xFFFFFFFF
_MULTIPLIER = 0x45D9F3B   # < 2^27: a 32-bit value times it stays below 2^59


def mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijective avalanche mix of 32-bit values held in int64 (every output bit depends on every input bit)."""
    x = ((x >> 16) ^ x) * _MULTIPLIER & _MASK32
    x = ((x >> 16) ^ x) * _MULTIPLIER & _MASK32
    return (x >> 16) ^ x


def _mix_rounds_(x: torch.Tensor) -> torch.Tensor:
    """mix32 but for its final xor-shift, in place (no temporaries but one shift per round)."""
    for _ in range(2):
        x ^= x >> 16
        x *= _MULTIPLIER
        x &= _MASK32
    return x


def _mix32_int(x: int) -> int:
    """mix32 of one Python int (the same arithmetic on the host: no tensor, no copy to the device)."""
    for _ in range(2):
        x = ((x >> 16) ^ x) * _MULTIPLIER & _MASK32
    return (x >> 16) ^ x


def _absorb_int(key: int, value: int) -> int:
    key = _mix32_int(key ^ (value & _MASK32))
    return _mix32_int(key ^ (value >> 32 & _MASK32))


def _absorb(key: torch.Tensor | int, value: torch.Tensor) -> torch.Tensor:
    """Fold non-negative int64 values (up to 64 bits) into 32-bit keys; `key` a tensor or a Python int."""
    key = mix32(value & _MASK32 ^ key)
    return mix32(key ^ (value >> 32 & _MASK32))


@functools.lru_cache(maxsize=4096)
def layer_key(seed: int, layer: int) -> int:
    """The 32-bit key of (seed, layer), computed on the host once: a Python int, so keying a batch by it copies
    nothing to the device (a tensor made from it would, twice per layer and forward: a sync on a GPU)."""
    return _absorb_int(_absorb_int(0, int(seed)), int(layer))


def image_keys(seed: int, layer: int, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two 32-bit round keys [B] per image from (seed, layer, stream position)."""
    key = _absorb(layer_key(seed, layer), positions.to(torch.int64))
    return key, mix32(key ^ 0x9E3779B9)


def keep_mask(seed: int, layer: int, positions: torch.Tensor, numel: int, p: float) -> torch.Tensor:
    """Bool [B, numel]: which elements of each image's activation survive dropout with probability p.  One 32-bit
    hash decides two neighbouring elements (16 bits each: p is applied to within 2^-16), which halves the
    hashing, the part of the cost that grows with the activations.  The hash u = mix32(mix32(c ^ k1) ^ k2) of pair
    c runs in place on one int64 buffer; its last xor-shift is folded into the two decisions (u's high half is
    the pre-xor value's, its low half that xored with the high), which are written straight into the
    interleaved mask: 25 elementwise passes over the pairs, no stacked copy."""
    pairs = (numel + 1) // 2
    if pairs >= 1 << 32:
        raise ValueError(f"StreamDropout: {numel} elements per image exceed the hash's counter")
    k1, k2 = image_keys(seed, layer, positions)
    counter = torch.arange(pairs, dtype=torch.int64, device=positions.device)
    x = torch.bitwise_xor(counter[None], k1[:, None])
    _mix_rounds_(x)
    x ^= x >> 16                     # mix32's final xor-shift
    x ^= k2[:, None]
    _mix_rounds_(x)
    high = x >> 16                   # u >> 16
    x ^= high
    x &= 0xFFFF                      # u & 0xFFFF
    threshold = round(p * 65536)
    keep = torch.empty((positions.shape[0], pairs, 2), dtype=torch.bool, device=positions.device)
    torch.ge(x, threshold, out=keep[:, :, 0])
    torch.ge(high, threshold, out=keep[:, :, 1])
    keep = keep.reshape(positions.shape[0], 2 * pairs)
    return keep if numel == 2 * pairs else keep[:, :numel]


class StreamDropout(nn.Module):
    """Dropout with probability p (scaled by 1/(1 − p) in training, identity in eval), its masks drawn by
    `keep_mask` from the stream positions the trainer sets with `dropout_stream`."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {p}")
        self.p = float(p)
        self.stream = None  # (seed, layer index, positions [B]) while the trainer's forward runs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if self.stream is None:
            return F.dropout(x, p=self.p)
        seed, layer, positions = self.stream
        if positions.shape[0] != x.shape[0]:
            raise ValueError(f"StreamDropout: {positions.shape[0]} stream positions for a batch of {x.shape[0]}")
        with torch.no_grad():
            keep = keep_mask(seed, layer, positions, x[0].numel(), self.p).reshape(x.shape)
        return torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device)) * (1.0 / (1.0 - self.p))

    def extra_repr(self) -> str:
        return f"p={self.p}"


@contextlib.contextmanager
def dropout_stream(net: nn.Module, seed: int, positions: torch.Tensor):
    """Within the block, every StreamDropout of `net` draws the masks of the images at stream `positions` [B]
    (a layer is keyed by its index among the net's StreamDropout modules, in module order)."""
    layers = [m for m in net.modules() if isinstance(m, StreamDropout)]
    for index, layer in enumerate(layers):
        layer.stream = (int(seed), index, positions)
    try:
        yield
    finally:
        for layer in layers:
            layer.stream = None
