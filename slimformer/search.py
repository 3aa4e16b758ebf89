"""Find the sweet spot: combine distillation, pruning and quantization, measure every candidate on this
machine, and choose the best point under the user's budget.

How a search runs (``run_search``):

1. **Teacher.** The given model, fine-tuned first if it has no head for the task (cached in ``teacher/``).
   Students the user distilled already (``students``) are checked against it and stand in for the quick
   ones the search would distil at their depths.
2. **Baseline.** The teacher in fp32 PyTorch, scored on the *tuning* split and measured.
3. **Trials.** Optuna (multi-objective: quality drop and the chosen cost) picks a depth, head and FFN
   ratios, vocabulary pruning and a precision/backend. Work is reused across trials: one distilled student
   per depth, one pruned model per (depth, heads, ffn, vocab), one artifact per full parameter set, all
   cached on disk by their parameters, so a retried or repeated trial costs nothing.
4. **Choice.** The Pareto front over (cost, quality) and the best point under the budget, both on the tuning
   split. The chosen point and the baseline are then scored once on the **eval** split, which no training
   or search step has seen, with bootstrap intervals; the report says whether the budget still holds there.

The study lives in a storage (SQLite in the output folder by default, any Optuna URL): a search killed and
started again with the same command keeps every finished candidate and re-runs only the unfinished one.

Several workers (``worker=True``, on one machine or many sharing the output folder) can run trials of one
study on a shared storage. Cache entries are built under file locks, so no two workers build or measure the
same thing; each candidate records the host that measured it, and the final, non-worker run measures again
on its own host the candidates that decide the outcome (Pareto front and choice), since latency only
compares on one machine. See ``docs/scale-out.md``.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import re
import shutil
import statistics
import time
import warnings
from collections.abc import Sequence
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from slimformer import distributed, models
from slimformer.errors import SlimformerError, read_yaml, validation_line
from slimformer.pareto import (
    OBJECTIVES,
    Candidate,
    Constraint,
    check_budget_for_task,
    choose,
    measurement,
    pareto_front,
    parse_budget,
    within_budget,
)
from slimformer.stages.finetune import FinetuneConfig
from slimformer.tasks import TaskData, TaskType, primary_metric


class Precision(StrEnum):
    FP32 = "fp32"  # PyTorch, float32
    BF16 = "bf16"  # PyTorch, bfloat16 weights and compute
    TORCH_INT8 = "torch-dynamic-int8"
    ORT_FP32 = "ort-fp32"
    ORT_INT8 = "ort-dynamic-int8"
    ORT_STATIC_INT8 = "ort-static-int8"
    ORT_INT8_EMB4 = "ort-dynamic-int8-emb4"  # as ORT_INT8, with the token embedding table in 4-bit blocks


class Strategy(StrEnum):
    TPE = "tpe"
    NSGA2 = "nsga2"
    RANDOM = "random"
    GRID = "grid"


class SearchSpace(BaseModel):
    """What may be combined, and the training knobs of the stages that need training."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    depths: list[int] | None = Field(None, description="student depths; default: all, 2/3, 1/2 and 1/3 of the "
                                                       "teacher's layers")
    heads: list[float] = Field([0.0, 0.25, 0.5], description="fractions of attention heads to remove")
    ffn: list[float] = Field([0.0, 0.5, 0.75], description="fractions of FFN neurons to remove")
    vocab: list[bool] = Field([False, True], description="prune the vocabulary to the training corpus or not")
    precisions: list[Precision] = Field(list(Precision), description="precisions/backends to try")
    kd_epochs: float = Field(1.0, gt=0, le=20, description="distillation epochs for each student depth")
    kd_max_examples: int | None = Field(20000, ge=1, description="training examples for distillation")
    kd_learning_rate: float = Field(1e-4, gt=0, lt=1, description="distillation learning rate")
    temperature: float = Field(2.0, gt=0, le=100, description="distillation temperature")
    alpha: float = Field(0.5, ge=0, le=1, description="weight of hard labels in distillation")
    recovery_epochs: float = Field(1.0, gt=0, le=20, description="KD recovery epochs after pruning")
    recovery_max_examples: int | None = Field(8000, ge=1, description="training examples for recovery")
    recovery_augment: int = Field(1, ge=0, le=50, description="unlabeled augmented copies of each recovery "
                                                              "example, learnt from the teacher's soft targets "
                                                              "(classification only)")
    calibration_examples: int = Field(256, ge=1, le=100_000, description="static int8 calibration examples")

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> SearchSpace:
        """Read a space from a YAML mapping of these fields; a bad file or field is a one-line error."""
        from pydantic import ValidationError

        values = read_yaml(path, "search space file")
        if values is None:  # an empty file: the default space
            values = {}
        if not isinstance(values, dict):
            raise SlimformerError(f"search space file {path} must hold a mapping of settings (depths: [3], ...)")
        try:
            return cls(**values)
        except ValidationError as e:
            raise SlimformerError(f"invalid search space setting in {path}: {validation_line(e)}") from None

    def resolved_depths(self, n_layers: int) -> list[int]:
        if self.depths:
            bad = [d for d in self.depths if not 1 <= d <= n_layers]
            if bad:
                raise SlimformerError(f"depths {bad} do not fit a {n_layers}-layer teacher; use 1..{n_layers}")
            return sorted(set(self.depths), reverse=True)
        return sorted({n_layers, max(1, round(n_layers * 2 / 3)), max(1, n_layers // 2), max(1, n_layers // 3)},
                      reverse=True)


class SearchConfig(BaseModel):
    """A search: objective, budget, strategy, limits and the measurement protocol."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["search"] = "search"
    objective: Literal["latency", "size", "throughput", "memory"] = Field(
        "latency", description="the cost to minimise (throughput: maximise)")
    budget: str = Field("quality_drop<=1.0", description="constraints on measured quantities, comma-separated")
    trials: int = Field(30, ge=1, le=10_000, description="candidates to evaluate (including the references)")
    time_budget_s: float | None = Field(None, gt=0, description="stop starting new candidates after this")
    strategy: Strategy = Field(Strategy.TPE, description="Optuna sampler; grid enumerates the whole space")
    storage: str | None = Field(None, description="Optuna storage URL; default SQLite in the output folder")
    seed: int = Field(0, ge=0, description="random seed of the sampler and of training")
    batch: int = Field(1, ge=1, le=1024, description="latency batch size")
    seq: int = Field(128, ge=8, le=8192, description="latency sequence length")
    throughput_batch: int = Field(32, ge=1, le=4096, description="batch size for throughput")
    threads: int | None = Field(None, ge=1, description="threads for measurement (default: all cores)")
    runs: int = Field(30, ge=30, le=10_000, description="timed runs per latency measurement")
    fresh_process_measurement: bool = Field(True, description="measure each candidate in a new process (clean "
                                                              "timing and memory; off only for quick tests)")
    confirm_rounds: int = Field(3, ge=0, le=20, description="at the end, re-time the baseline, its ORT int8 and "
                                                        "the chosen point in this many interleaved rounds, so the "
                                                        "reported speed-ups share one machine state (0: off)")
    confidence: float | None = Field(None, ge=0.5, lt=1.0,
                                     description="hold quality-drop budgets at this confidence, not on the measured "
                                                 "drop: a candidate qualifies when the upper bound of its drop (a "
                                                 "paired bootstrap against the baseline on the tuning split) is "
                                                 "within the budget; e.g. 0.9. None: the measured drop")
    tie_tolerance: float = Field(0.03, ge=0.0, lt=0.5,
                                 description="candidates under the budget whose objective is within this fraction "
                                             "of the best one's count as tied (latency varies by a few percent "
                                             "between timings); ties go to better tuning quality, then smaller size")
    space: SearchSpace = Field(default_factory=SearchSpace, description="what to combine")
    students: list[str] = Field([], description="folders of students distilled already (slimformer distill), at "
                                                "most one per depth: used as they are instead of distilling one "
                                                "with the short kd_* settings; each one's depth is searched even "
                                                "if the space's depths leave it out")
    finetune: FinetuneConfig = Field(default_factory=lambda: FinetuneConfig(epochs=2),
                                     description="teacher fine-tuning if the model has no task head yet")


# ------------------------------------------------------------------------------------------------------
# Building candidates (cached on disk by their parameters)
# ------------------------------------------------------------------------------------------------------


def _fmt(x: float) -> str:
    return f"{x:g}".replace(".", "p")


class Builder:
    """Makes the artifact of a parameter set, reusing every intermediate model it has made before."""

    def __init__(self, out: Path, teacher_path: Path, task: TaskData, config: SearchConfig, progress: bool,
                 students: dict[int, Path] | None = None):
        self.out, self.teacher_path, self.task, self.config, self.progress = out, teacher_path, task, config, progress
        self.students = dict(students or {})  # depth -> the user's folder, read and never written
        self.cache = out / "cache"
        self.cache.mkdir(parents=True, exist_ok=True)
        self._teacher: models.SlimModel | None = None

    @property
    def teacher(self) -> models.SlimModel:
        if self._teacher is None:
            self._teacher = models.load(self.teacher_path)
        return self._teacher

    def student(self, depth: int) -> Path:
        n = self.teacher.config.num_hidden_layers
        if depth == n:
            return self.teacher_path
        if depth in self.students:
            return self.students[depth]
        path = self.cache / f"student-d{depth}"
        if not (path / models.RECORD_FILE).exists():
            with _building(path):
                if not (path / models.RECORD_FILE).exists():  # another worker may have built it meanwhile
                    self._distil(depth, path)
        return path

    def _distil(self, depth: int, path: Path) -> None:
        from slimformer.api import work_dir_for
        from slimformer.stages.distill import DistillConfig, distill

        sp = self.config.space
        cfg = DistillConfig(num_layers=depth, alpha=sp.alpha, temperature=sp.temperature, epochs=sp.kd_epochs,
                            learning_rate=sp.kd_learning_rate, max_train_examples=sp.kd_max_examples,
                            seed=self.config.seed)
        student, _ = distill(self.teacher, self.task, cfg, work_dir_for(path), progress=self.progress)
        models.save(student, path)
        shutil.rmtree(work_dir_for(path), ignore_errors=True)

    def pruned(self, depth: int, heads: float, ffn: float, vocab: bool) -> Path:
        student_path = self.student(depth)
        if not (heads or ffn or vocab):
            return student_path
        path = self.cache / f"d{depth}-h{_fmt(heads)}-f{_fmt(ffn)}-v{int(vocab)}"
        if not (path / models.RECORD_FILE).exists():
            with _building(path):
                if not (path / models.RECORD_FILE).exists():
                    self._prune(student_path, heads, ffn, vocab, path)
        return path

    def _prune(self, student_path: Path, heads: float, ffn: float, vocab: bool, path: Path) -> None:
        from slimformer.api import work_dir_for
        from slimformer.stages.prune import PruneConfig, prune

        slim = models.load(student_path)
        sp = self.config.space
        structural = bool(heads or ffn)
        classify = self.task.type != TaskType.CAUSAL_LM  # augmentation and cached logits are for classifiers
        cfg = PruneConfig(heads=heads, ffn=ffn, vocab=vocab, importance="taylor", round_to=8,
                          recover="kd" if structural else "none", epochs=sp.recovery_epochs,
                          learning_rate=sp.kd_learning_rate, max_train_examples=sp.recovery_max_examples,
                          kd_augment=sp.recovery_augment if classify else 0,
                          kd_cache_teacher=structural and classify and sp.recovery_epochs > 1,
                          seed=self.config.seed)
        # Recovery learns from the fine-tuned teacher, the best model we have.
        prune(slim, self.task, cfg, work_dir_for(path), teacher=self.teacher.model if structural else None,
              progress=self.progress)
        models.save(slim, path)
        shutil.rmtree(work_dir_for(path), ignore_errors=True)

    def artifact(self, p: dict[str, Any]) -> Path:
        src = self.pruned(p["depth"], p["heads"], p["ffn"], p["vocab"])
        precision = Precision(p["precision"])
        if precision == Precision.FP32:
            return src
        # A given student's folder name is the user's (two may share one): its conversions are named by depth.
        stem = f"student-d{p['depth']}" if src == self.students.get(p["depth"]) else src.name
        path = self.out / "candidates" / f"{stem}-{precision.value}"
        if not (path / models.RECORD_FILE).exists():
            with _building(path):
                if not (path / models.RECORD_FILE).exists():
                    self._convert(src, precision, path)
        return path

    def _convert(self, src: Path, precision: Precision, path: Path) -> None:
        from slimformer.stages.quantize import QuantizeConfig, quantize_onnx, quantize_torch

        slim = models.load(src)
        if precision == Precision.ORT_FP32:
            from slimformer.export import export_onnx

            def write(tmp: Path) -> None:
                export_onnx(slim, tmp)
        elif precision in (Precision.ORT_INT8, Precision.ORT_STATIC_INT8, Precision.ORT_INT8_EMB4):
            emb4 = precision == Precision.ORT_INT8_EMB4
            cfg = QuantizeConfig(scheme=Precision.ORT_INT8.value if emb4 else precision.value,
                                 embeddings="int4" if emb4 else "auto",
                                 calibration_examples=self.config.space.calibration_examples, seed=self.config.seed)

            def write(tmp: Path) -> None:
                quantize_onnx(slim, self.task, cfg, tmp)
        else:
            cfg = QuantizeConfig(scheme=precision.value)
            quantize_torch(slim, cfg)

            def write(tmp: Path) -> None:
                models.save(slim, tmp)
        models.atomic_dir(path, write)


def _building(path: Path):
    """Workers sharing the output folder build each cache entry once: the others wait, then reuse it. The
    lock also keeps two workers out of one entry's checkpoint folder; a killed builder's checkpoints are
    resumed by the next."""
    return distributed.file_lock(path.parent / f".{path.name}.lock")


# ------------------------------------------------------------------------------------------------------
# Measuring a candidate
# ------------------------------------------------------------------------------------------------------


def _quality(path: Path, task: TaskData, split: str, bootstrap: int, threads: int | None,
             units: bool = False) -> dict[str, Any]:
    from slimformer.evaluate import evaluate
    from slimformer.export import load_runner

    runner, tokenizer = load_runner(path, task, threads=threads)
    return evaluate(runner, tokenizer, task, split, bootstrap=bootstrap, units=units)


def _tuning_quality(out: Path, name: str, path: Path, task: TaskData, threads: int | None) -> dict[str, Any]:
    """Quality on the tuning split; the per-example units go to ``units/<name>.json`` beside the study (kept
    out of the study itself, they are thousands of numbers) for paired bounds at the end."""
    quality = _quality(path, task, "tuning", 200, threads, units=True)
    _json_dump(out / "units" / f"{name}.json", quality.pop("units", None), indent=None)
    return quality


BASELINE_UNITS = "baseline"
# Budget quantities on the quality drop: with a confidence, they are held on the drop's upper bound.
DROP_QUANTITIES = ("quality_drop", "accuracy_drop", "f1_drop", "perplexity_increase")


def _units(out: Path, name: str, path: Path, task: TaskData, threads: int | None, log) -> dict[str, Any] | None:
    """A candidate's tuning quality with its units: from ``units/<name>.json``, or measured again where a
    search made before units were kept lacks them."""
    f = out / "units" / f"{name}.json"
    if not f.exists():
        if not path.exists():
            return None
        log(f"scoring {name} on the tuning split again, for its per-example results")
        _tuning_quality(out, name, path, task, threads)
    metric, _ = primary_metric(task.type)
    return {"metric": metric, "units": json.loads(f.read_text())}


def with_drop_bounds(candidates: list[Candidate], out: Path, task: TaskData, teacher_path: Path,
                     confidence: float, threads: int | None, log=print) -> list[Candidate]:
    """Each candidate with ``quality_drop_upper`` (and the task's ``*_drop_upper``): the ``confidence`` upper
    bound of its drop against the baseline, from a paired bootstrap over the tuning examples."""
    from slimformer.evaluate import paired_drop_bound

    base = _units(out, BASELINE_UNITS, teacher_path, task, threads, log)
    done = []
    for c in candidates:
        mine = base if Path(c.path or "") == teacher_path else _units(out, c.name, Path(c.path or ""), task,
                                                                      threads, log)
        bound = None if base is None or mine is None else paired_drop_bound(base, mine, confidence)
        if bound is not None:
            unit = c.measurements["quality_drop"].unit
            extra = {f"{q}_upper": measurement(f"{q}_upper", round(bound, 9), unit=unit)
                     for q in ("quality_drop", _drop_name(task.type))}
            c = Candidate(**{**vars(c), "measurements": {**c.measurements, **extra}})
        done.append(c)
    return done


def bounded_budget(budget: list[Constraint], confidence: float | None) -> list[Constraint]:
    """The budget the choice applies: with a confidence, limits on the quality drop hold on its upper bound."""
    if confidence is None:
        return budget
    return [Constraint(f"{k.quantity}_upper", k.op, k.bound) if k.quantity in DROP_QUANTITIES else k
            for k in budget]


def _cost(path: Path, config: SearchConfig, throughput: bool = True) -> dict[str, Any]:
    """The cost card of a candidate, measured in a fresh process with the protocol of ``slimformer measure``
    (``throughput=False``: latency only, for re-timing)."""
    from slimformer import api

    threads = config.threads or torch.get_num_threads()
    tb = config.throughput_batch if throughput else None
    # On the CPU even where there is a GPU: candidates include CPU-only backends (ONNX Runtime, dynamic int8),
    # and they only compare when measured on one device.
    if config.fresh_process_measurement:
        return api.measure_fresh(path, batch=config.batch, seq=config.seq, threads=threads, runs=config.runs,
                                 throughput_batch=tb, device="cpu")
    card = api.measure(path, batch=config.batch, seq=config.seq, threads=threads, runs=config.runs, flops=False,
                       device="cpu")
    if tb is not None:
        card["throughput_batch_per_s"] = api.measure(path, batch=tb, seq=config.seq, threads=threads, runs=30,
                                                     warmup=2, flops=False, device="cpu")["throughput_per_s"]
    return card


def side_by_side_timing(paths: dict[str, Path], config: SearchConfig) -> dict[str, Any]:
    """Re-time the models in interleaved rounds (A B C, A B C, ...) so that load which came and went during a
    long search hits them alike: the search timed the baseline first and each candidate once, hours apart."""
    lat: dict[str, list[float]] = {k: [] for k in paths}
    for _ in range(config.confirm_rounds):
        for label, path in paths.items():
            lat[label].append(_cost(path, config, throughput=False)["latency_ms_p50"])
    p50 = {k: statistics.median(v) for k, v in lat.items()}
    base = p50["baseline"]
    return {"rounds": config.confirm_rounds, "latency_ms": lat, "latency_ms_median": p50,
            "speedup": {k: base / v for k, v in p50.items()}}


def _drop_name(task_type: TaskType) -> str:
    return {TaskType.SEQUENCE_CLASSIFICATION: "accuracy_drop", TaskType.TOKEN_CLASSIFICATION: "f1_drop",
            TaskType.CAUSAL_LM: "perplexity_increase"}[task_type]


def make_candidate(name: str, params: dict[str, Any], path: Path, quality: dict[str, Any], card: dict[str, Any],
                   baseline: dict[str, Any] | None, task_type: TaskType) -> Candidate:
    """Turn a quality result and a cost card into a Candidate with every quantity a budget may name."""
    _, direction = primary_metric(task_type)
    m = {
        "quality": measurement("quality", quality["value"], spread=_half_width(quality), n=quality["n"],
                               goal="max" if direction == "higher" else "min"),
        "latency_ms": measurement("latency_ms", card["latency_ms_p50"], n=card["runs"]),
        "latency_ms_p95": measurement("latency_ms_p95", card["latency_ms_p95"], n=card["runs"]),
        "throughput": measurement("throughput", card["throughput_batch_per_s"]),
        "size_mb": measurement("size_mb", card["size_bytes"] / 1e6),
        "memory_mb": measurement("memory_mb", card.get("model_memory_mb", card["peak_rss_mb"])),
    }
    if card.get("parameters") is not None:
        m["parameters"] = measurement("parameters", card["parameters"])
    notes: list[str] = []
    if baseline is not None:
        bq, bl, bs = baseline["quality"]["value"], baseline["cost"]["latency_ms_p50"], baseline["cost"]["size_bytes"]
        # Perplexity: relative increase in percent; accuracy/F1: points lost.
        drop = 100 * (quality["value"] / bq - 1) if task_type == TaskType.CAUSAL_LM else 100 * (bq - quality["value"])
        # Rounded well below any real difference: 0.952 - 0.942 is 1.0000000000000009 points in floating point,
        # and a drop of exactly the budget must pass "<= 1.0".
        drop = round(drop, 9)
        m["quality_drop"] = measurement("quality_drop", drop, unit="%" if task_type == TaskType.CAUSAL_LM else "points")
        m[_drop_name(task_type)] = measurement(_drop_name(task_type), drop)
        if task_type == TaskType.CAUSAL_LM:
            m["perplexity_ratio"] = measurement("perplexity_ratio", quality["value"] / bq)
        m["speedup"] = measurement("speedup", bl / card["latency_ms_p50"])
        m["compression"] = measurement("compression", bs / max(1, card["size_bytes"]))
        if card["latency_ms_p50"] > bl:
            notes.append("slower than the fp32 baseline")
        if card["size_bytes"] > bs:
            notes.append("larger than the fp32 baseline")
    return Candidate(name=name, params=params, path=str(path), measurements=m, notes=tuple(notes))


def _half_width(q: dict[str, Any]) -> float | None:
    lo, hi = q.get("ci95", [None, None])
    return None if lo is None or math.isnan(lo) else (hi - lo) / 2


# ------------------------------------------------------------------------------------------------------
# The search
# ------------------------------------------------------------------------------------------------------


def param_key(p: dict[str, Any]) -> str:
    return f"d{p['depth']}-h{_fmt(p['heads'])}-f{_fmt(p['ffn'])}-v{int(p['vocab'])}-{p['precision']}"


ELAPSED = "elapsed.json"  # the search's seconds over all its runs, updated before each trial


def _json_dump(path: Path, obj: Any, indent: int | None = 2) -> None:
    """Write ``obj`` as JSON atomically (a temporary sibling renamed into place), creating the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=indent, default=str))
    os.replace(tmp, path)


def check_tuning_split(what: str, record: dict[str, Any], task: TaskData, log=None) -> None:
    """Refuse a model trained with another tuning split than ``task``'s: the search judges candidates on the
    tuning split, and part of it would be examples the model was trained on. A model saved before records
    carried the split's fingerprint is let through (with a note to ``log``, if given)."""
    recorded = (record.get("data") or {}).get("tuning_fingerprint")
    if recorded is None:
        if log is not None:
            log(f"{what} records no tuning-split fingerprint (an older slimformer made it): cannot check that it "
                "was trained with this tuning split; if not, the search's tuning scores are optimistic")
        return
    current = task.tuning_fingerprint()
    if recorded != current:
        raise SlimformerError(
            f"{what} was trained with another tuning split (fingerprint {recorded}, this data gives {current}), so "
            "the search would judge candidates on examples it trained on; fine-tune / distil it again with this "
            "version of slimformer on this data and --seed"
        )


def prepare_teacher(model: str, task: TaskData, config: SearchConfig, out: Path, progress: bool,
                    log=None) -> Path:
    """The fine-tuned teacher: the given model if it already has a head for the task (and was trained with
    this task's tuning split), else fine-tuned once."""
    from slimformer import api

    path, is_local = models.resolve_model_path(model)
    record = models.read_record(path) if is_local else {}
    if record.get("task", {}).get("type") == str(task.type):
        if record["task"].get("label_names") not in (None, task.label_names):
            raise SlimformerError(f"model {model} was fine-tuned for labels {record['task']['label_names']}, the "
                                  f"data has {task.label_names}; use matching data or the base model")
        check_tuning_split(f"model {model}", record, task, log)
        return Path(path)
    teacher = out / "teacher"
    if not (teacher / models.RECORD_FILE).exists():
        with _building(teacher):  # workers starting together fine-tune the teacher once
            if not (teacher / models.RECORD_FILE).exists():
                if task.type == TaskType.CAUSAL_LM:
                    # A pretrained LM already has its head: it is the teacher as it is (fine-tune it first with
                    # `slimformer finetune` for a domain-adapted one).
                    models.save(models.load(model, task.type), teacher)
                else:
                    api.finetune(model, task, config.finetune, teacher, progress=progress)
    return teacher


def given_students(config: SearchConfig, teacher: models.SlimModel, task: TaskData | None = None,
                   log=None) -> dict[int, Path]:
    """The user's distilled students by depth, each loaded once and checked against the teacher before any
    work: a student the search cannot use (another task, labels or tokenizer, no smaller than the teacher,
    trained with another tuning split than ``task``'s) would otherwise fail trial after trial, be scored
    against a teacher whose outputs it never learnt, or be judged on examples it trained on."""
    from slimformer.arch import adapter_for
    from slimformer.stages.distill import check_same_tokenizer

    n_layers = len(adapter_for(teacher.model).get_layers(teacher.model))
    out: dict[int, Path] = {}
    for given in config.students:
        path = Path(given).expanduser().resolve()
        try:
            models.resolve_model_path(path)  # a folder with a config and safetensors weights
        except SlimformerError as e:
            raise SlimformerError(f"student: {e}") from None
        record = models.read_record(path)
        rec_type = record.get("task", {}).get("type")
        if rec_type and rec_type != str(teacher.task_type):
            raise SlimformerError(f"student {given} was trained for {rec_type}, the teacher for {teacher.task_type}; "
                                  "give a student distilled from this teacher")
        if record.get("quantization") or record.get("vocab_map"):
            raise SlimformerError(f"student {given} is quantized or has a pruned vocabulary; give it as distilled: "
                                  "the search prunes and quantizes it itself")
        if task is not None:
            check_tuning_split(f"student {given}", record, task, log)
        try:
            slim = models.load(path, teacher.task_type)
        except SlimformerError as e:
            raise SlimformerError(f"student: {e}") from None
        if slim.label_names != teacher.label_names:
            raise SlimformerError(f"student {given} predicts labels {slim.label_names}, the teacher "
                                  f"{teacher.label_names}; give a student distilled from this teacher")
        try:
            check_same_tokenizer(teacher, slim.tokenizer)
        except SlimformerError:
            raise SlimformerError(f"student {given} has another tokenizer vocabulary than the teacher; give a student "
                                  "distilled from this teacher (slimformer distill keeps its tokenizer)") from None
        depth = len(adapter_for(slim.model).get_layers(slim.model))
        del slim
        if depth >= n_layers:
            raise SlimformerError(f"student {given} has {depth} layers, the teacher {n_layers}; give a student with "
                                  "fewer layers (the teacher itself is always searched)")
        if depth in out:
            raise SlimformerError(f"students {out[depth]} and {path} both have depth {depth}; give one student "
                                  "per depth")
        out[depth] = path
    return out


# Settings that shape what a search folder caches: students, pruned models and converted candidates are keyed
# by their shape only, and finished candidates hold numbers measured under the protocol. The space's ranges
# (depths, heads, ...) may change on resume: they only change what is sampled next.
_BUILD_SETTINGS = ("kd_epochs", "kd_max_examples", "kd_learning_rate", "temperature", "alpha", "recovery_epochs",
                   "recovery_max_examples", "recovery_augment", "calibration_examples")
_PROTOCOL_SETTINGS = ("seed", "batch", "seq", "throughput_batch", "threads", "runs", "finetune")


def _setup_of(config: SearchConfig) -> dict[str, Any]:
    d = config.model_dump(mode="json")
    return {**{k: d["space"][k] for k in _BUILD_SETTINGS}, **{k: d[k] for k in _PROTOCOL_SETTINGS}}


def _check_same_setup(out: Path, config: SearchConfig, students: dict[int, Path]) -> None:
    """A search resumed in a folder must be the same search: other students or other training or measurement
    settings would mix their numbers with the cached ones silently."""
    f = out / "search.json"
    if not f.exists():
        return
    before = json.loads(f.read_text())
    now = {str(d): str(p) for d, p in students.items()}
    if before.get("students", {}) != now:
        raise SlimformerError(f"{out} holds a search with other students ({before.get('students') or 'none given'})"
                              "; give the same --student options as before, or a new --out")
    old_config = before.get("config")
    if old_config is None:
        return
    try:
        was = _setup_of(SearchConfig(**old_config))
    except ValueError:
        raise SlimformerError(f"{out} holds a search written by another slimformer version; use a new --out") from None
    changed = [f"{k} {was[k]!r} -> {v!r}" for k, v in _setup_of(config).items() if was[k] != v]
    if changed:
        raise SlimformerError(f"{out} holds a search made with other settings ({'; '.join(changed)}): its cached "
                              "models and numbers would not match; use the same settings, or a new --out")


def _storage(config: SearchConfig, out: Path):
    import optuna
    from optuna.exceptions import ExperimentalWarning
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    url = config.storage or f"sqlite:///{(out / 'study.db').resolve()}"
    if url.startswith(("sqlite", "postgresql", "mysql")):
        # Heartbeats let a restarted search (or another worker) notice a trial whose process died, fail it
        # and run it again, so no finished work is lost and no candidate is left half-done. The grace period
        # is generous so that a live worker on a loaded machine, whose heartbeat thread may lag, keeps its trial.
        with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna since 2.8, and what we need
            warnings.simplefilter("ignore", ExperimentalWarning)
            return RDBStorage(url, heartbeat_interval=5, grace_period=60,
                              heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=2))
    if url.endswith(".log") or url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        return JournalStorage(JournalFileBackend(url.removeprefix("journal:")))
    return optuna.storages.get_storage(url)


