"""Parameter layouts: exports and checkpoints of the layout before the attention layers were unified.

`to_layout_1` below writes a model's weights under the names the older mmssl gave them, from the modules' structure
(independently of `architectures.layers.legacy`'s rename table): an export in that layout loads to identical
weights and outputs, as does `mmssl export` of a training checkpoint in it, while resuming such a checkpoint is
refused in one line naming the change.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from mmssl.architectures.layers.attention import Attention
from mmssl.architectures.layers.blocks import Block
from mmssl.architectures.layers.legacy import PARAM_LAYOUT, upgrade_state_dict
from mmssl.architectures.modalities.tokenizers import load_tokenizer
from mmssl.architectures.stitching.bridges import PrefixMapper
from mmssl.architectures.stitching.flamingo import FlamingoBridge
from mmssl.architectures.stitching.qformer import QFormer
from mmssl.pretrain import checkpoint
from mmssl.pretrain.recipe import load_recipe
from mmssl.tools.errors import ToolError
from mmssl.tools.export.model import CONFIG, WEIGHTS, load_model, save_model
from tests.conftest import PROMPT_WORDS

# --- the older layout, written from the module structure ----------------------------------------------------------
# per kind of block: (renames of its own parameters, {attention: (its old name, how its projections were stored)})
OLD_BLOCKS: dict[str, tuple[dict[str, str], dict[str, tuple[str, str]]]] = {
    "albef": ({"norm1": "norm_self", "norm_context": "norm_ctx", "norm2": "norm_mlp", "mlp.fc1": "mlp.0",
               "mlp.fc2": "mlp.2"}, {"attn": ("self_attn", "mha"), "cross_attn": ("cross_attn", "mha")}),
    "mult_cross": ({"norm_cross": "norm_attn", "norm2": "norm_mlp"}, {"cross_attn": ("attn", "query_key_value")}),
    "mult_self": ({"norm1": "norm_attn", "norm2": "norm_mlp"}, {"attn": ("attn", "query_key_value")}),
    "mome": ({"norm1": "norm", "norm2": "ffn.shared.norm", "mlp": "ffn.shared.mlp"}, {"attn": ("attn", "q_kv")}),
    "highmmt": ({"norm_cross": "norm_q", "norm_context": "norm_kv", "norm2": "norm_mlp"},
                {"cross_attn": ("attn", "q_kv")}),
    "qformer": ({"norm1": "norm_self", "norm_context": "norm_vision", "norm2": "norm_ffn", "mlp.fc1": "ffn.0",
                 "mlp.fc2": "ffn.2"}, {"attn": ("self_attn", "mha"), "cross_attn": ("cross_attn", "mha")}),
    "clipcap": ({"mlp.fc1": "linear1", "mlp.fc2": "linear2"}, {"attn": ("self_attn", "mha")}),
    "resampler": ({"norm_cross": "norm_latents", "norm_context": "norm_media", "norm2": "ffn.0", "mlp.fc1": "ffn.1",
                   "mlp.fc2": "ffn.3"}, {"cross_attn": ("attn", "mha_or_inner")}),
    "xattn": ({"norm_cross": "norm", "norm2": "ffn.0", "mlp.fc1": "ffn.1", "mlp.fc2": "ffn.3",
               "cross_gate": "attn_gate", "mlp_gate": "ffn_gate"}, {"cross_attn": ("attn", "mha_or_inner")}),
}


def _kind(path: str, model: nn.Module) -> str:
    if re.fullmatch(r"fusion\.layers\.\d+", path):
        return "albef"
    if re.fullmatch(r"fusion\.(crossmodal|memory)\.[^.]+\.\d+", path):
        return "mult_cross" if ".crossmodal." in path else "mult_self"
    if re.fullmatch(r"(fusion\.)?(fusion_)?blocks\.\d+", path):
        return "mome"
    if path.startswith("perceiver."):
        return "highmmt"
    if re.fullmatch(r"bridge\.layers\.\d+", path):
        return "clipcap" if isinstance(model.bridge, PrefixMapper) else "qformer"
    return "resampler" if path.startswith("bridge.resampler.") else "xattn"


def _old_attention(attn: Attention, style: str) -> dict[str, Tensor]:
    q, kv, proj = attn.q, attn.kv, attn.proj
    k_weight, v_weight = kv.weight.chunk(2)
    if style == "q_kv":
        return {"q.weight": q.weight, "q.bias": q.bias, "kv.weight": kv.weight, "kv.bias": kv.bias,
                "proj.weight": proj.weight, "proj.bias": proj.bias}
    if style == "query_key_value":
        k_bias, v_bias = kv.bias.chunk(2)
        return {"query.weight": q.weight, "query.bias": q.bias, "key.weight": k_weight, "key.bias": k_bias,
                "value.weight": v_weight, "value.bias": v_bias, "proj.weight": proj.weight, "proj.bias": proj.bias}
    if style == "mha_or_inner" and q.bias is None:  # Flamingo's head_dim attention: q, kv, out; no biases
        return {"q.weight": q.weight, "kv.weight": kv.weight, "out.weight": proj.weight}
    old = {"in_proj_bias": torch.cat([q.bias, kv.bias]), "out_proj.weight": proj.weight, "out_proj.bias": proj.bias}
    if kv.weight.shape[1] == q.weight.shape[1]:  # nn.MultiheadAttention packs [q; k; v] when kdim == embed_dim
        return {"in_proj_weight": torch.cat([q.weight, kv.weight]), **old}
    return {"q_proj_weight": q.weight, "k_proj_weight": k_weight, "v_proj_weight": v_weight, **old}


def _old_name(local: str, block: Block, renames: dict[str, str]) -> str:
    if block.experts is not None:  # MoME experts: norm2.<e>.* / mlp.<e>.* were ffn.<e>.norm.* / ffn.<e>.mlp.*
        expert = re.fullmatch(r"(norm2|mlp)\.([^.]+)\.(.+)", local)
        if expert:
            return f"ffn.{expert[2]}.{'norm' if expert[1] == 'norm2' else 'mlp'}.{expert[3]}"
    for new in sorted(renames, key=len, reverse=True):
        if local == new or local.startswith(new + "."):
            return renames[new] + local[len(new):]
    return local


def _old_path(path: str, model: nn.Module) -> str:
    """ClipCap's mapper was an ``nn.TransformerEncoder``: ``bridge.transformer.layers.<i>``."""
    return path.replace("bridge.layers.", "bridge.transformer.layers.") if _kind(path, model) == "clipcap" else path


