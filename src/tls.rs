//! The per-record path of asyncio's `SSLProtocol` (`asyncio.sslproto` of Python 3.11
//! to 3.13, whose per-record methods are the same), in Rust.
//!
//! TLS runs on asyncio's own `SSLProtocol` over the Rust transport. Its handshake,
//! shutdown and flow-control transitions stay in Python; what runs for every record
//! (`get_buffer`, `buffer_updated` reading the records and handing the plaintext to the
//! protocol, `_write_appdata` encrypting what the protocol writes and sending it) is
//! done here with the same steps, on the same attributes, so the Python class keeps
//! owning its state. Only a step that changes state (a pause, a close_notify, an error)
//! calls back into the Python methods. `python/ferroloop/_sslproto.py` puts `TlsState`
//! first in the bases of a subclass, on the Python versions whose `sslproto` it follows.
//!
//! Where the steps differ from asyncio's, the result does not:
//! - The attributes the steps use are fields of `TlsState`, not dictionary entries.
//! - The stream transport reads the socket straight into the incoming BIO
//!   (`TlsSink`, its read path) instead of calling `get_buffer` and
//!   `buffer_updated`.
//! - One write with nothing queued is encrypted without passing through the backlog
//!   (`write_now`).
//! - Records are read and written by calling libssl on the `SSL` object under a stock
//!   `ssl.SSLObject` (`libssl.rs`; `read_records_native`, `encrypt`), into a reused
//!   buffer; where that is not possible, through the C object's methods, skipping the
//!   read that could only raise `SSLWantReadError` (`read_records`).

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};

use pyo3::exceptions::{PyException, PyRuntimeError, PyTypeError};

use pyo3::ffi;
use pyo3::gc::{PyTraverseError, PyVisit};
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyBytes, PyDict, PyList, PySlice, PyTuple};

use crate::libssl::{Io, NativeSsl};
use crate::transports::read::{Outcome, Reader, Sink, BUFFER_UPDATED_FAILED};
use crate::transports::stream::StreamTransport;

mod handshake;

/// What `asyncio.sslproto` defines that the path compares against.
struct SslProto {
    wrapped: Py<PyAny>,
    flushing: Py<PyAny>,
    shutdown: Py<PyAny>,
    unwrapped: Py<PyAny>,
    do_handshake: Py<PyAny>,
    /// `SSLAgainErrors`: a read or write that must wait for more data.
    again: Py<PyAny>,
    /// `asyncio.sslproto.SSLProtocol`, for the rare cases left to its own methods.
    base: Py<PyAny>,
    /// `AppProtocolState.STATE_INIT` and `STATE_CON_MADE`.
    app_init: Py<PyAny>,
    app_con_made: Py<PyAny>,
}

static SSLPROTO: PyOnceLock<SslProto> = PyOnceLock::new();

fn sslproto(py: Python<'_>) -> PyResult<&SslProto> {
    SSLPROTO.get_or_try_init(py, || {
        let module = py.import("asyncio.sslproto")?;
        let state = module.getattr("SSLProtocolState")?;
        let member = |name: &str| state.getattr(name).map(Bound::unbind);
        Ok(SslProto {
            wrapped: member("WRAPPED")?,
            flushing: member("FLUSHING")?,
            shutdown: member("SHUTDOWN")?,
            unwrapped: member("UNWRAPPED")?,
            do_handshake: member("DO_HANDSHAKE")?,
            again: module.getattr("SSLAgainErrors")?.unbind(),
            base: module.getattr("SSLProtocol")?.unbind(),
            app_init: module
                .getattr("AppProtocolState")?
                .getattr("STATE_INIT")?
                .unbind(),
            app_con_made: module
                .getattr("AppProtocolState")?
                .getattr("STATE_CON_MADE")?
                .unbind(),
        })
    })
}

/// The attributes of asyncio's `SSLProtocol` that the per-record path reads and
/// writes, kept as fields of a base class of ferroloop's subclass (`_sslproto.py`)
/// instead of in the instance dictionary: the Python methods reach them through the
/// same names (data descriptors, found before the dictionary), and the path reads a
/// field where it would otherwise look a name up (about 40 per request).
///
/// A field asyncio has not assigned yet reads as `None` (`False`, `0`); its
/// `__init__` assigns every one before anything reads it.
#[pyclass(subclass, module = "ferroloop._ferroloop")]
pub struct TlsState {
    #[pyo3(get, set, name = "_state")]
    state: Option<Py<PyAny>>,
    /// The `ssl.SSLObject`; `raw` is the C object under it when it is a stock one, and
    /// `native` its `SSL` object when libssl can be called on it (kept with `raw`,
    /// which owns what its pointers reach), else `native_refused` says why.
    sslobj: Option<Py<PyAny>>,
    raw: Option<Py<PyAny>>,
    native: Option<NativeSsl>,
    native_refused: Option<String>,
    #[pyo3(get, set, name = "_incoming")]
    incoming: Option<Py<PyAny>>,
    #[pyo3(get, set, name = "_outgoing")]
    outgoing: Option<Py<PyAny>>,
    #[pyo3(get, set, name = "_transport")]
    transport: Option<Py<PyAny>>,
    #[pyo3(get, set, name = "_app_protocol")]
    app_protocol: Option<Py<PyAny>>,
    #[pyo3(get, set, name = "_app_protocol_is_buffer")]
    app_protocol_is_buffer: bool,
    #[pyo3(get, set, name = "_write_backlog")]
    write_backlog: Option<Py<PyAny>>,
    #[pyo3(get, set, name = "_write_buffer_size")]
    write_buffer_size: isize,
    #[pyo3(get, set, name = "_ssl_buffer")]
    ssl_buffer: Option<Py<PyAny>>,
    #[pyo3(get, set, name = "_ssl_buffer_view")]
    ssl_buffer_view: Option<Py<PyAny>>,
    #[pyo3(get, set, name = "_app_reading_paused")]
    app_reading_paused: bool,
    #[pyo3(get, set, name = "_app_writing_paused")]
    app_writing_paused: bool,
    #[pyo3(get, set, name = "_ssl_reading_paused")]
    ssl_reading_paused: bool,
    #[pyo3(get, set, name = "_ssl_writing_paused")]
    ssl_writing_paused: bool,
    #[pyo3(get, set, name = "_incoming_high_water")]
    incoming_high_water: isize,
    #[pyo3(get, set, name = "_incoming_low_water")]
    incoming_low_water: isize,
    #[pyo3(get, set, name = "_outgoing_high_water")]
    outgoing_high_water: isize,
    #[pyo3(get, set, name = "_outgoing_low_water")]
    outgoing_low_water: isize,
    /// The class's `max_size`, read on first use.
    max_size: Option<isize>,
}

#[pymethods]
impl TlsState {
    /// Takes and ignores the arguments of `SSLProtocol.__init__`, which assigns the
    /// fields.
    #[new]
    #[pyo3(signature = (*_args, **_kwargs))]
    fn new(_args: &Bound<'_, PyTuple>, _kwargs: Option<&Bound<'_, PyDict>>) -> Self {
        TlsState {
            state: None,
            sslobj: None,
            raw: None,
            native: None,
            native_refused: None,
            incoming: None,
            outgoing: None,
            transport: None,
            app_protocol: None,
            app_protocol_is_buffer: false,
            write_backlog: None,
            write_buffer_size: 0,
            ssl_buffer: None,
            ssl_buffer_view: None,
            app_reading_paused: false,
            app_writing_paused: false,
            ssl_reading_paused: false,
            ssl_writing_paused: false,
            incoming_high_water: 0,
            incoming_low_water: 0,
            outgoing_high_water: 0,
            outgoing_low_water: 0,
            max_size: None,
        }
    }

    #[getter(_sslobj)]
    fn sslobj(&self, py: Python<'_>) -> Option<Py<PyAny>> {
        self.sslobj.as_ref().map(|obj| obj.clone_ref(py))
    }

