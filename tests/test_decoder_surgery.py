"""Decoder surgery (GPT-2 and Llama families): physical removal equals masking and keeps outputs where the
removed units contributed nothing, grouped-query attention is pruned in whole key/value groups, pruned models
save, reload and generate with a KV cache, and importance scores exist for both families."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from transformers.pytorch_utils import Conv1D

from slimformer import models
from slimformer.arch import adapter_for
from slimformer.errors import SlimformerError
from slimformer.importance import group_scores, magnitude, select_keep_groups, taylor_scores
from slimformer.models import SlimModel
from slimformer.surgery import (
    HeadlessAttention,
    SurgeryPlan,
    drop_layers,
    head_count,
    keep_layers,
    mask_heads,
    mask_neurons,
    neuron_count,
    plan_of,
    prune_heads,
    prune_neurons,
    prune_vocab,
    replay_plan,
    set_plan,
)
from slimformer.tasks import TaskType
from slimformer.testing import minilm_tokenizer

VOCAB = 96
D = 8  # head_dim: hidden 32 / 4 heads
FFN = {"gpt2": 128, "llama": 64}  # GPT-2's n_inner=None means 4 x hidden


def tiny_gpt2(seed: int = 0, vocab_size: int = VOCAB, layers: int = 2) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=layers, n_head=4, n_embd=32, vocab_size=vocab_size, n_positions=128, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def tiny_llama(seed: int = 0, vocab_size: int = VOCAB, tie: bool = False, layers: int = 2, **kw
               ) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, hidden_size=32,
                      intermediate_size=64, vocab_size=vocab_size, max_position_embeddings=128,
                      tie_word_embeddings=tie, bos_token_id=0, eos_token_id=0, pad_token_id=None, **kw)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # Llama initialises biases to zero; make them matter
        for m in model.modules():
            if isinstance(m, torch.nn.Linear) and m.bias is not None:
                m.bias.normal_(0, 0.1)
    return model


BUILDERS = {"gpt2": tiny_gpt2, "llama": tiny_llama}
FAMILIES = list(BUILDERS)


def ids(seed: int = 0, vocab_size: int = VOCAB, n: int = 12):
    return torch.randint(0, vocab_size, (2, n), generator=torch.Generator().manual_seed(seed))


def logits(model, input_ids=None):
    with torch.no_grad():
        return model(input_ids=ids() if input_ids is None else input_ids).logits


def layer(model, i):
    return adapter_for(model).get_layers(model)[i]


def zero_head_outputs(model, i, heads):
    """Zero the output-projection weights that read the given (query) heads."""
    out = layer(model, i).get_submodule(adapter_for(model).attn_out)
    with torch.no_grad():
        for h in heads:
            if isinstance(out, Conv1D):  # weight [in, out]: a head's inputs are rows
                out.weight[h * D:(h + 1) * D, :] = 0
            else:
                out.weight[:, h * D:(h + 1) * D] = 0


def zero_neuron_outputs(model, i, neurons):
    out = layer(model, i).get_submodule(adapter_for(model).ffn_out)
    with torch.no_grad():
        if isinstance(out, Conv1D):
            out.weight[neurons, :] = 0
        else:
            out.weight[:, neurons] = 0


# --------------------------------------------------------------------------------------------------
# Adapters
# --------------------------------------------------------------------------------------------------


def test_adapters_find_both_families():
    g, ll = tiny_gpt2(), tiny_llama()
    assert adapter_for(g).family == "gpt2" and adapter_for(ll).family == "llama"
    assert adapter_for(g).ffn_size(g.config) == 128  # n_inner is None
    assert adapter_for(ll).n_kv_heads(ll.config) == 2 and adapter_for(ll).group_size(ll.config) == 2
    assert SurgeryPlan.identity(ll).base == {"layers": 2, "heads": 4, "head_dim": 8, "ffn": 64, "vocab": VOCAB,
                                             "kv_heads": 2}
    for m in (g, ll):
        a = adapter_for(m)
        assert head_count(layer(m, 0), a, D) == 4 and neuron_count(layer(m, 1), a) == FFN[a.family]
        assert m.get_submodule(a.vocab_heads[0]).out_features == VOCAB


# --------------------------------------------------------------------------------------------------
# (a) exactness: removing silent units keeps logits; removal equals masking
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_removing_silent_heads_and_neurons_keeps_logits(family):
    model = BUILDERS[family](seed=1)
    zero_head_outputs(model, 0, [2, 3])  # Llama: heads 2, 3 = key/value group 1
    zero_head_outputs(model, 1, [0, 1, 2, 3])  # this layer loses every head
    ffn = FFN[family]
    dead = list(range(5, ffn, 3))
    zero_neuron_outputs(model, 0, dead)
    zero_neuron_outputs(model, 1, list(range(ffn)))  # ... and this one every neuron
    ref = logits(model)
    plan = prune_heads(model, {0: [0, 1], 1: []})
    plan = prune_neurons(model, {0: [i for i in range(ffn) if i not in dead], 1: []}, plan)
    a = adapter_for(model)
    assert head_count(layer(model, 0), a, D) == 2 and head_count(layer(model, 1), a, D) == 0
    assert isinstance(layer(model, 1).get_submodule(".".join(a.query.split(".")[:-1])), HeadlessAttention)
    assert neuron_count(layer(model, 0), a) == ffn - len(dead) and neuron_count(layer(model, 1), a) == 0
    assert plan.heads == {0: [0, 1], 1: []}
    torch.testing.assert_close(logits(model), ref, atol=1e-5, rtol=0)


def test_gpt2_fused_qkv_is_sliced_per_block():
    model = tiny_gpt2(seed=2)
    prune_heads(model, {0: [1, 3]})
    attn = layer(model, 0).attn
    assert isinstance(attn.c_attn, Conv1D) and tuple(attn.c_attn.weight.shape) == (32, 3 * 2 * D)
    assert tuple(attn.c_proj.weight.shape) == (2 * D, 32)
    assert attn.split_size == 2 * D and attn.num_heads == 2


@pytest.mark.parametrize("family", FAMILIES)
def test_removing_live_units_does_change_logits(family):
    # Guards the exactness tests: removal is not silently a no-op.
    model = BUILDERS[family](seed=1)
    ref = logits(model)
    prune_heads(model, {0: [0, 1]})
    assert (logits(model) - ref).abs().max() > 1e-4
    ref = logits(model)
    prune_neurons(model, {1: list(range(10))})
    assert (logits(model) - ref).abs().max() > 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_masking_equals_physical_removal(family):
    model = BUILDERS[family](seed=3)
    ffn = FFN[family]
    head_masks = {0: torch.tensor([0.0, 0, 1, 1]), 1: torch.zeros(4)}
    neuron_mask = torch.ones(ffn)
    neuron_mask[::3] = 0
    handles = mask_heads(model, head_masks) + mask_neurons(model, {1: neuron_mask})
    masked = logits(model)
    for h in handles:
        h.remove()
    assert (logits(model) - masked).abs().max() > 1e-4  # the masks mattered
    prune_heads(model, {0: [2, 3], 1: []})
    prune_neurons(model, {1: [i for i in range(ffn) if i % 3]})
    torch.testing.assert_close(logits(model), masked, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------------
# (b) grouped-query attention
# --------------------------------------------------------------------------------------------------


def test_gqa_removing_a_kv_group_equals_masking_its_query_heads():
    model = tiny_llama(seed=4, attention_bias=True)
    handles = mask_heads(model, {0: torch.tensor([1.0, 1, 0, 0])})
    masked = logits(model)
    for h in handles:
        h.remove()
    assert (logits(model) - masked).abs().max() > 1e-4
    plan = prune_heads(model, {0: [0, 1]})
    attn = layer(model, 0).self_attn
    assert attn.q_proj.out_features == 2 * D and attn.k_proj.out_features == D and attn.v_proj.out_features == D
    assert attn.o_proj.in_features == 2 * D and attn.num_key_value_groups == 2
    assert plan.heads[0] == [0, 1]
    torch.testing.assert_close(logits(model), masked, atol=1e-5, rtol=0)
    # The second group is now at positions 0, 1 again (query heads 2, 3 of the base model).
    prune_heads(model, {1: [2, 3]}, plan)
    assert layer(model, 1).self_attn.k_proj.out_features == D


@pytest.mark.parametrize("keep", [[0, 2], [1], [0, 1, 3]])
def test_gqa_keep_set_that_splits_a_group_is_refused(keep):
    model = tiny_llama()
    with pytest.raises(SlimformerError, match="split key/value groups") as e:
        prune_heads(model, {0: keep})
    assert "\n" not in str(e.value)
    assert layer(model, 0).self_attn.q_proj.out_features == 4 * D  # nothing changed


def test_gqa_plan_replays_on_a_fresh_model():
    model = tiny_llama(seed=5)
    plan = prune_heads(model, {0: [2, 3], 1: []})
    plan = prune_neurons(model, {0: list(range(0, 64, 2))}, plan)
    plan = drop_layers(model, [1], plan)
    fresh = replay_plan(tiny_llama(seed=99), plan.to_json())
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(logits(fresh), logits(model), atol=0, rtol=0)


# --------------------------------------------------------------------------------------------------
# (c) save + reload
# --------------------------------------------------------------------------------------------------


def slim_of(model) -> SlimModel:
    return SlimModel(model=model, tokenizer=minilm_tokenizer(), task_type=TaskType.CAUSAL_LM, label_names=None,
                     record={"base_model": "tiny"}, source="tiny")


@pytest.mark.parametrize("family", FAMILIES)
def test_save_and_reload_gives_identical_logits(family, tmp_path):
    tok = minilm_tokenizer()
    model = tiny_gpt2(seed=6, vocab_size=len(tok)) if family == "gpt2" else \
        tiny_llama(seed=6, vocab_size=len(tok), tie=True)
    slim = slim_of(model)
    text_ids = torch.tensor([tok("the best film of the year")["input_ids"]])
    plan = prune_heads(model, {0: [0, 1], 1: []})
    plan = prune_neurons(model, {1: list(range(3, 40))}, plan)
    plan = drop_layers(model, [0], plan)
    keep = sorted(set(text_ids[0].tolist()) | set(tok.all_special_ids) | set(range(200, 260)))
    plan = prune_vocab(model, keep, plan)
    set_plan(slim, plan)
    new_ids = torch.as_tensor(slim.tokenizer.to_new(text_ids))
    ref = logits(model, new_ids)
    assert model.lm_head.weight is adapter_for(model).base(model).get_submodule(adapter_for(model).embeddings).weight
    models.save(slim, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["vocab_size"] == len(tok)  # surgery never changes the config
    back = models.load(tmp_path / "m")
    assert plan_of(back).to_json() == plan.to_json()
    torch.testing.assert_close(logits(back.model, new_ids), ref, atol=1e-6, rtol=0)
    emb = adapter_for(back.model).base(back.model).get_submodule(adapter_for(back.model).embeddings)
    assert back.model.lm_head.weight is emb.weight and emb.num_embeddings == len(keep)
    # config.json stays the base architecture: plain transformers loads it (as the unpruned shape).
    plain = AutoModelForCausalLM.from_config(json_config(tmp_path / "m"))
    assert len(adapter_for(plain).get_layers(plain)) == 2


def json_config(folder):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(folder)


# --------------------------------------------------------------------------------------------------
# (d) vocabulary
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family,tie", [("gpt2", True), ("llama", True), ("llama", False)])
def test_vocab_pruning_keeps_logits_on_kept_tokens(family, tie):
    model = tiny_gpt2(seed=7) if family == "gpt2" else tiny_llama(seed=7, tie=tie)
    a = adapter_for(model)
    assert (model.lm_head.weight is a.base(model).get_submodule(a.embeddings).weight) == tie
    keep = sorted(set(range(0, VOCAB, 2)) | {5, 7})
    text = torch.tensor([[2, 5, 7, 10, 40, 94, 0, 8]])
    ref = logits(model, text)[..., keep]
    plan = prune_vocab(model, keep)
    assert plan.vocab == keep
    emb = a.base(model).get_submodule(a.embeddings)
    assert emb.num_embeddings == len(keep) and model.lm_head.out_features == len(keep)
    assert (model.lm_head.weight is emb.weight) == tie  # tied stays tied; untied heads are sliced alike
    new_text = torch.tensor([[keep.index(int(i)) for i in text[0]]])
    out = logits(model, new_text)
    assert out.shape[-1] == len(keep)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------------
# (e) layers and the KV cache
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_drop_and_headless_layers_generate_with_cache(family):
    model = BUILDERS[family](seed=8, layers=3)
    plan = drop_layers(model, [1])
    attn = adapter_for(model).query.rsplit(".", 1)[0]
    assert [layer(model, i).get_submodule(attn).layer_idx for i in (0, 1)] == [0, 1]
    plan = prune_heads(model, {0: [], 1: [0, 1]}, plan)  # layer 0 (which the cache reads lengths from) is headless
    prompt = ids(9, n=5)[:1]
    with torch.no_grad():
        fast = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
        slow = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False, pad_token_id=0)
    assert fast.shape == (1, 11)
    assert torch.equal(fast, slow)  # the cache gives the same greedy tokens as recomputing everything
    # and the cached step logits equal the full forward's
    with torch.no_grad():
        full = model(fast).logits[:, -1]
        out = model(fast[:, :-1], use_cache=True)
        step = model(fast[:, -1:], past_key_values=out.past_key_values, use_cache=True).logits[:, -1]
    torch.testing.assert_close(step, full, atol=1e-5, rtol=0)
    assert plan.layers == [0, 2]


def test_keep_layers_refuses_nonsense():
    model = tiny_gpt2()
    with pytest.raises(SlimformerError, match="keep at least one"):
        keep_layers(model, [])
    with pytest.raises(SlimformerError, match="do not exist"):
        prune_heads(model, {0: [7]})


# --------------------------------------------------------------------------------------------------
# (f) importance
# --------------------------------------------------------------------------------------------------


def lm_batches(n: int = 3, vocab_size: int = VOCAB):
    out = []
    for s in range(n):
        x = ids(100 + s, vocab_size, 16)
        out.append({"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()})
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_importance_shapes_and_taylor_differs_from_magnitude(family):
    model = BUILDERS[family](seed=10)
    prune_heads(model, {1: [0, 1]})
    prune_neurons(model, {0: list(range(20))})
    ffn = FFN[family]
    mag = {u: magnitude(model, u) for u in ("heads", "neurons")}
    tay = taylor_scores(model, lm_batches(), ["heads", "neurons"])
    for u, shape in (("heads", (2, 4)), ("neurons", (2, ffn))):
        for s in (mag[u], tay[u]):
            assert tuple(s.shape) == shape
    for s in (mag["heads"], tay["heads"]):
        assert not s[0].isnan().any() and s[1, :2].isfinite().all() and s[1, 2:].isnan().all()
        assert (s[0] > 0).all()
    for s in (mag["neurons"], tay["neurons"]):
        assert s[0, :20].isfinite().all() and s[0, 20:].isnan().all() and s[1].isfinite().all()
    for u in ("heads", "neurons"):  # different orderings, not just a different scale
        m, t = mag[u][0, :4], tay[u][0, :4]
        assert not torch.equal(m.argsort(), t.argsort()) or not torch.allclose(m / m.sum(), t / t.sum(), atol=1e-3)
    assert all(p.grad is None for p in model.parameters())


def test_magnitude_of_a_head_counts_its_query_output_and_share_of_kv_weights():
    model = tiny_llama(seed=11)
    attn = layer(model, 0).self_attn
    with torch.no_grad():
        for m in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj):
            m.weight.fill_(1.0)
    s = magnitude(model, "heads")[0]
    # each query head: q rows (8 x 32) + o columns (32 x 8) + half of its group's k and v rows (2 x 8 x 32)
    torch.testing.assert_close(s, torch.full((4,), (256 + 256 + 512 / 2) ** 0.5))


def test_gqa_scores_are_summed_over_groups_and_selection_keeps_whole_groups():
    scores = torch.tensor([[1.0, 2.0, 10.0, 10.0], [5.0, 5.0, float("nan"), float("nan")]])
    g = group_scores(scores, 2)
    assert g[0].tolist() == [3.0, 20.0] and g[1, 0].item() == 10.0 and g[1, 1].isnan()
    keep = select_keep_groups(scores, 0.5, [4, 4], group=2, scope="per-layer")
    assert keep == {0: [2, 3], 1: [0, 1]}
    assert select_keep_groups(scores, 0.5, [4, 4], group=1, scope="per-layer") == {0: [2, 3], 1: [0, 1]}


# --------------------------------------------------------------------------------------------------
# The prune stage on a causal-LM task
# --------------------------------------------------------------------------------------------------


def lm_task():
    import random

    from slimformer.tasks import TaskData

    words = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "in", "park", "while", "bird", "sang"]
    rng = random.Random(0)
    rows = [{"text": " ".join(rng.choice(words) for _ in range(12))} for _ in range(40)]
    return TaskData(TaskType.CAUSAL_LM, train=rows[:30], tuning=rows[30:35], eval=rows[35:], label_names=None,
                    source="tiny")


@pytest.mark.parametrize("family", FAMILIES)
def test_prune_job_on_a_causal_lm(family, tmp_path):
    from slimformer.stages.prune import PruneConfig, prune_job

    tok = minilm_tokenizer()
    model = tiny_gpt2(seed=12, vocab_size=len(tok), layers=3) if family == "gpt2" else \
        tiny_llama(seed=12, vocab_size=len(tok), layers=3)
    models.save(slim_of(model), tmp_path / "base")
    cfg = PruneConfig(heads=0.5, ffn=0.25, keep_layers=2, importance="taylor", scope="per-layer", batch_size=8,
                      max_length=32)
    result = prune_job(tmp_path / "base", lm_task(), cfg, tmp_path / "pruned", progress=False)
    assert result["pruning"]["plan"]["heads_per_layer"] == [2, 2]
    assert result["pruning"]["plan"]["neurons_per_layer"] == [FFN[family] * 3 // 4] * 2
    assert result["quality"]["metric"] == "perplexity"
    back = models.load(tmp_path / "pruned")
    plan = plan_of(back)
    assert plan.layers == [0, 1]
    if family == "llama":  # whole key/value groups: query heads (0, 1) or (2, 3)
        assert all(h in ([0, 1], [2, 3]) for h in plan.heads.values())
        assert layer(back.model, 0).self_attn.k_proj.out_features == D
    x = ids(13, len(tok))
    with torch.no_grad():
        out = back.model(x, use_cache=True)
        step = back.model(x[:, -1:], past_key_values=out.past_key_values).logits[:, -1]
        full = back.model(torch.cat([x, x[:, -1:]], 1)).logits[:, -1]
    torch.testing.assert_close(step, full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family,recover", [("gpt2", "finetune"), ("llama", "kd")])
def test_prune_job_recovery_on_a_causal_lm(family, recover, tmp_path):
    from slimformer.stages.prune import PruneConfig, prune_job

    tok = minilm_tokenizer()
    model = tiny_gpt2(seed=14, vocab_size=len(tok)) if family == "gpt2" else tiny_llama(seed=14, vocab_size=len(tok))
    models.save(slim_of(model), tmp_path / "base")
    nll = {}
    for rec in ("none", recover):
        cfg = PruneConfig(heads=0.5, ffn=0.5, importance="magnitude", recover=rec, epochs=3, learning_rate=3e-3,
                          batch_size=8, max_length=32, kd_alpha=0.5)
        result = prune_job(tmp_path / "base", lm_task(), cfg, tmp_path / rec, progress=False)
        nll[rec] = result["quality"]["scores"]["nll_per_token"]
        assert result["pruning"]["plan"]["heads"] == "4/8"
    assert nll[recover] < nll["none"] - 0.2  # recovery trained the pruned LM on the task text


@pytest.mark.parametrize("model_type", ["mistral", "qwen2", "qwen3"])
def test_llama_like_families_prune_exactly_and_generate(model_type):
    from transformers import AutoConfig

    cfg = AutoConfig.for_model(model_type, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                               hidden_size=32, intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=128,
                               head_dim=8, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(15)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    assert adapter_for(model).family == "llama"
    zero_head_outputs(model, 1, [0, 1])
    zero_neuron_outputs(model, 0, list(range(0, 64, 4)))
    ref = logits(model)
    handles = mask_heads(model, {0: torch.tensor([1.0, 1, 0, 0])})
    masked = logits(model)
    for h in handles:
        h.remove()
    prune_heads(model, {1: [2, 3], 0: [0, 1]})
    prune_neurons(model, {0: [i for i in range(64) if i % 4]})
    torch.testing.assert_close(logits(model), masked, atol=1e-5, rtol=0)
    assert (masked - ref).abs().max() > 1e-4
    prune_heads(model, {0: []})
    prompt = ids(16, n=5)[:1]
    with torch.no_grad():
        fast = model.generate(prompt, max_new_tokens=5, do_sample=False, use_cache=True, pad_token_id=0)
        slow = model.generate(prompt, max_new_tokens=5, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(fast, slow)


def test_vocab_pruning_refuses_to_move_the_pad_id_a_decoder_classifier_reads():
    from transformers import GPT2ForSequenceClassification

    cfg = tiny_gpt2().config
    cfg.pad_token_id, cfg.num_labels = 5, 2
    model = GPT2ForSequenceClassification(cfg).eval()
    with pytest.raises(SlimformerError, match="pad token id 5"):
        prune_vocab(model, [0, 1, 5, 9, 20])  # pad 5 would become id 2
    plan = prune_vocab(model, list(range(6)) + [9, 20])  # ids 0..5 keep their places: allowed
    assert plan.vocab[5] == 5 and adapter_for(model).base(model).wte.num_embeddings == 8


@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_decoder_with_a_headless_layer_exports_and_quantizes(family, tmp_path):
    from slimformer.export import export_onnx
    from slimformer.stages.quantize import QuantizeConfig, quantize_torch

    tok = minilm_tokenizer()
    model = BUILDERS[family](seed=17, vocab_size=len(tok), layers=3)
    slim = slim_of(model)
    plan = prune_heads(model, {0: [], 1: [0, 1]})
    plan = prune_neurons(model, {1: list(range(10)), 2: []}, plan)
    set_plan(slim, drop_layers(model, [2], plan))
    assert export_onnx(slim, tmp_path / "onnx", write_extras=False)["max_abs_diff"] < 1e-4
    q = models.load(models.save(slim, tmp_path / "pruned"))
    quantize_torch(q, QuantizeConfig(scheme="torch-dynamic-int8"))
    x = ids(18, len(tok))
    ref = logits(q.model, x)
    back = models.load(models.save(q, tmp_path / "quantized"))
    torch.testing.assert_close(logits(back.model, x), ref, atol=0, rtol=0)
