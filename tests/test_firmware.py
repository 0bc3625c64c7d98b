"""Firmware parsing: the build tag as the Blynk server reads it, image checks by esptool."""

import hashlib

import pytest

from blynkota.ota import (
    CacheError,
    FirmwareCache,
    FirmwareRejected,
    ImageReport,
    inspect_firmware,
    read_build,
)

from .images import esp32_image, esp8266_image

BUILD = "Nov 29 2018 12:00:00"


def test_build_is_the_text_after_the_first_build_tag():
    data = b"xx\0build\0Nov 29 2018 12:00:00\0\0more\0build\0Jan  1 2000 00:00:00\0"
    assert read_build(data) == "Nov 29 2018 12:00:00"


def test_no_build_tag_means_no_build():
    assert read_build(b"\xe9\x01 nothing here") is None
    assert read_build(b"\0build\0\0") is None


def test_own_esp8266_and_esp32_images_pass_and_report_chip_and_build():
    report = inspect_firmware(esp8266_image("Nov 29 2018 12:00:00"), validate_image=True)
    # The tests' images carry library 0.6.1's block: `ver 0.6.1` is its library version.
    assert report == _report("esp8266", "Nov 29 2018 12:00:00", "0.6.1")
    report = inspect_firmware(esp32_image("May  8 2018 19:30:18"), validate_image=True)
    assert (report.chip, report.build) == ("esp32", "May  8 2018 19:30:18")


def _report(chip, build, lib_version=None):
    return ImageReport(chip=chip, build=build, lib_version=lib_version)


@pytest.mark.parametrize(
    ("name", "chip", "build"),
    [
        ("esp8266-nodemcu-blynk-0.4.8.bin", "esp8266", "Aug 14 2017 20:31:49"),
        ("esp32-blynk-0.5.2.bin", "esp32", "May  8 2018 19:30:18"),
    ],
)
def test_real_firmware_files(shared_dir, name, chip, build):
    """Libraries before 0.6 compiled the block without its `blnkinf` tag: the
    build is read (after `\\0build\\0`, as the Blynk server reads it), no identity."""
    data = (shared_dir / "fixtures" / "firmware" / name).read_bytes()
    assert inspect_firmware(data, validate_image=True) == _report(chip, build)


def test_wrong_magic_is_refused_with_the_reason():
    with pytest.raises(FirmwareRejected, match="starts with byte 0x50, not 0xE9"):
        inspect_firmware(b"PK\x03\x04 a zip file", validate_image=True)


def test_a_flipped_byte_fails_the_checksum():
    image = bytearray(esp8266_image("Nov 29 2018 12:00:00"))
    image[200] ^= 0x01
    with pytest.raises(FirmwareRejected, match="checksum"):
        inspect_firmware(bytes(image), validate_image=True)


def test_a_flipped_esp32_digest_byte_fails_the_sha256_check():
    image = bytearray(esp32_image("Nov 29 2018 12:00:00"))
    image[-1] ^= 0x01
    with pytest.raises(FirmwareRejected, match="SHA-256"):
        inspect_firmware(bytes(image), validate_image=True)


def test_a_truncated_image_is_refused():
    with pytest.raises(FirmwareRejected, match="image at offset 0x0 is damaged: cut short"):
        inspect_firmware(esp8266_image("Nov 29 2018 12:00:00")[:100], validate_image=True)


def test_empty_file_is_refused_even_without_validation():
    with pytest.raises(FirmwareRejected, match="empty"):
        inspect_firmware(b"", validate_image=False)


def test_raw_files_pass_when_validation_is_off():
    report = inspect_firmware(b"raw\0build\0Nov 29 2018 12:00:00\0", validate_image=False)
    assert (report.chip, report.build) == (None, "Nov 29 2018 12:00:00")


def test_cache_writes_checked_files_named_by_content_and_cleans_strays(tmp_path):
    cache = FirmwareCache(tmp_path / "ota")
    data = b"\xe9abc"
    sha = hashlib.sha256(data).hexdigest()
    path = cache.put(sha, data)
    assert path == tmp_path / "ota" / f"{sha}.bin" and path.read_bytes() == data
    assert [p.name for p in (tmp_path / "ota").iterdir()] == [f"{sha}.bin"]  # no temporary file
    with pytest.raises(CacheError):
        cache.put(hashlib.sha256(b"other").hexdigest(), data)
    with pytest.raises(ValueError):
        cache.path("../../etc/passwd")
    # A damaged cache file is written again from the database's bytes.
    path.write_bytes(b"\xe9abd")
    assert FirmwareCache(tmp_path / "ota").get(sha, lambda: data).read_bytes() == data
    (tmp_path / "ota" / ".partial-x1").write_bytes(b"half")
    (tmp_path / "ota" / ("0" * 24 + ".bin")).write_bytes(b"old")
    assert cache.clean([sha]) == 2
    assert [p.name for p in (tmp_path / "ota").iterdir()] == [f"{sha}.bin"]


def test_a_large_esp8266_image_is_not_mistaken_for_an_esp32_one():
    # Its first segment header (size 0x00C00000) reads like an ESP32 chip id of 0.
    report = inspect_firmware(esp8266_image(BUILD, size=12 * 1024 * 1024), validate_image=True)
    assert (report.chip, report.build) == ("esp8266", BUILD)


def arduino_layout(build: str) -> bytes:
    """An Arduino ESP8266 sketch's file: a boot loader image at 0, the application at 0x1000."""
    boot_loader = esp8266_image(None, size=1384)
    application = esp8266_image(build, size=20_000)
    return boot_loader + b"\xff" * (0x1000 - len(boot_loader)) + application


def test_the_application_image_at_0x1000_is_checked_too():
    whole = arduino_layout("Nov 29 2018 12:00:00")
    assert inspect_firmware(whole, validate_image=True).build == "Nov 29 2018 12:00:00"
    flipped = bytearray(whole)
    flipped[0x1000 + 5000] ^= 0x01
    with pytest.raises(FirmwareRejected, match=r"image at offset 0x1000 has checksum"):
        inspect_firmware(bytes(flipped), validate_image=True)
    for cut in (len(whole) // 2, len(whole) - 1, 0x1004):
        with pytest.raises(FirmwareRejected, match=r"image at offset 0x1000 is damaged: cut short"):
            inspect_firmware(whole[:cut], validate_image=True)
    not_an_image = bytearray(whole)
    not_an_image[0x1000] = 0x00
    with pytest.raises(FirmwareRejected, match="not an application image"):
        inspect_firmware(bytes(not_an_image), validate_image=True)


@pytest.mark.parametrize("damage", ["half", "flip", "last byte"])
def test_real_esp8266_file_damaged_anywhere_is_refused(shared_dir, damage):
    path = shared_dir / "fixtures" / "firmware" / "esp8266-nodemcu-blynk-0.4.8.bin"
    data = bytearray(path.read_bytes())
    if damage == "half":
        data = data[: len(data) // 2]
    elif damage == "flip":
        data[0x2000] ^= 0x01  # inside the application, past the boot loader's 1,384 bytes
    else:
        data = data[:-1]
    with pytest.raises(FirmwareRejected, match="offset 0x1000"):
        inspect_firmware(bytes(data), validate_image=True)


def test_esptool_remarks_stay_out_of_the_output(capsys):
    inspect_firmware(arduino_layout("Nov 29 2018 12:00:00"), validate_image=True)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
