"""Knowledge distillation: a smaller student learns from the teacher's soft targets.

    L = alpha * CE(student, y) + (1 - alpha) * T^2 * KL(softmax(teacher / T) || softmax(student / T))
        + hidden_weight * MSE(student hidden states, teacher hidden states at mapped layers)
        + attention_weight * KL(teacher attention || student attention at mapped layers)

The student is a normal model of the teacher's family with a subset of its layers, weights copied, so
it saves, reloads and exports like any other. Training runs on the Hugging Face Trainer through a
subclass that only changes the loss, so bf16, logging, checkpoints and best-checkpoint selection all
still work.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from transformers import Trainer

from slimformer.arch import adapter_for
from slimformer.errors import SlimformerError
from slimformer.models import SlimModel
from slimformer.stages.finetune import TrainConfig, train
from slimformer.tasks import TaskData, TaskType


class DistillConfig(TrainConfig):
    """Distil a teacher into a student with fewer layers."""

    kind: Literal["distill"] = "distill"
    num_layers: int | None = Field(None, ge=1, description="student depth; teacher layers kept evenly spaced")
    layers: list[int] | None = Field(None, description="explicit teacher layer indices to keep (overrides num_layers)")
    alpha: float = Field(0.5, ge=0, le=1, description="weight of the hard-label cross-entropy (1 = no teacher)")
    temperature: float = Field(2.0, gt=0, le=100, description="softmax temperature of the soft targets")
    hidden_weight: float = Field(0.0, ge=0, description="weight of hidden-state MSE at mapped layers")
    attention_weight: float = Field(0.0, ge=0, description="weight of attention-distribution KL at mapped layers")
    cache_teacher: bool = Field(False, description="compute teacher logits once and reuse them across epochs")
    augment: int = Field(0, ge=0, le=50, description="unlabeled augmented copies of each training text (masked, "
                         "swapped words, n-gram spans), learnt from the teacher's soft targets only")
    transfer_text: str | None = Field(None, description="a plain-text file of unlabeled in-domain text, one example "
                                      "per line, learnt from the teacher's soft targets only")

    @field_validator("layers")
    @classmethod
    def _layers_sorted_unique(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (not v or any(i < 0 for i in v) or len(set(v)) != len(v)):
            raise ValueError("layers must be distinct non-negative indices")
        return sorted(v) if v is not None else None


def evenly_spaced(n_keep: int, n_total: int) -> list[int]:
    """Teacher layers a student of depth ``n_keep`` starts from: 3 of 6 -> [0, 2, 4]."""
    if not 1 <= n_keep <= n_total:
        raise SlimformerError(f"a student of {n_keep} layers cannot come from a {n_total}-layer teacher; "
                              f"choose 1..{n_total}")
    return [int(i * n_total / n_keep) for i in range(n_keep)]


def make_student(teacher: SlimModel, layers: list[int]) -> SlimModel:
    """A copy of the teacher that keeps only ``layers`` (weights copied, config updated)."""
    adapter = adapter_for(teacher.model)
    n_total = len(adapter.get_layers(teacher.model))
    bad = [i for i in layers if i >= n_total]
    if bad:
        raise SlimformerError(f"layers {bad} do not exist in the {n_total}-layer teacher; use indices 0..{n_total - 1}")
    model = copy.deepcopy(teacher.model)
    for p in model.parameters():  # a student learns, whatever the teacher's parameters were set to
        p.requires_grad_(True)
    base = adapter.base(model)
    parent_path, _, attr = adapter.layers.rpartition(".")
    parent = base.get_submodule(parent_path) if parent_path else base
    old = getattr(parent, attr)
    setattr(parent, attr, torch.nn.ModuleList([old[i] for i in layers]))
    for new_idx, layer in enumerate(getattr(parent, attr)):
        # Attention modules that index caches by layer must learn their new position.
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_idx
    setattr(model.config, adapter.n_layers_field, len(layers))
    if hasattr(model.config, "layer_types") and model.config.layer_types:
        model.config.layer_types = [model.config.layer_types[i] for i in layers]
    record = copy.deepcopy(teacher.record)
    record["student_of"] = {"teacher": teacher.source, "layers": list(layers)}
    record.pop("quality", None)
    record.pop("measurements", None)
    return SlimModel(model=model, tokenizer=teacher.tokenizer, task_type=teacher.task_type,
                     label_names=teacher.label_names, record=record, source=f"student({teacher.source})")


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None,
            alpha: float, temperature: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """alpha * CE(student, labels) + (1 - alpha) * T^2 * KL(p_teacher^T || p_student^T).

    Logits are (N, C) or (B, S, C); ``mask`` (B, S) picks the positions that count for token-level KD.
    The KL is averaged over the positions that count, as CE is.
    """
    c = student_logits.shape[-1]
    dtype = torch.promote_types(student_logits.dtype, torch.float32)  # bf16 logits are scored in fp32
    s, t = student_logits.reshape(-1, c).to(dtype), teacher_logits.reshape(-1, c).to(dtype)
    keep = mask.reshape(-1).bool() if mask is not None else torch.ones(s.shape[0], dtype=torch.bool, device=s.device)
    loss = s.new_zeros(())
    if alpha < 1:
        log_p_s = F.log_softmax(s[keep] / temperature, dim=-1)
        log_p_t = F.log_softmax(t[keep] / temperature, dim=-1)
        kl = F.kl_div(log_p_s, log_p_t, log_target=True, reduction="batchmean")
        loss = loss + (1 - alpha) * temperature**2 * kl
    if alpha > 0 and labels is not None and bool((labels != -100).any()):  # unlabeled rows: soft targets only
        loss = loss + alpha * F.cross_entropy(s, labels.reshape(-1), ignore_index=-100)
    return loss


class KDTrainer(Trainer):
    """A Trainer whose loss is :func:`kd_loss` plus optional intermediate matching."""

    def __init__(self, *args, teacher: torch.nn.Module, kd: DistillConfig, task_type: TaskType,
                 layer_map: list[int], **kwargs):
        super().__init__(*args, **kwargs)
        # The teacher runs under no_grad; its parameters' requires_grad is left alone, because the caller's
        # model is shared (the search copies later students from the same teacher, which must stay trainable).
        self.teacher = teacher.eval()
        self.kd = kd
        self.task_type = task_type
        self.layer_map = layer_map  # student layer i imitates teacher layer layer_map[i]
        self.cache: dict[int, torch.Tensor] = {}

    def _teacher_outputs(self, inputs: dict[str, torch.Tensor], idx: torch.Tensor | None, need_states: bool):
        if self.teacher.device != inputs["input_ids"].device:
            self.teacher.to(inputs["input_ids"].device)
        cacheable = self.kd.cache_teacher and idx is not None and not need_states
        if cacheable and all(int(i) in self.cache for i in idx):
            rows = [self.cache[int(i)] for i in idx]
            return _pad_rows(rows, inputs["input_ids"].shape[1]).to(inputs["input_ids"].device), None
        with torch.no_grad():
            out = self.teacher(**inputs, output_hidden_states=need_states,
                               output_attentions=self.kd.attention_weight > 0)
        if cacheable:
            lengths = inputs["attention_mask"].sum(1)
            for row, i, n in zip(out.logits.detach().cpu(), idx, lengths, strict=True):
                self.cache[int(i)] = row[:n] if row.dim() == 2 else row
        return out.logits, out

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        idx = inputs.pop("idx", None)
        labels = inputs.pop("labels", None)
        need_states = self.kd.hidden_weight > 0 or self.kd.attention_weight > 0
        out = model(**inputs, output_hidden_states=need_states, output_attentions=self.kd.attention_weight > 0)
        t_logits, t_out = self._teacher_outputs(inputs, idx, need_states)
        mask = None
        s_logits = out.logits
        if self.task_type == TaskType.CAUSAL_LM:
            # Predict the next token: position i is scored against token i + 1.
            s_logits, t_logits = s_logits[:, :-1], t_logits[:, :-1]
            mask = inputs["attention_mask"][:, 1:]
            labels = labels[:, 1:] if labels is not None else None
            if labels is not None:
                labels = labels.masked_fill(mask == 0, -100)
        elif self.task_type == TaskType.TOKEN_CLASSIFICATION:
            mask = inputs["attention_mask"]
        loss = kd_loss(s_logits, t_logits, labels, self.kd.alpha, self.kd.temperature, mask)
        if self.kd.hidden_weight > 0:
            am = inputs["attention_mask"].unsqueeze(-1).to(out.hidden_states[0].dtype)
            mse = 0.0
            # hidden_states[0] is the embedding output; hidden_states[i + 1] is layer i's output.
            pairs = [(0, 0)] + [(i + 1, t + 1) for i, t in enumerate(self.layer_map)]
            for si, ti in pairs:
                diff = (out.hidden_states[si] - t_out.hidden_states[ti]) * am
                mse = mse + diff.pow(2).sum() / (am.sum() * diff.shape[-1])
            loss = loss + self.kd.hidden_weight * mse / len(pairs)
        if self.kd.attention_weight > 0:
            kl = 0.0
            for i, t in enumerate(self.layer_map):
                s_att, t_att = out.attentions[i], t_out.attentions[t]
                if s_att.shape != t_att.shape:  # pruned heads: compare the head-averaged distributions
                    s_att, t_att = s_att.mean(1, keepdim=True), t_att.mean(1, keepdim=True)
                kl = kl + (t_att * (t_att.clamp_min(1e-9).log() - s_att.clamp_min(1e-9).log())).sum(-1).mean()
            loss = loss + self.kd.attention_weight * kl / len(self.layer_map)
        return (loss, out) if return_outputs else loss


def _pad_rows(rows: list[torch.Tensor], length: int) -> torch.Tensor:
    if rows[0].dim() == 1:
        return torch.stack(rows)
    out = rows[0].new_zeros(len(rows), length, rows[0].shape[-1])
    for i, r in enumerate(rows):
        out[i, : r.shape[0]] = r
    return out


class _Indexed(torch.utils.data.Dataset):
    """Adds each example's position so cached teacher outputs can be found again."""

    def __init__(self, features: list[dict[str, Any]]):
        self.features = features

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {**self.features[i], "idx": i}


