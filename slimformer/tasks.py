"""Tasks: what the examples look like, how they are batched, and how predictions are scored.

Three task types sit behind one small interface (:class:`TaskData`):

* ``sequence-classification``: tsv/csv/jsonl files (or a hub dataset id); metric accuracy + macro-F1.
* ``token-classification``: CoNLL column files in IOB2 (or a hub id); metric seqeval entity F1, with each
  word's label on its first sub-word.
* ``causal-lm``: plain text; metric perplexity with a sliding window.

Splits: ``train``; ``tuning``, carved from train with a fixed seed (later used by search and for
best-checkpoint selection, never for the final claim), or the dev file with ``tuning_split="dev"``; ``eval``,
the held-out file (``test`` if present, else ``dev``/``valid``). The models never see the file format, only token ids.

Documents stay whole when the tuning split is carved: a CoNLL file's ``-DOCSTART-`` lines mark
documents (each sentence keeps its document number under ``"doc"``), and the tuning split takes whole
documents, so its sentences come from other articles than the training sentences (sentences of the same
article share entity names, which made a sentence-level tuning split optimistic). Data without documents
(tables, CoNLL files without markers) is carved sentence by sentence as before. Sentences stay whole
too: SST-2's training file holds every phrase of its parsed sentences (67,349 phrases of ~6,900 sentences),
so a random tuning phrase mostly sits inside a training phrase (70% of them did), and tuning accuracy ran
6 points above dev. A table whose examples are mostly pieces of its longer examples
(:func:`sentence_groups`) gives the tuning split whole sentences only, and their pieces leave training.
The tuning split's
fingerprint (:meth:`TaskData.tuning_fingerprint`) goes into every saved model's record, so the search can
refuse a model that was trained with another tuning split.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np

from slimformer.errors import SlimformerError


class TaskType(StrEnum):
    SEQUENCE_CLASSIFICATION = "sequence-classification"
    TOKEN_CLASSIFICATION = "token-classification"
    CAUSAL_LM = "causal-lm"


TEXT_COLUMN_GUESSES = ("sentence", "text", "sentence1", "review", "content", "document")
LABEL_COLUMN_GUESSES = ("label", "labels", "sentiment", "class", "target")
SPLIT_FILES = {
    "train": ("train",),
    "dev": ("dev", "valid", "validation", "val"),
    "test": ("test",),
}
TABLE_SUFFIXES = (".tsv", ".csv", ".jsonl")



CARVED = "carved from train"  # the tuning source when the tuning split is carved from train, not a file

@dataclass
class TaskData:
    """Examples of one task, split three ways, plus what the model head needs to know."""

    type: TaskType
    train: list[dict[str, Any]]
    tuning: list[dict[str, Any]]
    eval: list[dict[str, Any]]
    label_names: list[str] | None = None
    source: str = ""
    eval_source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_labels(self) -> int | None:
        return len(self.label_names) if self.label_names else None

    def split(self, name: str) -> list[dict[str, Any]]:
        if name not in ("train", "tuning", "eval"):
            raise SlimformerError(f"unknown split '{name}'; use one of train, tuning, eval")
        return getattr(self, name)

    def tuning_fingerprint(self) -> str:
        """A short sha1 of the tuning split as carved (before ``max_eval_examples`` keeps a prefix of it, so
        a shorter tuning run gets the same fingerprint): same data, seed and carving, same fingerprint."""
        carved = self.extra.get("tuning_fingerprint")
        return carved if carved is not None else examples_fingerprint(self.tuning)

    def describe(self) -> dict[str, Any]:
        return {
            "type": str(self.type),
            "source": self.source,
            "eval_source": self.eval_source,
            "label_names": self.label_names,
            "sizes": {"train": len(self.train), "tuning": len(self.tuning), "eval": len(self.eval)},
            "tuning_fingerprint": self.tuning_fingerprint(),
            "tuning_source": self.extra.get("tuning_source", CARVED),
        }


def examples_fingerprint(examples: list[dict[str, Any]]) -> str:
    """sha1 (12 hex digits) of the canonical JSON of ``examples``; the document numbers are left out, so
    only what a model sees (text, tokens, labels) and the order count."""
    canon = [{k: v for k, v in e.items() if k != "doc"} for e in examples]
    text = json.dumps(canon, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:12]


# --------------------------------------------------------------------------------------------------
# Reading files
# --------------------------------------------------------------------------------------------------


def _read_table(path: Path) -> tuple[list[str], list[dict[str, Any]]]:
    """Read a tsv/csv/jsonl file into (columns, rows). Malformed files raise a one-line error."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise SlimformerError(f"data file {path} is not UTF-8 text; re-save it as UTF-8") from None
    if not text.strip():
        raise SlimformerError(f"data file {path} is empty; give a file with a header and at least one row")
    if path.suffix == ".jsonl":
        rows = []
        for i, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise SlimformerError(f"{path}:{i} is not valid JSON ({e.msg}); write one object per line") from None
            if not isinstance(row, dict):
                raise SlimformerError(f"{path}:{i} is not a JSON object; write one object per line")
            rows.append(row)
        columns = sorted({k for r in rows for k in r})
        return columns, rows
    delimiter = "\t" if path.suffix == ".tsv" else ","
    # QUOTE_NONE for tsv: GLUE files contain bare quotes inside sentences.
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    reader = csv.reader(text.splitlines(), delimiter=delimiter, quoting=quoting)
    header = next(reader)
    columns = [c.strip() for c in header]
    rows = []
    for i, values in enumerate(reader, start=2):
        if not values or all(not v.strip() for v in values):
            continue
        if len(values) != len(columns):
            raise SlimformerError(
                f"{path}:{i} has {len(values)} fields but the header has {len(columns)}; "
                f"fix the row or the delimiter ('{'tab' if delimiter == chr(9) else delimiter}')"
            )
        rows.append(dict(zip(columns, values, strict=True)))
    if not rows:
        raise SlimformerError(f"data file {path} has a header but no rows; add examples")
    return columns, rows


