//! The stream transport of TCP and Unix stream sockets, with asyncio's socket
//! transport surface. The read path (readiness → `recv` → protocol) and the write path
//! (buffer → one `sendmsg` per turn) never leave Rust except to call the protocol.
//!
//! Ownership: the Python socket object owns the fd. The transport registers the fd with
//! its loop for as long as the connection lives, deregisters it before closing the
//! socket, and closes the socket exactly once (in `_call_connection_lost`).

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io;
use std::ops::{Deref, DerefMut};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

use pyo3::buffer::PyUntypedBuffer;
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyByteArray, PyBytes, PyDict, PyMemoryView, PyString};
use pyo3::{PyTraverseError, PyVisit};

use crate::errors::{os_error, would_block};
use crate::event_loop::{LoopCore, NativeTransport};
use crate::gil_cell::GilCell;
use crate::poller::{Interest, Readiness, READABLE, WRITABLE};
use crate::tls::{self, TlsState};
use crate::transports::{
    asyncio_logger, close, flow_control, get_extra_info, in_context_if, in_read_context,
    is_fatal_to_loop, lose_connection, register, release_socket, report_fatal, set_limits,
    set_reading, socket_object, start_reading, to_bytes, Common, Extra, Peer, Sock,
    CONNLOST_LOG_THRESHOLD,
};

/// Bytes read per readiness event: asyncio's `max_size`. One read per event keeps one
/// fast peer from starving the others.
const MAX_READ: usize = 256 * 1024;
/// Buffers handed to one `sendmsg`.
const MAX_IOV: usize = 64;
const READ_ERROR: &str = "Fatal read error on socket transport";
const WRITE_ERROR: &str = "Fatal write error on socket transport";

thread_local! {
    /// The buffer every `Protocol` read lands in before it is copied into the `bytes`
    /// handed to `data_received`: one allocation per read, the `bytes` itself.
    static READ_BUF: RefCell<Vec<u8>> = RefCell::new(vec![0; MAX_READ]);
}

static BUFFERED_PROTOCOL: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

/// How the protocol takes data, looked up once per `set_protocol`.
/// How the protocol takes data. Its methods are looked up on every call, as asyncio
/// does (a replaced `data_received` is honoured), by `PyObject_VectorcallMethod`, which
/// makes no bound method: an idle connection keeps none either.
#[derive(Clone, Copy)]
enum ReadPath {
    Data,
    Buffered,
    /// ferroloop's `SSLProtocol`: the socket is read into the TLS object's incoming
    /// BIO, for `tls::records_received`, the steps of its `get_buffer` and
    /// `buffer_updated` without the two calls.
    Tls,
}

impl ReadPath {
    fn of(protocol: &Bound<'_, PyAny>) -> PyResult<ReadPath> {
        let py = protocol.py();
        if protocol.is_instance_of::<TlsState>() {
            return Ok(ReadPath::Tls);
        }
        let buffered = BUFFERED_PROTOCOL.get_or_try_init(py, || {
            Ok::<_, PyErr>(
                py.import("asyncio.protocols")?
                    .getattr("BufferedProtocol")?
                    .unbind(),
            )
        })?;
        if protocol.is_instance(buffered.bind(py))? {
            Ok(ReadPath::Buffered)
        } else {
            Ok(ReadPath::Data)
        }
    }
}

/// `obj.name(arg)` without a bound method object.
fn call_method_one<'py>(
    obj: &Bound<'py, PyAny>,
    name: &Bound<'py, PyString>,
    arg: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyAny>> {
    let args = [obj.as_ptr(), arg.as_ptr()];
    // SAFETY: `name` is a str and `args` holds two borrowed references alive for the
    // call (the receiver first, as PyObject_VectorcallMethod requires). The call returns
    // a new reference or NULL with an error set.
    unsafe {
        Bound::from_owned_ptr_or_err(
            obj.py(),
            ffi::PyObject_VectorcallMethod(
                name.as_ptr(),
                args.as_ptr(),
                2 | ffi::PY_VECTORCALL_ARGUMENTS_OFFSET,
                std::ptr::null_mut(),
            ),
        )
    }
}

struct StreamState {
    c: Common,
    read_path: Option<ReadPath>,
    protocol_connected: bool,
    server: Option<Py<PyAny>>,
    buffer: VecDeque<Py<PyBytes>>,
    /// Bytes of the first buffer already sent.
    sent_of_first: usize,
    eof: bool,
    /// In the loop's list of transports to flush at the end of the turn.
    flush_queued: bool,
    empty_waiter: Option<Py<PyAny>>,
}

impl Deref for StreamState {
    type Target = Common;
    fn deref(&self) -> &Common {
        &self.c
    }
}

impl DerefMut for StreamState {
    fn deref_mut(&mut self) -> &mut Common {
        &mut self.c
    }
}

