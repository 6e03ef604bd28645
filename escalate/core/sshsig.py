"""Signed approvals: OpenSSH public key lines and SSHSIG signatures (namespace ``escalate``).

Pure: a key line or a signature comes in as text, a verdict goes out (the signer, which
runs ``ssh-keygen -Y sign``, is :mod:`escalate.escalation.signing`). The SSHSIG format is
OpenSSH's (PROTOCOL.sshsig), so ``ssh-keygen -Y verify`` checks what escalate stores, and
escalate checks what ``ssh-keygen -Y sign`` makes. Checking a signature needs the
``cryptography`` package (the ``signing`` extra); it is imported only when a signature
must be checked, and its absence is an error, never a pass. Parsing key lines needs nothing.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from escalate.errors import InputError

NAMESPACE = "escalate"
MAGIC = b"SSHSIG"
BEGIN = "-----BEGIN SSH SIGNATURE-----"
_END = "-----END SSH SIGNATURE-----"
MAX_KEY_LINE = 16384  # an RSA key of 16384 bits is about 2.8 kB in base64
MAX_SIGNATURE = 16384
# The curve and the hash of each ECDSA key type (RFC 5656).
_ECDSA = {"ecdsa-sha2-nistp256": ("nistp256", "sha256"), "ecdsa-sha2-nistp384": ("nistp384", "sha384"),
          "ecdsa-sha2-nistp521": ("nistp521", "sha512")}
KEY_TYPES = ("ssh-ed25519", *_ECDSA, "ssh-rsa")
_HASHES = {"sha256": hashlib.sha256, "sha512": hashlib.sha512}


class SignatureError(Exception):
    """A signature that does not check out; the message says why, in a few words."""


class SigningUnavailable(InputError):
    """A signature must be checked and the ``cryptography`` package is missing (exit 2)."""

    default_code = "signing_unavailable"


@dataclass(frozen=True, slots=True)
class PublicKey:
    """An OpenSSH public key line, checked: its type, the key blob, the comment."""

    kind: str
    blob: bytes
    comment: str

    @property
    def fingerprint(self) -> str:
        """``SHA256:…``, as ``ssh-keygen -l`` prints it."""
        return "SHA256:" + base64.b64encode(hashlib.sha256(self.blob).digest()).decode().rstrip("=")

    @property
    def line(self) -> str:
        """The key as one line, comment kept (what a policy records)."""
        return " ".join(filter(None, (self.kind, base64.b64encode(self.blob).decode(), self.comment)))


class _Reader:
    """The SSH wire format's strings and integers, read in order (RFC 4251 §5)."""

    def __init__(self, data: bytes) -> None:
        self.data, self.at = data, 0

    def raw(self, size: int) -> bytes:
        if self.at + size > len(self.data):
            raise SignatureError("truncated")
        chunk = self.data[self.at:self.at + size]
        self.at += size
        return chunk

    def uint32(self) -> int:
        return int.from_bytes(self.raw(4), "big")

    def string(self) -> bytes:
        return self.raw(self.uint32())

    def mpint(self) -> int:
        return int.from_bytes(self.string(), "big", signed=True)

    def done(self) -> None:
        if self.at != len(self.data):
            raise SignatureError("trailing bytes")


