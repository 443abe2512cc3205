"""mosquitto_passwd's password file, read unchanged (DESIGN section 10).

A line is ``id:$7$ITERATIONS$SALT$HASH`` (PBKDF2-HMAC-SHA512 of the password
with the salt, 64 bytes) or ``id:$6$SALT$HASH`` (SHA-512 of the password then
the salt), SALT 12 bytes and HASH 64 bytes, both standard base64 with padding:
exactly what mosquitto 2.0 writes (apps/mosquitto_passwd) and reads
(src/security_default.c, unpwd__decode_passwords). Lines beginning with ``#``
and blank lines are skipped, as mosquitto does; surrounding blanks are
trimmed. Where mosquitto logs a bad line and drops it, we report it with its
line number so that the operator fixes the file before the gateway starts.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
from dataclasses import dataclass

__all__ = [
    "DEFAULT_ITERATIONS", "MAX_PASSWORD_BYTES", "PasswordHash", "PasswordFile", "hash_password",
    "format_line", "replace_line",
]

SALT_BYTES = 12
HASH_BYTES = 64
# mosquitto_passwd's default (PW_DEFAULT_ITERATIONS): a check costs ~70 us,
# cheap enough to run on the event loop; `gridgate passwd --iterations` raises it.
DEFAULT_ITERATIONS = 101
# A file may ask for more, within reason: one check at this bound is ~0.7 s of CPU.
MAX_ITERATIONS = 1_000_000
# Longer passwords are refused as a plain failure before any hashing: a 64 KiB
# password (MQTT allows 65,535 bytes) must cost the server nothing. A JWT is
# not a password; its own bound is in jwt_keys.
MAX_PASSWORD_BYTES = 1024
# mosquitto refuses ids and hashes longer than this (pwfile__parse).
_MAX_FIELD = 65_535


def _b64decode(text: str) -> bytes | None:
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        return None


@dataclass(frozen=True, slots=True)
class PasswordHash:
    """One entry: how to hash a candidate password, and what it must give."""

    kind: int           # 6: salted SHA-512; 7: PBKDF2-HMAC-SHA512
    iterations: int     # 7 only (1 for kind 6)
    salt: bytes
    digest: bytes

    def verify(self, password: bytes) -> bool:
        """Whether ``password`` is this entry's; constant-time compare."""
        if len(password) > MAX_PASSWORD_BYTES:
            return False
        if self.kind == 7:
            got = hashlib.pbkdf2_hmac("sha512", password, self.salt, self.iterations, HASH_BYTES)
        else:
            got = hashlib.sha512(password + self.salt).digest()
        return hmac.compare_digest(got, self.digest)

    def encode(self) -> str:
        """The hash field as mosquitto writes it (``$7$101$salt$hash``)."""
        salt = base64.b64encode(self.salt).decode("ascii")
        digest = base64.b64encode(self.digest).decode("ascii")
        if self.kind == 7:
            return f"$7${self.iterations}${salt}${digest}"
        return f"$6${salt}${digest}"


def parse_hash(field: str) -> PasswordHash | str:
    """The entry for a hash field, or what is wrong with it."""
    parts = field.split("$")
    # "$7$it$salt$hash" splits as ["", "7", it, salt, hash]
    if len(parts) < 2 or parts[0] != "" or parts[1] not in ("6", "7"):
        return "the hash must begin with $7$ (PBKDF2-SHA512) or $6$ (salted SHA-512)"
    kind = int(parts[1])
    want = 5 if kind == 7 else 4
    if len(parts) != want:
        return f"a ${kind}$ hash has {want - 1} fields separated by '$'"
    iterations = 1
    if kind == 7:
        if not parts[2].isdigit() or not 1 <= int(parts[2]) <= MAX_ITERATIONS:
            return f"iterations must be an integer from 1 to {MAX_ITERATIONS}"
        iterations = int(parts[2])
    salt = _b64decode(parts[-2])
    if salt is None or len(salt) != SALT_BYTES:
        return f"the salt must be {SALT_BYTES} bytes in base64"
    digest = _b64decode(parts[-1])
    if digest is None or len(digest) != HASH_BYTES:
        return f"the hash must be {HASH_BYTES} bytes in base64"
    return PasswordHash(kind, iterations, salt, digest)


