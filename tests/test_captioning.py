"""Captioning through a frozen causal LM's own head: the loss against a float64 cross-entropy computed from the
transformers model's own logits, padding and absent rows ignored, gradients only into the bridge, the checks.

Tolerance: float32 loss against the float64 loop within ``rtol=1e-5, atol=1e-6``.
"""

from __future__ import annotations

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from transformers import GPT2Config

from mmssl.architectures.outputs import ModelSpec
from mmssl.architectures.stitching import FrozenLM, LinearBridge, StitchedModel
from mmssl.architectures.towers import TimmTower
from mmssl.data_pipelines.batch import Batch
from mmssl.objectives.base import ObjectiveError
from mmssl.objectives.captioning import CaptioningConfig, CaptioningObjective, captioning_loss

VOCAB, WIDTH, K = 50, 32, 3  # LM vocabulary and width, soft prompts
PAD = 0


def _vision() -> TimmTower:
    return TimmTower("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "embed_dim": 24, "depth": 1,
                                              "num_heads": 2})


@pytest.fixture(scope="module")
def model() -> StitchedModel:
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=WIDTH, n_head=2, vocab_size=VOCAB, n_positions=32, bos_token_id=1,
                     eos_token_id=2, pad_token_id=PAD)
    lm = FrozenLM.from_config(cfg, causal=True)
    return StitchedModel(_vision(), lm, LinearBridge(24, WIDTH, num_prompts=K), embed_dim=8,
                         special_tokens={"pad": PAD, "bos": 1, "eos": 2}).eval()


def _batch(n: int = 5, length: int = 8, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n, length), generator=g)
    ids[:, 0] = 1
    lengths = torch.tensor([8, 5, 3, 8, 6])[:n]
    mask = (torch.arange(length)[None] < lengths[:, None]).long()
    ids = ids.masked_fill(mask == 0, PAD)
    present = {"image": torch.tensor([True, True, False, True, True])[:n],
               "text": torch.tensor([True, True, True, True, False])[:n]}
    return Batch(inputs={"image": torch.randn(n, 3, 32, 32, generator=g),
                         "text": {"input_ids": ids, "attention_mask": mask}},
                 present=present, keys=[f"k{i}" for i in range(n)])


def _objective(model: StitchedModel) -> CaptioningObjective:
    objective = CaptioningObjective.from_config(CaptioningConfig(), model.model_spec())
    objective.bind(model)
    return objective


def _reference_loss(model: StitchedModel, batch: Batch) -> float:
    """Independent: the transformers model's own forward (its LM head) over [prompts; token embeddings], then a
    float64 loop of -log softmax over every real, non-first text token of complete rows."""
    text = batch.inputs["text"]
    ids, mask = text["input_ids"], text["attention_mask"]
    with torch.no_grad():
        prompts = model.encode_image(batch.inputs["image"]).prompts
        seq = torch.cat([prompts, model.lm.model.get_input_embeddings()(ids)], dim=1)
        full_mask = torch.cat([torch.ones(ids.shape[0], K, dtype=torch.long), mask], dim=1)
        logits = model.lm.model(inputs_embeds=seq, attention_mask=full_mask).logits[:, K:].double()
    total, count = 0.0, 0
    for b in range(ids.shape[0]):
        if not (batch.present["image"][b] and batch.present["text"][b]):
            continue
        for t in range(1, ids.shape[1]):
            if mask[b, t]:
                total -= torch.log_softmax(logits[b, t - 1], dim=-1)[ids[b, t]].item()
                count += 1
    return total / count


def test_loss_equals_cross_entropy_of_the_lm_head(model: StitchedModel) -> None:
    batch = _batch()
    out = model(batch.inputs, batch.present)
    result = _objective(model)(out, batch, model)
    expected = _reference_loss(model, batch)
    assert math.isclose(result.loss.item(), expected, rel_tol=1e-5, abs_tol=1e-6)
    assert result.metrics["tokens"].item() == 7 + 4 + 7  # rows 0, 1, 3 (lengths 8, 5, 8), minus the first token
    assert math.isclose(result.metrics["ppl"].item(), math.exp(expected), rel_tol=1e-4)


