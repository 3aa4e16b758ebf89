import json

import pytest
import torch

from slimformer import models
from slimformer.errors import SlimformerError
from slimformer.tasks import TaskType
from slimformer.testing import tiny_bert


def _logits(slim, text="a charming journey"):
    enc = slim.tokenizer([text], return_tensors="pt")
    with torch.inference_mode():
        return slim.model(**enc).logits


def test_minilm_short_name_loads_the_packaged_weights():
    slim = models.load("minilm", "sequence-classification", ["neg", "pos"])
    assert slim.config.num_hidden_layers == 6 and slim.config.hidden_size == 384
    counts = models.count_parameters(slim.model)
    assert 22_000_000 < counts["parameters"] < 23_500_000
    assert slim.model.config.id2label == {0: "neg", 1: "pos"}


@pytest.mark.parametrize("task", list(TaskType))
def test_save_then_load_gives_identical_logits(tmp_path, task):
    slim = tiny_bert(task) if task != TaskType.CAUSAL_LM else tiny_bert(task, is_decoder=True)
    slim.add_history("test", {"x": 1})
    out = models.save(slim, tmp_path / "m")
    assert {"config.json", "model.safetensors", "slimformer.json", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    record = json.loads((out / "slimformer.json").read_text())
    assert record["task"]["type"] == str(task) and record["history"][0]["versions"]["torch"]
    again = models.load(out)
    assert again.task_type == task and again.label_names == slim.label_names
    torch.testing.assert_close(_logits(again), _logits(slim), rtol=0, atol=0)


def test_save_is_atomic_and_leaves_no_temp_on_failure(tmp_path):
    slim = tiny_bert()

    def boom(folder):
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        models.save(slim, tmp_path / "m", extra_files=boom)
    assert list(tmp_path.iterdir()) == []
    models.save(slim, tmp_path / "m")
    models.save(slim, tmp_path / "m")  # overwriting an existing result is fine
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_bad_model_inputs(tmp_path):
    cases = []
    with pytest.raises(SlimformerError, match="unknown model short name 'minlm'") as e:
        models.load("minlm", "sequence-classification", ["0", "1"])
    cases.append(e)
    with pytest.raises(SlimformerError, match="does not exist") as e:
        models.load(str(tmp_path / "nope"), "sequence-classification", ["0", "1"])
    cases.append(e)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SlimformerError, match="no config.json") as e:
        models.load(tmp_path / "empty", "sequence-classification", ["0", "1"])
    cases.append(e)
    saved = models.save(tiny_bert(), tmp_path / "m")
    (saved / "model.safetensors").rename(saved / "pytorch_model.bin")
    with pytest.raises(SlimformerError, match="pickled weights") as e:
        models.load(saved, "sequence-classification", ["0", "1"])
    cases.append(e)
    (saved / "pytorch_model.bin").unlink()
    with pytest.raises(SlimformerError, match="no weights") as e:
        models.load(saved, "sequence-classification", ["0", "1"])
    cases.append(e)
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(SlimformerError, match="is an existing file") as e:
        models.check_out_dir(f)
    cases.append(e)
    assert all("\n" not in str(c.value) for c in cases)


def test_num_labels_mismatch_with_saved_head(tmp_path):
    saved = models.save(tiny_bert(label_names=["neg", "pos"]), tmp_path / "m")
    with pytest.raises(SlimformerError, match="has a head for 2 labels"):
        models.load(saved, "sequence-classification", ["a", "b", "c"])
    with pytest.raises(SlimformerError, match="was trained for sequence-classification"):
        models.load(saved, "token-classification", ["O", "B-X", "I-X"])
