from pathlib import Path

import pytest

from slimformer.errors import SlimformerError
from slimformer.tasks import Collator, TaskType, encode, load_task_data
from slimformer.testing import minilm_tokenizer, tiny_ner_task, write_sst2_folder


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_sst2_folder_infers_sequence_classification(tmp_path):
    folder = write_sst2_folder(tmp_path / "sst", n=40)
    td = load_task_data(folder)
    assert td.type == TaskType.SEQUENCE_CLASSIFICATION
    assert td.label_names == ["0", "1"]
    assert len(td.train) + len(td.tuning) == 40
    assert len(td.eval) == 20
    assert all(not e["text"].endswith(" ") for e in td.train)  # GLUE's trailing space is stripped


def test_tuning_split_is_fixed_and_disjoint(tmp_path):
    rows = "\n".join(f"sentence number {i}\t{i % 2}" for i in range(200))
    folder = tmp_path / "d"
    _write(folder / "train.tsv", "sentence\tlabel\n" + rows + "\n")
    a = load_task_data(folder, seed=0)
    b = load_task_data(folder, seed=0)
    c = load_task_data(folder, seed=1)
    assert [e["text"] for e in a.tuning] == [e["text"] for e in b.tuning]
    assert [e["text"] for e in a.tuning] != [e["text"] for e in c.tuning]
    texts = lambda xs: {e["text"] for e in xs}  # noqa: E731
    assert not texts(a.tuning) & texts(a.train)
    assert not texts(a.eval) & texts(a.train) and not texts(a.eval) & texts(a.tuning)


def test_csv_and_jsonl_with_named_columns(tmp_path):
    _write(tmp_path / "c" / "train.csv", 'review,sentiment\n"good, really",pos\nbad,neg\nfine,pos\nawful,neg\n')
    td = load_task_data(tmp_path / "c")
    assert td.label_names == ["neg", "pos"] and td.train[0]["text"] in {"good, really", "bad", "fine", "awful"}
    _write(tmp_path / "j" / "train.jsonl", '{"body": "x", "y": 1}\n{"body": "z", "y": 0}\n{"body": "w", "y": 1}\n')
    td = load_task_data(tmp_path / "j", text_column="body", label_column="y")
    assert td.label_names == ["0", "1"]


@pytest.mark.parametrize(
    "files, kwargs, message",
    [
        ({}, {}, "does not exist"),
        ({"train.tsv": ""}, {}, "is empty"),
        ({"train.tsv": "sentence\tlabel\n"}, {}, "no rows"),
        ({"train.tsv": "words\tlabel\nhi\t1\nyo\t0\n"}, {}, "cannot tell the text column"),
        ({"train.tsv": "sentence\tlabel\nhi\t1\nyo\t0\n"}, {"text_column": "body"}, "has no column 'body'"),
        ({"train.tsv": "sentence\tlabel\nhi\t1\nyo\tcat\n"}, {}, "mix numbers and text"),
        ({"train.tsv": "sentence\tlabel\nhi\t1\nyo\t2\n"}, {"labels": ["0", "1"]}, "outside the declared set"),
        ({"train.tsv": "sentence\tlabel\nhi\t1\nyo\t0\n", "dev.tsv": "sentence\tlabel\nok\t7\n"}, {},
         "outside the declared set"),
        ({"train.tsv": "sentence\tlabel\nhi\t1\t3\n"}, {}, "has 3 fields"),
        ({"train.jsonl": '{"text": "a", "label": 1}\n{oops\n'}, {}, "not valid JSON"),
        ({"train.txt": "EU NNP B-NP B-ORG\nrejects VBZ B-VP\n"}, {}, "has 3 fields but earlier lines have 4"),
        ({"train.txt": "EU NNP B-NP ORG\n"}, {"task": "token-classification"}, "not IOB2"),
        ({"notes.md": "hello"}, {}, "no train/dev/test files"),
    ],
)
def test_bad_data_gives_one_line_error(tmp_path, files, kwargs, message):
    folder = tmp_path / "data"
    folder.mkdir()
    for name, text in files.items():
        _write(folder / name, text)
    target = folder if files else tmp_path / "missing"
    with pytest.raises(SlimformerError, match=message) as err:
        load_task_data(target, **kwargs)
    assert "\n" not in str(err.value)