    #[setter(_sslobj)]
    fn set_sslobj(&mut self, sslobj: Bound<'_, PyAny>) -> PyResult<()> {
        let raw = raw_sslobj(&sslobj)?;
        let native = match &raw {
            Some(raw) => self.native_ssl(&sslobj, raw),
            None => Err(format!(
                "{} is not ssl.SSLObject",
                sslobj.get_type().name()?
            )),
        };
        (self.native, self.native_refused) = match native {
            Ok(native) => (Some(native), None),
            Err(why) => {
                log_fallback(sslobj.py(), &why);
                (None, Some(why))
            }
        };
        self.raw = raw.map(Bound::unbind);
        self.sslobj = Some(sslobj.unbind());
        Ok(())
    }

    /// How the records of this connection are read and written: `"libssl"` (natively,
    /// on the `SSL` object of its `ssl.SSLObject`) or `"_ssl: <why not>"` (through the
    /// methods of `_ssl`'s objects).
    #[getter(_ferroloop_tls_path)]
    fn tls_path(&self) -> String {
        match (&self.native, &self.native_refused) {
            (Some(_), _) => "libssl".to_owned(),
            (None, Some(why)) => format!("_ssl: {why}"),
            (None, None) => "_ssl: no SSL object yet".to_owned(),
        }
    }

    /// `SSLProtocol.get_buffer`.
    fn get_buffer<'py>(slf: &Bound<'py, Self>, n: isize) -> PyResult<Bound<'py, PyAny>> {
        get_buffer(&Proto::of(slf), n)
    }

    /// `SSLProtocol.buffer_updated`.
    fn buffer_updated(slf: &Bound<'_, Self>, nbytes: isize) -> PyResult<()> {
        buffer_updated(&Proto::of(slf), nbytes)
    }

    /// `SSLProtocol._do_read`, which asyncio also schedules (after the handshake, for
    /// a buffer filled to the end) and calls while flushing.
    fn _do_read(slf: &Bound<'_, Self>) -> PyResult<()> {
        let py = slf.py();
        let names = sslproto(py)?;
        let proto = Proto::of(slf);
        let state = proto.get(|st| &st.state)?;
        if state.is(&names.wrapped) || state.is(&names.flushing) {
            do_read(&proto, names)
        } else {
            Ok(())
        }
    }

    /// `SSLProtocol._set_state`: the transitions asyncio allows (to `UNWRAPPED` from
    /// any state, and along `UNWRAPPED`, `DO_HANDSHAKE`, `WRAPPED`, `FLUSHING`,
    /// `SHUTDOWN`), compared with `==` and refused with asyncio's `RuntimeError`. Five
    /// calls per connection, each a Python frame and ten attribute lookups in asyncio.
    fn _set_state(slf: &Bound<'_, Self>, new_state: &Bound<'_, PyAny>) -> PyResult<()> {
        let py = slf.py();
        let names = sslproto(py)?;
        let current = Proto::of(slf).get(|st| &st.state)?;
        let allowed = new_state.eq(&names.unwrapped)?
            || [
                (&names.unwrapped, &names.do_handshake),
                (&names.do_handshake, &names.wrapped),
                (&names.wrapped, &names.flushing),
                (&names.flushing, &names.shutdown),
            ]
            .into_iter()
            .try_fold(false, |found, (from, to)| {
                PyResult::Ok(found || (current.eq(from)? && new_state.eq(to)?))
            })?;
        if !allowed {
            let message = intern!(py, "cannot switch state from {} to {}")
                .call_method1(intern!(py, "format"), (current, new_state))?;
            return Err(PyRuntimeError::new_err(message.unbind()));
        }
        Proto::of(slf).state_mut()?.state = Some(new_state.clone().unbind());
        Ok(())
    }

    /// `SSLProtocol._call_eof_received`, which asyncio calls three times in a
    /// connection's usual end, twice doing nothing: those two return here, the one
    /// that calls the app protocol is asyncio's method.
    fn _call_eof_received(slf: &Bound<'_, Self>) -> PyResult<()> {
        let py = slf.py();
        let names = sslproto(py)?;
        if slf
            .getattr(intern!(py, "_app_state"))?
            .eq(&names.app_con_made)?
        {
            handshake::asyncio_step(&Proto::of(slf), intern!(py, "_call_eof_received"))?;
        }
        Ok(())
    }

    /// `SSLProtocol._start_shutdown`: asyncio's method, except in the states where it
    /// returns at once (the second close of a connection, after `eof_received`).
    fn _start_shutdown(slf: &Bound<'_, Self>) -> PyResult<()> {
        let py = slf.py();
        let names = sslproto(py)?;
        let state = Proto::of(slf).get(|st| &st.state)?;
        for done in [&names.flushing, &names.shutdown, &names.unwrapped] {
            if state.eq(done)? {
                return Ok(());
            }
        }
        handshake::asyncio_step(&Proto::of(slf), intern!(py, "_start_shutdown"))
    }

    /// `SSLProtocol.connection_made`: the transport kept, then `_start_handshake`.
    fn connection_made(slf: &Bound<'_, Self>, transport: Bound<'_, PyAny>) -> PyResult<()> {
        let py = slf.py();
        let previous = Proto::of(slf)
            .state_mut()?
            .transport
            .replace(transport.unbind());
        // Released outside the borrow: its last reference may run Python code.
        drop(previous);
        slf.call_method0(intern!(py, "_start_handshake")).map(drop)
    }

    /// `SSLProtocol._start_handshake` (`tls/handshake.rs`).
    fn _start_handshake(slf: &Bound<'_, Self>) -> PyResult<()> {
        handshake::start_handshake(&Proto::of(slf))
    }

    /// `SSLProtocol._do_handshake` (`tls/handshake.rs`).
    fn _do_handshake(slf: &Bound<'_, Self>) -> PyResult<()> {
        handshake::do_handshake(&Proto::of(slf))
    }

    /// `SSLProtocol._do_shutdown` (`tls/handshake.rs`).
    fn _do_shutdown(slf: &Bound<'_, Self>) -> PyResult<()> {
        handshake::do_shutdown(&Proto::of(slf))
    }

    /// `SSLProtocol._write_appdata`.
    fn _write_appdata(slf: &Bound<'_, Self>, list_of_data: &Bound<'_, PyAny>) -> PyResult<()> {
        write_appdata(&Proto::of(slf), Written::Many(list_of_data))
    }

    /// One block of `loop.sendfile` over this connection (`Loop._sendfile_fallback`):
    /// up to `count` bytes (`None`: no limit) and at most a block of the file `fd` read
    /// at `offset`, written as `_write_appdata` writes them. The number of bytes read
    /// (0 at end of file).
    fn _sendfile_block(
        slf: &Bound<'_, Self>,
        fd: std::os::fd::RawFd,
        offset: i64,
        count: Option<usize>,
    ) -> PyResult<usize> {
        let count = count.map_or(SENDFILE_BLOCK, |count| count.min(SENDFILE_BLOCK));
        sendfile_block(&Proto::of(slf), fd, offset, count)
    }

    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        for obj in self.objects().into_iter().flatten() {
            visit.call(obj)?;
        }
        Ok(())
    }

    fn __clear__(&mut self) {
        // The pointers reach into `raw`, released below.
        self.native = None;
        let released = [
            self.state.take(),
            self.sslobj.take(),
            self.raw.take(),
            self.incoming.take(),
            self.outgoing.take(),
            self.transport.take(),
            self.app_protocol.take(),
            self.write_backlog.take(),
            self.ssl_buffer.take(),
            self.ssl_buffer_view.take(),
        ];
        drop(released);
    }
}

/// Says at DEBUG on the `ferroloop` logger why a connection's records go through
/// `_ssl`'s methods: for each connection when the reason is the connection's own, once
/// when it is the process's (`native_tls_unavailable`). Logging is best effort: a
/// handler's failure does not fail the connection.
fn log_fallback(py: Python<'_>, why: &str) {
    static PROCESS_REASON_SAID: AtomicBool = AtomicBool::new(false);
    if crate::libssl::native_tls_unavailable(py).as_deref() == Some(why)
        && PROCESS_REASON_SAID.swap(true, Ordering::Relaxed)
    {
        return;
    }
    let message = "TLS records through _ssl's methods, not libssl directly: %s";
    let logged = py
        .import("logging")
        .and_then(|logging| logging.call_method1("getLogger", ("ferroloop",)))
        .and_then(|logger| logger.call_method1("debug", (message, why)));
    drop(logged);
}