def _sampler(config: SearchConfig, space: dict[str, list[Any]], worker: bool = False):
    import optuna

    # Workers draw their own seed: with the same one they would all propose the same candidates.
    seed = None if worker else config.seed
    if config.strategy == Strategy.GRID:
        return optuna.samplers.GridSampler(space, seed=seed)
    if config.strategy == Strategy.RANDOM:
        return optuna.samplers.RandomSampler(seed=seed)
    if config.strategy == Strategy.NSGA2:
        return optuna.samplers.NSGAIISampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=8, multivariate=True)


def reference_params(n_layers: int) -> list[dict[str, Any]]:
    """Trials every study starts with: the fp32 baseline and ONNX Runtime dynamic int8 of the baseline."""
    base = {"depth": n_layers, "heads": 0.0, "ffn": 0.0, "vocab": False}
    return [{**base, "precision": Precision.FP32.value}, {**base, "precision": Precision.ORT_INT8.value}]


def seed_params(space: SearchSpace, n_layers: int, student_depths: Sequence[int] = ()) -> list[dict[str, Any]]:
    """A few promising points tried early, then the sampler explores. At the depth of each given student (the
    user made them to be tried), or else at the middle searched depth, in each ONNX Runtime integer precision:
    first the least pruned point (cheap: no pruning and no recovery training, and often the safest under a
    quality budget), then the most pruned one (the largest gain, if its quality holds)."""
    depths = space.resolved_depths(n_layers)
    seed_depths = sorted(set(student_depths)) or [depths[len(depths) // 2]]
    precisions = [p for p in (Precision.ORT_STATIC_INT8, Precision.ORT_INT8, Precision.ORT_INT8_EMB4)
                  if p in space.precisions]
    least = {"heads": min(space.heads), "ffn": min(space.ffn), "vocab": False not in space.vocab}
    most = {"heads": max(space.heads), "ffn": max(space.ffn), "vocab": True in space.vocab}
    out: list[dict[str, Any]] = []
    for cut in (least, most):
        for depth in seed_depths:
            for prec in precisions:
                point = {"depth": depth, **cut, "precision": prec.value}
                if point not in out:
                    out.append(point)
    return out


def unmeasured_point(space: dict[str, list[Any]], known: set[str], rng: random.Random) -> dict[str, Any] | None:
    """A point of ``space`` (name -> choices) whose :func:`param_key` is not in ``known``, drawn with
    ``rng``; None when every point is known."""
    names = list(space)
    points = [dict(zip(names, values, strict=True)) for values in itertools.product(*space.values())]
    fresh = [p for p in points if param_key(p) not in known]
    return rng.choice(fresh) if fresh else None


def _known_keys(study) -> set[str]:
    """Keys of the measured candidates and of the points queued to be tried."""
    import optuna

    queued = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,))
    fixed = [t.system_attrs.get("fixed_params") or {} for t in queued]
    return {c.name for c in collect(study)} | {param_key(p) for p in fixed if p}


