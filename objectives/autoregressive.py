"""Prefix language modelling / captioning (SimVLM, Wang et al. 2022; CoCa's captioning loss, Yu et al. 2022).

A decoder owned by the objective reads the sequence ``[c_1..c_T, x_1..x_L]``: the context modality's token states
``c`` (``outputs.tokens[context]``, projected to the decoder width, plus a type embedding) followed by the target
text's token embeddings (own embedding table of ``spec.vocab_sizes[target]`` rows, learned positions, type
embedding). The prefix is the context plus the first ``P`` text tokens (``prefix_text_len``; with
``random_prefix`` each row draws ``P`` uniformly from ``0..prefix_text_len``, SimVLM's random split). Attention:
query ``i`` may attend key ``j`` iff ``j`` is a real token and (``j`` is in the prefix, or both are text with
``pos(j) <= pos(i)``) — bidirectional within the prefix, causal over the rest — plus always itself. The loss is
the next-token cross-entropy over the non-prefix text positions::

    L = 1/|S| Σ_{(b,t) ∈ S} -log softmax(W h_{b,t-1})[x_{b,t}],   S = {(b,t): t >= max(P_b, 1), x_{b,t} not pad,
                                                                         context and text present in row b}

with ``h`` the final-layer text states (the model's pre-norm blocks, ``spec.block``, then a final LayerNorm) and
``W`` a linear head (or the embedding table when ``tie_embeddings``). ``|S|`` is counted over all ranks
(`objectives.masking.global_mean`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmssl.objectives.base import (
    BlockFactory,
    LossOutput,
    ModelOutputs,
    ModelSpec,
    Objective,
    ObjectiveError,
    Requirements,
    decoder_blocks,
)
from mmssl.objectives.ids import to_device
from mmssl.objectives.masking import global_mean, presence, row_generators, upcast


class TokenEmbedding(nn.Module):
    """Embedding table that can also un-embed (tied output head); both go through ``__call__`` (ZeRO-3 hooks)."""

    def __init__(self, vocab_size: int, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(vocab_size, width) * 0.02)

    def forward(self, x: Tensor, unembed: bool = False) -> Tensor:
        return x @ self.weight.T if unembed else F.embedding(x, self.weight)


def prefix_lm_attention(context_mask: Tensor, text_mask: Tensor, prefix_len: Tensor | int) -> Tensor:
    """``bool[B, T+L, T+L]``: the prefix-LM attention pattern of the module docstring."""
    b, t = context_mask.shape
    n = text_mask.shape[1]
    device = text_mask.device
    prefix = torch.as_tensor(prefix_len, device=device).expand(b)
    pos = torch.cat([torch.full((t,), -1, device=device), torch.arange(n, device=device)])
    in_prefix = torch.cat([torch.ones(b, t, dtype=torch.bool, device=device),
                           torch.arange(n, device=device)[None] < prefix[:, None]], dim=1)
    real = torch.cat([context_mask.bool(), text_mask.bool()], dim=1)
    causal = pos[None, :] <= pos[:, None]
    allowed = real[:, None, :] & (in_prefix[:, None, :] | causal[None])
    return allowed | torch.eye(t + n, dtype=torch.bool, device=device)[None]


class PrefixLMDecoder(nn.Module):
    """Context projection, text embeddings, ``depth`` blocks of ``block`` (the model's ``spec.block``) under the
    prefix-LM pattern, final LayerNorm and output head (module docstring)."""

    def __init__(self, context_dim: int, vocab_size: int, *, block: BlockFactory, width: int = 256,
                 depth: int = 2, heads: int = 4, mlp_ratio: float = 4.0, max_len: int = 512,
                 tie_embeddings: bool = False) -> None:
        super().__init__()
        self.context_proj = nn.Linear(context_dim, width)
        self.tokens = TokenEmbedding(vocab_size, width)
        self.pos = nn.Parameter(torch.randn(max_len, width) * 0.02)
        self.type_embed = nn.Parameter(torch.randn(2, width) * 0.02)  # 0: context, 1: text
        self.blocks = decoder_blocks(block, depth, width, heads, mlp_ratio)
        self.norm = nn.LayerNorm(width)
        self.head = None if tie_embeddings else nn.Linear(width, vocab_size)

    def forward(self, context: Tensor, context_mask: Tensor, ids: Tensor, text_mask: Tensor,
                prefix_len: Tensor | int) -> Tensor:
        """Logits ``[B, L, V]``; position ``t`` predicts text token ``t + 1``."""
        n = ids.shape[1]
        if n > self.pos.shape[0]:
            raise ObjectiveError(f"text of {n} tokens is longer than the decoder's max_len={self.pos.shape[0]}")
        ctx = self.context_proj(context) + self.type_embed[0]
        txt = self.tokens(ids) + self.pos[:n] + self.type_embed[1]
        x = torch.cat([ctx.to(txt.dtype), txt], dim=1)
        allowed = prefix_lm_attention(context_mask, text_mask, prefix_len)
        for block in self.blocks:
            x = block(x, allowed=allowed)
        h = self.norm(x[:, context.shape[1]:])
        return self.tokens(h, unembed=True) if self.head is None else self.head(h)


def prefix_lm_loss(logits: Tensor, ids: Tensor, text_mask: Tensor, prefix_len: Tensor | int, *,
                   valid: Tensor | None = None, global_norm: bool = True) -> tuple[Tensor, dict[str, Tensor]]:
    """Next-token cross-entropy over the non-prefix real text positions of valid rows (module docstring)."""
    b, n = ids.shape
    prefix = torch.as_tensor(prefix_len, device=ids.device).expand(b)
    t = torch.arange(1, n, device=ids.device)
    sel = text_mask[:, 1:].bool() & (t[None] >= prefix[:, None])
    if valid is not None:
        sel = sel & valid[:, None]
    pred, target = upcast(logits[:, :-1][sel]), ids[:, 1:][sel]
    nll = F.cross_entropy(pred, target, reduction="sum")
    loss = global_mean(nll, sel.sum(), global_norm)
    with torch.no_grad():
        count = sel.sum().clamp_min(1)
        metrics = {"acc": (pred.argmax(-1) == target).sum() / count, "ppl": (nll.detach() / count).exp(),
                   "tokens": sel.sum().float()}
    return loss, metrics


@dataclass
class PrefixLMConfig:
    """``objectives.prefix_lm`` in a recipe."""

    weight: float = 1.0
    context: str = "audio"
    target: str = "text"
    width: int = 256
    depth: int = 2
    heads: int = 4
    prefix_text_len: int = 0
    tie_embeddings: bool = False
    random_prefix: bool = False  # per row, P uniform in 0..prefix_text_len (SimVLM's random split)
    mlp_ratio: float = 4.0
    max_len: int = 512  # learned text positions
    seed: int = 0
    global_norm: bool = True


class PrefixLMObjective(Objective):
    def __init__(self, cfg: PrefixLMConfig, spec: ModelSpec) -> None:
        super().__init__()
        if cfg.target not in spec.vocab_sizes:
            raise ObjectiveError(f"target={cfg.target!r} is not a token-id modality (have: {sorted(spec.vocab_sizes)})")
        if cfg.context not in spec.token_dims:
            raise ObjectiveError(f"context={cfg.context!r} names no tower (towers: {sorted(spec.token_dims)})")
        if cfg.context == cfg.target:
            raise ObjectiveError(f"context and target must differ, both are {cfg.context!r}")
        for name in ("width", "depth", "heads", "max_len"):
            if getattr(cfg, name) < 1:
                raise ObjectiveError(f"{name} must be >= 1, got {getattr(cfg, name)}")
        if cfg.prefix_text_len < 0:
            raise ObjectiveError(f"prefix_text_len must be >= 0, got {cfg.prefix_text_len}")
        self.cfg = cfg
        self.decoder = PrefixLMDecoder(spec.token_dims[cfg.context], spec.vocab_sizes[cfg.target], block=spec.block,
                                       width=cfg.width, depth=cfg.depth, heads=cfg.heads, mlp_ratio=cfg.mlp_ratio,
                                       max_len=cfg.max_len, tie_embeddings=cfg.tie_embeddings)
        self.requires = Requirements(modalities=(cfg.context, cfg.target), needs_decoder=True,
                                     gathers_across_ranks=cfg.global_norm)

    @classmethod
    def from_config(cls, cfg: PrefixLMConfig, spec: ModelSpec | None = None) -> PrefixLMObjective:
        if spec is None:
            raise ObjectiveError("prefix_lm needs the model spec (vocabulary and token widths)")
        return cls(cfg, spec)

    def no_weight_decay(self) -> set[str]:
        return {"decoder.pos", "decoder.type_embed"}

    def prefix_lengths(self, batch: Any, rows: int) -> Tensor:
        """``[B]`` text-prefix lengths: ``prefix_text_len``, or per row uniform in ``0..prefix_text_len``."""
        if not self.cfg.random_prefix:
            return torch.full((rows,), self.cfg.prefix_text_len, dtype=torch.long)
        keys = list(getattr(batch, "keys", None) or [str(i) for i in range(rows)])
        gens = row_generators(self.cfg.seed, keys, int(getattr(batch, "index", 0)))
        return torch.stack([torch.randint(self.cfg.prefix_text_len + 1, (), generator=g) for g in gens])

    def forward(self, outputs: ModelOutputs, batch: Any = None, model: Any = None) -> LossOutput:
        c, m = self.cfg.context, self.cfg.target
        if batch is None:
            raise ObjectiveError("prefix_lm needs the batch (the target token ids)")
        text = batch.inputs[m]
        ids, text_mask = text["input_ids"], text["attention_mask"].bool()
        context = outputs.tokens[c]
        context_mask = outputs.token_mask.get(c)
        if context_mask is None:
            context_mask = torch.ones(context.shape[:2], dtype=torch.bool, device=context.device)
        prefix = to_device(self.prefix_lengths(batch, ids.shape[0]), ids.device)
        rows, device = ids.shape[0], ids.device
        valid = presence(outputs, batch, c, rows, device) & presence(outputs, batch, m, rows, device)
        logits = self.decoder(context, context_mask, ids, text_mask, prefix)
        loss, metrics = prefix_lm_loss(logits, ids, text_mask, prefix, valid=valid, global_norm=self.cfg.global_norm)
        return LossOutput(loss=loss, terms={"nll": loss.detach()}, metrics=metrics)
