"""Evaluation as users have it: img2dataset-style Fashion-MNIST shards (the label an integer in the ``json``
member), a short clip-tiny run (40 steps, 2 ranks, clip-tiny as shipped), and ``mmssl evaluate`` with the class
names in a prompt file; decoding in worker processes against one process; the probe's mini-batch solver against
scikit-learn; the runtime options' errors. Zero-shot top-1 seen here: 51.7 % after 40 steps (300 test images,
majority class 12 %; the random-init floor 3.7 %)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from mmssl.data_pipelines.shard_plan import write_shards
from mmssl.data_pipelines.shards import resolve_shards
from mmssl.data_pipelines.stream import read_once
from mmssl.tools.evaluation.evaluate import resolve_model_dir, run_zero_shot
from mmssl.tools.evaluation.features import extract_model_features
from mmssl.tools.evaluation.parallel import OrderedBatches
from mmssl.tools.evaluation.probe import FULL_BATCH_LIMIT, choose_solver, linear_probe
from mmssl.tools.evaluation.probe_minibatch import MinibatchOptions, column_stats, fit_minibatch, probabilities
from mmssl.tools.evaluation.prompts import load_prompt_file
from mmssl.tools.evaluation.runtime import Runtime
from mmssl.tools.evaluation.zero_shot import DEFAULT_TEMPLATES, encode_texts
from mmssl.tools.export.model import load_model
from tests.conftest import mmssl_in_process

CPU = torch.device("cpu")


def _img2dataset_samples(split: str, count: int, offset: int = 0) -> list[dict]:
    """Fashion-MNIST images as img2dataset writes samples: ``jpg``, ``txt`` (the caption) and ``json`` (url, key,
    status, caption, sizes, plus the integer ``label``)."""
    from PIL import Image

    from mmssl.data_pipelines.sources import fashion_mnist as fm

    images, labels = fm.load_split(split)
    out = []
    for i in range(offset, len(labels), len(labels) // count)[:count]:
        buf = io.BytesIO()
        Image.fromarray(images[i]).convert("RGB").save(buf, format="JPEG", quality=95)
        label, key = int(labels[i]), f"{i:09d}"
        caption = fm.TEMPLATES[i % len(fm.TEMPLATES)].format(fm.CLASSES[label])
        out.append({"__key__": key, "jpg": buf.getvalue(), "txt": caption,
                    "json": {"url": f"https://example.invalid/{key}.jpg", "key": key, "status": "success",
                             "caption": caption, "width": 28, "height": 28, "label": label}})
    return out


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``train`` (600, pretraining), ``probe`` (200 other training images), ``test`` (300), ``spm.model``, and the
    prompt files naming the 10 classes."""
    from mmssl.data_pipelines.shards import DataError
    from mmssl.data_pipelines.sources import fashion_mnist as fm
    from mmssl.data_pipelines.tokenizer_training import train_sentencepiece

    try:
        fm.load_split("test")
    except DataError as exc:
        pytest.skip(str(exc))
    out = tmp_path_factory.mktemp("img2dataset")
    for split, source, count, offset, size in (("train", "train", 600, 0, 25), ("probe", "train", 200, 7, 25),
                                               ("test", "test", 300, 0, 50)):
        write_shards(_img2dataset_samples(source, count, offset), out / split, name=split, max_count=size)
    train_sentencepiece([t.format(c) for c in fm.CLASSES for t in fm.TEMPLATES], out / "spm.model", vocab_size=64)
    (out / "names.json").write_text(json.dumps(list(fm.CLASSES)))
    (out / "object.json").write_text(json.dumps({str(i): c for i, c in reversed(list(enumerate(fm.CLASSES)))}))
    cb = out / "clip_benchmark"
    cb.mkdir()
    (cb / "classnames.txt").write_text("\n".join(fm.CLASSES) + "\n")
    (cb / "zeroshot_classification_templates.txt").write_text(
        "\n".join(t.replace("{}", "{c}") for t in DEFAULT_TEMPLATES) + "\n")
    return out


