"""Tokenizers for a pruned vocabulary that split unseen words into kept pieces instead of reading [UNK].

Vocabulary pruning keeps the token ids a corpus uses (see :mod:`slimformer.surgery`). Text outside that
corpus, e.g. a dev sentence with a word the training data never had, then meets tokens the model no longer
has. Mapping them to [UNK] loses the word; a WordPiece tokenizer can do better: restricted to the kept
vocabulary, its greedy longest-match splits the word into smaller kept pieces, down to single characters
when the kept set holds them (:func:`fallback_token_ids` adds them; a few hundred rows).

On text whose base tokens are all kept, the restricted tokenizer gives exactly the base ids remapped
(greedy longest-match picks the same longest kept prefix), so vocabulary pruning stays lossless there.
Other tokenizer models (BPE, Unigram) have no such fallback: :func:`restricted_tokenizer` returns ``None``
and callers keep the [UNK] mapping.
"""

from __future__ import annotations

import copy
import json
import string
import unicodedata
from collections.abc import Iterable, Sequence
from typing import Any

_ALWAYS = string.ascii_lowercase + string.ascii_uppercase + string.digits + string.punctuation


def _wordpiece(tokenizer: Any) -> dict[str, Any] | None:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    spec = json.loads(backend.to_str())
    return spec if spec.get("model", {}).get("type") == "WordPiece" else None


def fallback_token_ids(tokenizer: Any, texts: Iterable[str] | Iterable[list[str]] = ()) -> list[int]:
    """Ids of the single-character pieces (``x`` and ``##x``) of every character in ``texts`` plus printable
    ASCII, so a restricted WordPiece tokenizer can spell any word made of them. Empty for non-WordPiece."""
    if hasattr(tokenizer, "to_new") and hasattr(tokenizer, "base_tokenizer"):  # already pruned: current ids
        return sorted(set(tokenizer.to_new(fallback_token_ids(tokenizer.base_tokenizer, texts))))
    spec = _wordpiece(tokenizer)
    if spec is None:
        return []
    prefix = spec["model"].get("continuing_subword_prefix", "##")
    lower = bool((spec.get("normalizer") or {}).get("lowercase", False))
    chars = set(_ALWAYS)
    for t in texts:
        chars.update("".join(t) if isinstance(t, list) else t)
    if lower:
        chars = {c.lower() for c in chars}
    # Accent stripping may apply in the normalizer: keep the base letters of accented characters too.
    chars |= {unicodedata.normalize("NFD", c)[0] for c in chars if c.strip()}
    vocab = spec["model"]["vocab"]
    ids = {vocab[p + c] for c in chars for p in ("", prefix) if p + c in vocab}
    return sorted(int(i) for i in ids)


def restricted_tokenizer(tokenizer: Any, kept_ids: Sequence[int]) -> Any | None:
    """A copy of a WordPiece ``tokenizer`` that knows only ``kept_ids``, numbered by their rank (the new id
    of a kept token, as in vocabulary pruning). ``None`` when the tokenizer is not WordPiece or a special
    token was not kept."""
    spec = _wordpiece(tokenizer)
    if spec is None or not hasattr(tokenizer, "_tokenizer"):
        return None
    from tokenizers import Tokenizer

    kept = sorted(int(i) for i in kept_ids)
    new_of_old = {old: new for new, old in enumerate(kept)}
    token_of = {int(i): t for t, i in spec["model"]["vocab"].items()}
    specials = [int(i) for i in getattr(tokenizer, "all_special_ids", []) or []]
    if any(i not in new_of_old for i in specials) or any(i not in token_of for i in kept):
        return None
    spec["model"]["vocab"] = {token_of[old]: new for old, new in new_of_old.items()}
    spec["added_tokens"] = [dict(a, id=new_of_old[a["id"]]) for a in spec.get("added_tokens") or []
                            if a["id"] in new_of_old]
    post = spec.get("post_processor") or {}
    for entry in (post.get("special_tokens") or {}).values():
        entry["ids"] = [new_of_old[i] for i in entry["ids"]]
    for key in ("cls", "sep"):  # BertProcessing / RobertaProcessing store [token, id] pairs
        if isinstance(post.get(key), list):
            post[key] = [post[key][0], new_of_old[post[key][1]]]
    restricted = copy.copy(tokenizer)
    restricted._tokenizer = Tokenizer.from_str(json.dumps(spec))
    return restricted


__all__ = ["fallback_token_ids", "restricted_tokenizer"]