def _owner() -> dict[str, Any]:
    """Who runs a trial: enough to tell later whether that process still lives."""
    import psutil

    return {**distributed.host(), "pid": os.getpid(), "started": psutil.Process().create_time()}


def _dead(trial, grace_s: float) -> bool:
    """Whether a RUNNING trial's process is provably gone: a process of this machine that no longer exists,
    or, for a trial that never recorded its owner (an older search, or killed at its very start), one that
    started more than ``grace_s`` ago. A trial run on another machine is never declared dead here: only the
    storage's heartbeat can tell (RDB storages fail it once it stops beating)."""
    import datetime

    import psutil

    owner = trial.user_attrs.get("worker")
    if owner is None:
        started = trial.datetime_start
        return started is None or (datetime.datetime.now() - started).total_seconds() > grace_s
    if not distributed.same_host(owner):
        return False
    try:
        return abs(psutil.Process(owner["pid"]).create_time() - owner["started"]) > 0.01
    except psutil.Error:
        return True


def _stale_trials_to_fail(study, grace_s: float = 30.0) -> None:
    """Trials left RUNNING by a killed run are failed and their parameters queued again. Only dead ones
    (:func:`_dead`): a live worker's trial, here or on another machine, keeps running."""
    import optuna

    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if not _dead(t, grace_s):
            continue
        try:
            study._storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # it finished (or was failed by another process) meanwhile
        study.enqueue_trial(t.params, skip_if_exists=False)


