"""Zero-shot classification with a text encoder as the classifier (CLIP, Radford et al., 2021).

Each class ``c`` gets the prompt ensemble embedding ``w_c = normalize( mean_t normalize( f(template_t.format(c)) ) )``
with ``f`` the exported text encoder's projected embedding; a query ``x`` (any modality, embedded in the same
space) is assigned ``argmax_c cos(x, w_c)``. Top-k accuracy counts the true class among the ``k`` best cosines;
per-class accuracy and its mean (balanced accuracy) are reported beside it.

Prompts come from `DEFAULT_TEMPLATES` or a prompt file (`tools.evaluation.prompts`: a JSON list of class names
indexed by integer label, a JSON object label -> name, ``{"classnames": ..., "templates": [...]}``, a text file with
one entry per line — CLIP_benchmark's ``classnames.txt`` — or a CLIP_benchmark dataset directory); a template's
``{}`` or ``{c}`` stands for the class name.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmssl.architectures.modalities import get_modality
from mmssl.architectures.modalities.base import DecoderFn
from mmssl.data_pipelines.batch import collate, trim_padding
from mmssl.tools.errors import ToolError
from mmssl.tools.evaluation.prompts import check_classnames, check_templates, load_prompt_file, render

__all__ = ["DEFAULT_TEMPLATES", "Prompts", "check_classnames", "check_templates", "class_embeddings", "encode_texts",
           "label_indices", "load_prompts", "zero_shot_accuracy", "zero_shot_logits", "zero_shot_predict"]

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


def load_prompts(path: str | Path) -> Prompts:
    """Class names and templates from a prompt file (`tools.evaluation.prompts.load_prompt_file`; the label keys of
    an object label -> name are dropped here: `load_prompt_file` keeps them)."""
    found = load_prompt_file(path)
    return Prompts(found.classnames, found.templates or list(DEFAULT_TEMPLATES))


@torch.no_grad()
def encode_texts(encoder: TextEncoder, texts: Sequence[str], batch_size: int = 64) -> Tensor:
    """Projected embeddings ``[N, E]`` of ``texts`` through the encoder's own evaluation preprocessing (the
    tokenizer run on the UTF-8 bytes, exactly as for shard members), batched with `collate`, each batch's padding cut
    to its longest text as the trainer cuts it (`trim_padding`: exact; a 77-token context holding 10-token prompts
    runs 16 positions), without gradients and (for an ``nn.Module``) in eval mode, its previous mode restored
    afterwards."""
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
            [batch] = trim_padding([collate(samples, [encoder.modality])], [encoder.modality])
            if module is not None:  # an encoder on a GPU takes its inputs there
                batch = batch.to(next((p.device for p in module.parameters()), torch.device("cpu")))
            out.append(encoder(batch.inputs[encoder.modality])[1].float().cpu())
    finally:
        if module is not None:
            module.train(was_training)
    return torch.cat(out) if out else torch.empty(0, int(getattr(encoder, "embed_dim", 0)))


def class_embeddings(text_encoder: TextEncoder, classnames: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES,
                     *, batch_size: int = 64, where: str = "templates") -> Tensor:
    """``[C, E]``: ``normalize(mean_t normalize(embed(template_t(c))))`` for every class ``c`` (`render`)."""
    names = check_classnames(classnames, "classnames")
    temps = check_templates(templates, where)
    prompts = [render(t, c) for c in names for t in temps]
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
