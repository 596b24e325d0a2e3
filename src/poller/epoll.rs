//! The Linux backend: one epoll set, used directly (one `epoll_wait` per turn, no
//! timerfd), level-triggered unless a registration asks for `EDGE`, an eventfd as the
//! waker (a write from another thread is one counter addition, where a socket write
//! allocates a buffer) and a socket pair for signal numbers (`set_wakeup_fd` writes
//! bytes, which an eventfd does not take).
//!
//! The waker is edge-triggered and never read: every write to an eventfd wakes its
//! waiters, so epoll reports an edge-triggered entry again after each write although
//! the counter was never reset. A woken loop so makes no `read` before it runs what
//! woke it, one system call fewer per `call_soon_threadsafe` wake-up.

use std::io;
use std::mem;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use super::{Event, Interest, Readiness, Registry, Token, EDGE, READABLE, WRITABLE};

const ERROR_BITS: u32 = (libc::EPOLLERR | libc::EPOLLHUP) as u32;
/// Tokens of the waker and of the signal socket's read end; slot tokens never reach
/// them (slot index < 2^32 - 1).
const WAKER_TOKEN: u64 = u64::MAX;
const SIGNALS_TOKEN: u64 = u64::MAX - 1;
const INITIAL_EVENTS: usize = 256;
const MAX_EVENTS: usize = 64 * 1024;

/// The epoll flags of an interest.
#[inline]
fn epoll_bits(interest: Interest) -> u32 {
    let mut bits = 0;
    if interest.contains(READABLE) {
        bits |= libc::EPOLLIN as u32;
    }
    if interest.contains(WRITABLE) {
        bits |= libc::EPOLLOUT as u32;
    }
    if interest.contains(EDGE) {
        bits |= libc::EPOLLET as u32;
    }
    bits
}

/// What epoll's flags say, in asyncio's terms: an error or hang-up wakes both sides,
/// as `selectors.EpollSelector` reports it.
#[inline]
fn readiness(events: u32) -> Readiness {
    Readiness::new(
        events & (libc::EPOLLIN as u32 | ERROR_BITS) != 0,
        events & (libc::EPOLLOUT as u32 | ERROR_BITS) != 0,
    )
}

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// The buffer one wait fills, owned by the `Poller` and lent out for the wait.
pub struct Events {
    /// The epoll fd, copied: the wait is made with the loop state, and the poller in
    /// it, not borrowed. The poller outlives every wait (the loop is not closed while
    /// it runs).
    epoll_fd: RawFd,
    buf: Vec<libc::epoll_event>,
    /// How many entries of `buf` the last wait filled.
    len: usize,
}

impl Events {
    /// Waits for events; `timeout_ms < 0` waits forever. Blocks: call without the GIL.
    /// A wait that filled the buffer may have left events behind: the next one gets
    /// twice the room, up to `MAX_EVENTS`.
    pub fn wait(&mut self, timeout_ms: i32) -> io::Result<usize> {
        if self.len == self.buf.len() && self.buf.len() < MAX_EVENTS {
            let grown = self.buf.len() * 2;
            self.buf
                .resize(grown, libc::epoll_event { events: 0, u64: 0 });
        }
        self.len = 0;
        let max = self.buf.len().min(i32::MAX as usize) as libc::c_int;
        // SAFETY: `buf` is a valid, writable buffer of `max` epoll_event structs that
        // outlives the call; the kernel writes at most `max` of them.
        let n = unsafe { libc::epoll_wait(self.epoll_fd, self.buf.as_mut_ptr(), max, timeout_ms) };
        self.len = check(n)? as usize;
        Ok(self.len)
    }

    /// The last wait reported nothing (it timed out or was interrupted).
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The events of the last wait, in the kernel's order.
    #[inline]
    pub fn iter(&self) -> impl Iterator<Item = Event> + '_ {
        self.buf[..self.len].iter().map(|event| {
            // Copied out field by field: epoll_event is packed on x86-64.
            let (data, events) = (event.u64, event.events);
            if data == WAKER_TOKEN {
                Event::Waker
            } else if data == SIGNALS_TOKEN {
                Event::Signals
            } else {
                Event::Io(Token::decode(data), readiness(events))
            }
        })
    }
}

