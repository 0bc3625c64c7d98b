"""A relayed session's two byte streams, cut at frame boundaries (sans-IO).

In relay mode (hardware/relay.py) blynkota stands between a device and its
Blynk server. Every frame passes through unchanged, both ways, in order;
the only exceptions are blynkota's own frames to the device (`ota`), and
the device's replies to them, which the upstream never sent and must never
see. The upstream judges the protocol: no command type, message id or body
is refused here, only a frame longer than the bound.

Bytes are passed on in whole frames: an incomplete frame waits here for its
end, so blynkota's own frame, written between two calls, always stands at a
frame boundary of the stream to the device, never inside an upstream frame.
"""

import contextlib
import struct
from collections.abc import Sequence

from .codec import RemoteProtocolError, decode_frame
from .constants import HEADER_SIZE, HW_LOGIN, INTERNAL, LOGIN, OTA_MSG_ID, RESPONSE
from .events import Event

__all__ = ["MAX_RELAYED_BODY", "RelayStreams"]

_HEADER = struct.Struct("!BHH")
# A frame's length field is 16 bits: the upstream may send any of them.
MAX_RELAYED_BODY = 0xFFFF


class _FrameCutter:
    """A byte stream cut into whole frames; the rest waits for more bytes."""

    __slots__ = ("_buffer", "max_body")

    def __init__(self, max_body: int) -> None:
        self._buffer = bytearray()
        self.max_body = max_body

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def single(self, data: bytes) -> int | None:
        """The command of `data` if it is one whole frame with a body (not a
        RESPONSE) and nothing is held: most reads, passed on without a look."""
        if self._buffer or len(data) < HEADER_SIZE:
            return None
        command, _msg_id, length = _HEADER.unpack_from(data)
        if command == RESPONSE or HEADER_SIZE + length != len(data) or length > self.max_body:
            return None
        return command

    def frames(self, data: bytes):
        """(command, msg_id, length field, start, end) of every whole frame in
        what was held and `data`, and the bytes they index into. Most reads are
        whole frames: those bytes are then `data` itself, copied nowhere."""
        if self._buffer:
            self._buffer += data
            data = bytes(self._buffer)
            self._buffer.clear()
        found, start, size = [], 0, len(data)
        while size - start >= HEADER_SIZE:
            command, msg_id, length = _HEADER.unpack_from(data, start)
            if command == RESPONSE:
                end = start + HEADER_SIZE  # the length field is the status: no body
            else:
                if length > self.max_body:
                    raise RemoteProtocolError(
                        f"frame body of {length} bytes exceeds the {self.max_body}-byte limit"
                    )
                end = start + HEADER_SIZE + length
                if end > size:
                    break
            found.append((command, msg_id, length, start, end))
            start = end
        if start == size:
            return found, data
        self._buffer += data[start:]  # a frame's start: it waits for its end
        return found, data[:start]


# What blynkota reads of the device's frames on the way.
_READ = frozenset((INTERNAL, HW_LOGIN, LOGIN))


def _without(data: bytes, runs: list[tuple[int, int]]) -> bytes:
    kept, at = [], 0
    for start, end in runs:
        kept.append(data[at:start])
        at = end
    kept.append(data[at:])
    return b"".join(kept)


class RelayStreams:
    """Bytes from each side in, the bytes for the other side out, and what
    blynkota reads on the way: the device's logins and INTERNAL frames (its
    info message), and the upstream's answers (RESPONSE frames)."""

    __slots__ = ("_device", "_upstream", "owed_replies", "device_frames", "upstream_frames")

    def __init__(self, max_device_body: int) -> None:
        self._device = _FrameCutter(max_device_body)
        self._upstream = _FrameCutter(MAX_RELAYED_BODY)
        # Frames of blynkota's the device may still answer: its RESPONSE with
        # the `ota` message id is blynkota's, not the upstream's.
        self.owed_replies = 0
        self.device_frames = self.upstream_frames = 0  # whole frames passed, each way

    @property
    def buffered(self) -> int:
        """Bytes held for want of their frame's end, both ways."""
        return self._device.buffered + self._upstream.buffered

    def from_device(self, data: bytes) -> tuple[bytes, Sequence[Event]]:
        """The bytes for the upstream, and the device's logins and INTERNAL frames."""
        command = self._device.single(data)
        if command is not None and command not in _READ:  # a virtual pin's write, say
            self.device_frames += 1
            return data, ()
        found, whole = self._device.frames(data)
        self.device_frames += len(found)
        seen: list[Event] = []
        dropped = []  # (start, end) of the device's replies to blynkota's frames
        for command, msg_id, _length, start, end in found:
            if command == RESPONSE and msg_id == OTA_MSG_ID and self.owed_replies:
                self.owed_replies -= 1
                dropped.append((start, end))
            elif command in _READ:
                # A token this reading cannot take is the upstream's to judge.
                with contextlib.suppress(RemoteProtocolError):
                    seen.append(decode_frame(command, msg_id, whole[start + HEADER_SIZE : end]))
        return (_without(whole, dropped) if dropped else whole), seen

    def from_upstream(self, data: bytes) -> tuple[bytes, Sequence[tuple[int, int]]]:
        """The bytes for the device, and the (message id, status) of every RESPONSE."""
        if self._upstream.single(data) is not None:  # one frame, no answer in it
            self.upstream_frames += 1
            return data, ()
        found, whole = self._upstream.frames(data)
        self.upstream_frames += len(found)
        answers = [
            (msg_id, length) for command, msg_id, length, _, _ in found if command == RESPONSE
        ]
        return whole, answers

    def ours(self, frame: bytes) -> bytes:
        """Blynkota's own frame for the device, counted for the reply it may bring.
        Written between two calls of `from_upstream`, it stands at a frame boundary."""
        self.owed_replies += 1
        return frame
