"""Corpus-level caption metrics (BLEU-1..4 and CIDEr-D), computed as the COCO caption evaluation does.

Written from the definitions (Papineni et al. 2002; Vedantam et al. 2015) so that scores are
comparable with published COCO numbers without Java or the COCO toolkit at training time; the
tests check them against pycocoevalcap's `Bleu` and `Cider` scorers.

Captions are token lists (see `tokenize`); `references[i]` holds the reference captions of the
image that `candidates[i]` describes.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

Tokens = Sequence[str]
NGram = tuple[str, ...]

_WORD = re.compile(r"[^\W\d_]+")  # a run of letters (any script): digits, punctuation and "_" split words


def tokenize(caption: str) -> list[str]:
    """Lower-cased runs of letters: a stand-in for the COCO PTB tokenizer that needs no Java."""
    return _WORD.findall(caption.lower())


def _ngram_counts(tokens: Tokens, max_n: int) -> Counter[NGram]:
    """Counts of every n-gram of order 1..max_n, all orders in one counter (the order is len(key))."""
    return Counter(tuple(tokens[i : i + n]) for n in range(1, max_n + 1) for i in range(len(tokens) - n + 1))


def _check_corpus(candidates: Sequence[Tokens], references: Sequence[Sequence[Tokens]]) -> None:
    assert len(candidates) == len(references), f"{len(candidates)} candidates for {len(references)} images"
    assert len(candidates) > 0, "a metric of an empty corpus is undefined"
    assert all(len(refs) > 0 for refs in references), "every image needs at least one reference"


def bleu(candidates: Sequence[Tokens], references: Sequence[Sequence[Tokens]], max_n: int = 4) -> list[float]:
    """Corpus BLEU-1..max_n: clipped n-gram precisions and lengths summed over the corpus, then combined.

    Summing before dividing (rather than averaging sentence scores) is what makes it a corpus
    metric. Each candidate n-gram counts at most as often as it occurs in any one reference
    (clipping), so repeating a right word earns nothing. The brevity penalty uses, per image,
    the reference length closest to the candidate's (the shorter one on a tie), as COCO does.
    BLEU-n is the geometric mean of the precisions of orders 1..n times that penalty; it is 0
    when some order has no match (pycocoevalcap adds 1e-15 there and reports a tiny score, ~1e-5).
    """
    _check_corpus(candidates, references)
    correct, possible = [0] * max_n, [0] * max_n
    candidate_length = reference_length = 0
    for candidate, refs in zip(candidates, references, strict=True):
        max_ref_counts: Counter[NGram] = Counter()
        for ref in refs:
            max_ref_counts |= _ngram_counts(ref, max_n)  # `|` keeps the larger count
        for ngram, count in _ngram_counts(candidate, max_n).items():
            correct[len(ngram) - 1] += min(count, max_ref_counts[ngram])
        for n in range(1, max_n + 1):
            possible[n - 1] += max(0, len(candidate) - n + 1)
        candidate_length += len(candidate)
        reference_length += min((len(ref) for ref in refs), key=lambda n: (abs(n - len(candidate)), n))

    if candidate_length >= reference_length:
        brevity_penalty = 1.0
    else:  # reference_length > 0 here; an empty candidate corpus matches nothing and scores 0 below
        brevity_penalty = math.exp(1.0 - reference_length / candidate_length) if candidate_length else 0.0

    scores, log_precision_sum = [], 0.0
    for n in range(1, max_n + 1):
        if correct[n - 1] == 0:  # then every higher order's geometric mean is 0 too
            scores.extend([0.0] * (max_n - n + 1))
            break
        log_precision_sum += math.log(correct[n - 1] / possible[n - 1])
        scores.append(brevity_penalty * math.exp(log_precision_sum / n))
    return scores


def cider_d(
    candidates: Sequence[Tokens],
    references: Sequence[Sequence[Tokens]],
    sigma: float = 6.0,
    max_n: int = 4,
) -> float:
    """CIDEr-D: consensus of a candidate with an image's references in TF-IDF n-gram space, times 10.

    The IDF of an n-gram is log(images / images whose references contain it), over this corpus's
    references: n-grams every caption uses ("a", "of the") carry no weight, so a single-image
    corpus scores 0. Per order n, a candidate's similarity to one reference is the cosine of
    their TF-IDF vectors with the candidate's weights clipped at the reference's (the "-D"
    guard against repeating words), damped by exp(-(length difference)^2 / (2 sigma^2)) (the
    guard against over-long or short captions). The score of an image is 10 times the mean over
    orders and references; the corpus score is the mean over images, as in pycocoevalcap's `Cider`.
    """
    _check_corpus(candidates, references)
    reference_counts = [[_ngram_counts(ref, max_n) for ref in refs] for refs in references]
    document_frequency: Counter[NGram] = Counter()
    for counts in reference_counts:
        document_frequency.update(set().union(*counts))
    log_images = math.log(len(references))

    def tfidf(counts: Counter[NGram]) -> tuple[list[dict[NGram, float]], list[float]]:
        """Per order, the TF-IDF vector and its norm; n-grams no reference has get the full IDF."""
        vectors: list[dict[NGram, float]] = [{} for _ in range(max_n)]
        for ngram, count in counts.items():
            idf = log_images - math.log(max(1, document_frequency[ngram]))
            vectors[len(ngram) - 1][ngram] = count * idf
        norms = [math.sqrt(sum(w * w for w in vector.values())) for vector in vectors]
        return vectors, norms

    image_scores = []
    for candidate, refs, counts in zip(candidates, references, reference_counts, strict=True):
        candidate_vectors, candidate_norms = tfidf(_ngram_counts(candidate, max_n))
        similarity = 0.0
        for ref, ref_counts in zip(refs, counts, strict=True):
            ref_vectors, ref_norms = tfidf(ref_counts)
            # pycocoevalcap measures length in bigrams, max(0, tokens - 1): the same difference
            # whenever both captions are non-empty, and an empty one has similarity 0 anyway.
            penalty = math.exp(-((len(candidate) - len(ref)) ** 2) / (2 * sigma**2))
            for c_vector, c_norm, r_vector, r_norm in zip(
                candidate_vectors, candidate_norms, ref_vectors, ref_norms, strict=True
            ):
                if c_norm == 0 or r_norm == 0:  # no weighted n-gram of this order on one side
                    continue
                dot = sum(min(w, r_vector.get(g, 0.0)) * r_vector.get(g, 0.0) for g, w in c_vector.items())
                similarity += penalty * dot / (c_norm * r_norm)
        image_scores.append(10.0 * similarity / (max_n * len(refs)))
    return sum(image_scores) / len(image_scores)
