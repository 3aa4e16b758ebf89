"""Surgery: physical removal must equal masking, keep outputs where removed units contributed nothing,
replay exactly from the saved plan, and export to ONNX."""

import io

import numpy as np
import pytest
import torch

from slimformer import models
from slimformer.errors import SlimformerError
from slimformer.surgery import (
    SurgeryPlan,
    corpus_token_ids,
    drop_layers,
    keep_layers,
    mask_heads,
    mask_neurons,
    plan_of,
    prune_heads,
    prune_neurons,
    prune_vocab,
    replay_plan,
    set_plan,
    wrap_tokenizer,
)
from slimformer.testing import tiny_bert

TEXTS = ["a charming and often affecting journey", "boring and far too long , with flat characters"]
HEAD_DIM = 8  # tiny BERT: hidden 32 / 4 heads


def logits(slim, texts=TEXTS):
    enc = slim.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        return slim.model(**enc).logits


def layers(slim):
    return slim.model.bert.encoder.layer


def zero_head_outputs(slim, layer, heads):
    with torch.no_grad():
        for h in heads:
            layers(slim)[layer].attention.output.dense.weight[:, h * HEAD_DIM:(h + 1) * HEAD_DIM] = 0


def test_removing_heads_with_zero_output_weights_keeps_outputs():
    slim = tiny_bert(seed=1)
    zero_head_outputs(slim, 0, [1, 3])
    zero_head_outputs(slim, 1, [0, 1, 2, 3])  # this layer loses every head
    ref = logits(slim)
    plan = prune_heads(slim.model, {0: [0, 2], 1: []})
    assert layers(slim)[0].attention.self.query.out_features == 2 * HEAD_DIM
    assert layers(slim)[0].attention.self.num_attention_heads == 2
    assert layers(slim)[0].attention.self.all_head_size == 2 * HEAD_DIM
    assert plan.heads == {0: [0, 2], 1: []}
    torch.testing.assert_close(logits(slim), ref, atol=1e-5, rtol=0)


def test_removing_neurons_with_zero_output_weights_keeps_outputs():
    slim = tiny_bert(seed=2)
    with torch.no_grad():
        layers(slim)[0].output.dense.weight[:, 5:40] = 0
        layers(slim)[1].output.dense.weight.zero_()  # all neurons of layer 1
    ref = logits(slim)
    keep0 = [i for i in range(64) if not 5 <= i < 40]
    plan = prune_neurons(slim.model, {0: keep0, 1: []})
    assert layers(slim)[0].intermediate.dense.out_features == len(keep0)
    assert plan.neurons[0] == keep0 and plan.neurons[1] == []
    torch.testing.assert_close(logits(slim), ref, atol=1e-5, rtol=0)


def test_removing_live_units_does_change_outputs():
    # Guards the two tests above: removal is not silently a no-op.
    slim = tiny_bert(seed=1)
    ref = logits(slim)
    prune_heads(slim.model, {0: [0, 2]})
    assert (logits(slim) - ref).abs().max() > 1e-4


def test_removing_no_units_changes_nothing():
    slim = tiny_bert(seed=3)
    ref = logits(slim)
    plan = prune_heads(slim.model, {0: range(4), 1: range(4)})
    plan = prune_neurons(slim.model, {0: range(64), 1: range(64)}, plan)
    plan = keep_layers(slim.model, [0, 1], plan)
    assert plan.is_identity()
    assert torch.equal(logits(slim), ref)


def test_masking_equals_physical_removal():
    slim = tiny_bert(seed=4)
    head_masks = {0: torch.tensor([1.0, 0, 1, 0]), 1: torch.zeros(4)}
    neuron_mask = torch.ones(64)
    neuron_mask[::3] = 0
    handles = mask_heads(slim.model, head_masks) + mask_neurons(slim.model, {1: neuron_mask})
    masked = logits(slim)
    for h in handles:
        h.remove()
    assert (logits(slim) - masked).abs().max() > 1e-4  # the masks mattered
    prune_heads(slim.model, {0: [0, 2], 1: []})
    prune_neurons(slim.model, {1: [i for i in range(64) if i % 3]})
    torch.testing.assert_close(logits(slim), masked, atol=1e-5, rtol=0)


