//! Transports: the objects that own a connected fd and move bytes between it and a
//! protocol without going through Python glue. What the kinds share lives here.

pub mod datagram;
pub(crate) mod read;
pub mod stream;

use pyo3::exceptions::{PyKeyboardInterrupt, PyOSError, PySystemExit, PyTypeError, PyValueError};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyByteArray, PyBytes, PyDict, PyMemoryView, PyString, PyTuple};

use std::cell::RefMut;
use std::mem;
use std::net::{IpAddr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, IntoRawFd, OwnedFd, RawFd};
use std::sync::Arc;

use crate::event_loop::{LoopCore, NativeTransport};
use crate::gil_cell::GilCell;
use crate::handles::{copy_context, in_context_or_lent, is_empty_context};
use crate::poller::{Interest, Token, READABLE, WRITABLE};
use crate::sockaddr::ipv4_text;
use crate::stats::ByteTotals;

/// asyncio's `constants.LOG_THRESHOLD_FOR_CONNLOST_WRITES`.
pub(crate) const CONNLOST_LOG_THRESHOLD: u32 = 5;
const DEFAULT_HIGH_WATER: usize = 64 * 1024;

static LOGGER: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

/// `asyncio.log.logger`, which transports log to as asyncio's do.
pub(crate) fn asyncio_logger(py: Python<'_>) -> PyResult<&Bound<'_, PyAny>> {
    LOGGER
        .get_or_try_init(py, || {
            Ok::<_, PyErr>(py.import("asyncio.log")?.getattr("logger")?.unbind())
        })
        .map(|l| l.bind(py))
}

/// Exceptions that leave the loop instead of ending one connection, as in asyncio.
pub(crate) fn is_fatal_to_loop(py: Python<'_>, err: &PyErr) -> bool {
    err.is_instance_of::<PySystemExit>(py) || err.is_instance_of::<PyKeyboardInterrupt>(py)
}

/// `set_write_buffer_limits(high, low)` as asyncio computes and checks them.
fn write_limits(
    high: Option<&Bound<'_, PyAny>>,
    low: Option<&Bound<'_, PyAny>>,
) -> PyResult<(usize, usize)> {
    let high = high.filter(|h| !h.is_none());
    let low = low.filter(|l| !l.is_none());
    let high_v: i64 = match high {
        Some(h) => h.extract()?,
        None => match low {
            Some(l) => 4 * l.extract::<i64>()?,
            None => DEFAULT_HIGH_WATER as i64,
        },
    };
    let low_v: i64 = match low {
        Some(l) => l.extract()?,
        None => high_v / 4,
    };
    if !(high_v >= low_v && low_v >= 0) {
        return Err(PyValueError::new_err(format!(
            "high ({high_v}) must be >= low ({low_v}) must be >= 0"
        )));
    }
    Ok((high_v as usize, low_v as usize))
}

/// The bytes a `write`/`sendto` keeps: `bytes` as they are, a mutable buffer copied (the caller
/// may change it before it is sent), anything else a `TypeError` as asyncio raises it.
pub(crate) fn to_bytes<'py>(data: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyBytes>> {
    if let Ok(b) = data.cast::<PyBytes>() {
        return Ok(b.clone());
    }
    if data.is_instance_of::<PyByteArray>() || data.is_instance_of::<PyMemoryView>() {
        // SAFETY: `data` is a live object; PyBytes_FromObject returns a new reference to
        // a bytes copy of its buffer, or NULL with an error set.
        let copy = unsafe {
            Bound::from_owned_ptr_or_err(data.py(), ffi::PyBytes_FromObject(data.as_ptr()))
        }?;
        return Ok(copy.cast_into::<PyBytes>()?);
    }
    Err(PyTypeError::new_err(format!(
        "data argument must be a bytes-like object, not {:?}",
        data.get_type().name()?.to_string()
    )))
}

