"""Helpers for tests: tiny random models of each family, built offline from configs.

The tiny models use the real (packaged) MiniLM tokenizer so that text goes in as it would in production,
with a 2-layer, 4-head, hidden-32 body that runs in milliseconds.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoTokenizer, BertConfig

from slimformer.models import AUTO_CLASSES, SHORT_NAMES, SlimModel
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
