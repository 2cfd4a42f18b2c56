"""Zero-shot classification (CLIP): prompt-ensemble class embeddings against a hand loop over a real exported text
encoder, accuracy on constructed embeddings, prompt files and their error messages."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmssl.architectures.encoder import Encoder, save_encoder
from mmssl.architectures.heads import ProjectionHead
from mmssl.architectures.modalities import TextConfig, get_modality
from mmssl.architectures.modalities.base import DecoderFn
from mmssl.data_pipelines.batch import collate
from mmssl.tools.errors import ToolError
from mmssl.tools.evaluation.zero_shot import (
    DEFAULT_TEMPLATES,
    class_embeddings,
    encode_texts,
    load_prompts,
    zero_shot_accuracy,
    zero_shot_predict,
)

CLASSES = ["password", "goodbye", "sales", "support"]


@pytest.fixture(scope="module")
def text_encoder(spm: Path, tmp_path_factory: pytest.TempPathFactory) -> Encoder:
    cfg = TextConfig(tokenizer=str(spm), width=32, depth=1, heads=2, max_len=12, pool="mean")
    torch.manual_seed(0)
    tower = get_modality("text").build_tower(cfg)
    head = ProjectionHead(tower.num_features, 16)
    out = save_encoder(tmp_path_factory.mktemp("export") / "text", "text", cfg, tower, head, 16)
    return Encoder.from_dir(out)


def _one(encoder: Encoder, text: str) -> torch.Tensor:
    """The encoder called on a one-sample collated batch of the decoded text."""
    sample = {"__key__": "0", "text": encoder.decoder()(text.encode("utf-8"), np.random.default_rng(0))}
    with torch.no_grad():
        return encoder(collate([sample], ["text"]).inputs["text"])[1][0]


def test_encode_texts_equals_the_encoder_on_the_collated_decoded_batch(text_encoder: Encoder) -> None:
    texts = ["please enter your password", "thank you for calling", "goodbye", "press one for sales",
             "the number you have dialed is not in service"]
    text_encoder.train()  # encode_texts must evaluate in eval mode and restore the mode afterwards
    got = encode_texts(text_encoder, texts, batch_size=2)
    assert text_encoder.training
    text_encoder.eval()
    decode = text_encoder.decoder()
    batch = collate([{"__key__": str(i), "text": decode(t.encode(), np.random.default_rng(0))}
                     for i, t in enumerate(texts)], ["text"])
    with torch.no_grad():
        expected = text_encoder(batch.inputs["text"])[1]
    assert got.shape == (5, 16) and not got.requires_grad
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert encode_texts(text_encoder, [], batch_size=4).shape == (0, 16)


def test_class_embeddings_follow_the_prompt_ensemble_formula(text_encoder: Encoder) -> None:
    templates = ["{}", "a recording of {}.", "please press {} now"]
    got = class_embeddings(text_encoder, CLASSES, templates, batch_size=5)
    rows = []
    for c in CLASSES:  # hand loop: normalize(mean_t normalize(embed(template_t.format(c))))
        per_template = [_one(text_encoder, t.format(c)) for t in templates]
        mean = sum(v / v.norm() for v in per_template) / len(templates)
        rows.append(mean / mean.norm())
    torch.testing.assert_close(got, torch.stack(rows), rtol=0, atol=1e-5)
    assert torch.allclose(got.norm(dim=-1), torch.ones(len(CLASSES)), atol=1e-6)
    assert class_embeddings(text_encoder, CLASSES).shape == (len(CLASSES), 16)  # DEFAULT_TEMPLATES
    assert all("{}" in t for t in DEFAULT_TEMPLATES)


def test_accuracy_on_constructed_embeddings() -> None:
    gen = torch.Generator().manual_seed(0)
    n_cls, dim = 6, 12
    w = F.normalize(torch.randn(n_cls, dim, generator=gen), dim=-1)
    labels = torch.randint(0, n_cls, (300,), generator=gen)
    queries = 3.0 * w[labels] + torch.randn(300, dim, generator=gen)  # noisy but mostly correct
    names = [f"class{i}" for i in range(n_cls)]
    result = zero_shot_accuracy(queries, [names[i] for i in labels.tolist()], w, names, ks=(1, 5))
    # reference by hand: cosine to every class, sorted
    cos = np.array([[float(q @ c / q.norm()) for c in w] for q in queries])
    order = np.argsort(-cos, axis=1)
    y = labels.numpy()
    top1 = order[:, 0] == y
    assert zero_shot_predict(queries, w).tolist() == order[:, 0].tolist()
    assert 0.5 < result["top1"] < 1.0
    assert result["top1"] == pytest.approx(top1.mean(), abs=1e-12)
    assert result["top5"] == pytest.approx((order[:, :5] == y[:, None]).any(1).mean(), abs=1e-12)
    per_class = {names[c]: top1[y == c].mean() for c in range(n_cls)}
    assert result["per_class_top1"] == pytest.approx(per_class, abs=1e-12)
    assert result["mean_per_class_top1"] == pytest.approx(np.mean(list(per_class.values())), abs=1e-12)
    assert result["chance_top1"] == pytest.approx(np.bincount(y).max() / 300, abs=1e-12)
    assert result["n"] == 300 and result["num_classes"] == n_cls
    # index labels give the same numbers; with fewer classes than k, top-k is everything
    assert zero_shot_accuracy(queries, labels, w, names) == result
    keep = labels < 3
    assert zero_shot_accuracy(queries[keep], labels[keep], w[:3], names[:3], ks=(1, 5))["top5"] == 1.0


class _Wrapped:
    """A text encoder shaped like `Encoder` but not an ``nn.Module`` (e.g. the text side of a whole model)."""

    modality = "text"

    def __init__(self, encoder: Encoder) -> None:
        self.encoder = encoder

    def decoder(self) -> DecoderFn:
        return self.encoder.decoder()

    def __call__(self, x: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encoder(x)


def test_accuracy_from_a_text_encoder_builds_the_class_embeddings(text_encoder: Encoder) -> None:
    templates = ["{}", "a recording of {}."]
    weights = class_embeddings(text_encoder, CLASSES, templates)
    gen = torch.Generator().manual_seed(1)
    labels = torch.randint(0, len(CLASSES), (40,), generator=gen)
    queries = weights[labels] + 0.02 * torch.randn(40, 16, generator=gen)
    names = [CLASSES[i] for i in labels.tolist()]
    expected = zero_shot_accuracy(queries, names, weights, CLASSES)
    assert zero_shot_accuracy(queries, names, text_encoder, CLASSES, templates) == expected
    assert zero_shot_accuracy(queries, names, _Wrapped(text_encoder), CLASSES, templates) == expected
    assert expected["top1"] > 0.5


def test_perfect_embeddings_classify_perfectly() -> None:
    w = torch.eye(4)
    assert zero_shot_accuracy(2 * w, torch.arange(4), w, list("abcd"))["top1"] == 1.0
    assert zero_shot_accuracy(2 * w, torch.tensor([1, 2, 3, 0]), w, list("abcd"))["top1"] == 0.0


def test_prompt_files_json_and_text(tmp_path: Path) -> None:
    js = tmp_path / "p.json"
    js.write_text(json.dumps({"classnames": ["dog", "cat"], "templates": ["a {}.", "{} sound"]}))
    p = load_prompts(js)
    assert p.classnames == ["dog", "cat"] and p.templates == ["a {}.", "{} sound"]
    js.write_text(json.dumps(["dog", "cat", "bird"]))
    classnames, templates = load_prompts(js)  # unpacks; templates default when the file gives none
    assert classnames == ["dog", "cat", "bird"] and templates == list(DEFAULT_TEMPLATES)
    txt = tmp_path / "p.txt"
    txt.write_text("# classes\ndog\n\ncat\na recording of {}.\n")
    p = load_prompts(txt)
    assert p.classnames == ["dog", "cat"] and p.templates == ["a recording of {}."]
    txt.write_text("a {}\nthe {} sound\n")
    assert load_prompts(txt) == ([], ["a {}", "the {} sound"])


def test_error_messages_name_the_bad_value(text_encoder: Encoder, tmp_path: Path) -> None:
    with pytest.raises(ToolError, match=r"template 'a photo of a' has no '\{\}' placeholder"):
        class_embeddings(text_encoder, CLASSES, ["{}", "a photo of a"])
    with pytest.raises(ToolError, match=r"template 'a \{} of \{\}' does not format"):
        class_embeddings(text_encoder, CLASSES, ["a {} of {}"])
    with pytest.raises(ToolError, match="the class list is empty"):
        class_embeddings(text_encoder, [], ["{}"])
    with pytest.raises(ToolError, match="class name 'dog' is listed twice"):
        class_embeddings(text_encoder, ["dog", "cat", "dog"])
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"classnames": ["dog"], "templates": ["{}", "no placeholder"]}))
    with pytest.raises(ToolError, match=r"bad.json: templates: template 'no placeholder' has no"):
        load_prompts(bad)
    bad.write_text(json.dumps({"classes": ["dog"]}))
    with pytest.raises(ToolError, match=r"unknown keys \['classes'\]"):
        load_prompts(bad)
    with pytest.raises(ToolError, match=r"labels \['bird'\] are not among the class names"):
        zero_shot_accuracy(torch.eye(2), ["dog", "bird"], torch.eye(2), ["dog", "cat"])
    with pytest.raises(ToolError, match="query embeddings have dimension 3 but class embeddings 2"):
        zero_shot_predict(torch.ones(1, 3), torch.eye(2))
