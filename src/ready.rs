//! The ready queue's entries and running them (step 5 of the turn): a handle, a call
//! queued by asyncio's C tasks and futures without a handle, a transport's readiness, a
//! `sock_*` retry.

use std::ptr;
use std::sync::atomic::Ordering;
use std::time::Instant;

use pyo3::prelude::*;

use crate::event_loop::{LoopCore, NativeTransport};
use crate::handles::{self, Handle, LentContext, QueuedCall};
use crate::poller::Readiness;
use crate::sock_ops::SockOp;
use crate::stats::Culprit;

/// An entry of the ready queue: a handle, or a transport's readiness, which runs in
/// the queue's order as asyncio's reader/writer handles would.
pub(crate) enum Ready {
    Handle(Py<Handle>),
    /// A callback from asyncio's C tasks and futures, queued without a handle object.
    Call(QueuedCall),
    Io(NativeTransport, Readiness),
    /// Boxed, so that an entry is 32 bytes, not 48: the queue of a burst of callbacks
    /// is written and read in full.
    Sock(Box<SockOp>),
}

impl LoopCore {
    /// Runs one entry of the ready queue. In debug mode a handle runs through
    /// `_run_handle_debug`, which times it and reports a slow callback.
    #[inline(always)]
    pub(crate) fn run_item(
        slf: &Bound<'_, LoopCore>,
        item: Ready,
        lent: &mut LentContext,
    ) -> PyResult<()> {
        let py = slf.py();
        let core = slf.get();
        match item {
            Ready::Handle(handle) => {
                let handle = handle.into_bound(py);
                let outcome = if core.debug.load(Ordering::Relaxed) {
                    lent.leave(py)?;
                    slf.call_method1("_run_handle_debug", (&handle,)).map(drop)
                } else {
                    Handle::run_lent(&handle, lent)
                };
                handles::release_from_loop(handle);
                outcome
            }
            Ready::Call(call) => {
                if core.debug.load(Ordering::Relaxed) {
                    // Debug mode times and names every callback: give it its handle.
                    let handle = call.to_handle(py, slf.as_any())?;
                    slf.call_method1("_run_handle_debug", (handle,)).map(drop)
                } else {
                    call.run(py, slf.as_any())
                }
            }
            Ready::Io(transport, readiness) => transport.on_ready(py, readiness),
            Ready::Sock(op) => core.run_sock_op(py, op),
        }
    }

    /// `run_item`, published to the watchdog: what runs (the handle, the callback of a
    /// queued call, the transport whose protocol is called) is kept referenced here for
    /// the run, so the watchdog can name it while the run lasts.
    #[inline(never)]
    pub(crate) fn run_watched(
        slf: &Bound<'_, LoopCore>,
        item: Ready,
        lent: &mut LentContext,
    ) -> PyResult<()> {
        let py = slf.py();
        let object = match &item {
            Ready::Handle(handle) => Some(handle.bind(py).clone().into_any()),
            Ready::Call(call) => Some(call.callback.bind(py).clone()),
            Ready::Io(transport, _) => Some(transport.as_any(py).clone()),
            Ready::Sock(_) => None,
        };
        let watchdog = &slf.get().watchdog;
        let run = watchdog.begin(object.as_ref().map_or(ptr::null_mut(), Bound::as_ptr));
        let outcome = LoopCore::run_item(slf, item, lent);
        watchdog.end(run, object.as_ref());
        outcome
    }
}

/// Step 5 of the turn, the running half (`LoopCore::run_ready` picks the variant).
impl LoopCore {
    #[inline(always)]
    pub(crate) fn run_ready_with<const WATCHED: bool, const TIMED: bool>(
        slf: &Bound<'_, LoopCore>,
        ntodo: usize,
    ) -> PyResult<()> {
        let py = slf.py();
        let core = slf.get();
        // Consecutive callbacks whose handles copied an empty context share one entered
        // empty context; everything else leaves it first.
        let mut lent = LentContext::default();
        // Timed: one clock reading per callback, where one ends the next begins.
        let mut last = if TIMED { Some(Instant::now()) } else { None };
        let woken = LoopCore::run_entries::<WATCHED, TIMED>(slf, ntodo, &mut lent, &mut last)?;
        // What the reads woke (the task a `data_received` resumed) runs now, before
        // the turn's writes go out, as uvloop runs it in the turn of the read: asyncio
        // would run the same entries, in the same order, first thing next turn, after
        // a poll that only looked for more to queue behind them. That poll cost a
        // second turn per request-response round trip and its latency. A stop()
        // requested this turn ends the run first, as in asyncio.
        if woken > 0 && !core.stopping.load(Ordering::Relaxed) {
            // What asyncio's next turn would run: all that this turn queued.
            let batch = core.state.borrow_mut(py)?.ready.len();
            LoopCore::run_entries::<WATCHED, TIMED>(slf, woken, &mut lent, &mut last)?;
            // A stop() scheduled before the reads (run_until_complete's, a
            // call_soon_threadsafe(stop)) ran in that pass: asyncio would end the run
            // after that next turn's batch, so the rest of it (what was queued after
            // the last read: by a timer's callback, say) runs too. What the pass itself
            // queued stays for the next run, as there.
            if core.stopping.load(Ordering::Relaxed) && batch > woken {
                LoopCore::run_entries::<WATCHED, TIMED>(slf, batch - woken, &mut lent, &mut last)?;
            }
        }
        lent.leave(py)
    }

    /// Runs the next `count` entries of the ready queue. Returns how many entries had
    /// been queued behind them when the last I/O among them (a transport's readiness,
    /// a `sock_*` call's retry) had run: those its reads (and the entries before it)
    /// scheduled.
    #[inline(always)]
    fn run_entries<const WATCHED: bool, const TIMED: bool>(
        slf: &Bound<'_, LoopCore>,
        count: usize,
        lent: &mut LentContext,
        last: &mut Option<Instant>,
    ) -> PyResult<usize> {
        let py = slf.py();
        let core = slf.get();
        let mut woken = 0;
        for done in 1..=count {
            let Some(item) = core.state.borrow_mut(py)?.take_ready() else {
                break;
            };
            let io = matches!(item, Ready::Io(..) | Ready::Sock(_));
            if !matches!(item, Ready::Handle(_)) {
                lent.leave(py)?;
            }
            // What runs, referenced for the slowest runs' names (the run consumes it).
            let mut culprit = if TIMED { Culprit::of(py, &item) } else { None };
            if WATCHED {
                LoopCore::run_watched(slf, item, lent)?;
            } else {
                LoopCore::run_item(slf, item, lent)?;
            }
            if io {
                let queued = core.state.borrow_mut(py)?.ready.len();
                woken = queued.saturating_sub(count - done);
            }
            if let (true, Some(started)) = (TIMED, *last) {
                let now = Instant::now();
                let took = u64::try_from((now - started).as_nanos()).unwrap_or(u64::MAX);
                let displaced = core.state.borrow_mut(py)?.timed_run(took, &mut culprit);
                // Dropped here, not under the borrow: a last reference may run a finalizer.
                drop((displaced, culprit));
                *last = Some(now);
            }
        }
        Ok(woken)
    }
}

/// Lets go of ready-queue entries that will not run.
pub(crate) fn release_ready(py: Python<'_>, ready: impl IntoIterator<Item = Ready>) {
    for item in ready {
        if let Ready::Handle(handle) = item {
            handles::release_from_loop(handle.into_bound(py));
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_ready_entry_is_four_words() {
        assert_eq!(std::mem::size_of::<super::Ready>(), 32);
    }
}