def to_layout_1(model: nn.Module) -> dict[str, Tensor]:
    """``model``'s weights under the older mmssl's names."""
    blocks = {path: m for path, m in model.named_modules() if isinstance(m, Block)}
    old: dict[str, Tensor] = {}
    for key, value in model.state_dict().items():
        path = next((p for p in blocks if key.startswith(p + ".")), None)
        if path is None:
            old[key] = value.unsqueeze(0) if key == "perceiver.latents" else value  # HighMMT's were [1, L, D]
            continue
        local = key[len(path) + 1:]
        if local.split(".")[0] in ("attn", "cross_attn"):
            continue
        old[f"{_old_path(path, model)}.{_old_name(local, blocks[path], OLD_BLOCKS[_kind(path, model)][0])}"] = value
    for path, block in blocks.items():
        kind, old_path = _kind(path, model), _old_path(path, model)
        for attr, (old_attr, style) in OLD_BLOCKS[kind][1].items():
            if getattr(block, attr) is None:  # a Q-Former layer without cross-attention
                continue
            for name, value in _old_attention(getattr(block, attr), style).items():
                old[f"{old_path}.{old_attr}.{name}"] = value.detach().clone()
    return {k: v.detach().clone().contiguous() for k, v in old.items()}


# --- models of every family with attention ------------------------------------------------------------------------
def _towers(spm: Path) -> dict[str, Any]:
    return {"audio": {"width": 16, "depth": 1, "heads": 2, "frames": 32, "n_mels": 16, "patch_size": [8, 8]},
            "text": {"tokenizer": str(spm), "width": 16, "depth": 1, "heads": 2, "max_len": 10}}


MODELS = {
    "cross_attention": {"family": "late_fusion", "fusion": {"kind": "cross_attention", "width": 16, "heads": 2}},
    "mult": {"family": "late_fusion", "fusion": {"kind": "mult", "width": 8, "heads": 2, "depth": 1,
                                                 "options": {"self_depth": 1, "max_len": 16}}},
    "merged": {"family": "late_fusion", "fusion": {"kind": "merged", "width": 16, "heads": 2}},
    "unified": {"family": "unified", "unified": {"width": 16, "depth": 2, "heads": 2, "experts": True,
                                                 "fusion_depth": 1, "latents": 3}},
    "unified_plain": {"family": "unified", "unified": {"width": 16, "depth": 1, "heads": 2, "fusion_depth": 1}},
}


