//! The datagram transport of UDP and Unix datagram sockets, with asyncio's surface.
//!
//! Receiving: one `recvfrom` per readiness event; IPv4 and IPv6 datagrams are read in
//! Rust (address tuples built as the socket module builds them), other families through
//! the socket's own `recvfrom`. Sending: `sendto` goes out at once when it can (through
//! the socket object, which parses every address form Python accepts) and is buffered
//! on `EAGAIN`, with write interest registered until the buffer drains.
//!
//! Ownership as for streams: the socket object owns the fd; the transport deregisters
//! the fd before closing the socket, once.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::os::fd::RawFd;

use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyString};
use pyo3::{PyTraverseError, PyVisit};

use crate::errors::{os_error, would_block};
use crate::event_loop::{LoopCore, NativeTransport};
use crate::gil_cell::GilCell;
use crate::poller::Readiness;
use crate::sockaddr::inet_address;
use crate::sys;
use crate::transports::{
    asyncio_logger, close, flow_control, get_extra_info, in_read_context, is_fatal_to_loop,
    lose_connection, register, release_socket, report, report_fatal, set_limits, set_reading,
    socket_object, start_reading, to_bytes, Base, Extra, HasBase, Sock, CONNLOST_LOG_THRESHOLD,
};

/// asyncio's `max_size` for one datagram read.
const MAX_DATAGRAM: usize = 256 * 1024;

thread_local! {
    static DATAGRAM_BUF: RefCell<Vec<u8>> = RefCell::new(vec![0; MAX_DATAGRAM]);
}

/// A datagram transport's state: what every transport keeps (`base`) and what a
/// datagram endpoint adds, its address and its queue of datagrams.
struct DatagramState {
    base: Base,
    family: i32,
    /// The remote address of a connected endpoint.
    address: Option<Py<PyAny>>,
    connected: bool,
    buffer: VecDeque<(Py<PyBytes>, Py<PyAny>)>,
    /// Python 3.13+, whose asyncio sends `sendto(b"")` as an empty datagram (before, it
    /// does nothing) and counts 8 header bytes per queued datagram in the write buffer
    /// size, so that empty ones count.
    since_313: bool,
}

impl DatagramState {
    /// What a queued datagram of `len` bytes adds to the write buffer size.
    fn queued_size(&self, len: usize) -> usize {
        if self.since_313 {
            len + 8
        } else {
            len
        }
    }
}

impl HasBase for DatagramState {
    #[inline]
    fn base_mut(&mut self) -> &mut Base {
        &mut self.base
    }
}

/// A UDP or Unix datagram endpoint. `ferroloop._transports.DatagramTransport`
/// subclasses it to present itself as an `asyncio.DatagramTransport`.
#[pyclass(module = "ferroloop._ferroloop", subclass, frozen, weakref)]
pub struct DatagramTransport {
    state: GilCell<DatagramState>,
}

/// What one `recvfrom` came to.
enum Received<'py> {
    Datagram(Bound<'py, PyAny>, Bound<'py, PyAny>),
    WouldBlock,
    Failed(PyErr),
}

impl DatagramTransport {
    pub(crate) fn counters(&self, py: Python<'_>) -> Option<(u64, u64, f64)> {
        super::counters(&self.state, py)
    }

    pub(crate) fn on_ready(slf: &Bound<'_, DatagramTransport>, events: Readiness) -> PyResult<()> {
        let (readable, writable) = (events.readable(), events.writable());
        if readable {
            DatagramTransport::read_ready(slf)?;
        }
        if writable && slf.get().state.borrow_mut(slf.py())?.base.write_waiting {
            DatagramTransport::sendto_ready(slf)?;
        }
        Ok(())
    }

