"""The ``slimformer`` command: a thin typer layer over the Python API (no logic of its own).

User errors print one line ``error: ...`` on stderr and exit with code 2, never a traceback.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from slimformer.errors import SlimformerError, validation_line

app = typer.Typer(
    name="slimformer",
    help="Make a pretrained transformer small and fast for one task, with measured numbers.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console(stderr=True)
out_console = Console()

# ---- shared options --------------------------------------------------------------------------------
ModelOpt = Annotated[str, typer.Option("--model", "-m", help="model: short name (minilm), folder or hub id org/name")]
DataOpt = Annotated[str, typer.Option("--data", "-d", help="data folder (train.* + dev.*/test.*), file or hub id")]
TaskOpt = Annotated[str | None, typer.Option(
    "--task", help="sequence-classification | token-classification | causal-lm (inferred from the data if omitted)")]
TextColOpt = Annotated[str | None, typer.Option("--text-column", help="text column of tsv/csv/jsonl data")]
LabelColOpt = Annotated[str | None, typer.Option("--label-column", help="label column of tsv/csv/jsonl data")]
LabelsOpt = Annotated[str | None, typer.Option("--labels", help="declared label set, comma-separated")]
EvalSplitOpt = Annotated[str | None, typer.Option("--eval-split", help="held-out file to score: test or dev")]
TuningSplitOpt = Annotated[str | None, typer.Option(
    "--tuning-split", help="where the tuning split (checkpoint choice, search) comes from: carve (a share of "
                           "train, the default) or dev (the dev file, when test is the eval split)")]
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="output folder (written atomically)")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print machine-readable JSON on stdout")]
SeedOpt = Annotated[int, typer.Option("--seed", help="random seed")]
MaxTrainOpt = Annotated[int | None, typer.Option(
    "--max-train-examples", help="use only N training examples (causal-lm: blocks of --max-length tokens)")]
MaxEvalOpt = Annotated[int | None, typer.Option("--max-eval-examples", help="score only N examples")]
EpochsOpt = Annotated[float, typer.Option("--epochs", help="passes over the training data")]
LrOpt = Annotated[float, typer.Option("--lr", help="peak learning rate")]
TrainBatchOpt = Annotated[int, typer.Option("--batch-size", help="training batch size")]
MaxLenOpt = Annotated[int, typer.Option("--max-length", help="truncate inputs to N tokens")]
EvalsOpt = Annotated[int, typer.Option("--evals-per-epoch", help="tuning-split evaluations per epoch")]
PrecisionOpt = Annotated[str, typer.Option("--precision", help="auto (bf16 where fast) | bf16 | fp32")]


def _task_data(data: str, task: str | None, text_column: str | None, label_column: str | None,
               labels: str | None, eval_split: str | None = None, seed: int = 0,
               max_train_examples: int | None = None, max_eval_examples: int | None = None, *,
               tuning_split: str | None = None):
    from slimformer.tasks import TaskType, load_task_data

    if task is not None:
        try:
            task = TaskType(task)
        except ValueError:
            raise SlimformerError(f"unknown task '{task}'; use one of {', '.join(t.value for t in TaskType)}") from None
    label_list = [x.strip() for x in labels.split(",")] if labels else None
    return load_task_data(data, task, text_column=text_column, label_column=label_column, labels=label_list,
                          eval_split=eval_split, seed=seed, max_train_examples=max_train_examples,
                          max_eval_examples=max_eval_examples, tuning_split=tuning_split)


def _config(cls, **values: Any):
    """Build a stage config; pydantic errors become one line naming the field and the fix."""
    from pydantic import ValidationError

    try:
        return cls(**{k: v for k, v in values.items() if v is not None})
    except ValidationError as e:
        raise SlimformerError(f"invalid setting {validation_line(e)}") from None


def _one_process(command: str) -> None:
    """Refuse a multi-process launch for commands whose every process would write the same output."""
    from slimformer import distributed

    if distributed.world_size() > 1:
        raise SlimformerError(f"slimformer {command} runs as one process, not under torchrun or accelerate launch; "
                              "start it directly (finetune and distill run on several; a search scales out "
                              "with --worker processes)")


def _print_json(obj: Any) -> None:
    out_console.print_json(json.dumps(obj, default=str))


@contextlib.contextmanager
def _stdout_for(json_out: bool):
    """With --json, stdout carries only the JSON: everything libraries print goes to stderr meanwhile."""
    if not json_out:
        yield
        return
    with contextlib.redirect_stdout(sys.stderr):
        yield


# ---- commands --------------------------------------------------------------------------------------


@app.command()
def finetune(
    model: ModelOpt = "minilm",
    data: DataOpt = ...,
    out: OutOpt = ...,
    task: TaskOpt = None,
    method: Annotated[str, typer.Option(help="full | lora | top-k")] = "full",
    top_k: Annotated[int, typer.Option("--top-k", help="with --method top-k: layers to train")] = 2,
    lora_r: Annotated[int, typer.Option(help="LoRA rank")] = 8,
    epochs: EpochsOpt = 3.0,
    lr: LrOpt = 5e-5,
    batch_size: TrainBatchOpt = 32,
    max_length: MaxLenOpt = 128,
    evals_per_epoch: EvalsOpt = 1,
    precision: PrecisionOpt = "auto",
    report_to: Annotated[list[str] | None, typer.Option(help="tensorboard and/or mlflow")] = None,
    max_train_examples: MaxTrainOpt = None,
    max_eval_examples: MaxEvalOpt = None,
    text_column: TextColOpt = None,
    label_column: LabelColOpt = None,
    labels: LabelsOpt = None,
    eval_split: EvalSplitOpt = None,
    tuning_split: TuningSplitOpt = None,
    seed: SeedOpt = 0,
    json_out: JsonOpt = False,
) -> None:
    """Fine-tune a model on a task, keep the best checkpoint on the tuning split, score the eval split."""
    from slimformer import api
    from slimformer.models import check_out_dir
    from slimformer.stages.finetune import FinetuneConfig

    check_out_dir(out)
    td = _task_data(data, task, text_column, label_column, labels, eval_split, seed, max_train_examples,
                    max_eval_examples, tuning_split=tuning_split)
    cfg = _config(FinetuneConfig, method=method, top_k=top_k, lora_r=lora_r, epochs=epochs, learning_rate=lr,
                  batch_size=batch_size, max_length=max_length, evals_per_epoch=evals_per_epoch,
                  precision=precision, report_to=report_to or [], seed=seed, max_train_examples=max_train_examples)
    with _stdout_for(json_out):
        result = api.finetune(model, td, cfg, out, progress=not json_out)
    _report_quality(result, json_out, title=f"fine-tuned model saved to {out}")


@app.command()
def distill(
    teacher: Annotated[str, typer.Option("--teacher", "-t", help="fine-tuned teacher folder")] = ...,
    data: DataOpt = ...,
    out: OutOpt = ...,
    layers: Annotated[str, typer.Option(help="student depth (e.g. 3: evenly spaced) or teacher layers (0,2,4)")] = "3",
    alpha: Annotated[float, typer.Option(help="weight of hard-label CE; 1.0 trains without the teacher")] = 0.5,
    temperature: Annotated[float, typer.Option("--temperature", "-T", help="soft-target temperature")] = 2.0,
    hidden_weight: Annotated[float, typer.Option(help="hidden-state MSE weight")] = 0.0,
    attention_weight: Annotated[float, typer.Option(help="attention KL weight")] = 0.0,
    cache_teacher: Annotated[bool, typer.Option(help="reuse teacher logits across epochs")] = False,
    augment: Annotated[int, typer.Option(help="unlabeled augmented copies of each training text (masked/swapped "
                                              "words, n-gram spans) learnt from the teacher alone")] = 0,
    transfer_text: Annotated[Path | None, typer.Option(help="plain-text file of unlabeled in-domain text, one "
                                                             "example per line, learnt from the teacher alone")] = None,
    task: TaskOpt = None,
    epochs: EpochsOpt = 3.0,
    lr: LrOpt = 1e-4,
    batch_size: TrainBatchOpt = 32,
    max_length: MaxLenOpt = 128,
    evals_per_epoch: EvalsOpt = 1,
    precision: PrecisionOpt = "auto",
    max_train_examples: MaxTrainOpt = None,
    max_eval_examples: MaxEvalOpt = None,
    text_column: TextColOpt = None,
    label_column: LabelColOpt = None,
    labels: LabelsOpt = None,
    eval_split: EvalSplitOpt = None,
    tuning_split: TuningSplitOpt = None,
    seed: SeedOpt = 0,
    json_out: JsonOpt = False,
) -> None:
    """Distil a fine-tuned teacher into a student with fewer layers (initialised from the teacher's)."""
    from slimformer import api
    from slimformer.models import check_out_dir
    from slimformer.stages.distill import DistillConfig

    check_out_dir(out)
    try:
        layer_list = [int(x) for x in layers.split(",")] if "," in layers else None
        depth = None if layer_list else int(layers)
    except ValueError:
        raise SlimformerError(f"--layers {layers!r} is neither a depth nor a list; write e.g. 3 or 0,2,4") from None
    td = _task_data(data, task, text_column, label_column, labels, eval_split, seed, max_train_examples,
                    max_eval_examples, tuning_split=tuning_split)
    cfg = _config(DistillConfig, num_layers=depth, layers=layer_list, alpha=alpha, temperature=temperature,
                  hidden_weight=hidden_weight, attention_weight=attention_weight, cache_teacher=cache_teacher,
                  augment=augment, transfer_text=str(transfer_text) if transfer_text else None,
                  epochs=epochs, learning_rate=lr, batch_size=batch_size, max_length=max_length,
                  evals_per_epoch=evals_per_epoch, precision=precision, seed=seed,
                  max_train_examples=max_train_examples)
    with _stdout_for(json_out):
        result = api.distill(teacher, td, cfg, out, progress=not json_out)
    _report_quality(result, json_out, title=f"student saved to {out}")


@app.command()
def evaluate(
    model: ModelOpt = ...,
    data: DataOpt = ...,
    task: TaskOpt = None,
    split: Annotated[str, typer.Option(help="train | tuning | eval")] = "eval",
    batch_size: Annotated[int, typer.Option(help="inference batch size")] = 64,
    max_length: MaxLenOpt = 128,
    bootstrap: Annotated[int, typer.Option(help="bootstrap resamples for the 95% interval")] = 1000,
    text_column: TextColOpt = None,
    label_column: LabelColOpt = None,
    labels: LabelsOpt = None,
    eval_split: EvalSplitOpt = None,
    tuning_split: TuningSplitOpt = None,
    max_eval_examples: MaxEvalOpt = None,
    seed: SeedOpt = 0,
    json_out: JsonOpt = False,
) -> None:
    """Score a model on a split with the task's metric and a bootstrap 95% interval."""
    from slimformer import api

    td = _task_data(data, task, text_column, label_column, labels, eval_split, seed,
                    max_eval_examples=max_eval_examples, tuning_split=tuning_split)
    with _stdout_for(json_out):
        result = api.evaluate(model, td, split=split, batch_size=batch_size, max_length=max_length,
                              bootstrap=bootstrap, progress=not json_out)
    _report_quality({"quality": result}, json_out, title=f"{model} on {td.eval_source if split == 'eval' else split}")


@app.command()
def measure(
    model: ModelOpt = ...,
    batch: Annotated[int, typer.Option("--batch", "-b", help="batch size")] = 1,
    seq: Annotated[int, typer.Option("--seq", "-s", help="sequence length in tokens")] = 128,
    threads: Annotated[int | None, typer.Option(help="intra-op threads (default: all cores)")] = None,
    runs: Annotated[int, typer.Option(help="timed runs (at least 30)", min=30)] = 50,
    warmup: Annotated[int, typer.Option(help="untimed warm-up runs")] = 10,
    device: Annotated[str, typer.Option(help="auto (GPU for plain PyTorch models when present) | cpu | cuda")] = (
        "auto"),
    task: TaskOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Measure a model's cost card: size, parameters, FLOPs, latency p50/p95, throughput, memory."""
    from slimformer import api

    with _stdout_for(json_out):
        card = api.measure(model, batch=batch, seq=seq, threads=threads, runs=runs, warmup=warmup, task=task,
                           device=device)
    if json_out:
        _print_json(card)
        return
    table = Table(title=f"cost card: {model}")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    for key in ("backend", "device", "parameters", "nonzero_parameters", "size_mb", "flops", "batch", "seq", "threads",
                "latency_ms_p50", "latency_ms_p95", "throughput_per_s", "peak_rss_mb", "peak_cuda_mb"):
        if key in ("device", "peak_cuda_mb") and key not in card:
            continue
        v = card.get(key)
        table.add_row(key, f"{v:,.3f}" if isinstance(v, float) else f"{v:,}" if isinstance(v, int) else str(v))
    hw = card["hardware"]
    table.add_row("cpu", f"{hw['cpu']} [{' '.join(hw['cpu_flags'])}]")
    out_console.print(table)
    if card.get("note"):
        out_console.print(f"[yellow]note:[/yellow] {card['note']}")


@app.command()
def serve(
    model_dir: Annotated[Path, typer.Argument(help="saved slimformer model folder (or its ONNX export)")],
    host: Annotated[str, typer.Option(help="address to listen on (0.0.0.0 exposes it to the network)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8000,
    backend: Annotated[str, typer.Option(help="auto (ONNX Runtime if model.onnx is present) | torch | onnx")] = "auto",
    batching: Annotated[bool, typer.Option("--batching/--no-batching", help="join concurrent requests")] = True,
    max_batch: Annotated[int, typer.Option(help="most texts in one forward pass")] = 32,
    max_wait_ms: Annotated[float, typer.Option(help="longest a request waits for others to join its batch")] = 5.0,
    max_texts: Annotated[int, typer.Option(help="most texts per request")] = 64,
    max_chars: Annotated[int, typer.Option(help="most characters per text")] = 5000,
    max_body_bytes: Annotated[int, typer.Option(help="largest request body in bytes")] = 1_000_000,
    max_queue: Annotated[int, typer.Option(help="requests waiting at once; beyond that 503")] = 1024,
    max_length: Annotated[int, typer.Option(help="tokens per text the model sees")] = 128,
    threads: Annotated[int | None, typer.Option(help="PyTorch intra-op threads (default: all cores)")] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level")] = "info",
) -> None:
    """Serve a model over HTTP: POST /predict, GET /health, /metadata, /metrics, /docs."""
    from slimformer.serve import ServeConfig
    from slimformer.serve import serve as _serve

    cfg = _config(ServeConfig, backend=backend, batching=batching, max_batch=max_batch, max_wait_ms=max_wait_ms,
                  max_texts=max_texts, max_chars=max_chars, max_body_bytes=max_body_bytes, max_queue=max_queue,
                  max_length=max_length, threads=threads)
    _serve(model_dir, cfg, host=host, port=port, log_level=log_level)


@app.command()
def prune(
    model: ModelOpt = ...,
    data: DataOpt = ...,
    out: OutOpt = ...,
    task: TaskOpt = None,
    heads: Annotated[float, typer.Option(help="fraction of attention heads to remove, e.g. 0.4")] = 0.0,
    ffn: Annotated[float, typer.Option(help="fraction of FFN neurons to remove, e.g. 0.4")] = 0.0,
    layers: Annotated[int | None, typer.Option("--layers", help="keep only the bottom N layers")] = None,
    drop_layers: Annotated[str | None, typer.Option(help="layer indices to remove, comma-separated: 4,5")] = None,
    vocab: Annotated[bool, typer.Option("--vocab", help="keep only the tokens the training data uses")] = False,
    vocab_corpus: Annotated[str | None, typer.Option(help="text file whose tokens define the kept vocabulary")] = None,
    importance: Annotated[str, typer.Option(help="magnitude | taylor")] = "taylor",
    importance_examples: Annotated[int, typer.Option(help="training examples for Taylor scores")] = 256,
    scope: Annotated[str, typer.Option(help="global | per-layer")] = "global",
    round_to: Annotated[int, typer.Option(help="round kept widths to multiples of 1, 8, 16 or 32")] = 1,
    steps: Annotated[int, typer.Option(help="pruning rounds, each followed by recovery")] = 1,
    recover: Annotated[str, typer.Option(help="recovery training: none | finetune | kd")] = "none",
    kd_alpha: Annotated[float, typer.Option(help="KD recovery: weight of the hard-label loss")] = 0.5,
    kd_temperature: Annotated[float, typer.Option(help="KD recovery: softmax temperature")] = 2.0,
    kd_augment: Annotated[int, typer.Option(help="KD recovery: unlabeled augmented copies of each training text "
                                                 "(soft targets only)")] = 0,
    kd_cache_teacher: Annotated[bool, typer.Option("--kd-cache-teacher", help="KD recovery: compute the "
                                                   "teacher's logits once and reuse them across epochs")] = False,
    unstructured: Annotated[float, typer.Option(help="fraction of block weights to zero by magnitude")] = 0.0,
    unstructured_scope: Annotated[str, typer.Option(help="global | per-layer")] = "global",
    epochs: Annotated[float, typer.Option(help="recovery passes over the training data per round")] = 1.0,
    lr: Annotated[float, typer.Option("--lr", help="recovery learning rate")] = 5e-5,
    batch_size: Annotated[int, typer.Option(help="training (and Taylor scoring) batch size")] = 32,
    max_length: MaxLenOpt = 128,
    precision: PrecisionOpt = "auto",
    max_train_examples: MaxTrainOpt = None,
    max_eval_examples: MaxEvalOpt = None,
    text_column: TextColOpt = None,
    label_column: LabelColOpt = None,
    labels: LabelsOpt = None,
    eval_split: EvalSplitOpt = None,
    tuning_split: TuningSplitOpt = None,
    seed: SeedOpt = 0,
    json_out: JsonOpt = False,
) -> None:
    """Prune heads, FFN neurons, layers, vocabulary (and single weights), recover, score the eval split."""
    _one_process("prune")
    from slimformer.models import check_out_dir
    from slimformer.stages.prune import PruneConfig, prune_job

    check_out_dir(out)
    try:
        dropped = tuple(int(x) for x in drop_layers.split(",") if x.strip()) if drop_layers else ()
    except ValueError:
        raise SlimformerError(f"--drop-layers {drop_layers!r} is not a list of layer indices; write e.g. 4,5") from None
    cfg = _config(PruneConfig, heads=heads, ffn=ffn, keep_layers=layers, drop_layers=dropped, vocab=vocab,
                  vocab_corpus=vocab_corpus, importance=importance, importance_examples=importance_examples,
                  scope=scope, round_to=round_to, steps=steps, recover=recover, kd_alpha=kd_alpha,
                  kd_temperature=kd_temperature, kd_augment=kd_augment, kd_cache_teacher=kd_cache_teacher,
                  unstructured=unstructured,
                  unstructured_scope=unstructured_scope, epochs=epochs, learning_rate=lr, batch_size=batch_size,
                  max_length=max_length, precision=precision, max_train_examples=max_train_examples, seed=seed)
    td = _task_data(data, task, text_column, label_column, labels, eval_split, seed, None, max_eval_examples,
                    tuning_split=tuning_split)
    with _stdout_for(json_out):
        result = prune_job(model, td, cfg, out, progress=not json_out)
    if not json_out:
        p = result["pruning"]
        out_console.print(f"kept {p['plan']['layers']} layers, {p['plan']['heads']} heads, {p['plan']['neurons']} "
                          f"FFN neurons, {p['plan']['vocab']} tokens; parameters {p['parameters_before']:,} -> "
                          f"{p['parameters_after']:,} ({p['parameter_ratio']:.2f}x)")
        if result.get("quality_before"):
            q = result["quality_before"]
            out_console.print(f"before pruning: {q['metric']} {q['value']:.4f} on {q['split']} ({q['n']} examples)")
    _report_quality(result, json_out, title=f"pruned model saved to {out}")


def _seconds(text: str | None) -> float | None:
    """'30m', '1h', '90s' or '600' -> seconds."""
    if text is None:
        return None
    import re

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([smh]?)\s*", text)
    if not m or float(m.group(1)) <= 0:
        raise SlimformerError(f"cannot read time budget '{text}'; write e.g. 45m, 1h or 600s")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]


@app.command()
def search(
    model: ModelOpt = "minilm",
    data: DataOpt = ...,
    out: OutOpt = ...,
    budget: Annotated[str, typer.Option(help="constraints, e.g. 'accuracy_drop<=1.0,latency_ms<=5'")] = (
        "quality_drop<=1.0"),
    objective: Annotated[str, typer.Option(help="latency | size | throughput | memory")] = "latency",
    confidence: Annotated[float | None, typer.Option(
        help="hold quality-drop limits at this confidence (e.g. 0.9): a candidate qualifies when the upper bound "
             "of its drop, a paired bootstrap on the tuning split, is within the budget")] = None,
    tie_tolerance: Annotated[float, typer.Option(
        help="candidates within this fraction of the best objective count as tied (timing noise); ties go to "
             "better tuning quality, then smaller size")] = 0.03,
    trials: Annotated[int, typer.Option(help="candidates to evaluate (references included)")] = 30,
    time_budget: Annotated[str | None, typer.Option("--time-budget", help="stop new candidates after e.g. 45m")] = None,
    strategy: Annotated[str, typer.Option(help="tpe | nsga2 | random | grid")] = "tpe",
    storage: Annotated[str | None, typer.Option(help="Optuna storage URL (default: SQLite in --out)")] = None,
    worker: Annotated[bool, typer.Option(help="join a shared study as an extra worker (no final report)")] = False,
    space: Annotated[Path | None, typer.Option(help="YAML file with search-space settings")] = None,
    student: Annotated[list[Path] | None, typer.Option(
        "--student", metavar="PATH", help="a student distilled already (slimformer distill), used instead of "
                                          "distilling one at its depth; repeat for several depths")] = None,
    batch: Annotated[int, typer.Option(help="latency batch size")] = 1,
    seq: Annotated[int, typer.Option(help="latency sequence length")] = 128,
    threads: Annotated[int | None, typer.Option(help="measurement threads (default: all cores)")] = None,
    task: TaskOpt = None,
    max_train_examples: MaxTrainOpt = None,
    text_column: TextColOpt = None,
    label_column: LabelColOpt = None,
    labels: LabelsOpt = None,
    eval_split: EvalSplitOpt = None,
    tuning_split: TuningSplitOpt = None,
    seed: SeedOpt = 0,
    json_out: JsonOpt = False,
) -> None:
    """Search distillation x pruning x quantization for the best model under a budget, and report it."""
    _one_process("search")

    from slimformer.pareto import parse_budget
    from slimformer.search import SearchConfig, SearchSpace, run_search

    parse_budget(budget.replace("quality_drop", "accuracy_drop"))  # fail on a bad budget before any work
    space_cfg = SearchSpace.from_yaml(space) if space is not None else SearchSpace()
    cfg = _config(SearchConfig, objective=objective, budget=budget, confidence=confidence,
                  tie_tolerance=tie_tolerance, trials=trials,
                  time_budget_s=_seconds(time_budget), strategy=strategy, storage=storage, batch=batch, seq=seq,
                  threads=threads, seed=seed, students=[str(p) for p in student] if student else None,
                  space=space_cfg)
    td = _task_data(data, task, text_column, label_column, labels, eval_split, seed, max_train_examples,
                    tuning_split=tuning_split)
    with _stdout_for(json_out):
        summary = run_search(model, td, cfg, out, worker=worker, progress=not json_out,
                             log=lambda msg: console.print(msg, highlight=False))
    if json_out:
        _print_json(summary)
    elif not worker:
        out_console.print(f"report: {Path(out) / 'report.md'} and report.html; chosen model: {Path(out) / 'best'}")


@app.command("run")
def run_recipe(
    recipe: Annotated[Path, typer.Argument(help="recipe YAML: model, data and an ordered list of stages")],
    out: OutOpt = ...,
    model: Annotated[str | None, typer.Option("--model", "-m", help="overrides the recipe's model")] = None,
    data: Annotated[str | None, typer.Option("--data", "-d", help="overrides the recipe's data")] = None,
    task: TaskOpt = None,
    max_train_examples: MaxTrainOpt = None,
    seed: SeedOpt = 0,
    json_out: JsonOpt = False,
) -> None:
    """Run a recipe (finetune, distill, prune, quantize stages in order) and save the result."""
    _one_process("run")
    from slimformer.recipe import Recipe
    from slimformer.recipe import run_recipe as _run

    r = Recipe.from_yaml(recipe)
    data = data or r.data
    if data is None:
        raise SlimformerError("the recipe names no data; add 'data:' to it or pass --data")
    td = _task_data(data, task, None, None, None, None, seed, max_train_examples)
    with _stdout_for(json_out):
        result = _run(r, td, out, model=model, progress=not json_out)
    _report_quality(result, json_out, title=f"recipe result saved to {out}")


@app.command()
def quantize(
    model: ModelOpt = ...,
    out: OutOpt = ...,
    scheme: Annotated[str, typer.Option(help="torch-dynamic-int8 | torch-int8-weight-only | torch-int4-weight-only | "
                                             "torch-int8-embeddings | bf16 | ort-dynamic-int8 | ort-static-int8 | "
                                             "qat-int8")] = "ort-dynamic-int8",
    data: Annotated[str | None, typer.Option("--data", "-d", help="task data: calibration / QAT training (train "
                                                                  "split) and scoring (eval split)")] = None,
    task: TaskOpt = None,
    embeddings: Annotated[str, typer.Option(help="input embedding table: auto | int8 | int4 (ort-* schemes: the "
                                                 "token table in 4-bit blocks) | keep")] = "auto",
    group_size: Annotated[int, typer.Option(help="int4: input features per scale group")] = 32,
    per_channel: Annotated[bool, typer.Option("--per-channel/--per-tensor", help="ort-*: weight scales")] = True,
    calibration: Annotated[str, typer.Option(help="ort-static-int8: minmax | percentile | entropy")] = "percentile",
    calibration_examples: Annotated[int, typer.Option(help="ort-static-int8: calibration examples")] = 256,
    percentile: Annotated[float, typer.Option(help="percentile calibration: share of values covered")] = 99.999,
    outlier_layers: Annotated[str, typer.Option(help="ort-static-int8, FFN down-projections: dynamic | static | "
                                                     "float")] = "dynamic",
    opset: Annotated[int | None, typer.Option(help="ort-*: ONNX opset (default 23, or 18 for rotary-"
                                                               "embedding models)")] = None,
    qat_target: Annotated[str, typer.Option(help="qat-int8: ort-dynamic-int8 | torch-dynamic-int8")] = (
        "ort-dynamic-int8"),
    epochs: Annotated[float, typer.Option(help="qat-int8: passes over the training data")] = 1.0,
    lr: Annotated[float, typer.Option("--lr", help="qat-int8: peak learning rate")] = 2e-5,
    teacher_weight: Annotated[float, typer.Option(help="qat-int8: weight of matching the float model (rest: "
                                                       "labels)")] = 1.0,
    batch_size: Annotated[int, typer.Option(help="qat-int8: training batch size")] = 32,
    max_length: MaxLenOpt = 128,
    max_train_examples: MaxTrainOpt = None,
    max_eval_examples: MaxEvalOpt = None,
    text_column: TextColOpt = None,
    label_column: LabelColOpt = None,
    labels: LabelsOpt = None,
    eval_split: EvalSplitOpt = None,
    tuning_split: TuningSplitOpt = None,
    seed: SeedOpt = 0,
    json_out: JsonOpt = False,
) -> None:
    """Quantize a model (PyTorch or ONNX Runtime scheme, post-training or QAT), save it, score it."""
    _one_process("quantize")
    from slimformer.models import check_out_dir
    from slimformer.stages.finetune import TrainConfig
    from slimformer.stages.quantize import QuantizeConfig, quantize_job

    check_out_dir(out)
    qat = _config(TrainConfig, epochs=epochs, learning_rate=lr, batch_size=batch_size, max_length=max_length,
                  max_train_examples=max_train_examples, seed=seed, warmup_ratio=0.0, evals_per_epoch=2)
    cfg = _config(QuantizeConfig, scheme=scheme, embeddings=embeddings, group_size=group_size, per_channel=per_channel,
                  calibration=calibration, calibration_examples=calibration_examples, percentile=percentile,
                  outlier_layers=outlier_layers, max_length=max_length, qat_target=qat_target, qat=qat,
                  qat_teacher_weight=teacher_weight, seed=seed, opset=opset)
    td = None
    if data is not None:
        td = _task_data(data, task, text_column, label_column, labels, eval_split, seed, max_train_examples,
                        max_eval_examples, tuning_split=tuning_split)
    elif cfg.needs_data:
        raise SlimformerError(f"scheme {scheme} needs task data (calibration or training); pass --data")
    with _stdout_for(json_out):
        result = quantize_job(model, td, cfg, out, progress=not json_out)
    saved = f"{scheme} model saved to {out} ({result['size_bytes'] / 1e6:.1f} MB)"
    if json_out or "quality" in result:
        _report_quality(result, json_out, title=saved)
    else:
        out_console.print(f"{saved}; pass --data to score it")
    for note in result["quantization"].get("notes", []):
        console.print(f"[yellow]note:[/yellow] {note}", highlight=False)


@app.command()
def export(
    model: ModelOpt = ...,
    fmt: Annotated[str, typer.Option("--format", "-f", help="export format: onnx")] = "onnx",
    out: Annotated[Path | None, typer.Option("--out", "-o", help="output folder (default: <model>-onnx)")] = None,
    opset: Annotated[int | None, typer.Option(help="ONNX opset (default 23, or 18 for rotary-"
                                                        "embedding models)")] = None,
    atol: Annotated[float, typer.Option(help="largest logit difference to PyTorch that passes the check")] = 1e-4,
    json_out: JsonOpt = False,
) -> None:
    """Export a saved model to ONNX (dynamic batch and sequence axes), checked against PyTorch."""
    from slimformer.export import export_job

    with _stdout_for(json_out):
        result = export_job(model, fmt, out, opset=opset, atol=atol)
    if json_out:
        _print_json(result)
        return
    out_console.print(f"[bold]{result['format']} model saved to {result['out']}[/bold] "
                      f"({result['size_bytes'] / 1e6:.1f} MB, opset {result['opset']}, inputs "
                      f"{', '.join(result['inputs'])})")
    out_console.print(f"  largest logit difference to PyTorch: {result['max_abs_diff']:.2e} "
                      f"(atol {result['atol']:.0e})")


def _report_quality(result: dict[str, Any], json_out: bool, title: str) -> None:
    from slimformer import distributed

    if not distributed.is_main():  # under torchrun every process returns the result; one prints it
        return
    if json_out:
        _print_json(result)
        return
    q = result["quality"]
    lo, hi = q["ci95"]
    out_console.print(f"[bold]{title}[/bold]")
    unit = "scored tokens" if q["metric"] == "perplexity" else "examples"
    out_console.print(f"{q['metric']} on {q['split']} ({q['n']} {unit}): [bold]{q['value']:.4f}[/bold] "
                      f"(95% CI {lo:.4f}–{hi:.4f})")
    others = {k: round(v, 4) for k, v in q.get("scores", {}).items() if k != q["metric"]}
    if others:
        out_console.print("  " + ", ".join(f"{k} {v}" for k, v in others.items()))
    if "seconds" in result:
        out_console.print(f"  wall time {result['seconds']:.0f} s")


def main() -> None:
    """Entry point: run the app; user errors become one line on stderr and exit code 2."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        app()
    except SlimformerError as e:
        console.print(f"[bold red]error:[/bold red] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("interrupted; finished work is kept (checkpoints resume on the next run)")
        sys.exit(130)
    finally:
        if "slimformer.distributed" in sys.modules:  # a multi-process run: leave its process group cleanly
            sys.modules["slimformer.distributed"].finish()


if __name__ == "__main__":
    main()
