//! The loop's own metrics (`loop.stats()`): counters kept on every turn at the cost of
//! an addition, and, only when timing is switched on (`loop.set_stats_timing(True)`),
//! clock readings around the poll, the turn and each callback.
//!
//! Histograms have log-spaced buckets with inclusive upper bounds, as Prometheus' `le`:
//! bucket 0 counts values up to 1 of their unit (nanoseconds for times, entries for the
//! ready queue's depth), bucket `i` those in `(2^(i-1), 2^i]`.

use std::mem;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use pyo3::prelude::*;
use pyo3::types::PyDict;
use pyo3::{PyTraverseError, PyVisit};

use crate::event_loop::{FdOwner, LoopCore, LoopState, Ready};
use crate::poller::Readiness;
use crate::sock_ops::SockKind;

/// Buckets per histogram: up to 2^39 ns (about 9 minutes) or 2^39 entries.
const BUCKETS: usize = 40;

#[derive(Clone)]
pub(crate) struct Histogram {
    buckets: [u64; BUCKETS],
    count: u64,
    sum: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            buckets: [0; BUCKETS],
            count: 0,
            sum: 0,
        }
    }
}

impl Histogram {
    #[inline]
    pub fn record(&mut self, value: u64) {
        let bucket = if value <= 1 {
            0
        } else {
            (u64::BITS - (value - 1).leading_zeros()) as usize
        };
        self.buckets[bucket.min(BUCKETS - 1)] += 1;
        self.count += 1;
        self.sum = self.sum.saturating_add(value);
    }

    /// `{"buckets": [(upper bound, count), ...], "count": n, "sum": total}`, the
    /// bounds and the sum in `unit`s (1e-9 turns nanoseconds into seconds). Buckets
    /// after the last non-empty one are left out; the last bound is +inf.
    fn to_dict<'py>(&self, py: Python<'py>, unit: f64) -> PyResult<Bound<'py, PyDict>> {
        let dict = PyDict::new(py);
        let last = self
            .buckets
            .iter()
            .rposition(|&n| n > 0)
            .map_or(0, |i| i + 1);
        let mut buckets = Vec::with_capacity(last);
        for (i, &n) in self.buckets.iter().enumerate().take(last) {
            let bound = if i == BUCKETS - 1 {
                f64::INFINITY
            } else {
                // Bucket i holds values up to 2^i.
                (1u64 << i) as f64 * unit
            };
            buckets.push((bound, n));
        }
        dict.set_item("buckets", buckets)?;
        dict.set_item("count", self.count)?;
        dict.set_item("sum", self.sum as f64 * unit)?;
        Ok(dict)
    }
}

/// Bytes moved by the loop's stream and datagram transports, counted by each as it
/// reads and sends (shared with them, so the totals only grow: a transport that closes,
/// or leaves the registry while `sendfile` drives its socket, keeps its bytes in them).
#[derive(Default)]
pub(crate) struct ByteTotals {
    read: AtomicU64,
    written: AtomicU64,
}

impl ByteTotals {
    #[inline]
    pub fn add_read(&self, n: u64) {
        self.read.fetch_add(n, Ordering::Relaxed);
    }

    #[inline]
    pub fn add_written(&self, n: u64) {
        self.written.fetch_add(n, Ordering::Relaxed);
    }
}

/// What the loop counts.
#[derive(Clone, Default)]
pub(crate) struct LoopStats {
    pub turns: u64,
    /// Handles and scheduled calls taken off the ready queue to run (timers
    /// included; a handle cancelled after it was queued is counted, and not run).
    pub callbacks: u64,
    /// Transport readiness events handled, and `sock_*` operations retried.
    pub io_events: u64,
    pub timers_scheduled: u64,
    pub timers_fired: u64,
    pub timers_cancelled: u64,
    /// The ready queue's length at the start of each turn's callbacks.
    pub ready_depth: Histogram,
    /// How late each timer fired after its deadline, in ns (from the clock reading the
    /// turn makes anyway when timers exist).
    pub timer_lateness: Histogram,
    /// Set by `set_stats_timing`: the clock is read around the poll, the turn and each
    /// callback.
    pub timing: bool,
    pub polling_ns: u64,
    pub running_ns: u64,
    pub turn_length: Histogram,
    pub callback_length: Histogram,
}

