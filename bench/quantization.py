"""Quantization benchmark: every scheme against fp32, measured side by side in one run on this machine.

For one fine-tuned model folder and one task (SST-2 dev by default) it builds each scheme's artifact and
reports, per row: size on disk, batch-1 latency at 128 tokens (p50 of 30 timed runs), batch-32 throughput
at 128 tokens (from the median of 12 timed runs), and the eval-split accuracy with its change against fp32.
Timing visits the rows in interleaved rounds, so background load drifts affect every row alike.

    python bench/quantization.py --model runs/sst2-ft --data ../shared/data/sst2 --threads 2

Timings are only comparable within one run (same machine, same load); the CPU flags are printed with the
table because int8 and bf16 speed depends on them (VNNI, AMX).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Threads that sleep instead of busy-waiting (OpenMP for PyTorch, the same for ONNX Runtime via OrtRunner): on a
# shared 2-core machine, spinning 2-thread pools measured 1.6 s for a MiniLM forward that takes 48 ms here.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from slimformer import models  # noqa: E402
from slimformer.evaluate import evaluate, torch_runner  # noqa: E402
from slimformer.export import OrtRunner, export_onnx, is_onnx_folder, load_runner  # noqa: E402
from slimformer.measure import dummy_batch, folder_size, hardware, time_runs  # noqa: E402
from slimformer.stages.finetune import TrainConfig  # noqa: E402
from slimformer.stages.quantize import QuantizeConfig, quantize_job  # noqa: E402
from slimformer.tasks import load_task_data  # noqa: E402

TORCH_ROWS = ["torch-dynamic-int8", "torch-int8-weight-only", "torch-int4-weight-only", "torch-int8-embeddings",
              "bf16"]


def build(name: str, src: Path, task, out: Path, args) -> tuple[Path, dict[str, Any]]:
    """Make one row's artifact; returns (folder, facts for the notes column)."""
    path = out / name
    if name == "fp32":
        return src, {}
    if name == "ort-fp32":
        slim = models.load(src)
        facts: dict[str, Any] = {}
        models.atomic_dir(path, lambda tmp: facts.update(export_onnx(slim, tmp)))
        return path, {"export max logit diff": f"{facts['max_abs_diff']:.1e}"}
    if name.startswith("ort-static-int8"):
        method = name.split(":")[1] if ":" in name else "percentile"
        cfg = QuantizeConfig(scheme="ort-static-int8", calibration=method, calibration_examples=args.calibration)
    elif name == "qat-int8":
        train = TrainConfig(epochs=1, learning_rate=args.qat_lr, warmup_ratio=0, evals_per_epoch=2,
                            max_train_examples=args.qat_max_train_examples)
        cfg = QuantizeConfig(scheme="qat-int8", qat_target=args.qat_target, qat=train)
    else:
        cfg = QuantizeConfig(scheme=name)
    t0 = time.time()
    # The eval split is scored below with the other rows, not inside the job.
    result = quantize_job(src, _no_eval(task), cfg, path, progress=False)
    q = result["quantization"]
    facts = {"built in": f"{time.time() - t0:.0f} s"}
    if q.get("max_abs_diff_vs_float") is not None:
        facts["max logit diff"] = f"{q['max_abs_diff_vs_float']:.2f}"
    if q.get("qat"):
        facts["qat"] = f"{q['qat']['train_examples']} ex -> {q['scheme']}"
    return path, facts


def _no_eval(task):
    import dataclasses

    return dataclasses.replace(task, eval=[])


def quality_row(path: Path, task, threads: int) -> dict[str, Any]:
    runner, tokenizer = load_runner(path, task, threads=threads)
    quality = evaluate(runner, tokenizer, task, "eval", bootstrap=1000)
    record = models.read_record(path)
    return {"backend": "onnxruntime" if is_onnx_folder(path) else "pytorch",
            "weights": (record.get("quantization") or {}).get("weights", "float32"),
            "size_bytes": folder_size(path), "accuracy": quality["value"], "ci95": quality["ci95"],
            "n": quality["n"]}


def forward_fn(path: Path, threads: int, batch: int):
    """A zero-argument call that runs one forward pass of the saved model on a batch x 128 dummy batch."""
    if is_onnx_folder(path):
        runner = OrtRunner(path, threads=threads)
        inputs = {k: v for k, v in dummy_batch(runner.tokenizer, batch, 128).items() if k in runner.input_names}
        return lambda: runner(inputs)
    slim = models.load(path)
    inputs = dummy_batch(slim.tokenizer, batch, 128)
    run = torch_runner(slim.model)
    return lambda: run(inputs)


