"""Parameter layouts: the version stamped into exports and training checkpoints, and the conversion of exported
models written before the attention layers were unified.

Layout 1 (no stamp): every transformer had its own attention: ``nn.MultiheadAttention`` (``in_proj_weight``, or
``q_proj_weight``/``k_proj_weight``/``v_proj_weight`` when the key width differed, ``in_proj_bias``, ``out_proj``)
in the cross-attention fusion, the Q-Former and Flamingo without ``head_dim``; ``query``/``key``/``value``/``proj``
in MulT; ``q``/``kv``/``out`` in Flamingo's ``head_dim`` attention; ``q``/``kv``/``proj`` in the MoME blocks and the
Perceiver; and ``nn.TransformerEncoder`` in ClipCap's mapper. Layout 2: one `Attention` (``q``, ``kv``, ``proj``)
inside one `Block` (``norm1``, ``attn``, ``norm_cross``, ``norm_context``, ``cross_attn``, ``norm2``, ``mlp``).

`upgrade_state_dict` maps a layout-1 model state dict (``model.state_dict()`` key space, as `mmssl export` writes
it) to layout 2: the layer renames of `LAYERS` (regular expressions on the key), then the attention renames of
`ATTENTION` inside each renamed ``attn``/``cross_attn``, splitting a fused ``[q; k; v]`` projection into ``q`` and
``kv`` and concatenating separate ``k`` and ``v`` into ``kv``. Only keys under the mmssl modules listed there change
(a timm or transformers tower's own ``attn.qkv`` is left alone), and layout-2 keys match no rule, so the conversion
is idempotent. The values are unchanged: ``nn.MultiheadAttention``'s projections have the same row layout (heads in
order) as ``q``/``kv``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import Tensor

PARAM_LAYOUT = 2  # stamped as "param_layout" in exports and as "mmssl_param_layout" in training checkpoints

# (layer key prefix in layout 1, its prefix in layout 2 or None, renames of the rest of the key: (regex, replacement))
_NORM2_MLP = ((r"ffn\.0\.", "norm2."), (r"ffn\.1\.", "mlp.fc1."), (r"ffn\.3\.", "mlp.fc2."))  # Flamingo LN-in FFN
LAYERS: tuple[tuple[str, str | None, tuple[tuple[str, str], ...]], ...] = (
    # MulT: crossmodal (cross-attention only) and memory (self-attention) layers
    (r"fusion\.crossmodal\.[^.]+\.\d+\.", None,
     ((r"norm_attn\.", "norm_cross."), (r"attn\.", "cross_attn."), (r"norm_mlp\.", "norm2."))),
    (r"fusion\.memory\.[^.]+\.\d+\.", None, ((r"norm_attn\.", "norm1."), (r"norm_mlp\.", "norm2."))),
    # cross-attention fusion (ALBEF): nn.MultiheadAttention, Sequential MLP
    (r"fusion\.layers\.\d+\.", None,
     ((r"norm_self\.", "norm1."), (r"self_attn\.", "attn."), (r"norm_ctx\.", "norm_context."),
      (r"norm_mlp\.", "norm2."), (r"mlp\.0\.", "mlp.fc1."), (r"mlp\.2\.", "mlp.fc2."))),
    # MoME blocks: merged fusion, the unified encoder's backbone and fusion blocks
    (r"(?:fusion\.)?(?:fusion_)?blocks\.\d+\.", None,
     ((r"norm\.", "norm1."), (r"ffn\.shared\.norm\.", "norm2."), (r"ffn\.shared\.mlp\.", "mlp."),
      (r"ffn\.([^.]+)\.norm\.", r"norm2.\1."), (r"ffn\.([^.]+)\.mlp\.", r"mlp.\1."))),
    # HighMMT's Perceiver in the unified encoder
    (r"perceiver\.layers\.\d+\.", None,
     ((r"norm_q\.", "norm_cross."), (r"norm_kv\.", "norm_context."), (r"attn\.", "cross_attn."),
      (r"norm_mlp\.", "norm2."))),
    # Q-Former: nn.MultiheadAttention, Sequential FFN
    (r"bridge\.layers\.\d+\.", None,
     ((r"norm_self\.", "norm1."), (r"self_attn\.", "attn."), (r"norm_vision\.", "norm_context."),
      (r"norm_ffn\.", "norm2."), (r"ffn\.0\.", "mlp.fc1."), (r"ffn\.2\.", "mlp.fc2."))),
    # ClipCap's transformer mapper: nn.TransformerEncoder(norm_first) -> bridge.layers
    (r"bridge\.transformer\.layers\.(\d+)\.", r"bridge.layers.\1.",
     ((r"self_attn\.", "attn."), (r"linear1\.", "mlp.fc1."), (r"linear2\.", "mlp.fc2."))),
    # Flamingo: the resampler's layers and the gated cross-attention blocks
    (r"bridge\.resampler\.layers\.\d+\.", None,
     ((r"norm_latents\.", "norm_cross."), (r"norm_media\.", "norm_context."), (r"attn\.", "cross_attn."),
      *_NORM2_MLP)),
    (r"bridge\.xattn\.\d+\.", None,
     ((r"norm\.", "norm_cross."), (r"attn\.", "cross_attn."), (r"attn_gate$", "cross_gate"),
      (r"ffn_gate$", "mlp_gate"), *_NORM2_MLP)),
)

# attention parameters in layout 1 -> layout 2: (regex on the name inside attn/cross_attn, replacement, how)
# how: "rename"; "split": rows [q; k; v] -> q (the first third) and kv (the rest); "k"/"v": halves of kv
ATTENTION: tuple[tuple[str, str, str], ...] = (
    (r"in_proj_(weight|bias)", r"\1", "split"),  # nn.MultiheadAttention, equal widths
    (r"q_proj_weight", "q.weight", "rename"),  # nn.MultiheadAttention, kdim != embed_dim
    (r"k_proj_weight", "kv.weight", "k"),
    (r"v_proj_weight", "kv.weight", "v"),
    (r"out_proj\.(weight|bias)", r"proj.\1", "rename"),
    (r"out\.weight", "proj.weight", "rename"),  # Flamingo's head_dim attention
    (r"query\.(weight|bias)", r"q.\1", "rename"),  # MulT
    (r"key\.(weight|bias)", r"kv.\1", "k"),
    (r"value\.(weight|bias)", r"kv.\1", "v"),
)
_LATENTS = "perceiver.latents"  # HighMMT's latents were [1, L, D]; the Perceiver's are [L, D]


def _rename_layer(key: str) -> tuple[str, bool]:
    """``key`` with its layer's renames of `LAYERS` applied, and whether it lies in one of those layers."""
    for prefix, new_prefix, renames in LAYERS:
        head = re.match(prefix, key)
        if head is None:
            continue
        rest = key[head.end():]
        for pattern, replacement in renames:
            renamed = re.sub(f"^{pattern}", replacement, rest, count=1)
            if renamed != rest:
                rest = renamed
                break
        return (head.group(0) if new_prefix is None else head.expand(new_prefix)) + rest, True
    return key, False