/// A TCP or Unix stream connection. `ferroloop._loop.SocketTransport` subclasses it to
/// present itself as an `asyncio.Transport`.
#[pyclass(module = "ferroloop._ferroloop", subclass, frozen, weakref)]
pub struct StreamTransport {
    state: GilCell<StreamState>,
}

impl StreamTransport {
    /// Whether this connection was accepted by `server`.
    pub(crate) fn server_is(&self, py: Python<'_>, server: &Bound<'_, PyAny>) -> PyResult<bool> {
        Ok(self
            .state
            .borrow_mut(py)?
            .server
            .as_ref()
            .is_some_and(|s| s.is(server)))
    }

    fn loop_of(&self, py: Python<'_>) -> PyResult<Option<Py<LoopCore>>> {
        Ok(self
            .state
            .borrow_mut(py)?
            .loop_
            .as_ref()
            .map(|l| l.clone_ref(py)))
    }

    /// Readiness reported by the loop; stale events (the transport paused, closed or
    /// lost meanwhile) are ignored here, as a cancelled reader handle is in asyncio.
    pub(crate) fn on_ready(slf: &Bound<'_, StreamTransport>, events: Readiness) -> PyResult<()> {
        let (readable, writable) = (events.readable(), events.writable());
        if readable {
            StreamTransport::read_ready(slf)?;
        }
        if writable {
            let waiting = slf.get().state.borrow_mut(slf.py())?.write_waiting;
            if waiting {
                StreamTransport::flush(slf)?;
            }
        }
        Ok(())
    }

    fn read_ready(slf: &Bound<'_, StreamTransport>) -> PyResult<()> {
        let py = slf.py();
        let (fd, path, protocol, mut context) = {
            let st = slf.get().state.borrow_mut(py)?;
            if st.sock.is_none() || !st.started || !st.is_reading() || st.read_eof {
                return Ok(());
            }
            let (Some(path), Some(protocol)) = (st.read_path, &st.protocol) else {
                return Ok(());
            };
            (
                st.fd,
                path,
                protocol.clone_ref(py).into_bound(py),
                st.context.as_ref().map(|c| c.clone_ref(py)),
            )
        };
        match path {
            ReadPath::Data => {
                let received = READ_BUF.with(|buf| {
                    let mut buf = buf.borrow_mut();
                    let n = recv_slice(fd, &mut buf)?;
                    Ok::<_, io::Error>((n > 0).then(|| PyBytes::new(py, &buf[..n])))
                });
                match received {
                    Err(err) if would_block(&err) => Ok(()),
                    Err(err) => StreamTransport::own_fatal_error(slf, os_error(err), READ_ERROR),
                    Ok(None) => StreamTransport::on_eof(slf, &mut context),
                    Ok(Some(data)) => {
                        let called = in_read_context(&slf.get().state, py, &mut context, || {
                            let name = pyo3::intern!(py, "data_received");
                            call_method_one(&protocol, name, data.as_any()).map(drop)
                        });
                        StreamTransport::protocol_outcome(
                            slf,
                            called,
                            "Fatal error: protocol.data_received() call failed.",
                        )
                    }
                }
            }
            ReadPath::Buffered => {
                let got = in_read_context(&slf.get().state, py, &mut context, || {
                    let hint = (-1i32).into_pyobject(py)?;
                    let name = pyo3::intern!(py, "get_buffer");
                    let buf = call_method_one(&protocol, name, hint.as_any())?;
                    if buf.len()? == 0 {
                        return Err(PyRuntimeError::new_err(
                            "get_buffer() returned an empty buffer",
                        ));
                    }
                    Ok(buf)
                });
                let buf = match got {
                    Ok(buf) => buf,
                    Err(err) => {
                        return StreamTransport::protocol_outcome(
                            slf,
                            Err(err),
                            "Fatal error: protocol.get_buffer() call failed.",
                        )
                    }
                };
                let nbytes = match recv_into(fd, &buf) {
                    Ok(Ok(n)) => n,
                    Ok(Err(err)) if would_block(&err) => return Ok(()),
                    Ok(Err(err)) => {
                        return StreamTransport::own_fatal_error(slf, os_error(err), READ_ERROR)
                    }
                    Err(err) => return StreamTransport::own_fatal_error(slf, err, READ_ERROR),
                };
                if nbytes == 0 {
                    return StreamTransport::on_eof(slf, &mut context);
                }
                let called = in_read_context(&slf.get().state, py, &mut context, || {
                    let nbytes = nbytes.into_pyobject(py)?;
                    let name = pyo3::intern!(py, "buffer_updated");
                    call_method_one(&protocol, name, nbytes.as_any()).map(drop)
                });
                StreamTransport::protocol_outcome(
                    slf,
                    called,
                    "Fatal error: protocol.buffer_updated() call failed.",
                )
            }
            ReadPath::Tls => {
                let tls = protocol.cast::<TlsState>()?;
                let received = tls::receive(tls, |buf| recv_slice(fd, buf));
                let called = match received {
                    Ok(Ok(0)) => return StreamTransport::on_eof(slf, &mut context),
                    Ok(Ok(_)) => in_read_context(&slf.get().state, py, &mut context, || {
                        tls::records_received(tls)
                    }),
                    Ok(Err(err)) if would_block(&err) => return Ok(()),
                    Ok(Err(err)) => {
                        return StreamTransport::own_fatal_error(slf, os_error(err), READ_ERROR)
                    }
                    Err(err) => Err(err),
                };
                StreamTransport::protocol_outcome(
                    slf,
                    called,
                    "Fatal error: protocol.buffer_updated() call failed.",
                )
            }
        }
    }

