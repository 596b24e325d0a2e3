//! `LoopCore`: the Rust half of `ferroloop.Loop`. It owns the ready queue, the timer
//! heap and the poller, and runs the turn in asyncio's `_run_once` order.

use std::collections::VecDeque;
use std::io;
use std::mem;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use pyo3::exceptions::{PyOverflowError, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyFloat, PyInt, PyString, PyTuple, PyWeakrefReference};
use pyo3::{intern, PyTraverseError, PyVisit};

use crate::errors::{closed_loop, invalid_fd, os_error};
use crate::freelist;
use crate::gil_cell::GilCell;
use crate::handles::{self, CallArgs, Handle, LentContext, QueuedCall, TimerHandle};
use crate::poller::{self, Poller, Registry, Token, READABLE, WAKER_TOKEN, WRITABLE};
use crate::pyhelpers;
use crate::sock_ops::{self, Attempt, SockKind, SockOp};
use crate::timers::Timers;
use crate::transports::datagram::DatagramTransport;
use crate::transports::stream::StreamTransport;

/// asyncio caps one poll at a day (`MAXIMUM_SELECT_TIMEOUT`).
const MAX_POLL_TIMEOUT_S: f64 = 24.0 * 3600.0;
/// The longest wait while the handle free lists hold memory to give back (`freelist::decay`).
const DECAY_POLL_MS: i32 = 1000;
const INITIAL_EVENTS: usize = 256;
const MAX_EVENTS: usize = 64 * 1024;

/// A transport implemented in Rust, which handles its fd's readiness itself.
pub(crate) enum NativeTransport {
    Stream(Py<StreamTransport>),
    Datagram(Py<DatagramTransport>),
}

impl NativeTransport {
    fn clone_ref(&self, py: Python<'_>) -> NativeTransport {
        match self {
            NativeTransport::Stream(t) => NativeTransport::Stream(t.clone_ref(py)),
            NativeTransport::Datagram(t) => NativeTransport::Datagram(t.clone_ref(py)),
        }
    }

    fn on_ready(&self, py: Python<'_>, events: u32) -> PyResult<()> {
        match self {
            NativeTransport::Stream(t) => StreamTransport::on_ready(t.bind(py), events),
            NativeTransport::Datagram(t) => DatagramTransport::on_ready(t.bind(py), events),
        }
    }

    fn as_any<'py>(&self, py: Python<'py>) -> &Bound<'py, PyAny> {
        match self {
            NativeTransport::Stream(t) => t.bind(py).as_any(),
            NativeTransport::Datagram(t) => t.bind(py).as_any(),
        }
    }

    fn visit(&self, visit: &PyVisit<'_>) -> Result<(), PyTraverseError> {
        match self {
            NativeTransport::Stream(t) => visit.call(t),
            NativeTransport::Datagram(t) => visit.call(t),
        }
    }
}

/// Who handles the events of a registered fd.
pub(crate) enum FdOwner {
    /// `add_reader`/`add_writer` callbacks.
    Callbacks(Box<FdCallbacks>),
    Transport(NativeTransport),
}

/// An entry of the ready queue: a handle, or a transport's readiness, which runs in
/// the queue's order as asyncio's reader/writer handles would.
pub(crate) enum Ready {
    Handle(Py<Handle>),
    /// A callback from asyncio's C tasks and futures, queued without a handle object.
    Call(QueuedCall),
    Io(NativeTransport, u32),
    /// Boxed, so that an entry is 32 bytes, not 48: the queue of a burst of callbacks
    /// is written and read in full.
    Sock(Box<SockOp>),
}

/// What waits for one direction of an fd: an `add_reader`/`add_writer` handle, or a
/// socket operation completed in Rust (`sock_recv` and friends).
pub(crate) enum Waiter {
    Handle(Py<Handle>),
    Sock(Box<SockOp>),
}

impl Waiter {
    /// Releases a replaced or removed waiter: a handle is cancelled, as asyncio's is.
    fn retire(self, py: Python<'_>) -> PyResult<()> {
        match self {
            Waiter::Handle(h) => Handle::do_cancel(h.bind(py)),
            Waiter::Sock(_) => Ok(()),
        }
    }

    fn visit(&self, visit: &PyVisit<'_>) -> Result<(), PyTraverseError> {
        match self {
            Waiter::Handle(h) => visit.call(h),
            Waiter::Sock(op) => op.visit(visit),
        }
    }
}

/// The waiters of one fd's two directions.
///
/// An fd that only socket operations wait on is registered edge-triggered and stays
/// registered between operations: a `sock_recv` that waits again on the same socket
/// then makes no `epoll_ctl` call (level-triggered, each wait would add the fd and
/// each completion remove it). Edge-triggered is safe for them because every
/// operation tries its I/O before it waits, and a registration left behind cannot
/// report the same readiness twice, so one whose socket was closed and whose file
/// lives on elsewhere (a forked child) costs a wake-up per arrival, never a busy loop.
/// An `add_reader`/`add_writer` handle makes the fd level-triggered, as asyncio
/// promises, for as long as one is there.
#[derive(Default)]
pub(crate) struct FdCallbacks {
    reader: Option<Waiter>,
    writer: Option<Waiter>,
    /// Weak reference to the socket the edge-triggered registration was made for. The
    /// registration is trusted only for that same socket object: a different (or dead)
    /// one may own a reused fd number whose old registration left with its file.
    sock: Option<Py<PyWeakrefReference>>,
}

impl FdCallbacks {
    fn slot(&mut self, bit: u32) -> &mut Option<Waiter> {
        if bit == READABLE {
            &mut self.reader
        } else {
            &mut self.writer
        }
    }

    fn slot_ref(&self, bit: u32) -> Option<&Waiter> {
        if bit == READABLE {
            self.reader.as_ref()
        } else {
            self.writer.as_ref()
        }
    }

    fn has_handle(&self) -> bool {
        matches!(self.reader, Some(Waiter::Handle(_)))
            || matches!(self.writer, Some(Waiter::Handle(_)))
    }

    /// The directions something waits on.
    fn waiting(&self) -> u32 {
        let mut bits = 0;
        if self.reader.is_some() {
            bits |= READABLE;
        }
        if self.writer.is_some() {
            bits |= WRITABLE;
        }
        bits
    }

    /// Whether the registration was made for `sock`; if not, remembers `sock` as the
    /// socket it is (about to be) made for.
    fn made_for(&mut self, py: Python<'_>, sock: &Py<PyAny>) -> bool {
        let same = self
            .sock
            .as_ref()
            .and_then(|weak| weak.bind(py).upgrade())
            .is_some_and(|target| target.is(sock));
        if !same {
            // Not weakly referenceable: no socket is trusted, every wait renews the
            // registration.
            self.sock = PyWeakrefReference::new(sock.bind(py))
                .ok()
                .map(Bound::unbind);
        }
        same
    }
}

pub(crate) struct LoopState {
    ready: VecDeque<Ready>,
    timers: Timers,
    fds: Registry<FdOwner>,
    /// Transports written to during this turn, flushed at its end.
    flush: Vec<Py<StreamTransport>>,
    /// `None` once the loop is closed: its fds are released then.
    poller: Option<Poller>,
    events: Vec<libc::epoll_event>,
    thread_id: Option<u64>,
    /// `{"loop": self}`, built once: `asyncio.Future.__init__` takes its argument from
    /// a dict, which would otherwise be built for every `create_future`.
    future_kwargs: Option<Py<PyDict>>,
    /// `_task_factory`, kept here so `create_task` reads it without an attribute
    /// lookup in the instance dict.
    task_factory: Option<Py<PyAny>>,
}

/// Handles scheduled from other threads, and where to write to wake the loop.
struct ThreadsafeQueue {
    handles: Vec<Py<Handle>>,
    /// The waker's write end; -1 once the loop is closed, so that no thread ever
    /// writes to an fd number that may have been reused.
    wake_fd: RawFd,
}

#[pyclass(module = "ferroloop._ferroloop", subclass, frozen)]
pub struct LoopCore {
    state: GilCell<LoopState>,
    threadsafe: Mutex<ThreadsafeQueue>,
    /// A wake-up byte is in flight; later `call_soon_threadsafe` calls need not write.
    wake_pending: AtomicBool,
    /// The side queue of `threadsafe` holds handles (checked without taking the lock).
    side_queued: AtomicBool,
    /// Signal handlers are installed: their numbers arrive on the waker, so it must be
    /// polled on every turn.
    signals_watched: AtomicBool,
    closed: AtomicBool,
    stopping: AtomicBool,
    debug: AtomicBool,
    clock_resolution: f64,
    /// `time` is patched on the instance or overridden by a subclass: the turn and
    /// `call_later` then read the clock through it, as asyncio's `self.time()` does.
    custom_clock: AtomicBool,
}

