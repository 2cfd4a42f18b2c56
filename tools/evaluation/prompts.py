"""Prompt files: the class names (and templates) zero-shot classification turns into text classifiers, and how the
labels found in the shards are matched to them.

Accepted shapes (`load_prompt_file`; JSON by the ``.json`` suffix or by content starting with ``[`` / ``{``):

1. a JSON **list** of names, ``["t-shirt/top", "trouser", ...]``: entry ``i`` names the integer label ``i``
   (img2dataset-style ``{"label": 3}`` in the ``json`` member); a string label must equal one of the names;
2. a JSON **object label → name**, ``{"0": "t-shirt/top", "1": "trouser", ...}``: the keys are the labels as they
   appear in the shards, written as JSON strings (the integer label ``3`` and the string label ``"3"`` both match
   the key ``"3"``; a string label ``"tee"`` matches the key ``"tee"``); the classes are the object's entries in
   order;
3. a JSON object ``{"classnames": <1 or 2>, "templates": [...]}`` (either key may be left out);
4. a **text** file, one entry per line: CLIP_benchmark's ``classnames.txt`` (line ``i`` names label ``i``); lines
   holding ``{}`` or ``{c}`` are templates; blank lines and ``#`` comments are skipped — with integer labels a
   skipped line *between* class names is an error (it would shift the line numbers the labels index);
5. a **directory** laid out as a CLIP_benchmark webdataset: ``classnames.txt`` and, when present,
   ``zeroshot_classification_templates.txt`` (one template per line).

A template holds ``{}`` or CLIP_benchmark's ``{c}`` where the class name goes (`render`). Every label is matched
by `match_labels` or refused: an integer indexes the class list (never looked up as a name), a string is a name
(list / text) or a key (object), and a label with no name is an error naming it, its sample and the file.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mmssl.tools.errors import ToolError

SHAPES = ("accepted: a JSON list of class names (entry i names label i), a JSON object mapping each label to its "
          "name, a JSON object {\"classnames\": ..., \"templates\": [...]}, a text file with one class name per line "
          "(CLIP_benchmark classnames.txt; lines with {} or {c} are templates) or a CLIP_benchmark dataset directory")
CLIP_BENCHMARK_CLASSNAMES = "classnames.txt"
CLIP_BENCHMARK_TEMPLATES = "zeroshot_classification_templates.txt"
STRUCTURED_KEYS = ("classnames", "templates")


@dataclass(frozen=True)
class PromptFile:
    """What a prompt file says: ``classnames[i]`` is class ``i``; ``label_keys[i]`` the label naming it (object
    form; None: labels are positions or names); ``templates`` empty when the file gives none; ``gap_line``: a
    skipped line between class names (text form), which makes integer labels ambiguous."""

    source: str
    classnames: list[str]
    templates: list[str]
    label_keys: list[str] | None = None
    gap_line: int | None = None


def render(template: str, name: str) -> str:
    """``template`` with the class name in its ``{}`` / ``{c}`` placeholders."""
    return template.format(name, c=name)


def check_templates(templates: Sequence[str], where: str = "templates") -> list[str]:
    """The templates as a list, or a `ToolError` naming the first that has no ``{}`` or does not format."""
    if isinstance(templates, str) or not templates:
        raise ToolError(f"{where}: expected a non-empty list of templates, got {templates!r}")
    for t in templates:
        if not isinstance(t, str) or ("{}" not in t and "{c}" not in t):
            raise ToolError(f"{where}: template {t!r} has no '{{}}' placeholder for the class name (or "
                            "CLIP_benchmark's '{c}')")
        try:
            render(t, "x")
        except (IndexError, KeyError, ValueError) as exc:
            raise ToolError(f"{where}: template {t!r} does not format with one class name ({exc})") from None
    return list(templates)


def check_classnames(classnames: Sequence[str], where: str = "classnames") -> list[str]:
    if isinstance(classnames, str) or not classnames:
        raise ToolError(f"{where}: the class list is empty (got {classnames!r})")
    bad = [c for c in classnames if not isinstance(c, str) or not c.strip()]
    if bad:
        raise ToolError(f"{where}: class names must be non-empty strings, got {bad[0]!r}")
    seen: set[str] = set()
    for c in classnames:
        if c in seen:
            raise ToolError(f"{where}: class name {c!r} is listed twice")
        seen.add(c)
    return list(classnames)


def _names(value: Any, where: str) -> tuple[list[str], list[str] | None]:
    """Class names (and label keys) from a JSON list or a label -> name object."""
    names = list(value.values()) if isinstance(value, dict) else value
    if isinstance(value, (dict, list)):
        if not value:
            raise ToolError(f"{where}: no class names (an empty JSON {type(value).__name__}); {SHAPES}")
        bad = [c for c in names if not isinstance(c, str)]
        if bad:
            raise ToolError(f"{where}: class names must be non-empty strings, got {bad[0]!r}; {SHAPES}")
        return check_classnames(names, where), list(value) if isinstance(value, dict) else None
    raise ToolError(f"{where}: expected a list of class names or an object label -> name, got a JSON "
                    f"{type(value).__name__}; {SHAPES}")


def _from_json(data: Any, src: str) -> PromptFile:
    if isinstance(data, list):
        names, _ = _names(data, f"prompt file {src}")
        return PromptFile(src, names, [])
    if not isinstance(data, dict):
        raise ToolError(f"prompt file {src}: a JSON {type(data).__name__} is not a prompt file; {SHAPES}")
    if not data:
        raise ToolError(f"prompt file {src} has no class names or templates; {SHAPES}")
    if not set(data) <= set(STRUCTURED_KEYS):
        if all(isinstance(v, str) for v in data.values()):  # shape 2: label -> name
            names, keys = _names(data, f"prompt file {src}")
            return PromptFile(src, names, [], keys)
        unknown = sorted(set(data) - set(STRUCTURED_KEYS))
        raise ToolError(f"prompt file {src}: unknown keys {unknown} (expected 'classnames' and/or 'templates', or "
                        f"an object mapping each label to its class name, every value a string); {SHAPES}")
    names, keys = _names(data["classnames"], f"{src}: classnames") if "classnames" in data else ([], None)
    templates = check_templates(data["templates"], f"{src}: templates") if "templates" in data else []
    return PromptFile(src, names, templates, keys)


def _from_text(text: str, src: str) -> PromptFile:
    names: list[str] = []
    templates: list[str] = []
    skipped: int | None = None  # the first skipped line after a class name
    gap: int | None = None
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            if names and skipped is None:
                skipped = number
        elif "{}" in line or "{c}" in line:
            templates.append(line)
        else:
            names.append(line)
            gap = gap if gap is not None else skipped
    if not names and not templates:
        raise ToolError(f"prompt file {src} has no class names or templates; {SHAPES}")
    return PromptFile(src, check_classnames(names, f"prompt file {src}") if names else [],
                      check_templates(templates, f"prompt file {src}") if templates else [], None, gap)


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ToolError(f"prompt file {path} is not UTF-8 text ({exc.reason} at byte {exc.start}); {SHAPES}") from None


def load_prompt_file(path: str | Path) -> PromptFile:
    """Class names, templates and label keys from ``path`` (see the module docstring for the shapes)."""
    src = Path(path)
    if src.is_dir():
        names = src / CLIP_BENCHMARK_CLASSNAMES
        if not names.is_file():
            raise ToolError(f"prompt directory {src} has no {CLIP_BENCHMARK_CLASSNAMES} (a CLIP_benchmark dataset "
                            f"directory holds {CLIP_BENCHMARK_CLASSNAMES} and {CLIP_BENCHMARK_TEMPLATES})")
        found = load_prompt_file(names)
        extra = src / CLIP_BENCHMARK_TEMPLATES
        if extra.is_file() and not found.templates:
            return PromptFile(found.source, found.classnames, load_templates(extra), found.label_keys, found.gap_line)
        return found
    if not src.is_file():
        raise ToolError(f"prompt file {src} does not exist")
    text = _read(src)
    if not text.strip():
        raise ToolError(f"prompt file {src} is empty; {SHAPES}")
    if src.suffix.lower() == ".json" or text.lstrip()[:1] in ("[", "{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            if src.suffix.lower() == ".json":
                raise ToolError(f"prompt file {src} is not valid JSON: {exc}") from None
        else:
            return _from_json(data, str(src))
    return _from_text(text, str(src))


def load_templates(path: str | Path) -> list[str]:
    """Templates from a JSON list or a text file with one template per line (CLIP_benchmark's
    ``zeroshot_classification_templates.txt``; blank lines and ``#`` comments skipped)."""
    src = Path(path)
    if not src.is_file():
        raise ToolError(f"templates file {src} does not exist")
    text = _read(src)
    if src.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ToolError(f"templates file {src} is not valid JSON: {exc}") from None
        if not isinstance(data, list):
            raise ToolError(f"templates file {src}: expected a JSON list of templates, got a JSON "
                            f"{type(data).__name__}")
        return check_templates(data, f"templates file {src}")
    lines = [s.strip() for s in text.splitlines()]
    lines = [s for s in lines if s and not s.startswith("#")]
    if not lines:
        raise ToolError(f"templates file {src} is empty (one template with {{}} or {{c}} per line)")
    return check_templates(lines, f"templates file {src}")


def integer_label(values: Sequence[Any]) -> int | None:
    """The first integer label among ``values`` (JSON integers, not booleans), or None."""
    return next((v for v in values if isinstance(v, int) and not isinstance(v, bool)), None)


def match_labels(values: Sequence[Any], keys: Sequence[str], prompts: PromptFile, where: str) -> Tensor:
    """Class index (into ``prompts.classnames``) of each label value; ``keys`` are the samples' keys (for errors)."""
    names = prompts.classnames
    if not names:
        raise ToolError(f"prompt file {prompts.source} gives templates but no class names")
    by_key = {k: i for i, k in enumerate(prompts.label_keys)} if prompts.label_keys is not None else None
    by_name = {c: i for i, c in enumerate(names)}
    out = []
    for value, key in zip(values, keys, strict=True):
        is_int = isinstance(value, int) and not isinstance(value, bool)
        if not is_int and not isinstance(value, str):
            raise ToolError(f"{where}: label {value!r} of sample {key!r} is a JSON {type(value).__name__}; labels "
                            "are integers (class positions) or strings")
        if by_key is not None:
            index = by_key.get(str(value))
            if index is None:
                shown = ", ".join(repr(k) for k in prompts.label_keys[:10])  # type: ignore[index]
                raise ToolError(f"{where}: label {value!r} of sample {key!r} has no name in {prompts.source} (it "
                                f"names the labels {shown}{', ...' if len(names) > 10 else ''})")
        elif is_int:
            if prompts.gap_line is not None:
                raise ToolError(f"{prompts.source}: line {prompts.gap_line} is blank or a comment between class "
                                "names, so the line numbers that integer labels index are ambiguous; remove it")
            if not 0 <= value < len(names):
                raise ToolError(f"{where}: label {value} of sample {key!r} has no name in {prompts.source}: its "
                                f"{len(names)} class names name the labels 0..{len(names) - 1}")
            index = value
        else:
            index = by_name.get(value)
            if index is None:
                raise ToolError(f"{where}: label {value!r} of sample {key!r} is not among the class names in "
                                f"{prompts.source} (a list names integer labels by position and string labels by "
                                "equal names; map other labels with an object {\"label\": \"name\"})")
        out.append(index)
    return torch.tensor(out, dtype=torch.long)
