//! `LoopCore`: the Rust half of `ferroloop.Loop`. It owns the ready queue, the timer
//! heap and the poller, and runs the turn in asyncio's `_run_once` order.
//!
//! Beside it: `scheduling` (`call_soon` and friends, futures and tasks), `waiters`
//! (`add_reader`/`add_writer` and the `sock_*` waits on the fd registry),
//! `transport_registry` (native transports' fds), `clock` (the loop's time and
//! deadlines) and `loop_attrs` (asyncio's private attributes of the loop).

use std::collections::VecDeque;
use std::io;
use std::mem;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyString, PyTuple};
use pyo3::{PyTraverseError, PyVisit};

use crate::asyncgens;
use crate::clock::{self, monotonic};
use crate::errors::{closed_loop, os_error};
use crate::freelist;
use crate::gil_cell::GilCell;
use crate::handles::{self, Handle, TimerHandle};
use crate::loop_attrs;
use crate::poller::{self, Event, Events, Poller, Registry, READABLE, WRITABLE};
use crate::ready::release_ready;
pub(crate) use crate::ready::Ready;
use crate::stats::{ByteTotals, LoopStats, Slowest};
use crate::timers::Timers;
pub(crate) use crate::transport_registry::NativeTransport;
use crate::transports::stream::StreamTransport;
use crate::waiters::{self, FdCallbacks, Waiter};
use crate::watchdog::Watchdog;

/// asyncio caps one poll at a day (`MAXIMUM_SELECT_TIMEOUT`).
const MAX_POLL_TIMEOUT_S: f64 = 24.0 * 3600.0;
/// The longest wait while the handle free lists hold memory to give back (`freelist::decay`).
const DECAY_POLL_MS: i32 = 1000;

/// Who handles the events of a registered fd.
pub(crate) enum FdOwner {
    /// `add_reader`/`add_writer` callbacks.
    Callbacks(Box<FdCallbacks>),
    Transport(NativeTransport),
}

pub(crate) struct LoopState {
    pub(crate) ready: VecDeque<Ready>,
    pub(crate) timers: Timers,
    pub(crate) fds: Registry<FdOwner>,
    /// Transports written to during this turn, flushed at its end.
    pub(crate) flush: Vec<Py<StreamTransport>>,
    /// `None` once the loop is closed: its fds are released then.
    pub(crate) poller: Option<Poller>,
    pub(crate) thread_id: Option<u64>,
    /// `{"loop": self}`, built once: `asyncio.Future.__init__` takes its argument from
    /// a dict, which would otherwise be built for every `create_future`.
    pub(crate) future_kwargs: Option<Py<PyDict>>,
    /// `_task_factory`, kept here so `create_task` reads it without an attribute
    /// lookup in the instance dict.
    pub(crate) task_factory: Option<Py<PyAny>>,
    pub(crate) stats: LoopStats,
    /// The slowest timed runs since the last `loop.stats()` (timing on only).
    pub(crate) slowest: Slowest,
}

/// What `poll_timeout` decides for the rest of the turn.
struct PollPlan {
    /// 0: do not block; negative: block until an event.
    timeout_ms: i32,
    /// Live timers remain: the turn reads the clock for the due ones.
    has_timers: bool,
    /// Something is registered that an event could come from: an fd or the waker of
    /// a signal handler.
    may_report: bool,
    /// When the turn started, if `loop.stats()` timing is on.
    started: Option<Instant>,
}

/// Handles scheduled from other threads, and where to write to wake the loop.
pub(crate) struct ThreadsafeQueue {
    pub(crate) handles: Vec<Py<Handle>>,
    /// The waker's write end; -1 once the loop is closed, so that no thread ever
    /// writes to an fd number that may have been reused.
    pub(crate) wake_fd: RawFd,
}

