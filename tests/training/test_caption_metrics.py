"""Caption metrics: hand-computed BLEU and CIDEr-D cases, then agreement with pycocoevalcap."""

from __future__ import annotations

import math
import random

import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider

from training.caption_metrics import bleu, cider_d, tokenize


def words(*captions: str) -> list[list[str]]:
    return [caption.split() for caption in captions]


def test_tokenize_lowercases_and_splits_on_non_letters() -> None:
    assert tokenize("A man's  bike, 2 Wheels!") == ["a", "man", "s", "bike", "wheels"]
    assert tokenize("Café_au-lait") == ["café", "au", "lait"]
    assert tokenize(" 42 ") == []


# --- BLEU ---


def test_bleu_identical_candidate_and_reference_is_one() -> None:
    captions = words("a dog runs on the beach", "two cats sleep on a red sofa")
    assert bleu(captions, [[c] for c in captions]) == pytest.approx([1.0] * 4, abs=1e-12)


def test_bleu_small_example_by_hand() -> None:
    # unigrams 5/6 (not "the"), bigrams 3/5, trigrams 2/4, 4-grams 1/3; equal lengths: no penalty
    scores = bleu(words("a cat sat on the mat"), [words("a cat sat on a mat")])
    expected = [
        5 / 6,
        math.sqrt(5 / 6 * 3 / 5),
        (5 / 6 * 3 / 5 * 2 / 4) ** (1 / 3),
        (1 / 4 * 1 / 3) ** (1 / 4),
    ]
    assert scores == pytest.approx(expected, abs=1e-12)


def test_bleu_clips_counts_at_the_most_in_any_one_reference() -> None:
    # Papineni et al.'s example: "the" is in each reference at most twice, so 2 of 7 count
    candidate = words("the the the the the the the")
    references = [words("the cat is on the mat", "there is a cat on the mat")]
    assert bleu(candidate, references, max_n=1) == pytest.approx([2 / 7], abs=1e-12)


def test_bleu_brevity_penalty() -> None:
    # all n-grams right but 2 words for 6: exp(1 - 6/2); no trigram at all: 0
    assert bleu(words("a cat"), [words("a cat sat on the mat")]) == pytest.approx(
        [math.exp(-2), math.exp(-2), 0.0, 0.0], abs=1e-12
    )


def test_bleu_brevity_penalty_uses_the_closest_reference_length() -> None:
    candidate = words("a b c d")
    # 4 words, references of 3 and 6: the closest is 3, so no penalty (the average 4.5 would give one)
    assert bleu(candidate, [words("a b c", "a b c d e f")], max_n=1) == [1.0]
    # references of 3 and 5 are equally close: the shorter wins, as in pycocoevalcap
    assert bleu(candidate, [words("a b c", "a b c d e")], max_n=1) == [1.0]
    assert bleu(candidate, [words("a b c d e")], max_n=1) == pytest.approx([math.exp(1 - 5 / 4)])


def test_bleu_sums_counts_over_the_corpus() -> None:
    # 2 of 4 unigrams match over the corpus: 0.5, not the mean of per-image scores (1 and 0)
    scores = bleu(words("a b", "c d"), [words("a b"), words("e f")], max_n=2)
    assert scores == pytest.approx([0.5, math.sqrt(0.5 * 1 / 2)], abs=1e-12)


def test_bleu_order_without_matches_is_zero() -> None:
    assert bleu(words("a b c d"), [words("a b x c d")]) == pytest.approx(
        [1.0 * math.exp(1 - 5 / 4), math.sqrt(2 / 3) * math.exp(1 - 5 / 4), 0.0, 0.0]
    )


def test_bleu_rejects_mismatched_corpora() -> None:
    with pytest.raises(AssertionError, match="2 candidates for 1 images"):
        bleu(words("a", "b"), [words("a")])
    with pytest.raises(AssertionError, match="at least one reference"):
        bleu(words("a"), [[]])


# --- CIDEr-D ---


def test_cider_d_identical_caption_with_its_own_ngrams_is_ten() -> None:
    # n-grams of each reference occur in no other image: every IDF is log 2, every cosine 1
    captions = words("a dog runs on the beach", "two cats sleep near some red sofa")
    assert cider_d(captions, [[c] for c in captions]) == pytest.approx(10.0, abs=1e-12)


def test_cider_d_of_a_single_image_is_zero() -> None:
    # every reference n-gram occurs in all (one) images: IDF 0
    assert cider_d(words("a dog"), [words("a dog")]) == 0.0