def run_search(model: str, task: TaskData, config: SearchConfig, out: str | os.PathLike, *, worker: bool = False,
               progress: bool = True, log=print) -> dict[str, Any]:
    """Run (or resume) a search and deliver the frontier, the choice, its confirmation and the report."""
    import optuna

    budget = parse_budget(config.budget.replace("quality_drop", _drop_name(task.type))
                          if "quality_drop" in config.budget else config.budget)
    check_budget_for_task(budget, task.type)
    out = models.check_out_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    earlier_s = json.loads((out / ELAPSED).read_text())["seconds"] if (out / ELAPSED).exists() else 0.0
    threads = config.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    teacher_path = prepare_teacher(model, task, config, out, progress, log=log)
    builder = Builder(out, teacher_path, task, config, progress)
    n_layers = builder.teacher.config.num_hidden_layers
    students = given_students(config, builder.teacher, task, log=log)
    _check_same_setup(out, config, students)
    builder.students = students
    space_lists = {
        # A given student's depth is always searched: the user made it to be tried.
        "depth": sorted(set(config.space.resolved_depths(n_layers)) | set(students), reverse=True),
        "heads": list(config.space.heads),
        "ffn": list(config.space.ffn),
        # A language model's vocabulary is its output space: pruning it would give unseen tokens no probability.
        "vocab": [False] if task.type == TaskType.CAUSAL_LM else list(config.space.vocab),
        "precision": [p.value for p in config.space.precisions],
    }
    baseline = _baseline(out, teacher_path, task, config, threads)
    objective_q = OBJECTIVES[config.objective]
    goal = "maximize" if objective_q == "throughput" else "minimize"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = _storage(config, out)
    study = optuna.create_study(storage=storage, study_name="slimformer", load_if_exists=True,
                                directions=["minimize", goal], sampler=_sampler(config, space_lists, worker))
    if not worker:
        _stale_trials_to_fail(study)
    # Whoever comes first (coordinator or worker) queues the seeds, once: skip_if_exists looks at every
    # trial, and the lock keeps two processes from queueing them at the same moment.
    with distributed.file_lock(out / ".locks" / "enqueue.lock"):
        seeds = [{**p, "vocab": p["vocab"] and True in space_lists["vocab"]}
                 for p in seed_params(config.space, n_layers, list(students))]
        for p in seeds:
            study.enqueue_trial(p, skip_if_exists=True)
    _json_dump(out / "search.json", {"model": model, "data": task.source, "config": config.model_dump(mode="json"),
                                     "students": {str(d): str(p) for d, p in students.items()}})

    def measured(p: dict[str, Any], store) -> tuple[Candidate, bool]:
        """The candidate of ``p`` and whether it was measured before; a new one is handed to ``store``
        while the lock is held. One process at a time per parameter set: a worker that draws a point
        another is measuring waits, then reuses its numbers."""
        key = param_key(p)
        with distributed.file_lock(out / ".locks" / f"{key}.lock"):
            done = _finished_candidate(study, key)
            if done is not None:  # a repeat of a finished point: reuse its numbers, measure nothing twice
                return done, True
            if p == reference_params(n_layers)[0]:  # the fp32 baseline itself: one measurement, not two
                cand = make_candidate(key, {**p, "measured_on": baseline.get("measured_on") or distributed.host()},
                                      teacher_path, baseline["quality"], baseline["cost"], baseline, task.type)
            else:
                t0 = time.time()
                path = builder.artifact(p)
                quality = _tuning_quality(out, key, path, task, threads)
                card = _cost(path, config)
                cand = make_candidate(key, p, path, quality, card, baseline, task.type)
                given = {"student": str(students[p["depth"]])} if p["depth"] in students else {}
                cand = Candidate(**{**vars(cand), "params": {**p, **given, "seconds": round(time.time() - t0, 1),
                                                             "measured_on": distributed.host()}})
            store(cand)
        return cand, False

    def report(what: str, cand: Candidate) -> None:
        if progress:
            m = cand.measurements
            log(f"{what}: {cand.name}: quality {m['quality'].value:.4f}, "
                f"{objective_q} {m[objective_q].value:.3f}, drop {m['quality_drop'].value:+.2f}")

    # The references are measured first and stored as trials without sampled parameters: they need not lie
    # in the space (a space of 3-layer int8 points still compares with the fp32 teacher), and a sampler
    # never sees values outside its choices.
    def store_reference(cand: Candidate) -> None:
        study.add_trial(optuna.trial.create_trial(
            values=[cand.value("quality_drop"), cand.value(objective_q)],
            user_attrs={"candidate": cand.to_dict(), "worker": _owner(), "reference": True}))

    for p in reference_params(n_layers):
        cand, before = measured(p, store_reference)
        if not before:
            report("reference", cand)

    repeat = {"last": False}  # whether the latest trial only reused a finished candidate

    def objective(trial) -> tuple[float, float]:
        trial.set_user_attr("worker", _owner())
        p = {
            "depth": trial.suggest_categorical("depth", space_lists["depth"]),
            "heads": trial.suggest_categorical("heads", space_lists["heads"]),
            "ffn": trial.suggest_categorical("ffn", space_lists["ffn"]),
            "vocab": trial.suggest_categorical("vocab", space_lists["vocab"]),
            "precision": trial.suggest_categorical("precision", space_lists["precision"]),
        }
        repeat["last"] = False
        cand, before = measured(p, lambda c: trial.set_user_attr("candidate", c.to_dict()))
        repeat["last"] = before
        if before:
            trial.set_user_attr("reused", True)
            trial.set_user_attr("candidate", cand.to_dict())
        report(f"trial {trial.number}", cand)
        return cand.value("quality_drop"), cand.value(objective_q)

    durations: list[float] = []
    # Every point of the space, plus the references that lie outside it.
    space_size = math.prod(len(v) for v in space_lists.values()) + sum(
        any(r[k] not in space_lists[k] for k in space_lists) for r in reference_params(n_layers))
    while True:
        if not worker:
            _json_dump(out / ELAPSED, {"seconds": earlier_s + time.time() - t_start})
        # `trials` counts distinct measured candidates: a sampler that proposes a finished point again gets
        # its numbers back for free, and that repeat does not use up the budget. A sampler that keeps
        # proposing known points (a small space, nearly exhausted) is stopped after a bounded number of tries.
        distinct = len(collect(study))
        if distinct >= min(config.trials, space_size):
            break
        if len(study.trials) >= 3 * config.trials + 10:
            log(f"the sampler keeps proposing measured points: stopping with {distinct} candidates")
            break
        if config.time_budget_s is not None:
            elapsed = time.time() - t_start
            # The longest candidate so far, not the median: a precision variant of a cached pruned model takes
            # ~30 s and a new pruning with recovery ~4 min, and the median started a 4-minute one near the end.
            expected = max(durations, default=0.0)
            if elapsed + expected > config.time_budget_s:
                log(f"time budget: {elapsed:.0f} s used, next candidate would take ~{expected:.0f} s; stopping")
                break
        t0 = time.time()
        # A candidate that fails (an export a backend cannot run, say) is recorded as failed; the search goes on.
        study.optimize(objective, n_trials=1, catch=(Exception,))
        if not repeat["last"]:  # a repeat costs nothing: only measured (or failed) trials predict the next one
            durations.append(time.time() - t0)
        else:
            # TPE on a small categorical space keeps proposing points it measured (6 of 8 trials in a row in a
            # CoNLL search): the next trial tries an unmeasured point instead, drawn at random (seeded).
            fresh = unmeasured_point(space_lists, _known_keys(study), random.Random(config.seed + len(study.trials)))
            if fresh is not None:
                study.enqueue_trial(fresh)

    if worker:
        return {"out": str(out), "trials": len(study.trials)}
    # The summary counts the search's time over every run of it (a killed and resumed search, or one run
    # again to finish with other settings), not only this run's: a resumed search that found every point
    # measured would otherwise say it took no time.
    seconds = earlier_s + time.time() - t_start
    _json_dump(out / ELAPSED, {"seconds": seconds})
    return finish(study, out, task, config, budget, baseline, teacher_path, threads, seconds,
                  model=model, log=log, students=students)