def _pick_column(columns: Sequence[str], wanted: str | None, guesses: Sequence[str], what: str, path: Path,
                 flag: str) -> str:
    if wanted is not None:
        if wanted not in columns:
            raise SlimformerError(
                f"data file {path} has no column '{wanted}' (columns: {', '.join(columns)}); pass {flag}"
            )
        return wanted
    for g in guesses:
        if g in columns:
            return g
    raise SlimformerError(
        f"cannot tell the {what} column of {path} (columns: {', '.join(columns)}); pass {flag}"
    )


def _label_key(value: Any) -> str:
    """Labels are compared as strings; ints and int-like strings ('1') are the same label."""
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def _check_label_types(values: list[Any], path: Path) -> None:
    kinds = set()
    for v in values:
        s = _label_key(v)
        kinds.add("number" if s.lstrip("-").isdigit() else "text")
    if len(kinds) > 1:
        raise SlimformerError(
            f"labels in {path} mix numbers and text; use one kind of label throughout the file"
        )


def _sort_labels(labels: set[str]) -> list[str]:
    if all(label.lstrip("-").isdigit() for label in labels):
        return sorted(labels, key=int)
    return sorted(labels)


def read_classification_file(path: Path, text_column: str | None, label_column: str | None,
                             labels: list[str] | None = None) -> tuple[list[dict[str, Any]], list[str]]:
    """Read one classification file; returns examples with the label as a string and the label set."""
    columns, rows = _read_table(path)
    tcol = _pick_column(columns, text_column, TEXT_COLUMN_GUESSES, "text", path, "--text-column")
    lcol = _pick_column(columns, label_column, LABEL_COLUMN_GUESSES, "label", path, "--label-column")
    raw = []
    for i, r in enumerate(rows):
        if r.get(lcol) in (None, ""):
            raise SlimformerError(f"row {i + 1} of {path} has no label in column '{lcol}'; fill it in or drop the row")
        if r.get(tcol) is None:
            raise SlimformerError(f"row {i + 1} of {path} has no text in column '{tcol}'; fill it in or drop the row")
        raw.append(r[lcol])
    _check_label_types(raw, path)
    found = {_label_key(v) for v in raw}
    if labels is not None:
        unknown = sorted(found - set(labels))
        if unknown:
            raise SlimformerError(
                f"{path} has labels {unknown[:5]} outside the declared set {labels}; "
                "fix the data or declare the labels with --labels"
            )
    examples = [{"text": str(r[tcol]).strip(), "label": _label_key(r[lcol])} for r in rows]
    return examples, _sort_labels(found)