    /// A protocol callback's failure ends the connection (after going to the exception
    /// handler); `SystemExit` and `KeyboardInterrupt` leave the loop as in asyncio.
    fn protocol_outcome(
        slf: &Bound<'_, StreamTransport>,
        outcome: PyResult<()>,
        message: &str,
    ) -> PyResult<()> {
        match outcome {
            Ok(()) => Ok(()),
            Err(err) if is_fatal_to_loop(slf.py(), &err) => Err(err),
            Err(err) => StreamTransport::own_fatal_error(slf, err, message),
        }
    }

    fn on_eof(slf: &Bound<'_, StreamTransport>, context: &mut Option<Py<PyAny>>) -> PyResult<()> {
        let py = slf.py();
        let protocol = slf
            .get()
            .state
            .borrow_mut(py)?
            .protocol
            .as_ref()
            .map(|p| p.clone_ref(py));
        let Some(protocol) = protocol else {
            return Ok(());
        };
        // The close that follows is in the read context too (`connection_lost` runs in a
        // copy of it). A failure of eof_received is reported as the protocol's; one of
        // the close goes up as it is.
        let keep_open = in_read_context(&slf.get().state, py, context, || {
            let keep_open = protocol
                .bind(py)
                .call_method0(pyo3::intern!(py, "eof_received"))
                .and_then(|r| r.is_truthy());
            if let Ok(false) = keep_open {
                StreamTransport::close(slf)?;
            }
            Ok(keep_open)
        })?;
        match keep_open {
            Ok(true) => {
                let mut st = slf.get().state.borrow_mut(py)?;
                st.read_eof = true;
                st.sync_interest(py)
            }
            Ok(false) => Ok(()),
            Err(err) => StreamTransport::protocol_outcome(
                slf,
                Err(err),
                "Fatal error: protocol.eof_received() call failed.",
            ),
        }
    }

    /// Sends what is buffered: one `sendmsg` of up to `MAX_IOV` buffers, repeated only
    /// while the socket takes everything. The end of every turn calls this for each
    /// transport written to during it; so does writability while the socket was full.
    /// Both are outside every callback: what the flush calls (`resume_writing`, the
    /// error handling, `connection_lost` once closed and drained) runs in the
    /// transport's own context, as from asyncio's writer callback.
    pub(crate) fn flush(slf: &Bound<'_, StreamTransport>) -> PyResult<()> {
        StreamTransport::send_buffer(slf, true)
    }

    /// `flush`; with `own_context` false (a `write` past the high-water mark) what it
    /// calls runs in the caller's context instead.
    fn send_buffer(slf: &Bound<'_, StreamTransport>, own_context: bool) -> PyResult<()> {
        let py = slf.py();
        let core = slf.get();
        loop {
            let mut st = core.state.borrow_mut(py)?;
            st.flush_queued = false;
            if st.sock.is_none() || st.conn_lost > 0 {
                return Ok(());
            }
            if st.buffer.is_empty() {
                break;
            }
            match send_buffered(py, &st) {
                Ok(sent) => {
                    consume(&mut st, sent);
                    if !st.buffer.is_empty() {
                        st.write_waiting = true;
                        st.sync_interest(py)?;
                        drop(st);
                        return StreamTransport::maybe_resume_protocol(slf, own_context);
                    }
                }
                Err(err) if would_block(&err) => {
                    st.write_waiting = true;
                    return st.sync_interest(py);
                }
                Err(err) => {
                    drop(st);
                    return in_context_if(&core.state, py, own_context, || {
                        StreamTransport::fatal_error(slf, os_error(err), WRITE_ERROR)
                    });
                }
            }
        }
        {
            let mut st = core.state.borrow_mut(py)?;
            st.write_waiting = false;
            st.sync_interest(py)?;
        }
        StreamTransport::maybe_resume_protocol(slf, own_context)?;
        // resume_writing() may have written more (sslproto sends its close_notify from
        // there): send that before deciding the buffer is drained.
        let (closing, eof, waiter, fd) = {
            let st = core.state.borrow_mut(py)?;
            if !st.buffer.is_empty() {
                drop(st);
                return StreamTransport::send_buffer(slf, own_context);
            }
            (
                st.closing,
                st.eof,
                st.empty_waiter.as_ref().map(|w| w.clone_ref(py)),
                st.fd,
            )
        };
        if let Some(waiter) = waiter {
            let waiter = waiter.bind(py);
            if !waiter.call_method0("done")?.is_truthy()? {
                waiter.call_method1("set_result", (py.None(),))?;
            }
        }
        if closing {
            in_context_if(&core.state, py, own_context, || {
                StreamTransport::lose_connection(slf, None)
            })?;
        } else if eof {
            // SAFETY: `fd` is the live socket of this transport (sock is not None).
            if unsafe { libc::shutdown(fd, libc::SHUT_WR) } < 0 {
                let err = io::Error::last_os_error();
                if err.raw_os_error() != Some(libc::ENOTCONN) {
                    return Err(os_error(err));
                }
            }
        }
        Ok(())
    }

