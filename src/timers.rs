//! The timer heap: ordered by (when, sequence), cancelled entries removed lazily and
//! compacted away once they are more than half of the heap.

use std::cmp::Ordering as CmpOrdering;
use std::collections::BinaryHeap;
use std::sync::atomic::Ordering;

use pyo3::prelude::*;

use crate::handles::TimerHandle;

/// asyncio's thresholds: compact when at least this many timers are scheduled...
const MIN_SCHEDULED_FOR_COMPACTION: usize = 100;
/// ...and cancelled ones are more than this fraction of them.
const CANCELLED_FRACTION: f64 = 0.5;

struct Entry {
    /// `when`, with NaN mapped to -inf so that it fires at once, as it does in asyncio.
    key: f64,
    seq: u64,
    handle: Py<TimerHandle>,
}

impl PartialEq for Entry {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == CmpOrdering::Equal
    }
}
impl Eq for Entry {}
impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(other))
    }
}
impl Ord for Entry {
    /// Reversed, so that `BinaryHeap` (a max-heap) pops the earliest timer first.
    fn cmp(&self, other: &Self) -> CmpOrdering {
        other
            .key
            .total_cmp(&self.key)
            .then_with(|| other.seq.cmp(&self.seq))
    }
}

#[derive(Default)]
pub struct Timers {
    heap: BinaryHeap<Entry>,
    next_seq: u64,
    cancelled: usize,
}

fn is_cancelled(py: Python<'_>, handle: &Py<TimerHandle>) -> bool {
    handle.bind(py).as_super().get().is_cancelled()
}

impl Timers {
    pub fn push(&mut self, handle: Py<TimerHandle>, when: f64) {
        let key = if when.is_nan() {
            f64::NEG_INFINITY
        } else {
            when
        };
        self.next_seq += 1;
        self.heap.push(Entry {
            key,
            seq: self.next_seq,
            handle,
        });
    }

    pub fn len(&self) -> usize {
        self.heap.len()
    }

    pub fn cancelled_count(&self) -> usize {
        self.cancelled
    }

    /// A scheduled timer was cancelled.
    pub fn note_cancelled(&mut self) {
        self.cancelled += 1;
    }

    /// Drops cancelled timers from the top of the heap (and compacts the heap if they
    /// are the majority), returning the removed handles so the caller can release them
    /// outside any borrow of the loop state.
    pub fn prune(&mut self, py: Python<'_>, dead: &mut Vec<Py<TimerHandle>>) {
        let n = self.heap.len();
        if n > MIN_SCHEDULED_FOR_COMPACTION && self.cancelled as f64 / n as f64 > CANCELLED_FRACTION
        {
            let entries = std::mem::take(&mut self.heap).into_vec();
            let mut live = Vec::with_capacity(n - self.cancelled);
            for entry in entries {
                if is_cancelled(py, &entry.handle) {
                    entry.handle.get().scheduled.store(false, Ordering::Relaxed);
                    dead.push(entry.handle);
                } else {
                    live.push(entry);
                }
            }
            self.heap = BinaryHeap::from(live);
            self.cancelled = 0;
        }
        while let Some(top) = self.heap.peek() {
            if !is_cancelled(py, &top.handle) {
                break;
            }
            if let Some(entry) = self.heap.pop() {
                entry.handle.get().scheduled.store(false, Ordering::Relaxed);
                self.cancelled = self.cancelled.saturating_sub(1);
                dead.push(entry.handle);
            }
        }
    }

    /// The earliest `when` among the timers (after `prune`, a live one).
    pub fn next_when(&self) -> Option<f64> {
        self.heap.peek().map(|e| e.key)
    }

    /// Pops the next timer if it is due before `end_time`.
    pub fn pop_due(&mut self, py: Python<'_>, end_time: f64) -> Option<(Py<TimerHandle>, bool)> {
        let top = self.heap.peek()?;
        if top.key >= end_time {
            return None;
        }
        let entry = self.heap.pop()?;
        entry.handle.get().scheduled.store(false, Ordering::Relaxed);
        let cancelled = is_cancelled(py, &entry.handle);
        if cancelled {
            self.cancelled = self.cancelled.saturating_sub(1);
        }
        Some((entry.handle, cancelled))
    }

    /// Empties the heap (loop close), handing back the handles for release.
    pub fn drain(&mut self, dead: &mut Vec<Py<TimerHandle>>) {
        self.cancelled = 0;
        dead.extend(
            std::mem::take(&mut self.heap)
                .into_vec()
                .into_iter()
                .map(|e| e.handle),
        );
    }

    pub fn handles(&self) -> impl Iterator<Item = &Py<TimerHandle>> {
        self.heap.iter().map(|e| &e.handle)
    }
}
