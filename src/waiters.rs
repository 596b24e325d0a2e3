//! The fd waiter registry: `add_reader`/`add_writer` callbacks and the `sock_*`
//! operations completed in Rust, parked on an fd's two directions in the poller's
//! registry (see `FdCallbacks` for the level- and edge-triggered modes).

use std::collections::VecDeque;
use std::io;
use std::mem;
use std::os::fd::RawFd;
use std::sync::atomic::Ordering;

use pyo3::exceptions::{PyOverflowError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyInt, PyTuple, PyWeakrefReference};
use pyo3::{PyTraverseError, PyVisit};

use crate::errors::{closed_loop, invalid_fd, os_error};
use crate::event_loop::{FdOwner, LoopCore, Ready};
use crate::handles::Handle;
use crate::poller::{Interest, Poller, Readiness, Registry, Token, EDGE, READABLE, WRITABLE};
use crate::pyhelpers;
use crate::sock_ops::{self, Attempt, SockKind, SockOp};
use crate::transport_registry::fd_in_use;

/// What waits for one direction of an fd: an `add_reader`/`add_writer` handle, or a
/// socket operation completed in Rust (`sock_recv` and friends).
pub(crate) enum Waiter {
    Handle(Py<Handle>),
    Sock(Box<SockOp>),
}

impl Waiter {
    /// Releases a replaced or removed waiter: a handle is cancelled, as asyncio's is.
    pub(crate) fn retire(self, py: Python<'_>) -> PyResult<()> {
        match self {
            Waiter::Handle(h) => Handle::do_cancel(h.bind(py)),
            Waiter::Sock(_) => Ok(()),
        }
    }

    fn visit(&self, visit: &PyVisit<'_>) -> Result<(), PyTraverseError> {
        match self {
            Waiter::Handle(h) => visit.call(h),
            Waiter::Sock(op) => op.visit(visit),
        }
    }
}

/// The waiters of one fd's two directions.
///
/// An fd that only socket operations wait on is registered edge-triggered and stays
/// registered between operations: a `sock_recv` that waits again on the same socket
/// then changes nothing in the kernel (level-triggered, each wait would add the fd
/// and each completion remove it). Edge-triggered is safe for them because every
/// operation tries its I/O before it waits, and a registration left behind cannot
/// report the same readiness twice, so one whose socket was closed and whose file
/// lives on elsewhere (a forked child) costs a wake-up per arrival, never a busy loop.
/// An `add_reader`/`add_writer` handle makes the fd level-triggered, as asyncio
/// promises, for as long as one is there.
#[derive(Default)]
pub(crate) struct FdCallbacks {
    reader: Option<Waiter>,
    writer: Option<Waiter>,
    /// Weak reference to the socket the edge-triggered registration was made for. The
    /// registration is trusted only for that same socket object: a different (or dead)
    /// one may own a reused fd number whose old registration left with its file.
    sock: Option<Py<PyWeakrefReference>>,
}

impl FdCallbacks {
    /// The waiter slot of one direction (`READABLE` or `WRITABLE`).
    fn slot(&mut self, direction: Interest) -> &mut Option<Waiter> {
        if direction == READABLE {
            &mut self.reader
        } else {
            &mut self.writer
        }
    }

    fn slot_ref(&self, direction: Interest) -> Option<&Waiter> {
        if direction == READABLE {
            self.reader.as_ref()
        } else {
            self.writer.as_ref()
        }
    }

    fn has_handle(&self) -> bool {
        matches!(self.reader, Some(Waiter::Handle(_)))
            || matches!(self.writer, Some(Waiter::Handle(_)))
    }

    /// The directions something waits on.
    fn waiting(&self) -> Interest {
        let mut directions = Interest::NONE;
        if self.reader.is_some() {
            directions |= READABLE;
        }
        if self.writer.is_some() {
            directions |= WRITABLE;
        }
        directions
    }

