"""Bundled recipes for landmark image-text methods: CLIP, SigLIP, SLIP, ALBEF, FLAVA, FactorCL, each at full scale
(`recipes/<method>.yaml`) and at CPU scale (`recipes/<method>-tiny.yaml`).

* every method's two recipes are bundled and listed by `mmssl recipes` with their one-line description;
* each full-scale recipe builds on the meta device (`tools.recipes_check`) with a placeholder tokenizer of the
  paper's vocabulary size, and its trainable parameter count — corrected by the documented, formula-computed gap
  where this framework cannot express a component exactly — is within 2 % of the reference size in `PAPERS`
  (each also printed in the recipe's description);
* each tiny recipe trains 3 steps on 2 ranks over real Fashion-MNIST shards: every objective term of the recipe is
  logged and finite, the logged loss is ``Σ_i w_i L_i`` of those terms, and the run summary's parameter count equals
  the meta-device count of the same recipe.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pytest

from pretrain.recipe import list_bundled_recipes, load_recipe
from tests.conftest import mmssl
from tools.recipes_check import count_parameters, placeholder_tokenizer

METHODS = ("clip", "siglip", "slip", "albef", "flava", "factorcl")


def _linear(d_in: int, d_out: int, bias: bool = True) -> int:
    return d_in * d_out + (d_out if bias else 0)


def _vit_block(width: int, mlp_ratio: int = 4) -> int:
    """A pre-norm transformer layer: 2 LayerNorms, qkv + output projections, 2-layer MLP (all with biases)."""
    return 2 * 2 * width + _linear(width, 3 * width) + _linear(width, width) + _linear(width, mlp_ratio * width) \
        + _linear(mlp_ratio * width, width)


# --- documented gaps: what this framework builds minus what the paper's architecture has (recipe comments) -------
SLIP_MLP_MIDDLE = _linear(4096, 4096) + 2 * 2 * 4096  # SLIP's 2nd 4096-wide layer and its two BatchNorms
ALBEF_UNTIED_DECODER = 768 * 30522  # ALBEF ties the MLM decoder to the word embeddings
FLAVA_CROSS_ATTENTION = 6 * 4 * _linear(768, 768)  # cross-attention block in each of the 6 fusion layers
FLAVA_MIM_HEADS = 2 * (_linear(768, 768) + 2 * 768 + _linear(768, 8192))  # MIM + MMM-image heads over dVAE codes
FLAVA_MAE_DECODER = _linear(768, 768) + 768 + _vit_block(768) + 2 * 768 + _linear(768, 16 * 16 * 3)


@dataclass(frozen=True)
class Paper:
    params: float  # reference size
    shown: str  # how the recipe's description prints it
    vocab: int  # the paper's text vocabulary (placeholder tokenizer size)
    citation: str
    gap: int = 0  # (this framework's count) - (the paper's architecture), documented in the recipe
    scope: str = "trainable"  # "trainable": model + objectives; "model": encoders + projections only


PAPERS: dict[str, Paper] = {
    "clip": Paper(149_620_737, "149.6 M", 49408,
                  "Radford et al. 2021, ViT-B/16; open_clip ViT-B-16.json built with open_clip"),
    "siglip": Paper(203_155_970, "203.2 M", 32000,
                    "Zhai et al. 2023, B/16 224 px, 64 tokens, 32k vocab; open_clip ViT-B-16-SigLIP.json"),
    "slip": Paper(170_617_089, "170.6 M", 49408,
                  "Mu et al. 2022, SLIP_VITB16 (models.py): CLIP ViT-B/16 + 768-4096-4096-256 SimCLR MLP",
                  gap=-SLIP_MLP_MIDDLE),
    "albef": Paper(209_937_725, "209.9 M", 30522,
                   "Li et al. 2021, §3.1: ViT-B/16 @256 + BERT-base (6 text + 6 fusion layers) + ITC/ITM/MLM heads",
                   gap=ALBEF_UNTIED_DECODER),
    "flava": Paper(303_859_063, "303.9 M", 30522,
                   "Singh et al. 2022; transformers FlavaForPreTraining(FlavaConfig()) minus its frozen dVAE",
                   gap=FLAVA_CROSS_ATTENTION - FLAVA_MIM_HEADS + FLAVA_MAE_DECODER),
    "factorcl": Paper(151_277_313, "151.3 M", 49408,
                      "Liang et al. 2023 (IRFL: CLIP ViT-B/32 encoders); open_clip ViT-B-32.json", scope="model"),
}


def test_every_method_has_a_tiny_and_a_full_recipe_listed_by_the_cli(capsys: pytest.CaptureFixture[str]) -> None:
    from tools.cli import main

    bundled = list_bundled_recipes()
    with pytest.raises(SystemExit) as exited:
        main(["recipes"])
    assert exited.value.code == 0
    printed = {line.split(maxsplit=1)[0]: line.split(maxsplit=1)[1] for line in capsys.readouterr().out.splitlines()}
    for method in METHODS:
        for name in (method, f"{method}-tiny"):
            assert name in bundled, f"{name} is not bundled"
            assert bundled[name] and printed[name] == bundled[name]  # the description's first line, one line each
            assert bundled[name].lower().startswith(method), bundled[name]
            assert load_recipe(name).name == name  # parses and type-checks as a bundled recipe


@pytest.mark.parametrize("method", METHODS)
def test_full_scale_recipe_matches_the_paper_size(method: str, tmp_path: Path) -> None:
    paper = PAPERS[method]
    recipe = load_recipe(method)
    assert paper.shown in " ".join(recipe.description.split()), f"{method}: description must cite {paper.shown}"
    tokenizer = placeholder_tokenizer(tmp_path / "tokenizer.json", paper.vocab)
    recipe.model.towers["text"].tokenizer = str(tokenizer)
    counts = count_parameters(recipe)
    built = counts.trainable if paper.scope == "trainable" else counts.model_trainable
    corrected = built - paper.gap
    assert abs(corrected - paper.params) <= 0.02 * paper.params, (
        f"{method}: {built:,} built, {corrected:,} after the documented gap {paper.gap:+,}, "
        f"paper {paper.params:,} ({paper.citation}): {100 * (corrected / paper.params - 1):+.2f} %")
    if method == "albef":  # the momentum model is a frozen full copy: counted in total, not in trainable
        assert counts.total - counts.trainable == counts.model_total


@pytest.fixture(scope="module")
def fashion(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """About 200 real Fashion-MNIST images with their templated captions in 10-sample shards, and a sentencepiece
    model trained on those captions (`mmssl make-shards fashion-mnist` writes none)."""
    from data_pipelines.reader import ShardReader
    from data_pipelines.shards import resolve_shards
    from data_pipelines.sources import fashion_mnist
    from data_pipelines.tokenizer_training import train_sentencepiece

    out = tmp_path_factory.mktemp("fashion")
    fashion_mnist.build(out, limit=200, shard_size=10)
    reader = ShardReader(where="test")
    captions = [s["txt"].decode() for url in resolve_shards(str(out / "train")) for _, s in reader.samples(url)]
    return out / "train", train_sentencepiece(captions, out / "spm.model", vocab_size=60)


def _data_overrides(method: str, train: Path) -> list[str]:
    if method != "flava":
        return [f"data.train={train}"]
    recipe = load_recipe(f"{method}-tiny")
    sources = [{"name": s.name, "train": str(train), "weight": s.weight, "modalities": s.modalities}
               for s in recipe.data.sources]
    return [f"data.sources={json.dumps(sources)}"]


@pytest.mark.distributed
@pytest.mark.parametrize("method", METHODS)
def test_tiny_recipe_trains_every_term(method: str, fashion: tuple[Path, Path], tmp_path: Path) -> None:
    train, spm = fashion
    name = f"{method}-tiny"
    overrides = [*_data_overrides(method, train), f"model.text.tokenizer={spm}", "train.steps=3",
                 "train.log_every=1", "train.ckpt_every=0", "train.tensorboard=false"]
    run = tmp_path / "run"
    done = mmssl("pretrain", name, "--nproc", "2", "--run-dir", str(run), *overrides, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    recipe = load_recipe(name, overrides)
    weights = {term: cfg.weight for term, cfg in recipe.objectives.terms.items()}
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    for record in records:
        terms = {k.split("/", 1)[1]: v for k, v in record.items() if k.startswith("loss/") and k.count("/") == 1}
        assert set(terms) == set(weights), f"{name}: logged terms {sorted(terms)} != recipe {sorted(weights)}"
        assert all(math.isfinite(v) for v in (record["loss"], *terms.values())), record
        total = sum(weights[t] * v for t, v in terms.items())
        assert math.isclose(record["loss"], total, rel_tol=1e-4, abs_tol=1e-5), (record["loss"], total)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["parameters"] == count_parameters(recipe).model_total
    if method == "flava":  # every source of the mix contributed rows
        rows = summary["rows_per_source"]
        assert set(rows) == {"pairs", "images", "captions"} and all(n > 0 for n in rows.values()), rows
        assert sum(rows.values()) == 3 * recipe.data.batch_size * 2
