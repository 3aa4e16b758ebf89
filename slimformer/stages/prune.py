"""Pruning: remove heads, FFN neurons, layers and vocabulary physically; optionally zero single weights.

Order of work, and why:

1. vocabulary (lossless on the corpus it is cut for, and done before the KD teacher is copied, so the
   teacher reads the same token ids as the student);
2. layers (``drop_layers`` or ``keep_layers``: keep the bottom N, since dropping top layers hurts least
   after recovery, Sajjad et al. 2023);
3. heads and FFN neurons in ``steps`` rounds: round k removes up to ``k/steps`` of the original units,
   scored again on the current model (magnitude or Taylor), then recovers. Under grouped-query attention
   (Llama) whole key/value groups are ranked by their query heads' summed scores and removed together;
   for a causal LM, Taylor scores use the LM loss on the training text (labels = input ids);
4. unstructured magnitude pruning with ``torch.nn.utils.prune`` at ``k/steps`` of the target sparsity in
   round k, made permanent at once; during recovery the zeroed weights get zero gradients, so they stay zero.

Recovery after each round: none, fine-tuning (:func:`slimformer.stages.finetune.train`) or knowledge
distillation from the unpruned model (``slimformer.stages.distill.distill_train``).
"""

from __future__ import annotations

import copy
import time
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from slimformer import models
from slimformer.arch import adapter_for
from slimformer.errors import SlimformerError
from slimformer.importance import (
    Scope,
    Unit,
    magnitude,
    select_keep,
    select_keep_groups,
    task_batches,
    taylor_scores,
    unit_step,
)
from slimformer.models import SlimModel, count_parameters
from slimformer.stages.finetune import TrainConfig, clean_work_dir, restore_plain_forward, train
from slimformer.surgery import (
    SurgeryPlan,
    corpus_token_ids,
    keep_layers,
    plan_of,
    prune_heads,
    prune_neurons,
    prune_vocab,
    set_plan,
)
from slimformer.tasks import TaskData, TaskType
from slimformer.vocab import fallback_token_ids


class Importance(StrEnum):
    MAGNITUDE = "magnitude"
    TAYLOR = "taylor"


class Recovery(StrEnum):
    NONE = "none"
    FINETUNE = "finetune"
    KD = "kd"


class PruneConfig(TrainConfig):
    """Prune a model structurally (and optionally unstructured), with recovery training after each round.

    The training-loop fields (learning rate, epochs, ...) are those of the recovery training."""

    kind: Literal["prune"] = Field("prune", description="stage type, names this stage in a recipe")
    heads: float = Field(0.0, ge=0, lt=1, description="fraction of all attention heads to remove")
    ffn: float = Field(0.0, ge=0, lt=1, description="fraction of all FFN neurons to remove")
    drop_layers: tuple[int, ...] = Field((), description="indices of whole layers to remove")
    keep_layers: int | None = Field(None, ge=1, le=1024,
                                    description="keep only the bottom N layers (drop the top ones)")
    vocab: bool = Field(False, description="keep only the tokens the training data (or vocab_corpus) uses, "
                                           "plus special tokens; others read as [UNK]")
    vocab_corpus: str | None = Field(None, description="plain-text file, one text per line, whose tokens define "
                                                       "the kept vocabulary (default: train + tuning splits)")
    importance: Importance = Field(Importance.TAYLOR, description="how heads and neurons are scored")
    importance_examples: int = Field(256, ge=1, le=1_000_000,
                                     description="training examples used for Taylor scores")
    scope: Scope = Field(Scope.GLOBAL, description="rank units across all layers (global) or within each layer")
    round_to: Literal[1, 8, 16, 32] = Field(1, description="round kept widths (heads x head_dim, FFN size) to "
                                                           "multiples of this many features")
    steps: int = Field(1, ge=1, le=50, description="pruning rounds, each followed by recovery")
    recover: Recovery = Field(Recovery.NONE, description="recovery training after each round")
    unstructured: float = Field(0.0, ge=0, lt=1, description="fraction of the transformer blocks' Linear "
                                                             "weights to zero by magnitude")
    unstructured_scope: Scope = Field(Scope.GLOBAL, description="unstructured threshold across all blocks "
                                                                "(global) or per Linear layer")
    epochs: float = Field(1.0, gt=0, le=100, description="recovery passes over the training data, per round")
    kd_alpha: float = Field(0.5, ge=0, le=1, description="KD recovery: weight of the hard-label loss "
                                                          "(the rest goes to the teacher's soft targets)")
    kd_temperature: float = Field(2.0, gt=0, le=100, description="KD recovery: softmax temperature")
    kd_augment: int = Field(0, ge=0, le=50, description="KD recovery: unlabeled augmented copies of each training "
                                                        "text, learnt from the teacher's soft targets only")
    kd_cache_teacher: bool = Field(False, description="KD recovery: compute the teacher's logits once per round "
                                                      "and reuse them across epochs")

    @model_validator(mode="after")
    def _layers(self) -> PruneConfig:
        if self.drop_layers and self.keep_layers is not None:
            raise ValueError("give drop_layers or keep_layers, not both")
        if any(i < 0 for i in self.drop_layers) or len(set(self.drop_layers)) != len(self.drop_layers):
            raise ValueError("drop_layers must be distinct non-negative layer indices")
        return self

    def prunes_anything(self) -> bool:
        return bool(self.heads or self.ffn or self.drop_layers or self.keep_layers is not None or self.vocab
                    or self.unstructured)