    /// Whether the registration was made for `sock`; if not, remembers `sock` as the
    /// socket it is (about to be) made for.
    fn made_for(&mut self, py: Python<'_>, sock: &Py<PyAny>) -> bool {
        let same = self
            .sock
            .as_ref()
            .and_then(|weak| weak.bind(py).upgrade())
            .is_some_and(|target| target.is(sock));
        if !same {
            // Not weakly referenceable: no socket is trusted, every wait renews the
            // registration.
            self.sock = PyWeakrefReference::new(sock.bind(py))
                .ok()
                .map(Bound::unbind);
        }
        same
    }

    /// Queues what `readiness` wakes among the waiters, after an event for the fd
    /// (its registration's `interest`); returns the directions whose waiter left: a
    /// socket operation, which is one-shot and runs in queue order, or a cancelled
    /// handle, put in `dead`. Edge-triggered, only socket operations wait here, and the
    /// registration stays: nothing is returned.
    #[inline]
    pub(crate) fn queue_ready(
        &mut self,
        py: Python<'_>,
        readiness: Readiness,
        interest: Interest,
        ready: &mut VecDeque<Ready>,
        dead: &mut Vec<Waiter>,
    ) -> Interest {
        let (readable, writable) = (readiness.readable(), readiness.writable());
        if interest.contains(EDGE) {
            for (woken, slot) in [(readable, &mut self.reader), (writable, &mut self.writer)] {
                if woken && matches!(slot, Some(Waiter::Sock(_))) {
                    if let Some(Waiter::Sock(op)) = slot.take() {
                        ready.push_back(Ready::Sock(op));
                    }
                }
            }
            return Interest::NONE;
        }
        let mut left = Interest::NONE;
        for (woken, slot, direction) in [
            (readable, &mut self.reader, READABLE),
            (writable, &mut self.writer, WRITABLE),
        ] {
            if !woken {
                continue;
            }
            match slot {
                Some(Waiter::Handle(h)) if h.get().is_cancelled() => {
                    dead.extend(slot.take());
                    left |= direction;
                }
                Some(Waiter::Handle(h)) => ready.push_back(Ready::Handle(h.clone_ref(py))),
                Some(Waiter::Sock(_)) => {
                    if let Some(Waiter::Sock(op)) = slot.take() {
                        ready.push_back(Ready::Sock(op));
                    }
                    left |= direction;
                }
                None => {}
            }
        }
        left
    }

    /// Releases both waiters (the fd was taken over by a transport).
    pub(crate) fn retire(self, py: Python<'_>) -> PyResult<()> {
        for waiter in [self.reader, self.writer].into_iter().flatten() {
            waiter.retire(py)?;
        }
        Ok(())
    }

    pub(crate) fn visit(&self, visit: &PyVisit<'_>) -> Result<(), PyTraverseError> {
        for waiter in [&self.reader, &self.writer].into_iter().flatten() {
            waiter.visit(visit)?;
        }
        Ok(())
    }
}

/// Narrows a level-triggered registration to `interest`, the directions that still
/// have a waiter after some left (`FdCallbacks::queue_ready`); with none left the fd
/// leaves the poller, and whatever it still held goes to `dead`.
pub(crate) fn narrow(
    poller: &Poller,
    fds: &mut Registry<FdOwner>,
    token: Token,
    interest: Interest,
    dead: &mut Vec<Waiter>,
) -> PyResult<()> {
    if interest.is_empty() {
        if let Some(FdOwner::Callbacks(cbs)) = poller.deregister(fds, token) {
            dead.extend(cbs.reader);
            dead.extend(cbs.writer);
        }
        Ok(())
    } else {
        poller.set_interest(fds, token, interest).map_err(os_error)
    }
}

/// A negative fd number is `ValueError`, as in `selectors`; one beyond a C int is
/// `OverflowError`, as the selector's registration raises for it in asyncio.
fn checked_fd(fd: i64) -> PyResult<RawFd> {
    if fd < 0 {
        return Err(invalid_fd(fd));
    }
    RawFd::try_from(fd)
        .map_err(|_| PyOverflowError::new_err("Python int too large to convert to C int"))
}

