//! Readiness polling: the registry of fds with generation numbers, and the project's
//! own small types a backend speaks in (`Interest`, `Readiness`, `Event`). The kernel
//! interface lives in one backend file (the module below), the only one that names its
//! calls and flags.
//!
//! # What a backend provides
//! A `Poller` (registering an fd for an owner with an `Interest`, changing it, removing
//! it; waiting; a waker) and the `Events` buffer it owns and lends out for a wait.
//! Its contract:
//! - **Level-triggered by default**, as asyncio's `add_reader`/`add_writer` promise:
//!   an fd is reported on every wait for as long as it is ready.
//! - **`EDGE`** asks for a report per change of readiness instead. The `sock_*`
//!   waiters use it (see `waiters::FdCallbacks`), which is safe because every socket
//!   operation tries its I/O before it waits.
//! - **An empty interest** keeps the registration (and its token) without asking the
//!   kernel for anything: a transport that is not reading yet. Hang-ups are reported
//!   even for an empty interest, level-triggered on every turn, so the fd must then be
//!   out of the kernel's set.
//! - **Readiness** is reported as asyncio's selector on Linux reports it: an error or
//!   a hang-up wakes both sides.
//! - **The waker** interrupts a blocked wait from any thread (`wake_fd`) and is
//!   reported as `Event::Waker` by the next wait after any number of wake-ups, with
//!   nothing to read. Signal numbers, which `signal.set_wakeup_fd` writes one byte
//!   each, come on a channel of their own (`signal_fd`), reported as
//!   `Event::Signals` and read by `drain_signals`.
//! - **The generation rule**: every event carries the `Token` its registration got.
//!   Removing a registration bumps its slot's generation, so `Registry::get_mut`
//!   drops an event for a registration that is gone, and it can never reach whoever
//!   reuses the fd number.
//! - **The wait** is made without the GIL and without the loop's state borrowed: the
//!   buffer is taken out of the poller for it, and other threads may register fds
//!   meanwhile.
//!
//! # A completion-based backend (io_uring)
//! Readiness alone fits as it is: a multishot poll request per registration with the
//! token as its user data, `set_interest` as a poll update, the waker as a read on an
//! eventfd, and `Events` filled from the completion queue. That gains little over
//! the readiness backend. What io_uring is for, reads and writes submitted rather than attempted on
//! readiness, does not fit without more: an event would carry an operation's result
//! (a byte count or an errno) instead of a `Readiness`, so `Event` gains a completion
//! kind and the owners (transports, socket operations) a way to take it; the buffers
//! handed to the kernel (a transport's read buffer and write queue, the Python buffer
//! of `sock_recv_into`) must stay alive and unmoved until their completion arrives,
//! also after a `close()`; and cancelling is itself asynchronous, so a slot may only
//! be reused once every operation submitted under its generation has completed.
//! `add_reader`/`add_writer` would stay readiness polls. That is a change to the
//! owners' read and write paths, not only a new file here.

mod epoll;

pub use epoll::{wake_fd, Events, Poller};

use std::ops::{BitOr, BitOrAssign};
use std::os::fd::RawFd;

/// What a registration asks to be told about: readable, writable (either, both or
/// neither), and whether edge-triggered.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct Interest(u8);

pub const READABLE: Interest = Interest(1);
pub const WRITABLE: Interest = Interest(2);
/// Edge-triggered mode, for fds that only socket operations wait on (see
/// `waiters::FdCallbacks`).
pub const EDGE: Interest = Interest(4);

impl Interest {
    pub const NONE: Interest = Interest(0);

    #[inline]
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// Every flag of `other` is set.
    #[inline]
    pub const fn contains(self, other: Interest) -> bool {
        self.0 & other.0 == other.0
    }

    /// This interest with the flags of `other` cleared.
    #[inline]
    pub const fn without(self, other: Interest) -> Interest {
        Interest(self.0 & !other.0)
    }
}

impl BitOr for Interest {
    type Output = Interest;

    #[inline]
    fn bitor(self, other: Interest) -> Interest {
        Interest(self.0 | other.0)
    }
}

impl BitOrAssign for Interest {
    #[inline]
    fn bitor_assign(&mut self, other: Interest) {
        self.0 |= other.0;
    }
}

/// What a ready event says, in asyncio's terms (an error or hang-up is both).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Readiness {
    readable: bool,
    writable: bool,
}

impl Readiness {
    #[inline]
    pub const fn new(readable: bool, writable: bool) -> Readiness {
        Readiness { readable, writable }
    }

    #[inline]
    pub const fn readable(self) -> bool {
        self.readable
    }

    #[inline]
    pub const fn writable(self) -> bool {
        self.writable
    }
}

/// One entry of a wait's `Events`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Event {
    /// The waker was written to since the last wait reported it.
    Waker,
    /// Signal numbers arrived (`signal.set_wakeup_fd`): read them
    /// (`Poller::drain_signals`).
    Signals,
    /// A registration's fd is ready; the token may be stale (see the generation rule).
    Io(Token, Readiness),
}

