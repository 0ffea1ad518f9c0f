"""Request ids: the ``x-request-id`` of every API response, and the id its node sees.

``idleclaw_site.asgi.APIHandler`` gives each request a fresh id and sends it back as
``x-request-id``, whatever the answer (a relayed one, an error, a model list). A relay
(``routing.streaming.Relay``) takes the ids it sends to nodes from the same request: the first
is the request id itself, so the id a user quotes is the one in the contributor's log; each
further one (the next node after a failover, the next round after the router's own tool calls)
is the request id with a suffix, ``-2``, ``-3``, … Outside an API request (tests, benchmarks)
every id is fresh.

A context variable carries the request's ids from the handler to the relay, so every front end
that relays, including ones added later, gets this without passing an id along. The object in
it is shared by the tasks a request may start (a context is copied into a new task, the object
is not), so no id is ever issued twice.
"""

from __future__ import annotations

import uuid
from contextvars import ContextVar

HEADER = "x-request-id"


def new_id() -> str:
    """A fresh id: 32 hexadecimal digits."""
    return uuid.uuid4().hex


class RequestIds:
    """The ids one API request may give its node requests."""

    __slots__ = ("request_id", "issued")

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.issued = 0

    def issue(self) -> str:
        self.issued += 1
        if self.issued == 1:
            return self.request_id
        return f"{self.request_id}-{self.issued}"


_current: ContextVar[RequestIds | None] = ContextVar("idleclaw_request_ids", default=None)


def begin(request_id: str) -> None:
    """Ids issued from now on in this context (the task serving the request) derive from
    ``request_id``."""
    _current.set(RequestIds(request_id))


def issue() -> str:
    """An id for a node request: unique among all of them, and derived from the API request's
    id when there is one (at most 64 characters, PROTOCOL §1)."""
    ids = _current.get()
    return new_id() if ids is None else ids.issue()
