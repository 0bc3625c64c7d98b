"""The relay's two streams with bytes alone (protocol/relay.py): random frames of every
type and length both ways, cut into random segments, blynkota's `ota` frames written at
random moments. Both streams come out byte for byte as they went in, but for blynkota's
frames and the device's replies to them, and no upstream frame is ever cut by one."""

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blynkota.protocol import OTA_MSG_ID, Command, Internal, Login, RemoteProtocolError
from blynkota.protocol.relay import RelayStreams

HEADER = struct.Struct("!BHH")
TOKEN = "0123456789abcdef0123456789abcdef"
OTA = HEADER.pack(Command.INTERNAL, OTA_MSG_ID, 9) + b"ota\0http:"


def frame(command: int, msg_id: int, body: bytes) -> bytes:
    if command == Command.RESPONSE:
        return HEADER.pack(command, msg_id, len(body) % 256)  # the length field is a status
    return HEADER.pack(command, msg_id, len(body)) + body


frames = st.builds(
    frame,
    st.integers(0, 255),  # every command type, the unknown and the reserved ones too
    st.integers(0, 0xFFFF),
    st.one_of(st.binary(max_size=40), st.binary(min_size=900, max_size=1100)),
)


# A device's RESPONSE with the `ota` message id, while blynkota owes it one, is
# taken for its reply: the one frame a relay cannot tell apart (README).
device_frames_ = frames.filter(lambda data: data[:3] != HEADER.pack(0, OTA_MSG_ID, 0)[:3])


def cut(data: bytes, points: list[int]) -> list[bytes]:
    """`data` in segments, cut at `points` (anywhere, a frame's header included)."""
    marks = sorted({p % (len(data) + 1) for p in points} | {0, len(data)})
    return [data[a:b] for a, b in zip(marks, marks[1:], strict=False) if b > a]


@settings(max_examples=300, deadline=None)
@given(
    device_frames=st.lists(device_frames_, max_size=25),
    upstream_frames=st.lists(frames, max_size=25),
    device_cuts=st.lists(st.integers(0, 1 << 16), max_size=30),
    upstream_cuts=st.lists(st.integers(0, 1 << 16), max_size=30),
    ota_after=st.lists(st.integers(0, 60), max_size=4),
    replies=st.lists(st.booleans(), max_size=4),
    read_by_frame=st.booleans(),
)
def test_both_streams_pass_unchanged_and_ota_frames_stand_between_upstream_frames(
    device_frames, upstream_frames, device_cuts, upstream_cuts, ota_after, replies, read_by_frame
):
    """`read_by_frame`: each read one whole frame, as most are (the streams' short way)."""
    streams = RelayStreams(max_device_body=0xFFFF)
    upstream_bytes = b"".join(upstream_frames)
    device_bytes = b"".join(device_frames)
    to_device, injected_at = bytearray(), []
    segments = upstream_frames if read_by_frame else cut(upstream_bytes, upstream_cuts)
    for index, segment in enumerate(segments):
        out, _ = streams.from_upstream(segment)
        to_device += out
        for _ in range(sum(1 for at in ota_after if at % (len(segments) + 1) == index)):
            injected_at.append(len(to_device))
            to_device += streams.ours(OTA)
    # The device's replies to blynkota's frames, among its own frames.
    owed = len(injected_at)
    answered = [reply for reply in replies[:owed] if reply]
    ours_answered = [HEADER.pack(Command.RESPONSE, OTA_MSG_ID, 200) for _ in answered]
    device_bytes += b"".join(ours_answered)
    to_upstream = bytearray()
    reads = device_frames + ours_answered if read_by_frame else cut(device_bytes, device_cuts)
    for segment in reads:
        out, _ = streams.from_device(segment)
        to_upstream += out

    assert bytes(to_upstream) == b"".join(device_frames)  # the replies left out, nothing else
    without_ours = bytearray(to_device)
    for at in reversed(injected_at):
        del without_ours[at : at + len(OTA)]
    assert bytes(without_ours) == upstream_bytes
    boundaries = _boundaries(upstream_bytes)
    shift = 0
    for at in injected_at:
        assert at - shift in boundaries, "an ota frame inside an upstream frame"
        shift += len(OTA)


def _boundaries(data: bytes) -> set[int]:
    at, found = 0, {0}
    while at + 5 <= len(data):
        command, _, length = HEADER.unpack_from(data, at)
        at += 5 if command == Command.RESPONSE else 5 + length
        found.add(at)
    return found


def test_what_blynkota_reads_on_the_way():
    streams = RelayStreams(max_device_body=4096)
    login = HEADER.pack(Command.HW_LOGIN, 1, 32) + TOKEN.encode()
    info = frame(Command.INTERNAL, 2, b"ver\x000.6.1\x00build\x00Nov 29 2018 12:00:00\x00")
    out, seen = streams.from_device(login + info[:7])
    assert out == login and seen == [Login(1, TOKEN, False)]
    out, seen = streams.from_device(info[7:])
    assert out == info and isinstance(seen[0], Internal) and seen[0].info()["ver"] == "0.6.1"
    out, answers = streams.from_upstream(HEADER.pack(Command.RESPONSE, 2, 200))
    assert answers == [(2, 200)]
    # A device's RESPONSE with the ota message id goes upstream unless blynkota owes one.
    reply = HEADER.pack(Command.RESPONSE, OTA_MSG_ID, 200)
    assert streams.from_device(reply) == (reply, [])
    # A read of one whole frame: an info message is still read, a pin's write passes.
    out, seen = streams.from_device(info)
    assert out == info and isinstance(seen[0], Internal)
    write = frame(Command.HARDWARE, 9, b"vw\x005\x001")
    assert streams.from_device(write) == (write, ())
    assert streams.device_frames == 5


def test_a_device_frame_past_the_bound_ends_the_relay():
    streams = RelayStreams(max_device_body=100)
    with pytest.raises(RemoteProtocolError, match="exceeds"):
        streams.from_device(HEADER.pack(Command.HARDWARE, 3, 101))
