"""Pipes and subprocesses: asyncio's Unix pipe and subprocess transports on the loop.
A child's exit is noticed on the loop thread through a pidfd per child (SIGCHLD where
pidfds are missing), with no child watcher; a child still running when its loop
closes is reaped by a thread.
"""

from __future__ import annotations

import os
import signal
import threading
from asyncio import unix_events
from asyncio.log import logger

__all__ = ["SubprocessMethods", "reap_in_thread"]


class SubprocessMethods:
    """The loop's pipes and subprocesses (a base of `Loop`)."""

    # asyncio's Unix pipe transports (and the subprocess transport over them) drive
    # their fds with these selector-loop names.

    def _add_reader(self, fd, callback, *args):
        self.add_reader(fd, callback, *args)

    def _remove_reader(self, fd):
        return self.remove_reader(fd)

    def _add_writer(self, fd, callback, *args):
        self.add_writer(fd, callback, *args)

    def _remove_writer(self, fd):
        return self.remove_writer(fd)

    def _make_read_pipe_transport(self, pipe, protocol, waiter=None, extra=None):
        transport = unix_events._UnixReadPipeTransport(self, pipe, protocol, waiter, extra)
        return self._note_pipe_transport(transport)

    def _make_write_pipe_transport(self, pipe, protocol, waiter=None, extra=None):
        transport = unix_events._UnixWritePipeTransport(self, pipe, protocol, waiter, extra)
        return self._note_pipe_transport(transport)

    async def _make_subprocess_transport(
        self, protocol, args, shell, stdin, stdout, stderr, bufsize, extra=None, **kwargs
    ):
        waiter = self.create_future()
        transp = unix_events._UnixSubprocessTransport(
            self, protocol, args, shell, stdin, stdout, stderr, bufsize,
            waiter=waiter, extra=extra, **kwargs,
        )
        self._watch_child(transp.get_pid(), transp)
        try:
            await waiter
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException:
            transp.close()
            await transp._wait()
            raise
        return transp

    def _watch_child(self, pid: int, transp) -> None:
        """Notices the child's exit on the loop thread, without a thread per child: a
        pidfd (Linux 5.3+) becomes readable when the child exits. Without pidfds the
        loop reaps watched children on SIGCHLD instead (main thread only)."""
        try:
            pidfd = os.pidfd_open(pid)
        except (AttributeError, OSError):
            self._children[pid] = (None, transp)
            self.add_signal_handler(signal.SIGCHLD, self._reap_children)
            self._reap_children()
            return
        self._children[pid] = (pidfd, transp)
        self.add_reader(pidfd, self._child_exited, pid)

    def _child_exited(self, pid: int) -> None:
        pidfd, transp = self._children.pop(pid, (None, None))
        if pidfd is not None:
            self.remove_reader(pidfd)
            os.close(pidfd)
        if transp is not None:
            transp._process_exited(self._reap(pid, transp))

    def _reap_children(self) -> None:
        for pid, (pidfd, transp) in list(self._children.items()):
            if pidfd is not None:
                continue
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done, status = pid, None
            if done == 0:
                continue
            del self._children[pid]
            if status is None:
                transp._process_exited(self._reap(pid, transp))
            else:
                transp._process_exited(os.waitstatus_to_exitcode(status))
        if not any(pidfd is None for pidfd, _ in self._children.values()):
            self.remove_signal_handler(signal.SIGCHLD)

    @staticmethod
    def _reap(pid: int, transp) -> int:
        try:
            _, status = os.waitpid(pid, 0)  # the child has exited: this does not block
        except ChildProcessError:
            # Reaped already, by Popen.poll() in the transport's close().
            returncode = getattr(transp._proc, "returncode", None)
            if returncode is not None:
                return returncode
            logger.warning("Unknown child process pid %d, will report returncode 255", pid)
            return 255
        return os.waitstatus_to_exitcode(status)


def reap_in_thread(pid: int, popen=None) -> None:
    """Reaps a child that outlives its loop once it exits, so that it stays no zombie:
    a daemon thread blocks in waitpid for it (as asyncio's threaded child watcher does
    for every child)."""
    try:
        threading.Thread(
            target=_wait_for_child,
            args=(pid, popen),
            name=f"ferroloop-reaper-{pid}",
            daemon=True,
        ).start()
    except RuntimeError:
        pass  # the interpreter is shutting down: it can start no thread


def _wait_for_child(pid: int, popen) -> None:
    try:
        _, status = os.waitpid(pid, 0)
    except ChildProcessError:
        return  # reaped elsewhere already (Popen.poll, a SIGCHLD handler)
    # The exit status goes where the child's Popen keeps it, so a later poll() or
    # kill() of the transport sees a finished child instead of a pid that may be reused.
    if popen is not None and popen.returncode is None:
        popen.returncode = os.waitstatus_to_exitcode(status)
