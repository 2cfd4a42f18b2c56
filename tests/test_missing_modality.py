"""Missing modalities, every family: rows that lack a modality change nothing for the other rows, and the loss
ignores them. A unimodal batch passes through every family."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mmssl.architectures.config import FusionConfig, ModelConfig, UnifiedConfig, build_model
from mmssl.architectures.modalities import AudioConfig, TextConfig
from mmssl.data_pipelines.batch import Batch
from mmssl.objectives.contrastive import ContrastiveConfig, ContrastiveObjective
from tests.conftest import PROMPT_WORDS

B = 6
ABSENT = torch.tensor([False, True, False, False, True, False])  # rows 1 and 4 carry no audio


def _config(family: str, spm: Path, **extra: object) -> ModelConfig:
    audio = AudioConfig(width=32, depth=1, heads=2, n_mels=32, frames=64, patch_size=[16, 16])
    text = TextConfig(tokenizer=str(spm), width=32, depth=1, heads=2, max_len=12)
    cfg = ModelConfig(family=family, embed_dim=16, towers={"audio": audio, "text": text})
    if family == "late_fusion":
        cfg.fusion = FusionConfig(kind=str(extra.get("kind", "cross_attention")), query="text", width=32, depth=1,
                                  heads=2, options=dict(extra.get("options", {})))
    if family == "unified":
        cfg.unified = UnifiedConfig(width=32, depth=2, heads=2, fusion_depth=1, experts=bool(extra.get("experts")),
                                    query="text")
    return cfg


CASES = {
    "fusion_free": ("fusion_free", {}),
    "late_cross_attention": ("late_fusion", {}),
    "late_mult": ("late_fusion", {"kind": "mult"}),
    "late_tensor": ("late_fusion", {"kind": "tensor", "options": {"factor_dim": 4}}),
    "late_gated": ("late_fusion", {"kind": "gated"}),
    "unified": ("unified", {}),
    "unified_experts": ("unified", {"experts": True}),
}


def _inputs(spm: Path) -> dict:
    from mmssl.architectures.modalities.tokenizers import load_tokenizer

    tok = load_tokenizer(spm, 12)
    gen = torch.Generator().manual_seed(0)
    sentences = [" ".join(PROMPT_WORDS[(3 * i + j) % len(PROMPT_WORDS)] for j in range(2 + i)) for i in range(B)]
    encoded = [tok.encode(s) for s in sentences]
    text = {k: torch.stack([e[k] for e in encoded]) for k in ("input_ids", "attention_mask")}
    audio = torch.randn(B, 1, 32, 64, generator=gen)
    audio[ABSENT] = 0.0  # what collate puts in absent rows
    return {"audio": audio, "text": text}


def _rows(x: object, keep: torch.Tensor) -> object:
    return {k: v[keep] for k, v in x.items()} if isinstance(x, dict) else x[keep]  # type: ignore[index]


@pytest.mark.parametrize("case", sorted(CASES))
def test_absent_rows_do_not_change_present_rows(case: str, spm: Path) -> None:
    family, extra = CASES[case]
    model = build_model(_config(family, spm, **extra), seed=0).train()
    inputs = _inputs(spm)
    present = {"audio": ~ABSENT, "text": torch.ones(B, dtype=torch.bool)}
    full = model(inputs, present)
    keep = ~ABSENT
    alone = model({m: _rows(x, keep) for m, x in inputs.items()}, {m: p[keep] for m, p in present.items()})
    for m in ("audio", "text"):
        torch.testing.assert_close(full.embeddings[m][keep], alone.embeddings[m], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(full.pooled[m][keep], alone.pooled[m], atol=1e-5, rtol=1e-5)
        assert torch.equal(full.present[m], present[m])
    if family != "fusion_free":
        fused, ref = full.fused["text"], alone.fused["text"]
        assert fused.isfinite().all()
        torch.testing.assert_close(fused[keep], ref, atol=1e-5, rtol=1e-5)
    # the rows without audio: their text fused with nothing equals text alone fused with an absent audio row
    if family == "late_fusion" and extra.get("kind", "cross_attention") == "cross_attention":
        one = model({"text": _rows(inputs["text"], ABSENT), "audio": inputs["audio"][ABSENT]},
                    {"audio": torch.zeros(2, dtype=torch.bool), "text": torch.ones(2, dtype=torch.bool)})
        torch.testing.assert_close(full.fused["text"][ABSENT], one.fused["text"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", ["fusion_free", "late_cross_attention", "unified"])
def test_contrastive_loss_ignores_absent_rows(case: str, spm: Path) -> None:
    family, extra = CASES[case]
    model = build_model(_config(family, spm, **extra), seed=0)
    objective = ContrastiveObjective.from_config(ContrastiveConfig(pairs=[["audio", "text"]]), model.spec)
    inputs = _inputs(spm)
    present = {"audio": ~ABSENT, "text": torch.ones(B, dtype=torch.bool)}
    keys = [f"k{i}" for i in range(B)]
    full = Batch(inputs=inputs, present=present, keys=keys, meta={})
    keep = ~ABSENT
    alone = Batch(inputs={m: _rows(x, keep) for m, x in inputs.items()},
                  present={m: p[keep] for m, p in present.items()},
                  keys=[k for k, p in zip(keys, keep.tolist(), strict=True) if p], meta={})
    loss_full = objective(model(full.inputs, full.present), full, model).loss
    loss_alone = objective(model(alone.inputs, alone.present), alone, model).loss
    torch.testing.assert_close(loss_full, loss_alone, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_unimodal_batch_passes_through(case: str, spm: Path) -> None:
    family, extra = CASES[case]
    model = build_model(_config(family, spm, **extra), seed=0)
    inputs = _inputs(spm)
    for m in ("audio", "text"):
        out = model({m: inputs[m]})
        assert set(out.embeddings) == {m} and out.embeddings[m].shape == (B, 16) and not out.fused
        both = model(inputs)
        torch.testing.assert_close(out.embeddings[m], both.embeddings[m], atol=1e-5, rtol=1e-5)
