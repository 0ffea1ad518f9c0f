"""The node WebSocket (PROTOCOL §1): an adapter between a contributor's socket, the database and
the channel layer.

Per-connection bookkeeping (which requests were sent down this very socket) lives on the
instance; that is what makes the connection, not the ``node_id`` in a frame, the identity.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

from channels.consumer import get_handler_name
from channels.exceptions import ChannelFull, StopConsumer
from channels.generic.websocket import AsyncWebsocketConsumer
from channels.layers import get_channel_layer
from django.conf import settings
from django.utils import timezone

from idleclaw_site import shutdown
from idleclaw_site.db import db
from idleclaw_site.dispatch import dispatch_from
from idleclaw_site.net import scope_client_ip
from nodes import actions, protocol, services, worker
from nodes.protocol import CloseReason, EventType, FrameType, ProtocolError
from routing import metrics

logger = logging.getLogger("idleclaw.nodes")


# Chunks that together cost as much of a node's frame allowance as one frame.
CHUNKS_PER_UNIT = 8
# What one tool call costs of it, in frames: each is parsed, measured and may be checked against
# a schema (routing.tool_calls), many times a token's work. Real answers make a handful.
FRAMES_PER_TOOL_CALL = 8
# How far a loaded model's expiry may move before the router writes it down
# (``protocol.loaded_changed``): Ollama moves it with every request a node serves.
LOADED_SLACK_S = 30.0
# And how often at most a node's loaded report is written (a change within the interval is
# written at its end): a node that changes its report with every heartbeat (it may send one a
# second) must not cost the database a write for each.
LOADED_MIN_INTERVAL_S = 5.0
# The shortest time between two ``models_update`` frames the router applies (a faster one is
# held, and the latest applied when the time is over); contribute.py sends one when Ollama's
# models change, checked once a minute.
MODELS_UPDATE_MIN_INTERVAL_S = 1.0
# Numbers of an ``embed_vectors`` frame that together cost as much as one frame: a frame full of
# numbers (about 7,000) is parsed number by number, several frames' work.
FLOATS_PER_UNIT = 1024


@dataclass(eq=False)
class _Outbox:
    """One request's chunks on their way to its consumer; ``seq`` numbers the first."""

    reply_channel: str
    seq: int
    chunks: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None
    sender: asyncio.Task[None] = field(init=False)


def _chunk_event(request_id: str, seq: int, chunks: list[dict[str, Any]]) -> dict[str, Any]:
    return {"type": EventType.STREAM_CHUNK, "request_id": request_id, "seq": seq, "chunks": chunks}