impl TlsState {
    fn native_ssl(
        &self,
        sslobj: &Bound<'_, PyAny>,
        raw: &Bound<'_, PyAny>,
    ) -> Result<NativeSsl, String> {
        let py = sslobj.py();
        match (&self.incoming, &self.outgoing) {
            (Some(incoming), Some(outgoing)) => {
                NativeSsl::of(sslobj, raw, incoming.bind(py), outgoing.bind(py))
            }
            _ => Err("SSLProtocol has no BIOs yet".to_owned()),
        }
    }

    fn objects(&self) -> [&Option<Py<PyAny>>; 10] {
        [
            &self.state,
            &self.sslobj,
            &self.raw,
            &self.incoming,
            &self.outgoing,
            &self.transport,
            &self.app_protocol,
            &self.write_backlog,
            &self.ssl_buffer,
            &self.ssl_buffer_view,
        ]
    }
}

/// An `SSLProtocol` of ferroloop's subclass. A field is read by cloning it out of a
/// short borrow, never held across a call into Python: a borrow that finds the state
/// being assigned (from a `__del__` during an assignment) is a `RuntimeError`.
struct Proto<'py> {
    obj: Bound<'py, TlsState>,
}

impl<'py> Proto<'py> {
    fn of(obj: &Bound<'py, TlsState>) -> Self {
        Proto { obj: obj.clone() }
    }

    fn py(&self) -> Python<'py> {
        self.obj.py()
    }

    fn any(&self) -> &Bound<'py, PyAny> {
        self.obj.as_any()
    }

    fn state(&self) -> PyResult<PyRef<'py, TlsState>> {
        Ok(self.obj.try_borrow()?)
    }

    fn state_mut(&self) -> PyResult<PyRefMut<'py, TlsState>> {
        Ok(self.obj.try_borrow_mut()?)
    }

    /// An object field (`None` when unassigned).
    fn get(&self, field: fn(&TlsState) -> &Option<Py<PyAny>>) -> PyResult<Bound<'py, PyAny>> {
        let py = self.py();
        Ok(match field(&*self.state()?) {
            Some(obj) => obj.bind(py).clone(),
            None => py.None().into_bound(py),
        })
    }
}

/// `SSLProtocol.get_buffer`: the protocol's own buffer when it is large enough for
/// what is asked (at most `max_size`); else the Python method, which makes a larger one.
fn get_buffer<'py>(proto: &Proto<'py>, n: isize) -> PyResult<Bound<'py, PyAny>> {
    let py = proto.py();
    let max_size = max_size(proto)?;
    let want = if n <= 0 || n > max_size { max_size } else { n };
    let buffer = proto.get(|st| &st.ssl_buffer)?;
    if isize::try_from(buffer.len()?).unwrap_or(isize::MAX) < want {
        let base = sslproto(py)?.base.bind(py);
        return base
            .getattr(intern!(py, "get_buffer"))?
            .call1((proto.any(), n));
    }
    proto.get(|st| &st.ssl_buffer_view)
}

/// The class's `max_size` (asyncio reads at most that much plaintext at a time).
fn max_size(proto: &Proto<'_>) -> PyResult<isize> {
    if let Some(size) = proto.state()?.max_size {
        return Ok(size);
    }
    let size = proto
        .any()
        .getattr(intern!(proto.py(), "max_size"))?
        .extract()?;
    proto.state_mut()?.max_size = Some(size);
    Ok(size)
}

/// `SSLProtocol.buffer_updated`: feeds the received bytes to the TLS object and, once
/// the connection is up, reads the records out to the protocol.
fn buffer_updated(proto: &Proto<'_>, nbytes: isize) -> PyResult<()> {
    let py = proto.py();
    let view = proto.get(|st| &st.ssl_buffer_view)?;
    let received = view.get_item(PySlice::new(py, 0, nbytes, 1))?;
    proto
        .get(|st| &st.incoming)?
        .call_method1(intern!(py, "write"), (received,))?;
    records_received(&proto.obj)
}

/// The read path of ferroloop's `SSLProtocol` (`ReadPath::Tls`), what the stream
/// transport does instead of calling its `get_buffer` and `buffer_updated`: `recv`
/// fills this thread's scratch buffer, whose bytes go into the incoming BIO (the step
/// `buffer_updated` starts with); `records_received` then does the rest.
pub(crate) struct TlsSink;

impl Sink for TlsSink {
    type Got<'py> = ();
    const DELIVERY_FAILED: &'static str = BUFFER_UPDATED_FAILED;

    fn receive(reader: &mut Reader<'_, '_>) -> Outcome<()> {
        let mut scratch = Scratch::take();
        match reader.recv(&mut scratch.buf) {
            Outcome::Read(n) => match to_incoming(&reader.protocol, &mut scratch, n) {
                Ok(()) => Outcome::Read(()),
                Err(err) => Outcome::CallbackFailed(err, BUFFER_UPDATED_FAILED),
            },
            other => other.map(drop),
        }
    }

    fn deliver(protocol: &Bound<'_, PyAny>, _: ()) -> PyResult<()> {
        records_received(protocol.cast::<TlsState>()?)
    }
}

/// `incoming.write(scratch[..n])`. (`ReadPath::Tls` is chosen for a `TlsState` only,
/// so the cast does not fail.)
fn to_incoming(protocol: &Bound<'_, PyAny>, scratch: &mut Scratch, n: usize) -> PyResult<()> {
    let proto = Proto::of(protocol.cast::<TlsState>()?);
    if let Some(native) = proto.state()?.native {
        // No Python runs between the borrow and the call: the state still holds the
        // object that keeps the BIO.
        if native.feed(&scratch.buf[..n]) {
            return Ok(());
        }
    }
    // Not native, or the BIO refused the bytes: `MemoryBIO.write` does it or raises.
    let incoming = proto.get(|st| &st.incoming)?;
    scratch.write_to(&incoming, n)
}

/// The rest of `buffer_updated`, once the bytes are in the incoming BIO: the handshake,
/// the records or the shutdown, by state.
fn records_received(proto: &Bound<'_, TlsState>) -> PyResult<()> {
    let proto = &Proto::of(proto);
    let py = proto.py();
    let names = sslproto(py)?;
    let state = proto.get(|st| &st.state)?;
    let obj = proto.any();
    if state.is(&names.wrapped) {
        do_read(proto, names)
    } else if state.is(&names.do_handshake) {
        handshake::do_handshake(proto)
    } else if state.is(&names.flushing) {
        obj.call_method0(intern!(py, "_do_flush")).map(drop)
    } else if state.is(&names.shutdown) {
        handshake::do_shutdown(proto)
    } else {
        Ok(())
    }
}

/// `SSLProtocol._do_read` in the WRAPPED state: an `Exception` becomes a fatal error of
/// the connection, as there.
fn do_read(proto: &Proto<'_>, names: &SslProto) -> PyResult<()> {
    let outcome = (|| {
        let (paused, is_buffer) = {
            let st = proto.state()?;
            (st.app_reading_paused, st.app_protocol_is_buffer)
        };
        if !paused {
            if is_buffer {
                do_read_buffered(proto, names)?;
            } else {
                do_read_copied(proto, names)?;
            }
            if proto.get(|st| &st.write_backlog)?.is_truthy()? {
                do_write(proto, names)?;
            } else {
                process_outgoing(proto)?;
            }
        }
        control_flow(proto, Direction::SslReading, 0)
    })();
    fatal_on_exception(proto, outcome)
}