/// `CLOCK_MONOTONIC` in seconds: the clock of `time.monotonic()`.
pub fn monotonic() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec for clock_gettime to fill; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    // Whole nanoseconds divided once, as `time.monotonic()` converts them: the two give
    // the very same float for the same instant.
    #[allow(clippy::useless_conversion)] // time_t and c_long are not i64 on every target
    let ns = i64::from(ts.tv_sec) * 1_000_000_000 + i64::from(ts.tv_nsec);
    ns as f64 / 1e9
}

fn clock_resolution() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: as in `monotonic`.
    unsafe { libc::clock_getres(libc::CLOCK_MONOTONIC, &mut ts) };
    let res = ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9;
    if res > 0.0 {
        res
    } else {
        1e-9
    }
}

fn current_thread_id() -> u64 {
    // SAFETY: no preconditions; the same value `threading.get_ident()` returns.
    #[allow(clippy::useless_conversion)] // c_ulong is not u64 on every target
    u64::from(unsafe { ffi::PyThread_get_thread_ident() })
}

/// A negative fd number is `ValueError`, as in `selectors`; one beyond a C int is
/// `OverflowError`, as epoll's registration raises for it in asyncio.
fn checked_fd(fd: i64) -> PyResult<RawFd> {
    if fd < 0 {
        return Err(invalid_fd(fd));
    }
    RawFd::try_from(fd)
        .map_err(|_| PyOverflowError::new_err("Python int too large to convert to C int"))
}

/// `object.__setattr__(obj, name, value)`, or `object.__delattr__` with a null value.
fn generic_setattr(
    obj: &Bound<'_, PyAny>,
    name: &Bound<'_, PyString>,
    value: *mut ffi::PyObject,
) -> PyResult<()> {
    // SAFETY: attached to the interpreter; `obj` and `name` are live for the call, and
    // `value` is a live object or null (delete), as PyObject_GenericSetAttr takes it.
    let status = unsafe { ffi::PyObject_GenericSetAttr(obj.as_ptr(), name.as_ptr(), value) };
    if status < 0 {
        Err(PyErr::fetch(obj.py()))
    } else {
        Ok(())
    }
}

/// `selectors._fileobj_to_fd` without its range check: an int, or an object with
/// `fileno()`. asyncio runs this before checking whether the loop is closed, and the
/// range check (`checked_fd`) after.
fn fileobj_to_int(obj: &Bound<'_, PyAny>) -> PyResult<i64> {
    let fd: i64 = if obj.is_instance_of::<PyInt>() {
        // An int beyond i64 is as far out of range as i64's own ends: the range check
        // or the registry then answers as asyncio's selector does (no such fd).
        match obj.extract::<i64>() {
            Ok(fd) => fd,
            Err(_) if obj.gt(0)? => i64::MAX,
            Err(_) => i64::MIN,
        }
    } else {
        let invalid = || {
            PyValueError::new_err(format!(
                "Invalid file object: {}",
                obj.repr().map(|r| r.to_string()).unwrap_or_default()
            ))
        };
        let fileno = obj.getattr("fileno").map_err(|_| invalid())?;
        fileno.call0()?.extract::<i64>().map_err(|_| invalid())?
    };
    Ok(fd)
}

fn reject_non_empty(value: &Bound<'_, PyAny>, name: &str) -> PyResult<()> {
    if value.len()? != 0 {
        return Err(PyValueError::new_err(format!(
            "{name} is owned by the Rust core; only an empty one may be assigned"
        )));
    }
    Ok(())
}

/// A delay or deadline as asyncio computes it: `base + value`, with Python's own
/// arithmetic for anything that is not a plain int or float.
fn deadline(py: Python<'_>, base: f64, value: &Bound<'_, PyAny>) -> PyResult<f64> {
    // An exact float by pointer comparison, then int by its type flag: the subclass
    // test for float walks the type's bases, which an int delay would pay for.
    if let Ok(f) = value.cast_exact::<PyFloat>() {
        return Ok(base + f.value());
    }
    if value.is_instance_of::<PyInt>() {
        return Ok(base + value.extract::<f64>()?);
    }
    if let Ok(f) = value.cast::<PyFloat>() {
        return Ok(base + f.value());
    }
    let sum = PyFloat::new(py, base).add(value)?;
    sum.extract::<f64>().map_err(|_| {
        PyTypeError::new_err(format!(
            "unsupported deadline type: {}",
            value
                .get_type()
                .name()
                .map(|n| n.to_string())
                .unwrap_or_default()
        ))
    })
}

impl LoopCore {
    pub(crate) fn new_core() -> PyResult<LoopCore> {
        let poller = Poller::new().map_err(os_error)?;
        let wake_fd = poller.wake_tx_fd();
        Ok(LoopCore {
            state: GilCell::new(LoopState {
                ready: VecDeque::new(),
                timers: Timers::default(),
                fds: Registry::default(),
                flush: Vec::new(),
                poller: Some(poller),
                events: vec![libc::epoll_event { events: 0, u64: 0 }; INITIAL_EVENTS],
                thread_id: None,
                future_kwargs: None,
                task_factory: None,
            }),
            threadsafe: Mutex::new(ThreadsafeQueue {
                handles: Vec::new(),
                wake_fd,
            }),
            wake_pending: AtomicBool::new(false),
            side_queued: AtomicBool::new(false),
            signals_watched: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            debug: AtomicBool::new(false),
            clock_resolution: clock_resolution(),
            custom_clock: AtomicBool::new(false),
        })
    }

    /// `loop.get_debug()` for any loop object, read directly when it is ours.
    pub(crate) fn debug_of(loop_: &Bound<'_, PyAny>) -> PyResult<bool> {
        match loop_.cast::<LoopCore>() {
            Ok(core) => Ok(core.get().debug.load(Ordering::Relaxed)),
            Err(_) => loop_.call_method0("get_debug")?.is_truthy(),
        }
    }

    /// A scheduled `TimerHandle` of `loop_` was cancelled.
    pub(crate) fn timer_cancelled(
        loop_: &Bound<'_, PyAny>,
        handle: &Bound<'_, TimerHandle>,
    ) -> PyResult<()> {
        match loop_.cast::<LoopCore>() {
            Ok(core) => {
                core.get()
                    .state
                    .borrow_mut(loop_.py())?
                    .timers
                    .note_cancelled();
                Ok(())
            }
            Err(_) => loop_
                .call_method1("_timer_handle_cancelled", (handle,))
                .map(|_| ()),
        }
    }

    fn check_closed(&self) -> PyResult<()> {
        if self.closed.load(Ordering::Relaxed) {
            Err(closed_loop())
        } else {
            Ok(())
        }
    }

    /// Debug-mode checks of `call_soon` and friends, as asyncio makes them.
    fn debug_checks(
        slf: &Bound<'_, LoopCore>,
        callback: &Bound<'_, PyAny>,
        method: &str,
        thread_check: bool,
    ) -> PyResult<()> {
        let py = slf.py();
        if thread_check {
            let owner = slf.get().state.borrow_mut(py)?.thread_id;
            if let Some(owner) = owner {
                if owner != current_thread_id() {
                    return Err(PyRuntimeError::new_err(
                        "Non-thread-safe operation invoked on an event loop other than the current one",
                    ));
                }
            }
        }
        slf.call_method1("_check_callback", (callback, method))?;
        Ok(())
    }

    /// A handle for one run (see `handles::track`): its own context already off the
    /// collector's lists; the caller untracks the object once it is made.
    fn one_shot_handle(
        slf: &Bound<'_, LoopCore>,
        callback: Bound<'_, PyAny>,
        args: Option<CallArgs>,
        context: Option<Bound<'_, PyAny>>,
    ) -> PyResult<Handle> {
        let handle = LoopCore::new_handle(slf, callback, args, context)?;
        handle.untrack_own_context(slf.py());
        Ok(handle)
    }

