"""Token embedders: a modality's input -> a sequence of ``width``-wide tokens with positional encoding.

The unified (early-fusion) encoder and the Perceiver bottleneck read every modality through one of these, then add
a modality-type embedding and run one shared transformer (VATT, Akbari et al. 2021; HighMMT, Liang et al. 2022).
Each modality plug-in builds its own (`ModalityPlugin.build_embedder`); the contract is `TokenEmbedder`:

    forward(x) -> EmbeddedTokens(tokens [B, T, width], mask bool[B, T])      mask: True where a token is real

Positions are learned (``[1, T_max, width]``, truncated-normal 0.02 init, as ViT/BERT) and added here; the
type embedding is not (it belongs to the model that mixes modalities).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from mmssl.architectures.errors import ArchitectureError


class EmbeddedTokens(NamedTuple):
    tokens: Tensor  # [B, T, width], positional encoding added
    mask: Tensor  # bool [B, T], True where the token is real (not padding)


class TokenEmbedder(nn.Module):
    """Base class of the contract above. ``max_tokens`` bounds ``T`` (the positional table's length)."""

    width: int
    max_tokens: int

    def forward(self, x: Any) -> EmbeddedTokens:
        raise NotImplementedError

    def no_weight_decay(self) -> set[str]:
        return {n for n, _ in self.named_parameters() if n.endswith("pos_embed")}


def learned_positions(length: int, width: int) -> nn.Parameter:
    return nn.Parameter(nn.init.trunc_normal_(torch.empty(1, length, width), std=0.02))


class PatchEmbedder(TokenEmbedder):
    """``[B, C, H, W]`` (an image, or a log-mel spectrogram as a 1-channel image) -> non-overlapping patches,
    each linearly projected (a stride-``patch`` convolution, as ViT's patch embedding) plus a learned position."""

    def __init__(self, in_chans: int, size: tuple[int, int], patch: tuple[int, int], width: int) -> None:
        super().__init__()
        if size[0] % patch[0] or size[1] % patch[1]:
            raise ArchitectureError(f"input size {list(size)} is not divisible by patch size {list(patch)}")
        self.in_chans, self.size, self.patch, self.width = in_chans, tuple(size), tuple(patch), width
        self.grid = (size[0] // patch[0], size[1] // patch[1])
        self.max_tokens = self.grid[0] * self.grid[1]
        self.proj = nn.Conv2d(in_chans, width, kernel_size=self.patch, stride=self.patch)
        self.pos_embed = learned_positions(self.max_tokens, width)

    def forward(self, x: Tensor) -> EmbeddedTokens:
        if tuple(x.shape[1:]) != (self.in_chans, *self.size):
            raise ArchitectureError(f"patch embedder expects [B, {self.in_chans}, {self.size[0]}, {self.size[1]}], "
                                    f"got {list(x.shape)}")
        tokens = self.proj(x).flatten(2).transpose(1, 2) + self.pos_embed
        return EmbeddedTokens(tokens, torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device))


class TokenIdEmbedder(TokenEmbedder):
    """``{"input_ids": [B, L], "attention_mask": [B, L]}`` -> an embedding table lookup plus a learned position;
    the mask is the attention mask (padding is not a token)."""

    def __init__(self, vocab_size: int, max_len: int, width: int, pad_id: int = 0) -> None:
        super().__init__()
        self.width, self.max_tokens, self.vocab_size = width, max_len, vocab_size
        self.embed = nn.Embedding(vocab_size, width, padding_idx=pad_id)
        nn.init.trunc_normal_(self.embed.weight, std=0.02)
        self.pos_embed = learned_positions(max_len, width)

    def forward(self, x: dict[str, Tensor]) -> EmbeddedTokens:
        ids = x["input_ids"]
        if ids.shape[1] > self.max_tokens:
            raise ArchitectureError(f"text of {ids.shape[1]} tokens is longer than max_len={self.max_tokens}")
        tokens = self.embed(ids) + self.pos_embed[:, : ids.shape[1]]
        return EmbeddedTokens(tokens, x["attention_mask"].bool())
