//! The ready queue's entries and running one: a handle, a call queued by asyncio's C
//! tasks and futures without a handle, a transport's readiness, a `sock_*` retry.

use std::ptr;
use std::sync::atomic::Ordering;

use pyo3::prelude::*;

use crate::event_loop::{LoopCore, NativeTransport};
use crate::handles::{self, Handle, LentContext, QueuedCall};
use crate::poller::Readiness;
use crate::sock_ops::SockOp;

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
