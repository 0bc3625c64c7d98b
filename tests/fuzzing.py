"""Random device traffic for fuzzing the device port: frames that are almost
right (a real login, then mangled frames), and plain garbage.

Shared by tests/test_fuzz.py (a bounded run in CI) and bench/fuzz_devices.py
(a long run by hand). Every choice comes from the `random.Random` passed in,
so a failing run is repeated with its seed.
"""

import random
import struct

from blynkota.protocol import Command, encode_frame, encode_info, encode_login

__all__ = ["random_connection"]

_COMMANDS = [int(command) for command in Command] + [1, 3, 99, 100, 200, 255]
_INFO_VALUES = ["10", "\u00b2", "9" * 400, "-5", "", "0.6.1", "\U0001f680" * 40, "x" * 300]
_INFO_KEYS = ["ver", "h-beat", "buff-in", "dev", "build", "fw", "tmpl", "cpu", "zz"]


def random_frame(rng: random.Random) -> bytes:
    kind = rng.randrange(8)
    msg_id = rng.choice([0, 1, rng.randrange(1, 0x10000)])
    if kind == 0:  # an info message with odd values
        fields = {rng.choice(_INFO_KEYS): rng.choice(_INFO_VALUES) for _ in range(rng.randrange(6))}
        return encode_info(fields, max(msg_id, 1))
    if kind == 1:  # a header whose length lies
        return struct.pack("!BHH", rng.choice(_COMMANDS), msg_id, rng.randrange(0x10000))
    if kind == 2:  # raw bytes
        return rng.randbytes(rng.randrange(1, 64))
    if kind == 3:  # a login (again), sometimes with a mangled token
        token = rng.choice(["a" * 32, "\xff\xfe".encode("latin-1").hex(), "tok en", ""])
        return struct.pack("!BHH", Command.HW_LOGIN, msg_id, len(token)) + token.encode("latin-1")
    body = rng.randbytes(rng.randrange(0, 200))
    command = rng.choice(_COMMANDS)
    return struct.pack("!BHH", command, msg_id, len(body)) + body


def random_connection(rng: random.Random, token: str) -> tuple[list[bytes], int]:
    """What one fuzzing connection sends, in the pieces it sends it in; how many frames."""
    frames = []
    if rng.random() < 0.7:
        frames.append(encode_login(token, 1))
        if rng.random() < 0.7:
            frames.append(encode_info({"ver": "0.6.1", "h-beat": "10", "dev": "ESP8266"}, 2))
    frames += [random_frame(rng) for _ in range(rng.randrange(1, 12))]
    if rng.random() < 0.2:
        frames.append(encode_frame(Command.PING, 7))
    data = b"".join(frames)
    # Cut into pieces at random places, as TCP may deliver them.
    cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randrange(0, 4))))
    pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    return pieces, len(frames)
