"""Fuzzing the device side: the sans-IO codec with hypothesis, and a live server
with random connections (a bounded budget here; bench/fuzz_devices.py runs long)."""

import os
import random
import socket
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blynkota.protocol import (
    DEFAULT_MAX_BODY,
    NEED_DATA,
    FrameReader,
    Internal,
    RemoteProtocolError,
    info_number,
)

from .devices import TOKEN, RawDevice
from .fuzzing import random_connection


@settings(max_examples=400, deadline=None)
@given(st.lists(st.binary(max_size=300), max_size=20))
def test_the_codec_takes_any_bytes_with_an_event_or_a_protocol_error(chunks):
    reader = FrameReader()
    for chunk in chunks:
        reader.feed(chunk)
        while True:
            try:
                event = reader.next_event()
            except RemoteProtocolError:
                return  # the session closes the connection: nothing else may be raised
            if event is NEED_DATA:
                break
            if isinstance(event, Internal) and event.is_info:
                for value in event.info().values():
                    number = info_number(value)
                    assert number is None or 0 <= number <= 999_999_999
        # Nothing is buffered beyond one frame's worth: a liar's length is refused.
        assert reader.buffered <= sum(map(len, chunks))
        assert reader.buffered < 5 + DEFAULT_MAX_BODY + 300


@pytest.fixture
def device_server(server, fleet):
    fleet.add_device("owner@example.com", "Farm", name="pump", token=TOKEN)
    return server


def _open_files(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_random_device_connections_leave_no_traceback_and_nothing_open(device_server):
    """300 connections of mangled frames and garbage (seeded: a failure repeats)."""
    rng = random.Random(20261128)
    pid = device_server.process.pid
    files_before = _open_files(pid)
    for _ in range(300):
        with socket.create_connection(("127.0.0.1", device_server.http_port), timeout=5) as sock:
            try:
                pieces, _ = random_connection(rng, TOKEN)
                for piece in pieces:
                    sock.sendall(piece)
                sock.shutdown(socket.SHUT_WR)
                sock.settimeout(2)
                while sock.recv(4096):
                    pass
            except OSError:
                pass  # closed by the server mid-send: that is one of its answers
    device = RawDevice(device_server.http_port)
    try:
        assert device.log_in()[0] is not None  # still serving
    finally:
        device.close()
    deadline = time.monotonic() + 10
    while _open_files(pid) > files_before + 5 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _open_files(pid) <= files_before + 5
    log = device_server.log()
    assert "Traceback" not in log and "internal error" not in log
