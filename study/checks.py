"""Checks of a study config that the DAG can make before anything runs (no torch import: the Snakefile calls
`check_study` while it is parsed, so `snakemake -n` fails on them, before any GPU-hour is spent).

Each problem is one line naming the key and the bad value, e.g.
``models.big.arch: unknown architecture 't99' (known: ...)`` or ``evaluation.sigma_min: 80 must be < sigma_max
(0.5)``. `check_study` collects every problem and raises one ConfigError listing them all.

Checked: one name per model ignoring case, arch names (against the model family's table, passed in by the
caller), σ ranges of every section (min < max, both positive), total_images against batch_size (at least one
batch), snapshot marks against total_images, accelerate config files (exist, parse as a YAML
mapping), num_processes against num_machines (and a distributed accelerate config for several nodes), a model's GPUs
against its processes, dataset spec syntax, the optimal-loss subset_size against the dataset size where that size is
known without loading the data, and the packages each configured path needs beyond the core install
(PATH_PACKAGES: DeepSpeed for a DeepSpeed accelerate config, Pillow for an image folder, each configured tracker's
package), looked up without importing them, and a DeepSpeed JSON that would train in another precision than the DDP
path (bf16/fp16 engine, a torch_autocast or communication dtype at odds with training.mixed_precision). That every batch splits over its processes and micro-batches is
load_config's check (study.spec.micro_batch), made before these.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import yaml

from models.sizes import SIZES
from study.spec import ConfigError, model_training, snapshot_marks, total_images

# Dataset sizes known without reading the data (training.dataset: sklearn's digits set).
KNOWN_DATASET_SIZES = {"digits": 1797}
SPEC_FORMS = "'digits', PATH.npy, PATH.npz, 'cifar10:DIR', 'imagefolder:DIR' or an existing DIR"


def known_arch_names() -> list[str]:
    """Every architecture name of the model table (models.sizes: U-Net and DiT ladders; no torch)."""
    return list(SIZES)


# --------------------------------------------------------------------------------------------------------------
# single checks: each returns a list of one-line problems (empty when fine)
# --------------------------------------------------------------------------------------------------------------

def check_archs(models: Mapping, known: Iterable[str]) -> list[str]:
    known = list(known)
    return [f"models.{name}.arch: unknown architecture {entry.get('arch')!r} (known: {', '.join(known)})"
            for name, entry in models.items() if (entry or {}).get("arch") not in known]


def _sigma_pairs(node: Any, path: str):
    """Every mapping below `node` that has a sigma_min or sigma_max key, with its dotted path."""
    if isinstance(node, Mapping):
        if "sigma_min" in node or "sigma_max" in node:
            yield path, node
        for key, value in node.items():
            yield from _sigma_pairs(value, f"{path}.{key}" if path else str(key))


def check_sigma_ranges(cfg: Mapping) -> list[str]:
    """sigma_min / sigma_max of every section (evaluation, optimal_loss, variant kwargs, ...): positive numbers,
    min < max."""
    problems = []
    for path, node in _sigma_pairs(cfg, ""):
        lo, hi = node.get("sigma_min"), node.get("sigma_max")
        bad = False
        for key, v in (("sigma_min", lo), ("sigma_max", hi)):
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                problems.append(f"{path}.{key}: must be a positive number, got {v!r}")
                bad = True
        if not bad and lo is not None and hi is not None and not lo < hi:
            problems.append(f"{path}.sigma_min: {lo!r} must be < sigma_max ({hi!r})")
    return problems


def _per_model(cfg: Mapping, check) -> list[str]:
    """Run check(training) -> [line] on every model's merged training section; a line that several models share
    (a study-wide setting) is reported once with the models it concerns."""
    found: dict[str, list[str]] = {}
    for name in cfg.get("models") or {}:
        try:
            lines = check(model_training(cfg, name))
        except ConfigError as e:
            lines = [str(e)]
        for line in lines:
            found.setdefault(line, []).append(name)
    return [f"{line} [model{'s' if len(names) > 1 else ''} {', '.join(names)}]" for line, names in found.items()]


def _length_problems(training: Mapping) -> list[str]:
    """A training shorter than one batch would train a whole batch anyway (more images than the config asks)."""
    asked, batch = int(training["total_images"]), int(training["batch_size"])
    if asked < batch:
        return [f"training.total_images: {asked} is less than one batch (training.batch_size = {batch}); training "
                f"counts whole batches, so it would train {batch} images"]
    return []


def check_lengths(cfg: Mapping) -> list[str]:
    """Every model trains at least one batch."""
    return _per_model(cfg, _length_problems)


def check_model_names(models: Mapping) -> list[str]:
    """One name per model ignoring case: names that differ only in case share a run folder (and every other
    per-model file) on a case-insensitive file system."""
    seen: dict[str, str] = {}
    problems = []
    for name in models:
        first = seen.setdefault(str(name).lower(), name)
        if first != name:
            problems.append(f"models.{name}: the same name as models.{first} but for case (one folder on a "
                            "case-insensitive file system); rename one of them")
    return problems


def _snapshot_problems(training: Mapping) -> list[str]:
    asked = int(training["total_images"])
    for m in (training.get("snapshots") or {}).get("images") or []:
        if m > max(asked, total_images(training)):
            return [f"training.snapshots.images: mark {m} is beyond training.total_images ({asked})"]
    snapshot_marks(training)  # raises ConfigError naming the key (e.g. first_images beyond total_images)
    return []


def check_snapshots(cfg: Mapping) -> list[str]:
    """Every model's snapshot marks are computable and lie within its training length."""
    return _per_model(cfg, _snapshot_problems)


