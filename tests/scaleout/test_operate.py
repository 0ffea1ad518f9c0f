"""Operating two workers (issue 17): an operator on worker B cancels a request and disconnects
a node whose socket is on worker A, and /metrics gives the same totals on either worker.

Real daphne workers on Redis and PostgreSQL, the real contribute.py, the admin over HTTP."""

from __future__ import annotations

import pytest
import requests
from django.contrib.auth.hashers import make_password

from tests import procs
from tests.conftest import ROOMY_ENV
from tests.ops import TOKEN, sample, samples
from tests.scaleout import cluster
from tests.scaleout.cluster import MODEL

pytestmark = [pytest.mark.scaleout, pytest.mark.e2e]


@pytest.fixture
def router_env() -> dict[str, str]:
    return {**ROOMY_ENV, "IDLECLAW_METRICS_TOKEN": TOKEN}


def operator_on(worker_url: str, database_url: str) -> requests.Session:
    """A member of the "operator" group (made by the migrations), logged in to the admin."""
    [(user_id,)] = cluster.rows(
        database_url,
        "INSERT INTO auth_user (password, is_superuser, username, first_name, last_name, email,"
        " is_staff, is_active, date_joined) VALUES (%s, false, 'operator', '', '', '', true,"
        " true, now()) RETURNING id",
        [make_password("operator-password")],
    )
    cluster.rows(
        database_url,
        "INSERT INTO auth_user_groups (user_id, group_id) SELECT %s, id FROM auth_group"
        " WHERE name = 'operator' RETURNING id",
        [user_id],
    )
    session = requests.Session()
    session.get(f"{worker_url}/admin/login/", timeout=10)
    login = session.post(
        f"{worker_url}/admin/login/",
        data={
            "username": "operator",
            "password": "operator-password",
            "next": "/admin/",
            "csrfmiddlewaretoken": session.cookies["csrftoken"],
        },
        timeout=10,
    )
    assert login.url.endswith("/admin/"), login.text[:500]
    return session


def act(session: requests.Session, url: str, action: str, pks: list[object]) -> None:
    reply = session.post(
        url,
        data={
            "action": action,
            "_selected_action": [str(pk) for pk in pks],
            "csrfmiddlewaretoken": session.cookies["csrftoken"],
        },
        timeout=10,
        allow_redirects=False,
    )
    assert reply.status_code == 302, reply.text[:500]


def scrape(worker_url: str) -> dict:
    reply = requests.get(
        f"{worker_url}/metrics", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10
    )
    assert reply.status_code == 200, reply.text
    return samples(reply.text)


def test_an_operator_on_b_acts_on_a_node_on_a_and_both_workers_count_alike(
    workers, slow_emulator, database_url
):
    a, b = workers
    node = cluster.contributor_on(a, slow_emulator, "--max-concurrent", "4")
    try:
        cluster.wait_for_nodes(b.url, 1)
        for worker in (a, b, b):  # three answers cut by max_tokens, consumers on both workers
            reply = requests.post(
                f"{worker.url}/v1/chat/completions",
                json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                      "max_tokens": 3},
                timeout=30,
            )  # fmt: skip
            assert reply.json()["choices"][0]["finish_reason"] == "length"
        body = {"model": MODEL, "messages": [{"role": "user", "content": "a long story"}]}
        stream = requests.post(f"{b.url}/api/chat", json=body, stream=True, timeout=30)
        lines = stream.iter_lines(decode_unicode=True)
        assert next(line for line in lines if line.startswith("data: {"))
        [(request_id,)] = cluster.rows(
            database_url, "SELECT request_id FROM routing_inflightrequest"
        )
        operator = operator_on(b.url, database_url)

        act(operator, f"{b.url}/admin/routing/inflightrequest/", "cancel", [request_id])
        rest = [line for line in lines if line.startswith("data: ")]
        assert "[Error: an operator ended this request]" in rest[-2]
        assert rest[-1] == "data: [DONE]"
        procs.wait_until(
            lambda: cluster.emulator_stats(slow_emulator.url)["chat_cancelled"] == 1,
            what="the node on A to stop generating",
        )
        for worker in (a, b):
            procs.wait_until(
                lambda w=worker: cluster.get_json(f"{w.url}/health")["active_requests"] == 0,
                what=f"{worker.name} to see the slot freed",
            )

        # Both workers read the same database: the same samples, whichever answers.
        found = procs.wait_until(lambda: (s := scrape(a.url)) == scrape(b.url) and s)
        requests_total = "idleclaw_requests_total"
        assert sample(found, requests_total, model=MODEL, api="openai", outcome="length") == 3
        assert sample(found, requests_total, model=MODEL, api="chat", outcome="cancelled") == 1
        assert sample(found, "idleclaw_time_to_first_token_seconds_count", model=MODEL) == 4
        assert sample(found, "idleclaw_tokens_total", model=MODEL) > 3 * 3
        assert sample(found, "idleclaw_nodes_connected") == 1
        assert sample(found, "idleclaw_workers_alive") == 2

        [(session_id,)] = cluster.rows(database_url, "SELECT id FROM nodes_nodesession")
        act(operator, f"{b.url}/admin/nodes/nodesession/", "disconnect", [session_id])
        node.wait_for_line("the router closed the connection: disconnected by an operator")
        logged = cluster.rows(
            database_url,
            "SELECT u.username, l.change_message FROM django_admin_log l"
            " JOIN auth_user u ON u.id = l.user_id ORDER BY l.id",
        )
        assert logged == [
            ("operator", f"Cancelled by an operator (node {node_id_of(node)})"),
            ("operator", "Disconnected by an operator"),
        ]
    finally:
        node.stop()


def node_id_of(node: procs.Proc) -> str:
    return node.wait_for_line(r"as node (\S+):").group(1)