/// `loop.call_exception_handler({...})` with the keys asyncio's transports give.
pub(crate) fn report(
    loop_: &Py<LoopCore>,
    message: &str,
    exc: &Bound<'_, PyAny>,
    transport: &Bound<'_, PyAny>,
    protocol: Option<&Py<PyAny>>,
) -> PyResult<()> {
    let py = transport.py();
    let context = PyDict::new(py);
    context.set_item("message", message)?;
    context.set_item("exception", exc)?;
    context.set_item("transport", transport)?;
    context.set_item("protocol", protocol)?;
    loop_
        .bind(py)
        .call_method1("call_exception_handler", (context,))?;
    Ok(())
}

/// The report half of asyncio's `_fatal_error`: OS errors are only logged, at debug
/// level in debug mode; anything else goes to the exception handler.
pub(crate) fn report_fatal(
    loop_: Option<&Py<LoopCore>>,
    err: &PyErr,
    message: &str,
    transport: &Bound<'_, PyAny>,
    protocol: Option<&Py<PyAny>>,
) -> PyResult<()> {
    let py = transport.py();
    let Some(loop_) = loop_ else {
        return Ok(());
    };
    if !err.is_instance_of::<PyOSError>(py) {
        return report(loop_, message, err.value(py), transport, protocol);
    }
    if loop_.get().debug() {
        let kwargs = PyDict::new(py);
        kwargs.set_item("exc_info", true)?;
        asyncio_logger(py)?.call_method("debug", ("%r: %s", transport, message), Some(&kwargs))?;
    }
    Ok(())
}

/// A protocol method (`pause_writing`, ...) failed: the exception handler hears of it,
/// unless it must leave the loop.
pub(crate) fn protocol_failed(
    loop_: Option<&Py<LoopCore>>,
    err: PyErr,
    message: &str,
    transport: &Bound<'_, PyAny>,
    protocol: &Py<PyAny>,
) -> PyResult<()> {
    if is_fatal_to_loop(transport.py(), &err) {
        return Err(err);
    }
    match loop_ {
        Some(loop_) => report(
            loop_,
            message,
            err.value(transport.py()),
            transport,
            Some(protocol),
        ),
        None => Ok(()),
    }
}

/// `loop.call_soon(transport._call_connection_lost, exc)`.
pub(crate) fn schedule_connection_lost(
    loop_: &Py<LoopCore>,
    transport: &Bound<'_, PyAny>,
    exc: Option<Py<PyAny>>,
) -> PyResult<()> {
    let py = transport.py();
    let callback = transport.getattr(pyo3::intern!(py, "_call_connection_lost"))?;
    loop_.bind(py).call_method1(
        pyo3::intern!(py, "call_soon"),
        (callback, exc.unwrap_or_else(|| py.None())),
    )?;
    Ok(())
}

/// The end of `_call_connection_lost`: the fd leaves the loop first (its number may be
/// reused as soon as it is closed), then the socket is closed, once. An accepted
/// connection whose socket object was never asked for is closed without making one:
/// its `sockname` is read before the close, and its `Shape` returned, from which
/// `get_extra_info("socket")` makes a closed socket object if asked.
pub(crate) fn release_socket(
    py: Python<'_>,
    loop_: Option<&Py<LoopCore>>,
    token: Option<Token>,
    sock: Option<Sock>,
    extra: &Py<PyDict>,
) -> PyResult<Option<Shape>> {
    if let (Some(loop_), Some(token)) = (loop_, token) {
        loop_.get().deregister_transport(py, token)?;
    }
    match sock {
        Some(Sock::Fd(fd, shape)) if NATIVE_FAMILIES.contains(&shape.0) => {
            let extra = extra.bind(py);
            let sockname = pyo3::intern!(py, "sockname");
            if !extra.contains(sockname)? {
                extra.set_item(sockname, local_address(py, fd.as_raw_fd())?)?;
            }
            drop(fd);
            Ok(Some(shape))
        }
        Some(mut sock) => {
            // What asyncio reads at creation must still be there after the close.
            // (Should making the object fail, dropping `sock` closes the fd.)
            let sock = sock.object(py)?;
            fill_socket_extra(py, sock.bind(py), extra)?;
            sock.bind(py).call_method0("close")?;
            Ok(None)
        }
        None => Ok(None),
    }
}