    /// A handle the loop keeps and runs many times (an fd callback, a signal
    /// handler): under the collector like any other object.
    fn kept_handle(
        slf: &Bound<'_, LoopCore>,
        callback: Bound<'_, PyAny>,
        args: Bound<'_, PyTuple>,
    ) -> PyResult<Py<Handle>> {
        let args = CallArgs::from_tuple(Some(args));
        let handle = Py::new(slf.py(), LoopCore::new_handle(slf, callback, args, None)?)?;
        handles::track(handle.bind(slf.py()));
        Ok(handle)
    }

    fn new_handle(
        slf: &Bound<'_, LoopCore>,
        callback: Bound<'_, PyAny>,
        args: Option<CallArgs>,
        context: Option<Bound<'_, PyAny>>,
    ) -> PyResult<Handle> {
        let debug = slf.get().debug.load(Ordering::Relaxed);
        Handle::build(
            slf.py(),
            callback,
            args,
            Some(slf.clone().into_any().unbind()),
            context,
            debug,
        )
    }

    fn schedule_timer(
        slf: &Bound<'_, LoopCore>,
        when: f64,
        callback: Bound<'_, PyAny>,
        args: Option<CallArgs>,
        context: Option<Bound<'_, PyAny>>,
    ) -> PyResult<Py<TimerHandle>> {
        let py = slf.py();
        let handle = LoopCore::one_shot_handle(slf, callback, args, context)?;
        let handle = Py::new(py, TimerHandle::new_initializer(handle, when))?;
        handles::untrack(handle.bind(py).as_super());
        handle.get().scheduled.store(true, Ordering::Relaxed);
        slf.get()
            .state
            .borrow_mut(py)?
            .timers
            .push(handle.clone_ref(py), when);
        Ok(handle)
    }

    /// Moves handles queued by other threads onto the ready queue.
    fn take_threadsafe(&self, py: Python<'_>) -> PyResult<()> {
        if !self.side_queued.load(Ordering::Acquire)
            || !self.side_queued.swap(false, Ordering::AcqRel)
        {
            return Ok(());
        }
        let queued = match self.threadsafe.lock() {
            Ok(mut q) if !q.handles.is_empty() => mem::take(&mut q.handles),
            _ => return Ok(()),
        };
        self.state
            .borrow_mut(py)?
            .ready
            .extend(queued.into_iter().map(Ready::Handle));
        Ok(())
    }

    /// Puts `waiter` in (or, with `None`, takes it out of) one direction of `fd`;
    /// returns the waiter it replaces. See `FdCallbacks` for the two modes.
    fn set_waiter(
        &self,
        py: Python<'_>,
        fd: RawFd,
        waiter: Option<Waiter>,
        bit: u32,
    ) -> PyResult<Option<Waiter>> {
        let mut st = self.state.borrow_mut(py)?;
        let st = &mut *st;
        let Some(poller) = &st.poller else {
            return Err(closed_loop());
        };
        let Some(token) = st.fds.token_of(fd) else {
            let Some(waiter) = waiter else {
                return Ok(None);
            };
            let mut cbs = Box::<FdCallbacks>::default();
            let interest = match &waiter {
                Waiter::Handle(_) => bit,
                Waiter::Sock(op) => {
                    cbs.made_for(py, &op.sock);
                    poller::EDGE | bit
                }
            };
            *cbs.slot(bit) = Some(waiter);
            poller
                .register(&mut st.fds, fd, interest, FdOwner::Callbacks(cbs))
                .map_err(os_error)?;
            return Ok(None);
        };
        let Some((owner, interest)) = st.fds.get_mut(token) else {
            return Ok(None);
        };
        let cbs = match owner {
            FdOwner::Callbacks(cbs) => cbs,
            FdOwner::Transport(transport) => {
                let transport = transport.clone_ref(py);
                return Err(fd_in_use(fd, transport.as_any(py)));
            }
        };
        let edge = interest & poller::EDGE != 0;
        // Whether the kernel's registration is known to be for this fd's current file.
        let trusted = match &waiter {
            Some(Waiter::Sock(op)) => edge && cbs.made_for(py, &op.sock),
            _ => true,
        };
        let old = mem::replace(cbs.slot(bit), waiter);
        let waiting = cbs.waiting();
        if cbs.has_handle() {
            cbs.sock = None;
            poller
                .set_interest(&mut st.fds, token, waiting)
                .map_err(os_error)?;
        } else if waiting == 0 {
            if !edge {
                poller.deregister(&mut st.fds, token);
            }
            // (Edge-triggered with nothing waiting stays registered for the next wait.)
        } else if trusted {
            let kept = if edge { interest } else { 0 };
            poller
                .set_interest(&mut st.fds, token, poller::EDGE | kept | waiting)
                .map_err(os_error)?;
        } else if let Some(owner) = poller.deregister(&mut st.fds, token) {
            // Registered anew under a new generation: were the old registration still
            // in the kernel (its file open elsewhere), its events are dropped as stale.
            poller
                .register(&mut st.fds, fd, poller::EDGE | waiting, owner)
                .map_err(os_error)?;
        }
        Ok(old)
    }

    fn add_fd_callback(
        slf: &Bound<'_, LoopCore>,
        fd: &Bound<'_, PyAny>,
        callback: Bound<'_, PyAny>,
        args: Bound<'_, PyTuple>,
        bit: u32,
    ) -> PyResult<()> {
        // asyncio validates the fd (checking it against transports) before the loop state.
        let fd = fileobj_to_int(fd)?;
        slf.get().check_closed()?;
        let fd = checked_fd(fd)?;
        let handle = LoopCore::kept_handle(slf, callback, args)?;
        if let Some(old) = slf
            .get()
            .set_waiter(slf.py(), fd, Some(Waiter::Handle(handle)), bit)?
        {
            old.retire(slf.py())?;
        }
        Ok(())
    }

