"""Protocol rules with bytes alone: no sockets (SPEC §2)."""

import pytest

from blynkota.protocol import (
    NEED_DATA,
    OTA_MSG_ID,
    Command,
    FrameReader,
    Ignored,
    Internal,
    LocalProtocolError,
    Login,
    Ping,
    RemoteProtocolError,
    Response,
    Status,
    Unknown,
    encode_info,
    encode_login,
    encode_ota,
    encode_ping,
    encode_response,
)

TOKEN = "0123456789abcdef0123456789abcdef"


def events(data: bytes, reader: FrameReader | None = None) -> list:
    reader = reader or FrameReader()
    reader.feed(data)
    found = []
    while (event := reader.next_event()) is not NEED_DATA:
        found.append(event)
    return found


def test_hw_login_frame_from_the_spec_decodes_to_a_login():
    frame = bytes.fromhex("1d00010020") + TOKEN.encode()
    assert events(frame) == [Login(msg_id=1, token=TOKEN, legacy=False)]


def test_old_clients_login_command_2_with_trailing_nul():
    frame = bytes([Command.LOGIN, 0, 1, 0, 33]) + TOKEN.encode() + b"\0"
    assert events(frame) == [Login(msg_id=1, token=TOKEN, legacy=True)]


def test_ok_response_bytes_match_the_spec():
    assert encode_response(1) == bytes.fromhex("00000100c8")
    assert encode_response(2, Status.OK) == bytes.fromhex("00000200c8")
    assert encode_response(1, Status.INVALID_TOKEN) == bytes.fromhex("0000010009")


def test_ping_round_trip_matches_the_spec():
    assert encode_ping(3) == bytes.fromhex("0600030000")
    assert events(bytes.fromhex("0600030000")) == [Ping(3)]


def test_info_message_words_and_fields():
    body = (
        b"ver\x000.6.1\x00h-beat\x0010\x00buff-in\x00256\x00dev\x00ESP8266\x00"
        b"build\x00Nov 29 2018 12:00:00\x00"
    )
    frame = bytes([Command.INTERNAL, 0, 2, 0, len(body)]) + body
    (event,) = events(frame)
    assert isinstance(event, Internal) and event.is_info
    assert event.info() == {
        "ver": "0.6.1",
        "h-beat": "10",
        "buff-in": "256",
        "dev": "ESP8266",
        "build": "Nov 29 2018 12:00:00",
    }


def test_info_keys_in_any_order_and_unknown_keys_are_kept_apart():
    fields = {"build": "May  8 2018 19:30:18", "zzz": "1", "ver": "0.6.1"}
    (event,) = events(encode_info(fields))
    assert event.is_info
    assert event.info()["build"] == "May  8 2018 19:30:18"  # double space kept exactly


def test_ota_command_bytes_match_the_spec():
    url = "http://192.168.1.10:8080/static/ota/abc.bin"
    frame = encode_ota(url, buff_in=256)
    body = b"ota\0" + url.encode()
    assert frame[:3] == bytes.fromhex("111e61")  # INTERNAL, msg id 7777
    assert frame[3:5] == len(body).to_bytes(2, "big")
    assert frame[5:] == body  # no trailing NUL
    assert OTA_MSG_ID == 0x1E61


def test_ota_command_that_does_not_fit_the_device_buffer_is_refused():
    url = "http://example.com/" + "x" * 300
    with pytest.raises(LocalProtocolError, match="receive buffer"):
        encode_ota(url, buff_in=256)
    assert encode_ota(url, buff_in=1024)
    # The C++ library reads a body as long as its buffer: that one fits.
    body_length = len(b"ota\0" + url.encode())
    assert encode_ota(url, buff_in=body_length)
    with pytest.raises(LocalProtocolError):
        encode_ota(url, buff_in=body_length - 1)


def test_message_id_zero_is_never_encoded():
    with pytest.raises(LocalProtocolError):
        encode_response(0)
    with pytest.raises(LocalProtocolError):
        encode_ping(0)


def test_frames_split_anywhere_need_more_data_then_decode():
    data = encode_login(TOKEN) + encode_info({"ver": "0.6.1"}) + encode_ping(3)
    reader = FrameReader()
    found = []
    for byte in data:
        reader.feed(bytes([byte]))
        while (event := reader.next_event()) is not NEED_DATA:
            found.append(event)
    assert [type(event) for event in found] == [Login, Internal, Ping]
    assert reader.buffered == 0


def test_oversized_length_field_is_a_remote_error_before_the_body_arrives():
    reader = FrameReader(max_body=1024)
    reader.feed(bytes([Command.HARDWARE, 0, 5, 0xFF, 0xFF]))
    with pytest.raises(RemoteProtocolError, match="exceeds"):
        reader.next_event()


def test_command_type_100_or_more_is_a_remote_error():
    with pytest.raises(RemoteProtocolError, match="out of range"):
        events(bytes([100, 0, 1, 0, 0]))