/// A registration's key: slot index and the generation it had when registered.
/// An event whose generation no longer matches belongs to a closed registration
/// and is dropped, so it can never reach whoever reuses the fd number.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Token {
    pub index: u32,
    pub generation: u32,
}

impl Token {
    /// The token as one integer, the user data a kernel interface carries per fd.
    #[inline]
    fn encode(self) -> u64 {
        (u64::from(self.generation) << 32) | u64::from(self.index)
    }

    #[inline]
    fn decode(data: u64) -> Token {
        Token {
            index: data as u32,
            generation: (data >> 32) as u32,
        }
    }
}

struct Slot<T> {
    generation: u32,
    fd: RawFd,
    interest: Interest,
    owner: Option<T>,
}

/// `by_fd` entry of an fd that is not registered.
const NO_SLOT: u32 = u32::MAX;

/// Registrations keyed by fd, each with the owner that handles its events.
pub struct Registry<T> {
    slots: Vec<Slot<T>>,
    free: Vec<u32>,
    /// Slot index by fd number (the kernel hands out the lowest free number, so the
    /// numbers in use are dense): 4 bytes per number up to the highest registered.
    by_fd: Vec<u32>,
}

impl<T> Default for Registry<T> {
    fn default() -> Self {
        Registry {
            slots: Vec::new(),
            free: Vec::new(),
            by_fd: Vec::new(),
        }
    }
}

impl<T> Registry<T> {
    pub fn token_of(&self, fd: RawFd) -> Option<Token> {
        let index = *self.by_fd.get(usize::try_from(fd).ok()?)?;
        let slot = self.slots.get(index as usize)?;
        Some(Token {
            index,
            generation: slot.generation,
        })
    }

    /// The owner and interest of a live registration, if the token is still current.
    #[inline]
    pub fn get_mut(&mut self, token: Token) -> Option<(&mut T, Interest)> {
        let slot = self.slots.get_mut(token.index as usize)?;
        if slot.generation != token.generation {
            return None;
        }
        let interest = slot.interest;
        slot.owner.as_mut().map(|owner| (owner, interest))
    }

    /// No fd is registered (the waker is not part of the registry).
    pub fn is_empty(&self) -> bool {
        // Every slot is either registered or on the free list.
        self.free.len() == self.slots.len()
    }

    pub fn owners(&self) -> impl Iterator<Item = &T> {
        self.slots.iter().filter_map(|s| s.owner.as_ref())
    }

    fn insert(&mut self, fd: RawFd, interest: Interest, owner: T) -> Token {
        let index = match self.free.pop() {
            Some(index) => {
                let slot = &mut self.slots[index as usize];
                slot.fd = fd;
                slot.interest = interest;
                slot.owner = Some(owner);
                index
            }
            None => {
                self.slots.push(Slot {
                    generation: 0,
                    fd,
                    interest,
                    owner: Some(owner),
                });
                (self.slots.len() - 1) as u32
            }
        };
        // Callers pass open fds (non-negative); a negative one is simply not indexed.
        if let Ok(at) = usize::try_from(fd) {
            if at >= self.by_fd.len() {
                self.by_fd.resize(at + 1, NO_SLOT);
            }
            self.by_fd[at] = index;
        }
        Token {
            index,
            generation: self.slots[index as usize].generation,
        }
    }

    /// Frees the slot and bumps its generation; returns the owner.
    fn remove(&mut self, token: Token) -> Option<T> {
        let slot = self.slots.get_mut(token.index as usize)?;
        if slot.generation != token.generation {
            return None;
        }
        let owner = slot.owner.take();
        slot.generation = slot.generation.wrapping_add(1);
        if let Some(at) = usize::try_from(slot.fd)
            .ok()
            .and_then(|at| self.by_fd.get_mut(at))
            .filter(|at| **at == token.index)
        {
            *at = NO_SLOT;
        }
        self.free.push(token.index);
        owner
    }

    /// The slot of a live registration, for a backend changing its interest.
    fn live_slot(&mut self, token: Token) -> Option<&mut Slot<T>> {
        self.slots
            .get_mut(token.index as usize)
            .filter(|slot| slot.generation == token.generation)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_removed_registration_drops_its_events() {
        let mut reg = Registry::default();
        let old = reg.insert(5, READABLE, "first");
        assert_eq!(reg.remove(old), Some("first"));
        let new = reg.insert(5, WRITABLE, "second");
        assert_eq!(new.index, old.index);
        assert!(reg.get_mut(old).is_none());
        assert_eq!(
            reg.get_mut(new).map(|(o, i)| (*o, i)),
            Some(("second", WRITABLE))
        );
        assert_eq!(Token::decode(new.encode()), new);
    }

    #[test]
    fn interest_flags() {
        let both = READABLE | WRITABLE;
        assert!(both.contains(READABLE) && both.contains(WRITABLE) && !both.contains(EDGE));
        assert_eq!(both.without(READABLE), WRITABLE);
        assert!(both.without(both).is_empty());
    }
}