    /// One `recvfrom`: in Rust for IPv4 and IPv6, through the socket object's own
    /// method for other families (whose addresses the socket module formats).
    fn receive<'py>(
        py: Python<'py>,
        fd: RawFd,
        family: i32,
        sock: &Bound<'py, PyAny>,
    ) -> Received<'py> {
        if family != libc::AF_INET && family != libc::AF_INET6 {
            return match sock.call_method1(pyo3::intern!(py, "recvfrom"), (MAX_DATAGRAM,)) {
                Ok(pair) => match (pair.get_item(0), pair.get_item(1)) {
                    (Ok(data), Ok(addr)) => Received::Datagram(data, addr),
                    (Err(e), _) | (_, Err(e)) => Received::Failed(e),
                },
                Err(err) if is_retry(py, &err) => Received::WouldBlock,
                Err(err) => Received::Failed(err),
            };
        }
        DATAGRAM_BUF.with(|buf| {
            let mut buf = buf.borrow_mut();
            // SAFETY: zero is a valid sockaddr_storage.
            let mut addr: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
            let n = match sys::recvfrom(fd, &mut buf, &mut addr) {
                Ok(n) => n,
                Err(err) if would_block(&err) => return Received::WouldBlock,
                Err(err) => return Received::Failed(os_error(err)),
            };
            let data = PyBytes::new(py, &buf[..n]).into_any();
            match inet_address(py, &addr) {
                Ok(Some(a)) => Received::Datagram(data, a.into_any()),
                Ok(None) => Received::Datagram(data, py.None().into_bound(py)),
                Err(e) => Received::Failed(e),
            }
        })
    }

    fn read_ready(slf: &Bound<'_, DatagramTransport>) -> PyResult<()> {
        let py = slf.py();
        let (fd, family, sock, protocol, mut context) = {
            let st = slf.get().state.borrow_mut(py)?;
            if st.base.conn_lost > 0 || st.base.closing || st.base.paused {
                return Ok(());
            }
            let (Some(sock), Some(protocol)) = (st.base.socket_if_made(py), &st.base.protocol)
            else {
                return Ok(());
            };
            (
                st.base.fd,
                st.family,
                sock,
                protocol.clone_ref(py),
                st.base.context.as_ref().map(|c| c.clone_ref(py)),
            )
        };
        let protocol = protocol.bind(py);
        match DatagramTransport::receive(py, fd, family, sock.bind(py)) {
            Received::WouldBlock => Ok(()),
            Received::Datagram(data, addr) => {
                slf.get().state.borrow_mut(py)?.base.count_read(data.len()?);
                let called = in_read_context(&slf.get().state, py, &mut context, || {
                    protocol
                        .call_method1(pyo3::intern!(py, "datagram_received"), (data, addr))
                        .map(|_| ())
                });
                DatagramTransport::callback_outcome(slf, called)
            }
            Received::Failed(err) if err.is_instance_of::<PyOSError>(py) => {
                let called = in_read_context(&slf.get().state, py, &mut context, || {
                    protocol
                        .call_method1(pyo3::intern!(py, "error_received"), (err.value(py),))
                        .map(|_| ())
                });
                DatagramTransport::callback_outcome(slf, called)
            }
            Received::Failed(err) => {
                DatagramTransport::fatal_error(slf, err, "Fatal read error on datagram transport")
            }
        }
    }

    /// Protocol callbacks are not guarded by asyncio's datagram transport: their errors
    /// go to the loop's exception handler like any callback's. `SystemExit` and
    /// `KeyboardInterrupt` leave the loop.
    fn callback_outcome(slf: &Bound<'_, DatagramTransport>, outcome: PyResult<()>) -> PyResult<()> {
        let py = slf.py();
        match outcome {
            Ok(()) => Ok(()),
            Err(err) if is_fatal_to_loop(py, &err) => Err(err),
            Err(err) => {
                let (loop_, protocol) = {
                    let st = slf.get().state.borrow_mut(py)?;
                    (st.base.loop_ref(py), st.base.protocol_ref(py))
                };
                match loop_ {
                    Some(loop_) => report(
                        &loop_,
                        "Exception in datagram protocol callback",
                        err.value(py),
                        slf.as_any(),
                        protocol.as_ref(),
                    ),
                    None => Ok(()),
                }
            }
        }
    }

    /// One send of a buffered or fresh datagram: through `send` when connected, else
    /// `sendto` (the socket parses the address). What was sent is counted.
    fn send_one(
        slf: &Bound<'_, DatagramTransport>,
        sock: &Bound<'_, PyAny>,
        connected: bool,
        data: &Bound<'_, PyBytes>,
        addr: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let py = sock.py();
        if connected {
            sock.call_method1(pyo3::intern!(py, "send"), (data,))?;
        } else {
            sock.call_method1(pyo3::intern!(py, "sendto"), (data, addr))?;
        }
        // A datagram is sent whole or not at all.
        slf.get()
            .state
            .borrow_mut(py)?
            .base
            .count_written(data.as_bytes().len());
        Ok(())
    }

    fn sendto_ready(slf: &Bound<'_, DatagramTransport>) -> PyResult<()> {
        let py = slf.py();
        loop {
            let (sock, connected, front) = {
                let mut st = slf.get().state.borrow_mut(py)?;
                let Some(sock) = st.base.socket_if_made(py) else {
                    return Ok(());
                };
                let connected = st.connected;
                match st.buffer.pop_front() {
                    Some(front) => {
                        st.base.buffer_size -= st.queued_size(front.0.as_bytes(py).len());
                        (sock, connected, front)
                    }
                    None => break,
                }
            };
            let (data, addr) = (front.0.bind(py).clone(), front.1.bind(py).clone());
            match DatagramTransport::send_one(slf, sock.bind(py), connected, &data, &addr) {
                Ok(()) => {}
                Err(err) if is_retry(py, &err) => {
                    let mut st = slf.get().state.borrow_mut(py)?;
                    st.base.buffer_size += st.queued_size(data.as_bytes().len());
                    st.buffer.push_front((data.unbind(), addr.unbind()));
                    return Ok(());
                }
                Err(err) => return DatagramTransport::send_failed(slf, err),
            }
        }
        flow_control(&slf.get().state, slf.as_any(), false, false)?;
        let closing = {
            let mut st = slf.get().state.borrow_mut(py)?;
            if !st.buffer.is_empty() {
                return Ok(());
            }
            st.base.write_waiting = false;
            st.base.sync_interest(py)?;
            st.base.closing
        };
        if closing {
            DatagramTransport::lose_connection(slf, None)?;
        }
        Ok(())
    }

    fn error_received(slf: &Bound<'_, DatagramTransport>, err: PyErr) -> PyResult<()> {
        let py = slf.py();
        let protocol = slf
            .get()
            .state
            .borrow_mut(py)?
            .base
            .protocol
            .as_ref()
            .map(|p| p.clone_ref(py));
        if let Some(protocol) = protocol {
            let called = protocol
                .bind(py)
                .call_method1(pyo3::intern!(py, "error_received"), (err.value(py),))
                .map(|_| ());
            return DatagramTransport::callback_outcome(slf, called);
        }
        Ok(())
    }

    fn lose_connection(slf: &Bound<'_, DatagramTransport>, exc: Option<Py<PyAny>>) -> PyResult<()> {
        lose_connection(&slf.get().state, slf.as_any(), exc)
    }

    fn force_close(slf: &Bound<'_, DatagramTransport>, exc: Option<Py<PyAny>>) -> PyResult<()> {
        {
            let mut st = slf.get().state.borrow_mut(slf.py())?;
            if st.base.conn_lost > 0 {
                return Ok(());
            }
            st.buffer.clear();
            st.base.buffer_size = 0;
        }
        DatagramTransport::lose_connection(slf, exc)
    }

    fn fatal_error(slf: &Bound<'_, DatagramTransport>, err: PyErr, message: &str) -> PyResult<()> {
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
        DatagramTransport::force_close(slf, Some(exc))
    }

    /// A send that failed for another reason than a full socket: OS errors go to
    /// `error_received` (the endpoint stays open), anything else ends it.
    fn send_failed(slf: &Bound<'_, DatagramTransport>, err: PyErr) -> PyResult<()> {
        let py = slf.py();
        if err.is_instance_of::<PyOSError>(py) {
            DatagramTransport::error_received(slf, err)
        } else if is_fatal_to_loop(py, &err) {
            Err(err)
        } else {
            DatagramTransport::fatal_error(slf, err, "Fatal write error on datagram transport")
        }
    }
}