    fn remove_fd_callback(
        slf: &Bound<'_, LoopCore>,
        fd: &Bound<'_, PyAny>,
        bit: u32,
    ) -> PyResult<bool> {
        let fd = fileobj_to_int(fd)?;
        if slf.get().closed.load(Ordering::Relaxed) {
            return Ok(false);
        }
        if fd > i64::from(RawFd::MAX) {
            return Ok(false); // never registered, as asyncio's selector finds
        }
        let fd = checked_fd(fd)?;
        match slf.get().set_waiter(slf.py(), fd, None, bit)? {
            Some(old) => {
                old.retire(slf.py())?;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Queues the callbacks of the ready fds; returns signal numbers read from the waker.
    fn dispatch_events(
        &self,
        py: Python<'_>,
        events: &[libc::epoll_event],
        dead: &mut Vec<Waiter>,
    ) -> PyResult<(Vec<u8>, bool)> {
        let mut signals = Vec::new();
        let mut woken = false;
        let mut st = self.state.borrow_mut(py)?;
        let st = &mut *st;
        let Some(poller) = &st.poller else {
            return Ok((signals, woken));
        };
        for event in events {
            let data = event.u64;
            if data == WAKER_TOKEN {
                poller.drain_waker(&mut signals);
                woken = true;
                continue;
            }
            let token = Token::decode(data);
            let Some((owner, interest)) = st.fds.get_mut(token) else {
                continue;
            };
            let cbs = match owner {
                FdOwner::Callbacks(cbs) => cbs,
                FdOwner::Transport(transport) => {
                    let transport = transport.clone_ref(py);
                    st.ready.push_back(Ready::Io(transport, event.events));
                    continue;
                }
            };
            let (readable, writable) = poller::readiness(event.events);
            if interest & poller::EDGE != 0 {
                // Only socket operations wait here, and the registration stays.
                for (ready, slot) in [(readable, &mut cbs.reader), (writable, &mut cbs.writer)] {
                    if ready && matches!(slot, Some(Waiter::Sock(_))) {
                        if let Some(Waiter::Sock(op)) = slot.take() {
                            st.ready.push_back(Ready::Sock(op));
                        }
                    }
                }
                continue;
            }
            let mut drop_bits = 0;
            for (ready, slot, bit) in [
                (readable, &mut cbs.reader, READABLE),
                (writable, &mut cbs.writer, WRITABLE),
            ] {
                if !ready {
                    continue;
                }
                match slot {
                    Some(Waiter::Handle(h)) if h.get().is_cancelled() => {
                        dead.extend(slot.take());
                        drop_bits |= bit;
                    }
                    Some(Waiter::Handle(h)) => st.ready.push_back(Ready::Handle(h.clone_ref(py))),
                    // A socket op is one-shot: it leaves the fd and runs in queue order.
                    Some(Waiter::Sock(_)) => {
                        if let Some(Waiter::Sock(op)) = slot.take() {
                            st.ready.push_back(Ready::Sock(op));
                        }
                        drop_bits |= bit;
                    }
                    None => {}
                }
            }
            if drop_bits != 0 {
                let interest = interest & !drop_bits;
                if interest == 0 {
                    if let Some(FdOwner::Callbacks(cbs)) = poller.deregister(&mut st.fds, token) {
                        dead.extend(cbs.reader);
                        dead.extend(cbs.writer);
                    }
                } else {
                    poller
                        .set_interest(&mut st.fds, token, interest)
                        .map_err(os_error)?;
                }
            }
        }
        Ok((signals, woken))
    }

    /// The loop's clock: `CLOCK_MONOTONIC`, or the `time` a test patched in.
    #[inline]
    fn now(slf: &Bound<'_, LoopCore>) -> PyResult<f64> {
        if slf.get().custom_clock.load(Ordering::Relaxed) {
            LoopCore::patched_time(slf)
        } else {
            Ok(monotonic())
        }
    }

    /// A patched or overridden `time()`, kept out of line: the turn's code stays as
    /// small as without it.
    #[cold]
    #[inline(never)]
    fn patched_time(slf: &Bound<'_, LoopCore>) -> PyResult<f64> {
        slf.call_method0(intern!(slf.py(), "time"))?.extract()
    }

    /// The patched clock's reading for the poll timeout, taken where asyncio calls
    /// `self.time()` for it: nothing ready, not stopping, timers scheduled.
    #[cold]
    #[inline(never)]
    fn patched_now_for_timeout(slf: &Bound<'_, LoopCore>) -> PyResult<Option<f64>> {
        let core = slf.get();
        let needed = {
            let st = core.state.borrow_mut(slf.py())?;
            st.ready.is_empty() && !core.stopping.load(Ordering::Relaxed) && st.timers.len() > 0
        };
        if needed {
            LoopCore::patched_time(slf).map(Some)
        } else {
            Ok(None)
        }
    }

    /// One turn of the loop, in the order of asyncio's `BaseEventLoop._run_once`.
    ///
    /// The common turn of a busy program (callbacks queued, no timer due, no fd
    /// registered) makes no system call: the clock is read only when timers exist and
    /// the poller is asked only when something could report an event.
    fn run_once(slf: &Bound<'_, LoopCore>) -> PyResult<()> {
        let py = slf.py();
        let core = slf.get();
        // Writes made outside a turn (before the loop ran, between runs) go out before
        // the poll, which could otherwise block with them unsent.
        core.flush_transports(py)?;
        core.take_threadsafe(py)?;

        // A patched `time` is Python code: called before the state is borrowed.
        let patched_now = if core.custom_clock.load(Ordering::Relaxed) {
            LoopCore::patched_now_for_timeout(slf)?
        } else {
            None
        };
        let mut dead_timers = Vec::new();
        let (timeout_ms, has_timers, may_report) = {
            let mut st = core.state.borrow_mut(py)?;
            if st.poller.is_none() {
                return Err(closed_loop());
            }
            let has_timers = st.timers.len() > 0;
            if has_timers {
                st.timers.prune(py, &mut dead_timers);
            }
            let timeout_ms = if !st.ready.is_empty() || core.stopping.load(Ordering::Relaxed) {
                0
            } else if let Some(when) = st.timers.next_when() {
                let now = patched_now.unwrap_or_else(monotonic);
                let timeout = (when - now).clamp(0.0, MAX_POLL_TIMEOUT_S);
                // Rounded up to whole milliseconds, as selectors.EpollSelector does, so a
                // timer is never polled for too briefly and spun on.
                (timeout * 1e3).ceil() as i32
            } else {
                -1
            };
            // Other threads append to the ready queue directly, so with work queued and
            // no fd or signal handler registered a non-blocking poll can only come back
            // empty.
            let may_report = !st.fds.is_empty() || core.signals_watched.load(Ordering::Relaxed);
            (timeout_ms, st.timers.len() > 0, may_report)
        };
        release_timers(py, dead_timers);
        let mut timeout_ms = timeout_ms;
        if timeout_ms != 0 {
            // A signal that arrived while we held the GIL would not interrupt the wait.
            py.check_signals()?;
            if freelist::decay(py, monotonic) && !(0..=DECAY_POLL_MS).contains(&timeout_ms) {
                timeout_ms = DECAY_POLL_MS;
            }
        }
        if timeout_ms != 0 || may_report {
            LoopCore::poll(slf, timeout_ms)?;
        }

        if has_timers {
            let end_time = LoopCore::now(slf)? + core.clock_resolution;
            let mut dead_timers = Vec::new();
            {
                let mut st = core.state.borrow_mut(py)?;
                while let Some((timer, cancelled)) = st.timers.pop_due(py, end_time) {
                    if cancelled {
                        dead_timers.push(timer);
                    } else {
                        st.ready
                            .push_back(Ready::Handle(timer.into_bound(py).into_super().unbind()));
                    }
                }
            }
            release_timers(py, dead_timers);
        }

        let ntodo = core.state.borrow_mut(py)?.ready.len();
        // Consecutive callbacks whose handles copied an empty context share one entered
        // empty context; everything else leaves it first.
        let mut lent = LentContext::default();
        for _ in 0..ntodo {
            let Some(item) = core.state.borrow_mut(py)?.ready.pop_front() else {
                break;
            };
            if !matches!(item, Ready::Handle(_)) {
                lent.leave(py)?;
            }
            match item {
                Ready::Handle(handle) => {
                    let handle = handle.into_bound(py);
                    let outcome = if core.debug.load(Ordering::Relaxed) {
                        lent.leave(py)?;
                        slf.call_method1("_run_handle_debug", (&handle,)).map(drop)
                    } else {
                        Handle::run_lent(&handle, &mut lent)
                    };
                    handles::release_from_loop(handle);
                    outcome?;
                }
                Ready::Call(call) => {
                    if core.debug.load(Ordering::Relaxed) {
                        // Debug mode times and names every callback: give it its handle.
                        let handle = call.to_handle(py, slf.as_any())?;
                        slf.call_method1("_run_handle_debug", (handle,))?;
                    } else {
                        call.run(py, slf.as_any())?;
                    }
                }
                Ready::Io(transport, events) => transport.on_ready(py, events)?,
                Ready::Sock(op) => {
                    let (fd, bit) = (op.fd, op.bit());
                    if let Some(op) = op.run(py)? {
                        // Spurious readiness: wait again, unless something took the slot.
                        if let Some(other) = core.set_waiter(py, fd, Some(Waiter::Sock(op)), bit)? {
                            core.set_waiter(py, fd, Some(other), bit)?;
                        }
                    }
                }
            }
        }
        lent.leave(py)?;
        core.flush_transports(py)
    }

    // `call_soon` and the other scheduling calls; `fastcall` exposes them to Python.

    pub(crate) fn call_soon(
        slf: &Bound<'_, LoopCore>,
        callback: Bound<'_, PyAny>,
        args: Option<CallArgs>,
        context: Option<Bound<'_, PyAny>>,
    ) -> PyResult<Py<Handle>> {
        let py = slf.py();
        let core = slf.get();
        core.check_closed()?;
        if core.debug.load(Ordering::Relaxed) {
            LoopCore::debug_checks(slf, &callback, "call_soon", true)?;
        }
        let handle = Py::new(py, LoopCore::one_shot_handle(slf, callback, args, context)?)?;
        handles::untrack(handle.bind(py));
        core.state
            .borrow_mut(py)?
            .ready
            .push_back(Ready::Handle(handle.clone_ref(py)));
        Ok(handle)
    }

    /// `call_soon(callback[, arg], context=context)` from asyncio's C tasks and
    /// futures, which drop the returned handle unseen: the call is queued without a
    /// handle object (in debug mode, which checks and names callbacks, as any other).
    pub(crate) fn call_soon_from_asyncio(
        slf: &Bound<'_, LoopCore>,
        callback: Bound<'_, PyAny>,
        arg: Option<Bound<'_, PyAny>>,
        context: Bound<'_, PyAny>,
    ) -> PyResult<Py<PyAny>> {
        let py = slf.py();
        let core = slf.get();
        if core.debug.load(Ordering::Relaxed) || context.is_none() {
            let args = arg.map(|a| CallArgs::One(a.unbind()));
            return Ok(LoopCore::call_soon(slf, callback, args, Some(context))?.into_any());
        }
        core.check_closed()?;
        core.state
            .borrow_mut(py)?
            .ready
            .push_back(Ready::Call(QueuedCall {
                callback: callback.unbind(),
                arg: arg.map(Bound::unbind),
                context: context.unbind(),
            }));
        Ok(py.None())
    }

    pub(crate) fn call_soon_threadsafe(
        slf: &Bound<'_, LoopCore>,
        callback: Bound<'_, PyAny>,
        args: Option<CallArgs>,
        context: Option<Bound<'_, PyAny>>,
    ) -> PyResult<Py<Handle>> {
        let py = slf.py();
        let core = slf.get();
        core.check_closed()?;
        if core.debug.load(Ordering::Relaxed) {
            LoopCore::debug_checks(slf, &callback, "call_soon_threadsafe", false)?;
        }
        let handle = Py::new(py, LoopCore::one_shot_handle(slf, callback, args, context)?)?;
        handles::untrack(handle.bind(py));
        // Holding the GIL, we can append to the ready queue itself, which keeps FIFO
        // order with `call_soon`. Only if the loop thread is inside a borrow (we got the
        // GIL from it mid-update) does the handle go to the side queue instead.
        let queued_aside = match core.state.borrow_mut(py) {
            Ok(mut st) => {
                st.ready.push_back(Ready::Handle(handle.clone_ref(py)));
                false
            }
            Err(_) => true,
        };
        // A plain load first: while a wake-up is already in flight (the common case
        // for a burst of calls) no read-modify-write is needed.
        let must_wake = !core.wake_pending.load(Ordering::Acquire)
            && !core.wake_pending.swap(true, Ordering::AcqRel);
        if queued_aside || must_wake {
            let mut queue = core
                .threadsafe
                .lock()
                .map_err(|_| PyRuntimeError::new_err("ferroloop: threadsafe queue poisoned"))?;
            if queued_aside {
                queue.handles.push(handle.clone_ref(py));
                core.side_queued.store(true, Ordering::Release);
            }
            if queue.wake_fd >= 0 {
                poller::wake_fd(queue.wake_fd);
            }
        }
        Ok(handle)
    }

    pub(crate) fn call_later(
        slf: &Bound<'_, LoopCore>,
        delay: &Bound<'_, PyAny>,
        callback: Bound<'_, PyAny>,
        args: Option<CallArgs>,
        context: Option<Bound<'_, PyAny>>,
    ) -> PyResult<Py<TimerHandle>> {
        if delay.is_none() {
            return Err(PyTypeError::new_err("delay must not be None"));
        }
        let when = deadline(slf.py(), LoopCore::now(slf)?, delay)?;
        let core = slf.get();
        core.check_closed()?;
        if core.debug.load(Ordering::Relaxed) {
            LoopCore::debug_checks(slf, &callback, "call_later", true)?;
        }
        LoopCore::schedule_timer(slf, when, callback, args, context)
    }

    pub(crate) fn call_at(
        slf: &Bound<'_, LoopCore>,
        when: &Bound<'_, PyAny>,
        callback: Bound<'_, PyAny>,
        args: Option<CallArgs>,
        context: Option<Bound<'_, PyAny>>,
    ) -> PyResult<Py<TimerHandle>> {
        let core = slf.get();
        if when.is_none() {
            // Before 3.11 asyncio looks at the loop being closed first.
            if slf.py().version_info() < (3, 11) {
                core.check_closed()?;
            }
            return Err(PyTypeError::new_err("when cannot be None"));
        }
        core.check_closed()?;
        let when = deadline(slf.py(), 0.0, when)?;
        if core.debug.load(Ordering::Relaxed) {
            LoopCore::debug_checks(slf, &callback, "call_at", true)?;
        }
        LoopCore::schedule_timer(slf, when, callback, args, context)
    }

    /// Waits for events (the GIL released unless the wait is non-blocking) and queues
    /// what they wake, threadsafe handles and signal handlers included.
    fn poll(slf: &Bound<'_, LoopCore>, timeout_ms: i32) -> PyResult<()> {
        let py = slf.py();
        let core = slf.get();
        let (epoll_fd, mut events) = {
            let mut st = core.state.borrow_mut(py)?;
            let fd = st.poller.as_ref().map(Poller::epoll_fd).unwrap_or(-1);
            (fd, mem::take(&mut st.events))
        };
        let result = if timeout_ms == 0 {
            Poller::wait(epoll_fd, &mut events, 0)
        } else {
            py.detach(|| Poller::wait(epoll_fd, &mut events, timeout_ms))
        };
        let n = match result {
            Ok(n) => n,
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => 0,
            Err(err) => {
                core.state.borrow_mut(py)?.events = events;
                return Err(os_error(err));
            }
        };

        let mut dead = Vec::new();
        let dispatched = if n > 0 {
            core.dispatch_events(py, &events[..n], &mut dead)
        } else {
            Ok((Vec::new(), false))
        };
        if n == events.len() && events.len() < MAX_EVENTS {
            events.resize(events.len() * 2, libc::epoll_event { events: 0, u64: 0 });
        }
        core.state.borrow_mut(py)?.events = events;
        drop(dead);
        let (signals, woken) = dispatched?;
        if woken {
            // After the waker was drained: a thread that sees `false` writes a new byte.
            core.wake_pending.store(false, Ordering::Release);
        }
        core.take_threadsafe(py)?;
        if n == 0 && timeout_ms != 0 {
            py.check_signals()?;
        }
        if !signals.is_empty() {
            slf.call_method1("_handle_signals", (PyBytes::new(py, &signals),))?;
        }
        Ok(())
    }
}

#[pymethods]
impl LoopCore {
    #[new]
    #[pyo3(signature = (*_args, **_kwargs))]
    fn py_new(
        _args: &Bound<'_, PyTuple>,
        _kwargs: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<LoopCore> {
        LoopCore::new_core()
    }

    fn time(&self) -> f64 {
        monotonic()
    }

    /// Whether `time` is overridden by a subclass (`Loop.__init__` tells).
    fn _set_custom_clock(&self, on: bool) {
        self.custom_clock.store(on, Ordering::Relaxed);
    }

    /// Instance attributes are stored as by `object.__setattr__`; a `time` set on the
    /// loop (`mock.patch.object(loop, "time", ...)`, as suites move the clock) becomes
    /// the clock the turn and `call_later` read, as asyncio's `self.time()` is. Native,
    /// so that attribute stores on the loop cost no Python frame.
    fn __setattr__(
        slf: &Bound<'_, Self>,
        name: &Bound<'_, PyString>,
        value: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        generic_setattr(slf, name, value.as_ptr())?;
        if name.to_str()? == "time" {
            slf.get().custom_clock.store(true, Ordering::Relaxed);
        }
        Ok(())
    }

    fn __delattr__(slf: &Bound<'_, Self>, name: &Bound<'_, PyString>) -> PyResult<()> {
        generic_setattr(slf, name, std::ptr::null_mut())?;
        if name.to_str()? == "time" {
            // Back to the class's clock: the native one unless a subclass overrides it.
            let overridden = slf.call_method0(intern!(slf.py(), "_time_overridden"))?;
            slf.get()
                .custom_clock
                .store(overridden.is_truthy()?, Ordering::Relaxed);
        }
        Ok(())
    }

    /// A signal handler's handle, `Handle(callback, args, self, None)`: kept by the loop
    /// for as long as the handler is installed, so it stays under the cyclic GC.
    fn _signal_handle(
        slf: &Bound<'_, LoopCore>,
        callback: Bound<'_, PyAny>,
        args: Bound<'_, PyTuple>,
    ) -> PyResult<Py<Handle>> {
        LoopCore::kept_handle(slf, callback, args)
    }

    /// Appends an existing handle to the ready queue (signal handlers use this).
    fn _add_callback(&self, py: Python<'_>, handle: Py<Handle>) -> PyResult<()> {
        if !handle.get().is_cancelled() {
            self.state
                .borrow_mut(py)?
                .ready
                .push_back(Ready::Handle(handle));
        }
        Ok(())
    }

    fn _timer_handle_cancelled(
        &self,
        py: Python<'_>,
        handle: &Bound<'_, TimerHandle>,
    ) -> PyResult<()> {
        if handle.get().scheduled.load(Ordering::Relaxed) {
            self.state.borrow_mut(py)?.timers.note_cancelled();
        }
        Ok(())
    }

    #[getter(_task_factory)]
    fn task_factory(&self, py: Python<'_>) -> PyResult<Option<Py<PyAny>>> {
        Ok(self
            .state
            .borrow_mut(py)?
            .task_factory
            .as_ref()
            .map(|f| f.clone_ref(py)))
    }

    #[setter(_task_factory)]
    fn set_task_factory_attr(&self, py: Python<'_>, factory: Option<Py<PyAny>>) -> PyResult<()> {
        let factory = factory.filter(|f| !f.is_none(py));
        let old = mem::replace(&mut self.state.borrow_mut(py)?.task_factory, factory);
        drop(old);
        Ok(())
    }

    #[setter(_signals_watched)]
    fn set_signals_watched(&self, value: bool) {
        self.signals_watched.store(value, Ordering::Relaxed);
    }

    /// `asyncio.Future(loop=self)`, without a Python frame.
    fn create_future(slf: &Bound<'_, LoopCore>) -> PyResult<Py<PyAny>> {
        let py = slf.py();
        let cached = slf
            .get()
            .state
            .borrow_mut(py)?
            .future_kwargs
            .as_ref()
            .map(|d| d.clone_ref(py));
        let kwargs = match cached {
            Some(kwargs) => kwargs,
            None => {
                let kwargs = PyDict::new(py);
                kwargs.set_item(pyo3::intern!(py, "loop"), slf)?;
                let kwargs = kwargs.unbind();
                slf.get().state.borrow_mut(py)?.future_kwargs = Some(kwargs.clone_ref(py));
                kwargs
            }
        };
        pyhelpers::new_future(py, kwargs.bind(py))
    }

    /// `BaseEventLoop.create_task` without a Python frame when no task factory is set;
    /// with one, the Python implementation (it calls the factory) runs.
    #[pyo3(signature = (coro, *, name=None, context=None))]
    fn create_task(
        slf: &Bound<'_, LoopCore>,
        coro: &Bound<'_, PyAny>,
        name: Option<&Bound<'_, PyAny>>,
        context: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        let py = slf.py();
        slf.get().check_closed()?;
        let none = py.None().into_bound(py);
        let name = name.unwrap_or(&none);
        let context = context.unwrap_or(&none);
        let takes_context = pyhelpers::task_takes_context(py);
        if !takes_context && !context.is_none() {
            // As stock asyncio before 3.11, whose create_task has no `context`.
            return Err(PyTypeError::new_err(
                "create_task() got an unexpected keyword argument 'context'",
            ));
        }
        let has_factory = slf.get().state.borrow_mut(py)?.task_factory.is_some();
        if has_factory {
            let base = py.import("asyncio.base_events")?.getattr("BaseEventLoop")?;
            let kwargs = PyDict::new(py);
            kwargs.set_item("name", name)?;
            if takes_context {
                kwargs.set_item("context", context)?;
            }
            return Ok(base
                .getattr("create_task")?
                .call((slf, coro), Some(&kwargs))?
                .unbind());
        }
        // No frame of ours is on the stack, so the task's source traceback (debug mode)
        // already ends at the caller, which asyncio gets by dropping its own frame.
        let task = pyhelpers::new_task(slf.as_any(), coro, name, context)?;
        Ok(task)
    }

    /// Interrupts a blocked poll (asyncio's name for it).
    fn _write_to_self(&self) {
        if let Ok(queue) = self.threadsafe.lock() {
            if queue.wake_fd >= 0 {
                poller::wake_fd(queue.wake_fd);
            }
        }
    }

    /// The fd `signal.set_wakeup_fd` should write signal numbers to; -1 once closed.
    fn _wakeup_fd(&self) -> RawFd {
        self.threadsafe.lock().map(|q| q.wake_fd).unwrap_or(-1)
    }

    fn stop(&self) {
        self.stopping.store(true, Ordering::Relaxed);
    }

    fn is_running(&self, py: Python<'_>) -> PyResult<bool> {
        Ok(self.state.borrow_mut(py)?.thread_id.is_some())
    }

    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Relaxed)
    }

    fn get_debug(&self) -> bool {
        self.debug.load(Ordering::Relaxed)
    }

    #[getter(_debug)]
    fn debug_flag(&self) -> bool {
        self.debug.load(Ordering::Relaxed)
    }

    #[setter(_debug)]
    fn set_debug_flag(&self, value: &Bound<'_, PyAny>) -> PyResult<()> {
        self.debug.store(value.is_truthy()?, Ordering::Relaxed);
        Ok(())
    }

    #[getter(_closed)]
    fn closed_flag(&self) -> bool {
        self.closed.load(Ordering::Relaxed)
    }

    #[setter(_closed)]
    fn set_closed_flag(&self, value: &Bound<'_, PyAny>) -> PyResult<()> {
        self.closed.store(value.is_truthy()?, Ordering::Relaxed);
        Ok(())
    }

    #[getter(_stopping)]
    fn stopping_flag(&self) -> bool {
        self.stopping.load(Ordering::Relaxed)
    }

    #[setter(_stopping)]
    fn set_stopping_flag(&self, value: &Bound<'_, PyAny>) -> PyResult<()> {
        self.stopping.store(value.is_truthy()?, Ordering::Relaxed);
        Ok(())
    }

    #[getter(_thread_id)]
    fn thread_id(&self, py: Python<'_>) -> PyResult<Option<u64>> {
        Ok(self.state.borrow_mut(py)?.thread_id)
    }

    #[setter(_thread_id)]
    fn set_thread_id(&self, py: Python<'_>, value: Option<u64>) -> PyResult<()> {
        self.state.borrow_mut(py)?.thread_id = value;
        Ok(())
    }

    /// A snapshot of the ready queue (asyncio exposes its deque; tests read its length).
    #[getter(_ready)]
    fn ready_snapshot(slf: &Bound<'_, LoopCore>) -> PyResult<Vec<Py<Handle>>> {
        let py = slf.py();
        // Queued calls get handles made for them, outside the borrow (making one
        // allocates Python objects).
        let queued: Vec<Result<Py<Handle>, QueuedCall>> = slf
            .get()
            .state
            .borrow_mut(py)?
            .ready
            .iter()
            .filter_map(|item| match item {
                Ready::Handle(h) => Some(Ok(h.clone_ref(py))),
                Ready::Call(call) => Some(Err(QueuedCall {
                    callback: call.callback.clone_ref(py),
                    arg: call.arg.as_ref().map(|a| a.clone_ref(py)),
                    context: call.context.clone_ref(py),
                })),
                Ready::Io(..) | Ready::Sock(_) => None,
            })
            .collect();
        queued
            .into_iter()
            .map(|item| match item {
                Ok(handle) => Ok(handle),
                Err(call) => call.to_handle(py, slf.as_any()),
            })
            .collect()
    }

    /// asyncio's `__init__` assigns an empty queue; the Rust queue is the real one.
    #[setter(_ready)]
    fn init_ready(&self, value: &Bound<'_, PyAny>) -> PyResult<()> {
        reject_non_empty(value, "_ready")
    }

    /// A snapshot of the live timers, earliest first.
    #[getter(_scheduled)]
    fn scheduled_snapshot(&self, py: Python<'_>) -> PyResult<Vec<Py<TimerHandle>>> {
        let st = self.state.borrow_mut(py)?;
        let mut timers: Vec<Py<TimerHandle>> = st
            .timers
            .handles()
            .filter(|h| !h.bind(py).as_super().get().is_cancelled())
            .map(|h| h.clone_ref(py))
            .collect();
        timers.sort_by(|a, b| a.get().when.total_cmp(&b.get().when));
        Ok(timers)
    }

    #[setter(_scheduled)]
    fn init_scheduled(&self, value: &Bound<'_, PyAny>) -> PyResult<()> {
        reject_non_empty(value, "_scheduled")
    }

    #[getter(_timer_cancelled_count)]
    fn timer_cancelled_count(&self, py: Python<'_>) -> PyResult<usize> {
        Ok(self.state.borrow_mut(py)?.timers.cancelled_count())
    }

    #[setter(_timer_cancelled_count)]
    fn init_timer_cancelled_count(&self, value: usize) -> PyResult<()> {
        if value != 0 {
            return Err(PyValueError::new_err(
                "_timer_cancelled_count is maintained by the loop",
            ));
        }
        Ok(())
    }

    /// Number of timers in the heap, cancelled ones not yet compacted included.
    #[getter(_timer_count)]
    fn timer_count(&self, py: Python<'_>) -> PyResult<usize> {
        Ok(self.state.borrow_mut(py)?.timers.len())
    }

    fn _run_once(slf: &Bound<'_, LoopCore>) -> PyResult<()> {
        LoopCore::run_once(slf)
    }

    /// Runs turns until `stop()`; the Python `run_forever` wraps it with the
    /// running-loop bookkeeping.
    fn _run_forever_core(slf: &Bound<'_, LoopCore>) -> PyResult<()> {
        loop {
            LoopCore::run_once(slf)?;
            if slf.get().stopping.load(Ordering::Relaxed) {
                return Ok(());
            }
        }
    }

    /// Releases the poller and every queued handle; the fds are closed exactly once here.
    fn _close_core(&self, py: Python<'_>) -> PyResult<()> {
        if self.state.borrow_mut(py)?.thread_id.is_some() {
            return Err(PyRuntimeError::new_err("Cannot close a running event loop"));
        }
        self.closed.store(true, Ordering::Relaxed);
        let queued = match self.threadsafe.lock() {
            Ok(mut q) => {
                q.wake_fd = -1;
                mem::take(&mut q.handles)
            }
            Err(_) => Vec::new(),
        };
        let mut dead_timers = Vec::new();
        let released = {
            let mut st = self.state.borrow_mut(py)?;
            st.timers.drain(&mut dead_timers);
            let fds = mem::take(&mut st.fds);
            let flush = mem::take(&mut st.flush);
            (mem::take(&mut st.ready), fds, flush, st.poller.take())
        };
        for handle in queued {
            handles::release_from_loop(handle.into_bound(py));
        }
        release_timers(py, dead_timers);
        let (ready, fds, flush, poller) = released;
        release_ready(py, ready);
        drop((fds, flush, poller));
        freelist::trim(py);
        Ok(())
    }

    #[pyo3(signature = (fd, callback, *args))]
    fn add_reader(
        slf: &Bound<'_, LoopCore>,
        fd: &Bound<'_, PyAny>,
        callback: Bound<'_, PyAny>,
        args: Bound<'_, PyTuple>,
    ) -> PyResult<()> {
        LoopCore::add_fd_callback(slf, fd, callback, args, READABLE)
    }

    #[pyo3(signature = (fd, callback, *args))]
    fn add_writer(
        slf: &Bound<'_, LoopCore>,
        fd: &Bound<'_, PyAny>,
        callback: Bound<'_, PyAny>,
        args: Bound<'_, PyTuple>,
    ) -> PyResult<()> {
        LoopCore::add_fd_callback(slf, fd, callback, args, WRITABLE)
    }

    fn remove_reader(slf: &Bound<'_, LoopCore>, fd: &Bound<'_, PyAny>) -> PyResult<bool> {
        LoopCore::remove_fd_callback(slf, fd, READABLE)
    }

    fn remove_writer(slf: &Bound<'_, LoopCore>, fd: &Bound<'_, PyAny>) -> PyResult<bool> {
        LoopCore::remove_fd_callback(slf, fd, WRITABLE)
    }

    /// `sock_recv`'s first step: the data if it can be read now, else a future the loop
    /// resolves when it has read them.
    fn _sock_recv_start(
        slf: &Bound<'_, LoopCore>,
        sock: &Bound<'_, PyAny>,
        n: isize,
    ) -> PyResult<Py<PyAny>> {
        let n = sock_ops::check_recv_size(n)?;
        let fd = slf.get().sock_fd(sock)?;
        match sock_ops::try_recv(slf.py(), fd, n)? {
            Attempt::Done(data) => Ok(data),
            Attempt::WouldBlock => LoopCore::sock_wait(slf, sock, fd, SockKind::Recv(n)),
        }
    }

    /// `sock_recv_into`'s first step: the count read now, or a future for it.
    fn _sock_recv_into_start(
        slf: &Bound<'_, LoopCore>,
        sock: &Bound<'_, PyAny>,
        buf: &Bound<'_, PyAny>,
    ) -> PyResult<Py<PyAny>> {
        let buffer = sock_ops::writable_buffer(buf)?;
        let fd = slf.get().sock_fd(sock)?;
        match sock_ops::try_recv_into(slf.py(), fd, &buffer)? {
            Attempt::Done(count) => Ok(count),
            Attempt::WouldBlock => LoopCore::sock_wait(slf, sock, fd, SockKind::RecvInto(buffer)),
        }
    }

    /// `sock_sendall`'s first step: `None` if everything went out now, else a future
    /// done when the rest has.
    fn _sock_sendall_start(
        slf: &Bound<'_, LoopCore>,
        sock: &Bound<'_, PyAny>,
        data: &Bound<'_, PyAny>,
    ) -> PyResult<Option<Py<PyAny>>> {
        let buffer = sock_ops::readable_buffer(data)?;
        let fd = slf.get().sock_fd(sock)?;
        let mut sent = 0;
        if sock_ops::try_send_all(fd, &buffer, &mut sent)? {
            return Ok(None);
        }
        LoopCore::sock_wait(slf, sock, fd, SockKind::Send(buffer, sent)).map(Some)
    }

    /// Withdraws the socket operation of future `fut`, whose caller was cancelled. While
    /// the socket is open its fd number names the slot; once it is closed (by whoever
    /// cancelled the caller), the op is found by its future and the fd it was parked on.
    fn _sock_op_cancel(
        &self,
        py: Python<'_>,
        sock: &Bound<'_, PyAny>,
        writable: bool,
        fut: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let bit = if writable { WRITABLE } else { READABLE };
        // Only this call's op: another call may have parked its own since.
        let parked_fd = |cbs: &FdCallbacks| match cbs.slot_ref(bit) {
            Some(Waiter::Sock(op)) if op.fut.is(fut) => Some(op.fd),
            _ => None,
        };
        let fileno: i64 = sock.call_method0("fileno")?.extract()?;
        let fd = {
            let mut st = self.state.borrow_mut(py)?;
            if fileno >= 0 {
                let token = RawFd::try_from(fileno)
                    .ok()
                    .and_then(|fd| st.fds.token_of(fd));
                match token.and_then(|token| st.fds.get_mut(token)) {
                    Some((FdOwner::Callbacks(cbs), _)) => parked_fd(cbs),
                    _ => None,
                }
            } else {
                st.fds.owners().find_map(|owner| match owner {
                    FdOwner::Callbacks(cbs) => parked_fd(cbs),
                    FdOwner::Transport(_) => None,
                })
            }
        };
        if let Some(fd) = fd {
            let removed = self.set_waiter(py, fd, None, bit)?;
            drop(removed);
        }
        Ok(())
    }

    /// The `add_reader` handle of an fd, if any (selector-loop helpers use this).
    fn _get_reader(slf: &Bound<'_, LoopCore>, fd: RawFd) -> PyResult<Option<Py<Handle>>> {
        LoopCore::fd_handle(slf, fd, READABLE)
    }

    fn _get_writer(slf: &Bound<'_, LoopCore>, fd: RawFd) -> PyResult<Option<Py<Handle>>> {
        LoopCore::fd_handle(slf, fd, WRITABLE)
    }

    /// The open connections `server` accepted (`Server.close_clients` and
    /// `abort_clients`): the fd registry already holds every live transport, so the
    /// server keeps no set of its own.
    fn _server_transports(
        &self,
        py: Python<'_>,
        server: &Bound<'_, PyAny>,
    ) -> PyResult<Vec<Py<StreamTransport>>> {
        let transports: Vec<Py<StreamTransport>> = self
            .state
            .borrow_mut(py)?
            .fds
            .owners()
            .filter_map(|owner| match owner {
                FdOwner::Transport(NativeTransport::Stream(t)) => Some(t.clone_ref(py)),
                _ => None,
            })
            .collect();
        let mut served = Vec::new();
        for transport in transports {
            if transport.get().server_is(py, server)? {
                served.push(transport);
            }
        }
        Ok(served)
    }

    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        if let Some(st) = self.state.borrow_for_gc() {
            for item in &st.ready {
                match item {
                    Ready::Handle(h) => visit.call(h)?,
                    Ready::Call(call) => call.visit(&visit)?,
                    Ready::Io(t, _) => t.visit(&visit)?,
                    Ready::Sock(op) => op.visit(&visit)?,
                }
            }
            for t in &st.flush {
                visit.call(t)?;
            }
            if let Some(kwargs) = &st.future_kwargs {
                visit.call(kwargs)?;
            }
            if let Some(factory) = &st.task_factory {
                visit.call(factory)?;
            }
            for h in st.timers.handles() {
                visit.call(h)?;
            }
            for owner in st.fds.owners() {
                match owner {
                    FdOwner::Callbacks(cbs) => {
                        for w in [&cbs.reader, &cbs.writer].into_iter().flatten() {
                            w.visit(&visit)?;
                        }
                    }
                    FdOwner::Transport(t) => t.visit(&visit)?,
                }
            }
        }
        if let Ok(q) = self.threadsafe.try_lock() {
            for h in &q.handles {
                visit.call(h)?;
            }
        }
        Ok(())
    }

    fn __clear__(&self) {
        let released = self.state.borrow_mut_for_gc().map(|mut st| {
            let mut timers = Vec::new();
            st.timers.drain(&mut timers);
            (
                mem::take(&mut st.ready),
                timers,
                mem::take(&mut st.fds),
                mem::take(&mut st.flush),
                st.future_kwargs.take(),
                st.task_factory.take(),
            )
        });
        if let Some((ready, timers, fds, flush, kwargs, factory)) = released {
            Python::attach(|py| {
                release_ready(py, ready);
                release_timers(py, timers);
            });
            drop((fds, flush, kwargs, factory));
        }
    }
}

impl LoopCore {
    fn fd_handle(slf: &Bound<'_, LoopCore>, fd: RawFd, bit: u32) -> PyResult<Option<Py<Handle>>> {
        let py = slf.py();
        let mut st = slf.get().state.borrow_mut(py)?;
        let Some(token) = st.fds.token_of(fd) else {
            return Ok(None);
        };
        Ok(match st.fds.get_mut(token) {
            Some((FdOwner::Callbacks(cbs), _)) => match cbs.slot(bit) {
                Some(Waiter::Handle(h)) => Some(h.clone_ref(py)),
                _ => None,
            },
            _ => None,
        })
    }