# --------------------------------------------------------------------------------------------------
# Unstructured pruning
# --------------------------------------------------------------------------------------------------


def block_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The Linear layers inside the transformer blocks (embeddings and the task head stay dense)."""
    layers = adapter_for(model).get_layers(model)
    return [(f"{i}.{name}", m) for i, layer in enumerate(layers) for name, m in layer.named_modules()
            if isinstance(m, nn.Linear) and m.weight.numel() > 0]


def prune_unstructured(model: nn.Module, ratio: float, scope: Scope | str = Scope.GLOBAL
                       ) -> dict[nn.Parameter, torch.Tensor]:
    """Zero the ``ratio`` smallest-magnitude weights of the blocks' Linear layers (globally or per layer)
    with ``torch.nn.utils.prune``, made permanent. Returns {weight: 0/1 mask} of what stays."""
    from torch.nn.utils import prune as tprune

    from slimformer.importance import check_ratio

    check_ratio(ratio, "unstructured ratio")
    linears = [m for _, m in block_linears(model)]
    if ratio == 0 or not linears:
        return {}
    if Scope(scope) == Scope.GLOBAL:
        tprune.global_unstructured([(m, "weight") for m in linears], pruning_method=tprune.L1Unstructured,
                                   amount=ratio)
    else:
        for m in linears:
            tprune.l1_unstructured(m, "weight", amount=ratio)
    masks = {}
    for m in linears:
        mask = m.weight_mask.detach().clone()
        tprune.remove(m, "weight")  # permanent: a plain weight with zeros, saved and loaded as usual
        masks[m.weight] = mask
    return masks


def sparsity(model: nn.Module) -> float:
    """Fraction of zero weights in the blocks' Linear layers."""
    linears = [m for _, m in block_linears(model)]
    total = sum(m.weight.numel() for m in linears)
    return float(sum(int((m.weight == 0).sum()) for m in linears) / max(1, total))


# --------------------------------------------------------------------------------------------------
# Recovery
# --------------------------------------------------------------------------------------------------


def recover(slim: SlimModel, task: TaskData, config: PruneConfig, work_dir: str | Path,
            teacher: nn.Module | None = None, *, layer_map: list[int] | None = None, progress: bool = True
            ) -> dict[str, Any]:
    """Recovery training of the pruned ``slim`` in place: fine-tuning, or KD from ``teacher`` (the model
    before pruning; ``layer_map[i]`` = the teacher layer that student layer ``i`` came from)."""
    try:
        return _recover(slim, task, config, work_dir, teacher, layer_map=layer_map, progress=progress)
    finally:
        restore_plain_forward(slim.model)  # also after a failed round


def _recover(slim: SlimModel, task: TaskData, config: PruneConfig, work_dir: str | Path, teacher: nn.Module | None,
             *, layer_map: list[int] | None, progress: bool) -> dict[str, Any]:
    train_cfg = TrainConfig(**{k: getattr(config, k) for k in TrainConfig.model_fields})
    if config.recover == Recovery.FINETUNE:
        return train(slim, task, train_cfg, work_dir, progress=progress)
    if config.recover == Recovery.KD:
        if teacher is None:
            raise SlimformerError("KD recovery needs the unpruned model as teacher; pass teacher=")
        try:  # lazy: the distillation stage is optional for pruning
            from slimformer.stages.distill import DistillConfig, distill_train
        except ImportError:
            raise SlimformerError("KD recovery needs slimformer.stages.distill, which is not available; "
                                  "use --recover finetune") from None
        from pydantic import ValidationError

        wanted = {**train_cfg.model_dump(), "alpha": config.kd_alpha, "temperature": config.kd_temperature,
                  "augment": config.kd_augment, "cache_teacher": config.kd_cache_teacher, "layers": layer_map}
        try:
            dcfg = DistillConfig(**{k: v for k, v in wanted.items() if k in DistillConfig.model_fields})
        except ValidationError as e:
            raise SlimformerError(f"recovery settings do not fit distillation ({e.errors()[0]['msg']}); "
                                  "use --recover finetune") from None
        return distill_train(slim, teacher, task, dcfg, work_dir, progress=progress)
    return {}