def _finished_candidate(study, key: str) -> Candidate | None:
    """A measured candidate for ``key``. A RUNNING trial counts once it holds one: the candidate is stored as
    the objective's last step, so another worker may see it a moment before that trial completes."""
    import optuna

    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.RUNNING)
    for t in study.get_trials(deepcopy=False, states=states):
        c = t.user_attrs.get("candidate")
        if c and c["name"] == key:
            return Candidate.from_dict(c)
    return None


def _baseline(out: Path, teacher_path: Path, task: TaskData, config: SearchConfig, threads: int) -> dict[str, Any]:
    """The fp32 teacher: its tuning quality (once per search) and its cost on this host. Speed-ups divide
    latencies, which only compare on one machine, so each host measures the baseline for itself:
    ``baseline.json`` is the first host's, ``baseline-<host>.json`` any other's."""
    me = distributed.host()
    shared = out / "baseline.json"
    with distributed.file_lock(out / ".locks" / "baseline.lock"):  # workers on one host measure it once
        first = json.loads(shared.read_text()) if shared.exists() else None
        if first is not None and distributed.same_host(first.get("measured_on")):
            return first
        f = shared if first is None else out / f"baseline-{re.sub(r'[^A-Za-z0-9._-]', '_', me['host'])}.json"
        if f.exists():
            return json.loads(f.read_text())
        quality = first["quality"] if first else _tuning_quality(out, BASELINE_UNITS, teacher_path, task, threads)
        base = {"path": str(teacher_path), "quality": quality, "cost": _cost(teacher_path, config), "measured_on": me}
        _json_dump(f, base)
        return base