def test_conll_reader_and_first_subword_alignment(tmp_path):
    text = "-DOCSTART- -X- -X- O\n\nEU NNP B-NP B-ORG\nrejects VBZ B-VP O\nGermanophobia NNP B-NP B-MISC\n\n" \
           "Peter NNP B-NP B-PER\nBlackburn NNP I-NP I-PER\n"
    _write(tmp_path / "n" / "train.txt", text)
    _write(tmp_path / "n" / "test.txt", text)
    td = load_task_data(tmp_path / "n", tuning_fraction=0.01)
    assert td.type == TaskType.TOKEN_CLASSIFICATION
    assert td.label_names == ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-MISC", "I-MISC"]
    assert td.eval[0]["tokens"] == ["EU", "rejects", "Germanophobia"]
    tok = minilm_tokenizer()
    feats = encode(td, td.eval[:1], tok)
    labels = feats[0]["labels"]
    names = [td.label_names[x] for x in labels if x != -100]
    assert names == ["B-ORG", "O", "B-MISC"]  # one label per word, on its first sub-word only
    assert len(labels) > 5  # "germanophobia" splits into several sub-words, all but the first ignored


def test_wikitext_style_folder_is_causal_lm(tmp_path):
    _write(tmp_path / "w" / "valid.txt", " = Title = \n the cat sat on the mat .\n" * 20)
    _write(tmp_path / "w" / "test.txt", " = Other = \n a dog ran .\n" * 5)
    td = load_task_data(tmp_path / "w")
    assert td.type == TaskType.CAUSAL_LM
    assert td.eval[0]["text"].startswith(" = Other")
    assert td.train[0]["text"] and td.tuning[0]["text"]


def test_collate_pads_dynamically():
    td = tiny_ner_task()
    tok = minilm_tokenizer()
    feats = encode(td, td.train[:2], tok)
    batch = Collator(tok.pad_token_id)(feats)
    longest = max(len(f["input_ids"]) for f in feats)
    assert batch["input_ids"].shape == (2, longest)
    assert (batch["labels"] == -100).sum() > 0
    assert "word_ids" not in batch


def test_shared_sst2_and_conll_counts(shared_data):
    sst = load_task_data(Path(shared_data) / "sst2")
    # SST-2's training phrases come from parsed sentences: tuning takes 500 whole sentences, and their
    # phrases leave training.
    assert len(sst.tuning) == 500 and len(sst.eval) == 872
    assert 60000 < len(sst.train) < 67349 - 500
    spans = set()
    for e in sst.tuning:
        w = e["text"].split()
        assert len(w) >= 3
        spans.update(" ".join(w[a:b]) for a in range(len(w)) for b in range(a + 3, len(w) + 1))
    assert not any(e["text"] in spans for e in sst.train if len(e["text"].split()) >= 3)
    conll = load_task_data(Path(shared_data) / "conll2003")
    assert len(conll.train) + len(conll.tuning) == 14041 and len(conll.eval) == 3453
    assert conll.label_names == ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC"]


# --------------------------------------------------------------------------------------------------
# Carving the tuning split: documents stay whole
# --------------------------------------------------------------------------------------------------

DOC_SIZES = (3, 5, 2, 6, 4)  # sentences per document; 20 in all


def _conll_text(sizes, markers: bool = True) -> str:
    """A CoNLL file whose sentence i of document d reads "Doc<d> says <i> ." (tags O B-PER O O)."""
    parts = []
    for d, size in enumerate(sizes):
        if markers:
            parts.append("-DOCSTART- -X- -X- O\n")
        for i in range(size):
            parts.append(f"Doc{d} NNP B-NP B-PER\nsays VBZ B-VP O\n{i} CD B-NP O\n. . O O\n")
    return "\n".join(parts) + "\n"


def _old_carve(examples, fraction, max_size, seed):
    """The sentence-by-sentence carving as it was before documents were kept whole."""
    import random

    n = len(examples)
    n_tune = min(max_size, max(1, int(round(n * fraction)))) if n > 1 else 0
    order = list(range(n))
    random.Random(seed).shuffle(order)
    tune_idx = set(order[:n_tune])
    train = [e for i, e in enumerate(examples) if i not in tune_idx]
    return train, [e for i, e in enumerate(examples) if i in tune_idx]


def _doc_of(e) -> str:
    return e["tokens"][0]


def test_reader_numbers_documents(tmp_path):
    from slimformer.tasks import read_conll_file

    sents = read_conll_file(_write(tmp_path / "a.txt", "EU NNP B-NP B-ORG\n\n" + _conll_text((2, 1))))
    assert [s["doc"] for s in sents] == [0, 1, 1, 2]  # before the first marker: document 0
    plain = read_conll_file(_write(tmp_path / "b.txt", _conll_text((2, 1), markers=False)))
    assert [s["doc"] for s in plain] == [0, 1, 2]  # no markers: every sentence its own document