    /// The fd of a socket given to a `sock_*` call, after asyncio's checks: not an
    /// `ssl.SSLSocket`, and non-blocking in debug mode. As in asyncio, an fd owned by a
    /// transport is refused only when the call has to wait (by `set_waiter`).
    fn sock_fd(&self, sock: &Bound<'_, PyAny>) -> PyResult<RawFd> {
        pyhelpers::reject_ssl_socket(sock)?;
        if self.debug.load(Ordering::Relaxed) {
            let timeout = sock.call_method0("gettimeout")?;
            if timeout.is_none() || timeout.extract::<f64>()? != 0.0 {
                return Err(PyValueError::new_err("the socket must be non-blocking"));
            }
        }
        let fd: i64 = sock
            .call_method0(pyo3::intern!(sock.py(), "fileno"))?
            .extract()?;
        if fd == -1 {
            // A closed socket: what its own methods raise.
            return Err(os_error(io::Error::from_raw_os_error(libc::EBADF)));
        }
        checked_fd(fd)
    }

    /// Parks a socket operation on its fd and returns the future it will resolve.
    fn sock_wait(
        slf: &Bound<'_, LoopCore>,
        sock: &Bound<'_, PyAny>,
        fd: RawFd,
        kind: SockKind,
    ) -> PyResult<Py<PyAny>> {
        let py = slf.py();
        let fut = LoopCore::create_future(slf)?;
        let op = Box::new(SockOp {
            fd,
            fut: fut.clone_ref(py),
            sock: sock.clone().unbind(),
            kind,
        });
        let bit = op.bit();
        if let Some(old) = slf.get().set_waiter(py, fd, Some(Waiter::Sock(op)), bit)? {
            old.retire(py)?;
        }
        Ok(fut)
    }

