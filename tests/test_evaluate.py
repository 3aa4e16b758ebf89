import math

import numpy as np
import torch

from slimformer.evaluate import _entity_counts, evaluate, paired_drop_bound, perplexity, torch_runner
from slimformer.tasks import TaskData, TaskType, classification_scores, entity_scores
from slimformer.testing import minilm_tokenizer, tiny_bert, tiny_ner_task, tiny_sst2_task


def test_classification_scores_by_hand():
    pred, gold = np.array([1, 0, 1, 1]), np.array([1, 0, 0, 1])
    s = classification_scores(pred, gold, 2)
    assert s["accuracy"] == 0.75
    # class 0: tp1 fp0 fn1 -> 2/3; class 1: tp2 fp1 fn0 -> 0.8
    assert math.isclose(s["macro_f1"], (2 / 3 + 0.8) / 2)


def test_evaluate_matches_direct_argmax_and_ci_brackets_value():
    slim, task = tiny_bert(), tiny_sst2_task()
    r = evaluate(torch_runner(slim.model), slim.tokenizer, task, bootstrap=300)
    enc = slim.tokenizer([e["text"] for e in task.eval], padding=True, return_tensors="pt")
    with torch.inference_mode():
        pred = slim.model(**enc).logits.argmax(-1).numpy()
    gold = np.array([int(e["label"]) for e in task.eval])
    assert r["value"] == float((pred == gold).mean())
    assert r["ci95"][0] <= r["value"] <= r["ci95"][1] and r["n"] == len(task.eval)


def test_entity_counts_agree_with_seqeval():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["O", "B-ORG"], ["B-MISC", "O"]]
    pred = [["B-PER", "I-PER", "O", "B-ORG"], ["O", "B-ORG"], ["I-MISC", "O"]]
    tp, npred, ngold = _entity_counts(gold, pred)
    f1 = 2 * tp.sum() / (npred.sum() + ngold.sum())
    assert math.isclose(f1, entity_scores(gold, pred)["f1"])


def test_ner_evaluation_runs_and_is_bounded():
    slim, task = tiny_bert("token-classification"), tiny_ner_task()
    r = evaluate(torch_runner(slim.model), slim.tokenizer, task, bootstrap=50)
    assert r["metric"] == "f1" and 0.0 <= r["value"] <= 1.0


def test_perplexity_of_uniform_model_is_vocab_size():
    tok = minilm_tokenizer()
    vocab = len(tok)

    def uniform(batch):
        ids = batch["input_ids"]
        return torch.zeros(ids.shape[0], ids.shape[1], vocab)

    r = perplexity(uniform, tok, [{"text": "the cat sat on the mat . " * 30}], max_length=32, bootstrap=10)
    assert math.isclose(r["value"], vocab, rel_tol=1e-4)


def test_perplexity_interval_has_width_with_a_single_window():
    tok = minilm_tokenizer()
    vocab = len(tok)
    gen = torch.Generator().manual_seed(0)

    def noisy(batch):
        ids = batch["input_ids"]
        return torch.randn(ids.shape[0], ids.shape[1], vocab, generator=gen)

    text = "the cat sat on the mat . " * 30
    one = perplexity(noisy, tok, [{"text": text}], max_length=512, bootstrap=200)
    assert one["scores"]["windows"] == 1 and one["scores"]["ci_resamples"] == "tokens"
    low, high = one["ci95"]
    assert low < one["value"] < high
    many = perplexity(noisy, tok, [{"text": text * 2}], max_length=16, bootstrap=50)
    assert many["scores"]["windows"] >= 10 and many["scores"]["ci_resamples"] == "windows"


def test_sliding_window_scores_each_token_once():
    tok = minilm_tokenizer()
    text = "the cat sat on the mat . " * 40
    n = len(tok(text, add_special_tokens=False)["input_ids"])
    slim = tiny_bert("causal-lm", is_decoder=True)
    task = TaskData(TaskType.CAUSAL_LM, train=[], tuning=[], eval=[{"text": text}])
    for stride in (8, 16, 32):
        r = evaluate(torch_runner(slim.model), tok, task, max_length=32, stride=stride, bootstrap=5)
        assert r["n"] == n - 1  # every token but the first is predicted exactly once


def _acc(correct: list[int]) -> dict:
    return {"metric": "accuracy", "units": correct}


def test_paired_drop_bound_brackets_the_drop_and_pairing_narrows_it():
    rng = np.random.default_rng(1)
    base = (rng.random(500) < 0.88).astype(int)
    cand = base.copy()
    cand[np.flatnonzero(base)[:10]] = 0  # wrong on 10 examples the baseline gets right: 2 points lost
    drop = 100 * (base.mean() - cand.mean())
    assert paired_drop_bound(_acc(base.tolist()), _acc(base.tolist()), 0.9) == 0.0  # the same answers
    b50, b90, b99 = (paired_drop_bound(_acc(base.tolist()), _acc(cand.tolist()), c) for c in (0.5, 0.9, 0.99))
    assert abs(b50 - drop) < 0.3 and drop < b90 < b99
    # Unpaired, the two scores' own spreads would add up: a 90% bound near drop + 1.28 * 2.0 points.
    # Paired, only the 10 changed answers vary: near drop + 1.28 * 0.63.
    assert b90 < drop + 1.28 * 1.0
    # Swapping which examples differ in both directions raises the bound at the same drop.
    noisy = cand.copy()
    noisy[np.flatnonzero(base == 0)[:15]] = 1
    noisy[np.flatnonzero((base == 1) & (cand == 1))[:15]] = 0
    assert 100 * (base.mean() - noisy.mean()) == drop
    assert paired_drop_bound(_acc(base.tolist()), _acc(noisy.tolist()), 0.9) > b90


def test_paired_drop_bound_for_entity_f1_and_perplexity():
    tokens = [[1, 1, 1]] * 50 + [[0, 1, 1]] * 50  # F1 0.5
    worse = [[1, 1, 1]] * 40 + [[0, 1, 1]] * 60  # F1 0.4: 10 points lost
    f1 = paired_drop_bound({"metric": "f1", "units": tokens}, {"metric": "f1", "units": worse}, 0.5)
    assert abs(f1 - 10.0) < 1.5
    ppl = paired_drop_bound({"metric": "perplexity", "units": [[10.0, 10]] * 20},
                            {"metric": "perplexity", "units": [[11.0, 10]] * 20}, 0.9)
    assert ppl == 100 * (math.exp(1.1) / math.exp(1.0) - 1)  # every window 0.1 nats worse: no spread


def test_paired_drop_bound_needs_units_of_the_same_examples():
    assert paired_drop_bound(_acc([1, 0]), _acc([1, 0, 1]), 0.9) is None
    assert paired_drop_bound({"metric": "accuracy"}, _acc([1]), 0.9) is None


def test_evaluate_returns_units_only_when_asked():
    slim, task = tiny_bert(), tiny_sst2_task()
    r = evaluate(torch_runner(slim.model), slim.tokenizer, task, bootstrap=10)
    assert "units" not in r
    r = evaluate(torch_runner(slim.model), slim.tokenizer, task, bootstrap=10, units=True)
    assert len(r["units"]) == r["n"] and np.mean(r["units"]) == r["value"]
    slim, task = tiny_bert("token-classification"), tiny_ner_task()
    r = evaluate(torch_runner(slim.model), slim.tokenizer, task, bootstrap=10, units=True)
    tp, n_pred, n_gold = np.array(r["units"]).sum(axis=0)
    assert len(r["units"]) == r["n"] and math.isclose(r["value"], 0.0 if tp == 0 else 2 * tp / (n_pred + n_gold))
