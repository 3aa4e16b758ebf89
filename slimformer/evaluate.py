"""Quality: the task metric on a split, with a bootstrap 95% interval.

Scoring goes through a *runner*: any callable that maps a padded batch (``input_ids``,
``attention_mask``, maybe ``token_type_ids``) to logits. PyTorch models, quantized models and ONNX
Runtime sessions are all scored by the same code, so their numbers are comparable.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from slimformer.errors import SlimformerError
from slimformer.tasks import Collator, TaskData, TaskType, classification_scores, encode, entity_scores

Runner = Callable[[dict[str, torch.Tensor]], torch.Tensor]
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def torch_runner(model: torch.nn.Module) -> Runner:
    """Wrap a PyTorch model as a runner (inference mode, only the inputs the model takes)."""
    import inspect

    accepted = set(inspect.signature(model.forward).parameters)

    @torch.inference_mode()
    def run(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        device = next(model.parameters()).device
        inputs = {k: v.to(device) for k, v in batch.items() if k in MODEL_INPUTS and k in accepted}
        return model(**inputs).logits.float().cpu()

    return run


def _batches(features: list[dict[str, Any]], batch_size: int, pad_id: int):
    # Sort by length so padding is small; keep the original positions to restore order.
    order = sorted(range(len(features)), key=lambda i: len(features[i]["input_ids"]))
    collate = Collator(pad_id)
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        yield idx, collate([{k: v for k, v in features[i].items() if k in MODEL_INPUTS} for i in idx])


def predict(runner: Runner, features: list[dict[str, Any]], batch_size: int = 64, pad_id: int = 0,
            progress: bool = False) -> list[np.ndarray]:
    """Logits per example (unpadded for token tasks), in the order of ``features``."""
    out: list[np.ndarray | None] = [None] * len(features)
    it = _batches(features, batch_size, pad_id)
    if progress:
        from rich.progress import track

        it = track(list(it), description="predicting", transient=True)
    for idx, batch in it:
        logits = runner(batch).detach().cpu().numpy()
        for j, i in enumerate(idx):
            n = len(features[i]["input_ids"])
            out[i] = logits[j] if logits.ndim == 2 else logits[j, :n]
    return out  # type: ignore[return-value]


def _bootstrap(stat: Callable[[np.ndarray], float], n: int, rounds: int, seed: int,
               percentiles: Sequence[float] = (2.5, 97.5)) -> list[float]:
    """Percentiles of ``stat`` over ``rounds`` resamples (with replacement) of ``n`` example indices."""
    if n == 0 or rounds <= 0:
        return [float("nan")] * len(percentiles)
    rng = np.random.default_rng(seed)
    values = [stat(rng.integers(0, n, n)) for _ in range(rounds)]
    return [float(np.percentile(values, q)) for q in percentiles]


def _unit_metric(units: np.ndarray, metric: str) -> Callable[[np.ndarray], float]:
    """The metric of a resample (an index vector) from per-example units: accuracy from 0/1 correctness;
    entity F1 from (true positives, predicted entities, gold entities) per sentence; perplexity from
    (summed nll, scored tokens) per window."""
    if metric == "accuracy":
        return lambda idx: float(units[idx].mean())
    if metric == "f1":
        def f1(idx: np.ndarray) -> float:
            t, p, g = units[idx].sum(axis=0)
            return 0.0 if t == 0 else float(2 * t / (p + g))
        return f1
    return lambda idx: math.exp(units[idx, 0].sum() / max(1, units[idx, 1].sum()))


def evaluate(
    runner: Runner,
    tokenizer,
    task: TaskData,
    split: str = "eval",
    *,
    batch_size: int = 64,
    max_length: int = 128,
    stride: int | None = None,
    bootstrap: int = 1000,
    seed: int = 0,
    progress: bool = False,
    units: bool = False,
) -> dict[str, Any]:
    """Score ``runner`` on a split of ``task``. Returns the primary metric, its 95% bootstrap interval,
    the other metrics and the number of examples; with ``units``, also the per-example statistics the
    metric is built from (see ``paired_drop_bound``)."""
    examples = task.split(split)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if task.type == TaskType.CAUSAL_LM:
        result = perplexity(runner, tokenizer, examples, max_length=max_length, stride=stride,
                            bootstrap=bootstrap, seed=seed, split=split, batch_size=max(1, batch_size // 8))
        if not units:
            result.pop("units", None)
        return result
    features = encode(task, examples, tokenizer, max_length=max_length)
    logits = predict(runner, features, batch_size=batch_size, pad_id=pad_id, progress=progress)

    if task.type == TaskType.SEQUENCE_CLASSIFICATION:
        pred = np.array([int(np.argmax(row)) for row in logits])
        gold = np.array([f["labels"] for f in features])
        k = task.num_labels or int(max(gold.max(), pred.max()) + 1)
        scores = classification_scores(pred, gold, k)
        correct = (pred == gold).astype(int)
        ci = _bootstrap(_unit_metric(correct, "accuracy"), len(gold), bootstrap, seed)
        result = {"metric": "accuracy", "value": scores["accuracy"], "ci95": ci, "n": len(gold), "split": split,
                  "scores": scores}
        if units:
            result["units"] = correct.tolist()
        return result

    # Token classification: a word's prediction is the label of its first sub-word; words cut off by
    # truncation are predicted "O" (so they count against recall, as they should).
    names = task.label_names or []
    gold_tags, pred_tags = [], []
    for f, ex, lg in zip(features, examples, logits, strict=True):
        words = ["O"] * len(ex["tokens"])
        prev = None
        for pos, w in enumerate(f["word_ids"]):
            if w >= 0 and w != prev:
                words[w] = names[int(np.argmax(lg[pos]))]
            prev = w
        gold_tags.append(list(ex["tags"]))
        pred_tags.append(words)
    scores = entity_scores(gold_tags, pred_tags)
    counts = np.stack(_entity_counts(gold_tags, pred_tags), axis=1)  # per sentence: tp, predicted, gold
    ci = _bootstrap(_unit_metric(counts, "f1"), len(counts), bootstrap, seed)
    result = {"metric": "f1", "value": scores["f1"], "ci95": ci, "n": len(gold_tags), "split": split,
              "scores": scores}
    if units:
        result["units"] = counts.tolist()
    return result


def _entity_counts(gold: list[list[str]], pred: list[list[str]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-sentence (true positives, predicted entities, gold entities), strict IOB2, as seqeval counts them."""
    from seqeval.scheme import IOB2, Entities

    g = Entities(gold, IOB2).entities
    p = Entities(pred, IOB2).entities
    tp = np.array([len(set(a) & set(b)) for a, b in zip(g, p, strict=True)])
    return tp, np.array([len(x) for x in p]), np.array([len(x) for x in g])