/// `SSLProtocol._do_read__buffered`: the protocol's buffer (`get_buffer` given the
/// ciphertext pending) filled with the records, `buffer_updated`, then the peer's
/// close_notify if it came. Where the records are read natively they are decrypted
/// straight into the buffer's memory; elsewhere asyncio's method runs.
fn do_read_buffered(proto: &Proto<'_>, names: &SslProto) -> PyResult<()> {
    let py = proto.py();
    let obj = proto.any();
    let (raw, native) = {
        let st = proto.state()?;
        (st.raw.as_ref().map(|raw| raw.bind(py).clone()), st.native)
    };
    let (Some(raw), Some(native)) = (raw, native) else {
        return obj
            .call_method0(intern!(py, "_do_read__buffered"))
            .map(drop);
    };
    // `raw`, held from here on, keeps the `SSL` object and its BIOs whatever the
    // protocol's methods do.
    let pending = native.incoming_pending();
    let buf = obj
        .getattr(intern!(py, "_app_protocol_get_buffer"))?
        .call1((pending,))?;
    let (offset, count) = read_into_buffer(proto, &raw, native, &buf, names)?;
    if offset > 0 {
        obj.getattr(intern!(py, "_app_protocol_buffer_updated"))?
            .call1((offset,))?;
    }
    if count == 0 {
        // close_notify
        obj.call_method0(intern!(py, "_call_eof_received"))?;
        obj.call_method0(intern!(py, "_start_shutdown"))?;
    }
    Ok(())
}

/// One read of `_do_read__buffered` into the buffer from `offset`.
enum BufferRead {
    /// `read` returned this count (0: close_notify).
    Count(usize),
    /// The read raised one of `SSLAgainErrors`.
    Again,
}

/// The reads of `_do_read__buffered` into `buf`, with asyncio's loop: how many bytes it
/// holds after them, and the last read's count (0 for the peer's close_notify; 1, as
/// asyncio starts, when nothing was read). A buffer filled to the end schedules another
/// `_do_read`, as there. Each read decrypts into the buffer's memory, exported
/// writable while the reads run; a read that ends otherwise than with data or "needs
/// more input", and every read into a buffer that cannot be exported so (or is empty),
/// is made through `raw.read(n, buffer)` as asyncio makes it, which raises what
/// asyncio's read raises.
fn read_into_buffer(
    proto: &Proto<'_>,
    raw: &Bound<'_, PyAny>,
    native: NativeSsl,
    buf: &Bound<'_, PyAny>,
    names: &SslProto,
) -> PyResult<(usize, usize)> {
    let py = raw.py();
    let wants = buf.len()?;
    let mut export = WritableExport::of(buf).filter(|export| export.len == wants && wants > 0);
    let mut read = |offset: usize| -> PyResult<BufferRead> {
        if let Some(memory) = &export {
            // SAFETY: the export is writable for `wants` bytes from `ptr` while it lives,
            // and `offset < wants`.
            match unsafe { native.read_raw(memory.ptr.add(offset), wants - offset) } {
                Io::Done(n) => return Ok(BufferRead::Count(n)),
                Io::WantRead => return Ok(BufferRead::Again),
                // Released before `_ssl` (and whatever callback it runs) sees the buffer.
                Io::Other => export = None,
            }
        }
        let target = if offset == 0 {
            buf.clone()
        } else {
            // SAFETY: attached; `buf` is a live object; a new reference or NULL with an
            // error set.
            let view = unsafe {
                Bound::from_owned_ptr_or_err(py, ffi::PyMemoryView_FromObject(buf.as_ptr()))
            }?;
            view.get_item(PySlice::new(py, offset as isize, wants as isize, 1))?
        };
        match raw.call_method1(intern!(py, "read"), (wants - offset, target)) {
            Ok(count) => count.extract().map(BufferRead::Count),
            Err(err) if err.matches(py, names.again.bind(py))? => Ok(BufferRead::Again),
            Err(err) => Err(err),
        }
    };
    let mut offset = 0;
    let mut count = match read(0)? {
        BufferRead::Count(n) => n,
        BufferRead::Again => return Ok((0, 1)),
    };
    offset += count;
    while count > 0 {
        if offset >= wants {
            let again = proto.any().getattr(intern!(py, "_do_read"))?;
            proto
                .any()
                .getattr(intern!(py, "_loop"))?
                .call_method1(intern!(py, "call_soon"), (again,))?;
            break;
        }
        // Drained: the next read could only raise `SSLWantReadError` (as in
        // `read_records_native`).
        if native.read_drained() && !eof_marked(&proto.get(|st| &st.incoming)?)? {
            break;
        }
        match read(offset)? {
            BufferRead::Count(n) => {
                count = n;
                offset += n;
            }
            BufferRead::Again => break,
        }
    }
    drop(export);
    Ok((offset, count))
}

/// A writable, C-contiguous export of a Python buffer (`PyBUF_WRITABLE`), released
/// when dropped.
struct WritableExport {
    view: Box<ffi::Py_buffer>,
    ptr: *mut u8,
    len: usize,
}

impl WritableExport {
    /// `None` (the error cleared) when the object exports no such buffer.
    fn of(obj: &Bound<'_, PyAny>) -> Option<Self> {
        let mut view = Box::new(std::mem::MaybeUninit::<ffi::Py_buffer>::uninit());
        // SAFETY: `obj` is a live object and `view` storage for one Py_buffer, which
        // stays at the one address the exporter saw until it is released.
        if unsafe { ffi::PyObject_GetBuffer(obj.as_ptr(), view.as_mut_ptr(), ffi::PyBUF_WRITABLE) }
            < 0
        {
            drop(PyErr::fetch(obj.py()));
            return None;
        }
        // SAFETY: PyObject_GetBuffer succeeded, so `view` is initialised; `Box<MaybeUninit<T>>`
        // and `Box<T>` have the same layout.
        let view: Box<ffi::Py_buffer> = unsafe { Box::from_raw(Box::into_raw(view).cast()) };
        Some(WritableExport {
            ptr: view.buf.cast(),
            len: usize::try_from(view.len).unwrap_or(0),
            view,
        })
    }
}

impl Drop for WritableExport {
    fn drop(&mut self) {
        // SAFETY: releases the export made in `of` exactly once; the GIL is held
        // (exports are made and dropped within calls from Python).
        unsafe { ffi::PyBuffer_Release(&mut *self.view) };
    }
}

/// An `Exception` (not `KeyboardInterrupt` and the like) ends the connection through
/// `_fatal_error`, as `SSLProtocol`'s `except Exception` blocks do.
fn fatal_on_exception(proto: &Proto<'_>, outcome: PyResult<()>) -> PyResult<()> {
    let py = proto.py();
    match outcome {
        Err(err) if err.is_instance_of::<PyException>(py) => proto
            .any()
            .call_method1(
                intern!(py, "_fatal_error"),
                (err.value(py), "Fatal error on SSL protocol"),
            )
            .map(drop),
        other => other,
    }
}

/// `SSLProtocol._do_read__copied`: every record available, as one `data_received`.
fn do_read_copied(proto: &Proto<'_>, names: &SslProto) -> PyResult<()> {
    let py = proto.py();
    let (sslobj, raw, native) = {
        let st = proto.state()?;
        let bind = |obj: &Option<Py<PyAny>>| obj.as_ref().map(|obj| obj.bind(py).clone());
        (bind(&st.sslobj), bind(&st.raw), st.native)
    };
    let (data, eof) = match (raw, native, sslobj) {
        (Some(raw), Some(native), _) => {
            let incoming = proto.get(|st| &st.incoming)?;
            read_records_native(&raw, native, &incoming, names)?
        }
        (Some(raw), None, _) => read_records(&raw, &proto.get(|st| &st.incoming)?, names)?,
        (None, _, Some(sslobj)) => read_records_wrapped(proto, &sslobj, names)?,
        (None, _, None) => return Err(PyRuntimeError::new_err("SSLProtocol has no SSL object")),
    };
    if let Some(data) = data {
        proto
            .get(|st| &st.app_protocol)?
            .call_method1(intern!(py, "data_received"), (data,))?;
    }
    if eof {
        // close_notify
        proto
            .any()
            .call_method0(intern!(py, "_call_eof_received"))?;
        proto.any().call_method0(intern!(py, "_start_shutdown"))?;
    }
    Ok(())
}

