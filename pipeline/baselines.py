"""Count-based language models on the pretraining tokenization, to put the model's held-out perplexity in scale.

- unigram: add-one (Laplace) smoothed token frequencies, no context;
- 3-gram: interpolated Kneser-Ney with one absolute discount D per order (Chen & Goodman 1998, eq. 4 and 9).

Both are scored on exactly the positions the transformer is scored on: every token of a packed held-out block
but the first, with context taken from inside the block (a 3-gram at the block's second token sees one token).
Everything is vectorised with numpy: an n-gram is one int64 key (u * V + v) * V + w, counted with `np.unique`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

DISCOUNT = 0.75  # the usual single Kneser-Ney discount (Chen & Goodman 1998, section 3)


def ngram_windows(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(u, v, w) for every scored position of `blocks` [n, T]: w = block[i], v = block[i-1], u = block[i-2] or -1."""
    blocks = np.asarray(blocks, dtype=np.int64)
    w = blocks[:, 1:]
    v = blocks[:, :-1]
    u = np.concatenate([np.full((blocks.shape[0], 1), -1, dtype=np.int64), blocks[:, :-2]], axis=1)
    return u.reshape(-1), v.reshape(-1), w.reshape(-1)


def perplexity(probs: np.ndarray) -> float:
    """exp of the mean negative log-probability."""
    return float(math.exp(-np.mean(np.log(probs))))


def unigram_probs(stream: np.ndarray, vocab_size: int) -> np.ndarray:
    """P(w) = (c(w) + 1) / (N + V) for every token id."""
    counts = np.bincount(np.asarray(stream, dtype=np.int64), minlength=vocab_size).astype(np.float64)
    return (counts + 1.0) / (counts.sum() + vocab_size)


def _group(keys: np.ndarray, sorted_unique: np.ndarray, values: np.ndarray) -> np.ndarray:
    """values[i] where sorted_unique[i] == key, else 0 (vectorised lookup)."""
    if sorted_unique.size == 0:
        return np.zeros(keys.shape, dtype=values.dtype)
    index = np.clip(np.searchsorted(sorted_unique, keys), 0, sorted_unique.size - 1)
    return np.where(sorted_unique[index] == keys, values[index], 0)


@dataclass
class KneserNey3:
    """An interpolated Kneser-Ney 3-gram model; build it with `fit_kneser_ney`."""

    vocab_size: int
    discount: float
    tri_keys: np.ndarray  # sorted unique (u, v, w) keys and their counts c(uvw)
    tri_counts: np.ndarray
    ctx_keys: np.ndarray  # sorted unique (u, v) and c(uv.), N1+(uv.)
    ctx_counts: np.ndarray
    ctx_types: np.ndarray
    bi_keys: np.ndarray  # sorted unique (v, w) seen as the end of a 3-gram, N1+(.vw)
    bi_cont: np.ndarray
    mid_total: np.ndarray  # per v: sum_w N1+(.vw), and N1+(v.) among those
    mid_types: np.ndarray
    uni_cont: np.ndarray  # per w: N1+(.w) over bigram types
    uni_total: int

    def probs(self, u: np.ndarray, v: np.ndarray, w: np.ndarray) -> np.ndarray:
        """P(w | u v) for arrays of ids; u = -1 means no second context token (the bigram level answers)."""
        V, D = self.vocab_size, self.discount
        u, v, w = (np.asarray(a, dtype=np.int64) for a in (u, v, w))
        seen_types = float(np.count_nonzero(self.uni_cont))
        p1 = (np.maximum(self.uni_cont[w] - D, 0.0) + D * seen_types / V) / self.uni_total

        cont = _group(v * V + w, self.bi_keys, self.bi_cont).astype(np.float64)
        total, types = self.mid_total[v].astype(np.float64), self.mid_types[v].astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            p2 = np.where(total > 0, (np.maximum(cont - D, 0.0) + D * types * p1) / total, p1)

        has_u = u >= 0
        safe_u = np.where(has_u, u, 0)
        count = _group((safe_u * V + v) * V + w, self.tri_keys, self.tri_counts).astype(np.float64)
        ctx = _group(safe_u * V + v, self.ctx_keys, self.ctx_counts).astype(np.float64)
        ctx_types = _group(safe_u * V + v, self.ctx_keys, self.ctx_types).astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            p3 = np.where(has_u & (ctx > 0), (np.maximum(count - D, 0.0) + D * ctx_types * p2) / ctx, p2)
        return p3


def fit_kneser_ney(stream: np.ndarray, vocab_size: int, discount: float = DISCOUNT) -> KneserNey3:
    """Count the 3-grams and 2-grams of a token stream into an interpolated Kneser-Ney model."""
    s = np.asarray(stream, dtype=np.int64)
    if s.size < 3:
        raise ValueError("a 3-gram model needs at least 3 training tokens")
    V = vocab_size
    tri_keys, tri_counts = np.unique((s[:-2] * V + s[1:-1]) * V + s[2:], return_counts=True)
    ctx_of_tri = tri_keys // V
    ctx_keys, first, ctx_types = np.unique(ctx_of_tri, return_index=True, return_counts=True)
    ctx_counts = np.add.reduceat(tri_counts, first)
    # Middle order: continuation counts N1+(.vw) = distinct u before (v, w).
    bi_keys, bi_cont = np.unique(tri_keys % (V * V), return_counts=True)
    mid_total = np.bincount(bi_keys // V, weights=bi_cont, minlength=V)
    mid_types = np.bincount(bi_keys // V, minlength=V)
    # Lowest order: N1+(.w) = distinct v before w, over all bigram types.
    bigram_types = np.unique(s[:-1] * V + s[1:])
    uni_cont = np.bincount(bigram_types % V, minlength=V).astype(np.float64)
    return KneserNey3(
        vocab_size=V,
        discount=discount,
        tri_keys=tri_keys,
        tri_counts=tri_counts,
        ctx_keys=ctx_keys,
        ctx_counts=ctx_counts,
        ctx_types=ctx_types,
        bi_keys=bi_keys,
        bi_cont=bi_cont,
        mid_total=mid_total,
        mid_types=mid_types,
        uni_cont=uni_cont,
        uni_total=int(bigram_types.size),
    )


def baseline_perplexities(train_blocks: np.ndarray, eval_blocks: np.ndarray, vocab_size: int) -> dict[str, float]:
    """Held-out perplexity of the unigram and the 3-gram model, trained on the concatenated train blocks."""
    stream = np.asarray(train_blocks, dtype=np.int64).reshape(-1)
    u, v, w = ngram_windows(eval_blocks)
    unigram = unigram_probs(stream, vocab_size)[w]
    trigram = fit_kneser_ney(stream, vocab_size).probs(u, v, w)
    return {"unigram_perplexity": perplexity(unigram), "trigram_perplexity": perplexity(trigram)}
