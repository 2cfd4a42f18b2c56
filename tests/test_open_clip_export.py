"""``mmssl export RUN --format open_clip``: a short real ``clip-tiny`` run (the recipe as shipped: timm ViT with
CLIP's initialisation + CLIP's text tower) exported, loaded by open_clip with ``local-dir:`` offline, and evaluated
by CLIP_benchmark on Fashion-MNIST in CLIP_benchmark's own webdataset layout (``mmssl make-shards fashion-mnist
--layout clip-benchmark``).

* open_clip's embeddings of real test images (through open_clip's own preprocessing of the PNG bytes) and of real
  captions (through open_clip's tokenizer) equal mmssl's within `EMBEDDING_RTOL` (``max |Δ| <= 1e-4 · max |e|``;
  measured about 5e-7: the same fp32 operations in another order), and the tokenizer gives mmssl's ids, padding and
  context length included;
* a run with a BERT text tower, and a ResNet image tower, are refused with one ``mmssl: error:`` line naming why;
* CLIP_benchmark's zero-shot classification of the test split (its dataset builder, classifier and classification
  loop; top-1 from its logits, see `_clip_benchmark_zero_shot`) agrees with ``mmssl evaluate``'s zero-shot top-1 on
  the same images within one image (`TOP1_TOLERANCE`; the predictions are expected identical: the same pixels, ids
  and templates, embeddings within 1e-6), and its retrieval runs on the retrieval set.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from mmssl.architectures.modalities import get_modality
from mmssl.data_pipelines.reader import ShardReader
from mmssl.data_pipelines.shards import resolve_shards
from mmssl.data_pipelines.sources import fashion_mnist
from mmssl.tools.export.run import TrainedRun, load_trained
from tests.conftest import mmssl_in_process
from tests.helpers.tiny_recipes import tiny_overrides
from tests.helpers.train_many import Job, run_jobs

pytestmark = pytest.mark.distributed

STEPS = 30
EMBEDDING_RTOL = 1e-4  # max |open_clip - mmssl| / max |mmssl| over a batch (fp32)
TEST_IMAGES = 200


@pytest.fixture(scope="module")
def runs(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``clip``: clip-tiny as shipped, ``STEPS`` steps on the ``fashion`` images; ``bert``: the same with a BERT
    text tower (1 step); ``resnet``: with a ResNet image tower (1 step). One set of 2 ranks."""
    root = tmp_path_factory.mktemp("open_clip_runs")
    base = tiny_overrides("clip", request, steps=STEPS)
    jobs = {"clip": base,
            "bert": [*tiny_overrides("clip", request, steps=1), "model.text.arch=bert", "model.text.pool=cls"],
            "resnet": [*tiny_overrides("clip", request, steps=1), "model.image.arch=resnet18", "model.image.init=timm"]}
    results = run_jobs([Job("clip-tiny", overrides, str(root / name)) for name, overrides in jobs.items()])
    failed = {k: v for k, v in results.items() if v}
    assert not failed, failed
    return {name: root / name for name in jobs}


