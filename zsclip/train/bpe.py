"""Learning BPE merges from a caption corpus, for models trained from scratch on a narrow domain.

A model trained on a few thousand distinct caption words needs no 49,408-token table: a few hundred
merges learnt from its own captions give short token sequences and a small embedding matrix. The
merges feed `Tokenizer.from_merges`, so the id layout (bytes, bytes + </w>, merges, start, end) is
the standard one.
"""

from __future__ import annotations

import heapq
from collections import Counter, defaultdict
from typing import Iterable

from zsclip.core.tokenizer import (
    CONTEXT_LENGTH,
    EOT,
    SOT,
    Tokenizer,
    merge_pair,
    split_words,
    word_symbols,
)


def _pair_counts(words: list[list[str]], freqs: list[int]) -> tuple[dict, dict]:
    counts: dict[tuple[str, str], int] = defaultdict(int)
    where: dict[tuple[str, str], set[int]] = defaultdict(set)
    for i, (parts, freq) in enumerate(zip(words, freqs)):
        for pair in zip(parts, parts[1:]):
            counts[pair] += freq
            where[pair].add(i)
    return counts, where


def _apply_merge(
    pair: tuple[str, str], words: list[list[str]], freqs: list[int], counts: dict, where: dict
) -> set:
    """Merge `pair` in every word holding it, updating pair counts incrementally; returns the pairs
    touched."""
    touched = set()
    for i in where.pop(pair):
        old = words[i]
        new = merge_pair(old, *pair)
        old_pairs, new_pairs = list(zip(old, old[1:])), list(zip(new, new[1:]))
        for p in old_pairs:
            counts[p] -= freqs[i]
        for p in new_pairs:
            counts[p] += freqs[i]
        for p in set(old_pairs) - set(new_pairs):
            where[p].discard(i)
        for p in set(new_pairs) - set(old_pairs):
            where[p].add(i)
        touched.update(old_pairs, new_pairs)
        words[i] = new
    for p in touched:
        if counts[p] <= 0:
            del counts[p]
            where.pop(p, None)
    return touched


def train_bpe(
    texts: Iterable[str],
    vocab_size: int,
    *,
    min_frequency: int = 2,
    context_length: int = CONTEXT_LENGTH,
) -> Tokenizer:
    """Learn merges from a caption corpus: vocab_size = 512 + merges + 2.

    Same cleaning and pre-tokenisation as encoding. Each step merges the most frequent adjacent pair
    (ties go to the smallest pair in string order, so the result is deterministic); counts are
    updated incrementally. Stops early (a smaller vocabulary) when no pair occurs `min_frequency`
    times.
    """
    n_merges = vocab_size - 512 - 2
    if n_merges < 0:
        raise ValueError(
            f"vocab_size must be at least 514 (256 bytes x 2 + 2 specials), got {vocab_size}"
        )
    word_freqs: Counter[str] = Counter()
    for text, count in Counter(texts).items():  # captions repeat: clean each distinct one once
        for word in split_words(text):
            if word not in (SOT, EOT):
                word_freqs[word] += count
    words = [word_symbols(w) for w in word_freqs]
    freqs = list(word_freqs.values())
    counts, where = _pair_counts(words, freqs)
    heap = [(-c, p) for p, c in counts.items()]
    heapq.heapify(heap)
    merges: list[tuple[str, str]] = []
    while heap and len(merges) < n_merges:
        negative, pair = heapq.heappop(heap)
        if counts.get(pair) != -negative:
            continue  # stale entry: the count changed since it was pushed
        if -negative < min_frequency:
            break
        merges.append(pair)
        for p in _apply_merge(pair, words, freqs, counts, where):
            if p in counts:
                heapq.heappush(heap, (-counts[p], p))
    return Tokenizer.from_merges(merges, context_length)