def test_plans_compose_in_base_indices_and_replay():
    slim = tiny_bert(seed=5)
    plan = prune_heads(slim.model, {0: [1, 2, 3], 1: [0, 3]})
    plan = prune_heads(slim.model, {0: [0, 2]}, plan)  # current positions 0, 2 = base heads 1, 3
    assert plan.heads == {0: [1, 3], 1: [0, 3]}
    plan = prune_neurons(slim.model, {1: list(range(10, 64))}, plan)
    plan = prune_neurons(slim.model, {1: [0, 1, 2]}, plan)  # = base neurons 10, 11, 12
    plan = prune_heads(slim.model, {1: [0, 1]}, plan)
    plan = prune_heads(slim.model, {1: []}, plan)
    plan = prune_heads(slim.model, {1: []}, plan)  # a layer with no heads left can be "pruned" again
    plan = drop_layers(slim.model, [0], plan)
    assert plan.heads == {1: []} and plan.layers == [1] and plan.neurons[1] == [10, 11, 12]
    fresh = tiny_bert(seed=99)
    replay_plan(fresh.model, SurgeryPlan.from_json(plan.to_json()))
    fresh.model.load_state_dict(slim.model.state_dict(), strict=True)
    torch.testing.assert_close(logits(fresh), logits(slim), atol=0, rtol=0)


def pruned_everything(seed=6):
    slim = tiny_bert(seed=seed)
    plan = prune_heads(slim.model, {0: [0, 3], 1: []})
    plan = prune_neurons(slim.model, {0: list(range(0, 64, 2)), 1: list(range(20))}, plan)
    plan = prune_vocab(slim.model, corpus_token_ids(slim.tokenizer, TEXTS + ["a dull , lifeless mess"]), plan)
    set_plan(slim, plan)
    return slim


def test_save_and_load_round_trip_identical_logits(tmp_path):
    slim = pruned_everything()
    plan = drop_layers(slim.model, [1], plan_of(slim))
    set_plan(slim, plan)
    ref = logits(slim)
    models.save(slim, tmp_path / "m")
    back = models.load(tmp_path / "m")
    assert back.record["surgery"] == plan.to_json()
    assert len(back.tokenizer) == len(plan.vocab) == back.model.bert.embeddings.word_embeddings.num_embeddings
    assert torch.equal(logits(back), ref)
    # config.json stays the base architecture the plan applies to
    assert back.model.config.num_hidden_layers == 2 and back.model.config.vocab_size == 30522


def test_replay_refuses_a_plan_for_another_architecture():
    plan = SurgeryPlan.identity(tiny_bert().model)
    other = tiny_bert(num_hidden_layers=3)
    with pytest.raises(SlimformerError, match="base architecture"):
        replay_plan(other.model, plan.to_json())
    with pytest.raises(SlimformerError, match="malformed"):
        replay_plan(other.model, {"family": "bert"})


def test_bad_surgery_inputs_are_user_errors():
    slim = tiny_bert()
    with pytest.raises(SlimformerError, match="all 2 layers"):
        drop_layers(slim.model, [0, 1])
    with pytest.raises(SlimformerError, match="keep at least one"):
        keep_layers(slim.model, [])
    with pytest.raises(SlimformerError, match="do not exist"):
        prune_heads(slim.model, {0: [0, 4]})
    with pytest.raises(SlimformerError, match="duplicates"):
        prune_neurons(slim.model, {0: [1, 1]})
    with pytest.raises(SlimformerError, match="does not exist"):
        prune_heads(slim.model, {5: [0]})