@pytest.fixture(scope="module")
def export(runs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("open_clip") / "export"
    done = mmssl_in_process("export", str(runs["clip"]), "--format", "open_clip", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert "local-dir:" in done.stdout
    return out


@pytest.fixture(scope="module")
def benchmark_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("clip_benchmark")
    done = mmssl_in_process("make-shards", "fashion-mnist", "--layout", "clip-benchmark", "--out", str(out),
                            "--limit", str(TEST_IMAGES), "--shard-size", "64")
    assert done.returncode == 0, done.stderr
    return out


@pytest.fixture(scope="module")
def trained(runs: dict[str, Path]) -> TrainedRun:
    """The clip run's last checkpoint, loaded in mmssl."""
    return load_trained(runs["clip"])


@torch.no_grad()
def _mmssl_embeddings(trained: TrainedRun, images: list[bytes], captions: list[str]) -> tuple[Tensor, Tensor]:
    """mmssl's image and text embeddings through its own evaluation decoders (the shard path)."""
    towers, model = trained.recipe.model.towers, trained.model.eval()
    decode_image = get_modality("image").decoder(towers["image"], train=False)
    decode_text = get_modality("text").decoder(towers["text"], train=False)
    encoded = [decode_text(c.encode(), None) for c in captions]
    text = {k: torch.stack([e[k] for e in encoded]) for k in ("input_ids", "attention_mask")}
    return (model({"image": torch.stack([decode_image(b, None) for b in images])}).embeddings["image"],
            model({"text": text}).embeddings["text"])


def _samples(shards: Path) -> list[dict[str, Any]]:
    reader = ShardReader(where="test")
    return [s for url in resolve_shards(str(shards)) for _, s in reader.samples(url)]


def test_layout_is_clip_benchmarks(benchmark_data: Path) -> None:
    """CLIP_benchmark's ``build_wds_dataset`` layout, read back by CLIP_benchmark itself; mmssl reads the same tars
    through their ``index.json``."""
    from clip_benchmark.datasets.builder import build_dataset

    classification = benchmark_data / "fashion_mnist"
    assert (classification / "classnames.txt").read_text().splitlines() == list(fashion_mnist.CLASSES)
    for split in ("train", "test"):
        shards = sorted(p.name for p in (classification / split).glob("*.tar"))
        assert shards == [f"{i}.tar" for i in range(len(shards))]
        assert int((classification / split / "nshards.txt").read_text()) == len(shards)
    ds = build_dataset("wds/fashion_mnist", root=str(classification), split="test", transform=None,
                       task="zeroshot_classification")
    assert ds.classes == list(fashion_mnist.CLASSES)
    assert ds.templates == [t.replace("{}", "{c}") for t in fashion_mnist.TEMPLATES]
    theirs = [(image.tobytes(), label) for image, label in ds]
    ours = _samples(classification / "test")
    from PIL import Image

    pixels = [Image.open(io.BytesIO(s["png"])).convert("RGB").tobytes() for s in ours]  # webdataset's PIL is RGB
    assert [(p, json.loads(s["json"])["label_id"]) for p, s in zip(pixels, ours, strict=True)] == theirs
    assert len(theirs) == TEST_IMAGES and len({label for _, label in theirs}) == 10
    retrieval = build_dataset("wds/fashion_mnist_retrieval", root=str(benchmark_data / "fashion_mnist_retrieval"),
                              split="test", transform=None, task="zeroshot_retrieval")
    assert [captions for _, captions in retrieval] == [[s["txt"].decode()] for s in ours]


def test_open_clip_reproduces_mmssl(export: Path, trained: TrainedRun, benchmark_data: Path,
                                    fashion: tuple[Path, Path]) -> None:
    """Real test images through open_clip's own preprocessing and real captions through its tokenizer give mmssl's
    ids and embeddings."""
    import open_clip
    from PIL import Image

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{export}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{export}")
    model.eval()
    text_cfg = trained.recipe.model.towers["text"]
    samples = _samples(benchmark_data / "fashion_mnist" / "test")[:64]
    train_captions = sorted({s["txt"].decode() for s in _samples(fashion[0])})
    captions = [*train_captions, *(s["txt"].decode() for s in samples), "  a   Grey picture of a sandal  ", ""]
    decode_text = get_modality("text").decoder(text_cfg, train=False)
    ids = torch.stack([decode_text(c.encode(), None)["input_ids"] for c in captions])
    assert torch.equal(tokenizer(captions), ids)  # padding with pad_id to max_len included
    assert ids.shape[1] == text_cfg.max_len and tokenizer.context_length == text_cfg.max_len
    ours_image, ours_text = _mmssl_embeddings(trained, [s["png"] for s in samples], captions)
    with torch.no_grad():
        theirs_image = model.encode_image(torch.stack([preprocess(Image.open(io.BytesIO(s["png"])))
                                                       for s in samples]))
        theirs_text = model.encode_text(tokenizer(captions))
    for ours, theirs in ((ours_image, theirs_image), (ours_text, theirs_text)):
        assert ours.shape == theirs.shape
        assert float((ours - theirs).abs().max()) <= EMBEDDING_RTOL * float(ours.abs().max())
    scale = trained.state["objectives.contrastive.log_logit_scale"].detach()
    assert float(model.logit_scale.detach()) == pytest.approx(float(scale.clamp(0, torch.log(torch.tensor(100.0)))))
    config = json.loads((export / "open_clip_config.json").read_text())
    assert max(config["mmssl"]["check"].values()) <= EMBEDDING_RTOL


def test_towers_open_clip_cannot_express_are_refused(runs: dict[str, Path], tmp_path: Path) -> None:
    bert = mmssl_in_process("export", str(runs["bert"]), "--format", "open_clip", "--out", str(tmp_path / "b"))
    resnet = mmssl_in_process("export", str(runs["resnet"]), "--format", "open_clip", "--out", str(tmp_path / "r"))
    for done, why in ((bert, "model.text.arch='bert' is not CLIP's causal text transformer"),
                      (resnet, "the image tower is a timm ResNet; open_clip's image tower expresses plain timm ViTs")):
        errors = [line for line in done.stderr.splitlines() if line.startswith("mmssl: error: ")]
        assert done.returncode == 2 and len(errors) == 1 and why in errors[0], done.stderr
    assert not (tmp_path / "b").exists() and not (tmp_path / "r").exists()


def _clip_benchmark_zero_shot(export: Path, dataset_root: Path) -> tuple[Tensor, Tensor]:
    """CLIP_benchmark's zero-shot classification through its Python API, in fp32 (``amp=False``): its model loader,
    dataset builder, classifier and classification loop; returns its ``(predicted, true)`` class indices. Top-1
    is read off its logits here: its own ``accuracy()`` calls ``float()`` on a 1-element array, an error from NumPy
    2.4 on (its ``eval`` CLI stops there too; CLIP_benchmark 1.6.2)."""
    from clip_benchmark.datasets.builder import build_dataset
    from clip_benchmark.metrics import zeroshot_classification
    from clip_benchmark.models import load_clip

    model, transform, tokenizer = load_clip("open_clip", f"local-dir:{export}", "", None, device="cpu")
    model.eval()
    ds = build_dataset("wds/fashion_mnist", root=str(dataset_root), transform=transform, split="test",
                       task="zeroshot_classification")
    loader = torch.utils.data.DataLoader(ds.batched(64), batch_size=None, num_workers=0)
    classifier = zeroshot_classification.zero_shot_classifier(model, tokenizer, ds.classes, ds.templates, "cpu",
                                                              amp=False)
    logits, target = zeroshot_classification.run_classification(model, classifier, loader, "cpu", amp=False)
    return logits.argmax(1), target


TOP1_TOLERANCE = 1  # images in TEST_IMAGES on which the two may disagree (a near-tie); measured: none


def test_clip_benchmark_zero_shot_agrees_with_mmssl_evaluate(export: Path, runs: dict[str, Path],
                                                             benchmark_data: Path, tmp_path: Path) -> None:
    """Image by image: CLIP_benchmark's zero-shot prediction on the export equals ``mmssl evaluate``'s on the run
    (its zero-shot path: the run exported in mmssl's format, `extract_model_features`, `run_zero_shot`; the whole
    ``evaluate`` also fits linear probes, a minute on 2 busy cores), with the dataset's class names and templates."""
    from mmssl.tools.evaluation.evaluate import read_prompts, resolve_model_dir, run_zero_shot
    from mmssl.tools.evaluation.features import extract_model_features
    from mmssl.tools.export.model import load_model

    dataset = benchmark_data / "fashion_mnist"
    predicted, true = _clip_benchmark_zero_shot(export, dataset)
    prompts = tmp_path / "prompts.json"  # the dataset's own class names and templates, in mmssl's JSON form
    prompts.write_text(json.dumps({"classnames": list(fashion_mnist.CLASSES),
                                   "templates": list(fashion_mnist.TEMPLATES)}))
    prompt_file, templates = read_prompts(str(prompts), None)
    loaded = load_model(resolve_model_dir(runs["clip"])[0])
    test = extract_model_features(loaded, str(dataset / "test"), where="--test-shards", cache=False)
    ours = run_zero_shot(loaded, test, "label", prompts=prompt_file, templates=templates, predictions=True)["image"]
    keys = [s["__key__"] for s in _samples(dataset / "test")]  # CLIP_benchmark's order: the tars', in order
    theirs = dict(zip(keys, (fashion_mnist.CLASSES[i] for i in predicted.tolist()), strict=True))
    disagree = sum(theirs[k] != name for k, name in zip(ours["keys"], ours["predicted"], strict=True))
    assert ours["n"] == len(theirs) == TEST_IMAGES and disagree <= TOP1_TOLERANCE
    top1 = float((predicted == true).double().mean())
    assert abs(ours["top1"] - top1) <= TOP1_TOLERANCE / TEST_IMAGES
    assert top1 > 0.2  # well above the 10-class chance rate after STEPS steps


def test_clip_benchmark_retrieval_agrees_with_mmssl_embeddings(export: Path, trained: TrainedRun,
                                                               benchmark_data: Path) -> None:
    """CLIP_benchmark's caption -> image recall (``image_retrieval_recall@k``) on the retrieval set equals the one
    computed from mmssl's own embeddings of the same images and captions (every image embedding differs, so the
    ranking has no ties; the image -> caption direction has ties, the captions repeat, and is only bounded)."""
    from clip_benchmark.datasets.builder import build_dataset
    from clip_benchmark.metrics import zeroshot_retrieval
    from clip_benchmark.models import load_clip

    model, transform, tokenizer = load_clip("open_clip", f"local-dir:{export}", "", None, device="cpu")
    retrieval = benchmark_data / "fashion_mnist_retrieval"
    ds = build_dataset("wds/fashion_mnist_retrieval", root=str(retrieval), transform=transform, split="test",
                       task="zeroshot_retrieval")
    loader = torch.utils.data.DataLoader(ds.batched(64), batch_size=None, num_workers=0)
    theirs = zeroshot_retrieval.evaluate(model.eval(), loader, tokenizer, recall_k_list=[1, 5], device="cpu",
                                         amp=False)
    samples = _samples(retrieval / "test")
    images, texts = _mmssl_embeddings(trained, [s["png"] for s in samples], [s["txt"].decode() for s in samples])
    scores = F.normalize(texts, dim=-1) @ F.normalize(images, dim=-1).T  # caption i -> every image
    rank = (scores > scores.diagonal()[:, None]).sum(1)  # images scored above caption i's own image
    for k in (1, 5):
        assert theirs[f"image_retrieval_recall@{k}"] == pytest.approx(float((rank < k).double().mean()), abs=1e-6)
        assert 0.0 <= theirs[f"text_retrieval_recall@{k}"] <= 1.0
