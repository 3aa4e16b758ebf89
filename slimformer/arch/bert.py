"""BERT-like encoders (BERT, MiniLM, RoBERTa-style layouts that keep BERT's module names)."""

from slimformer.arch.base import ArchAdapter

BERT = ArchAdapter(
    family="bert",
    model_types=("bert",),
    layers="encoder.layer",
    query="attention.self.query",
    key="attention.self.key",
    value="attention.self.value",
    attn_out="attention.output.dense",
    ffn_in=("intermediate.dense",),
    ffn_out="output.dense",
    embeddings="embeddings.word_embeddings",
    head_modules=("pooler",),
    lora_targets=("query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"),
)
