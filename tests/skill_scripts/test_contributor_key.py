"""contribute.py's contributor key (issue 20): made once in a private file, reused, refused when
others may read it, another user owns it, it is a symbolic link or it holds no key; the key
never leaves the machine (each router gets its own derivation), and the consumer token."""

from __future__ import annotations

import concurrent.futures
import hashlib
import hmac
import json
import os
import stat

import contribute
import contributor_key
import pytest

from .conftest import closed_port, run_script, script_env

ROUTER = "https://api.example.org"


def _router_key(key: str, origin: str = ROUTER) -> str:
    """The documented definition, written out independently of the implementation."""
    return hmac.new(
        bytes.fromhex(key), b"idleclaw router key v1|" + origin.encode(), hashlib.sha256
    ).hexdigest()


def _token_of(key: str, origin: str = ROUTER) -> str:
    """The documented definition, written out independently of both implementations: the
    token of the router key for ``origin``."""
    mac = hmac.new(bytes.fromhex(_router_key(key, origin)), b"idleclaw consumer token",
                   hashlib.sha256)  # fmt: skip
    return "icc_" + mac.hexdigest()


def _start(*args: str, **env: str):
    """contribute.py started as a node whose Ollama is not there: it makes (or reads) the key,
    then stops with exit code 1."""
    return run_script(
        "contribute.py", *args,
        env=script_env(OLLAMA_HOST=f"http://127.0.0.1:{closed_port()}", **env),
    )  # fmt: skip


def _print_token(*args: str, server: str = ROUTER, **env: str):
    return run_script(
        "contribute.py", "--print-token", *args, env=script_env(IDLECLAW_SERVER=server, **env)
    )


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_the_key_is_made_once_privately_and_the_token_is_stable(tmp_path):
    first = _start(XDG_CONFIG_HOME=str(tmp_path))
    assert first.returncode == 1 and "cannot reach Ollama" in first.stderr
    key_file = tmp_path / "idleclaw" / "contributor.key"
    assert "made a new contributor key in " + str(key_file) in first.stderr
    key = key_file.read_text().strip()
    assert len(key) == 64 and int(key, 16) >= 0 and key == key.lower()
    assert key not in first.stderr and key not in first.stdout
    assert _mode(key_file) == 0o600 and _mode(key_file.parent) == 0o700

    token = _print_token(XDG_CONFIG_HOME=str(tmp_path))
    assert token.returncode == 0, token.stderr
    assert token.stdout == _token_of(key) + "\n"
    assert "good only on the router at https://api.example.org" in token.stderr
    again = _start(XDG_CONFIG_HOME=str(tmp_path))
    assert "made a new" not in again.stderr
    assert key_file.read_text().strip() == key
    assert _print_token(XDG_CONFIG_HOME=str(tmp_path)).stdout == token.stdout


def test_print_token_without_a_key_file_makes_none_and_says_so(tmp_path):
    """Red-team F10 of issue 20: a token of a key that never served gets nothing, so
    ``--print-token`` does not make one; it says where the key will be."""
    result = _print_token(XDG_CONFIG_HOME=str(tmp_path))
    assert result.returncode == 2 and result.stdout == ""
    key_file = tmp_path / "idleclaw" / "contributor.key"
    assert f"no contributor key in {key_file} yet" in result.stderr
    assert not (tmp_path / "idleclaw").exists()


@pytest.mark.parametrize(
    ("server", "origin"),
    [
        ("https://api.example.org", "https://api.example.org"),
        ("HTTPS://API.Example.ORG:443/some/path/", "https://api.example.org"),
        ("https://user:secret@api.example.org", "https://api.example.org"),
        ("https://api.example.org:8443", "https://api.example.org:8443"),
        ("http://api.example.org:80", "http://api.example.org"),
        ("http://127.0.0.1:8000", "http://127.0.0.1:8000"),
        ("http://[::1]:8000", "http://[::1]:8000"),
    ],
)
def test_the_token_is_that_of_the_routers_normalized_origin(tmp_path, server, origin):
    key_file = tmp_path / "k"
    key_file.write_text("ab" * 32 + "\n")
    key_file.chmod(0o600)
    result = _print_token("--key-file", str(key_file), server=server)
    assert result.returncode == 0, result.stderr
    assert result.stdout == _token_of("ab" * 32, origin) + "\n"
    assert f"good only on the router at {origin} " in result.stderr


