"""models/dropout.py: masks as a pure function of (seed, stream position, layer, element)."""

import math

import pytest
import torch

from models.dropout import StreamDropout, dropout_stream, keep_mask, mix32


def test_mix32_is_a_32_bit_bijection_on_a_sample():
    x = torch.cat([torch.arange(1 << 16), torch.randint(0, 1 << 32, (1 << 16,), generator=torch.Generator()
                                                         .manual_seed(0), dtype=torch.int64)]).unique()
    y = mix32(x)
    assert int(y.min()) >= 0 and int(y.max()) < 1 << 32
    assert y.unique().numel() == x.numel()                     # no two inputs collide
    # avalanche: flipping one input bit flips about half of the output bits
    flipped = (mix32(x ^ 1) ^ y)
    bits = sum(int(((flipped >> b) & 1).sum()) for b in range(32)) / (32 * x.numel())
    assert abs(bits - 0.5) < 0.01


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_keep_rate_and_independence(p):
    positions = torch.arange(1000, 1064)
    keep = keep_mask(7, 3, positions, 2048, p).float()
    n = keep.numel()
    assert abs(float(keep.mean()) - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)   # binomial, 5 standard errors
    # two images' masks agree as often as independent draws would: p² + (1 − p)²
    agree = float((keep[0::2] == keep[1::2]).float().mean())
    expect = p * p + (1 - p) * (1 - p)
    assert abs(agree - expect) < 5 * math.sqrt(expect * (1 - expect) / (n / 2))
    # neighbouring elements are not correlated either
    lag = float((keep[:, 1:] == keep[:, :-1]).float().mean())
    assert abs(lag - expect) < 5 * math.sqrt(expect * (1 - expect) / n)


def test_mask_depends_on_position_layer_and_seed_only():
    positions = torch.tensor([5, 6, 7, 8, 9, 10])
    whole = keep_mask(0, 2, positions, 300, 0.3)
    # an image's mask is the same in any batch it is drawn with (micro-batches, other ranks' splits)
    assert torch.equal(torch.cat([keep_mask(0, 2, positions[:2], 300, 0.3),
                                  keep_mask(0, 2, positions[2:], 300, 0.3)]), whole)
    assert torch.equal(keep_mask(0, 2, positions.flip(0), 300, 0.3).flip(0), whole)
    # other images (another rank's), another layer or another seed draw other masks
    for other in (keep_mask(0, 2, positions + 6, 300, 0.3), keep_mask(0, 3, positions, 300, 0.3),
                  keep_mask(1, 2, positions, 300, 0.3)):
        assert 0.4 < float((other == whole).float().mean()) < 0.7   # ≈ 0.3² + 0.7² = 0.58, not 1
    # positions beyond 32 bits still key the mask
    assert not torch.equal(keep_mask(0, 2, positions + (1 << 32), 300, 0.3), whole)


def test_stream_dropout_in_a_net():
    class Two(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = StreamDropout(0.5), StreamDropout(0.5)

        def forward(self, x):
            return self.a(x), self.b(x)

    net, x = Two(), torch.ones(4, 3, 5)
    with dropout_stream(net, seed=1, positions=torch.arange(4)):
        a, b = net(x)
    assert set(a.unique().tolist()) <= {0.0, 2.0}                 # kept elements scaled by 1/(1 − p)
    assert torch.equal(a == 0, ~keep_mask(1, 0, torch.arange(4), 15, 0.5).reshape(4, 3, 5))
    assert torch.equal(b == 0, ~keep_mask(1, 1, torch.arange(4), 15, 0.5).reshape(4, 3, 5))  # layers differ
    assert net.a.stream is None                                    # the stream is set only inside the block
    assert torch.equal(net.eval()(x)[0], x)                        # evaluation never drops
    # gradients flow through the kept elements only
    y = torch.ones(4, 3, 5, requires_grad=True)
    with dropout_stream(net.train(), seed=1, positions=torch.arange(4)):
        net(y)[0].sum().backward()
    assert torch.equal(y.grad, a)
    with pytest.raises(ValueError, match="3 stream positions for a batch of 4"):
        with dropout_stream(net, seed=1, positions=torch.arange(3)):
            net(x)


# The masks of models/dropout.py as first released (sha256 of the bool mask's bytes, its number of kept elements
# and its first row's first 16 decisions): a faster hash must draw exactly these, or resumed runs would change.
PINNED_MASKS = [
    ((0, 0, [0, 1, 2, 3, 4, 5, 6, 7], 300, 0.1), "401db87fb47f2d01", 2168,
     [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 0, 1]),
    ((7, 3, list(range(1000, 1016)), 2047, 0.5), "81384310abcb43e0", 16363,
     [1, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 0, 0, 1, 0]),
    ((123456789, 11, [0, 5, (1 << 32) + 3, (1 << 40) + 17], 4096, 0.25), "2b4b26ee6ece6d02", 12225,
     [1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 0, 1, 1, 1]),
    (((1 << 40) + 5, 2, [0, 1, 2], 1, 0.3), "75c8fd04ad916aec", 3, [1]),
]


@pytest.mark.parametrize("args,sha,kept,first", PINNED_MASKS)
def test_masks_are_the_pinned_ones(args, sha, kept, first):
    import hashlib

    seed, layer, positions, numel, p = args
    keep = keep_mask(seed, layer, torch.tensor(positions), numel, p)
    assert keep.shape == (len(positions), numel) and keep.dtype == torch.bool
    assert hashlib.sha256(keep.contiguous().numpy().tobytes()).hexdigest()[:16] == sha
    assert int(keep.sum()) == kept and keep[0, :16].int().tolist() == first


def test_keys_make_no_tensor_from_host_values(monkeypatch):
    """A tensor built from a Python number (torch.tensor / as_tensor / full) is a host-to-device copy on a GPU, a
    sync twice per layer and forward; the keys of a batch come from its positions and host integers only."""
    def refuse(*args, **kwargs):
        raise AssertionError("keep_mask built a tensor from a host value")

    positions = torch.arange(5, 13)
    expected = keep_mask(3, 4, positions, 50, 0.2)
    for name in ("tensor", "as_tensor", "full", "scalar_tensor"):
        monkeypatch.setattr(torch, name, refuse)
    assert torch.equal(keep_mask(3, 4, positions, 50, 0.2), expected)


def test_the_hash_makes_fewer_passes():
    """Elementwise kernels over the [B, pairs] hash (counted with a dispatch mode): 25 (the first version made 27
    and a stacked copy)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountBig(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and out.numel() >= 8 * 500 and func.overloadpacket.__name__ not in \
                    ("empty", "select", "slice", "view", "unsqueeze", "expand", "as_strided", "alias"):
                CountBig.calls += 1     # a kernel that writes the elements, not a view or an allocation
            return out

    with CountBig():
        keep_mask(0, 1, torch.arange(8), 1000, 0.1)
    assert 0 < CountBig.calls <= 25, CountBig.calls
