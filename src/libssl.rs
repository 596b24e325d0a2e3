//! The libssl that the interpreter's `_ssl` module is loaded with, called from Rust.
//!
//! Nothing is linked at build time and no OpenSSL is bundled: the functions are looked
//! up at run time in the `_ssl` extension already loaded (`dlopen` with `RTLD_NOLOAD`
//! on its file, then `dlsym`, which searches `_ssl` and the libraries it depends on).
//! Every setting of the user's `ssl.SSLContext` therefore applies, because the `SSL`
//! object driven here is the one `SSLContext.wrap_bio` made, in the library that made
//! it.
//!
//! The `SSL *` is read out of the C object under a stock `ssl.SSLObject`
//! (`_ssl._SSLSocket`, whose layout starts `PyObject_HEAD; PyObject *Socket; SSL *ssl`
//! on every CPython 3.x). It is used only after it passed these checks, any failure of
//! which leaves the connection on `_ssl`'s own methods ([`NativeSsl::of`] says why):
//! - the library: loaded as a shared object (not built into the interpreter), every
//!   function found, `OpenSSL_version_num()` equal to `ssl.OPENSSL_VERSION_NUMBER`;
//! - the objects: exactly `ssl.SSLObject` over exactly `_ssl._SSLSocket`, over BIOs of
//!   exactly `_ssl.MemoryBIO`, with `tp_basicsize` large enough for the fields read;
//! - the pointers: `SSL_get_rbio(ssl)` and `SSL_get_wbio(ssl)` are the very `BIO *`
//!   of the two `MemoryBIO` objects (read from their `PyObject_HEAD; BIO *bio`).
//!
//! `FERROLOOP_NATIVE_TLS=0` switches the native calls off for the whole process.

use std::ffi::{c_int, c_ulong, c_void, CStr, CString};
use std::mem::{size_of, transmute};

use pyo3::exceptions::PyRuntimeError;
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyBytes;

/// `SSL_ERROR_*` values of `SSL_get_error` (stable across OpenSSL 1.1 and 3.x).
const SSL_ERROR_WANT_READ: c_int = 2;

type SslPtr = *mut c_void;
type BioPtr = *mut c_void;

/// `int SSL_read_ex(SSL *, void *buf, size_t num, size_t *readbytes)`
type SslReadEx = unsafe extern "C" fn(SslPtr, *mut c_void, usize, *mut usize) -> c_int;
/// `int SSL_write_ex(SSL *, const void *buf, size_t num, size_t *written)`
type SslWriteEx = unsafe extern "C" fn(SslPtr, *const c_void, usize, *mut usize) -> c_int;
/// `int SSL_do_handshake(SSL *)`, `int SSL_shutdown(SSL *)`
type SslStep = unsafe extern "C" fn(SslPtr) -> c_int;
/// `int SSL_get_error(const SSL *, int ret)`
type SslGetError = unsafe extern "C" fn(SslPtr, c_int) -> c_int;
/// `BIO *SSL_get_rbio(const SSL *)`, `BIO *SSL_get_wbio(const SSL *)`
type SslGetBio = unsafe extern "C" fn(SslPtr) -> BioPtr;
/// `int BIO_write(BIO *, const void *data, int dlen)`
type BioWrite = unsafe extern "C" fn(BioPtr, *const c_void, c_int) -> c_int;
/// `int BIO_read(BIO *, void *data, int dlen)`
type BioRead = unsafe extern "C" fn(BioPtr, *mut c_void, c_int) -> c_int;
/// `int SSL_pending(const SSL *)`
type SslPending = unsafe extern "C" fn(SslPtr) -> c_int;
/// `unsigned long ERR_peek_error(void)`
type ErrPeekError = unsafe extern "C" fn() -> c_ulong;
/// `size_t BIO_ctrl_pending(BIO *)`
type BioCtrlPending = unsafe extern "C" fn(BioPtr) -> usize;
/// `void ERR_clear_error(void)`
type ErrClearError = unsafe extern "C" fn();
/// `unsigned long OpenSSL_version_num(void)`
type OpenSslVersionNum = unsafe extern "C" fn() -> c_ulong;

