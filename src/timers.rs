//! The timers: ordered by (when, sequence), cancelled entries removed lazily and
//! compacted away once they are more than half of them.

use std::cmp::Ordering as CmpOrdering;
use std::collections::{BinaryHeap, VecDeque};
use std::mem;
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
    /// `key` and the insertion sequence as one integer that sorts as (key, seq) does:
    /// one comparison per step of the heap.
    rank: u128,
    handle: Py<TimerHandle>,
}

/// Maps a float to an integer with the same order (`f64::total_cmp`'s).
fn ordered_bits(x: f64) -> u64 {
    let bits = x.to_bits();
    if bits >> 63 == 1 {
        !bits
    } else {
        bits | (1 << 63)
    }
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
        other.rank.cmp(&self.rank)
    }
}

/// Timers in two parts: `run`, those that arrived in deadline order (the common case:
/// the same delay again and again, as with timeouts), kept in a queue where adding and
/// taking the first are O(1); and `heap`, the rest. The next timer is the earlier of the
/// two fronts.
#[derive(Default)]
pub struct Timers {
    heap: BinaryHeap<Entry>,
    run: VecDeque<Entry>,
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
        let entry = Entry {
            key,
            rank: (u128::from(ordered_bits(key)) << 64) | u128::from(self.next_seq),
            handle,
        };
        if self.run.back().is_none_or(|last| entry.rank > last.rank) {
            self.run.push_back(entry);
        } else {
            self.heap.push(entry);
        }
    }

    pub fn len(&self) -> usize {
        self.heap.len() + self.run.len()
    }

    pub fn cancelled_count(&self) -> usize {
        self.cancelled
    }

    /// A scheduled timer was cancelled.
    pub fn note_cancelled(&mut self) {
        self.cancelled += 1;
    }

    /// The earliest entry.
    fn first(&self) -> Option<&Entry> {
        match (self.heap.peek(), self.run.front()) {
            (Some(h), Some(r)) => Some(if h.rank < r.rank { h } else { r }),
            (h, r) => h.or(r),
        }
    }

    /// Removes the earliest entry.
    fn pop_first(&mut self) -> Option<Entry> {
        let from_heap = match (self.heap.peek(), self.run.front()) {
            (Some(h), Some(r)) => h.rank < r.rank,
            (h, _) => h.is_some(),
        };
        if from_heap {
            self.heap.pop()
        } else {
            self.run.pop_front()
        }
    }

    /// Drops cancelled timers from the front (and compacts both parts if cancelled
    /// timers are the majority), returning the removed handles so the caller can
    /// release them outside any borrow of the loop state.
    pub fn prune(&mut self, py: Python<'_>, dead: &mut Vec<Py<TimerHandle>>) {
        let n = self.len();
        if n > MIN_SCHEDULED_FOR_COMPACTION && self.cancelled as f64 / n as f64 > CANCELLED_FRACTION
        {
            let mut retire = |entry: Entry| {
                if is_cancelled(py, &entry.handle) {
                    entry.handle.get().scheduled.store(false, Ordering::Relaxed);
                    dead.push(entry.handle);
                    None
                } else {
                    Some(entry)
                }
            };
            let heap: Vec<Entry> = mem::take(&mut self.heap)
                .into_vec()
                .into_iter()
                .filter_map(&mut retire)
                .collect();
            self.heap = BinaryHeap::from(heap);
            self.run = mem::take(&mut self.run)
                .into_iter()
                .filter_map(&mut retire)
                .collect();
            self.cancelled = 0;
        }
        while self
            .first()
            .is_some_and(|top| is_cancelled(py, &top.handle))
        {
            if let Some(entry) = self.pop_first() {
                entry.handle.get().scheduled.store(false, Ordering::Relaxed);
                self.cancelled = self.cancelled.saturating_sub(1);
                dead.push(entry.handle);
            }
        }
    }

    /// The earliest `when` among the timers (after `prune`, a live one).
    pub fn next_when(&self) -> Option<f64> {
        self.first().map(|e| e.key)
    }

    /// Pops the next timer if it is due before `end_time`.
    pub fn pop_due(&mut self, py: Python<'_>, end_time: f64) -> Option<(Py<TimerHandle>, bool)> {
        if self.first()?.key >= end_time {
            return None;
        }
        let entry = self.pop_first()?;
        entry.handle.get().scheduled.store(false, Ordering::Relaxed);
        let cancelled = is_cancelled(py, &entry.handle);
        if cancelled {
            self.cancelled = self.cancelled.saturating_sub(1);
        }
        Some((entry.handle, cancelled))
    }

    /// Empties the timers (loop close), handing back the handles for release.
    pub fn drain(&mut self, dead: &mut Vec<Py<TimerHandle>>) {
        self.cancelled = 0;
        let heap = mem::take(&mut self.heap).into_vec();
        let run = mem::take(&mut self.run);
        dead.extend(heap.into_iter().chain(run).map(|e| e.handle));
    }

    pub fn handles(&self) -> impl Iterator<Item = &Py<TimerHandle>> {
        self.heap.iter().chain(self.run.iter()).map(|e| &e.handle)
    }
}

#[cfg(test)]
mod tests {
    use super::ordered_bits;

    #[test]
    fn ordered_bits_keeps_float_order() {
        let values = [
            f64::NEG_INFINITY,
            -1e300,
            -2.5,
            -0.0,
            0.0,
            1e-300,
            1.0,
            1.5,
            1e300,
            f64::INFINITY,
        ];
        for pair in values.windows(2) {
            assert!(ordered_bits(pair[0]) < ordered_bits(pair[1]), "{pair:?}");
        }
    }
}
