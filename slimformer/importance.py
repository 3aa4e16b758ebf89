"""Importance of attention heads and FFN neurons, and the choice of what to keep.

Scorers share one signature, ``scorer(model, units, data) -> Tensor``: a ``(layers, units)`` tensor,
higher = more important. Layers that were already pruned to fewer units are padded with NaN (so pruned
models can be scored again in iterative pruning); a layer with no units left is all NaN.

* ``magnitude``: L2 norm of the unit's weights (q/k/v rows and output-projection columns of a head; the
  FFN input rows and output column of a neuron). Needs no data. With grouped-query attention a query head
  counts its q rows, its output columns and an equal share of its group's k/v rows.
* ``taylor``: first-order Taylor estimate of the loss change when the unit is removed,
  ``|sum_t a_t * dL/da_t|`` per example (a = the head's context vector / the neuron's activation, i.e.
  the input of the output projection), summed over examples (Molchanov et al. 2017; for heads it equals
  the head-mask gradient of Michel et al. 2019).

:func:`select_keep` turns scores into kept indices for a target ratio, per layer or globally, with kept
sizes rounded to multiples that fast kernels like.

Heads are always scored per query head, the unit ``mask_heads`` and the plan use. Grouped-query attention
(Llama) can only remove whole key/value groups, so :func:`select_keep_groups` ranks groups by the *sum* of
their query heads' scores (the first-order estimate of removing them all together) and expands the kept
groups back into query heads.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from enum import StrEnum
from typing import Any

import torch
from torch import nn

from slimformer.arch import adapter_for
from slimformer.errors import SlimformerError
from slimformer.surgery import attention_weights, head_count, neuron_count, weight_out_in
from slimformer.tasks import Collator, TaskData, encode


class Unit(StrEnum):
    HEADS = "heads"
    NEURONS = "neurons"


class Scope(StrEnum):
    GLOBAL = "global"  # rank all units of all layers together (layers may end up with different sizes)
    PER_LAYER = "per-layer"  # remove the same fraction from every layer


Batch = Mapping[str, torch.Tensor]
Scorer = Callable[[nn.Module, Unit, Iterable[Batch] | None], torch.Tensor]


def pad_scores(per_layer: Sequence[torch.Tensor]) -> torch.Tensor:
    """Stack per-layer score vectors of different lengths into ``(layers, max)``, NaN-padded."""
    width = max((len(s) for s in per_layer), default=0)
    out = torch.full((len(per_layer), width), float("nan"))
    for i, s in enumerate(per_layer):
        out[i, : len(s)] = s.detach().float().cpu()
    return out


def unit_counts(model: nn.Module, units: Unit | str) -> list[int]:
    """Current number of heads (or FFN neurons) of every layer."""
    adapter = adapter_for(model)
    d = adapter.head_dim(model.config)
    layers = adapter.get_layers(model)
    if Unit(units) == Unit.HEADS:
        return [head_count(layer, adapter, d) for layer in layers]
    return [neuron_count(layer, adapter) for layer in layers]


# --------------------------------------------------------------------------------------------------
# Scorers
# --------------------------------------------------------------------------------------------------


def magnitude(model: nn.Module, units: Unit | str, data: Iterable[Batch] | None = None) -> torch.Tensor:
    """L2 norm of each head's / neuron's weights. ``data`` is ignored."""
    units = Unit(units)
    adapter = adapter_for(model)
    d = adapter.head_dim(model.config)
    scores = []
    with torch.no_grad():
        for layer, n in zip(adapter.get_layers(model), unit_counts(model, units), strict=True):
            if n == 0:
                scores.append(torch.empty(0))
                continue
            if units == Unit.HEADS:
                q, k, v, o = (w.float().pow(2) for w in attention_weights(layer, adapter))
                n_kv = k.shape[0] // d
                sq = q.reshape(n, d, -1).sum((1, 2)) + o.reshape(-1, n, d).sum((0, 2))
                # A key/value head serves a group of query heads: each gets an equal share of its weights.
                kv = (k.reshape(n_kv, d, -1).sum((1, 2)) + v.reshape(n_kv, d, -1).sum((1, 2))) * (n_kv / n)
                sq = sq + kv.repeat_interleave(n // n_kv)
            else:
                sq = sum(weight_out_in(layer.get_submodule(p)).float().pow(2).sum(1) for p in adapter.ffn_in)
                sq = sq + weight_out_in(layer.get_submodule(adapter.ffn_out)).float().pow(2).sum(0)
            scores.append(sq.sqrt())
    return pad_scores(scores)


def taylor_scores(model: nn.Module, data: Iterable[Batch], units: Sequence[Unit | str] = (Unit.HEADS, Unit.NEURONS)
                  ) -> dict[Unit, torch.Tensor]:
    """Taylor importance of heads and/or neurons in one pass over ``data`` (batches with ``labels``).

    Gradients are taken with respect to the captured activations only (``torch.autograd.grad``), so the
    model's parameter gradients are left untouched."""
    units = [Unit(u) for u in units]
    adapter = adapter_for(model)
    d = adapter.head_dim(model.config)
    layers = adapter.get_layers(model)
    counts = {u: unit_counts(model, u) for u in units}
    acc = {u: [torch.zeros(n, dtype=torch.float64) for n in counts[u]] for u in units}
    captured: list[tuple[Unit, int, torch.Tensor]] = []

    def capture(unit: Unit, i: int):
        def hook(module: nn.Module, args: tuple) -> None:
            if args[0].requires_grad:
                captured.append((unit, i, args[0]))
        return hook

    handles = []
    for i, layer in enumerate(layers):
        if Unit.HEADS in units and counts[Unit.HEADS][i]:
            handles.append(layer.get_submodule(adapter.attn_out).register_forward_pre_hook(capture(Unit.HEADS, i)))
        if Unit.NEURONS in units and counts[Unit.NEURONS][i]:
            handles.append(layer.get_submodule(adapter.ffn_out).register_forward_pre_hook(capture(Unit.NEURONS, i)))
    was_training = model.training
    model.eval()  # no dropout: score the model as it will run
    n_batches = 0
    try:
        for batch in data:
            if "labels" not in batch:
                raise SlimformerError("Taylor importance needs labelled batches; use the task's training data")
            captured.clear()
            with torch.enable_grad():
                loss = model(**batch).loss
                if not captured:
                    raise SlimformerError("no activations need gradients (is the model frozen?); "
                                          "unfreeze it or use --importance magnitude")
                grads = torch.autograd.grad(loss, [a for _, _, a in captured], allow_unused=True)
            for (unit, i, a), g in zip(captured, grads, strict=True):
                if g is None:
                    continue
                prod = (a.detach().float() * g.float()).sum(1)  # (batch, features): sum over positions
                if unit == Unit.HEADS:
                    prod = prod.view(prod.shape[0], -1, d).sum(-1)
                acc[unit][i] += prod.abs().sum(0).double().cpu()
            n_batches += 1
    finally:
        for h in handles:
            h.remove()
        captured.clear()
        model.train(was_training)
    if n_batches == 0:
        raise SlimformerError("Taylor importance got no data; give training examples")
    return {u: pad_scores([a.float() for a in acc[u]]) for u in units}


