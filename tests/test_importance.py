"""Importance scores and the arithmetic that turns them into kept units."""

import math

import pytest
import torch

from slimformer.errors import SlimformerError
from slimformer.importance import (
    magnitude,
    round_count,
    select_keep,
    target_counts,
    task_batches,
    taylor,
    taylor_scores,
    unit_step,
)
from slimformer.surgery import prune_heads, prune_neurons
from slimformer.testing import tiny_bert, tiny_ner_task, tiny_sst2_task

HEAD_DIM = 8


@pytest.fixture(scope="module")
def sst2():
    return tiny_sst2_task(16, 8)


def test_scores_have_one_row_per_layer_and_one_column_per_unit(sst2):
    slim = tiny_bert(seed=0)
    data = task_batches(slim.tokenizer, sst2, max_examples=16, batch_size=8)
    for scorer in (magnitude, taylor):
        assert scorer(slim.model, "heads", data).shape == (2, 4)
        assert scorer(slim.model, "neurons", data).shape == (2, 64)
    both = taylor_scores(slim.model, data)
    assert both["heads"].shape == (2, 4) and both["neurons"].shape == (2, 64)
    assert torch.isfinite(both["heads"]).all() and (both["heads"] >= 0).all()


def test_pruned_layers_are_nan_padded(sst2):
    slim = tiny_bert(seed=0)
    prune_heads(slim.model, {0: [1, 2], 1: []})
    prune_neurons(slim.model, {1: list(range(10))})
    data = task_batches(slim.tokenizer, sst2, max_examples=8)
    for scores in (magnitude(slim.model, "heads"), taylor(slim.model, "heads", data)):
        assert scores.shape == (2, 2) and torch.isfinite(scores[0]).all() and torch.isnan(scores[1]).all()
    n = taylor(slim.model, "neurons", data)
    assert n.shape == (2, 64) and torch.isnan(n[1, 10:]).all() and torch.isfinite(n[1, :10]).all()


def test_magnitude_is_the_norm_of_a_units_weights():
    slim = tiny_bert(seed=1)
    layer = slim.model.bert.encoder.layer[0]
    with torch.no_grad():
        for lin in (layer.attention.self.query, layer.attention.self.key, layer.attention.self.value):
            lin.weight[HEAD_DIM:2 * HEAD_DIM] = 0
        layer.attention.output.dense.weight[:, HEAD_DIM:2 * HEAD_DIM] = 0
        layer.intermediate.dense.weight[7] = 0
        layer.output.dense.weight[:, 7] = 0
    h, n = magnitude(slim.model, "heads"), magnitude(slim.model, "neurons")
    assert h[0, 1] == 0 and (h[0, [0, 2, 3]] > 0).all()
    assert n[0, 7] == 0 and n[0, 6] > 0
    with torch.no_grad():
        expected = math.sqrt(float(layer.intermediate.dense.weight[6].pow(2).sum()
                                   + layer.output.dense.weight[:, 6].pow(2).sum()))
    assert n[0, 6].item() == pytest.approx(expected, rel=1e-5)


def test_taylor_sees_what_magnitude_cannot(sst2):
    slim = tiny_bert(seed=2)
    with torch.no_grad():  # head 3 of layer 1 has large input weights but writes nothing
        slim.model.bert.encoder.layer[1].attention.output.dense.weight[:, 3 * HEAD_DIM:] = 0
    data = task_batches(slim.tokenizer, sst2, max_examples=16)
    t, m = taylor(slim.model, "heads", data), magnitude(slim.model, "heads")
    assert t[1, 3] == 0 and m[1, 3] > 0
    assert not torch.allclose(t / t.sum(), m / m.sum(), atol=1e-3)
    assert all(p.grad is None for p in slim.model.parameters())  # scoring leaves parameter gradients alone


def test_taylor_works_for_token_classification():
    slim = tiny_bert("token-classification", seed=3)
    task = tiny_ner_task(8)
    scores = taylor_scores(slim.model, task_batches(slim.tokenizer, task, max_examples=8))
    assert scores["neurons"].shape == (2, 64) and scores["neurons"].sum() > 0


def test_taylor_needs_labelled_data():
    slim = tiny_bert()
    with pytest.raises(SlimformerError, match="labelled"):
        taylor(slim.model, "heads", [{"input_ids": torch.tensor([[101, 102]])}])
    with pytest.raises(SlimformerError, match="needs task data"):
        taylor(slim.model, "heads", None)


def test_rounding_arithmetic():
    assert unit_step(1, 32) == 1
    assert unit_step(16, 8) == 2  # a head of 8 features: 2 heads make 16
    assert unit_step(32, 64) == 1 and unit_step(8, 1) == 8
    assert round_count(0, 8, 100) == 0
    assert round_count(3, 8, 100) == 8  # a non-empty layer stays non-empty
    assert round_count(13, 8, 100) == 16 and round_count(11, 8, 100) == 8
    assert round_count(1530, 32, 1536) == 1536 and round_count(100, 32, 90) == 90


def test_per_layer_ratio_removes_the_same_share_everywhere():
    scores = torch.rand(3, 12)
    assert target_counts(scores, 0.5, [12, 12, 12], scope="per-layer") == [6, 6, 6]
    assert target_counts(scores, 0.4, [12, 12, 12], scope="per-layer") == [7, 7, 7]  # 7.2 -> 7
    assert target_counts(torch.rand(2, 1536), 0.5, [1536] * 2, scope="per-layer", step=32) == [768, 768]
    assert target_counts(torch.rand(2, 1536), 0.41, [1536] * 2, scope="per-layer", step=32) == [896, 896]
    keep = select_keep(torch.tensor([[0.1, 0.9, 0.5, 0.3]]), 0.5, [4], scope="per-layer")
    assert keep == {0: [1, 2]}


def test_global_ratio_follows_scores_across_layers():
    scores = torch.tensor([[9.0, 8.0, 7.0, 6.0], [1.0, 0.5, 0.2, 0.1]])
    keep = select_keep(scores, 0.5, [4, 4], scope="global", normalize=False)
    assert keep == {0: [0, 1, 2, 3], 1: []}  # a layer may lose every unit
    # with per-layer normalisation the layers compete on their shares, not their scales
    assert sum(len(v) for v in select_keep(scores, 0.5, [4, 4], scope="global").values()) == 4
    # ratios are of the original size: a layer already pruned to 2 units counts as 4
    padded = torch.tensor([[1.0, 2.0, float("nan"), float("nan")], [3.0, 4.0, 5.0, 6.0]])
    counts = target_counts(padded, 0.5, [4, 4], scope="global", normalize=False)
    assert counts == [0, 4]
    assert target_counts(padded, 0.25, [4, 4], scope="per-layer") == [2, 3]


def test_ratios_out_of_range_are_user_errors():
    for bad in (-0.1, 1.0, 1.5, float("nan")):
        with pytest.raises(SlimformerError, match="out of range"):
            select_keep(torch.rand(2, 4), bad, [4, 4])
    with pytest.raises(SlimformerError, match="do not match"):
        select_keep(torch.rand(2, 4), 0.5, [4, 4, 4])
    with pytest.raises(SlimformerError, match="round_to"):
        unit_step(0)
