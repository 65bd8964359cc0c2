"""Keepalive and maximum connection age: read from the settings, and a real server closes old connections."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import grpc
import pytest
from conftest import start_server
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.server import grpc_server_options
from service.settings import Settings

Connectivity = grpc.ChannelConnectivity


def test_keepalive_settings_have_sane_defaults() -> None:
    settings = Settings()
    assert settings.keepalive_time_seconds == 60
    assert settings.keepalive_timeout_seconds == 20
    assert settings.keepalive_min_ping_interval_seconds == 10
    assert settings.max_connection_age_seconds == 300
    assert settings.max_connection_age_grace_seconds == 60
    options = dict(grpc_server_options(settings))
    assert options["grpc.keepalive_time_ms"] == 60_000
    assert options["grpc.keepalive_timeout_ms"] == 20_000
    assert options["grpc.keepalive_permit_without_calls"] == 1
    assert options["grpc.http2.min_ping_interval_without_data_ms"] == 10_000
    assert options["grpc.max_connection_age_ms"] == 300_000
    assert options["grpc.max_connection_age_grace_ms"] == 60_000
    assert options["grpc.so_reuseport"] == 0


def test_keepalive_settings_are_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVSERVE_KEEPALIVE_TIME_SECONDS", "30")
    monkeypatch.setenv("CONVSERVE_KEEPALIVE_TIMEOUT_SECONDS", "5.5")
    monkeypatch.setenv("CONVSERVE_KEEPALIVE_MIN_PING_INTERVAL_SECONDS", "2")
    monkeypatch.setenv("CONVSERVE_MAX_CONNECTION_AGE_SECONDS", "120")
    monkeypatch.setenv("CONVSERVE_MAX_CONNECTION_AGE_GRACE_SECONDS", "15")
    options = dict(grpc_server_options(Settings()))
    assert options["grpc.keepalive_time_ms"] == 30_000
    assert options["grpc.keepalive_timeout_ms"] == 5_500
    assert options["grpc.http2.min_ping_interval_without_data_ms"] == 2_000
    assert options["grpc.max_connection_age_ms"] == 120_000
    assert options["grpc.max_connection_age_grace_ms"] == 15_000


def test_zero_max_connection_age_keeps_connections_forever(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVSERVE_MAX_CONNECTION_AGE_SECONDS", "0")
    options = dict(grpc_server_options(Settings()))
    assert "grpc.max_connection_age_ms" not in options
    assert "grpc.max_connection_age_grace_ms" not in options


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("keepalive_time_seconds", 0),
        ("keepalive_timeout_seconds", -1),
        ("keepalive_min_ping_interval_seconds", 0),
        ("max_connection_age_seconds", -1),
        ("max_connection_age_grace_seconds", -1),
    ],
)
def test_keepalive_settings_reject_nonsense(name: str, value: float) -> None:
    with pytest.raises(ValueError, match=name):
        Settings(**{name: value})


class StateLog:
    """Every connectivity state a channel goes through, in order, for a test to wait on."""

    def __init__(self) -> None:
        self.states: list[Connectivity] = []
        self._changed = threading.Condition()

    def __call__(self, state: Connectivity) -> None:
        with self._changed:
            self.states.append(state)
            self._changed.notify_all()

    def wait_for(self, state: Connectivity, after: int, timeout: float) -> int:
        """Index of the first `state` at or after index `after`, waiting up to `timeout` seconds."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for index in range(after, len(self.states)):
                    if self.states[index] is state:
                        return index
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no {state} after index {after} within {timeout} s: {self.states}")
                self._changed.wait(left)


def test_a_connection_is_closed_after_its_maximum_age_and_the_client_reconnects(tmp_path: Path) -> None:
    """GOAWAY after the maximum age: the channel goes IDLE by itself, and the next call reconnects."""
    empty_repository = tmp_path / "models"
    empty_repository.mkdir()
    server = start_server(
        empty_repository,
        tmp_path / "server.log",
        {
            "CONVSERVE_MAX_CONNECTION_AGE_SECONDS": "1",
            "CONVSERVE_MAX_CONNECTION_AGE_GRACE_SECONDS": "1",
            "CONVSERVE_REPOSITORY_POLL_SECONDS": "0",
        },
    )
    try:
        log = StateLog()
        with grpc.insecure_channel(server.target) as channel:
            channel.subscribe(log, try_to_connect=False)
            health = health_pb2_grpc.HealthStub(channel)
            check = health_pb2.HealthCheckRequest(service="liveness")

            assert health.Check(check, timeout=5).status == health_pb2.HealthCheckResponse.SERVING
            ready = log.wait_for(Connectivity.READY, 0, timeout=5)
            connected_at = time.monotonic()
            # Nothing sent, nothing asked: the server ends the connection (1 s +/-10 % jitter).
            idle = log.wait_for(Connectivity.IDLE, ready + 1, timeout=10)
            age = time.monotonic() - connected_at
            assert 0.5 < age < 5, f"connection closed after {age:.2f} s, expected about 1 s"
            assert Connectivity.TRANSIENT_FAILURE not in log.states[ready:idle], log.states

            # The next call opens a new connection, which is also closed when it is old enough.
            assert health.Check(check, timeout=5).status == health_pb2.HealthCheckResponse.SERVING
            again = log.wait_for(Connectivity.READY, idle + 1, timeout=5)
            log.wait_for(Connectivity.IDLE, again + 1, timeout=10)
            channel.unsubscribe(log)
    finally:
        assert server.stop() == 0


def test_streams_per_connection_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    assert dict(grpc_server_options(Settings()))["grpc.max_concurrent_streams"] == 1024
    monkeypatch.setenv("CONVSERVE_MAX_CONCURRENT_STREAMS", "8")
    assert dict(grpc_server_options(Settings()))["grpc.max_concurrent_streams"] == 8
