"""The contributor key of ``contribute.py`` (issue 20): made once, kept in a private file, and
proved to the router at registration so that the contributor's record and name survive restarts
and address changes. Standard library only.

The key is 32 random bytes written as 64 lowercase hex characters. The router stores only its
SHA-256. The consumer token (``contribute.py --print-token``) is derived from it:
``"icc_" + HMAC-SHA256(key bytes, b"idleclaw consumer token")`` in hex; the router computes the
same (nodes/identity.py).
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import os
import re
import secrets
import stat
from collections.abc import Mapping
from pathlib import Path

KEY_FILE_NAME = "contributor.key"
KEY_HEX = re.compile(r"[0-9a-f]{64}")
TOKEN_PREFIX = "icc_"
TOKEN_MESSAGE = b"idleclaw consumer token"
# A key file is 65 bytes; anything much larger is not one, and is not read whole.
MAX_KEY_FILE_BYTES = 256
# The contributor name rule: that of model names (docs/protocol.md §4), and not the word the
# public node list uses for nodes without a key.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]*")
MAX_NAME_CHARS = 64
ANONYMOUS = "anonymous"
# POSIX permissions: on Windows the mode bits say nothing about who may read a file.
CHECK_MODES = os.name == "posix"


class KeyFileError(Exception):
    """The key file cannot be used; the message says why and what to do."""


def default_key_path(environ: Mapping[str, str] | None = None) -> Path:
    """``$XDG_CONFIG_HOME/idleclaw/contributor.key``, by default
    ``~/.config/idleclaw/contributor.key`` (the XDG rule: a relative XDG_CONFIG_HOME is
    ignored)."""
    environ = os.environ if environ is None else environ
    base = environ.get("XDG_CONFIG_HOME", "")
    if not base or not os.path.isabs(base):
        base = os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "idleclaw" / KEY_FILE_NAME


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a contributor name, or None when it can (the router's rule)."""
    if not 0 < len(name) <= MAX_NAME_CHARS:
        return f"a name is 1-{MAX_NAME_CHARS} characters"
    if NAME_RE.fullmatch(name) is None or ".." in name:
        return "a name is ASCII letters, digits and . _ : / - (starting with a letter or digit)"
    if name.lower() == ANONYMOUS:
        return f'"{ANONYMOUS}" is what nodes without a key are called'
    return None


def token_of(key: str) -> str:
    """The consumer token of a key: a bearer secret marking requests as this contributor's."""
    return TOKEN_PREFIX + hmac.new(bytes.fromhex(key), TOKEN_MESSAGE, hashlib.sha256).hexdigest()


def load_or_create(path: Path) -> tuple[str, bool]:
    """The key in ``path``, made there first if there is no file: ``(key, created)``.

    A new key's folder is made private (0700) and the file is written whole under another name
    and linked into place, so that two nodes starting at once end up with the same key and
    neither ever reads half a file. An existing file is refused when others may read or write
    it, or when it does not hold a key; it is never replaced."""
    try:
        return _read(path), False
    except FileNotFoundError:
        pass
    folder = path.parent
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise KeyFileError(f"cannot make {folder} for the key: {exc.strerror}") from None
    key = secrets.token_bytes(32).hex()
    try:
        if _write_new(path, key):
            return key, True
    except OSError as exc:
        raise KeyFileError(f"cannot write the contributor key to {path}: {exc.strerror}") from None
    return _read(path), False  # another process made it first


def _write_new(path: Path, key: str) -> bool:
    """Write ``key`` to ``path`` unless a file is there; False when one was."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="ascii") as file:
            file.write(key + "\n")
            file.flush()
            os.fsync(file.fileno())
        try:
            os.link(temporary, path)
        except FileExistsError:
            return False
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):
                raise
            # A file system without hard links: create in place, refusing an existing file.
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w", encoding="ascii") as file:
                file.write(key + "\n")
        return True
    finally:
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass


def _read(path: Path) -> str:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise
    except OSError as exc:  # no permission, ...
        raise KeyFileError(f"cannot read the contributor key {path}: {exc.strerror}") from None
    try:
        status = os.fstat(fd)
        if not stat.S_ISREG(status.st_mode):
            raise KeyFileError(f"cannot read the contributor key {path}: not a regular file")
        if CHECK_MODES and status.st_mode & 0o077:
            raise KeyFileError(
                f"{path} may be read or written by others (mode {status.st_mode & 0o777:o}): "
                f"the key is your identity; make it private with `chmod 600 {path}`"
            )
        data = os.read(fd, MAX_KEY_FILE_BYTES + 1)
    finally:
        os.close(fd)
    text = data.decode("ascii", errors="replace").strip()
    if len(data) > MAX_KEY_FILE_BYTES or KEY_HEX.fullmatch(text) is None:
        raise KeyFileError(
            f"{path} does not hold a contributor key (64 lowercase hex characters); "
            "it is left as it is: move it away to make a new key, or pick another --key-file"
        )
    return text