def _recipe(directory: Path, model: dict[str, Any], spm: Path) -> Path:
    recipe = {"name": "layout", "data": {"train": str(directory)}, "model": {"embed_dim": 8, **model, **_towers(spm)},
              "objectives": {"contrastive": {"pairs": [["audio", "text"]]}}, "train": {"steps": 1}}
    path = directory / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def _inputs(spm: Path) -> dict[str, Any]:
    tok = load_tokenizer(spm, 10)
    enc = [tok.encode(" ".join(PROMPT_WORDS[i:i + n])) for i, n in ((0, 3), (4, 7), (9, 2))]
    return {"audio": torch.randn(3, 1, 16, 32, generator=torch.Generator().manual_seed(0)),
            "text": {k: torch.stack([e[k] for e in enc]) for k in enc[0]}}


def _outputs(model: nn.Module, inputs: dict[str, Any]) -> list[Tensor]:
    with torch.no_grad():
        out = model.eval()(inputs)
    return [*out.embeddings.values(), *out.tokens.values(), *out.fused.values()]


@pytest.mark.parametrize("case", MODELS)
def test_an_export_of_the_older_layout_loads_to_identical_weights_and_outputs(case: str, spm: Path,
                                                                          tmp_path: Path) -> None:
    from mmssl.architectures.config import build_model

    recipe = load_recipe(_recipe(tmp_path, MODELS[case], spm))
    model = build_model(recipe.model, seed=0).eval()
    out = save_model(tmp_path / "model", recipe.model, model)
    assert json.loads((out / CONFIG).read_text())["mmssl"]["param_layout"] == PARAM_LAYOUT == 2
    old = to_layout_1(model)
    assert set(old) != set(model.state_dict())  # the names really changed
    save_file(old, str(out / WEIGHTS))
    with pytest.raises(ToolError, match="which this architecture lacks"):  # stamped as new: no conversion
        load_model(out)
    meta = json.loads((out / CONFIG).read_text())
    del meta["mmssl"]["param_layout"]  # as the older mmssl wrote it
    (out / CONFIG).write_text(json.dumps(meta))
    loaded = load_model(out, seed=1).model
    own = model.state_dict()
    assert set(loaded.state_dict()) == set(own)
    assert all(torch.equal(v, own[k]) for k, v in loaded.state_dict().items())
    inputs = _inputs(spm)
    for got, expected in zip(_outputs(loaded, inputs), _outputs(model, inputs), strict=True):
        assert torch.equal(got, expected)


class _Holder(nn.Module):
    def __init__(self, bridge: nn.Module) -> None:
        super().__init__()
        self.bridge = bridge


BRIDGES = {
    "qformer": lambda: QFormer(20, 24, num_queries=5, width=16, depth=3, heads=2, cross_every=2),
    "qformer_same_width": lambda: QFormer(16, 24, num_queries=5, width=16, depth=1, heads=2),
    "clipcap": lambda: PrefixMapper(20, 16, num_prompts=3, mapping="transformer", depth=2, heads=2),
    "flamingo": lambda: FlamingoBridge(20, 24, num_lm_layers=2, width=16, num_latents=4, depth=2, heads=2,
                                       xattn_heads=2),
    "flamingo_head_dim": lambda: FlamingoBridge(20, 24, num_lm_layers=2, width=16, num_latents=4, depth=1,
                                                heads=3, xattn_heads=2, head_dim=8),
}


@pytest.mark.parametrize("case", BRIDGES)
def test_bridges_of_the_older_layout_convert_to_identical_weights_and_outputs(case: str) -> None:
    torch.manual_seed(0)
    holder = _Holder(BRIDGES[case]()).eval()
    for p in holder.parameters():  # gates and biases away from their init, so that every value is checked
        p.data.add_(0.1 * torch.randn_like(p))
    torch.manual_seed(1)
    fresh = _Holder(BRIDGES[case]()).eval()
    converted = upgrade_state_dict(to_layout_1(holder))
    fresh.load_state_dict(converted)  # strict: every name and shape
    assert all(torch.equal(v, holder.state_dict()[k]) for k, v in fresh.state_dict().items())
    assert upgrade_state_dict(holder.state_dict()).keys() == holder.state_dict().keys()  # idempotent
    g = torch.Generator().manual_seed(2)
    vision, pooled = torch.randn(2, 7, 20 if case != "qformer_same_width" else 16, generator=g), torch.randn(2, 20)
    with torch.no_grad():
        a, b = holder.bridge(vision, pooled), fresh.bridge(vision, pooled)
        assert torch.equal(a.tokens, b.tokens)
        if isinstance(holder.bridge, FlamingoBridge):
            hidden = torch.randn(2, 5, 24, generator=g)
            for mine, theirs in zip(holder.bridge.xattn, fresh.bridge.xattn, strict=True):
                assert torch.equal(mine(hidden, context=a.tokens), theirs(hidden, context=b.tokens))