def test_the_key_file_option_chooses_another_file(tmp_path):
    chosen = tmp_path / "elsewhere" / "mine.key"
    _start("--key-file", str(chosen), XDG_CONFIG_HOME=str(tmp_path / "config"))
    result = _print_token("--key-file", str(chosen), XDG_CONFIG_HOME=str(tmp_path / "config"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == _token_of(chosen.read_text().strip())
    assert not (tmp_path / "config").exists()


def test_a_key_file_others_may_read_is_refused_and_left_alone(tmp_path):
    key_file = tmp_path / "k"
    key_file.write_text("ab" * 32 + "\n")
    key_file.chmod(0o644)
    result = run_script("contribute.py", "--print-token", "--key-file", str(key_file))
    assert result.returncode == 2
    assert "may be read or written by others" in result.stderr and "chmod 600" in result.stderr
    assert result.stdout == ""
    assert key_file.read_text() == "ab" * 32 + "\n" and _mode(key_file) == 0o644


@pytest.mark.parametrize(
    "content",
    ["", "not a key\n", "AB" * 32, "ab" * 31, "ab" * 33, "ab" * 32 + "\nextra", "x" * 5000],
)
def test_a_file_that_holds_no_key_is_refused_and_left_alone(tmp_path, content):
    key_file = tmp_path / "k"
    key_file.write_text(content)
    key_file.chmod(0o600)
    result = run_script("contribute.py", "--print-token", "--key-file", str(key_file))
    assert result.returncode == 2
    assert "does not hold a contributor key" in result.stderr
    assert key_file.read_text() == content


def test_a_key_file_of_another_user_is_refused(tmp_path):
    """Red-team F10 of issue 20: a key file someone else owns is not this user's identity."""
    if os.geteuid() != 0:
        pytest.skip("only root can give a file to another user")
    key_file = tmp_path / "k"
    key_file.write_text("ab" * 32 + "\n")
    key_file.chmod(0o600)
    os.chown(key_file, 4321, -1)
    result = _print_token("--key-file", str(key_file))
    assert result.returncode == 2 and result.stdout == ""
    assert "belongs to another user (uid 4321)" in result.stderr
    assert _start("--key-file", str(key_file)).returncode == 2
    assert key_file.read_text() == "ab" * 32 + "\n"


def test_a_key_file_that_is_a_symbolic_link_is_refused(tmp_path):
    """Red-team F10 of issue 20: a link planted in the key's place would choose the key."""
    target = tmp_path / "planted"
    target.write_text("ab" * 32 + "\n")
    target.chmod(0o600)
    link = tmp_path / "contributor.key"
    link.symlink_to(target)
    result = _print_token("--key-file", str(link))
    assert result.returncode == 2 and result.stdout == ""
    assert "is a symbolic link" in result.stderr and "Traceback" not in result.stderr
    started = _start("--key-file", str(link))
    assert started.returncode == 2 and "is a symbolic link" in started.stderr
    assert link.is_symlink() and target.read_text() == "ab" * 32 + "\n"


def test_a_key_path_that_is_a_folder_is_refused_clearly(tmp_path):
    result = run_script("contribute.py", "--print-token", "--key-file", str(tmp_path))
    assert result.returncode == 2
    assert "cannot read the contributor key" in result.stderr and "Traceback" not in result.stderr


def test_nodes_starting_together_share_one_new_key(tmp_path):
    key_file = tmp_path / "new.key"
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        runs = list(pool.map(lambda _: _start("--key-file", str(key_file)), range(4)))
    assert [run.returncode for run in runs] == [1] * 4, [run.stderr for run in runs]
    assert sum("made a new contributor key" in run.stderr for run in runs) == 1
    token = _print_token("--key-file", str(key_file))
    assert token.stdout == _token_of(key_file.read_text().strip()) + "\n"
    assert [p.name for p in tmp_path.iterdir()] == ["new.key"]  # no temporary file left


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--name", "has space"], "argument --name: a name is ASCII letters"),
        (["--name", "x" * 65], "argument --name: a name is 1-64 characters"),
        (["--name", "Anonymous"], "what nodes without a key are called"),
        (["--name", "ada:latest"], "argument --name: a name is ASCII letters, digits and . _ -"),
        (["--name", "ada/x"], "argument --name: a name is ASCII letters, digits and . _ -"),
        (["--name", "192.168.1.20"], "may not look like an address"),
        (["--name", "9e51bf4b-f26e-4328-a904-66f019b56d29"], "may not look like a node id"),
        (["--name", "IdleClaw-team"], 'may not begin with "idleclaw"'),
        (["--name", "ROOT"], 'may not begin with "root"'),
        (["--anonymous", "--name", "ada"], "--anonymous is without a key"),
        (["--anonymous", "--print-token"], "--anonymous is without a key"),
    ],
)
def test_bad_identity_options_are_refused(args, says):
    result = run_script("contribute.py", *args)
    assert result.returncode == 2
    assert says in result.stderr


def test_the_register_frame_carries_the_routers_derivation_never_the_key():
    """Red-team F6 of issue 20: a router (or a look-alike, or a proxy) is sent only its own
    derivation of the key, which is worth nothing at another origin."""
    key = "cd" * 32
    server = "http://127.0.0.1:8000"
    derived = contributor_key.router_key(key, server)
    assert derived == _router_key(key, "http://127.0.0.1:8000") != key
    assert contributor_key.router_key(key, "http://127.0.0.1:8001") != derived
    node = contribute.Contributor(
        server=server, ollama="http://127.0.0.1:2", models=[],
        max_concurrent=1, ollama_version="0.12.3",
        identity=contribute.Identity(router_key=derived, name="ada"),
    )  # fmt: skip
    assert node.register_frame()["contributor"] == {"key": derived, "name": "ada"}
    assert key not in json.dumps(node.register_frame())
    assert derived not in repr(node.identity)
    node.identity = contribute.Identity(router_key=derived)
    assert node.register_frame()["contributor"] == {"key": derived}
    node.identity = None
    assert "contributor" not in node.register_frame()


def test_the_default_key_path_follows_xdg():
    assert contributor_key.default_key_path({"XDG_CONFIG_HOME": "/x/conf"}).as_posix() == (
        "/x/conf/idleclaw/contributor.key"
    )
    home = os.path.expanduser("~")
    for environ in ({}, {"XDG_CONFIG_HOME": ""}, {"XDG_CONFIG_HOME": "relative/dir"}):
        path = contributor_key.default_key_path(environ)
        assert str(path) == os.path.join(home, ".config", "idleclaw", "contributor.key")
