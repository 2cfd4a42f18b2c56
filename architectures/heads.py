"""Projection heads from a tower's pooled features into the shared embedding space."""

from __future__ import annotations

from torch import Tensor, nn

from mmssl.architectures.towers import ArchitectureError

HEAD_KINDS = ("linear", "mlp")


class ProjectionHead(nn.Module):
    """``linear``: ``W x`` without bias (CLIP); ``mlp``: ``W2 GELU(W1 x + b1)`` with a hidden width of ``in_dim``
    (SimCLR / SLIP style)."""

    def __init__(self, in_dim: int, out_dim: int, kind: str = "linear") -> None:
        super().__init__()
        if kind not in HEAD_KINDS:
            raise ArchitectureError(f"model.head must be one of {HEAD_KINDS}, got {kind!r}")
        self.kind = kind
        if kind == "linear":
            self.proj = nn.Linear(in_dim, out_dim, bias=False)
            nn.init.normal_(self.proj.weight, std=in_dim**-0.5)
        else:
            self.proj = nn.Sequential(nn.Linear(in_dim, in_dim), nn.GELU(), nn.Linear(in_dim, out_dim, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)
