"""The adapter record: where one model family keeps its layers, heads, FFN and embeddings."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn


@dataclass(frozen=True)
class ArchAdapter:
    """Where things live inside one model family (paths are relative to the base model / a layer)."""

    family: str
    model_types: tuple[str, ...]
    layers: str  # path of the ModuleList of transformer blocks, relative to the base model
    query: str  # relative to a layer
    key: str
    value: str
    attn_out: str
    ffn_in: tuple[str, ...]  # Linear layers whose *rows* (output features) are FFN neurons
    ffn_out: str  # Linear layer whose *columns* (input features) are FFN neurons
    embeddings: str  # word embedding, relative to the base model
    n_layers_field: str = "num_hidden_layers"
    n_heads_field: str = "num_attention_heads"
    n_kv_heads_field: str | None = None
    ffn_field: str = "intermediate_size"
    vocab_field: str = "vocab_size"
    lora_targets: tuple[str, ...] = ()
    # Modules (relative to the base model) that belong with the task head: trained in full by LoRA and
    # top-k fine-tuning, e.g. BERT's pooler, which checkpoints such as all-MiniLM-L6-v2 do not even ship.
    head_modules: tuple[str, ...] = ()
    # Linear layers (relative to the whole model) that read the vocabulary dimension, e.g. an LM head.
    vocab_heads: tuple[str, ...] = field(default_factory=tuple)

    def base(self, model: nn.Module) -> nn.Module:
        prefix = getattr(model, "base_model_prefix", "")
        return getattr(model, prefix) if prefix and hasattr(model, prefix) else model

    def get_layers(self, model: nn.Module) -> nn.ModuleList:
        return self.base(model).get_submodule(self.layers)

    def n_heads(self, config) -> int:
        return int(getattr(config, self.n_heads_field))

    def head_dim(self, config) -> int:
        hd = getattr(config, "head_dim", None)
        return int(hd) if hd else int(config.hidden_size // self.n_heads(config))