def test_onnx_export_of_pruned_model_matches_pytorch():
    ort = pytest.importorskip("onnxruntime")
    slim = pruned_everything(seed=7)
    model = slim.model.eval()

    class Logits(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.m(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).logits

    enc = slim.tokenizer(TEXTS, padding=True, return_tensors="pt")
    names = ["input_ids", "attention_mask", "token_type_ids"]
    f = io.BytesIO()
    torch.onnx.export(Logits(model), tuple(enc[n] for n in names), f, dynamo=False, input_names=names,
                      output_names=["logits"], opset_version=17,
                      dynamic_axes={n: {0: "batch", 1: "seq"} for n in names})
    sess = ort.InferenceSession(f.getvalue(), providers=["CPUExecutionProvider"])
    enc = slim.tokenizer(TEXTS + ["a dull , lifeless mess " * 3], padding=True, return_tensors="pt")
    assert enc["input_ids"].shape[1] > 12  # other batch and sequence sizes than at export
    got = sess.run(None, {n: enc[n].numpy() for n in names})[0]
    with torch.no_grad():
        want = model(**enc).logits.numpy()
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_vocab_pruning_keeps_logits_on_text_of_kept_tokens():
    slim = tiny_bert(seed=8)
    ref = logits(slim)
    plan = prune_vocab(slim.model, corpus_token_ids(slim.tokenizer, TEXTS))
    set_plan(slim, plan)
    assert len(slim.tokenizer) == len(plan.vocab) < 100
    assert torch.equal(logits(slim), ref)
    # A word that the kept pieces cannot spell reads as one [UNK] (WordPiece semantics; see test_vocab.py
    # for the single-character fallback that avoids it).
    base = slim.tokenizer.base_tokenizer
    unk_text = ["a charming xylophone"]
    enc = slim.tokenizer(unk_text, return_tensors="pt")
    assert slim.tokenizer.unk_token_id in enc["input_ids"][0].tolist()
    assert len(base.tokenize("xylophone")) > 1
    assert slim.tokenizer.decode(enc["input_ids"][0]) == "[CLS] a charming [UNK] [SEP]"
    assert base(unk_text)["input_ids"][0] != enc["input_ids"][0].tolist()


def test_vocab_tokenizer_behaves_like_a_tokenizer(tmp_path):
    slim = tiny_bert()
    tok = wrap_tokenizer(slim.tokenizer, corpus_token_ids(slim.tokenizer, ["John lives in Paris"]))
    base = tok.base_tokenizer
    ids = base.all_special_ids
    assert sorted(tok.all_special_ids) == sorted(tok.to_new(ids)) and max(tok.all_special_ids) < len(tok)
    assert tok.pad_token_id == tok.to_new(base.pad_token_id)
    assert tok.cls_token_id == tok.to_new(base.cls_token_id)
    enc = tok([["John", "lives", "in", "Paris"]], is_split_into_words=True)
    assert enc.word_ids(0) == base([["John", "lives", "in", "Paris"]], is_split_into_words=True).word_ids(0)
    assert all(0 <= i < len(tok) for i in enc["input_ids"][0])
    assert tok.to_old(enc["input_ids"]) == base([["John", "lives", "in", "Paris"]], is_split_into_words=True)[
        "input_ids"]
    assert tok("Paris")["input_ids"] == tok.encode("Paris")
    assert tok.convert_ids_to_tokens(tok.encode("Paris", add_special_tokens=False)) == ["paris"]
    np_ids = tok(["in Paris"], return_tensors="np")["input_ids"]
    assert np_ids.max() < len(tok)
    tok.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer_config.json").exists()
    with pytest.raises(AttributeError, match="Collator"):
        _ = tok.pad
    rewrapped = wrap_tokenizer(tok, tok.vocab_map)  # wrapping a wrapped tokenizer wraps its base
    assert rewrapped.base_tokenizer is base
