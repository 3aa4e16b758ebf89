"""Helpers for tests: tiny random models of each family, built offline from configs.

The tiny models use the real (packaged) MiniLM tokenizer so that text goes in as it would in production,
with a 2-layer, 4-head, hidden-32 body that runs in milliseconds. The decoders (GPT-2, Llama with grouped-query
attention) get a causal LM head and the same tokenizer, whose ``[PAD]`` is their pad token.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoTokenizer, BertConfig, GPT2Config, LlamaConfig

from slimformer.models import AUTO_CLASSES, SHORT_NAMES, SlimModel, prepare_lm_tokenizer
from slimformer.tasks import TaskData, TaskType

TINY_BERT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
             "max_position_embeddings": 128, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


def minilm_tokenizer():
    return AutoTokenizer.from_pretrained(str(SHORT_NAMES["minilm"]()))


def tiny_bert(task: TaskType | str = TaskType.SEQUENCE_CLASSIFICATION, label_names: list[str] | None = None,
              seed: int = 0, **overrides) -> SlimModel:
    """A randomly initialised tiny BERT with a task head and the MiniLM tokenizer."""
    task = TaskType(task)
    tok = minilm_tokenizer()
    if label_names is None and task != TaskType.CAUSAL_LM:
        label_names = ["0", "1"] if task == TaskType.SEQUENCE_CLASSIFICATION else ["O", "B-PER", "I-PER"]
    kwargs = dict(TINY_BERT, vocab_size=len(tok), **overrides)
    if label_names:
        kwargs.update(num_labels=len(label_names), id2label=dict(enumerate(label_names)),
                      label2id={n: i for i, n in enumerate(label_names)})
    torch.manual_seed(seed)
    model = AUTO_CLASSES[task].from_config(BertConfig(**kwargs)).eval()
    return SlimModel(model=model, tokenizer=tok, task_type=task, label_names=label_names,
                     record={"base_model": "tiny-bert"}, source="tiny-bert")


def tiny_sst2_task(n_train: int = 64, n_eval: int = 32) -> TaskData:
    """A small sentiment task made of fixed sentences (no files needed)."""
    pos = ["a charming and often affecting journey", "the best film of the year", "warm , funny and moving",
           "a delight from start to finish", "beautifully acted and written"]
    neg = ["a dull , lifeless mess", "the worst script in years", "boring and far too long",
           "an ugly , pointless movie", "flat characters and no laughs"]
    rows = [{"text": t, "label": "1"} for t in pos] + [{"text": t, "label": "0"} for t in neg]
    train = [rows[i % len(rows)] for i in range(n_train)]
    ev = [rows[(i * 3) % len(rows)] for i in range(n_eval)]
    return TaskData(TaskType.SEQUENCE_CLASSIFICATION, train=train, tuning=ev[: n_eval // 2], eval=ev,
                    label_names=["0", "1"], source="tiny")


def tiny_ner_task(n: int = 32) -> TaskData:
    sents = [{"tokens": ["John", "lives", "in", "Paris"], "tags": ["B-PER", "O", "O", "O"]},
             {"tokens": ["Mary", "Ann", "Smith", "spoke"], "tags": ["B-PER", "I-PER", "I-PER", "O"]}]
    ex = [sents[i % 2] for i in range(n)]
    return TaskData(TaskType.TOKEN_CLASSIFICATION, train=ex, tuning=ex[:8], eval=ex[:8],
                    label_names=["O", "B-PER", "I-PER"], source="tiny")


def write_sst2_folder(folder: Path, n: int = 40) -> Path:
    """A tiny SST-2-style folder (train.tsv, dev.tsv) for CLI tests."""
    task = tiny_sst2_task(n, n // 2)
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train.tsv", task.train), ("dev.tsv", task.eval)):
        lines = ["sentence\tlabel"] + [f"{r['text']} \t{r['label']}" for r in rows]
        (folder / name).write_text("\n".join(lines) + "\n")
    return folder


TINY_GPT2 = {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_inner": 64, "n_positions": 256, "resid_pdrop": 0.0,
             "embd_pdrop": 0.0, "attn_pdrop": 0.0}
TINY_LLAMA = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "intermediate_size": 64, "max_position_embeddings": 256, "rms_norm_eps": 1e-6}


def _decoder_ids(tok) -> dict[str, int]:
    """Special ids for a decoder built on the MiniLM tokenizer: [PAD] pads, [CLS]/[SEP] stand for BOS/EOS."""
    return {"pad_token_id": tok.pad_token_id, "bos_token_id": tok.cls_token_id, "eos_token_id": tok.sep_token_id}


def _decoder(config, name: str, seed: int) -> SlimModel:
    tok = prepare_lm_tokenizer(minilm_tokenizer())
    torch.manual_seed(seed)
    model = AUTO_CLASSES[TaskType.CAUSAL_LM].from_config(config).eval()
    return SlimModel(model=model, tokenizer=tok, task_type=TaskType.CAUSAL_LM, record={"base_model": name},
                     source=name)


def tiny_gpt2(seed: int = 0, **overrides) -> SlimModel:
    """A randomly initialised tiny GPT-2 (Conv1D projections, fused c_attn, tied LM head)."""
    tok = minilm_tokenizer()
    config = GPT2Config(**{**TINY_GPT2, "vocab_size": len(tok), **_decoder_ids(tok), **overrides})
    return _decoder(config, "tiny-gpt2", seed)


def tiny_llama(seed: int = 0, **overrides) -> SlimModel:
    """A randomly initialised tiny Llama with grouped-query attention (4 query heads, 2 key/value heads)."""
    tok = minilm_tokenizer()
    config = LlamaConfig(**{**TINY_LLAMA, "vocab_size": len(tok), **_decoder_ids(tok), **overrides})
    return _decoder(config, "tiny-llama", seed)


LM_SENTENCES = [
    "the cat sat on the mat .", "the dog sat on the rug .", "a bird sang in the tree .",
    "the cat ate the fish .", "the dog ate the bone .", "a bird ate the seed .",
    "the sun rose over the hill .", "the moon rose over the sea .",
]


def tiny_lm_task(n_train: int = 200, n_eval: int = 40, seed: int = 0) -> TaskData:
    """A plain-text LM task over a tiny, very regular corpus (no files needed); eval text is held out."""
    import random

    rng = random.Random(seed)

    def text(n: int) -> str:
        return " ".join(rng.choice(LM_SENTENCES) for _ in range(n))

    return TaskData(TaskType.CAUSAL_LM, train=[{"text": text(n_train)}], tuning=[{"text": text(n_eval)}],
                    eval=[{"text": text(n_eval)}], source="tiny-lm", eval_source="tiny-lm eval")


def write_text_folder(folder: Path, n_train: int = 200, n_eval: int = 40) -> Path:
    """A tiny WikiText-style folder (valid.txt, test.txt) for CLI tests."""
    task = tiny_lm_task(n_train, n_eval)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "valid.txt").write_text(task.train[0]["text"] + "\n")
    (folder / "test.txt").write_text(task.eval[0]["text"] + "\n")
    return folder


def gpt2_style_tokenizer(texts: list[str], vocab_size: int = 1000):
    """A byte-level BPE tokenizer trained on ``texts`` and wrapped like GPT-2's: ``<|endoftext|>`` is BOS and
    EOS, and there is no pad token (as with the real GPT-2 and Llama tokenizers). Offline stand-in for a hub
    tokenizer."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, special_tokens=["<|endoftext|>"],
                            show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<|endoftext|>",
                                   eos_token="<|endoftext|>", unk_token="<|endoftext|>",
                                   model_input_names=["input_ids", "attention_mask"])


def save_hub_style_decoder(folder: Path, family: str = "gpt2", texts: list[str] | None = None,
                           vocab_size: int = 1000, seed: int = 0, **overrides) -> Path:
    """A plain Hugging Face folder (config.json, model.safetensors, tokenizer; no slimformer.json) holding a tiny
    random GPT-2 or Llama with a GPT-2-style tokenizer: what a hub download of a real decoder looks like."""
    texts = texts or [tiny_lm_task().train[0]["text"]]
    tok = gpt2_style_tokenizer(texts, vocab_size)
    ids = {"vocab_size": len(tok), "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
    if family == "gpt2":
        config = GPT2Config(**{**TINY_GPT2, **ids, **overrides})
    elif family == "llama":
        config = LlamaConfig(**{**TINY_LLAMA, **ids, **overrides})
    else:
        raise ValueError(f"unknown family {family}; use gpt2 or llama")
    torch.manual_seed(seed)
    model = AUTO_CLASSES[TaskType.CAUSAL_LM].from_config(config)
    folder = Path(folder)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
