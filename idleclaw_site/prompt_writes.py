"""Write to a TCP socket at once when nothing is waiting to be written.

Twisted buffers every ``write`` and sends it on a later turn of the event loop, once the
reactor reports the socket writable: for each token an SSE stream writes (and each frame the
router sends a node) that is two ``epoll_ctl`` calls, one more loop turn and one wake-up of the
reactor's bookkeeping, before the one ``send`` that does the work (bench/RESULTS.md). Here a
write to a connection with an empty buffer tries ``send`` at once; whatever the kernel does not
take, and every write while something is still buffered, goes the usual way, so order and
back-pressure are Twisted's own. So do connections where Twisted does more than ``send``:
TLS started on the connection, a pull producer, file descriptors queued on a Unix socket.
"""

from __future__ import annotations

from typing import Any


def install() -> None:
    from twisted.internet import tcp

    connection = tcp.Connection
    if getattr(connection, "_idleclaw_prompt_writes", False):
        return
    buffered_write = connection.write

    def write(self: Any, data: bytes) -> None:
        if (
            data
            and not self.TLS  # startTLS: Twisted's own path through the TLS layer
            and self.connected
            and not self.disconnecting
            and not self._writeDisconnected
            and not self._tempDataLen
            and self.offset == len(self.dataBuffer)
            and type(data) is bytes
            # A pull producer is asked for more only when a buffered write drains.
            and (self.producer is None or self.streamingProducer)
            # Unix sockets may have file descriptors waiting to go with the next bytes.
            and not getattr(self, "_sendmsgQueue", None)
        ):
            try:
                sent = self.socket.send(data)
            except OSError:
                sent = 0  # the buffered write finds out what went wrong, as it always has
            if sent == len(data):
                return
            data = data[sent:]
        buffered_write(self, data)

    def write_sequence(self: Any, iovec: list[bytes]) -> None:
        write(self, b"".join(iovec))

    connection.write = write
    connection.writeSequence = write_sequence
    connection._idleclaw_prompt_writes = True
