"""gRPC's threads below the event loop: which threads, when, and only when asked or on one core."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from service.settings import grpc_threads_low, one_usable_cpu
from service.transports.grpc.threads import LOW_PRIORITY_NICE, lower_priority, thread_ids

# A fresh process, so that grpc's threads do not exist yet: it creates a grpc.aio server inside the
# block, binds, starts and answers one call (so threads started on the way count too), then prints
# each thread's nice value, the main thread's apart.
_CHILD = """
import asyncio, json, os, sys
import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from service.transports.grpc.threads import thread_ids, threads_started_at_low_priority

async def main():
    with threads_started_at_low_priority(sys.argv[1] == "low"):
        server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    main_id = os.getpid()
    nice = {t: os.getpriority(os.PRIO_PROCESS, t) for t in thread_ids()}
    print(json.dumps({"main": nice.pop(main_id), "others": sorted(nice.values())}))
    await server.stop(None)

asyncio.run(main())
"""
# Under `nice make test` every thread starts from the test's own priority, not 0.
_OURS = os.getpriority(os.PRIO_PROCESS, 0)


def _child_nice(mode: str) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, mode], capture_output=True, text=True, timeout=60, check=True
    )
    return json.loads(done.stdout)


def test_threads_the_grpc_server_starts_run_at_low_priority_and_the_loop_does_not() -> None:
    nice = _child_nice("low")
    assert nice["main"] == _OURS
    assert nice["others"] and set(nice["others"]) == {LOW_PRIORITY_NICE}


def test_without_it_every_thread_keeps_the_normal_priority() -> None:
    nice = _child_nice("normal")
    assert nice["main"] == _OURS and set(nice["others"]) == {_OURS}


def test_lower_priority_skips_threads_that_are_gone() -> None:
    assert os.getpid() in thread_ids()
    assert lower_priority({2**22 + 1}) == 0  # above any pid_max: no such thread


# The child pins itself (os.sched_setaffinity in its own code, not a preexec_fn in a threaded parent).
_PINNED_AUTO = """
import os
os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
from service.settings import grpc_threads_low
print(grpc_threads_low("auto"))
"""


def test_auto_is_low_exactly_on_one_usable_cpu() -> None:
    assert grpc_threads_low("low") and not grpc_threads_low("normal")
    assert grpc_threads_low("auto") == one_usable_cpu()
    first = min(os.sched_getaffinity(0))
    pinned = subprocess.run(
        [
            sys.executable,
            "-c",
            "from service.settings import grpc_threads_low; print(grpc_threads_low('auto'))",
        ],
        capture_output=True,
        text=True,
        preexec_fn=lambda: os.sched_setaffinity(0, {first}),
        check=True,
    )
    assert pinned.stdout.strip() == "True"
