"""Tiny decoder LMs end to end on WikiText-2: train briefly, search under a perplexity budget, write the report.

No real decoder weights are available offline, so each family (GPT-2, Llama with grouped-query attention) starts
as a small random model in a plain Hugging Face folder with a GPT-2-style byte-level BPE tokenizer (no pad token)
trained on the training text only. Then the same path a hub model takes:

1. ``api.finetune`` on the training split (WikiText-2 ``valid.txt`` minus its last 5%, the tuning split),
2. ``search.run_search`` with a perplexity budget: distilled students, head/FFN pruning with KD recovery,
   PyTorch int8/bf16 and ONNX Runtime int8, every candidate measured here, the choice confirmed on held-out
   ``test.txt`` text, and ``report.md`` / ``report.html`` written.

Perplexity is over BPE tokens of the ``<unk>``-ed WikiText-2 files (not the raw variant), sliding window of
``--max-length`` tokens with half-window stride. ``--eval-chars`` caps the held-out text (the first N characters
of test.txt) to keep the run short on one thread.

    python bench/decoder_tiny_search.py --out runs/decoder-tiny --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data/wikitext2")
    ap.add_argument("--out", default="runs/decoder-tiny")
    ap.add_argument("--families", nargs="+", default=["gpt2", "llama"], choices=["gpt2", "llama"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--vocab", type=int, default=4096, help="BPE vocabulary size")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=128, help="training block and perplexity window (tokens)")
    ap.add_argument("--train-blocks", type=int, default=1500, help="training blocks of --max-length tokens")
    ap.add_argument("--epochs", type=float, default=2.0)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--eval-chars", type=int, default=150_000, help="first N characters of test.txt are scored")
    ap.add_argument("--budget", default="perplexity_increase<=10%")
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--search-seconds", type=float, default=150.0, help="time budget of each search")
    ap.add_argument("--fresh-process", action="store_true", help="measure candidates in new processes (slower)")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from slimformer import api, models
    from slimformer.evaluate import evaluate, torch_runner
    from slimformer.search import SearchConfig, SearchSpace, run_search
    from slimformer.stages.finetune import FinetuneConfig
    from slimformer.tasks import load_task_data
    from slimformer.testing import save_hub_style_decoder

    task = load_task_data(args.data, "causal-lm")
    full_eval = task.eval[0]["text"]
    task.eval = [{"text": full_eval[: args.eval_chars]}]
    task.eval_source = f"{task.eval_source} (first {len(task.eval[0]['text']):,} of {len(full_eval):,} characters)"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    heads = args.hidden // 32
    shape = {"gpt2": {"n_embd": args.hidden, "n_layer": args.layers, "n_head": heads, "n_inner": 4 * args.hidden,
                      "n_positions": max(256, args.max_length)},
             "llama": {"hidden_size": args.hidden, "num_hidden_layers": args.layers, "num_attention_heads": heads,
                       "num_key_value_heads": max(1, heads // 2), "intermediate_size": 4 * args.hidden,
                       "max_position_embeddings": max(256, args.max_length)}}
    lines = []
    for family in args.families:
        t0 = time.time()
        root = out / family
        base = root / "base"
        if not (base / "config.json").exists():
            save_hub_style_decoder(base, family, [task.train[0]["text"]], vocab_size=args.vocab, **shape[family])
        teacher = root / "teacher"
        if not (teacher / models.RECORD_FILE).exists():
            cfg = FinetuneConfig(epochs=args.epochs, learning_rate=args.lr, batch_size=16, max_length=args.max_length,
                                 max_train_examples=args.train_blocks, warmup_ratio=0.05, evals_per_epoch=2,
                                 precision="fp32", logging_steps=100)
            api.finetune(base, task, cfg, teacher, progress=False)
        slim = models.load(teacher)
        ev = evaluate(torch_runner(slim.model), slim.tokenizer, task, "eval", max_length=args.max_length,
                      bootstrap=200)
        untrained = models.load(base, "causal-lm")
        ev0 = evaluate(torch_runner(untrained.model), untrained.tokenizer, task, "eval", max_length=args.max_length,
                       bootstrap=0)
        t_train = time.time() - t0
        space = SearchSpace(depths=[args.layers, args.layers // 2], heads=[0.0, 0.5], ffn=[0.0, 0.5], vocab=[False],
                            precisions=["fp32", "bf16", "torch-dynamic-int8", "ort-dynamic-int8", "ort-static-int8"],
                            kd_epochs=1, kd_max_examples=args.train_blocks // 2, kd_learning_rate=args.lr,
                            recovery_epochs=1, recovery_max_examples=args.train_blocks // 6, calibration_examples=64)
        scfg = SearchConfig(budget=args.budget, objective="latency", trials=args.trials,
                            time_budget_s=args.search_seconds, threads=args.threads, seq=args.max_length,
                            throughput_batch=8, fresh_process_measurement=args.fresh_process, space=space)
        summary = run_search(str(teacher), task, scfg, root / "search", progress=True)
        chosen = summary["chosen"]
        conf = summary["confirmation"]
        line = {
            "family": family,
            "parameters": sum(p.numel() for p in slim.model.parameters()),
            "eval_perplexity_untrained": round(ev0["value"], 1),
            "eval_perplexity_teacher": round(ev["value"], 2),
            "teacher_ci95": [round(x, 2) for x in ev["ci95"]],
            "train_seconds": round(t_train),
            "search_seconds": round(summary["seconds"]),
            "candidates": len(summary["candidates"]),
            "failed_trials": summary["failed_trials"],
            "front": summary["front"],
            "chosen": chosen["name"] if chosen else None,
        }
        if chosen:
            m = chosen["measurements"]
            line.update({
                "chosen_tuning_perplexity_increase_pct": round(m["perplexity_increase"]["value"], 2),
                "chosen_speedup": round(m["speedup"]["value"], 2),
                "chosen_smaller": round(m["compression"]["value"], 2),
                "eval_perplexity_baseline": round(conf["baseline"]["value"], 2),
                "eval_perplexity_chosen": round(conf["chosen"]["value"], 2),
                "eval_perplexity_increase_pct": round(conf["quality_drop_on_eval"], 2),
                "budget_holds_on_eval": conf["budget_holds_on_eval"],
            })
        line["report"] = str(root / "search" / "report.md")
        lines.append(line)
        print(json.dumps(line), flush=True)
    (out / "summary.json").write_text(json.dumps(lines, indent=2))
    print("\nsummary")
    for line in lines:
        print(f"- {line['family']}: {line['parameters']:,} parameters; test perplexity untrained "
              f"{line['eval_perplexity_untrained']} -> trained {line['eval_perplexity_teacher']} "
              f"(95% CI {line['teacher_ci95'][0]}-{line['teacher_ci95'][1]}) in {line['train_seconds']} s")
        if line["chosen"]:
            print(f"  search ({line['candidates']} candidates, {line['search_seconds']} s, budget {args.budget}): "
                  f"chose {line['chosen']}: {line['chosen_speedup']}x faster, {line['chosen_smaller']}x smaller; eval "
                  f"perplexity {line['eval_perplexity_baseline']} -> {line['eval_perplexity_chosen']} "
                  f"({line['eval_perplexity_increase_pct']:+.2f}%), budget holds on eval: "
                  f"{line['budget_holds_on_eval']}")
        else:
            print(f"  search ({line['candidates']} candidates): nothing met the budget; see {line['report']}")
        print(f"  report: {line['report']}")


if __name__ == "__main__":
    main()
