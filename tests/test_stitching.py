"""Stitching frozen pretrained models: the real EfficientNet-Lite0 and all-MiniLM-L6-v2 loaded offline, every bridge
kind's shapes, LM input space, missing modalities and gradient flow, and Flamingo's gated cross-attention starting
as the identity and training only the bridge.

Tolerances: converted weights and hooked-at-init LM states are compared exactly (``torch.equal``); MiniLM against
sentence-transformers within ``atol=1e-5`` (another code path over the same weights).
"""

from __future__ import annotations

import copy
import hashlib
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModel, GPT2Config

from mmssl.architectures.errors import ArchitectureError
from mmssl.architectures.modalities.tokenizers import load_tokenizer
from mmssl.architectures.stitching import (
    FlamingoBridge,
    FrozenLM,
    LinearBridge,
    StitchedModel,
    build_bridge,
)
from mmssl.architectures.stitching.pretrained import (
    convert_by_order,
    efficientnet_lite0_source,
    efficientnet_lite0_weights,
    frozen_efficientnet_lite0,
    minilm_dir,
    sha256_file,
)

SENTENCES = ["a photo of a cat", "two dogs play in the snow near a red house", "hello", "the pound key"]
VISION_DIM = 1280  # EfficientNet-Lite0 features


@pytest.fixture(scope="module")
def effnet_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return efficientnet_lite0_weights(tmp_path_factory.mktemp("effnet"))


@pytest.fixture(scope="module")
def vision(effnet_file: Path):
    return frozen_efficientnet_lite0(effnet_file, (3, 64, 64))


@pytest.fixture(scope="module")
def minilm() -> FrozenLM:
    return FrozenLM.from_pretrained(minilm_dir())


@pytest.fixture(scope="module")
def text() -> dict[str, torch.Tensor]:
    tok = load_tokenizer(minilm_dir() / "tokenizer.json", 16)
    enc = [tok.encode(s) for s in SENTENCES]
    return {k: torch.stack([e[k] for e in enc]) for k in enc[0]}


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(len(SENTENCES), 3, 64, 64, generator=torch.Generator().manual_seed(0))


def tiny_gpt2() -> FrozenLM:
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=64, bos_token_id=0, eos_token_id=0)
    return FrozenLM.from_config(cfg, causal=True)


def tensor_digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def frozen_digests(model: StitchedModel) -> dict[str, str]:
    """sha256 of every parameter's and buffer's bytes in the frozen parts."""
    state = {**dict(model.vision.named_parameters(prefix="vision")), **dict(model.lm.named_parameters(prefix="lm")),
             **dict(model.vision.named_buffers(prefix="vision")), **dict(model.lm.named_buffers(prefix="lm"))}
    return {n: tensor_digest(t) for n, t in state.items()}


# --- pretrained weights -------------------------------------------------------------------------------------------
def test_converted_efficientnet_equals_the_pth_loaded_by_order(effnet_file: Path, vision, images) -> None:
    source = torch.load(efficientnet_lite0_source(), weights_only=True)
    reference = timm.create_model("efficientnet_lite0")
    keys = list(reference.state_dict())
    reference.load_state_dict(dict(zip(keys, source.values(), strict=True)), strict=True)
    reference.reset_classifier(0)
    reference.eval()
    reloaded = load_file(str(effnet_file))
    assert sorted(reloaded) == sorted(keys)  # safetensors stores keys sorted
    for key, original in zip(keys, source.values(), strict=True):
        assert torch.equal(reloaded[key], original), key
    with torch.no_grad():
        features, pooled = vision(images)
        assert torch.equal(features, reference.forward_features(images))
        assert torch.equal(pooled, reference(images))
    assert not any(p.requires_grad for p in vision.parameters()) and not vision.training


