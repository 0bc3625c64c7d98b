"""The load of bench/relay.py: the devices and the upstream, each one epoll loop.

`python bench/relay_load.py upstream PORT [HOST ...]`: a Blynk server stand-in
that answers every frame with a 200 and sends every HARDWARE frame straight
back, as an app writing the pin would, on PORT of each HOST (127.0.0.1 by
default). Several may serve one port (SO_REUSEPORT): one process holds at
most 20,000 connections here. Connections to one address and port take one
local port each, of 28,000 (the kernel's range here): paths that add up to
more reach it by addresses of their own (127.0.0.2, ...), all loopback.

`python bench/relay_load.py devices PORT COUNT SECONDS AT_ONCE`: COUNT devices
log in (AT_ONCE under way at a time), then print `ready N` and wait for lines
on stdin. Each `go` (or `go S`) is a phase: each device writes a 20-byte
virtual pin once a second, at its own moment of the second, for SECONDS (or
S) seconds, and times its echo; then one JSON line: the round trips in
seconds. The devices stay logged in between phases; `end` or the end of
stdin ends them.

A device keeps its own schedule, as a board's BlynkTimer does (the library's
SimpleTimer: the next run is due a period after the last one was due, not
after it ran): a write that went out late, behind a stall of this process
or of a relay, does not move the next one. Timed from when it ran instead,
every device that one stall delayed wrote at the same moment from then on,
each second to the end of the phase: 100 to 400 frames at once, a burst no
fleet of independent boards sends, that set the p99 of every path.

A round trip is timed from just before its write to its echo's arrival, as
the kernel stamped it (SO_TIMESTAMPNS), not to when this process came to
read it: in a burst of a few hundred echoes the last was read several ms
after it had come, this process's own queue, counted in every path's p99.

Plain epoll, no gevent: on a machine of two cores the load shares them with
the relay, and the gevent versions of both cost more CPU than the relay
itself (a greenlet and a timer per device, a greenlet per upstream
connection). The latency measured was then the load's own queue: HAProxy's
p99 went from 2.6 ms to 110 ms at 6,000 devices. Every loop is bounded by a
deadline.
"""

import contextlib
import heapq
import json
import math
import random
import select
import socket
import struct
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from blynkota.protocol import encode_info, encode_login  # noqa: E402

HEADER = struct.Struct("!BHH")
# Receive timestamps (Linux; the socket module does not name them): a
# struct timespec of CLOCK_REALTIME with each read.
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
TIMESPEC = struct.Struct("@qq")
TIMESTAMP_SPACE = socket.CMSG_SPACE(TIMESPEC.size)
RESPONSE, HARDWARE = 0, 20
DEADLINE = 120.0
INFO = {"ver": "0.6.1", "h-beat": "60", "buff-in": "1024", "dev": "ESP8266",
        "build": "Jan  1 2018 00:00:00"}  # fmt: skip


def frames(buffer: bytearray):
    """Cut the whole frames off the front of `buffer`: (command, id, frame) each."""
    start = 0
    while len(buffer) - start >= 5:
        command, msg_id, length = HEADER.unpack_from(buffer, start)
        size = 5 if command == RESPONSE else 5 + length
        if len(buffer) - start < size:
            break
        yield command, msg_id, bytes(buffer[start : start + size])
        start += size
    del buffer[:start]


# --- the upstream ------------------------------------------------------------------------


def serve_upstream(port: int, hosts: list[str]) -> None:
    poller = select.epoll()
    listeners = {}
    for host in hosts:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # one of several
        listener.bind((host, port))
        listener.listen(8192)
        listener.setblocking(False)
        poller.register(listener.fileno(), select.EPOLLIN)
        listeners[listener.fileno()] = listener
    connections: dict[int, tuple[socket.socket, bytearray]] = {}
    while True:  # until the bench terminates it
        for fd, _events in poller.poll():
            if fd in listeners:
                _accept_all(listeners[fd], poller, connections)
                continue
            sock, buffer = connections[fd]
            try:
                data = sock.recv(65536)
            except OSError:
                data = b""
            if not data:
                poller.unregister(fd)
                del connections[fd]
                sock.close()
                continue
            buffer += data
            replies = [
                frame if command == HARDWARE else HEADER.pack(RESPONSE, msg_id, 200)
                for command, msg_id, frame in frames(buffer)
                if command != RESPONSE
            ]
            if replies:
                with contextlib.suppress(OSError):  # closed: its end is read next
                    sock.send(b"".join(replies))  # a few bytes: the buffer takes them


def _accept_all(listener, poller, connections) -> None:
    while True:
        try:
            sock, _ = listener.accept()
        except BlockingIOError:
            return
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        connections[sock.fileno()] = (sock, bytearray())
        poller.register(sock.fileno(), select.EPOLLIN)


