"""One end of a worker <-> engine socket on an asyncio loop: whole messages in, whole messages out.

Sends never wait. A peer that stops reading fills its socket buffer and then
loses messages, each counted, which is what lets the engine go on serving
every other worker at full pace while one is stuck (and a worker go on with its
calls while the engine is slow: its frames are dropped, as the engine itself
would drop them for bounded delay).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable

from .wire import MAX_MESSAGE

log = logging.getLogger(__name__)
BUFFER_BYTES = 4 * 1024 * 1024  # about 2 s of frames for 64 calls either way


class MessageChannel:
    def __init__(self, sock: socket.socket, on_message: Callable[[bytes], None], on_close: Callable[[], None]):
        sock.setblocking(False)
        for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            with contextlib.suppress(OSError):  # the kernel may cap it (net.core.wmem_max): its default works too
                sock.setsockopt(socket.SOL_SOCKET, option, BUFFER_BYTES)
        self.sock = sock
        self.on_message = on_message
        self.on_close = on_close
        self.sent = 0
        self.send_dropped = 0
        self.closed = False
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(sock.fileno(), self._readable)

    def send(self, message: bytes) -> bool:
        """Queue one message; False (and counted) when the peer's buffer is full or the socket gone."""
        if self.closed:
            return False
        try:
            self.sock.send(message)
        except BlockingIOError:
            self.send_dropped += 1
            return False
        except OSError as exc:  # the peer went away; the reader sees the end and closes
            log.debug("send failed: %s", exc)
            self.send_dropped += 1
            return False
        self.sent += 1
        return True

    def _readable(self) -> None:
        for _ in range(256):  # then let the loop breathe; the reader fires again if more is waiting
            try:
                message = self.sock.recv(MAX_MESSAGE)
            except BlockingIOError:
                return
            except OSError:
                message = b""
            if not message:
                self.close()
                return
            try:
                self.on_message(message)
            except Exception:  # noqa: BLE001 - one bad message must not stop the channel
                log.exception("a message from the other process could not be handled")

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._loop.remove_reader(self.sock.fileno())
        self.sock.close()
        self.on_close()
