"""The contributor key of ``contribute.py`` (issue 20): made once, kept in a private file, and
proved to the router at registration so that the contributor's record and name survive restarts
and address changes. Standard library only.

The key is 32 random bytes written as 64 lowercase hex characters, and it never leaves this
machine. What a router is sent is its own **router key**, derived from the key and the router's
origin (``router_origin``):
``HMAC-SHA256(key bytes, b"idleclaw router key v1|" + origin)`` as 64 lowercase hex. A router
(or a look-alike, or a proxy on the way) learns only its own derivation, which is worth nothing
on another origin (red-team F6 of issue 20). The router stores only the router key's SHA-256.
The consumer token (``contribute.py --print-token``) is derived from the router key:
``"icc_" + HMAC-SHA256(router key bytes, b"idleclaw consumer token")`` in hex; the router
computes the same from what it was sent (nodes/identity.py).
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import ipaddress
import os
import re
import secrets
import socket
import stat
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

KEY_FILE_NAME = "contributor.key"
KEY_HEX = re.compile(r"[0-9a-f]{64}")
TOKEN_PREFIX = "icc_"
TOKEN_MESSAGE = b"idleclaw consumer token"
ROUTER_KEY_MESSAGE = b"idleclaw router key v1|"
DEFAULT_PORTS = {"http": 80, "https": 443}
# The WebSocket schemes name the same origin as their HTTP ones.
SCHEME_OF = {"http": "http", "https": "https", "ws": "http", "wss": "https"}
# A key file is 65 bytes; anything much larger is not one, and is not read whole.
MAX_KEY_FILE_BYTES = 256
# The contributor name rule (the router's, nodes/identity.py): the charset of model names
# (docs/protocol.md §4) without ``:`` and ``/``; not an address or a UUID; not beginning with a
# reserved word (the first is what the public node list calls nodes without a key).
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
MAX_NAME_CHARS = 64
ANONYMOUS = "anonymous"
RESERVED_PREFIXES = ("anonymous", "admin", "idleclaw", "operator", "root", "system")
ADDRESS_LIKE = re.compile(r"[0-9.]+")
# POSIX permissions: on Windows the mode bits say nothing about who may read a file.
CHECK_MODES = os.name == "posix"
# Not on Windows, which has no such flag (nor, for most users, symbolic links).
NO_FOLLOW = getattr(os, "O_NOFOLLOW", 0)


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


def name_problem(name: Any) -> str | None:
    """Why ``name`` cannot be a contributor name, or None when it can: the router's rule
    (nodes/identity.py), kept in step by tests/skill_scripts/test_name_rule.py."""
    if not isinstance(name, str):
        return "a name is text"
    if not 0 < len(name) <= MAX_NAME_CHARS:
        return f"a name is 1-{MAX_NAME_CHARS} characters"
    if NAME_RE.fullmatch(name) is None or ".." in name:
        return "a name is ASCII letters, digits and . _ - (starting with a letter or digit)"
    lowered = name.lower()
    if lowered.startswith(ANONYMOUS):
        return f'"{ANONYMOUS}" is what nodes without a key are called'
    for word in RESERVED_PREFIXES:
        if lowered.startswith(word):
            return f'a name may not begin with "{word}": it would pass for the network\'s own'
    if (
        ADDRESS_LIKE.fullmatch(name) is not None
        or _parses(ipaddress.ip_address, name)
        or _parses(socket.inet_aton, name)  # and its hex forms: 0x7f.1
    ):
        return "a name may not look like an address"
    if _parses(uuid.UUID, name):
        return "a name may not look like a node id (a UUID)"
    return None


def _parses(parse: Any, text: str) -> bool:
    try:
        parse(text)
    except (ValueError, OSError):  # inet_aton raises OSError
        return False
    return True


def router_origin(server: str) -> str:
    """The normalized origin of a router URL: lower-case scheme (``ws``/``wss`` as
    ``http``/``https``), lower-case host (IDNA-encoded, an IPv6 address in brackets), and the
    port only when it is not the scheme's default; no user, path or query. Raises
    ``ValueError`` for anything else."""
    parts = urlsplit(server.strip())
    scheme = SCHEME_OF.get(parts.scheme.lower())
    host = parts.hostname  # lower-cased, without brackets or user
    port = parts.port  # raises ValueError on a malformed one
    if scheme is None or not host:
        raise ValueError(f"not an http(s) or ws(s) URL with a host: {server!r}")
    if not host.isascii():
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            raise ValueError(f"not a host name: {parts.hostname!r}") from None
    if ":" in host:
        host = f"[{host}]"
    if port is not None and port != DEFAULT_PORTS[scheme]:
        return f"{scheme}://{host}:{port}"
    return f"{scheme}://{host}"


def router_key(key: str, server: str) -> str:
    """What ``contribute.py`` sends the router at ``server`` in place of the key: the key's
    HMAC-SHA256 of ``b"idleclaw router key v1|" + router_origin(server)``, as 64 lowercase hex.
    Each router origin gets its own; none leads back to the key or to another's."""
    message = ROUTER_KEY_MESSAGE + router_origin(server).encode("ascii")
    return hmac.new(bytes.fromhex(key), message, hashlib.sha256).hexdigest()


def token_of(router_key: str) -> str:
    """The consumer token of a router key (``router_key``): a bearer secret marking requests to
    that router as this contributor's."""
    mac = hmac.new(bytes.fromhex(router_key), TOKEN_MESSAGE, hashlib.sha256).hexdigest()
    return TOKEN_PREFIX + mac


def load(path: Path) -> str:
    """The key in ``path``; raises ``FileNotFoundError`` when there is none (no key is made),
    ``KeyFileError`` when the file cannot be used."""
    return _read(path)


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
    # O_NOFOLLOW: a symbolic link in the key's place (planted by someone who may write the
    # folder) would make this process read, and use, a key of their choosing.
    try:
        fd = os.open(path, os.O_RDONLY | NO_FOLLOW)
    except FileNotFoundError:
        raise
    except OSError as exc:  # no permission, a symbolic link, ...
        if exc.errno == errno.ELOOP or (exc.errno == errno.EMLINK and NO_FOLLOW):
            raise KeyFileError(
                f"{path} is a symbolic link: a key file is refused through one; "
                "give --key-file the file itself"
            ) from None
        raise KeyFileError(f"cannot read the contributor key {path}: {exc.strerror}") from None
    try:
        status = os.fstat(fd)
        if not stat.S_ISREG(status.st_mode):
            raise KeyFileError(f"cannot read the contributor key {path}: not a regular file")
        if CHECK_MODES and status.st_uid != os.geteuid():
            raise KeyFileError(
                f"{path} belongs to another user (uid {status.st_uid}): the key is your "
                "identity and must be your own file; make a new one with another --key-file"
            )
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
