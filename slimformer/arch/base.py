"""The adapter record: where one model family keeps its layers, heads, FFN and embeddings."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn


@dataclass(frozen=True)
class ArchAdapter:
    """Where things live inside one model family (paths are relative to the base model / a layer).

    Projections are ``nn.Linear`` (weight ``[out, in]``) unless ``transposed_weights`` is set: GPT-2 keeps
    ``transformers.pytorch_utils.Conv1D`` modules whose weight is ``[in, out]``. With ``fused_qkv`` the
    query, key and value paths name one projection whose outputs are the blocks ``[q | k | v]`` (GPT-2's
    ``attn.c_attn``). With ``n_kv_heads_field`` the family may use grouped-query attention: each of the
    ``n_kv_heads`` key/value heads serves ``n_heads // n_kv_heads`` consecutive query heads."""

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
    # FFN width when the config leaves ``ffn_field`` unset (GPT-2's ``n_inner=None`` means 4 x hidden).
    ffn_default_multiple: int | None = None
    vocab_field: str = "vocab_size"
    lora_targets: tuple[str, ...] = ()
    # Modules (relative to the base model) that belong with the task head: trained in full by LoRA and
    # top-k fine-tuning, e.g. BERT's pooler, which checkpoints such as all-MiniLM-L6-v2 do not even ship.
    head_modules: tuple[str, ...] = ()
    # Linear layers (relative to the whole model) that read the vocabulary dimension, e.g. an LM head.
    # Paths a given model lacks (a classification model has no LM head) are skipped.
    vocab_heads: tuple[str, ...] = field(default_factory=tuple)
    fused_qkv: bool = False  # query/key/value name one projection with outputs [q | k | v]
    transposed_weights: bool = False  # projections are Conv1D with weight [in, out] (GPT-2)
    decoder: bool = False  # a causal decoder family (KV cache, LM head)

    def base(self, model: nn.Module) -> nn.Module:
        prefix = getattr(model, "base_model_prefix", "")
        return getattr(model, prefix) if prefix and hasattr(model, prefix) else model

    def get_layers(self, model: nn.Module) -> nn.ModuleList:
        return self.base(model).get_submodule(self.layers)

    def n_heads(self, config) -> int:
        """Number of query heads per layer in the base architecture."""
        return int(getattr(config, self.n_heads_field))

    def n_kv_heads(self, config) -> int:
        """Number of key/value heads per layer (= query heads unless the family uses grouped-query attention)."""
        if self.n_kv_heads_field is None:
            return self.n_heads(config)
        value = getattr(config, self.n_kv_heads_field, None)
        return int(value) if value else self.n_heads(config)

    def group_size(self, config) -> int:
        """Query heads per key/value head (1 without grouped-query attention)."""
        return self.n_heads(config) // self.n_kv_heads(config)

    def head_dim(self, config) -> int:
        hd = getattr(config, "head_dim", None)
        return int(hd) if hd else int(config.hidden_size // self.n_heads(config))

    def ffn_size(self, config) -> int:
        """FFN width (neurons per layer) of the base architecture."""
        value = getattr(config, self.ffn_field, None)
        if value is None and self.ffn_default_multiple is not None:
            return int(self.ffn_default_multiple * config.hidden_size)
        if value is None:
            raise AttributeError(f"config has no '{self.ffn_field}'")
        return int(value)
