"""Unlabeled transfer text for distillation: augmented copies of the training text.

A student learns the teacher's function best where it sees the teacher answer. Besides the labelled
examples, distillation can show it *unlabeled* text scored by the teacher alone (soft targets, no
hard label). Tang et al. (2019, "Distilling Task-Specific Knowledge from BERT into Simple Neural
Networks") make such text from the training set itself:

* each word is replaced by the mask token with probability ``p_mask``;
* otherwise by a word drawn from the corpus' word frequencies with probability ``p_swap`` (they swap
  within the part of speech; we draw from all words, which needs no tagger);
* then, with probability ``p_ngram``, only a random span of 1..``max_ngram`` words is kept.

The copies keep the training distribution's words and length while moving the inputs around the
points the teacher was trained on, which is where the student's decision boundary is least pinned down.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence


def augment_words(sentences: Sequence[Sequence[str]], copies: int, *, mask_token: str, seed: int = 0,
                  p_mask: float = 0.1, p_swap: float = 0.1, p_ngram: float = 0.25,
                  max_ngram: int = 5) -> list[list[str]]:
    """``copies`` augmented variants of every sentence (a list of words), in order; variants that come out
    identical to their source are dropped, so the result may be a little shorter than ``copies * len``."""
    rng = random.Random(seed)
    counts = Counter(w for s in sentences for w in s)
    vocab, weights = list(counts), list(counts.values())
    out: list[list[str]] = []
    for _ in range(copies):
        # Drawing the swap words in one batch per copy is much faster than one draw per word.
        pool = rng.choices(vocab, weights, k=sum(len(s) for s in sentences) + 1) if vocab else []
        pos = 0
        for words in sentences:
            new = []
            for w in words:
                r = rng.random()
                if r < p_mask:
                    new.append(mask_token)
                elif r < p_mask + p_swap:
                    new.append(pool[pos])
                else:
                    new.append(w)
                pos += 1
            if len(new) > 1 and rng.random() < p_ngram:
                n = rng.randint(1, min(max_ngram, len(new) - 1))
                start = rng.randint(0, len(new) - n)
                new = new[start:start + n]
            if new and new != list(words):
                out.append(new)
    return out