    pub(crate) fn debug(&self) -> bool {
        self.debug.load(Ordering::Relaxed)
    }

    /// Claims `fd` for a transport. Callbacks added with `add_reader`/`add_writer` on it
    /// are cancelled (the transport takes over the fd, as asyncio's would); an fd already
    /// owned by another live transport is an error.
    pub(crate) fn register_transport(
        &self,
        py: Python<'_>,
        fd: RawFd,
        transport: NativeTransport,
    ) -> PyResult<Token> {
        let replaced = {
            let mut st = self.state.borrow_mut(py)?;
            let st = &mut *st;
            let Some(poller) = &st.poller else {
                return Err(closed_loop());
            };
            let replaced = match st.fds.token_of(fd) {
                Some(token) => match st.fds.get_mut(token) {
                    Some((FdOwner::Transport(other), _)) => {
                        let other = other.clone_ref(py);
                        return Err(fd_in_use(fd, other.as_any(py)));
                    }
                    _ => poller.deregister(&mut st.fds, token),
                },
                None => None,
            };
            let token = poller
                .register(&mut st.fds, fd, 0, FdOwner::Transport(transport))
                .map_err(os_error)?;
            (token, replaced)
        };
        let (token, replaced) = replaced;
        if let Some(FdOwner::Callbacks(cbs)) = replaced {
            for w in [cbs.reader, cbs.writer].into_iter().flatten() {
                w.retire(py)?;
            }
        }
        Ok(token)
    }