@pytest.mark.parametrize("seed", range(6))
def test_tuning_split_keeps_documents_whole(tmp_path, seed):
    _write(tmp_path / "d" / "train.txt", _conll_text(DOC_SIZES))
    _write(tmp_path / "d" / "test.txt", _conll_text((2,)))
    td = load_task_data(tmp_path / "d", tuning_fraction=0.2, seed=seed)  # 4 sentences wanted
    train_docs, tune_docs = {_doc_of(e) for e in td.train}, {_doc_of(e) for e in td.tuning}
    assert not train_docs & tune_docs  # no document is split between train and tuning
    assert len(train_docs | tune_docs) == len(DOC_SIZES) and len(td.train) + len(td.tuning) == sum(DOC_SIZES)
    assert len(td.tuning) >= 4 and td.train  # documents taken until the size is reached, never all of them
    assert len(td.tuning) < 4 + max(DOC_SIZES)  # it stops once the size is reached: over by less than a document
    again = load_task_data(tmp_path / "d", tuning_fraction=0.2, seed=seed)
    assert again.tuning == td.tuning and again.train == td.train  # same seed, same split


def test_seed_moves_the_document_split(tmp_path):
    _write(tmp_path / "d" / "train.txt", _conll_text(DOC_SIZES))
    splits = {tuple(sorted({_doc_of(e) for e in load_task_data(tmp_path / "d", tuning_fraction=0.2,
                                                                 seed=s).tuning})) for s in range(6)}
    assert len(splits) > 1


@pytest.mark.parametrize("text", [_conll_text(DOC_SIZES, markers=False),
                                  "-DOCSTART- -X- -X- O\n\n" + _conll_text(DOC_SIZES, markers=False)])
def test_without_documents_the_split_is_the_old_one(tmp_path, text):
    from slimformer.tasks import read_conll_file

    path = _write(tmp_path / "d" / "train.txt", text)  # no markers, or one marker: one document
    _write(tmp_path / "d" / "test.txt", _conll_text((2,)))
    for seed in range(4):
        td = load_task_data(tmp_path / "d", tuning_fraction=0.2, seed=seed)
        train, tuning = _old_carve(read_conll_file(path), 0.2, 2000, seed)
        assert td.tuning == tuning and td.train == train  # the same examples in the same order


def test_table_split_is_the_old_one(tmp_path):
    from slimformer.tasks import read_classification_file

    rows = "\n".join(f"sentence number {i}\t{i % 2}" for i in range(300))
    path = _write(tmp_path / "t" / "train.tsv", "sentence\tlabel\n" + rows + "\n")
    _write(tmp_path / "t" / "dev.tsv", "sentence\tlabel\nok\t1\nno\t0\n")
    examples, _ = read_classification_file(path, None, None)
    for seed in range(3):
        td = load_task_data(tmp_path / "t", seed=seed, max_tuning=10)
        train, tuning = _old_carve(examples, 0.05, 10, seed)
        assert td.tuning == tuning and td.train == train


def test_tuning_fingerprint_follows_the_tuning_split(tmp_path):
    _write(tmp_path / "d" / "train.txt", _conll_text(DOC_SIZES))
    _write(tmp_path / "d" / "test.txt", _conll_text((2,)))
    by_seed = {s: load_task_data(tmp_path / "d", tuning_fraction=0.2, seed=s) for s in range(6)}
    a = by_seed[0]
    fp = a.tuning_fingerprint()
    assert len(fp) == 12 and int(fp, 16) >= 0
    assert a.describe()["tuning_fingerprint"] == fp
    assert load_task_data(tmp_path / "d", tuning_fraction=0.2, seed=0).tuning_fingerprint() == fp
    for td in by_seed.values():  # another tuning split, another fingerprint
        assert (td.tuning_fingerprint() == fp) == (td.tuning == a.tuning)
    assert any(td.tuning != a.tuning for td in by_seed.values())
    # Scoring only a prefix of the tuning split (--max-eval-examples) is the same split: same fingerprint.
    short = load_task_data(tmp_path / "d", tuning_fraction=0.2, seed=0, max_eval_examples=1)
    assert len(short.tuning) == 1 and short.tuning_fingerprint() == fp
    # One changed tag in a tuning sentence changes it too.
    from slimformer.tasks import TaskData

    changed = [dict(e) for e in a.tuning]
    changed[0]["tags"] = ["O"] * len(changed[0]["tags"])
    assert TaskData(a.type, a.train, changed, a.eval).tuning_fingerprint() != \
        TaskData(a.type, a.train, list(a.tuning), a.eval).tuning_fingerprint() == fp