/// The epoll set, the waker and the signal socket pair.
pub struct Poller {
    epoll: OwnedFd,
    waker: OwnedFd,
    signal_rx: OwnedFd,
    signal_tx: OwnedFd,
    /// `None` while lent out for a wait.
    events: Option<Events>,
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
        let (signal_rx, signal_tx) =
            unsafe { (OwnedFd::from_raw_fd(pair[0]), OwnedFd::from_raw_fd(pair[1])) };
        // SAFETY: eventfd has no memory preconditions; a non-negative result is a fresh
        // fd that nothing else owns.
        let waker = unsafe {
            OwnedFd::from_raw_fd(check(libc::eventfd(
                0,
                libc::EFD_NONBLOCK | libc::EFD_CLOEXEC,
            ))?)
        };
        let events = Events {
            epoll_fd: epoll.as_raw_fd(),
            buf: vec![libc::epoll_event { events: 0, u64: 0 }; INITIAL_EVENTS],
            len: 0,
        };
        let poller = Poller {
            epoll,
            waker,
            signal_rx,
            signal_tx,
            events: Some(events),
        };
        let waker = poller.waker.as_raw_fd();
        poller.ctl(libc::EPOLL_CTL_ADD, waker, READABLE | EDGE, WAKER_TOKEN)?;
        let signals = poller.signal_rx.as_raw_fd();
        poller.ctl(libc::EPOLL_CTL_ADD, signals, READABLE, SIGNALS_TOKEN)?;
        Ok(poller)
    }

    /// The waker, for `wake_fd`.
    pub fn wake_tx_fd(&self) -> RawFd {
        self.waker.as_raw_fd()
    }

    /// The signal socket's write end, for `signal.set_wakeup_fd`.
    pub fn signal_fd(&self) -> RawFd {
        self.signal_tx.as_raw_fd()
    }

    /// Lends out the events buffer for a wait made without the poller borrowed; `None`
    /// if it is already lent (a wait from inside a wait).
    pub fn take_events(&mut self) -> Option<Events> {
        self.events.take()
    }

    /// Takes the buffer back after the wait and its dispatch.
    pub fn restore_events(&mut self, events: Events) {
        self.events = Some(events);
    }

    fn ctl(&self, op: libc::c_int, fd: RawFd, interest: Interest, data: u64) -> io::Result<()> {
        let mut event = libc::epoll_event {
            events: epoll_bits(interest),
            u64: data,
        };
        // SAFETY: `event` is a valid epoll_event for the duration of the call; epoll_ctl
        // only reads it.
        check(unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), op, fd, &mut event) })?;
        Ok(())
    }

    /// Registers `fd` for `owner`. An empty interest claims the fd in the registry
    /// without adding it to epoll (a transport that is not reading yet).
    pub fn register<T>(
        &self,
        reg: &mut Registry<T>,
        fd: RawFd,
        interest: Interest,
        owner: T,
    ) -> io::Result<Token> {
        let token = reg.insert(fd, interest, owner);
        if !interest.is_empty() {
            if let Err(err) = self.ctl(libc::EPOLL_CTL_ADD, fd, interest, token.encode()) {
                reg.remove(token);
                return Err(err);
            }
        }
        Ok(token)
    }

    /// Changes the interest of a live registration. The fd is in the epoll set exactly
    /// while its interest is not empty: epoll reports hang-ups even for an empty
    /// interest, and level-triggered they would be reported on every turn.
    pub fn set_interest<T>(
        &self,
        reg: &mut Registry<T>,
        token: Token,
        interest: Interest,
    ) -> io::Result<()> {
        let Some(slot) = reg.live_slot(token) else {
            return Ok(());
        };
        if slot.interest == interest {
            return Ok(());
        }
        let old = mem::replace(&mut slot.interest, interest);
        let fd = slot.fd;
        let data = token.encode();
        if interest.is_empty() {
            // The fd may already be closed, in which case epoll dropped it itself.
            let _ = self.ctl(libc::EPOLL_CTL_DEL, fd, Interest::NONE, 0);
            return Ok(());
        }
        let (op, retry) = if old.is_empty() {
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
        let slot = reg.live_slot(token)?;
        slot.owner.as_ref()?;
        if !slot.interest.is_empty() {
            let _ = self.ctl(libc::EPOLL_CTL_DEL, slot.fd, Interest::NONE, 0);
        }
        reg.remove(token)
    }

    /// Reads everything queued on the signal socket; returns the non-zero bytes, which
    /// are signal numbers written by `signal.set_wakeup_fd`.
    pub fn drain_signals(&self, signals: &mut Vec<u8>) {
        let mut buf = [0u8; 256];
        loop {
            // SAFETY: reads into a valid stack buffer of the stated length.
            let n = unsafe {
                libc::read(
                    self.signal_rx.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                )
            };
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

/// Interrupts a blocked `wait` from any thread by adding one to the waker.
/// The caller guarantees `fd` is the live waker (see `ThreadsafeQueue::wake_fd`).
pub fn wake_fd(fd: RawFd) {
    if add_one(fd) {
        return;
    }
    // The counter is at its maximum (2^64 - 2 unread wake-ups): a refused write wakes
    // nobody, and edge-triggered nothing else would, so reset the counter and add again.
    let mut count = 0u64;
    // SAFETY: reads the eventfd's 8-byte counter into a valid u64; `fd` is the waker,
    // kept open by the caller. EAGAIN (another thread reset it first) leaves it as is.
    unsafe { libc::read(fd, (&mut count as *mut u64).cast(), mem::size_of::<u64>()) };
    add_one(fd);
}

/// Adds one to the eventfd `fd`; false if the counter would overflow (EAGAIN).
fn add_one(fd: RawFd) -> bool {
    let one = 1u64;
    // SAFETY: writes the 8 bytes of a valid stack u64, as an eventfd requires; `fd` is
    // the waker, which the caller keeps open for the duration of the call.
    unsafe { libc::write(fd, (&one as *const u64).cast(), mem::size_of::<u64>()) >= 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_or_hang_up_wakes_both_sides() {
        let hup = readiness(libc::EPOLLHUP as u32);
        assert!(hup.readable() && hup.writable());
        let read = readiness(libc::EPOLLIN as u32);
        assert!(read.readable() && !read.writable());
    }

    /// Waits up to `timeout_ms` and returns what was reported.
    fn wait_for(poller: &mut Poller, timeout_ms: i32) -> Vec<Event> {
        let Some(mut events) = poller.take_events() else {
            panic!("events lent");
        };
        assert!(events.wait(timeout_ms).is_ok());
        let got = events.iter().collect();
        poller.restore_events(events);
        got
    }

    #[test]
    fn every_wake_up_is_reported_once_without_a_read() {
        let Ok(mut poller) = Poller::new() else {
            panic!("epoll_create1 failed");
        };
        for _ in 0..3 {
            wake_fd(poller.wake_tx_fd());
            wake_fd(poller.wake_tx_fd());
            assert_eq!(wait_for(&mut poller, 1000), vec![Event::Waker]);
            assert_eq!(
                wait_for(&mut poller, 0),
                vec![],
                "reported once, not drained"
            );
        }
    }

    #[test]
    fn a_waker_at_its_maximum_still_wakes() {
        let Ok(mut poller) = Poller::new() else {
            panic!("epoll_create1 failed");
        };
        // The largest value an eventfd holds: one more write would overflow it.
        let full = u64::MAX - 1;
        // SAFETY: writes the 8 bytes of a valid u64 to the live waker.
        let n = unsafe { libc::write(poller.wake_tx_fd(), (&full as *const u64).cast(), 8) };
        assert_eq!(n, 8);
        assert_eq!(wait_for(&mut poller, 1000), vec![Event::Waker]);
        assert!(!add_one(poller.wake_tx_fd()), "the counter is full");
        wake_fd(poller.wake_tx_fd());
        assert_eq!(wait_for(&mut poller, 1000), vec![Event::Waker]);
    }

    #[test]
    fn signal_numbers_come_on_their_own_channel() {
        let Ok(mut poller) = Poller::new() else {
            panic!("epoll_create1 failed");
        };
        let numbers = [2u8, 15];
        // SAFETY: writes two bytes from a valid array to the live signal socket.
        unsafe { libc::write(poller.signal_fd(), numbers.as_ptr().cast(), 2) };
        let Some(mut events) = poller.take_events() else {
            panic!("events lent");
        };
        assert_eq!(events.wait(1000).ok(), Some(1));
        assert_eq!(events.iter().collect::<Vec<_>>(), vec![Event::Signals]);
        poller.restore_events(events);
        let mut signals = Vec::new();
        poller.drain_signals(&mut signals);
        assert_eq!(signals, vec![2, 15]);
    }
}
