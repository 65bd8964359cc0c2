"""The dynamic batcher alone: merging, splitting, order, queue limits, deadlines, cancellation, checks,
and fault isolation (one bad request never fails its neighbours)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable

import numpy as np
import pytest

from service.engine.batching import BatchingOptions, DynamicBatcher, IsolationReport, RunReport
from service.errors import BatchFailed, DeadlineExceeded, InvalidArgument, ModelNotReady, QueueFull
from service.observability.statistics import RequestTimes


class Model:
    """A blocking 'model' (doubles its input) that records every run and can be held or made to fail."""

    def __init__(self, seconds: float = 0.0, poison: int | None = None) -> None:
        self.seconds = seconds
        self.poison = poison
        self.runs: list[np.ndarray] = []
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        self.gate.wait(10)
        x = feeds["x"]
        self.runs.append(x.copy())
        time.sleep(self.seconds)
        if self.poison is not None and (x == self.poison).any():
            raise RuntimeError("poisoned batch")
        return [x * 2, x.sum(axis=1)]


def rows(*values: int) -> dict[str, np.ndarray]:
    return {"x": np.array([[v, v] for v in values], dtype=np.int64)}


def test_concurrent_requests_share_runs_and_get_their_own_answers() -> None:
    model = Model(seconds=0.02)
    reports: list[RunReport] = []

    async def main() -> list[list[np.ndarray]]:
        batcher = DynamicBatcher(model, BatchingOptions(max_batch_size=8), on_run=reports.append)
        results = await asyncio.gather(*(batcher.submit(rows(i)) for i in range(20)))
        await batcher.close()
        return results

    results = asyncio.run(main())
    for i, (doubled, summed) in enumerate(results):
        np.testing.assert_array_equal(doubled, [[2 * i, 2 * i]])
        np.testing.assert_array_equal(summed, [2 * i])
    assert len(model.runs) < 20
    assert max(len(run) for run in model.runs) <= 8
    assert sum(r.rows for r in reports) == 20


def test_a_large_request_is_split_across_runs_and_reassembled_in_order() -> None:
    model = Model()

    async def main() -> list[np.ndarray]:
        batcher = DynamicBatcher(model, BatchingOptions(max_batch_size=4))
        result = await batcher.submit(rows(*range(10)))
        await batcher.close()
        return result

    doubled, _ = asyncio.run(main())
    np.testing.assert_array_equal(doubled[:, 0], np.arange(10) * 2)
    assert [len(run) for run in model.runs] == [4, 4, 2]


def test_batching_off_is_one_row_per_run() -> None:
    model = Model()

    async def main() -> None:
        batcher = DynamicBatcher(model, BatchingOptions(max_batch_size=1))
        await asyncio.gather(*(batcher.submit(rows(i, i)) for i in range(5)))
        await batcher.close()

    asyncio.run(main())
    assert [len(run) for run in model.runs] == [1] * 10


def test_full_queue_refuses_at_once() -> None:
    model = Model()
    model.gate.clear()  # the first run blocks until released

    async def main() -> float:
        batcher = DynamicBatcher(model, BatchingOptions(max_batch_size=2, max_queue_size=4))
        first = asyncio.create_task(batcher.submit(rows(0, 0)))  # taken by the (blocked) run
        await asyncio.sleep(0.05)
        queued = asyncio.create_task(batcher.submit(rows(1, 1, 1)))
        await asyncio.sleep(0.01)
        started = time.perf_counter()
        with pytest.raises(QueueFull, match="3 of 4 rows waiting, this request has 2"):
            await batcher.submit(rows(2, 2))
        refused_after = time.perf_counter() - started
        model.gate.set()
        await asyncio.gather(first, queued)
        await batcher.close()
        return refused_after

    assert asyncio.run(main()) < 0.01


def test_expired_request_is_dropped_before_it_runs() -> None:
    model = Model(seconds=0.1)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        batcher = DynamicBatcher(model, BatchingOptions(max_batch_size=1))
        busy = asyncio.create_task(batcher.submit(rows(1)))
        await asyncio.sleep(0.01)
        with pytest.raises(DeadlineExceeded):
            await batcher.submit(rows(7), deadline=loop.time() + 0.02)
        await busy
        await batcher.close()

    asyncio.run(main())
    assert all((run != 7).all() for run in model.runs)


def test_cancelled_request_leaves_the_queue_and_never_runs() -> None:
    model = Model()
    model.gate.clear()

    async def main() -> int:
        batcher = DynamicBatcher(model, BatchingOptions(max_batch_size=1))
        busy = asyncio.create_task(batcher.submit(rows(1)))
        await asyncio.sleep(0.02)
        doomed = asyncio.create_task(batcher.submit(rows(7, 7, 7)))
        await asyncio.sleep(0.01)
        pending_before = batcher.pending_rows
        doomed.cancel()
        await asyncio.sleep(0.01)
        pending_after = batcher.pending_rows
        model.gate.set()
        await busy
        await asyncio.sleep(0.05)
        await batcher.close()
        return pending_before - pending_after

    assert asyncio.run(main()) == 3
    assert all((run != 7).all() for run in model.runs)


class AlwaysFails(Model):
    """A model whose every run fails, whatever its input."""

    def __call__(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        super().__call__(feeds)
        raise RuntimeError("this model fails every run")


Calls = Callable[[DynamicBatcher, float], list[Awaitable[list[np.ndarray]]]]


async def _together(
    model: Model, options: BatchingOptions, calls: Calls, reports: list[IsolationReport] | None = None
) -> list[object]:
    """Make `calls(batcher, now)` while a first request (value 1) holds the model, so that they all
    queue and run together; their results (or errors) in order."""
    batcher = DynamicBatcher(model, options, on_isolation=(reports if reports is not None else []).append)
    model.gate.clear()
    first = asyncio.create_task(batcher.submit(rows(1)))
    await asyncio.sleep(0.02)  # the first run has started and waits at the gate
    tasks = [asyncio.ensure_future(call) for call in calls(batcher, asyncio.get_running_loop().time())]
    await asyncio.sleep(0.02)  # all queued
    model.gate.set()
    results = await asyncio.gather(first, *tasks, return_exceptions=True)
    await batcher.close()
    return list(results[1:])


async def _batched(model: Model, values: list[int]) -> tuple[list[object], list[IsolationReport]]:
    """One request of one row per value, run together."""
    reports: list[IsolationReport] = []
    results = await _together(
        model, BatchingOptions(), lambda batcher, _: [batcher.submit(rows(v)) for v in values], reports
    )
    return results, reports


def test_a_bad_request_fails_alone_and_its_neighbours_get_their_answers() -> None:
    model = Model(poison=13)
    values = [2, 3, 4, 5, 13, 6, 7, 8]
    results, reports = asyncio.run(_batched(model, values))
    for value, result in zip(values, results, strict=True):
        if value == 13:
            assert isinstance(result, RuntimeError)
        else:
            assert not isinstance(result, BaseException), result
            np.testing.assert_array_equal(result[0], [[2 * value, 2 * value]])
    # the batch of 8, then halves of 4, 2 and 1 on the bad request's side: 2 + 2 + 2 retries
    assert len(model.runs) == 1 + 1 + 6
    assert [(r.retries, r.alone, r.with_batch) for r in reports] == [(6, 1, 0)]


def test_a_model_that_fails_every_run_fails_all_after_one_split_not_2n_minus_1_runs() -> None:
    model = AlwaysFails()
    results, reports = asyncio.run(_batched(model, list(range(2, 18))))
    assert all(isinstance(r, BatchFailed) for r in results), "retry: nobody is told their input was bad"
    assert all("this model fails" not in str(r) for r in results), "the model's error stays in the log"
    assert len(model.runs) == 1 + 1 + 2  # the first request alone, the batch, its two halves
    assert [(r.retries, r.alone, r.with_batch) for r in reports] == [(2, 0, 16)]


def test_two_bad_requests_in_both_halves_of_the_first_split_fail_their_whole_run() -> None:
    """The price of the bound above, as documented: the run's other requests fail too."""
    model = Model(poison=13)
    results, _ = asyncio.run(_batched(model, [13, 2, 3, 13]))
    assert all(isinstance(r, BatchFailed) for r in results)


