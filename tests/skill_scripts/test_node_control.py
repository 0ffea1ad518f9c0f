"""node_control: the contributor's limits on requests, its serving hours, the programs it pauses
for, and its log lines."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
from datetime import datetime

import node_control
import pytest
from node_control import RequestPolicy, apply_policy, parse_hours, parse_keep_alive

from tests.procs import wait_until

REQUEST = {"model": "m:1b", "messages": [{"role": "user", "content": "hi"}], "stream": True}


# --------------------------------------------------------------------------- limits


def test_without_a_policy_only_the_consumers_keep_alive_is_dropped():
    params, changes = apply_policy(
        {**REQUEST, "keep_alive": -1, "options": {"seed": 1}}, RequestPolicy()
    )
    assert params == {**REQUEST, "options": {"seed": 1}}
    assert changes == ["its keep_alive ignored"]
    assert apply_policy(REQUEST, RequestPolicy()) == (REQUEST, [])


def test_the_nodes_keep_alive_replaces_the_consumers_unless_it_is_allowed():
    mine = RequestPolicy(keep_alive="10m")
    assert apply_policy({**REQUEST, "keep_alive": 0}, mine)[0]["keep_alive"] == "10m"
    assert apply_policy(REQUEST, mine)[0]["keep_alive"] == "10m"
    theirs = RequestPolicy(keep_alive="10m", allow_keep_alive=True)
    assert apply_policy({**REQUEST, "keep_alive": 0}, theirs)[0]["keep_alive"] == 0
    assert apply_policy(REQUEST, theirs)[0]["keep_alive"] == "10m"


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"num_ctx": 8192, "num_predict": 500}, {"num_ctx": 4096, "num_predict": 256}),
        ({"num_ctx": 2048, "num_predict": 100}, {"num_ctx": 2048, "num_predict": 100}),
        ({}, {"num_predict": 256}),  # no num_ctx: the model's default stays
        ({"num_predict": -1}, {"num_predict": 256}),  # Ollama's "no limit" is not allowed
        ({"num_predict": 0, "temperature": 0}, {"num_predict": 256, "temperature": 0}),
        ({"num_ctx": "all", "num_predict": True}, {"num_predict": 256}),
    ],
)
def test_num_ctx_and_num_predict_are_held_to_the_caps(options, expected):
    policy = RequestPolicy(max_ctx=4096, max_predict=256)
    params, _ = apply_policy({**REQUEST, "options": options}, policy)
    assert params["options"] == expected
    assert policy.limits() == {"num_ctx": 4096, "num_predict": 256}


def test_the_changes_are_named_without_the_content():
    policy = RequestPolicy(keep_alive="1h", max_ctx=4096, max_predict=256)
    _, changes = apply_policy({**REQUEST, "keep_alive": "5m", "options": {"num_ctx": 9000}}, policy)
    assert changes == [
        "its keep_alive ignored",
        "num_ctx 9000 lowered to 4096",
        "num_predict unset set to 256",
    ]


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("10m", "10m"),
        ("1h30m", "1h30m"),
        ("2.5s", "2.5s"),
        ("0", 0),
        ("-1", -1),
        ("300", 300),
        ("1.5", 1.5),
        ("-1m", "-1m"),
    ],
)
def test_keep_alive_is_a_duration_or_seconds(text, value):
    assert parse_keep_alive(text) == value


@pytest.mark.parametrize("text", ["", "forever", "10 minutes", "5d", "m", "1h-"])
def test_keep_alive_that_ollama_would_refuse_is_an_error(text):
    with pytest.raises(ValueError, match="not a duration"):
        parse_keep_alive(text)


# --------------------------------------------------------------------------- hours


def _at(hhmm: str) -> datetime:
    return datetime.strptime(f"2026-12-02 {hhmm}", "%Y-%m-%d %H:%M")


def test_serving_hours_wrap_past_midnight():
    night = parse_hours("22:00-08:00")
    assert str(night) == "22:00-08:00"
    assert [node_control.outside_hours(night, _at(t)) for t in ("22:00", "03:10", "07:59")] == [
        None,
        None,
        None,
    ]
    assert node_control.outside_hours(night, _at("08:00")) == (
        "outside the serving hours 22:00-08:00"
    )
    assert node_control.outside_hours(night, _at("21:59")) is not None
    day = parse_hours("9:30-17:00")
    assert node_control.outside_hours(day, _at("09:30")) is None
    assert node_control.outside_hours(day, _at("17:00")) is not None
    assert node_control.outside_hours(None) is None


@pytest.mark.parametrize(
    "text", ["22-08", "22:00", "24:00-08:00", "10:60-11:00", "8:00-8:00", "a:bc-d:ef"]
)
def test_hours_that_are_not_a_window_are_refused(text):
    with pytest.raises(ValueError):
        parse_hours(text)


# --------------------------------------------------------------------------- programs


def test_a_running_program_is_found_by_the_name_it_was_started_as():
    name = "idleclaw-render-farm-job"  # longer than Linux's 15-character process names
    dummy = subprocess.Popen(["bash", "-c", f"exec -a {name} sleep 30"])
    try:
        wait_until(
            lambda: name in (node_control.process_names() or set()),
            timeout=5,
            what="the dummy program to show",
        )
        names = node_control.process_names()
        assert node_control.running_programs([name, "not-running-here"], names) == [name]
        assert node_control.running_programs(["IDLECLAW-RENDER-FARM-JOB"], names)
    finally:
        dummy.kill()
        dummy.wait()
    assert node_control.running_programs([name], node_control.process_names()) == []


def test_a_copy_of_a_program_is_found_by_its_file_name(tmp_path):
    game = tmp_path / "Game Launcher"
    shutil.copy(shutil.which("sleep"), game)
    dummy = subprocess.Popen([str(game), "30"])
    try:
        wait_until(
            lambda: node_control.running_programs(["game launcher"], node_control.process_names()),
            timeout=5,
            what="the copied program to show",
        )
    finally:
        dummy.kill()
        dummy.wait()


def test_a_name_linux_cut_at_15_characters_still_matches_but_no_other():
    names = {"a-very-long-pro", "python3"}
    assert node_control.running_programs(["a-very-long-program-name", "python"], names) == [
        "a-very-long-program-name"
    ]


# --------------------------------------------------------------------------- the log


def _record(message: str, *args, **extra) -> logging.LogRecord:
    record = logging.LogRecord("idleclaw", logging.INFO, __file__, 1, message, args, None)
    record.__dict__.update(extra)
    return record


def test_text_log_lines_escape_what_could_drive_a_terminal():
    line = node_control.TextFormatter().format(
        _record("the router closed the connection: %s", "bye\x1b]0;owned\x07\nINFO fake\u202e")
    )
    assert line.endswith(
        "INFO the router closed the connection: bye\\x1b]0;owned\\x07\\nINFO fake\\u202e"
    )
    assert node_control.escaped("Grüße, tab\there") == "Grüße, tab\there"


def test_json_log_lines_carry_the_event_and_its_fields():
    record = _record(
        "request %s finished",
        "r1\x1b",
        **node_control.event("request", id="r1", tokens=3, tokens_per_s=12.5),
    )
    line = node_control.JsonFormatter().format(record)
    assert line.isascii()
    parsed = json.loads(line)
    assert parsed["level"] == "info" and parsed["event"] == "request"
    assert parsed["message"] == "request r1\x1b finished"
    assert (parsed["id"], parsed["tokens"], parsed["tokens_per_s"]) == ("r1", 3, 12.5)
    assert datetime.fromisoformat(parsed["time"]).tzinfo is not None