def read_conll_file(path: Path) -> list[dict[str, Any]]:
    """Read a CoNLL column file: token in the first column, IOB2 tag in the last; blank lines split
    sentences. Every token line must have as many fields as the first. Each sentence records its document
    under ``"doc"``: a counter that moves on at every ``-DOCSTART-`` line (sentences before the first marker
    are document 0); in a file without markers every sentence is its own document."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise SlimformerError(f"data file {path} is not UTF-8 text; re-save it as UTF-8") from None
    sentences: list[dict[str, Any]] = []
    tokens: list[str] = []
    tags: list[str] = []
    n_fields = None
    doc = sent_doc = 0
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            if tokens:
                sentences.append({"tokens": tokens, "tags": tags, "doc": sent_doc})
                tokens, tags = [], []
            continue
        parts = line.split()
        if parts[0] == "-DOCSTART-":
            doc += 1
            continue
        if n_fields is None:
            n_fields = len(parts)
            if n_fields < 2:
                raise SlimformerError(
                    f"{path}:{lineno} has 1 field; a CoNLL line needs the token first and the tag last"
                )
        if len(parts) != n_fields:
            raise SlimformerError(
                f"{path}:{lineno} has {len(parts)} fields but earlier lines have {n_fields}; "
                "fix the line (token first, tag last, separated by spaces)"
            )
        if not tokens:
            sent_doc = doc  # a sentence belongs to the document it starts in
        tokens.append(parts[0])
        tags.append(parts[-1])
    if tokens:
        sentences.append({"tokens": tokens, "tags": tags, "doc": sent_doc})
    if not sentences:
        raise SlimformerError(f"data file {path} has no sentences; give a CoNLL file with token and tag columns")
    if doc == 0:  # no markers: every sentence is its own document
        for i, s in enumerate(sentences):
            s["doc"] = i
    for s in sentences:
        for t in s["tags"]:
            if t != "O" and not (t[:2] in ("B-", "I-") and len(t) > 2):
                raise SlimformerError(
                    f"{path} has tag '{t}', which is not IOB2 (O, B-X, I-X); convert the tags to IOB2"
                )
    return sentences


CONLL_LABEL_ORDER = ("PER", "ORG", "LOC", "MISC")


def conll_label_names(sentences: list[dict[str, Any]]) -> list[str]:
    """O first, then B-/I- pairs; CoNLL-2003's types in the Hugging Face order, others alphabetically."""
    types = {t[2:] for s in sentences for t in s["tags"] if t != "O"}
    ordered = [t for t in CONLL_LABEL_ORDER if t in types] + sorted(types - set(CONLL_LABEL_ORDER))
    names = ["O"]
    for t in ordered:
        names += [f"B-{t}", f"I-{t}"]
    return names


def read_text_file(path: Path) -> list[dict[str, Any]]:
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise SlimformerError(f"data file {path} is empty; give a plain-text file")
    return [{"text": text}]


# --------------------------------------------------------------------------------------------------
# Finding files and the task type
# --------------------------------------------------------------------------------------------------


