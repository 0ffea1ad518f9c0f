"""The router's own tools (issue 15): tools the router runs itself, never a contributor's node.

A node only relays a model's request for a tool. The router checks the call, runs it, and sends
the result back to the same node in a follow-up round (``routing.tools.rounds``, driven by
``routing.streaming.Relay``). A tool is a small object: a ``name``, a ``description``, the JSON
Schema of its arguments, ``check`` (why arguments are refused, if they are) and an async
``run(arguments) -> str`` whose text the model reads.

Which tools exist depends on the settings: ``web_search`` needs ``IDLECLAW_SEARXNG_URL``.
Unset, the registry is empty, nothing is ever offered and every request is relayed as before.

When they are offered (``offered_for``):

- ``IDLECLAW_SERVER_TOOLS`` is on and the model is not in ``IDLECLAW_SERVER_TOOLS_OFF_MODELS``;
- the consumer's request brings no tools of its own, no ``system`` message, no earlier tool
  calls or tool results, and no ``format`` (a client with its own tools or instructions never
  sees ours, and an answer held to a JSON format cannot call a tool anyway); the operator's own
  ``IDLECLAW_SYSTEM_PROMPT`` is the router's, not the consumer's, and does not count;
- the node's copy of the model supports tools: its ``capabilities`` from registration (Ollama's
  ``/api/show``), or for a node that reports none, the model's family (``TOOL_FAMILIES``).
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from typing import Any

from django.conf import settings

from routing.tool_calls import conforms

# Model families that Ollama's library marks as supporting tools: the fallback for nodes that
# do not report capabilities (they predate the extension, or Ollama predates 0.6.4). Matched on
# the name without namespace and tag: ``hf.co/x/llama3.1:8b`` is ``llama3.1``.
TOOL_FAMILIES = frozenset(
    {
        "llama3.1", "llama3.2", "llama3.3", "llama4",
        "qwen2", "qwen2.5", "qwen2.5-coder", "qwen3", "qwen3-coder", "qwq",
        "mistral", "mistral-nemo", "mistral-small", "mistral-small3.1", "mistral-small3.2",
        "mistral-large", "mixtral", "devstral", "magistral",
        "command-r", "command-r-plus", "command-r7b", "command-a",
        "granite3.1-dense", "granite3.1-moe", "granite3.2", "granite3.3", "granite4",
        "hermes3", "firefunction-v2", "nemotron", "cogito", "phi4-mini", "gpt-oss",
    }
)


class Tool:
    """One tool the router runs. Subclasses set the attributes and implement ``run``."""

    name: str = ""
    description: str = ""
    parameters: dict[str, Any] = {}

    def check(self, arguments: dict[str, Any]) -> str | None:
        """Why ``arguments`` are refused, or None when the call may run. The default is the
        JSON Schema of ``parameters``; tools add their own rules."""
        if not conforms(arguments, self.parameters):
            return "the arguments do not match the tool's schema"
        return None

    def failed(self, reason: str) -> str:
        """The result the model reads when a call is refused or fails."""
        return f"{self.name} failed: {reason}"

    async def run(self, arguments: dict[str, Any]) -> str:
        """Run the call; the text is the result the model reads. Failures the tool expects
        come back as text too (``failed``): the model is told, the stream goes on."""
        raise NotImplementedError

    def definition(self) -> dict[str, Any]:
        """The tool as Ollama takes it in ``tools``."""
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": self.parameters,
            },
        }


def registry() -> dict[str, Tool]:
    """The tools that exist with the current settings, by name."""
    if not settings.IDLECLAW_SERVER_TOOLS:
        return {}
    from routing.tools.web_search import WebSearch

    tools: dict[str, Tool] = {}
    if settings.IDLECLAW_SEARXNG_URL:
        tools[WebSearch.name] = WebSearch()
    return tools


def for_request(model: str, params: Mapping[str, Any]) -> dict[str, Tool]:
    """The tools this request may be offered, before it is known which node serves it: none if
    the operator turned them off for the model, or the request brings its own tools,
    instructions, tool conversation or output format."""
    if not settings.IDLECLAW_SEARXNG_URL or model in settings.IDLECLAW_SERVER_TOOLS_OFF_MODELS:
        return {}
    if params.get("tools") or params.get("format"):
        return {}
    for message in params.get("messages", ()):
        if message.get("role") in ("system", "tool") or message.get("tool_calls"):
            return {}
    return registry()


_NAMESPACE_AND_TAG = re.compile(r"^(?:.*/)?([^/:]+)(?::[^/]*)?$")


def node_supports_tools(model: str, capabilities: Collection[str] | None) -> bool:
    """Whether a node's copy of ``model`` can call tools: by the capabilities it reported, or
    for a node that reported none, by the model's family."""
    if capabilities:
        return "tools" in capabilities
    match = _NAMESPACE_AND_TAG.match(model.lower())
    return match is not None and match.group(1) in TOOL_FAMILIES


def offered_for(
    model: str, capabilities: Collection[str] | None, params: Mapping[str, Any]
) -> dict[str, Tool]:
    """The tools offered to ``model`` on a node with ``capabilities`` for this request."""
    tools = for_request(model, params)
    if tools and not node_supports_tools(model, capabilities):
        return {}
    return tools
