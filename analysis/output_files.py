"""An analysis job's table and text outputs (a CSV, a markdown report), each written atomically (study.atomic): a
killed job leaves the previous file or none, never half of one."""

from __future__ import annotations

import pandas as pd

from study.atomic import atomic_path


def write_csv(df: pd.DataFrame, path) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)


def write_text(text: str, path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