/// The families whose addresses `sockaddr::socket_address` makes as the socket module
/// does.
const NATIVE_FAMILIES: [i32; 3] = [libc::AF_INET, libc::AF_INET6, libc::AF_UNIX];

/// `getsockname()` of an open socket as the socket module gives it, or `None` where
/// it fails (as `fill_socket_extra` has it).
fn local_address(py: Python<'_>, fd: RawFd) -> PyResult<Py<PyAny>> {
    // SAFETY: all-zero bytes are a valid sockaddr_storage.
    let mut addr: libc::sockaddr_storage = unsafe { mem::zeroed() };
    Ok(match crate::sys::getsockname(fd, &mut addr) {
        Ok(len) => crate::sockaddr::socket_address(py, &addr, len)?
            .map_or_else(|| py.None(), Bound::unbind),
        Err(_) => py.None(),
    })
}

/// A closed socket object of `shape`: what `get_extra_info("socket")` gives (in a
/// `TransportSocket`) once an accepted connection closed without one was made.
fn closed_socket(py: Python<'_>, shape: Shape) -> PyResult<Bound<'_, PyAny>> {
    let sock = new_socket(py, shape, None)?;
    sock.call_method0(pyo3::intern!(py, "close"))?;
    Ok(sock)
}

static FILL_SOCKET_EXTRA: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

/// Adds the lazily made `socket` and `sockname` entries to `extra`, if missing.
pub(crate) fn fill_socket_extra(
    py: Python<'_>,
    sock: &Bound<'_, PyAny>,
    extra: &Py<PyDict>,
) -> PyResult<()> {
    let fill = FILL_SOCKET_EXTRA.get_or_try_init(py, || {
        Ok::<_, PyErr>(
            py.import("ferroloop._transports")?
                .getattr("fill_socket_extra")?
                .unbind(),
        )
    })?;
    fill.bind(py).call1((sock, extra))?;
    Ok(())
}

/// A transport's `get_extra_info` entries.
pub(crate) enum Extra {
    /// An accepted connection's peer address, all it has until anything else is asked
    /// for: an idle connection keeps no dict.
    Peer(Peer),
    Dict(Py<PyDict>),
}

/// A peer address: an IP address and port kept as plain data (rebuilt as the socket
/// module's tuple when asked for), or the address object as the socket module gave it.
pub(crate) enum Peer {
    Inet(SocketAddr),
    Object(Py<PyAny>),
}

impl Peer {
    /// Keeps `(host, port)` or `(host, port, flowinfo, scope_id)` as plain data when
    /// rebuilding it gives back the very same text; anything else as it is.
    pub fn of(addr: &Bound<'_, PyAny>) -> Peer {
        Peer::parse(addr).unwrap_or_else(|| Peer::Object(addr.clone().unbind()))
    }

    fn parse(addr: &Bound<'_, PyAny>) -> Option<Peer> {
        let tuple = addr.cast::<PyTuple>().ok()?;
        let host_obj = tuple.get_item(0).ok()?;
        let host = host_obj.cast::<PyString>().ok()?.to_str().ok()?;
        let port: u16 = tuple.get_item(1).ok()?.extract().ok()?;
        let parsed = match tuple.len() {
            2 => SocketAddr::V4(SocketAddrV4::new(host.parse().ok()?, port)),
            4 => SocketAddr::V6(SocketAddrV6::new(
                host.parse().ok()?,
                port,
                tuple.get_item(2).ok()?.extract().ok()?,
                tuple.get_item(3).ok()?.extract().ok()?,
            )),
            _ => return None,
        };
        let text = match parsed.ip() {
            IpAddr::V4(ip) => ipv4_text(ip),
            IpAddr::V6(ip) => ip.to_string(),
        };
        (text == host).then_some(Peer::Inet(parsed))
    }

    fn to_object(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        Ok(match self {
            Peer::Object(obj) => obj.clone_ref(py),
            Peer::Inet(SocketAddr::V4(a)) => (ipv4_text(*a.ip()), a.port())
                .into_pyobject(py)?
                .into_any()
                .unbind(),
            Peer::Inet(SocketAddr::V6(a)) => {
                (a.ip().to_string(), a.port(), a.flowinfo(), a.scope_id())
                    .into_pyobject(py)?
                    .into_any()
                    .unbind()
            }
        })
    }
}

impl Extra {
    fn visit(&self, visit: &pyo3::PyVisit<'_>) -> Result<(), pyo3::PyTraverseError> {
        match self {
            Extra::Peer(Peer::Object(peer)) => visit.call(peer),
            Extra::Peer(Peer::Inet(_)) => Ok(()),
            Extra::Dict(dict) => visit.call(dict),
        }
    }
}

/// `get_extra_info(name, default)`. `socket` and `sockname` are made from the open
/// socket when first asked for (or when it is closed: see `release_socket`).
pub(crate) fn get_extra_info<S: HasBase>(
    cell: &GilCell<S>,
    py: Python<'_>,
    name: &Bound<'_, PyAny>,
    default: Option<Py<PyAny>>,
) -> PyResult<Py<PyAny>> {
    let key = name
        .cast::<PyString>()
        .ok()
        .map(|s| s.to_str())
        .transpose()?;
    let made_on_demand = matches!(key, Some("socket" | "sockname"));
    let extra = {
        let mut st = base(cell, py)?;
        if let Extra::Peer(peer) = &st.extra {
            match key {
                Some("peername") => return peer.to_object(py),
                _ if !made_on_demand => return Ok(default.unwrap_or_else(|| py.None())),
                _ => {}
            }
        }
        st.extra_dict(py)?
    };
    let extra_dict = extra.bind(py);
    if let Some(value) = extra_dict.get_item(name)? {
        return Ok(value.unbind());
    }
    if !made_on_demand {
        return Ok(default.unwrap_or_else(|| py.None()));
    }
    let sock = match socket_object(cell, py)? {
        Some(sock) => Some(sock.into_bound(py)),
        None => {
            // Read before the call: making the socket runs Python, which must not
            // find the state borrowed.
            let closed_shape = base(cell, py)?.closed_shape;
            match closed_shape {
                Some(shape) => Some(closed_socket(py, shape)?),
                None => None,
            }
        }
    };
    if let Some(sock) = sock {
        fill_socket_extra(py, &sock, &extra)?;
        if let Some(value) = extra_dict.get_item(name)? {
            return Ok(value.unbind());
        }
    }
    Ok(default.unwrap_or_else(|| py.None()))
}

/// The transport's socket object, made on first need; `None` once it is closed.
pub(crate) fn socket_object<S: HasBase>(
    cell: &GilCell<S>,
    py: Python<'_>,
) -> PyResult<Option<Py<PyAny>>> {
    let mut st = base(cell, py)?;
    st.sock.as_mut().map(|sock| sock.object(py)).transpose()
}

/// What every native transport keeps, as asyncio's `_SelectorTransport` does: its loop,
/// socket and registration, its protocol, and the flags that decide the fd's interest.
/// Each transport's state holds it as its `base` field (`st.base.closing`); the helpers
/// below reach it through `HasBase`.
pub(crate) struct Base {
    pub loop_: Option<Py<LoopCore>>,
    /// The socket; `None` once the connection is lost and the socket closed.
    pub sock: Option<Sock>,
    /// An accepted connection's `Shape` once it is closed without a socket object
    /// made (`release_socket`).
    pub closed_shape: Option<Shape>,
    pub fd: RawFd,
    /// The fd's registration with the loop; `None` before `_register` and after loss.
    pub token: Option<Token>,
    pub protocol: Option<Py<PyAny>>,
    /// The context the read callbacks run in, taken when reading starts (asyncio runs
    /// them from a reader handle made at that point); `None` once started if that
    /// context was empty, until a callback sets something in the one it is lent.
    pub context: Option<Py<PyAny>>,
    pub extra: Extra,
    pub buffer_size: usize,
    pub high_water: usize,
    pub low_water: usize,
    pub protocol_paused: bool,
    pub started: bool,
    pub paused: bool,
    /// `eof_received` asked to keep the transport open: nothing more to read.
    pub read_eof: bool,
    pub closing: bool,
    pub conn_lost: u32,
    /// The socket was full: waiting for writability.
    pub write_waiting: bool,
    /// The interest the loop has registered for the fd.
    pub interest: Interest,
    /// Bytes received from and sent to the socket (`loop.connections()`), also added
    /// to the loop's totals (`loop.stats()`).
    pub bytes_read: u64,
    pub bytes_written: u64,
    totals: Arc<ByteTotals>,
    pub created: std::time::Instant,
}

/// An accepted connection's socket family, type and protocol: the listening socket's,
/// as `socket.accept()` gives its sockets.
pub(crate) type Shape = (i32, i32, i32);

/// A transport's socket: the socket object it was made with, or, for a connection the
/// loop accepted, just the fd (owned here) and its `Shape`, until something asks for a
/// socket object (an idle connection then holds one object fewer, as uvloop's do).
pub(crate) enum Sock {
    Object(Py<PyAny>),
    Fd(OwnedFd, Shape),
}

static SOCKET_CLASS: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

/// `socket.socket(family, type, proto, **kwargs)`. Given all three, the socket module
/// asks an fd passed as `fileno` for none of them (one `getsockname` still checks it).
fn new_socket<'py>(
    py: Python<'py>,
    (family, kind, proto): Shape,
    kwargs: Option<&Bound<'py, PyDict>>,
) -> PyResult<Bound<'py, PyAny>> {
    let class = SOCKET_CLASS.get_or_try_init(py, || {
        PyResult::Ok(py.import("socket")?.getattr("socket")?.unbind())
    })?;
    class.bind(py).call((family, kind, proto), kwargs)
}