def _accelerate_config_path(path: str, basedir: str | os.PathLike) -> Path:
    return Path(path) if os.path.isabs(path) else Path(basedir) / path


def _read_accelerate_config(path: str, basedir: str | os.PathLike) -> Mapping | None:
    """An accelerate config file's mapping, None when it cannot be read or holds no mapping."""
    try:
        with open(_accelerate_config_path(path, basedir)) as f:
            parsed = yaml.safe_load(f)
    except (OSError, yaml.YAMLError):
        return None
    return parsed if isinstance(parsed, Mapping) else None


def accelerate_distributed_type(path: str, basedir: str | os.PathLike) -> str | None:
    """The `distributed_type` of an accelerate config file ("NO" when unset), None when it cannot be read."""
    parsed = _read_accelerate_config(path, basedir)
    return None if parsed is None else str(parsed.get("distributed_type", "NO"))


def check_accelerate_config(path: str, key: str, basedir: str | os.PathLike) -> list[str]:
    full = _accelerate_config_path(path, basedir)
    if not full.is_file():
        return [f"{key}: accelerate config {path!r} not found (looked at {full})"]
    try:
        with open(full) as f:
            parsed = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return [f"{key}: accelerate config {path!r} is not valid YAML ({first})"]
    if not isinstance(parsed, Mapping):
        return [f"{key}: accelerate config {path!r} must be a YAML mapping, got {type(parsed).__name__}"]
    return []


def check_machines(training: Mapping, basedir: str | os.PathLike) -> list[str]:
    """A multi-node launch (num_machines > 1): the same number of processes on every node, and an accelerate
    config that starts a distributed run (one with distributed_type NO runs a single process)."""
    launch = training.get("launch") or {}
    machines, n = int(launch.get("num_machines", 1)), int(launch.get("num_processes", 1))
    if machines == 1:
        return []
    if n % machines:
        return [f"training.launch.num_processes: {n} is not divisible by training.launch.num_machines ({machines}); "
                "every node runs num_processes / num_machines processes"]
    path = launch.get("accelerate_config")
    kind = accelerate_distributed_type(path, basedir) if path else "NO"
    if kind is None:
        return []  # check_accelerate_config reports the file
    if kind.upper() == "NO":
        return [f"training.launch.num_machines: {machines} nodes need a distributed accelerate config "
                f"(ddp-bf16.yaml or deepspeed-zero2.yaml), not {path!r} (distributed_type {kind})"]
    return []


def check_launch(cfg: Mapping, basedir: str | os.PathLike) -> list[str]:
    def accelerate(training):
        path = (training.get("launch") or {}).get("accelerate_config")
        return [] if path is None else check_accelerate_config(path, "training.launch.accelerate_config", basedir)

    return _per_model(cfg, accelerate) + _per_model(cfg, lambda training: check_machines(training, basedir))


