"""slimformer: make a pretrained transformer small and fast for one task, with measured numbers.

The curated public API (imported lazily, so ``import slimformer`` stays cheap)::

    from slimformer import load_task_data, load, FinetuneConfig, api
    task = load_task_data("../shared/data/sst2")
    api.finetune("minilm", task, FinetuneConfig(epochs=2), "runs/sst2-ft")
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

# torchao (pulled in by accelerate/peft) logs a warning for each optional CUDA kernel it cannot load on a
# CPU machine, and registers enums that make torch's pytree module warn: noise on every command start.
logging.getLogger("torchao").setLevel(logging.ERROR)
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)

__version__ = "0.1.0"

_EXPORTS = {
    "api": ("slimformer.api", None),
    "SlimformerError": ("slimformer.errors", "SlimformerError"),
    "load": ("slimformer.models", "load"),
    "save": ("slimformer.models", "save"),
    "SlimModel": ("slimformer.models", "SlimModel"),
    "load_task_data": ("slimformer.tasks", "load_task_data"),
    "TaskData": ("slimformer.tasks", "TaskData"),
    "TaskType": ("slimformer.tasks", "TaskType"),
    "evaluate": ("slimformer.evaluate", "evaluate"),
    "torch_runner": ("slimformer.evaluate", "torch_runner"),
    "measure_model": ("slimformer.measure", "measure_model"),
    "FinetuneConfig": ("slimformer.stages.finetune", "FinetuneConfig"),
    "DistillConfig": ("slimformer.stages.distill", "DistillConfig"),
    "PruneConfig": ("slimformer.stages.prune", "PruneConfig"),
    "QuantizeConfig": ("slimformer.stages.quantize", "QuantizeConfig"),
    "Recipe": ("slimformer.recipe", "Recipe"),
    "run_recipe": ("slimformer.recipe", "run_recipe"),
    "SearchConfig": ("slimformer.search", "SearchConfig"),
    "SearchSpace": ("slimformer.search", "SearchSpace"),
    "run_search": ("slimformer.search", "run_search"),
    "pareto_front": ("slimformer.pareto", "pareto_front"),
    "parse_budget": ("slimformer.pareto", "parse_budget"),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'slimformer' has no attribute '{name}'")
    module, attr = _EXPORTS[name]
    mod = importlib.import_module(module)
    return mod if attr is None else getattr(mod, attr)
