"""Worker mode: `python -m ferroloop --workers N app.py` runs the program in N worker
processes under a small supervisor, and the worker-side hooks the loop calls.

The supervisor
    Starts N worker interpreters with `subprocess` (spawned, never forked from a running
    loop), each running `python -m ferroloop app.py [args]` unchanged, with
    FERROLOOP_WORKER (its index, 0..N-1) and FERROLOOP_WORKERS (N) in its environment.
    Each worker is the leader of its own process group, so a terminal's Ctrl-C reaches
    the supervisor only, and the supervisor sends each worker exactly one stop signal.

    Stop (SIGINT or SIGTERM to the supervisor): every worker gets SIGINT, which
    `asyncio.run` turns into cancelling the main task (servers close, tasks are
    cancelled, async generators finalised, the executor shut down); the runner then
    exits 0 without a traceback. A worker still alive after --graceful-timeout seconds
    is killed with its process group (SIGKILL). A second stop signal kills at once.

    Restart: a worker that exits when it was not asked to is started again, at once if
    it had lived MIN_UPTIME seconds, else after a delay that doubles (from
    FIRST_DELAY up to MAX_DELAY) while it keeps dying young. Each death is one log line
    on stderr: worker index, pid, exit status or signal, its lifetime, the next delay.

    Exit status: 0 when every worker only ever stopped because it was asked to and did
    so cleanly (exit status 0, or death by the SIGINT it was sent); 1 when any worker
    failed: exited without being asked, or had to be killed after the graceful timeout.

    SIGHUP, rolling restart: one worker at a time, a replacement is started beside the
    old worker; once the replacement listens (it reports it, below) or READY_TIMEOUT
    has passed, the old worker is stopped as above, and the next one follows when it has
    exited. At least one listener is open on the port at every moment, so no connection
    is refused. On Linux, closing one listener of a SO_REUSEPORT group resets the
    connections that wait, accepted by the kernel but not yet by the process, in ITS
    queue, unless net.ipv4.tcp_migrate_req=1 (Linux 5.14+) moves them to another
    listener; the window is the last loop turn of the old worker.

The control channel
    Each worker inherits one end of a SOCK_SEQPACKET socket pair (fd number in the
    private variable _FERROLOOP_SUPERVISOR, which the worker removes from its
    environment at start) and the read end of a pipe that the supervisor never writes:
    when the supervisor dies, the pipe reads end-of-file and the worker stops itself
    with SIGINT, so no worker outlives its supervisor. Messages: "serving" (the worker's
    first server started listening) and "unix <backlog> <path>" (the listening Unix
    socket of that path, answered by the socket itself, passed with SCM_RIGHTS, or by
    "error <errno> <message>"). The pipe is watched by a daemon thread, the one thread
    worker mode adds to a worker (Python 3.12+ warns, as DeprecationWarning, when a
    process with threads calls os.fork()).

TCP servers
    In worker mode `create_server` defaults to reuse_port=True: each worker binds its
    own listening socket on the same address and the kernel spreads incoming
    connections over the workers' accept queues by a hash of the connection's
    addresses. An explicit reuse_port=False is obeyed (the second worker then fails to
    bind). Port 0 is not shared: each worker gets its own ephemeral port (a warning is
    logged); worker mode needs a fixed port.

Unix servers
    A Unix socket path cannot be bound twice, so the supervisor binds it once, on the
    first request, and hands the same listening socket to every worker that asks,
    restarted ones included; the workers share its accept queue. The supervisor is
    single-threaded and answers requests one at a time, so two workers asking at once
    get the same socket, and the socket lives as long as the supervisor, not as long as
    any worker. Workers do not remove the file when their server closes; the supervisor
    removes it when all workers have stopped (if it is still the file it bound).
"""

from __future__ import annotations

import errno
import logging
import os
import selectors
import signal
import socket
import stat
import subprocess
import sys
import threading
import time

__all__ = [
    "enter_worker_mode",
    "notify_serving",
    "reuse_port_default",
    "shared_unix_socket",
    "supervise",
    "worker_count",
]

SUPERVISOR_ENV = "_FERROLOOP_SUPERVISOR"
MIN_UPTIME = 5.0
FIRST_DELAY = 0.5
MAX_DELAY = 30.0
READY_TIMEOUT = 30.0
DEFAULT_GRACEFUL_TIMEOUT = 30.0

log = logging.getLogger("ferroloop.workers")

# -- the worker side ------------------------------------------------------------

# The control channel to the supervisor, in a worker only.
_control: socket.socket | None = None
_control_lock = threading.Lock()
_serving_sent = False
_port_zero_warned = False