impl Sock {
    /// The socket object, made on first need from the fd (which it then owns).
    pub fn object(&mut self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        let (raw, shape) = match self {
            Sock::Object(obj) => return Ok(obj.clone_ref(py)),
            Sock::Fd(fd, shape) => (fd.as_raw_fd(), *shape),
        };
        let kwargs = PyDict::new(py);
        kwargs.set_item(pyo3::intern!(py, "fileno"), raw)?;
        let obj = new_socket(py, shape, Some(&kwargs))?;
        // The object owns the fd from here on: it must not be closed twice.
        if let Sock::Fd(fd, _) = mem::replace(self, Sock::Object(obj.clone().unbind())) {
            let _ = fd.into_raw_fd();
        }
        // Made from an fd, the object would take it for blocking; it is not.
        obj.call_method1(pyo3::intern!(py, "setblocking"), (false,))?;
        Ok(obj.unbind())
    }

    /// The socket object, if one was made.
    pub fn as_object(&self) -> Option<&Py<PyAny>> {
        match self {
            Sock::Object(obj) => Some(obj),
            Sock::Fd(..) => None,
        }
    }
}

impl Base {
    pub fn new(
        loop_: Py<LoopCore>,
        sock: Sock,
        fd: RawFd,
        protocol: Py<PyAny>,
        extra: Extra,
    ) -> Base {
        let totals = loop_.get().bytes.clone();
        Base {
            loop_: Some(loop_),
            sock: Some(sock),
            closed_shape: None,
            fd,
            token: None,
            protocol: Some(protocol),
            context: None,
            extra,
            buffer_size: 0,
            high_water: DEFAULT_HIGH_WATER,
            low_water: DEFAULT_HIGH_WATER / 4,
            protocol_paused: false,
            started: false,
            paused: false,
            read_eof: false,
            closing: false,
            conn_lost: 0,
            write_waiting: false,
            interest: Interest::NONE,
            bytes_read: 0,
            bytes_written: 0,
            totals,
            created: std::time::Instant::now(),
        }
    }