#[pyclass(module = "ferroloop._ferroloop", subclass, frozen)]
pub struct LoopCore {
    pub(crate) state: GilCell<LoopState>,
    pub(crate) threadsafe: Mutex<ThreadsafeQueue>,
    /// A wake-up byte is in flight; later `call_soon_threadsafe` calls need not write.
    pub(crate) wake_pending: AtomicBool,
    /// The side queue of `threadsafe` holds handles (checked without taking the lock).
    pub(crate) side_queued: AtomicBool,
    /// Signal handlers are installed: their numbers arrive on the signal socket, so it
    /// must be polled on every turn.
    pub(crate) signals_watched: AtomicBool,
    pub(crate) closed: AtomicBool,
    pub(crate) stopping: AtomicBool,
    pub(crate) debug: AtomicBool,
    clock_resolution: f64,
    /// `time` is patched on the instance or overridden by a subclass: the turn and
    /// `call_later` then read the clock through it, as asyncio's `self.time()` does.
    pub(crate) custom_clock: AtomicBool,
    /// Bytes moved by the loop's transports (`loop.stats()`).
    pub(crate) bytes: Arc<ByteTotals>,
    /// The blocked-loop watchdog (see `watchdog`), off unless switched on.
    pub(crate) watchdog: Watchdog,
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
                thread_id: None,
                future_kwargs: None,
                task_factory: None,
                stats: LoopStats::default(),
                slowest: Slowest::default(),
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
            clock_resolution: clock::clock_resolution(),
            custom_clock: AtomicBool::new(false),
            bytes: Arc::default(),
            watchdog: Watchdog::default(),
        })
    }

    pub(crate) fn check_closed(&self) -> PyResult<()> {
        if self.closed.load(Ordering::Relaxed) {
            Err(closed_loop())
        } else {
            Ok(())
        }
    }

    /// One turn of the loop: asyncio's `BaseEventLoop._run_once`, step by step.
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
        let plan = LoopCore::poll_timeout(slf)?;
        if plan.timeout_ms != 0 || plan.may_report {
            let events = LoopCore::poll(slf, plan.timeout_ms)?;
            LoopCore::dispatch(slf, events, plan.timeout_ms)?;
        }
        let polled = plan.started.map(|started| (started, Instant::now()));
        if plan.has_timers {
            LoopCore::queue_due_timers(slf)?;
        }
        LoopCore::run_ready(slf)?;
        core.flush_transports(py)?;
        if let Some((started, polled)) = polled {
            core.state.borrow_mut(py)?.stats.end_turn(started, polled);
        }
        Ok(())
    }

    /// Step 1: how long the poll may block. 0 with callbacks ready or the loop
    /// stopping, else until the earliest live timer (cancelled ones are pruned off the
    /// front first, so a cancelled timer never shortens the wait), else forever.
    #[inline]
    fn poll_timeout(slf: &Bound<'_, LoopCore>) -> PyResult<PollPlan> {
        let py = slf.py();
        let core = slf.get();
        // A patched `time` is Python code: called before the state is borrowed.
        let patched_now = if core.custom_clock.load(Ordering::Relaxed) {
            LoopCore::patched_now_for_timeout(slf)?
        } else {
            None
        };
        let mut dead_timers = Vec::new();
        let plan = {
            let mut st = core.state.borrow_mut(py)?;
            if st.poller.is_none() {
                return Err(closed_loop());
            }
            if st.timers.len() > 0 {
                st.timers.prune(py, &mut dead_timers);
            }
            let timeout_ms = if !st.ready.is_empty() || core.stopping.load(Ordering::Relaxed) {
                0
            } else if let Some(when) = st.timers.next_when() {
                let now = patched_now.unwrap_or_else(monotonic);
                let timeout = (when - now).clamp(0.0, MAX_POLL_TIMEOUT_S);
                // Rounded up to whole milliseconds, as asyncio's selector on Linux does,
                // so a timer is never polled for too briefly and spun on.
                (timeout * 1e3).ceil() as i32
            } else {
                -1
            };
            PollPlan {
                timeout_ms,
                started: st.stats.begin_turn(),
                has_timers: st.timers.len() > 0,
                // Other threads append to the ready queue directly, so with work queued
                // and no fd or signal handler registered a non-blocking poll can only
                // come back empty.
                may_report: !st.fds.is_empty() || core.signals_watched.load(Ordering::Relaxed),
            }
        };
        release_timers(py, dead_timers);
        Ok(plan)
    }

    /// Step 2: waits for events, the GIL released unless the wait is non-blocking.
    /// A signal that interrupts the wait is no error: the wait comes back empty and
    /// `dispatch` runs the Python handlers.
    #[inline]
    fn poll(slf: &Bound<'_, LoopCore>, timeout_ms: i32) -> PyResult<Events> {
        let py = slf.py();
        let core = slf.get();
        let mut timeout_ms = timeout_ms;
        if timeout_ms != 0 {
            // A signal that arrived while we held the GIL would not interrupt the wait.
            py.check_signals()?;
            if freelist::decay(py, monotonic) && !(0..=DECAY_POLL_MS).contains(&timeout_ms) {
                timeout_ms = DECAY_POLL_MS;
            }
        }
        let mut events = core.take_events(py)?;
        let result = if timeout_ms == 0 {
            events.wait(0)
        } else {
            py.detach(|| events.wait(timeout_ms))
        };
        match result {
            Ok(_) => Ok(events),
            Err(err) if err.kind() == io::ErrorKind::Interrupted => Ok(events),
            Err(err) => {
                core.restore_events(py, events)?;
                Err(os_error(err))
            }
        }
    }

    /// Step 3: queues what the events wake (see `queue_events`), gives the buffer back
    /// to the poller, then takes the handles other threads queued aside and runs the
    /// Python signal handlers, as asyncio's selector loop does on its self-pipe.
    #[inline]
    fn dispatch(slf: &Bound<'_, LoopCore>, events: Events, timeout_ms: i32) -> PyResult<()> {
        let py = slf.py();
        let core = slf.get();
        let mut dead = Vec::new();
        let empty = events.is_empty();
        let queued = if empty {
            Ok((Vec::new(), false))
        } else {
            core.queue_events(py, &events, &mut dead)
        };
        core.restore_events(py, events)?;
        // Released with the state no longer borrowed: a cancelled handle's callback
        // may run Python code when it goes.
        drop(dead);
        let (signals, woken) = match queued {
            Ok(queued) => queued,
            Err(err) => {
                // The waker's edge may be among the events not reached: with the flag
                // left set no thread would write again, and no later wait would report
                // it (edge-triggered, never read). A needless clear costs one write.
                core.wake_pending.store(false, Ordering::Release);
                return Err(err);
            }
        };
        if woken {
            // After the waker's edge was taken: a thread that sees `false` writes again,
            // which is a new edge.
            core.wake_pending.store(false, Ordering::Release);
        }
        core.take_threadsafe(py)?;
        if (empty && timeout_ms != 0) || !signals.is_empty() {
            // A signal that woke the wait through the wakeup fd: its Python handler
            // (asyncio.run's SIGINT one, say) runs now, not at the next bytecode.
            py.check_signals()?;
        }
        if !signals.is_empty() {
            slf.call_method1("_handle_signals", (PyBytes::new(py, &signals),))?;
        }
        Ok(())
    }

    /// Puts what each event wakes on the ready queue in the kernel's order: a native
    /// transport's readiness, or the waiters of an fd (`FdCallbacks::queue_ready`).
    /// Returns the signal numbers read from the waker and whether it was woken.
    #[inline]
    fn queue_events(
        &self,
        py: Python<'_>,
        events: &Events,
        dead: &mut Vec<Waiter>,
    ) -> PyResult<(Vec<u8>, bool)> {
        let mut signals = Vec::new();
        let mut woken = false;
        let mut st = self.state.borrow_mut(py)?;
        let st = &mut *st;
        let Some(poller) = &st.poller else {
            return Ok((signals, woken));
        };
        for event in events.iter() {
            let (token, readiness) = match event {
                Event::Waker => {
                    woken = true;
                    continue;
                }
                Event::Signals => {
                    poller.drain_signals(&mut signals);
                    continue;
                }
                Event::Io(token, readiness) => (token, readiness),
            };
            let Some((owner, interest)) = st.fds.get_mut(token) else {
                continue;
            };
            match owner {
                FdOwner::Transport(transport) => {
                    let transport = transport.clone_ref(py);
                    st.ready.push_back(Ready::Io(transport, readiness));
                }
                FdOwner::Callbacks(cbs) => {
                    let left = cbs.queue_ready(py, readiness, interest, &mut st.ready, dead);
                    if !left.is_empty() {
                        let interest = interest.without(left);
                        waiters::narrow(poller, &mut st.fds, token, interest, dead)?;
                    }
                }
            }
        }
        Ok((signals, woken))
    }

    /// Step 4: moves the timers due by now (within the clock's resolution) to the
    /// ready queue, behind what the poll woke.
    #[inline]
    fn queue_due_timers(slf: &Bound<'_, LoopCore>) -> PyResult<()> {
        let py = slf.py();
        let core = slf.get();
        let end_time = LoopCore::now(slf)? + core.clock_resolution;
        let mut dead_timers = Vec::new();
        {
            let mut st = core.state.borrow_mut(py)?;
            while let Some((timer, cancelled)) = st.timers.pop_due(py, end_time) {
                if cancelled {
                    dead_timers.push(timer);
                } else {
                    let late = end_time - core.clock_resolution - timer.get().when;
                    st.stats.timer_fired(late);
                    st.ready
                        .push_back(Ready::Handle(timer.into_bound(py).into_super().unbind()));
                }
            }
        }
        release_timers(py, dead_timers);
        Ok(())
    }

    /// Step 5: runs exactly the entries that were ready when it began; what they
    /// schedule runs next turn, except what the reads of native transports and `sock_*`
    /// calls scheduled, which runs at the end of this one (`run_entries`). With the
    /// watchdog on, each run is published to it, and with stats timing on, each is
    /// timed: the turn tests for each once, not per run.
    #[inline]
    fn run_ready(slf: &Bound<'_, LoopCore>) -> PyResult<()> {
        let core = slf.get();
        let (ntodo, timing) = core.state.borrow_mut(slf.py())?.begin_ready();
        match (core.watchdog.is_on(), timing) {
            (false, false) => LoopCore::run_ready_with::<false, false>(slf, ntodo),
            (true, false) => LoopCore::run_ready_with::<true, false>(slf, ntodo),
            (false, true) => LoopCore::run_ready_with::<false, true>(slf, ntodo),
            (true, true) => LoopCore::run_ready_with::<true, true>(slf, ntodo),
        }
    }

    /// The poller's events buffer, lent out for a wait made without the state borrowed.
    fn take_events(&self, py: Python<'_>) -> PyResult<Events> {
        let mut st = self.state.borrow_mut(py)?;
        // The errors a wait on a closed poller (EBADF) or with no buffer (EINVAL, a wait
        // from another thread already under way) would end in.
        let errno = match st.poller.as_mut() {
            Some(poller) => match poller.take_events() {
                Some(events) => return Ok(events),
                None => libc::EINVAL,
            },
            None => libc::EBADF,
        };
        Err(os_error(io::Error::from_raw_os_error(errno)))
    }

    fn restore_events(&self, py: Python<'_>, events: Events) -> PyResult<()> {
        if let Some(poller) = self.state.borrow_mut(py)?.poller.as_mut() {
            poller.restore_events(events);
        }
        Ok(())
    }
}

