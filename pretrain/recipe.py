"""Recipes: YAML files validated into typed dataclasses, with dotted command-line overrides.

A recipe has four sections, each owned by the room that uses it: ``data`` (`DataConfig`), ``model``
(`ModelConfig`), ``objectives`` (`ObjectivesConfig`) and ``train`` (`TrainConfig`). Loading is strict: an unknown
key, a value of the wrong type, or an override that does not parse fails *before launch* with one line naming the
key, where it came from (the file or the command line) and, for unknown keys, the valid ones.

A recipe may name another as its ``base:`` (a bundled name, or a YAML path, looked up next to the recipe first) and
hold only what differs: mappings merge key by key, ``null`` takes a key out of the base (a tower, an objective; a
setting then has its default), anything else replaces (`merge_recipe`); bases chain, and a cycle is an error
naming the files. The bundled ``NAME-tiny`` recipes are their ``NAME`` shrunk this way.

Overrides are ``dotted.key=value``; the value is read as YAML (``train.steps=50``, ``model.audio.patch_size=[16,8]``,
``data.eval=null``). Relative paths (fields marked as paths) are resolved against the working directory, and
the resolved recipe — every default filled in — is what a run directory stores.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

import mmssl.recipes as bundled_recipes
from mmssl.architectures.config import ModelConfig
from mmssl.architectures.modalities.base import resolve_path_field
from mmssl.data_pipelines.config import DataConfig
from mmssl.objectives.registry import ObjectivesConfig
from mmssl.pretrain.errors import PretrainError


class RecipeError(PretrainError):
    """A recipe that cannot be used as written; the message names the key and its origin."""


@dataclass
class WandbConfig:
    """``train.wandb``: the W&B run of ``train.report_to: [wandb]`` (`pretrain.runlog`). ``mode``: ``online``,
    ``offline`` (written under ``RUN/wandb/``, uploaded later with ``wandb sync``; no network) or ``disabled``;
    unset: W&B's own default (``WANDB_MODE``, else online). ``name`` defaults to the run directory's name."""

    project: str = "mmssl"
    entity: str | None = None
    name: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    mode: str | None = None


@dataclass
class TrainConfig:
    """Optimisation, precision, parallelism, logging and checkpointing.

    ``report_to``: metric sinks besides ``metrics.jsonl`` (always written: the tools read it): ``tensorboard``,
    ``wandb`` (`pretrain.runlog`); unset, ``tensorboard`` (the older switch, default on) decides TensorBoard alone.
    ``deepspeed``: DeepSpeed config keys merged over the generated config (`pretrain.engine.merge_deepspeed`), e.g.
    ``{zero_optimization: {offload_optimizer: {device: cpu}}}``; a key mmssl sets from the recipe is refused.
    """

    steps: int = 100
    stop_at: int = 0  # checkpoint and exit at this step (0: run to `steps`); the LR schedule still spans `steps`
    lr: float = 5e-4
    min_lr_ratio: float = 0.0
    warmup_steps: int = 10
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    grad_clip: float = 1.0
    grad_accum: int = 1
    optimizer_impl: str = "fused"  # AdamW's kernels: "fused", "foreach" or "loop" (`pretrain.engine.OPTIMIZER_IMPLS`)
    compile: bool = False  # torch.compile the towers (inductor): faster steps after a compilation, rounding differs
    # scaled-dot-product attention's kernel: auto (math on the CPU in bf16, torch's choice elsewhere), torch, math,
    # flash or efficient (`pretrain.precision.attention_backends`)
    attention_kernel: str = "auto"
    # 4-D inputs of timm towers in channels-last layout (`architectures.layout`): None (auto) for convolutional
    # towers (CNNs, hybrid ViTs), true for every timm tower, false for none
    channels_last: bool | None = None
    accumulation: str = "cached"  # "cached": negatives span the whole accumulated batch (gradient cache); "naive"
    zero_stage: int = 2
    precision: str = "fp32"
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 0
    keep_last: int = 2
    resume: str | None = None
    deterministic: bool | None = None  # None: on for CPU runs (bit-identical resume), off on CUDA (autotune, TF32)
    threads: int = 0
    log_keys: bool = False
    tensorboard: bool | None = None  # None: on unless report_to is set (then report_to decides)
    report_to: list[str] | None = None  # jsonl (always on), tensorboard, wandb
    wandb: WandbConfig = field(default_factory=WandbConfig)
    deepspeed: dict[str, Any] = field(default_factory=dict)  # merged over the generated DeepSpeed config
    # abort after more than this many *consecutive* steps whose loss is NaN/inf on any rank (each such step's
    # update is skipped on every rank); 0: abort at the first one
    max_nonfinite_steps: int = 10
    collective_timeout_s: float = 1800.0  # process-group timeout: a collective waiting longer on a dead rank fails
    profile_comms: bool = False  # time DeepSpeed's collectives (its comms logger; each op made blocking): summary.json
    profile_steps: bool = False  # on CUDA, time each step's phases with CUDA events (the step then waits for the GPU)


@dataclass
class Recipe:
    name: str = "unnamed"
    description: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objectives: ObjectivesConfig = field(default_factory=ObjectivesConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# ----------------------------------------------------------------------------------------------------- loading
def bundled_recipe_path(name: str) -> Path | None:
    path = Path(bundled_recipes.__file__).parent / f"{name}.yaml"
    return path if path.is_file() else None


def list_bundled_recipes() -> dict[str, str]:
    """name -> first line of its description."""
    out = {}
    for path in sorted(Path(bundled_recipes.__file__).parent.glob("*.yaml")):
        raw = yaml.safe_load(path.read_text()) or {}
        out[path.stem] = str(raw.get("description", "")).strip().splitlines()[0] if raw.get("description") else ""
    return out


BASE_KEY = "base"


def locate_recipe(source: str | Path, *, next_to: Path | None = None) -> Path:
    """The YAML file of ``source``: a path (tried next to ``next_to`` first, for a ``base:``), or a bundled name."""
    path = Path(source)
    if next_to is not None and not path.is_absolute() and (next_to.parent / path).is_file():
        return next_to.parent / path
    if path.is_file():
        return path
    bundled = bundled_recipe_path(str(source))
    if bundled is None:
        names = ", ".join(list_bundled_recipes()) or "none"
        where = f"{next_to}: base " if next_to is not None else "recipe not found: "
        raise RecipeError(f"{where}{str(source)!r} is neither a file nor a bundled recipe ({names})")
    return bundled


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe must be a mapping at the top level, got {type(raw).__name__}")
    return raw


def read_recipe(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The raw recipe of ``path`` with its ``base:`` chain merged in (`merge_recipe`), ``base`` itself removed.
    A cycle or a missing base is a `RecipeError` naming the files."""
    raw = _read_yaml(path)
    base = raw.pop(BASE_KEY, None)
    if base is None:
        return raw
    if not isinstance(base, str) or not base:
        raise RecipeError(f"{path}: base must name a recipe (a bundled name or a YAML path), got {base!r}")
    parent = locate_recipe(base, next_to=path)
    chain = (*chain, path.resolve())
    if parent.resolve() in chain:
        cycle = " -> ".join(str(p) for p in (*chain, parent.resolve()))
        raise RecipeError(f"{path}: base {base!r} makes a cycle: {cycle}")
    return merge_recipe(read_recipe(parent, chain), raw)