@pytest.fixture(scope="module")
def run(shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """clip-tiny as shipped, 40 steps on 2 ranks over the img2dataset-style shards."""
    from tests.helpers.train_many import Job, run_jobs

    run_dir = tmp_path_factory.mktemp("runs") / "clip-tiny"
    job = Job("clip-tiny", [f"data.train={shards / 'train'}", f"model.text.tokenizer={shards / 'spm.model'}",
                            "train.steps=40", "train.warmup_steps=5", "train.log_every=10", "train.ckpt_every=0",
                            "train.tensorboard=false"], str(run_dir))
    failed = run_jobs([job])[str(run_dir)]
    assert failed is None, failed
    return run_dir


def _evaluate(run: Path, shards: Path, out: Path, *extra: str) -> dict:
    proc = mmssl_in_process("evaluate", str(run), "--shards", str(shards / "probe"), "--test-shards",
                            str(shards / "test"), "--label", "label", "--no-robustness", "--device", "cpu",
                            "--out", str(out), *extra)
    assert proc.returncode == 0, proc.stderr
    return json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def evaluated(run: Path, shards: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    return _evaluate(run, shards, tmp_path_factory.mktemp("eval"), "--prompts", str(shards / "names.json"))


@pytest.mark.distributed
def test_zero_shot_names_integer_labels_from_a_list(evaluated: dict, run: Path, shards: Path) -> None:
    """The list's entry i names label i: zero-shot top-1 well above chance (51.7 % seen, 10 classes, majority 12 %),
    equal to a hand computation over the same features with the names looked up by index."""
    from mmssl.data_pipelines.sources.fashion_mnist import CLASSES

    z = evaluated["pretrained"]["zero_shot"]["image"]
    assert z["num_classes"] == 10 and z["n"] == 300
    assert z["top1"] > max(0.10, z["chance_top1"]) + 0.10, z
    assert z["top1"] > evaluated["random_init"]["zero_shot"]["image"]["top1"] + 0.10
    loaded = load_model(resolve_model_dir(run)[0])
    test = extract_model_features(loaded, str(shards / "test"), runtime=Runtime(CPU))  # the evaluation's cache
    from mmssl.tools.evaluation.evaluate import _TextEncoder

    encoder = _TextEncoder(loaded)
    per_class = []
    for name in CLASSES:  # hand loop: normalize(mean_t normalize(embed(template_t.format(name))))
        e = torch.nn.functional.normalize(encode_texts(encoder, [t.format(name) for t in DEFAULT_TEMPLATES]), dim=-1)
        per_class.append(torch.nn.functional.normalize(e.mean(0), dim=0))
    img = torch.nn.functional.normalize(test.embeddings["image"], dim=-1)
    pred = (img @ torch.stack(per_class).T).argmax(-1)
    truth = torch.tensor(test.meta["label"])
    assert z["top1"] == pytest.approx(float((pred == truth).double().mean()), abs=1e-9)


@pytest.mark.distributed
def test_object_and_clip_benchmark_forms_predict_the_same(evaluated: dict, run: Path, shards: Path) -> None:
    """The object label -> name (keys in reverse order), CLIP_benchmark's classnames.txt alone and its directory
    with ``{c}`` templates give the list's predictions sample for sample."""
    loaded = load_model(resolve_model_dir(run)[0])
    test = extract_model_features(loaded, str(shards / "test"), runtime=Runtime(CPU))
    preds = {}
    for form, path in (("list", shards / "names.json"), ("object", shards / "object.json"),
                       ("classnames.txt", shards / "clip_benchmark" / "classnames.txt"),
                       ("directory", shards / "clip_benchmark")):
        prompts = load_prompt_file(path)
        preds[form] = run_zero_shot(loaded, test, "label", prompts=prompts,
                                    templates=prompts.templates or list(DEFAULT_TEMPLATES), predictions=True)["image"]
    for form, z in preds.items():
        assert z["predicted"] == preds["list"]["predicted"] and z["keys"] == preds["list"]["keys"], form
        assert z["top1"] == pytest.approx(evaluated["pretrained"]["zero_shot"]["image"]["top1"], abs=1e-12)


@pytest.mark.distributed
def test_malformed_prompt_files_and_unnamed_labels_fail_in_one_line(run: Path, shards: Path, tmp_path: Path) -> None:
    from mmssl.data_pipelines.sources.fashion_mnist import CLASSES

    cases = {
        "shape.json": ('{"names": [1, 2]}', "unknown keys ['names']"),
        "empty.txt": ("", "is empty; accepted: a JSON list of class names"),
        "nine.json": (json.dumps(list(CLASSES[:9])), "its 9 class names name the labels 0..8"),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / name
        path.write_text(content)
        proc = mmssl_in_process("evaluate", str(run), "--shards", str(shards / "probe"), "--test-shards",
                                str(shards / "test"), "--label", "label", "--no-robustness", "--no-floor",
                                "--device", "cpu", "--prompts", str(path), "--out", str(tmp_path / "eval"))
        assert proc.returncode == 2, (name, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("mmssl: error:") and str(path) in lines[0], (name, lines)
        assert message in lines[0], (name, lines[0])
    assert "--test-shards: label 9 of sample '" in lines[0]  # the last case: the label and the sample named


@pytest.mark.distributed
def test_two_decoding_workers_equal_one_process(run: Path, shards: Path, tmp_path: Path) -> None:
    """``mmssl evaluate --device cpu --workers 2`` writes the single-process results (features recomputed, not
    cached); the feature extractor's outputs are equal tensor for tensor, in the same sample order."""
    one = _evaluate(run, shards, tmp_path / "one", "--prompts", str(shards / "names.json"), "--no-floor",
                    "--no-cache", "--workers", "0", "--batch-size", "32")
    two = _evaluate(run, shards, tmp_path / "two", "--prompts", str(shards / "names.json"), "--no-floor",
                    "--no-cache", "--workers", "2", "--batch-size", "32")
    for r in (one, two):
        r.pop("plots")
    assert one == two
    loaded = load_model(resolve_model_dir(run)[0])
    a = extract_model_features(loaded, str(shards / "test"), cache=False, runtime=Runtime(CPU, batch_size=32))
    b = extract_model_features(loaded, str(shards / "test"), cache=False,
                               runtime=Runtime(CPU, batch_size=32, workers=2))
    assert a.keys == b.keys and a.meta == b.meta and len(a.keys) == 300
    for m in a.embeddings:
        assert torch.equal(a.embeddings[m], b.embeddings[m]) and torch.equal(a.pooled[m], b.pooled[m])


@pytest.mark.distributed
def test_worker_batches_equal_read_once_with_faults(run: Path, shards: Path, tmp_path: Path) -> None:
    """On shards with an undecodable image and a truncated tar, the workers' batches are ``read_once``'s: the same
    keys, boundaries, tensors and fault counts."""
    data = tmp_path / "faulty"
    samples = _img2dataset_samples("test", 60)
    samples[13]["jpg"] = b"not a jpeg"
    write_shards(samples, data, name="faulty", max_count=16)
    tar = sorted(data.glob("*.tar"))[1]
    with tarfile.open(tar) as tf:  # cut inside the 7th sample's image (a cut inside a header ends a tar quietly)
        cut = next(m for m in tf.getmembers() if m.name.endswith(".jpg") and m.name.startswith(samples[22]["__key__"]))
    tar.write_bytes(tar.read_bytes()[: cut.offset_data + cut.size // 2])
    loaded = load_model(resolve_model_dir(run)[0])
    urls = resolve_shards(str(data))
    kwargs = {"fields": loaded.fields(), "decoders": loaded.decoders(), "batch_size": 7, "where": "test"}
    ref = list(read_once(urls, **kwargs))
    with OrderedBatches(urls, workers=2, **kwargs) as batches:
        got = list(batches)
    assert sum(b.stats.get("decode_errors", 0) for b in ref) == 1
    assert sum(b.stats.get("tar_errors", 0) + b.stats.get("unreadable_shards", 0) for b in ref) == 1
    assert len(got) == len(ref) > 5
    for x, y in zip(ref, got, strict=True):
        assert (x.index, x.keys, x.stats, x.meta) == (y.index, y.keys, y.stats, y.meta)
        where = [sorted((f["kind"], f["shard"], f["key"], f["member"]) for f in b.faults) for b in (x, y)]
        assert where[0] == where[1]  # (the messages differ only by object addresses)
        for m in x.inputs:
            assert torch.equal(x.present[m], y.present[m])
            xi, yi = x.inputs[m], y.inputs[m]
            assert all(torch.equal(xi[k], yi[k]) for k in xi) if isinstance(xi, dict) else torch.equal(xi, yi)


@pytest.mark.distributed
def test_bf16_features_are_close_and_cached_apart(run: Path, shards: Path) -> None:
    """``--precision bf16`` (accepted on a CPU, see tools.evaluation.runtime): features within bf16 rounding of
    fp32 (cosine > 0.999), never served from the fp32 cache."""
    loaded = load_model(resolve_model_dir(run)[0])
    fp32 = extract_model_features(loaded, str(shards / "test"), runtime=Runtime(CPU))
    bf16 = extract_model_features(loaded, str(shards / "test"), runtime=Runtime(CPU, precision="bf16"))
    for m in fp32.embeddings:
        assert not torch.equal(fp32.embeddings[m], bf16.embeddings[m])
        cos = torch.nn.functional.cosine_similarity(fp32.embeddings[m], bf16.embeddings[m])
        assert float(cos.min()) > 0.999, m


# ---------------------------------------------------------------------------------- the mini-batch probe solver
@pytest.fixture
def one_thread() -> object:
    """Tiny matmuls on a busy 2-core machine: intra-op threads only spin (the solver's numbers do not change)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _blobs(n: int, d: int, classes: int, seed: int, spread: float = 0.6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, d, generator=g) * spread
    y = torch.randint(0, classes, (n,), generator=g)
    return (centers[y] + torch.randn(n, d, generator=g)).float(), y


@pytest.mark.parametrize("l2", [1e-3, 1e-2, 1e-1])
@pytest.mark.usefixtures("one_thread")
def test_minibatch_solver_agrees_with_sklearn(l2: float) -> None:
    """Same objective as LogisticRegression(C = 1/(λ·n)) on standardised features: probabilities within 1e-3,
    centred weights within 1e-2 relative, accuracy within 1 point (the stated tolerance)."""
    x, y = _blobs(1500, 24, 5, seed=0)
    rows = torch.arange(len(y))
    mean, std = column_stats(x, rows)
    w, b = fit_minibatch(x, y, rows, 5, l2, mean=mean, std=std, options=MinibatchOptions(batch_size=256, epochs=5))
    xs = ((x.double() - mean) / std).numpy()
    ref = LogisticRegression(C=1.0 / (l2 * len(y)), max_iter=10000, tol=1e-10).fit(xs, y.numpy())
    p, p_ref = probabilities(x, mean, std, w, b).numpy(), ref.predict_proba(xs)
    assert np.abs(p - p_ref).max() < 1e-3
    w_ref = torch.from_numpy(ref.coef_)
    w_c, w_ref_c = w - w.mean(0), w_ref - w_ref.mean(0)
    assert float((w_c - w_ref_c).norm() / w_ref_c.norm()) < 1e-2
    assert abs(float((p.argmax(1) == y.numpy()).mean()) - ref.score(xs, y.numpy())) <= 0.01
    assert torch.allclose(mean, x.double().mean(0)) and torch.allclose(std, x.double().std(0))


@pytest.mark.usefixtures("one_thread")
def test_minibatch_probe_protocol_matches_the_full_batch_one() -> None:
    """`linear_probe` with either solver: the same λ sweep (validation accuracies within a sample) and test top-1
    within 1 point; `auto` switches to mini-batches above N·D = 2^26."""
    x, y = _blobs(1200, 16, 4, seed=3, spread=0.5)
    labels = [f"c{i}" for i in y.tolist()]
    full = linear_probe(x[:900], labels[:900], x[900:], labels[900:], solver="lbfgs", l2_grid=(1e-3, 1e-2, 1e-1))
    mini = linear_probe(x[:900], labels[:900], x[900:], labels[900:], solver="minibatch", l2_grid=(1e-3, 1e-2, 1e-1),
                        runtime=Runtime(CPU), minibatch=MinibatchOptions(batch_size=300, epochs=2))
    assert (full.solver, mini.solver) == ("lbfgs", "minibatch")
    assert abs(full.top1 - mini.top1) <= 0.01 and full.top1 > 0.5
    for k, v in full.val_top1.items():
        assert abs(v - mini.val_top1[k]) <= 1.5 / full.n_val
    assert (full.n_train, full.n_val) == (mini.n_train, mini.n_val)
    assert mini.probe is not None and mini.probe.predict_index(x[900:]).tolist() == [
        mini.classes.index(c) for c in mini.test_predictions]
    assert choose_solver("auto", 1_281_167, 768) == "minibatch" and choose_solver("auto", 10_000, 768) == "lbfgs"
    assert 10_000 * 768 <= FULL_BATCH_LIMIT < 1_281_167 * 768


@pytest.mark.parametrize(("args", "message"), [
    (["--device", "tpu"], "--device 'tpu'"),
    (["--workers", "-1"], "--workers must be >= 0, got -1"),
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    *([(["--device", "cuda"], "--device 'cuda': no CUDA device is available here")]
      if not torch.cuda.is_available() else []),
])
def test_runtime_options_fail_in_one_line(args: list[str], message: str, tmp_path: Path) -> None:
    proc = mmssl_in_process("evaluate", str(tmp_path), "--shards", "x", "--test-shards", "y", *args)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_minibatch_solver_on_the_gpu_equals_the_cpu() -> None:
    x, y = _blobs(4000, 32, 6, seed=5)
    rows = torch.arange(len(y))
    mean, std = column_stats(x, rows)
    opts = MinibatchOptions(batch_size=512, epochs=3)
    cpu = fit_minibatch(x, y, rows, 6, 1e-2, mean=mean, std=std, options=opts)
    gpu = fit_minibatch(x, y, rows, 6, 1e-2, mean=mean, std=std, options=opts, device="cuda")
    p_cpu, p_gpu = probabilities(x, mean, std, *cpu), probabilities(x, mean, std, *gpu)
    assert float((p_cpu - p_gpu).abs().max()) < 1e-4