def _measured_here(candidates: list[Candidate], budget: list[Constraint], objective_q: str, config: SearchConfig,
                   baseline: dict[str, Any], fp32_name: str, task_type: TaskType, log=print) -> list[Candidate]:
    """Latency and memory only compare on one machine. The candidates that decide the outcome (the Pareto
    front and the choice under the budget) that a worker measured on another host are measured again here,
    until every deciding candidate was measured on this host. The others keep their numbers, with a note."""
    cands = {c.name: c for c in candidates}
    while True:
        current = list(cands.values())
        chosen = choose(current, budget, objective_q, config.tie_tolerance)
        deciding = pareto_front(current, [objective_q, "quality"]) + ([chosen] if chosen else [])
        todo = {c.name: c for c in deciding if not distributed.same_host(c.params.get("measured_on"))}
        if not todo:
            break
        for c in todo.values():
            was = c.params["measured_on"]
            log(f"measuring {c.name} again on this host (a worker measured it on {was['host']})")
            # The fp32 reference is the baseline itself, already measured here.
            card = baseline["cost"] if c.name == fp32_name else _cost(Path(c.path), config)
            q = c.measurements["quality"]
            ci = [q.value - q.spread, q.value + q.spread] if q.spread is not None else [math.nan, math.nan]
            quality = {"value": q.value, "n": q.n, "ci95": ci}
            params = {**c.params, "measured_on": distributed.host(), "first_measured_on": was}
            again = make_candidate(c.name, params, Path(c.path), quality, card, baseline, task_type)
            bounds = {k: m for k, m in c.measurements.items() if k.endswith("_upper")}  # quality: unchanged
            cands[c.name] = Candidate(**{**vars(again), "measurements": {**again.measurements, **bounds}})
    out = []
    for c in cands.values():
        where = c.params.get("measured_on")
        if not distributed.same_host(where):
            c = Candidate(**{**vars(c), "notes": (*c.notes, f"cost measured on another host ({where['host']})")})
        out.append(c)
    return out


