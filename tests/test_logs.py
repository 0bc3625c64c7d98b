"""Log lines: a storm's per-device lines are written once per turn of the event loop;
every other line at once; the log keeps its order and holds nothing past the turn."""

import io
import logging
import re
import sys
import time

import gevent

from blynkota.logs import PER_TURN, TEXT_FORMAT, LinesPerTurn, TextLines


class CountedWrites(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


def _logger(stream) -> tuple[logging.Logger, LinesPerTurn]:
    handler = LinesPerTurn(stream)
    handler.setFormatter(TextLines())
    logger = logging.getLogger(f"blynkota.test.{id(stream)}")
    logger.propagate = False
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    return logger, handler


def test_the_per_device_lines_of_one_turn_are_written_together_at_its_end():
    stream = CountedWrites()
    logger, _ = _logger(stream)
    for number in range(3):
        logger.info("line %d", number, extra=PER_TURN)
    assert stream.writes == 0  # still in this turn

    gevent.sleep(0)  # the turn ends
    assert stream.writes == 1
    lines = stream.getvalue().splitlines()
    assert [line.split(": ", 1)[1] for line in lines] == ["line 0", "line 1", "line 2"]
    stamp = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO blynkota\.test\.\d+$")
    assert all(stamp.match(line.split(": ", 1)[0]) for line in lines), lines

    logger.info("next turn", extra=PER_TURN)
    gevent.sleep(0)
    assert stream.writes == 2
    assert stream.getvalue().endswith(": next turn\n")


def test_any_other_line_is_written_at_once_after_those_held():
    stream = CountedWrites()
    logger, _ = _logger(stream)
    logger.info("held", extra=PER_TURN)
    logger.warning("at once")
    assert stream.writes == 1  # one write: the held line, then this one
    assert [line.split(": ", 1)[1] for line in stream.getvalue().splitlines()] == [
        "held",
        "at once",
    ]
    gevent.sleep(0)
    assert stream.writes == 1  # nothing was left for the end of the turn


def test_a_flush_writes_what_is_held_as_logging_does_at_exit():
    stream = CountedWrites()
    logger, handler = _logger(stream)
    logger.info("last words", extra=PER_TURN)
    handler.flush()  # logging.shutdown() flushes every handler at exit
    assert stream.getvalue().endswith(": last words\n")
    gevent.sleep(0)
    assert stream.writes == 1  # the turn's callback finds nothing more to write


def test_the_time_is_formatted_per_second_and_stays_exact():
    formatter = TextLines()
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "m", None, None)
    for created in (1_800_000_000.25, 1_800_000_000.75, 1_800_000_001.5):
        record.created, record.msecs = created, (created - int(created)) * 1000
        expected = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(created))
        assert formatter.formatTime(record) == f"{expected},{int(record.msecs):03d}"


def test_a_line_is_the_one_the_standard_formatter_writes():
    """TextLines puts a line together itself; it reads as logging's own TEXT_FORMAT."""
    ours, standard = TextLines(), logging.Formatter(TEXT_FORMAT)
    records = [
        logging.LogRecord("blynkota.x", logging.INFO, __file__, 1, "plain", None, None),
        logging.LogRecord(
            "blynkota.y", logging.WARNING, __file__, 1, "device %s (id %d): %r", ("t", 5, "b"), None
        ),
    ]
    try:
        raise ValueError("boom")
    except ValueError:
        failed = sys.exc_info()
    records.append(
        logging.LogRecord("blynkota.z", logging.ERROR, __file__, 1, "x %s", ("y",), failed)
    )
    for record in records:
        line = ours.format(record)
        record.exc_text = None  # the standard formatter caches the traceback's text too
        assert line == standard.format(record)
    assert "ValueError: boom" in line