/// The plaintext of every record the TLS object can decrypt now (`None` if there is
/// none), and whether the peer's close_notify came.
type Records<'py> = (Option<Bound<'py, PyAny>>, bool);

/// Reads the records of a stock `ssl.SSLObject` through its C object, into this
/// thread's scratch buffer, then copies the plaintext out into one `bytes`.
///
/// Two costs of asyncio's loop are avoided:
/// - `read(n)` allocates `n` bytes (`max_size`, 256 KiB) for every record and shrinks
///   them. glibc serves and frees blocks that size at the top of its heap, trimming
///   and regrowing it (page faults, `brk`) on some runs and not others.
/// - The last read of each batch only raises `SSLWantReadError`, whose making (a
///   formatted message, attributes) costs about 1 µs, more than a small record's
///   decryption. It is not made when there is nothing left to decrypt: no plaintext
///   pending in the TLS object, no input in its incoming BIO and no EOF marked on it.
///   OpenSSL takes input from the BIO one record at a time (it reads ahead only when
///   `SSL_CTX_set_read_ahead` is set, which Python's `ssl` never does), so a record
///   is in the BIO until it is decrypted.
fn read_records<'py>(
    raw: &Bound<'py, PyAny>,
    incoming: &Bound<'py, PyAny>,
    names: &SslProto,
) -> PyResult<Records<'py>> {
    scratch_reads(raw.py(), Vec::new(), |scratch, filled, some| {
        if some && nothing_to_read(raw, incoming)? {
            return Ok(Step::Done);
        }
        read_through_ssl(scratch, raw, filled, names)
    })
}

/// What one read into the scratch buffer came to.
enum Step {
    Read(usize),
    /// Nothing more to read now.
    Done,
    /// The peer's close_notify.
    Eof,
}

/// Reads records into this thread's scratch buffer, one `step` at a time (given the
/// buffer, how much of it is filled, and whether anything was read yet), until it says
/// `Done` or `Eof`; the plaintext after `parts`, as one `bytes`.
fn scratch_reads<'py>(
    py: Python<'py>,
    mut parts: Vec<Bound<'py, PyAny>>,
    mut step: impl FnMut(&mut Scratch, usize, bool) -> PyResult<Step>,
) -> PyResult<Records<'py>> {
    let mut scratch = Scratch::take();
    let mut filled = 0;
    let mut eof = false;
    loop {
        if filled == scratch.buf.len() {
            parts.push(PyBytes::new(py, &scratch.buf[..filled]).into_any());
            filled = 0;
        }
        match step(&mut scratch, filled, filled > 0 || !parts.is_empty())? {
            Step::Read(n) => filled += n,
            Step::Done => break,
            Step::Eof => {
                eof = true;
                break;
            }
        }
    }
    if filled > 0 {
        parts.push(PyBytes::new(py, &scratch.buf[..filled]).into_any());
    }
    Ok((join_chunks(py, parts)?, eof))
}

/// One `raw.read` into the scratch buffer after `filled` bytes.
fn read_through_ssl(
    scratch: &mut Scratch,
    raw: &Bound<'_, PyAny>,
    filled: usize,
    names: &SslProto,
) -> PyResult<Step> {
    let py = raw.py();
    match scratch.read_into(raw, filled) {
        Ok(0) => Ok(Step::Eof),
        Ok(n) => Ok(Step::Read(n)),
        Err(err) if err.matches(py, names.again.bind(py))? => Ok(Step::Done),
        Err(err) => Err(err),
    }
}

/// [`read_records`] with libssl called natively on `native`, the `SSL` object under
/// `raw` (kept alive by the caller) over the BIO `incoming`. The plaintext is decrypted
/// straight into the `bytes` handed to the protocol, sized by what the TLS object could
/// give now ([`NativeSsl::readable_bound`]) and cut to what it gave. The reads stop
/// once the TLS object and its BIO are drained (unless EOF is marked on the BIO):
/// the read that would follow could only end in `SSL_ERROR_WANT_READ`, and costs
/// about a fifth of a 1 KiB record's decryption (see [`read_records`] on why the BIO
/// holds every record not yet decrypted). A read that ends otherwise than with data
/// or `SSL_ERROR_WANT_READ` (close_notify, an error) is repeated through `raw.read`,
/// which finds the thread's error queue as the native call left it and returns or
/// raises what asyncio's read would.
fn read_records_native<'py>(
    raw: &Bound<'py, PyAny>,
    native: NativeSsl,
    incoming: &Bound<'py, PyAny>,
    names: &SslProto,
) -> PyResult<Records<'py>> {
    let py = raw.py();
    let mut parts = Vec::new();
    // The last native read ended otherwise (its error still queued): `_ssl` repeats it.
    let mut repeat = false;
    let bound = native.readable_bound();
    if bound > 0 {
        // Filled to the brim (the bound can be short: OpenSSL may already hold the
        // start of a record taken from the BIO), the scratch loop below reads on.
        let mut last = Io::Done(0);
        let mut drained = false;
        let data = crate::pyhelpers::bytes_written_by(py, bound, |start, capacity| {
            let mut filled = 0;
            while filled < capacity {
                // SAFETY: `start` is writable for `capacity` bytes, so the rest from
                // `filled` is writable for `capacity - filled`.
                match unsafe { native.read_raw(start.add(filled), capacity - filled) } {
                    Io::Done(n) => {
                        filled += n;
                        if native.read_drained() {
                            drained = true;
                            break;
                        }
                    }
                    other => {
                        last = other;
                        break;
                    }
                }
            }
            Ok(filled)
        })?;
        let data = (!data.as_bytes().is_empty()).then(|| data.into_any());
        if drained && !eof_marked(incoming)? {
            last = Io::WantRead;
        }
        match last {
            // The usual end, with the one `bytes` (no list of parts to make).
            Io::WantRead => return Ok((data, false)),
            Io::Other => repeat = true,
            Io::Done(_) => {}
        }
        parts.extend(data);
    }
    // Nothing was pending (the one read below says whether the stream ended), more
    // may be, or a read must be repeated through `_ssl`.
    scratch_reads(py, parts, |scratch, filled, _| {
        let io = if std::mem::take(&mut repeat) {
            Io::Other
        } else {
            native.read(&mut scratch.buf[filled..])
        };
        match io {
            Io::Done(n) => Ok(Step::Read(n)),
            Io::WantRead => Ok(Step::Done),
            Io::Other => read_through_ssl(scratch, raw, filled, names),
        }
    })
}

/// The records of a TLS object of another class, read as asyncio does.
fn read_records_wrapped<'py>(
    proto: &Proto<'py>,
    sslobj: &Bound<'py, PyAny>,
    names: &SslProto,
) -> PyResult<Records<'py>> {
    let py = proto.py();
    let max_size = max_size(proto)?;
    let mut chunks = Vec::new();
    loop {
        match sslobj.call_method1(intern!(py, "read"), (&max_size,)) {
            Ok(chunk) if chunk.len()? == 0 => return Ok((join_chunks(py, chunks)?, true)),
            Ok(chunk) => chunks.push(chunk),
            Err(err) if err.matches(py, names.again.bind(py))? => break,
            Err(err) => return Err(err),
        }
    }
    Ok((join_chunks(py, chunks)?, false))
}

/// The chunks as one `bytes` (`None` for none), joined only when there are several.
fn join_chunks<'py>(
    py: Python<'py>,
    mut chunks: Vec<Bound<'py, PyAny>>,
) -> PyResult<Option<Bound<'py, PyAny>>> {
    match chunks.len() {
        0 | 1 => Ok(chunks.pop()),
        _ => PyBytes::new(py, b"")
            .call_method1(intern!(py, "join"), (PyList::new(py, chunks)?,))
            .map(Some),
    }
}