def test_conversion_refuses_unpaired_state_dicts(tmp_path: Path) -> None:
    source = torch.load(efficientnet_lite0_source(), weights_only=True)
    short = tmp_path / "short.pth"
    torch.save(dict(list(source.items())[:-1]), short)
    with pytest.raises(ArchitectureError, match=r"short\.pth has 295 entries but timm's 'efficientnet_lite0' has 296"):
        convert_by_order(short, "efficientnet_lite0", tmp_path / "short.safetensors")
    bad = dict(source)
    bad["_conv_stem.weight"] = torch.zeros(8, 3, 3, 3)
    wrong = tmp_path / "wrong.pth"
    torch.save(bad, wrong)
    with pytest.raises(ArchitectureError, match=r"wrong\.pth: entry '_conv_stem.weight' has shape \[8, 3, 3, 3\].*"
                                                r"'conv_stem.weight'"):
        convert_by_order(wrong, "efficientnet_lite0", tmp_path / "wrong.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["short.pth", "wrong.pth"]  # no partial output


def test_sha256_file_is_the_digest_of_the_bytes(tmp_path: Path, effnet_file: Path) -> None:
    assert sha256_file(effnet_file) == hashlib.sha256(effnet_file.read_bytes()).hexdigest()
    f = tmp_path / "w.bin"
    f.write_bytes(b"abc" * 1000)
    before = sha256_file(f, chunk_bytes=7)
    assert before == hashlib.sha256(b"abc" * 1000).hexdigest()
    f.write_bytes(b"abc" * 999 + b"abd")
    assert sha256_file(f) != before
    with pytest.raises(ArchitectureError, match="weight file not found"):
        sha256_file(tmp_path / "missing.safetensors")


# --- the frozen LM --------------------------------------------------------------------------------------------------
def test_minilm_wrapper_gives_the_sentence_embedding(minilm: FrozenLM, text) -> None:
    assert not minilm.causal and minilm.hidden_size == 384 and len(minilm.layers()) == 6
    direct = AutoModel.from_pretrained(str(minilm_dir())).eval()
    with torch.no_grad():
        states = direct(input_ids=text["input_ids"], attention_mask=text["attention_mask"]).last_hidden_state
        m = text["attention_mask"].unsqueeze(-1).float()
        expected = (states * m).sum(1) / m.sum(1)
        ours = minilm.mean_pool(minilm.text_states(text), text["attention_mask"])
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)
    assert minilm.weights_file == str((minilm_dir() / "model.safetensors").resolve())
    with pytest.raises(ArchitectureError, match="not a causal LM"):
        minilm.lm_logits(ours)


def test_minilm_wrapper_matches_sentence_transformers(minilm: FrozenLM, text) -> None:
    st = pytest.importorskip("sentence_transformers")
    reference = st.SentenceTransformer(str(minilm_dir()), device="cpu")
    expected = reference.encode(SENTENCES, convert_to_tensor=True)  # mean pool, then L2 normalisation
    with torch.no_grad():
        ours = F.normalize(minilm.mean_pool(minilm.text_states(text), text["attention_mask"]), dim=-1)
    torch.testing.assert_close(ours, expected.cpu(), rtol=0, atol=1e-5)


# --- Flamingo in the real MiniLM ------------------------------------------------------------------------------------
def test_gated_cross_attention_starts_as_the_frozen_lm_and_trains_only_the_bridge(vision, minilm, text,
                                                                                 images) -> None:
    torch.manual_seed(0)
    lm = copy.deepcopy(minilm)
    bridge = FlamingoBridge(VISION_DIM, 384, num_lm_layers=6, every=2, width=64, num_latents=8, depth=1, heads=4)
    model = StitchedModel(vision, lm, bridge, embed_dim=32)
    assert bridge.insert_at == [0, 2, 4]
    calls: list[int] = []
    for i, block in enumerate(bridge.xattn):
        block.register_forward_pre_hook(lambda *_, i=i: calls.append(i))
    model.train()
    assert model.training and bridge.training and not lm.training and not model.vision.training
    batch = {"image": images, "text": text}
    out = model(batch)
    assert calls == [0, 1, 2]  # once per hooked layer, in the conditioned pass only
    with torch.no_grad():
        frozen_states = minilm.text_states(text)
    assert torch.equal(out.fused["text"], frozen_states)  # tanh(0) = 0: exactly the frozen LM (train mode: no dropout)
    assert torch.equal(out.tokens["text"], frozen_states)

    frozen_before = frozen_digests(model)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("bridge.", "heads.")) for n in trainable)
    assert set(n for n, _ in model.bridge.named_parameters(prefix="bridge")) <= set(trainable)
    before = {n: p.detach().clone() for n, p in trainable.items()}
    target = torch.randn(out.fused["text"].shape, generator=torch.Generator().manual_seed(1))
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-2, weight_decay=0.0)
    for step in range(2):  # step 1 moves the gates and heads only (tanh(0) = 0 blocks the rest), step 2 everything
        out = model(batch)
        align = (F.normalize(out.embeddings["image"], dim=-1) * F.normalize(out.embeddings["text"], dim=-1)).sum(-1)
        loss = (out.fused["text"] - target).square().mean() - align.mean()
        optimizer.zero_grad()
        loss.backward()
        if step == 0:
            assert all(p.grad is None for p in model.vision.parameters())
            assert all(p.grad is None for p in model.lm.parameters())
            assert bridge.xattn[0].cross_gate.grad.abs().item() > 0
        optimizer.step()
        if step == 0:
            assert torch.equal(bridge.xattn[0].cross_attn.proj.weight, before["bridge.xattn.0.cross_attn.proj.weight"])
            assert not torch.equal(bridge.xattn[0].cross_gate, before["bridge.xattn.0.cross_gate"])
    assert frozen_digests(model) == frozen_before
    unchanged = [n for n, p in trainable.items() if torch.equal(p.detach(), before[n])]
    assert unchanged == []
    with torch.no_grad():
        out = model(batch)
    assert (out.fused["text"] - frozen_states).abs().max() > 1e-3
    assert torch.equal(out.tokens["text"], frozen_states)  # the text-only pass does not see the image


