//! The stream transport's read paths. Each is a `Sink`: where the bytes of one read
//! go and which protocol callback hears of them. `StreamTransport::read_ready` keeps
//! what every path shares (the readiness checks, end of stream, read errors, one read
//! per event) and hands the rest to the sink of the protocol's `ReadPath`.
//!
//! A new path (a native TLS, a native stream reader) is a new sink and a new
//! `ReadPath` variant; the sinks already here do not change.

mod buffered;
mod data;

use std::io;
use std::os::fd::RawFd;

use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyString;

use crate::errors::{os_error, would_block};
use crate::gil_cell::GilCell;
use crate::tls::TlsState;
use crate::transports::in_read_context;
use crate::transports::stream::StreamState;

pub(crate) use buffered::BufferedSink;
pub(crate) use data::DataSink;

/// The message of a failed `buffer_updated` (also the TLS path's, which stands for it).
pub(crate) const BUFFER_UPDATED_FAILED: &str =
    "Fatal error: protocol.buffer_updated() call failed.";

static BUFFERED_PROTOCOL: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

/// Which sink a protocol's reads go to, decided by its class whenever a protocol is
/// set (at creation and by `set_protocol`). The sinks look the protocol's methods up
/// on every call, as asyncio does (a replaced `data_received` is honoured), by
/// `PyObject_VectorcallMethod`, which makes no bound method: an idle connection keeps
/// none either.
#[derive(Clone, Copy)]
pub(crate) enum ReadPath {
    /// A `Protocol`: `data_received(bytes)` (`DataSink`).
    Data,
    /// A `BufferedProtocol`: `get_buffer`, `recv_into`, `buffer_updated`
    /// (`BufferedSink`).
    Buffered,
    /// ferroloop's `SSLProtocol`: the socket is read into the TLS object's incoming
    /// BIO (`tls::TlsSink`), the steps of its `get_buffer` and `buffer_updated`
    /// without the two calls.
    Tls,
}

impl ReadPath {
    pub(crate) fn of(protocol: &Bound<'_, PyAny>) -> PyResult<ReadPath> {
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

/// What one read from the socket came to.
pub(crate) enum Outcome<T> {
    /// Bytes were read; `T` is what the sink hands to its `deliver`.
    Read(T),
    /// Nothing to read yet (`EAGAIN`, `EINTR`): the next readiness tries again.
    WouldBlock,
    /// The peer ended the stream.
    Eof,
    /// The read failed: a fatal read error of the connection.
    Failed(PyErr),
    /// A protocol callback the read needed failed (with the message asyncio reports
    /// it under): handled as the delivery's failure would be.
    CallbackFailed(PyErr, &'static str),
}

impl<T> Outcome<T> {
    pub(crate) fn map<U>(self, f: impl FnOnce(T) -> U) -> Outcome<U> {
        match self {
            Outcome::Read(got) => Outcome::Read(f(got)),
            Outcome::WouldBlock => Outcome::WouldBlock,
            Outcome::Eof => Outcome::Eof,
            Outcome::Failed(err) => Outcome::Failed(err),
            Outcome::CallbackFailed(err, message) => Outcome::CallbackFailed(err, message),
        }
    }
}

impl Reader<'_, '_> {
    /// One `recv` into `buf`, counted.
    #[inline]
    pub(crate) fn recv(&mut self, buf: &mut [u8]) -> Outcome<usize> {
        match Outcome::of_recv(crate::sys::recv(self.fd, buf)) {
            Outcome::Read(n) => {
                self.received = n;
                Outcome::Read(n)
            }
            other => other,
        }
    }
}

impl Outcome<usize> {
    /// The outcome of one `recv`: 0 bytes is the end of the stream.
    pub(crate) fn of_recv(received: io::Result<usize>) -> Self {
        match received {
            Ok(0) => Outcome::Eof,
            Ok(n) => Outcome::Read(n),
            Err(err) if would_block(&err) => Outcome::WouldBlock,
            Err(err) => Outcome::Failed(os_error(err)),
        }
    }
}

/// One read path: `receive` makes one read from the socket and `deliver` hands what
/// it got to the protocol, in the transport's read context. Chosen by a `ReadPath`
/// and called statically (`read_ready` is generic over the sink).
pub(crate) trait Sink {
    /// What a read hands from `receive` to `deliver`.
    type Got<'py>;
    /// The message a failure of `deliver` is reported under.
    const DELIVERY_FAILED: &'static str;
    fn receive<'py>(reader: &mut Reader<'_, 'py>) -> Outcome<Self::Got<'py>>;
    fn deliver<'py>(protocol: &Bound<'py, PyAny>, got: Self::Got<'py>) -> PyResult<()>;
}

/// One readiness event's read: the socket, the protocol, and the read context its
/// callbacks run in (see `in_read_context`).
pub(crate) struct Reader<'a, 'py> {
    pub fd: RawFd,
    /// Bytes the sink's read took from the socket.
    pub received: usize,
    pub protocol: Bound<'py, PyAny>,
    pub context: Option<Py<PyAny>>,
    state: &'a GilCell<StreamState>,
}

impl<'a, 'py> Reader<'a, 'py> {
    pub(crate) fn new(
        state: &'a GilCell<StreamState>,
        fd: RawFd,
        protocol: Bound<'py, PyAny>,
        context: Option<Py<PyAny>>,
    ) -> Self {
        Reader {
            fd,
            received: 0,
            protocol,
            context,
            state,
        }
    }

    /// Runs `f`, a call of the protocol, in the read context.
    pub(crate) fn in_context<R>(
        &mut self,
        f: impl FnOnce(&Bound<'py, PyAny>) -> PyResult<R>,
    ) -> PyResult<R> {
        let protocol = &self.protocol;
        in_read_context(self.state, protocol.py(), &mut self.context, || f(protocol))
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