def check_train_resources(cfg: Mapping) -> list[str]:
    """A model's own resources.gpus (a GPU job) is one GPU per training process, counted over all its nodes."""
    problems = []
    for name, entry in (cfg.get("models") or {}).items():
        gpus = ((entry or {}).get("resources") or {}).get("gpus")
        if not gpus:
            continue
        launch = model_training(cfg, name)["launch"]
        n, machines = int(launch["num_processes"]), int(launch.get("num_machines", 1))
        if int(gpus) != n:
            nodes = f" over its {machines} nodes" if machines > 1 else ""
            problems.append(f"models.{name}.resources.gpus: {gpus} but training.launch.num_processes = {n} "
                            f"(one GPU per process{nodes})")
    return problems


def parse_dataset_spec(spec: str) -> tuple[str, str]:
    """(kind, path) of a training.dataset spec: ('digits', ''), ('npy'|'npz', PATH), ('cifar10'|'imagefolder', DIR),
    ('dir', DIR). Raises ConfigError naming dataset.spec for anything else. Syntax only: paths may be missing
    here (a dry run of a cluster study works anywhere), except a bare folder, which must exist to be told from
    a typo."""
    spec = str(spec)
    if spec == "digits":
        return "digits", ""
    kind, sep, rest = spec.partition(":")
    if sep and kind in ("cifar10", "imagefolder"):
        if not rest.strip():
            raise ConfigError(f"dataset.spec: {spec!r} names no folder after '{kind}:'")
        return kind, rest
    suffix = Path(spec).suffix
    if suffix in (".npy", ".npz"):
        return suffix[1:], spec
    if Path(spec).expanduser().is_dir():
        return "dir", spec
    raise ConfigError(f"dataset.spec: {spec!r} is not one of {SPEC_FORMS}")


def array_shape(path: Path) -> tuple | None:
    """The shape of the image array of a .npy / .npz file (for .npz the first of training.dataset's image keys x,
    images, latents), from its header only; None when the file is missing or unreadable (the dataset job's error
    to report)."""

    def header(f):
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        return read(f)[0]

    if not path.is_file():
        return None
    try:
        if path.suffix == ".npy":
            with open(path, "rb") as f:
                return header(f)
        with zipfile.ZipFile(path) as zf:
            for key in ("x", "images", "latents"):  # training.dataset's image keys, in its order
                if f"{key}.npy" in zf.namelist():
                    with zf.open(f"{key}.npy") as f:
                        return header(f)
    except (OSError, ValueError, zipfile.BadZipFile):
        return None
    return None


def dataset_size(spec: str) -> int | None:
    """The number of items of a dataset spec where it is known without reading the data: digits, or an existing
    .npy / .npz (from the array header only); None otherwise."""
    kind, path = parse_dataset_spec(spec)
    if kind == "digits":
        return KNOWN_DATASET_SIZES["digits"]
    if kind not in ("npy", "npz"):
        return None
    shape = array_shape(Path(path).expanduser())
    return int(shape[0]) if shape else None


def check_dataset(cfg: Mapping) -> list[str]:
    ds = cfg.get("dataset") or {}
    spec = ds.get("spec", "digits")
    try:
        n = dataset_size(spec)
    except ConfigError as e:
        return [str(e)]
    ol = cfg.get("optimal_loss") or {}
    subset = ol.get("subset_size")
    estimators = {ol.get("estimator", "full"), *(ol.get("compare_estimators") or [])}
    problems = []
    if n is not None and subset is not None and estimators - {"full"} and not 2 <= int(subset) <= n:
        problems.append(f"optimal_loss.subset_size: {subset} must be in [2, N = {n}] (the size of dataset {spec!r})")
    if n is not None:
        problems += _per_model(cfg, lambda training: [
            f"training.batch_size: {training['batch_size']} is more than the {n} images of dataset {spec!r}"]
            if int(training["batch_size"]) > n else [])
    return problems


# --------------------------------------------------------------------------------------------------------------
# packages each configured path needs
# --------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PathPackages:
    """A path through the pipeline that imports packages beyond the core install.  `selected_by(cfg, training,
    basedir)` names the setting that takes the path (e.g. 'training.launch.accelerate_config X'), or returns None;
    it is asked for each model's merged training section, or with per_model False once for the study (training
    None)."""
    what: str                   # the path, as the error names it
    selected_by: Callable[[Mapping, Mapping | None, Any], str | None]
    modules: tuple[str, ...]    # import names that must be installed
    install: str                # the command that installs them
    per_model: bool = True


