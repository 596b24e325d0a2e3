"""The inspection socket: `python -m ferroloop --inspect PATH app.py` (or
`FERROLOOP_INSPECT=PATH`) serves the loop's stats and connection table on a Unix socket
that only the user running the program can use, for `python -m ferroloop top PATH`.

A thread of its own answers, so a stalled loop is still seen: the snapshot is taken on
the loop's thread (`call_soon_threadsafe`) and, when the loop does not answer within
half a second, the reply says the loop is stalled and carries the last snapshot taken.
Nothing listens on TCP.

Protocol: the client sends `snapshot\\n`; the server answers one JSON object and a
newline, then closes. Anything else gets `{"error": ...}`. A peer of another user id
(`SO_PEERCRED`) is closed on without a byte, whatever the file's mode.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import json
import logging
import math
import os
import socket
import stat
import struct
import threading
import time
from typing import Any

from .metrics import call_on_loop

ENV = "FERROLOOP_INSPECT"
REQUEST = b"snapshot"
LOOP_TIMEOUT = 0.5  # seconds the loop has to answer before it is reported stalled
READ_TIMEOUT = 0.2  # seconds a client has to send its request
WRITE_TIMEOUT = 2.0

logger = logging.getLogger("ferroloop")
_lock = threading.Lock()
# The path this process serves on (from the environment, read once: removed from it so
# that child programs do not try too), and what serves it now.
_path: str | None = None
_inspector: Inspector | None = None


def start_from_environment(loop) -> None:
    """Serves `loop` on `$FERROLOOP_INSPECT` (with `.N` appended in worker N) unless
    another loop of this process is served now; a loop made after that one closed is
    served next."""
    global _path, _inspector
    with _lock:
        env = os.environ.pop(ENV, None)
        if env and _path is None:
            worker = os.environ.get("FERROLOOP_WORKER")
            _path = f"{env}.{worker}" if worker is not None else env
        if _path is None or _inspector is not None:
            return
        try:
            _inspector = Inspector(loop, _path)
        except OSError as exc:
            logger.warning("ferroloop: cannot serve the inspection socket %r: %s", _path, exc)


def stop(loop) -> None:
    """Stops serving `loop` (when it closes)."""
    global _inspector
    with _lock:
        if _inspector is not None and _inspector.loop is loop:
            _inspector.close()
            _inspector = None


def _forget_in_child() -> None:
    """A forked child does not serve its parent's socket: it closes its copy of the fd
    (the parent's socket and file are untouched) and may serve a loop of its own."""
    global _inspector
    if _inspector is not None:
        _inspector.detach()
        _inspector = None


os.register_at_fork(after_in_child=_forget_in_child)


def _stop_at_exit() -> None:
    """A program that exits without closing its loop (or is interrupted before it
    could) does not leave its socket file behind."""
    global _inspector
    with _lock:
        if _inspector is not None:
            _inspector.close()
            _inspector = None


atexit.register(_stop_at_exit)


class Inspector:
    def __init__(self, loop, path: str) -> None:
        self.loop = loop
        self.path = path
        self._last: dict[str, Any] | None = None
        self._closed = False
        self._conn: socket.socket | None = None  # the client being answered
        # A snapshot the loop has not taken yet.
        self._pending: concurrent.futures.Future | None = None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            _remove_stale_socket(path)
            sock.bind(path)
            # Another user is refused by SO_PEERCRED anyway; the mode keeps them out
            # of connect() too.
            os.chmod(path, 0o600)
            st = os.stat(path)
            self._identity = (st.st_dev, st.st_ino)
            sock.listen(16)
        except OSError:
            sock.close()
            raise
        self._sock = sock
        self._thread = threading.Thread(target=self._serve, name="ferroloop-inspect", daemon=True)
        self._thread.start()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for sock in (self._conn, self._sock):
            try:
                # Wakes the accept() or the request in flight.
                if sock is not None:
                    sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._sock.close()
        self._thread.join(1)
        try:
            st = os.stat(self.path)
            if (st.st_dev, st.st_ino) == self._identity:  # not a newer process's socket
                os.unlink(self.path)
        except OSError:
            pass

    def detach(self) -> None:
        """In a forked child: forget the socket without touching the parent's."""
        self._closed = True
        self._sock.close()

    def _serve(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            self._conn = conn
            with conn:
                try:
                    self._answer(conn)
                except OSError:
                    pass  # the client went away or was too slow
                except Exception:
                    logger.exception("ferroloop: inspection request failed")
            self._conn = None

    def _answer(self, conn: socket.socket) -> None:
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _pid, uid, _gid = struct.unpack("3i", creds)
        if uid != os.getuid():
            return
        conn.settimeout(READ_TIMEOUT)
        request = b""
        while b"\n" not in request and len(request) <= 64:
            chunk = conn.recv(64)
            if not chunk:
                break
            request += chunk
        conn.settimeout(WRITE_TIMEOUT)
        if request.strip() != REQUEST:
            conn.sendall(b'{"error": "unknown request: send \\"snapshot\\\\n\\""}\n')
            return
        conn.sendall(json.dumps(_plain(self.snapshot())).encode() + b"\n")

    def snapshot(self) -> dict[str, Any]:
        loop = self.loop
        head = {
            "pid": os.getpid(),
            "worker": os.environ.get("FERROLOOP_WORKER"),
            "time": time.time(),
            # Read here, not on the loop's thread: a stall's own report, with the stack
            # the watchdog took while it lasted, is what a stalled loop is looked at for.
            "watchdog": loop._watchdog_recent(),
        }
        if loop.is_closed():
            return {**head, "stalled": False, "closed": True}
        if not loop.is_running():
            # Not between turns of a running loop: only what can be read from here
            # (the counters are copied out of the loop in one step).
            return {**head, "stalled": False, "running": False,
                    "stats": loop.stats(), "connections": []}
        if self._pending is not None and not self._pending.done():
            # The loop has not taken the last request's snapshot yet: still stalled.
            return {**head, "stalled": True, "last": self._last}
        taken = self._take_on_loop()
        if taken is None:
            return {**head, "stalled": True, "last": self._last}
        self._last = {**head, "stalled": False, "running": True, **taken}
        return self._last

    def _take_on_loop(self) -> dict[str, Any] | None:
        """The stats and connections, taken on the loop's thread; None if it does not
        answer within LOOP_TIMEOUT (the request stays queued: `_pending`)."""
        loop = self.loop
        try:
            self._pending = call_on_loop(
                loop, lambda: {"stats": loop.stats(), "connections": loop.connections()}
            )
        except RuntimeError:  # closed meanwhile
            return None
        try:
            return self._pending.result(LOOP_TIMEOUT)
        except concurrent.futures.TimeoutError:
            return None


def _remove_stale_socket(path: str) -> None:
    """A socket file left by a process that is gone is replaced; anything else at the
    path is not touched (bind then fails with EADDRINUSE)."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)
    except OSError:
        pass
    finally:
        probe.close()


def _plain(value):
    """JSON-ready: tuples as lists, infinite bounds as "+Inf", other objects as repr."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return repr(value)


def request(path: str, timeout: float = 5.0) -> dict[str, Any]:
    """One snapshot from the inspection socket at `path`."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(REQUEST + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(1 << 16)
            if not chunk:
                break
            data += chunk
    if not data:
        raise ConnectionRefusedError(f"{path}: the server closed without answering")
    return json.loads(data)
