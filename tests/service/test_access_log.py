"""The access log: one line per call, formatted once, written in blocks, nothing lost at exit."""

from __future__ import annotations

import asyncio
import io
import json
import logging

import pytest

from service.observability.logs import ACCESS_LOGGER, AccessLog


def configured(
    fmt: str = "json", level: int = logging.INFO, **options: float
) -> tuple[AccessLog, io.StringIO]:
    stream = io.StringIO()
    logger = logging.getLogger(f"{ACCESS_LOGGER}.test-{fmt}-{level}")
    logger.setLevel(level)
    access = AccessLog(**options)
    access.configure(stream, fmt, logger)
    return access, stream


def fields(n: int) -> dict[str, object]:
    return {"request_id": f"id{n}", "method": "/inference.GRPCInferenceService/ModelInfer", "code": "OK"}


def test_lines_on_the_loop_are_written_together_after_the_delay() -> None:
    access, stream = configured(flush_after=0.05)

    async def calls() -> tuple[str, str]:
        for n in range(3):
            access.write(logging.INFO, "rpc", fields(n))
        written_at_once = stream.getvalue()
        await asyncio.sleep(0.1)
        return written_at_once, stream.getvalue()

    at_once, later = asyncio.run(calls())
    assert at_once == ""
    entries = [json.loads(line) for line in later.splitlines()]
    assert [e["request_id"] for e in entries] == ["id0", "id1", "id2"]
    assert all((e["message"], e["level"], e["logger"]) == ("rpc", "INFO", ACCESS_LOGGER) for e in entries)
    assert all(e["ts"].endswith("Z") for e in entries)


def test_a_full_buffer_is_written_at_once_and_flush_writes_the_rest() -> None:
    access, stream = configured(flush_after=60, max_lines=2)

    async def calls() -> list[int]:
        sizes = []
        for n in range(6):
            access.write(logging.INFO, "rpc", fields(n))
            sizes.append(len(stream.getvalue().splitlines()))
        access.flush()
        sizes.append(len(stream.getvalue().splitlines()))
        return sizes

    sizes = asyncio.run(calls())
    assert sizes[:6] == [0, 2, 2, 4, 4, 6], sizes  # blocks of two went out before the timer
    assert sizes[-1] == 6


def test_outside_an_event_loop_a_line_is_written_at_once() -> None:
    access, stream = configured()
    access.write(logging.INFO, "rpc", fields(1))
    assert json.loads(stream.getvalue())["request_id"] == "id1"


def test_the_loggers_level_still_decides() -> None:
    access, stream = configured(level=logging.WARNING)
    access.write(logging.INFO, "rpc", fields(1))
    access.write(logging.WARNING, "rpc", fields(2))
    assert [json.loads(line)["request_id"] for line in stream.getvalue().splitlines()] == ["id2"]


def test_text_format_matches_the_other_lines() -> None:
    access, stream = configured("text")
    access.write(logging.INFO, "rpc", fields(1))
    line = stream.getvalue()
    assert f" INFO {ACCESS_LOGGER}: rpc request_id=id1 " in line
    assert line.endswith("code=OK\n")


def test_before_configure_lines_go_through_logging(caplog: pytest.LogCaptureFixture) -> None:
    access = AccessLog()
    with caplog.at_level(logging.INFO, logger=ACCESS_LOGGER):
        access.write(logging.INFO, "rpc", fields(7))
    (record,) = [r for r in caplog.records if r.name == ACCESS_LOGGER]
    assert record.fields["request_id"] == "id7"


def test_lines_left_by_a_finished_event_loop_are_written_by_the_next_one() -> None:
    access, stream = configured(flush_after=60)

    async def one_call(n: int) -> None:
        access.write(logging.INFO, "rpc", fields(n))

    asyncio.run(one_call(1))  # its loop ends before the timer fires
    asyncio.run(one_call(2))
    assert [json.loads(line)["request_id"] for line in stream.getvalue().splitlines()] == ["id1", "id2"]


TRICKY_VALUES = [
    "plain",
    'a "quoted" word',
    "back\\slash",
    "new\nline and tab\t",
    "\x00\x1f\x7f control",
    "non-ASCII: é, 猫, 🙂",
    "",
    0,
    -7,
    10**30,
    1.5,
    1e-7,
    float("nan"),
    float("inf"),
    True,
    False,
    None,
    [1, "two"],
    b"bytes",
]


@pytest.mark.parametrize("value", TRICKY_VALUES, ids=repr)
def test_a_json_line_is_what_json_dumps_would_write(value: object) -> None:
    """The line is built without json.dumps for plain values; it must not differ from it."""
    access, stream = configured()
    access.write(logging.INFO, "rpc", {"request_id": "x", "value": value})
    access.flush()
    line = stream.getvalue()
    _, _, tail = line.partition('"message": "rpc", ')
    assert tail == json.dumps({"request_id": "x", "value": value}, default=str)[1:] + "\n"
    assert json.loads(line)["logger"] == ACCESS_LOGGER