/// Every method and attribute Python sees (pyo3 takes one `#[pymethods]` block per
/// class without its `multiple-pymethods` feature, whose link-time registry would pull
/// the Python API into the `cargo test` binary): the turn and the loop's lifecycle
/// here, the rest thin wrappers over the module that implements them.
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
            let mut st = self.state.borrow_mut(py)?;
            st.timers.note_cancelled();
            st.stats.timers_cancelled += 1;
        }
        Ok(())
    }

    /// The counters of `loop.stats()` (`stats.rs`); with `take_slowest` also the
    /// slowest runs kept since the last such call, which are let go.
    #[pyo3(signature = (take_slowest=true))]
    fn _stats(&self, py: Python<'_>, take_slowest: bool) -> PyResult<Py<PyDict>> {
        Ok(self.stats_snapshot(py, take_slowest)?.unbind())
    }

    /// The native transports registered now (`loop.connections()`).
    fn _registered_transports(&self, py: Python<'_>) -> PyResult<Vec<Py<PyAny>>> {
        self.registered_transports(py)
    }

    /// Times the poll, each turn and each callback for `loop.stats()`.
    fn set_stats_timing(&self, py: Python<'_>, enabled: bool) -> PyResult<()> {
        self.time_stats(py, enabled)
    }

    /// `asyncio.Future(loop=self)`, without a Python frame.
    pub(crate) fn create_future(slf: &Bound<'_, LoopCore>) -> PyResult<Py<PyAny>> {
        LoopCore::new_future(slf)
    }

    /// asyncio's `firstiter` hook, which `run_forever` installs (`asyncgens.rs`).
    fn _asyncgen_firstiter_hook(
        slf: &Bound<'_, LoopCore>,
        agen: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        asyncgens::firstiter(slf, agen)
    }

    #[pyo3(signature = (coro, *, name=None, context=None))]
    fn create_task(
        slf: &Bound<'_, LoopCore>,
        coro: &Bound<'_, PyAny>,
        name: Option<&Bound<'_, PyAny>>,
        context: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        LoopCore::new_task(slf, coro, name, context)
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
    fn _wakeup_fd(&self, py: Python<'_>) -> PyResult<RawFd> {
        let st = self.state.borrow_mut(py)?;
        Ok(st.poller.as_ref().map_or(-1, |poller| poller.signal_fd()))
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
        self.watchdog.stop(py);
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
            // The slowest runs' callbacks and transports are not kept past the close.
            let slowest = st.slowest.take();
            (
                mem::take(&mut st.ready),
                fds,
                flush,
                st.poller.take(),
                slowest,
            )
        };
        for handle in queued {
            handles::release_from_loop(handle.into_bound(py));
        }
        release_timers(py, dead_timers);
        let (ready, fds, flush, poller, slowest) = released;
        release_ready(py, ready);
        drop((fds, flush, poller, slowest));
        freelist::trim(py);
        Ok(())
    }

    // The clock (see `clock`).

    fn time(&self) -> f64 {
        monotonic()
    }

    /// Whether `time` is overridden by a subclass (`Loop.__init__` tells).
    fn _set_custom_clock(&self, on: bool) {
        self.custom_clock.store(on, Ordering::Relaxed);
    }

    // The watchdog (see `watchdog`; `Loop.set_watchdog` checks the threshold).

    fn _watchdog_start(&self, threshold: f64, reporter: Py<PyAny>) -> PyResult<()> {
        self.check_closed()?;
        self.watchdog.start(threshold, reporter)
    }

    fn _watchdog_stop(&self, py: Python<'_>) {
        self.watchdog.stop(py)
    }

    // The fd waiters (see `waiters`).

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

    fn _get_reader(slf: &Bound<'_, LoopCore>, fd: RawFd) -> PyResult<Option<Py<Handle>>> {
        LoopCore::fd_handle(slf, fd, READABLE)
    }

    fn _get_writer(slf: &Bound<'_, LoopCore>, fd: RawFd) -> PyResult<Option<Py<Handle>>> {
        LoopCore::fd_handle(slf, fd, WRITABLE)
    }

    fn _sock_recv_start(
        slf: &Bound<'_, LoopCore>,
        sock: &Bound<'_, PyAny>,
        n: isize,
    ) -> PyResult<Py<PyAny>> {
        LoopCore::sock_recv_start(slf, sock, n)
    }

    fn _sock_recv_into_start(
        slf: &Bound<'_, LoopCore>,
        sock: &Bound<'_, PyAny>,
        buf: &Bound<'_, PyAny>,
    ) -> PyResult<Py<PyAny>> {
        LoopCore::sock_recv_into_start(slf, sock, buf)
    }

    fn _sock_sendall_start(
        slf: &Bound<'_, LoopCore>,
        sock: &Bound<'_, PyAny>,
        data: &Bound<'_, PyAny>,
    ) -> PyResult<Option<Py<PyAny>>> {
        LoopCore::sock_sendall_start(slf, sock, data)
    }

    fn _sock_op_cancel(
        &self,
        py: Python<'_>,
        sock: &Bound<'_, PyAny>,
        writable: bool,
        fut: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        self.sock_op_cancel(py, sock, writable, fut)
    }

    fn _server_transports(
        &self,
        py: Python<'_>,
        server: &Bound<'_, PyAny>,
    ) -> PyResult<Vec<Py<StreamTransport>>> {
        self.server_transports(py, server)
    }

    // asyncio's private attributes (see `loop_attrs`).

    fn __setattr__(
        slf: &Bound<'_, Self>,
        name: &Bound<'_, PyString>,
        value: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        loop_attrs::setattr(slf, name, value)
    }

    fn __delattr__(slf: &Bound<'_, Self>, name: &Bound<'_, PyString>) -> PyResult<()> {
        loop_attrs::delattr(slf, name)
    }

    #[getter(_task_factory)]
    fn task_factory(&self, py: Python<'_>) -> PyResult<Option<Py<PyAny>>> {
        loop_attrs::task_factory(self, py)
    }

    #[setter(_task_factory)]
    fn set_task_factory_attr(&self, py: Python<'_>, factory: Option<Py<PyAny>>) -> PyResult<()> {
        loop_attrs::set_task_factory(self, py, factory)
    }

    #[setter(_signals_watched)]
    fn set_signals_watched(&self, value: bool) {
        loop_attrs::set_signals_watched(self, value)
    }

    #[getter(_debug)]
    fn debug_flag(&self) -> bool {
        loop_attrs::debug(self)
    }

    #[setter(_debug)]
    fn set_debug_flag(&self, value: &Bound<'_, PyAny>) -> PyResult<()> {
        loop_attrs::set_debug(self, value)
    }

    #[getter(_closed)]
    fn closed_flag(&self) -> bool {
        loop_attrs::closed(self)
    }

    #[setter(_closed)]
    fn set_closed_flag(&self, value: &Bound<'_, PyAny>) -> PyResult<()> {
        loop_attrs::set_closed(self, value)
    }

    #[getter(_stopping)]
    fn stopping_flag(&self) -> bool {
        loop_attrs::stopping(self)
    }

    #[setter(_stopping)]
    fn set_stopping_flag(&self, value: &Bound<'_, PyAny>) -> PyResult<()> {
        loop_attrs::set_stopping(self, value)
    }

    #[getter(_thread_id)]
    fn thread_id(&self, py: Python<'_>) -> PyResult<Option<u64>> {
        loop_attrs::thread_id(self, py)
    }

    #[setter(_thread_id)]
    fn set_thread_id(&self, py: Python<'_>, value: Option<u64>) -> PyResult<()> {
        loop_attrs::set_thread_id(self, py, value)
    }

    #[getter(_ready)]
    fn ready_snapshot(slf: &Bound<'_, LoopCore>) -> PyResult<Vec<Py<Handle>>> {
        loop_attrs::ready(slf)
    }

    #[setter(_ready)]
    fn init_ready(&self, value: &Bound<'_, PyAny>) -> PyResult<()> {
        loop_attrs::set_ready(value)
    }

    #[getter(_scheduled)]
    fn scheduled_snapshot(&self, py: Python<'_>) -> PyResult<Vec<Py<TimerHandle>>> {
        loop_attrs::scheduled(self, py)
    }

    #[setter(_scheduled)]
    fn init_scheduled(&self, value: &Bound<'_, PyAny>) -> PyResult<()> {
        loop_attrs::set_scheduled(value)
    }

    #[getter(_timer_cancelled_count)]
    fn timer_cancelled_count(&self, py: Python<'_>) -> PyResult<usize> {
        loop_attrs::timer_cancelled_count(self, py)
    }

    #[setter(_timer_cancelled_count)]
    fn init_timer_cancelled_count(&self, value: usize) -> PyResult<()> {
        loop_attrs::set_timer_cancelled_count(value)
    }

    #[getter(_timer_count)]
    fn timer_count(&self, py: Python<'_>) -> PyResult<usize> {
        loop_attrs::timer_count(self, py)
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
            st.slowest.visit(&visit)?;
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
                    FdOwner::Callbacks(cbs) => cbs.visit(&visit)?,
                    FdOwner::Transport(t) => t.visit(&visit)?,
                }
            }
        }
        if let Ok(q) = self.threadsafe.try_lock() {
            for h in &q.handles {
                visit.call(h)?;
            }
        }
        self.watchdog.visit(&visit)
    }

    fn __clear__(&self) {
        Python::attach(|py| self.watchdog.stop(py));
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
                st.slowest.take(),
            )
        });
        if let Some((ready, timers, fds, flush, kwargs, factory, slowest)) = released {
            Python::attach(|py| {
                release_ready(py, ready);
                release_timers(py, timers);
            });
            drop((fds, flush, kwargs, factory, slowest));
        }
    }
}

impl LoopCore {
    pub(crate) fn debug(&self) -> bool {
        self.debug.load(Ordering::Relaxed)
    }
}

/// Lets go of timers the loop no longer keeps (see `handles::release_from_loop`).
fn release_timers(py: Python<'_>, timers: Vec<Py<TimerHandle>>) {
    for timer in timers {
        handles::release_from_loop(timer.into_bound(py).into_super());
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_fd_owner_is_two_words() {
        assert_eq!(std::mem::size_of::<super::FdOwner>(), 16);
    }
}
