"""The `sock_*` methods and sendfile.

`sock_recv`, `sock_recv_into` and `sock_sendall` start in the core (Rust), which
finishes them when the fd is ready; the others try the call at once and otherwise wait
for readiness through `add_reader`/`add_writer` (`_sock_wait`). `loop.sendfile` and
`loop.sock_sendfile` send with the native sendfile call, in blocks, waiting for
writability between them. Over a TLS transport whose records are written natively,
`loop.sendfile` reads the file from the loop's thread into a reused buffer, encrypts
it from there and, while the socket takes it, sends the records from that buffer too,
block by block, paced by the transport's flow control (`_sendfile_fallback`).
"""

from __future__ import annotations

import errno
import functools
import io
import os
import socket
import stat
from asyncio import base_events, exceptions, tasks
from operator import methodcaller

from . import _sslproto
from ._arguments import check_ssl_socket
from ._ferroloop import sendfile

__all__ = ["SocketMethods"]


class SocketMethods:
    """The loop's `sock_*` methods and native sendfile (a base of `Loop`)."""

    def _check_sock(self, sock) -> None:
        check_ssl_socket(sock)
        if self._debug and sock.gettimeout() != 0:
            raise ValueError("the socket must be non-blocking")

    async def _sock_wait(self, sock, writable: bool, op):
        """Waits until `sock` is ready and `op(sock)` stops raising BlockingIOError.
        `op` looks the socket method up on each try, as asyncio does."""
        fut = self.create_future()
        fd = sock.fileno()
        add, get, remove = (
            (self.add_writer, self._get_writer, self.remove_writer)
            if writable
            else (self.add_reader, self._get_reader, self.remove_reader)
        )
        add(fd, self._sock_retry, fut, sock, op)
        handle = get(fd)
        fut.add_done_callback(functools.partial(self._sock_wait_done, handle, remove, fd))
        try:
            return await fut
        finally:
            # The future's error has this frame in its traceback, and the handle holds
            # the future: drop both, or they make a cycle.
            fut = handle = None

    @staticmethod
    def _sock_wait_done(handle, remove, fd, _fut) -> None:
        # Another operation may have replaced our callback meanwhile.
        if handle is not None and not handle.cancelled():
            remove(fd)

    @staticmethod
    def _sock_retry(fut, sock, op) -> None:
        if fut.done():
            return
        try:
            result = op(sock)
        except (BlockingIOError, InterruptedError):
            return
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:  # noqa: BLE001 - the future carries any failure
            fut.set_exception(exc)
        else:
            fut.set_result(result)
        finally:
            fut = None  # the error's traceback holds this frame: no cycle through it

    async def sock_recv(self, sock, n):
        # Checked (as _check_sock does) and read now in Rust if there is data; otherwise
        # the loop reads when the fd is ready and resolves the future, with no Python
        # callback.
        data = self._sock_recv_start(sock, n)
        if type(data) is bytes:
            return data
        try:
            return await data
        except exceptions.CancelledError:
            self._sock_op_cancel(sock, False, data)
            raise

    async def sock_recv_into(self, sock, buf):
        count = self._sock_recv_into_start(sock, buf)
        if type(count) is int:
            return count
        try:
            return await count
        except exceptions.CancelledError:
            self._sock_op_cancel(sock, False, count)
            raise

    async def sock_recvfrom(self, sock, bufsize):
        self._check_sock(sock)
        try:
            return sock.recvfrom(bufsize)
        except (BlockingIOError, InterruptedError):
            pass
        return await self._sock_wait(sock, False, methodcaller("recvfrom", bufsize))

    async def sock_recvfrom_into(self, sock, buf, nbytes=0):
        self._check_sock(sock)
        if not nbytes:
            nbytes = len(buf)
        try:
            return sock.recvfrom_into(buf, nbytes)
        except (BlockingIOError, InterruptedError):
            pass
        return await self._sock_wait(sock, False, methodcaller("recvfrom_into", buf, nbytes))

    async def sock_sendto(self, sock, data, address):
        self._check_sock(sock)
        try:
            return sock.sendto(data, address)
        except (BlockingIOError, InterruptedError):
            pass
        return await self._sock_wait(sock, True, methodcaller("sendto", data, address))

    async def sock_sendall(self, sock, data):
        pending = self._sock_sendall_start(sock, data)
        if pending is None:
            return
        try:
            await pending
        except exceptions.CancelledError:
            self._sock_op_cancel(sock, True, pending)
            raise

    async def sock_connect(self, sock, address):
        self._check_sock(sock)
        if sock.family == socket.AF_INET or (
            base_events._HAS_IPv6 and sock.family == socket.AF_INET6
        ):
            resolved = await self._ensure_resolved(
                address, family=sock.family, type=sock.type, proto=sock.proto, loop=self
            )
            _, _, _, _, address = resolved[0]
        try:
            sock.connect(address)
            return
        except (BlockingIOError, InterruptedError):
            pass
        await self._sock_wait(sock, True, functools.partial(self._sock_connect_result, address=address))

    @staticmethod
    def _sock_connect_result(sock, address) -> None:
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err in (errno.EINPROGRESS, errno.EALREADY, errno.EAGAIN):
            raise BlockingIOError(err, "connect in progress")
        if err != 0:
            raise OSError(err, f"Connect call failed {address}")

    async def sock_accept(self, sock):
        self._check_sock(sock)
        try:
            return self._accept_nonblocking(sock)
        except (BlockingIOError, InterruptedError):
            pass
        return await self._sock_wait(sock, False, self._accept_nonblocking)

    @staticmethod
    def _accept_nonblocking(sock):
        conn, address = sock.accept()
        conn.setblocking(False)
        return conn, address

    # -- sendfile --------------------------------------------------------------

    async def _sendfile_native(self, transp, file, offset, count):
        resume_reading = transp.is_reading()
        transp.pause_reading()
        await transp._make_empty_waiter()
        # The transport gives its fd back while sock_sendfile drives it (still listed by
        # loop.connections(), its bytes counted in loop.stats()).
        transp._unregister()
        self._sendfile_transports.add(transp)
        try:
            sent = await self.sock_sendfile(transp._sock, file, offset, count, fallback=False)
            transp._count_written(sent)
            return sent
        finally:
            self._sendfile_transports.discard(transp)
            transp._reset_empty_waiter()
            transp._register()
            if resume_reading:
                transp.resume_reading()

    async def _sock_sendfile_native(self, sock, file, offset, count):
        try:
            fileno = file.fileno()
        except (AttributeError, io.UnsupportedOperation):
            raise exceptions.SendfileNotAvailableError("not a regular file") from None
        try:
            fsize = os.fstat(fileno).st_size
        except OSError:
            raise exceptions.SendfileNotAvailableError("not a regular file") from None
        blocksize = count if count else fsize
        if not blocksize:
            return 0  # an empty file
        total = 0
        try:
            while True:
                todo = min(count - total, blocksize) if count else blocksize
                if todo <= 0:
                    break
                send = functools.partial(_sendfile_once, fileno, offset + total, todo)
                try:
                    sent = send(sock)
                except (BlockingIOError, InterruptedError):
                    sent = await self._sock_wait(sock, True, send)
                if sent == 0:
                    break  # end of file
                total += sent
        except OSError as exc:
            if exc.errno == errno.ENOTCONN and type(exc) is not ConnectionError:
                raise ConnectionError(errno.ENOTCONN, "socket is not connected") from exc
            if total == 0:
                raise exceptions.SendfileNotAvailableError("os.sendfile call failed") from exc
            raise
        finally:
            if total > 0:
                os.lseek(fileno, offset + total, os.SEEK_SET)
        return total

    async def _sendfile_fallback(self, transp, file, offset, count):
        """asyncio's fallback, whose steps (the file read from its position, or from
        `offset` when one is given; the protocol swapped for asyncio's
        `_SendfileFallbackProtocol`, which pauses reading, waits while writing is paused
        and restores both; the file position set after) it keeps, with each block read
        and written by the TLS protocol in Rust (`_sendfile_block`: up to about 1 MiB
        while the socket takes it all, its records sent from the reused buffer when the
        TCP transport has nothing buffered and its `write` is its own) instead of read
        in the executor and passed to `transport.write`."""
        ssl_protocol = _native_tls_protocol(transp)
        fileno = _regular_fileno(file) if ssl_protocol is not None else None
        if fileno is None:
            return await super()._sendfile_fallback(transp, file, offset, count)
        if offset:
            file.seek(offset)
        position = file.tell()
        total = 0
        proto = base_events._SendfileFallbackProtocol(transp)
        try:
            while not count or total < count:
                await proto.drain()
                sent = ssl_protocol._sendfile_block(fileno, position + total, count - total if count else None)
                if not sent:
                    break
                total += sent
                if proto._write_ready_fut is None:
                    # Not paused: the other callbacks of the loop run between blocks.
                    await tasks.sleep(0)
            return total
        finally:
            if total > 0:
                file.seek(offset + total)
            await proto.restore()


# ferroloop's TLS app transport (none on the Python versions whose asyncio classes are
# used as they are).
_NATIVE_TLS_TRANSPORT = getattr(_sslproto, "_SSLProtocolTransport", None)


def _native_tls_protocol(transp):
    """The SSLProtocol of a TLS app transport whose records are written natively."""
    if _NATIVE_TLS_TRANSPORT is None or type(transp) is not _NATIVE_TLS_TRANSPORT:
        return None
    ssl_protocol = transp._ssl_protocol
    return ssl_protocol if ssl_protocol._ferroloop_tls_path == "libssl" else None


def _regular_fileno(file):
    """The fd of a regular file, which pread can read at any offset. Only for the
    io module's own binary files: a wrapper whose fileno() is the file below it (gzip,
    bz2, lzma) reads other bytes than the fd holds, and gets asyncio's fallback."""
    if type(file) not in (io.FileIO, io.BufferedReader, io.BufferedRandom):
        return None
    try:
        fileno = file.fileno()
        return fileno if stat.S_ISREG(os.fstat(fileno).st_mode) else None
    except (AttributeError, io.UnsupportedOperation, OSError):
        return None


def _sendfile_once(fileno, offset, count, sock):
    return sendfile(sock.fileno(), fileno, offset, count)