impl LoopStats {
    /// A turn begins: counted, and its start time when timing is on.
    #[inline]
    pub fn begin_turn(&mut self) -> Option<Instant> {
        self.turns += 1;
        self.timing.then(Instant::now)
    }

    /// The turn that began at `started` polled until `polled` and has now ended.
    pub fn end_turn(&mut self, started: Instant, polled: Instant) {
        let now = Instant::now();
        let ns = |d: std::time::Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.polling_ns = self.polling_ns.saturating_add(ns(polled - started));
        self.running_ns = self.running_ns.saturating_add(ns(now - polled));
        self.turn_length.record(ns(now - started));
    }

    /// A timer is queued to run, `late` seconds after its deadline.
    #[inline]
    pub fn timer_fired(&mut self, late: f64) {
        self.timers_fired += 1;
        // Negative within the clock's resolution (a timer due "now"): on time.
        self.timer_lateness.record((late.max(0.0) * 1e9) as u64);
    }

    /// Counts an entry taken off the ready queue.
    #[inline]
    pub fn count_ready(&mut self, item: &Ready) {
        match item {
            Ready::Handle(_) | Ready::Call(_) => self.callbacks += 1,
            Ready::Io(..) | Ready::Sock(_) => self.io_events += 1,
        }
    }

    /// The snapshot as a dict of plain values (the Python layer adds what only it
    /// knows and the live transports' bytes).
    pub fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let dict = PyDict::new(py);
        dict.set_item("turns", self.turns)?;
        dict.set_item("callbacks", self.callbacks)?;
        dict.set_item("io_events", self.io_events)?;
        dict.set_item("timers_scheduled", self.timers_scheduled)?;
        dict.set_item("timers_fired", self.timers_fired)?;
        dict.set_item("timers_cancelled", self.timers_cancelled)?;
        dict.set_item("timing", self.timing)?;
        let histograms = PyDict::new(py);
        histograms.set_item("ready_depth", self.ready_depth.to_dict(py, 1.0)?)?;
        histograms.set_item(
            "timer_lateness_seconds",
            self.timer_lateness.to_dict(py, 1e-9)?,
        )?;
        if self.timing {
            dict.set_item("time_polling", self.polling_ns as f64 * 1e-9)?;
            dict.set_item("time_running", self.running_ns as f64 * 1e-9)?;
            histograms.set_item("turn_seconds", self.turn_length.to_dict(py, 1e-9)?)?;
            histograms.set_item("callback_seconds", self.callback_length.to_dict(py, 1e-9)?)?;
        }
        dict.set_item("histograms", histograms)?;
        Ok(dict)
    }
}

/// How many of the slowest runs timing keeps between two `loop.stats()` calls.
const SLOWEST: usize = 10;

/// What a timed entry of the ready queue runs, referenced before the run consumes the
/// entry; kept only if the run is among the slowest, and named by the Python layer
/// when a snapshot is taken.
pub(crate) enum Culprit {
    /// A handle's callback or a queued call's (a task's step among them).
    Callback(Py<PyAny>),
    /// A transport whose protocol this readiness was handled for.
    Transport(Py<PyAny>, Readiness),
    /// A `sock_*` operation retried.
    Sock(&'static str),
}

impl Culprit {
    #[inline]
    pub(crate) fn of(py: Python<'_>, item: &Ready) -> Option<Culprit> {
        Some(match item {
            Ready::Handle(handle) => {
                let state = handle.get().state.borrow_mut(py).ok()?;
                Culprit::Callback(state.callback.as_ref()?.clone_ref(py))
            }
            Ready::Call(call) => Culprit::Callback(call.callback.clone_ref(py)),
            Ready::Io(transport, readiness) => {
                Culprit::Transport(transport.as_any(py).clone().unbind(), *readiness)
            }
            Ready::Sock(op) => Culprit::Sock(match op.kind {
                SockKind::Recv(_) => "sock_recv",
                SockKind::RecvInto(_) => "sock_recv_into",
                SockKind::Send(..) => "sock_sendall",
            }),
        })
    }

