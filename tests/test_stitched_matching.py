"""Image-text matching (ITM) on the stitched family (BLIP-2's stage-1 ITM, with the frozen LM as the fusion).

`StitchedModel.fuse` conditions the frozen LM on any pairing of rows from the forward's fusion inputs (the text's
input embeddings and the bridge's soft prompts, or Flamingo's resampled tokens), and the matching head reads a causal
LM's last real text token. Checked against independent computations: a forward on the re-paired batch, the HF model
run on the unpadded sequence, and a float64 loop over the ITM items with each pair encoded alone.
"""

from __future__ import annotations

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from torch import Tensor
from transformers import GPT2Config

from mmssl.architectures.stitching import FrozenLM, StitchedModel, build_bridge
from mmssl.architectures.stitching.pretrained import efficientnet_lite0_weights, frozen_efficientnet_lite0, minilm_dir
from mmssl.data_pipelines.batch import Batch
from mmssl.objectives.base import fused_summary, fusion_view
from mmssl.objectives.matching import MatchingObjective

VISION_DIM, N = 1280, 6
BRIDGES = {"linear-tokens": ("linear", {"source": "tokens", "num_prompts": 3}),
           "qformer": ("qformer", {"num_queries": 4, "width": 16, "depth": 2, "heads": 2}),
           "flamingo": ("flamingo", {"num_lm_layers": 2, "num_latents": 3, "width": 16, "depth": 1, "heads": 2,
                                     "xattn_heads": 2})}


@pytest.fixture(scope="module")
def vision(tmp_path_factory: pytest.TempPathFactory):
    return frozen_efficientnet_lite0(efficientnet_lite0_weights(tmp_path_factory.mktemp("effnet")), (3, 64, 64))


def tiny_gpt2() -> FrozenLM:
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=64, bos_token_id=0, eos_token_id=0)
    return FrozenLM.from_config(cfg, causal=True)


def build(vision, kind: str, options: dict, lm: FrozenLM | None = None) -> StitchedModel:
    lm = lm or tiny_gpt2()
    torch.manual_seed(1)
    model = StitchedModel(copy.deepcopy(vision), lm, build_bridge(kind, VISION_DIM, lm.hidden_size, **options),
                          embed_dim=8, special_tokens={"pad": 0}).eval()
    if kind == "flamingo":  # open the gates, so that the image changes the LM's states
        with torch.no_grad():
            for block in model.bridge.xattn:
                block.cross_gate.fill_(0.5)
                block.mlp_gate.fill_(0.5)
    return model


def batch(vocab: int = 64) -> dict:
    g = torch.Generator().manual_seed(3)
    lengths = torch.tensor([7, 4, 6, 2, 7, 5])
    mask = (torch.arange(7)[None] < lengths[:, None]).long()
    return {"image": torch.randn(N, 3, 64, 64, generator=g),
            "text": {"input_ids": torch.randint(1, vocab, (N, 7), generator=g) * mask, "attention_mask": mask}}


def rows(inputs: dict, image_rows: list[int], text_rows: list[int], trim: bool = False) -> dict:
    text = {k: v[text_rows] for k, v in inputs["text"].items()}
    if trim:  # one row, cut to its real length
        n = int(text["attention_mask"].sum())
        text = {k: v[:, :n] for k, v in text.items()}
    return {"image": inputs["image"][image_rows], "text": text}


@pytest.mark.parametrize("name", sorted(BRIDGES))
def test_fuse_of_any_pairing_equals_the_forward_on_that_pairing(name: str, vision) -> None:
    model = build(vision, *BRIDGES[name])
    inputs = batch()
    perm = [3, 0, 5, 1, 4, 2]
    with torch.no_grad():
        out = model(inputs)
        views = {m: fusion_view(out, m) for m in ("image", "text")}
        if name == "flamingo":  # no soft prompts: Flamingo's LM reads the resampled tokens
            assert "image" not in out.fusion_inputs and torch.equal(views["image"][0], out.tokens["image"])
        else:
            assert views["image"][0].shape[-1] == model.lm.hidden_size and bool(views["image"][1].all())
        torch.testing.assert_close(views["text"][0], model.lm.embed(inputs["text"]["input_ids"]), rtol=0, atol=0)
        same = model.fuse({m: v[0] for m, v in views.items()}, {m: v[1] for m, v in views.items()}, "text")
        torch.testing.assert_close(same, out.fused["text"], rtol=0, atol=1e-6)
        repaired = model.fuse({"image": views["image"][0][perm], "text": views["text"][0]},
                              {"image": views["image"][1][perm], "text": views["text"][1]}, "text")
        expected = model(rows(inputs, perm, list(range(N)))).fused["text"]
        torch.testing.assert_close(repaired, expected, rtol=0, atol=1e-5)
        assert not torch.allclose(repaired, same, atol=1e-3)  # the image conditions the text


