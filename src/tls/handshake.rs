//! The handshake and shutdown steps of asyncio's `SSLProtocol` (`_do_handshake` and
//! `_do_shutdown`, the same in Python 3.11 to 3.13) on the `SSL` object of a stock
//! `ssl.SSLObject`, through the interpreter's own libssl (`libssl.rs`).
//!
//! Each step runs `SSL_do_handshake` or `SSL_shutdown` natively and sorts the outcome
//! as asyncio's `try` does: done, waiting for the peer (`SSLAgainErrors`: the outgoing
//! BIO is flushed to the transport, as `_process_outgoing` does), or an error, which is
//! made by `_ssl` itself so that the exception is asyncio's to the last attribute
//! (`SSLCertVerificationError.verify_code`, `library`, `reason`, the message). What
//! happens once after the step is asyncio's Python (`_on_shutdown_complete`, a failed
//! handshake's `_on_handshake_complete`), except a successful handshake's end
//! (`handshake_complete`).
//!
//! The user's context runs inside libssl as it would under `_ssl`: SNI callback, ALPN,
//! client certificates, session tickets and renegotiation (asyncio adds nothing to
//! OpenSSL's defaults there, and neither does this) are properties of the `SSL` object
//! `SSLContext.wrap_bio` made.
//!
//! Two kinds of connection keep asyncio's methods for these steps (besides those whose
//! records go through `_ssl`'s methods, `_ferroloop_tls_path`): a context with a
//! `keylog_filename` or a `_msg_callback`. `_ssl`'s callbacks for those store what they
//! raise (a keylog file that cannot be written) in the `_ssl._SSLSocket`, and only
//! `_ssl`'s own methods raise it at the end of the step; a native step would leave it
//! to be raised by a later, unrelated call.

use pyo3::intern;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;

use super::{process_outgoing, sslproto, Proto, TlsState};
use crate::libssl::{Io, NativeSsl, Shutdown};

/// How a handshake or shutdown step ended, sorted as asyncio's `except` clauses sort it.
enum Step<'py> {
    Done,
    /// One of `SSLAgainErrors`: the step waits for the peer.
    Again,
    /// An `ssl.SSLError`, handed to `_on_handshake_complete` / `_on_shutdown_complete`.
    Failed(Bound<'py, PyAny>),
}

static SSL_ERROR: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

/// The outcome of a step made through `_ssl`'s method: its exception, if any, sorted.
/// An exception of no `except` clause of asyncio's propagates, as there.
fn sort<'py>(py: Python<'py>, made: PyResult<Bound<'py, PyAny>>) -> PyResult<Step<'py>> {
    let err = match made {
        Ok(_) => return Ok(Step::Done),
        Err(err) => err,
    };
    let again = &sslproto(py)?.again;
    if err.matches(py, again.bind(py))? {
        return Ok(Step::Again);
    }
    let ssl_error = SSL_ERROR.get_or_try_init(py, || {
        py.import("ssl")?.getattr("SSLError").map(Bound::unbind)
    })?;
    if err.matches(py, ssl_error.bind(py))? {
        Ok(Step::Failed(err.into_value(py).into_bound(py).into_any()))
    } else {
        Err(err)
    }
}

/// The C object under the connection's stock `ssl.SSLObject` and its native `SSL`
/// object, when the steps can run natively (see the module's comment); `None` leaves
/// them to asyncio's methods.
fn native_steps<'py>(proto: &Proto<'py>) -> PyResult<Option<(Bound<'py, PyAny>, NativeSsl)>> {
    let py = proto.py();
    let (raw, native) = {
        let st = proto.state()?;
        (st.raw.as_ref().map(|raw| raw.bind(py).clone()), st.native)
    };
    let (Some(raw), Some(native)) = (raw, native) else {
        return Ok(None);
    };
    // Read before the step: an `sni_callback` that switches to a context with a keylog
    // file during the handshake gets the native step, and a failed keylog write is then
    // raised by `_ssl`'s next call on the connection, not at the handshake's end.
    let context = raw.getattr(intern!(py, "context"))?;
    let callbacks_store_errors = !context.getattr(intern!(py, "keylog_filename"))?.is_none()
        || !msg_callback(&context)?.is_none();
    Ok((!callbacks_store_errors).then_some((raw, native)))
}

