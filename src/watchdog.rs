//! The blocked-loop watchdog: a native thread that notices when one callback, protocol
//! method or task step has run longer than a threshold, and has it reported while the
//! loop is still blocked in it.
//!
//! While the watchdog is on, the turn publishes each run (`Watchdog::begin`/`end`): an
//! id, its start time and what it runs, in atomics the thread reads without the GIL and
//! without being woken. Off, the turn tests one flag per turn and publishes nothing.
//!
//! The thread looks at the run in progress once per threshold. When one has lasted
//! longer, it takes the GIL and has `ferroloop._watchdog.Reporter` read the loop
//! thread's stack, the running task and its await chain. Blocking code that releases the
//! GIL (a sleep, I/O) or runs Python code (which hands the GIL over every switch
//! interval) is so seen while it blocks. Code that holds the GIL does not let the thread
//! read anything until it lets go: usually just after the blocking call, while the run
//! goes on, sometimes only once the run has returned.
//!
//! The end of a run reads one word, `watch_end`: 0 while the thread watches. The thread
//! sets it to the id of the run it reported (whose end it must hear of), and to `BUSY`
//! while it waits for the GIL to report, when it cannot watch: the turn then times the
//! end of every run and records (`Ended`) any that outlasted the threshold, to be
//! reported late. Recording a run is the only time the turn wakes the thread.

use std::collections::VecDeque;
use std::mem;
use std::process;
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use pyo3::ffi;
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::PyString;
use pyo3::{PyTraverseError, PyVisit};

use crate::clock::monotonic;
use crate::errors::os_error;

/// Ended long runs kept for the thread to report; more (the thread waiting for the GIL
/// while the loop runs long callbacks one after another) are not reported.
const MAX_ENDED: usize = 64;
/// `watch_end` while the thread waits for the GIL: the turn times every run's end.
const BUSY: u64 = u64::MAX;

/// The watchdog of one loop: off until `start`, and after `stop`.
pub(crate) struct Watchdog {
    /// The turn publishes its runs (the one test the turn makes when off, once a turn).
    on: AtomicBool,
    shared: Arc<Shared>,
    thread: Mutex<Option<Watcher>>,
}

/// The watchdog thread, and the process that started it: a child forked since has no
/// such thread, and must neither join nor detach it.
struct Watcher {
    handle: JoinHandle<()>,
    pid: u32,
}

impl Watcher {
    /// The handle, if the thread belongs to this process (else it is let go unseen).
    fn into_own_handle(self) -> Option<JoinHandle<()>> {
        if self.pid == process::id() {
            Some(self.handle)
        } else {
            mem::forget(self.handle);
            None
        }
    }
}

/// What the loop thread publishes and the watchdog thread reads.
struct Shared {
    /// The id of the run in progress, 0 between runs.
    current: AtomicU64,
    /// The last id given out (written by the thread running the loop only).
    last_id: AtomicU64,
    /// When the run in progress started (`coarse_monotonic()`, as bits).
    started: AtomicU64,
    /// What the run in progress runs, borrowed: the turn holds a reference to it until
    /// the run ends, so it is live while `current` holds the run's id.
    object: AtomicPtr<ffi::PyObject>,
    /// The threshold in seconds, as bits.
    threshold: AtomicU64,
    /// What the end of a run must do: nothing (0), record the run of this id (the one
    /// reported in progress), or time the run and record it if it outlasted the
    /// threshold (`BUSY`).
    watch_end: AtomicU64,
    /// `threading.get_ident()` of the thread running the loop, 0 while it does not run.
    loop_thread: AtomicU64,
    control: Mutex<Control>,
    wake: Condvar,
}

struct Control {
    /// Bumped by `start` and `stop`: a thread whose generation is behind exits.
    generation: u64,
    /// `ferroloop._watchdog.Reporter`: reads the stack and reports.
    reporter: Option<Py<PyAny>>,
    /// Runs that outlasted the threshold, recorded by the turn as they ended.
    ended: VecDeque<Ended>,
}

/// A run that outlasted the threshold.
struct Ended {
    id: u64,
    started: f64,
    ended: f64,
    object: Option<Py<PyAny>>,
    /// The thread that ran it (the loop may have stopped by the time it is reported).
    thread: u64,
}

