"""The messages between a caller and a standby: a length, then a marshal'd dict of plain values.

Why marshal: both ends are the same interpreter (the socket's name says so)
and the same user (the standby checks), and marshal is built in, where json
would cost every command its import. The standby's child speaks first ("ready"); the
caller's descriptors ride on its answer, the request (``SCM_RIGHTS``).
"""

from __future__ import annotations

import marshal
import socket
from typing import List, Optional, Sequence

HEADER = 4  # bytes of a message's length, big-endian
MAX_MESSAGE = 16 << 20
STDIO = (0, 1, 2)


def same_user(sock: socket.socket) -> bool:
    """Whether the process at the other end of *sock* runs as this user (``SO_PEERCRED``): each
    end checks the other, the standby every caller, a caller the standby it reached."""
    import os
    import sys
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)  # struct ucred: 3 ints
    return int.from_bytes(creds[4:8], sys.byteorder) == os.getuid()


def send(sock: socket.socket, payload: dict, fds: Sequence[int] = ()) -> None:
    data = marshal.dumps(payload)
    message = len(data).to_bytes(HEADER, "big") + data
    if fds:
        sent = socket.send_fds(sock, [message], list(fds))
        message = message[sent:]
    if message:
        sock.sendall(message)


def read_exact(sock: socket.socket, size: int, fds: Optional[List[int]] = None) -> bytes:
    chunks = []
    while size:
        if fds is not None:
            data, got, _flags, _addr = socket.recv_fds(sock, size, 8)
            fds.extend(got)
        else:
            data = sock.recv(size)
        if not data:
            raise EOFError("the other end closed the connection")
        chunks.append(data)
        size -= len(data)
    return b"".join(chunks)


def receive(sock: socket.socket, fds: Optional[List[int]] = None) -> dict:
    size = int.from_bytes(read_exact(sock, HEADER, fds), "big")
    if size > MAX_MESSAGE:
        raise ValueError(f"message of {size} bytes refused")
    message = marshal.loads(read_exact(sock, size, fds))
    if not isinstance(message, dict):
        raise ValueError("not a message")
    return message