class NodeConsumer(AsyncWebsocketConsumer):
    """One contributor node's connection."""

    session_id: int | None = None
    moving = False

    async def __call__(self, scope, receive, send) -> None:
        """``AsyncConsumer.__call__`` with a cheaper wait for the next message
        (``idleclaw_site.dispatch``)."""
        self.scope = scope
        self.channel_layer = get_channel_layer(self.channel_layer_alias)
        sources = [receive]
        if self.channel_layer is not None:
            self.channel_name = await self.channel_layer.new_channel()
            self.channel_receive = functools.partial(self.channel_layer.receive, self.channel_name)
            sources.append(self.channel_receive)
        self.base_send = send
        with contextlib.suppress(StopConsumer):
            await dispatch_from(sources, self.dispatch)

    async def dispatch(self, message: dict[str, Any]) -> None:
        """Channels closes stale database connections before every message, a round trip to a
        database thread for each token; this consumer's database work goes through
        ``idleclaw_site.db``, whose connections stay open, so it skips that."""
        handler = getattr(self, get_handler_name(message), None)
        if handler is None:
            raise ValueError(f"No handler for message type {message['type']}")
        await handler(message)
        if self.moving and not self.requests and not self.closing:
            await self._leave()

    async def connect(self) -> None:
        self.session_id = None
        self.node_id = ""
        self.requests: dict[str, str] = {}  # request_id → consumer's reply channel
        self.next_seq: dict[str, int] = {}  # request_id → number of the next chunk
        self.outboxes: dict[str, _Outbox] = {}  # request_id → chunks not yet sent on
        self.model_names: frozenset[str] = frozenset()  # the models the node serves
        # What its Ollama has loaded, as last passed on to be written (heartbeat ``loaded``).
        self.loaded: dict[str, protocol.LoadedModel] = {}
        self._loaded_written_at = -math.inf
        self._models_updated_at = -math.inf
        self._models_held: dict[str, Any] | None = None
        self._models_timer: asyncio.TimerHandle | None = None
        self.operator_drained = False  # by the admin's drain action (nodes.actions)
        self._loaded_held: tuple[protocol.LoadedModel, ...] | None = None
        self._loaded_timer: asyncio.TimerHandle | None = None
        # Embedding requests among ``requests``, each with the check of its vectors so far.
        self.embeds: dict[str, protocol.EmbedCheck] = {}
        self.last_frame = time.monotonic()
        # Read once: used on every frame.
        self.frame_rate = settings.IDLECLAW_NODE_MAX_FRAMES_PER_S
        self.request_frame_rate = settings.IDLECLAW_NODE_FRAMES_PER_S_PER_REQUEST
        self.allowance = 2.0 * self.frame_rate
        self.allowance_at = self.last_frame
        self.strikes = 0
        self.closing = False
        self.moving = False  # the router is shutting down: leave once no request is in flight
        self.registered = asyncio.Event()
        await worker.ensure_started()
        await self.accept()
        if shutdown.draining():
            await self._leave()
            return
        shutdown.node_connected(self)
        allowed = await db(services.node_registration_allowed)(
            client_ip=scope_client_ip(self.scope)
        )
        if not allowed:
            metrics.rate_limited("node_register")
            # Accepted first so the node learns why (PROTOCOL §1 close reasons).
            await self._refuse(ProtocolError(CloseReason.RATE_LIMITED))
            return
        self.watchdog = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        """Close a socket that never registers or falls silent."""
        try:
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancellation
            # (CPython gh-86296).
            async with asyncio.timeout(settings.IDLECLAW_REGISTRATION_TIMEOUT):
                await self.registered.wait()
        except TimeoutError:
            metrics.node_error(CloseReason.REGISTRATION_TIMEOUT)
            await self._refuse(ProtocolError(CloseReason.REGISTRATION_TIMEOUT))
            return
        timeout = settings.IDLECLAW_NODE_TIMEOUT
        while not self.closing:
            silent = time.monotonic() - self.last_frame
            if silent >= timeout:
                metrics.node_error(CloseReason.NODE_TIMEOUT)
                await self._refuse(ProtocolError(CloseReason.NODE_TIMEOUT))
                return
            await asyncio.sleep(min(timeout - silent, settings.IDLECLAW_HEARTBEAT_INTERVAL) + 0.05)

    async def _refuse(self, error: ProtocolError) -> None:
        if self.closing:
            return
        self.closing = True
        logger.info("closing node %s: %s", self.node_id or "(unregistered)", error.reason)
        await self.close(code=error.code, reason=error.reason)

    async def send_frame(self, frame: dict[str, Any]) -> None:
        # ASCII with \u escapes: a consumer's text may hold lone surrogates, which UTF-8 cannot
        # carry. Tool rounds measure a frame's size the same way (routing/tools/rounds.py).
        await self.send(text_data=json.dumps(frame, separators=(",", ":")))

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        if self.closing:
            return
        now = time.monotonic()
        self.last_frame = now
        try:
            self._spend_frame_allowance(now)
            frame = protocol.decode_frame(text_data, bytes_data)
            if self.session_id is None:
                await self._register(frame)
            else:
                protocol.check_node_frame(frame)
                await self._dispatch(frame)
        except ProtocolError as error:
            metrics.node_error(error.reason)
            await self._refuse(error)

    def _spend_frame_allowance(self, now: float) -> None:
        """A token bucket, so no node can flood the router: a node may send
        IDLECLAW_NODE_MAX_FRAMES_PER_S frames a second, plus
        IDLECLAW_NODE_FRAMES_PER_S_PER_REQUEST for each request it is serving, in bursts of two
        seconds' worth; each request sent to it adds two seconds of its rate at once. Existing
        nodes send one frame per token; one serving all its slots at full speed needs that
        allowance, one sending frames no request explains does not."""
        rate = self.frame_rate + self.request_frame_rate * len(self.requests)
        self.allowance = min(2.0 * rate, self.allowance + (now - self.allowance_at) * rate)
        self.allowance_at = now
        if self.allowance < 1.0:
            raise ProtocolError(CloseReason.RATE_LIMITED)
        self.allowance -= 1.0

    def _strike(self) -> None:
        """A frame about a request this connection was never sent: dropped, and counted."""
        self.strikes += 1
        if self.strikes > settings.IDLECLAW_NODE_MAX_STRIKES:
            raise ProtocolError(CloseReason.TOO_MANY_STRIKES)

    async def _register(self, frame: dict[str, Any]) -> None:
        registration = protocol.parse_register(frame)
        opened = await db(services.node_session_open)(
            registration=registration,
            channel_name=self.channel_name,
            client_ip=scope_client_ip(self.scope),
            worker_id=worker.WORKER_ID,
        )
        self.session_id = opened.session_id
        self.node_id = registration.node_id
        self.model_names = frozenset(offer.name for offer in registration.models)
        self.registered.set()
        if opened.evicted_channel:
            await self.channel_layer.send(opened.evicted_channel, {"type": "node.evict"})
        await worker.notify_orphans(opened.orphans, "node_disconnected")
        await self._wake_queues()
        await self.send_frame(
            {
                "type": FrameType.REGISTERED,
                "node_id": registration.node_id,
                "heartbeat_interval": settings.IDLECLAW_HEARTBEAT_INTERVAL,
                "resume_token": opened.resume_token,
                "features": list(protocol.ROUTER_FEATURES),
                **({"warnings": list(registration.warnings)} if registration.warnings else {}),
                **_contributor_reply(opened),
            }
        )
        # The contributor's public name only: never the key.
        logger.info(
            "node %s registered: %d models (%d dropped for invalid names), max_concurrent %d, "
            "contributor %s%s",
            registration.node_id,
            len(registration.models),
            len(registration.warnings),
            registration.max_concurrent,
            opened.contributor_name or "anonymous",
            ", draining" if registration.draining else "",
        )

    async def _dispatch(self, frame: dict[str, Any]) -> None:
        kind = frame["type"]
        # Any frame proves the node alive; the worker writes last_seen for all of this
        # process's sessions at once, about every second.
        worker.session_seen(self.session_id, self.channel_name)
        if kind == FrameType.INFERENCE_CHUNKS:
            await self._relay_chunks(frame)
        elif kind == FrameType.INFERENCE_CHUNK:
            await self._relay_chunk(frame)
        elif kind == FrameType.INFERENCE_ERROR:
            await self._relay_error(frame)
        elif kind == FrameType.EMBED_VECTORS:
            await self._relay_vectors(frame)
        elif kind == FrameType.HEARTBEAT:
            self._note_loaded(frame)
        elif kind == FrameType.MODELS_UPDATE:
            wait = self._models_updated_at + MODELS_UPDATE_MIN_INTERVAL_S - time.monotonic()
            if wait > 0:
                # Each one rewrites the node's model rows: a node sending hundreds a second
                # kept the database busy (red-team M1 of issue 17). The latest is applied when
                # the second is over.
                self._models_held = frame
                if self._models_timer is None:
                    loop = asyncio.get_running_loop()
                    self._models_timer = loop.call_later(wait, self._apply_held_models)
                return
            await self._models_update(frame)
        elif kind == FrameType.DRAIN:
            await db(services.node_session_drain)(session_id=self.session_id)
        elif kind == FrameType.UNDRAIN:
            await self._undrain()
        elif kind == FrameType.REGISTER:
            raise ProtocolError(CloseReason.INVALID_FRAME)

    async def _models_update(self, frame: dict[str, Any]) -> None:
        """A ``models_update``: the node's model list replaces the one the router has."""
        self._models_updated_at = time.monotonic()
        offers, warnings = protocol.parse_models(frame.get("models"))
        if warnings:
            logger.warning(
                "node %s: %d models dropped from models_update for invalid names",
                self.node_id,
                len(warnings),
            )
        await db(services.node_models_replace)(session_id=self.session_id, offers=offers)
        self.model_names = frozenset(offer.name for offer in offers)
        self.loaded = {}  # the next report is written whole, onto the new rows
        await self._wake_queues()

    def _apply_held_models(self) -> None:
        self._models_timer = None
        frame, self._models_held = self._models_held, None
        if frame is not None and self.session_id is not None and not self.closing:
            self._models_task = asyncio.ensure_future(self._apply_models_later(frame))

    async def _apply_models_later(self, frame: dict[str, Any]) -> None:
        try:
            await self._models_update(frame)
        except ProtocolError as error:
            await self._refuse(error)

    async def _undrain(self) -> None:
        """The node serves again after a ``drain`` (docs/node-protocol-extensions.md); not while
        the router itself is moving it away (shutdown), which drained it too."""
        if self.moving:
            return
        if self.operator_drained:
            logger.info("node %s asked to serve again; an operator drained it", self.node_id)
            return
        await db(services.node_session_undrain)(session_id=self.session_id)
        await self._wake_queues()

    def _note_loaded(self, frame: dict[str, Any]) -> None:
        """A heartbeat's ``loaded`` extension (docs/node-protocol-extensions.md): the models
        the node serves that its Ollama has loaded, passed on to be written only when they
        changed; heartbeats come from every node every few seconds."""
        loaded = protocol.parse_loaded(frame.get("loaded"), timezone.now())
        if loaded is None:
            return  # the node says nothing about it
        loaded = tuple(model for model in loaded if model.name in self.model_names)
        if not protocol.loaded_changed(self.loaded, loaded, slack=LOADED_SLACK_S):
            self._loaded_held = None
            return
        wait = self._loaded_written_at + LOADED_MIN_INTERVAL_S - time.monotonic()
        if wait <= 0:
            self._write_loaded(loaded)
            return
        # Written when the interval is over, as the node's latest report says then.
        self._loaded_held = loaded
        if self._loaded_timer is None:
            self._loaded_timer = asyncio.get_running_loop().call_later(wait, self._write_held)

    def _write_held(self) -> None:
        self._loaded_timer = None
        if self._loaded_held is not None and self.session_id is not None:
            self._write_loaded(self._loaded_held)

    def _write_loaded(self, loaded: tuple[protocol.LoadedModel, ...]) -> None:
        self._loaded_held = None
        self._loaded_written_at = time.monotonic()
        self.loaded = {model.name: model for model in loaded}
        worker.session_loaded(self.session_id, loaded)

    async def _wake_queues(self) -> None:
        """New capacity: for each of this node's models, the first waiting request it could
        serve may take it."""
        from routing.services import queue_heads

        for channel in await db(queue_heads)(session_id=self.session_id):
            await self.channel_layer.send(channel, {"type": "queue.wake"})

    async def _relay_chunk(self, frame: dict[str, Any]) -> None:
        request_id = protocol.request_id_of(frame)
        reply_channel = self.requests.get(request_id or "")
        if reply_channel is None:
            self._strike()  # not a request sent to this connection (PROTOCOL §1 identity)
            return
        chunk = protocol.clean_chunk(frame.get("chunk"))
        if chunk is None or (self.embeds and request_id in self.embeds):
            metrics.node_error("invalid_chunk")
            await self._fail_request(request_id, "ollama_error", cancel=True)
            return
        await self._enqueue(request_id, reply_channel, [chunk])

    async def _relay_chunks(self, frame: dict[str, Any]) -> None:
        """An ``inference_chunks`` frame (docs/node-protocol-extensions.md): its chunks go on
        as one, in order. A malformed batch fails the request like a malformed chunk: none of
        its chunks is relayed, the consumer gets ``ollama_error`` and the node a cancel."""
        request_id = protocol.request_id_of(frame)
        reply_channel = self.requests.get(request_id or "")
        if reply_channel is None:
            self._strike()
            return
        chunks = protocol.clean_chunks(frame.get("chunks"))
        if chunks is None or (self.embeds and request_id in self.embeds):
            metrics.node_error("invalid_chunk")
            await self._fail_request(request_id, "ollama_error", cancel=True)
            return
        await self._enqueue(request_id, reply_channel, chunks)

    async def _relay_vectors(self, frame: dict[str, Any]) -> None:
        """An ``embed_vectors`` frame (docs/node-protocol-extensions.md): checked against what
        the request asked for and the vectors before it. Anything wrong fails the request as a
        node error (``bad_embeddings``); the node receives a cancel."""
        request_id = protocol.request_id_of(frame)
        reply_channel = self.requests.get(request_id or "")
        if reply_channel is None:
            self._strike()
            return
        check = self.embeds.get(request_id)
        if check is None:  # vectors for a chat request: a malformed answer, like a bad chunk
            await self._fail_request(request_id, "ollama_error", cancel=True)
            return
        try:
            piece = check.take(frame)
        except protocol.EmbedError as error:
            logger.warning("node %s sent invalid embeddings: %s", self.node_id, error)
            await self._fail_request(request_id, "bad_embeddings", cancel=True)
            return
        if piece["done"]:
            del self.embeds[request_id]
        floats = sum(len(vector) for vector in piece["embeddings"])
        await self._enqueue(request_id, reply_channel, [piece], cost=floats / FLOATS_PER_UNIT)

    def _charge(self, chunks: list[dict[str, Any]], cost: float | None) -> None:
        """What a frame's chunks cost beyond the frame itself: an eighth of a frame per chunk
        and FRAMES_PER_TOOL_CALL per tool call, or ``cost`` when the caller knows it (vectors).
        Without it an ``inference_chunks`` frame of 256 chunks, or of hundreds of tool calls,
        would cost the frame allowance one unit and the event loop up to a hundred times a plain
        frame's work, and a node could stall its worker."""
        if cost is None:
            cost = len(chunks) / CHUNKS_PER_UNIT
            for chunk in chunks:
                cost += FRAMES_PER_TOOL_CALL * len(chunk["message"].get("tool_calls", ()))
        self.allowance -= cost
        if self.allowance < 0:
            raise ProtocolError(CloseReason.RATE_LIMITED)

    async def _enqueue(
        self,
        request_id: str,
        reply_channel: str,
        chunks: list[dict[str, Any]],
        cost: float | None = None,
    ) -> None:
        """Pass a request's next chunks on to its consumer; only the last may be ``done``.

        A layer that delivers without waiting (``send_now``, the embedded default) gets them at
        once. Otherwise they go to the request's outbox, whose sender task sends them, so that
        this socket's next frames need not wait for the layer."""
        self._charge(chunks, cost)
        seq = self.next_seq.get(request_id, 0)
        self.next_seq[request_id] = seq + len(chunks)
        if chunks[-1]["done"]:
            del self.requests[request_id]
            self.next_seq.pop(request_id, None)
        outbox = self.outboxes.get(request_id)
        send_now = getattr(self.channel_layer, "send_now", None)
        if outbox is None and send_now is not None:
            try:
                send_now(reply_channel, _chunk_event(request_id, seq, chunks))
            except ChannelFull:
                await self._consumer_stalled(request_id, reply_channel)
            return
        if outbox is None:
            outbox = self.outboxes[request_id] = _Outbox(reply_channel=reply_channel, seq=seq)
            outbox.sender = asyncio.create_task(self._drain(request_id, outbox))
        outbox.chunks.extend(chunks)

    async def _drain(self, request_id: str, outbox: _Outbox) -> None:
        """Send a request's waiting chunks to its consumer, as few messages as possible: the
        chunks that arrive while one send is under way go together in the next."""
        try:
            await asyncio.sleep(0)  # let the frames that came in with this one join it
            while outbox.chunks:
                chunks, outbox.chunks = outbox.chunks, []
                event = _chunk_event(request_id, outbox.seq, chunks)
                outbox.seq += len(chunks)
                try:
                    await self.channel_layer.send(outbox.reply_channel, event)
                except ChannelFull:
                    await self._consumer_stalled(request_id, outbox.reply_channel)
                    return
                except Exception:
                    # The layer failed (Redis unreachable or refusing): the node stops, and the
                    # consumer gets an error if the layer takes it (else its stall timeout ends
                    # the stream; its chunks are numbered, so none is passed on with a gap).
                    logger.exception("relaying chunks of %s failed; cancelling", request_id)
                    self.next_seq.pop(request_id, None)
                    self.embeds.pop(request_id, None)
                    if self.requests.pop(request_id, None) is not None and not self.closing:
                        await self.send_frame(
                            {"type": FrameType.CANCEL_REQUEST, "request_id": request_id}
                        )
                    with contextlib.suppress(Exception):
                        await self._send_error(outbox.reply_channel, request_id, "internal")
                    return
            if outbox.error is not None:
                await self._send_error(outbox.reply_channel, request_id, outbox.error)
        finally:
            if self.outboxes.get(request_id) is outbox:
                del self.outboxes[request_id]

    async def _consumer_stalled(self, request_id: str, reply_channel: str) -> None:
        """The consumer's channel is full: it stopped reading. The node stops, it gets an error."""
        logger.warning("consumer of %s is not reading; cancelling", request_id)
        self.next_seq.pop(request_id, None)
        self.embeds.pop(request_id, None)
        if self.requests.pop(request_id, None) is not None and not self.closing:
            await self.send_frame({"type": FrameType.CANCEL_REQUEST, "request_id": request_id})
        await self._send_error(reply_channel, request_id, "consumer_stalled")

    async def _relay_error(self, frame: dict[str, Any]) -> None:
        request_id = protocol.request_id_of(frame)
        if request_id not in self.requests:
            self._strike()
            return
        error = protocol.error_code_of(frame)
        metrics.node_error(error)
        await self._fail_request(request_id, error, cancel=False)

    async def _fail_request(self, request_id: str, error: str, *, cancel: bool) -> None:
        reply_channel = self.requests.pop(request_id, None)
        self.next_seq.pop(request_id, None)
        self.embeds.pop(request_id, None)
        if reply_channel is None:
            return
        if cancel:
            await self.send_frame({"type": FrameType.CANCEL_REQUEST, "request_id": request_id})
        outbox = self.outboxes.get(request_id)
        if outbox is not None and not outbox.sender.done():
            outbox.error = error  # after the chunks still on their way, in order
            return
        await self._send_error(reply_channel, request_id, error)

    async def _send_error(self, reply_channel: str, request_id: str, error: str) -> None:
        try:
            await self.channel_layer.send(
                reply_channel,
                {"type": EventType.STREAM_ERROR, "request_id": request_id, "error": error},
            )
        except ChannelFull:
            pass  # the consumer's stream times out on its own

    # --- channel-layer events from the HTTP side -------------------------------------------

    async def node_request(self, event: protocol.NodeRequestEvent) -> None:
        if self.closing or self.session_id is None:
            return
        request_id = event["request_id"]
        self.requests[request_id] = event["reply_channel"]
        # A request brings its own burst: a fast model may send its answer faster than the
        # sustained rate, and an honest node must not be cut for it.
        self.allowance += 2.0 * self.request_frame_rate
        await self.send_frame(
            {
                "type": FrameType.INFERENCE_REQUEST,
                "request_id": request_id,
                "ollama_params": event["ollama_params"],
            }
        )

    async def node_embed(self, event: protocol.NodeEmbedEvent) -> None:
        """An embedding request (the ``embeddings`` extension); only nodes that declared it are
        chosen for one (``routing.services.inflight_claim``)."""
        if self.closing or self.session_id is None:
            return
        request_id = event["request_id"]
        params = event["embed_params"]
        self.requests[request_id] = event["reply_channel"]
        self.embeds[request_id] = protocol.EmbedCheck(
            inputs=len(params["input"]), dimensions=params.get("dimensions")
        )
        self.allowance += 2.0 * self.request_frame_rate
        await self.send(text_data=protocol.embed_request_text(request_id, params))

    async def node_cancel(self, event: protocol.NodeCancelEvent) -> None:
        request_id = event["request_id"]
        self.next_seq.pop(request_id, None)
        self.embeds.pop(request_id, None)
        if self.requests.pop(request_id, None) is not None and not self.closing:
            await self.send_frame({"type": FrameType.CANCEL_REQUEST, "request_id": request_id})

    async def node_banned(self, event: dict[str, Any]) -> None:
        """An operator banned this node (or its address) while it was connected."""
        await self._refuse(ProtocolError(CloseReason.BANNED))

    async def node_disconnect(self, event: dict[str, Any]) -> None:
        """An operator disconnected this node (``nodes.actions``): closed with a reason it logs."""
        await self._refuse(ProtocolError(actions.CLOSE_REASON))

    async def node_drain(self, event: dict[str, Any]) -> None:
        """An operator drained this node: the admin already took it out of selection; what it
        is serving finishes. The node's own ``undrain`` does not undo it (red-team H1 of
        issue 17): only a new connection does, which the operator can refuse with a ban."""
        self.operator_drained = True
        logger.info(
            "node %s drained by an operator; %d requests in flight finish",
            self.node_id,
            len(self.requests),
        )

    async def node_operator_cancel(self, event: dict[str, Any]) -> None:
        """An operator cancelled a request this node serves: the node gets ``cancel_request``,
        the consumer an error saying so (after the chunks already on their way to it)."""
        if event["request_id"] in self.requests and not self.closing:
            await self._fail_request(event["request_id"], actions.OPERATOR_CANCELLED, cancel=True)

    async def node_gone(self, event: dict[str, Any]) -> None:
        """This connection's session row no longer exists (it was reaped while the socket
        lingered): the node must register afresh."""
        await self._refuse(ProtocolError(CloseReason.NODE_TIMEOUT))

    async def move(self) -> None:
        """Shutdown (``idleclaw_site.shutdown``): no new requests for this node, and it is
        closed with the "router restarting" code once its requests in flight are done."""
        await self.channel_layer.send(self.channel_name, {"type": "node.move"})

    async def leave(self) -> None:
        """Shutdown, grace period over: close the connection now."""
        await self.channel_layer.send(self.channel_name, {"type": "node.leave"})

    async def node_move(self, event: dict[str, Any]) -> None:
        self.moving = True
        if self.session_id is not None:
            await db(services.node_session_drain)(session_id=self.session_id)

    async def node_leave(self, event: dict[str, Any]) -> None:
        """The grace period is over: the node stops what it still serves (its consumers, on any
        worker, hear that the router is restarting) and is closed."""
        for request_id, reply_channel in list(self.requests.items()):
            await self.send_frame({"type": FrameType.CANCEL_REQUEST, "request_id": request_id})
            await self._send_error(reply_channel, request_id, shutdown.RESTARTING)
        self.requests.clear()
        self.next_seq.clear()
        self.embeds.clear()
        await self._leave()

    async def _leave(self) -> None:
        if self.closing:
            return
        self.closing = True
        logger.info("closing node %s: %s", self.node_id or "(unregistered)", shutdown.MOVE_REASON)
        await self.close(code=shutdown.MOVE_CODE, reason=shutdown.MOVE_REASON)

    async def node_evict(self, event: dict[str, Any]) -> None:
        """Another connection took this node id over with its resume token."""
        if self.session_id is not None:
            worker.session_forget(self.session_id)
        self.session_id = None  # the new session owns the row now
        self.requests.clear()
        self.next_seq.clear()
        self.embeds.clear()
        await self._refuse(ProtocolError(CloseReason.NODE_ID_IN_USE))

    async def disconnect(self, code: int) -> None:
        self.closing = True
        try:
            await self._disconnect(code)
        finally:
            shutdown.node_gone(self)  # after the session is closed: a shutdown waits for that

    async def _disconnect(self, code: int) -> None:
        watchdog = getattr(self, "watchdog", None)
        if watchdog is not None:
            watchdog.cancel()
        for timer in (getattr(self, "_loaded_timer", None), getattr(self, "_models_timer", None)):
            if timer is not None:
                timer.cancel()
        if self.session_id is None:
            return
        session_id, self.session_id = self.session_id, None
        worker.session_forget(session_id)
        orphans = await db(services.node_session_close)(session_id=session_id)
        await worker.notify_orphans(orphans, "node_disconnected")
        logger.info("node %s disconnected (code %s)", self.node_id, code)


def _contributor_reply(opened: services.SessionOpened) -> dict[str, Any]:
    """``registered.contributor`` (docs/node-protocol-extensions.md): the name in effect for a
    node that proved a key, and why it is not the one asked for; nothing for an anonymous node."""
    if opened.contributor_name is None:
        return {}
    reply = {"name": opened.contributor_name}
    if opened.contributor_note:
        reply["note"] = opened.contributor_note
    return {"contributor": reply}
