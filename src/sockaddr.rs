//! Kernel socket addresses as the socket module presents them: `(host, port)` for
//! IPv4, `(host, port, flowinfo, scope_id)` for IPv6, a path `str` (or an abstract
//! name as `bytes`) for a Unix socket.

use std::io;
use std::net::Ipv4Addr;

use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyTuple};

use crate::errors::os_error;

extern "C" {
    // The C library's address formatter, which the socket module uses too: addresses
    // print exactly as Python prints them. (Not exported by the libc crate.)
    fn inet_ntop(
        af: libc::c_int,
        src: *const libc::c_void,
        dst: *mut libc::c_char,
        size: libc::socklen_t,
    ) -> *const libc::c_char;
}

/// An address in text form, exactly as the C library (and so the socket module)
/// prints it.
fn ntop(family: libc::c_int, addr: *const libc::c_void) -> PyResult<String> {
    let mut text = [0 as libc::c_char; 64];
    // SAFETY: `addr` points to an in_addr or in6_addr matching `family` (the callers
    // take it from a sockaddr of that family); `text` (64 bytes) exceeds
    // INET6_ADDRSTRLEN (46), and inet_ntop NUL-terminates what it writes.
    let host = unsafe {
        inet_ntop(
            family,
            addr,
            text.as_mut_ptr(),
            text.len() as libc::socklen_t,
        )
    };
    if host.is_null() {
        return Err(os_error(io::Error::last_os_error()));
    }
    // SAFETY: inet_ntop succeeded, so `text` holds a NUL-terminated string.
    Ok(unsafe { std::ffi::CStr::from_ptr(text.as_ptr()) }
        .to_string_lossy()
        .into_owned())
}

/// An IPv4 address in dotted decimal, as the C library prints it, written digit by
/// digit: an accepted connection's addresses are formatted once or twice each, and
/// inet_ntop's sprintf (or `core::fmt`) costs about 1,700 instructions an address.
pub(crate) fn ipv4_text(ip: Ipv4Addr) -> String {
    let mut text = String::with_capacity(15);
    for (i, octet) in ip.octets().into_iter().enumerate() {
        if i > 0 {
            text.push('.');
        }
        if octet >= 100 {
            text.push(char::from(b'0' + octet / 100));
        }
        if octet >= 10 {
            text.push(char::from(b'0' + octet / 10 % 10));
        }
        text.push(char::from(b'0' + octet % 10));
    }
    text
}

/// `(host, port)` or `(host, port, flowinfo, scope_id)` from a kernel address, as the
/// socket module builds them; `None` for other families.
pub(crate) fn inet_address<'py>(
    py: Python<'py>,
    addr: &libc::sockaddr_storage,
) -> PyResult<Option<Bound<'py, PyTuple>>> {
    match i32::from(addr.ss_family) {
        libc::AF_INET => {
            // SAFETY: the kernel wrote a sockaddr_in (family AF_INET) into the storage,
            // which is large and aligned enough for every address type.
            let sin = unsafe { &*(addr as *const _ as *const libc::sockaddr_in) };
            let host = ipv4_text(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)));
            let port = u16::from_be(sin.sin_port);
            Ok(Some((host, port).into_pyobject(py)?))
        }
        libc::AF_INET6 => {
            // SAFETY: as above, for a sockaddr_in6.
            let sin6 = unsafe { &*(addr as *const _ as *const libc::sockaddr_in6) };
            let host = ntop(
                libc::AF_INET6,
                (&sin6.sin6_addr as *const libc::in6_addr).cast(),
            )?;
            let tuple = (
                host,
                u16::from_be(sin6.sin6_port),
                u32::from_be(sin6.sin6_flowinfo),
                sin6.sin6_scope_id,
            );
            Ok(Some(tuple.into_pyobject(py)?))
        }
        _ => Ok(None),
    }
}

/// The address of a Unix socket as the socket module makes it (Linux): an abstract
/// name (first byte NUL) as `bytes` of the whole length the kernel gave, anything else
/// as the NUL-terminated path decoded with the file system encoding, so an unnamed
/// peer is `''`.
fn unix_address<'py>(
    py: Python<'py>,
    addr: &libc::sockaddr_storage,
    len: libc::socklen_t,
) -> PyResult<Bound<'py, PyAny>> {
    // SAFETY: the kernel wrote a sockaddr_un (family AF_UNIX) into the storage, which
    // is large and aligned enough for it.
    let sun = unsafe { &*(addr as *const _ as *const libc::sockaddr_un) };
    let path_offset = std::mem::offset_of!(libc::sockaddr_un, sun_path);
    let path_len = (len as usize)
        .saturating_sub(path_offset)
        .min(sun.sun_path.len());
    // SAFETY: `sun_path` is a c_char array; the first `path_len` bytes lie inside it.
    let path = unsafe { std::slice::from_raw_parts(sun.sun_path.as_ptr().cast::<u8>(), path_len) };
    if path.first() == Some(&0) {
        return Ok(PyBytes::new(py, path).into_any());
    }
    let end = path.iter().position(|&b| b == 0).unwrap_or(path.len());
    // SAFETY: `path[..end]` is valid for reads; the call copies it into a new str (or
    // sets an exception and returns NULL, which `from_owned_ptr_or_err` turns into it).
    unsafe {
        Bound::from_owned_ptr_or_err(
            py,
            pyo3::ffi::PyUnicode_DecodeFSDefaultAndSize(
                path.as_ptr().cast(),
                end as pyo3::ffi::Py_ssize_t,
            ),
        )
    }
}

/// The address `accept` or `getpeername` wrote (`len` bytes of it), as
/// `socket.accept()` returns it; `None` for a family other than IPv4, IPv6 and Unix.
pub(crate) fn socket_address<'py>(
    py: Python<'py>,
    addr: &libc::sockaddr_storage,
    len: libc::socklen_t,
) -> PyResult<Option<Bound<'py, PyAny>>> {
    if i32::from(addr.ss_family) == libc::AF_UNIX {
        return unix_address(py, addr, len).map(Some);
    }
    Ok(inet_address(py, addr)?.map(Bound::into_any))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_text_is_the_c_librarys() {
        // Every octet value in every position.
        for octets in
            (0..=255u8).flat_map(|v| [[v, 0, 1, 2], [9, v, 10, 99], [100, 255, v, 0], [1, 2, 3, v]])
        {
            let addr = libc::in_addr {
                s_addr: u32::from_ne_bytes(octets),
            };
            let mut text = [0 as libc::c_char; 64];
            // SAFETY: `addr` is an in_addr; `text` holds any IPv4 text and its NUL.
            let host = unsafe {
                inet_ntop(
                    libc::AF_INET,
                    (&addr as *const libc::in_addr).cast(),
                    text.as_mut_ptr(),
                    text.len() as libc::socklen_t,
                )
            };
            assert!(!host.is_null());
            // SAFETY: inet_ntop succeeded, so `text` holds a NUL-terminated string.
            let theirs = unsafe { std::ffi::CStr::from_ptr(text.as_ptr()) }.to_string_lossy();
            let ours = ipv4_text(Ipv4Addr::from(u32::from_be(addr.s_addr)));
            assert_eq!(theirs, ours);
        }
    }
}
