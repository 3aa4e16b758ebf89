"""Vocabulary pruning: how much of the embedding goes, and what it does to each eval prediction.

    python bench/vocab_pruning.py --model runs/sst2-ft --data ../shared/data/sst2

Prunes the vocabulary of a fine-tuned classifier to the tokens of a corpus and compares the pruned model
with the unpruned one *example by example* on the eval split: accuracy of both, how many predictions
flipped (and in which direction), and the exact McNemar test on the flips (two-sided binomial on the
discordant pairs), which says whether the change is more than chance.

Two corpora are compared:
* ``train``: the training text (train + tuning splits). The honest setting: the eval text is never seen,
  so eval words the training data lacks are spelled in kept pieces (see ``slimformer.vocab``).
* ``train+eval-text``: adds the eval split's *text* (no labels). Vocabulary pruning is then lossless on
  the eval split by construction; this is transductive and is printed as a reference, not as a claim.
"""

from __future__ import annotations

import argparse
import copy
import math
import tempfile
from pathlib import Path

import numpy as np

from slimformer import models
from slimformer.evaluate import predict, torch_runner
from slimformer.stages.prune import PruneConfig, prune
from slimformer.tasks import TaskType, encode, load_task_data


def mcnemar_exact(gained: int, lost: int) -> float:
    """Two-sided exact McNemar p-value for ``gained`` vs ``lost`` discordant pairs."""
    n = gained + lost
    if n == 0:
        return 1.0
    k = min(gained, lost)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def predictions(slim: models.SlimModel, task, max_length: int) -> np.ndarray:
    features = encode(task, task.eval, slim.tokenizer, max_length=max_length)
    logits = predict(torch_runner(slim.model), features, pad_id=slim.tokenizer.pad_token_id or 0)
    return np.array([int(np.argmax(row)) for row in logits])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="runs/sst2-ft", help="fine-tuned classifier folder (default: %(default)s)")
    ap.add_argument("--data", default="../shared/data/sst2", help="task data (default: %(default)s)")
    ap.add_argument("--max-length", type=int, default=128)
    args = ap.parse_args()

    task = load_task_data(args.data)
    if task.type != TaskType.SEQUENCE_CLASSIFICATION:
        raise SystemExit("this benchmark compares sequence-classification predictions; give an SST-2-like folder")
    base = models.load(args.model, task.type, task.label_names)
    gold = np.array([task.label_names.index(str(e["label"])) for e in task.eval])
    ref = predictions(base, task, args.max_length)
    emb = base.model.get_input_embeddings().weight.shape[0]
    print(f"model {args.model}: {emb} tokens, eval accuracy {np.mean(ref == gold):.4f} ({len(gold)} examples)")
    print(f"{'corpus':<18} {'kept':>7} {'cut':>6} {'accuracy':>9} {'delta':>7} {'flips':>6} {'+':>3} {'-':>3} "
          f"{'McNemar p':>9}")
    with tempfile.TemporaryDirectory() as tmp:
        eval_text = Path(tmp) / "corpus.txt"
        eval_text.write_text("\n".join(e["text"] for e in task.train + task.tuning + task.eval) + "\n")
        for name, corpus in (("train", None), ("train+eval-text", str(eval_text))):
            slim = copy.deepcopy(base)
            prune(slim, task, PruneConfig(vocab=True, vocab_corpus=corpus), Path(tmp) / name, progress=False)
            kept = len(slim.record["vocab_map"])
            pred = predictions(slim, task, args.max_length)
            flips = pred != ref
            gained = int(np.sum(flips & (pred == gold)))
            lost = int(np.sum(flips & (ref == gold)))
            acc = float(np.mean(pred == gold))
            delta = 100 * (acc - np.mean(ref == gold))
            print(f"{name:<18} {kept:>7} {1 - kept / emb:>6.1%} {acc:>9.4f} {delta:>+7.2f} "
                  f"{int(flips.sum()):>6} {gained:>3} {lost:>3} {mcnemar_exact(gained, lost):>9.3f}")
    print("delta in accuracy points; + / -: flips that became right / wrong; 'train+eval-text' saw the eval "
          "text (no labels) and is a reference only")


if __name__ == "__main__":
    main()
