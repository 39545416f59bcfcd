"""Study configuration: load + validate a study YAML (with its seed runs expanded), and the CLI that checks a file.

Each model's resolved settings (merged training section, variant, snapshot marks, ...): study.spec.
No torch import here: the Snakefile imports this module to build the DAG, and it must stay cheap.

The format is fixed in docs/internals.md ("The study config"); the JSON schema lives in
workflow/schemas/config.schema.yaml.  `load_config` validates against it, fills the schema's defaults through
jsonschema's own validator (extended to insert each missing property's `default`), and turns every jsonschema
error into one line that names the key path, e.g. ``training.batch_szie: unknown key`` — all of them at once. A
YAML syntax error names the file, line and column.

    python -m study.config STUDY.yaml      check a study config (YAML, schema, the DAG-time checks); exit 2
"""

from __future__ import annotations

import argparse
import copy
import math
import re
import sys
from pathlib import Path
from typing import Mapping

import jsonschema
import yaml

from study.checks import check_study, known_arch_names

# the per-model functions live in study.spec (ModelSpec is built from them); the loading checks below use these
from study.spec import ConfigError, micro_batch, model_training

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "workflow" / "schemas" / "config.schema.yaml"


# --------------------------------------------------------------------------------------------------------------
# loading + validation
# --------------------------------------------------------------------------------------------------------------

def load_schema(path: str | Path | None = None) -> dict:
    path = Path(path) if path is not None else SCHEMA_PATH
    if not path.exists():
        raise FileNotFoundError(f"config schema not found: {path}")
    with open(path) as f:
        return yaml.safe_load(f)


def read_yaml(path: str | Path):
    """A YAML file's content; a syntax error is a ConfigError naming the file, line and column."""
    try:
        with open(path) as f:
            return yaml.safe_load(f)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        what = e.problem or e.context or "invalid YAML"
        if e.context and e.problem:
            ctx = e.context_mark
            at = f" at line {ctx.line + 1}, column {ctx.column + 1}" if ctx is not None and ctx != mark else ""
            what = f"{e.problem} ({e.context}{at})"
        raise ConfigError(f"{where}: YAML syntax error: {what}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: YAML syntax error: {e}") from None


def load_config(path_or_dict: str | Path | Mapping, *, schema: Mapping | None = None,
                where: str | None = None) -> dict:
    """Read a study config (YAML path or dict), validate it, and return a new dict with defaults filled in.

    Raises ConfigError listing every bad key path, one per line (``training.batch_size: ...``); `where` names
    the config's source in each line (default: its path, or "config" for a dict).
    """
    if isinstance(path_or_dict, Mapping):
        cfg = copy.deepcopy(dict(path_or_dict))
        where = where or "config"
    else:
        where = where or str(path_or_dict)
        cfg = read_yaml(path_or_dict)
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
    _check_ema(cfg, where)
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


def _check_batching(cfg: dict, where: str) -> None:
    """Every model's batch splits over its configured processes and micro-batches (at config time, so a
    bad study fails before any job runs; train.py checks again with the processes it really has)."""
    problems = []
    for name, entry in (cfg.get("models") or {}).items():
        training = model_training(cfg, name)
        own = (entry or {}).get("training") or {}
        key = f"models.{name}.training" if {"batch_size", "batch_gpu", "launch"} & set(own) else "training"
        try:
            micro_batch(training, training["launch"]["num_processes"], key)
        except ConfigError as e:
            problems.append(f"{where}: {e}")
    if problems:
        raise ConfigError("\n".join(dict.fromkeys(problems)))


def _check_ema(cfg: dict, where: str) -> None:
    """training.ema's power-only keys need `kind: power` (in the study's section or the model's override), and so
    does every model of a study with an `ema_sweep`."""
    problems = []
    sweep = cfg.get("ema_sweep")
    if sweep is not None and not any(math.isclose(float(sweep["fixed_sigma_rel"]), float(s), rel_tol=1e-9)
                                     for s in sweep["sigma_rel"]):
        problems.append(f"{where}: ema_sweep.fixed_sigma_rel: {sweep['fixed_sigma_rel']} is not on the grid "
                        f"ema_sweep.sigma_rel {sweep['sigma_rel']}")
    for name, entry in (cfg.get("models") or {}).items():
        ema = model_training(cfg, name).get("ema") or {}
        own = ((entry or {}).get("training") or {}).get("ema") or {}
        key = f"models.{name}.training.ema" if own else "training.ema"
        if ema.get("kind", "classic") != "power":
            if cfg.get("ema_sweep") is not None:
                problems.append(f"{where}: ema_sweep: model {name} keeps the classic EMA; the sweep rebuilds EMA "
                                f"lengths from power profiles: set {key}.kind: power")
            for extra in ("sigma_rel", "profile_every_images"):
                if ema.get(extra) is not None:
                    problems.append(f"{where}: {key}.{extra}: set, but {key}.kind is "
                                    f"{ema.get('kind', '<unset>')!r}; it applies to kind: power only")
    if problems:
        raise ConfigError("\n".join(dict.fromkeys(problems)))


def _validator(schema: Mapping, *, fill_defaults: bool = False):
    """jsonschema's validator for the schema's dialect; with fill_defaults, one that inserts each missing
    property's `default` (a deep copy) before validating it, so nested defaults fill in too."""
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
    """Raise ConfigError listing every schema error of `cfg`, one line each, sorted by key path."""
    errors = list(_validator(schema).iter_errors(cfg))
    if not errors:
        return
    lines = dict.fromkeys(line for e in errors for line in _describe(e))
    raise ConfigError("\n".join(f"{where}: {line}" for line in sorted(lines)))


def _describe(error) -> list[str]:
    """Readable lines for one jsonschema error, each naming a key path (one per unknown key)."""
    path = ".".join(str(p) for p in error.absolute_path)
    if error.validator == "additionalProperties" and isinstance(error.instance, Mapping):
        known = set(error.schema.get("properties", {}))
        patterns = error.schema.get("patternProperties", {})
        unknown = [k for k in error.instance if k not in known and not any(re.search(p, k) for p in patterns)]
        if unknown:
            hint = f" (known keys: {', '.join(sorted(known))})" if known else ""
            return [f"{'.'.join(filter(None, [path, str(k)]))}: unknown key{hint}" for k in unknown]
    if error.validator == "required":
        missing = error.message.split("'")[1] if "'" in error.message else error.message
        key = ".".join(filter(None, [path, missing]))
        return [f"{key}: required key missing"]
    why = error.schema.get("description") if isinstance(error.schema, Mapping) else None
    why = f" ({' '.join(str(why).split())})" if why and error.validator in ("minimum", "maximum") else ""
    return [f"{path or '<top level>'}: {error.message}{why}"]


def main(argv=None) -> int:
    """Check a study config as `snakemake -n` does before any job runs (YAML syntax, schema, DAG-time checks):
    every problem on its own line, exit 2. Snakemake reads --configfile itself and reports a YAML syntax error
    without its file or line; this names both."""
    ap = argparse.ArgumentParser(prog="python -m study.config", description=main.__doc__.split("\n")[0])
    ap.add_argument("config", help="study config YAML (workflow/config/*.yaml)")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config)
        check_study(cfg, basedir=SCHEMA_PATH.parents[2], arch_names=known_arch_names(), where=args.config)
    except ConfigError as e:
        print(f"error: invalid study config:\n{e}", file=sys.stderr)
        return 2
    print(f"{args.config}: valid ({len(cfg.get('models') or {})} models)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
