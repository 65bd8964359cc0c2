"""Server-side beam search for captioners, with iteration-level batching across requests.

One `DecodeLoop` per loaded captioner version: a thread that, while any image is being captioned,
gathers every live hypothesis of every active beam search into one batch, runs the decoder graph
once, splits the outputs back and does each search's beam bookkeeping in numpy. Searches join
and leave between steps; a search whose request was cancelled or whose deadline passed is
dropped at the next step. With batching off the loop takes one search at a time and decodes it
alone to the end (the way a per-request decode loop works), on the same path, so the two can be
compared.

`BeamSearch` is the algorithm of `training.caption_decoding.beam_search` in numpy, step for step:
every live hypothesis is extended by every word, the best `beam_size` of all extensions are
kept, those ending in <end> are set aside; at `max_length` words only <end> may follow; a word
that a hypothesis already says `max_repeats` times (the most the model's grammar ever repeats
one word) cannot extend it; the search stops when the beam is empty or the best live hypothesis
cannot beat the worst of `beam_size` finished ones; hypotheses rank by total log-probability
(float32 sums, as in torch).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from service.contract.tensor_names import DECODER_OUTPUTS
from service.errors import DeadlineExceeded, ModelNotReady, QueueFull
from service.observability import metrics

log = logging.getLogger(__name__)

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
    regions: np.ndarray | None = None  # (L, 4) boxes the attention weights refer to, for region models

    @property
    def mean_log_prob(self) -> float:
        """Log-probability per token (the words and the final <end>): a confidence that does not
        fall with the caption's length."""
        return self.log_prob / (len(self.tokens) + 1)


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
        max_repeats: int | None = None,
        regions: np.ndarray | None = None,  # (L, 4), handed on with the captions
    ) -> None:
        self.features, self.projected = features, projected
        self.max_repeats, self.regions = max_repeats, regions
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
        if self.max_repeats is not None and self.length >= self.max_repeats:
            for row, (tokens, _) in enumerate(self.live):
                for word, count in Counter(tokens).items():
                    if count >= self.max_repeats:
                        scores[row, word] = -np.inf
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
                self.finished.append(Hypothesis(tokens, score, attention, self.regions))
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
    deadline: float | None  # time.monotonic() based
    future: asyncio.Future[list[Hypothesis]]
    steps: int = 0
    abandoned: bool = False  # set by the caller when it stops waiting (cancelled)


StepReport = Callable[[int, float], None]  # rows, seconds in the decoder run
Outcome = list[Hypothesis] | BaseException
Settled = list[tuple[_Job, Outcome]]


