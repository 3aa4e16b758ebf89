"""Architecture knowledge as data: where a family keeps its layers, heads, FFN and embeddings.

Stages never hard-code module names; they ask the adapter of the model's family. Adding a family means
adding one small file here and listing it in ``ADAPTERS``.
"""

from __future__ import annotations

from slimformer.arch.base import ArchAdapter
from slimformer.arch.bert import BERT
from slimformer.arch.gpt2 import GPT2
from slimformer.arch.llama import LLAMA
from slimformer.errors import SlimformerError

ADAPTERS: list[ArchAdapter] = [BERT, GPT2, LLAMA]


def adapter_for(model_or_config) -> ArchAdapter:
    """Return the adapter of a model (or config); a clear error for families we do not support yet."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    known = sorted({t for a in ADAPTERS for t in a.model_types})
    raise SlimformerError(
        f"model type '{model_type}' is not supported yet (supported: {', '.join(known)}); "
        "use a model of a supported family"
    )


__all__ = ["ADAPTERS", "ArchAdapter", "adapter_for"]
