import io
import time

import pytest

from modules.utils import Deadline, PhaseTimer, UsageError, check_device, format_duration, parse_duration, say


@pytest.mark.parametrize("text,seconds", [
    ("9h", 32400), ("90m", 5400), ("600s", 600), ("8h30m", 30600), ("1h2m3s", 3723), ("3600", 3600), ("12.5", 12.5),
    (" 2m ", 120), ("1.5h", 5400),
])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "abc", "9x", "h", "-5", "0", "5m3h"])
def test_parse_duration_rejects(text):
    with pytest.raises(UsageError):
        parse_duration(text)


def test_format_duration():
    assert format_duration(42.5) == "42.5s"
    assert format_duration(600) == "10m00s"
    assert format_duration(3725) == "1h02m05s"


def test_deadline_counts_down():
    d = Deadline(10, start=time.monotonic() - 4)
    assert 3.9 < d.elapsed() < 5
    assert 5 < d.remaining() < 6.1


def test_phase_timer_accumulates():
    t = PhaseTimer()
    with t.phase("a"):
        time.sleep(0.01)
    with t.phase("a"):
        pass
    assert t.seconds["a"] >= 0.01 and "a" in t.summary()


def test_check_device_cpu():
    assert check_device("cpu").type == "cpu"


def test_say_drops_a_stream_that_fails_and_never_raises():
    """A write to a closed stream (a reader gone) is dropped, and so is every later one: logging never ends a run."""
    class Broken:
        writes = 0

        def write(self, text):
            Broken.writes += 1
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            raise BrokenPipeError(32, "Broken pipe")

    stream = Broken()
    say("one", stream)
    say("two", stream)
    assert Broken.writes == 1
    closed = io.StringIO()
    closed.close()
    say("three", closed)  # ValueError: I/O operation on closed file