class HoldsTheBatch(AlwaysFails):
    """Fails every run; the second run (the batch) waits for `release` and says when it started."""

    def __init__(self) -> None:
        super().__init__()
        self.batch_started = threading.Event()
        self.release = threading.Event()

    def __call__(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        if len(self.runs) == 1:
            self.batch_started.set()
            self.release.wait(10)
        return super().__call__(feeds)


def test_the_bound_holds_when_one_half_of_the_first_split_is_gone() -> None:
    """Requests cancelled while their batch ran leave nothing to rerun in their half: the first
    split that runs both halves decides, so 16 requests still cost a bounded number of runs."""
    model = HoldsTheBatch()

    async def main() -> list[object]:
        batcher = DynamicBatcher(model, BatchingOptions())
        model.gate.clear()
        first = asyncio.create_task(batcher.submit(rows(1)))
        await asyncio.sleep(0.02)
        tasks = [asyncio.create_task(batcher.submit(rows(v))) for v in range(2, 18)]
        await asyncio.sleep(0.02)
        model.gate.set()
        await asyncio.to_thread(model.batch_started.wait, 10)
        for task in tasks[:8]:  # the first half of the batch gives up while it runs
            task.cancel()
        await asyncio.sleep(0.01)
        model.release.set()
        results = await asyncio.gather(first, *tasks, return_exceptions=True)
        await batcher.close()
        return list(results[1:])

    results = asyncio.run(main())
    assert all(isinstance(r, asyncio.CancelledError) for r in results[:8])
    assert all(isinstance(r, BatchFailed) for r in results[8:])
    assert len(model.runs) == 1 + 1 + 1 + 2  # first, the batch, its live half, that half's halves


def test_outputs_without_a_row_per_input_row_fail_the_run_instead_of_hanging() -> None:
    def scalar(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return [np.array(len(feeds["x"]))]  # declares a batch axis, answers a 0-d array

    async def main() -> list[object]:
        batcher = DynamicBatcher(scalar, BatchingOptions(max_batch_size=2))
        calls = [batcher.submit(rows(v)) for v in range(4)]
        results = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 5)
        await batcher.close()
        return results

    results = asyncio.run(main())
    assert all(isinstance(r, list) for r in results), "each request, rerun alone, gets what it ran"


def test_close_fails_a_request_whose_rows_are_in_two_runs_at_once() -> None:
    """instances=2: a request's two slices run concurrently; close() while the second still runs."""
    model = Model(seconds=0.2)

    async def main() -> object:
        batcher = DynamicBatcher(model, BatchingOptions(max_batch_size=2, instances=2))
        request = asyncio.create_task(batcher.submit(rows(1, 2, 3)))
        await asyncio.sleep(0.1)  # both runs have started
        await batcher.close()
        done, _ = await asyncio.wait({request}, timeout=5)
        return request.exception() if done else "still waiting"

    assert isinstance(asyncio.run(main()), ModelNotReady)


def test_two_bad_requests_in_one_half_fail_alone() -> None:
    model = Model(poison=13)
    values = [13, 2, 13, 3, 4, 5, 6, 7]
    results, reports = asyncio.run(_batched(model, values))
    assert [isinstance(r, RuntimeError) for r in results] == [v == 13 for v in values]
    assert (reports[0].alone, reports[0].with_batch) == (2, 0)


def test_a_request_split_across_runs_fails_as_a_whole_and_only_it() -> None:
    def calls(batcher: DynamicBatcher, now: float) -> list[Awaitable[list[np.ndarray]]]:
        return [
            batcher.submit(rows(2)),
            batcher.submit(rows(3, 4, 5, 13, 6)),  # rows in two runs
            batcher.submit(rows(7)),
        ]

    model = Model(poison=13)
    results = asyncio.run(_together(model, BatchingOptions(max_batch_size=4), calls))
    assert [isinstance(r, RuntimeError) for r in results] == [False, True, False]
    np.testing.assert_array_equal(results[2][0], [[14, 14]])


def test_requests_past_their_deadline_are_not_retried() -> None:
    def calls(batcher: DynamicBatcher, now: float) -> list[Awaitable[list[np.ndarray]]]:
        return [
            batcher.submit(rows(13)),
            batcher.submit(rows(2), deadline=now + 0.08),  # passes during the failed run
            batcher.submit(rows(3)),
        ]

    model = Model(seconds=0.05, poison=13)
    results = asyncio.run(_together(model, BatchingOptions(), calls))
    assert isinstance(results[0], RuntimeError)
    assert isinstance(results[1], DeadlineExceeded)
    np.testing.assert_array_equal(results[2][0], [[6, 6]])
    assert not any((run == 2).any() for run in model.runs[2:]), "the expired request ran again"


def test_the_kinds_check_refuses_a_request_before_it_joins_a_batch() -> None:
    model = Model()

    def check(feeds: dict[str, np.ndarray]) -> None:
        if (feeds["x"] > 9).any():
            raise InvalidArgument("input 'x': above 9")

    async def main() -> None:
        batcher = DynamicBatcher(model, BatchingOptions(), check=check)
        with pytest.raises(InvalidArgument, match="above 9"):
            await batcher.submit(rows(10))
        assert batcher.pending_rows == 0
        await batcher.submit(rows(1))
        await batcher.close()

    asyncio.run(main())
    assert len(model.runs) == 1


@pytest.mark.parametrize("inline", [False, True])
def test_timing_gets_the_queue_and_run_seconds_of_its_request(inline: bool) -> None:
    model = Model(seconds=0.03)
    timings = [RequestTimes(), RequestTimes()]

    async def main() -> None:
        batcher = DynamicBatcher(model, BatchingOptions(inline=inline))
        first = asyncio.create_task(batcher.submit(rows(1), timing=timings[0]))
        await asyncio.sleep(0.01)  # the first run has started (inline: it held the loop and is over)
        await asyncio.gather(first, batcher.submit(rows(2), timing=timings[1]))
        await batcher.close()

    asyncio.run(main())
    assert all(t.infer >= 0.03 for t in timings)
    assert timings[0].queue < 0.01
    if inline:  # the second arrived after the first run had given the loop back
        assert timings[1].queue < 0.01
    else:
        assert timings[1].queue > 0.015, "the second waited for the first run"


@pytest.mark.parametrize("inline", [False, True])
def test_requests_that_arrived_together_share_a_run_without_a_delay_timer(inline: bool) -> None:
    model = Model()
    reports: list[RunReport] = []

    async def main() -> None:
        batcher = DynamicBatcher(
            model, BatchingOptions(max_queue_delay=0.0, inline=inline), on_run=reports.append
        )
        await asyncio.gather(*(batcher.submit(rows(i)) for i in range(5)))
        await batcher.submit(rows(9))  # alone: its own run, at once
        await batcher.close()

    asyncio.run(main())
    assert [(r.rows, r.requests) for r in reports] == [(5, 5), (1, 1)]


def test_queue_delay_gathers_requests_that_arrive_apart() -> None:
    model = Model()

    async def main() -> None:
        batcher = DynamicBatcher(model, BatchingOptions(max_batch_size=8, max_queue_delay=0.2))

        async def later(i: int) -> list[np.ndarray]:
            await asyncio.sleep(0.01 * i)
            return await batcher.submit(rows(i))

        await asyncio.gather(*(later(i) for i in range(4)))
        await batcher.close()

    asyncio.run(main())
    assert [len(run) for run in model.runs] == [4]


def test_instances_run_concurrently() -> None:
    model = Model(seconds=0.2)

    async def main() -> float:
        batcher = DynamicBatcher(model, BatchingOptions(max_batch_size=1, instances=8))
        started = time.perf_counter()
        await asyncio.gather(*(batcher.submit(rows(i)) for i in range(8)))
        await batcher.close()
        return time.perf_counter() - started

    assert asyncio.run(main()) < 0.8  # eight 0.2 s runs side by side, not 1.6 s one after another


def test_models_without_a_batch_axis_run_each_request_as_it_is() -> None:
    model = Model()

    async def main() -> list[list[np.ndarray]]:
        batcher = DynamicBatcher(model, BatchingOptions(max_batch_size=0))
        results = await asyncio.gather(batcher.submit(rows(1, 2, 3)), batcher.submit(rows(4)))
        await batcher.close()
        return results

    results = asyncio.run(main())
    assert [len(run) for run in model.runs] == [3, 1]
    np.testing.assert_array_equal(results[0][0][:, 0], [2, 4, 6])


def test_requests_of_other_shapes_run_apart_and_all_succeed() -> None:
    model = Model(seconds=0.01)

    async def main() -> list[list[np.ndarray]]:
        batcher = DynamicBatcher(model, BatchingOptions(max_batch_size=8))
        wide = {"x": np.ones((1, 3), np.int64)}
        results = await asyncio.gather(batcher.submit(rows(1)), batcher.submit(wide), batcher.submit(rows(2)))
        await batcher.close()
        return results

    results = asyncio.run(main())
    assert results[1][0].shape == (1, 3)
    assert sorted(run.shape[1] for run in model.runs) in ([2, 2, 3], [2, 3])  # never mixed in one run


def test_close_fails_running_and_later_requests_instead_of_hanging() -> None:
    model = Model()
    model.gate.clear()

    async def main() -> None:
        batcher = DynamicBatcher(model, BatchingOptions(max_batch_size=4))
        running = asyncio.create_task(batcher.submit(rows(1)))
        await asyncio.sleep(0.02)  # taken by a run that is blocked
        await batcher.close()
        with pytest.raises(ModelNotReady):
            await asyncio.wait_for(running, 1)
        with pytest.raises(ModelNotReady):
            await batcher.submit(rows(2))
        model.gate.set()

    asyncio.run(main())


def test_a_request_larger_than_the_queue_is_invalid_not_a_retry() -> None:
    async def main() -> None:
        batcher = DynamicBatcher(Model(), BatchingOptions(max_queue_size=4))
        with pytest.raises(InvalidArgument, match="at most 4"):
            await batcher.submit(rows(*range(5)))
        await batcher.close()

    asyncio.run(main())


def test_failed_runs_are_not_reported_as_inferences() -> None:
    reports: list[RunReport] = []

    async def main() -> None:
        batcher = DynamicBatcher(Model(poison=13), BatchingOptions(), on_run=reports.append)
        with pytest.raises(RuntimeError):
            await batcher.submit(rows(13))
        await batcher.submit(rows(1))
        await batcher.close()

    asyncio.run(main())
    assert [r.rows for r in reports] == [1]


def test_inline_runs_keep_the_queues_checks_and_reports() -> None:
    model = Model(poison=7)
    runs: list[RunReport] = []
    waits: list[float] = []

    async def main() -> None:
        batcher = DynamicBatcher(
            model,
            BatchingOptions(max_batch_size=4, inline=True),
            on_run=runs.append,
            on_dequeue=lambda report: waits.append(report.seconds),
        )
        doubled, _ = await batcher.submit(rows(1, 2))
        np.testing.assert_array_equal(doubled, [[2, 2], [4, 4]])
        loop = asyncio.get_running_loop()
        with pytest.raises(DeadlineExceeded):
            await batcher.submit(rows(3), deadline=loop.time() - 1)
        with pytest.raises(RuntimeError, match="poisoned"):
            await batcher.submit(rows(7))
        split = await batcher.submit(rows(*range(6)))  # more rows than a run takes: split
        np.testing.assert_array_equal(split[1], [2 * v for v in range(6)])
        await batcher.close()

    asyncio.run(main())
    assert [len(run) for run in model.runs] == [2, 1, 4, 2]
    assert [(r.rows, r.requests) for r in runs] == [(2, 1), (4, 1), (2, 1)]  # the failed run is not reported
    assert len(waits) == 3 and all(w < 0.01 for w in waits)  # the expired request never left the queue


def test_an_inline_batcher_runs_a_lone_request_in_its_caller_and_still_batches_the_rest() -> None:
    """With nothing queued and nothing else ready on the loop, a request runs at once in the task
    that submitted it (no hand-over to the worker); requests that arrive together still share runs,
    and a request that waits for nothing but something else is ready on the loop is queued."""
    model = Model()
    running_in: list[asyncio.Task[object] | None] = []

    def recording(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        running_in.append(asyncio.current_task())
        return model(feeds)

    async def main() -> None:
        batcher = DynamicBatcher(recording, BatchingOptions(max_batch_size=8, inline=True))
        me = asyncio.current_task()
        alone, _ = await batcher.submit(rows(1))
        np.testing.assert_array_equal(alone, [[2, 2]])
        assert running_in == [me]
        together = await asyncio.gather(*(batcher.submit(rows(v)) for v in range(5)))
        assert [r[0].tolist() for r in together] == [[[2 * v, 2 * v]] for v in range(5)]
        assert len(running_in) == 2 and running_in[1] is not me  # the worker ran them, together
        asyncio.get_running_loop().call_soon(lambda: None)  # something else is ready: queue
        await batcher.submit(rows(9))
        assert len(running_in) == 3 and running_in[2] is not me
        await batcher.close()

    asyncio.run(main())
    assert [len(run) for run in model.runs] == [1, 5, 1]
