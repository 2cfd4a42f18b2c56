"""Zero-shot classification with a text encoder as the classifier (CLIP, Radford et al., 2021).

Each class ``c`` gets the prompt ensemble embedding ``w_c = normalize( mean_t normalize( f(template_t.format(c)) ) )``
with ``f`` the exported text encoder's projected embedding; a query ``x`` (any modality, embedded in the same
space) is assigned ``argmax_c cos(x, w_c)``. Top-k accuracy counts the true class among the ``k`` best cosines;
per-class accuracy and its mean (balanced accuracy) are reported beside it.

Prompts come from `DEFAULT_TEMPLATES` or a file (`load_prompts`): a JSON list of class names, a JSON object
``{"classnames": [...], "templates": [...]}``, or a text file with one entry per line where lines containing
``{}`` are templates and the other lines class names (blank lines and ``#`` comments skipped).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmssl.architectures.modalities import get_modality
from mmssl.architectures.modalities.base import DecoderFn
from mmssl.data_pipelines.batch import collate
from mmssl.tools.errors import ToolError

DEFAULT_TEMPLATES: tuple[str, ...] = (
    "{}",
    "a recording of {}.",
    "a photo of {}.",
    "an example of {}.",
    "this is {}.",
    "the sound of {}.",
)


class Prompts(NamedTuple):
    """Class names and templates read from a prompt file (unpacks as ``classnames, templates``). ``classnames`` is
    empty when the file gives none (the caller then uses the label values); ``templates`` is `DEFAULT_TEMPLATES`
    when the file gives none."""

    classnames: list[str]
    templates: list[str]


class TextEncoder(Protocol):
    """What `encode_texts` needs: an exported `architectures.encoder.Encoder`, or anything shaped like one."""

    modality: str

    def decoder(self) -> DecoderFn: ...

    def __call__(self, x: Any) -> tuple[Tensor, Tensor]: ...


def check_templates(templates: Sequence[str], where: str = "templates") -> list[str]:
    """The templates as a list, or a `ToolError` naming the first that has no ``{}`` or does not format."""
    if isinstance(templates, str) or not templates:
        raise ToolError(f"{where}: expected a non-empty list of templates, got {templates!r}")
    for t in templates:
        if not isinstance(t, str) or "{}" not in t:
            raise ToolError(f"{where}: template {t!r} has no '{{}}' placeholder for the class name")
        try:
            t.format("x")
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


def load_prompts(path: str | Path) -> Prompts:
    """Class names and/or templates from a JSON or text file (see the module docstring)."""
    src = Path(path)
    if not src.is_file():
        raise ToolError(f"prompt file {src} does not exist")
    text = src.read_text(encoding="utf-8")
    if src.suffix.lower() == ".json":
        try:
            data: Any = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ToolError(f"prompt file {src} is not valid JSON: {exc}") from None
        if isinstance(data, list):
            return Prompts(check_classnames(data, str(src)), list(DEFAULT_TEMPLATES))
        if not isinstance(data, dict):
            raise ToolError(f"prompt file {src}: expected a list of class names or an object, got "
                             f"{type(data).__name__}")
        unknown = sorted(set(data) - {"classnames", "templates"})
        if unknown:
            raise ToolError(f"prompt file {src}: unknown keys {unknown} (expected 'classnames' and/or 'templates')")
        if not data:
            raise ToolError(f"prompt file {src} has no class names or templates")
        classnames = check_classnames(data["classnames"], f"{src}: classnames") if "classnames" in data else []
        templates = check_templates(data["templates"], f"{src}: templates") if "templates" in data else []
        return Prompts(classnames, templates or list(DEFAULT_TEMPLATES))
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    if not lines:
        raise ToolError(f"prompt file {src} has no class names or templates")
    classnames = [line for line in lines if "{}" not in line]
    templates = [line for line in lines if "{}" in line]
    return Prompts(check_classnames(classnames, str(src)) if classnames else [],
                   check_templates(templates, str(src)) if templates else list(DEFAULT_TEMPLATES))


@torch.no_grad()
def encode_texts(encoder: TextEncoder, texts: Sequence[str], batch_size: int = 64) -> Tensor:
    """Projected embeddings ``[N, E]`` of ``texts`` through the encoder's own evaluation preprocessing (the
    tokenizer run on the UTF-8 bytes, exactly as for shard members), batched with `collate`, without gradients and
    (for an ``nn.Module``) in eval mode, its previous mode restored afterwards."""
    if batch_size < 1:
        raise ToolError(f"batch_size must be positive, got {batch_size}")
    if "txt" not in get_modality(encoder.modality).extensions:
        raise ToolError(f"{getattr(encoder, 'source', 'the encoder')} is a {encoder.modality!r} encoder; "
                         "text prompts need a text encoder")
    decode = encoder.decoder()
    rng = np.random.default_rng(0)  # evaluation decoders are deterministic; the generator is part of the contract
    module = encoder if isinstance(encoder, nn.Module) else None
    was_training = module is not None and module.training
    if module is not None:
        module.eval()
    try:
        out = []
        for start in range(0, len(texts), batch_size):
            chunk = texts[start : start + batch_size]
            samples = [{"__key__": str(start + i), encoder.modality: decode(t.encode("utf-8"), rng)}
                       for i, t in enumerate(chunk)]
            batch = collate(samples, [encoder.modality])
            out.append(encoder(batch.inputs[encoder.modality])[1].float())
    finally:
        if module is not None:
            module.train(was_training)
    return torch.cat(out) if out else torch.empty(0, int(getattr(encoder, "embed_dim", 0)))


def class_embeddings(text_encoder: TextEncoder, classnames: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES,
                     *, batch_size: int = 64, where: str = "templates") -> Tensor:
    """``[C, E]``: ``normalize(mean_t normalize(embed(template_t.format(c))))`` for every class ``c``."""
    names = check_classnames(classnames, "classnames")
    temps = check_templates(templates, where)
    prompts = [t.format(c) for c in names for t in temps]
    emb = encode_texts(text_encoder, prompts, batch_size).view(len(names), len(temps), -1)
    return F.normalize(F.normalize(emb, dim=-1).mean(1), dim=-1)


def zero_shot_logits(query_embeddings: Tensor, class_embeddings: Tensor) -> Tensor:
    """Cosine similarities ``[N, C]`` between queries and class embeddings."""
    if query_embeddings.shape[-1] != class_embeddings.shape[-1]:
        raise ToolError(f"query embeddings have dimension {query_embeddings.shape[-1]} but class embeddings "
                         f"{class_embeddings.shape[-1]}; were they made by encoders of the same export?")
    return F.normalize(query_embeddings.float(), dim=-1) @ F.normalize(class_embeddings.float(), dim=-1).T


def zero_shot_predict(query_embeddings: Tensor, class_embeddings: Tensor) -> Tensor:
    """The predicted class index ``[N]``: ``argmax_c cos(x, w_c)``."""
    return zero_shot_logits(query_embeddings, class_embeddings).argmax(-1)


def label_indices(labels: Sequence[str] | Tensor, classnames: Sequence[str], where: str = "labels") -> Tensor:
    """Labels as class indices: a tensor of indices is checked, strings are looked up in ``classnames``."""
    if isinstance(labels, Tensor):
        bad = labels[(labels < 0) | (labels >= len(classnames))]
        if bad.numel():
            raise ToolError(f"{where}: class index {int(bad[0])} is outside 0..{len(classnames) - 1}")
        return labels.long()
    index = {c: i for i, c in enumerate(classnames)}
    unknown = sorted({str(v) for v in labels if v not in index})
    if unknown:
        raise ToolError(f"{where}: labels {unknown[:5]} are not among the class names {list(classnames)[:10]}")
    return torch.tensor([index[v] for v in labels], dtype=torch.long)


def zero_shot_accuracy(query_embeddings: Tensor, labels: Sequence[str] | Tensor, classifier: Tensor | TextEncoder,
                       classnames: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES,
                       ks: Sequence[int] = (1, 5)) -> dict[str, Any]:
    """Zero-shot scores of queries with true ``labels`` (class names, or indices into ``classnames``).

    ``classifier`` is either the class embeddings ``[C, E]`` (``templates`` unused) or a text encoder, from which
    they are built with `class_embeddings` (``classnames`` x ``templates``). Returns top-k accuracy (``top1``,
    ``top5``, ... with ``k`` capped at the number of classes), per-class top-1 over the classes that occur in
    ``labels``, their mean (``mean_per_class_top1``, balanced accuracy), ``n``, ``num_classes`` and the
    majority-class rate ``chance_top1``."""
    is_tensor = isinstance(classifier, Tensor)
    weights = classifier if is_tensor else class_embeddings(classifier, classnames, templates)  # type: ignore[arg-type]
    if weights.shape[0] != len(classnames):
        raise ToolError(f"{weights.shape[0]} class embeddings for {len(classnames)} class names")
    y = label_indices(labels, classnames)
    if y.numel() != query_embeddings.shape[0]:
        raise ToolError(f"{query_embeddings.shape[0]} query embeddings but {y.numel()} labels")
    if y.numel() == 0:
        raise ToolError("no query to classify")
    logits = zero_shot_logits(query_embeddings, weights)
    ranked = logits.topk(min(max(ks), len(classnames)), dim=-1).indices
    result: dict[str, Any] = {}
    for k in ks:
        result[f"top{k}"] = float((ranked[:, :k] == y[:, None]).any(1).double().mean())
    correct = (ranked[:, 0] == y).double()
    per_class = {classnames[c]: float(correct[y == c].mean()) for c in y.unique().tolist()}
    result["per_class_top1"] = per_class
    result["mean_per_class_top1"] = sum(per_class.values()) / len(per_class)
    result["n"] = int(y.numel())
    result["num_classes"] = len(classnames)
    result["chance_top1"] = float(torch.bincount(y).max()) / y.numel()
    return result