def taylor(model: nn.Module, units: Unit | str, data: Iterable[Batch] | None) -> torch.Tensor:
    """First-order Taylor importance |activation x gradient| of heads or neurons over ``data``."""
    if data is None:
        raise SlimformerError("Taylor importance needs task data; give training examples or use magnitude")
    return taylor_scores(model, data, [units])[Unit(units)]


SCORERS: dict[str, Scorer] = {"magnitude": magnitude, "taylor": taylor}


def task_batches(tokenizer: Any, task: TaskData, *, split: str = "train", max_examples: int = 256,
                 batch_size: int = 32, max_length: int = 128, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Labelled batches of up to ``max_examples`` examples (a seeded sample) of a task split, encoded with
    the task's own features, for Taylor scoring."""
    examples = list(task.split(split))
    if not examples:
        raise SlimformerError(f"the {split} split is empty; importance scoring needs examples")
    if len(examples) > max_examples:
        examples = random.Random(seed).sample(examples, max_examples)
    feats = encode(task, examples, tokenizer, max_length=max_length)
    collate = Collator(tokenizer.pad_token_id)
    return [collate(feats[s:s + batch_size]) for s in range(0, len(feats), batch_size)]


# --------------------------------------------------------------------------------------------------
# From scores to kept units
# --------------------------------------------------------------------------------------------------


def unit_step(round_to: int, unit_width: int = 1) -> int:
    """How many units make a multiple of ``round_to`` features (a head is ``head_dim`` features wide)."""
    if round_to < 1:
        raise SlimformerError(f"round_to must be at least 1, got {round_to}; use 1, 8, 16 or 32")
    return round_to // math.gcd(round_to, unit_width)


def round_count(n: int, step: int, cap: int) -> int:
    """Round a kept count to the nearest multiple of ``step`` (a non-empty layer stays non-empty), but never
    above ``cap`` (the units the layer has)."""
    if n <= 0:
        return 0
    return min(cap, max(step, step * math.floor(n / step + 0.5)))


def check_ratio(ratio: float, what: str = "ratio") -> float:
    if not isinstance(ratio, (int, float)) or math.isnan(ratio) or not 0 <= ratio < 1:
        raise SlimformerError(f"{what} {ratio} is out of range; give a fraction to remove in [0, 1), e.g. 0.4")
    return float(ratio)


def target_counts(scores: torch.Tensor, ratio: float, original: Sequence[int], *, scope: Scope | str = Scope.GLOBAL,
                  step: int = 1, normalize: bool = True) -> list[int]:
    """How many units each layer keeps so that ``ratio`` of the ``original`` units are removed in total
    (per layer, or globally by score), each count rounded to a multiple of ``step``."""
    check_ratio(ratio)
    scope = Scope(scope)
    if scores.ndim != 2 or scores.shape[0] != len(original):
        raise SlimformerError(f"scores of shape {tuple(scores.shape)} do not match {len(original)} layers; "
                              "score the same model you prune")
    valid = ~torch.isnan(scores)
    current = valid.sum(1).tolist()
    if scope == Scope.PER_LAYER:
        return [round_count(math.floor((1 - ratio) * o + 0.5), step, c) for o, c in zip(original, current, strict=True)]
    total = min(sum(current), math.floor((1 - ratio) * sum(original) + 0.5))
    s = scores.clone().float()
    if normalize:
        # Layers score on different scales; compare units by their share of their layer (Michel et al. 2019).
        norms = torch.nan_to_num(s, nan=0.0).norm(dim=1, keepdim=True)
        s = s / torch.where(norms > 0, norms, torch.ones_like(norms))
    flat = torch.nan_to_num(s, nan=-math.inf).flatten()
    chosen = torch.topk(flat, total).indices if total > 0 else torch.empty(0, dtype=torch.long)
    per_layer = torch.bincount(chosen // scores.shape[1], minlength=len(original)).tolist()
    return [round_count(k, step, c) for k, c in zip(per_layer, current, strict=True)]


def select_keep(scores: torch.Tensor, ratio: float, original: Sequence[int], *, scope: Scope | str = Scope.GLOBAL,
                step: int = 1, normalize: bool = True) -> dict[int, list[int]]:
    """Indices (current positions) of the units to keep in each layer: the top-scoring ``target_counts``."""
    counts = target_counts(scores, ratio, original, scope=scope, step=step, normalize=normalize)
    keep: dict[int, list[int]] = {}
    for i, k in enumerate(counts):
        row = torch.nan_to_num(scores[i].float(), nan=-math.inf)
        keep[i] = sorted(torch.topk(row, k).indices.tolist()) if k > 0 else []
    return keep


def group_scores(scores: torch.Tensor, group: int) -> torch.Tensor:
    """Per-query-head scores ``(layers, heads)`` summed into key/value groups of ``group`` consecutive heads:
    ``(layers, heads // group)``. NaN padding (removed heads) stays NaN, as heads go in whole groups."""
    if group <= 1:
        return scores
    if scores.shape[1] % group:
        raise SlimformerError(f"{scores.shape[1]} head scores do not split into groups of {group}; "
                              "score the same model you prune")
    return scores.reshape(scores.shape[0], -1, group).sum(-1)


def select_keep_groups(scores: torch.Tensor, ratio: float, original: Sequence[int], *, group: int,
                       scope: Scope | str = Scope.GLOBAL, step: int = 1, normalize: bool = True
                       ) -> dict[int, list[int]]:
    """:func:`select_keep` for heads under grouped-query attention: whole key/value groups are ranked by
    their summed score and kept or removed together. ``original`` counts query heads per layer; ``step``
    counts groups. Returns kept query-head positions per layer (whole groups)."""
    if group <= 1:
        return select_keep(scores, ratio, original, scope=scope, step=step, normalize=normalize)
    kept = select_keep(group_scores(scores, group), ratio, [o // group for o in original], scope=scope, step=step,
                       normalize=normalize)
    return {i: [g * group + j for g in groups for j in range(group)] for i, groups in kept.items()}


__all__ = ["SCORERS", "Scope", "Unit", "check_ratio", "group_scores", "magnitude", "pad_scores", "round_count",
           "select_keep", "select_keep_groups", "target_counts", "task_batches", "taylor", "taylor_scores",
           "unit_counts", "unit_step"]
