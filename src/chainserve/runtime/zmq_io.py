"""A ZeroMQ socket driven by the asyncio loop's own reader callback (no extra task per message).

pyzmq's ``zmq.asyncio`` wraps every send and receive in futures and needs a task awaiting each
receive; on this machine kind that costs ~0.2-0.3 ms per round trip, most of a hop's transport
overhead. Here a plain socket's file descriptor is watched with ``loop.add_reader``: when it becomes
readable every waiting message is handed to ``on_message`` at once, and sends go out immediately.
The descriptor is edge-triggered, so the socket's ``EVENTS`` are checked again after each send.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import zmq


class LoopSocket:
    """``sock`` (a plain zmq socket) whose incoming multipart messages are passed to ``on_message``."""

    def __init__(
        self, sock: zmq.Socket, on_message: Callable[[list[bytes]], None], loop: asyncio.AbstractEventLoop | None = None
    ):
        self.sock = sock
        self.on_message = on_message
        self.loop = loop or asyncio.get_running_loop()
        self.loop.add_reader(sock.getsockopt(zmq.FD), self._drain)
        self.loop.call_soon(self._drain)  # anything that arrived before the reader was registered

    def _drain(self) -> None:
        sock = self.sock
        if sock.closed:
            return
        while sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            self.on_message(sock.recv_multipart(zmq.NOBLOCK, copy=True))

    def send(self, frames: list[bytes]) -> None:
        """Queue a message now (raises ``zmq.Again`` only if the peer's queue is full)."""
        self.sock.send_multipart(frames, zmq.NOBLOCK, copy=False)
        if self.sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:  # the send may have consumed the edge
            self.loop.call_soon(self._drain)

    def close(self) -> None:
        if not self.sock.closed:
            self.loop.remove_reader(self.sock.getsockopt(zmq.FD))
            self.sock.close(0)