    /// `(kind, object, detail)`: `("callback", callback, None)`, `("transport",
    /// transport, "read" | "write" | "read+write")` or `("sock", name, None)`.
    fn into_tuple(self, py: Python<'_>) -> (&'static str, Py<PyAny>, Option<&'static str>) {
        match self {
            Culprit::Callback(callback) => ("callback", callback, None),
            Culprit::Transport(transport, readiness) => {
                let detail = match (readiness.readable(), readiness.writable()) {
                    (true, true) => "read+write",
                    (true, false) => "read",
                    _ => "write",
                };
                ("transport", transport, Some(detail))
            }
            Culprit::Sock(name) => (
                "sock",
                pyo3::types::PyString::new(py, name).into_any().unbind(),
                None,
            ),
        }
    }
}

/// The slowest timed runs since the last snapshot: at most `SLOWEST`, in no order. A
/// run is compared with the shortest kept (`floor`) before anything else is done.
/// (Generic so that the unit tests, which do not link the interpreter, can use it.)
pub(crate) struct Slowest<C = Culprit> {
    runs: Vec<(u64, C)>,
    floor: u64,
}

impl<C> Default for Slowest<C> {
    fn default() -> Self {
        Slowest {
            runs: Vec::new(),
            floor: 0,
        }
    }
}

impl<C> Slowest<C> {
    #[inline]
    pub(crate) fn admits(&self, took: u64) -> bool {
        self.runs.len() < SLOWEST || took > self.floor
    }

    /// Keeps a run `admits` let in; returns the run it displaced, to be dropped once the
    /// loop's state is no longer borrowed (a drop may run a finalizer).
    pub(crate) fn keep(&mut self, took: u64, culprit: C) -> Option<C> {
        let displaced = if self.runs.len() < SLOWEST {
            self.runs.push((took, culprit));
            None
        } else {
            let shortest = self
                .runs
                .iter()
                .enumerate()
                .min_by_key(|(_, (ns, _))| *ns)
                .map_or(0, |(i, _)| i);
            Some(mem::replace(&mut self.runs[shortest], (took, culprit)).1)
        };
        if self.runs.len() == SLOWEST {
            self.floor = self.runs.iter().map(|(ns, _)| *ns).min().unwrap_or(0);
        }
        displaced
    }

    /// The runs kept, longest first; none are kept after this.
    pub(crate) fn take(&mut self) -> Vec<(u64, C)> {
        self.floor = 0;
        let mut runs = mem::take(&mut self.runs);
        runs.sort_by_key(|(ns, _)| std::cmp::Reverse(*ns));
        runs
    }
}

impl Slowest {
    pub(crate) fn visit(&self, visit: &PyVisit<'_>) -> Result<(), PyTraverseError> {
        for (_, culprit) in &self.runs {
            match culprit {
                Culprit::Callback(obj) | Culprit::Transport(obj, _) => visit.call(obj)?,
                Culprit::Sock(_) => {}
            }
        }
        Ok(())
    }
}

impl LoopState {
    /// A run timed at `took` ns ended: recorded, and what ran kept if it is among the
    /// slowest. Returns what is no longer kept, to be dropped after the borrow.
    #[inline]
    pub(crate) fn timed_run(
        &mut self,
        took: u64,
        culprit: &mut Option<Culprit>,
    ) -> Option<Culprit> {
        self.stats.callback_length.record(took);
        if !self.slowest.admits(took) {
            return None;
        }
        culprit.take().and_then(|c| self.slowest.keep(took, c))
    }

    /// The turn's callbacks begin: how many (the queue's length now, recorded) and
    /// whether each is timed.
    #[inline]
    pub(crate) fn begin_ready(&mut self) -> (usize, bool) {
        let depth = self.ready.len();
        self.stats.ready_depth.record(depth as u64);
        (depth, self.stats.timing)
    }

