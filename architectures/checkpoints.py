"""Pretrained weights: where they are (a local path, or a Hugging Face id in the local cache) and loading them
strictly.

Locations (`resolve_pretrained`): a path that exists is used as it is; otherwise ``org/name`` or
``hf-hub:org/name`` (timm's spelling) is a Hugging Face id, looked up offline in the local cache
(huggingface_hub's layout ``<cache>/models--org--name/snapshots/<commit>/``, ``refs/main`` naming the commit;
``<cache>``: ``HF_HUB_CACHE``, else ``HF_HOME/hub``, else ``~/.cache/huggingface/hub``). mmssl never downloads: an
id that is not in the cache is an error naming the cache directory it looked in.

Strict loading (`load_state_strictly`): every tensor of the tower must come from the file and every tensor of the
file must find its place, with the same shape; otherwise a one-line error names the file, counts the missing,
unexpected and reshaped keys and shows the first few of each. With ``strict=False`` (recipe key
``pretrained_strict: false``) the tensors whose name and shape match are loaded and the rest is logged. Loaded
tensors are copied as they are (``Tensor.copy_``): the tower holds the file's values bit for bit.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from mmssl.architectures.errors import ArchitectureError

log = logging.getLogger(__name__)

HUB_PREFIX = "hf-hub:"
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
SHOWN_KEYS = 3  # keys shown per kind in a mismatch message


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache directory, read from the environment now (as huggingface_hub resolves it:
    ``HF_HUB_CACHE``, ``HUGGINGFACE_HUB_CACHE``, ``HF_HOME/hub``, ``XDG_CACHE_HOME/huggingface/hub``)."""
    env = os.environ
    for key in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if env.get(key):
            return Path(env[key]).expanduser()
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(home).expanduser() / "hub"


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".npz", ".json")  # file names, not ids


def hub_id(value: str) -> str | None:
    """The Hugging Face id ``value`` spells (``org/name`` or ``hf-hub:org/name``), or None for anything else (a
    path with more parts, or a weight file's name)."""
    if value.startswith(HUB_PREFIX):
        name = value[len(HUB_PREFIX):]
    elif value.endswith(WEIGHT_SUFFIXES):
        return None
    else:
        name = value
    return name if _HUB_ID.fullmatch(name) else None


def cached_snapshot(repo_id: str) -> Path | None:
    """The local snapshot directory of model ``repo_id`` (its ``refs/main`` commit) in `hub_cache_dir`, or None;
    offline (``local_files_only``), nothing is downloaded."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, cache_dir=str(hub_cache_dir()), local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError, FileNotFoundError):
        return None


def not_found_message(value: str) -> str:
    """Why ``value`` names no pretrained weights: the local path it is not, and for an id the cache it is not in."""
    repo = hub_id(value)
    local = "" if value.startswith(HUB_PREFIX) else f"{value!r} is not a local path"
    if repo is None:
        return f"{local} (pretrained weights: a .safetensors file, a directory, or a Hugging Face id org/name)"
    folder = hub_cache_dir() / f"models--{repo.replace('/', '--')}"
    cached = f"Hugging Face id {repo!r} is not in the local cache (looked for {folder}/snapshots/ via refs/main)"
    return (f"{local + ', and ' if local else ''}{cached}; mmssl never downloads: fetch it where there is network "
            f"(`hf download {repo}`) into that cache, or set HF_HUB_CACHE / HF_HOME to the cache that holds it")


def find_pretrained(value: str) -> Path | None:
    """The local file or directory ``value`` names (`resolve_pretrained`), or None when there is none."""
    path = Path(value).expanduser()
    if not value.startswith(HUB_PREFIX) and path.exists():
        return path
    repo = hub_id(value)
    return cached_snapshot(repo) if repo is not None else None


def resolve_pretrained(value: str | Path, where: str) -> Path:
    """The local file or directory of a ``pretrained`` value: an existing path, else a Hugging Face id's snapshot
    in the local cache; raises `ArchitectureError` naming ``where`` and the places looked in."""
    found = find_pretrained(str(value))
    if found is None:
        raise ArchitectureError(f"{where}: {not_found_message(str(value))}")
    return found


def read_config(path: Path) -> dict[str, Any]:
    """``config.json`` of a pretrained directory (empty for a file or a directory without one)."""
    cfg_file = path / "config.json" if path.is_dir() else None
    if cfg_file is None or not cfg_file.is_file():
        return {}
    try:
        data = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as exc:
        raise ArchitectureError(f"{cfg_file}: not valid JSON: {exc}") from None
    return data if isinstance(data, dict) else {}


def natural_order(keys: Any) -> list[str]:
    """``keys`` sorted with their numbers compared as numbers (``blocks.4`` before ``blocks.10``)."""
    return sorted(keys, key=lambda k: [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", k)])


def _shown(keys: list[str]) -> str:
    more = f", … {len(keys) - SHOWN_KEYS} more" if len(keys) > SHOWN_KEYS else ""
    return ", ".join(keys[:SHOWN_KEYS]) + more


@dataclass
class StateReport:
    """How a file's state dict fits a module's: keys only the module has, keys only the file has, and keys both
    have with different shapes (``key -> (file shape, module shape)``)."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    reshaped: dict[str, tuple[list[int], list[int]]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.reshaped)

    def describe(self, what: str = "tower") -> str:
        parts = []
        if self.missing:
            parts.append(f"{len(self.missing)} {what} keys missing from the file ({_shown(self.missing)})")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} file keys the {what} lacks ({_shown(self.unexpected)})")
        if self.reshaped:
            shapes = [f"{k}: file {a} vs {what} {b}" for k, (a, b) in self.reshaped.items()]
            parts.append(f"{len(shapes)} keys of another shape ({_shown(shapes)})")
        return "; ".join(parts)


