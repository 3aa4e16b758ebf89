"""Shared body of the sweet-spot benchmarks: run the search with a fixed seed and print the chosen point
against the baseline and ONNX Runtime dynamic int8 of the baseline, measured side by side in one run.

Quality is the eval split (never seen by training or search); speed is p50 at b1 s128 in a fresh process
for each model, re-timed by the search at its end in rounds that interleave the three models so machine
noise hits all alike (``SearchConfig.confirm_rounds``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def main(default_data: str, default_teacher: str, default_out: str, targets: dict[str, float]) -> int:
    from slimformer.measure import hardware
    from slimformer.search import SearchConfig, SearchSpace, run_search
    from slimformer.stages.finetune import FinetuneConfig
    from slimformer.tasks import load_task_data

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", default=default_data)
    ap.add_argument("--teacher", default=default_teacher, help="fine-tuned model; fine-tuned from minilm if absent")
    ap.add_argument("--out", default=default_out)
    ap.add_argument("--time-budget", type=float, default=45 * 60, help="seconds")
    ap.add_argument("--trials", type=int, default=40)
    ap.add_argument("--budget", default="quality_drop<=1.0")
    ap.add_argument("--confidence", type=float, default=None,
                    help="hold the quality budget on the upper bound of the drop at this confidence (e.g. 0.9)")
    ap.add_argument("--tuning-split", default=None, choices=["carve", "dev"],
                    help="tune on a share carved from train (default) or on the dev file (test is then the eval)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved measurement rounds at the end")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--student", action="append", default=[], metavar="PATH",
                    help="a student distilled already, used instead of the search's own at its depth (repeatable)")
    ap.add_argument("--space", default=None, metavar="YAML",
                    help="search-space settings, as for slimformer search --space")
    args = ap.parse_args()

    task = load_task_data(args.data, seed=args.seed, tuning_split=args.tuning_split)
    teacher = args.teacher if Path(args.teacher).exists() else "minilm"
    cfg = SearchConfig(seed=args.seed, trials=args.trials, time_budget_s=args.time_budget, budget=args.budget,
                       confidence=args.confidence, threads=args.threads, students=args.student,
                       confirm_rounds=args.rounds,
                       space=SearchSpace.from_yaml(args.space) if args.space else SearchSpace(),
                       finetune=FinetuneConfig(epochs=2, evals_per_epoch=4))
    summary = run_search(teacher, task, cfg, args.out, progress=True, log=lambda m: print(m, file=sys.stderr))
    chosen = summary["chosen"]
    if chosen is None:
        print("no candidate met the budget on the tuning split; see", Path(args.out) / "report.md")
        return 1
    by_name = {c["name"]: c for c in summary["candidates"]}
    ref_fp32, ref_int8 = summary["references"][0], summary["references"][1]
    keys = {"baseline fp32 (PyTorch)": "baseline", "baseline ORT dynamic int8": "ort_int8_baseline",
            "chosen": "chosen"}
    compared = {"baseline fp32 (PyTorch)": by_name[ref_fp32], "baseline ORT dynamic int8": by_name[ref_int8],
                "chosen": chosen}
    sizes = {k: c["measurements"]["size_mb"]["value"] for k, c in compared.items()}
    timing = summary["confirmation"]["timing"]
    lat = {label: timing["latency_ms"][key] for label, key in keys.items()}
    conf = summary["confirmation"]
    quality = {"baseline fp32 (PyTorch)": conf["baseline"], "baseline ORT dynamic int8": conf["ort_int8_baseline"],
               "chosen": conf["chosen"]}
    base_lat = timing["latency_ms_median"]["baseline"]
    base_size = sizes["baseline fp32 (PyTorch)"]
    base_q = quality["baseline fp32 (PyTorch)"]["value"]
    hw = hardware()
    print(f"\nsweet spot on {args.data} | CPU {hw['cpu']} [{' '.join(hw['cpu_flags'])}] | threads "
          f"{args.threads or 'all'} | search {summary['seconds'] / 60:.1f} min, "
          f"{len(summary['candidates'])} candidates")
    m = chosen["measurements"]
    bound = m.get("quality_drop_upper")
    print(f"chosen: {chosen['name']} (tuning drop {m['quality_drop']['value']:+.2f}"
          + (f", {100 * args.confidence:g}% upper bound {bound['value']:+.2f})" if bound else ")"))
    header = f"{'model':28s} {'eval metric (95% CI)':>26s} {'drop pts':>9s} {'p50 ms':>8s} {'speed-up':>9s} " \
             f"{'size MB':>8s} {'smaller':>8s}"
    print(header)
    rows = {}
    for label, key in keys.items():
        q = quality[label]
        p50 = timing["latency_ms_median"][key]
        size = sizes[label]
        rows[label] = {"quality": q["value"], "drop": 100 * (base_q - q["value"]), "p50_ms": p50,
                       "speedup": base_lat / p50, "size_mb": size, "compression": base_size / size}
        r = rows[label]
        print(f"{label:28s} {q['value']:>8.4f} ({q['ci95'][0]:.4f}-{q['ci95'][1]:.4f}) {r['drop']:>+9.2f} "
              f"{p50:>8.2f} {r['speedup']:>8.2f}x {r['size_mb']:>8.2f} {r['compression']:>7.1f}x")
    c, o = rows["chosen"], rows["baseline ORT dynamic int8"]
    dominates = (c["p50_ms"] <= o["p50_ms"] and c["size_mb"] <= o["size_mb"] and c["quality"] >= o["quality"]
                 and (c["p50_ms"] < o["p50_ms"] or c["size_mb"] < o["size_mb"] or c["quality"] > o["quality"]))
    ci = summary["confirmation"].get("quality_drop_on_eval_ci95")
    if ci:
        print(f"chosen's drop on eval, paired 95% interval: {ci[0]:+.2f} to {ci[1]:+.2f}")
    print(f"chosen Pareto-dominates ORT int8 of the baseline (latency, size, eval quality): {dominates}")
    verdicts = {
        "speed-up": (c["speedup"], targets["speedup"], c["speedup"] >= targets["speedup"]),
        "smaller": (c["compression"], targets["compression"], c["compression"] >= targets["compression"]),
        "drop": (c["drop"], targets["drop"], c["drop"] <= targets["drop"]),
    }
    for name, (value, target, ok) in verdicts.items():
        print(f"target {name}: measured {value:.2f}, target {'<=' if name == 'drop' else '>='} {target}: "
              f"{'met' if ok else 'MISSED'}")
    (Path(args.out) / "bench.json").write_text(json.dumps({"rows": rows, "dominates_ort_int8": dominates,
                                                           "latencies": lat}, indent=2))
    return 0