    /// `n` bytes were received from the socket.
    #[inline]
    pub fn count_read(&mut self, n: usize) {
        self.bytes_read += n as u64;
        self.totals.add_read(n as u64);
    }

    /// `n` bytes were sent.
    #[inline]
    pub fn count_written(&mut self, n: usize) {
        self.bytes_written += n as u64;
        self.totals.add_written(n as u64);
    }

    pub fn is_reading(&self) -> bool {
        !self.paused && !self.closing
    }

    pub fn loop_ref(&self, py: Python<'_>) -> Option<Py<LoopCore>> {
        self.loop_.as_ref().map(|l| l.clone_ref(py))
    }

    /// The socket object, if one was made (a datagram transport always has one).
    pub fn socket_if_made(&self, py: Python<'_>) -> Option<Py<PyAny>> {
        self.sock
            .as_ref()
            .and_then(Sock::as_object)
            .map(|s| s.clone_ref(py))
    }

    pub fn protocol_ref(&self, py: Python<'_>) -> Option<Py<PyAny>> {
        self.protocol.as_ref().map(|p| p.clone_ref(py))
    }

    /// Brings the loop's registration in line with what the transport wants.
    pub fn sync_interest(&mut self, py: Python<'_>) -> PyResult<()> {
        let mut wanted = Interest::NONE;
        if self.started && !self.paused && !self.closing && !self.read_eof {
            wanted |= READABLE;
        }
        if self.write_waiting {
            wanted |= WRITABLE;
        }
        if wanted == self.interest {
            return Ok(());
        }
        if let (Some(token), Some(loop_)) = (self.token, &self.loop_) {
            loop_.get().set_transport_interest(py, token, wanted)?;
        }
        self.interest = wanted;
        Ok(())
    }

