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

ENV = "FERROLOOP_INSPECT"
REQUEST = b"snapshot"
LOOP_TIMEOUT = 0.5  # seconds the loop has to answer before it is reported stalled

logger = logging.getLogger("ferroloop")
_lock = threading.Lock()
_inspector: Inspector | None = None


def start_from_environment(loop) -> None:
    """Serves `loop` on `$FERROLOOP_INSPECT` (with `.N` appended in worker N), once per
    process; the variable is then removed so that child programs do not try too."""
    global _inspector
    path = os.environ.pop(ENV, None)
    if not path:
        return
    worker = os.environ.get("FERROLOOP_WORKER")
    if worker is not None:
        path = f"{path}.{worker}"
    with _lock:
        if _inspector is not None:
            return
        try:
            _inspector = Inspector(loop, path)
        except OSError as exc:
            logger.warning("ferroloop: cannot serve the inspection socket %r: %s", path, exc)


def stop(loop) -> None:
    """Stops serving `loop` (when it closes)."""
    global _inspector
    with _lock:
        if _inspector is not None and _inspector.loop is loop:
            _inspector.close()
            _inspector = None


class Inspector:
    def __init__(self, loop, path: str) -> None:
        self.loop = loop
        self.path = path
        self._last: dict[str, Any] | None = None
        self._closed = False
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            _remove_stale_socket(path)
            old_mask = os.umask(0o177)  # created 0600: no window with a wider mode
            try:
                sock.bind(path)
            finally:
                os.umask(old_mask)
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
        try:
            # Wakes the accept() below.
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        self._thread.join(5)
        try:
            os.unlink(self.path)
        except OSError:
            pass

    def _serve(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with conn:
                try:
                    self._answer(conn)
                except OSError:
                    pass  # the client went away
                except Exception:
                    logger.exception("ferroloop: inspection request failed")

    def _answer(self, conn: socket.socket) -> None:
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _pid, uid, _gid = struct.unpack("3i", creds)
        if uid != os.getuid():
            return
        conn.settimeout(2)
        request = b""
        while b"\n" not in request and len(request) <= 64:
            chunk = conn.recv(64)
            if not chunk:
                break
            request += chunk
        if request.strip() != REQUEST:
            conn.sendall(b'{"error": "unknown request: send \\"snapshot\\\\n\\""}\n')
            return
        conn.sendall(json.dumps(_plain(self.snapshot())).encode() + b"\n")

    def snapshot(self) -> dict[str, Any]:
        head = {
            "pid": os.getpid(),
            "worker": os.environ.get("FERROLOOP_WORKER"),
            "time": time.time(),
        }
        try:
            taken = _on_loop(self.loop, lambda: {
                "stats": self.loop.stats(),
                "connections": self.loop.connections(),
            })
        except TimeoutError:
            return {**head, "stalled": True, "last": self._last}
        if taken is None:  # closed
            return {**head, "stalled": False, "closed": True}
        self._last = {**head, "stalled": False, **taken}
        return self._last


def _on_loop(loop, take, timeout: float = LOOP_TIMEOUT):
    """`take()` on the loop's thread while it runs, else here; None once it is closed."""
    if loop.is_closed():
        return None
    if not loop.is_running():
        return take()
    done = threading.Event()
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["value"] = take()
        except BaseException as exc:  # noqa: BLE001 - handed over to the waiting thread
            result["error"] = exc
        done.set()

    try:
        loop.call_soon_threadsafe(run)
    except RuntimeError:  # closed meanwhile
        return None
    if not done.wait(timeout):
        raise TimeoutError
    if "error" in result:
        raise result["error"]
    return result["value"]


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