def collect(study) -> list[Candidate]:
    """Finished candidates of a study, one per parameter set (repeats collapse)."""
    import optuna

    seen: dict[str, Candidate] = {}
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        c = t.user_attrs.get("candidate")
        if c and c["name"] not in seen:
            seen[c["name"]] = Candidate.from_dict(c)
    return list(seen.values())


def finish(study, out: Path, task: TaskData, config: SearchConfig, budget: list[Constraint], baseline: dict[str, Any],
           teacher_path: Path, threads: int, seconds: float, *, model: str, log=print,
           students: dict[int, Path] | None = None) -> dict[str, Any]:
    """Frontier, choice under the budget, confirmation on the eval split, export and report."""
    from slimformer import report
    from slimformer.evaluate import paired_drop_quantiles

    objective_q = OBJECTIVES[config.objective]
    candidates = collect(study)
    if not candidates:
        raise SlimformerError("no candidate finished; look at the errors above, or give the search more time")
    ref_names = [param_key(p) for p in reference_params(_depth_of(teacher_path))]
    if config.confidence is not None:
        candidates = with_drop_bounds(candidates, out, task, teacher_path, config.confidence, threads, log=log)
    choice_budget = bounded_budget(budget, config.confidence)
    candidates = _measured_here(candidates, choice_budget, objective_q, config, baseline, ref_names[0], task.type,
                                log=log)
    front = pareto_front(candidates, [objective_q, "quality"])
    chosen = choose(candidates, choice_budget, objective_q, config.tie_tolerance)
    references = [c for c in candidates if c.name in ref_names]

    confirmation: dict[str, Any] = {}
    eval_budget_holds = None
    if chosen is not None:
        log(f"chosen: {chosen.name}; confirming on the eval split ({task.eval_source})")
        base_eval = _quality(teacher_path, task, "eval", 1000, threads, units=True)
        chosen_eval = _quality(Path(chosen.path), task, "eval", 1000, threads, units=True)
        # The drop's own interval: paired over the eval examples, far narrower than the two scores' intervals.
        drop_ci = paired_drop_quantiles(base_eval, chosen_eval, (0.025, 0.975))
        base_eval.pop("units", None), chosen_eval.pop("units", None)
        confirmation = {"baseline": base_eval, "chosen": chosen_eval, "quality_drop_on_eval_ci95": drop_ci}
        ort_ref = next((c for c in references if c.params.get("precision") == Precision.ORT_INT8.value), None)
        if ort_ref is not None:
            confirmation["ort_int8_baseline"] = _quality(Path(ort_ref.path), task, "eval", 1000, threads)
        chosen_on_eval = make_candidate(chosen.name, chosen.params, Path(chosen.path), chosen_eval,
                                        _card_of(chosen), {"quality": base_eval, "cost": baseline["cost"]}, task.type)
        quality_constraints = [k for k in budget if k.quantity in ("quality_drop", _drop_name(task.type), "quality",
                                                                   "perplexity_ratio")]
        eval_budget_holds = within_budget(chosen_on_eval, quality_constraints)
        confirmation["quality_drop_on_eval"] = chosen_on_eval.value("quality_drop")
        confirmation["budget_holds_on_eval"] = eval_budget_holds
        if config.confirm_rounds:
            log(f"re-timing the baseline, its ORT int8 and the chosen point side by side ({config.confirm_rounds} "
                "rounds)")
            paths = {"baseline": teacher_path, "chosen": Path(chosen.path)}
            if ort_ref is not None:
                paths["ort_int8_baseline"] = Path(ort_ref.path)
            confirmation["timing"] = side_by_side_timing(paths, config)
        best = out / "best"
        report.deliver_best(chosen, best, task, confirmation, config, model=model, data=task.source)
    summary = {
        "out": str(out), "seconds": seconds, "objective": objective_q, "budget": [str(b) for b in budget],
        "confidence": config.confidence,
        "candidates": [c.to_dict() for c in candidates], "front": [c.name for c in front],
        "chosen": chosen.to_dict() if chosen else None, "references": [c.name for c in references],
        "baseline": baseline, "confirmation": confirmation, "task": task.describe(),
        "failed_trials": sum(1 for t in study.trials if t.state.name == "FAIL"),
        "students": {str(d): str(p) for d, p in (students or {}).items()},
    }
    _json_dump(out / "summary.json", summary)
    report.write_report(out, summary, config, model=model)
    if chosen is None:
        log("no candidate meets the budget on the tuning split; see the report for the frontier")
    elif not eval_budget_holds:
        log("the chosen candidate does NOT meet the budget on the eval split; see the report")
    return summary


def _depth_of(path: Path) -> int:
    cfg = json.loads((Path(path) / "config.json").read_text())
    return int(cfg.get("num_hidden_layers") or cfg.get("n_layer"))


def _card_of(c: Candidate) -> dict[str, Any]:
    m = c.measurements
    return {"latency_ms_p50": m["latency_ms"].value, "latency_ms_p95": m["latency_ms_p95"].value,
            "runs": m["latency_ms"].n or 0, "throughput_batch_per_s": m["throughput"].value,
            "size_bytes": m["size_mb"].value * 1e6, "peak_rss_mb": m["memory_mb"].value,
            "parameters": m["parameters"].value if "parameters" in m else None}
