"""mmssl's towers in open_clip's terms: the ``vision_cfg`` / ``text_cfg`` of open_clip's ``CLIP`` and the weights in
its key space (`tools.export.open_clip` describes what maps to what and what is refused)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from mmssl.architectures.modalities.tokenizers import Tokenizer
from mmssl.architectures.towers import HFTextTower, TimmTower
from mmssl.tools.errors import ToolError

Weights = dict[str, Tensor]


def activation_name(act: nn.Module, where: str) -> str:
    """``gelu`` (exact ``nn.GELU``) or ``quick_gelu`` (``x·σ(1.702x)``, OpenAI CLIP's): the two open_clip builds."""
    from timm.layers import QuickGELU

    if type(act) is nn.GELU and act.approximate == "none":
        return "gelu"
    if type(act) is QuickGELU:
        return "quick_gelu"
    raise ToolError(f"{where}: activation {act!r}; open_clip builds exact GELU or QuickGELU")


def layer_norm_eps(norms: list[nn.Module], where: str) -> float:
    """The one ``eps`` of ``norms`` (affine ``nn.LayerNorm`` with bias, open_clip's ``norm_layer``)."""
    eps = set()
    for norm in norms:
        if not isinstance(norm, nn.LayerNorm) or not norm.elementwise_affine or norm.bias is None:
            raise ToolError(f"{where}: normalisation {norm!r}; open_clip's towers use affine LayerNorm")
        eps.add(float(norm.eps))
    if len(eps) != 1:
        raise ToolError(f"{where}: LayerNorms with different eps {sorted(eps)}; open_clip's tower has one")
    return eps.pop()


def _copy(out: Weights, target: str, module: nn.Module) -> None:
    out[f"{target}.weight"] = module.weight.detach()
    bias = getattr(module, "bias", None)
    out[f"{target}.bias"] = bias.detach() if bias is not None else torch.zeros(module.weight.shape[0])


def _vit_checks(vit: nn.Module, where: str) -> None:
    from timm.layers import PatchEmbed
    from timm.models.vision_transformer import VisionTransformer

    if type(vit) is not VisionTransformer:
        raise ToolError(f"{where}: the image tower is a timm {type(vit).__name__}; open_clip's image tower expresses "
                        "plain timm ViTs (timm.models.vision_transformer.VisionTransformer)")
    problems = {
        "no class token": vit.cls_token is None, "register tokens": vit.num_reg_tokens > 0,
        "positions without the class token": vit.no_embed_class, "no position embedding": vit.pos_embed is None,
        f"global_pool={vit.global_pool!r} (token or avg)": vit.global_pool not in ("token", "avg"),
        "attention pooling": getattr(vit, "attn_pool", None) is not None,
        "pooling that includes prefix tokens": bool(getattr(vit, "pool_include_prefix", False)),
        "a non-standard patch embedding": type(vit.patch_embed) is not PatchEmbed
        or not isinstance(vit.patch_embed.norm, nn.Identity),
    }
    found = [why for why, bad in problems.items() if bad]
    if found:
        raise ToolError(f"{where}: the ViT has {found[0]}, which open_clip's VisionTransformer does not express")


def vision_state(tower: TimmTower, proj: Tensor, where: str) -> tuple[dict[str, Any], Weights, str]:
    """open_clip's ``vision_cfg``, the ``visual.*`` weights (without the prefix) and the activation name of a timm
    ViT tower whose linear head has weight ``proj`` ``[E, D]``."""
    from timm.layers import Mlp
    from timm.models.vision_transformer import Attention, Block, LayerScale

    vit = tower.model
    _vit_checks(vit, where)
    conv, embed = vit.patch_embed.proj, vit.patch_embed
    width, channels = int(vit.embed_dim), int(conv.in_channels)
    (height, side), (ph, pw) = tuple(embed.img_size), tuple(embed.patch_size)
    if height != side or ph != pw or channels not in (1, 3):
        raise ToolError(f"{where}: {channels}-channel {height}x{side} images in {ph}x{pw} patches; open_clip's ViT "
                        "takes square RGB (or grey) images in square patches")
    token = vit.global_pool == "token"
    post, other = (vit.norm, vit.fc_norm) if token else (vit.fc_norm, vit.norm)
    if not isinstance(other, nn.Identity):
        raise ToolError(f"{where}: a ViT normalised both before and after pooling; open_clip has one ln_post")
    norms, acts, hidden, scales = [post], set(), set(), set()
    out: Weights = {}
    for i, block in enumerate(vit.blocks):
        attn, mlp = block.attn, block.mlp
        if type(block) is not Block or type(attn) is not Attention or type(mlp) is not Mlp:
            raise ToolError(f"{where}: block {i} is a {type(block).__name__} with {type(attn).__name__} / "
                            f"{type(mlp).__name__}; open_clip's blocks are timm's plain Block / Attention / Mlp")
        if (attn.attn_dim != width or attn.proj.out_features != width or attn.gate is not None
                or not all(isinstance(m, nn.Identity) for m in (attn.q_norm, attn.k_norm, attn.norm, mlp.norm))):
            raise ToolError(f"{where}: block {i}'s attention (q/k or scale norms, gating, head width) or MLP norm is "
                            "not in open_clip's ResidualAttentionBlock")
        norms += [block.norm1, block.norm2]
        acts.add(activation_name(mlp.act, where))
        hidden.add(mlp.fc1.out_features)
        scales.add(tuple(type(ls) for ls in (block.ls1, block.ls2)))
        b = f"transformer.resblocks.{i}."
        _copy(out, f"{b}ln_1", block.norm1)
        _copy(out, f"{b}ln_2", block.norm2)
        qkv = {}
        _copy(qkv, "in_proj", attn.qkv)
        out[f"{b}attn.in_proj_weight"], out[f"{b}attn.in_proj_bias"] = qkv["in_proj.weight"], qkv["in_proj.bias"]
        _copy(out, f"{b}attn.out_proj", attn.proj)
        _copy(out, f"{b}mlp.c_fc", mlp.fc1)
        _copy(out, f"{b}mlp.c_proj", mlp.fc2)
        for name, ls in (("ls_1", block.ls1), ("ls_2", block.ls2)):
            if isinstance(ls, LayerScale):
                out[f"{b}{name}.gamma"] = ls.gamma.detach()
    if len(hidden) != 1 or len(acts) != 1 or scales not in ({(nn.Identity, nn.Identity)}, {(LayerScale, LayerScale)}):
        raise ToolError(f"{where}: the ViT's blocks differ in MLP width, LayerScale or activation; open_clip's are "
                        "alike")
    no_ln_pre = isinstance(vit.norm_pre, nn.Identity)
    if not no_ln_pre:
        norms.append(vit.norm_pre)
        _copy(out, "ln_pre", vit.norm_pre)
    eps = layer_norm_eps(norms, where)
    kernel = conv.weight.detach()
    out["conv1.weight"] = kernel.expand(-1, 3, -1, -1) / 3 if channels == 1 else kernel
    positions = vit.pos_embed.detach()[0].clone()
    if conv.bias is not None:  # conv(x) + b + pos = conv(x) + (pos + b) on every patch token
        positions[1:] += conv.bias.detach()
    out["class_embedding"], out["positional_embedding"] = vit.cls_token.detach()[0, 0], positions
    _copy(out, "ln_post", post)
    out["proj"] = proj.detach().T
    heads = int(vit.blocks[0].attn.num_heads)
    cfg = {"image_size": height, "patch_size": ph, "width": width, "layers": len(vit.blocks),
           "head_width": width // heads, "mlp_ratio": hidden.pop() / width, "pool_type": "tok" if token else "avg",
           "final_ln_after_pool": not token, "no_ln_pre": no_ln_pre, "norm_kwargs": {"eps": eps}}
    if scales == {(LayerScale, LayerScale)}:
        cfg["ls_init_value"] = 1.0  # any value: the trained gammas are loaded over it
    return cfg, out, acts.pop()


def text_state(tower: HFTextTower, proj: Tensor, tokenizer: Tokenizer, where: str
               ) -> tuple[dict[str, Any], Weights, str]:
    """open_clip's ``text_cfg``, the text weights (top-level keys of open_clip's ``CLIP``) and the activation name
    of CLIP's text tower (transformers ``CLIPTextModel``) whose linear head has weight ``proj`` ``[E, D]``."""
    config = tower.model.config
    if config.model_type != "clip_text_model" or not tower.causal or tower.pool != "eot":
        raise ToolError(f"{where}: the text tower is a {config.model_type} pooled by {tower.pool!r}; open_clip's text "
                        "transformer is CLIP's, causal and pooled at the end-of-text token (model.text.arch: clip)")
    specials = tokenizer.special_ids()
    probe = tokenizer.encode("a photo of a dog.")
    real = probe["input_ids"][: int(probe["attention_mask"].sum())].tolist()
    if "eos" not in specials or real[-1] != specials["eos"] or specials["eos"] in real[:-1]:
        raise ToolError(f"{where}: the tokenizer does not end each text with one end-of-text id ({specials}); "
                        "open_clip pools at the first eos id")
    act = config.hidden_act if config.hidden_act in ("gelu", "quick_gelu") else None
    if act is None:
        raise ToolError(f"{where}: text activation {config.hidden_act!r}; open_clip builds gelu or quick_gelu")
    width, layers, heads = config.hidden_size, config.num_hidden_layers, config.num_attention_heads
    if config.intermediate_size % width or tokenizer.max_len > config.max_position_embeddings:
        raise ToolError(f"{where}: MLP width {config.intermediate_size} for width {width}, or {tokenizer.max_len} "
                        f"tokens over {config.max_position_embeddings} positions, is not open_clip's text transformer")
    src = {k.removeprefix("text_model."): v.detach() for k, v in tower.model.state_dict().items()}
    out: Weights = {"token_embedding.weight": src["embeddings.token_embedding.weight"],
                    "positional_embedding": src["embeddings.position_embedding.weight"][: tokenizer.max_len],
                    "ln_final.weight": src["final_layer_norm.weight"], "ln_final.bias": src["final_layer_norm.bias"],
                    "text_projection": proj.detach().T}
    for i in range(layers):
        a, b = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{b}attn.in_proj_{kind}"] = torch.cat([src[f"{a}self_attn.{p}_proj.{kind}"] for p in "qkv"])
            for theirs, ours in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"),
                                 ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
                out[f"{b}{theirs}.{kind}"] = src[f"{a}{ours}.{kind}"]
    cfg = {"context_length": tokenizer.max_len, "vocab_size": int(out["token_embedding.weight"].shape[0]),
           "width": width, "heads": heads, "layers": layers, "mlp_ratio": config.intermediate_size / width,
           "pool_type": "eos", "eos_id": specials["eos"], "pad_id": tokenizer.pad_id,
           "norm_kwargs": {"eps": float(config.layer_norm_eps)}}
    return cfg, out, act