def test_cider_d_small_example_by_hand() -> None:
    # image 1: "a a" against "a": unigram TF-IDF (2w) vs (w), clipped dot w*w over 2w*w = 1/2; no
    #   bigram in the reference: 0; mean over 4 orders times 10 = 1.25; lengths 2 vs 1 damp it
    # image 2: "b" against "b": unigram cosine 1, no bigrams: 10 / 4 = 2.5
    score = cider_d(words("a a", "b"), [words("a"), words("b")])
    assert score == pytest.approx((1.25 * math.exp(-1 / 72) + 2.5) / 2, abs=1e-12)


def test_cider_d_averages_over_references_and_ignores_common_ngrams() -> None:
    # image 1 matches one of its two references: (2.5 + 0) / 2; image 2: 2.5
    assert cider_d(words("a", "b"), [words("a", "c"), words("b")]) == pytest.approx(1.875, abs=1e-12)
    # "x" is in every image's references: IDF 0, so matching it is worth nothing
    assert cider_d(words("x", "x"), [words("x a"), words("x b")]) == 0.0


def test_cider_d_length_penalty_uses_sigma() -> None:
    candidates, references = words("a b", "c"), [words("a b c d e f g h i j k l"), words("c")]
    assert cider_d(candidates, references, sigma=1.0) < cider_d(candidates, references, sigma=6.0)


# --- agreement with the COCO caption evaluation (pycocoevalcap, pure Python for these two) ---


def random_corpus(seed: int, images: int) -> tuple[list[list[str]], list[list[list[str]]]]:
    """Small vocabularies so that n-grams repeat across images (non-trivial IDF and clipping)."""
    rng = random.Random(seed)
    vocabulary = [f"w{i}" for i in range(rng.randint(4, 8))]

    def caption() -> list[str]:
        return rng.choices(vocabulary, k=rng.randint(1, 14))

    candidates = [caption() for _ in range(images)]
    references = [[caption() for _ in range(rng.randint(1, 5))] for _ in range(images)]
    return candidates, references


def coco_format(candidates, references) -> tuple[dict, dict]:
    """pycocoevalcap's input: {image id: [reference strings]}, {image id: [the candidate string]}."""
    gts = {i: [" ".join(ref) for ref in refs] for i, refs in enumerate(references)}
    res = {i: [" ".join(candidate)] for i, candidate in enumerate(candidates)}
    return gts, res


@pytest.mark.parametrize(("seed", "images"), [(1, 3), (2, 5), (1, 10), (2, 40), (3, 40), (4, 150)])
def test_matches_pycocoevalcap(seed: int, images: int) -> None:
    candidates, references = random_corpus(seed, images)
    gts, res = coco_format(candidates, references)

    expected_bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    expected_cider, _ = Cider().compute_score(gts, res)

    assert min(expected_bleu) > 1e-3, "a corpus with an order without matches would test the 1e-15 only"
    assert bleu(candidates, references) == pytest.approx(expected_bleu, abs=1e-6)
    assert cider_d(candidates, references) == pytest.approx(float(expected_cider), abs=1e-6)


def test_matches_pycocoevalcap_with_empty_and_one_word_captions() -> None:
    """Its CIDEr measures length in bigrams; that must not matter for captions of 0 or 1 words."""
    candidates = words("a", "", "b c", "a b c d", "c")
    references = [words("a", "a b"), words("b"), words("", "b c"), words("a b c d e", "d"), words("c", "")]
    gts, res = coco_format(candidates, references)

    expected_bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    expected_cider, _ = Cider().compute_score(gts, res)

    assert bleu(candidates, references) == pytest.approx(expected_bleu, abs=1e-6)
    assert cider_d(candidates, references) == pytest.approx(float(expected_cider), abs=1e-6)


def test_differs_from_pycocoevalcap_only_where_an_order_has_no_match() -> None:
    """It adds 1e-15 to every match count, so an order without any match scores about 1e-5, not 0."""
    candidates, references = random_corpus(0, 3)  # no 4-gram of a candidate is in its references
    expected_bleu, _ = Bleu(4).compute_score(*coco_format(candidates, references), verbose=0)

    ours = bleu(candidates, references)
    assert ours[:3] == pytest.approx(expected_bleu[:3], abs=1e-6)
    assert ours[3] == 0.0
    assert 0 < expected_bleu[3] < 1e-4