def enter_worker_mode() -> bool:
    """Called by the runner: True if this process is a worker (its supervisor's
    channel, named in the environment, is then taken over and the variable removed so
    that the program's own children are not workers)."""
    global _control
    fds = os.environ.pop(SUPERVISOR_ENV, None)
    if fds is None:
        return False
    control_fd, lifeline_fd = (int(fd) for fd in fds.split(","))
    _control = socket.socket(fileno=control_fd)
    _control.set_inheritable(False)
    os.set_inheritable(lifeline_fd, False)
    threading.Thread(
        target=_stop_when_supervisor_dies, args=(lifeline_fd,), name="ferroloop-lifeline",
        daemon=True,
    ).start()
    return True


def _stop_when_supervisor_dies(lifeline_fd: int) -> None:
    try:
        while os.read(lifeline_fd, 1):
            pass
    except OSError:
        return  # the program closed the fd: nothing left to watch
    os.kill(os.getpid(), signal.SIGINT)


def reuse_port_default(reuse_port, host, port):
    """create_server's reuse_port: True when not given in a worker."""
    global _port_zero_warned
    if _control is None or reuse_port is not None:
        return reuse_port
    if (port == 0 or (port is None and host is not None)) and not _port_zero_warned:
        _port_zero_warned = True
        log.warning(
            "ferroloop worker %s: create_server on port 0 gives each worker its own port; "
            "worker mode needs a fixed port", os.environ.get("FERROLOOP_WORKER")
        )
    return True


def notify_serving() -> None:
    """Tells the supervisor, once, that this worker listens (rolling restarts wait
    for it)."""
    global _serving_sent
    if _control is None or _serving_sent:
        return
    _serving_sent = True
    with _control_lock:
        try:
            _control.send(b"serving")
        except OSError:
            pass  # the supervisor is gone: the lifeline stops this worker


def shared_unix_socket(path: str | bytes, backlog: int) -> socket.socket | None:
    """In a worker, the listening socket of `path`, bound once by the supervisor and
    shared by every worker; None outside worker mode."""
    if _control is None:
        return None
    path = os.fsencode(path)
    if not path.startswith(b"\0"):
        path = os.path.abspath(path)  # the supervisor's working directory may differ
    with _control_lock:
        _control.send(f"unix {backlog} ".encode() + path)
        message, fds, _flags, _addr = socket.recv_fds(_control, 1024, 1)
    if not fds:
        parts = message.decode(errors="replace").split(" ", 2)
        if len(parts) < 3 or not parts[1].isdigit():
            # The channel closed under the request: the supervisor is gone.
            raise ConnectionResetError(errno.ECONNRESET, "the ferroloop supervisor went away")
        raise OSError(int(parts[1]), f"{parts[2]} (binding {os.fsdecode(path)!r} in the supervisor)")
    return socket.socket(fileno=fds[0])


# -- the supervisor -------------------------------------------------------------


def _say(message: str) -> None:
    # One write per line: workers usually share the supervisor's stderr, and
    # print() writes the text and its newline separately.
    sys.stderr.write(f"[ferroloop supervisor {os.getpid()}] {message}\n")
    sys.stderr.flush()