    pub fn visit(&self, visit: &pyo3::PyVisit<'_>) -> Result<(), pyo3::PyTraverseError> {
        let sock = self.sock.as_ref().and_then(Sock::as_object);
        for obj in [sock, self.protocol.as_ref(), self.context.as_ref()]
            .into_iter()
            .flatten()
        {
            visit.call(obj)?;
        }
        if let Some(loop_) = &self.loop_ {
            visit.call(loop_)?;
        }
        self.extra.visit(visit)
    }

    /// The extra dict, made from the peer address on first need.
    pub fn extra_dict(&mut self, py: Python<'_>) -> PyResult<Py<PyDict>> {
        let dict = match &self.extra {
            Extra::Dict(dict) => return Ok(dict.clone_ref(py)),
            Extra::Peer(peer) => {
                let dict = PyDict::new(py);
                dict.set_item(pyo3::intern!(py, "peername"), peer.to_object(py)?)?;
                dict.unbind()
            }
        };
        self.extra = Extra::Dict(dict.clone_ref(py));
        Ok(dict)
    }
}

/// A transport's state, which keeps what every transport shares as a `Base`.
pub(crate) trait HasBase {
    fn base_mut(&mut self) -> &mut Base;
}

/// The `Base` of the transport state in `cell`, borrowed as the whole state would be.
fn base<'a, S: HasBase>(cell: &'a GilCell<S>, py: Python<'_>) -> PyResult<RefMut<'a, Base>> {
    Ok(RefMut::map(cell.borrow_mut(py)?, S::base_mut))
}

/// Bytes read and written and age in seconds of the transport whose state is `cell`
/// (`None` while that state is borrowed).
pub(crate) fn counters<S: HasBase>(cell: &GilCell<S>, py: Python<'_>) -> Option<(u64, u64, f64)> {
    let base = base(cell, py).ok()?;
    Some((
        base.bytes_read,
        base.bytes_written,
        base.created.elapsed().as_secs_f64(),
    ))
}