static MSG_CALLBACK: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

/// The context's message callback as `_ssl` stores it. `ssl.SSLContext._msg_callback`
/// is a Python property over this one that gives `None` exactly when it is `None`;
/// reading `_ssl`'s own descriptor saves a Python call per step.
fn msg_callback<'py>(context: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
    let py = context.py();
    let descriptor = MSG_CALLBACK.get_or_try_init(py, || {
        py.import("_ssl")?
            .getattr("_SSLContext")?
            .getattr("_msg_callback")
            .map(Bound::unbind)
    })?;
    descriptor
        .bind(py)
        .call_method1(intern!(py, "__get__"), (context,))
}

/// asyncio's own method `name` of `SSLProtocol`, on this protocol.
pub(super) fn asyncio_step(
    proto: &Proto<'_>,
    name: &Bound<'_, pyo3::types::PyString>,
) -> PyResult<()> {
    let py = proto.py();
    sslproto(py)?
        .base
        .bind(py)
        .getattr(name)?
        .call1((proto.any(),))
        .map(drop)
}

/// `SSLProtocol._start_handshake`: the state set to `DO_HANDSHAKE`, the timeout
/// scheduled, the first step made. In debug mode (asyncio logs the start and times the
/// handshake) asyncio's method runs.
pub(super) fn start_handshake(proto: &Proto<'_>) -> PyResult<()> {
    let py = proto.py();
    let obj = proto.any();
    if loop_debug(obj)? {
        return asyncio_step(proto, intern!(py, "_start_handshake"));
    }
    obj.setattr(intern!(py, "_handshake_start_time"), py.None())?;
    TlsState::_set_state(&proto.obj, sslproto(py)?.do_handshake.bind(py))?;
    let timeout = obj.getattr(intern!(py, "_ssl_handshake_timeout"))?;
    let handle = obj.getattr(intern!(py, "_loop"))?.call_method1(
        intern!(py, "call_later"),
        (timeout, handshake_timeout_callback(obj)?),
    )?;
    obj.setattr(intern!(py, "_handshake_timeout_handle"), handle)?;
    do_handshake(proto)
}

/// The protocol's loop is in debug mode, where asyncio logs and times the handshake.
fn loop_debug(obj: &Bound<'_, PyAny>) -> PyResult<bool> {
    let py = obj.py();
    obj.getattr(intern!(py, "_loop"))?
        .call_method0(intern!(py, "get_debug"))?
        .is_truthy()
}

/// `functools.partial` and `operator.methodcaller("_check_handshake_timeout")`.
static TIMEOUT_CALLBACK_PARTS: PyOnceLock<(Py<PyAny>, Py<PyAny>)> = PyOnceLock::new();

/// The handshake timeout's callback as asyncio schedules it: on 3.13 the bound method
/// `_check_handshake_timeout`; before, a lambda that looks the method up when it runs,
/// which `partial(methodcaller(name), self)` does too, without a Python frame.
fn handshake_timeout_callback<'py>(obj: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
    let py = obj.py();
    let name = intern!(py, "_check_handshake_timeout");
    if py.version_info() >= (3, 13) {
        return obj.getattr(name);
    }
    let (partial, method_caller) = TIMEOUT_CALLBACK_PARTS.get_or_try_init(py, || {
        let partial = py.import("functools")?.getattr("partial")?.unbind();
        let caller = py
            .import("operator")?
            .getattr("methodcaller")?
            .call1((name,))?;
        PyResult::Ok((partial, caller.unbind()))
    })?;
    partial.bind(py).call1((method_caller, obj))
}