    /// The next entry of the ready queue, counted.
    #[inline]
    pub(crate) fn take_ready(&mut self) -> Option<Ready> {
        let item = self.ready.pop_front()?;
        self.stats.count_ready(&item);
        Some(item)
    }
}

impl LoopCore {
    /// `loop.stats()` without what only the Python layer knows. The loop's state is
    /// borrowed only to copy the figures out: building the dict runs the allocator,
    /// which may run a finalizer that lets another thread in.
    pub(crate) fn stats_snapshot<'py>(
        &self,
        py: Python<'py>,
        take_slowest: bool,
    ) -> PyResult<Bound<'py, PyDict>> {
        let (stats, watched, transports, ready, timers, slowest) = {
            let mut st = self.state.borrow_mut(py)?;
            let (mut watched, mut transports) = (0u64, 0u64);
            for owner in st.fds.owners() {
                match owner {
                    FdOwner::Callbacks(_) => watched += 1,
                    FdOwner::Transport(_) => transports += 1,
                }
            }
            let slowest = if take_slowest {
                st.slowest.take()
            } else {
                Vec::new()
            };
            (
                st.stats.clone(),
                watched,
                transports,
                st.ready.len(),
                st.timers.len(),
                slowest,
            )
        };
        let dict = stats.to_dict(py)?;
        if stats.timing && take_slowest {
            // (seconds, kind, object, detail) per run, longest first.
            let runs: Vec<_> = slowest
                .into_iter()
                .map(|(ns, culprit)| {
                    let (kind, object, detail) = culprit.into_tuple(py);
                    (ns as f64 * 1e-9, kind, object, detail)
                })
                .collect();
            dict.set_item("slowest_callbacks", runs)?;
        }
        dict.set_item("bytes_read", self.bytes.read.load(Ordering::Relaxed))?;
        dict.set_item("bytes_written", self.bytes.written.load(Ordering::Relaxed))?;
        dict.set_item("fds_watched", watched)?;
        dict.set_item("transports_registered", transports)?;
        dict.set_item("ready", ready)?;
        dict.set_item("timers_pending", timers)?;
        Ok(dict)
    }

    /// The transports registered with the loop now (references copied out under the
    /// borrow; nothing Python runs meanwhile).
    pub(crate) fn registered_transports(&self, py: Python<'_>) -> PyResult<Vec<Py<PyAny>>> {
        let st = self.state.borrow_mut(py)?;
        Ok(st
            .fds
            .owners()
            .filter_map(|owner| match owner {
                FdOwner::Transport(transport) => Some(transport.as_any(py).clone().unbind()),
                FdOwner::Callbacks(_) => None,
            })
            .collect())
    }

    pub(crate) fn time_stats(&self, py: Python<'_>, on: bool) -> PyResult<()> {
        let released = {
            let mut st = self.state.borrow_mut(py)?;
            st.stats.timing = on;
            if on {
                Vec::new()
            } else {
                st.slowest.take()
            }
        };
        drop(released);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_log_spaced() {
        let mut h = Histogram::default();
        for v in [0, 1, 2, 3, 4, 5, 1024, 1025, u64::MAX] {
            h.record(v);
        }
        assert_eq!(h.buckets[0], 2); // 0, 1
        assert_eq!(h.buckets[1], 1); // 2
        assert_eq!(h.buckets[2], 2); // 3, 4
        assert_eq!(h.buckets[3], 1); // 5
        assert_eq!(h.buckets[10], 1); // 1024 <= 2^10
        assert_eq!(h.buckets[11], 1); // 1025
        assert_eq!(h.buckets[BUCKETS - 1], 1); // clamped
        assert_eq!(h.count, 9);
    }

    #[test]
    fn slowest_keeps_the_longest_runs() {
        let mut slowest = Slowest::<&str>::default();
        // 1..=25 in a scrambled order: the 10 longest are 16..=25.
        for i in 0..25u64 {
            let took = (i * 7) % 25 + 1;
            if slowest.admits(took) {
                let displaced = slowest.keep(took, "run");
                assert_eq!(displaced.is_some(), i >= SLOWEST as u64);
            }
        }
        let kept: Vec<u64> = slowest.take().iter().map(|(ns, _)| *ns).collect();
        assert_eq!(kept, (16..=25).rev().collect::<Vec<_>>());
        assert!(slowest.admits(1)); // empty again after the snapshot
    }
}