// The parts of asyncio's transport surface that every native transport shares, over
// the transport's state cell.

/// Claims the fd in the loop's registry: from now on `add_reader` and friends on it
/// raise, and its events come to the transport.
pub(crate) fn register<S: HasBase>(
    cell: &GilCell<S>,
    py: Python<'_>,
    native: impl FnOnce() -> NativeTransport,
) -> PyResult<()> {
    let (loop_, fd) = {
        let st = base(cell, py)?;
        if st.token.is_some() || st.sock.is_none() {
            return Ok(());
        }
        (st.loop_ref(py), st.fd)
    };
    let Some(loop_) = loop_ else {
        return Ok(());
    };
    let token = loop_.get().register_transport(py, fd, native())?;
    let mut st = base(cell, py)?;
    st.token = Some(token);
    st.interest = Interest::NONE;
    st.sync_interest(py)
}

/// Starts reading; scheduled right after `connection_made`.
pub(crate) fn start_reading<S: HasBase>(
    cell: &GilCell<S>,
    py: Python<'_>,
    context: Option<Py<PyAny>>,
) -> PyResult<()> {
    let context = match context {
        Some(context) => context.into_bound(py),
        None => copy_context(py)?,
    };
    let mut st = base(cell, py)?;
    if st.sock.is_none() {
        return Ok(());
    }
    st.started = true;
    // An empty one is not kept: the read callbacks borrow an empty context instead
    // (`in_context_or_lent`), and an idle connection holds one object fewer.
    st.context = (!is_empty_context(&context)).then(|| context.unbind());
    st.sync_interest(py)
}

/// Runs one of the protocol's read callbacks in the transport's read context
/// (`context`, taken from `Base::context`); a lent one the callback changed becomes
/// the transport's, for this read's next callback and every later one.
pub(crate) fn in_read_context<S: HasBase, R>(
    cell: &GilCell<S>,
    py: Python<'_>,
    context: &mut Option<Py<PyAny>>,
    f: impl FnOnce() -> PyResult<R>,
) -> PyResult<R> {
    let lent = context.is_none();
    let outcome = in_context_or_lent(py, context, f);
    if let (true, Some(changed)) = (lent, context.as_ref()) {
        let mut st = base(cell, py)?;
        if st.context.is_none() {
            st.context = Some(changed.clone_ref(py));
        }
    }
    outcome
}

/// Runs `f` in the transport's own context, the one its read callbacks run in. What
/// a transport does on its own (after the peer's EOF, a read or write error, a drained
/// buffer) calls the protocol and schedules `connection_lost` from there, as asyncio's
/// transports do from their reader and writer callbacks. Only for calls made outside
/// every callback (a context that is already entered cannot be entered again).
fn in_own_context<S: HasBase, R>(
    cell: &GilCell<S>,
    py: Python<'_>,
    f: impl FnOnce() -> PyResult<R>,
) -> PyResult<R> {
    let mut context = base(cell, py)?.context.as_ref().map(|c| c.clone_ref(py));
    in_read_context(cell, py, &mut context, f)
}

/// `f` in the transport's own context when `own` (what it does unprompted, see
/// `in_own_context`), else in the caller's.
pub(crate) fn in_context_if<S: HasBase, R>(
    cell: &GilCell<S>,
    py: Python<'_>,
    own: bool,
    f: impl FnOnce() -> PyResult<R>,
) -> PyResult<R> {
    if own {
        in_own_context(cell, py, f)
    } else {
        f()
    }
}

/// `pause_reading` (`pause` true) or `resume_reading`, logged in debug mode as asyncio
/// logs them.
pub(crate) fn set_reading<S: HasBase>(
    cell: &GilCell<S>,
    transport: &Bound<'_, PyAny>,
    pause: bool,
) -> PyResult<()> {
    let py = transport.py();
    let debug = {
        let mut st = base(cell, py)?;
        let change = if pause {
            st.is_reading()
        } else {
            !st.closing && st.paused
        };
        if !change {
            return Ok(());
        }
        st.paused = pause;
        st.sync_interest(py)?;
        st.loop_.as_ref().is_some_and(|l| l.get().debug())
    };
    if debug {
        let what = if pause {
            "%r pauses reading"
        } else {
            "%r resumes reading"
        };
        asyncio_logger(py)?.call_method1("debug", (what, transport))?;
    }
    Ok(())
}