    /// Schedules `_call_connection_lost(exc)` once, as `close` and `abort` do in asyncio.
    fn lose_connection(slf: &Bound<'_, StreamTransport>, exc: Option<Py<PyAny>>) -> PyResult<()> {
        lose_connection(&slf.get().state, slf.as_any(), exc)
    }

    /// asyncio's `_force_close`: drop what is buffered and lose the connection.
    fn force_close(slf: &Bound<'_, StreamTransport>, exc: Option<Py<PyAny>>) -> PyResult<()> {
        let py = slf.py();
        {
            let mut st = slf.get().state.borrow_mut(py)?;
            if st.conn_lost > 0 {
                return Ok(());
            }
            st.buffer.clear();
            st.buffer_size = 0;
            st.sent_of_first = 0;
        }
        StreamTransport::lose_connection(slf, exc)
    }

    /// `fatal_error` in the transport's own context, for the errors of its reads and
    /// of the loop's flushes (asyncio meets them in its reader and writer callbacks).
    fn own_fatal_error(
        slf: &Bound<'_, StreamTransport>,
        err: PyErr,
        message: &str,
    ) -> PyResult<()> {
        in_context_if(&slf.get().state, slf.py(), true, || {
            StreamTransport::fatal_error(slf, err, message)
        })
    }

    /// asyncio's `_fatal_error`: report (OS errors only in debug mode), then force-close.
    fn fatal_error(slf: &Bound<'_, StreamTransport>, err: PyErr, message: &str) -> PyResult<()> {
        let py = slf.py();
        let (loop_, protocol) = {
            let st = slf.get().state.borrow_mut(py)?;
            (st.loop_ref(py), st.protocol_ref(py))
        };
        report_fatal(
            loop_.as_ref(),
            &err,
            message,
            slf.as_any(),
            protocol.as_ref(),
        )?;
        let exc = err.value(py).clone().into_any().unbind();
        StreamTransport::force_close(slf, Some(exc))
    }

    fn maybe_pause_protocol(slf: &Bound<'_, StreamTransport>) -> PyResult<()> {
        flow_control(&slf.get().state, slf.as_any(), true, false)
    }

    fn maybe_resume_protocol(slf: &Bound<'_, StreamTransport>, own_context: bool) -> PyResult<()> {
        flow_control(&slf.get().state, slf.as_any(), false, own_context)
    }

    /// `write` of a bytearray or memoryview, which its owner may change as soon as the
    /// call returns (a `BufferedProtocol` echoing from its receive buffer), so what is
    /// kept must be copied. With nothing buffered it is sent at once, as asyncio's
    /// transports send every write, and only what the socket does not take is copied.
    fn write_buffer(slf: &Bound<'_, StreamTransport>, data: &Bound<'_, PyAny>) -> PyResult<()> {
        let py = slf.py();
        let buf = PyUntypedBuffer::get(data)?;
        if !buf.is_c_contiguous() {
            let bytes = to_bytes(data)?;
            return StreamTransport::queue(slf, std::slice::from_ref(&bytes));
        }
        // SAFETY: a C-contiguous buffer of `len_bytes()` bytes, exported (so neither
        // resized nor freed) while `buf` lives; only read here.
        let view =
            unsafe { std::slice::from_raw_parts(buf.buf_ptr() as *const u8, buf.len_bytes()) };
        let sent = {
            let st = slf.get().state.borrow_mut(py)?;
            let direct = !view.is_empty()
                && st.buffer.is_empty()
                && !st.write_waiting
                && !st.eof
                && st.empty_waiter.is_none()
                && st.conn_lost == 0
                && st.sock.is_some()
                && st.token.is_some();
            if direct {
                // SAFETY: `view` is valid for reads of its length (above); MSG_NOSIGNAL
                // turns a broken pipe into EPIPE.
                let n = unsafe {
                    libc::send(st.fd, view.as_ptr().cast(), view.len(), libc::MSG_NOSIGNAL)
                };
                if n < 0 {
                    let err = io::Error::last_os_error();
                    if !would_block(&err) {
                        drop(st);
                        return StreamTransport::fatal_error(slf, os_error(err), WRITE_ERROR);
                    }
                    0
                } else {
                    n as usize
                }
            } else {
                0
            }
        };
        if sent == view.len() && sent > 0 {
            return Ok(());
        }
        // The rest (or, when it could not be sent now, all of it: `queue` also raises
        // what asyncio raises for a write after write_eof or during sendfile).
        let rest = crate::pyhelpers::bytes_copy(py, &view[sent..])?;
        drop(buf);
        StreamTransport::queue(slf, std::slice::from_ref(&rest))
    }