class PasswordFile:
    """The entries of one password file, by id."""

    __slots__ = ("entries",)

    def __init__(self, entries: dict[str, PasswordHash]) -> None:
        self.entries = entries

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, identity: str) -> PasswordHash | None:
        return self.entries.get(identity)

    @classmethod
    def parse(cls, text: str, source: str) -> tuple[PasswordFile, list[str]]:
        """Every entry of ``text``, and every problem (``source:line: why``;
        never the hash itself). The entries are usable even with problems,
        but the gateway refuses to start on any."""
        entries: dict[str, PasswordHash] = {}
        first_line: dict[str, int] = {}
        problems: list[str] = []
        for number, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            where = f"{source}:{number}"
            identity, sep, field = line.partition(":")
            identity, field = identity.strip(), field.strip()
            if not sep:
                problems.append(f"{where}: not 'id:hash' (no ':')")
                continue
            if not identity:
                problems.append(f"{where}: the id before ':' is empty")
                continue
            if len(identity) > _MAX_FIELD or len(field) > _MAX_FIELD:
                problems.append(f"{where}: longer than {_MAX_FIELD} characters")
                continue
            if ":" in field:
                problems.append(f"{where}: more than one ':'")
                continue
            parsed = parse_hash(field)
            if isinstance(parsed, str):
                problems.append(f"{where}: id {identity!r}: {parsed}")
                continue
            if identity in entries:
                problems.append(f"{where}: id {identity!r} again (first on line {first_line[identity]})")
                continue
            entries[identity] = parsed
            first_line[identity] = number
        return cls(entries), problems

    @classmethod
    def load(cls, path: str) -> tuple[PasswordFile, list[str]]:
        """Read ``path``; an unreadable file is one problem and no entries."""
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as exc:
            return cls({}), [f"auth.password_file {path}: cannot read it: {exc}"]
        return cls.parse(text, path)


def hash_password(password: bytes, iterations: int = DEFAULT_ITERATIONS, salt: bytes | None = None) -> PasswordHash:
    """A new ``$7$`` entry for ``password`` (random salt unless given)."""
    if not 1 <= iterations <= MAX_ITERATIONS:
        raise ValueError(f"iterations must be from 1 to {MAX_ITERATIONS}")
    if len(password) > MAX_PASSWORD_BYTES:
        raise ValueError(f"a password is at most {MAX_PASSWORD_BYTES} bytes")
    salt = os.urandom(SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password, salt, iterations, HASH_BYTES)
    return PasswordHash(7, iterations, salt, digest)


def format_line(identity: str, entry: PasswordHash) -> str:
    """``id:$7$...`` with its newline, as mosquitto_passwd writes it."""
    if not identity or ":" in identity or any(c.isspace() for c in identity) or len(identity) > _MAX_FIELD:
        raise ValueError("an id is non-empty, without ':' or blanks")
    return f"{identity}:{entry.encode()}\n"


def replace_line(text: str, identity: str, line: str) -> str:
    """``text`` with the line of ``identity`` replaced by ``line`` (appended
    if it has none); comments and other lines are kept as they are."""
    out: list[str] = []
    done = False
    for raw in text.splitlines(keepends=True):
        stripped = raw.strip()
        if stripped and not stripped.startswith("#") and stripped.partition(":")[0].strip() == identity:
            if not done:
                out.append(line)
                done = True
            continue                                # a duplicate of it goes too
        out.append(raw if raw.endswith("\n") else raw + "\n")
    if not done:
        out.append(line)
    return "".join(out)
