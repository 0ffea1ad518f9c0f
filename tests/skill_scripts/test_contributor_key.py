"""contribute.py's contributor key (issue 20): made once in a private file, reused, refused when
others may read it or it holds no key, and the consumer token derived from it."""

from __future__ import annotations

import concurrent.futures
import hashlib
import hmac
import os
import stat

import contribute
import contributor_key
import pytest

from .conftest import run_script, script_env


def _token_of(key: str) -> str:
    """The documented definition, written out independently of both implementations."""
    mac = hmac.new(bytes.fromhex(key), b"idleclaw consumer token", hashlib.sha256)
    return "icc_" + mac.hexdigest()


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_the_key_is_made_once_privately_and_the_token_is_stable(tmp_path):
    env = script_env(XDG_CONFIG_HOME=str(tmp_path))
    first = run_script("contribute.py", "--print-token", env=env)
    assert first.returncode == 0, first.stderr
    key_file = tmp_path / "idleclaw" / "contributor.key"
    assert "made a new contributor key in " + str(key_file) in first.stderr
    key = key_file.read_text().strip()
    assert len(key) == 64 and int(key, 16) >= 0 and key == key.lower()
    assert key not in first.stderr and key not in first.stdout
    assert _mode(key_file) == 0o600 and _mode(key_file.parent) == 0o700
    assert first.stdout == _token_of(key) + "\n"

    again = run_script("contribute.py", "--print-token", env=env)
    assert again.returncode == 0 and again.stdout == first.stdout
    assert "made a new" not in again.stderr
    assert key_file.read_text().strip() == key


def test_key_file_chooses_another_file(tmp_path):
    chosen = tmp_path / "elsewhere" / "mine.key"
    result = run_script(
        "contribute.py", "--print-token", "--key-file", str(chosen),
        env=script_env(XDG_CONFIG_HOME=str(tmp_path / "config")),
    )  # fmt: skip
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


def test_a_key_path_that_is_a_folder_is_refused_clearly(tmp_path):
    result = run_script("contribute.py", "--print-token", "--key-file", str(tmp_path))
    assert result.returncode == 2
    assert "cannot read the contributor key" in result.stderr and "Traceback" not in result.stderr


def test_nodes_starting_together_share_one_new_key(tmp_path):
    key_file = tmp_path / "new.key"
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        runs = list(
            pool.map(
                lambda _: run_script("contribute.py", "--print-token", "--key-file", str(key_file)),
                range(4),
            )
        )
    assert all(run.returncode == 0 for run in runs), [run.stderr for run in runs]
    assert {run.stdout for run in runs} == {_token_of(key_file.read_text().strip()) + "\n"}
    assert [p.name for p in tmp_path.iterdir()] == ["new.key"]  # no temporary file left


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--name", "has space"], "argument --name: a name is ASCII letters"),
        (["--name", "x" * 65], "argument --name: a name is 1-64 characters"),
        (["--name", "Anonymous"], "what nodes without a key are called"),
        (["--anonymous", "--name", "ada"], "--anonymous is without a key"),
        (["--anonymous", "--print-token"], "--anonymous is without a key"),
    ],
)
def test_bad_identity_options_are_refused(args, says):
    result = run_script("contribute.py", *args)
    assert result.returncode == 2
    assert says in result.stderr


def test_the_register_frame_carries_the_key_and_name_only_when_given():
    key = "cd" * 32
    node = contribute.Contributor(
        server="http://127.0.0.1:1", ollama="http://127.0.0.1:2", models=[],
        max_concurrent=1, ollama_version="0.12.3",
        identity=contribute.Identity(key=key, name="ada"),
    )  # fmt: skip
    assert node.register_frame()["contributor"] == {"key": key, "name": "ada"}
    assert key not in repr(node.identity)
    unnamed = contribute.Identity(key=key)
    node.identity = unnamed
    assert node.register_frame()["contributor"] == {"key": key}
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
