"""Gradient accumulation that keeps every negative: the gradient cache (Gao et al. 2021, "Scaling Deep Contrastive
Learning Batch Size under Memory Limited Setup"; open_clip's ``accum_freq`` is the same idea).

Naive accumulation over k micro-batches optimises the mean of k small-batch losses, so a contrastive or matching
loss only ever sees the negatives of one micro-batch. Here one optimizer step over micro-batches ``x_1..x_k`` is:

1. **Cache.** ``r_j = f_θ(x_j)`` for every micro-batch without gradient (every tensor of the model's outputs:
   embeddings, pooled features, tokens, fused states), remembering the RNG state before each forward.
2. **Loss on the whole accumulated batch.** ``L = Σ_i w_i L_i(cat_j r_j)`` with the cached outputs as leaves;
   one backward gives ``∂L/∂r_j`` for every micro-batch and the full gradient of every parameter the loss itself
   uses (temperatures, matching heads, the fusion module when an objective calls it, predictors).
3. **Re-forward each micro-batch with gradient** under its saved RNG state (same dropout masks), and back-propagate
   the surrogate ``Σ <f_θ(x_j), ∂L/∂r_j>``, whose gradient w.r.t. θ is exactly the chain-rule contribution of
   ``x_j`` to ``∂L/∂θ``.

The summed gradient equals the gradient of the loss of one batch of ``k×`` the size (up to float rounding), with
peak activation memory of one micro-batch for the towers. Objectives that make extra forwards of their own
(masked views, a momentum teacher) run them on the whole accumulated batch in step 2, and towers with batch
statistics (BatchNorm) see micro-batch statistics, which no accumulation scheme can avoid.

With DeepSpeed the k+1 backward passes accumulate into the engine's gradient buffers with ``scale_wrt_gas=False``
and the engine steps at the last micro-batch (its accumulation boundary), so ZeRO's reduction and clipping see the
full gradient once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from mmssl.data_pipelines.batch import Batch, cat_batches
from mmssl.objectives.base import LossOutput

OUTPUT_FIELDS = ("embeddings", "pooled", "tokens", "fused")


def _rng_state() -> tuple[Tensor, Any]:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple[Tensor, Any]) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state_all(state[1])


def cached_leaves(outputs: list[Any]) -> Any:
    """The micro-batches' outputs concatenated row-wise, each floating tensor a fresh leaf requiring grad."""
    first = outputs[0]
    merged: dict[str, Any] = {}
    for name in first._fields:
        parts = [getattr(o, name) for o in outputs]
        merged[name] = {}
        for key in parts[0]:
            value = torch.cat([p[key] for p in parts])
            if name in OUTPUT_FIELDS and value.is_floating_point():
                value = value.detach().requires_grad_(True)
            merged[name][key] = value
    return type(first)(**merged)


def _surrogate(live: Any, grads: dict[tuple[str, str], Tensor]) -> Tensor:
    """``Σ <live, g>`` over every output tensor the loss depended on (a zero, still connected, when none did)."""
    total: Tensor | None = None
    for (field, key), g in grads.items():
        term = (getattr(live, field)[key].float() * g.float()).sum()
        total = term if total is None else total + term
    if total is None:
        total = sum((t.sum() * 0.0 for t in live.embeddings.values()), torch.zeros(()))
    return total


def cached_accumulation_step(engine: Any, batches: list[Batch],
                             proceed: Callable[[LossOutput], bool] | None = None) -> LossOutput:
    """One optimizer step over ``batches`` (this rank's micro-batches) with the gradient cache; returns the loss of
    the whole accumulated batch. ``engine.module`` is a `PretrainTask`. ``proceed(loss)`` is asked once the loss
    of the whole accumulated batch is known and before any backward: False skips this step's backward passes and
    update entirely (the trainer's non-finite guard; every rank must give the same answer)."""
    task = engine.module
    states, cached = [], []
    with torch.no_grad(), task.attention_scope():
        for batch in batches:
            states.append(_rng_state())
            cached.append(task.model(batch.inputs, batch.present))
    leaves = cached_leaves(cached)
    # the leaves by reference: under ZeRO-3 DeepSpeed's module hooks replace the dicts' tensors in place
    held = {(field, key): leaf for field in OUTPUT_FIELDS for key, leaf in getattr(leaves, field).items()}
    with task.attention_scope():
        result: LossOutput = task.loss(leaves, cat_batches(batches))
    if proceed is not None and not proceed(result):
        return result
    engine.backward(result.loss, scale_wrt_gas=False)
    rows = [len(b) for b in batches]
    grads: list[dict[tuple[str, str], Tensor]] = [{} for _ in batches]
    for (field, key), leaf in held.items():
        if leaf.grad is None:
            continue
        for j, part in enumerate(leaf.grad.split(rows)):
            grads[j][(field, key)] = part
    after = _rng_state()
    for j, batch in enumerate(batches):
        _set_rng_state(states[j])
        live = engine(batch, mode="outputs")
        engine.backward(_surrogate(live, grads[j]), scale_wrt_gas=False)
        engine.step()
    _set_rng_state(after)
    return result