/// The scratch buffer records are decrypted into: `max_size` bytes, as asyncio reads.
const SCRATCH_SIZE: usize = 256 * 1024;

thread_local! {
    /// This thread's scratch buffer while no read uses it. `_ssl` releases the GIL in
    /// `SSL_read`, so each thread needs its own; a read that finds it taken (a
    /// callback of the TLS object reading another connection) makes another.
    static SCRATCH: Cell<Option<Box<[u8]>>> = const { Cell::new(None) };
}

/// This thread's scratch buffer, taken for one batch of reads and put back on drop.
struct Scratch {
    buf: Box<[u8]>,
}

impl Scratch {
    fn take() -> Self {
        let buf = SCRATCH
            .with(Cell::take)
            .unwrap_or_else(|| vec![0; SCRATCH_SIZE].into_boxed_slice());
        Scratch { buf }
    }

    /// `raw.read(len, view)` into `buf[at..]`: the number of bytes decrypted (0 at
    /// close_notify).
    fn read_into(&mut self, raw: &Bound<'_, PyAny>, at: usize) -> PyResult<usize> {
        let py = raw.py();
        let room = &mut self.buf[at..];
        let len = room.len();
        with_view(py, room, ffi::PyBUF_WRITE, |view| {
            raw.call_method1(intern!(py, "read"), (len, view))?
                .extract()
        })
    }

    /// `bio.write(buf[..n])`.
    fn write_to(&mut self, bio: &Bound<'_, PyAny>, n: usize) -> PyResult<()> {
        let py = bio.py();
        with_view(py, &mut self.buf[..n], ffi::PyBUF_READ, |view| {
            bio.call_method1(intern!(py, "write"), (view,)).map(drop)
        })
    }
}

/// Calls `f` with a memoryview of `buf` (`flags`: `PyBUF_READ` or `PyBUF_WRITE`) that
/// no longer reaches the memory once `f` returns.
fn with_view<'py, R>(
    py: Python<'py>,
    buf: &mut [u8],
    flags: std::os::raw::c_int,
    f: impl FnOnce(&Bound<'py, PyAny>) -> PyResult<R>,
) -> PyResult<R> {
    // SAFETY: `buf` is valid for `buf.len()` bytes (writable, as it is borrowed
    // mutably) for this whole call, and the view is released below before it returns
    // if anyone kept it, so no reference to the memory outlives the borrow. (`_ssl`
    // reaches the memory through a Py_buffer it releases before returning.)
    let view = unsafe {
        Bound::from_owned_ptr_or_err(
            py,
            ffi::PyMemoryView_FromMemory(
                buf.as_mut_ptr().cast(),
                buf.len() as ffi::Py_ssize_t,
                flags,
            ),
        )
    }?;
    let result = f(&view);
    // SAFETY: a live object, attached.
    if unsafe { ffi::Py_REFCNT(view.as_ptr()) } > 1 {
        // Someone kept the view: release it so the memory can no longer be reached
        // through it.
        view.call_method0(intern!(py, "release"))?;
    }
    result
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        SCRATCH.with(|slot| slot.set(Some(buf)));
    }
}

/// No plaintext pending in the TLS object, no input in its incoming BIO, no EOF marked
/// on it: a read could only raise `SSLWantReadError`.
fn nothing_to_read(raw: &Bound<'_, PyAny>, incoming: &Bound<'_, PyAny>) -> PyResult<bool> {
    let py = raw.py();
    Ok(incoming
        .getattr(intern!(py, "pending"))?
        .extract::<usize>()?
        == 0
        && !incoming.getattr(intern!(py, "eof"))?.is_truthy()?
        && raw
            .call_method0(intern!(py, "pending"))?
            .extract::<usize>()?
            == 0)
}

/// `incoming.eof`: EOF is marked on the BIO and its input is all taken.
fn eof_marked(incoming: &Bound<'_, PyAny>) -> PyResult<bool> {
    incoming.getattr(intern!(incoming.py(), "eof"))?.is_truthy()
}

/// The C object under a stock `ssl.SSLObject` (whose `read`, `write` and `pending` only
/// pass their arguments on), so a read that must wait raises through no Python frame;
/// `None` for an object of a subclass, which is used as it is.
fn raw_sslobj<'py>(sslobj: &Bound<'py, PyAny>) -> PyResult<Option<Bound<'py, PyAny>>> {
    let py = sslobj.py();
    let stock = SSLOBJECT
        .get_or_try_init(py, || {
            py.import("ssl")?.getattr("SSLObject").map(Bound::unbind)
        })?
        .bind(py);
    if sslobj.get_type().is(stock) {
        sslobj.getattr(intern!(py, "_sslobj")).map(Some)
    } else {
        Ok(None)
    }
}

static SSLOBJECT: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

/// `SSLProtocol._do_write`: encrypts the backlog as far as the TLS object takes it.
fn do_write(proto: &Proto<'_>, names: &SslProto) -> PyResult<()> {
    let py = proto.py();
    let backlog = proto.get(|st| &st.write_backlog)?;
    let (sslobj, native) = ssl_writer(proto)?;
    while backlog.is_truthy()? {
        let data = backlog.get_item(0)?;
        let count: usize = match encrypt(&sslobj, native, &data) {
            Ok(count) => count,
            Err(err) if err.matches(py, names.again.bind(py))? => break,
            Err(err) => return Err(err),
        };
        let data_len = data.len()?;
        let written = if count < data_len {
            let rest = data.get_item(PySlice::new(py, count as isize, data_len as isize, 1))?;
            backlog.set_item(0, rest)?;
            count
        } else {
            backlog.call_method0(intern!(py, "popleft"))?;
            data_len
        };
        let mut st = proto.state_mut()?;
        st.write_buffer_size = st
            .write_buffer_size
            .saturating_sub(isize::try_from(written).unwrap_or(isize::MAX));
    }
    process_outgoing(proto)
}

/// `_write_appdata` of one item with the backlog empty, in the WRAPPED state: the item
/// is encrypted without passing through the backlog, which ends as asyncio's would
/// (what the TLS object did not take, queued and counted).
fn write_now(
    proto: &Proto<'_>,
    names: &SslProto,
    backlog: &Bound<'_, PyAny>,
    data: &Bound<'_, PyAny>,
) -> PyResult<()> {
    let py = proto.py();
    let (sslobj, native) = ssl_writer(proto)?;
    match encrypt(&sslobj, native, data) {
        Ok(count) => {
            let data_len = data.len()?;
            if count < data_len {
                let rest = data.get_item(PySlice::new(py, count as isize, data_len as isize, 1))?;
                queue(proto, backlog, &rest)?;
                return do_write(proto, names);
            }
            process_outgoing(proto)
        }
        Err(err) if err.matches(py, names.again.bind(py))? => {
            queue(proto, backlog, data)?;
            process_outgoing(proto)
        }
        Err(err) => {
            queue(proto, backlog, data)?;
            Err(err)
        }
    }
}

/// How much of the file one `sendfile_block` call sends at most (the loop's other
/// callbacks run between calls): four chunks, about 1 MiB. While the socket takes every
/// chunk at once, a call goes on to the next without a task step or a Python call.
const SENDFILE_BLOCK: usize = 4 * SENDFILE_CHUNK;

/// How much of the file one step of `sendfile_block` reads: the scratch buffer less
/// room for the records' headers, tags and padding (a record carries at most 16 KiB of
/// data), so that the ciphertext, read back from the BIO into the same buffer once the
/// plaintext is encrypted, fits there in one piece and goes out in one `send`.
const SENDFILE_CHUNK: usize = SCRATCH_SIZE - 16 * 1024;

