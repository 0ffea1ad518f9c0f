"""Checks on consumer input (PROTOCOL §2). Bad input becomes a ``BadRequest`` with the status
and a ``detail`` that says what is wrong; nothing here raises anything else."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$")
MAX_MODEL_CHARS = 64
MAX_MESSAGES = 50
MAX_CONTENT_CHARS = 10_000
MAX_TOTAL_CHARS = 100_000
MAX_BODY_BYTES = 1_000_000
CHAT_ROLES = ("user", "assistant")


class BadRequest(Exception):
    def __init__(self, detail: str, status: int = 422) -> None:
        super().__init__(detail)
        self.detail = detail
        self.status = status


@dataclass(frozen=True)
class ChatRequest:
    model: str
    messages: list[dict[str, str]]
    think: bool = False


def parse_json_object(body: bytes) -> dict[str, Any]:
    if len(body) > MAX_BODY_BYTES:
        raise BadRequest(f"request body is larger than {MAX_BODY_BYTES} bytes", 413)
    if not body:
        raise BadRequest("request body is empty; expected a JSON object", 400)
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("request body is not valid JSON", 400) from None
    if not isinstance(data, dict):
        raise BadRequest("request body must be a JSON object", 400)
    return data


def check_model(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise BadRequest("model: a non-empty string is required")
    if len(value) > MAX_MODEL_CHARS:
        raise BadRequest(f"model: at most {MAX_MODEL_CHARS} characters")
    if not MODEL_NAME.match(value) or ".." in value:
        raise BadRequest("model: only letters, digits and . _ : / - are allowed")
    return value


def check_messages(value: Any, *, roles: tuple[str, ...]) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise BadRequest("messages: a non-empty list is required")
    if len(value) > MAX_MESSAGES:
        raise BadRequest(f"messages: at most {MAX_MESSAGES} messages")
    total = 0
    clean: list[dict[str, str]] = []
    for index, message in enumerate(value):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise BadRequest(f"{where}: must be an object with role and content")
        role = message.get("role")
        if role not in roles:
            raise BadRequest(f"{where}.role: must be one of {', '.join(roles)}")
        content = message.get("content")
        if not isinstance(content, str) or not content:
            raise BadRequest(f"{where}.content: a non-empty string is required")
        if len(content) > MAX_CONTENT_CHARS:
            raise BadRequest(f"{where}.content: at most {MAX_CONTENT_CHARS} characters")
        total += len(content)
        clean.append({"role": role, "content": content})
    if total > MAX_TOTAL_CHARS:
        raise BadRequest(f"messages: at most {MAX_TOTAL_CHARS} characters of content in all")
    return clean


def parse_chat_request(body: bytes) -> ChatRequest:
    """The network's own ``POST /api/chat`` body."""
    data = parse_json_object(body)
    model = check_model(data.get("model"))
    messages = check_messages(data.get("messages"), roles=CHAT_ROLES)
    think = data.get("think", False)
    if think is None:
        think = False
    if not isinstance(think, bool):
        raise BadRequest("think: must be true or false")
    return ChatRequest(model=model, messages=messages, think=think)
