"""Study configuration: load + validate a study YAML, per-model training settings, snapshot marks.

No torch import here: the Snakefile imports this module to build the DAG, and it must stay cheap.

The format is fixed in docs/internals.md ("The study config"); the JSON schema lives in
workflow/schemas/config.schema.yaml.  `load_config` validates against it, fills the schema's defaults through
jsonschema's own validator (extended to insert each missing property's `default`), and turns jsonschema's error
into one line that names the key path, e.g. ``training.batch_szie: unknown key``.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Mapping

import yaml

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "workflow" / "schemas" / "config.schema.yaml"


class ConfigError(ValueError):
    """A study config that does not match the schema; the message names the key path."""


# --------------------------------------------------------------------------------------------------------------
# loading + validation
# --------------------------------------------------------------------------------------------------------------

def load_schema(path: str | Path | None = None) -> dict:
    path = Path(path) if path is not None else SCHEMA_PATH
    if not path.exists():
        raise FileNotFoundError(f"config schema not found: {path}")
    with open(path) as f:
        return yaml.safe_load(f)


def load_config(path_or_dict: str | Path | Mapping, *, schema: Mapping | None = None) -> dict:
    """Read a study config (YAML path or dict), validate it, and return a new dict with defaults filled in.

    Raises ConfigError with one message naming the first bad key path (``training.batch_size: ...``).
    """
    if isinstance(path_or_dict, Mapping):
        cfg = copy.deepcopy(dict(path_or_dict))
        where = "config"
    else:
        where = str(path_or_dict)
        with open(path_or_dict) as f:
            cfg = yaml.safe_load(f)
        if cfg is None:
            cfg = {}
        if not isinstance(cfg, dict):
            raise ConfigError(f"{where}: top level must be a mapping, got {type(cfg).__name__}")
    schema = dict(schema) if schema is not None else load_schema()
    _validate(cfg, schema, where)
    for _ in _validator(schema, fill_defaults=True).iter_errors(cfg):  # fills the schema's defaults in place
        pass
    _validate(cfg, schema, where)  # defaults must themselves be valid (catches a broken schema)
    expand_seeds(cfg, where)
    _check_batching(cfg, where)
    return cfg


def seed_run_name(entry: str, k: int) -> str:
    """The k-th seed run of a model-table entry: the entry itself for k = 0, then <entry>_s<k> (names stay within
    the rules' model wildcard [A-Za-z0-9_]+)."""
    return entry if k == 0 else f"{entry}_s{k}"


def expand_seeds(cfg: dict, where: str = "config") -> None:
    """A model-table entry with `seeds: K` becomes K runs that share everything but the training seed, in place:
    the entry itself (its own seed) and <entry>_s1 … <entry>_s<K−1> (seed + k), each marked `replicate_of: <entry>`,
    so every rule sees K runs and the statistics average and resample them as one size. Idempotent: an expanded
    table has no `seeds` left. Raises ConfigError when a run name is taken or `replicate_of` names no entry."""
    models = cfg.get("models") or {}
    out = {}
    for name, entry in models.items():
        entry = dict(entry or {})
        k = int(entry.pop("seeds", 1))
        out[name] = entry
        if k == 1:
            continue
        base = int(model_training(cfg, name)["seed"])
        for i in range(1, k):
            run = seed_run_name(name, i)
            if run in models:
                raise ConfigError(f"{where}: models.{name}.seeds: {k} makes a run named {run}, but the model table "
                                  f"already has an entry {run}; rename one of them")
            replica = copy.deepcopy(entry)
            replica["training"] = {**(replica.get("training") or {}), "seed": base + i}
            replica["replicate_of"] = name
            out[run] = replica
    for name, entry in out.items():
        target = entry.get("replicate_of")
        if target is not None and (target not in out or out[target].get("replicate_of") is not None):
            raise ConfigError(f"{where}: models.{name}.replicate_of: {target!r} is not a model-table entry "
                              "(use `seeds: K` on the entry instead of writing replicate_of)")
    cfg["models"] = out


def seed_sizes(cfg: Mapping) -> dict:
    """run → the model-table entry (size) it is a seed run of (its own name when it is no replicate)."""
    return {name: (entry or {}).get("replicate_of") or name for name, entry in (cfg.get("models") or {}).items()}


def micro_batch(training: Mapping, num_processes: int, key: str = "training") -> tuple[int, int]:
    """(batch_gpu, accumulation rounds) of one process: the per-process batch batch_size / num_processes is
    processed `rounds` micro-batches of `batch_gpu` images at a time (EDM2's batch_gpu; null or larger than the
    per-process batch = the whole of it).  Raises ConfigError naming the key when the batch does not split."""
    batch, world = int(training["batch_size"]), int(num_processes)
    if batch % world:
        raise ConfigError(f"{key}.batch_size: {batch} is not divisible by the {world} processes")
    local = batch // world
    gpu = min(int(training.get("batch_gpu") or local), local)
    if local % gpu:
        raise ConfigError(f"{key}.batch_gpu: {gpu} does not divide the per-process batch {local} "
                          f"(batch_size {batch} / {world} processes)")
    return gpu, local // gpu


def _check_batching(cfg: dict, where: str) -> None:
    """Every model's batch splits over its configured processes and micro-batches (at config time, so a
    bad study fails before any job runs; train.py checks again with the processes it really has)."""
    for name, entry in (cfg.get("models") or {}).items():
        training = model_training(cfg, name)
        own = (entry or {}).get("training") or {}
        key = f"models.{name}.training" if {"batch_size", "batch_gpu", "launch"} & set(own) else "training"
        try:
            micro_batch(training, training["launch"]["num_processes"], key)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None


def _validator(schema: Mapping, *, fill_defaults: bool = False):
    """jsonschema's validator for the schema's dialect; with fill_defaults, one that inserts each missing
    property's `default` (a deep copy) before validating it, so nested defaults fill in too."""
    import jsonschema  # local: only needed when validating

    cls = jsonschema.validators.validator_for(schema)
    if fill_defaults:
        check_properties = cls.VALIDATORS["properties"]

        def properties(validator, props, instance, sub_schema):
            if isinstance(instance, dict):
                for key, sub in props.items():
                    if key not in instance and isinstance(sub, Mapping) and "default" in sub:
                        instance[key] = copy.deepcopy(sub["default"])
            yield from check_properties(validator, props, instance, sub_schema)

        cls = jsonschema.validators.extend(cls, {"properties": properties})
    return cls(schema)


def _validate(cfg: dict, schema: Mapping, where: str) -> None:
    errors = list(_validator(schema).iter_errors(cfg))
    if not errors:
        return
    # report the deepest error first: it names the most specific key ("training.batch_size", not "training")
    errors.sort(key=lambda e: (-len(list(e.absolute_path)), str(e.message)))
    raise ConfigError(f"{where}: {_describe(errors[0])}")


def _describe(error) -> str:
    """One readable line for a jsonschema error, naming the key path."""
    path = ".".join(str(p) for p in error.absolute_path)
    if error.validator == "additionalProperties" and isinstance(error.instance, Mapping):
        known = set(error.schema.get("properties", {}))
        patterns = error.schema.get("patternProperties", {})
        import re

        unknown = [k for k in error.instance if k not in known and not any(re.search(p, k) for p in patterns)]
        if unknown:
            key = ".".join(filter(None, [path, str(unknown[0])]))
            hint = f" (known keys: {', '.join(sorted(known))})" if known else ""
            return f"{key}: unknown key{hint}"
    if error.validator == "required":
        missing = error.message.split("'")[1] if "'" in error.message else error.message
        key = ".".join(filter(None, [path, missing]))
        return f"{key}: required key missing"
    return f"{path or '<top level>'}: {error.message}"


# --------------------------------------------------------------------------------------------------------------
# per-model training settings
# --------------------------------------------------------------------------------------------------------------

def _deep_merge(base: Mapping, override: Mapping) -> dict:
    out = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def model_training(cfg: Mapping, name: str) -> dict:
    """The training settings of model NAME: the study's `training` defaults deep-merged with the model's
    `training` overrides.  A `snapshots` override that gives `images` wins over count/spacing (see
    snapshot_marks)."""
    models = cfg.get("models") or {}
    if name not in models:
        raise ConfigError(f"models.{name}: unknown model (known: {', '.join(models) or 'none'})")
    entry = models[name] or {}
    overrides = dict(entry.get("training") or {})
    merged = _deep_merge(cfg.get("training") or {}, overrides)
    # an explicit list of snapshot marks in the override replaces the study's geometric/linear spec
    snap_override = overrides.get("snapshots") or {}
    if "images" in snap_override:
        merged["snapshots"] = copy.deepcopy(snap_override)
    elif snap_override:
        merged["snapshots"].pop("images", None)
    return merged


def total_images(training: Mapping) -> int:
    """Training length in images seen, rounded up to a whole number of (global) batches."""
    batch = int(training["batch_size"])
    return int(math.ceil(int(training["total_images"]) / batch) * batch)


def snapshot_marks(training: Mapping) -> list[int]:
    """Images-seen marks at which snapshots are written, ascending; the last is the training length.

    Marks are rounded to whole global batches (images seen only grows in steps of batch_size), so a snapshot's
    images_seen equals its mark exactly.  Spec (training.snapshots):
      {images: [..]}                              explicit marks (the training length is always added)
      {count: K, spacing: geometric, first_images: F}   K marks F·(T/F)^(i/(K−1)), i = 0..K−1 — even spacing
                                                  in log compute, what a compute-axis power-law fit wants
      {count: K, spacing: linear[, first_images: F]}    K evenly spaced marks from F (default T/K) to T
    """
    batch = int(training["batch_size"])
    total = total_images(training)
    spec = training.get("snapshots") or {}

    def to_batch(n: float) -> int:
        return int(min(max(math.floor(n / batch + 0.5), 1) * batch, total))  # nearest batch, half up

    if spec.get("images"):
        raw = [float(m) for m in spec["images"]]
        bad = [m for m in raw if m <= 0]
        if bad:
            raise ConfigError(f"training.snapshots.images: marks must be positive, got {bad[0]}")
    else:
        count = int(spec.get("count", 1))
        if count < 1:
            raise ConfigError(f"training.snapshots.count: must be >= 1, got {count}")
        spacing = spec.get("spacing", "geometric")
        first = spec.get("first_images")
        if count == 1:
            raw = [total]
        elif spacing == "geometric":
            first = float(first) if first else total / 2 ** (count - 1)
            if not 0 < first <= total:
                raise ConfigError(
                    f"training.snapshots.first_images: must be in (0, total_images={total}], got {first}")
            ratio = total / first
            raw = [first * ratio ** (i / (count - 1)) for i in range(count)]
        elif spacing == "linear":
            first = float(first) if first else total / count
            if not 0 < first <= total:
                raise ConfigError(
                    f"training.snapshots.first_images: must be in (0, total_images={total}], got {first}")
            raw = [first + (total - first) * i / (count - 1) for i in range(count)]
        else:
            raise ConfigError(f"training.snapshots.spacing: unknown spacing {spacing!r} (geometric or linear)")
    marks = sorted({to_batch(m) for m in raw} | {total})
    return marks
