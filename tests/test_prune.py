"""The prune stage, its job and its CLI command, on tiny random models."""

import copy
import json

import pytest
import torch
from pydantic import ValidationError

from slimformer import models
from slimformer.cli import main
from slimformer.errors import SlimformerError
from slimformer.evaluate import evaluate, torch_runner
from slimformer.stages.finetune import FinetuneConfig, finetune
from slimformer.stages.prune import PruneConfig, block_linears, prune, prune_job, prune_unstructured, sparsity
from slimformer.testing import tiny_bert, tiny_sst2_task, write_sst2_folder

FAST = {"batch_size": 8, "learning_rate": 3e-3, "precision": "fp32", "logging_steps": 1000}


def heads_per_layer(slim):
    return [layer.attention.self.query.out_features // 8 if hasattr(layer.attention.self, "query") else 0
            for layer in slim.model.bert.encoder.layer]


def test_config_is_strict_and_documented():
    for bad in ({"heads": 1.0}, {"ffn": -0.1}, {"unstructured": 1.2}, {"round_to": 12}, {"steps": 0},
                {"headz": 0.5}, {"drop_layers": (1,), "keep_layers": 1}, {"drop_layers": (1, 1)},
                {"importance": "random"}, {"recover": "magic"}):
        with pytest.raises(ValidationError):
            PruneConfig(**bad)
    cfg = PruneConfig(heads=0.4, recover="kd")
    with pytest.raises(ValidationError):
        cfg.heads = 0.5  # frozen
    assert all(f.description for f in PruneConfig.model_fields.values())
    assert PruneConfig.model_validate(cfg.model_dump(mode="json")) == cfg


def test_per_layer_pruning_with_rounding(tmp_path):
    slim, task = tiny_bert(), tiny_sst2_task(16, 8)
    before = models.count_parameters(slim.model)["parameters"]
    cfg = PruneConfig(heads=0.5, ffn=0.5, scope="per-layer", round_to=16, importance="magnitude")
    summary = prune(slim, task, cfg, tmp_path / "w", progress=False)
    assert heads_per_layer(slim) == [2, 2]
    assert [layer.output.dense.in_features for layer in slim.model.bert.encoder.layer] == [32, 32]
    assert summary["parameters_after"] < before and summary["plan"]["heads"] == "4/8"
    assert slim.record["surgery"]["heads"] and slim.record["history"][-1]["stage"] == "prune"


def test_global_taylor_pruning_in_steps_hits_the_target(tmp_path):
    slim, task = tiny_bert(seed=3), tiny_sst2_task(16, 8)
    cfg = PruneConfig(heads=0.5, ffn=0.25, steps=2, importance="taylor", importance_examples=16)
    summary = prune(slim, task, cfg, tmp_path / "w", progress=False)
    assert [r["plan"]["heads"] for r in summary["rounds"]] == ["6/8", "4/8"]
    assert summary["plan"]["neurons"] == "96/128"


def test_layers_and_vocab(tmp_path):
    slim, task = tiny_bert(num_hidden_layers=3), tiny_sst2_task(16, 8)
    ref = evaluate(torch_runner(slim.model), slim.tokenizer, task, bootstrap=0)
    prune(slim, task, PruneConfig(vocab=True), tmp_path / "w", progress=False)
    # the corpus' tokens plus the single-character pieces that spell unseen words (a few hundred at most)
    assert len(slim.tokenizer) < 400 and slim.record["vocab_map"] == slim.record["surgery"]["vocab"]
    # the task's text uses only kept tokens, so the model's predictions do not change
    assert evaluate(torch_runner(slim.model), slim.tokenizer, task, bootstrap=0)["value"] == ref["value"]
    prune(slim, task, PruneConfig(drop_layers=(1,)), tmp_path / "w", progress=False)
    assert slim.record["surgery"]["layers"] == [0, 2]
    prune(slim, task, PruneConfig(keep_layers=1), tmp_path / "w", progress=False)
    assert slim.record["surgery"]["layers"] == [0] and len(slim.model.bert.encoder.layer) == 1