def merge_recipe(base: Mapping[str, Any], child: Mapping[str, Any]) -> dict[str, Any]:
    """``child`` over ``base``: mappings merge key by key; ``null`` takes the key out of the base (a tower or an
    objective the child does not have; for a setting, its default applies); anything else replaces the base value."""
    out = dict(base)
    for key, value in child.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge_recipe(out[key], value)
        elif value is None:
            out.pop(key, None)
        else:
            out[key] = value
    return out


def load_recipe(source: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """Load a recipe from a YAML path or a bundled recipe name, with its ``base:`` chain (a recipe that names
    another as its base holds only what differs from it), apply ``overrides``, and type-check it all."""
    path = locate_recipe(source)
    raw = read_recipe(path)
    overridden = apply_overrides(raw, overrides)
    recipe = from_dict(Recipe, raw, path=(), origin=_Origin(str(path), overridden))
    resolve_paths(recipe)
    return recipe


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, str]:
    """Set each ``a.b.c=value`` into ``raw``; returns dotted key -> the override text, for error messages."""
    done: dict[str, str] = {}
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"override {item!r} must look like key.path=value")
        key, text = item.split("=", 1)
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise RecipeError(f"override {item!r} has an empty key part")
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError:
            value = text
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise RecipeError(f"override {item!r}: {part!r} is a value, not a section")
            node = child
        node[parts[-1]] = value
        done[key] = item
    return done


@dataclass(frozen=True)
class _Origin:
    file: str
    overrides: Mapping[str, str]

    def of(self, path: tuple[str, ...]) -> str:
        dotted = ".".join(path)
        for key, text in self.overrides.items():
            if dotted == key or dotted.startswith(key + ".") or key.startswith(dotted + "."):
                return f"command-line override {text!r}"
        return self.file


