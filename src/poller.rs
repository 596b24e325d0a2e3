//! Readiness polling: a level-triggered epoll set, a slab of registrations with
//! generation numbers, and the waker that interrupts a blocked wait.
//!
//! epoll is used directly (one `epoll_wait` per turn, no timerfd) and in
//! level-triggered mode, which is what asyncio's `add_reader`/`add_writer` promise;
//! an fd that only `sock_*` operations wait on is edge-triggered (see
//! `event_loop::FdCallbacks`).

use std::io;
use std::mem;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

pub const READABLE: u32 = libc::EPOLLIN as u32;
pub const WRITABLE: u32 = libc::EPOLLOUT as u32;
/// Edge-triggered mode, for fds that only socket operations wait on (see `set_waiter`).
pub const EDGE: u32 = libc::EPOLLET as u32;
const ERROR_BITS: u32 = (libc::EPOLLERR | libc::EPOLLHUP) as u32;
/// Token of the waker's read end; slot tokens never reach it (slot index < 2^32 - 1).
pub const WAKER_TOKEN: u64 = u64::MAX;

/// A registration's key: slot index and the generation it had when registered.
/// An event whose generation no longer matches belongs to a closed registration
/// and is dropped, so it can never reach whoever reuses the fd number.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Token {
    pub index: u32,
    pub generation: u32,
}

impl Token {
    fn encode(self) -> u64 {
        (u64::from(self.generation) << 32) | u64::from(self.index)
    }
    pub fn decode(data: u64) -> Token {
        Token {
            index: data as u32,
            generation: (data >> 32) as u32,
        }
    }
}

/// What a ready event says, in asyncio's terms: an error or hang-up wakes both sides,
/// as `selectors.EpollSelector` reports it.
pub fn readiness(events: u32) -> (bool, bool) {
    let readable = events & (READABLE | ERROR_BITS) != 0;
    let writable = events & (WRITABLE | ERROR_BITS) != 0;
    (readable, writable)
}

struct Slot<T> {
    generation: u32,
    fd: RawFd,
    interest: u32,
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
    pub fn get_mut(&mut self, token: Token) -> Option<(&mut T, u32)> {
        let slot = self.slots.get_mut(token.index as usize)?;
        if slot.generation != token.generation {
            return None;
        }
        let interest = slot.interest;
        slot.owner.as_mut().map(|owner| (owner, interest))
    }

    pub fn fd_of(&self, token: Token) -> Option<RawFd> {
        let slot = self.slots.get(token.index as usize)?;
        (slot.generation == token.generation && slot.owner.is_some()).then_some(slot.fd)
    }

    /// No fd is registered (the waker is not part of the registry).
    pub fn is_empty(&self) -> bool {
        // Every slot is either registered or on the free list.
        self.free.len() == self.slots.len()
    }

    pub fn owners(&self) -> impl Iterator<Item = &T> {
        self.slots.iter().filter_map(|s| s.owner.as_ref())
    }

    fn insert(&mut self, fd: RawFd, interest: u32, owner: T) -> Token {
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
}

/// The epoll set plus the waker socket pair.
pub struct Poller {
    epoll: OwnedFd,
    wake_rx: OwnedFd,
    wake_tx: OwnedFd,
}

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

impl Poller {
    pub fn new() -> io::Result<Poller> {
        // SAFETY: epoll_create1 has no memory preconditions; a non-negative result is a
        // fresh fd that nothing else owns, so OwnedFd may take it.
        let epoll =
            unsafe { OwnedFd::from_raw_fd(check(libc::epoll_create1(libc::EPOLL_CLOEXEC))?) };
        let mut pair = [0 as libc::c_int; 2];
        let kind = libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC;
        // SAFETY: `pair` is a valid array of two c_ints for socketpair to fill.
        check(unsafe { libc::socketpair(libc::AF_UNIX, kind, 0, pair.as_mut_ptr()) })?;
        // SAFETY: socketpair succeeded, so both are fresh fds owned by nobody else.
        let (wake_rx, wake_tx) =
            unsafe { (OwnedFd::from_raw_fd(pair[0]), OwnedFd::from_raw_fd(pair[1])) };
        let poller = Poller {
            epoll,
            wake_rx,
            wake_tx,
        };
        poller.ctl(
            libc::EPOLL_CTL_ADD,
            poller.wake_rx.as_raw_fd(),
            READABLE,
            WAKER_TOKEN,
        )?;
        Ok(poller)
    }

    pub fn epoll_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    pub fn wake_tx_fd(&self) -> RawFd {
        self.wake_tx.as_raw_fd()
    }