def test_padding_and_absent_rows_do_not_count(model: StitchedModel) -> None:
    objective = _objective(model)
    batch = _batch()
    base = objective(model(batch.inputs, batch.present), batch, model).loss
    changed = _batch()
    ids = changed.inputs["text"]["input_ids"]
    ids[changed.inputs["text"]["attention_mask"] == 0] = 7  # padding positions (attention mask still 0)
    ids[2, 1:] = 9  # row 2: image absent
    ids[4, 1:] = 11  # row 4: text absent
    changed.inputs["image"][2] = 5.0
    after = objective(model(changed.inputs, changed.present), changed, model).loss
    torch.testing.assert_close(after, base, rtol=1e-6, atol=1e-6)
    ids[0, 4] = (ids[0, 4] + 1) % VOCAB  # a counted token does change it
    moved = objective(model(changed.inputs, changed.present), changed, model).loss
    assert abs(moved.item() - base.item()) > 1e-4


def test_gradient_reaches_only_the_bridge(model: StitchedModel) -> None:
    model.zero_grad(set_to_none=True)
    batch = _batch()
    _objective(model)(model(batch.inputs, batch.present), batch, model).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.startswith("bridge."))
    assert all(grads[n] is None for n in grads if n.startswith(("lm.", "vision.", "heads.")))
    model.zero_grad(set_to_none=True)


def test_function_form_and_a_batch_without_context(model: StitchedModel) -> None:
    batch = _batch()
    out = model(batch.inputs, batch.present)
    text = batch.inputs["text"]
    valid = batch.present["image"] & batch.present["text"]
    loss, _ = captioning_loss(out.fused["text"], text["input_ids"], text["attention_mask"], model.lm_logits,
                              valid=valid, global_norm=False)
    logits = model.lm_logits(out.fused["text"][:, :-1]).double()
    sel = text["attention_mask"][:, 1:].bool() & valid[:, None]
    nll = -torch.log_softmax(logits, -1).gather(-1, text["input_ids"][:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(loss.double(), nll[sel].mean(), rtol=1e-5, atol=1e-6)
    text_only = Batch(inputs={"text": text}, present={"text": batch.present["text"]}, keys=batch.keys)
    result = _objective(model)(model(text_only.inputs, text_only.present), text_only, model)
    assert result.loss.item() == 0.0 and result.metrics["tokens"].item() == 0


def test_configuration_errors(model: StitchedModel) -> None:
    spec = model.model_spec()
    with pytest.raises(ObjectiveError, match=r"target='image' is not a token-id modality \(have: \['text'\]\)"):
        CaptioningObjective.from_config(CaptioningConfig(target="image", context="text"), spec)
    with pytest.raises(ObjectiveError, match="context and target must differ"):
        CaptioningObjective.from_config(CaptioningConfig(context="text"), spec)
    no_lm = ModelSpec(family="fusion_free", modalities=("image", "text"), embed_dim=8, feature_dims={},
                      token_dims={}, vocab_sizes={"text": VOCAB})
    objective = CaptioningObjective.from_config(CaptioningConfig(), no_lm)
    with pytest.raises(ObjectiveError, match=r"objectives.captioning needs a model that conditions a language model "
                                             r"on 'image' \(model.family: stitched"):
        objective.check(no_lm, where="objectives.captioning")
    audio = ModelSpec(family="stitched", modalities=("audio", "text"), embed_dim=8, feature_dims={}, token_dims={},
                      fusion_dim=WIDTH, vocab_sizes={"text": VOCAB})
    with pytest.raises(ObjectiveError, match="needs modality 'image'"):
        CaptioningObjective.from_config(CaptioningConfig(), audio).check(audio, where="objectives.captioning")
    encoder = StitchedModel(_vision(), FrozenLM.from_config(GPT2Config(n_layer=1, n_embd=WIDTH, n_head=2,
                                                                       vocab_size=VOCAB), causal=False),
                            LinearBridge(24, WIDTH), embed_dim=8)
    with pytest.raises(ObjectiveError, match="needs a model with a causal LM output head"):
        CaptioningObjective.from_config(CaptioningConfig(), encoder.model_spec()).bind(encoder)