def _deepspeed_launch(cfg: Mapping, training: Mapping, basedir) -> str | None:
    path = (training.get("launch") or {}).get("accelerate_config")
    if path is not None and accelerate_distributed_type(path, basedir) == "DEEPSPEED":
        return f"training.launch.accelerate_config {path}"
    return None


def _image_folder(cfg: Mapping, training: None, basedir) -> str | None:
    spec = (cfg.get("dataset") or {}).get("spec", "digits")
    try:
        kind, _ = parse_dataset_spec(spec)
    except ConfigError:
        return None  # check_dataset reports it
    return f"dataset.spec {spec!r}" if kind in ("imagefolder", "dir") else None


def _tracker(name: str):
    def selected_by(cfg: Mapping, training: Mapping, basedir) -> str | None:
        return f"training.trackers {name}" if name in (training.get("trackers") or []) else None

    return selected_by


# Accelerate's trackers (training.trackers) -> the install command of each one's package (its import name)
TRACKER_INSTALL = {"tensorboard": 'pip install -e ".[tracking]"', **{name: f"pip install {name}" for name in (
    "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "swanlab", "trackio")}}

# One row per path; a path that needs another package adds its row here.
PATH_PACKAGES = [
    PathPackages("DeepSpeed", _deepspeed_launch, ("deepspeed", "transformers"), 'pip install -e ".[deepspeed]"'),
    PathPackages("Pillow (the image reader)", _image_folder, ("PIL",), "pip install pillow", per_model=False),
    *(PathPackages(f"the {name} tracker", _tracker(name), (name,), install)
      for name, install in TRACKER_INSTALL.items()),
]


def module_missing(name: str) -> bool:
    """Whether `import name` would fail for want of the package (looked up, not imported)."""
    if name in sys.modules:
        return sys.modules[name] is None
    try:
        return importlib.util.find_spec(name) is None
    except (ImportError, ValueError):
        return True


def check_packages(cfg: Mapping, basedir: str | os.PathLike, table=None) -> list[str]:
    """One line per configured path whose packages are not installed, naming the setting that selects it, the
    missing modules and the install command (the models that share the line are listed after it)."""

    def lines(row, training):
        setting = row.selected_by(cfg, training, basedir)
        missing = [m for m in row.modules if module_missing(m)] if setting else []
        if not missing:
            return []
        return [f"{setting} needs {row.what}, which is not installed here (no module "
                f"{', '.join(repr(m) for m in missing)}): {row.install}"]

    problems = []
    for row in PATH_PACKAGES if table is None else table:
        problems += _per_model(cfg, lambda training, row=row: lines(row, training)) if row.per_model \
            else lines(row, None)
    return problems


# --------------------------------------------------------------------------------------------------------------
# all of them
# --------------------------------------------------------------------------------------------------------------

def study_problems(cfg: Mapping, *, basedir: str | os.PathLike, arch_names: Iterable[str] | None = None) -> list[str]:
    """Every problem of a validated study config (load_config's output), one line each. `arch_names`: the known
    architectures (default: known_arch_names(), models.sizes' table)."""
    names = list(arch_names) if arch_names is not None else known_arch_names()
    return (check_model_names(cfg.get("models") or {}) + check_archs(cfg.get("models") or {}, names)
            + check_sigma_ranges(cfg) + check_lengths(cfg) + check_snapshots(cfg)
            + check_launch(cfg, basedir) + check_train_resources(cfg) + check_dataset(cfg)
            + check_packages(cfg, basedir) + check_deepspeed_precision(cfg, basedir))


def check_study(cfg: Mapping, *, basedir: str | os.PathLike, arch_names: Iterable[str] | None = None,
                where: str | None = None) -> None:
    """Raise ConfigError listing every problem of `cfg` (one line each, starting with `where`, the config file,
    when given); return None when there is none."""
    problems = study_problems(cfg, basedir=basedir, arch_names=arch_names)
    if problems:
        raise ConfigError("\n".join(f"{where}: {line}" if where else line for line in problems))


# --------------------------------------------------------------------------------------------------------------
# DeepSpeed's arithmetic against the DDP path's
# --------------------------------------------------------------------------------------------------------------

BF16_NAMES = ("bfloat16", "bf16", "torch.bfloat16")   # DeepSpeed's spellings of bfloat16 (its DtypeEnum)
FP32_NAMES = ("float32", "fp32", "torch.float32", "float")


def torch_autocast_section(mixed_precision: str) -> dict:
    """DeepSpeed's `torch_autocast` section for training.mixed_precision: the engine's forward re-enters autocast
    itself (deepspeed/runtime/torch_autocast.py turns an outside autocast off unless this section is on), so bf16
    must be said here too.  `lower_precision_safe_modules: []`: no parameter gets a bf16 communication dtype, so
    ZeRO reduces every gradient in fp32 as DDP does (DeepSpeed's default list, nn.Linear and nn.Conv*, would reduce
    the DiTs' linear layers in bf16)."""
    if mixed_precision == "bf16":
        return {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    return {"enabled": False}


def _enabled(section) -> bool:
    return isinstance(section, Mapping) and str(section.get("enabled", False)).lower() == "true"


def deepspeed_precision_problems(ds_cfg: Mapping, mixed_precision: str) -> list[str]:
    """Why a DeepSpeed config would train in another precision than the DDP path under training.mixed_precision
    (fp32 weights, gradients and their reduction; the forward in bf16 autocast or fp32): one line each, empty when
    it trains alike.  A `torch_autocast` section is compared after the trainer's own fills its unset keys."""
    ddp = "bf16 autocast" if mixed_precision == "bf16" else "fp32"
    problems = [f"enables {mode}: the engine would hold {mode} weights and run the forward in {mode}, the DDP "
                f"path runs fp32 weights with a {ddp} forward (remove the {mode} section)"
                for mode in ("bf16", "fp16") if _enabled(ds_cfg.get(mode))]
    wanted = torch_autocast_section(mixed_precision)
    section = {**wanted, **(ds_cfg.get("torch_autocast") or {})}
    if _enabled(section) != wanted["enabled"]:
        state = "on" if _enabled(section) else "off"
        problems.append(f"turns torch_autocast {state}: the engine's forward would run in "
                        f"{'fp32' if state == 'off' else section.get('dtype')} where the DDP path's runs in {ddp} "
                        f"(training.mixed_precision: {mixed_precision}; remove the torch_autocast section)")
    elif _enabled(section):
        if str(section.get("dtype")) not in BF16_NAMES:
            problems.append(f"torch_autocast.dtype {section.get('dtype')!r}: the DDP path's forward runs in bf16")
        if section.get("lower_precision_safe_modules"):
            problems.append(f"torch_autocast.lower_precision_safe_modules {section['lower_precision_safe_modules']}"
                            ": ZeRO would reduce their gradients in bf16, the DDP path reduces every gradient "
                            "in fp32 (remove the key)")
    comm = ds_cfg.get("communication_data_type")
    if comm is not None and str(comm) not in FP32_NAMES:
        problems.append(f"communication_data_type {comm!r}: gradients would be reduced in {comm}, the DDP path "
                        "reduces them in fp32 (remove the key)")
    return problems


def deepspeed_config_file(path: str, basedir: str | os.PathLike) -> Path | None:
    """The DeepSpeed JSON a DeepSpeed accelerate config names (deepspeed_config.deepspeed_config_file), or None."""
    parsed = _read_accelerate_config(path, basedir)
    inline = None if parsed is None else parsed.get("deepspeed_config")
    name = inline.get("deepspeed_config_file") if isinstance(inline, Mapping) else None
    return None if not name or str(name).lower() == "none" else _accelerate_config_path(str(name), basedir)


def check_deepspeed_precision(cfg: Mapping, basedir: str | os.PathLike) -> list[str]:
    """A model launched under DeepSpeed whose DeepSpeed JSON would train in another precision than the DDP path
    (deepspeed_precision_problems), named with the file; the trainer refuses the same config when it starts."""
    def problems(training):
        path = (training.get("launch") or {}).get("accelerate_config")
        if path is None or accelerate_distributed_type(path, basedir) != "DEEPSPEED":
            return []
        json_file = deepspeed_config_file(path, basedir)
        if json_file is None:
            return []
        try:
            ds_cfg = json.loads(json_file.read_text())
        except (OSError, ValueError) as e:
            return [f"training.launch.accelerate_config {path}: DeepSpeed config {json_file} unreadable ({e})"]
        return [f"training.launch.accelerate_config {path}: DeepSpeed config {json_file} {line}"
                for line in deepspeed_precision_problems(ds_cfg, str(training.get("mixed_precision", "no")))]

    return _per_model(cfg, problems)