def interleaved_timing(paths: dict[str, Path], threads: int, rounds: int) -> dict[str, dict[str, float]]:
    """Latency (batch 1) and throughput (batch 32) of every row, timed in rounds that visit every row in turn,
    so a change in background load hits all rows alike instead of biasing the rows timed during it."""
    fns = {name: (forward_fn(p, threads, 1), forward_fn(p, threads, 32)) for name, p in paths.items()}
    b1: dict[str, list[float]] = {n: [] for n in fns}
    b32: dict[str, list[float]] = {n: [] for n in fns}
    for r in range(rounds):
        for name, (f1, f32) in fns.items():
            b1[name] += time_runs(f1, warmup=3 if r == 0 else 1, runs=30 // rounds)
            b32[name] += time_runs(f32, warmup=1, runs=max(1, 12 // rounds))
    return {n: {"latency_b1_ms": 1000 * float(np.median(b1[n])),
                "latency_b1_p95_ms": 1000 * float(np.percentile(b1[n], 95)),
                "throughput_b32": 32 / float(np.median(b32[n])), "runs_b1": len(b1[n]), "runs_b32": len(b32[n])}
            for n in fns}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="runs/sst2-ft", help="fine-tuned float model folder")
    ap.add_argument("--data", default="../shared/data/sst2", help="task data (train for calibration, dev scored)")
    ap.add_argument("--out", default="runs/bench-quantization", help="where the artifacts and results go")
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads for every backend")
    ap.add_argument("--schemes", default=None, help="comma-separated rows (default: all post-training schemes)")
    ap.add_argument("--rounds", type=int, default=6, help="interleaved timing rounds (30 b1 / 12 b32 runs in all)")
    ap.add_argument("--calibration", type=int, default=256, help="calibration examples for ort-static-int8")
    ap.add_argument("--qat", action="store_true", help="add a qat-int8 row (fake-quant fine-tuning, then ORT int8)")
    ap.add_argument("--qat-max-train-examples", type=int, default=8000, help="QAT training examples")
    ap.add_argument("--qat-lr", type=float, default=2e-5, help="QAT learning rate")
    ap.add_argument("--qat-target", default="ort-dynamic-int8", help="ort-dynamic-int8 | torch-dynamic-int8")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    src, out = Path(args.model), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    task = load_task_data(args.data)
    rows = (args.schemes.split(",") if args.schemes else
            ["fp32", *TORCH_ROWS, "ort-fp32", "ort-dynamic-int8", "ort-static-int8:minmax",
             "ort-static-int8:percentile", "ort-static-int8:entropy"])
    if args.qat and "qat-int8" not in rows:
        rows.append("qat-int8")

    hw = hardware()
    print(f"cpu: {hw['cpu']}  flags: {' '.join(hw['cpu_flags']) or 'none of ' + 'avx2/avx512/vnni/amx'}  "
          f"threads: {args.threads}  torch {hw['versions'].get('torch')}  onnxruntime "
          f"{hw['versions'].get('onnxruntime')}  torchao {hw['versions'].get('torchao')}  "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}  load average {os.getloadavg()[0]:.1f}", flush=True)
    print(f"model: {src}  eval: {task.eval_source} ({len(task.eval)} examples)", flush=True)

    results: dict[str, dict[str, Any]] = {}
    paths: dict[str, Path] = {}
    t_start = time.time()
    for name in rows:
        t0 = time.time()
        paths[name], facts = build(name, src, task, out, args)
        results[name] = {**quality_row(paths[name], task, args.threads), "facts": facts}
        r = results[name]
        print(f"  {name}: acc {r['accuracy']:.4f}, {r['size_bytes'] / 1e6:.1f} MB ({time.time() - t0:.0f} s)",
              file=sys.stderr, flush=True)
    print(f"  timing {len(paths)} rows in {args.rounds} interleaved rounds ...", file=sys.stderr, flush=True)
    load_before = os.getloadavg()[0]
    for name, timing in interleaved_timing(paths, args.threads, args.rounds).items():
        results[name].update(timing)
    load = f"load average {load_before:.1f} before timing, {os.getloadavg()[0]:.1f} after"

    base = results.get("fp32") or next(iter(results.values()))
    header = ("| scheme | backend | weights | size MB | size x | b1 s128 p50 ms | speed-up | b32 s128 seq/s | "
              "dev acc | Δ acc (pts) | notes |")
    lines = [header, "|" + "---|" * 11]
    for name, r in results.items():
        notes = ", ".join(f"{k} {v}" for k, v in r["facts"].items())
        lines.append(
            f"| {name} | {r['backend']} | {r['weights']} | {r['size_bytes'] / 1e6:.1f} | "
            f"{r['size_bytes'] / base['size_bytes']:.2f} | {r['latency_b1_ms']:.2f} | "
            f"{base['latency_b1_ms'] / r['latency_b1_ms']:.2f} | {r['throughput_b32']:.1f} | "
            f"{r['accuracy']:.4f} | {100 * (r['accuracy'] - base['accuracy']):+.2f} | {notes} |")
    table = "\n".join(lines)
    print()
    print(table)
    print(f"\nΔ acc is against fp32 on the same {base['n']} examples; fp32 95% CI "
          f"{base['ci95'][0]:.4f}–{base['ci95'][1]:.4f}. Wall time {time.time() - t_start:.0f} s; {load}.")
    (out / "results.json").write_text(json.dumps({"hardware": hw, "threads": args.threads, "model": str(src),
                                                  "rows": results}, indent=2, default=str))
    (out / "results.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
