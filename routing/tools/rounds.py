"""The rounds of one consumer request that the router's own tools may extend.

``routing.streaming.Relay`` drives a ``ToolRounds``: a round is the model's answer to one node
request. A round whose answer ends in calls to the router's tools is not the consumer's answer:
the router checks the calls, runs them, appends the model's assistant message and one ``tool``
message per call, and sends the next round to the same node. The consumer's stream goes on
across rounds (on ``/api/chat`` with a status event around each call); its answer is the text of
all rounds.

Bounds, all counted by the router:

- ``MAX_ROUNDS`` rounds (answers of the model) per consumer request: after ``MAX_ROUNDS - 1``
  rounds of tool calls the next is sent without tools, so the model must answer. A round is
  also sent without tools when the conversation would have no room for another round's calls
  and results in a node's limits (``MAX_MESSAGES`` messages, ``MAX_FRAME_BYTES`` per frame).
  A node request that failed over before the model answered is not a round.
- ``MAX_CALLS_PER_ROUND`` calls a round; further calls of the same round are dropped.
- ``IDLECLAW_TOOL_CALLS_PER_MINUTE`` calls run per node session (``services``); a call over it
  is answered with an error, not run.
- ``IDLECLAW_TOOL_TIMEOUT`` (15 s) per call, and never past the request's response deadline:
  tool time counts against ``IDLECLAW_RESPONSE_TIMEOUT``.

What the consumer is charged stays the consumer's: the usage on the final chunk reports the
prompt of the first round (the consumer's own messages, not the results the router added) and
the tokens the node generated in all rounds; tool results count against no input limit.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings

from idleclaw_site.db import db
from nodes.protocol import MAX_FRAME_BYTES
from routing import metrics
from routing.tool_calls import ToolPolicy
from routing.tools import Tool, node_supports_tools, selectors, services
from routing.validation import MAX_MESSAGES

logger = logging.getLogger("idleclaw.routing")

MAX_ROUNDS = 5
MAX_CALLS_PER_ROUND = 3
TOOL_TIMEOUT = 15.0
# What one round of calls can add to the request a node receives, in encoded bytes: the
# assistant message with its calls (arguments are bounded by nodes.protocol) and a result per
# call (web_search's are about 2 KB; JSON escaping can double that).
ROUND_GROWTH_BYTES = MAX_CALLS_PER_ROUND * 10_000
# The rest of an ``inference_request`` frame around its ``ollama_params``.
FRAME_MARGIN_BYTES = 1_000


def tool_timeout() -> float:
    # IDLECLAW_TOOL_TIMEOUT is not a documented setting yet; 15 s is the network's rule.
    return float(getattr(settings, "IDLECLAW_TOOL_TIMEOUT", TOOL_TIMEOUT))


@dataclass(frozen=True)
class ToolStatus:
    """A tool call the router runs, for the consumer's stream: ``executing`` then ``done``.
    Never the arguments or the result."""

    name: str
    status: str


@dataclass
class Call:
    """One call of a round as the router handles it."""

    id: str
    name: str
    arguments: dict[str, Any]
    tool: Tool
    # The result without running the call (bad arguments, over the node's allowance).
    refusal: str | None = None
    result: str = ""


@dataclass
class ToolRounds:
    """The state of one consumer request across its rounds."""

    model: str
    tools: dict[str, Tool]
    params: dict[str, Any]  # the request as the node gets it, without the router's tools
    # Rounds that ended in calls to the tools. A node request that failed over is no round:
    # the model never answered it.
    tool_rounds: int = 0
    capable: bool = False  # whether the node serving the request can call tools
    calls: list[dict[str, Any]] = field(default_factory=list)  # this round's, as they came
    first_prompt: int | None = None
    earlier_eval: int = 0

    async def start(self, *, session_id: int, policy: ToolPolicy) -> dict[str, Any]:
        """The parameters of the next round on node session ``session_id`` (a new attempt: the
        first round, or the rounds so far continued on another node after a failover). The
        node's copy of the model decides whether the tools are offered."""
        capabilities = await db(selectors.node_model_capabilities)(
            session_id=session_id, model=self.model
        )
        self.capable = node_supports_tools(self.model, capabilities)
        return self.next(policy)

    def next(self, policy: ToolPolicy) -> dict[str, Any]:
        """The parameters of the next round on the same node; ``policy`` is told which
        functions it offers."""
        self.calls = []
        offered = self.capable and self.tool_rounds < MAX_ROUNDS - 1 and self._room()
        if not offered:
            policy.offered = frozenset()
            return self.params
        policy.offered = frozenset(self.tools)
        return {**self.params, "tools": [tool.definition() for tool in self.tools.values()]}

    def _room(self) -> bool:
        """Whether the conversation stays within a node's limits after one more round of
        calls and results."""
        if len(self.params["messages"]) + 1 + MAX_CALLS_PER_ROUND > MAX_MESSAGES:
            return False
        tools = [tool.definition() for tool in self.tools.values()]
        size = len(_encoded(self.params)) + len(_encoded(tools))
        return size + ROUND_GROWTH_BYTES <= MAX_FRAME_BYTES - FRAME_MARGIN_BYTES

    def ends_round(self, chunk: dict[str, Any], policy: ToolPolicy) -> bool:
        """Whether the node's chunk, as it came, ends this round with a call to one of the
        router's tools offered in it (so it is not the end of the answer)."""
        if not chunk["done"]:
            return False
        if self.calls:  # taken from an earlier chunk of the round
            return True
        for call in chunk["message"].get("tool_calls") or ():
            function = call.get("function") if isinstance(call, dict) else None
            name = function.get("name") if isinstance(function, dict) else None
            if name in self.tools and name in policy.offered:
                return True
        return False

    def take(self, calls: list[dict[str, Any]]) -> None:
        """Calls of this round that passed the policy: the router runs them, the consumer never
        sees them. Beyond ``MAX_CALLS_PER_ROUND`` they are dropped."""
        self.calls.extend(calls[: MAX_CALLS_PER_ROUND - len(self.calls)])

    def round_over(self, out: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
        """The node's last chunk of the round is ``out[-1]``. If the round asked for the
        router's tools, the chunk is not the end of the answer: what text it carries stays,
        its ``done`` goes, and the calls are returned. Otherwise it is the answer's end, whose
        usage is made the consumer's own (module docstring)."""
        final = out[-1]
        if self.calls:
            calls, self.calls = self.calls, []
            self.tool_rounds += 1
            if self.first_prompt is None:
                self.first_prompt = final.get("prompt_eval_count")
            self.earlier_eval += final.get("eval_count", 0)
            text = {k: v for k, v in final["message"].items() if k in ("content", "thinking")}
            if text:
                out[-1] = {"message": {"role": "assistant", **text}, "done": False}
            else:
                out.pop()
            return calls
        if self.tool_rounds:
            usage: dict[str, int] = {}
            if self.first_prompt is not None and "prompt_eval_count" in final:
                usage["prompt_eval_count"] = self.first_prompt
            if "eval_count" in final:
                usage["eval_count"] = final["eval_count"] + self.earlier_eval
            out[-1] = {**final, **usage}
        return None

    async def prepare(self, calls: list[dict[str, Any]], *, session_id: int) -> list[Call]:
        """Check a round's calls and count the ones that may run against the node's allowance;
        the others get their refusal as result."""
        prepared = []
        for index, raw in enumerate(calls):
            function = raw["function"]
            tool = self.tools[function["name"]]
            call = Call(
                id=f"call_{self.tool_rounds}_{index}",
                name=tool.name,
                arguments=function["arguments"],
                tool=tool,
            )
            reason = tool.check(call.arguments)
            if reason is not None:
                call.refusal = tool.failed(f"invalid arguments: {reason}")
                # Not echoed back: a refused call's arguments may be as long as a node likes,
                # and the next round must fit a node's frame.
                call.arguments = {}
            prepared.append(call)
        runnable = [call for call in prepared if call.refusal is None]
        allowed = await _take_allowance(session_id, len(runnable))
        for call in runnable[allowed:]:
            call.refusal = call.tool.failed(
                "this node made too many tool calls in the last minute; answer without it"
            )
        if len(runnable) > allowed:
            metrics.rate_limited("tool_calls")
            logger.warning(
                "node session %s: %d tool calls over its allowance of %d a minute",
                session_id, len(runnable) - allowed, settings.IDLECLAW_TOOL_CALLS_PER_MINUTE,
            )
        return prepared

    async def run(self, prepared: list[Call], *, seconds: float) -> None:
        """Run the calls that may run, at once, each for at most ``seconds``; then append the
        round to the conversation. Results are matched to calls by id."""
        runnable = [call for call in prepared if call.refusal is None]
        results = await asyncio.gather(*(_run(call, seconds) for call in runnable))
        by_id = {call.id: result for call, result in zip(runnable, results, strict=True)}
        for call in prepared:
            call.result = call.refusal if call.refusal is not None else by_id[call.id]
        assistant = {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"function": {"name": call.name, "arguments": call.arguments}}
                for call in prepared
            ],
        }
        results_in_order = [
            {"role": "tool", "content": call.result, "tool_name": call.name} for call in prepared
        ]
        messages = [*self.params["messages"], assistant, *results_in_order]
        # The next round's request must fit a node's frame as it goes on the wire (escaped
        # non-ASCII text takes up to 12 bytes a character): results are cut until it does.
        tools = _encoded([tool.definition() for tool in self.tools.values()])
        limit = MAX_FRAME_BYTES - FRAME_MARGIN_BYTES - len(tools)
        while len(_encoded({**self.params, "messages": messages})) > limit:
            longest = max(results_in_order, key=lambda message: len(message["content"]))
            if not longest["content"]:
                break
            longest["content"] = longest["content"][: len(longest["content"]) // 2]
        self.params = {**self.params, "messages": messages}


def _encoded(value: Any) -> bytes:
    """``value`` as it goes to a node (``nodes.consumers.NodeConsumer.send_frame``)."""
    return json.dumps(value, separators=(",", ":")).encode()


async def _run(call: Call, seconds: float) -> str:
    try:
        async with asyncio.timeout(seconds):
            return await call.tool.run(call.arguments)
    except TimeoutError:
        reason = f"no answer within {round(seconds, 1):g} s"
        logger.info("%s failed: %s", call.name, reason)
        return call.tool.failed(reason)
    except Exception:
        # A tool's own bug must not break the consumer's stream: the model is told.
        logger.exception("%s failed", call.name)
        return call.tool.failed("internal error")


async def _take_allowance(session_id: int, count: int) -> int:
    if count <= 0:
        return 0
    if settings.CACHES["default"]["BACKEND"].endswith(".LocMemCache"):
        return services.node_tool_calls_take(session_id=session_id, count=count)
    # Redis: not on the event loop, and not queued behind the database.
    return await sync_to_async(services.node_tool_calls_take, thread_sensitive=False)(
        session_id=session_id, count=count
    )
