"""Signed images: who signed an upload, and whether the signature holds.

Two layouts, the ones the boards check themselves (SPEC §7):

- **ESP8266** (core 2.5.0+ signed OTA): `image ‖ signature ‖ uint32 LE length
  of the signature`; the signature is RSA PKCS#1 v1.5 over SHA-256 of the
  image. It does not name its key: each configured key is asked to recover
  the digest it would have signed, so a key that signed another image is
  told apart from a key that signed nothing here.
- **ESP32** (Secure Boot V2): the image padded to 4 KiB, then a signature
  sector whose first block (magic 0xE7) holds the image's SHA-256, the
  public key and the signature (RSA-3072 PSS or ECDSA); checked with
  esptool's `espsecure`. The block carries its key, so its fingerprint is
  known even without configured keys.

A key's fingerprint is the SHA-256 of its DER SubjectPublicKeyInfo, in hex:
`openssl pkey -pubin -in key.pem -outform DER | sha256sum` prints the same.
With `ota.signing.keys` set every upload must carry a signature one of them
made; without, a signature is read and shown (an ESP8266 one, which names no
key, as `unverified`), never required.
"""

import contextlib
import hashlib
import io
import struct
import zlib
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

__all__ = [
    "PublicKey",
    "SigningError",
    "UNVERIFIED",
    "fingerprint",
    "load_public_keys",
    "signer_of",
]

UNVERIFIED = "unverified"  # an ESP8266 signature, no key configured to tell whose
_ESP8266_SIGNATURE_LENGTHS = (128, 256, 384, 512)  # RSA-1024 to RSA-4096
_SECTOR = 4096
_BLOCK_MAGIC = 0xE7
_BLOCK_VERSIONS = {0x02: "rsa", 0x03: "ecdsa"}
_BLOCK_SIGNED_LENGTH = 1196  # the block's bytes its CRC32 covers
_CURVES = {1: (ec.SECP192R1(), 24), 2: (ec.SECP256R1(), 32)}  # espsecure's curve ids


class SigningError(ValueError):
    """The upload's signature is missing or does not hold; the message says which."""


PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey


def fingerprint(key: PublicKey) -> str:
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


def load_public_keys(paths: list[Path]) -> dict[str, PublicKey]:
    """The PEM public keys at `paths`, by fingerprint. Raises ValueError naming
    the file that is missing or not a PEM public key (RSA or EC)."""
    keys: dict[str, PublicKey] = {}
    for path in paths:
        try:
            key = serialization.load_pem_public_key(path.read_bytes())
        except OSError as error:
            raise ValueError(f"{path}: cannot read it ({error.strerror or error})") from None
        except (ValueError, UnsupportedAlgorithm):
            raise ValueError(
                f"{path}: not a PEM public key (make one with "
                "`openssl rsa -in private.pem -pubout -out public.pem`)"
            ) from None
        if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
            raise ValueError(f"{path}: an RSA or EC public key is needed")
        keys[fingerprint(key)] = key
    return keys


def signer_of(data: bytes, chip: str | None, keys: dict[str, PublicKey]) -> str | None:
    """The fingerprint of the key that signed `data` (UNVERIFIED for an ESP8266
    signature no configured key can tell), or None if it carries no signature.

    Raises SigningError when a signature is there but does not hold, or when
    `keys` are configured and none of them signed it.
    """
    if chip is not None and chip.startswith("esp32"):
        signer = _esp32_signer(data, keys)
    else:
        signer = _esp8266_signer(data, keys)
    if keys and signer is None:
        raise SigningError("not signed: ota.signing.keys requires a signature on every upload")
    return signer


# --- ESP8266 ---------------------------------------------------------------------------


def _esp8266_signer(data: bytes, keys: dict[str, PublicKey]) -> str | None:
    if len(data) < 4:
        return None
    length = struct.unpack("<I", data[-4:])[0]
    if length not in _ESP8266_SIGNATURE_LENGTHS or length + 4 >= len(data):
        return None
    image, signature = data[: -(length + 4)], data[-(length + 4) : -4]
    rsa_keys = {name: key for name, key in keys.items() if isinstance(key, rsa.RSAPublicKey)}
    if not rsa_keys:
        return UNVERIFIED if not keys else _refuse_unknown()
    digest = hashlib.sha256(image).digest()
    for name, key in rsa_keys.items():
        if key.key_size // 8 != length:
            continue
        try:
            signed = key.recover_data_from_signature(signature, padding.PKCS1v15(), hashes.SHA256())
        except InvalidSignature:
            continue  # not this key's
        if signed != digest:
            raise SigningError(
                f"signature does not match: key {name[:16]} signed another image "
                "(the file was changed after signing)"
            )
        return name
    return _refuse_unknown()


def _refuse_unknown() -> None:
    raise SigningError("signed by an unknown key: none of ota.signing.keys made this signature")


# --- ESP32, Secure Boot V2 --------------------------------------------------------------


def _esp32_signer(data: bytes, keys: dict[str, PublicKey]) -> str | None:
    if len(data) < 2 * _SECTOR or len(data) % _SECTOR:
        return None
    block = data[-_SECTOR : -_SECTOR + _BLOCK_SIGNED_LENGTH + 4]
    if block[0] != _BLOCK_MAGIC or block[1] not in _BLOCK_VERSIONS:
        return None
    crc = struct.unpack("<I", block[_BLOCK_SIGNED_LENGTH:])[0]
    if zlib.crc32(block[:_BLOCK_SIGNED_LENGTH]) != crc:
        raise SigningError("signature does not match: the signature block is damaged")
    key = _block_key(block)
    name = fingerprint(key)
    if keys and name not in keys:
        _refuse_unknown()
    if not _espsecure_verifies(key, data):
        raise SigningError(
            f"signature does not match: key {name[:16]} did not sign this image "
            "(the file was changed after signing)"
        )
    return name


def _block_key(block: bytes) -> PublicKey:
    """The public key a Secure Boot V2 block carries (its numbers little-endian)."""
    if _BLOCK_VERSIONS[block[1]] == "rsa":
        modulus, exponent = struct.unpack("<384sI", block[36:424])
        return rsa.RSAPublicNumbers(exponent, int.from_bytes(modulus, "little")).public_key()
    curve_id = block[36]
    if curve_id not in _CURVES:
        raise SigningError(f"signature block with an unsupported curve (id {curve_id})")
    curve, length = _CURVES[curve_id]
    x = int.from_bytes(block[37 : 37 + length], "little")
    y = int.from_bytes(block[37 + length : 37 + 2 * length], "little")
    try:
        return ec.EllipticCurvePublicNumbers(x, y, curve).public_key()
    except ValueError:
        raise SigningError("signature block with a key that is not on its curve") from None


def _espsecure_verifies(key: PublicKey, data: bytes) -> bool:
    import espsecure  # esptool's: loaded on the first signed ESP32 upload only

    pem = key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    remarks = io.StringIO()  # espsecure prints what it checks
    try:
        with contextlib.redirect_stdout(remarks), contextlib.redirect_stderr(remarks):
            espsecure.verify_signature_v2(False, None, io.BytesIO(pem), io.BytesIO(data))
    except Exception:  # esptool.FatalError, InvalidSignature, struct.error
        return False
    return True
