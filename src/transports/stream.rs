//! The stream transport of TCP and Unix stream sockets, with asyncio's socket
//! transport surface. The read path (readiness → `recv` → protocol, through the
//! protocol's sink in `transports::read`) and the write path (buffer → one `sendmsg`
//! per turn) never leave Rust except to call the protocol.
//!
//! Ownership: the transport's socket owns the fd (the Python socket object, or, for a
//! connection the loop accepted, the fd itself until a socket object is asked for). The
//! transport registers the fd with its loop for as long as the connection lives,
//! deregisters it before closing the socket, and closes the socket exactly once (in
//! `_call_connection_lost`).

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::mem::MaybeUninit;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

use pyo3::buffer::PyUntypedBuffer;
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::{PyByteArray, PyBytes, PyDict, PyMemoryView, PyString};
use pyo3::{PyTraverseError, PyVisit};

use crate::errors::{os_error, would_block};
use crate::event_loop::{LoopCore, NativeTransport};
use crate::gil_cell::GilCell;
use crate::poller::{Interest, Readiness, READABLE, WRITABLE};
use crate::sys;
use crate::tls::TlsSink;
use crate::transports::read::{BufferedSink, DataSink, Outcome, ReadPath, Reader, Sink};
use crate::transports::{
    asyncio_logger, close, flow_control, get_extra_info, in_context_if, in_read_context,
    is_fatal_to_loop, lose_connection, register, release_socket, report_fatal, set_limits,
    set_reading, socket_object, start_reading, to_bytes, Base, Extra, HasBase, Peer, Shape, Sock,
    CONNLOST_LOG_THRESHOLD,
};

/// Buffers handed to one `sendmsg`.
const MAX_IOV: usize = 64;
const READ_ERROR: &str = "Fatal read error on socket transport";
const WRITE_ERROR: &str = "Fatal write error on socket transport";