def test_flamingo_hooks_follow_a_deep_copy(vision, images) -> None:
    torch.manual_seed(0)
    lm = tiny_gpt2()
    model = StitchedModel(vision, lm, FlamingoBridge(VISION_DIM, 32, num_lm_layers=2, width=16, num_latents=4,
                                                     depth=1, heads=2, xattn_heads=2), embed_dim=8).eval()
    batch = {"image": images[:2], "text": {"input_ids": torch.randint(1, 64, (2, 5)),
                                           "attention_mask": torch.ones(2, 5, dtype=torch.long)}}
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for block in twin.bridge.xattn:
            block.cross_gate.fill_(1.0)
        original, copied = model(batch), twin(batch)
    assert torch.equal(original.fused["text"], original.tokens["text"])  # the copy's gates do not reach the original
    assert (copied.fused["text"] - copied.tokens["text"]).abs().max() > 1e-4
    with pytest.raises(ArchitectureError, match="already attached"):
        model.bridge.attach(model.lm.layers())


# --- every bridge kind ----------------------------------------------------------------------------------------------
BRIDGES = {
    "linear-pooled": ("linear", {"num_prompts": 3}),
    "linear-tokens": ("linear", {"num_prompts": None, "source": "tokens"}),
    "mlp-tokens-pooled-to-2": ("mlp", {"num_prompts": 2, "source": "tokens", "hidden_dim": 24}),
    "prefix-mlp": ("prefix", {"num_prompts": 4}),
    "prefix-transformer": ("prefix", {"num_prompts": 4, "mapping": "transformer", "depth": 1, "heads": 2}),
    "qformer": ("qformer", {"num_queries": 5, "width": 16, "depth": 2, "heads": 2, "cross_every": 2}),
    "flamingo": ("flamingo", {"num_lm_layers": 2, "width": 16, "num_latents": 6, "depth": 1, "heads": 2,
                              "xattn_heads": 2}),
}
EXPECTED_TOKENS = {"linear-pooled": (3, 32), "linear-tokens": (4, 32), "mlp-tokens-pooled-to-2": (2, 32),
                   "prefix-mlp": (4, 32), "prefix-transformer": (4, 32), "qformer": (5, 16), "flamingo": (6, 16)}


def _tiny_batch(images: torch.Tensor) -> dict:
    g = torch.Generator().manual_seed(3)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 4:] = 0
    return {"image": images[:3], "text": {"input_ids": torch.randint(1, 64, (3, 7), generator=g),
                                          "attention_mask": mask}}


