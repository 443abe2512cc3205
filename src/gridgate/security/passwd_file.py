"""``gridgate passwd FILE ID [-b PASSWORD]``: add or replace one line.

The file is rewritten atomically (a temporary file in the same directory,
fsynced, then renamed over it), so a gateway reading it, or a crash, never
sees half a file; it is mode 0600 because its hashes are worth guarding.
Other lines and comments are kept as they were.
"""
from __future__ import annotations

import getpass
import os
import sys
import tempfile

from gridgate.security.passwords import DEFAULT_ITERATIONS, MAX_PASSWORD_BYTES, format_line, hash_password, replace_line

__all__ = ["passwd_command", "set_password"]


def set_password(path: str, identity: str, password: bytes, iterations: int = DEFAULT_ITERATIONS) -> None:
    """Give ``identity`` the password ``password`` in the file at ``path``.

    Raises:
        ValueError: a bad id, password or iteration count.
        OSError: the file or its directory cannot be read or written.
    """
    line = format_line(identity, hash_password(password, iterations))
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        text = ""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".passwd-", dir=directory)   # mode 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(replace_line(text, identity, line))
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)            # the rename itself survives a power loss
    finally:
        os.close(dir_fd)


def passwd_command(path: str, identity: str, password: str | None, iterations: int | None) -> int:
    """The command: 0 done, 1 refused (said on stderr)."""
    if password is None:
        try:
            password = getpass.getpass(f"Password for {identity}: ")
            again = getpass.getpass("Again: ")
        except (EOFError, KeyboardInterrupt):
            print("gridgate passwd: no password given", file=sys.stderr)
            return 1
        if password != again:
            print("gridgate passwd: the passwords do not match; nothing changed", file=sys.stderr)
            return 1
    secret = password.encode("utf-8")
    if not secret:
        print("gridgate passwd: the password is empty; nothing changed", file=sys.stderr)
        return 1
    if len(secret) > MAX_PASSWORD_BYTES:
        print(f"gridgate passwd: a password is at most {MAX_PASSWORD_BYTES} bytes; nothing changed", file=sys.stderr)
        return 1
    try:
        set_password(path, identity, secret, DEFAULT_ITERATIONS if iterations is None else iterations)
    except (ValueError, OSError) as exc:
        print(f"gridgate passwd: {exc}; nothing changed", file=sys.stderr)
        return 1
    return 0