    pub(crate) fn set_transport_interest(
        &self,
        py: Python<'_>,
        token: Token,
        interest: u32,
    ) -> PyResult<()> {
        let mut st = self.state.borrow_mut(py)?;
        let st = &mut *st;
        match &st.poller {
            Some(poller) => poller
                .set_interest(&mut st.fds, token, interest)
                .map_err(os_error),
            None => Ok(()),
        }
    }

    pub(crate) fn deregister_transport(&self, py: Python<'_>, token: Token) -> PyResult<()> {
        let released = {
            let mut st = self.state.borrow_mut(py)?;
            let st = &mut *st;
            match &st.poller {
                Some(poller) => poller.deregister(&mut st.fds, token),
                None => None,
            }
        };
        drop(released);
        Ok(())
    }

    /// Puts a transport on the list flushed at the end of the turn.
    pub(crate) fn queue_flush(
        &self,
        py: Python<'_>,
        transport: Py<StreamTransport>,
    ) -> PyResult<()> {
        self.state.borrow_mut(py)?.flush.push(transport);
        Ok(())
    }

    /// The last step of a turn: one send per transport written to during it. The list's
    /// allocation is kept for the next turn.
    fn flush_transports(&self, py: Python<'_>) -> PyResult<()> {
        let mut pending = {
            let mut st = self.state.borrow_mut(py)?;
            if st.flush.is_empty() {
                return Ok(());
            }
            mem::take(&mut st.flush)
        };
        let mut outcome = Ok(());
        for transport in pending.drain(..) {
            if outcome.is_ok() {
                outcome = StreamTransport::flush(transport.bind(py));
            }
        }
        let mut st = self.state.borrow_mut(py)?;
        if st.flush.is_empty() {
            st.flush = pending;
        }
        outcome
    }
}

/// Lets go of timers the loop no longer keeps (see `handles::release_from_loop`).
fn release_timers(py: Python<'_>, timers: Vec<Py<TimerHandle>>) {
    for timer in timers {
        handles::release_from_loop(timer.into_bound(py).into_super());
    }
}

/// Lets go of ready-queue entries that will not run.
fn release_ready(py: Python<'_>, ready: impl IntoIterator<Item = Ready>) {
    for item in ready {
        if let Ready::Handle(handle) = item {
            handles::release_from_loop(handle.into_bound(py));
        }
    }
}

fn fd_in_use(fd: RawFd, transport: &Bound<'_, PyAny>) -> PyErr {
    let repr = transport.repr().map(|r| r.to_string()).unwrap_or_default();
    PyRuntimeError::new_err(format!("File descriptor {fd} is used by transport {repr}"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_ready_entry_is_four_words() {
        assert_eq!(std::mem::size_of::<super::Ready>(), 32);
        assert_eq!(std::mem::size_of::<super::FdOwner>(), 16);
    }
}