@pytest.mark.parametrize("name", sorted(BRIDGES))
def test_bridge_shapes_lm_space_missing_modalities_and_gradients(name: str, vision, images) -> None:
    kind, options = BRIDGES[name]
    lm = tiny_gpt2()
    torch.manual_seed(1)
    bridge = build_bridge(kind, VISION_DIM, lm.hidden_size, **options)
    model = StitchedModel(vision, lm, bridge, embed_dim=8, special_tokens={"pad": 0}).eval()
    batch = _tiny_batch(images)
    out = model(batch)
    n, width = EXPECTED_TOKENS[name]
    assert out.tokens["image"].shape == (3, n, width) and out.pooled["image"].shape == (3, width)
    torch.testing.assert_close(out.pooled["image"], out.tokens["image"].mean(1))
    assert out.embeddings["image"].shape == out.embeddings["text"].shape == (3, 8)
    assert out.tokens["text"].shape == out.fused["text"].shape == (3, 7, 32)
    assert torch.equal(out.token_mask["text"], batch["text"]["attention_mask"].bool())
    assert all(bool(p.all()) for p in out.present.values())

    ids, mask = batch["text"]["input_ids"], batch["text"]["attention_mask"]
    with torch.no_grad():
        bridged = model.encode_image(batch["image"])
        if kind == "flamingo":
            assert bridged.prompts is None
            assert torch.equal(out.fused["text"], out.tokens["text"])  # zero gates
        else:  # soft prompts in the LM's input-embedding space, prepended to the text's token embeddings
            prompts = bridged.prompts
            assert prompts.shape == (3, n if kind != "qformer" else 5, lm.hidden_size)
            k = prompts.shape[1]
            seq = torch.cat([prompts, lm.model.get_input_embeddings()(ids)], dim=1)
            full = lm.model(inputs_embeds=seq, attention_mask=torch.cat([torch.ones(3, k), mask], 1).long(),
                            output_hidden_states=True)
            torch.testing.assert_close(out.fused["text"], full.hidden_states[-1][:, k:], rtol=0, atol=1e-6)
            torch.testing.assert_close(model.lm_logits(out.fused["text"]), full.logits[:, k:], rtol=0, atol=1e-5)

    lm_calls, vision_calls = [], []
    h1 = model.lm.register_forward_pre_hook(lambda *_: lm_calls.append(1))
    h2 = model.vision.register_forward_pre_hook(lambda *_: vision_calls.append(1))
    image_only = model({"image": batch["image"]})
    assert set(image_only.embeddings) == {"image"} and image_only.fused == {} and lm_calls == []
    torch.testing.assert_close(image_only.embeddings["image"], out.embeddings["image"])
    vision_calls.clear()
    text_only = model({"text": batch["text"]}, {"text": torch.tensor([True, False, True])})
    assert set(text_only.embeddings) == {"text"} and text_only.fused == {} and vision_calls == []
    torch.testing.assert_close(text_only.embeddings["text"], out.embeddings["text"])
    assert text_only.present["text"].tolist() == [True, False, True]
    h1.remove()
    h2.remove()

    if kind == "flamingo":  # open the gates so that every bridge parameter is on the gradient path
        with torch.no_grad():
            for block in bridge.xattn:
                block.cross_gate.fill_(0.5)
                block.mlp_gate.fill_(0.5)
    model.train()
    out = model(batch)
    loss = out.embeddings["image"].square().sum() + out.embeddings["text"].square().sum() + out.fused["text"].sum()
    loss.backward()
    assert all(p.grad is None for p in model.vision.parameters()) and all(p.grad is None for p in lm.parameters())
    for pname, p in model.named_parameters():
        if pname.startswith(("bridge.", "heads.")):
            assert p.grad is not None and p.grad.abs().sum() > 0, pname
        else:
            assert not p.requires_grad, pname
    assert model.no_weight_decay() <= {n for n, _ in model.named_parameters()}


def test_model_facts_and_errors(vision, effnet_file: Path, minilm: FrozenLM) -> None:
    lm = tiny_gpt2()
    model = StitchedModel(vision, lm, LinearBridge(VISION_DIM, 32), embed_dim=8, special_tokens={"pad": 0, "eos": 0},
                          vision_weights=str(effnet_file))
    spec = model.model_spec()
    assert (spec.family, spec.modalities, spec.fusion_dim, spec.vocab_sizes) == ("stitched", ("image", "text"), 32,
                                                                                 {"text": 64})
    assert spec.feature_dims == {"image": 32, "text": 32} and spec.special_tokens == {"text": {"pad": 0, "eos": 0}}
    assert model.frozen_sources() == {"vision": str(effnet_file)}  # the LM was built from a config
    assert model.has_lm_head and model.spec is None
    with pytest.raises(ArchitectureError, match="LM width 384, but the LM's hidden size is 32"):
        StitchedModel(vision, tiny_gpt2(), LinearBridge(VISION_DIM, 384), embed_dim=8)
    with pytest.raises(ArchitectureError, match="vision width 512, but the vision tower gives 1280"):
        StitchedModel(vision, tiny_gpt2(), LinearBridge(512, 32), embed_dim=8)
    with pytest.raises(ArchitectureError, match=r"model\.stitched\.bridge must be one of"):
        build_bridge("adapter", VISION_DIM, 32)
    with pytest.raises(ArchitectureError, match="no tower for modality 'audio'"):
        model({"audio": torch.zeros(1, 1, 8, 8)})
    with pytest.raises(ArchitectureError, match="fuses query 'text' with context 'image'; got query 'image'"):
        model.fuse({"image": torch.zeros(1, 2, 32), "text": torch.zeros(1, 3, 32)}, {}, "image")
    encoder = StitchedModel(vision, minilm, LinearBridge(VISION_DIM, 384), embed_dim=8,
                            vision_weights=str(effnet_file))
    assert not encoder.has_lm_head
    lm_file = str((minilm_dir() / "model.safetensors").resolve())
    assert encoder.frozen_sources() == {"vision": str(effnet_file), "lm": lm_file}