def test_summary_is_the_last_real_token_of_a_causal_lm_and_the_cls_of_an_encoder(vision) -> None:
    model = build(vision, *BRIDGES["linear-tokens"])
    inputs = batch()
    with torch.no_grad():
        out = model(inputs)
        summary = fused_summary(model, out.fused["text"], out.token_mask["text"])
        prompts = out.fusion_inputs["image"]
        for i in range(N):  # the HF model on [P_i; E(x_i)] cut to the real tokens: its final state
            one = rows(inputs, [i], [i], trim=True)
            seq = torch.cat([prompts[i : i + 1], model.lm.embed(one["text"]["input_ids"])], 1)
            hidden = model.lm.model(inputs_embeds=seq, output_hidden_states=True).hidden_states[-1]
            torch.testing.assert_close(summary[i], hidden[0, -1], rtol=0, atol=1e-5)
        padded = {k: torch.nn.functional.pad(v, (0, 3)) for k, v in inputs["text"].items()}  # 3 more pad tokens
        more = model({"image": inputs["image"], "text": padded})
        torch.testing.assert_close(fused_summary(model, more.fused["text"], more.token_mask["text"]), summary,
                                   rtol=0, atol=1e-5)
    encoder = build(vision, "linear", {"source": "tokens", "num_prompts": 3}, FrozenLM.from_pretrained(minilm_dir()))
    fused = torch.randn(2, 5, 384)
    assert torch.equal(fused_summary(encoder, fused, torch.ones(2, 5, dtype=torch.bool)), fused[:, 0])


def _reference(model: StitchedModel, head: torch.nn.Linear, inputs: dict, valid: Tensor, neg_c: Tensor,
               neg_q: Tensor) -> Tensor:
    """Float64 loop: each (text q, image c) item encoded alone by a forward on that pair, its text cut to its real
    length, the head on the final state; -log softmax, mean over the items."""
    items = []
    for i in valid.nonzero().squeeze(1).tolist():
        items.append((i, i, 1))
        if neg_c[i] >= 0:
            items.append((i, int(neg_c[i]), 0))
        if neg_q[i] >= 0:
            items.append((int(neg_q[i]), i, 0))
    total = torch.zeros((), dtype=torch.float64)
    for qi, ci, label in items:
        logits = head(model(rows(inputs, [ci], [qi], trim=True)).fused["text"][0, -1])
        total = total - torch.log_softmax(logits, -1)[label]
    return total / len(items)


@pytest.mark.parametrize("reuse", [True, False])
def test_itm_loss_and_gradients_match_a_float64_loop_of_pairs_encoded_alone(reuse: bool, vision) -> None:
    model = build(vision, *BRIDGES["qformer"])
    model.fuse_text = reuse  # False: the forward gives no fused states, matching fuses the positives itself
    inputs = batch()
    present = {"image": torch.tensor([True, True, False, True, True, True]), "text": torch.ones(N, dtype=torch.bool)}
    objective = MatchingObjective(model.lm.hidden_size, query="text", context="image", negatives="hard", seed=2)
    b = Batch(inputs=inputs, present=present, keys=[f"k{i}" for i in range(N)], meta={}, index=4)
    result = objective(model(inputs, present), b, model)
    result.loss.backward()
    negs = objective.last_negatives
    assert negs is not None and int(negs.context[2]) == int(negs.query[2]) == -1
    assert all(j != 2 for j in negs.context.tolist() + negs.query.tolist())  # the row without an image

    model64, head64 = copy.deepcopy(model).double(), copy.deepcopy(objective.head).double()
    model64.fuse_text = True
    for p in list(model64.parameters()) + list(head64.parameters()):
        p.grad = None
    inputs64 = {"image": inputs["image"].double(), "text": inputs["text"]}
    ref = _reference(model64, head64, inputs64, present["image"], negs.context, negs.query)
    ref.backward()
    torch.testing.assert_close(result.loss.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    trained = dict(model.named_parameters())
    for name, p64 in model64.named_parameters():
        p = trained[name]
        if not name.startswith(("bridge.", "heads.")):
            assert p.grad is None and not p.requires_grad, name  # frozen tower and LM
        elif name.startswith("bridge."):
            torch.testing.assert_close(p.grad.double(), p64.grad, rtol=1e-4, atol=1e-7, msg=name)
    for p, p64 in zip(objective.head.parameters(), head64.parameters(), strict=True):
        torch.testing.assert_close(p.grad.double(), p64.grad, rtol=1e-4, atol=1e-7)



def test_exported_itm_scores_read_the_fusion_view_and_the_summary(vision, tmp_path) -> None:
    """`LoadedModel.itm_scores` (ITM re-ranking at evaluation) on the tokens `model_features` keeps (the fusion view)
    equals the head on each re-paired (text, image) encoded alone."""
    from mmssl.tools.export.model import LoadedModel

    model = build(vision, *BRIDGES["qformer"])
    head = torch.nn.Linear(model.lm.hidden_size, 2)
    loaded = LoadedModel(model=model, config=None, source=tmp_path, itm={"query": "text", "context": "image"},  # type: ignore[arg-type]
                         itm_head=head)
    inputs = batch()
    perm = [2, 5, 0, 1, 3, 4]
    with torch.no_grad():
        out = model(inputs)
        views = {m: fusion_view(out, m) for m in ("image", "text")}
        scores = loaded.itm_scores("text", "image", {"text": views["text"][0], "image": views["image"][0][perm]},
                                   {"text": views["text"][1], "image": views["image"][1][perm]})
        for i in range(N):
            alone = model(rows(inputs, [perm[i]], [i], trim=True)).fused["text"][0, -1]
            torch.testing.assert_close(scores[i], head(alone).softmax(-1)[1], rtol=0, atol=1e-5)
