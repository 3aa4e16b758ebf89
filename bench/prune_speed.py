"""Latency of a model before and after removing heads and FFN neurons, measured side by side in one run.

    python bench/prune_speed.py                       # runs/sst2-ft if it exists, else the packaged MiniLM
    python bench/prune_speed.py --model minilm --heads 0.5 --ffn 0.5 --threads 2 --runs 50

Which units go does not change the speed, only how many, so units are chosen by weight magnitude (no data
needed), per layer so every layer keeps the same shape. The two models are timed in alternating rounds
(default 6) so that changes in machine load hit both alike; the ratio uses the median p50 over rounds, and
the ratio of the best (lowest) round p50s is printed too: on a busy machine the minimum is the estimate
least disturbed by other processes. A paired check then alternates single forward passes (base, pruned,
base, ...) so that both see the same load, and the load average is printed: on a machine busier than its
core count, trust the paired and best-round ratios over the medians.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
from pathlib import Path

import torch

from slimformer import models
from slimformer.importance import magnitude, select_keep
from slimformer.measure import hardware, measure_model
from slimformer.surgery import SurgeryPlan, prune_heads, prune_neurons


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = "runs/sst2-ft" if Path("runs/sst2-ft/model.safetensors").exists() else "minilm"
    ap.add_argument("--model", default=default, help="model folder or short name (default: %(default)s)")
    ap.add_argument("--heads", type=float, default=0.5, help="fraction of heads to remove")
    ap.add_argument("--ffn", type=float, default=0.5, help="fraction of FFN neurons to remove")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=6, help="alternating timing rounds per model")
    ap.add_argument("--paired", type=int, default=200, help="alternating single passes per model (0: skip)")
    ap.add_argument("--json", action="store_true", help="print the full cards as JSON")
    args = ap.parse_args()

    labels = None if models.read_record(models.resolve_model_path(args.model)[0]) else ["0", "1"]
    base = models.load(args.model, "sequence-classification", labels)
    pruned = copy.deepcopy(base)
    plan = SurgeryPlan.identity(pruned.model)
    n_layers = len(plan.layers)
    plan = prune_heads(pruned.model, select_keep(magnitude(pruned.model, "heads"), args.heads,
                                                 [plan.base["heads"]] * n_layers, scope="per-layer"), plan)
    plan = prune_neurons(pruned.model, select_keep(magnitude(pruned.model, "neurons"), args.ffn,
                                                   [plan.base["ffn"]] * n_layers, scope="per-layer"), plan)

    load_before = os.getloadavg()[0]
    cards: dict[str, list[dict]] = {"base": [], "pruned": []}
    with torch.inference_mode():
        for _ in range(args.rounds):
            for name, slim in (("base", base), ("pruned", pruned)):
                cards[name].append(measure_model(slim.model, slim.tokenizer, batch=args.batch, seq=args.seq,
                                                 threads=args.threads, runs=args.runs, warmup=10,
                                                 flops=not cards[name]))
    paired = _paired(base, pruned, args) if args.paired else None
    load_after = os.getloadavg()[0]
    p50 = {k: statistics.median(c["latency_ms_p50"] for c in v) for k, v in cards.items()}
    best = {k: min(c["latency_ms_p50"] for c in v) for k, v in cards.items()}
    hw = hardware()
    print(f"model {args.model}; removed {args.heads:.0%} heads, {args.ffn:.0%} FFN neurons per layer "
          f"-> {plan.summary()['heads']} heads, {plan.summary()['neurons']} neurons kept")
    print(f"cpu {hw['cpu']} [{' '.join(hw['cpu_flags'])}]; torch {torch.__version__}; threads {args.threads}; "
          f"batch {args.batch}, seq {args.seq}, {args.runs} runs x {args.rounds} rounds; load average "
          f"{load_before:.1f} -> {load_after:.1f} on {os.cpu_count()} logical CPUs")
    for name in ("base", "pruned"):
        c = cards[name][0]
        rounds = ", ".join(f"{x['latency_ms_p50']:.2f}" for x in cards[name])
        flops = f"{c['flops'] / 1e9:.3f}" if c.get("flops") else "n/a"
        print(f"{name:>7}: p50 {p50[name]:.2f} ms median, {best[name]:.2f} ms best (rounds: {rounds}), "
              f"p95 {c['latency_ms_p95']:.2f} ms, params {c['parameters']:,}, GFLOPs {flops}")
    print(f"p50 ratio base/pruned: {p50['base'] / p50['pruned']:.2f}x (median of rounds), "
          f"{best['base'] / best['pruned']:.2f}x (best rounds)")
    if paired:
        print(f"paired ({args.paired} alternating passes): base p50 {paired['base']:.2f} ms, pruned p50 "
              f"{paired['pruned']:.2f} ms, ratio {paired['base'] / paired['pruned']:.2f}x")
    if load_before > (os.cpu_count() or 1) or load_after > (os.cpu_count() or 1):
        print("warning: the machine was busier than its core count; latencies include waiting for a CPU")
    if args.json:
        print(json.dumps({"p50_ms": p50, "best_p50_ms": best, "ratio": p50["base"] / p50["pruned"],
                          "best_ratio": best["base"] / best["pruned"], "paired_p50_ms": paired,
                          "load_average": [load_before, load_after], "cards": cards}, default=str))


def _paired(base, pruned, args) -> dict[str, float]:
    """p50 of single forward passes taken in strict alternation (same threads and inputs as the cards)."""
    import time

    from slimformer.measure import dummy_batch

    previous = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        inputs = dummy_batch(base.tokenizer, args.batch, args.seq)
        times: dict[str, list[float]] = {"base": [], "pruned": []}
        with torch.inference_mode():
            for i in range(args.paired + 10):
                for name, slim in (("base", base), ("pruned", pruned)):
                    t0 = time.perf_counter()
                    slim.model(**inputs)
                    if i >= 10:  # the first passes warm up
                        times[name].append((time.perf_counter() - t0) * 1000)
        return {k: statistics.median(v) for k, v in times.items()}
    finally:
        torch.set_num_threads(previous)


if __name__ == "__main__":
    main()
