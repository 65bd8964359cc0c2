"""Graceful drain under load: SIGTERM in the middle of concurrent Classify traffic loses nothing.

Every call the server accepted (its access log has the call's request id) completes OK; every
other call fails before it started: UNAVAILABLE, or CANCELLED from gRPC itself for a call still in
transit at the instant the port closes (gRPC cancels calls it had not handed to a servicer; such a
call never ran). Nothing fails with INTERNAL, nothing accepted is cancelled; health turns
NOT_SERVING while the server still answers; the process exits 0 well within the grace period.
"""

from __future__ import annotations

import json
import signal
import threading
import time
import uuid

import grpc
from conftest import start_server
from drawing import draw_digit, png_bytes
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service._proto.convserve.v1 import vision_pb2_grpc
from service.client import classify_request

DIGIT = png_bytes(draw_digit("3"))
GRACE_SECONDS = 30  # generous: the drain itself takes well under a second of lenet5 work


def test_sigterm_under_load_drains_in_flight_work_and_loses_nothing(model_repository, tmp_path):
    # A short batch window, so that at SIGTERM some requests are queued, not only running.
    env = {"CONVSERVE_SHUTDOWN_GRACE_SECONDS": str(GRACE_SECONDS), "CONVSERVE_MAX_QUEUE_DELAY": "0.05"}
    server = start_server(model_repository, tmp_path / "log", env)
    outcomes: dict[str, str] = {}  # request id -> what the client got
    lock = threading.Lock()
    seen_not_serving = threading.Event()
    request = classify_request([DIGIT] * 2, model="lenet5", top_k=1)

    def traffic() -> None:
        """Classify until the server has refused three times (a client that then goes elsewhere)."""
        refusals = 0
        with grpc.insecure_channel(server.target) as channel:
            stub = vision_pb2_grpc.VisionStub(channel)
            while refusals < 3:
                request_id = uuid.uuid4().hex
                try:
                    response = stub.Classify(request, timeout=60, metadata=(("x-request-id", request_id),))
                    label = response.results[0].predictions[0].label
                    outcome = "OK" if label == "3" else f"wrong label {label}"
                except grpc.RpcError as exc:
                    outcome = f"{exc.code().name}: {exc.details()}"
                    refusals += exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
                with lock:
                    outcomes[request_id] = outcome

    def watch() -> None:
        """A health Watch stream opened before SIGTERM sees NOT_SERVING while the server still answers."""
        with grpc.insecure_channel(server.target) as channel:
            stream = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
            try:
                for update in stream:
                    if update.status == health_pb2.HealthCheckResponse.NOT_SERVING:
                        seen_not_serving.set()
                        break
            except grpc.RpcError:
                pass
            finally:
                stream.cancel()  # do not hold the server's drain open

    def answered() -> int:
        with lock:
            return sum(outcome == "OK" for outcome in outcomes.values())

    workers = [threading.Thread(target=traffic) for _ in range(6)]
    watcher = threading.Thread(target=watch)
    try:
        watcher.start()
        for worker in workers:
            worker.start()
        deadline = time.monotonic() + 60
        while answered() < 200:  # well under way on every worker
            assert time.monotonic() < deadline, f"no traffic got through: {outcomes}"
            time.sleep(0.05)
        signalled = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        exit_code = server.process.wait(GRACE_SECONDS + 30)
        took = time.monotonic() - signalled
    finally:
        if server.process.poll() is None:
            server.process.kill()
        for worker in workers:
            worker.join(60)
        watcher.join(60)
    text = server.log()
    stray = [line for line in text.splitlines() if not line.startswith("{")]
    assert not stray, "the server wrote something other than JSON log lines:\n" + "\n".join(stray[:40])
    accepted = {
        line["request_id"]: line["code"]
        for line in map(json.loads, text.splitlines())
        if line.get("message") == "rpc" and line.get("method", "").endswith("/Classify")
    }
    assert all(code == "OK" for code in accepted.values()), [c for c in accepted.values() if c != "OK"][:5]
    lost = {rid: out for rid, out in outcomes.items() if rid in accepted and out != "OK"}
    assert lost == {}, f"accepted by the server but not answered OK: {list(lost.values())[:5]}"
    not_started = [out for rid, out in outcomes.items() if rid not in accepted]
    assert all(out.startswith(("UNAVAILABLE", "CANCELLED")) for out in not_started), not_started[:5]
    assert sum(out.startswith("UNAVAILABLE") for out in not_started) >= 1, not_started[:5]
    assert exit_code == 0, server.log()[-3000:]
    assert took < GRACE_SECONDS, f"exit took {took:.1f} s, the grace period is {GRACE_SECONDS} s"
    assert seen_not_serving.is_set(), "health never turned NOT_SERVING before the server went away"
    assert '"message": "stopped"' in server.log()
