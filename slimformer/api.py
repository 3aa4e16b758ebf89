"""The Python API: each function is one job the CLI offers, from paths and configs to saved results.

>>> from slimformer import api, load_task_data
>>> task = load_task_data("../shared/data/sst2")
>>> api.finetune("minilm", task, FinetuneConfig(epochs=1), "runs/sst2-ft")   # doctest: +SKIP
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from slimformer import distributed, models
from slimformer.errors import SlimformerError
from slimformer.evaluate import evaluate as _evaluate
from slimformer.evaluate import torch_runner
from slimformer.measure import measure_model
from slimformer.stages.distill import DistillConfig
from slimformer.stages.finetune import FinetuneConfig, clean_work_dir
from slimformer.stages.finetune import finetune as _finetune
from slimformer.tasks import TaskData


def work_dir_for(out: str | os.PathLike) -> Path:
    """Checkpoints of a job writing ``out`` live beside it, so a re-run of the same command resumes."""
    out = Path(out)
    return out.parent / f".{out.name}.work"


def load_for_task(model: str | os.PathLike, task: TaskData) -> models.SlimModel:
    """Load ``model`` with a head that fits ``task`` (a saved head must have the same labels)."""
    return models.load(model, task.type, task.label_names)


def score_and_save(slim: models.SlimModel, task: TaskData, out: Path, work: Path, *, max_length: int = 128,
                   progress: bool = True) -> dict[str, Any]:
    """The common end of every training job: score the eval split, record it, save ``out`` atomically,
    then remove the checkpoints (only once the result is safely on disk). Returns the eval quality.

    Under torchrun / accelerate launch every process trained the same model (DDP keeps the replicas equal),
    so only the main process scores and writes; the others wait for it and return its eval quality."""

    def on_main() -> dict[str, Any]:
        quality = _evaluate(torch_runner(slim.model), slim.tokenizer, task, "eval", max_length=max_length,
                            progress=progress)
        slim.record["quality"] = {"eval": quality}
        slim.record["data"] = task.describe()
        models.save(slim, out)
        return quality

    quality = distributed.main_only(on_main)
    clean_work_dir(work)
    return quality


def finetune(model: str | os.PathLike, task: TaskData, config: FinetuneConfig, out: str | os.PathLike,
             *, progress: bool = True) -> dict[str, Any]:
    """Fine-tune, score the eval split, save to ``out`` (atomically) and return the summary."""
    out = models.check_out_dir(out)
    t0 = time.time()
    slim = load_for_task(model, task)
    work = work_dir_for(out)
    summary = _finetune(slim, task, config, work, progress=progress)
    quality = score_and_save(slim, task, out, work, max_length=config.max_length, progress=progress)
    return {"out": str(out), "training": summary, "quality": quality, "seconds": time.time() - t0}


def distill(teacher: str | os.PathLike, task: TaskData, config: DistillConfig, out: str | os.PathLike,
            *, progress: bool = True) -> dict[str, Any]:
    """Build a student with fewer layers from ``teacher``, distil it on ``task``, score and save it."""
    from slimformer.stages.distill import distill as _distill

    out = models.check_out_dir(out)
    t0 = time.time()
    teacher_slim = load_for_task(teacher, task)
    work = work_dir_for(out)
    student, summary = _distill(teacher_slim, task, config, work, progress=progress)
    quality = score_and_save(student, task, out, work, max_length=config.max_length, progress=progress)
    return {"out": str(out), "training": summary, "quality": quality, "seconds": time.time() - t0}


def evaluate(model: str | os.PathLike, task: TaskData, split: str = "eval", *, batch_size: int = 64,
             max_length: int = 128, bootstrap: int = 1000, progress: bool = False) -> dict[str, Any]:
    """The task metric of a saved model (PyTorch, quantized or ONNX folder) on a split, with a bootstrap 95%
    interval."""
    from slimformer.export import load_runner

    runner, tokenizer = load_runner(model, task)
    return _evaluate(runner, tokenizer, task, split, batch_size=batch_size, max_length=max_length,
                     bootstrap=bootstrap, progress=progress)


def measure(model: str | os.PathLike, *, batch: int = 1, seq: int = 128, threads: int | None = None,
            runs: int = 50, warmup: int = 10, task: str | None = None, flops: bool = True,
            device: str = "auto") -> dict[str, Any]:
    """The cost card of a saved model (PyTorch, quantized or ONNX folder), or of a base model with a task
    head for ``task``. ``device``: ``auto`` measures a plain PyTorch model on the GPU when there is one and
    everything else (ONNX Runtime, integer-quantized PyTorch: CPU kernels) on the CPU; ``cpu``; ``cuda``."""
    import torch

    from slimformer.export import is_onnx_folder, measure_onnx

    if device not in ("auto", "cpu", "cuda"):
        raise SlimformerError(f"unknown device '{device}'; use auto, cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise SlimformerError("--device cuda: no CUDA GPU is visible here; use --device cpu")
    if Path(model).is_dir() and is_onnx_folder(model):
        if device == "cuda":
            raise SlimformerError(f"{model} is an ONNX folder, measured with ONNX Runtime on the CPU; use --device cpu")
        return measure_onnx(model, batch=batch, seq=seq, threads=threads, warmup=warmup, runs=runs)
    path, is_local = models.resolve_model_path(model)
    record = models.read_record(path) if is_local else {}
    task_type = task or record.get("task", {}).get("type") or _default_task(path)
    labels = None if record.get("task") or task_type == "causal-lm" else ["0", "1"]
    slim = models.load(model, task_type, labels)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() and not record.get("quantization") else "cpu"
    slim.model.to(device)
    return measure_model(slim.model, slim.tokenizer, batch=batch, seq=seq, threads=threads, runs=runs,
                         warmup=warmup, folder=path if is_local and record else None, flops=flops)


def _default_task(path: str) -> str:
    """The task to measure a bare model with: causal-lm for a decoder with an LM head, else a 2-label classifier."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError):
        return "sequence-classification"  # models.load gives the one-line error
    return "causal-lm" if models.is_causal_lm_config(config) else "sequence-classification"


