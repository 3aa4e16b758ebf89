import pytest
import torch

from slimformer import models
from slimformer.errors import SlimformerError
from slimformer.recipe import STAGES, Recipe, register, run_recipe
from slimformer.stages.distill import DistillConfig
from slimformer.testing import tiny_bert, tiny_sst2_task


def _write(tmp_path, text):
    p = tmp_path / "recipe.yaml"
    p.write_text(text)
    return p


def test_yaml_round_trip(tmp_path):
    r = Recipe.from_yaml(_write(tmp_path, """
model: minilm
stages:
  - kind: distill
    num_layers: 3
  - kind: prune
    heads: 0.4
    ffn: 0.4
    recover: kd
  - kind: quantize
    scheme: ort-dynamic-int8
"""))
    assert [s.kind for s in r.stages] == ["distill", "prune", "quantize"]
    assert r.stages[0].num_layers == 3 and r.stages[1].heads == 0.4
    assert Recipe.parse(__import__("yaml").safe_load(r.to_yaml())) == r


@pytest.mark.parametrize("text, message", [
    ("stages:\n  - kind: distill\n    num_layer: 3\n", "Extra inputs are not permitted"),
    ("stages:\n  - kind: prune\n    heads: 1.5\n", "less than 1"),
    ("stages:\n  - kind: teleport\n", "does not match any of the expected tags"),
    ("stages: []\n", "at least 1 item"),
    ("stages:\n  - kind: quantize\n    scheme: ort-dynamic-int8\n  - kind: finetune\n", "quantize must be the last"),
    ("stages: [unclosed\n", "not valid YAML"),
    ("- just a list\n", "must be a mapping"),
])
def test_strict_validation(tmp_path, text, message):
    with pytest.raises(SlimformerError, match=message) as e:
        Recipe.from_yaml(_write(tmp_path, text))
    assert "\n" not in str(e.value)


def test_register_validates():
    with pytest.raises(TypeError):
        register(dict, lambda *a: None)
    with pytest.raises(ValueError, match="registered already"):
        class Again(DistillConfig):
            pass
        register(Again, lambda *a: None)
    assert DistillConfig in STAGES


def test_run_recipe_distill_prune_quantize(tmp_path):
    teacher = models.save(tiny_bert(num_hidden_layers=2), tmp_path / "teacher")
    recipe = Recipe.parse({"stages": [
        {"kind": "distill", "num_layers": 1, "epochs": 1, "batch_size": 8, "precision": "fp32"},
        {"kind": "prune", "heads": 0.5, "ffn": 0.5, "recover": "kd", "epochs": 1, "batch_size": 8,
         "precision": "fp32"},
        {"kind": "quantize", "scheme": "torch-dynamic-int8"},
    ]})
    result = run_recipe(recipe, tiny_sst2_task(), tmp_path / "out", model=str(teacher), progress=False)
    assert result["quality"]["split"] == "eval"
    again = models.load(tmp_path / "out")
    assert again.record["recipe"]["stages"][0]["kind"] == "distill"
    assert again.config.num_hidden_layers == 1
    enc = again.tokenizer(["a charming journey"], return_tensors="pt")
    with torch.inference_mode():
        assert again.model(**enc).logits.shape == (1, 2)
