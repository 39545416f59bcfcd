"""One resolved spec per model of a study: what the trainer, the rules, the plan and the benchmarks read of a model.

No torch import here (the Snakefile resolves every model's spec while it lays out the DAG). `resolve_specs(cfg)`
turns a loaded study config (study.config.load_config) into {model: ModelSpec}, each computed once: the study's
`training` section merged with the model's overrides, its variant section, its architecture name and family
(models.sizes), its snapshot marks, training length and micro-batching, and the config's part of the settings
fingerprint.  The per-model functions it is built from (model_training, snapshot_marks, micro_batch, ...) live
here too; study.config imports them (its loading checks use them) and keeps their old import path.

The settings fingerprint (`config_fingerprint`: what a run folder's state.pt and done.json belong to) has three
parts only the training job can supply: the net's complete constructor kwargs (models.family reads the family's
constructor defaults from the torch module), the variant's record (models.diffusion works out the σ range of the
t-distributions in torch) and the dataset's shape and label count (the data file). `ModelSpec.fingerprint` takes
them and returns the same value config_fingerprint always did.  The EMA a model's training asks for
(`ema_settings`, and `ema_label`: the words models.json and exponents.csv use) is read here too, torch-free.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from typing import Mapping

from models.sizes import family_of

# training keys that change no image, σ, noise or weight: micro-batching (batch_gpu) and who watches (trackers)
RESULT_NEUTRAL_KEYS = ("batch_gpu", "trackers")
STEP_RESOURCE_DEFAULTS = {"gpus": 0, "cpus": 1, "cpus_per_gpu": 8, "runtime": 60, "mem_mb": 4000}
DEFAULT_SIGMA_REL = (0.05, 0.10)    # EDM2's two stored power-EMA profiles (training.power_ema keeps them)


class ConfigError(ValueError):
    """A study config that does not match the schema; the message names the key path."""


# --------------------------------------------------------------------------------------------------------------
# the resolved spec
# --------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelSpec:
    """Model `name` of a study as every consumer sees it. `training` and `variant` are plain dicts (YAML and JSON
    dump them as they are): read them, do not change them."""
    name: str
    size: str                # the model-table entry this run is a seed run of (`seeds: K`), else `name`
    arch: str                # the size's name in models.sizes
    family: str              # "edm2" or "dit" (models.sizes.FAMILY)
    training: dict           # the study's training section deep-merged with the model's overrides
    variant: dict            # {name, kwargs}: the model's own variant section, else the study's
    marks: tuple[int, ...]   # images seen at each snapshot, ascending; the last is `total`
    total: int               # training length in images, whole global batches

    def micro_batch(self, num_processes: int) -> tuple[int, int]:
        """(batch_gpu, rounds) with the processes a run really has (the trainer asks with its world size)."""
        return micro_batch(self.training, num_processes)

    # Worked out when asked, not when resolved: a trainer started with other processes than the configured ones
    # (a benchmark's one) needs only its own split to work.
    @property
    def batch_gpu(self) -> int:
        """Images per micro-batch with the configured training.launch.num_processes."""
        return self.micro_batch(self.training["launch"]["num_processes"])[0]

    @property
    def rounds(self) -> int:
        """Micro-batches per step and process (gradient accumulation) with the configured processes."""
        return self.micro_batch(self.training["launch"]["num_processes"])[1]

    @property
    def settings(self) -> dict:
        """The training section as the settings fingerprint holds it (less RESULT_NEUTRAL_KEYS, plain JSON)."""
        return json.loads(json.dumps(result_settings(self.training)))

    def fingerprint(self, arch_kwargs: dict, variant_record: dict, data_shape, label_dim: int) -> dict:
        """config_fingerprint of this model, given the parts only a training job knows (see the module's doc)."""
        return config_fingerprint(self.training, {"name": self.arch, "kwargs": arch_kwargs}, variant_record,
                                  data_shape, label_dim)


def model_spec(cfg: Mapping, name: str) -> ModelSpec:
    """The resolved spec of model NAME of a loaded study config."""
    training = model_training(cfg, name)
    entry = _model_entry(cfg, name)
    return ModelSpec(name=name, size=entry.get("replicate_of") or name, arch=entry["arch"],
                     family=family_of(entry["arch"]), training=training, variant=model_variant(cfg, name),
                     marks=tuple(snapshot_marks(training)), total=total_images(training))


def resolve_specs(cfg: Mapping) -> dict[str, ModelSpec]:
    """{model: ModelSpec} for every model of a loaded study config, in the model table's order."""
    return {name: model_spec(cfg, name) for name in cfg.get("models") or {}}


def config_fingerprint(training: dict, arch: dict, variant: dict, data_shape, label_dim: int) -> dict:
    """What a run folder's state belongs to: the model's merged training section, its net (arch name and the
    complete kwargs), the diffusion variant, and the dataset's shape and label count. Plain JSON data (lists, not
    tuples), so it compares equal after a round trip through state.pt or done.json.  RESULT_NEUTRAL_KEYS are left
    out: micro-batching changes no image, σ or noise, so a run may resume with another batch_gpu (e.g. on smaller
    GPUs), and one may start or stop watching it (training.trackers)."""
    fp = {"training": result_settings(training), "arch": arch, "variant": variant,
          "dataset": {"shape": list(data_shape), "label_dim": int(label_dim)}}
    return json.loads(json.dumps(fp))


def result_settings(training: Mapping) -> dict:
    """A training section less RESULT_NEUTRAL_KEYS: the settings that change what is trained."""
    return {k: v for k, v in training.items() if k not in RESULT_NEUTRAL_KEYS}


# --------------------------------------------------------------------------------------------------------------
# per-model settings
# --------------------------------------------------------------------------------------------------------------

def deep_merge(base: Mapping, override: Mapping) -> dict:
    """`base` with `override` merged in, mapping by mapping (copies: neither input changes)."""
    out = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def model_training(cfg: Mapping, name: str) -> dict:
    """The training settings of model NAME: the study's `training` defaults deep-merged with the model's
    `training` overrides.  A `snapshots` override that gives `images` wins over count/spacing (see
    snapshot_marks)."""
    entry = _model_entry(cfg, name)
    overrides = dict(entry.get("training") or {})
    merged = deep_merge(cfg.get("training") or {}, overrides)
    # an explicit list of snapshot marks in the override replaces the study's geometric/linear spec
    snap_override = overrides.get("snapshots") or {}
    if "images" in snap_override:
        merged["snapshots"] = copy.deepcopy(snap_override)
    elif snap_override:
        merged["snapshots"].pop("images", None)
    return merged


def model_variant(cfg: Mapping, name: str) -> dict:
    """The variant section ({name, kwargs}) model NAME trains: its own `variant` where the entry has one, else the
    study's."""
    return _model_entry(cfg, name).get("variant") or cfg["variant"]


def _model_entry(cfg: Mapping, name: str) -> Mapping:
    models = cfg.get("models") or {}
    if name not in models:
        raise ConfigError(f"models.{name}: unknown model (known: {', '.join(models) or 'none'})")
    return models[name] or {}


def seed_sizes(cfg: Mapping) -> dict:
    """run → the model-table entry (size) it is a seed run of (its own name when it is no replicate)."""
    return {name: (entry or {}).get("replicate_of") or name for name, entry in (cfg.get("models") or {}).items()}


def step_resources(cfg: Mapping, step: str, model: str | None = None) -> dict:
    """Resources of one workflow step (dataset, optimal_loss, train, evaluate): built-in defaults < the config's
    `resources.<step>` < the model's own `resources`. Runtime in minutes; mem_mb per node."""
    r = dict(STEP_RESOURCE_DEFAULTS)
    r.update((cfg.get("resources") or {}).get(step) or {})
    if model is not None:
        r.update((cfg["models"][model] or {}).get("resources") or {})
    return r


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


def total_images(training: Mapping) -> int:
    """Training length in images seen, rounded up to a whole number of (global) batches."""
    batch = int(training["batch_size"])
    return int(math.ceil(int(training["total_images"]) / batch) * batch)


def _length_text(training: Mapping) -> str:
    """'total_images=N' as the config says it (and the whole batches it is rounded up to, where they differ)."""
    asked, total = int(training["total_images"]), total_images(training)
    return f"total_images={asked}" + (f" (rounded up to whole batches: {total})" if total != asked else "")


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
                raise ConfigError(f"training.snapshots.first_images: must be in (0, {_length_text(training)}], "
                                  f"got {first:g}")
            ratio = total / first
            raw = [first * ratio ** (i / (count - 1)) for i in range(count)]
        elif spacing == "linear":
            first = float(first) if first else total / count
            if not 0 < first <= total:
                raise ConfigError(f"training.snapshots.first_images: must be in (0, {_length_text(training)}], "
                                  f"got {first:g}")
            raw = [first + (total - first) * i / (count - 1) for i in range(count)]
        else:
            raise ConfigError(f"training.snapshots.spacing: unknown spacing {spacing!r} (geometric or linear)")
    marks = sorted({to_batch(m) for m in raw} | {total})
    return marks


# --------------------------------------------------------------------------------------------------------------
# the EMA a model's training section asks for (the trainer's training.power_ema, the model table's `ema` label)
# --------------------------------------------------------------------------------------------------------------

def ema_settings(training: dict) -> tuple[str, list[float]]:
    """("classic", []) or ("power", the σ_rel values) from a model's training section (`training.ema`; absent =
    classic, the half-life EMA of training.ema_halflife_images)."""
    ema = training.get("ema") or {}
    kind = ema.get("kind", "classic")
    if kind != "power":
        return "classic", []
    return "power", [float(s) for s in (ema.get("sigma_rel") or DEFAULT_SIGMA_REL)]


def ema_label(training: dict) -> str:
    """The EMA a model's snapshots are evaluated at, in words (models.json's `ema`; exponents.csv's `ema` column):
    "halflife 2000 images, ramp 0.05 × images seen", "none (raw weights)" or "power σ_rel=0.05" (the first
    stored profile: the snapshots' `ema`)."""
    kind, sigma_rels = ema_settings(training)
    if kind == "power":
        return f"power σ_rel={sigma_rels[0]:g}"
    halflife = float(training.get("ema_halflife_images") or 0)
    if halflife <= 0:
        return "none (raw weights)"
    ratio = training.get("ema_rampup_ratio")
    return f"halflife {halflife:g} images" + (f", ramp {float(ratio):g} × images seen" if ratio else "")
