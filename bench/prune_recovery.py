"""How much does KD recovery after pruning bring back? Prune a student as the search does (Taylor scores,
widths rounded to 8, KD recovery from the fine-tuned teacher), once per recovery setting, and score each
result on the tuning split (what the search judges by) and the eval split.

    python bench/prune_recovery.py --teacher runs/sst2-ft-e3 --student runs/sst2-kd4-aug1 \\
        --data ../shared/data/sst2 --heads 0.5 --ffn 0.75 --setting 4000:0:1 --setting 8000:1:1
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    from slimformer import models
    from slimformer.evaluate import evaluate, torch_runner
    from slimformer.stages.prune import PruneConfig, prune
    from slimformer.tasks import load_task_data

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", required=True, help="the fine-tuned model recovery learns from")
    ap.add_argument("--student", required=True, help="the model to prune (a distilled student, or the teacher)")
    ap.add_argument("--data", required=True)
    ap.add_argument("--heads", type=float, default=0.5)
    ap.add_argument("--ffn", type=float, default=0.75)
    ap.add_argument("--no-vocab", action="store_true", help="keep the whole vocabulary")
    ap.add_argument("--setting", action="append", default=[], metavar="EXAMPLES:AUGMENT:EPOCHS",
                    help="a recovery to try (repeatable); default 4000:0:1 and 8000:1:1")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    task = load_task_data(args.data, seed=args.seed)
    teacher = models.load(args.teacher)
    print(f"{'examples':>8s} {'augment':>7s} {'epochs':>6s} {'seconds':>7s} {'tuning':>7s} {'eval':>7s}")
    for setting in args.setting or ["4000:0:1", "8000:1:1"]:
        n, aug, epochs = setting.split(":")
        slim = models.load(args.student)
        cfg = PruneConfig(heads=args.heads, ffn=args.ffn, vocab=not args.no_vocab, importance="taylor", round_to=8,
                          recover="kd", epochs=float(epochs), learning_rate=args.lr, max_train_examples=int(n),
                          kd_augment=int(aug), kd_cache_teacher=float(epochs) > 1, seed=args.seed)
        work = tempfile.mkdtemp(prefix="recovery-")
        t0 = time.time()
        try:
            prune(slim, task, cfg, work, teacher=teacher.model, progress=False)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        took = time.time() - t0
        slim.model.eval()
        runner = torch_runner(slim.model)
        tuning = evaluate(runner, slim.tokenizer, task, "tuning", bootstrap=0)["value"]
        held = evaluate(runner, slim.tokenizer, task, "eval", bootstrap=0)["value"]
        print(f"{int(n):>8d} {int(aug):>7d} {float(epochs):>6g} {took:>7.0f} {tuning:>7.4f} {held:>7.4f}", flush=True)


if __name__ == "__main__":
    main()