# --- training checkpoints -----------------------------------------------------------------------------------------
class _Engine:
    """What `pretrain.checkpoint` touches of a DeepSpeed engine at stage 0, writing DeepSpeed's model-states file."""

    def __init__(self, module: nn.Module) -> None:
        self.module, self.optimizer, self.loaded = module, SimpleNamespace(), False

    def zero_optimization_stage(self) -> int:
        return 0

    def save_checkpoint(self, root: str, tag: str, client_state: dict[str, Any], **_: Any) -> None:
        (Path(root) / tag).mkdir(parents=True)
        torch.save({"module": self.module.state_dict(), **client_state},
                   Path(root) / tag / "mp_rank_00_model_states.pt")

    def load_checkpoint(self, root: str, tag: str, **_: Any) -> tuple[str, dict[str, Any]]:
        self.loaded = True
        return root, torch.load(Path(root) / tag / "mp_rank_00_model_states.pt", weights_only=True)


def _task(seed: int = 0) -> nn.Module:
    from mmssl.architectures.fusion import CrossAttentionFusion

    torch.manual_seed(seed)
    task = nn.Module()
    task.model = nn.Module()
    task.model.fusion = CrossAttentionFusion({"audio": 6, "text": 4}, width=8, depth=1, heads=2)
    return task


def test_a_training_checkpoint_of_the_older_layout_is_refused_in_one_line(tmp_path: Path) -> None:
    from mmssl.pretrain.storage import SHARED, RunStorage

    engine = _Engine(_task())
    tag = checkpoint.save(engine, tmp_path, 1, {"step": 1}, keep_last=2, storage=RunStorage(SHARED, True, (0,), 1))
    root = tmp_path / "checkpoints"
    assert checkpoint.param_layout(root / tag) == PARAM_LAYOUT  # stamped into the client state
    assert checkpoint.load(engine, root, tag) == {"step": 1} and engine.loaded

    old_tag = root / "step_00000000"  # as the older mmssl wrote it: its names, no stamp
    old_tag.mkdir()
    old = {f"model.{k}": v for k, v in to_layout_1(engine.module.model).items()}
    torch.save({"module": old, "mmssl": {"step": 0}}, old_tag / "mp_rank_00_model_states.pt")
    engine.loaded = False
    with pytest.raises(checkpoint.CheckpointError) as caught:
        checkpoint.load(engine, root, old_tag.name)
    message = str(caught.value)
    assert "written before mmssl's attention layers were unified (param_layout 1" in message
    assert "'model.fusion.layers.0.cross_attn.in_proj_bias'" in message and "\n" not in message
    assert not engine.loaded  # refused before DeepSpeed reads it
    same_names = {"module": {f"model.{k}": v for k, v in engine.module.model.state_dict().items()}, "mmssl": {}}
    torch.save(same_names, old_tag / "mp_rank_00_model_states.pt")  # unstamped, but no name changed: resumes
    checkpoint.load(engine, root, old_tag.name)
    assert engine.loaded


def test_export_converts_a_training_checkpoint_of_the_older_layout(spm: Path, tmp_path: Path) -> None:
    from mmssl.architectures.config import build_model
    from mmssl.tools.export.run import export_run

    run = tmp_path / "run"
    run.mkdir()
    recipe = load_recipe(_recipe(run, MODELS["mult"], spm))
    model = build_model(recipe.model, seed=recipe.train.seed)
    for p in model.parameters():
        p.data.add_(0.1 * torch.randn_like(p))
    tag = run / "checkpoints" / "step_00000001"  # a stage-0 fp32 checkpoint of the older mmssl
    tag.mkdir(parents=True)
    torch.save({"module": {f"model.{k}": v for k, v in to_layout_1(model).items()}, "mmssl": {"step": 1}},
               tag / "mp_rank_00_model_states.pt")
    (run / "checkpoints" / "latest").write_text(tag.name + "\n")
    export_run(run, tmp_path / "export")
    weights = load_file(str(tmp_path / "export" / "model" / WEIGHTS))
    own = model.state_dict()
    assert weights.keys() == own.keys() and all(torch.equal(v, own[k]) for k, v in weights.items())
    assert torch.equal(_outputs(load_model(tmp_path / "export" / "model").model, _inputs(spm))[-1],
                       _outputs(model, _inputs(spm))[-1])
