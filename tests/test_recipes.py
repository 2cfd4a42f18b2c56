"""Bundled recipes for landmark methods: CLIP, SigLIP, SLIP, ALBEF, FLAVA, FactorCL, VATT, BLIP-2, LiMBeR, Flamingo,
each at full scale (`recipes/<method>.yaml`) and at CPU scale (`recipes/<method>-tiny.yaml`).

* every method's two recipes are bundled and listed by `mmssl recipes` with their one-line description;
* each full-scale recipe builds on the meta device (`tools.recipes_check`) with a placeholder tokenizer of the
  paper's vocabulary size (stitched recipes: placeholder directories holding the frozen LM's published config), and
  its trainable parameter count — over the modules the paper's figure covers (``prefixes``), corrected by the
  documented, formula-computed gap where this framework cannot express a component exactly — is within 2 % of the
  reference size in `PAPERS` (each also printed in the recipe's description);
* each tiny recipe trains, stops and resumes on 2 ranks over real shards in fp32 and in bf16: `tests.test_precision`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from mmssl.pretrain.recipe import Recipe, list_bundled_recipes, load_recipe
from mmssl.tools.recipes_check import (
    build_on_meta,
    count_parameters,
    count_prefixed,
    placeholder_lm,
    placeholder_tokenizer,
    placeholder_weights,
)
from tests.helpers.tiny_recipes import METHODS


def _linear(d_in: int, d_out: int, bias: bool = True) -> int:
    return d_in * d_out + (d_out if bias else 0)


def _vit_block(width: int, mlp_ratio: int = 4) -> int:
    """A pre-norm transformer layer: 2 LayerNorms, qkv + output projections, 2-layer MLP (all with biases)."""
    return 2 * 2 * width + _linear(width, 3 * width) + _linear(width, width) + _linear(width, mlp_ratio * width) \
        + _linear(mlp_ratio * width, width)


# --- documented gaps: what this framework builds minus what the paper's architecture has (recipe comments) -------
FLAVA_MIM_HEADS = 2 * (_linear(768, 768) + 2 * 768 + _linear(768, 8192))  # MIM + MMM-image heads over dVAE codes
FLAVA_MAE_DECODER = _linear(768, 768) + 768 + _vit_block(768) + 2 * 768 + _linear(768, 16 * 16 * 3)
# BLIP-2's Q-Former minus its query path: the text half (BERT-base word + position embeddings and their LayerNorm,
# the 12 text FFNs, the tied LM head's transform + LayerNorm + bias) and the ITC projections, ITM head, temperature
BERT_FFN = _linear(768, 3072) + _linear(3072, 768) + 2 * 768
BLIP2_TEXT_HALF = (30523 * 768 + 512 * 768 + 2 * 768 + 12 * BERT_FFN + _linear(768, 768) + 2 * 768 + 30523
                   + 2 * _linear(768, 256) + _linear(768, 2) + 1)

# the frozen LMs of the stitched recipes: published transformers configs (built on the meta device only)
OPT_2_7B = {"model_type": "opt", "architectures": ["OPTForCausalLM"], "vocab_size": 50272, "hidden_size": 2560,
            "num_hidden_layers": 32, "ffn_dim": 10240, "num_attention_heads": 32, "max_position_embeddings": 2048,
            "word_embed_proj_dim": 2560, "do_layer_norm_before": True, "activation_function": "relu",
            "pad_token_id": 1, "bos_token_id": 2, "eos_token_id": 2, "enable_bias": True, "tie_word_embeddings": True}
GPT_J_6B = {"model_type": "gptj", "architectures": ["GPTJForCausalLM"], "vocab_size": 50400, "n_positions": 2048,
            "n_embd": 4096, "n_layer": 28, "n_head": 16, "rotary_dim": 64, "activation_function": "gelu_new",
            "tie_word_embeddings": False, "bos_token_id": 50256, "eos_token_id": 50256}
PYTHIA_1_4B = {"model_type": "gpt_neox", "architectures": ["GPTNeoXForCausalLM"], "vocab_size": 50304,
               "hidden_size": 2048, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 8192,
               "hidden_act": "gelu", "rotary_pct": 0.25, "max_position_embeddings": 2048,
               "use_parallel_residual": True, "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 0}


@dataclass(frozen=True)
class Paper:
    params: float  # reference size
    shown: str  # how the recipe's description prints it
    vocab: int  # the paper's text vocabulary (placeholder tokenizer size)
    citation: str
    gap: int = 0  # (this framework's count) - (the paper's architecture), documented in the recipe
    scope: str = "trainable"  # "trainable": model + objectives; "model": encoders + projections only
    prefixes: tuple[str, ...] = ()  # count only the model's trainable parameters under these names
    lm: dict | None = None  # stitched: the frozen LM's published config


PAPERS: dict[str, Paper] = {
    "clip": Paper(149_620_737, "149.6 M", 49408,
                  "Radford et al. 2021, ViT-B/16; open_clip ViT-B-16.json built with open_clip"),
    "siglip": Paper(203_155_970, "203.2 M", 32000,
                    "Zhai et al. 2023, B/16 224 px, 64 tokens, 32k vocab; open_clip ViT-B-16-SigLIP.json"),
    "slip": Paper(170_617_089, "170.6 M", 49408,
                  "Mu et al. 2022, SLIP_VITB16 (models.py): CLIP ViT-B/16 + 768-4096-4096-256 SimCLR MLP"),
    "albef": Paper(209_937_725, "209.9 M", 30522,
                   "Li et al. 2021, §3.1: ViT-B/16 @256 + BERT-base (6 text + 6 fusion layers) + ITC/ITM/MLM heads"),
    "flava": Paper(303_859_063, "303.9 M", 30522,
                   "Singh et al. 2022; transformers FlavaForPreTraining(FlavaConfig()) minus its frozen dVAE",
                   gap=FLAVA_MAE_DECODER - FLAVA_MIM_HEADS),
    "factorcl": Paper(151_277_313, "151.3 M", 49408,
                      "Liang et al. 2023 (IRFL: CLIP ViT-B/32 encoders); open_clip ViT-B-32.json", scope="model"),
    "vatt": Paper(155_000_000, "155.0 M", 65536,
                  "Akbari et al. 2021, Table 7 'Medium' (VATT-MA): the shared encoder + the video tokenizer",
                  prefixes=("blocks.", "norm.", "embedders.video.", "cls_tokens.video", "type_embeds.video")),
    "xdc": Paper(33_300_000 + 11_700_000, "45.0 M", 0,
                 "Alwassel et al. 2020: R(2+1)D-18 video (33.3 M, Tran et al. 2018) + ResNet-18 audio (11.7 M)"),
    "cav-mae": Paper(190_129_920, "190.1 M", 0,
                     "Gong et al. 2023; the official training log's trainable count (YuanGongND/cav-mae)"),
    "blip2": Paper(188_000_000 - BLIP2_TEXT_HALF, "188 M", 50272,
                   "Li et al. 2023 §3.1: the 188 M Q-Former less its text half, built here by the frozen LM",
                   prefixes=("bridge.queries", "bridge.layers.", "bridge.norm."), lm=OPT_2_7B),
    "limber": Paper(3072 * 4096 + 4096, "12.6 M", 50400,
                    "Merullo et al. 2023: Linear(3072 -> 4096) from CLIP RN50x16's 12 x 12 grid into GPT-J",
                    prefixes=("bridge.",), lm=GPT_J_6B),
    "flamingo": Paper(194_000_000, "194 M", 50304,
                      "Alayrac et al. 2022, Table 1 (Flamingo-3B): the Perceiver resampler",
                      prefixes=("bridge.resampler.",), lm=PYTHIA_1_4B),
}


def test_every_method_has_a_tiny_and_a_full_recipe_listed_by_the_cli(capsys: pytest.CaptureFixture[str]) -> None:
    from mmssl.tools.cli import main

    bundled = list_bundled_recipes()
    with pytest.raises(SystemExit) as exited:
        main(["recipes"])
    assert exited.value.code == 0
    printed = {line.split(maxsplit=1)[0]: line.split(maxsplit=1)[1] for line in capsys.readouterr().out.splitlines()}
    for method in METHODS:
        for name in (method, f"{method}-tiny"):
            assert name in bundled, f"{name} is not bundled"
            assert bundled[name] and printed[name] == bundled[name]  # the description's first line, one line each
            assert re.sub(r"[^a-z0-9]", "", bundled[name].lower()).startswith(method.replace("-", "")), bundled[name]
            assert load_recipe(name).name == name  # parses and type-checks as a bundled recipe


def _full_recipe_on_placeholders(method: str, tmp_path: Path) -> Recipe:
    """The full-scale recipe with a tokenizer of the paper's vocabulary and, for stitched ones, placeholder frozen
    parts (the LM's published config; an empty vision weight file): it builds on the meta device as published."""
    paper = PAPERS[method]
    recipe = load_recipe(method)
    if "text" in recipe.model.towers:
        recipe.model.towers["text"].tokenizer = str(placeholder_tokenizer(tmp_path / "tokenizer.json", paper.vocab))
    if paper.lm is not None:
        recipe.model.towers["text"].pretrained = str(placeholder_lm(tmp_path / "lm", paper.lm))
        recipe.model.towers["image"].pretrained = str(placeholder_weights(tmp_path / "vision.safetensors"))
    return recipe


@pytest.mark.parametrize("method", METHODS)
def test_full_scale_recipe_matches_the_paper_size(method: str, tmp_path: Path) -> None:
    paper = PAPERS[method]
    recipe = _full_recipe_on_placeholders(method, tmp_path)
    assert paper.shown in " ".join(recipe.description.split()), f"{method}: description must cite {paper.shown}"
    counts = count_parameters(recipe)
    if paper.prefixes:
        model, _ = build_on_meta(recipe)
        built = count_prefixed(model, paper.prefixes)
    else:
        built = counts.trainable if paper.scope == "trainable" else counts.model_trainable
    corrected = built - paper.gap
    assert abs(corrected - paper.params) <= 0.02 * paper.params, (
        f"{method}: {built:,} built, {corrected:,} after the documented gap {paper.gap:+,}, "
        f"paper {paper.params:,} ({paper.citation}): {100 * (corrected / paper.params - 1):+.2f} %")
    if method == "albef":  # the momentum model is a frozen full copy: counted in total, not in trainable
        assert counts.total - counts.trainable == counts.model_total
    if paper.lm is not None:  # the LM and the vision tower are frozen: only the bridge and the heads train
        model, _ = build_on_meta(recipe)
        trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
        assert trainable == {"bridge", "heads"}, trainable


def test_flamingo_cross_attention_blocks_match_the_published_figure(tmp_path: Path) -> None:
    """Flamingo-3B's 24 gated xattn-dense blocks: "1.2 B" in Table 1, printed to two significant figures, so the
    count must round to it ([1.15 B, 1.25 B)); with the 194 M resampler the trained total is Table 1's 1.4 B."""
    model, _ = build_on_meta(_full_recipe_on_placeholders("flamingo", tmp_path))
    xattn = count_prefixed(model, ("bridge.xattn.",))
    assert len(model.bridge.xattn) == 24
    assert 1.15e9 <= xattn < 1.25e9, f"{xattn:,}"
    assert round(count_prefixed(model, ("bridge.",)) / 1e9, 1) == 1.4