MIN_CI_WINDOWS = 10


def perplexity(runner: Runner, tokenizer, examples: list[dict[str, Any]], *, max_length: int = 512,
               stride: int | None = None, bootstrap: int = 1000, seed: int = 0, split: str = "eval",
               batch_size: int = 8) -> dict[str, Any]:
    """Sliding-window perplexity (the Hugging Face recipe): windows of ``max_length`` tokens moved by
    ``stride`` (default half a window); each token after the first is scored exactly once, with up to
    ``max_length - stride`` tokens of context (all before it in the first window).

    ``exp(total NLL / scored tokens)``; the 95% interval resamples windows, or tokens when there are fewer
    than ``MIN_CI_WINDOWS`` windows (one window would give an interval of zero width). Windows of equal length
    run ``batch_size`` at a time (no padding, so no mask can change a score)."""
    text = "\n\n".join(e["text"] for e in examples)
    ids = torch.tensor(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"], dtype=torch.long)
    if len(ids) < 2:
        raise SlimformerError(f"the {split} text has {len(ids)} tokens; perplexity needs at least 2")
    if max_length < 2:
        raise SlimformerError(f"--max-length {max_length} is too short for perplexity; use 2 or more")
    stride = min(stride or max(1, max_length // 2), max_length - 1)
    # Window w scores the tokens [pos, end) and reads the max_length tokens (or fewer) ending at end.
    windows: list[tuple[int, int, int]] = []  # (begin, pos, end)
    pos = 1
    while pos < len(ids):
        end = min(max_length if pos == 1 else pos + stride, len(ids))
        windows.append((max(0, end - max_length), pos, end))
        pos = end
    window_nll, window_count = [0.0] * len(windows), [0] * len(windows)
    token_nll: list[torch.Tensor] = []
    by_length: dict[int, list[int]] = {}
    for w, (begin, _, end) in enumerate(windows):
        by_length.setdefault(end - begin, []).append(w)
    for length, group in by_length.items():
        # Keep a batch's logits under ~256 MB (2^26 floats): a 128k vocabulary at 1024 tokens is 0.5 GB a window.
        step = max(1, min(batch_size, 2**26 // (length * max(1, len(tokenizer)))))
        for s in range(0, len(group), step):
            chunk_ws = group[s:s + step]
            chunk = torch.stack([ids[windows[w][0]:windows[w][2]] for w in chunk_ws])
            logits = runner({"input_ids": chunk, "attention_mask": torch.ones_like(chunk)})
            logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
            nll = -logp.gather(2, chunk[:, 1:].unsqueeze(2)).squeeze(2)  # nll[:, i] scores token begin + 1 + i
            for row, w in enumerate(chunk_ws):
                begin, first, _ = windows[w]
                scored = nll[row, first - begin - 1:]
                window_nll[w] = float(scored.sum())
                token_nll.append(scored)
                window_count[w] = int(scored.shape[0])
    per_window = np.stack([np.array(window_nll), np.array(window_count)], axis=1)  # summed nll, tokens
    nll_arr, cnt_arr = per_window[:, 0], per_window[:, 1]
    mean_nll = float(nll_arr.sum() / cnt_arr.sum())
    ppl = math.exp(mean_nll)
    if len(windows) >= MIN_CI_WINDOWS:
        ci_unit = "windows"
        ci = _bootstrap(_unit_metric(per_window, "perplexity"), len(per_window), bootstrap, seed)
    else:  # tokens of one text are correlated, so this interval is, if anything, too narrow
        ci_unit = "tokens"
        tok_arr = torch.cat(token_nll).double().numpy()
        ci = _bootstrap(lambda idx: math.exp(tok_arr[idx].mean()), len(tok_arr), bootstrap, seed)
    return {"metric": "perplexity", "value": ppl, "ci95": ci, "n": int(cnt_arr.sum()), "split": split,
            "scores": {"perplexity": ppl, "nll_per_token": mean_nll, "windows": len(windows),
                       "max_length": max_length, "stride": stride, "ci_resamples": ci_unit},
            "units": per_window.tolist() if ci_unit == "windows" else None}


def paired_drop_quantiles(base: dict[str, Any], cand: dict[str, Any], quantiles: Sequence[float], *,
                          rounds: int = 2000, seed: int = 0) -> list[float] | None:
    """Quantiles of the quality drop from ``base`` to ``cand`` (two ``evaluate(..., units=True)`` results on
    the same split) over bootstrap resamples of the examples, the same resample for both models. Pairing
    matters: the two models are right and wrong on mostly the same examples, so the drop varies far less
    than either score. Drop in the units ``search`` uses: points of accuracy or F1 lost, or percent of
    perplexity gained. None when either result lacks units or they cover different examples."""
    bu, cu = base.get("units"), cand.get("units")
    if bu is None or cu is None or len(bu) != len(cu) or not bu or base["metric"] != cand["metric"]:
        return None
    metric = base["metric"]
    b, c = _unit_metric(np.asarray(bu, float), metric), _unit_metric(np.asarray(cu, float), metric)
    if metric == "perplexity":
        def drop(idx: np.ndarray) -> float:
            return 100 * (c(idx) / b(idx) - 1)
    else:
        def drop(idx: np.ndarray) -> float:
            return 100 * (b(idx) - c(idx))
    return _bootstrap(drop, len(bu), rounds, seed, [100 * q for q in quantiles])


def paired_drop_bound(base: dict[str, Any], cand: dict[str, Any], confidence: float, *, rounds: int = 2000,
                      seed: int = 0) -> float | None:
    """Upper ``confidence`` bound on the quality drop from ``base`` to ``cand``: the ``confidence`` quantile of
    ``paired_drop_quantiles``. None when either result lacks units or they cover different examples."""
    q = paired_drop_quantiles(base, cand, [confidence], rounds=rounds, seed=seed)
    return None if q is None else q[0]