/// The reads and writes of one `sendfile` call: chunks of the file read with `pread`
/// into this thread's scratch buffer (the file position stays where
/// `_sendfile_fallback` leaves it) and written (`sendfile_step`) until `count` bytes,
/// the end of the file, or a chunk the socket did not take whole. The number of bytes
/// read (0 at end of file).
fn sendfile_block(
    proto: &Proto<'_>,
    fd: std::os::fd::RawFd,
    offset: i64,
    count: usize,
) -> PyResult<usize> {
    let py = proto.py();
    let direct = direct_transport(proto)?;
    let mut scratch = Scratch::take();
    let mut total = 0;
    while total < count {
        let len = (count - total).min(SENDFILE_CHUNK);
        let at = i64::try_from(total)
            .ok()
            .and_then(|total| offset.checked_add(total))
            .ok_or_else(|| PyRuntimeError::new_err("sendfile offset out of range"))?;
        let n = loop {
            match crate::sys::pread(fd, &mut scratch.buf[..len], at) {
                Ok(n) => break n,
                Err(err) if err.kind() == std::io::ErrorKind::Interrupted => {
                    py.check_signals()?;
                }
                // What this call sent is counted (the file position follows it); the
                // next call reads at the same place and meets the error again.
                Err(_) if total > 0 => return Ok(total),
                Err(err) => return Err(err.into()),
            }
        };
        total += n;
        if n == 0 || !sendfile_step(proto, &mut scratch.buf, n, direct.as_ref())? || n < len {
            break;
        }
    }
    Ok(total)
}

/// Writes the chunk `buf[..n]`. When the connection is up with nothing queued before
/// it and its records are written natively, it is encrypted from `buf` without a `bytes`
/// of the plaintext and, when `direct` is given and the TLS protocol may write, its
/// records are sent from `buf` too (`send_outgoing`); else it is handed to
/// `_write_appdata` as `bytes`, which does what asyncio would (queue, count a lost
/// write). True when the socket took all of it, so that another chunk may follow.
fn sendfile_step(
    proto: &Proto<'_>,
    buf: &mut [u8],
    n: usize,
    direct: Option<&Bound<'_, StreamTransport>>,
) -> PyResult<bool> {
    let py = proto.py();
    let names = sslproto(py)?;
    let (native, writing_paused) = {
        let st = proto.state()?;
        let wrapped = st.state.as_ref().is_some_and(|s| s.is(&names.wrapped));
        let idle = match &st.write_backlog {
            Some(backlog) => backlog.bind(py).len()? == 0,
            None => false,
        };
        (st.native.filter(|_| wrapped && idle), st.ssl_writing_paused)
    };
    // No Python ran since the borrow: the state still holds the object that keeps
    // the `SSL` object.
    if let Some(Io::Done(_)) = native.map(|native| native.write(&buf[..n])) {
        let sent = match direct.filter(|_| !writing_paused) {
            Some(transport) => send_outgoing(proto, transport, buf),
            None => Ok(false),
        };
        let outcome = sent.and_then(|sent| process_outgoing(proto).map(|()| sent));
        return match outcome {
            Ok(sent) => Ok(sent),
            Err(err) => fatal_on_exception(proto, Err(err)).map(|()| false),
        };
    }
    // A native write that did not complete is repeated by `_write_appdata`, in the end
    // through `_ssl`, which raises what asyncio's write would.
    let data = PyBytes::new(py, &buf[..n]);
    write_appdata(proto, Written::One(data.as_any()))?;
    Ok(false)
}

/// Sends the records the TLS object holds from `buf`, into which they are read, while
/// the transport has nothing buffered (`send_or_copy`, which `write` of a `bytearray`
/// uses); what the socket does not take goes to the transport's buffer as `write`
/// would queue it. True when the socket took everything.
fn send_outgoing(
    proto: &Proto<'_>,
    transport: &Bound<'_, StreamTransport>,
    buf: &mut [u8],
) -> PyResult<bool> {
    loop {
        // Looked up for each read: a send that fails runs Python (the transport's
        // fatal error), which may let go of the TLS object.
        let Some(native) = proto.state()?.native else {
            return Ok(false);
        };
        // No Python ran since the borrow.
        let n = native.read_outgoing(buf)?;
        if n == 0 {
            return Ok(true);
        }
        if let Some(rest) = StreamTransport::send_or_copy(transport, &buf[..n])? {
            StreamTransport::queue(transport, std::slice::from_ref(&rest))?;
            return Ok(false);
        }
    }
}

/// The connection's TCP transport when `sendfile` may send records on it itself:
/// ferroloop's stream transport whose `write` is its own. A `write` patched on the
/// transport (as `mock.patch.object` does) or overridden by a subclass receives every
/// record, as asyncio's `_process_outgoing` hands them all to `transport.write`.
fn direct_transport<'py>(proto: &Proto<'py>) -> PyResult<Option<Bound<'py, StreamTransport>>> {
    let py = proto.py();
    let Ok(transport) = proto
        .get(|st| &st.transport)?
        .cast_into::<StreamTransport>()
    else {
        return Ok(None);
    };
    let write = intern!(py, "write");
    let own = py.get_type::<StreamTransport>().getattr(write)?;
    if !transport.get_type().getattr(write)?.is(&own) {
        return Ok(None);
    }
    let patched = match transport.getattr_opt(intern!(py, "__dict__"))? {
        Some(attrs) => attrs.contains(write)?,
        None => false,
    };
    Ok((!patched).then_some(transport))
}

/// What encrypts: the C object under a stock `ssl.SSLObject`, or the object itself,
/// and the `SSL` object under the first when libssl can be called on it.
fn ssl_writer<'py>(proto: &Proto<'py>) -> PyResult<(Bound<'py, PyAny>, Option<NativeSsl>)> {
    let py = proto.py();
    let st = proto.state()?;
    let writer = st
        .raw
        .as_ref()
        .or(st.sslobj.as_ref())
        .map(|obj| obj.bind(py).clone())
        .ok_or_else(|| PyRuntimeError::new_err("SSLProtocol has no SSL object"))?;
    Ok((writer, st.native))
}

/// `sslobj.write(data)`: the number of bytes taken. A `bytes` object is encrypted
/// natively when `native` (the `SSL` object under `sslobj`, which the caller keeps) is
/// there; anything else, and a native write that did not complete, goes through
/// `sslobj.write`, which raises what asyncio's write would (`SSLWantReadError` for a
/// write that must wait).
fn encrypt(
    sslobj: &Bound<'_, PyAny>,
    native: Option<NativeSsl>,
    data: &Bound<'_, PyAny>,
) -> PyResult<usize> {
    if let (Some(native), Ok(bytes)) = (native, data.cast::<PyBytes>()) {
        if let Io::Done(n) = native.write(bytes.as_bytes()) {
            return Ok(n);
        }
    }
    sslobj
        .call_method1(intern!(sslobj.py(), "write"), (data,))?
        .extract()
}

/// `SSLProtocol._process_outgoing`: sends what the TLS object produced.
fn process_outgoing(proto: &Proto<'_>) -> PyResult<()> {
    let py = proto.py();
    let (paused, native, raw) = {
        let st = proto.state()?;
        let raw = st.raw.as_ref().map(|raw| raw.bind(py).clone());
        (st.ssl_writing_paused, st.native, raw)
    };
    if !paused {
        let data = match (native, &raw) {
            // `raw`, held here, keeps the BIO.
            (Some(native), Some(_)) => native.take_outgoing(py)?.map(Bound::into_any),
            _ => {
                let data = proto
                    .get(|st| &st.outgoing)?
                    .call_method0(intern!(py, "read"))?;
                (data.len()? > 0).then_some(data)
            }
        };
        if let Some(data) = data {
            // Through the transport's `write`, looked up: a `write` patched on the
            // transport (as `mock.patch.object` does) receives the records.
            let transport = proto.get(|st| &st.transport)?;
            transport.call_method1(intern!(py, "write"), (data,))?;
        }
    }
    let buffered = usize::try_from(proto.state()?.write_buffer_size).unwrap_or(0);
    control_flow(proto, Direction::AppWriting, buffered)
}

/// The two directions of `SSLProtocol`'s flow control.
#[derive(Clone, Copy)]
enum Direction {
    /// `_control_app_writing`: the protocol's writes, against the outgoing BIO.
    AppWriting,
    /// `_control_ssl_reading`: reading from the transport, against the incoming BIO.
    SslReading,
}