/// `SSLProtocol._do_handshake`.
///
/// An outcome other than done or "needs more input" is repeated through `_ssl`'s
/// `do_handshake` on the same object, which raises the exception asyncio would. The
/// repeat finds what the native call left, because:
/// - the thread's OpenSSL error queue is as the native call left it: nothing runs in
///   between on this thread (no Python code, no OpenSSL call), and `_ssl`'s method
///   does not empty the queue before calling `SSL_do_handshake`;
/// - after a fatal error OpenSSL's handshake state machine is in its error state, and
///   `SSL_do_handshake` called again returns -1 at once, adding nothing to the queue
///   and sending nothing: `_ssl` reads the same first error (`SSL_get_error` gives
///   `SSL_ERROR_SSL` again) and the same `SSL_get_verify_result` for
///   `SSLCertVerificationError`;
/// - an outcome that is not fatal (`SSL_ERROR_SYSCALL` at the incoming BIO's EOF,
///   `SSL_ERROR_ZERO_RETURN` after the peer's close_notify) depends only on the BIO and
///   the `SSL` object's state, which the first call left unchanged for the second.
///
/// The outgoing BIO is not flushed on an error, as asyncio does not flush it there.
pub(super) fn do_handshake(proto: &Proto<'_>) -> PyResult<()> {
    let py = proto.py();
    let Some((raw, native)) = native_steps(proto)? else {
        return asyncio_step(proto, intern!(py, "_do_handshake"));
    };
    // The handshake's public-key operations take hundreds of microseconds: other
    // threads run meanwhile, as under `_ssl`, which releases the GIL around
    // `SSL_do_handshake` too (`_ssl`'s callbacks take it back with `PyGILState_Ensure`).
    // `raw`, held here, keeps the `SSL` object.
    let step = match py.detach(|| native.handshake()) {
        Io::Done(_) => Step::Done,
        Io::WantRead => Step::Again,
        Io::Other => sort(py, raw.call_method0(intern!(py, "do_handshake")))?,
    };
    let complete = intern!(py, "_on_handshake_complete");
    match step {
        Step::Again => process_outgoing(proto),
        Step::Done => handshake_complete(proto, &raw),
        Step::Failed(exc) => proto.any().call_method1(complete, (exc,)).map(drop),
    }
}

/// `SSLProtocol._on_handshake_complete(None)` for a stock `ssl.SSLObject` whose C object
/// is `raw`: its `getpeercert`, `cipher` and `compression` are `raw`'s, called without
/// their Python wrappers in `ssl.py`. With the loop in debug mode (asyncio logs the
/// handshake's time) or in a state `_set_state(WRAPPED)` refuses, asyncio's method runs.
fn handshake_complete(proto: &Proto<'_>, raw: &Bound<'_, PyAny>) -> PyResult<()> {
    let py = proto.py();
    let names = sslproto(py)?;
    let obj = proto.any();
    if loop_debug(obj)? || !proto.get(|st| &st.state)?.is(&names.do_handshake) {
        let complete = intern!(py, "_on_handshake_complete");
        return obj.call_method1(complete, (py.None(),)).map(drop);
    }
    let timeout = intern!(py, "_handshake_timeout_handle");
    let handle = obj.getattr(timeout)?;
    if !handle.is_none() {
        handle.call_method0(intern!(py, "cancel"))?;
        obj.setattr(timeout, py.None())?;
    }
    proto.state_mut()?.state = Some(names.wrapped.clone_ref(py));
    let peercert = match raw.call_method1(intern!(py, "getpeercert"), (false,)) {
        Ok(peercert) => peercert,
        Err(err) if err.is_instance_of::<pyo3::exceptions::PyException>(py) => {
            return handshake_failed(proto, err.into_value(py).into_bound(py).into_any());
        }
        Err(err) => return Err(err),
    };
    let extra = obj.getattr(intern!(py, "_extra"))?;
    let cipher = raw.call_method0(intern!(py, "cipher"))?;
    let compression = raw.call_method0(intern!(py, "compression"))?;
    extra.set_item(intern!(py, "peercert"), peercert)?;
    extra.set_item(intern!(py, "cipher"), cipher)?;
    extra.set_item(intern!(py, "compression"), compression)?;
    extra.set_item(intern!(py, "ssl_object"), proto.get(|st| &st.sslobj)?)?;
    let app_state = intern!(py, "_app_state");
    if obj.getattr(app_state)?.eq(&names.app_init)? {
        obj.setattr(app_state, &names.app_con_made)?;
        let transport = obj.getattr(intern!(py, "_app_transport"))?;
        let transport = if transport.is_none() {
            obj.call_method0(intern!(py, "_get_app_transport"))?
        } else {
            transport
        };
        proto
            .get(|st| &st.app_protocol)?
            .call_method1(intern!(py, "connection_made"), (transport,))?;
    }
    let waiter_name = intern!(py, "_waiter");
    let waiter = obj.getattr(waiter_name)?;
    if !waiter.is_none() {
        if !waiter.call_method0(intern!(py, "cancelled"))?.is_truthy()? {
            waiter.call_method1(intern!(py, "set_result"), (py.None(),))?;
        }
        obj.setattr(waiter_name, py.None())?;
    }
    obj.call_method0(intern!(py, "_do_read")).map(drop)
}