def test_bad_stage_inputs_are_user_errors(tmp_path):
    slim, task = tiny_bert(), tiny_sst2_task(16, 8)
    for cfg, message in ((PruneConfig(), "nothing to prune"), (PruneConfig(drop_layers=(0, 1)), "all 2 layers"),
                         (PruneConfig(keep_layers=3), "more than the model's 2 layers"),
                         (PruneConfig(drop_layers=(7,)), "do not exist")):
        with pytest.raises(SlimformerError, match=message):
            prune(slim, task, cfg, tmp_path / "w", progress=False)
    lm = tiny_bert("causal-lm", is_decoder=True)
    lm_task = tiny_sst2_task(4, 4)
    lm_task.type = lm.task_type
    with pytest.raises(SlimformerError, match="classification models"):
        prune(lm, lm_task, PruneConfig(vocab=True), tmp_path / "w", progress=False)
    with pytest.raises(SlimformerError, match="out of range"):
        prune_unstructured(slim.model, 1.0)


@pytest.mark.parametrize("scope", ["global", "per-layer"])
def test_unstructured_pruning_is_permanent(scope):
    slim = tiny_bert()
    masks = prune_unstructured(slim.model, 0.5, scope)
    assert sparsity(slim.model) == pytest.approx(0.5, abs=0.01)
    if scope == "per-layer":
        assert all((m.weight == 0).float().mean() == pytest.approx(0.5, abs=0.01) for _, m in block_linears(slim.model))
    assert not any("_orig" in k or "_mask" in k for k in slim.model.state_dict())
    assert all(torch.equal(p == 0, m == 0) for p, m in masks.items())


def test_recovery_restores_accuracy_and_keeps_zeros(tmp_path):
    slim, task = tiny_bert(), tiny_sst2_task()
    finetune(slim, task, FinetuneConfig(epochs=6, **FAST), tmp_path / "ft", progress=False)
    assert evaluate(torch_runner(slim.model), slim.tokenizer, task, bootstrap=0)["value"] == 1.0
    harsh = {"heads": 0.75, "ffn": 0.9, "unstructured": 0.8, "steps": 2, "importance": "taylor",
             "importance_examples": 32, **FAST}
    unrecovered = copy.deepcopy(slim)
    prune(unrecovered, task, PruneConfig(**harsh), tmp_path / "w0", progress=False)
    broken = evaluate(torch_runner(unrecovered.model), unrecovered.tokenizer, task, bootstrap=0)["value"]
    assert broken < 0.9  # this much pruning does hurt, so recovery has something to do
    summary = prune(slim, task, PruneConfig(**harsh, recover="finetune", epochs=3), tmp_path / "w", progress=False)
    assert evaluate(torch_runner(slim.model), slim.tokenizer, task, bootstrap=0)["value"] >= 0.9
    assert len(summary["rounds"]) == 2 and all("recovery" in r for r in summary["rounds"])
    # zeros survive recovery training: the final sparsity is the target, not less
    assert sparsity(slim.model) >= 0.8 - 0.01
    assert not (tmp_path / "w" / "round-1").exists()