def _find_split_files(folder: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    for split, stems in SPLIT_FILES.items():
        for p in files:
            if p.stem.lower() in stems and p.suffix in TABLE_SUFFIXES + (".txt",):
                found.setdefault(split, p)
    return found


def _looks_like_conll(path: Path) -> bool:
    with path.open(encoding="utf-8", errors="replace") as f:
        for i, line in enumerate(f):
            if i > 200:
                break
            parts = line.split()
            if not parts or parts[0] == "-DOCSTART-":
                continue
            tag = parts[-1]
            return len(parts) >= 2 and (tag == "O" or tag[:2] in ("B-", "I-"))
    return False


def infer_task_type(files: dict[str, Path]) -> TaskType:
    first = files.get("train") or next(iter(files.values()))
    if first.suffix in TABLE_SUFFIXES:
        return TaskType.SEQUENCE_CLASSIFICATION
    if _looks_like_conll(first):
        return TaskType.TOKEN_CLASSIFICATION
    return TaskType.CAUSAL_LM


def _carve_examples(examples: list[dict[str, Any]], fraction: float, max_size: int, seed: int
                    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Split off a tuning set from train with a fixed seed (same seed, same split, every run); both keep
    the examples' order.

    Examples with a ``"doc"`` are carved by whole documents: the documents are shuffled with the seed and
    taken until the tuning set has at least its size (``fraction`` of the examples, at most ``max_size``),
    always leaving one document to train. With no documents, one document only, or every example its own
    document, it is carved example by example (the split made before documents were kept whole)."""
    n = len(examples)
    n_tune = min(max_size, max(1, int(round(n * fraction)))) if n > 1 else 0
    docs: dict[Any, list[int]] = {}
    if n and all("doc" in e for e in examples):
        for i, e in enumerate(examples):
            docs.setdefault(e["doc"], []).append(i)
    if 1 < len(docs) < n:
        groups = list(docs.values())
        random.Random(seed).shuffle(groups)
        tune_idx: set[int] = set()
        for g in groups[:-1]:
            if len(tune_idx) >= n_tune:
                break
            tune_idx.update(g)
    else:
        order = list(range(n))
        random.Random(seed).shuffle(order)
        tune_idx = set(order[:n_tune])
    train = [e for i, e in enumerate(examples) if i not in tune_idx]
    tune = [e for i, e in enumerate(examples) if i in tune_idx]
    return train, tune


# A classification table whose examples are mostly phrases of its own longer examples (SST-2: 67,349 phrases of
# 6,920 parsed sentences) is carved by source sentence. Shorter examples than this are single words or
# pairs that occur in many sentences: they always train and are not grouped.
PHRASE_MIN_WORDS = 3
PHRASE_SHARE = 0.25  # at least this share of the 3+ word examples lies inside a longer one
MIN_TUNING_SENTENCES = 500  # phrase data: the tuning split gets at least this many sentences (when 10x exist)


def sentence_groups(examples: Sequence[dict[str, Any]]) -> list[int] | None:
    """For phrase-structured text data, the index of the sentence each example belongs to: the longest
    example that contains it word for word (which is never inside a longer one). Examples of fewer than
    ``PHRASE_MIN_WORDS`` words get -1 (no sentence); sentences point to themselves. ``None`` when the data is
    not phrase-structured: fewer than ``PHRASE_SHARE`` of its 3+ word examples lie inside another."""
    words = [str(e.get("text", "")).split() for e in examples]
    padded = [" " + " ".join(w) + " " for w in words]
    index: dict[tuple[str, ...], list[int]] = {}
    for i, w in enumerate(words):
        for k in range(len(w) - PHRASE_MIN_WORDS + 1):
            index.setdefault(tuple(w[k:k + PHRASE_MIN_WORDS]), []).append(i)
    group = [i if len(w) >= PHRASE_MIN_WORDS else -1 for i, w in enumerate(words)]
    long_ones = inside = 0
    for i, w in enumerate(words):
        if len(w) < PHRASE_MIN_WORDS:
            continue
        long_ones += 1
        # Every container shares each of this example's n-grams: scan the containers of its rarest one.
        grams = (tuple(w[k:k + PHRASE_MIN_WORDS]) for k in range(len(w) - PHRASE_MIN_WORDS + 1))
        best = -1
        for j in min((index[g] for g in grams), key=len):
            if len(words[j]) > len(w) and padded[i] in padded[j] and (best < 0 or len(words[j]) > len(words[best])):
                best = j
        if best >= 0:
            group[i] = best
            inside += 1
    first: dict[str, int] = {}
    for i, text in enumerate(padded):  # a repeated sentence (or phrase) goes wherever its first copy goes
        if group[i] >= 0:
            group[i] = group[first.setdefault(text, i)]
    return group if long_ones and inside >= PHRASE_SHARE * long_ones else None


def _carve_sentences(examples: list[dict[str, Any]], group: list[int], fraction: float, max_size: int, seed: int
                     ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Phrase data: the tuning split takes whole sentences, shuffled with the seed: ``fraction`` of them (at
    least ``MIN_TUNING_SENTENCES`` where there are ten times as many, at most ``max_size``). It keeps only the
    sentences themselves, which look like a held-out file of sentences; their phrases, and any other example
    of 3+ words found inside one of them, leave training, so no tuning sentence has a part in it. Single
    words and pairs (no sentence) always train."""
    sentences = sorted({g for g in group if g >= 0})
    n_tune = min(max_size, max(int(round(len(sentences) * fraction)), min(MIN_TUNING_SENTENCES, len(sentences) // 10)))
    n_tune = min(n_tune, len(sentences) - 1)
    order = list(sentences)
    random.Random(seed).shuffle(order)
    taken = set(order[:max(0, n_tune)])
    tune = [e for i, e in enumerate(examples) if i in taken]
    # A common phrase ("a bad movie") belongs to one sentence's group but may sit in a tuning sentence too:
    # every word span of 3+ words of a tuning sentence leaves training.
    spans = set()
    for e in tune:
        w = str(e["text"]).split()
        spans.update(" ".join(w[a:b]) for a in range(len(w)) for b in range(a + PHRASE_MIN_WORDS, len(w) + 1))
    train = [e for i, e in enumerate(examples)
             if group[i] not in taken and (group[i] < 0 or " ".join(str(e["text"]).split()) not in spans)]
    return train, tune


def _carve(examples: list[dict[str, Any]], fraction: float, max_size: int, seed: int
           ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Split off the tuning set: a phrase-structured text table by source sentence, anything else by
    document or example by example."""
    texts = len(examples) > 1 and all("text" in e for e in examples)
    group = sentence_groups(examples) if texts else None
    if group is None:
        return _carve_examples(examples, fraction, max_size, seed)
    return _carve_sentences(examples, group, fraction, max_size, seed)


def load_task_data(
    data: str | Path,
    task: TaskType | str | None = None,
    *,
    text_column: str | None = None,
    label_column: str | None = None,
    labels: list[str] | None = None,
    eval_split: str | None = None,
    tuning_fraction: float = 0.05,
    max_tuning: int = 2000,
    seed: int = 0,
    max_train_examples: int | None = None,
    max_eval_examples: int | None = None,
    tuning_split: str | None = None,
) -> TaskData:
    """Load a task from a folder (``train.*`` + ``dev.*``/``test.*``), a single file, or a hub dataset id.

    ``eval_split`` picks the evaluation file (``test`` or ``dev``); by default ``test`` if there is one,
    else ``dev``. ``tuning_split``: ``carve`` (default) carves the tuning split from train, so the eval file
    stays unseen; ``dev`` takes the dev file as the tuning split and trains on all of train, where test is
    the eval file. On CoNLL-2003 the dev file showed a compressed model's test drop (1.01 vs 1.21 F1) where
    the carved split did not (0.32): sentences carved from train sit too close to the training documents.
    """
    task = TaskType(task) if task is not None else None
    if tuning_split not in (None, "carve", "dev"):
        raise SlimformerError(f"unknown tuning split '{tuning_split}'; use carve or dev")
    from_dev = tuning_split == "dev"
    path = Path(data)
    if not path.exists():
        if from_dev:
            raise SlimformerError("--tuning-split dev needs a data folder with a dev file; hub datasets carve "
                                  "their tuning split from train")
        if "/" in str(data) and not str(data).startswith((".", "/")) and len(Path(data).parts) == 2:
            return _load_hub_dataset(str(data), task, text_column, label_column, seed, tuning_fraction,
                                     max_tuning, max_train_examples, max_eval_examples)
        raise SlimformerError(f"data path {data} does not exist; give a folder, a data file or a hub dataset id")
    if path.is_dir():
        files = _find_split_files(path)
        if not files:
            raise SlimformerError(
                f"data folder {path} has no train/dev/test files (.tsv, .csv, .jsonl or .txt); "
                "name them train.tsv, dev.tsv, ..."
            )
    else:
        files = {"train": path}
    inferred = infer_task_type(files)
    task = task or inferred

    if task == TaskType.CAUSAL_LM and "train" not in files and "dev" in files:
        # WikiText-2 here ships valid + test only: fine-tune/calibrate on valid, score on test.
        files["train"] = files.pop("dev")
    if "train" not in files:
        raise SlimformerError(f"data folder {path} has no train file; add train.tsv (or .csv/.jsonl/.txt)")

    if eval_split is None:
        eval_key = "test" if "test" in files else ("dev" if "dev" in files else None)
    else:
        if eval_split not in ("test", "dev"):
            raise SlimformerError(f"unknown eval split '{eval_split}'; use test or dev")
        if eval_split not in files:
            raise SlimformerError(f"data folder {path} has no {eval_split} file; choose another --eval-split")
        eval_key = eval_split
    if from_dev:
        if task == TaskType.CAUSAL_LM:
            raise SlimformerError("a causal LM tunes on the end of its train text; drop --tuning-split dev")
        if "dev" not in files:
            raise SlimformerError(f"data folder {path} has no dev file to tune on; drop --tuning-split dev")
        if eval_key == "dev":
            raise SlimformerError("the dev file is the eval split here; --tuning-split dev needs a test file to "
                                  "score on (or drop --tuning-split)")

    label_names: list[str] | None = None
    tuning_examples: list[dict[str, Any]] = []
    if task == TaskType.SEQUENCE_CLASSIFICATION:
        if files["train"].suffix not in TABLE_SUFFIXES:
            raise SlimformerError(f"{files['train']} is not a .tsv/.csv/.jsonl table; classification needs one")
        train_all, found = read_classification_file(files["train"], text_column, label_column, labels)
        label_names = list(labels) if labels else found
        if len(label_names) < 2:
            raise SlimformerError(f"{files['train']} has one label {label_names}; classification needs two or more")
        eval_examples = []
        if eval_key:
            eval_examples, _ = read_classification_file(files[eval_key], text_column, label_column, label_names)
        if from_dev:
            tuning_examples, _ = read_classification_file(files["dev"], text_column, label_column, label_names)
    elif task == TaskType.TOKEN_CLASSIFICATION:
        if files["train"].suffix != ".txt" and not _looks_like_conll(files["train"]):
            raise SlimformerError(f"{files['train']} is not a CoNLL column file; token classification needs one")
        train_all = read_conll_file(files["train"])
        label_names = list(labels) if labels else conll_label_names(train_all)
        eval_examples = read_conll_file(files[eval_key]) if eval_key else []
        tuning_examples = read_conll_file(files["dev"]) if from_dev else []
        known = set(label_names)
        for name, exs in (("train", train_all), (eval_key, eval_examples), ("dev", tuning_examples)):
            bad = sorted({t for s in exs for t in s["tags"]} - known)
            if bad:
                raise SlimformerError(
                    f"the {name} file has tags {bad[:5]} outside the label set {label_names}; "
                    "fix the data or declare the labels with --labels"
                )
    else:
        train_all = read_text_file(files["train"])
        eval_examples = read_text_file(files[eval_key]) if eval_key else []

    if task == TaskType.CAUSAL_LM:
        # Language modelling carves the tuning text from the end of the train text (no shuffling of
        # characters); the eval text is the untouched held-out file.
        text = train_all[0]["text"]
        cut = int(len(text) * (1 - tuning_fraction))
        train, tuning = [{"text": text[:cut]}], [{"text": text[cut:]}]
    elif from_dev:
        train, tuning = train_all, tuning_examples
    else:
        train, tuning = _carve(train_all, tuning_fraction, max_tuning, seed)

    if not eval_examples:
        # A single file: carve the evaluation set from train too (a fixed seed, disjoint from tuning).
        if task == TaskType.CAUSAL_LM:
            text = train[0]["text"]
            cut = int(len(text) * 0.9)
            train, eval_examples = [{"text": text[:cut]}], [{"text": text[cut:]}]
        else:
            train, eval_examples = _carve(train, tuning_fraction, max_tuning, seed + 1)

    carved = examples_fingerprint(tuning)  # before max_eval_examples keeps a prefix of the tuning split
    if max_train_examples is not None and task != TaskType.CAUSAL_LM:
        train = train[:max_train_examples]
    if max_eval_examples is not None and task != TaskType.CAUSAL_LM:
        eval_examples = eval_examples[:max_eval_examples]
        tuning = tuning[:max_eval_examples]
    return TaskData(
        type=task, train=train, tuning=tuning, eval=eval_examples, label_names=label_names,
        source=str(files["train"]), eval_source=str(files[eval_key]) if eval_key else "carved from train",
        extra={"tuning_fingerprint": carved,
               "tuning_source": str(files["dev"]) if from_dev else CARVED},
    )


def _load_hub_dataset(dataset_id: str, task: TaskType | None, text_column: str | None, label_column: str | None,
                      seed: int, tuning_fraction: float, max_tuning: int, max_train: int | None,
                      max_eval: int | None) -> TaskData:
    """Load a Hugging Face hub dataset (needs network access to the hub)."""
    try:
        import datasets

        ds = datasets.load_dataset(dataset_id)
    except Exception as e:  # the hub is unreachable offline; say so in one line
        raise SlimformerError(
            f"could not load hub dataset '{dataset_id}' ({type(e).__name__}); check the id and network, "
            "or give a local folder"
        ) from None
    train_rows = list(ds["train"])
    eval_name = "test" if "test" in ds and "label" in ds["test"].column_names else "validation"
    eval_rows = list(ds[eval_name]) if eval_name in ds else []
    columns = ds["train"].column_names
    if task == TaskType.TOKEN_CLASSIFICATION or (task is None and "ner_tags" in columns):
        names = ds["train"].features["ner_tags"].feature.names
        conv = [{"tokens": r["tokens"], "tags": [names[t] for t in r["ner_tags"]]} for r in train_rows]
        ev = [{"tokens": r["tokens"], "tags": [names[t] for t in r["ner_tags"]]} for r in eval_rows]
        train, tuning = _carve(conv, tuning_fraction, max_tuning, seed)
        return TaskData(TaskType.TOKEN_CLASSIFICATION, train[:max_train], tuning, ev[:max_eval], list(names),
                        source=dataset_id, eval_source=f"{dataset_id}:{eval_name}")
    tcol = _pick_column(columns, text_column, TEXT_COLUMN_GUESSES, "text", Path(dataset_id), "--text-column")
    lcol = _pick_column(columns, label_column, LABEL_COLUMN_GUESSES, "label", Path(dataset_id), "--label-column")
    feat = ds["train"].features[lcol]
    names = list(getattr(feat, "names", None) or _sort_labels({_label_key(r[lcol]) for r in train_rows}))

    def conv(rows):
        return [{"text": r[tcol], "label": names[r[lcol]] if hasattr(feat, "names") else _label_key(r[lcol])}
                for r in rows]

    train, tuning = _carve(conv(train_rows), tuning_fraction, max_tuning, seed)
    return TaskData(TaskType.SEQUENCE_CLASSIFICATION, train[:max_train], tuning, conv(eval_rows)[:max_eval], names,
                    source=dataset_id, eval_source=f"{dataset_id}:{eval_name}")


# --------------------------------------------------------------------------------------------------
# Tokenisation and batching
# --------------------------------------------------------------------------------------------------


def encode(task: TaskData, examples: list[dict[str, Any]], tokenizer, max_length: int = 128,
           stride: int | None = None) -> list[dict[str, Any]]:
    """Turn examples into model features (lists of ids), ready for :func:`collate`."""
    if task.type == TaskType.SEQUENCE_CLASSIFICATION:
        label_id = {name: i for i, name in enumerate(task.label_names or [])}
        enc = tokenizer([e["text"] for e in examples], truncation=True, max_length=max_length)
        feats = []
        for i, e in enumerate(examples):
            f = {k: enc[k][i] for k in enc}
            f["labels"] = label_id[e["label"]]
            feats.append(f)
        return feats
    if task.type == TaskType.TOKEN_CLASSIFICATION:
        label_id = {name: i for i, name in enumerate(task.label_names or [])}
        enc = tokenizer([e["tokens"] for e in examples], is_split_into_words=True, truncation=True,
                        max_length=max_length)
        feats = []
        for i, e in enumerate(examples):
            word_ids = enc.word_ids(i)
            labels, prev = [], None
            for w in word_ids:
                # Only a word's first sub-word carries its label; the rest (and specials) are ignored.
                labels.append(-100 if w is None or w == prev else label_id[e["tags"][w]])
                prev = w
            f = {k: enc[k][i] for k in enc}
            f["labels"] = labels
            f["word_ids"] = [-1 if w is None else w for w in word_ids]
            feats.append(f)
        return feats
    # Causal LM: one long token stream cut into blocks; for evaluation use :func:`perplexity` instead.
    ids: list[int] = []
    for e in examples:
        ids += tokenizer(e["text"], add_special_tokens=False, verbose=False)["input_ids"]
    step = stride or max_length
    feats = []
    for start in range(0, max(1, len(ids) - 1), step):
        block = ids[start:start + max_length]
        if len(block) < 2:
            break
        feats.append({"input_ids": block, "attention_mask": [1] * len(block), "labels": list(block)})
    return feats


def collate(features: list[dict[str, Any]], pad_token_id: int = 0) -> dict[str, Any]:
    """Pad a batch to its own longest sequence (dynamic padding)."""
    import torch

    longest = max(len(f["input_ids"]) for f in features)
    batch: dict[str, Any] = {}
    for key in features[0]:
        if key == "word_ids":
            continue
        values = [f[key] for f in features]
        if isinstance(values[0], list):
            fill = {"input_ids": pad_token_id, "labels": -100}.get(key, 0)
            values = [v + [fill] * (longest - len(v)) for v in values]
        batch[key] = torch.tensor(values)
    return batch


class Collator:
    """A picklable collate function with the tokenizer's pad id bound (Trainer's data_collator)."""

    def __init__(self, pad_token_id: int | None):
        self.pad_token_id = pad_token_id if pad_token_id is not None else 0

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        return collate(features, self.pad_token_id)


# --------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------


def classification_scores(pred: np.ndarray, gold: np.ndarray, num_labels: int) -> dict[str, float]:
    acc = float((pred == gold).mean()) if len(gold) else float("nan")
    f1s = []
    for c in range(num_labels):
        tp = float(((pred == c) & (gold == c)).sum())
        fp = float(((pred == c) & (gold != c)).sum())
        fn = float(((pred != c) & (gold == c)).sum())
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return {"accuracy": acc, "macro_f1": float(np.mean(f1s))}


def entity_scores(gold: list[list[str]], pred: list[list[str]]) -> dict[str, float]:
    from seqeval.metrics import f1_score, precision_score, recall_score
    from seqeval.scheme import IOB2

    kw = {"mode": "strict", "scheme": IOB2, "zero_division": 0}
    return {
        "f1": float(f1_score(gold, pred, **kw)),
        "precision": float(precision_score(gold, pred, **kw)),
        "recall": float(recall_score(gold, pred, **kw)),
    }


PRIMARY_METRIC = {
    TaskType.SEQUENCE_CLASSIFICATION: ("accuracy", "higher"),
    TaskType.TOKEN_CLASSIFICATION: ("f1", "higher"),
    TaskType.CAUSAL_LM: ("perplexity", "lower"),
}


def primary_metric(task_type: TaskType | str) -> tuple[str, str]:
    """(name, 'higher'|'lower') of the metric that a task is judged by."""
    return PRIMARY_METRIC[TaskType(task_type)]
