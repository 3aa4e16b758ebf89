"""GPT-2 family decoders (GPT-2, DistilGPT2): Conv1D projections and a fused [q | k | v] attention input."""

from slimformer.arch.base import ArchAdapter

GPT2 = ArchAdapter(
    family="gpt2",
    model_types=("gpt2",),
    layers="h",
    query="attn.c_attn",  # fused: outputs [q | k | v], each n_head x head_dim wide
    key="attn.c_attn",
    value="attn.c_attn",
    attn_out="attn.c_proj",
    ffn_in=("mlp.c_fc",),
    ffn_out="mlp.c_proj",
    embeddings="wte",
    n_layers_field="n_layer",
    n_heads_field="n_head",
    ffn_field="n_inner",
    ffn_default_multiple=4,
    vocab_heads=("lm_head",),
    lora_targets=("c_attn", "c_proj", "c_fc"),
    fused_qkv=True,
    transposed_weights=True,
    decoder=True,
)