    /// Queues `chunks` for the end of the turn (a slice: `write` allocates nothing more).
    fn queue(slf: &Bound<'_, StreamTransport>, chunks: &[Bound<'_, PyBytes>]) -> PyResult<()> {
        let py = slf.py();
        let pending = {
            let mut st = slf.get().state.borrow_mut(py)?;
            if st.eof {
                return Err(PyRuntimeError::new_err(
                    "Cannot call write() after write_eof()",
                ));
            }
            if st.empty_waiter.is_some() {
                return Err(PyRuntimeError::new_err(
                    "unable to write; sendfile is in progress",
                ));
            }
            let total: usize = chunks.iter().map(|c| c.as_bytes().len()).sum();
            if total == 0 {
                return Ok(());
            }
            if st.conn_lost > 0 {
                if st.conn_lost >= CONNLOST_LOG_THRESHOLD {
                    asyncio_logger(py)?
                        .call_method1("warning", ("socket.send() raised exception.",))?;
                }
                st.conn_lost += 1;
                return Ok(());
            }
            for chunk in chunks {
                if !chunk.as_bytes().is_empty() {
                    st.buffer.push_back(chunk.clone().unbind());
                }
            }
            st.buffer_size += total;
            if st.buffer_size > st.high_water && !st.write_waiting {
                // Past the high-water mark: send now, as asyncio would have, so that the
                // protocol is paused only for what the socket cannot take.
                Pending::SendNow
            } else if !st.flush_queued && !st.write_waiting {
                st.flush_queued = true;
                match &st.loop_ {
                    Some(l) => Pending::Queue(l.clone_ref(py)),
                    None => Pending::Nothing,
                }
            } else {
                Pending::Nothing
            }
        };
        match pending {
            Pending::SendNow => StreamTransport::send_buffer(slf, false)?,
            Pending::Queue(loop_) => loop_.get().queue_flush(py, slf.clone().unbind())?,
            Pending::Nothing => {}
        }
        StreamTransport::maybe_pause_protocol(slf)
    }
}

/// What a `write` leaves to do once the data is queued.
enum Pending {
    SendNow,
    Queue(Py<LoopCore>),
    Nothing,
}