/// The functions used (OpenSSL 1.1.1 and 3.x).
struct Functions {
    ssl_read_ex: SslReadEx,
    ssl_write_ex: SslWriteEx,
    ssl_get_error: SslGetError,
    ssl_do_handshake: SslStep,
    ssl_shutdown: SslStep,
    ssl_pending: SslPending,
    err_peek_error: ErrPeekError,
    ssl_get_rbio: SslGetBio,
    ssl_get_wbio: SslGetBio,
    bio_write: BioWrite,
    bio_read: BioRead,
    bio_ctrl_pending: BioCtrlPending,
    err_clear_error: ErrClearError,
}

/// The library, or why it cannot be used.
static LIBRARY: PyOnceLock<Result<Functions, String>> = PyOnceLock::new();

fn library(py: Python<'_>) -> &'static Result<Functions, String> {
    LIBRARY.get_or_init(py, || {
        if std::env::var("FERROLOOP_NATIVE_TLS").is_ok_and(|v| v == "0") {
            return Err("FERROLOOP_NATIVE_TLS=0".to_owned());
        }
        load(py).map_err(|err| err.to_string())
    })
}

/// Why TLS records cannot be read and written natively in this process (`None` when
/// they can): the libssl of `_ssl` unreachable, another version, or switched off.
#[pyfunction]
pub fn native_tls_unavailable(py: Python<'_>) -> Option<String> {
    library(py).as_ref().err().cloned()
}

fn load(py: Python<'_>) -> PyResult<Functions> {
    let module = py.import("_ssl")?;
    let Ok(file) = module.getattr("__file__") else {
        return Err(PyRuntimeError::new_err(
            "_ssl is built into the interpreter: its libssl's symbols cannot be reached",
        ));
    };
    let path = CString::new(file.extract::<String>()?)?;
    // SAFETY: `path` is a NUL-terminated string; RTLD_NOLOAD only returns a handle to
    // an object already loaded (the `_ssl` module imported above, which stays loaded
    // for the life of the process: CPython never unloads extension modules), adding a
    // reference that is never dropped, so the functions found stay valid.
    let handle = unsafe { libc::dlopen(path.as_ptr(), libc::RTLD_NOW | libc::RTLD_NOLOAD) };
    if handle.is_null() {
        return Err(unreachable_library("_ssl is not loaded as a shared object"));
    }
    let find = |name: &CStr| -> PyResult<*mut c_void> {
        // SAFETY: a live handle and a NUL-terminated name.
        let symbol = unsafe { libc::dlsym(handle, name.as_ptr()) };
        if symbol.is_null() {
            Err(unreachable_library(&format!(
                "{} not found beside _ssl",
                name.to_string_lossy()
            )))
        } else {
            Ok(symbol)
        }
    };
    // SAFETY: the symbol is OpenSSL's function of that name, of that prototype.
    let version =
        unsafe { transmute::<*mut c_void, OpenSslVersionNum>(find(c"OpenSSL_version_num")?) };
    // SAFETY: a function of the loaded library, without arguments.
    let loaded = unsafe { version() };
    let expected: c_ulong = py
        .import("ssl")?
        .getattr("OPENSSL_VERSION_NUMBER")?
        .extract()?;
    if loaded != expected {
        return Err(unreachable_library(&format!(
            "OpenSSL_version_num() is {loaded:#x}, ssl.OPENSSL_VERSION_NUMBER {expected:#x}"
        )));
    }
    // SAFETY (every transmute below): each symbol is the OpenSSL function of that
    // name, whose C prototype is the one its type alias documents and spells (pointers
    // as `*mut c_void`, `size_t` as `usize`, `int` as `c_int`).
    unsafe {
        Ok(Functions {
            ssl_read_ex: transmute::<*mut c_void, SslReadEx>(find(c"SSL_read_ex")?),
            ssl_write_ex: transmute::<*mut c_void, SslWriteEx>(find(c"SSL_write_ex")?),
            ssl_get_error: transmute::<*mut c_void, SslGetError>(find(c"SSL_get_error")?),
            ssl_do_handshake: transmute::<*mut c_void, SslStep>(find(c"SSL_do_handshake")?),
            ssl_shutdown: transmute::<*mut c_void, SslStep>(find(c"SSL_shutdown")?),
            ssl_pending: transmute::<*mut c_void, SslPending>(find(c"SSL_pending")?),
            err_peek_error: transmute::<*mut c_void, ErrPeekError>(find(c"ERR_peek_error")?),
            ssl_get_rbio: transmute::<*mut c_void, SslGetBio>(find(c"SSL_get_rbio")?),
            ssl_get_wbio: transmute::<*mut c_void, SslGetBio>(find(c"SSL_get_wbio")?),
            bio_write: transmute::<*mut c_void, BioWrite>(find(c"BIO_write")?),
            bio_read: transmute::<*mut c_void, BioRead>(find(c"BIO_read")?),
            bio_ctrl_pending: transmute::<*mut c_void, BioCtrlPending>(find(c"BIO_ctrl_pending")?),
            err_clear_error: transmute::<*mut c_void, ErrClearError>(find(c"ERR_clear_error")?),
        })
    }
}

fn unreachable_library(why: &str) -> PyErr {
    PyRuntimeError::new_err(why.to_owned())
}

/// The classes the native path knows.
struct Classes {
    sslobject: Py<PyAny>,
    sslsocket: Py<PyAny>,
    memory_bio: Py<PyAny>,
}

static CLASSES: PyOnceLock<Classes> = PyOnceLock::new();

fn classes(py: Python<'_>) -> PyResult<&Classes> {
    CLASSES.get_or_try_init(py, || {
        let ssl = py.import("_ssl")?;
        Ok(Classes {
            sslobject: py.import("ssl")?.getattr("SSLObject")?.unbind(),
            sslsocket: ssl.getattr("_SSLSocket")?.unbind(),
            memory_bio: ssl.getattr("MemoryBIO")?.unbind(),
        })
    })
}

/// The `SSL` object of one connection and its two memory BIOs, valid while the
/// `_ssl._SSLSocket` it was read from is alive (the holder keeps that object: see
/// [`NativeSsl::of`]). A copy is used outside the holder's borrow, while the caller
/// holds that object itself.
#[derive(Clone, Copy)]
pub struct NativeSsl {
    functions: &'static Functions,
    ssl: SslPtr,
    rbio: BioPtr,
    wbio: BioPtr,
}

// SAFETY: the pointers are used only through `&self` by the one object holding it, on
// the loop's thread: under the GIL (the module declares `gil_used`), or in the one call
// made with the GIL released (`SSL_do_handshake`), whose frame holds the object that
// owns the `SSL` and during which ferroloop touches it nowhere else. Another thread
// could reach it only through the `ssl.SSLObject`, which `_ssl` leaves exposed the same
// way while it releases the GIL around the same call.
unsafe impl Send for NativeSsl {}
// SAFETY: as for `Send`.
unsafe impl Sync for NativeSsl {}

/// What a read or write did.
pub enum Io {
    /// This many bytes were decrypted (read) or taken (write).
    Done(usize),
    /// The TLS object needs more input (`SSLWantReadError`).
    WantRead,
    /// Anything else (an error, close_notify, a write that must wait): the caller
    /// repeats the operation through `_ssl`'s own method, which finds the thread's
    /// OpenSSL error queue as this call left it and raises (or returns) what stock
    /// asyncio would see.
    Other,
}

/// What one `SSL_shutdown` did.
pub enum Shutdown {
    /// Both close_notify alerts are through (1).
    Complete,
    /// Ours is written to the outgoing BIO, the peer's has not come (0).
    Sent,
    /// Waiting for the peer's close_notify (`SSL_ERROR_WANT_READ`).
    WantRead,
    /// Anything else: an error, its queue left for `_ssl` to report.
    Other,
}

impl NativeSsl {
    /// The native view of `sslobj` with its C object `raw` and memory BIOs, or why
    /// there is none. The caller must keep `raw` alive as long as it uses the result.
    pub fn of(
        sslobj: &Bound<'_, PyAny>,
        raw: &Bound<'_, PyAny>,
        incoming: &Bound<'_, PyAny>,
        outgoing: &Bound<'_, PyAny>,
    ) -> Result<NativeSsl, String> {
        let py = sslobj.py();
        let functions: &'static Functions = library(py).as_ref().map_err(Clone::clone)?;
        let classes = classes(py).map_err(|err| err.to_string())?;
        let exactly = |obj: &Bound<'_, PyAny>, class: &Py<PyAny>| obj.get_type().is(class);
        if !exactly(sslobj, &classes.sslobject) {
            return Err(format!("{} is not ssl.SSLObject", type_name(sslobj)));
        }
        if !exactly(raw, &classes.sslsocket) {
            return Err(format!("{} is not _ssl._SSLSocket", type_name(raw)));
        }
        if !exactly(incoming, &classes.memory_bio) || !exactly(outgoing, &classes.memory_bio) {
            return Err("the BIOs are not _ssl.MemoryBIO".to_owned());
        }
        let head = size_of::<ffi::PyObject>();
        // `_SSLSocket`: PyObject_HEAD, PyObject *Socket, SSL *ssl; `MemoryBIO`:
        // PyObject_HEAD, BIO *bio.
        let ssl_offset = head + size_of::<*mut ffi::PyObject>();
        let bio_offset = head;
        if basic_size(raw) < ssl_offset + size_of::<SslPtr>()
            || basic_size(incoming) < bio_offset + size_of::<BioPtr>()
        {
            return Err("_ssl's objects are smaller than the fields read".to_owned());
        }
        // SAFETY: the objects are of exactly those `_ssl` classes (checked above),
        // whose instances are at least that large, and the fields at those offsets are
        // pointer-sized and aligned (they follow the pointer-aligned head).
        let (ssl, rbio_seen, wbio_seen) = unsafe {
            (
                read_pointer(raw, ssl_offset),
                read_pointer(incoming, bio_offset),
                read_pointer(outgoing, bio_offset),
            )
        };
        if ssl.is_null() {
            return Err("the SSL object is not made yet".to_owned());
        }
        // SAFETY: `ssl` is the `SSL *` of a live `_SSLSocket` (field checked above),
        // which owns it until the object is freed; the getters only read it.
        let (rbio, wbio) =
            unsafe { ((functions.ssl_get_rbio)(ssl), (functions.ssl_get_wbio)(ssl)) };
        if rbio != rbio_seen || wbio != wbio_seen {
            return Err("the SSL object's BIOs are not the MemoryBIOs given".to_owned());
        }
        Ok(NativeSsl {
            functions,
            ssl,
            rbio,
            wbio,
        })
    }

    /// `incoming.write(data)`: the BIO copies it. False if it did not take it all.
    pub fn feed(&self, data: &[u8]) -> bool {
        let Ok(len) = c_int::try_from(data.len()) else {
            return false;
        };
        // SAFETY: a live BIO (the holder keeps its owner alive); `data` is valid for
        // `len` bytes during the call, and a memory BIO copies it.
        let written = unsafe { (self.functions.bio_write)(self.rbio, data.as_ptr().cast(), len) };
        written == len
    }

    /// One `SSL_read_ex` into `buf`.
    pub fn read(&self, buf: &mut [u8]) -> Io {
        // SAFETY: `buf` is writable for its length.
        unsafe { self.read_raw(buf.as_mut_ptr(), buf.len()) }
    }

    /// One `SSL_read_ex` of at most `len` bytes to `start`.
    ///
    /// # Safety
    /// `start` must be writable for `len` bytes (initialised or not).
    pub unsafe fn read_raw(&self, start: *mut u8, len: usize) -> Io {
        let read = self.functions.ssl_read_ex;
        // SAFETY: `start` is writable for `len` bytes (the caller's contract).
        self.io(|ssl, n| unsafe { read(ssl, start.cast(), len, n) })
    }

    /// About how much plaintext reads could give now: what the TLS object holds
    /// decrypted plus the ciphertext in its incoming BIO (a record's plaintext is never
    /// longer than the record). It can fall short: OpenSSL may already have taken the
    /// start of a record out of the BIO into its own buffer.
    pub fn readable_bound(&self) -> usize {
        // SAFETY: a live SSL object; the call only reads its state.
        let decrypted = unsafe { (self.functions.ssl_pending)(self.ssl) };
        usize::try_from(decrypted).unwrap_or(0) + self.incoming_pending()
    }

    /// One `SSL_write_ex` of `data`: without `SSL_MODE_ENABLE_PARTIAL_WRITE`, which
    /// `_ssl` does not set, it takes all of it or nothing.
    pub fn write(&self, data: &[u8]) -> Io {
        let write = self.functions.ssl_write_ex;
        // SAFETY: `data` is readable for its length during the call.
        self.io(|ssl, n| unsafe { write(ssl, data.as_ptr().cast(), data.len(), n) })
    }

    /// One `SSL_do_handshake`: `Done` once the handshake is complete, `WantRead` while
    /// it waits for the peer, `Other` for anything else (an error, with the thread's
    /// error queue left as the call left it for `_ssl` to report).
    pub fn handshake(&self) -> Io {
        let step = self.functions.ssl_do_handshake;
        // SAFETY: a live SSL object (the caller holds its owner), used on this thread,
        // possibly with the GIL released as `_ssl` releases it for this call (see the
        // `Send` impl).
        self.io(|ssl, _| unsafe { step(ssl) })
    }

    /// One `SSL_shutdown`, with the thread's error queue emptied first.
    pub fn shutdown(&self) -> Shutdown {
        let f = self.functions;
        // SAFETY: as in `handshake`.
        let ret = unsafe {
            (f.err_clear_error)();
            (f.ssl_shutdown)(self.ssl)
        };
        match ret {
            1 => Shutdown::Complete,
            0 => Shutdown::Sent,
            // SAFETY: as above; `ret` is what the call returned.
            _ if unsafe { (f.ssl_get_error)(self.ssl, ret) } == SSL_ERROR_WANT_READ => {
                Shutdown::WantRead
            }
            _ => Shutdown::Other,
        }
    }

    /// One read or write `op` (given the `SSL *` and where to put the byte count) with
    /// the thread's error queue emptied first, as `SSL_get_error` needs, and its outcome.
    /// The queue is almost always empty already: `ERR_clear_error` walks and frees
    /// every slot of it (about 840 instructions on OpenSSL 3.0, against about 200 for
    /// `ERR_peek_error`, which skips what is marked cleared just as `SSL_get_error`
    /// does), so it is called only when something is there.
    fn io(&self, op: impl FnOnce(SslPtr, *mut usize) -> c_int) -> Io {
        let f = self.functions;
        let mut n = 0usize;
        // SAFETY: `ssl` is live (the holder keeps its owner) and used on this thread
        // (under the GIL, but for the handshake step: see the `Send` impl), as `_ssl`
        // uses it; the error functions act on this thread's queue.
        unsafe {
            if (f.err_peek_error)() != 0 {
                (f.err_clear_error)();
            }
        }
        let ok = op(self.ssl, &mut n);
        // SAFETY: as above; `ok` is what the call returned.
        let error = unsafe { (f.ssl_get_error)(self.ssl, ok) };
        outcome(ok, error, n)
    }

    /// `MemoryBIO.pending` of the incoming BIO.
    pub fn incoming_pending(&self) -> usize {
        // SAFETY: a live BIO; the call only reads its length.
        unsafe { (self.functions.bio_ctrl_pending)(self.rbio) }
    }

    /// `MemoryBIO.pending` of the outgoing BIO.
    pub fn outgoing_pending(&self) -> usize {
        // SAFETY: a live BIO; the call only reads its length.
        unsafe { (self.functions.bio_ctrl_pending)(self.wbio) }
    }

    /// `outgoing.read()` when something is there: everything the TLS object produced,
    /// as one `bytes`.
    pub fn take_outgoing<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyBytes>>> {
        let pending = self.outgoing_pending();
        if pending == 0 {
            return Ok(None);
        }
        let len = c_int::try_from(pending)
            .map_err(|_| PyRuntimeError::new_err("outgoing BIO larger than 2 GiB"))?;
        let bytes = crate::pyhelpers::bytes_written_by(py, pending, |start, _| {
            // SAFETY: a live BIO; `start` is writable for `pending` (= `len`) bytes and
            // the BIO holds that many, which a memory BIO hands out in one read.
            let read = unsafe { (self.functions.bio_read)(self.wbio, start.cast(), len) };
            if read == len {
                Ok(pending)
            } else {
                Err(PyRuntimeError::new_err("short read from a memory BIO"))
            }
        })?;
        Ok(Some(bytes))
    }

    /// Up to `buf.len()` bytes of what the TLS object produced, read into `buf` (which a
    /// memory BIO fills as far as it holds): the number read, 0 when it holds nothing.
    pub fn read_outgoing(&self, buf: &mut [u8]) -> PyResult<usize> {
        let want = buf.len().min(self.outgoing_pending());
        if want == 0 {
            return Ok(0);
        }
        let len = c_int::try_from(want)
            .map_err(|_| PyRuntimeError::new_err("read of 2 GiB or more from a memory BIO"))?;
        // SAFETY: a live BIO holding at least `len` bytes; `buf` is writable for `len`.
        let read = unsafe { (self.functions.bio_read)(self.wbio, buf.as_mut_ptr().cast(), len) };
        if read == len {
            Ok(want)
        } else {
            Err(PyRuntimeError::new_err("short read from a memory BIO"))
        }
    }

    /// Nothing decrypted waiting in the TLS object and no ciphertext in its incoming
    /// BIO: unless EOF is marked on that BIO, another read can only say it needs more
    /// input.
    pub fn read_drained(&self) -> bool {
        // SAFETY: a live SSL object; the call only reads its state.
        let decrypted = unsafe { (self.functions.ssl_pending)(self.ssl) };
        decrypted <= 0 && self.incoming_pending() == 0
    }
}

fn outcome(ok: c_int, error: c_int, n: usize) -> Io {
    if ok == 1 {
        Io::Done(n)
    } else if error == SSL_ERROR_WANT_READ {
        Io::WantRead
    } else {
        Io::Other
    }
}

fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type()
        .name()
        .map(|name| name.to_string())
        .unwrap_or_else(|_| "?".to_owned())
}

fn basic_size(obj: &Bound<'_, PyAny>) -> usize {
    // SAFETY: the type object of a live object; `tp_basicsize` is a plain field.
    let size = unsafe { (*ffi::Py_TYPE(obj.as_ptr())).tp_basicsize };
    usize::try_from(size).unwrap_or(0)
}

/// The pointer stored `offset` bytes into `obj`.
///
/// # Safety
/// `obj` must be at least `offset + size_of::<*mut c_void>()` bytes and hold a
/// pointer-aligned pointer at `offset`.
unsafe fn read_pointer(obj: &Bound<'_, PyAny>, offset: usize) -> *mut c_void {
    // SAFETY: guaranteed by the caller.
    unsafe {
        obj.as_ptr()
            .cast::<u8>()
            .add(offset)
            .cast::<*mut c_void>()
            .read()
    }
}
