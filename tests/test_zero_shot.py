"""Zero-shot classification (CLIP): prompt-ensemble class embeddings against a hand loop over a real exported text
encoder, accuracy on constructed embeddings, prompt files and their error messages; prompt files that name integer
labels (a list, an object label -> name, CLIP_benchmark's classnames.txt + templates) and how labels match them
(tests/test_evaluation_scale.py runs them on a trained model)."""

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
from mmssl.tools.evaluation.prompts import load_prompt_file, load_templates, match_labels, render
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


@pytest.mark.parametrize("arch", ["clip", "bert"])
def test_encode_texts_cuts_padding_and_equals_the_full_length_pass(arch: str, spm: Path, tmp_path: Path) -> None:
    """Prompts run cut to the batch's longest one (`trim_padding`): a 64-token context holding short prompts runs 8
    or 16 positions, and the embeddings equal the full-length pass (causal EOT and bidirectional mean towers)."""
    cfg = TextConfig(arch=arch, tokenizer=str(spm), width=32, depth=2, heads=2, max_len=64,
                     pool="eot" if arch == "clip" else "mean")
    torch.manual_seed(0)
    tower = get_modality("text").build_tower(cfg)
    encoder = Encoder.from_dir(save_encoder(tmp_path / "text", "text", cfg, tower, ProjectionHead(32, 16), 16))
    texts = ["goodbye", "press one for sales", "please enter your password now", "support"]
    seen: list[int] = []
    encoder.tower.register_forward_pre_hook(lambda _, args: seen.append(args[0]["input_ids"].shape[1]))
    got = encode_texts(encoder, texts, batch_size=2)
    decode = encoder.decoder()
    batches = [collate([{"__key__": str(i), "text": decode(t.encode(), np.random.default_rng(0))}
                        for i, t in enumerate(texts[j : j + 2])], ["text"]) for j in (0, 2)]
    longest = [int(b.inputs["text"]["attention_mask"].sum(1).max()) for b in batches]
    assert seen == [8 * -(-n // 8) for n in longest] and max(seen) < 64
    with torch.no_grad():
        full = torch.cat([encoder(b.inputs["text"])[1] for b in batches])
    torch.testing.assert_close(got, full, rtol=0, atol=1e-5)


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


# ---------------------------------------------------------------------------------- prompt files that name labels
NAMES = ["t-shirt/top", "trouser", "pullover"]


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_every_prompt_shape_names_integer_labels_alike(tmp_path: Path) -> None:
    """A list, an object label -> name (in any key order), the structured object, CLIP_benchmark's classnames.txt and
    its dataset directory all map the integer labels 0, 1, 2 to the same names."""
    values, keys = [2, 0, 1, 2], ["a", "b", "c", "d"]
    forms = {
        "list": _write(tmp_path / "list.json", json.dumps(NAMES)),
        "object": _write(tmp_path / "object.json", json.dumps({"2": NAMES[2], "0": NAMES[0], "1": NAMES[1]})),
        "structured": _write(tmp_path / "s.json", json.dumps({"classnames": {str(i): c for i, c in enumerate(NAMES)},
                                                               "templates": ["a photo of a {c}."]})),
        "classnames.txt": _write(tmp_path / "classnames.txt", "\n".join(NAMES) + "\n"),
        "json without suffix": _write(tmp_path / "names", json.dumps(NAMES)),
    }
    cb = tmp_path / "clip_benchmark"
    cb.mkdir()
    _write(cb / "classnames.txt", "\n".join(NAMES) + "\n")
    _write(cb / "zeroshot_classification_templates.txt", "a photo of a {c}.\nitap of a {c}.\n")
    forms["directory"] = cb
    for form, path in forms.items():
        found = load_prompt_file(path)
        got = [found.classnames[i] for i in match_labels(values, keys, found, "--test-shards").tolist()]
        assert got == [NAMES[2], NAMES[0], NAMES[1], NAMES[2]], form
    assert load_prompt_file(cb).templates == ["a photo of a {c}.", "itap of a {c}."]
    assert load_prompt_file(forms["structured"]).templates == ["a photo of a {c}."]
    # the object form keeps its own order, and string labels match its keys exactly
    obj = load_prompt_file(forms["object"])
    assert obj.classnames == [NAMES[2], NAMES[0], NAMES[1]] and obj.label_keys == ["2", "0", "1"]
    assert match_labels(["0", 1], ["a", "b"], obj, "x").tolist() == [1, 2]
    # the 2-tuple API gives the names (never the object's keys) and the default templates
    assert load_prompts(forms["object"]) == ([NAMES[2], NAMES[0], NAMES[1]], list(DEFAULT_TEMPLATES))


def test_clip_benchmark_templates_render_like_brace_templates(text_encoder: Encoder) -> None:
    """``{c}`` (CLIP_benchmark: ``template.format(c=name)``) and ``{}`` give the same class embeddings."""
    braces = class_embeddings(text_encoder, CLASSES, ["a recording of {}.", "{} please"])
    named = class_embeddings(text_encoder, CLASSES, ["a recording of {c}.", "{c} please"])
    torch.testing.assert_close(braces, named, rtol=0, atol=0)
    assert render("itap of a {c}.", "dog") == "itap of a dog." == render("itap of a {}.", "dog")


def test_string_labels_are_names_and_never_positions(tmp_path: Path) -> None:
    listed = load_prompt_file(_write(tmp_path / "list.json", json.dumps(NAMES)))
    assert match_labels(["trouser", 0], ["a", "b"], listed, "x").tolist() == [1, 0]
    with pytest.raises(ToolError, match=r"--test-shards: label '1' of sample 'k7' is not among the class names in "
                                        r".*list.json \(a list names integer labels by position"):
        match_labels(["1"], ["k7"], listed, "--test-shards")  # the string '1' is not the integer 1


@pytest.mark.parametrize(("content", "message"), [
    ("", r"prompt file .*p.json is empty; accepted: a JSON list of class names"),
    ("3", r"prompt file .*p.json: a JSON int is not a prompt file; accepted: a JSON list"),
    ('"t-shirt"', r"prompt file .*p.json: a JSON str is not a prompt file; accepted:"),
    ("[]", r"prompt file .*p.json: no class names \(an empty JSON list\); accepted:"),
    ('[["t-shirt"], "trouser"]', r"prompt file .*p.json: class names must be non-empty strings, got \['t-shirt'\]"),
    ('{"0": "t-shirt", "1": ["trouser"]}', r"prompt file .*p.json: unknown keys \['0', '1'\] \(expected 'classnames'"),
    ('{"classnames": 3}', r"p.json: classnames: expected a list of class names or an object label -> name, got a "
                          r"JSON int; accepted:"),
    ('{"0": "dress", "1": "dress"}', r"prompt file .*p.json: class name 'dress' is listed twice"),
    ("[1, 2", r"prompt file .*p.json is not valid JSON"),
])
def test_malformed_prompt_files_fail_in_one_line_naming_the_file(tmp_path: Path, content: str, message: str) -> None:
    path = _write(tmp_path / "p.json", content)
    with pytest.raises(ToolError, match=message) as info:
        load_prompt_file(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_a_label_without_a_name_is_an_error_naming_it(tmp_path: Path) -> None:
    listed = load_prompt_file(_write(tmp_path / "list.json", json.dumps(NAMES)))
    with pytest.raises(ToolError, match=r"--test-shards: label 3 of sample 'k2' has no name in .*list.json: its 3 "
                                        r"class names name the labels 0..2"):
        match_labels([0, 1, 3], ["k0", "k1", "k2"], listed, "--test-shards")
    obj = load_prompt_file(_write(tmp_path / "obj.json", json.dumps({"0": "a", "2": "c"})))
    with pytest.raises(ToolError, match=r"label 1 of sample 'k1' has no name in .*obj.json \(it names the labels "
                                        r"'0', '2'\)"):
        match_labels([0, 1], ["k0", "k1"], obj, "--test-shards")
    with pytest.raises(ToolError, match=r"label 1.5 of sample 'k0' is a JSON float"):
        match_labels([1.5], ["k0"], listed, "--test-shards")
    gap = load_prompt_file(_write(tmp_path / "classnames.txt", "a\n\nb\nc\n"))
    assert gap.classnames == ["a", "b", "c"]
    assert match_labels(["b"], ["k"], gap, "x").tolist() == [1]  # names still match by name
    with pytest.raises(ToolError, match=r"classnames.txt: line 2 is blank or a comment between class names"):
        match_labels([1], ["k"], gap, "x")  # but a position would be ambiguous
    with pytest.raises(ToolError, match=r"templates file .*t.txt: template 'a photo' has no '\{\}' placeholder"):
        load_templates(_write(tmp_path / "t.txt", "a {c}\na photo\n"))
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(ToolError, match=r"prompt directory .*empty_dir has no classnames.txt"):
        load_prompt_file(empty)


def test_integer_labels_without_names_skip_zero_shot_and_templates_come_once(tmp_path: Path) -> None:
    from mmssl.tools.evaluation.evaluate import read_prompts, zero_shot_labels

    reason = zero_shot_labels([3, 1], ["a", "b"], None, "label")
    assert isinstance(reason, str) and "labels of 'label' are integers (e.g. 3)" in reason and "--prompts" in reason
    names, y = zero_shot_labels(["dog", "cat", "dog"], ["a", "b", "c"], None, "label")  # string labels: themselves
    assert names == ["cat", "dog"] and y.tolist() == [1, 0, 1]
    both = _write(tmp_path / "p.json", json.dumps({"classnames": NAMES, "templates": ["a {}"]}))
    extra = _write(tmp_path / "t.txt", "itap of a {c}.\n")
    with pytest.raises(ToolError, match=r"--templates .*t.txt and the templates in --prompts .*p.json are both given"):
        read_prompts(str(both), str(extra))
    names_only = _write(tmp_path / "n.json", json.dumps(NAMES))
    assert read_prompts(str(names_only), str(extra))[1] == ["itap of a {c}."]
    assert read_prompts(str(names_only), None)[1] == list(DEFAULT_TEMPLATES)
    assert read_prompts(None, None) == (None, list(DEFAULT_TEMPLATES))
