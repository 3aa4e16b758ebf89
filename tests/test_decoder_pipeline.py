"""Decoder LMs end to end on tiny random GPT-2 and Llama (GQA) models: save/reload, perplexity, fine-tuning,
distillation, quantization, ONNX export (plain and pruned) and a search under a perplexity budget."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from slimformer import api, models
from slimformer.errors import SlimformerError
from slimformer.evaluate import evaluate, perplexity, torch_runner
from slimformer.export import OrtRunner, export_onnx, load_runner
from slimformer.pareto import Candidate, choose, measurement, parse_budget
from slimformer.stages.distill import DistillConfig
from slimformer.stages.finetune import FinetuneConfig
from slimformer.stages.quantize import QuantizeConfig, quantize_job
from slimformer.tasks import TaskType, load_task_data
from slimformer.testing import tiny_gpt2, tiny_llama, tiny_lm_task, write_text_folder

BUILDERS = {"gpt2": tiny_gpt2, "llama": tiny_llama}
FAST = {"batch_size": 8, "max_length": 32, "precision": "fp32", "warmup_ratio": 0.0, "logging_steps": 1000}


@pytest.fixture(scope="module")
def task():
    return tiny_lm_task()


@pytest.fixture(scope="module")
def teachers(tmp_path_factory, task):
    """Each family briefly trained on the tiny corpus (a teacher that knows something), saved."""
    root = tmp_path_factory.mktemp("decoders")
    out = {}
    for name, build in BUILDERS.items():
        base = models.save(build(), root / f"{name}-base")
        api.finetune(base, task, FinetuneConfig(epochs=6, learning_rate=1e-2, **FAST), root / f"{name}-ft",
                     progress=False)
        out[name] = root / f"{name}-ft"
        out[f"{name}-base"] = base
    return out


def _batch(tok, texts):
    enc = tok(texts, padding=True, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_save_reload_identical_logits_and_lm_tokenizer(tmp_path, family):
    slim = BUILDERS[family]()
    if family == "llama":
        assert slim.config.num_key_value_heads == 2 and slim.config.num_attention_heads == 4
    folder = models.save(slim, tmp_path / "m")
    again = models.load(folder)
    assert again.task_type == TaskType.CAUSAL_LM and type(again.model) is type(slim.model)
    assert again.tokenizer.pad_token_id is not None
    assert "token_type_ids" not in again.tokenizer(["a b"]), "decoders must not be fed token types"
    batch = _batch(again.tokenizer, ["the cat sat on the mat .", "a bird"])
    with torch.no_grad():
        torch.testing.assert_close(again.model(**batch).logits, slim.model(**batch).logits, rtol=0, atol=0)


def test_gpt2_style_tokenizer_gets_eos_as_pad():
    from slimformer.models import prepare_lm_tokenizer
    from slimformer.testing import minilm_tokenizer

    tok = minilm_tokenizer()
    tok.pad_token = None
    tok.eos_token = "[SEP]"
    prepare_lm_tokenizer(tok)
    assert tok.pad_token == "[SEP]"
    tok.pad_token, tok.eos_token = None, None
    with pytest.raises(SlimformerError, match="neither a pad nor an EOS token"):
        prepare_lm_tokenizer(tok)


def test_perplexity_is_exp_mean_nll_by_hand(task):
    slim = tiny_gpt2()
    tok = slim.tokenizer
    ids = torch.tensor(tok(task.eval[0]["text"], add_special_tokens=False)["input_ids"])
    # One window covering the whole text: the model's own shifted cross-entropy is the mean NLL.
    short = [{"text": tok.decode(ids[:30])}]
    n = len(tok(short[0]["text"], add_special_tokens=False)["input_ids"])
    one = perplexity(torch_runner(slim.model), tok, short, max_length=64, bootstrap=0)
    x = torch.tensor([tok(short[0]["text"], add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        loss = slim.model(input_ids=x, labels=x).loss
    assert one["n"] == n - 1 and math.isfinite(one["value"])
    assert one["value"] == pytest.approx(math.exp(float(loss)), rel=1e-4)
    # Sliding windows: every token after the first scored once, each with its own window's context.
    res = perplexity(torch_runner(slim.model), tok, task.eval, max_length=24, stride=8, bootstrap=50)
    total, count, pos = 0.0, 0, 1
    with torch.no_grad():
        while pos < len(ids):
            end = min(24 if pos == 1 else pos + 8, len(ids))
            begin = max(0, end - 24)
            logp = torch.log_softmax(slim.model(input_ids=ids[begin:end][None]).logits[0], -1)
            for t in range(pos, end):
                total -= float(logp[t - begin - 1, ids[t]])
                count += 1
            pos = end
    assert res["n"] == count == len(ids) - 1
    assert res["value"] == pytest.approx(math.exp(total / count), rel=1e-5)
    assert res["ci95"][0] <= res["value"] <= res["ci95"][1]


def test_wikitext_folder_loads_as_causal_lm(shared_data):
    td = load_task_data(f"{shared_data}/wikitext2")
    assert td.type == TaskType.CAUSAL_LM
    assert td.source.endswith("valid.txt") and td.eval_source.endswith("test.txt")
    valid = Path(shared_data, "wikitext2", "valid.txt").read_text(encoding="utf-8")
    assert td.train[0]["text"] + td.tuning[0]["text"] == valid  # tuning is the tail of valid, train the rest


def test_finetune_lowers_perplexity_and_lora_merges_into_conv1d(tmp_path, task, teachers):
    ft = models.load(teachers["gpt2"])
    base = tiny_gpt2()
    before = evaluate(torch_runner(base.model), base.tokenizer, task, "eval", max_length=32, bootstrap=0)["value"]
    after = evaluate(torch_runner(ft.model), ft.tokenizer, task, "eval", max_length=32, bootstrap=0)["value"]
    assert after < before / 5, (before, after)
    from transformers.pytorch_utils import Conv1D

    result = api.finetune(teachers["gpt2"], task, FinetuneConfig(method="lora", epochs=1, learning_rate=1e-2, **FAST),
                          tmp_path / "lora", progress=False)
    merged = models.load(tmp_path / "lora")
    assert isinstance(merged.model.transformer.h[0].attn.c_attn, Conv1D)  # plain GPT-2 again, no peft wrappers
    assert result["training"]["trainable_parameters"] < result["training"]["parameters"] / 10
    assert result["quality"]["value"] < before


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_kd_lowers_student_perplexity(tmp_path, task, teachers, family):
    from slimformer.stages.distill import distill, make_student

    teacher = models.load(teachers[family])
    # A one-layer student cut (through the family's adapter) from the untrained model: all it knows about the
    # text must come from the teacher's logits.
    student = make_student(models.load(teachers[f"{family}-base"]), [0])
    assert student.config.num_hidden_layers == 1
    ev = {"max_length": 32, "bootstrap": 0}
    before = evaluate(torch_runner(student.model), student.tokenizer, task, "eval", **ev)["value"]
    teacher_ppl = evaluate(torch_runner(teacher.model), teacher.tokenizer, task, "eval", **ev)["value"]
    # Token-level KL on the teacher's logits only (alpha 0: no hard labels).
    cfg = DistillConfig(layers=[0], alpha=0.0, temperature=1.0, epochs=4, learning_rate=1e-2, **FAST)
    student, summary = distill(teacher, task, cfg, tmp_path / "work", student=student, progress=False)
    after = evaluate(torch_runner(student.model), student.tokenizer, task, "eval", **ev)["value"]
    assert summary["steps"] >= 20
    assert after < before / 100 and after < 10 * teacher_ppl, (before, after, teacher_ppl)
    with pytest.raises(SlimformerError, match="cache-teacher"):
        distill(teacher, task, cfg.model_copy(update={"cache_teacher": True}), tmp_path / "w2", progress=False)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("scheme", ["torch-dynamic-int8", "torch-int4-weight-only", "bf16"])
def test_quantize_and_reload(tmp_path, task, teachers, family, scheme):
    src = teachers[family]
    result = quantize_job(src, task, QuantizeConfig(scheme=scheme, max_length=32), tmp_path / "q", progress=False)
    float_ppl = models.read_record(src)["quality"]["eval"]["value"]
    assert math.isfinite(result["quality"]["value"])
    assert result["quality"]["value"] == pytest.approx(float_ppl, rel=0.25 if "int4" in scheme else 0.05)
    if "int4" in scheme:
        assert len(result["quantization"]["linear"]["modules"]) >= 4 * 2  # GPT-2's Conv1D included
    again = models.load(tmp_path / "q")
    if scheme == "torch-dynamic-int8":
        from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

        n_int8 = sum(isinstance(m, DynamicLinear) for m in again.model.modules())
        n_layers = again.config.num_hidden_layers
        assert n_int8 >= 4 * n_layers  # GPT-2: its Conv1D projections were quantized too
        if family == "gpt2":
            assert result["quantization"]["conv1d_as_linear"]
            assert again.model.lm_head.weight is again.model.transformer.wte.weight  # tied head stays tied
    runner, tok = load_runner(tmp_path / "q", task)
    ppl = evaluate(runner, tok, task, "eval", max_length=32, bootstrap=0)["value"]
    assert ppl == pytest.approx(result["quality"]["value"], rel=1e-6)


def _ort_vs_torch(slim, folder) -> float:
    batch = _batch(slim.tokenizer, ["the cat sat on the mat . the dog", "a bird sang"])
    with torch.no_grad():
        ref = slim.model(**batch).logits
    got = OrtRunner(folder, threads=1)(batch)
    keep = batch["attention_mask"].bool()
    return float((ref - got).abs()[keep].max())


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_onnx_parity_plain_and_pruned(tmp_path, task, teachers, family):
    from slimformer.stages.prune import PruneConfig, prune

    slim = models.load(teachers[family])
    facts = export_onnx(slim, tmp_path / "onnx")
    assert facts["max_abs_diff"] <= 1e-4 and facts["inputs"] == ["input_ids", "attention_mask"]
    assert _ort_vs_torch(slim, tmp_path / "onnx") <= 1e-4
    # ONNX Runtime int8 of the same model: close in perplexity.
    q = quantize_job(teachers[family], task, QuantizeConfig(scheme="ort-dynamic-int8", max_length=32),
                     tmp_path / "ort-int8", progress=False)
    assert q["quality"]["value"] == pytest.approx(models.read_record(teachers[family])["quality"]["eval"]["value"],
                                                  rel=0.05)
    # Pruned: half the heads (Llama: whole key/value groups) and half the FFN, then saved, reloaded, exported.
    prune(slim, task, PruneConfig(heads=0.5, ffn=0.5, importance="magnitude"), tmp_path / "pw", progress=False)
    models.save(slim, tmp_path / "pruned")
    pruned = models.load(tmp_path / "pruned")
    facts = export_onnx(pruned, tmp_path / "pruned-onnx")
    assert facts["max_abs_diff"] <= 1e-4
    assert _ort_vs_torch(pruned, tmp_path / "pruned-onnx") <= 1e-4
    record = json.loads((tmp_path / "pruned-onnx" / "slimformer.json").read_text())
    assert record["backend"] == "onnxruntime" and record["task"]["type"] == "causal-lm"
    if family == "gpt2":  # serving: the ONNX folder and the PyTorch folder give the same perplexities
        from fastapi.testclient import TestClient

        from slimformer.serve import create_app

        texts = {"texts": ["the cat sat on the mat .", "a bird sang in the tree . the dog ate the bone ."]}
        got = []
        for folder in (tmp_path / "pruned", tmp_path / "pruned-onnx"):
            with TestClient(create_app(folder)) as client:
                r = client.post("/predict", json=texts)
                assert r.status_code == 200, r.text
                got.append([p["perplexity"] for p in r.json()["predictions"]])
        assert got[0] == pytest.approx(got[1], rel=1e-4)


def test_perplexity_budgets_and_lower_is_better_choice():
    assert str(parse_budget("perplexity_increase<=10%")[0]) == "perplexity_increase<=10%"
    assert parse_budget("perplexity_increase<=10")[0].bound == 10
    assert parse_budget("perplexity_ratio<=1.1")[0].bound == 1.1
    with pytest.raises(SlimformerError, match="not a percentage"):
        parse_budget("latency_ms<=5%")

    def cand(name, ppl, ms):
        return Candidate(name, measurements={"quality": measurement("quality", ppl, goal="min"),
                                             "latency_ms": measurement("latency_ms", ms)})

    # Same latency: the lower perplexity wins the tie.
    assert choose([cand("a", 20.0, 1.0), cand("b", 10.0, 1.0)], [], "latency_ms").name == "b"


def test_search_under_a_perplexity_budget_writes_the_report(tmp_path, task, teachers):
    from slimformer.search import SearchConfig, SearchSpace, run_search

    data = write_text_folder(tmp_path / "data")
    td = load_task_data(data)
    # The search refuses a teacher trained with another tuning split, so this one is fine-tuned on this folder.
    teacher = tmp_path / "gpt2-ft"
    api.finetune(teachers["gpt2-base"], td, FinetuneConfig(epochs=6, learning_rate=1e-2, **FAST), teacher,
                 progress=False)
    with pytest.raises(SlimformerError, match="trained with another tuning split"):
        run_search(str(teachers["gpt2"]), td, SearchConfig(trials=1), tmp_path / "y", progress=False)
    space = SearchSpace(depths=[2, 1], heads=[0.0, 0.5], ffn=[0.0], vocab=[False, True],
                        precisions=["fp32", "ort-dynamic-int8"], kd_epochs=1, recovery_epochs=1, kd_max_examples=16,
                        recovery_max_examples=8, kd_learning_rate=3e-3)
    cfg = SearchConfig(trials=4, threads=1, space=space, fresh_process_measurement=False, seq=32, throughput_batch=4,
                       budget="perplexity_increase<=10%")
    with pytest.raises(SlimformerError, match="is for sequence-classification"):
        run_search(str(teacher), td, cfg.model_copy(update={"budget": "accuracy_drop<=1"}), tmp_path / "x",
                   progress=False)
    summary = run_search(str(teacher), td, cfg, tmp_path / "out", progress=False)
    cands = summary["candidates"]
    assert all(not c["params"]["vocab"] for c in cands)  # an LM's vocabulary is never pruned
    base = next(c for c in cands if c["name"] == "d2-h0-f0-v0-fp32")
    assert base["measurements"]["quality"]["goal"] == "min"
    chosen = summary["chosen"]
    assert chosen is not None
    m = chosen["measurements"]
    assert m["perplexity_increase"]["value"] <= 10
    assert m["perplexity_ratio"]["value"] == pytest.approx(1 + m["perplexity_increase"]["value"] / 100)
    # The front is lower-is-better in perplexity: no front member has both higher perplexity and higher latency
    # than another candidate.
    front = [c for c in cands if c["name"] in summary["front"]]
    for f in front:
        for c in cands:
            assert not (c["measurements"]["quality"]["value"] < f["measurements"]["quality"]["value"]
                        and c["measurements"]["latency_ms"]["value"] < f["measurements"]["latency_ms"]["value"])
    conf = summary["confirmation"]
    assert conf["chosen"]["metric"] == "perplexity" and conf["chosen"]["split"] == "eval"
    assert np.isfinite(conf["quality_drop_on_eval"])
    md = (tmp_path / "out" / "report.md").read_text()
    assert "perplexity (tuning)" in md and "perplexity +%" in md and "its perplexity changes by" in md
    best = tmp_path / "out" / "best"
    assert (tmp_path / "out" / "report.html").exists() and (best / "README.md").exists()
    assert (best / "model.onnx").exists() or (best / "onnx" / "model.onnx").exists()


def test_cli_evaluate_causal_lm(tmp_path, teachers, monkeypatch, capsys):
    from slimformer.cli import main

    data = write_text_folder(tmp_path / "data")
    monkeypatch.setattr("sys.argv", ["slimformer", "evaluate", "--model", str(teachers["llama"]), "--data", str(data),
                                     "--task", "causal-lm", "--max-length", "32", "--json"])
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code in (0, None)
    out = json.loads(capsys.readouterr().out)["quality"]
    assert out["metric"] == "perplexity" and math.isfinite(out["value"]) and out["split"] == "eval"


def test_hub_style_gpt2_folder_without_pad_token(tmp_path, task):
    """A plain Hugging Face folder as a hub download gives it: no slimformer.json, a BPE tokenizer with no pad."""
    from slimformer.search import SearchConfig, prepare_teacher
    from slimformer.testing import save_hub_style_decoder

    folder = save_hub_style_decoder(tmp_path / "hub", "gpt2", [task.train[0]["text"]], vocab_size=300)
    slim = models.load(folder)  # the task comes from the config's architecture (GPT2LMHeadModel)
    assert slim.task_type == TaskType.CAUSAL_LM
    assert slim.tokenizer.pad_token == slim.tokenizer.eos_token == "<|endoftext|>"
    res = evaluate(torch_runner(slim.model), slim.tokenizer, task, "eval", max_length=32, bootstrap=0)
    assert math.isfinite(res["value"]) and res["value"] > 1
    card = api.measure(folder, batch=1, seq=16, threads=1, runs=30, warmup=1, flops=False)
    assert card["parameters"] == sum(p.numel() for p in slim.model.parameters())
    # A search takes a pretrained LM as its teacher as it is: saved with a record, not fine-tuned again.
    teacher = prepare_teacher(str(folder), task, SearchConfig(), tmp_path / "search", progress=False)
    assert models.read_record(teacher)["task"]["type"] == "causal-lm" and "history" not in models.read_record(teacher)
