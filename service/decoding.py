"""Server-side beam search for captioners, with iteration-level batching across requests.

One `DecodeLoop` per loaded captioner version: an asyncio task that, while any image is being
captioned, gathers every live hypothesis of every active beam search into one batch, runs the
decoder graph once (off the event loop), splits the outputs back and does each search's beam
bookkeeping in numpy. Searches join and leave between steps; a search whose request was
cancelled or whose deadline passed is dropped at the next step. With batching off the loop takes
one search at a time and decodes it alone to the end (the way a per-request decode loop works),
on the same path, so the two can be compared.

`BeamSearch` is the algorithm of `training.caption_decoding.beam_search` in numpy, step for step:
every live hypothesis is extended by every word, the best `beam_size` of all extensions are
kept, those ending in <end> are set aside; at `max_length` words only <end> may follow; the
search stops when the beam is empty or the best live hypothesis cannot beat the worst of
`beam_size` finished ones; hypotheses rank by total log-probability (float32 sums, as in torch).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from service import metrics
from service.errors import DeadlineExceeded, ModelNotReady, QueueFull

log = logging.getLogger(__name__)

#: The decoder graph's inputs and outputs (training/export_captioner.py writes them so): token, h,
#: c and image_index per hypothesis, features and projected per image (the graph gathers them).
DECODER_INPUTS = ("token", "h", "c", "features", "projected", "image_index")
DECODER_OUTPUTS = ("log_probs", "next_h", "next_c", "alpha")
#: Decoder graphs exported before image_index take features and projected once per hypothesis.
PER_HYPOTHESIS_DECODER_INPUTS = DECODER_INPUTS[:5]
Feeds = dict[str, np.ndarray]


@dataclass(frozen=True)
class DecodingOptions:
    max_rows: int = 256  # hypotheses per decoder step; searches beyond it wait for the next step
    batching: bool = True  # False: one search at a time, decoded alone to the end
    max_queue: int = 1024  # searches waiting for or in the loop; beyond it a request is refused at once


@dataclass(frozen=True)
class Hypothesis:
    tokens: tuple[int, ...]  # words only: no <start>, no <end>
    log_prob: float  # total, including the final <end>
    attention: tuple[np.ndarray, ...] = ()  # one (L,) weight vector per word, when asked for


class BeamSearch:
    """The state of one image's beam search; `advance` takes one decoder step's outputs for it."""

    def __init__(
        self,
        features: np.ndarray,  # (1, L, D)
        projected: np.ndarray,  # (1, L, A)
        h: np.ndarray,  # (1, H)
        c: np.ndarray,  # (1, H)
        *,
        beam_size: int,
        max_length: int,
        start_token: int,
        end_token: int,
        keep_attention: bool = False,
    ) -> None:
        self.features, self.projected = features, projected
        self.h, self.c = h, c
        self.beam_size, self.max_length = beam_size, max_length
        self.end_token = end_token
        self.keep_attention = keep_attention
        self.tokens = np.array([start_token], dtype=np.int64)  # the last token of each live hypothesis
        self.scores = np.zeros(1, dtype=np.float32)  # their total log-probabilities
        self.live: list[tuple[tuple[int, ...], tuple[np.ndarray, ...]]] = [((), ())]  # words, attention
        self.finished: list[Hypothesis] = []
        self.length = 0  # words in every live hypothesis
        self.done = False

    @property
    def rows(self) -> int:
        """Live hypotheses: the rows this search adds to the next decoder step."""
        return len(self.live)

    def advance(self, log_probs: np.ndarray, h: np.ndarray, c: np.ndarray, alpha: np.ndarray) -> bool:
        """One step: (rows, V) log-probabilities and the next states; True when the search is done."""
        scores = log_probs + self.scores[:, np.newaxis]  # float32, as torch adds them
        end = self.end_token
        if self.length == self.max_length:  # out of room: only <end> may follow
            values = scores[:, end]
            order = np.argsort(-values, kind="stable")[: self.beam_size]
            ends = zip(order.tolist(), values[order].tolist(), strict=True)
            picks = [(row, end, score) for row, score in ends]
        else:
            # One stable sort of a few hundred scores: best first, ties to the lower index, as topk.
            flat = scores.ravel()
            ranked = np.argsort(-flat, kind="stable")[: self.beam_size]
            vocabulary = scores.shape[1]
            picks = [
                (*divmod(index, vocabulary), score)
                for index, score in zip(ranked.tolist(), flat[ranked].tolist(), strict=True)
            ]
        next_live: list[tuple[tuple[int, ...], tuple[np.ndarray, ...]]] = []
        keep: list[int] = []
        next_tokens: list[int] = []
        next_scores: list[float] = []
        for row, word, score in picks:
            tokens, attention = self.live[row]
            if word == end:
                self.finished.append(Hypothesis(tokens, score, attention))
                continue
            if self.keep_attention:
                attention = (*attention, alpha[row].copy())
            next_live.append(((*tokens, word), attention))
            keep.append(row)
            next_tokens.append(word)
            next_scores.append(score)
        self.finished.sort(key=lambda hypothesis: hypothesis.log_prob, reverse=True)
        beam = self.beam_size
        enough = len(self.finished) >= beam
        if (
            not next_live
            or (enough and next_scores[0] <= self.finished[beam - 1].log_prob)
            or self.length == self.max_length
        ):
            self.done = True
            return True
        index = np.asarray(keep, dtype=np.intp)
        self.live = next_live
        self.h, self.c = h[index], c[index]
        self.tokens = np.asarray(next_tokens, dtype=np.int64)
        self.scores = np.asarray(next_scores, dtype=np.float32)
        self.length += 1
        return False

    def result(self) -> list[Hypothesis]:
        """The `beam_size` best finished captions, best first."""
        return self.finished[: self.beam_size]


@dataclass(eq=False)
class _Job:
    search: BeamSearch
    deadline: float | None  # loop.time() based
    future: asyncio.Future[list[Hypothesis]]
    steps: int = 0
    joined: float = field(default_factory=time.perf_counter)


StepReport = Callable[[int, float], None]  # rows, seconds in the decoder run


class DecodeLoop:
    """`await decode(search, deadline)` runs a beam search to its end, batched with every other one."""

    def __init__(
        self,
        run: Callable[[Feeds], Sequence[np.ndarray]],
        output_names: Sequence[str],
        options: DecodingOptions,
        model: str,
        version: str,
        on_step: StepReport | None = None,
        by_image: bool = True,  # False for decoders that take the features per hypothesis (see merge)
    ) -> None:
        self._run = run
        self._outputs = [list(output_names).index(name) for name in DECODER_OUTPUTS]
        self._by_image = by_image
        self.options = options
        self._on_step = on_step or (lambda rows, seconds: None)
        self._waiting: deque[_Job] = deque()
        self._active: list[_Job] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="decoder")
        self._closed = False
        labels = (model, version)
        self._hypotheses = metrics.DECODE_ACTIVE_HYPOTHESES.labels(*labels)
        self._requests = metrics.DECODE_ACTIVE_REQUESTS.labels(*labels)
        self._steps = metrics.DECODE_STEPS.labels(*labels)
        self._duration = metrics.DECODE_STEP_DURATION.labels(*labels)
        self._dropped = {
            reason: metrics.DECODE_DROPPED.labels(model, version, reason)
            for reason in ("cancelled", "deadline_exceeded")
        }

    @property
    def active(self) -> int:
        """Searches in the loop or waiting to join it."""
        return len(self._active) + len(self._waiting)

    async def decode(self, search: BeamSearch, deadline: float | None = None) -> list[Hypothesis]:
        if self._closed:
            raise ModelNotReady("the model version was unloaded")
        if self.active >= self.options.max_queue:
            raise QueueFull(f"the decode loop holds {self.active} captions (max_decode_queue); retry later")
        loop = asyncio.get_running_loop()
        job = _Job(search, deadline, loop.create_future())
        self._waiting.append(job)
        self._wake.set()
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._work())
        try:
            return await job.future
        finally:
            if not job.future.done():  # we were cancelled: the loop drops the search at its next step
                job.future.cancel()

    async def close(self) -> None:
        """Stop the loop; searches in it fail as if the model were unloaded."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        unloaded = ModelNotReady("the model version was unloaded")
        for job in [*self._waiting, *self._active]:
            if not job.future.done():
                job.future.set_exception(unloaded)
        self._waiting.clear()
        self._active.clear()
        self._pool.shutdown(wait=False)

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._closed:
            if not self._active and not self._waiting:
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                await self._step(loop)
            except Exception:  # a bug here must not stop the model: fail the searches, keep serving
                log.exception("decode loop step failed; continuing")
                for job in self._active:
                    if not job.future.done():
                        job.future.set_exception(RuntimeError("decode step failed"))
                self._active = []

    def _still_wanted(self, job: _Job, now: float) -> bool:
        """False for a search that must leave: cancelled, answered, or past its deadline."""
        if job.future.done():
            if job.future.cancelled():
                self._leave(job, "cancelled")
            return False
        if job.deadline is not None and now >= job.deadline:
            job.future.set_exception(
                DeadlineExceeded(f"deadline passed during beam search, after {job.steps} decoder steps")
            )
            self._leave(job, "deadline_exceeded")
            return False
        return True

    def _leave(self, job: _Job, reason: str) -> None:
        self._dropped[reason].inc()
        self._steps.observe(job.steps)
        log.debug("beam search left the decode loop after %d steps: %s", job.steps, reason)

    def _admit(self, now: float) -> None:
        """Searches join between steps, as many as the row budget holds (with batching off: one)."""
        self._active = [job for job in self._active if self._still_wanted(job, now)]
        rows = sum(job.search.rows for job in self._active)
        while self._waiting:
            job = self._waiting[0]
            if not self._still_wanted(job, now):
                self._waiting.popleft()
                continue
            if self._active and (not self.options.batching or rows + job.search.rows > self.options.max_rows):
                break
            self._waiting.popleft()
            self._active.append(job)
            rows += job.search.rows

    async def _step(self, loop: asyncio.AbstractEventLoop) -> None:
        started = time.perf_counter()
        self._admit(loop.time())
        jobs = self._active
        if not jobs:
            return
        searches = [job.search for job in jobs]
        rows = sum(search.rows for search in searches)
        try:  # merging copies every search's features: off the event loop too
            outputs, run_seconds = await loop.run_in_executor(self._pool, self._merge_and_run, searches)
        except Exception as exc:  # an error in a run fails exactly the searches in it
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(exc)
            self._active = []
            return
        log_probs, h, c, alpha = (outputs[i] for i in self._outputs)
        offset = 0
        for job in jobs:
            count = job.search.rows
            part = slice(offset, offset + count)
            offset += count
            if job.future.done():  # cancelled while the step ran: dropped at the next admission
                continue
            job.steps += 1
            if job.search.advance(log_probs[part], h[part], c[part], alpha[part]):
                job.future.set_result(job.search.result())
                self._steps.observe(job.steps)
        self._active = [job for job in jobs if not job.future.done() or job.future.cancelled()]
        self._on_step(rows, run_seconds)
        self._hypotheses.observe(rows)
        self._requests.observe(len(jobs))
        self._duration.observe(time.perf_counter() - started)

    def _merge_and_run(self, searches: list[BeamSearch]) -> tuple[Sequence[np.ndarray], float]:
        """In the decoder thread: one batch of every live hypothesis, run; returns outputs and run time."""
        feeds = merge(searches, self._by_image)
        started = time.perf_counter()
        outputs = self._run(feeds)
        return outputs, time.perf_counter() - started


def merge(searches: list[BeamSearch], by_image: bool) -> Feeds:
    """One decoder batch: every live hypothesis of every search, and each search's image features.

    by_image: the features once per search and, per hypothesis, the index of its search's row
    (the graph gathers them); else, for older graphs, the features repeated per hypothesis.
    """
    rows = [s.rows for s in searches]
    feeds = {
        "token": np.concatenate([s.tokens for s in searches]),
        "h": np.concatenate([s.h for s in searches]),
        "c": np.concatenate([s.c for s in searches]),
    }
    if by_image:
        feeds["features"] = np.concatenate([s.features for s in searches])
        feeds["projected"] = np.concatenate([s.projected for s in searches])
        feeds["image_index"] = np.repeat(np.arange(len(searches), dtype=np.int64), rows)
    else:
        feeds["features"] = np.repeat(np.concatenate([s.features for s in searches]), rows, axis=0)
        feeds["projected"] = np.repeat(np.concatenate([s.projected for s in searches]), rows, axis=0)
    return feeds
