"""Framing between edgepack and a runtime worker process: a JSON header and an .npz payload;
and the control messages between edgepack and a fork server (runtimes/worker.py).

numpy arrays travel as .npz with allow_pickle=False, so nothing is ever unpickled.
"""

from __future__ import annotations

import io
import json
import os
import socket
import struct

import numpy as np

_LEN = struct.Struct("<Q")


def encode_arrays(arrays: list[np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **{f"a{i}": np.asarray(a) for i, a in enumerate(arrays)})
    return buffer.getvalue()


def decode_arrays(payload: bytes) -> list[np.ndarray]:
    if not payload:
        return []
    with np.load(io.BytesIO(payload), allow_pickle=False) as data:
        return [data[f"a{i}"] for i in range(len(data.files))]


def write_message(fd: int, header: dict, payload: bytes = b"") -> None:
    head = json.dumps(header).encode()
    blob = _LEN.pack(len(head)) + head + _LEN.pack(len(payload)) + payload
    view = memoryview(blob)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def read_exact(fd: int, size: int) -> bytes:
    chunks = []
    while size:
        chunk = os.read(fd, min(size, 1 << 20))
        if not chunk:
            raise EOFError("peer closed the pipe")
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def read_message(fd: int) -> tuple[dict, bytes]:
    (head_len,) = _LEN.unpack(read_exact(fd, _LEN.size))
    header = json.loads(read_exact(fd, head_len))
    (payload_len,) = _LEN.unpack(read_exact(fd, _LEN.size))
    return header, read_exact(fd, payload_len) if payload_len else b""


# --- fork server control channel: one JSON message per datagram (AF_UNIX SOCK_SEQPACKET), file
# descriptors passed alongside with SCM_RIGHTS ---------------------------------------------------

CONTROL_MAX = 1 << 16


def send_control(sock: socket.socket, message: dict, fds: list[int] | tuple[int, ...] = ()) -> None:
    data = json.dumps(message).encode()
    if fds:
        socket.send_fds(sock, [data], list(fds))
    else:
        sock.send(data)


def recv_control(sock: socket.socket, max_fds: int = 0) -> tuple[dict, list[int]]:
    """One message and the descriptors that came with it; EOFError when the peer has gone."""
    if max_fds:
        data, fds, _, _ = socket.recv_fds(sock, CONTROL_MAX, max_fds)
    else:
        data, fds = sock.recv(CONTROL_MAX), []
    if not data:
        for fd in fds:
            os.close(fd)
        raise EOFError("peer closed the control socket")
    return json.loads(data), fds
