"""Send WebSocket close reasons through daphne.

daphne 4.2.3 drops the ``reason`` of an ASGI ``websocket.close`` message (``serverClose`` only
passes the code to autobahn), but PROTOCOL §1 tells nodes why they were refused with a 1008
reason. Until daphne forwards it, the reply handler passes the reason on itself.
"""

from __future__ import annotations

from typing import Any


def install() -> None:
    try:
        from daphne.ws_protocol import WebSocketProtocol
    except ImportError:  # not served by daphne (tests with WebsocketCommunicator)
        return
    if getattr(WebSocketProtocol, "_idleclaw_close_reason", False):
        return
    original = WebSocketProtocol.handle_reply

    def handle_reply(self: Any, message: dict[str, Any]) -> None:
        reason = message.get("reason")
        if (
            message.get("type") == "websocket.close"
            and reason
            and self.state != self.STATE_CONNECTING
        ):
            # RFC 6455 caps the reason at 123 bytes. sendCloseFrame, not sendClose: autobahn's
            # sendClose only takes 1000 and 3000-4999, and raises for the 1008/1009 we send.
            text = str(reason).encode("utf-8")[:123].decode("utf-8", "ignore")
            self.sendCloseFrame(
                code=message.get("code") or 1000, reasonUtf8=text.encode("utf-8"), isReply=False
            )
            return
        original(self, message)

    WebSocketProtocol.handle_reply = handle_reply
    WebSocketProtocol._idleclaw_close_reason = True
