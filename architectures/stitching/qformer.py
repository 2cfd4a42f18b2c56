"""Q-Former (BLIP-2, Li et al. 2023): learned queries that read a frozen image encoder.

``n`` learned queries ``Q_0`` (``[n, d_q]``, normal(0, 0.02) init as BERT's) pass through ``depth`` pre-norm layers
(`architectures.layers.blocks.Block`) of::

    Q = Q + SelfAttn(LN(Q))                          (queries attend to each other)
    Q = Q + CrossAttn(LN(Q), LN(V))                  (keys/values: the frozen vision tokens V, width D_v;
                                                      every ``cross_every``-th layer, BLIP-2 uses 2)
    Q = Q + FFN(LN(Q))                               (FFN = W2 GELU(W1 x + b1) + b2)

then a final LN, giving the query outputs ``Z`` ``[B, n, d_q]`` (pre-norm; BLIP-2's Q-Former is a post-norm BERT).

* Stage 1 (representation learning): ``Z`` is the bridge's token output; the stitched model's image embedding is
  a trainable head over ``mean_i Z_i`` (BLIP-2 contrasts each query with the text and takes the best; the mean
  keeps the embedding a single vector), contrasted with the text side.
* Stage 2 (generative): ``P = Z W_lm + b`` (``[B, n, d]``, ``d`` = the LM's input-embedding width) are soft prompts
  prepended to the frozen LM's input, trained with the captioning loss.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from mmssl.architectures.errors import ArchitectureError
from mmssl.architectures.layers.blocks import Block
from mmssl.architectures.stitching.bridges import Bridge, BridgeOutput, check_positive


class QFormer(Bridge):
    """See the module docstring. ``tokens`` of the output are the query outputs ``Z`` (``width`` = ``d_q``);
    ``prompts`` their projection into the LM's input space."""

    kind = "qformer"

    def __init__(self, vision_dim: int, lm_dim: int, *, num_queries: int = 32, width: int = 256, depth: int = 2,
                 heads: int = 4, mlp_ratio: float = 4.0, cross_every: int = 1) -> None:
        super().__init__()
        if width % heads:
            raise ArchitectureError(f"model.stitched.options.width={width} must be divisible by "
                                    f"model.stitched.options.heads={heads}")
        self.vision_dim, self.lm_dim = check_positive("vision_dim", vision_dim), check_positive("lm_dim", lm_dim)
        self.width, self.num_queries = check_positive("width", width), check_positive("num_queries", num_queries)
        every = check_positive("cross_every", cross_every)
        self.queries = nn.Parameter(torch.randn(num_queries, width) * 0.02)
        self.layers = nn.ModuleList(Block(width, heads, mlp_ratio, context_dim=vision_dim if i % every == 0 else None)
                                    for i in range(check_positive("depth", depth)))
        self.norm = nn.LayerNorm(width)
        self.to_lm = nn.Linear(width, lm_dim)
        self.grad_checkpointing = False

    def forward(self, tokens: Tensor, pooled: Tensor) -> BridgeOutput:
        q = self.queries.to(tokens.dtype).expand(tokens.shape[0], -1, -1)
        for layer in self.layers:
            vision = tokens if layer.cross_attn is not None else None  # every cross_every-th layer reads the image
            if self.grad_checkpointing and torch.is_grad_enabled():
                q = checkpoint(layer, q, context=vision, use_reentrant=False)
            else:
                q = layer(q, context=vision)
        z = self.norm(q)
        return BridgeOutput(z, self.to_lm(z))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def no_weight_decay(self) -> set[str]:
        return {"queries"}
