"""The contributor-name rule is written twice on purpose: the router's (nodes/identity.py, the
authoritative one) and contribute.py's (skill_scripts/contributor_key.py, which stands alone and
never imports Django) so that ``--name`` is refused before a node ever connects. These tests
feed both the same names and pin them to the same answer, word for word."""

from __future__ import annotations

import contributor_key
import pytest

from nodes import identity

GOOD = [
    "ada",
    "Ada.Lovelace_1",
    "r2-d2",
    "1st-place",
    "a",
    "7up",
    "x" * 64,  # the longest
    "ada.",  # a dot may end a name, only not two in a row
    "a.b.c",
    "amber-otter-417",
    # Reserved words only count at the start; short forms are not reserved.
    "roo",
    "sys",
    "adm",
    "my-admin",
    "team-root",
    "not-anonymous",
    # Almost an address or a UUID, but not one.
    "10.0.0.x",
    "v1.2.3",
    "9e51bf4b-f26e-4328-a904-66f019b56d2",  # 31 hex digits
    "9e51bf4b-f26e-4328-a904-66f019b56d29a",  # 33
    "9e51bf4b-f26e-4328-a904-66f019b56dzz",
]

BAD = [
    # Length bounds.
    "",
    "x" * 65,
    "a" * 100_000,
    # The charset: ':' and '/' would read as a model or a path; no markup or spaces.
    "ada:latest",
    ":",
    "ada/lovelace",
    "<b>bold</b>",
    "has space",
    "-leading-dash",
    "_leading",
    ".hidden",
    "dots..dots",
    "..",
    # White space anywhere, including where a regex's $ would let it through.
    " ada",
    "ada ",
    "ada\n",
    "\tada",
    "ada\u00a0",
    "ada\r\n",
    # Unicode: look-alike letters and digits outside ASCII.
    "аmber-otter",  # a Cyrillic а
    "ämber",
    "ｆｕｌｌ",
    "１２７.０.０.１",
    "٣",  # an Arabic-Indic digit
    "ada\u200b",  # a zero-width space
    "e\u0301",
    # Addresses, and digits and dots only.
    "10.0.0.1",
    "127.1",
    "2130706433",
    "0",
    "7",
    "1.2.3.4.5",
    "...1",
    "1.",
    "255.255.255.255",
    "::1",
    "fe80::1%eth0",
    # UUIDs, in the spellings uuid.UUID takes.
    "9e51bf4b-f26e-4328-a904-66f019b56d29",
    "9E51BF4B-F26E-4328-A904-66F019B56D29",
    "9e51bf4bf26e4328a90466f019b56d29",
    "9e51-bf4bf26e4328a90466f019b56d29",
    "{9e51bf4b-f26e-4328-a904-66f019b56d29}",
    "urn:uuid:9e51bf4b-f26e-4328-a904-66f019b56d29",
    # Reserved beginnings, in any case.
    "anonymous",
    "Anonymous",
    "ANONYMOUS-2",
    "anonymous.x",
    "admin",
    "Admin",
    "administrator",
    "admin-team",
    "IdleClaw",
    "idleclaw.official",
    "IDLECLAW_bot",
    "operator",
    "OPERATOR_1",
    "root",
    "ROOT",
    "rootbeer",
    "system",
    "System-Bot",
    "systemd",
]


# Names whose verdict this file does not pin, only that both rules give the same one: names
# that may pass for a host.
BORDERLINE = ["localhost", "ip6-localhost", "example.com"]

# Address forms inet_aton takes in hex: refused like the decimal ones.
HEX_ADDRESSES = ["0x7f.0.0.1", "0x7f000001", "0X7F.1", "0xa.0x0.0x0.0x1"]


@pytest.mark.parametrize("name", HEX_ADDRESSES)
def test_both_rules_refuse_hex_address_forms(name):
    assert identity.name_problem(name) == "a name may not look like an address"
    assert contributor_key.name_problem(name) == "a name may not look like an address"


@pytest.mark.parametrize("name", GOOD)
def test_both_rules_take_a_good_name(name):
    assert identity.name_problem(name) is None
    assert contributor_key.name_problem(name) is None


@pytest.mark.parametrize("name", BAD)
def test_both_rules_refuse_a_bad_name_with_the_same_words(name):
    problem = identity.name_problem(name)
    assert problem is not None
    assert contributor_key.name_problem(name) == problem


@pytest.mark.parametrize("name", BORDERLINE)
def test_both_rules_agree_on_borderline_names(name):
    assert contributor_key.name_problem(name) == identity.name_problem(name)


@pytest.mark.parametrize("value", [None, 42, 1.5, b"ada", ["ada"], {"name": "ada"}])
def test_both_rules_refuse_what_is_not_text(value):
    assert identity.name_problem(value) == "a name is text"
    assert contributor_key.name_problem(value) == "a name is text"


def test_both_rules_have_the_same_bounds_and_reserved_words():
    assert contributor_key.MAX_NAME_CHARS == identity.MAX_NAME_CHARS
    assert contributor_key.ANONYMOUS == identity.ANONYMOUS
    assert contributor_key.RESERVED_PREFIXES == identity.RESERVED_PREFIXES
    assert contributor_key.NAME_RE.pattern == identity.NAME.pattern
    assert contributor_key.ADDRESS_LIKE.pattern == identity.ADDRESS_LIKE.pattern


def test_every_generated_name_passes_the_scripts_rule_too():
    """The router gives keyed nodes without a name an adjective-animal-number name; contribute.py
    must take each of them back with ``--name``."""
    for adjective in identity.ADJECTIVES:
        for animal in identity.ANIMALS:
            for number in ("100", "999"):
                assert contributor_key.name_problem(f"{adjective}-{animal}-{number}") is None