def _zero_preserving(masks: dict[nn.Parameter, torch.Tensor]) -> list:
    """Gradient hooks that keep pruned weights at exactly zero during recovery: with zero gradients AdamW's
    moments stay zero and decoupled weight decay keeps zero at zero."""
    return [p.register_hook(lambda g, m=m: g * m.to(g.dtype)) for p, m in masks.items()]


# --------------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------------


def _vocab_ids(slim: SlimModel, task: TaskData, config: PruneConfig) -> list[int]:
    if task.type == TaskType.CAUSAL_LM:
        raise SlimformerError("vocabulary pruning is for classification models (an LM must predict every token); "
                              "drop --vocab")
    if config.vocab_corpus:
        path = Path(config.vocab_corpus)
        if not path.is_file():
            raise SlimformerError(f"vocabulary corpus {path} does not exist; give a plain-text file")
        texts = [t for t in path.read_text(encoding="utf-8").splitlines() if t.strip()]
        return sorted(set(corpus_token_ids(slim.tokenizer, texts)) | set(fallback_token_ids(slim.tokenizer, texts)))
    examples = task.train + task.tuning
    split = task.type == TaskType.TOKEN_CLASSIFICATION
    texts = [e["tokens"] for e in examples] if split else [e["text"] for e in examples]
    # Single-character pieces let the tokenizer spell words the corpus never had instead of reading [UNK].
    fallback = fallback_token_ids(slim.tokenizer, texts)
    return sorted(set(corpus_token_ids(slim.tokenizer, texts, split_into_words=split)) | set(fallback))


def _layers_to_keep(n: int, config: PruneConfig) -> list[int] | None:
    if config.keep_layers is not None:
        if config.keep_layers > n:
            raise SlimformerError(f"keep_layers {config.keep_layers} is more than the model's {n} layers; "
                                  f"use at most {n}")
        return list(range(config.keep_layers))
    if config.drop_layers:
        bad = [i for i in config.drop_layers if i >= n]
        if bad:
            raise SlimformerError(f"layers {bad} do not exist (the model has {n}); use indices 0..{n - 1}")
        if len(config.drop_layers) >= n:
            raise SlimformerError(f"dropping layers {list(config.drop_layers)} would remove all {n} layers; "
                                  "keep at least one")
        return [i for i in range(n) if i not in config.drop_layers]
    return None


def _score(slim: SlimModel, task: TaskData, config: PruneConfig, units: list[Unit], round_no: int
           ) -> dict[Unit, torch.Tensor]:
    if config.importance == Importance.MAGNITUDE:
        return {u: magnitude(slim.model, u) for u in units}
    data = task_batches(slim.tokenizer, task, split="train", max_examples=config.importance_examples,
                        batch_size=config.batch_size, max_length=config.max_length, seed=config.seed + round_no)
    return taylor_scores(slim.model, data, units)


