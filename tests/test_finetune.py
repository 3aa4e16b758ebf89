import pytest
import torch

from slimformer.errors import SlimformerError
from slimformer.evaluate import evaluate, torch_runner
from slimformer.stages.finetune import FinetuneConfig, finetune
from slimformer.testing import tiny_bert, tiny_ner_task, tiny_sst2_task

FAST = {"epochs": 6, "batch_size": 8, "learning_rate": 3e-3, "precision": "fp32", "logging_steps": 1000}


@pytest.mark.parametrize("method", ["full", "lora", "top-k"])
def test_finetune_learns_the_tiny_task(tmp_path, method):
    slim, task = tiny_bert(), tiny_sst2_task()
    before = evaluate(torch_runner(slim.model), slim.tokenizer, task, bootstrap=0)["value"]
    # Low-rank updates on a *random* tiny body need bigger steps than on a pretrained one.
    settings = {"full": FAST, "top-k": {**FAST, "learning_rate": 1e-2, "epochs": 12},
                "lora": {**FAST, "learning_rate": 3e-2, "epochs": 15}}[method]
    summary = finetune(slim, task, FinetuneConfig(method=method, top_k=1, **settings), tmp_path / "w",
                       progress=False)
    after = evaluate(torch_runner(slim.model), slim.tokenizer, task, bootstrap=0)["value"]
    assert after > before
    if method != "lora":  # LoRA's low-rank steps on a random body learn slowly; it is checked on MiniLM
        assert after == 1.0 and summary["best_tuning_metric"]["accuracy"] == 1.0
    if method == "full":
        assert summary["trainable_parameters"] == summary["parameters"]
    else:
        assert summary["trainable_parameters"] < summary["parameters"]
    # LoRA is merged: the result is a plain model with the original module types.
    assert type(slim.model).__name__ == "BertForSequenceClassification"
    assert slim.record["history"][-1]["stage"] == "finetune"


def test_top_k_freezes_lower_layers(tmp_path):
    slim, task = tiny_bert(), tiny_sst2_task()
    layer0 = slim.model.bert.encoder.layer[0].attention.self.query.weight.clone()
    layer1 = slim.model.bert.encoder.layer[1].attention.self.query.weight.clone()
    finetune(slim, task, FinetuneConfig(method="top-k", top_k=1, **FAST), tmp_path / "w", progress=False)
    assert torch.equal(slim.model.bert.encoder.layer[0].attention.self.query.weight, layer0)
    assert not torch.equal(slim.model.bert.encoder.layer[1].attention.self.query.weight, layer1)


def test_token_classification_finetune(tmp_path):
    slim, task = tiny_bert("token-classification"), tiny_ner_task()
    finetune(slim, task, FinetuneConfig(**FAST), tmp_path / "w", progress=False)
    assert evaluate(torch_runner(slim.model), slim.tokenizer, task, bootstrap=0)["value"] == 1.0


def test_resume_from_checkpoint(tmp_path):
    task = tiny_sst2_task(n_train=32)
    cfg = FinetuneConfig(**{**FAST, "epochs": 2, "evals_per_epoch": 1})
    first = finetune(tiny_bert(), task, cfg, tmp_path / "w", progress=False)
    assert not first["resumed"]
    # A second run with the same work dir finds the finished checkpoints and resumes instead of restarting.
    second = finetune(tiny_bert(), task, cfg, tmp_path / "w", progress=False)
    assert second["resumed"] and second["steps"] == first["steps"]


def test_config_is_strict():
    with pytest.raises(Exception, match="extra"):
        FinetuneConfig(learning_rat=1e-4)
    with pytest.raises(Exception, match="less than 1"):
        FinetuneConfig(learning_rate=3)


def test_top_k_larger_than_depth_is_refused(tmp_path):
    with pytest.raises(SlimformerError, match="more than the model's 2 layers"):
        finetune(tiny_bert(), tiny_sst2_task(), FinetuneConfig(method="top-k", top_k=5), tmp_path / "w")


def test_lora_merge_is_exact():
    from slimformer.stages.finetune import _wrap_lora

    slim = tiny_bert()
    peft_model = _wrap_lora(slim, FinetuneConfig(method="lora")).eval()
    with torch.no_grad():  # give the adapters non-zero weights, as training would
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    enc = slim.tokenizer(["a charming journey", "dull"], padding=True, return_tensors="pt")
    with torch.inference_mode():
        with_adapters = peft_model(**enc).logits
        merged = peft_model.merge_and_unload()
        torch.testing.assert_close(merged(**enc).logits, with_adapters, atol=1e-5, rtol=1e-5)
