"""Pruned-vocabulary tokenizers: exact on kept text, and words outside the corpus spelled in kept pieces."""

import torch

from slimformer.surgery import corpus_token_ids, prune_vocab, set_plan, wrap_tokenizer
from slimformer.testing import minilm_tokenizer, tiny_bert
from slimformer.vocab import fallback_token_ids, restricted_tokenizer

CORPUS = ["a charming and often affecting journey", "the worst script in years", "boring and far too long"]


def test_restricted_tokenizer_equals_remapped_base_ids_on_kept_text():
    tok = minilm_tokenizer()
    kept = corpus_token_ids(tok, CORPUS)
    wrapped = wrap_tokenizer(tok, kept)
    for text in CORPUS + ["the journey too long", "charming and boring"]:
        want = wrapped.to_new(tok(text)["input_ids"])
        assert wrapped(text)["input_ids"] == want
    assert len(wrapped) == len(kept) and wrapped.cls_token_id == kept.index(tok.cls_token_id)


def test_fallback_pieces_spell_unseen_words_instead_of_unk():
    tok = minilm_tokenizer()
    kept = sorted(set(corpus_token_ids(tok, CORPUS)) | set(fallback_token_ids(tok, CORPUS)))
    wrapped = wrap_tokenizer(tok, kept)
    ids = wrapped("a xylophone, zany!")["input_ids"]
    assert wrapped.unk_token_id not in ids
    assert wrapped.decode(ids, skip_special_tokens=True).replace(" ", "") == "axylophone,zany!"
    # Without the single-character pieces the same words are lost.
    bare = wrap_tokenizer(tok, corpus_token_ids(tok, CORPUS))
    assert bare.unk_token_id in bare("a xylophone, zany!")["input_ids"]


def test_fallback_adds_only_single_character_pieces():
    tok = minilm_tokenizer()
    pieces = tok.convert_ids_to_tokens(fallback_token_ids(tok, ["héllo ωmega"]))
    assert all(len(p.removeprefix("##")) == 1 for p in pieces)
    assert {"e", "##e", "ω", "##ω", "z", "##z", "!"} <= set(pieces)
    assert len(pieces) < 300


def test_pruned_model_reads_unseen_words_and_stays_exact_on_kept_text():
    slim = tiny_bert(seed=3)
    enc = slim.tokenizer(CORPUS, padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = slim.model(**enc).logits
    kept = sorted(set(corpus_token_ids(slim.tokenizer, CORPUS)) | set(fallback_token_ids(slim.tokenizer, CORPUS)))
    set_plan(slim, prune_vocab(slim.model, kept))
    enc = slim.tokenizer(CORPUS, padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(slim.model(**enc).logits, ref)
    assert slim.tokenizer.unk_token_id not in slim.tokenizer("quixotic zebra")["input_ids"]


def test_non_wordpiece_tokenizer_has_no_restriction():
    class NotATokenizer:
        all_special_ids: list[int] = []

    assert restricted_tokenizer(NotATokenizer(), [0, 1]) is None
    assert fallback_token_ids(NotATokenizer(), ["abc"]) == []