def _attention_rule(key: str) -> tuple[str, str, str] | None:
    """``(attention prefix, its layout-2 parameter name, how)`` for a layout-1 attention parameter, else None."""
    found = re.fullmatch(r"(.*\.(?:attn|cross_attn)\.)([^.]+(?:\.[^.]+)?)", key)
    if found is None:
        return None
    for pattern, replacement, how in ATTENTION:
        if re.fullmatch(pattern, found.group(2)):
            return found.group(1), re.sub(f"^{pattern}$", replacement, found.group(2)), how
    return None


def upgrade_state_dict(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A layout-1 model state dict in layout 2 (module docstring); a layout-2 state dict is returned as it is."""
    out: dict[str, Tensor] = {}
    halves: dict[str, dict[str, Tensor]] = {}
    for key, value in state.items():
        new, in_layer = _rename_layer(key)
        rule = _attention_rule(new) if in_layer else None
        if rule is None:
            out[new] = value.squeeze(0) if key == _LATENTS and value.ndim == 3 else value
            continue
        base, name, how = rule
        if how == "rename":
            out[base + name] = value
        elif how == "split":
            third = value.shape[0] // 3
            out[f"{base}q.{name}"], out[f"{base}kv.{name}"] = value[:third], value[third:]
        else:
            halves.setdefault(base + name, {})[how] = value
    for key, parts in halves.items():
        out[key] = torch.cat([parts["k"], parts["v"]])
    return out