# --- the devices -------------------------------------------------------------------------


class Device:
    __slots__ = ("index", "token", "sock", "buffer", "step", "message", "sent_at", "due")

    def __init__(self, index: int) -> None:
        self.index, self.token = index, f"{index:032x}"  # the tokens bench/relay.py provisions
        self.sock: socket.socket | None = None
        self.buffer = bytearray()
        self.step = 0  # 0 login sent, 1 info sent, 2 held
        self.message = 3
        self.sent_at = 0.0
        self.due = 0.0  # when its write of this second was due (its timer's schedule)


def run_devices(port: int, count: int, seconds: float, at_once: int) -> None:
    devices = [Device(index) for index in range(count)]
    poller = select.epoll()
    by_fd: dict[int, Device] = {}
    held = _log_in(devices, port, at_once, poller, by_fd)
    print(f"ready {held}", flush=True)
    for _ in range(10_000):  # phases, until `end` or the end of stdin
        words = sys.stdin.readline().split()
        if words[:1] != ["go"]:
            return
        phase = float(words[1]) if len(words) > 1 else seconds
        print(json.dumps(_steady(devices, phase, poller, by_fd)), flush=True)


def _log_in(devices, port: int, at_once: int, poller, by_fd) -> int:
    waiting, under_way, held = list(devices), 0, 0
    deadline = time.monotonic() + DEADLINE
    while (waiting or under_way) and time.monotonic() < deadline:
        while waiting and under_way < at_once:
            device = waiting.pop()
            device.sock = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
            device.sock.setblocking(False)
            device.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            device.sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            by_fd[device.sock.fileno()] = device
            poller.register(device.sock.fileno(), select.EPOLLIN)
            device.sock.send(encode_login(device.token, 1))
            under_way += 1
        for device, command, _msg_id, _came in _heard(poller, by_fd, 0.1):
            if command != RESPONSE:
                continue
            device.step += 1
            if device.step == 1:
                device.sock.send(encode_info(INFO, 2))
            elif device.step == 2:
                under_way -= 1
                held += 1
    return held


def _heard(poller, by_fd, timeout: float):
    """The frames the devices received within `timeout`: (device, command, id,
    when the kernel received the bytes, in time.time()'s clock) each."""
    for fd, _events in poller.poll(timeout):
        device = by_fd[fd]
        data, ancillary, _flags, _address = device.sock.recvmsg(4096, TIMESTAMP_SPACE)
        if not data:
            raise ConnectionError("a relay closed a device")
        came = time.time()
        for level, kind, value in ancillary:
            if (level, kind) == (socket.SOL_SOCKET, SO_TIMESTAMPNS):
                seconds, nanoseconds = TIMESPEC.unpack(value)
                came = seconds + nanoseconds / 1e9
        device.buffer += data
        for command, msg_id, _frame in frames(device.buffer):
            yield device, command, msg_id, came


def _steady(devices, seconds: float, poller, by_fd) -> list[float]:
    now = time.perf_counter()
    ends = now + seconds
    # Each at its own moment of the first second, if that is before the end (none
    # for seconds=0: the devices only stay logged in while their memory is read).
    due = [(at, index) for index in range(len(devices)) if (at := now + random.random()) < ends]
    heapq.heapify(due)
    for at, index in due:
        devices[index].due = at
    latencies: list[float] = []
    waiting_for = 0  # echoes not yet heard
    while (due or waiting_for) and time.perf_counter() < ends + 10:
        now = time.perf_counter()
        while due and due[0][0] <= now:
            _, index = heapq.heappop(due)
            device = devices[index]
            body = b"vw\x005\x00" + b"%010d" % device.message  # a 20-byte frame
            device.sent_at = time.time()  # the receive timestamps' clock
            device.sock.send(HEADER.pack(HARDWARE, device.message, len(body)) + body)
            waiting_for += 1
        timeout = max(0.0, min(due[0][0] - time.perf_counter(), 0.05)) if due else 0.05
        for device, command, msg_id, came in _heard(poller, by_fd, timeout):
            if command == HARDWARE and msg_id == device.message:
                heard = time.perf_counter()
                latencies.append(came - device.sent_at)
                waiting_for -= 1
                device.message += 1
                # Its next write: the first moment of its schedule after this echo
                # (one write at a time per device: its echo is what is timed).
                device.due += max(1, math.ceil(heard - device.due))
                if device.due < ends:
                    heapq.heappush(due, (device.due, device.index))
    return latencies


if __name__ == "__main__":
    role, port = sys.argv[1], int(sys.argv[2])
    if role == "upstream":
        serve_upstream(port, sys.argv[3:] or ["127.0.0.1"])
    else:
        count, seconds, at_once = int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
        run_devices(port, count, seconds, at_once)