def test_bf16_recovery_leaves_a_plain_fp32_model(tmp_path):
    # bf16 training wraps forward in autocast; the stage must score the model that gets saved.
    slim, task = tiny_bert(), tiny_sst2_task(16, 8)
    prune(slim, task, PruneConfig(heads=0.5, recover="finetune", epochs=1, **{**FAST, "precision": "bf16"}),
          tmp_path / "w", progress=False)
    assert "forward" not in slim.model.__dict__
    enc = slim.tokenizer(["a charming journey"], return_tensors="pt")
    models.save(slim, tmp_path / "m")
    back = models.load(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(slim.model(**enc).logits, back.model(**enc).logits)


def test_kd_recovery(tmp_path):
    pytest.importorskip("slimformer.stages.distill", reason="distillation stage not available yet")
    slim, task = tiny_bert(), tiny_sst2_task(16, 8)
    summary = prune(slim, task, PruneConfig(heads=0.5, drop_layers=(0,), recover="kd", epochs=1, **FAST),
                    tmp_path / "w", progress=False)
    assert summary["rounds"][0]["recovery"]["layer_map"] == [1]  # the kept layer is the teacher's second
    assert summary["plan"]["heads"] == "2/8"
    assert summary["rounds"][0]["recovery"]["transfer_examples"] == 0


def test_kd_recovery_learns_from_augmented_copies_too(tmp_path):
    slim, task = tiny_bert(), tiny_sst2_task(16, 8)
    summary = prune(slim, task, PruneConfig(heads=0.5, recover="kd", epochs=2, kd_augment=2, kd_cache_teacher=True,
                                            **FAST), tmp_path / "w", progress=False)
    recovery = summary["rounds"][0]["recovery"]
    assert len(task.train) < recovery["transfer_examples"] <= 2 * len(task.train)
    with pytest.raises(ValidationError):
        PruneConfig(kd_augment=-1)


def test_prune_job_saves_a_model_that_reloads_identically(tmp_path):
    src = models.save(tiny_bert(seed=5), tmp_path / "src")
    task = tiny_sst2_task(16, 8)
    cfg = PruneConfig(heads=0.5, ffn=0.5, keep_layers=1, vocab=True, unstructured=0.2, importance="taylor",
                      importance_examples=16, recover="finetune", epochs=1, max_train_examples=16, **FAST)
    result = prune_job(src, task, cfg, tmp_path / "out", progress=False)
    back = models.load(tmp_path / "out")
    again = evaluate(torch_runner(back.model), back.tokenizer, task, bootstrap=0)
    assert again["value"] == result["quality"]["value"]
    assert back.record["history"][-1]["stage"] == "prune" and back.record["vocab_map"]
    assert len(back.model.bert.encoder.layer) == 1 and sparsity(back.model) > 0.19
    assert not (tmp_path / ".out.work").exists()


def run_main(monkeypatch, capsys, *args):
    monkeypatch.setattr("sys.argv", ["slimformer", *args])
    capsys.readouterr()  # drop what the test's own setup printed
    with pytest.raises(SystemExit) as e:
        main()
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def test_cli_prune(tmp_path, monkeypatch, capsys):
    src = models.save(tiny_bert(), tmp_path / "src")
    data = write_sst2_folder(tmp_path / "sst")
    code, stdout, _ = run_main(monkeypatch, capsys, "prune", "--model", str(src), "--data", str(data), "--out",
                               str(tmp_path / "p"), "--heads", "0.5", "--ffn", "0.5", "--drop-layers", "1",
                               "--vocab", "--importance", "magnitude", "--json")
    assert code in (0, None)
    result = json.loads(stdout)
    assert result["pruning"]["plan"]["layers"] == "1/2" and (tmp_path / "p" / "model.safetensors").exists()


@pytest.mark.parametrize("args, message", [
    (["--heads", "1.5"], "invalid setting heads"),
    (["--drop-layers", "0,1"], "would remove all 2 layers"),
    (["--drop-layers", "x"], "not a list of layer indices"),
    (["--round-to", "12"], "invalid setting round_to"),
    ([], "nothing to prune"),
])
def test_cli_bad_input_is_one_line(tmp_path, monkeypatch, capsys, args, message):
    src = models.save(tiny_bert(), tmp_path / "src")
    data = write_sst2_folder(tmp_path / "sst")
    code, _, err = run_main(monkeypatch, capsys, "prune", "--model", str(src), "--data", str(data), "--out",
                            str(tmp_path / "p"), *args)
    assert code == 2 and message in err and "Traceback" not in err, err
    assert len([line for line in err.strip().splitlines() if line.strip()]) == 1, err
    assert not (tmp_path / "p").exists()


def test_given_kd_teacher_reads_the_pruned_vocabulary(tmp_path, monkeypatch):
    """A teacher passed in (as the search does) must get the student's vocabulary cut, or its soft targets
    would be computed on the wrong token ids."""
    import slimformer.stages.prune as prune_mod

    slim, task = tiny_bert(seed=5), tiny_sst2_task(16, 8)
    teacher = tiny_bert(seed=5).model
    full_rows = teacher.get_input_embeddings().num_embeddings
    seen = {}

    def spy(s, t, c, w, tchr, **kw):
        seen["teacher_rows"] = tchr.get_input_embeddings().num_embeddings
        seen["student_rows"] = s.model.get_input_embeddings().num_embeddings
        return {}

    monkeypatch.setattr(prune_mod, "recover", spy)
    prune(slim, task, PruneConfig(vocab=True, heads=0.5, recover="kd"), tmp_path / "w", teacher=teacher,
          progress=False)
    assert seen["teacher_rows"] == seen["student_rows"] < full_rows
    assert teacher.get_input_embeddings().num_embeddings == full_rows  # the caller's model is left alone
