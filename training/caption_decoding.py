"""Greedy and beam-search decoding of the captioner in torch, for evaluation.

The server decodes with its own beam search on onnxruntime; this one is the reference the
evaluation table is computed with, and the export's parity check compares greedy captions of
both. Both keep a caption from saying one word more often than the grammar ever does
(`max_repeats` in the model's config): a model that does not recognise an image otherwise tends to
say one word over and over ("large large large ...") until the length runs out.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from training.models.butd import BottomUpTopDown
from training.models.captioner import END, START, Captioner, DecoderState

#: Both captioners: an encoder and a decoder with the show-attend-tell step interface.
CaptionModel = Captioner | BottomUpTopDown


@dataclass(frozen=True)
class Hypothesis:
    tokens: tuple[int, ...]  # words only: no <start>, no <end>
    log_prob: float


def words(tokens: tuple[int, ...] | list[int], vocabulary: list[str]) -> str:
    """Token ids -> the caption text."""
    return " ".join(vocabulary[t] for t in tokens)


def repeat_mask(histories: Sequence[Sequence[int]], vocabulary: int, max_repeats: int | None) -> torch.Tensor:
    """(rows, V): 0, or -inf for each word its row's caption already says `max_repeats` times."""
    mask = torch.zeros(len(histories), vocabulary)
    if max_repeats is None:
        return mask
    for row, tokens in enumerate(histories):
        for word, count in Counter(tokens).items():
            if count >= max_repeats:
                mask[row, word] = float("-inf")
    return mask


@torch.no_grad()
def greedy_decode(model: CaptionModel, images: torch.Tensor, batch_size: int = 256) -> list[list[int]]:
    """The most likely word at every step, for a batch of uint8 images; stops at <end> or max_length."""
    model.eval()
    limit = model.config.max_repeats
    out: list[list[int]] = []
    for start in range(0, len(images), batch_size):
        features = model.encoder(images[start : start + batch_size])
        projected, state = model.decoder.prepare(features)
        tokens = torch.full((len(features),), START, dtype=torch.long)
        captions = [[] for _ in range(len(features))]
        done = torch.zeros(len(features), dtype=torch.bool)
        for _ in range(model.config.max_length):  # at most max_length words, then <end> or stop
            logits, state, _ = model.decoder.step(tokens, state, features, projected)
            tokens = (logits + repeat_mask(captions, logits.shape[1], limit)).argmax(dim=1)
            for i in torch.nonzero(~done & (tokens != END)).flatten().tolist():
                captions[i].append(int(tokens[i]))
            done |= tokens == END
            if bool(done.all()):
                break
        out.extend(captions)
    return out


@torch.no_grad()
def beam_search(model: CaptionModel, image: torch.Tensor, beam_size: int) -> list[Hypothesis]:
    """The `beam_size` best captions of one uint8 image (3, H, W), best first, by total log-probability.

    At each step every live hypothesis is extended by every word, the best `beam_size` of all
    extensions are kept, and those ending in <end> are set aside; the search stops when the
    beam is empty or the best live hypothesis can no longer beat the worst finished one. A word
    that a hypothesis already says `max_repeats` times cannot extend it.
    """
    model.eval()
    features = model.encoder(image.unsqueeze(0))  # (1, L, D)
    projected, state = model.decoder.prepare(features)
    live: list[Hypothesis] = [Hypothesis((), 0.0)]
    finished: list[Hypothesis] = []
    tokens = torch.tensor([START])
    for length in range(model.config.max_length + 1):
        n = len(live)
        logits, state, _ = model.decoder.step(
            tokens, state, features.expand(n, -1, -1), projected.expand(n, -1, -1)
        )
        scores = F.log_softmax(logits, dim=1) + torch.tensor([h.log_prob for h in live]).unsqueeze(1)
        scores = scores + repeat_mask([h.tokens for h in live], scores.shape[1], model.config.max_repeats)
        if length == model.config.max_length:  # out of room: only <end> may follow
            mask = torch.full_like(scores, float("-inf"))
            mask[:, END] = 0.0
            scores = scores + mask
        best = torch.topk(scores.flatten(), k=min(beam_size, scores.numel()))
        next_live, keep, next_tokens = [], [], []
        for score, index in zip(best.values.tolist(), best.indices.tolist(), strict=True):
            row, word = divmod(index, scores.shape[1])
            if word == END:
                finished.append(Hypothesis(live[row].tokens, score))
            else:
                next_live.append(Hypothesis((*live[row].tokens, word), score))
                keep.append(row)
                next_tokens.append(word)
        finished.sort(key=lambda h: h.log_prob, reverse=True)
        enough = len(finished) >= beam_size
        if not next_live or (enough and next_live[0].log_prob <= finished[beam_size - 1].log_prob):
            break
        live = next_live
        index = torch.tensor(keep)
        state = DecoderState(state.h[index], state.c[index])
        tokens = torch.tensor(next_tokens)
    return finished[:beam_size]