def compare_state(own: dict[str, Tensor], found: dict[str, Tensor]) -> StateReport:
    """`StateReport` of a file's tensors ``found`` against a module's state dict ``own``."""
    return StateReport(
        missing=natural_order(set(own) - set(found)),
        unexpected=natural_order(set(found) - set(own)),
        reshaped={k: (list(found[k].shape), list(own[k].shape)) for k in natural_order(set(own) & set(found))
                  if tuple(found[k].shape) != tuple(own[k].shape)},
    )


def check_fit(report: StateReport, *, source: Path | str, where: str, what: str, strict: bool) -> None:
    """Raise (``strict``) or log (not) a mismatch between a module and the pretrained file ``source``."""
    if not report:
        return
    if strict:
        raise ArchitectureError(f"{where}.pretrained: {source} does not fit the {what} as configured: "
                                f"{report.describe()}; set {where}.pretrained_strict: false to load only the "
                                "tensors that fit")
    log.warning("%s.pretrained: loaded the part of %s that fits the %s (pretrained_strict: false); not loaded: %s",
                where, source, what, report.describe())


def load_state_strictly(module: nn.Module, state: dict[str, Tensor], *, source: Path | str, where: str, what: str,
                        strict: bool = True, ignore: tuple[str, ...] = (), check_only: bool = False) -> StateReport:
    """Copy ``state`` (a file's tensors) into ``module``: with ``strict`` every key must match in name and shape
    (`check_fit`); otherwise the tensors that match are copied and the rest logged. File keys under a prefix in
    ``ignore`` that the module lacks (a classifier the tower drops) are left out. ``check_only``: compare shapes
    and raise (``strict``) but copy and log nothing (a shape-only build; ``state`` may be `file_shapes`)."""
    own = module.state_dict()
    dropped = [k for k in state if k not in own and k.startswith(ignore)] if ignore else []
    found = {k: v for k, v in state.items() if k not in dropped}
    report = compare_state(own, found)
    if check_only:
        if strict:
            check_fit(report, source=source, where=where, what=what, strict=True)
        return report
    if dropped:
        log.info("%s.pretrained: %s holds %s, which the tower has no place for (its classifier); left out",
                 where, source, _shown(dropped))
    check_fit(report, source=source, where=where, what=what, strict=strict)
    fitting = {k: v for k, v in found.items() if k in own and k not in report.reshaped}
    module.load_state_dict(fitting, strict=False)
    return report