/// A run in progress, from `begin` to `end`: its id and start, and the run it
/// interrupted (a run started inside another, by a nested turn).
pub(crate) struct Run {
    id: u64,
    started: f64,
    outer: u64,
    outer_started: u64,
    outer_object: *mut ffi::PyObject,
}

/// `CLOCK_MONOTONIC_COARSE`: `monotonic()` as of the last clock tick (1-4 ms), read in
/// a few nanoseconds where `monotonic()` takes about twenty: the start of every run.
/// It is never ahead of `monotonic()`, so a run is never found shorter than it was.
fn coarse_monotonic() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec for clock_gettime to fill; the clock exists on
    // Linux since 2.6.32.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    #[allow(clippy::useless_conversion)] // time_t and c_long are not i64 on every target
    let ns = i64::from(ts.tv_sec) * 1_000_000_000 + i64::from(ts.tv_nsec);
    ns as f64 / 1e9
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while locked leaves plain data behind: carry on with it.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Default for Watchdog {
    fn default() -> Self {
        Watchdog {
            on: AtomicBool::new(false),
            shared: Arc::new(Shared {
                current: AtomicU64::new(0),
                last_id: AtomicU64::new(0),
                started: AtomicU64::new(0),
                object: AtomicPtr::new(ptr::null_mut()),
                threshold: AtomicU64::new(0),
                watch_end: AtomicU64::new(0),
                loop_thread: AtomicU64::new(0),
                control: Mutex::new(Control {
                    generation: 0,
                    reporter: None,
                    ended: VecDeque::new(),
                }),
                wake: Condvar::new(),
            }),
            thread: Mutex::new(None),
        }
    }
}

impl Watchdog {
    /// Whether the turn should publish its runs.
    #[inline(always)]
    pub(crate) fn is_on(&self) -> bool {
        self.on.load(Ordering::Relaxed)
    }

    /// A run starts, running `object` (null: no Python object stands for it). The
    /// caller holds a reference to `object` until `end`.
    #[inline]
    pub(crate) fn begin(&self, object: *mut ffi::PyObject) -> Run {
        let s = &*self.shared;
        let id = s.last_id.load(Ordering::Relaxed) + 1;
        s.last_id.store(id, Ordering::Relaxed);
        let started = coarse_monotonic();
        let run = Run {
            id,
            started,
            outer: s.current.load(Ordering::Relaxed),
            outer_started: s.started.load(Ordering::Relaxed),
            outer_object: s.object.load(Ordering::Relaxed),
        };
        s.started.store(started.to_bits(), Ordering::Relaxed);
        s.object.store(object, Ordering::Relaxed);
        // Release: a thread that reads this id reads the start time and object above.
        s.current.store(id, Ordering::Release);
        run
    }

    /// The run ends; `object` is what it ran, still referenced by the caller.
    #[inline]
    pub(crate) fn end(&self, run: Run, object: Option<&Bound<'_, PyAny>>) {
        let s = &*self.shared;
        s.started.store(run.outer_started, Ordering::Relaxed);
        s.object.store(run.outer_object, Ordering::Relaxed);
        s.current.store(run.outer, Ordering::Release);
        let watch = s.watch_end.load(Ordering::Relaxed);
        if watch != 0 {
            self.end_watched(run, watch, object);
        }
    }

    /// The end of a run the thread may not have seen whole: recorded if it is the one
    /// reported in progress, or if the thread is busy and the run outlasted the
    /// threshold. (Not if the watchdog was switched off during the run.)
    #[cold]
    #[inline(never)]
    fn end_watched(&self, run: Run, watch: u64, object: Option<&Bound<'_, PyAny>>) {
        let ended = monotonic();
        let threshold = f64::from_bits(self.shared.threshold.load(Ordering::Relaxed));
        let long = watch == BUSY && ended - run.started >= threshold;
        if !(long || watch == run.id) || !self.is_on() {
            return;
        }
        let record = Ended {
            id: run.id,
            started: run.started,
            ended,
            object: object.map(|o| o.clone().unbind()),
            thread: self.shared.loop_thread.load(Ordering::Relaxed),
        };
        let mut control = lock(&self.shared.control);
        if control.ended.len() < MAX_ENDED {
            control.ended.push_back(record);
            drop(control);
            self.shared.wake.notify_all();
        } else {
            // Dropped with the lock let go: dropping may run Python code.
            drop(control);
            drop(record);
        }
    }

