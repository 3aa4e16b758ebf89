"""Recipes: an ordered list of stage configs, written in YAML or built in Python, validated strictly.

```yaml
model: runs/sst2-ft
data: ../shared/data/sst2
stages:
  - kind: distill
    num_layers: 3
  - kind: prune
    heads: 0.4
    ffn: 0.4
    recover: kd
  - kind: quantize
    scheme: ort-dynamic-int8
```

Unknown keys and out-of-range values are errors (every config is a frozen pydantic model with
``extra="forbid"``). Each stage kind maps to one function in ``STAGES``; ``register`` validates additions.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from slimformer import models
from slimformer.errors import SlimformerError, read_yaml
from slimformer.stages.distill import DistillConfig
from slimformer.stages.finetune import FinetuneConfig
from slimformer.stages.prune import PruneConfig
from slimformer.stages.quantize import QuantizeConfig
from slimformer.tasks import TaskData

StageConfig = Annotated[FinetuneConfig | DistillConfig | PruneConfig | QuantizeConfig, Field(discriminator="kind")]


class Recipe(BaseModel):
    """What to do to a model, in order. ``model`` and ``data`` may be given here or on the command line."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str | None = Field(None, description="model short name, folder or hub id")
    data: str | None = Field(None, description="data folder, file or hub dataset id")
    stages: list[StageConfig] = Field(min_length=1, description="stage configs, applied in order")

    def model_post_init(self, _: Any) -> None:
        kinds = [s.kind for s in self.stages]
        if "quantize" in kinds[:-1]:
            raise ValueError("quantize must be the last stage (later stages cannot train a quantized model)")

    @staticmethod
    def from_yaml(path: str | Path) -> Recipe:
        path = Path(path)
        data = read_yaml(path, "recipe")
        if not isinstance(data, dict):
            raise SlimformerError(f"recipe {path} must be a mapping with a 'stages' list")
        return Recipe.parse(data, str(path))

    @staticmethod
    def parse(data: dict[str, Any], where: str = "recipe") -> Recipe:
        try:
            return Recipe.model_validate(data)
        except ValidationError as e:
            err = e.errors()[0]
            loc = ".".join(str(x) for x in err["loc"] if not str(x).endswith("Config"))
            raise SlimformerError(f"{where}: {loc}: {err['msg']}"
                                  + (f" (got {err['input']!r})" if err["type"] != "missing" else "")) from None

    def to_yaml(self) -> str:
        """YAML with only the settings that differ from the defaults (and every stage's kind)."""
        data = self.model_dump(mode="json", exclude_defaults=True)
        data["stages"] = [{"kind": s.kind, **s.model_dump(mode="json", exclude_defaults=True)} for s in self.stages]
        return yaml.safe_dump(data, sort_keys=False)


@dataclass
class Context:
    """What stages may need besides the model: the task, a teacher, a work folder, the output folder."""

    task: TaskData
    work_dir: Path
    out: Path
    teacher: models.SlimModel | None = None
    progress: bool = True
    results: list[dict[str, Any]] = field(default_factory=list)


StageFn = Callable[[models.SlimModel, Any, Context], models.SlimModel]
STAGES: dict[type[BaseModel], StageFn] = {}


def register(config_cls: type[BaseModel], fn: StageFn) -> None:
    """Register the function of a stage config class (a frozen pydantic model with a ``kind`` literal)."""
    if not (isinstance(config_cls, type) and issubclass(config_cls, BaseModel)):
        raise TypeError("a stage config must be a pydantic model class")
    if "kind" not in config_cls.model_fields:
        raise TypeError(f"{config_cls.__name__} needs a 'kind' field naming the stage")
    if config_cls.model_config.get("extra") != "forbid" or not config_cls.model_config.get("frozen"):
        raise TypeError(f"{config_cls.__name__} must be frozen with extra='forbid'")
    kind = config_cls.model_fields["kind"].default
    if any(c.model_fields["kind"].default == kind and c is not config_cls for c in STAGES):
        raise ValueError(f"stage kind '{kind}' is registered already")
    STAGES[config_cls] = fn


def _finetune(slim, config, ctx):
    from slimformer.stages.finetune import finetune

    ctx.results.append(finetune(slim, ctx.task, config, ctx.work_dir / "finetune", progress=ctx.progress))
    return slim


def _distill(slim, config, ctx):
    from slimformer.stages.distill import distill

    student, summary = distill(slim, ctx.task, config, ctx.work_dir / "distill", progress=ctx.progress)
    ctx.teacher = slim  # later recovery training learns from the model before distillation
    ctx.results.append(summary)
    return student


def _prune(slim, config, ctx):
    import copy

    from slimformer.stages.prune import Recovery, prune

    teacher = ctx.teacher.model if ctx.teacher is not None else None
    if teacher is None and config.recover == Recovery.KD:
        teacher = copy.deepcopy(slim.model)  # KD recovery from the unpruned model itself
    ctx.results.append(prune(slim, ctx.task, config, ctx.work_dir / "prune", teacher=teacher,
                             progress=ctx.progress))
    return slim


def _quantize(slim, config, ctx):
    from slimformer.stages.quantize import ORT_SCHEMES, quantization_aware_training, quantize_torch

    if config.scheme.value == "qat-int8":
        quantization_aware_training(slim, ctx.task, config, ctx.work_dir / "qat", progress=ctx.progress)
    if config.target in ORT_SCHEMES:
        slim.record["pending_onnx"] = config.model_dump(mode="json")  # written by run_recipe into the output
    else:
        ctx.results.append(quantize_torch(slim, config))
    return slim


for _cls, _fn in ((FinetuneConfig, _finetune), (DistillConfig, _distill), (PruneConfig, _prune),
                  (QuantizeConfig, _quantize)):
    register(_cls, _fn)


def run_recipe(recipe: Recipe, task: TaskData, out: str | Path, *, model: str | None = None,
               progress: bool = True) -> dict[str, Any]:
    """Apply the recipe's stages in order, score the eval split and save the result in ``out``."""
    from slimformer.api import load_for_task, work_dir_for
    from slimformer.evaluate import evaluate
    from slimformer.export import load_runner
    from slimformer.stages.finetune import clean_work_dir

    model = model or recipe.model
    if model is None:
        raise SlimformerError("the recipe names no model; add 'model:' to it or pass --model")
    out = models.check_out_dir(out)
    t0 = time.time()
    slim = load_for_task(model, task)
    ctx = Context(task=task, work_dir=work_dir_for(out), out=out, progress=progress)
    for stage in recipe.stages:
        slim = STAGES[type(stage)](slim, stage, ctx)
    slim.record["recipe"] = recipe.model_dump(mode="json")
    pending = slim.record.pop("pending_onnx", None)
    if pending is not None:
        from slimformer.stages.quantize import QuantizeConfig, quantize_onnx

        cfg = QuantizeConfig(**pending)
        models.atomic_dir(out, lambda tmp: quantize_onnx(slim, task, cfg, tmp))
    else:
        models.save(slim, out)
    runner, tokenizer = load_runner(out, task)
    quality = evaluate(runner, tokenizer, task, "eval", progress=progress)
    models.update_record(out, quality={"eval": quality})
    clean_work_dir(ctx.work_dir)
    return {"out": str(out), "quality": quality, "stages": ctx.results, "seconds": time.time() - t0}