def _describe_status(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with status {returncode}"


class _Worker:
    """One worker process and the supervisor's end of its channel."""

    def __init__(self, index: int, proc: subprocess.Popen, control: socket.socket):
        self.index = index
        self.proc = proc
        self.control = control
        self.started = time.monotonic()
        self.serving = False
        self.asked_to_stop = False
        self.kill_at: float | None = None


class Supervisor:
    def __init__(self, count: int, graceful_timeout: float, target: list[str]):
        self.count = count
        self.graceful_timeout = graceful_timeout
        self.target = target
        self.slots: list[_Worker | None] = [None] * count
        self.retiring: list[_Worker] = []  # asked to stop, not exited yet
        self.restart_at: dict[int, float] = {}
        self.delays = [0.0] * count
        self.failed = False
        self.stopping = False
        self.rolling: list[int] = []  # slots still to restart on SIGHUP
        self.replacement: _Worker | None = None  # the rolling restart's new worker
        self.unix_sockets: dict[bytes, tuple[socket.socket, int]] = {}
        self.signals: list[int] = []
        self.selector = selectors.DefaultSelector()
        self.lifeline_r, self.lifeline_w = os.pipe()

    # -- processes

    def spawn(self, index: int) -> _Worker | None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = dict(os.environ)
        env["FERROLOOP_WORKER"] = str(index)
        env["FERROLOOP_WORKERS"] = str(self.count)
        env[SUPERVISOR_ENV] = f"{theirs.fileno()},{self.lifeline_r}"
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "ferroloop", *self.target],
                env=env,
                pass_fds=(theirs.fileno(), self.lifeline_r),
                start_new_session=True,
            )
        except OSError as exc:
            ours.close()
            _say(f"worker {index} could not be started: {exc}")
            self.failed = True
            self.schedule_restart(index, 0.0)
            return None
        finally:
            theirs.close()
        worker = _Worker(index, proc, ours)
        ours.setblocking(False)
        self.selector.register(ours, selectors.EVENT_READ, worker)
        return worker

    def start(self, index: int) -> None:
        self.slots[index] = self.spawn(index)
        if self.slots[index] is not None:
            _say(f"worker {index} started, pid {self.slots[index].proc.pid}")

    def ask_to_stop(self, worker: _Worker) -> None:
        if worker.asked_to_stop:
            return
        worker.asked_to_stop = True
        worker.kill_at = time.monotonic() + self.graceful_timeout
        self.signal_worker(worker, signal.SIGINT)

    @staticmethod
    def signal_worker(worker: _Worker, signum: int) -> None:
        try:
            if signum == signal.SIGKILL:
                os.killpg(worker.proc.pid, signum)  # with whatever it started
            else:
                os.kill(worker.proc.pid, signum)
        except ProcessLookupError:
            pass

    def schedule_restart(self, index: int, uptime: float) -> float:
        if uptime >= MIN_UPTIME:
            delay = 0.0
        else:
            delay = min(MAX_DELAY, self.delays[index] * 2 or FIRST_DELAY)
        self.delays[index] = delay
        self.restart_at[index] = time.monotonic() + delay
        return delay

    def live_workers(self) -> list[_Worker]:
        workers = [w for w in self.slots if w is not None] + self.retiring
        if self.replacement is not None:
            workers.append(self.replacement)
        return workers

    # -- events

    def on_signal(self, signum, _frame) -> None:
        if signum != signal.SIGCHLD:  # that one only wakes the loop up, to reap
            self.signals.append(signum)

    def handle_signals(self) -> None:
        while self.signals:
            signum = self.signals.pop(0)
            if signum in (signal.SIGINT, signal.SIGTERM):
                self.begin_stop(signal.Signals(signum).name)
            elif signum == signal.SIGHUP and not self.stopping:
                if self.rolling or self.replacement is not None:
                    _say("SIGHUP: a rolling restart is already under way")
                else:
                    _say("SIGHUP: restarting the workers one by one")
                    self.rolling = list(range(self.count))

    def begin_stop(self, why: str) -> None:
        if self.stopping:
            _say(f"{why} again: killing the workers now")
            for worker in self.live_workers():
                self.signal_worker(worker, signal.SIGKILL)
            return
        self.stopping = True
        self.rolling = []
        self.restart_at.clear()
        _say(f"{why}: stopping the workers (graceful timeout {self.graceful_timeout:g} s)")
        for worker in self.live_workers():
            self.ask_to_stop(worker)

    def handle_message(self, worker: _Worker) -> None:
        try:
            message = worker.control.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            message = b""
        if not message:
            self.selector.unregister(worker.control)
            worker.control.close()
            return
        if message == b"serving":
            worker.serving = True
        elif message.startswith(b"unix "):
            _, backlog, path = message.split(b" ", 2)
            self.answer_unix_socket(worker, path, int(backlog))

    def answer_unix_socket(self, worker: _Worker, path: bytes, backlog: int) -> None:
        try:
            sock = self.unix_socket(path, backlog)
        except OSError as exc:
            reply = f"error {exc.errno or errno.EINVAL} {exc.strerror or exc}".encode()
            fds = []
        else:
            reply, fds = b"ok", [sock.fileno()]
        try:
            socket.send_fds(worker.control, [reply], fds)
        except OSError:
            pass  # the worker died after asking: reaped on this turn

    def unix_socket(self, path: bytes, backlog: int) -> socket.socket:
        if path in self.unix_sockets:
            return self.unix_sockets[path][0]
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            if not path.startswith(b"\0"):
                _remove_stale_socket(path)
            sock.bind(path)
            sock.listen(backlog)
        except OSError:
            sock.close()
            raise
        inode = 0 if path.startswith(b"\0") else os.stat(path).st_ino
        self.unix_sockets[path] = (sock, inode)
        return sock

    def reap(self) -> None:
        for worker in self.live_workers():
            returncode = worker.proc.poll()
            if returncode is not None:
                self.on_exit(worker, returncode)

    def on_exit(self, worker: _Worker, returncode: int) -> None:
        if worker.control.fileno() != -1:
            self.selector.unregister(worker.control)
            worker.control.close()
        uptime = time.monotonic() - worker.started
        what = f"worker {worker.index} (pid {worker.proc.pid}) {_describe_status(returncode)}"
        if worker in self.retiring:
            self.retiring.remove(worker)
        elif worker is self.replacement:
            self.replacement = None
        else:
            self.slots[worker.index] = None
        if worker.asked_to_stop:
            if returncode not in (0, -signal.SIGINT):
                self.failed = True
            _say(f"{what} after it was asked to stop")
            return
        self.failed = True
        if self.stopping:
            _say(f"{what} while stopping")
            return
        if self.slots[worker.index] is None:
            delay = self.schedule_restart(worker.index, uptime)
            _say(f"{what} after {uptime:.1f} s; restarting it in {delay:g} s")
        else:
            _say(f"{what} after {uptime:.1f} s; the rolling restart keeps the old worker")

    def step_rolling(self) -> None:
        """Advances a SIGHUP restart: start a replacement, promote it once it listens
        (or READY_TIMEOUT passed) and stop the old one; next slot when it has exited."""
        if self.stopping:
            return
        if self.replacement is not None:
            new = self.replacement
            if not new.serving and time.monotonic() - new.started < READY_TIMEOUT:
                return
            old = self.slots[new.index]
            self.slots[new.index], self.replacement = new, None
            self.restart_at.pop(new.index, None)  # the old one died meanwhile
            _say(f"worker {new.index}: pid {new.proc.pid} replaces pid "
                 f"{old.proc.pid if old else '-'}")
            if old is not None:
                self.retiring.append(old)
                self.ask_to_stop(old)
            return
        if self.retiring or not self.rolling:
            return
        index = self.rolling.pop(0)
        if self.slots[index] is None:
            return  # dead and waiting for its restart: that starts it afresh
        self.replacement = self.spawn(index)

    def restart_due(self, now: float) -> None:
        for index, when in list(self.restart_at.items()):
            if when <= now:
                del self.restart_at[index]
                if self.slots[index] is None:
                    self.start(index)

    def kill_late(self, now: float) -> None:
        for worker in self.live_workers():
            if worker.kill_at is not None and worker.kill_at <= now:
                worker.kill_at = None
                self.failed = True
                _say(f"worker {worker.index} (pid {worker.proc.pid}) did not stop within "
                     f"{self.graceful_timeout:g} s: killing it")
                self.signal_worker(worker, signal.SIGKILL)

    def timeout(self, now: float) -> float:
        deadlines = list(self.restart_at.values())
        deadlines += [w.kill_at for w in self.live_workers() if w.kill_at is not None]
        if self.replacement is not None:
            deadlines.append(self.replacement.started + READY_TIMEOUT)
        return max(0.0, min([now + 1.0, *deadlines]) - now)

    # -- the loop

    def run(self) -> int:
        wakeup_r, wakeup_w = socket.socketpair()
        wakeup_r.setblocking(False)
        wakeup_w.setblocking(False)
        self.selector.register(wakeup_r, selectors.EVENT_READ, None)
        signal.set_wakeup_fd(wakeup_w.fileno(), warn_on_full_buffer=False)
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(signum, self.on_signal)
        _say(f"starting {self.count} worker{'s' if self.count != 1 else ''}: "
             f"{' '.join(self.target)}")
        try:
            for index in range(self.count):
                self.start(index)
            while not (self.stopping and not self.live_workers()):
                for key, _ in self.selector.select(self.timeout(time.monotonic())):
                    if key.data is None:
                        _drain(wakeup_r)
                    else:
                        self.handle_message(key.data)
                self.handle_signals()
                self.reap()
                now = time.monotonic()
                self.kill_late(now)
                self.restart_due(now)
                self.step_rolling()
        finally:
            signal.set_wakeup_fd(-1)
            for worker in self.live_workers():
                self.signal_worker(worker, signal.SIGKILL)
                worker.proc.wait()
            self.close_unix_sockets()
            os.close(self.lifeline_w)
            os.close(self.lifeline_r)
        _say("all workers stopped" + ("; some failed: exit status 1" if self.failed else ""))
        return 1 if self.failed else 0

    def close_unix_sockets(self) -> None:
        for path, (sock, inode) in self.unix_sockets.items():
            sock.close()
            if inode:
                try:
                    if os.stat(path).st_ino == inode:
                        os.unlink(path)
                except OSError:
                    pass


def _drain(sock: socket.socket) -> None:
    try:
        while sock.recv(4096):
            pass
    except (BlockingIOError, InterruptedError):
        pass


def _remove_stale_socket(path: bytes) -> None:
    """Removes a socket file left by an earlier run, as asyncio's create_unix_server."""
    try:
        if stat.S_ISSOCK(os.stat(path).st_mode):
            os.remove(path)
    except FileNotFoundError:
        pass


def worker_count(value: str) -> int:
    """--workers: a positive number, or `auto`: one per CPU this process may run on."""
    if value == "auto":
        return len(os.sched_getaffinity(0))
    count = int(value)
    if count < 1:
        raise ValueError(value)
    return count


def supervise(count: int, graceful_timeout: float, target: list[str]) -> int:
    """Runs `target` (the runner's arguments) in `count` workers until told to stop;
    returns the supervisor's exit status."""
    return Supervisor(count, graceful_timeout, target).run()
