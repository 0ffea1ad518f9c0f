"""A node that speaks the protocol frame by frame, for in-process tests through the real ASGI
application (``WebsocketCommunicator``)."""

from __future__ import annotations

import json
import uuid
from typing import Any

from channels.testing import WebsocketCommunicator

from idleclaw_site.asgi import application
from nodes.protocol import FrameType


def register_frame(node_id: Any = None, **overrides: Any) -> dict[str, Any]:
    frame: dict[str, Any] = {
        "type": FrameType.REGISTER,
        "node_id": str(uuid.uuid4()) if node_id is None else node_id,
        "models": [{"name": "llama3.2:3b", "size": 2019393189}],
        "max_concurrent": 2,
        "ollama_version": "0.12.3",
    }
    frame.update(overrides)
    return frame


def text_chunk(content: str = "", done: bool = False, **extra: Any) -> dict[str, Any]:
    """A chunk as a node forwards it from Ollama (PROTOCOL §1)."""
    return {"message": {"role": "assistant", "content": content}, "done": done, **extra}


# Every ASGI exchange a test opened, so teardown can end the ones the test left running.
OPEN: list[Any] = []


class ScriptedNode:
    def __init__(self, ip: str = "10.0.0.1", path: str = "/ws/node") -> None:
        self.communicator = WebsocketCommunicator(application, path)
        self.communicator.scope["client"] = (ip, 40000)
        OPEN.append(self.communicator)

    async def open(self) -> None:
        connected, _ = await self.communicator.connect()
        assert connected

    async def register(self, **overrides: Any) -> dict[str, Any]:
        await self.open()
        await self.send(register_frame(**overrides))
        reply = await self.recv()
        assert reply["type"] == FrameType.REGISTERED, reply
        return reply

    async def send(self, frame: dict[str, Any]) -> None:
        await self.communicator.send_to(text_data=json.dumps(frame))

    async def recv(self, timeout: float = 3) -> dict[str, Any]:
        output = await self.communicator.receive_output(timeout)
        assert output["type"] == "websocket.send", output
        return json.loads(output["text"])

    async def closed(self, timeout: float = 3) -> tuple[int, str]:
        """Wait for the router to close the socket; return (code, reason)."""
        while True:
            output = await self.communicator.receive_output(timeout)
            if output["type"] == "websocket.close":
                return output.get("code"), output.get("reason", "")

    async def nothing_sent(self, timeout: float = 0.3) -> bool:
        return await self.communicator.receive_nothing(timeout)

    async def chunk(self, request_id: str, content: str = "", done: bool = False, **extra: Any):
        await self.send(
            {
                "type": FrameType.INFERENCE_CHUNK,
                "request_id": request_id,
                "chunk": text_chunk(content, done, **extra),
            }
        )

    async def chunks(self, request_id: str, chunks: Any) -> None:
        """One ``inference_chunks`` frame (docs/node-protocol-extensions.md); ``chunks`` is
        sent as given, so a test can send a malformed batch."""
        await self.send(
            {"type": FrameType.INFERENCE_CHUNKS, "request_id": request_id, "chunks": chunks}
        )

    async def disconnect(self) -> None:
        await self.communicator.disconnect()