    /// The thread that runs the loop (`_thread_id`), for the stack the watchdog reads.
    pub(crate) fn set_loop_thread(&self, ident: Option<u64>) {
        self.shared
            .loop_thread
            .store(ident.unwrap_or(0), Ordering::Relaxed);
    }

    /// Switches the watchdog on, or changes its threshold and reporter; starts the
    /// thread if none runs.
    pub(crate) fn start(&self, threshold: f64, reporter: Py<PyAny>) -> PyResult<()> {
        let mut thread = lock(&self.thread);
        if thread.as_ref().is_some_and(|w| w.pid != process::id()) {
            thread.take().and_then(Watcher::into_own_handle);
        }
        let mut control = lock(&self.shared.control);
        let old_reporter = control.reporter.replace(reporter);
        self.shared
            .threshold
            .store(threshold.to_bits(), Ordering::Relaxed);
        if thread.is_none() {
            control.generation += 1;
            let generation = control.generation;
            let shared = Arc::clone(&self.shared);
            let spawned = thread::Builder::new()
                .name("ferroloop-watchdog".into())
                .spawn(move || watch(&shared, generation));
            match spawned {
                Ok(handle) => {
                    *thread = Some(Watcher {
                        handle,
                        pid: process::id(),
                    })
                }
                Err(err) => {
                    let reporter = control.reporter.take();
                    drop(control);
                    drop((old_reporter, reporter));
                    return Err(os_error(err));
                }
            }
        }
        drop(control);
        self.shared.wake.notify_all();
        self.on.store(true, Ordering::Relaxed);
        drop(thread);
        drop(old_reporter);
        Ok(())
    }

    /// Switches the watchdog off: the thread reports what it has yet to, stops and is
    /// joined (unless this is the watchdog thread itself, in a report's callback: it
    /// stops when that returns).
    pub(crate) fn stop(&self, py: Python<'_>) {
        self.on.store(false, Ordering::Relaxed);
        let handle = lock(&self.thread).take().and_then(Watcher::into_own_handle);
        lock(&self.shared.control).generation += 1;
        self.shared.wake.notify_all();
        if let Some(handle) = handle {
            if handle.thread().id() != thread::current().id() {
                // Detached: the thread needs the GIL to finish its reports.
                py.detach(|| {
                    let _ = handle.join();
                });
            }
        }
        let released = {
            let mut control = lock(&self.shared.control);
            (control.reporter.take(), mem::take(&mut control.ended))
        };
        drop(released);
    }

    pub(crate) fn visit(&self, visit: &PyVisit<'_>) -> Result<(), PyTraverseError> {
        if let Ok(control) = self.shared.control.try_lock() {
            if let Some(reporter) = &control.reporter {
                visit.call(reporter)?;
            }
        }
        Ok(())
    }
}

impl Drop for Watchdog {
    /// A loop collected without being closed: its thread must not outlive it.
    fn drop(&mut self) {
        if lock(&self.thread).is_some() {
            Python::attach(|py| self.stop(py));
        }
    }
}

/// The watchdog thread: reports the long runs the turn recorded, then looks at the run
/// in progress (once per threshold, sooner when one is under way) and reports one that
/// has outlasted the threshold.
fn watch(shared: &Shared, generation: u64) {
    // The run reported while in progress, whose end is yet to be reported.
    let mut seen_live = 0;
    // The last run looked at for a report: a run is reported once.
    let mut reported = 0;
    let mut control = lock(&shared.control);
    loop {
        if let Some(ended) = control.ended.pop_front() {
            drop(control);
            let was_live = ended.id == seen_live;
            if was_live {
                seen_live = 0;
            }
            with_gil_busy(shared, seen_live, |py| {
                report_ended(shared, py, ended, was_live)
            });
            control = lock(&shared.control);
            continue;
        }
        if control.generation != generation {
            return;
        }
        let threshold = f64::from_bits(shared.threshold.load(Ordering::Relaxed));
        let mut wait = threshold;
        let id = shared.current.load(Ordering::Acquire);
        if id != 0 && id != reported {
            let started = f64::from_bits(shared.started.load(Ordering::Relaxed));
            let ran = monotonic() - started;
            if ran >= threshold {
                reported = id;
                drop(control);
                let asked = monotonic();
                let live = with_gil_busy(shared, id, |py| {
                    let late = monotonic() - asked > threshold;
                    report_in_progress(shared, py, id, started, threshold, late)
                });
                if live == Some(true) {
                    seen_live = id;
                } else {
                    shared.watch_end.store(seen_live, Ordering::Relaxed);
                }
                control = lock(&shared.control);
                continue;
            }
            wait = threshold - ran;
        }
        control = match shared
            .wake
            .wait_timeout(control, Duration::from_secs_f64(wait.max(1e-3)))
        {
            Ok((guard, _)) => guard,
            Err(poisoned) => poisoned.into_inner().0,
        };
    }
}