    fn ctl(&self, op: libc::c_int, fd: RawFd, interest: u32, data: u64) -> io::Result<()> {
        let mut event = libc::epoll_event {
            events: interest,
            u64: data,
        };
        // SAFETY: `event` is a valid epoll_event for the duration of the call; epoll_ctl
        // only reads it.
        check(unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), op, fd, &mut event) })?;
        Ok(())
    }

    /// Registers `fd` for `owner`. An interest of 0 claims the fd in the registry
    /// without adding it to epoll (a transport that is not reading yet).
    pub fn register<T>(
        &self,
        reg: &mut Registry<T>,
        fd: RawFd,
        interest: u32,
        owner: T,
    ) -> io::Result<Token> {
        let token = reg.insert(fd, interest, owner);
        if interest != 0 {
            if let Err(err) = self.ctl(libc::EPOLL_CTL_ADD, fd, interest, token.encode()) {
                reg.remove(token);
                return Err(err);
            }
        }
        Ok(token)
    }

    /// Changes the interest of a live registration. The fd is in the epoll set exactly
    /// while its interest is non-zero: epoll reports hang-ups even for an empty
    /// interest, and level-triggered they would be reported on every turn.
    pub fn set_interest<T>(
        &self,
        reg: &mut Registry<T>,
        token: Token,
        interest: u32,
    ) -> io::Result<()> {
        let Some(slot) = reg.slots.get_mut(token.index as usize) else {
            return Ok(());
        };
        if slot.generation != token.generation || slot.interest == interest {
            return Ok(());
        }
        let old = mem::replace(&mut slot.interest, interest);
        let fd = slot.fd;
        let data = token.encode();
        if interest == 0 {
            // The fd may already be closed, in which case epoll dropped it itself.
            let _ = self.ctl(libc::EPOLL_CTL_DEL, fd, 0, 0);
            return Ok(());
        }
        let (op, retry) = if old == 0 {
            (libc::EPOLL_CTL_ADD, libc::EPOLL_CTL_MOD)
        } else {
            (libc::EPOLL_CTL_MOD, libc::EPOLL_CTL_ADD)
        };
        match self.ctl(op, fd, interest, data) {
            // The fd was closed and its number reused without the registration being
            // removed (epoll forgot it), or it is still in the set: do the other one.
            Err(err) if matches!(err.raw_os_error(), Some(libc::ENOENT) | Some(libc::EEXIST)) => {
                self.ctl(retry, fd, interest, data)
            }
            other => other,
        }
    }

    /// Removes a registration; the fd may already be closed (epoll dropped it then).
    pub fn deregister<T>(&self, reg: &mut Registry<T>, token: Token) -> Option<T> {
        let fd = reg.fd_of(token)?;
        if reg.slots[token.index as usize].interest != 0 {
            let _ = self.ctl(libc::EPOLL_CTL_DEL, fd, 0, 0);
        }
        reg.remove(token)
    }

    /// Waits for events; `timeout_ms < 0` waits forever. Blocks: call without the GIL.
    pub fn wait(
        epoll_fd: RawFd,
        events: &mut [libc::epoll_event],
        timeout_ms: i32,
    ) -> io::Result<usize> {
        let max = events.len().min(i32::MAX as usize) as libc::c_int;
        // SAFETY: `events` is a valid, writable buffer of `max` epoll_event structs that
        // outlives the call; the kernel writes at most `max` of them.
        let n = unsafe { libc::epoll_wait(epoll_fd, events.as_mut_ptr(), max, timeout_ms) };
        check(n).map(|n| n as usize)
    }

    /// Reads everything queued on the waker; returns the non-zero bytes, which are
    /// signal numbers written by `signal.set_wakeup_fd`.
    pub fn drain_waker(&self, signals: &mut Vec<u8>) {
        let mut buf = [0u8; 256];
        loop {
            // SAFETY: reads into a valid stack buffer of the stated length.
            let n =
                unsafe { libc::read(self.wake_rx.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                break;
            }
            signals.extend(buf[..n as usize].iter().copied().filter(|b| *b != 0));
            if (n as usize) < buf.len() {
                break;
            }
        }
    }
}

/// Interrupts a blocked `wait` from any thread by writing to the waker's write end.
/// A full socket buffer already holds a pending wake-up, so `EAGAIN` is not an error.
/// The caller guarantees `fd` is the live waker (see `ThreadsafeQueue::wake_fd`).
pub fn wake_fd(fd: RawFd) {
    let byte = 0u8;
    // SAFETY: writes one byte from a valid stack location; `fd` is the waker socket,
    // which the caller keeps open for the duration of the call.
    unsafe { libc::write(fd, (&byte as *const u8).cast(), 1) };
}
