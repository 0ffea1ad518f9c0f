"""Which tool calls from a node may reach the consumer.

A node answers with whatever tool calls it likes; a client may act on them (run a command, call
an API), so only calls the request itself offered pass. A call to a function the request did not
offer is dropped, and so is a call to a function offered with ``"strict": true`` whose arguments
do not validate against the offered JSON Schema. The network's original router does the same
("only parse tool calls when tools were offered; drop unknown tools").

The schema check covers what strict mode is about: ``type`` (one or a list), ``enum``,
``const``, ``properties``, ``required``, ``additionalProperties``, ``items``, ``anyOf``/``oneOf``
and local ``$ref`` into ``$defs``/``definitions``. Keywords it does not know constrain nothing,
as JSON Schema says of unknown keywords. Both the schema (the consumer's) and the arguments (the
node's) are untrusted, so the walk has a budget of steps, charged for every schema visited and
every entry of an ``enum``, ``type``, ``required`` or ``anyOf`` list looked at: at most
``MAX_STEPS`` for one call (a few milliseconds of the event loop) and ``MAX_STEPS_PER_REQUEST``
for all the calls of one answer. Arguments it cannot finish checking within the budget are
treated as invalid.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

# Steps for one call at most: a real check takes tens or hundreds; this many take 1-2 ms of the
# event loop (tests/routing/test_tool_calls.py measures the worst shapes).
MAX_STEPS = 2_000
# Steps for all the strict calls of one answer: past it, strict calls are dropped unchecked.
MAX_STEPS_PER_REQUEST = 20_000


class _OutOfSteps(Exception):
    pass


@dataclass
class ToolPolicy:
    """The functions a request offered, with the schema of each offered as strict."""

    offered: frozenset[str] = frozenset()
    strict: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Calls to functions nobody offered, and calls that broke a strict schema: only the first
    # are the node's fault (it never sees whether a schema is strict).
    dropped: int = 0
    unoffered: int = 0
    steps_left: int = MAX_STEPS_PER_REQUEST

    @classmethod
    def of(cls, tools: Iterable[dict[str, Any]] | None) -> ToolPolicy:
        offered: set[str] = set()
        strict: dict[str, dict[str, Any]] = {}
        for tool in tools or ():
            function = tool.get("function") or {}
            name = function.get("name")
            if not isinstance(name, str):
                continue
            offered.add(name)
            if function.get("strict") is True:
                strict[name] = function.get("parameters") or {}
        return cls(offered=frozenset(offered), strict=strict)

    def allows(self, call: dict[str, Any]) -> bool:
        function = call["function"]
        name = function["name"]
        if name not in self.offered:
            self.unoffered += 1
            return False
        schema = self.strict.get(name)
        if schema is None:
            return True
        steps = [min(MAX_STEPS, self.steps_left)]
        try:
            return _check(function["arguments"], schema, schema, steps)
        except (_OutOfSteps, RecursionError):
            return False
        finally:
            self.steps_left -= min(MAX_STEPS, self.steps_left) - max(steps[0], 0)

    def filter(self, calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The calls that may pass; the others are counted in ``dropped``."""
        kept = [call for call in calls if self.allows(call)]
        self.dropped += len(calls) - len(kept)
        return kept


def conforms(value: Any, schema: Any) -> bool:
    """Whether ``value`` validates against ``schema`` (the subset in the module docstring),
    within ``MAX_STEPS``."""
    try:
        return _check(value, schema, schema, [MAX_STEPS])
    except (_OutOfSteps, RecursionError):
        return False


_TYPES: dict[str, Any] = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
    "integer": lambda v: (isinstance(v, int) and not isinstance(v, bool))
    or (isinstance(v, float) and v.is_integer()),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
}


def _same(a: Any, b: Any) -> bool:
    """JSON equality: ``true`` is not ``1``, as Python's ``==`` would have it."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    return a == b


def _spend(steps: list[int], count: int) -> None:
    steps[0] -= count
    if steps[0] < 0:
        raise _OutOfSteps


def _check(value: Any, schema: Any, root: Any, steps: list[int]) -> bool:
    _spend(steps, 1)
    if schema is True or schema is None:
        return True
    if schema is False:
        return False
    if not isinstance(schema, dict):
        return True  # not a schema: constrains nothing
    ref = schema.get("$ref")
    if isinstance(ref, str):
        target = _resolve(ref, root)
        if target is not None and not _check(value, target, root, steps):
            return False
    kind = schema.get("type")
    if kind is not None:
        kinds = kind if isinstance(kind, list) else [kind]
        _spend(steps, len(kinds))
        if not any(_TYPES.get(k, lambda v: False)(value) for k in kinds if isinstance(k, str)):
            return False
    enum = schema.get("enum")
    if isinstance(enum, list):
        _spend(steps, len(enum))
        if not any(_same(value, option) for option in enum):
            return False
    if "const" in schema and not _same(value, schema["const"]):
        return False
    for key in ("anyOf", "oneOf"):
        options = schema.get(key)
        if isinstance(options, list) and options:
            _spend(steps, len(options))
            matches = sum(1 for option in options if _check(value, option, root, steps))
            if matches == 0 or (key == "oneOf" and matches > 1):
                return False
    if isinstance(value, dict):
        return _check_object(value, schema, root, steps)
    if isinstance(value, list):
        items = schema.get("items")
        if isinstance(items, dict | bool):
            return all(_check(item, items, root, steps) for item in value)
    return True


def _check_object(
    value: dict[str, Any], schema: dict[str, Any], root: Any, steps: list[int]
) -> bool:
    required = schema.get("required")
    if isinstance(required, list):
        _spend(steps, len(required))
        if any(isinstance(key, str) and key not in value for key in required):
            return False
    properties = schema.get("properties")
    if not isinstance(properties, dict):
        properties = {}
    additional = schema.get("additionalProperties", True)
    for key, item in value.items():
        if key in properties:
            if not _check(item, properties[key], root, steps):
                return False
        elif not _check(item, additional, root, steps):
            return False
    return True


def _resolve(ref: str, root: Any) -> Any:
    """A local reference (``#``, ``#/$defs/x``, ``#/definitions/x``); None for others."""
    if not ref.startswith("#"):
        return None
    target = root
    for part in ref[1:].split("/")[1:] if ref != "#" else ():
        part = part.replace("~1", "/").replace("~0", "~")
        if not isinstance(target, dict) or part not in target:
            return None
        target = target[part]
    return target