/// Runs `f` with the GIL (None if the interpreter is shutting down). The turn times
/// every run while the thread waits for it (`BUSY`); then, still holding it, the end
/// of run `then` (0: none) is the one to be told of.
fn with_gil_busy<R>(shared: &Shared, then: u64, f: impl FnOnce(Python<'_>) -> R) -> Option<R> {
    shared.watch_end.store(BUSY, Ordering::Relaxed);
    let outcome = Python::try_attach(|py| {
        let outcome = f(py);
        shared.watch_end.store(then, Ordering::Relaxed);
        outcome
    });
    if outcome.is_none() {
        shared.watch_end.store(then, Ordering::Relaxed);
    }
    outcome
}

/// Reports run `id`, found running for longer than the threshold, if it still runs now
/// that we hold the GIL (else its end was recorded, and is reported from there).
/// Returns whether it was reported.
///
/// `late`: the GIL took longer than the threshold to get, so the run held it (a call
/// into C that does not release it): its stack is where it let go of the GIL rather
/// than where it blocked.
fn report_in_progress(
    shared: &Shared,
    py: Python<'_>,
    id: u64,
    started: f64,
    threshold: f64,
    late: bool,
) -> bool {
    if shared.current.load(Ordering::Acquire) != id {
        return false;
    }
    let Some(reporter) = reporter(shared, py) else {
        return false;
    };
    let object = shared.object.load(Ordering::Relaxed);
    // SAFETY: attached, and the run that published `object` is still in progress (its
    // id is current, and it cannot end while we hold the GIL): the turn holds a
    // reference to it until then, so it is live; we take our own.
    let object = (!object.is_null()).then(|| unsafe { Bound::from_borrowed_ptr(py, object) });
    let object = object.unwrap_or_else(|| py.None().into_bound(py));
    let thread = shared.loop_thread.load(Ordering::Relaxed);
    let args = (object, monotonic() - started, threshold, thread, late, true);
    call_reporter(py, &reporter, intern!(py, "stalled"), args);
    true
}

/// Reports the end of a long run: its recovery if it was reported while in progress
/// (`was_live`), else the stall, captured late without a stack, then its recovery.
fn report_ended(shared: &Shared, py: Python<'_>, ended: Ended, was_live: bool) {
    let Some(reporter) = reporter(shared, py) else {
        return;
    };
    let threshold = f64::from_bits(shared.threshold.load(Ordering::Relaxed));
    let object = ended.object.unwrap_or_else(|| py.None());
    let total = ended.ended - ended.started;
    if !was_live {
        let args = (&object, total, threshold, ended.thread, true, false);
        call_reporter(py, &reporter, intern!(py, "stalled"), args);
    }
    let args = (&object, total, threshold, ended.thread);
    call_reporter(py, &reporter, intern!(py, "recovered"), args);
}

/// The reporter, unless the watchdog was switched off meanwhile.
fn reporter(shared: &Shared, py: Python<'_>) -> Option<Py<PyAny>> {
    lock(&shared.control)
        .reporter
        .as_ref()
        .map(|r| r.clone_ref(py))
}

/// Calls a method of the reporter; it logs its own callback's errors, so an error here
/// is the reporter's own: written as unraisable, the thread carries on.
fn call_reporter<'py>(
    py: Python<'py>,
    reporter: &Py<PyAny>,
    method: &Bound<'py, PyString>,
    args: impl pyo3::call::PyCallArgs<'py>,
) {
    if let Err(err) = reporter.bind(py).call_method1(method, args) {
        err.write_unraisable(py, Some(reporter.bind(py)));
    }
}