def test_known_unhandled_and_unknown_commands():
    hardware = bytes([Command.HARDWARE, 0, 4, 0, 4]) + b"vw\x001"
    assert events(hardware) == [Ignored(4, Command.HARDWARE, b"vw\x001")]
    assert events(bytes([50, 0, 5, 0, 0])) == [Unknown(5, 50)]


def test_response_from_device_has_status_in_length_and_no_body():
    assert events(bytes.fromhex("0000070005") + encode_ping(8)) == [Response(7, 5), Ping(8)]


def test_malformed_token_owes_invalid_token_status():
    frame = bytes([Command.HW_LOGIN, 0, 1, 0, 4]) + b"a b\xff"
    with pytest.raises(RemoteProtocolError) as raised:
        events(frame)
    assert raised.value.status == Status.INVALID_TOKEN
    assert raised.value.msg_id == 1


# The info message of each library generation (SPEC §7), as the board sends it.
INFO_LAYOUTS = {
    "0.6.1": {"ver": "0.6.1", "h-beat": "10", "buff-in": "256", "dev": "ESP8266",
              "fw": "1.0.1", "build": "Nov 29 2018 12:00:00"},
    "1.1.0": {"ver": "1.1.0", "h-beat": "45", "buff-in": "1024", "dev": "ESP32", "cpu": "ESP32",
              "con": "WiFi", "fw-type": "TMPLabc", "fw": "0.1.0",
              "build": "Jan  2 2023 10:00:00", "tmpl": "TMPLabc"},
    "1.3.2 Arduino": {"mcu": "1.0.0", "fw-type": "TMPLabc", "build": "Jan  2 2024 10:00:00",
                      "blynk": "1.3.2", "h-beat": "45", "buff-in": "1024", "dev": "NodeMCU",
                      "cpu": "ESP8266", "con": "WiFi", "tmpl": "TMPLabc"},
    "1.3.2 NCP": {"ncp": "2.0.1", "fw-type": "TMPLabc", "build": "Jan  2 2024 10:00:00",
                  "blynk": "1.3.2", "h-beat": "45", "buff-in": "1024", "dev": "ESP32-S3"},
}  # fmt: skip


@pytest.mark.parametrize("generation", INFO_LAYOUTS)
def test_an_info_message_is_known_by_its_content_in_every_library_generation(generation):
    fields = INFO_LAYOUTS[generation]
    (event,) = events(encode_info(fields))
    assert isinstance(event, Internal) and event.is_info
    assert event.info() == fields


@pytest.mark.parametrize(
    "words", [("rtc", "sync"), ("ota",), ("ota", "http://x/y.bin"), ("acon", "1"), ()]
)
def test_other_internal_frames_are_not_info_messages(words):
    body = b"\0".join(word.encode() for word in words)
    (event,) = events(bytes([Command.INTERNAL, 0, 9, 0, len(body)]) + body)
    assert isinstance(event, Internal) and not event.is_info


def test_the_conversation_gives_each_frame_its_answer_in_each_state():
    """One table for every session, parked or not (protocol/conversation.py), from bytes."""
    from blynkota.protocol import (
        ALREADY_REGISTERED,
        IGNORE,
        ILLEGAL_COMMAND,
        INFO,
        LOG_IN,
        NOT_A_LOGIN,
        PONG,
        SessionState,
        encode_frame,
        reaction_to,
    )

    frames = {
        "login": encode_login(TOKEN, 1),
        "ping": encode_ping(2),
        "info": encode_info({"build": "Nov 29 2018 12:00:00"}, 3),
        "internal": encode_frame(Command.INTERNAL, 4, b"rtc\0sync"),
        "hardware": encode_frame(Command.HARDWARE, 5, b"vw\x001\x002"),
        "response": encode_response(6, Status.OK),
        "unknown": encode_frame(99, 7),
    }
    event = {name: events(data)[0] for name, data in frames.items()}
    before_login = {name: reaction_to(SessionState.AWAITING_LOGIN, e) for name, e in event.items()}
    assert before_login == {name: NOT_A_LOGIN for name in frames} | {"login": LOG_IN}
    for state in (SessionState.LOGGED_IN, SessionState.READY):
        assert {name: reaction_to(state, e) for name, e in event.items()} == {
            "login": ALREADY_REGISTERED,
            "ping": PONG,
            "info": INFO,
            "internal": IGNORE,
            "hardware": IGNORE,
            "response": IGNORE,
            "unknown": ILLEGAL_COMMAND,
        }
    # What the event loop may give without a greenlet, and what each answers.
    assert [r.in_loop for r in (PONG, INFO, IGNORE)] == [True, True, True]
    assert [r.in_loop for r in (LOG_IN, ALREADY_REGISTERED, ILLEGAL_COMMAND)] == [False] * 3
    assert (PONG.reply, INFO.reply, ALREADY_REGISTERED.reply, ILLEGAL_COMMAND.reply) == (
        Status.OK, Status.OK, Status.ALREADY_REGISTERED, Status.ILLEGAL_COMMAND,
    )  # fmt: skip
    assert ILLEGAL_COMMAND.closes and NOT_A_LOGIN.closes and not PONG.closes