/// `selectors._fileobj_to_fd` without its range check: an int, or an object with
/// `fileno()`. asyncio runs this before checking whether the loop is closed, and the
/// range check (`checked_fd`) after.
fn fileobj_to_int(obj: &Bound<'_, PyAny>) -> PyResult<i64> {
    let fd: i64 = if obj.is_instance_of::<PyInt>() {
        // An int beyond i64 is as far out of range as i64's own ends: the range check
        // or the registry then answers as asyncio's selector does (no such fd).
        match obj.extract::<i64>() {
            Ok(fd) => fd,
            Err(_) if obj.gt(0)? => i64::MAX,
            Err(_) => i64::MIN,
        }
    } else {
        let invalid = || {
            PyValueError::new_err(format!(
                "Invalid file object: {}",
                obj.repr().map(|r| r.to_string()).unwrap_or_default()
            ))
        };
        let fileno = obj.getattr("fileno").map_err(|_| invalid())?;
        fileno.call0()?.extract::<i64>().map_err(|_| invalid())?
    };
    Ok(fd)
}

impl LoopCore {
    /// Puts `waiter` in (or, with `None`, takes it out of) one direction of `fd`;
    /// returns the waiter it replaces. See `FdCallbacks` for the two modes.
    fn set_waiter(
        &self,
        py: Python<'_>,
        fd: RawFd,
        waiter: Option<Waiter>,
        direction: Interest,
    ) -> PyResult<Option<Waiter>> {
        let mut st = self.state.borrow_mut(py)?;
        let st = &mut *st;
        let Some(poller) = &st.poller else {
            return Err(closed_loop());
        };
        let Some(token) = st.fds.token_of(fd) else {
            let Some(waiter) = waiter else {
                return Ok(None);
            };
            let mut cbs = Box::<FdCallbacks>::default();
            let interest = match &waiter {
                Waiter::Handle(_) => direction,
                Waiter::Sock(op) => {
                    cbs.made_for(py, &op.sock);
                    EDGE | direction
                }
            };
            *cbs.slot(direction) = Some(waiter);
            poller
                .register(&mut st.fds, fd, interest, FdOwner::Callbacks(cbs))
                .map_err(os_error)?;
            return Ok(None);
        };
        let Some((owner, interest)) = st.fds.get_mut(token) else {
            return Ok(None);
        };
        let cbs = match owner {
            FdOwner::Callbacks(cbs) => cbs,
            FdOwner::Transport(transport) => {
                let transport = transport.clone_ref(py);
                return Err(fd_in_use(fd, transport.as_any(py)));
            }
        };
        let edge = interest.contains(EDGE);
        // Whether the kernel's registration is known to be for this fd's current file.
        let trusted = match &waiter {
            Some(Waiter::Sock(op)) => edge && cbs.made_for(py, &op.sock),
            _ => true,
        };
        let old = mem::replace(cbs.slot(direction), waiter);
        let waiting = cbs.waiting();
        if cbs.has_handle() {
            cbs.sock = None;
            poller
                .set_interest(&mut st.fds, token, waiting)
                .map_err(os_error)?;
        } else if waiting.is_empty() {
            if !edge {
                poller.deregister(&mut st.fds, token);
            }
            // (Edge-triggered with nothing waiting stays registered for the next wait.)
        } else if trusted {
            let kept = if edge { interest } else { Interest::NONE };
            poller
                .set_interest(&mut st.fds, token, EDGE | kept | waiting)
                .map_err(os_error)?;
        } else if let Some(owner) = poller.deregister(&mut st.fds, token) {
            // Registered anew under a new generation: were the old registration still
            // in the kernel (its file open elsewhere), its events are dropped as stale.
            poller
                .register(&mut st.fds, fd, EDGE | waiting, owner)
                .map_err(os_error)?;
        }
        Ok(old)
    }

