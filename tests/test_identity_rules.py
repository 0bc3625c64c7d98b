"""What a firmware and a board say of themselves, and the rules held between them:
versions and types from the image's blnkinf block, every Espressif board name the
Blynk library gives, downgrades, and signed images (keys made by the tests)."""

import contextlib
import io
import struct
import tempfile
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from blynkota.ota.firmware.image import FirmwareRejected, inspect_firmware, read_identity
from blynkota.ota.firmware.signatures import UNVERIFIED, fingerprint, load_public_keys
from blynkota.ota.rollouts.compatibility import (
    BOARD_CHIPS,
    BoardReport,
    ImageIdentity,
    build_date,
    incompatibility,
    runs_already,
    version_key,
)

from .images import esp32_image, esp8266_image

BUILD = "Jan  2 2024 10:00:00"
LIBRARY_1_3 = {"mcu": "1.2.0", "fw-type": "TMPLabc", "blynk": "1.3.2", "h-beat": "45",
               "buff-in": "1024", "dev": "NodeMCU"}  # fmt: skip


# --- the image's own identity ----------------------------------------------------------


def test_a_1_3_image_names_its_version_type_and_library():
    report = inspect_firmware(esp8266_image(BUILD, fields=LIBRARY_1_3), validate_image=True)
    assert (report.fw_version, report.fw_type, report.lib_version, report.build) == (
        "1.2.0", "TMPLabc", "1.3.2", BUILD,
    )  # fmt: skip


def test_a_0_6_image_names_its_fw_and_ver():
    identity = read_identity(esp8266_image(BUILD, fw="2.0.1"))
    assert identity == {"fw_version": "2.0.1", "fw_type": None, "lib_version": "0.6.1"}


def test_a_block_is_read_only_to_its_end_and_only_as_printable_text():
    data = b"\xe9junk blnkinf\0mcu\0" + b"1.0\x07" + b"\0fw-type\0T1\0\0fw\0not-this\0"
    assert read_identity(data) == {"fw_version": None, "fw_type": "T1", "lib_version": None}
    assert read_identity(b"no block at all") == dict.fromkeys(
        ("fw_version", "fw_type", "lib_version")
    )


# --- board names -------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(BOARD_CHIPS))
def test_every_espressif_board_name_of_the_library_is_judged(name):
    board = BoardReport(hardware=name)
    chip = BOARD_CHIPS[name]
    esp8266, esp32 = ImageIdentity(chip="esp8266"), ImageIdentity(chip="esp32")
    if chip == "esp8266":
        assert incompatibility(board, esp8266) is None
        assert (
            incompatibility(board, esp32)
            == f"the image is for ESP32, the device reports dev={name}"
        )
    else:
        assert incompatibility(board, esp8266) == (
            f"the image is for ESP8266, the device reports dev={name}"
        )
        own = ImageIdentity(chip=chip)
        assert incompatibility(board, own) is None
        if chip != "esp32":  # a variant: another variant's image does not boot it
            other = "esp32s3" if chip != "esp32s3" else "esp32c3"
            assert incompatibility(board, ImageIdentity(chip=other)) is not None


def test_a_nodemcu_is_never_offered_an_esp32_image():
    reason = incompatibility(BoardReport(hardware="NodeMCU"), ImageIdentity(chip="esp32"))
    assert reason == "the image is for ESP32, the device reports dev=NodeMCU"


@pytest.mark.parametrize("name", ["Custom platform", "Arduino", "ESP32-H2 board", "", None])
def test_a_name_outside_the_table_is_not_judged(name):
    for chip in ("esp8266", "esp32", "esp32s3"):
        assert incompatibility(BoardReport(hardware=name), ImageIdentity(chip=chip)) is None


# --- types, versions, downgrades ----------------------------------------------------------


def test_another_firmware_type_is_incompatible_with_both_named():
    reason = incompatibility(
        BoardReport(fw_type="TMPLxyz", fw_version="1.0.0"),
        ImageIdentity(fw_type="TMPLabc", fw_version="2.0.0"),
    )
    assert reason == "firmware type TMPLabc, the device reports TMPLxyz"
    # Without a type on either side, judged as before.
    assert incompatibility(BoardReport(fw_version="1.0.0"), ImageIdentity(fw_type="T")) is None


@pytest.mark.parametrize(
    "ordered",
    [
        ["0.9", "1.0.0-alpha", "1.0.0-alpha.1", "1.0.0-alpha.beta", "1.0.0-beta",
         "1.0.0-beta.2", "1.0.0-beta.11", "1.0.0-rc.1", "1.0.0", "1.0.1", "1.2", "1.10.0"],
    ],
)  # fmt: skip
def test_versions_order_as_semantic_versioning_does(ordered):
    keys = [version_key(version) for version in ordered]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    assert version_key("1.2") == version_key("1.2.0") == version_key("v1.2.0+build.7")


def test_a_device_on_the_images_version_runs_it_already_whatever_its_build():
    board = BoardReport(fw_version="1.2.0", build="Jan  1 2020 00:00:00")
    image = ImageIdentity(fw_version="1.2", build=BUILD)
    assert runs_already(board, image) and incompatibility(board, image) is None


def test_no_downgrade_unless_asked():
    board, image = BoardReport(fw_version="1.3.0"), ImageIdentity(fw_version="1.2.0")
    assert incompatibility(board, image) == "would downgrade 1.3.0 to 1.2.0"
    assert incompatibility(board, image, allow_downgrade=True) is None
    assert (
        incompatibility(BoardReport(fw_version="1.3.0-rc.1"), ImageIdentity(fw_version="1.3.0"))
        is None
    )


