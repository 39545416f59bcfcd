"""An arm of the weighting study: one training recipe run with several seeds, named by the model name without its
trailing `_s<seed>` (`edm_ol_s2` → arm `edm_ol`), and the keys that describe an arm and group the arms compared
with one baseline (analysis.weighting_study compares them; analysis.plots_variants draws a panel per group)."""

from __future__ import annotations

import re

ARM_KEYS = ["arm", "arch", "variant", "logvar", "schedule", "schedule_kwargs"]
GROUP_KEYS = ["arch", "variant", "logvar"]          # arms compared with one baseline


def arm_of(model: str) -> str:
    """The arm a model belongs to: its name without a trailing `_s<seed>`."""
    return re.sub(r"_s\d+$", "", model)