    pub(crate) fn add_fd_callback(
        slf: &Bound<'_, LoopCore>,
        fd: &Bound<'_, PyAny>,
        callback: Bound<'_, PyAny>,
        args: Bound<'_, PyTuple>,
        direction: Interest,
    ) -> PyResult<()> {
        // asyncio validates the fd (checking it against transports) before the loop state.
        let fd = fileobj_to_int(fd)?;
        slf.get().check_closed()?;
        let fd = checked_fd(fd)?;
        let handle = LoopCore::kept_handle(slf, callback, args)?;
        if let Some(old) =
            slf.get()
                .set_waiter(slf.py(), fd, Some(Waiter::Handle(handle)), direction)?
        {
            old.retire(slf.py())?;
        }
        Ok(())
    }

    pub(crate) fn remove_fd_callback(
        slf: &Bound<'_, LoopCore>,
        fd: &Bound<'_, PyAny>,
        direction: Interest,
    ) -> PyResult<bool> {
        let fd = fileobj_to_int(fd)?;
        if slf.get().closed.load(Ordering::Relaxed) {
            return Ok(false);
        }
        if fd > i64::from(RawFd::MAX) {
            return Ok(false); // never registered, as asyncio's selector finds
        }
        let fd = checked_fd(fd)?;
        match slf.get().set_waiter(slf.py(), fd, None, direction)? {
            Some(old) => {
                old.retire(slf.py())?;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// The `add_reader`/`add_writer` handle of an fd, if any (selector-loop helpers
    /// use this).
    pub(crate) fn fd_handle(
        slf: &Bound<'_, LoopCore>,
        fd: RawFd,
        direction: Interest,
    ) -> PyResult<Option<Py<Handle>>> {
        let py = slf.py();
        let mut st = slf.get().state.borrow_mut(py)?;
        let Some(token) = st.fds.token_of(fd) else {
            return Ok(None);
        };
        Ok(match st.fds.get_mut(token) {
            Some((FdOwner::Callbacks(cbs), _)) => match cbs.slot(direction) {
                Some(Waiter::Handle(h)) => Some(h.clone_ref(py)),
                _ => None,
            },
            _ => None,
        })
    }

    /// The fd of a socket given to a `sock_*` call, after asyncio's checks: not an
    /// `ssl.SSLSocket`, and non-blocking in debug mode. As in asyncio, an fd owned by a
    /// transport is refused only when the call has to wait (by `set_waiter`).
    fn sock_fd(&self, sock: &Bound<'_, PyAny>) -> PyResult<RawFd> {
        pyhelpers::reject_ssl_socket(sock)?;
        if self.debug.load(Ordering::Relaxed) {
            let timeout = sock.call_method0("gettimeout")?;
            if timeout.is_none() || timeout.extract::<f64>()? != 0.0 {
                return Err(PyValueError::new_err("the socket must be non-blocking"));
            }
        }
        let fd: i64 = sock
            .call_method0(pyo3::intern!(sock.py(), "fileno"))?
            .extract()?;
        if fd == -1 {
            // A closed socket: what its own methods raise.
            return Err(os_error(io::Error::from_raw_os_error(libc::EBADF)));
        }
        checked_fd(fd)
    }

    /// Parks a socket operation on its fd and returns the future it will resolve.
    fn sock_wait(
        slf: &Bound<'_, LoopCore>,
        sock: &Bound<'_, PyAny>,
        fd: RawFd,
        kind: SockKind,
    ) -> PyResult<Py<PyAny>> {
        let py = slf.py();
        let fut = LoopCore::create_future(slf)?;
        let op = Box::new(SockOp {
            fd,
            fut: fut.clone_ref(py),
            sock: sock.clone().unbind(),
            kind,
        });
        let direction = op.direction();
        if let Some(old) = slf
            .get()
            .set_waiter(py, fd, Some(Waiter::Sock(op)), direction)?
        {
            old.retire(py)?;
        }
        Ok(fut)
    }

    /// Runs a socket operation whose fd was ready (from the ready queue); on spurious
    /// readiness it waits again, unless something took its slot meanwhile.
    #[inline]
    pub(crate) fn run_sock_op(&self, py: Python<'_>, op: Box<SockOp>) -> PyResult<()> {
        let (fd, direction) = (op.fd, op.direction());
        if let Some(op) = op.run(py)? {
            if let Some(other) = self.set_waiter(py, fd, Some(Waiter::Sock(op)), direction)? {
                self.set_waiter(py, fd, Some(other), direction)?;
            }
        }
        Ok(())
    }
}

impl LoopCore {
    /// `sock_recv`'s first step: the data if it can be read now, else a future the loop
    /// resolves when it has read them.
    pub(crate) fn sock_recv_start(
        slf: &Bound<'_, LoopCore>,
        sock: &Bound<'_, PyAny>,
        n: isize,
    ) -> PyResult<Py<PyAny>> {
        let n = sock_ops::check_recv_size(n)?;
        let fd = slf.get().sock_fd(sock)?;
        match sock_ops::try_recv(slf.py(), fd, n)? {
            Attempt::Done(data) => Ok(data),
            Attempt::WouldBlock => LoopCore::sock_wait(slf, sock, fd, SockKind::Recv(n)),
        }
    }

    /// `sock_recv_into`'s first step: the count read now, or a future for it.
    pub(crate) fn sock_recv_into_start(
        slf: &Bound<'_, LoopCore>,
        sock: &Bound<'_, PyAny>,
        buf: &Bound<'_, PyAny>,
    ) -> PyResult<Py<PyAny>> {
        let buffer = sock_ops::writable_buffer(buf)?;
        let fd = slf.get().sock_fd(sock)?;
        match sock_ops::try_recv_into(slf.py(), fd, &buffer)? {
            Attempt::Done(count) => Ok(count),
            Attempt::WouldBlock => LoopCore::sock_wait(slf, sock, fd, SockKind::RecvInto(buffer)),
        }
    }

    /// `sock_sendall`'s first step: `None` if everything went out now, else a future
    /// done when the rest has.
    pub(crate) fn sock_sendall_start(
        slf: &Bound<'_, LoopCore>,
        sock: &Bound<'_, PyAny>,
        data: &Bound<'_, PyAny>,
    ) -> PyResult<Option<Py<PyAny>>> {
        let buffer = sock_ops::readable_buffer(data)?;
        let fd = slf.get().sock_fd(sock)?;
        let mut sent = 0;
        if sock_ops::try_send_all(fd, &buffer, &mut sent)? {
            return Ok(None);
        }
        LoopCore::sock_wait(slf, sock, fd, SockKind::Send(buffer, sent)).map(Some)
    }

    /// Withdraws the socket operation of future `fut`, whose caller was cancelled. While
    /// the socket is open its fd number names the slot; once it is closed (by whoever
    /// cancelled the caller), the op is found by its future and the fd it was parked on.
    pub(crate) fn sock_op_cancel(
        &self,
        py: Python<'_>,
        sock: &Bound<'_, PyAny>,
        writable: bool,
        fut: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let direction = if writable { WRITABLE } else { READABLE };
        // Only this call's op: another call may have parked its own since.
        let parked_fd = |cbs: &FdCallbacks| match cbs.slot_ref(direction) {
            Some(Waiter::Sock(op)) if op.fut.is(fut) => Some(op.fd),
            _ => None,
        };
        let fileno: i64 = sock.call_method0("fileno")?.extract()?;
        let fd = {
            let mut st = self.state.borrow_mut(py)?;
            if fileno >= 0 {
                let token = RawFd::try_from(fileno)
                    .ok()
                    .and_then(|fd| st.fds.token_of(fd));
                match token.and_then(|token| st.fds.get_mut(token)) {
                    Some((FdOwner::Callbacks(cbs), _)) => parked_fd(cbs),
                    _ => None,
                }
            } else {
                st.fds.owners().find_map(|owner| match owner {
                    FdOwner::Callbacks(cbs) => parked_fd(cbs),
                    FdOwner::Transport(_) => None,
                })
            }
        };
        if let Some(fd) = fd {
            let removed = self.set_waiter(py, fd, None, direction)?;
            drop(removed);
        }
        Ok(())
    }
}