/// A stream transport's state: what every transport keeps (`base`) and what a stream
/// adds, its read path and its write buffer.
pub(crate) struct StreamState {
    base: Base,
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

impl HasBase for StreamState {
    #[inline]
    fn base_mut(&mut self) -> &mut Base {
        &mut self.base
    }
}

/// A TCP or Unix stream connection. `ferroloop._loop.SocketTransport` subclasses it to
/// present itself as an `asyncio.Transport`.
#[pyclass(module = "ferroloop._ferroloop", subclass, frozen, weakref)]
pub struct StreamTransport {
    state: GilCell<StreamState>,
}

impl StreamTransport {
    pub(crate) fn counters(&self, py: Python<'_>) -> Option<(u64, u64, f64)> {
        super::counters(&self.state, py)
    }

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
            .base
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
            let waiting = slf.get().state.borrow_mut(slf.py())?.base.write_waiting;
            if waiting {
                StreamTransport::flush(slf)?;
            }
        }
        Ok(())
    }

    /// One read, as asyncio's `_read_ready`: nothing once reading is paused, the
    /// transport closing or the peer's EOF kept open; else one read by the protocol's
    /// sink (one per event, so that one fast peer cannot starve the others).
    fn read_ready(slf: &Bound<'_, StreamTransport>) -> PyResult<()> {
        let py = slf.py();
        let state = &slf.get().state;
        let (path, reader) = {
            let st = state.borrow_mut(py)?;
            let base = &st.base;
            if base.sock.is_none() || !base.started || !base.is_reading() || base.read_eof {
                return Ok(());
            }
            let (Some(path), Some(protocol)) = (st.read_path, &base.protocol) else {
                return Ok(());
            };
            let context = base.context.as_ref().map(|c| c.clone_ref(py));
            let protocol = protocol.clone_ref(py).into_bound(py);
            (path, Reader::new(state, base.fd, protocol, context))
        };
        match path {
            ReadPath::Data => StreamTransport::read_to::<DataSink>(slf, reader),
            ReadPath::Buffered => StreamTransport::read_to::<BufferedSink>(slf, reader),
            ReadPath::Tls => StreamTransport::read_to::<TlsSink>(slf, reader),
        }
    }

    /// One read through the sink `S`, and what every path does with its outcome.
    #[inline]
    fn read_to<S: Sink>(
        slf: &Bound<'_, StreamTransport>,
        mut reader: Reader<'_, '_>,
    ) -> PyResult<()> {
        match S::receive(&mut reader) {
            Outcome::Read(got) => {
                slf.get()
                    .state
                    .borrow_mut(slf.py())?
                    .base
                    .count_read(reader.received);
                let called = reader.in_context(|protocol| S::deliver(protocol, got));
                StreamTransport::protocol_outcome(slf, called, S::DELIVERY_FAILED)?;
                // What the protocol wrote in answer goes out now rather than at the end
                // of the turn: its `bytes` are freed before the next connection's read,
                // so a turn of many connections does not pile them up (glibc would give
                // the heap top back and fault it in again on every such turn).
                StreamTransport::flush_if_queued(slf)
            }
            Outcome::WouldBlock => Ok(()),
            Outcome::Eof => StreamTransport::on_eof(slf, &mut reader.context),
            Outcome::Failed(err) => StreamTransport::own_fatal_error(slf, err, READ_ERROR),
            Outcome::CallbackFailed(err, message) => {
                StreamTransport::protocol_outcome(slf, Err(err), message)
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

    /// The peer ended the stream: asyncio's `_read_ready__on_eof` (`eof_received`, then
    /// close unless it asks to stay open), in the read context `context`.
    fn on_eof(slf: &Bound<'_, StreamTransport>, context: &mut Option<Py<PyAny>>) -> PyResult<()> {
        let py = slf.py();
        let protocol = slf
            .get()
            .state
            .borrow_mut(py)?
            .base
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
                st.base.read_eof = true;
                st.base.sync_interest(py)
            }
            Ok(false) => Ok(()),
            Err(err) => StreamTransport::protocol_outcome(
                slf,
                Err(err),
                "Fatal error: protocol.eof_received() call failed.",
            ),
        }
    }

    /// Sends what is buffered: one `sendmsg` of up to `MAX_IOV` buffers; what the
    /// socket does not take (or what lies past those buffers) waits for writability.
    /// The end of every turn calls this for each transport written to during it; so
    /// does writability while the socket was full. Both are outside every callback:
    /// what the flush calls (`resume_writing`, the error handling, `connection_lost`
    /// once closed and drained) runs in the transport's own context, as from asyncio's
    /// writer callback.
    pub(crate) fn flush(slf: &Bound<'_, StreamTransport>) -> PyResult<()> {
        StreamTransport::send_buffer(slf, true)
    }

    /// The flush the end of the turn would make, made now if still due (not made since
    /// by a writability event or a write past the high-water mark).
    pub(crate) fn flush_if_queued(slf: &Bound<'_, StreamTransport>) -> PyResult<()> {
        if slf.get().state.borrow_mut(slf.py())?.flush_queued {
            StreamTransport::flush(slf)
        } else {
            Ok(())
        }
    }

    /// `flush`; with `own_context` false (a `write` past the high-water mark) what it
    /// calls runs in the caller's context instead.
    fn send_buffer(slf: &Bound<'_, StreamTransport>, own_context: bool) -> PyResult<()> {
        match StreamTransport::send_front(slf)? {
            Sent::Drained => StreamTransport::buffer_drained(slf, own_context),
            Sent::Partly => StreamTransport::maybe_resume_protocol(slf, own_context),
            Sent::Nothing => Ok(()),
            Sent::Failed(err) => in_context_if(&slf.get().state, slf.py(), own_context, || {
                StreamTransport::fatal_error(slf, os_error(err), WRITE_ERROR)
            }),
        }
    }

    /// The sending half of a flush: one `sendmsg` of the front of the buffer, what was
    /// sent dropped from it, and write interest registered while anything is left.
    fn send_front(slf: &Bound<'_, StreamTransport>) -> PyResult<Sent> {
        let py = slf.py();
        let mut st = slf.get().state.borrow_mut(py)?;
        st.flush_queued = false;
        if st.base.sock.is_none() || st.base.conn_lost > 0 {
            return Ok(Sent::Nothing);
        }
        if st.buffer.is_empty() {
            return Ok(Sent::Drained);
        }
        let sent = match send_buffered(py, &st) {
            Ok(sent) => sent,
            Err(err) if would_block(&err) => {
                st.base.write_waiting = true;
                st.base.sync_interest(py)?;
                return Ok(Sent::Nothing);
            }
            Err(err) => return Ok(Sent::Failed(err)),
        };
        consume(&mut st, sent);
        if st.buffer.is_empty() {
            return Ok(Sent::Drained);
        }
        st.base.write_waiting = true;
        st.base.sync_interest(py)?;
        Ok(Sent::Partly)
    }

    /// What follows a drained buffer, as in asyncio's `_write_ready`: no more write
    /// interest, `resume_writing` at the low-water mark, the empty waiter done, then
    /// the close or the `write_eof` that waited for the drain.
    fn buffer_drained(slf: &Bound<'_, StreamTransport>, own_context: bool) -> PyResult<()> {
        let py = slf.py();
        let state = &slf.get().state;
        {
            let mut st = state.borrow_mut(py)?;
            st.base.write_waiting = false;
            st.base.sync_interest(py)?;
        }
        StreamTransport::maybe_resume_protocol(slf, own_context)?;
        // resume_writing() may have written more (sslproto sends its close_notify from
        // there): send that before deciding the buffer is drained.
        let (closing, eof, waiter, fd) = {
            let st = state.borrow_mut(py)?;
            if !st.buffer.is_empty() {
                drop(st);
                return StreamTransport::send_buffer(slf, own_context);
            }
            (
                st.base.closing,
                st.eof,
                st.empty_waiter.as_ref().map(|w| w.clone_ref(py)),
                st.base.fd,
            )
        };
        if let Some(waiter) = waiter {
            let waiter = waiter.bind(py);
            if !waiter.call_method0("done")?.is_truthy()? {
                waiter.call_method1("set_result", (py.None(),))?;
            }
        }
        if closing {
            in_context_if(state, py, own_context, || {
                StreamTransport::lose_connection(slf, None)
            })?;
        } else if eof {
            // The write_eof that waited for the drain. A peer already gone (ENOTCONN)
            // is not an error here: the read side reports the connection's end. Any
            // other error goes up to the loop. (asyncio's `_write_ready` lets every
            // error of this shutdown, ENOTCONN included, escape to the loop's
            // exception handler.)
            match sys::shutdown_write(fd) {
                Err(err) if err.raw_os_error() != Some(libc::ENOTCONN) => {
                    return Err(os_error(err))
                }
                _ => {}
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
            if st.base.conn_lost > 0 {
                return Ok(());
            }
            st.buffer.clear();
            st.base.buffer_size = 0;
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
            (st.base.loop_ref(py), st.base.protocol_ref(py))
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
    /// kept must be copied (`send_or_copy`).
    fn write_buffer(slf: &Bound<'_, StreamTransport>, data: &Bound<'_, PyAny>) -> PyResult<()> {
        let buf = PyUntypedBuffer::get(data)?;
        if !buf.is_c_contiguous() {
            let bytes = to_bytes(data)?;
            return StreamTransport::queue(slf, std::slice::from_ref(&bytes));
        }
        // SAFETY: a C-contiguous buffer of `len_bytes()` bytes, exported (so neither
        // resized nor freed) while `buf` lives; only read here.
        let view =
            unsafe { std::slice::from_raw_parts(buf.buf_ptr() as *const u8, buf.len_bytes()) };
        let rest = StreamTransport::send_or_copy(slf, view)?;
        drop(buf);
        match rest {
            Some(rest) => StreamTransport::queue(slf, std::slice::from_ref(&rest)),
            None => Ok(()),
        }
    }

    /// The sending half of a `write` of memory the caller may change or reuse once the
    /// call returns: with nothing buffered it is sent at once, as asyncio's transports
    /// send every write, and what the socket did not take (all of it when it could not
    /// be sent now) comes back copied, for `queue` (which also raises what asyncio
    /// raises for a write after write_eof or during sendfile). `None`: nothing is left,
    /// or the send failed and the connection is being lost.
    pub(crate) fn send_or_copy<'py>(
        slf: &Bound<'py, StreamTransport>,
        view: &[u8],
    ) -> PyResult<Option<Bound<'py, PyBytes>>> {
        let py = slf.py();
        let sent = {
            let mut st = slf.get().state.borrow_mut(py)?;
            let direct = !view.is_empty()
                && st.buffer.is_empty()
                && !st.base.write_waiting
                && !st.eof
                && st.empty_waiter.is_none()
                && st.base.conn_lost == 0
                && st.base.sock.is_some()
                && st.base.token.is_some();
            if direct {
                match sys::send(st.base.fd, view) {
                    Ok(n) => {
                        st.base.count_written(n);
                        n
                    }
                    Err(err) if would_block(&err) => 0,
                    Err(err) => {
                        drop(st);
                        StreamTransport::fatal_error(slf, os_error(err), WRITE_ERROR)?;
                        return Ok(None);
                    }
                }
            } else {
                0
            }
        };
        if sent == view.len() && sent > 0 {
            return Ok(None);
        }
        crate::pyhelpers::bytes_copy(py, &view[sent..]).map(Some)
    }

    /// Queues `chunks` for the end of the turn (a slice: `write` allocates nothing more).
    pub(crate) fn queue(
        slf: &Bound<'_, StreamTransport>,
        chunks: &[Bound<'_, PyBytes>],
    ) -> PyResult<()> {
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
            if st.base.conn_lost > 0 {
                if st.base.conn_lost >= CONNLOST_LOG_THRESHOLD {
                    asyncio_logger(py)?
                        .call_method1("warning", ("socket.send() raised exception.",))?;
                }
                st.base.conn_lost += 1;
                return Ok(());
            }
            for chunk in chunks {
                if !chunk.as_bytes().is_empty() {
                    st.buffer.push_back(chunk.clone().unbind());
                }
            }
            st.base.buffer_size += total;
            if st.base.buffer_size > st.base.high_water && !st.base.write_waiting {
                // Past the high-water mark: send now, as asyncio would have, so that the
                // protocol is paused only for what the socket cannot take.
                Pending::SendNow
            } else if !st.flush_queued && !st.base.write_waiting {
                st.flush_queued = true;
                match &st.base.loop_ {
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

/// What the sending half of a flush left to do.
enum Sent {
    /// The buffer is empty.
    Drained,
    /// Some was sent and some is left: the protocol may resume writing.
    Partly,
    /// Nothing left to do now: the socket was full (the rest waits for writability),
    /// or the connection is lost.
    Nothing,
    /// The send failed.
    Failed(io::Error),
}

/// What a `write` leaves to do once the data is queued.
enum Pending {
    SendNow,
    Queue(Py<LoopCore>),
    Nothing,
}

/// One `sendmsg` of the front of the buffer: up to `MAX_IOV` chunks, gathered in a
/// fixed array of which only the slots used are written (nothing is allocated, and
/// nothing is spent on the slots left over).
fn send_buffered(py: Python<'_>, st: &StreamState) -> io::Result<usize> {
    let mut slots = [MaybeUninit::<IoSlice<'_>>::uninit(); MAX_IOV];
    let mut count = 0;
    for (slot, chunk) in slots.iter_mut().zip(&st.buffer) {
        // The bytes objects are immutable and held by `st.buffer`, which the caller
        // keeps borrowed (holding the GIL) until the call returns.
        let bytes = chunk.as_bytes(py);
        slot.write(IoSlice::new(if count == 0 {
            &bytes[st.sent_of_first..]
        } else {
            bytes
        }));
        count += 1;
    }
    // SAFETY: the first `count` slots were written just above, and MaybeUninit<T> has
    // the layout of T.
    let slices = unsafe { std::slice::from_raw_parts(slots.as_ptr().cast::<IoSlice<'_>>(), count) };
    sys::sendmsg(st.base.fd, slices)
}

/// Drops `sent` bytes from the front of the buffer.
fn consume(st: &mut StreamState, sent: usize) {
    st.base.buffer_size -= sent;
    st.base.count_written(sent);
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
    /// `(bytes read, bytes written, age in seconds)`, for `loop.connections()`.
    #[getter]
    fn _ferroloop_counters(&self, py: Python<'_>) -> Option<(u64, u64, f64)> {
        self.counters(py)
    }

    /// Counts `n` bytes sent for the transport by `loop.sendfile` (`os.sendfile` on its
    /// socket while it is out of the registry).
    fn _count_written(&self, py: Python<'_>, n: usize) -> PyResult<()> {
        self.state.borrow_mut(py)?.base.count_written(n);
        Ok(())
    }

    #[new]
    /// `extra` is the `get_extra_info` dict; `None` for an accepted connection, which
    /// passes only `peername`. An accepted connection may also come as `sock=None` and
    /// its `fd`: the transport takes the fd over whatever happens (it closes it if this
    /// fails), so the caller must not use or close it again.
    #[pyo3(signature = (r#loop, sock, protocol, extra, server=None, peername=None, fd=-1, shape=None))]
    #[allow(clippy::too_many_arguments)]
    fn py_new(
        r#loop: &Bound<'_, PyAny>,
        sock: Option<&Bound<'_, PyAny>>,
        protocol: &Bound<'_, PyAny>,
        extra: Option<&Bound<'_, PyDict>>,
        server: Option<&Bound<'_, PyAny>>,
        peername: Option<&Bound<'_, PyAny>>,
        fd: RawFd,
        shape: Option<Shape>,
    ) -> PyResult<StreamTransport> {
        let (sock, fd) = match sock {
            Some(sock) => {
                let fd: RawFd = sock.call_method0("fileno")?.extract()?;
                if fd < 0 {
                    return Err(PyValueError::new_err("the socket is closed"));
                }
                (Sock::Object(sock.clone().unbind()), fd)
            }
            None if fd >= 0 => {
                // SAFETY: `fd` is an open socket handed over by the caller, which keeps
                // no other owner of it (ferroloop._serve passes an accepted one).
                let owned = unsafe { OwnedFd::from_raw_fd(fd) };
                // Refused without its shape, and then closed here: it was handed over.
                let shape = shape.ok_or_else(|| {
                    PyValueError::new_err("an accepted fd comes with its (family, type, proto)")
                })?;
                (Sock::Fd(owned, shape), fd)
            }
            None => return Err(PyValueError::new_err("a socket or its fd is required")),
        };
        let loop_ = r#loop.cast::<LoopCore>()?.clone().unbind();
        Ok(StreamTransport {
            state: GilCell::new(StreamState {
                base: Base::new(
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
        if let (Some(token), Some(loop_)) = (st.base.token.take(), &st.base.loop_) {
            loop_.get().deregister_transport(py, token)?;
        }
        st.base.interest = Interest::NONE;
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
        if st.base.closing || st.eof {
            return Ok(());
        }
        st.eof = true;
        if st.buffer.is_empty() && st.base.sock.is_some() {
            // Every error, ENOTCONN included, is the caller's, as from asyncio's
            // `write_eof` (`sock.shutdown(SHUT_WR)`).
            sys::shutdown_write(st.base.fd).map_err(os_error)?;
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
        Ok(self.state.borrow_mut(py)?.base.closing)
    }

    fn is_reading(&self, py: Python<'_>) -> PyResult<bool> {
        Ok(self.state.borrow_mut(py)?.base.is_reading())
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
        Ok((st.base.low_water, st.base.high_water))
    }

    fn get_write_buffer_size(&self, py: Python<'_>) -> PyResult<usize> {
        Ok(self.state.borrow_mut(py)?.base.buffer_size)
    }

    fn set_protocol(&self, py: Python<'_>, protocol: &Bound<'_, PyAny>) -> PyResult<()> {
        let path = ReadPath::of(protocol)?;
        let old = {
            let mut st = self.state.borrow_mut(py)?;
            st.read_path = Some(path);
            st.protocol_connected = true;
            st.base.protocol.replace(protocol.clone().unbind())
        };
        drop(old);
        Ok(())
    }

    fn get_protocol(&self, py: Python<'_>) -> PyResult<Option<Py<PyAny>>> {
        Ok(self
            .state
            .borrow_mut(py)?
            .base
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
            if st.base.sock.is_none() {
                return Ok(());
            }
            (st.base.protocol_ref(py), st.protocol_connected)
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
            st.base.buffer_size = 0;
            (
                st.base.sock.take(),
                st.base.loop_.take(),
                st.base.token.take(),
                st.server.take(),
                st.empty_waiter.take(),
                (
                    st.base.protocol.take(),
                    st.read_path.take(),
                    st.base.context.take(),
                ),
            )
        };
        drop(released);
        let extra = slf.get().state.borrow_mut(py)?.base.extra_dict(py)?;
        let closed_shape = release_socket(py, loop_.as_ref(), token, sock, &extra)?;
        slf.get().state.borrow_mut(py)?.base.closed_shape = closed_shape;
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
            (st.base.loop_ref(py), st.buffer.is_empty())
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
        Ok(self.state.borrow_mut(py)?.base.fd)
    }

    #[getter]
    fn _loop(&self, py: Python<'_>) -> PyResult<Option<Py<LoopCore>>> {
        self.loop_of(py)
    }

    #[getter]
    fn _protocol_paused(&self, py: Python<'_>) -> PyResult<bool> {
        Ok(self.state.borrow_mut(py)?.base.protocol_paused)
    }

    fn __repr__<'py>(slf: &Bound<'py, StreamTransport>) -> PyResult<Bound<'py, PyString>> {
        let py = slf.py();
        let st = slf.get().state.borrow_mut(py)?;
        let name = slf.get_type().name()?.to_string();
        let mut info = vec![name];
        if st.base.sock.is_none() {
            info.push("closed".into());
        } else if st.base.closing {
            info.push("closing".into());
        }
        info.push(format!("fd={}", st.base.fd));
        if st.base.sock.is_some() {
            let reading = if st.base.interest.contains(READABLE) {
                "polling"
            } else {
                "idle"
            };
            let writing = if st.base.interest.contains(WRITABLE) {
                "polling"
            } else {
                "idle"
            };
            info.push(format!("read={reading}"));
            info.push(format!(
                "write=<{writing}, bufsize={}>",
                st.base.buffer_size
            ));
        }
        Ok(PyString::new(py, &format!("<{}>", info.join(" "))))
    }

    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        let Some(st) = self.state.borrow_for_gc() else {
            return Ok(());
        };
        st.base.visit(&visit)?;
        for obj in [&st.server, &st.empty_waiter].into_iter().flatten() {
            visit.call(obj)?;
        }
        Ok(())
    }

    fn __clear__(&self) {
        let released = self.state.borrow_mut_for_gc().map(|mut st| {
            (
                st.base.protocol.take(),
                st.read_path.take(),
                st.base.context.take(),
                st.server.take(),
                st.empty_waiter.take(),
                st.base.loop_.take(),
            )
        });
        drop(released);
    }
}