def _phrase_folder(folder: Path, n_sentences: int = 60) -> Path:
    """SST-2-like training data: every sentence comes with some of its phrases (as the treebank's parse
    does), plus single words; a separate dev file of sentences."""
    import random

    rng = random.Random(1)
    vocab = [f"w{i}" for i in range(400)]
    rows = []
    for k in range(n_sentences):
        sent = [f"s{k}"] + rng.sample(vocab, 9)  # a sentence's own first word keeps sentences distinct
        label = str(k % 2)
        rows.append((" ".join(sent), label))
        for _ in range(4):
            a = rng.randrange(0, len(sent) - 3)
            b = rng.randrange(a + 3, len(sent))
            rows.append((" ".join(sent[a:b]), label))
        rows.append((sent[3], label))  # a single word
    rng.shuffle(rows)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.tsv").write_text("sentence\tlabel\n" + "".join(f"{t}\t{lab}\n" for t, lab in rows))
    (folder / "dev.tsv").write_text("sentence\tlabel\ns0 w1 w2 w3\t0\ns1 w4 w5 w6\t1\n")
    return folder


def test_phrase_data_is_carved_by_whole_sentences(tmp_path):
    from slimformer.tasks import sentence_groups

    data = load_task_data(_phrase_folder(tmp_path / "phrases"))
    tuning = [e["text"] for e in data.tuning]
    # Tuning holds whole sentences only (each starts with its s<k> marker and has 10 words) ...
    assert tuning and all(t.startswith("s") and len(t.split()) == 10 for t in tuning)
    # ... at least MIN_TUNING_SENTENCES' share where there are few: max(5% of 60, min(500, 60 // 10)) = 6
    assert len(tuning) == 6
    # ... and no training example of 3+ words is a piece of one of them.
    for e in data.train:
        if len(e["text"].split()) >= 3:
            assert not any(f" {e['text']} " in f" {t} " for t in tuning), e["text"]
    # Single words always train, even when their sentence went to tuning.
    n_words = sum(1 for e in data.train if len(e["text"].split()) == 1)
    assert n_words == 60
    # Same seed, same split; another seed, another one.
    assert [e["text"] for e in load_task_data(tmp_path / "phrases").tuning] == tuning
    assert [e["text"] for e in load_task_data(tmp_path / "phrases", seed=1).tuning] != tuning
    # Data whose examples are not pieces of each other is not phrase-structured: the old split stands.
    assert sentence_groups([{"text": t} for t in ("a b c d", "e f g h", "a b c", "x y z w", "p q r s")]) is None
    assert sentence_groups([{"text": "a b c d"}, {"text": "b c d"}, {"text": "x y z"}]) == [0, 0, 2]


def test_repeated_sentences_land_on_one_side(tmp_path):
    from slimformer.tasks import _carve_sentences, sentence_groups

    ex = [{"text": f"s{k} a b c d", "label": "0"} for k in range(30)] * 2
    ex += [{"text": f"s{k} a b", "label": "0"} for k in range(30)]  # a phrase of each: phrase-structured
    group = sentence_groups(ex)
    assert group is not None
    train, tune = _carve_sentences(ex, group, 0.1, 2000, seed=0)
    assert not {e["text"] for e in tune} & {e["text"] for e in train}


def test_tuning_split_from_the_dev_file(tmp_path):
    d = tmp_path / "d"
    _write(d / "train.txt", _conll_text(DOC_SIZES))
    _write(d / "dev.txt", _conll_text((3, 2)))
    _write(d / "test.txt", _conll_text((2,)))
    carved = load_task_data(d, tuning_fraction=0.2)
    td = load_task_data(d, tuning_fraction=0.2, tuning_split="dev")
    assert len(td.train) == sum(DOC_SIZES) and len(td.tuning) == 5 and len(td.eval) == 2  # all of train
    assert td.describe()["tuning_source"].endswith("dev.txt") and td.eval_source.endswith("test.txt")
    assert carved.describe()["tuning_source"] == "carved from train"
    assert td.tuning_fingerprint() != carved.tuning_fingerprint()  # models trained either way are told apart
    assert load_task_data(d, tuning_fraction=0.2, tuning_split="carve").tuning == carved.tuning


def test_tuning_split_from_dev_refuses_what_cannot_work(tmp_path):
    d = tmp_path / "d"
    _write(d / "train.txt", _conll_text(DOC_SIZES))
    _write(d / "dev.txt", _conll_text((3,)))
    with pytest.raises(SlimformerError, match="dev file is the eval split"):
        load_task_data(d, tuning_split="dev")  # no test file: dev is scored, so it cannot also tune
    with pytest.raises(SlimformerError, match="unknown tuning split 'test'"):
        load_task_data(d, tuning_split="test")
    _write(d / "test.txt", _conll_text((2,)))
    (d / "dev.txt").unlink()
    with pytest.raises(SlimformerError, match="no dev file to tune on"):
        load_task_data(d, tuning_split="dev")
    with pytest.raises(SlimformerError, match="needs a data folder"):
        load_task_data("org/some-dataset", tuning_split="dev")
