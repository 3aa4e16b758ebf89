"""ONNX export: matches PyTorch on padded batches of any shape, runs through the evaluation Runner, has a
cost card, and refuses what it cannot export."""

import dataclasses

import numpy as np
import onnx
import pytest
import torch

from slimformer import api, models
from slimformer.errors import SlimformerError
from slimformer.evaluate import evaluate, torch_runner
from slimformer.export import (
    OrtRunner,
    export_job,
    export_onnx,
    is_onnx_folder,
    load_onnx_runner,
    load_runner,
    measure_onnx,
)
from slimformer.measure import dummy_batch
from slimformer.testing import tiny_bert, tiny_ner_task, tiny_sst2_task


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A saved tiny classifier and its ONNX export (made once: exporting takes a few seconds)."""
    root = tmp_path_factory.mktemp("export")
    slim = tiny_bert(seed=3)
    slim.record["task"] = {"type": "sequence-classification", "label_names": ["0", "1"]}
    src = models.save(slim, root / "fp32")
    result = export_job(src, "onnx")
    return src, root / "fp32-onnx", result


def _padded(tokenizer, b: int, s: int, seed: int) -> dict[str, torch.Tensor]:
    batch = dummy_batch(tokenizer, b, s, seed=seed)
    if b > 1:
        batch["attention_mask"][0, s // 3:] = 0
        batch["input_ids"][0, s // 3:] = tokenizer.pad_token_id
    return batch


def test_export_matches_pytorch_on_any_batch_and_length(saved):
    src, onnx_dir, result = saved
    slim = models.load(src)
    runner = OrtRunner(onnx_dir)
    assert result["max_abs_diff"] <= 1e-4 and result["inputs"] == ["input_ids", "attention_mask", "token_type_ids"]
    for i, (b, s) in enumerate([(1, 5), (4, 23), (7, 100), (2, 128)]):
        batch = _padded(slim.tokenizer, b, s, seed=i)
        ref = torch_runner(slim.model)(batch)
        got = runner(batch)
        assert got.shape == ref.shape == (b, 2)
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
    # The axes are symbolic in the graph itself, not just tolerated by this runtime.
    graph = onnx.load(str(onnx_dir / "model.onnx")).graph
    dims = [[d.dim_param for d in i.type.tensor_type.shape.dim] for i in graph.input]
    assert all(all(dims_i) for dims_i in dims) and len({tuple(d) for d in dims}) == 1


def test_export_folder_is_self_describing_and_evaluates_like_pytorch(saved):
    src, onnx_dir, _ = saved
    assert is_onnx_folder(onnx_dir) and not is_onnx_folder(src)
    runner = load_onnx_runner(onnx_dir)
    assert runner.label_names == ["0", "1"] and str(runner.task_type) == "sequence-classification"
    record = models.read_record(onnx_dir)
    assert record["backend"] == "onnxruntime" and record["onnx"]["export"]["opset"] == 23
    task = tiny_sst2_task()
    onnx_q = api.evaluate(onnx_dir, task, bootstrap=0)
    torch_q = api.evaluate(src, task, bootstrap=0)
    assert onnx_q["value"] == torch_q["value"] and onnx_q["n"] == torch_q["n"] == len(task.eval)
    with pytest.raises(SlimformerError, match="labels"):
        load_runner(onnx_dir, dataclasses.replace(task, label_names=["neg", "pos"]))


def test_runner_fills_missing_token_types_and_names_missing_inputs(saved):
    _, onnx_dir, _ = saved
    runner = OrtRunner(onnx_dir)
    batch = _padded(runner.tokenizer, 2, 9, seed=0)
    full = runner(batch)
    batch.pop("token_type_ids")
    torch.testing.assert_close(runner(batch), full)
    with pytest.raises(SlimformerError, match="attention_mask"):
        runner({"input_ids": batch["input_ids"]})
    with pytest.raises(SlimformerError, match="no ONNX model"):
        OrtRunner(onnx_dir.parent / "nowhere")


def test_onnx_cost_card(saved):
    _, onnx_dir, _ = saved
    card = measure_onnx(onnx_dir, batch=2, seq=16, threads=1, warmup=1, runs=5)
    assert card["backend"] == "onnxruntime" and card["threads"] == 1 and card["runs"] == 5
    assert card["size_bytes"] == (onnx_dir / "model.onnx").stat().st_size
    assert card["latency_ms_p50"] > 0 and card["throughput_per_s"] > 0
    assert "cpu_flags" in card["hardware"] and card["dtype"] == "float32"
    n_params = sum(p.numel() for p in tiny_bert().model.parameters())
    assert abs(card["parameters"] - n_params) < 0.01 * n_params  # the graph carries the model's weights


def test_token_classification_export(tmp_path):
    slim = tiny_bert("token-classification")
    facts = export_onnx(slim, tmp_path / "ner")
    runner = OrtRunner(tmp_path / "ner")
    batch = _padded(slim.tokenizer, 3, 11, seed=5)
    got, ref = runner(batch), torch_runner(slim.model)(batch)
    assert got.shape == (3, 11, 3) and facts["max_abs_diff"] <= 1e-4
    np.testing.assert_allclose(got.numpy(), ref.numpy(), atol=1e-4)
    quality = evaluate(runner, runner.tokenizer, tiny_ner_task(), bootstrap=0)
    assert quality["metric"] == "f1" and quality["n"] == 8


def test_export_refuses_what_it_cannot_export(saved, tmp_path):
    src, onnx_dir, _ = saved
    with pytest.raises(SlimformerError, match="unknown export format"):
        export_job(src, "tflite")
    with pytest.raises(SlimformerError, match="already an ONNX model"):
        export_job(onnx_dir, "onnx")
    with pytest.raises(SlimformerError, match="holds an ONNX model"):
        models.load(onnx_dir)  # stages that need PyTorch weights say why they cannot take it
    from slimformer.stages.quantize import QuantizeConfig, quantize_torch

    slim = models.load(src)
    quantize_torch(slim, QuantizeConfig(scheme="torch-dynamic-int8"))
    with pytest.raises(SlimformerError, match="cannot be exported"):
        export_onnx(slim, tmp_path / "q")