_FLOAT_LITERAL = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _type_name(tp: Any) -> str:
    args = typing.get_args(tp) if typing.get_origin(tp) in (Union, types.UnionType) else ()
    if len(args) == 2 and type(None) in args:  # an optional key: null (unset) is always accepted
        return _type_name(next(a for a in args if a is not type(None)))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def from_dict(cls: type, raw: Any, *, path: tuple[str, ...], origin: _Origin) -> Any:
    """Build dataclass ``cls`` from ``raw``, checking every key and value type."""
    where = ".".join(path) or "<top level>"
    if not isinstance(raw, Mapping):
        raise RecipeError(f"{origin.of(path)}: '{where}' must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    extra_field = getattr(cls, "EXTRA_KEYS_FIELD", None)
    kwargs: dict[str, Any] = {}
    extras: dict[str, Any] = {}
    for key, value in raw.items():
        key = str(key)
        sub = (*path, key)
        if key in fields and key != extra_field:
            kwargs[key] = convert(hints[key], value, path=sub, origin=origin)
            continue
        extra_type = cls.extra_key_type(key) if extra_field else None
        if extra_type is None:
            valid = sorted(k for k in fields if k != extra_field)
            if extra_field:
                valid += [f"{n}" for n in cls.extra_key_names()]
            raise RecipeError(
                f"{origin.of(sub)}: unknown key '{'.'.join(sub)}'; valid keys under '{where}': {', '.join(valid)}"
            )
        extras[key] = convert(extra_type, value if value is not None else {}, path=sub, origin=origin)
    if extra_field:
        kwargs[extra_field] = extras
    return cls(**kwargs)


def convert(tp: Any, value: Any, *, path: tuple[str, ...], origin: _Origin) -> Any:
    """Check (and minimally coerce: int -> float) ``value`` against the type hint ``tp``."""
    where = ".".join(path)

    def fail() -> typing.NoReturn:
        raise RecipeError(
            f"{origin.of(path)}: '{where}' expects {_type_name(tp)}, got {value!r} ({type(value).__name__})"
        )

    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value if value is not None else {}, path=path, origin=origin)
    kind = typing.get_origin(tp)
    if kind in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return convert(arg, value, path=path, origin=origin)
            except RecipeError:
                continue
        fail()
    if kind is typing.Literal:
        if value not in typing.get_args(tp):
            fail()
        return value
    if kind in (list, Sequence, tuple):
        if not isinstance(value, list):
            fail()
        (item,) = typing.get_args(tp)[:1] or (Any,)
        return [convert(item, v, path=(*path, str(i)), origin=origin) for i, v in enumerate(value)]
    if kind in (dict, Mapping):
        if not isinstance(value, Mapping):
            fail()
        _, item = typing.get_args(tp) or (str, Any)
        return {str(k): convert(item, v, path=(*path, str(k)), origin=origin) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            fail()
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            fail()
        return value
    if tp is float:
        if isinstance(value, str) and _FLOAT_LITERAL.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads `3e-4` (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail()
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            fail()
        return value
    raise RecipeError(f"{origin.of(path)}: '{where}' has an unsupported type {tp!r}")  # a bug in a config class


# ----------------------------------------------------------------------------------------------------- paths
def resolve_paths(recipe: Recipe) -> None:
    """Make path fields absolute (relative to the working directory); remote URLs are left alone; a tower's
    ``pretrained`` Hugging Face id becomes its local cache directory (`resolve_path_field`)."""
    for tower in recipe.model.towers.values():
        for f in dataclasses.fields(tower):
            value = getattr(tower, f.name)
            if f.metadata.get("path") and isinstance(value, str) and value:
                setattr(tower, f.name, resolve_path_field(f, value))
    for name in ("train", "eval"):
        setattr(recipe.data, name, _local_path(getattr(recipe.data, name)))
    for source in recipe.data.sources:
        source.train = _local_path(source.train)


def _local_path(value: str | None) -> str | None:
    if value and "://" not in value and not value.startswith(("pipe:", "file:")):
        return str(Path(value).expanduser().resolve())
    return value


# ----------------------------------------------------------------------------------------------------- saving
def to_dict(obj: Any) -> Any:
    """A recipe (or any config dataclass) as plain YAML-able data; extra-key sections are flattened back."""
    if dataclasses.is_dataclass(obj):
        extra_field = getattr(type(obj), "EXTRA_KEYS_FIELD", None)
        out: dict[str, Any] = {}
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if f.name == extra_field:
                out.update({k: to_dict(v) for k, v in value.items()})
            else:
                out[f.name] = to_dict(value)
        return out
    if isinstance(obj, Mapping):
        return {str(k): to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(to_dict(recipe), sort_keys=False)


def model_config_from_dict(raw: Mapping[str, Any], source: str) -> ModelConfig:
    """A ``model:`` section (as `to_dict` wrote it, e.g. into an export's config.json) parsed and type-checked;
    errors name ``source`` and the key."""
    return from_dict(ModelConfig, dict(raw), path=("model",), origin=_Origin(source, {}))