/// The end of asyncio's `close`/`_force_close`: once, mark the connection lost and
/// schedule `_call_connection_lost(exc)`.
pub(crate) fn lose_connection<S: HasBase>(
    cell: &GilCell<S>,
    transport: &Bound<'_, PyAny>,
    exc: Option<Py<PyAny>>,
) -> PyResult<()> {
    let py = transport.py();
    let loop_ = {
        let mut st = base(cell, py)?;
        if st.conn_lost > 0 {
            return Ok(());
        }
        st.conn_lost += 1;
        st.closing = true;
        st.write_waiting = false;
        st.sync_interest(py)?;
        st.loop_ref(py)
    };
    match loop_ {
        Some(loop_) => schedule_connection_lost(&loop_, transport, exc),
        None => Ok(()),
    }
}

/// `set_write_buffer_limits`: the new water marks (the caller then checks for a pause).
pub(crate) fn set_limits<S: HasBase>(
    cell: &GilCell<S>,
    py: Python<'_>,
    high: Option<&Bound<'_, PyAny>>,
    low: Option<&Bound<'_, PyAny>>,
) -> PyResult<()> {
    let (high, low) = write_limits(high, low)?;
    let mut st = base(cell, py)?;
    st.high_water = high;
    st.low_water = low;
    Ok(())
}

/// asyncio's `_maybe_pause_protocol` (`pause`) and `_maybe_resume_protocol`: the
/// protocol hears once when the buffer crosses the high (low) water mark; in the
/// transport's own context with `own_context` (see `in_own_context`).
pub(crate) fn flow_control<S: HasBase>(
    cell: &GilCell<S>,
    transport: &Bound<'_, PyAny>,
    pause: bool,
    own_context: bool,
) -> PyResult<()> {
    let py = transport.py();
    let (loop_, protocol) = {
        let mut st = base(cell, py)?;
        let due = if pause {
            !st.protocol_paused && st.buffer_size > st.high_water
        } else {
            st.protocol_paused && st.buffer_size <= st.low_water
        };
        if !due {
            return Ok(());
        }
        st.protocol_paused = pause;
        (st.loop_ref(py), st.protocol_ref(py))
    };
    let Some(protocol) = protocol else {
        return Ok(());
    };
    let (method, message) = if pause {
        (
            pyo3::intern!(py, "pause_writing"),
            "protocol.pause_writing() failed",
        )
    } else {
        (
            pyo3::intern!(py, "resume_writing"),
            "protocol.resume_writing() failed",
        )
    };
    let call = || match protocol.bind(py).call_method0(method) {
        Ok(_) => Ok(()),
        Err(err) => protocol_failed(loop_.as_ref(), err, message, transport, &protocol),
    };
    in_context_if(cell, py, own_context, call)
}

/// asyncio's `close`: stop reading, and lose the connection now if nothing is buffered
/// (otherwise once the buffer drains). `buffer_size` is zero exactly when the buffer is
/// empty: a stream buffers no empty data, and a datagram transport that queues empty
/// datagrams (from 3.13) counts a header for each.
pub(crate) fn close<S: HasBase>(cell: &GilCell<S>, transport: &Bound<'_, PyAny>) -> PyResult<()> {
    let py = transport.py();
    let drained = {
        let mut st = base(cell, py)?;
        if st.closing {
            return Ok(());
        }
        st.closing = true;
        st.sync_interest(py)?;
        st.buffer_size == 0
    };
    if drained {
        lose_connection(cell, transport, None)?;
    }
    Ok(())
}