/// The `except` branch of `_on_handshake_complete`, for a `getpeercert` that raised.
fn handshake_failed(proto: &Proto<'_>, exc: Bound<'_, PyAny>) -> PyResult<()> {
    let py = proto.py();
    let obj = proto.any();
    obj.call_method1(intern!(py, "_set_state"), (&sslproto(py)?.unwrapped,))?;
    let certificate_error = py.import("ssl")?.getattr("CertificateError")?;
    let msg = if exc.is_instance(&certificate_error)? {
        "SSL handshake failed on verifying the certificate"
    } else {
        "SSL handshake failed"
    };
    obj.call_method1(intern!(py, "_fatal_error"), (&exc, msg))?;
    obj.call_method1(intern!(py, "_wakeup_waiter"), (&exc,))
        .map(drop)
}

/// `SSLProtocol._do_shutdown`: `sslobj.unwrap()` (unless the peer's close_notify was
/// read), then the outgoing BIO flushed, `eof_received` and the close, or the error to
/// `_on_shutdown_complete`.
pub(super) fn do_shutdown(proto: &Proto<'_>) -> PyResult<()> {
    let py = proto.py();
    let Some((raw, native)) = native_steps(proto)? else {
        return asyncio_step(proto, intern!(py, "_do_shutdown"));
    };
    let obj = proto.any();
    let step = if obj.getattr(intern!(py, "_eof_received"))?.is_truthy()? {
        Step::Done
    } else {
        unwrap(proto, &raw, native)?
    };
    let complete = intern!(py, "_on_shutdown_complete");
    match step {
        Step::Again => process_outgoing(proto),
        Step::Done => {
            process_outgoing(proto)?;
            obj.call_method0(intern!(py, "_call_eof_received"))?;
            obj.call_method1(complete, (py.None(),)).map(drop)
        }
        Step::Failed(exc) => obj.call_method1(complete, (exc,)).map(drop),
    }
}

/// `_ssl`'s `shutdown()` (what `SSLObject.unwrap` calls) with `SSL_shutdown` called
/// natively: done at 1, or at 0 twice (`_ssl` tries twice, then reports success);
/// waiting at `SSL_ERROR_WANT_READ`.
///
/// Natively only while nothing is waiting in the incoming BIO (no bytes, no EOF): then
/// `SSL_shutdown` only writes our close_notify and finds nothing to read, and the only
/// errors it can end in (`SSL_R_SHUTDOWN_WHILE_IN_INIT` after an earlier fatal error)
/// leave the state as it was, so `_ssl`'s repeat raises the same one. With input
/// waiting, the read inside `SSL_shutdown` can fail fatally (a bad record, an
/// unexpected EOF), after which a second `SSL_shutdown` fails with another error
/// (`SSL_R_SHUTDOWN_WHILE_IN_INIT`) than the one asyncio would report: that step is
/// `_ssl`'s from the start.
fn unwrap<'py>(
    proto: &Proto<'py>,
    raw: &Bound<'py, PyAny>,
    native: NativeSsl,
) -> PyResult<Step<'py>> {
    let py = proto.py();
    let through_ssl = || sort(py, raw.call_method0(intern!(py, "shutdown")));
    let input_waiting = native.incoming_pending() > 0
        || proto
            .get(|st| &st.incoming)?
            .getattr(intern!(py, "eof"))?
            .is_truthy()?;
    if input_waiting {
        return through_ssl();
    }
    // `raw`, held by the caller, keeps the `SSL` object; no Python runs in this loop.
    let mut sent = false;
    loop {
        match native.shutdown() {
            Shutdown::Complete => return Ok(Step::Done),
            Shutdown::Sent if sent => return Ok(Step::Done),
            Shutdown::Sent => sent = true,
            Shutdown::WantRead => return Ok(Step::Again),
            Shutdown::Other => return through_ssl(),
        }
    }
}