/// Calls the direction's Python method only when the size (the BIO's pending bytes
/// plus `extra`) calls for a pause (at or above the high-water mark, not paused) or a
/// resume (at or below the low-water mark, paused): it decides again and acts.
fn control_flow(proto: &Proto<'_>, direction: Direction, extra: usize) -> PyResult<()> {
    let py = proto.py();
    let (bio, paused, high, low, native) = {
        let st = proto.state()?;
        let (bio, paused, high, low) = match direction {
            Direction::AppWriting => (
                &st.outgoing,
                st.app_writing_paused,
                st.outgoing_high_water,
                st.outgoing_low_water,
            ),
            Direction::SslReading => (
                &st.incoming,
                st.ssl_reading_paused,
                st.incoming_high_water,
                st.incoming_low_water,
            ),
        };
        (
            bio.as_ref().map(|bio| bio.bind(py).clone()),
            paused,
            high,
            low,
            st.native,
        )
    };
    let Some(bio) = bio else {
        return Ok(());
    };
    let pending: usize = match (native, direction) {
        // The state, borrowed above, still holds the object that keeps the BIOs: no
        // Python ran since.
        (Some(native), Direction::AppWriting) => native.outgoing_pending(),
        (Some(native), Direction::SslReading) => native.incoming_pending(),
        (None, _) => bio.getattr(intern!(py, "pending"))?.extract()?,
    };
    let size = isize::try_from(pending.saturating_add(extra)).unwrap_or(isize::MAX);
    let crosses = if paused { size <= low } else { size >= high };
    if crosses {
        let control = match direction {
            Direction::AppWriting => intern!(py, "_control_app_writing"),
            Direction::SslReading => intern!(py, "_control_ssl_reading"),
        };
        proto.any().call_method0(control)?;
    }
    Ok(())
}

/// What the protocol wrote: one object (`write`) or an iterable of them (`writelines`).
enum Written<'a, 'py> {
    One(&'a Bound<'py, PyAny>),
    Many(&'a Bound<'py, PyAny>),
}

/// `SSLProtocol._write_appdata`: queues what the protocol wrote and, once the
/// connection is up, encrypts and sends it.
fn write_appdata(proto: &Proto<'_>, written: Written<'_, '_>) -> PyResult<()> {
    let py = proto.py();
    let names = sslproto(py)?;
    let state = proto.get(|st| &st.state)?;
    if state.is(&names.flushing) || state.is(&names.shutdown) || state.is(&names.unwrapped) {
        // Closing: the Python method counts and logs the lost write.
        let list_of_data = match written {
            Written::One(data) => PyTuple::new(py, [data])?.into_any(),
            Written::Many(list) => list.clone(),
        };
        let base = names.base.bind(py);
        return base
            .getattr(intern!(py, "_write_appdata"))?
            .call1((proto.any(), list_of_data))
            .map(drop);
    }
    let backlog = proto.get(|st| &st.write_backlog)?;
    match written {
        Written::One(data) if state.is(&names.wrapped) && backlog.len()? == 0 => {
            let outcome = write_now(proto, names, &backlog, data);
            return fatal_on_exception(proto, outcome);
        }
        Written::One(data) => queue(proto, &backlog, data)?,
        Written::Many(list) => {
            for data in list.try_iter()? {
                queue(proto, &backlog, &data?)?;
            }
        }
    }
    let outcome = if state.is(&names.wrapped) {
        do_write(proto, names)
    } else {
        Ok(())
    };
    fatal_on_exception(proto, outcome)
}

/// Appends to the backlog and counts it, as `_write_appdata` does for each item.
fn queue(proto: &Proto<'_>, backlog: &Bound<'_, PyAny>, data: &Bound<'_, PyAny>) -> PyResult<()> {
    let py = proto.py();
    backlog.call_method1(intern!(py, "append"), (data,))?;
    let len = isize::try_from(data.len()?).unwrap_or(isize::MAX);
    let mut st = proto.state_mut()?;
    st.write_buffer_size = st.write_buffer_size.saturating_add(len);
    Ok(())
}

/// `_SSLProtocolTransport.write`: checks the data and hands it to the protocol's
/// `_write_appdata` (the Rust one above: the transport is made by ferroloop's
/// `SSLProtocol`), without a one-item tuple.
fn transport_write(transport: &Bound<'_, PyAny>, data: &Bound<'_, PyAny>) -> PyResult<()> {
    let py = transport.py();
    // SAFETY: type checks on a live object while attached.
    let bytes_like = unsafe {
        ffi::PyBytes_Check(data.as_ptr()) != 0
            || ffi::PyByteArray_Check(data.as_ptr()) != 0
            || ffi::PyMemoryView_Check(data.as_ptr()) != 0
    };
    if !bytes_like {
        return Err(PyTypeError::new_err(format!(
            "data: expecting a bytes-like instance, got {}",
            data.get_type().name()?
        )));
    }
    if !data.is_truthy()? {
        return Ok(());
    }
    let protocol = transport.getattr(intern!(py, "_ssl_protocol"))?;
    write_appdata(&Proto::of(protocol.cast::<TlsState>()?), Written::One(data))
}

#[pyfunction]
fn ssl_transport_write(transport: &Bound<'_, PyAny>, data: &Bound<'_, PyAny>) -> PyResult<()> {
    transport_write(transport, data)
}

/// `_SSLProtocolTransport.is_closing`.
#[pyfunction]
fn ssl_transport_is_closing<'py>(transport: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
    transport.getattr(intern!(transport.py(), "_closed"))
}

/// `_SSLProtocolTransport.get_extra_info`, with the steps of the protocol's
/// `_get_extra_info` done here for a protocol of ferroloop's class: its `_extra`
/// first, then its transport's.
#[pyfunction]
#[pyo3(signature = (transport, name, default=None))]
fn ssl_transport_get_extra_info<'py>(
    transport: &Bound<'py, PyAny>,
    name: &Bound<'py, PyAny>,
    default: Option<Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyAny>> {
    let py = transport.py();
    let default = default.unwrap_or_else(|| py.None().into_bound(py));
    let protocol = transport.getattr(intern!(py, "_ssl_protocol"))?;
    let extra = protocol.getattr(intern!(py, "_extra"))?;
    let (Ok(tls), Ok(extra)) = (protocol.cast::<TlsState>(), extra.cast::<PyDict>()) else {
        return protocol.call_method1(intern!(py, "_get_extra_info"), (name, default));
    };
    if let Some(value) = extra.get_item(name)? {
        return Ok(value);
    }
    let inner = Proto::of(tls).get(|st| &st.transport)?;
    if inner.is_none() {
        return Ok(default);
    }
    inner.call_method1(intern!(py, "get_extra_info"), (name, default))
}

unsafe extern "C" {
    /// CPython's `instancemethod`: wraps a callable so that it binds to instances as a
    /// function does (what Cython uses for its methods); not exposed by pyo3-ffi.
    fn PyInstanceMethod_New(func: *mut ffi::PyObject) -> *mut ffi::PyObject;
}

/// The app transport's `write`, `is_closing` and `get_extra_info`, as objects a class
/// body can bind: `{name: instancemethod}`.
#[pyfunction]
pub fn ssl_protocol_methods(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let methods = PyDict::new(py);
    for (name, func) in [
        ("write", wrap_pyfunction!(ssl_transport_write, py)?),
        (
            "is_closing",
            wrap_pyfunction!(ssl_transport_is_closing, py)?,
        ),
        (
            "get_extra_info",
            wrap_pyfunction!(ssl_transport_get_extra_info, py)?,
        ),
    ] {
        // SAFETY: attached; `func` is a live callable; returns a new reference or NULL
        // with an error set.
        let method =
            unsafe { Bound::from_owned_ptr_or_err(py, PyInstanceMethod_New(func.as_ptr())) }?;
        methods.set_item(name, method)?;
    }
    Ok(methods)
}