# --- ZeRO-3: the hooked blocks gather their own parameters --------------------------------------------------------
def _zero3_task() -> torch.nn.Module:
    from mmssl.architectures.towers import TimmTower

    torch.manual_seed(0)
    vision = TimmTower("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "embed_dim": 24, "depth": 1,
                                                "num_heads": 2})
    bridge = FlamingoBridge(24, 32, num_lm_layers=2, width=16, num_latents=4, depth=1, heads=2, xattn_heads=2)
    with torch.no_grad():
        for block in bridge.xattn:
            block.cross_gate.fill_(0.3)
    model = StitchedModel(vision, tiny_gpt2(), bridge, embed_dim=8)

    class Task(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, image: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
            out = self.model({"image": image, "text": {"input_ids": ids, "attention_mask": torch.ones_like(ids)}})
            logits = self.model.lm_logits(out.fused["text"][:, :-1])
            return F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()) + out.embeddings["image"].square().mean()

    return Task()


def _zero3_batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(10 * step + rank)
    return torch.randn(4, 3, 32, 32, generator=g), torch.randint(3, 64, (4, 6), generator=g)


def _zero3_rank(rank: int, world: int) -> list[float]:
    import deepspeed

    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world), DS_ACCELERATOR="cpu")
    task = _zero3_task()
    optimizer = torch.optim.AdamW([p for p in task.parameters() if p.requires_grad], lr=1e-3)
    config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "steps_per_print": 2**31 - 1,
              "zero_optimization": {"stage": 3}, "zero_allow_untested_optimizer": True}
    engine, *_ = deepspeed.initialize(model=task, optimizer=optimizer, config=config)
    losses = []
    for step in range(2):
        loss = engine(*_zero3_batch(step, rank))
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


@pytest.mark.distributed
def test_flamingo_trains_under_zero3_as_on_one_process() -> None:
    from tests.helpers.spawn import spawn_ranks

    ranks = spawn_ranks(_zero3_rank, world=2)
    task = _zero3_task()
    optimizer = torch.optim.AdamW([p for p in task.parameters() if p.requires_grad], lr=1e-3)
    expected = [[], []]
    for step in range(2):
        optimizer.zero_grad()
        for rank in range(2):
            loss = task(*_zero3_batch(step, rank))
            (loss / 2).backward()
            expected[rank].append(loss.item())
        optimizer.step()
    for rank in range(2):
        assert ranks[rank][0] == pytest.approx(expected[rank][0], rel=1e-6)  # partitioned forward, same numbers
        assert ranks[rank][1] == pytest.approx(expected[rank][1], rel=1e-4)  # after one sharded AdamW step


def test_inner_attention_equals_the_formula_in_float64() -> None:
    """Flamingo's attention with key/value size independent of the width (``head_dim``): against the formula
    ``W_o concat_h softmax(q_h k_hᵀ/√d) v_h`` written out per head, in float64."""
    from mmssl.architectures.layers.attention import Attention

    torch.manual_seed(0)
    attn = Attention(12, 3, context_dim=20, head_dim=5, bias=False).double()  # as FlamingoBridge builds it
    x, c = torch.randn(2, 4, 12, dtype=torch.float64), torch.randn(2, 7, 20, dtype=torch.float64)
    wq, wkv, wo = attn.q.weight, attn.kv.weight, attn.proj.weight
    heads = []
    for h in range(3):
        q = x @ wq[h * 5:(h + 1) * 5].T
        k = c @ wkv[h * 5:(h + 1) * 5].T
        v = c @ wkv[15 + h * 5:15 + (h + 1) * 5].T
        heads.append(torch.softmax(q @ k.transpose(1, 2) / 5**0.5, dim=-1) @ v)
    expected = torch.cat(heads, dim=-1) @ wo.T
    assert torch.allclose(attn(x, c), expected, atol=1e-12)
    assert sum(p.numel() for p in attn.parameters()) == 12 * 15 + 20 * 30 + 15 * 12  # no biases