def file_shapes(path: Path | str) -> dict[str, Tensor]:
    """The tensors of a ``.safetensors`` file as meta-device tensors of their shapes: only its header is read."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}  # noqa: SIM118


def load_transformers(path: Path, config: Any, *, strict: bool, where: str) -> nn.Module:
    """``AutoModel.from_pretrained`` (offline, float32; transformers' own key mapping and tied weights) checked by
    `check_fit` against its loading report: missing, unexpected and reshaped keys. A pooler in the file, and the
    task head of a checkpoint saved with one (keys outside the base model's prefix, e.g. ``cls.`` beside ``bert.``),
    are left out, not unexpected: towers pool themselves (`HFTextTower`). transformers' own report is silenced."""
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    def load(source: str, **kwargs: Any) -> Any:
        return AutoModel.from_pretrained(source, config=config, output_loading_info=True, local_files_only=True,
                                         ignore_mismatched_sizes=True, dtype=torch.float32, **kwargs)

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model, info = without_pooler(load, str(path))
    finally:
        hf_logging.set_verbosity(verbosity)
    prefix = f"{getattr(model, 'base_model_prefix', '') or '-'}."
    headed = any(k.startswith(prefix) for k in checkpoint_keys(path))  # saved with a task head (BertForMaskedLM)

    def extra(key: str) -> bool:  # the checkpoint's pooler or task head: a tower has neither
        return key.startswith(("pooler.", f"{prefix}pooler.")) or (headed and not key.startswith(prefix))

    left_out = natural_order(k for k in info["unexpected_keys"] if extra(k))
    if left_out:
        log.info("%s.pretrained: %s holds %s, which the tower has no place for (its pooler / task head); left out",
                 where, path, _shown(left_out))
    report = StateReport(missing=natural_order(info["missing_keys"]),
                         unexpected=natural_order(k for k in info["unexpected_keys"] if not extra(k)),
                         reshaped={k: (list(a), list(b)) for k, a, b in info["mismatched_keys"]})
    check_fit(report, source=path, where=where, what=f"transformers {config.model_type!r} tower", strict=strict)
    return model


def checkpoint_keys(path: Path) -> list[str]:
    """The tensor names of a transformers directory's safetensors checkpoint (one file, or the shards of its
    ``model.safetensors.index.json``); empty when it has none (weights in another format)."""
    from safetensors import safe_open

    index = path / "model.safetensors.index.json"
    if index.is_file():
        return list(json.loads(index.read_text()).get("weight_map", {}))
    if not (path / "model.safetensors").is_file():
        return []
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        return list(f.keys())


def timm_dir_args(location: Path, arch: str, where: str) -> dict[str, Any]:
    """``model_args`` of a timm directory's ``config.json`` (timm's hub layout, `TimmTower.save_native`), after
    checking that it holds ``arch`` (tags after the dot aside)."""
    cfg = read_config(location)
    held = cfg.get("architecture")
    if held and str(held).split(".")[0] != arch.split(".")[0]:
        raise ArchitectureError(f"{where}.pretrained: {location} holds timm {held!r} but {where}.arch is {arch!r}")
    return dict(cfg.get("model_args") or {})


def timm_pretrained_cfg(arch: str, pretrained: str | None) -> dict[str, Any]:
    """timm's ``pretrained_cfg`` of a tower: the arch's (its default tag, or the tag in ``arch``), overlaid by the
    pretrained directory's ``config.json`` one when there is such a directory (mean, std, crop_pct, interpolation,
    input_size, ...); an mmssl export's alone (it records the preprocessing it was trained with). A pretrained
    value that names nothing local gives the arch's; loading the tower reports that."""
    from timm.models import get_pretrained_cfg

    location = find_pretrained(pretrained) if pretrained else None
    cfg = read_config(location) if location is not None else {}
    if "mmssl" in cfg:  # an mmssl export records its own preprocessing, nothing else applies
        return dict(cfg.get("pretrained_cfg") or {})
    try:
        default = get_pretrained_cfg(arch)
    except RuntimeError:
        default = None
    out = default.to_dict() if default is not None else {}
    out.update(cfg.get("pretrained_cfg", cfg if "architecture" in cfg else {}) or {})
    return out


def without_pooler(factory: Any, source: Any) -> nn.Module:
    """Build without the model's pooler where its class takes ``add_pooling_layer`` (BERT family), so neither
    unused parameters nor "newly initialised pooler" reports appear; other classes are built as they are."""
    try:
        return factory(source, add_pooling_layer=False)
    except TypeError:
        return factory(source)


def weights_file(path: str) -> Path:
    """The ``.safetensors`` file of a pretrained file or directory (``model.safetensors`` in it)."""
    p = Path(path)
    if p.is_dir():
        if not (p / "model.safetensors").is_file():
            raise ArchitectureError(f"pretrained weights not found: {p} has no model.safetensors (mmssl reads "
                                    "safetensors only)")
        p = p / "model.safetensors"
    if not p.is_file():
        raise ArchitectureError(f"pretrained weights not found: {p}")
    return p


def load_state(path: str | Path) -> dict[str, Tensor]:
    """A state dict from a ``.safetensors`` file (the only weight format mmssl reads)."""
    return load_file(str(weights_file(str(path))))