def _layer_map(student: SlimModel, teacher: torch.nn.Module, config: DistillConfig) -> list[int]:
    n_student = len(adapter_for(student.model).get_layers(student.model))
    n_teacher = len(adapter_for(teacher).get_layers(teacher))
    recorded = student.record.get("student_of", {}).get("layers")
    if config.layers and len(config.layers) == n_student:
        return list(config.layers)
    if recorded and len(recorded) == n_student:
        return list(recorded)
    if n_student == n_teacher:
        return list(range(n_student))
    return evenly_spaced(n_student, n_teacher)


def distill_train(student: SlimModel, teacher: torch.nn.Module, task: TaskData, config: DistillConfig,
                  work_dir: str | Path, *, progress: bool = True) -> dict[str, Any]:
    """Train ``student`` in place against ``teacher`` (any model with the same output space).
    Also used for recovery training after pruning (the unpruned model as teacher)."""
    if config.cache_teacher and task.type == TaskType.CAUSAL_LM:
        raise SlimformerError("--cache-teacher would keep vocabulary-sized logits for every token of the corpus; "
                              "turn it off for causal-lm")
    if config.attention_weight > 0:
        for m in (student.model, teacher):
            if hasattr(m, "set_attn_implementation"):
                m.set_attn_implementation("eager")  # fused SDPA kernels do not return attention maps
    layer_map = _layer_map(student, teacher, config)
    extra = transfer_features(student, task, config)

    def trainer_cls(*args, **kwargs):
        kwargs["train_dataset"] = _Indexed(kwargs["train_dataset"])
        return KDTrainer(*args, teacher=teacher, kd=config, task_type=task.type, layer_map=layer_map, **kwargs)

    summary = train(student, task, config, work_dir, trainer_cls=trainer_cls, extra_train_features=extra,
                    progress=progress)
    summary["layer_map"] = layer_map
    summary["transfer_examples"] = len(extra)
    return summary


