"""Llama-style decoders: separate q/k/v/o projections with grouped-query attention, a gated (SwiGLU) FFN.

Mistral, Qwen2 and Qwen3 keep the same module names and shapes (Qwen3's q/k norms act per head_dim, shared by
all heads), so one adapter serves them."""

from slimformer.arch.base import ArchAdapter

LLAMA = ArchAdapter(
    family="llama",
    model_types=("llama", "mistral", "qwen2", "qwen3"),
    layers="layers",
    query="self_attn.q_proj",
    key="self_attn.k_proj",
    value="self_attn.v_proj",
    attn_out="self_attn.o_proj",
    ffn_in=("mlp.gate_proj", "mlp.up_proj"),
    ffn_out="mlp.down_proj",
    embeddings="embed_tokens",
    n_kv_heads_field="num_key_value_heads",
    vocab_heads=("lm_head",),
    lora_targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    decoder=True,
)