def prune(slim: SlimModel, task: TaskData, config: PruneConfig, work_dir: str | Path, *,
          teacher: nn.Module | None = None, progress: bool = True) -> dict[str, Any]:
    """Prune ``slim`` in place following ``config`` and record the plan and history. ``teacher`` (for
    KD recovery) defaults to a copy of the model before structural pruning. Returns the summary."""
    if not config.prunes_anything():
        raise SlimformerError("nothing to prune; give heads, ffn, layers, vocab or unstructured")
    if task.label_names is not None and slim.label_names is not None and task.label_names != slim.label_names:
        raise SlimformerError(f"the model's labels {slim.label_names} differ from the data's {task.label_names}; "
                              "use matching data")
    adapter = adapter_for(slim.model)
    work_dir = Path(work_dir)
    t0 = time.time()
    before = count_parameters(slim.model)
    plan: SurgeryPlan = plan_of(slim)
    summary: dict[str, Any] = {"parameters_before": before["parameters"], "rounds": []}

    if config.vocab:
        kept_ids = _vocab_ids(slim, task, config)
        if teacher is not None:  # a given teacher must read the same (pruned) token ids as the student
            rows = teacher.get_input_embeddings().num_embeddings
            if rows != slim.model.get_input_embeddings().num_embeddings:
                raise SlimformerError(f"the KD teacher has {rows} vocabulary rows but the model "
                                      f"{slim.model.get_input_embeddings().num_embeddings}; use a teacher with "
                                      "the same vocabulary")
            teacher = copy.deepcopy(teacher).eval()
            prune_vocab(teacher, kept_ids)
        plan = prune_vocab(slim.model, kept_ids, plan)
        set_plan(slim, plan)
    teacher_layers = list(plan.layers)  # base indices of the teacher's layers, for the KD layer map
    if config.recover == Recovery.KD and teacher is None:
        teacher = copy.deepcopy(slim.model).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)

    keep = _layers_to_keep(len(adapter.get_layers(slim.model)), config)
    if keep is not None:
        plan = keep_layers(slim.model, keep, plan)
        set_plan(slim, plan)

    units = [u for u, r in ((Unit.HEADS, config.heads), (Unit.NEURONS, config.ffn)) if r > 0]
    steps = config.steps if units or config.unstructured else 1
    group = adapter.group_size(slim.model.config)  # grouped-query attention: heads go in whole key/value groups
    head_step = unit_step(config.round_to, plan.base["head_dim"] * group)
    ffn_step = unit_step(config.round_to, 1)
    for k in range(1, steps + 1):
        frac = k / steps
        info: dict[str, Any] = {"round": k}
        if units:
            scores = _score(slim, task, config, units, k)
            n_layers = len(plan.layers)
            if Unit.HEADS in units:
                kept = select_keep_groups(scores[Unit.HEADS], config.heads * frac, [plan.base["heads"]] * n_layers,
                                          group=group, scope=config.scope, step=head_step)
                plan = prune_heads(slim.model, kept, plan)
            if Unit.NEURONS in units:
                kept = select_keep(scores[Unit.NEURONS], config.ffn * frac, [plan.base["ffn"]] * n_layers,
                                   scope=config.scope, step=ffn_step)
                plan = prune_neurons(slim.model, kept, plan)
            set_plan(slim, plan)
        masks = prune_unstructured(slim.model, config.unstructured * frac, config.unstructured_scope) \
            if config.unstructured else {}
        info["plan"] = plan.summary()
        info["parameters"] = count_parameters(slim.model)["parameters"]
        if config.unstructured:
            info["sparsity"] = sparsity(slim.model)
        if config.recover != Recovery.NONE:
            hooks = _zero_preserving(masks)
            try:
                layer_map = [teacher_layers.index(b) for b in plan.layers] if teacher is not None else None
                info["recovery"] = recover(slim, task, config, work_dir / f"round-{k}", teacher,
                                           layer_map=layer_map, progress=progress)
            finally:
                for h in hooks:
                    h.remove()
            clean_work_dir(work_dir / f"round-{k}")
        summary["rounds"].append(info)

    after = count_parameters(slim.model)
    summary.update({"plan": plan.summary(), "parameters_after": after["parameters"],
                    "nonzero_parameters_after": after["nonzero_parameters"],
                    "parameter_ratio": after["parameters"] / max(1, before["parameters"]),
                    "seconds": time.time() - t0})
    if config.unstructured:
        summary["sparsity"] = sparsity(slim.model)
    slim.model.eval()
    slim.add_history("prune", config.model_dump(mode="json"), summary)
    return summary


def _check_layers_early(model: str | Path, config: PruneConfig) -> None:
    """Refuse impossible layer settings before the weights are loaded (they can be large)."""
    if not config.drop_layers and config.keep_layers is None:
        return
    from transformers import AutoConfig

    path, is_local = models.resolve_model_path(model)
    record = models.read_record(path) if is_local else {}
    if record.get("surgery"):
        n = len(record["surgery"].get("layers", []))
    else:
        try:
            cfg = AutoConfig.from_pretrained(path)
            n = int(getattr(cfg, adapter_for(cfg).n_layers_field))
        except (OSError, ValueError):
            return  # models.load reports an unreadable model with its own message
    _layers_to_keep(n, config)


def prune_job(model: str | Path, task: TaskData, config: PruneConfig, out: str | Path, *,
              progress: bool = True) -> dict[str, Any]:
    """Load ``model`` for ``task``, prune and recover, score the eval split, save to ``out`` (atomically)."""
    out = models.check_out_dir(out)
    if not config.prunes_anything():
        raise SlimformerError("nothing to prune; give --heads, --ffn, --layers, --drop-layers, --vocab or "
                              "--unstructured")
    t0 = time.time()
    _check_layers_early(model, config)
    slim = models.load(model, task.type, task.label_names)
    before = (slim.record.get("quality") or {}).get("eval")
    from slimformer.api import score_and_save, work_dir_for

    work = work_dir_for(out)
    summary = prune(slim, task, config, work, progress=progress)
    quality = score_and_save(slim, task, out, work, max_length=config.max_length, progress=progress)
    return {"out": str(out), "pruning": summary, "quality": quality, "quality_before": before,
            "seconds": time.time() - t0}


__all__ = ["Importance", "PruneConfig", "Recovery", "block_linears", "prune", "prune_job", "prune_unstructured",
           "recover", "sparsity"]
