"""Fine-tuning on the Hugging Face Trainer: full, LoRA (merged into the weights at the end), or top-k.

The Trainer does the loop: AdamW, warm-up then linear decay, gradient clipping, seeding, bf16 autocast,
checkpoints (so a killed run resumes), best-checkpoint selection on the tuning split, and logging to
TensorBoard or MLflow. Distillation and recovery training reuse :func:`train` with their own loss.
"""

from __future__ import annotations

import shutil
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from slimformer import distributed
from slimformer.errors import SlimformerError
from slimformer.models import SlimModel
from slimformer.tasks import Collator, TaskData, TaskType, encode, primary_metric


class Method(StrEnum):
    FULL = "full"
    LORA = "lora"
    TOP_K = "top-k"


class Precision(StrEnum):
    AUTO = "auto"  # bf16 autocast where the CPU/GPU has fast bf16, else fp32
    BF16 = "bf16"
    FP32 = "fp32"


class TrainConfig(BaseModel):
    """Training-loop settings shared by fine-tuning, distillation and recovery training."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    learning_rate: float = Field(5e-5, gt=0, lt=1, description="peak AdamW learning rate")
    epochs: float = Field(3.0, gt=0, le=100, description="passes over the training data")
    batch_size: int = Field(32, ge=1, le=4096, description="training batch size per process")
    eval_batch_size: int = Field(128, ge=1, le=4096, description="batch size when scoring the tuning split")
    warmup_ratio: float = Field(0.06, ge=0, lt=1, description="fraction of steps with linear warm-up")
    weight_decay: float = Field(0.01, ge=0, lt=1, description="AdamW weight decay")
    max_grad_norm: float = Field(1.0, gt=0, description="gradient clipping norm")
    max_length: int = Field(128, ge=8, le=8192, description="truncate inputs to this many tokens")
    seed: int = Field(0, ge=0, description="random seed (data order, dropout, initialisation)")
    max_train_examples: int | None = Field(None, ge=1, description="use only the first N training examples")
    evals_per_epoch: int = Field(1, ge=1, le=100, description="tuning-split evaluations (and checkpoints) per epoch")
    precision: Precision = Field(Precision.AUTO, description="bf16 autocast or fp32")
    report_to: list[Literal["tensorboard", "mlflow"]] = Field(default_factory=list,
                                                              description="experiment trackers to log to")
    logging_steps: int = Field(50, ge=1, description="log the training loss every N steps")


class FinetuneConfig(TrainConfig):
    """Fine-tune a model on a task."""

    kind: Literal["finetune"] = "finetune"
    method: Method = Field(Method.FULL, description="full, lora (merged at the end) or top-k layers + head")
    top_k: int = Field(2, ge=0, description="with method top-k: how many of the top layers to train")
    lora_r: int = Field(8, ge=1, le=256, description="LoRA rank")
    lora_alpha: int = Field(16, ge=1, description="LoRA scaling numerator")
    lora_dropout: float = Field(0.1, ge=0, lt=1, description="LoRA dropout")


def use_bf16(precision: Precision) -> bool:
    if precision == Precision.FP32:
        return False
    if precision == Precision.BF16:
        return True
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    from slimformer.measure import supports_fast_bf16

    return supports_fast_bf16()


def _metric_fn(task: TaskData):
    """compute_metrics for the Trainer on the tuning split (for best-checkpoint selection)."""
    from slimformer.tasks import classification_scores, entity_scores

    def compute(eval_pred) -> dict[str, float]:
        preds, labels = eval_pred.predictions, eval_pred.label_ids
        if isinstance(preds, tuple):
            preds = preds[0]
        if task.type == TaskType.SEQUENCE_CLASSIFICATION:
            p = preds if preds.ndim == 1 else preds.argmax(-1)
            return classification_scores(p, labels, task.num_labels or 2)
        names = task.label_names or []
        p = preds if preds.ndim == 2 else preds.argmax(-1)
        gold, pred = [], []
        for pr, lab in zip(p, labels, strict=True):
            keep = lab != -100
            gold.append([names[i] for i in lab[keep]])
            pred.append([names[i] for i in pr[keep]])
        return entity_scores(gold, pred)

    return compute


def _argmax_logits(logits, labels):
    if isinstance(logits, tuple):
        logits = logits[0]
    return logits.argmax(-1)


def train(
    slim: SlimModel,
    task: TaskData,
    config: TrainConfig,
    work_dir: str | Path,
    *,
    trainer_cls=None,
    trainer_kwargs: dict[str, Any] | None = None,
    model: torch.nn.Module | None = None,
    extra_train_features: list[dict[str, Any]] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train ``model`` (default ``slim.model``) on ``task.train`` and keep the best checkpoint on
    ``task.tuning``. Checkpoints live in ``work_dir``; a run started again with the same ``work_dir``
    resumes from the last checkpoint. ``extra_train_features`` (already encoded; e.g. unlabeled transfer
    text for distillation, labels -100) join the training features. Returns the training summary."""
    from transformers import Trainer, TrainingArguments

    model = model if model is not None else slim.model
    tok = slim.tokenizer
    lm = task.type == TaskType.CAUSAL_LM
    # A causal-LM corpus is one text cut into blocks of max_length tokens: there, examples are blocks.
    train_ex = task.train[: config.max_train_examples] if config.max_train_examples and not lm else task.train
    if not train_ex:
        raise SlimformerError("the training split is empty; give more training data")
    train_feats = encode(task, train_ex, tok, max_length=config.max_length)
    if lm and config.max_train_examples:
        train_feats = train_feats[: config.max_train_examples]
    if not train_feats:
        raise SlimformerError("the training text is too short to make one block of tokens; give more text")
    train_feats = train_feats + list(extra_train_features or [])
    tune_feats = encode(task, task.tuning, tok, max_length=config.max_length) if task.tuning else None
    metric, direction = primary_metric(task.type)
    if task.type == TaskType.CAUSAL_LM:
        metric, direction = "loss", "lower"

    # batch_size is per process: under torchrun / accelerate launch each optimizer step sees world_size batches.
    steps_per_epoch = max(1, -(-len(train_feats) // (config.batch_size * distributed.world_size())))
    eval_every = max(1, steps_per_epoch // config.evals_per_epoch)
    work_dir = Path(work_dir)
    args = TrainingArguments(
        output_dir=str(work_dir),
        learning_rate=config.learning_rate,
        num_train_epochs=config.epochs,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.eval_batch_size,
        warmup_steps=int(config.warmup_ratio * steps_per_epoch * config.epochs),
        lr_scheduler_type="linear",
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        seed=config.seed,
        data_seed=config.seed,
        bf16=use_bf16(config.precision),
        use_cpu=not torch.cuda.is_available(),
        eval_strategy="steps" if tune_feats else "no",
        save_strategy="steps",
        eval_steps=eval_every,
        save_steps=eval_every,
        save_total_limit=2,
        load_best_model_at_end=bool(tune_feats),
        metric_for_best_model=metric if tune_feats else None,
        greater_is_better=direction == "higher",
        logging_steps=config.logging_steps,
        report_to=list(config.report_to) or "none",
        train_sampling_strategy="group_by_length" if task.type != TaskType.CAUSAL_LM else "random",
        label_names=["labels"],
        remove_unused_columns=False,
        disable_tqdm=not progress,
        dataloader_num_workers=0,
        save_only_model=False,
        # Under DDP the Trainer would otherwise multiply each process's loss by the number of processes,
        # assuming the model divides by the global token count; BERT-style heads take a plain mean, so
        # losses and gradients came out N times too large. Per-process means, averaged by DDP, are right.
        average_tokens_across_devices=False,
    )
    trainer_cls = trainer_cls or Trainer
    kwargs = dict(trainer_kwargs or {})
    if task.type != TaskType.CAUSAL_LM:
        kwargs.setdefault("compute_metrics", _metric_fn(task))
        kwargs.setdefault("preprocess_logits_for_metrics", _argmax_logits)
    trainer = trainer_cls(
        model=model,
        args=args,
        train_dataset=train_feats,
        eval_dataset=tune_feats,
        data_collator=Collator(tok.pad_token_id),
        **kwargs,
    )
    has_checkpoint = work_dir.exists() and any(work_dir.glob("checkpoint-*"))
    device = next(model.parameters()).device
    out = trainer.train(resume_from_checkpoint=True if has_checkpoint else None)
    # The Trainer leaves the model on its GPU; give it back where it came from, as callers expect (scoring,
    # surgery and saving run where the model was loaded).
    model.to(device)
    best = trainer.state.best_metric
    summary = {
        "train_examples": len(train_feats),
        "processes": distributed.world_size(),
        "steps": trainer.state.global_step,
        # The Trainer's last, unlogged stretch of loss is this process's alone: average it over processes.
        "train_loss": distributed.mean(float(out.training_loss)),
        "train_seconds": float(out.metrics.get("train_runtime", 0.0)),
        "best_tuning_metric": {metric: best} if best is not None else None,
        "best_checkpoint": Path(trainer.state.best_model_checkpoint).name
        if trainer.state.best_model_checkpoint else None,
        "resumed": has_checkpoint,
        "bf16": args.bf16,
    }
    restore_plain_forward(model)
    model.eval()
    return summary


def restore_plain_forward(model: torch.nn.Module) -> None:
    """accelerate leaves ``model.forward`` wrapped in bf16 autocast after bf16 training; unwrap it so the
    model is scored in this process exactly as its saved fp32 weights will run after reloading."""
    if "_original_forward" in model.__dict__:
        model.__dict__.pop("forward", None)
        model.__dict__.pop("_original_forward", None)


def _freeze_below_top_k(slim: SlimModel, k: int) -> None:
    from slimformer.arch import adapter_for

    adapter = adapter_for(slim.model)
    base = adapter.base(slim.model)
    layers = adapter.get_layers(slim.model)
    if k > len(layers):
        raise SlimformerError(f"--top-k {k} is more than the model's {len(layers)} layers; use at most {len(layers)}")
    for p in base.parameters():
        p.requires_grad_(False)
    for layer in list(layers)[len(layers) - k:]:
        for p in layer.parameters():
            p.requires_grad_(True)
    for name in adapter.head_modules:
        module = getattr(base, name, None)
        if module is not None:
            for p in module.parameters():
                p.requires_grad_(True)
    # Everything outside the base model is the task head: always trained.
    base_ids = {id(p) for p in base.parameters()}
    for p in slim.model.parameters():
        if id(p) not in base_ids:
            p.requires_grad_(True)


def _wrap_lora(slim: SlimModel, config: FinetuneConfig):
    from peft import LoraConfig, get_peft_model
    from peft import TaskType as PeftTask

    from slimformer.arch import adapter_for

    peft_task = {TaskType.SEQUENCE_CLASSIFICATION: PeftTask.SEQ_CLS, TaskType.TOKEN_CLASSIFICATION: PeftTask.TOKEN_CLS,
                 TaskType.CAUSAL_LM: PeftTask.CAUSAL_LM}[slim.task_type]
    adapter = adapter_for(slim.model)
    base = adapter.base(slim.model)
    extra = [name for name in adapter.head_modules if getattr(base, name, None) is not None]
    # GPT-2's Conv1D stores its weight as [in, out]: peft must know (fan_in_fan_out), or the merge is wrong.
    lora = LoraConfig(task_type=peft_task, r=config.lora_r, lora_alpha=config.lora_alpha,
                      lora_dropout=config.lora_dropout, target_modules=list(adapter.lora_targets),
                      modules_to_save=extra or None, fan_in_fan_out=adapter.transposed_weights)
    return get_peft_model(slim.model, lora)


def finetune(slim: SlimModel, task: TaskData, config: FinetuneConfig, work_dir: str | Path,
             progress: bool = True) -> dict[str, Any]:
    """Fine-tune ``slim`` in place. LoRA adapters are merged into the weights before returning, so the
    result is a plain model of the same architecture."""
    if task.label_names is not None and slim.label_names is not None and task.label_names != slim.label_names:
        raise SlimformerError(f"the model's labels {slim.label_names} differ from the data's {task.label_names}; "
                              "use matching data or a base model")
    trainable_before = sum(p.numel() for p in slim.model.parameters())
    if config.method == Method.TOP_K:
        _freeze_below_top_k(slim, config.top_k)
        model = slim.model
    elif config.method == Method.LORA:
        model = _wrap_lora(slim, config)
    else:
        model = slim.model
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    summary = train(slim, task, config, work_dir, model=model, progress=progress)
    if config.method == Method.LORA:
        slim.model = model.merge_and_unload()
    for p in slim.model.parameters():
        p.requires_grad_(True)
    slim.model.eval()
    summary["trainable_parameters"] = trainable
    summary["parameters"] = trainable_before
    slim.add_history("finetune", config.model_dump(mode="json"), summary)
    return summary


def clean_work_dir(work_dir: str | Path) -> None:
    """Remove checkpoints once the final model is safely saved. Every process of a distributed job calls
    this; the main process removes the folder once all have stopped reading checkpoints from it."""
    distributed.barrier()
    if distributed.is_main():
        shutil.rmtree(work_dir, ignore_errors=True)


__all__ = ["FinetuneConfig", "Method", "Precision", "TrainConfig", "clean_work_dir", "finetune",
           "restore_plain_forward", "train",
           "use_bf16", "np"]