def test_without_versions_builds_are_compared_as_dates():
    image = ImageIdentity(build="Aug 14 2017 20:31:49")
    newer = BoardReport(build="Feb  1 2019 00:00:00")
    assert incompatibility(newer, image) == (
        "would downgrade build Feb  1 2019 00:00:00 to Aug 14 2017 20:31:49"
    )
    assert incompatibility(newer, image, allow_downgrade=True) is None
    assert incompatibility(BoardReport(build="Jan  1 2016 00:00:00"), image) is None
    assert build_date("May  8 2018 19:30:18") == (2018, 5, 8, 19, 30, 18)
    assert build_date("not a date") is None and build_date("May  ² 2018 19:30:18") is None
    assert build_date("Jan  1 2018") is None
    assert incompatibility(BoardReport(build="whenever"), image) is None  # nothing to judge by


# --- signed images --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rsa_keys():
    return rsa.generate_private_key(65537, 2048), rsa.generate_private_key(65537, 2048)


def signed_esp8266(image: bytes, key) -> bytes:
    """The ESP8266 core's signed OTA layout: image, signature, its length (u32 LE)."""
    signature = key.sign(image, padding.PKCS1v15(), hashes.SHA256())
    return image + signature + struct.pack("<I", len(signature))


def signed_esp32(image: bytes, key) -> bytes:
    """Secure Boot V2, signed by esptool's espsecure as the ESP-IDF build does."""
    import espsecure

    with tempfile.TemporaryDirectory() as folder:
        key_file, source, target = (Path(folder) / name for name in ("k.pem", "in", "out"))
        key_file.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        source.write_bytes(image)
        with (
            contextlib.redirect_stdout(io.StringIO()),
            key_file.open("rb") as keys,
            source.open("rb") as data,
        ):
            espsecure.sign_secure_boot_v2([keys], str(target), False, False, None, None, None, data)
        return target.read_bytes()


def _keys(*private):
    return {fingerprint(key.public_key()): key.public_key() for key in private}


def _refusal(data: bytes, keys, *, validate_image: bool = True) -> str:
    with pytest.raises(FirmwareRejected) as refused:
        inspect_firmware(data, validate_image=validate_image, signing_keys=keys)
    return str(refused.value)


def test_an_esp8266_signature_names_its_key_when_the_key_is_configured(rsa_keys):
    mine, other = rsa_keys
    signed = signed_esp8266(esp8266_image(BUILD), mine)
    report = inspect_firmware(signed, validate_image=True, signing_keys=_keys(mine, other))
    assert report.signed_by == fingerprint(mine.public_key())
    # Without keys it is read, not judged: the signature names no key.
    assert inspect_firmware(signed, validate_image=True).signed_by == UNVERIFIED
    assert inspect_firmware(esp8266_image(BUILD), validate_image=True).signed_by is None


def test_esp8266_refusals_say_why(rsa_keys):
    mine, other = rsa_keys
    image = esp8266_image(BUILD)
    assert _refusal(image, _keys(mine)).startswith("Not signed")
    assert _refusal(signed_esp8266(image, other), _keys(mine)).startswith(
        "Signed by an unknown key"
    )
    tampered = bytearray(signed_esp8266(image, mine))
    tampered[64] ^= 0x01
    # A byte changed after signing (the image check is off, or it would find it first).
    assert _refusal(bytes(tampered), _keys(mine), validate_image=False).startswith(
        "Signature does not match"
    )


def test_an_esp32_secure_boot_v2_signature_is_verified_by_espsecure():
    key = rsa.generate_private_key(65537, 3072)
    signed = signed_esp32(esp32_image(BUILD), key)
    name = fingerprint(key.public_key())
    # The block carries its key: known without configuration, checked against it.
    assert inspect_firmware(signed, validate_image=True).signed_by == name
    assert inspect_firmware(signed, validate_image=True, signing_keys=_keys(key)).signed_by == name
    other = ec.generate_private_key(ec.SECP256R1())
    assert _refusal(signed, _keys(other)).startswith("Signed by an unknown key")
    tampered = bytearray(signed)
    tampered[300] ^= 0x01
    assert "does not match" in _refusal(bytes(tampered), {}, validate_image=False)
    assert _refusal(esp32_image(BUILD), _keys(key)).startswith("Not signed")


def test_an_ecdsa_signed_esp32_image_names_its_key():
    key = ec.generate_private_key(ec.SECP256R1())
    signed = signed_esp32(esp32_image(BUILD), key)
    report = inspect_firmware(signed, validate_image=True, signing_keys=_keys(key))
    assert report.signed_by == fingerprint(key.public_key())


def test_signing_keys_must_be_pem_public_keys(tmp_path, rsa_keys):
    good = tmp_path / "public.pem"
    good.write_bytes(
        rsa_keys[0]
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    assert list(load_public_keys([good])) == [fingerprint(rsa_keys[0].public_key())]
    (tmp_path / "junk.pem").write_text("hello")
    with pytest.raises(ValueError, match="junk.pem: not a PEM public key"):
        load_public_keys([good, tmp_path / "junk.pem"])
    with pytest.raises(ValueError, match="missing.pem: cannot read it"):
        load_public_keys([tmp_path / "missing.pem"])


def test_the_block_s_words_are_read_whole_and_cut_only_where_they_are_stored():
    long_version = "1." + "9" * 100
    identity = read_identity(esp8266_image(BUILD, fields={"mcu": long_version, "blynk": "1.3.2"}))
    assert identity["fw_version"] == long_version  # the catalog cuts it to its column, and says so