_CHILD = """
import json, sys
import onnxruntime, transformers, torch  # imported before the baseline memory reading
from slimformer import api, measure
kw = json.loads(sys.argv[2])
tb = kw.pop("throughput_batch")
rss0 = measure.psutil.Process().memory_info().rss
card = api.measure(sys.argv[1], **kw)
if tb is not None:
    card["throughput_batch_per_s"] = api.measure(sys.argv[1], **{**kw, "batch": tb, "runs": 30, "warmup": 2,
                                                                "flops": False})["throughput_per_s"]
    card["throughput_batch"] = tb
card["process_peak_rss_mb"] = measure.peak_rss_mb()
card["model_memory_mb"] = card["process_peak_rss_mb"] - rss0 / 2**20
print("SLIMFORMER-CARD " + json.dumps(card, default=str))
"""


def measure_fresh(model: str | os.PathLike, *, batch: int = 1, seq: int = 128, threads: int | None = None,
                  runs: int = 30, warmup: int = 5, throughput_batch: int | None = 32,
                  device: str = "auto") -> dict[str, Any]:
    """Measure in a new Python process, as ``slimformer measure`` does: nothing the caller did before
    (training, other models in memory) affects the timing, and the peak memory is this model's alone.
    ``throughput_batch=None`` skips the throughput pass (latency only).

    ``model_memory_mb`` is the peak resident memory above what the process held after importing the
    libraries: weights, activations and runtime buffers, comparable across PyTorch and ONNX Runtime."""
    import json
    import subprocess
    import sys

    kw = {"batch": batch, "seq": seq, "threads": threads, "runs": runs, "warmup": warmup, "flops": False,
          "throughput_batch": throughput_batch, "device": device}
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(model), json.dumps(kw)], capture_output=True,
                          text=True, env=env)
    for line in proc.stdout.splitlines()[::-1]:
        if line.startswith("SLIMFORMER-CARD "):
            return json.loads(line.removeprefix("SLIMFORMER-CARD "))
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]
    raise SlimformerError(f"measuring {model} in a fresh process failed ({tail}); run slimformer measure on it")