class DecodeLoop:
    """`await decode(search, deadline)` runs a beam search to its end, batched with every other one.

    The loop runs in a thread of its own rather than as a task on the event loop: a step starts as
    soon as the previous one ends instead of waiting its turn behind every gRPC callback of a busy
    event loop (at 32 concurrent captions that wait was longer than the decoder run itself). The
    event loop only hands searches in and, once per step, takes the finished ones back; numpy and
    onnxruntime release the GIL, so the two overlap.
    """

    def __init__(
        self,
        run: Callable[[Feeds], Sequence[np.ndarray]],
        output_names: Sequence[str],
        options: DecodingOptions,
        model: str,
        version: str,
        on_step: StepReport | None = None,  # called on the event loop
        by_image: bool = True,  # False for decoders that take the features per hypothesis (see merge)
    ) -> None:
        self._run = run
        self._outputs = [list(output_names).index(name) for name in DECODER_OUTPUTS]
        self._by_image = by_image
        self.options = options
        self._on_step = on_step or (lambda rows, seconds: None)
        self._lock = threading.Condition()  # guards _waiting, _count and _closed
        self._waiting: deque[_Job] = deque()
        self._count = 0  # searches waiting or in the loop
        self._closed = False
        self._active: list[_Job] = []  # only the loop's thread touches it
        self._thread: threading.Thread | None = None
        self._event_loop: asyncio.AbstractEventLoop | None = None  # the callers' loop, set by the first
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
        return self._count

    async def decode(self, search: BeamSearch, deadline: float | None = None) -> list[Hypothesis]:
        """`deadline` on the running event loop's clock."""
        loop = asyncio.get_running_loop()
        if deadline is not None:  # the loop's thread keeps time with time.monotonic()
            deadline = time.monotonic() + (deadline - loop.time())
        job = _Job(search, deadline, loop.create_future())
        with self._lock:
            if self._closed:
                raise ModelNotReady("the model version was unloaded")
            if self._count >= self.options.max_queue:
                held = self._count
                raise QueueFull(f"the decode loop holds {held} captions (max_decode_queue); retry later")
            if self._event_loop is None:
                self._event_loop = loop
                self._thread = threading.Thread(target=self._work, name="decode-loop", daemon=True)
                self._thread.start()
            elif loop is not self._event_loop:
                raise RuntimeError("a decode loop serves the one event loop that first used it")
            self._waiting.append(job)
            self._count += 1
            self._lock.notify()
        try:
            return await job.future
        except asyncio.CancelledError:  # the loop's thread drops the search at its next step
            job.abandoned = True
            job.future.cancel()
            raise

    async def close(self) -> None:
        """Stop the loop after its current step; searches in it fail as if the model were unloaded."""
        with self._lock:
            self._closed = True
            self._lock.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
        unloaded = ModelNotReady("the model version was unloaded")
        for job in [*self._waiting, *self._active]:
            if not job.future.done():
                job.future.set_exception(unloaded)
        self._waiting.clear()
        self._active.clear()

    def _work(self) -> None:
        """The loop's thread: admit, step, hand results back; sleeps while there is nothing to do."""
        while True:
            with self._lock:
                while not self._closed and not self._waiting and not self._active:
                    self._lock.wait()
                if self._closed:
                    return
                settled = self._admit(time.monotonic())
            report = None
            try:
                report = self._step(settled)
            except Exception:  # a bug here must not stop the model: fail the searches, keep serving
                log.exception("decode loop step failed; continuing")
                self._fail(self._active, RuntimeError("decode step failed"), settled)
            if settled or report:
                self._hand_back(settled, report)

    def _hand_back(self, settled: Settled, report: tuple[int, float] | None) -> None:
        """One call per step sets, on the event loop, every finished search's outcome."""
        assert self._event_loop is not None, "set before the thread starts"
        with contextlib.suppress(RuntimeError):  # the event loop is closed: nobody is waiting any more
            self._event_loop.call_soon_threadsafe(self._settle, settled, report)

    def _settle(self, settled: Settled, report: tuple[int, float] | None) -> None:
        for job, outcome in settled:
            if job.future.done():  # cancelled meanwhile
                continue
            if isinstance(outcome, BaseException):
                job.future.set_exception(outcome)
            else:
                job.future.set_result(outcome)
        if report is not None:
            self._on_step(*report)

    def _fail(self, jobs: list[_Job], error: BaseException, settled: Settled) -> None:
        """Every search of a failed step fails with `error`; abandoned ones leave, counted, at admission."""
        settled += [(job, error) for job in jobs if not job.abandoned]
        self._active = [job for job in jobs if job.abandoned]
        self._forget(len(jobs) - len(self._active))

    def _forget(self, searches: int) -> None:
        with self._lock:
            self._count -= searches

    def _admit(self, now: float) -> Settled:
        """Under the lock: searches join between steps, as many as the row budget holds (with
        batching off: one); those that were abandoned or whose deadline passed leave."""
        settled: Settled = []
        kept = [job for job in self._active if self._still_wanted(job, now, settled)]
        rows = sum(job.search.rows for job in kept)
        while self._waiting:
            job = self._waiting[0]
            if not self._still_wanted(job, now, settled):
                self._waiting.popleft()
                continue
            if kept and (not self.options.batching or rows + job.search.rows > self.options.max_rows):
                break
            self._waiting.popleft()
            kept.append(job)
            rows += job.search.rows
        self._active = kept
        return settled

    def _still_wanted(self, job: _Job, now: float, settled: Settled) -> bool:
        """Under the lock: False for a search that must leave, abandoned or past its deadline."""
        if job.abandoned:
            reason = "cancelled"
        elif job.deadline is not None and now >= job.deadline:
            reason = "deadline_exceeded"
            message = f"deadline passed during beam search, after {job.steps} decoder steps"
            settled.append((job, DeadlineExceeded(message)))
        else:
            return True
        self._count -= 1
        self._dropped[reason].inc()
        self._steps.observe(job.steps)
        log.debug("beam search left the decode loop after %d steps: %s", job.steps, reason)
        return False

    def _step(self, settled: Settled) -> tuple[int, float] | None:
        """One decoder run over every active search; adds the finished ones to `settled`.

        Returns (rows, seconds in the run) for the statistics, None when there was nothing to run.
        """
        started = time.perf_counter()
        jobs = self._active
        if not jobs:
            return None
        searches = [job.search for job in jobs]
        rows = sum(search.rows for search in searches)
        try:
            feeds = merge(searches, self._by_image)
            run_started = time.perf_counter()
            outputs = self._run(feeds)
            run_seconds = time.perf_counter() - run_started
        except Exception as exc:  # an error in a run fails exactly the searches in it
            self._fail(jobs, exc, settled)
            return None
        log_probs, h, c, alpha = (outputs[i] for i in self._outputs)
        still: list[_Job] = []
        offset = 0
        for job in jobs:
            count = job.search.rows
            part = slice(offset, offset + count)
            offset += count
            if job.abandoned:  # cancelled while the step ran: it leaves at the next admission
                still.append(job)
                continue
            job.steps += 1
            if job.search.advance(log_probs[part], h[part], c[part], alpha[part]):
                settled.append((job, job.search.result()))
                self._steps.observe(job.steps)
            else:
                still.append(job)
        self._forget(len(jobs) - len(still))
        self._active = still
        self._hypotheses.observe(rows)
        self._requests.observe(len(jobs))
        self._duration.observe(time.perf_counter() - started)
        return rows, run_seconds


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