/// A `BlockingIOError`/`InterruptedError` from a socket method: try again later.
fn is_retry(py: Python<'_>, err: &PyErr) -> bool {
    err.is_instance_of::<pyo3::exceptions::PyBlockingIOError>(py)
        || err.is_instance_of::<pyo3::exceptions::PyInterruptedError>(py)
}

#[pymethods]
impl DatagramTransport {
    /// `(bytes read, bytes written, age in seconds)`, for `loop.connections()`.
    #[getter]
    fn _ferroloop_counters(&self, py: Python<'_>) -> Option<(u64, u64, f64)> {
        self.counters(py)
    }

    #[new]
    #[pyo3(signature = (r#loop, sock, protocol, extra, address=None))]
    fn py_new(
        r#loop: &Bound<'_, PyAny>,
        sock: &Bound<'_, PyAny>,
        protocol: &Bound<'_, PyAny>,
        extra: &Bound<'_, PyDict>,
        address: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<DatagramTransport> {
        let loop_ = r#loop.cast::<LoopCore>()?.clone().unbind();
        let fd: RawFd = sock.call_method0("fileno")?.extract()?;
        if fd < 0 {
            return Err(PyValueError::new_err("the socket is closed"));
        }
        let family: i32 = sock.getattr("family")?.extract()?;
        let connected = match extra.get_item("peername")? {
            Some(peer) => peer.is_truthy()?,
            None => false,
        };
        let since_313 = r#loop.py().version_info() >= (3, 13);
        Ok(DatagramTransport {
            state: GilCell::new(DatagramState {
                base: Base::new(
                    loop_,
                    Sock::Object(sock.clone().unbind()),
                    fd,
                    protocol.clone().unbind(),
                    Extra::Dict(extra.clone().unbind()),
                ),
                family,
                address: address.filter(|a| !a.is_none()).map(|a| a.clone().unbind()),
                connected,
                buffer: VecDeque::new(),
                since_313,
            }),
        })
    }

    fn _register(slf: &Bound<'_, DatagramTransport>) -> PyResult<()> {
        register(&slf.get().state, slf.py(), || {
            NativeTransport::Datagram(slf.clone().unbind())
        })
    }

    /// Starts reading; the read callbacks run in `context` (the context the loop runs
    /// this call in, passed by the caller so that no second copy is made), or in a copy
    /// of the current one.
    #[pyo3(signature = (context=None))]
    fn _start_reading(&self, py: Python<'_>, context: Option<Py<PyAny>>) -> PyResult<()> {
        start_reading(&self.state, py, context)
    }

    #[pyo3(signature = (data, addr=None))]
    fn sendto(
        slf: &Bound<'_, DatagramTransport>,
        data: &Bound<'_, PyAny>,
        addr: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        let py = slf.py();
        let data = to_bytes(data)?;
        if data.as_bytes().is_empty() && !slf.get().state.borrow_mut(py)?.since_313 {
            return Ok(());
        }
        let mut addr = addr.filter(|a| !a.is_none()).cloned();
        let (sock, connected, send_now) = {
            let mut st = slf.get().state.borrow_mut(py)?;
            if let Some(own) = &st.address {
                let own = own.bind(py);
                if let Some(given) = &addr {
                    if !given.eq(own)? {
                        return Err(PyValueError::new_err(format!(
                            "Invalid address: must be None or {}",
                            own.str()?
                        )));
                    }
                }
                addr = Some(own.clone());
                if st.base.conn_lost > 0 {
                    if st.base.conn_lost >= CONNLOST_LOG_THRESHOLD {
                        asyncio_logger(py)?
                            .call_method1("warning", ("socket.send() raised exception.",))?;
                    }
                    st.base.conn_lost += 1;
                    return Ok(());
                }
            }
            let Some(sock) = st.base.socket_if_made(py) else {
                return Ok(());
            };
            (sock, st.connected, st.buffer.is_empty())
        };
        let addr = addr.unwrap_or_else(|| py.None().into_bound(py));
        if send_now {
            match DatagramTransport::send_one(slf, sock.bind(py), connected, &data, &addr) {
                Ok(()) => return Ok(()),
                Err(err) if is_retry(py, &err) => {
                    let mut st = slf.get().state.borrow_mut(py)?;
                    st.base.write_waiting = true;
                    st.base.sync_interest(py)?;
                }
                Err(err) => return DatagramTransport::send_failed(slf, err),
            }
        }
        {
            let mut st = slf.get().state.borrow_mut(py)?;
            st.base.buffer_size += st.queued_size(data.as_bytes().len());
            st.buffer.push_back((data.unbind(), addr.unbind()));
        }
        flow_control(&slf.get().state, slf.as_any(), true, false)
    }

    fn close(slf: &Bound<'_, DatagramTransport>) -> PyResult<()> {
        close(&slf.get().state, slf.as_any())
    }

    fn abort(slf: &Bound<'_, DatagramTransport>) -> PyResult<()> {
        DatagramTransport::force_close(slf, None)
    }

    fn _force_close(slf: &Bound<'_, DatagramTransport>, exc: &Bound<'_, PyAny>) -> PyResult<()> {
        let exc = (!exc.is_none()).then(|| exc.clone().unbind());
        DatagramTransport::force_close(slf, exc)
    }

    fn is_closing(&self, py: Python<'_>) -> PyResult<bool> {
        Ok(self.state.borrow_mut(py)?.base.closing)
    }

    fn is_reading(&self, py: Python<'_>) -> PyResult<bool> {
        Ok(self.state.borrow_mut(py)?.base.is_reading())
    }

    fn pause_reading(slf: &Bound<'_, DatagramTransport>) -> PyResult<()> {
        set_reading(&slf.get().state, slf.as_any(), true)
    }

    fn resume_reading(slf: &Bound<'_, DatagramTransport>) -> PyResult<()> {
        set_reading(&slf.get().state, slf.as_any(), false)
    }

    #[pyo3(signature = (high=None, low=None))]
    fn set_write_buffer_limits(
        slf: &Bound<'_, DatagramTransport>,
        high: Option<&Bound<'_, PyAny>>,
        low: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        set_limits(&slf.get().state, slf.py(), high, low)?;
        flow_control(&slf.get().state, slf.as_any(), true, false)
    }

    fn get_write_buffer_limits(&self, py: Python<'_>) -> PyResult<(usize, usize)> {
        let st = self.state.borrow_mut(py)?;
        Ok((st.base.low_water, st.base.high_water))
    }

    fn get_write_buffer_size(&self, py: Python<'_>) -> PyResult<usize> {
        Ok(self.state.borrow_mut(py)?.base.buffer_size)
    }

    fn set_protocol(&self, py: Python<'_>, protocol: &Bound<'_, PyAny>) -> PyResult<()> {
        let old = self
            .state
            .borrow_mut(py)?
            .base
            .protocol
            .replace(protocol.clone().unbind());
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

    fn _call_connection_lost(
        slf: &Bound<'_, DatagramTransport>,
        exc: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let py = slf.py();
        let protocol = {
            let st = slf.get().state.borrow_mut(py)?;
            if st.base.sock.is_none() {
                return Ok(());
            }
            st.base.protocol_ref(py)
        };
        let outcome = match protocol {
            Some(protocol) => protocol
                .bind(py)
                .call_method1("connection_lost", (exc,))
                .map(|_| ()),
            None => Ok(()),
        };
        let (sock, loop_, token, released) = {
            let mut st = slf.get().state.borrow_mut(py)?;
            st.buffer.clear();
            st.base.buffer_size = 0;
            (
                st.base.sock.take(),
                st.base.loop_.take(),
                st.base.token.take(),
                (st.base.protocol.take(), st.base.context.take()),
            )
        };
        drop(released);
        let extra = slf.get().state.borrow_mut(py)?.base.extra_dict(py)?;
        release_socket(py, loop_.as_ref(), token, sock, &extra)?;
        outcome
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
    fn _address(&self, py: Python<'_>) -> PyResult<Option<Py<PyAny>>> {
        Ok(self
            .state
            .borrow_mut(py)?
            .address
            .as_ref()
            .map(|a| a.clone_ref(py)))
    }

    fn __repr__<'py>(slf: &Bound<'py, DatagramTransport>) -> PyResult<Bound<'py, PyString>> {
        let py = slf.py();
        let st = slf.get().state.borrow_mut(py)?;
        let name = slf.get_type().name()?.to_string();
        let state = if st.base.sock.is_none() {
            " closed"
        } else if st.base.closing {
            " closing"
        } else {
            ""
        };
        Ok(PyString::new(
            py,
            &format!(
                "<{name}{state} fd={} bufsize={}>",
                st.base.fd, st.base.buffer_size
            ),
        ))
    }

    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        let Some(st) = self.state.borrow_for_gc() else {
            return Ok(());
        };
        st.base.visit(&visit)?;
        if let Some(address) = &st.address {
            visit.call(address)?;
        }
        for (_, addr) in &st.buffer {
            visit.call(addr)?;
        }
        Ok(())
    }

    fn __clear__(&self) {
        let released = self.state.borrow_mut_for_gc().map(|mut st| {
            (
                st.base.protocol.take(),
                st.base.context.take(),
                st.base.loop_.take(),
                std::mem::take(&mut st.buffer),
            )
        });
        drop(released);
    }
}
