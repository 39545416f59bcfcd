"""The named model sizes of every family — the table models.family builds from, importable without torch (the
Snakefile can check a study's arch names against it at DAG time). Architectures and counts: models/family.py.
"""

from __future__ import annotations

_PAPER = dict(channel_mult=(1, 2, 3, 4), num_blocks=3, attn_resolutions=(16, 8), channels_per_head=64)
_TINY = dict(channel_mult=(1, 2, 2), num_blocks=2, attn_resolutions=(4,), channels_per_head=32)

# name -> architecture (everything but the data shape). Only model_channels changes along each ladder.
SIZES: dict[str, dict] = {
    "xs": dict(model_channels=128, **_PAPER),
    "s": dict(model_channels=192, **_PAPER),
    "m": dict(model_channels=256, **_PAPER),
    "l": dict(model_channels=320, **_PAPER),
    "xl": dict(model_channels=384, **_PAPER),
    "xxl": dict(model_channels=448, **_PAPER),
    "t0": dict(model_channels=8, **_TINY),
    "t1": dict(model_channels=12, **_TINY),
    "t2": dict(model_channels=16, **_TINY),
    "t3": dict(model_channels=24, **_TINY),
    "t4": dict(model_channels=32, **_TINY),
    "t5": dict(model_channels=48, **_TINY),
    "t6": dict(model_channels=64, **_TINY),
}
_DIT = dict(patch_size=2, mlp_ratio=4.0)
# DiT ladders: width = 64·depth (paper) or 16·depth (CPU), one head per depth unit.
_DIT_PAPER_DEPTHS = {"dit12": 12, "dit15": 15, "dit19": 19, "dit24": 24, "dit27": 27}
_DIT_TINY_DEPTHS = {"d0": 3, "d1": 4, "d2": 5, "d3": 6, "d4": 8, "d5": 10}
for _name, _depth in _DIT_PAPER_DEPTHS.items():
    SIZES[_name] = dict(depth=_depth, hidden_size=64 * _depth, num_heads=_depth, **_DIT)
for _name, _depth in _DIT_TINY_DEPTHS.items():
    SIZES[_name] = dict(depth=_depth, hidden_size=16 * _depth, num_heads=_depth, **_DIT)

# name -> family: "edm2" (models/edm2.py's U-Net) or "dit" (models/dit.py)
FAMILY: dict[str, str] = {n: ("dit" if n in _DIT_PAPER_DEPTHS or n in _DIT_TINY_DEPTHS else "edm2") for n in SIZES}
PAPER_SIZES = ("xs", "s", "m", "l", "xl", "xxl")
TINY_SIZES = tuple(n for n in SIZES if n.startswith("t"))
DIT_PAPER_SIZES = tuple(_DIT_PAPER_DEPTHS)
DIT_TINY_SIZES = tuple(_DIT_TINY_DEPTHS)
# EDM2's published parameter counts (millions) of its ImageNet-512 latent models (64×64×4, 1000 classes).
PAPER_PARAMS_M = {"xs": 124.7, "s": 280.2, "m": 497.8, "l": 777.5, "xl": 1119.3, "xxl": 1523.2}



def family_of(name: str) -> str:
    """The family ("edm2" or "dit") of size `name`."""
    if name not in SIZES:
        raise KeyError(f"unknown model size {name!r}; known sizes: {', '.join(SIZES)}")
    return FAMILY[name]
