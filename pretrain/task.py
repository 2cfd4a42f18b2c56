"""The trainable unit handed to DeepSpeed: a model plus its weighted objectives (the open_clip / timm "task").

``forward(batch)`` runs the model once and every objective on the same outputs, and returns a `LossOutput` whose
``loss`` is ``Σ_i w_i L_i``. Objective parameters (a learnable temperature, a matching head) live here, so the
engine optimises and checkpoints them with the model; export keeps only the model's encoders.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from torch import Tensor, nn
from torch.nn.attention import sdpa_kernel

from mmssl.data_pipelines.batch import Batch
from mmssl.objectives.base import LossOutput, ModelOutputs, Objective


class PretrainTask(nn.Module):
    def __init__(self, model: nn.Module, objectives: Mapping[str, Objective], weights: Mapping[str, float],
                 attention: Sequence[Any] | None = None) -> None:
        super().__init__()
        self.attention = list(attention) if attention else None  # `precision.attention_backends`
        self.model = model
        self.objectives = nn.ModuleDict(dict(objectives))
        self.weights = dict(weights)
        for objective in self.objectives.values():
            objective.bind(model)

    def forward(self, batch: Batch, mode: str = "loss") -> LossOutput | ModelOutputs:
        """``mode="loss"``: the weighted loss of the batch; ``"outputs"``: the model's outputs only (the gradient
        cache re-forwards micro-batches through the engine this way)."""
        with self.attention_scope():
            outputs = self.model(batch.inputs, batch.present)
            return outputs if mode == "outputs" else self.loss(outputs, batch)

    def attention_scope(self) -> AbstractContextManager[Any]:
        """The run's attention kernels (``train.attention_kernel``) for the towers and the objectives' decoders."""
        return sdpa_kernel(self.attention) if self.attention else nullcontext()

    def loss(self, outputs: ModelOutputs, batch: Batch) -> LossOutput:
        """``Σ_i w_i L_i(outputs, batch)``; each term and metric is logged under ``<objective>/<name>``."""
        total: Tensor | None = None
        terms: dict[str, Tensor] = {}
        metrics: dict[str, Tensor] = {}
        for name, objective in self.objectives.items():
            result = objective(outputs, batch, self.model)
            weighted = self.weights[name] * result.loss
            total = weighted if total is None else total + weighted
            terms[name] = result.loss.detach()
            terms.update({f"{name}/{k}": v for k, v in result.terms.items()})
            metrics.update({f"{name}/{k}": v for k, v in result.metrics.items()})
        assert total is not None, "PretrainTask needs at least one objective"
        return LossOutput(loss=total, terms=terms, metrics=metrics)

    def no_weight_decay(self) -> set[str]:
        names = {f"model.{n}" for n in getattr(self.model, "no_weight_decay", set)()}
        for oname, objective in self.objectives.items():
            names |= {f"objectives.{oname}.{n}" for n in getattr(objective, "no_weight_decay", set)()}
        return names
