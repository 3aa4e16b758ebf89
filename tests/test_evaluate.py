import math

import numpy as np
import torch

from slimformer.evaluate import _entity_counts, evaluate, perplexity, torch_runner
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