def transfer_texts(student: SlimModel, task: TaskData, config: DistillConfig) -> list[list[str]]:
    """Unlabeled texts (as word lists) the student learns from the teacher alone: ``config.augment``
    augmented copies of the training texts (:mod:`slimformer.augment`) and the lines of ``transfer_text``."""
    from slimformer.augment import augment_words

    if not config.augment and not config.transfer_text:
        return []
    if task.type not in (TaskType.SEQUENCE_CLASSIFICATION, TaskType.TOKEN_CLASSIFICATION):
        raise SlimformerError("--augment and --transfer-text apply to classification tasks; for causal-lm add the "
                              "text to the training corpus instead")
    out: list[list[str]] = []
    if config.transfer_text:
        path = Path(config.transfer_text)
        if not path.is_file():
            raise SlimformerError(f"transfer text {path} does not exist; give a plain-text file, one example per line")
        out += [line.split() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not out:
            raise SlimformerError(f"transfer text {path} has no text; give one example per line")
    if config.augment:
        train = task.train[: config.max_train_examples] if config.max_train_examples else task.train
        words = [e["tokens"] if task.type == TaskType.TOKEN_CLASSIFICATION else e["text"].split() for e in train]
        mask = getattr(student.tokenizer, "mask_token", None) or getattr(student.tokenizer, "unk_token", None) or ""
        out += augment_words(words, config.augment, mask_token=mask, seed=config.seed)
    return out


def transfer_features(student: SlimModel, task: TaskData, config: DistillConfig) -> list[dict[str, Any]]:
    """:func:`transfer_texts` encoded like training examples, with every label -100 (no hard label)."""
    texts = transfer_texts(student, task, config)
    if not texts:
        return []
    tok = student.tokenizer
    if task.type == TaskType.SEQUENCE_CLASSIFICATION:
        enc = tok([" ".join(w) for w in texts], truncation=True, max_length=config.max_length)
        return [{**{k: enc[k][i] for k in enc}, "labels": -100} for i in range(len(texts))]
    enc = tok(texts, is_split_into_words=True, truncation=True, max_length=config.max_length)
    feats = []
    for i in range(len(texts)):
        word_ids = enc.word_ids(i)
        feats.append({**{k: enc[k][i] for k in enc}, "labels": [-100] * len(word_ids),
                      "word_ids": [-1 if w is None else w for w in word_ids]})
    return feats


def check_same_tokenizer(teacher: SlimModel, student_tokenizer) -> None:
    """Distillation matches outputs position by position: both sides must read text the same way."""
    a = getattr(teacher.tokenizer, "base_tokenizer", teacher.tokenizer)
    b = getattr(student_tokenizer, "base_tokenizer", student_tokenizer)
    if a is b:
        return
    if type(a).__name__ != type(b).__name__ or a.get_vocab() != b.get_vocab():
        raise SlimformerError("teacher and student use different tokenizers; distil into a student built from "
                              "the teacher (--layers) or one with the same tokenizer")


def distill(teacher: SlimModel, task: TaskData, config: DistillConfig, work_dir: str | Path,
            student: SlimModel | None = None, *, progress: bool = True) -> tuple[SlimModel, dict[str, Any]]:
    """Build a student from ``teacher`` (or take the given one) and distil. Returns (student, summary)."""
    if student is None:
        n_total = len(adapter_for(teacher.model).get_layers(teacher.model))
        layers = config.layers or evenly_spaced(config.num_layers or max(1, n_total // 2), n_total)
        student = make_student(teacher, layers)
    else:
        check_same_tokenizer(teacher, student.tokenizer)
    summary = distill_train(student, teacher.model, task, config, work_dir, progress=progress)
    student.add_history("distill", config.model_dump(mode="json"), summary)
    return student, summary
