"""Contributor identity (issue 20): what the router derives from a contributor key, and the
public names contributors go by.

A contributor key is 32 random bytes that ``contribute.py`` keeps in a file and never sends
anywhere. What a router receives in ``register`` (the ``contributor.key`` field) is that
router's own **router key**: ``HMAC-SHA256(key, b"idleclaw router key v1|" + origin)`` as 64
lowercase hex, ``origin`` being the router's normalized origin as the node was configured with
it (skill_scripts/contributor_key.py ``router_origin``). A hostile or look-alike router, or a
proxy on the way, so learns only a value that is worth nothing on any other origin (red-team F6
of issue 20).

Here the router key is simply "the key": the router never stores it, it keeps its SHA-256 (to
find the contributor's record again) and the SHA-256 of the consumer token derived from it (to
know the contributor's own requests). ``contribute.py --print-token`` derives the same token
from the same router key, with the same definition; keep the two in step.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
import secrets
import socket
import uuid
from typing import Any

KEY_HEX_CHARS = 64
KEY_HEX = re.compile(r"[0-9a-f]{64}")
TOKEN_PREFIX = "icc_"
TOKEN_MESSAGE = b"idleclaw consumer token"
# The longest name, as a model name (nodes.protocol.MAX_MODEL_NAME_CHARS).
MAX_NAME_CHARS = 64
# What the public node list shows for a node without a key: no contributor may be called so.
ANONYMOUS = "anonymous"

ADJECTIVES = (
    "amber", "azure", "bold", "brave", "bright", "brisk", "calm", "clever", "coral", "cosmic",
    "crimson", "curious", "dapper", "eager", "early", "gentle", "gilded", "glad", "golden",
    "happy", "hazel", "honest", "humble", "indigo", "ivory", "jade", "jolly", "keen", "kind",
    "lively", "lucky", "lunar", "mellow", "merry", "mighty", "misty", "modest", "nimble",
    "noble", "olive", "patient", "plucky", "polite", "proud", "quick", "quiet", "rapid",
    "rosy", "russet", "sage", "scarlet", "silent", "silver", "sleepy", "snowy", "solar",
    "spry", "steady", "sunny", "swift", "tidy", "velvet", "witty", "zesty",
)  # fmt: skip
ANIMALS = (
    "badger", "beaver", "bison", "crane", "cricket", "dingo", "dolphin", "eagle", "falcon",
    "ferret", "finch", "fox", "gecko", "gibbon", "heron", "hedgehog", "ibis", "jackal",
    "jaguar", "koala", "lemur", "lynx", "magpie", "marmot", "marten", "mole", "moose", "newt",
    "ocelot", "okapi", "orca", "osprey", "otter", "owl", "panda", "pelican", "penguin",
    "puffin", "quail", "rabbit", "raven", "robin", "salmon", "seal", "shrew", "sparrow",
    "squid", "stoat", "swan", "tapir", "tern", "tiger", "toad", "trout", "turtle", "vole",
    "walrus", "weasel", "whale", "wombat", "wren", "yak", "zebra", "lark",
)  # fmt: skip

# A model name's charset without ``:`` and ``/`` (red-team F9 of issue 20: a name must not read
# as a model, a path or an address): what everyone sees carries no markup, look-alike letters
# or spaces.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# Names, and beginnings of names, that would pass for the network's own or an operator's
# (compared without case). ``anonymous`` is what the node list calls nodes without a key.
RESERVED_PREFIXES = ("anonymous", "admin", "idleclaw", "operator", "root", "system")
# Digits and dots only: an address in one of the forms inet_aton takes (127.1, 2130706433);
# its hex forms (0x7f.1) are refused by asking inet_aton itself.
ADDRESS_LIKE = re.compile(r"[0-9.]+")


def valid_key(key: Any) -> bool:
    """Whether ``key`` is a router key as sent: exactly 64 lowercase hex characters."""
    return isinstance(key, str) and len(key) == KEY_HEX_CHARS and KEY_HEX.fullmatch(key) is not None


def key_hash(key: str) -> str:
    """What the router stores to recognise a router key: its SHA-256, in hex."""
    return hashlib.sha256(key.encode("ascii")).hexdigest()


def token_of(key: str) -> str:
    """The consumer token of a router key (``contribute.py --print-token``):
    ``"icc_" + HMAC-SHA256(bytes.fromhex(key), b"idleclaw consumer token")`` in hex, a bearer
    secret that marks a request as this contributor's."""
    mac = hmac.new(bytes.fromhex(key), TOKEN_MESSAGE, hashlib.sha256).hexdigest()
    return TOKEN_PREFIX + mac


def token_hash(token: str) -> str:
    """What the router stores of a consumer token, and looks a request's token up by."""
    return hashlib.sha256(token.encode("ascii")).hexdigest()


def name_problem(name: Any) -> str | None:
    """Why ``name`` cannot be a contributor's name, or None when it can: 1-64 ASCII letters,
    digits and ``. _ -``, starting with a letter or digit, no ``..``; not an IP address (nor
    digits and dots only) or a UUID, which would pass for a node's address or id; not starting
    with a reserved word (``RESERVED_PREFIXES``, in any case). skill_scripts/contributor_key.py
    applies the same rule; tests/skill_scripts/test_name_rule.py keeps the two in step."""
    if not isinstance(name, str):
        return "a name is text"
    if not name or len(name) > MAX_NAME_CHARS:
        return f"a name is 1-{MAX_NAME_CHARS} characters"
    if NAME.fullmatch(name) is None or ".." in name:
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


def generated_name() -> str:
    """A fresh adjective-animal-number name, e.g. ``amber-otter-417``; whether it is free is
    the caller's business (about 3.7 million of them)."""
    return "-".join(
        (secrets.choice(ADJECTIVES), secrets.choice(ANIMALS), str(100 + secrets.randbelow(900)))
    )