def _string(data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + data


def _check_blob(kind: str, blob: bytes) -> None:
    """Raise :class:`SignatureError` unless ``blob`` is a well-formed key of type ``kind``."""
    reader = _Reader(blob)
    if reader.string() != kind.encode():
        raise SignatureError(f"the key inside is not {kind}")
    if kind == "ssh-ed25519":
        if len(reader.string()) != 32:
            raise SignatureError("an ed25519 key has 32 bytes")
    elif kind in _ECDSA:
        if reader.string() != _ECDSA[kind][0].encode() or not reader.string():
            raise SignatureError(f"not a {kind} key")
    elif kind == "ssh-rsa":
        if reader.mpint() <= 0 or reader.mpint().bit_length() < 2048:
            raise SignatureError("an RSA key needs at least 2048 bits")
    else:
        raise SignatureError(f"key type {kind[:40]!r} is not one of {', '.join(KEY_TYPES)}")
    reader.done()


def parse_key(line: str) -> PublicKey:
    """An OpenSSH public key line (``ssh-ed25519 AAAA… alice@host``), checked; raises
    :class:`SignatureError` saying what is wrong with it."""
    if not isinstance(line, str) or len(line) > MAX_KEY_LINE or not line.isprintable():
        raise SignatureError("a key is one line of printable text")
    parts = line.strip().split(None, 2)
    if len(parts) < 2:
        raise SignatureError("a key line is TYPE BASE64 [COMMENT], e.g. 'ssh-ed25519 AAAA… alice@host'")
    try:
        blob = base64.b64decode(parts[1], validate=True)
    except binascii.Error:
        raise SignatureError("its key is not base64") from None
    _check_blob(parts[0], blob)
    return PublicKey(parts[0], blob, parts[2].strip() if len(parts) > 2 else "")


def canonical_content(run: str, escalation_id: str, mode: str, amount_micros: int, line_hash: str,
                      by: str, grant: tuple[object, object] | None = None) -> bytes:
    """What a resolution's signature covers: JSON with sorted keys and no spaces (docs/escalation.md,
    "How to pin keys and sign"). ``amount_micros`` is the reservation the escalation asked for,
    ``line_hash`` the hash of the escalation's line (the ``prev`` of the line after it), ``by``
    the approver the line names: a signature cannot be moved to another approver's line;
    ``grant``, for an approval, the run's and the pool's extension it grants
    (:func:`line_grant`): a signed approval cannot be made to grant more."""
    content: dict[str, object] = {"run": run, "escalation_id": escalation_id, "mode": mode,
                                  "amount_micros": amount_micros, "escalation_line": line_hash, "by": by}
    if grant is not None:
        content["extension_micros"], content["pool_extension_micros"] = grant
    return orjson.dumps(content, option=orjson.OPT_SORT_KEYS)


def line_grant(mode: str, line: Mapping[str, Any]) -> tuple[object, object] | None:
    """The grant a decision ``line``'s signature covers, as the line records it: for an
    approval (``mode`` ``extend``: a resolution, or a partial approval of a quorum), its
    ``extension_micros`` and ``pool_extension_micros`` (0 where left out); None for a pause
    or cancel, which grant nothing. The writer signs what it writes and every reader checks
    what it reads by this one function."""
    if mode != "extend":
        return None
    return line.get("extension_micros", 0), line.get("pool_extension_micros", 0)


def policy_content(kind: str, ledger_id: str, escalation: object, cap_micros: int | None,
                   policy_line: str) -> bytes:
    """What a policy change's signature covers, made the same way (docs/escalation.md): the
    ``kind`` of ledger (``run`` or ``pool``) and its id, the new ``escalation`` object as the
    ``policy_changed`` line writes it, a pool's new ``cap_micros`` when the line changes it,
    and ``policy_line``, the hash of the line that set the policy it changes (so a signed
    change applies once, to that policy, and cannot be replayed later or elsewhere)."""
    content: dict[str, object] = {"change": "policy", kind: ledger_id, "escalation": escalation,
                                  "policy_line": policy_line}
    if cap_micros is not None:
        content["cap_micros"] = cap_micros
    return orjson.dumps(content, option=orjson.OPT_SORT_KEYS)


def armor(blob: bytes) -> str:
    """The SSHSIG blob as ``ssh-keygen`` writes it: base64 in lines of 70, between the markers."""
    text = base64.b64encode(blob).decode()
    return "\n".join([BEGIN, *(text[i:i + 70] for i in range(0, len(text), 70)), _END]) + "\n"


def dearmor(text: str) -> bytes:
    """The blob of an armored SSHSIG signature; :class:`SignatureError` if it is not one."""
    if not isinstance(text, str) or len(text) > MAX_SIGNATURE:
        raise SignatureError("not an SSH signature")
    lines = [line.strip() for line in text.strip().splitlines()]
    if len(lines) < 3 or lines[0] != BEGIN or lines[-1] != _END:
        raise SignatureError(f"not an SSH signature (it starts with {BEGIN})")
    try:
        return base64.b64decode("".join(lines[1:-1]), validate=True)
    except binascii.Error:
        raise SignatureError("an SSH signature that is not base64") from None


def signer(armored: str) -> PublicKey:
    """The key an armored signature claims to be made by (not yet checked)."""
    reader = _Reader(dearmor(armored))
    if reader.raw(6) != MAGIC or reader.uint32() != 1:
        raise SignatureError("not an SSHSIG signature of version 1")
    blob = reader.string()
    kind = _Reader(blob).string().decode(errors="replace")
    _check_blob(kind, blob)
    return PublicKey(kind, blob, "")


def verify(armored: str, message: bytes, pinned: Iterable[str]) -> PublicKey:
    """The pinned key that made ``armored``, an SSHSIG signature of ``message`` in namespace
    ``escalate``; raises :class:`SignatureError` if it is malformed, by a key not in
    ``pinned`` (key lines), or does not check out; :class:`SigningUnavailable` if the
    ``cryptography`` package is missing."""
    reader = _Reader(dearmor(armored))
    if reader.raw(6) != MAGIC or reader.uint32() != 1:
        raise SignatureError("not an SSHSIG signature of version 1")
    key_blob, namespace, reserved = reader.string(), reader.string(), reader.string()
    hash_name, signature = reader.string().decode(errors="replace"), reader.string()
    reader.done()
    if namespace != NAMESPACE.encode():
        raise SignatureError(f"made for namespace {namespace[:40].decode(errors='replace')!r}, not "
                             f"{NAMESPACE!r}")
    key = next((k for k in map(parse_key, pinned) if k.blob == key_blob), None)
    if key is None:
        raise SignatureError("made by a key that is not pinned for this approver")
    if hash_name not in _HASHES:
        raise SignatureError(f"hash {hash_name[:20]!r} is not sha256 or sha512")
    signed = (MAGIC + _string(namespace) + _string(reserved) + _string(hash_name.encode())
              + _string(_HASHES[hash_name](message).digest()))
    _check_signature(key, signature, signed)
    return key


def _check_signature(key: PublicKey, signature: bytes, signed: bytes) -> None:
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
        from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
    except ImportError:
        raise SigningUnavailable(
            "this log pins approvers' keys and checking their signatures needs the cryptography "
            "package: pip install 'escalate-ledger[signing]'") from None
    reader = _Reader(signature)
    sig_kind, sig = reader.string().decode(errors="replace"), reader.string()
    reader.done()
    public: Any = serialization.load_ssh_public_key(key.line.encode())
    try:
        if key.kind == "ssh-ed25519" and sig_kind == key.kind:
            assert isinstance(public, ed25519.Ed25519PublicKey)
            public.verify(sig, signed)
        elif key.kind in _ECDSA and sig_kind == key.kind:
            assert isinstance(public, ec.EllipticCurvePublicKey)
            numbers = _Reader(sig)
            r, s = numbers.mpint(), numbers.mpint()
            numbers.done()
            digest = {"sha256": hashes.SHA256(), "sha384": hashes.SHA384(), "sha512": hashes.SHA512()}
            public.verify(encode_dss_signature(r, s), signed, ec.ECDSA(digest[_ECDSA[key.kind][1]]))
        elif key.kind == "ssh-rsa" and sig_kind in ("rsa-sha2-256", "rsa-sha2-512"):
            # (The SHA-1 ``ssh-rsa`` signature is refused, as OpenSSH refuses it.)
            assert isinstance(public, rsa.RSAPublicKey)
            public.verify(sig, signed, padding.PKCS1v15(),
                          hashes.SHA256() if sig_kind == "rsa-sha2-256" else hashes.SHA512())
        else:
            raise SignatureError(f"a {sig_kind[:40]!r} signature from a {key.kind} key")
    except InvalidSignature:
        raise SignatureError(f"the signature does not match (key {key.fingerprint})") from None