/// `recv_into` a writable buffer object, as `socket.recv_into` would.
/// The outer error is the buffer's (not writable, ...), the inner one the socket's.
/// One `recv` into `buf`: the number of bytes read (0 at EOF).
fn recv_slice(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is a valid writable buffer of `buf.len()` bytes.
    let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

fn recv_into(fd: RawFd, buf: &Bound<'_, PyAny>) -> PyResult<io::Result<usize>> {
    let py = buf.py();
    let mut view = std::mem::MaybeUninit::<ffi::Py_buffer>::uninit();
    // SAFETY: `buf` is a live object and `view` is storage for one Py_buffer; on success
    // the buffer is released below, on failure nothing was acquired.
    if unsafe { ffi::PyObject_GetBuffer(buf.as_ptr(), view.as_mut_ptr(), ffi::PyBUF_WRITABLE) } < 0
    {
        return Err(PyErr::fetch(py));
    }
    // SAFETY: PyObject_GetBuffer succeeded, so `view` is initialised.
    let mut view = unsafe { view.assume_init() };
    let len = usize::try_from(view.len).unwrap_or(0);
    // SAFETY: `view.buf` points to `len` writable bytes (PyBUF_WRITABLE, contiguous by
    // default for PyBUF_SIMPLE-based requests) held alive until PyBuffer_Release.
    let n = unsafe { libc::recv(fd, view.buf.cast(), len, 0) };
    let err = (n < 0).then(io::Error::last_os_error);
    // SAFETY: releases the buffer acquired above exactly once.
    unsafe { ffi::PyBuffer_Release(&mut view) };
    Ok(match err {
        Some(err) => Err(err),
        None => Ok(n as usize),
    })
}

/// One `sendmsg` of the front of the buffer.
fn send_buffered(py: Python<'_>, st: &StreamState) -> io::Result<usize> {
    let mut iov = [libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    }; MAX_IOV];
    let mut count = 0;
    for (i, chunk) in st.buffer.iter().take(MAX_IOV).enumerate() {
        let bytes = chunk.as_bytes(py);
        let bytes = if i == 0 {
            &bytes[st.sent_of_first..]
        } else {
            bytes
        };
        iov[i] = libc::iovec {
            iov_base: bytes.as_ptr() as *mut libc::c_void,
            iov_len: bytes.len(),
        };
        count = i + 1;
    }
    // SAFETY: zero is a valid msghdr (no name, no control data).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_mut_ptr();
    msg.msg_iovlen = count as _;
    // SAFETY: every iovec points into a bytes object held by `st.buffer`, immutable and
    // alive for the duration of the call (we hold the GIL and a borrow of the state);
    // sendmsg only reads them. MSG_NOSIGNAL turns a broken pipe into EPIPE.
    let n = unsafe { libc::sendmsg(st.fd, &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Drops `sent` bytes from the front of the buffer.
fn consume(st: &mut StreamState, sent: usize) {
    st.buffer_size -= sent;
    let mut left = sent;
    while left > 0 {
        let Some(front) = st.buffer.front() else {
            break;
        };
        // Only lengths are read here; the GIL is held by the caller of `flush`.
        let remaining = front_len(front) - st.sent_of_first;
        if left >= remaining {
            left -= remaining;
            st.buffer.pop_front();
            st.sent_of_first = 0;
        } else {
            st.sent_of_first += left;
            left = 0;
        }
    }
}

fn front_len(bytes: &Py<PyBytes>) -> usize {
    // SAFETY: a bytes object's size never changes; reading it needs no reference count
    // change and the caller holds the GIL (it holds a borrow of a GilCell).
    unsafe { ffi::PyBytes_Size(bytes.as_ptr()) as usize }
}

#[pymethods]
impl StreamTransport {
    #[new]
    /// `extra` is the `get_extra_info` dict; `None` for an accepted connection, which
    /// passes only `peername`. An accepted connection may also come as `sock=None` and
    /// its `fd`: the transport takes the fd over whatever happens (it closes it if this
    /// fails), so the caller must not use or close it again.
    #[pyo3(signature = (r#loop, sock, protocol, extra, server=None, peername=None, fd=-1))]
    fn py_new(
        r#loop: &Bound<'_, PyAny>,
        sock: Option<&Bound<'_, PyAny>>,
        protocol: &Bound<'_, PyAny>,
        extra: Option<&Bound<'_, PyDict>>,
        server: Option<&Bound<'_, PyAny>>,
        peername: Option<&Bound<'_, PyAny>>,
        fd: RawFd,
    ) -> PyResult<StreamTransport> {
        let (sock, fd) = match sock {
            Some(sock) => {
                let fd: RawFd = sock.call_method0("fileno")?.extract()?;
                if fd < 0 {
                    return Err(PyValueError::new_err("the socket is closed"));
                }
                (Sock::Object(sock.clone().unbind()), fd)
            }
            // SAFETY: `fd` is an open socket handed over by the caller, which keeps no
            // other owner of it (ferroloop._loop passes a detached accepted one).
            None if fd >= 0 => (Sock::Fd(unsafe { OwnedFd::from_raw_fd(fd) }), fd),
            None => return Err(PyValueError::new_err("a socket or its fd is required")),
        };
        let loop_ = r#loop.cast::<LoopCore>()?.clone().unbind();
        Ok(StreamTransport {
            state: GilCell::new(StreamState {
                c: Common::new(
                    loop_,
                    sock,
                    fd,
                    protocol.clone().unbind(),
                    match (extra, peername) {
                        (Some(extra), _) => Extra::Dict(extra.clone().unbind()),
                        (None, Some(peer)) => Extra::Peer(Peer::of(peer)),
                        (None, None) => Extra::Peer(Peer::Object(r#loop.py().None())),
                    },
                ),
                read_path: Some(ReadPath::of(protocol)?),
                protocol_connected: true,
                server: server.filter(|s| !s.is_none()).map(|s| s.clone().unbind()),
                buffer: VecDeque::new(),
                sent_of_first: 0,
                eof: false,
                flush_queued: false,
                empty_waiter: None,
            }),
        })
    }

    fn _register(slf: &Bound<'_, StreamTransport>) -> PyResult<()> {
        register(&slf.get().state, slf.py(), || {
            NativeTransport::Stream(slf.clone().unbind())
        })
    }

    /// Gives the fd back to the loop (sendfile drives it with `add_writer` meanwhile).
    fn _unregister(&self, py: Python<'_>) -> PyResult<()> {
        let mut st = self.state.borrow_mut(py)?;
        if let (Some(token), Some(loop_)) = (st.token.take(), &st.loop_) {
            loop_.get().deregister_transport(py, token)?;
        }
        st.interest = Interest::NONE;
        Ok(())
    }

    /// Starts reading; the read callbacks run in `context` (the context the loop runs
    /// this call in, passed by the caller so that no second copy is made), or in a copy
    /// of the current one.
    #[pyo3(signature = (context=None))]
    fn _start_reading(&self, py: Python<'_>, context: Option<Py<PyAny>>) -> PyResult<()> {
        start_reading(&self.state, py, context)
    }

    fn write(slf: &Bound<'_, StreamTransport>, data: &Bound<'_, PyAny>) -> PyResult<()> {
        if let Ok(bytes) = data.cast::<PyBytes>() {
            return StreamTransport::queue(slf, std::slice::from_ref(bytes));
        }
        if data.is_instance_of::<PyByteArray>() || data.is_instance_of::<PyMemoryView>() {
            return StreamTransport::write_buffer(slf, data);
        }
        // Anything else: the TypeError asyncio raises.
        let bytes = to_bytes(data)?;
        StreamTransport::queue(slf, std::slice::from_ref(&bytes))
    }

    /// Queues every buffer as it is, without joining them.
    fn writelines(
        slf: &Bound<'_, StreamTransport>,
        list_of_data: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let mut chunks = Vec::new();
        for item in list_of_data.try_iter()? {
            chunks.push(to_bytes(&item?)?);
        }
        StreamTransport::queue(slf, &chunks)
    }

    fn write_eof(&self, py: Python<'_>) -> PyResult<()> {
        let mut st = self.state.borrow_mut(py)?;
        if st.closing || st.eof {
            return Ok(());
        }
        st.eof = true;
        if st.buffer.is_empty() && st.sock.is_some() {
            // SAFETY: `st.fd` is the live socket of this transport (sock is not None).
            if unsafe { libc::shutdown(st.fd, libc::SHUT_WR) } < 0 {
                return Err(os_error(io::Error::last_os_error()));
            }
        }
        Ok(())
    }

    fn can_write_eof(&self) -> bool {
        true
    }

    fn close(slf: &Bound<'_, StreamTransport>) -> PyResult<()> {
        close(&slf.get().state, slf.as_any())
    }

    fn abort(slf: &Bound<'_, StreamTransport>) -> PyResult<()> {
        StreamTransport::force_close(slf, None)
    }

    /// asyncio's name for `abort` with the error that ended the connection (sslproto
    /// calls it).
    fn _force_close(slf: &Bound<'_, StreamTransport>, exc: &Bound<'_, PyAny>) -> PyResult<()> {
        let exc = (!exc.is_none()).then(|| exc.clone().unbind());
        StreamTransport::force_close(slf, exc)
    }

    fn is_closing(&self, py: Python<'_>) -> PyResult<bool> {
        Ok(self.state.borrow_mut(py)?.closing)
    }

    fn is_reading(&self, py: Python<'_>) -> PyResult<bool> {
        Ok(self.state.borrow_mut(py)?.is_reading())
    }

    fn pause_reading(slf: &Bound<'_, StreamTransport>) -> PyResult<()> {
        set_reading(&slf.get().state, slf.as_any(), true)
    }

    fn resume_reading(slf: &Bound<'_, StreamTransport>) -> PyResult<()> {
        set_reading(&slf.get().state, slf.as_any(), false)
    }

    #[pyo3(signature = (high=None, low=None))]
    fn set_write_buffer_limits(
        slf: &Bound<'_, StreamTransport>,
        high: Option<&Bound<'_, PyAny>>,
        low: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        set_limits(&slf.get().state, slf.py(), high, low)?;
        StreamTransport::maybe_pause_protocol(slf)
    }

    fn get_write_buffer_limits(&self, py: Python<'_>) -> PyResult<(usize, usize)> {
        let st = self.state.borrow_mut(py)?;
        Ok((st.low_water, st.high_water))
    }

    fn get_write_buffer_size(&self, py: Python<'_>) -> PyResult<usize> {
        Ok(self.state.borrow_mut(py)?.buffer_size)
    }

    fn set_protocol(&self, py: Python<'_>, protocol: &Bound<'_, PyAny>) -> PyResult<()> {
        let path = ReadPath::of(protocol)?;
        let old = {
            let mut st = self.state.borrow_mut(py)?;
            st.read_path = Some(path);
            st.protocol_connected = true;
            st.protocol.replace(protocol.clone().unbind())
        };
        drop(old);
        Ok(())
    }

    fn get_protocol(&self, py: Python<'_>) -> PyResult<Option<Py<PyAny>>> {
        Ok(self
            .state
            .borrow_mut(py)?
            .protocol
            .as_ref()
            .map(|p| p.clone_ref(py)))
    }

    #[pyo3(signature = (name, default=None))]
    fn get_extra_info(
        &self,
        py: Python<'_>,
        name: &Bound<'_, PyAny>,
        default: Option<Py<PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        get_extra_info(&self.state, py, name, default)
    }

    /// Calls `protocol.connection_lost(exc)`, then releases the fd and closes the
    /// socket, exactly once whatever the protocol does.
    fn _call_connection_lost(
        slf: &Bound<'_, StreamTransport>,
        exc: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let py = slf.py();
        let (protocol, connected) = {
            let st = slf.get().state.borrow_mut(py)?;
            if st.sock.is_none() {
                return Ok(());
            }
            (st.protocol_ref(py), st.protocol_connected)
        };
        let outcome = match protocol {
            Some(protocol) if connected => protocol
                .bind(py)
                .call_method1("connection_lost", (exc,))
                .map(|_| ()),
            _ => Ok(()),
        };
        let (sock, loop_, token, server, waiter, released) = {
            let mut st = slf.get().state.borrow_mut(py)?;
            st.buffer.clear();
            st.buffer_size = 0;
            (
                st.sock.take(),
                st.loop_.take(),
                st.token.take(),
                st.server.take(),
                st.empty_waiter.take(),
                (st.protocol.take(), st.read_path.take(), st.context.take()),
            )
        };
        drop(released);
        let extra = slf.get().state.borrow_mut(py)?.extra_dict(py)?;
        release_socket(py, loop_.as_ref(), token, sock, &extra)?;
        if let Some(waiter) = waiter {
            let waiter = waiter.bind(py);
            if !waiter.call_method0("done")?.is_truthy()? {
                let err = py
                    .import("builtins")?
                    .getattr("ConnectionError")?
                    .call1(("Connection is closed by peer",))?;
                waiter.call_method1("set_exception", (err,))?;
            }
        }
        if let Some(server) = server {
            server.bind(py).call_method1("_detach", (slf,))?;
        }
        outcome
    }

    /// A future done once everything buffered is sent (sendfile waits on it).
    fn _make_empty_waiter(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        let (loop_, empty) = {
            let st = self.state.borrow_mut(py)?;
            if st.empty_waiter.is_some() {
                return Err(PyRuntimeError::new_err("Empty waiter is already set"));
            }
            (st.loop_ref(py), st.buffer.is_empty())
        };
        let Some(loop_) = loop_ else {
            return Err(PyRuntimeError::new_err("Transport is closed"));
        };
        let waiter = loop_.bind(py).call_method0("create_future")?;
        if empty {
            waiter.call_method1("set_result", (py.None(),))?;
        }
        self.state.borrow_mut(py)?.empty_waiter = Some(waiter.clone().unbind());
        Ok(waiter.unbind())
    }

    fn _reset_empty_waiter(&self, py: Python<'_>) -> PyResult<()> {
        let old = self.state.borrow_mut(py)?.empty_waiter.take();
        drop(old);
        Ok(())
    }

    #[getter]
    fn _sock(&self, py: Python<'_>) -> PyResult<Option<Py<PyAny>>> {
        socket_object(&self.state, py)
    }

    #[getter]
    fn _sock_fd(&self, py: Python<'_>) -> PyResult<RawFd> {
        Ok(self.state.borrow_mut(py)?.fd)
    }

    #[getter]
    fn _loop(&self, py: Python<'_>) -> PyResult<Option<Py<LoopCore>>> {
        self.loop_of(py)
    }

    #[getter]
    fn _protocol_paused(&self, py: Python<'_>) -> PyResult<bool> {
        Ok(self.state.borrow_mut(py)?.protocol_paused)
    }

    fn __repr__<'py>(slf: &Bound<'py, StreamTransport>) -> PyResult<Bound<'py, PyString>> {
        let py = slf.py();
        let st = slf.get().state.borrow_mut(py)?;
        let name = slf.get_type().name()?.to_string();
        let mut info = vec![name];
        if st.sock.is_none() {
            info.push("closed".into());
        } else if st.closing {
            info.push("closing".into());
        }
        info.push(format!("fd={}", st.fd));
        if st.sock.is_some() {
            let reading = if st.interest.contains(READABLE) {
                "polling"
            } else {
                "idle"
            };
            let writing = if st.interest.contains(WRITABLE) {
                "polling"
            } else {
                "idle"
            };
            info.push(format!("read={reading}"));
            info.push(format!("write=<{writing}, bufsize={}>", st.buffer_size));
        }
        Ok(PyString::new(py, &format!("<{}>", info.join(" "))))
    }

    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        let Some(st) = self.state.borrow_for_gc() else {
            return Ok(());
        };
        st.c.visit(&visit)?;
        for obj in [&st.server, &st.empty_waiter].into_iter().flatten() {
            visit.call(obj)?;
        }
        Ok(())
    }

    fn __clear__(&self) {
        let released = self.state.borrow_mut_for_gc().map(|mut st| {
            (
                st.protocol.take(),
                st.read_path.take(),
                st.context.take(),
                st.server.take(),
                st.empty_waiter.take(),
                st.loop_.take(),
            )
        });
        drop(released);
    }
}
