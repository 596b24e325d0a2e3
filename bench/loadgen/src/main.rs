//! Echo load generator for ferroloop's benchmarks, and the pure-Rust echo server that
//! serves as the ceiling.
//!
//! `loadgen run --size N --conns C --slice-ms S --cycles K --target NAME,PID,PORT ...`
//!   connects C connections to every target at once, then in each cycle gives each
//!   target (order rotated per cycle) one slice of S ms of closed-loop echo traffic
//!   while every other target is stopped with SIGSTOP. Every echoed byte is checked.
//!   Per slice it records requests, wall time and the server's CPU time (from
//!   /proc/PID/task/*/schedstat, in ns). Prints one JSON object on stdout.
//!   `--mode line` sends newline-terminated lines (for `readline` servers), `--mode http`
//!   sends `GET /SIZE HTTP/1.1` and expects the fixed response `http_response` builds;
//!   `--tls-ca PEM` speaks TLS (to a server for `localhost`, signed by that CA).
//!   `--mode http-any --path P --body B` sends `GET P HTTP/1.1` to a framework's server,
//!   whose headers vary (date, server): it checks the status is 200 and that the body
//!   (framed by Content-Length) is exactly B. `--mode ws` opens each connection with a
//!   WebSocket handshake, then sends masked binary frames of SIZE bytes and checks the
//!   echoed frame, header and payload.
//! `loadgen handshakes --size N [--tls-ca PEM] --conns C --slice-ms S --cycles K --target ...`:
//!   sliced as `run`, but each request is a new connection, C connectors at a time
//!   (each a thread, one connection after another): connect, one echo of N bytes
//!   (checked), then the server's close awaited. With `--tls-ca` the connection is TLS:
//!   a full handshake (no resumption) before the echo, close_notify after it; without,
//!   plain TCP, the client's half-close (`shutdown(SHUT_WR)`) after the echo. Prints the
//!   same JSON, requests being connections, with `warmup`: the connections made before
//!   the first slice (all targets).
//! `loadgen c10k --conns N --target NAME,PID,PORT`: opens N connections, echoes one
//!   byte on each, prints the time that took, then holds them until stdin closes.
//! `loadgen serve [--port P]`: a single-threaded epoll echo server; prints its port.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The byte at position `i` of message `seq` on connection `conn`: every message is
/// different, so a byte delivered to the wrong connection or out of order is caught.
fn pattern(conn: usize, seq: u64, i: usize) -> u8 {
    (conn as u64)
        .wrapping_mul(31)
        .wrapping_add(seq.wrapping_mul(17))
        .wrapping_add(i as u64) as u8
}

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

struct Epoll(RawFd);

impl Epoll {
    fn new() -> io::Result<Epoll> {
        // SAFETY: no pointer arguments; the result is a fresh fd we own.
        Ok(Epoll(check(unsafe {
            libc::epoll_create1(libc::EPOLL_CLOEXEC)
        })?))
    }

    fn ctl(&self, op: libc::c_int, fd: RawFd, events: u32, token: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event { events, u64: token };
        // SAFETY: `ev` is valid for the call; epoll_ctl only reads it.
        check(unsafe { libc::epoll_ctl(self.0, op, fd, &mut ev) }).map(|_| ())
    }

    fn wait(&self, events: &mut [libc::epoll_event], timeout_ms: i32) -> io::Result<usize> {
        // SAFETY: `events` is a writable buffer of the length passed.
        let n = unsafe {
            libc::epoll_wait(self.0, events.as_mut_ptr(), events.len() as i32, timeout_ms)
        };
        match check(n) {
            Ok(n) => Ok(n as usize),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(0),
            Err(e) => Err(e),
        }
    }
}

impl Drop for Epoll {
    fn drop(&mut self) {
        // SAFETY: we own this fd and close it once.
        unsafe { libc::close(self.0) };
    }
}

struct Conn {
    stream: TcpStream,
    seq: u64,
    sent: usize,
    received: usize,
    started: Instant,
    busy: bool,
    want_write: bool,
    first_in_slice: bool,
    /// The TLS session, for the TLS echo workload.
    tls: Option<Box<rustls::ClientConnection>>,
    /// The response so far, in `http-any` mode (its length is known only from its head).
    head: Vec<u8>,
}

/// A client configuration trusting the CA in `ca_file` (PEM).
fn tls_config(ca_file: &str) -> io::Result<Arc<rustls::ClientConfig>> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in
        rustls_pki_types::CertificateDer::pem_file_iter(ca_file).map_err(io::Error::other)?
    {
        roots
            .add(cert.map_err(io::Error::other)?)
            .map_err(io::Error::other)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(io::Error::other)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Sends what the TLS session has to send; true if the socket was full.
fn flush_tls(tls: &mut rustls::ClientConnection, stream: &mut TcpStream) -> io::Result<bool> {
    while tls.wants_write() {
        match tls.write_tls(stream) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(true),
            Err(e) => return Err(e),
        }
    }
    Ok(false)
}

struct Target {
    name: String,
    pid: i32,
    conns: Vec<Conn>,
    slices: Vec<(u64, f64, f64)>,
    latencies_us: Vec<u32>,
}

/// CPU time of every thread of `pid`, in seconds.
fn cpu_seconds(pid: i32) -> io::Result<f64> {
    let mut total: u64 = 0;
    for entry in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let path = entry?.path().join("schedstat");
        let text = std::fs::read_to_string(path)?;
        total += text
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
    }
    Ok(total as f64 * 1e-9)
}

fn signal(pid: i32, sig: libc::c_int) -> io::Result<()> {
    // SAFETY: kill has no memory arguments.
    check(unsafe { libc::kill(pid, sig) }).map(|_| ())
}

/// What goes over each connection.
enum Mode {
    /// The echo of a per-connection, per-message byte pattern.
    Echo,
    /// The same, as a line: no newline inside, one at the end.
    Line,
    /// A fixed HTTP/1.1 keep-alive request and the fixed response it must get.
    Http { request: Vec<u8>, response: Vec<u8> },
    /// A fixed request to a framework's server: any headers, status 200, this body.
    AnyHeaders { request: Vec<u8>, body: Vec<u8> },
    /// WebSocket binary frames of the echo pattern, masked as a client must mask them,
    /// and the unmasked frame the server echoes.
    Ws {
        request_head: Vec<u8>,
        response_head: Vec<u8>,
    },
}

/// The mask key of every frame the load generator sends (a client must mask; the key's
/// value does not matter to the server).
const WS_MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

/// The header of a final binary WebSocket frame of `size` payload bytes.
fn ws_head(size: usize, masked: bool) -> Vec<u8> {
    let bit = if masked { 0x80 } else { 0 };
    let mut head = vec![0x82];
    if size < 126 {
        head.push(bit | size as u8);
    } else if size <= usize::from(u16::MAX) {
        head.push(bit | 126);
        head.extend_from_slice(&(size as u16).to_be_bytes());
    } else {
        head.push(bit | 127);
        head.extend_from_slice(&(size as u64).to_be_bytes());
    }
    if masked {
        head.extend_from_slice(&WS_MASK);
    }
    head
}

/// Opens a WebSocket on a connected, still blocking `stream`: sends the upgrade
/// request and reads the server's `101` answer, to its last header byte.
fn ws_handshake(stream: &mut TcpStream) -> io::Result<()> {
    stream.write_all(
        b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Key: ZmVycm9sb29wIGJlbmNoIQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte)? == 0 {
            return Err(io::Error::other(
                "the server closed during the WebSocket handshake",
            ));
        }
        head.push(byte[0]);
    }
    if !head.starts_with(b"HTTP/1.1 101") {
        return Err(io::Error::other(format!(
            "WebSocket handshake refused: {}",
            String::from_utf8_lossy(&head)
                .lines()
                .next()
                .unwrap_or_default()
        )));
    }
    Ok(())
}

/// The body length a response head gives; a head without one (chunked) is refused, so
/// that every body is checked whole.
fn content_length(head: &[u8]) -> io::Result<usize> {
    for line in head.split(|b| *b == b'\n') {
        let line = String::from_utf8_lossy(line);
        if let Some((name, value)) = line.split_once(':') {
            if name.trim().eq_ignore_ascii_case("content-length") {
                return value.trim().parse().map_err(io::Error::other);
            }
        }
    }
    Err(io::Error::other("a response without Content-Length"))
}

/// Where `needle` first starts in `haystack`.
fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The response the benchmark's HTTP servers send: `size` body bytes.
fn http_response(size: usize) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {size}\r\nContent-Type: application/octet-stream\r\n\r\n"
    )
    .into_bytes();
    out.extend((0..size).map(|i| b'a' + (i % 26) as u8));
    out
}

struct Load {
    size: usize,
    mode: Mode,
    buf: Vec<u8>,
    out: Vec<u8>,
}

impl Load {
    fn request_len(&self) -> usize {
        match &self.mode {
            Mode::Http { request, .. } | Mode::AnyHeaders { request, .. } => request.len(),
            Mode::Ws { request_head, .. } => request_head.len() + self.size,
            _ => self.size,
        }
    }

    fn response_len(&self) -> usize {
        match &self.mode {
            Mode::Http { response, .. } => response.len(),
            Mode::Ws { response_head, .. } => response_head.len() + self.size,
            // Not known before the head arrives: `check_any_headers` frames it.
            Mode::AnyHeaders { .. } => usize::MAX,
            _ => self.size,
        }
    }

    fn request_byte(&self, conn: usize, seq: u64, i: usize) -> u8 {
        match &self.mode {
            Mode::Echo => pattern(conn, seq, i),
            Mode::Line if i + 1 == self.size => b'\n',
            Mode::Line => b'a' + pattern(conn, seq, i) % 26,
            Mode::Http { request, .. } | Mode::AnyHeaders { request, .. } => request[i],
            Mode::Ws { request_head, .. } => match request_head.get(i) {
                Some(b) => *b,
                None => {
                    let j = i - request_head.len();
                    pattern(conn, seq, j) ^ WS_MASK[j % 4]
                }
            },
        }
    }

    fn response_byte(&self, conn: usize, seq: u64, i: usize) -> u8 {
        match &self.mode {
            Mode::Http { response, .. } => response[i],
            Mode::Ws { response_head, .. } => match response_head.get(i) {
                Some(b) => *b,
                None => pattern(conn, seq, i - response_head.len()),
            },
            _ => self.request_byte(conn, seq, i),
        }
    }

    /// Sends as much of the current message as the socket takes.
    fn push(&mut self, conn_id: usize, conn: &mut Conn) -> io::Result<()> {
        let total = self.request_len();
        if let Some(tls) = conn.tls.as_mut() {
            // The session takes the whole message; the socket gets what it can.
            while conn.sent < total {
                let n = (total - conn.sent).min(self.out.len());
                for i in 0..n {
                    self.out[i] = self.request_byte(conn_id, conn.seq, conn.sent + i);
                }
                tls.writer().write_all(&self.out[..n])?;
                conn.sent += n;
            }
            conn.want_write = flush_tls(tls, &mut conn.stream)?;
            return Ok(());
        }
        while conn.sent < total {
            let n = (total - conn.sent).min(self.out.len());
            for i in 0..n {
                self.out[i] = self.request_byte(conn_id, conn.seq, conn.sent + i);
            }
            match conn.stream.write(&self.out[..n]) {
                Ok(0) => return Err(io::Error::new(io::ErrorKind::WriteZero, "peer closed")),
                Ok(w) => conn.sent += w,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        conn.want_write = conn.sent < total;
        Ok(())
    }

    /// Checks `n` bytes that came back in `self.buf`; true when the whole response is in.
    fn check(&self, conn_id: usize, conn: &mut Conn, n: usize) -> io::Result<bool> {
        if let Mode::AnyHeaders { body, .. } = &self.mode {
            return check_any_headers(&self.buf[..n], conn, body);
        }
        let total = self.response_len();
        if conn.received + n > total {
            return Err(io::Error::other("more bytes came back than expected"));
        }
        for (i, b) in self.buf[..n].iter().enumerate() {
            if *b != self.response_byte(conn_id, conn.seq, conn.received + i) {
                return Err(io::Error::other(format!(
                    "wrong byte at offset {} of message {} on connection {conn_id}",
                    conn.received + i,
                    conn.seq
                )));
            }
        }
        conn.received += n;
        Ok(conn.received == total)
    }

    /// Reads what arrived and checks it; true when the whole echo is in.
    fn pull(&mut self, conn_id: usize, conn: &mut Conn) -> io::Result<bool> {
        let closed =
            || io::Error::new(io::ErrorKind::UnexpectedEof, "server closed the connection");
        if conn.tls.is_some() {
            return self.pull_tls(conn_id, conn);
        }
        loop {
            match conn.stream.read(&mut self.buf) {
                Ok(0) => return Err(closed()),
                Ok(n) => {
                    if self.check(conn_id, conn, n)? {
                        return Ok(true);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(e),
            }
        }
    }

    /// `pull` through the TLS session: plaintext drained and checked between records
    /// (the session buffers only so much), handshake replies sent.
    fn pull_tls(&mut self, conn_id: usize, conn: &mut Conn) -> io::Result<bool> {
        let Some(mut tls) = conn.tls.take() else {
            return Ok(false);
        };
        let outcome = self.pull_session(conn_id, conn, &mut tls);
        conn.tls = Some(tls);
        outcome
    }

    fn pull_session(
        &mut self,
        conn_id: usize,
        conn: &mut Conn,
        tls: &mut rustls::ClientConnection,
    ) -> io::Result<bool> {
        let closed =
            || io::Error::new(io::ErrorKind::UnexpectedEof, "server closed the connection");
        loop {
            loop {
                match tls.reader().read(&mut self.buf) {
                    Ok(0) => return Err(closed()),
                    Ok(n) => {
                        if self.check(conn_id, conn, n)? {
                            return Ok(true);
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e),
                }
            }
            match tls.read_tls(&mut conn.stream) {
                Ok(0) => return Err(closed()),
                Ok(_) => {
                    tls.process_new_packets().map_err(io::Error::other)?;
                    conn.want_write |= flush_tls(tls, &mut conn.stream)?;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    conn.want_write |= flush_tls(tls, &mut conn.stream)?;
                    return Ok(false);
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn start(&mut self, conn_id: usize, conn: &mut Conn) -> io::Result<()> {
        conn.head.clear();
        conn.seq += 1;
        conn.sent = 0;
        conn.received = 0;
        conn.busy = true;
        conn.started = Instant::now();
        self.push(conn_id, conn)
    }
}

/// Adds `data` to a framework response in progress; true once the head and exactly
/// Content-Length body bytes are in, the status is 200 and the body is `body`.
fn check_any_headers(data: &[u8], conn: &mut Conn, body: &[u8]) -> io::Result<bool> {
    conn.head.extend_from_slice(data);
    let Some(end) = find(&conn.head, b"\r\n\r\n") else {
        return Ok(false);
    };
    let head = &conn.head[..end];
    if !head.starts_with(b"HTTP/1.1 200 ") {
        let status = String::from_utf8_lossy(head);
        return Err(io::Error::other(format!(
            "not 200 OK: {}",
            status.lines().next().unwrap_or_default()
        )));
    }
    let total = end + 4 + content_length(head)?;
    if conn.head.len() < total {
        return Ok(false);
    }
    if conn.head.len() > total {
        return Err(io::Error::other("more bytes came back than the response"));
    }
    if &conn.head[end + 4..] != body {
        return Err(io::Error::other(format!(
            "wrong body: {}",
            String::from_utf8_lossy(&conn.head[end + 4..])
        )));
    }
    Ok(true)
}

/// One slice of closed-loop traffic on `target`; returns the requests completed.
fn run_slice(
    load: &mut Load,
    epoll: &Epoll,
    base: usize,
    target: &mut Target,
    slice: Duration,
) -> io::Result<u64> {
    let deadline = Instant::now() + slice;
    let mut requests = 0u64;
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
    for (i, conn) in target.conns.iter_mut().enumerate() {
        conn.first_in_slice = true;
        load.start(base + i, conn)?;
        update_interest(epoll, base + i, conn)?;
    }
    let mut busy = target.conns.len();
    let stall_limit = Instant::now() + slice + Duration::from_secs(30);
    while busy > 0 {
        let n = epoll.wait(&mut events, 100)?;
        if n == 0 && Instant::now() > stall_limit {
            return Err(io::Error::other(format!(
                "{}: no echo for 30 s",
                target.name
            )));
        }
        for ev in &events[..n] {
            let id = ev.u64 as usize;
            let Some(conn) = target.conns.get_mut(id - base) else {
                continue;
            };
            if !conn.busy {
                continue;
            }
            if conn.want_write {
                load.push(id, conn)?;
            }
            if load.pull(id, conn)? {
                requests += 1;
                // The first request of a slice waited for the server to be resumed from
                // SIGSTOP: it measures the harness, not the server.
                if !conn.first_in_slice {
                    let us = conn.started.elapsed().as_micros().min(u32::MAX as u128) as u32;
                    target.latencies_us.push(us);
                }
                conn.first_in_slice = false;
                conn.busy = false;
                if Instant::now() < deadline {
                    load.start(id, conn)?;
                } else {
                    busy -= 1;
                }
            }
            update_interest(epoll, id, conn)?;
        }
    }
    Ok(requests)
}

fn update_interest(epoll: &Epoll, id: usize, conn: &Conn) -> io::Result<()> {
    let mut events = libc::EPOLLIN as u32;
    if conn.want_write && conn.busy {
        events |= libc::EPOLLOUT as u32;
    }
    epoll.ctl(
        libc::EPOLL_CTL_MOD,
        conn.stream.as_raw_fd(),
        events,
        id as u64,
    )
}

fn percentile(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let idx = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn run(args: &[String]) -> io::Result<()> {
    let mut size = 1024usize;
    let mut conns = 10usize;
    let mut slice_ms = 100u64;
    let mut cycles = 20usize;
    let mut specs = Vec::new();
    let mut mode = "echo".to_string();
    let mut tls_ca: Option<String> = None;
    let mut path = "/".to_string();
    let mut body = String::new();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = || {
            it.next()
                .cloned()
                .ok_or_else(|| io::Error::other(format!("{arg} needs a value")))
        };
        match arg.as_str() {
            "--size" => size = value()?.parse().map_err(io::Error::other)?,
            "--conns" => conns = value()?.parse().map_err(io::Error::other)?,
            "--slice-ms" => slice_ms = value()?.parse().map_err(io::Error::other)?,
            "--cycles" => cycles = value()?.parse().map_err(io::Error::other)?,
            "--target" => specs.push(value()?),
            "--mode" => mode = value()?,
            "--tls-ca" => tls_ca = Some(value()?),
            "--path" => path = value()?,
            "--body" => body = value()?,
            other => return Err(io::Error::other(format!("unknown argument {other}"))),
        }
    }
    if specs.is_empty() {
        return Err(io::Error::other("no --target NAME,PID,PORT given"));
    }
    let mode = match mode.as_str() {
        "echo" => Mode::Echo,
        "line" => Mode::Line,
        "http" => Mode::Http {
            // The path tells the server the body size to answer with.
            request: format!("GET /{size} HTTP/1.1\r\nHost: bench\r\n\r\n").into_bytes(),
            response: http_response(size),
        },
        "http-any" => Mode::AnyHeaders {
            request: format!("GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n").into_bytes(),
            body: body.into_bytes(),
        },
        "ws" => Mode::Ws {
            request_head: ws_head(size, true),
            response_head: ws_head(size, false),
        },
        other => return Err(io::Error::other(format!("unknown mode {other}"))),
    };
    let tls = match &tls_ca {
        Some(ca) => Some(tls_config(ca)?),
        None => None,
    };
    let epoll = Epoll::new()?;
    let mut targets = Vec::new();
    let mut next_id = 0usize;
    for spec in &specs {
        let parts: Vec<&str> = spec.split(',').collect();
        let [name, pid, port] = parts[..] else {
            return Err(io::Error::other(format!("bad target {spec}")));
        };
        let pid: i32 = pid.parse().map_err(io::Error::other)?;
        let port: u16 = port.parse().map_err(io::Error::other)?;
        let mut list = Vec::new();
        for _ in 0..conns {
            let mut stream = TcpStream::connect(("127.0.0.1", port))?;
            stream.set_nodelay(true)?;
            if matches!(mode, Mode::Ws { .. }) {
                ws_handshake(&mut stream)?;
            }
            let session = match &tls {
                Some(config) => {
                    let name = rustls_pki_types::ServerName::try_from("localhost")
                        .map_err(io::Error::other)?;
                    let mut session = rustls::ClientConnection::new(config.clone(), name)
                        .map_err(io::Error::other)?;
                    // A whole message (up to 100 KiB) goes into the session at once.
                    session.set_buffer_limit(None);
                    Some(Box::new(session))
                }
                None => None,
            };
            stream.set_nonblocking(true)?;
            epoll.ctl(
                libc::EPOLL_CTL_ADD,
                stream.as_raw_fd(),
                libc::EPOLLIN as u32,
                next_id as u64,
            )?;
            next_id += 1;
            list.push(Conn {
                stream,
                seq: 0,
                sent: 0,
                received: 0,
                started: Instant::now(),
                busy: false,
                want_write: false,
                first_in_slice: false,
                tls: session,
                head: Vec::new(),
            });
        }
        targets.push(Target {
            name: name.to_string(),
            pid,
            conns: list,
            slices: Vec::new(),
            latencies_us: Vec::new(),
        });
    }
    let mut load = Load {
        size,
        mode,
        buf: vec![0; 256 * 1024],
        out: vec![0; 64 * 1024],
    };
    let slice = Duration::from_millis(slice_ms);
    // Warm-up: one short slice each while all run, then all stopped.
    let mut bases = Vec::new();
    let mut base = 0;
    for t in &targets {
        bases.push(base);
        base += t.conns.len();
    }
    for (t, b) in targets.iter_mut().zip(&bases) {
        run_slice(&mut load, &epoll, *b, t, Duration::from_millis(20))?;
        t.latencies_us.clear();
        signal(t.pid, libc::SIGSTOP)?;
    }
    let mut order: VecDeque<usize> = (0..targets.len()).collect();
    for cycle in 0..cycles {
        for &i in &order {
            let t = &mut targets[i];
            signal(t.pid, libc::SIGCONT)?;
            let cpu0 = cpu_seconds(t.pid)?;
            let t0 = Instant::now();
            let requests = run_slice(&mut load, &epoll, bases[i], t, slice)?;
            let wall = t0.elapsed().as_secs_f64();
            let cpu = cpu_seconds(t.pid)? - cpu0;
            signal(t.pid, libc::SIGSTOP)?;
            t.slices.push((requests, wall, cpu));
        }
        order.rotate_left(1);
        eprint!("\r  cycle {}/{cycles}", cycle + 1);
    }
    eprint!("\r{:30}\r", "");
    for t in &targets {
        signal(t.pid, libc::SIGCONT)?;
    }
    let mut json = String::from("{\"targets\": [");
    for (k, t) in targets.iter_mut().enumerate() {
        if k > 0 {
            json.push_str(", ");
        }
        target_json(&mut json, &t.name, &t.slices, &mut t.latencies_us);
    }
    json.push_str("]}");
    println!("{json}");
    Ok(())
}

/// One target's object in the JSON `run` and `handshakes` print: its slices
/// (requests, wall seconds, server CPU seconds) and latency percentiles.
fn target_json(
    json: &mut String,
    name: &str,
    slices: &[(u64, f64, f64)],
    latencies_us: &mut [u32],
) {
    latencies_us.sort_unstable();
    let slices: Vec<String> = slices
        .iter()
        .map(|(r, w, c)| format!("[{r}, {w:.6}, {c:.6}]"))
        .collect();
    let _ = write!(
        json,
        "{{\"name\": \"{}\", \"slices\": [{}], \"p50_us\": {}, \"p99_us\": {}}}",
        name,
        slices.join(", "),
        percentile(latencies_us, 0.5),
        percentile(latencies_us, 0.99)
    );
}

/// Raises the soft fd limit to the hard one: C10K needs more than the default 1024.
fn raise_fd_limit() -> io::Result<()> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a valid rlimit for getrlimit to fill and setrlimit to read.
    check(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) })?;
    limit.rlim_cur = limit.rlim_max;
    // SAFETY: as above.
    check(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) }).map(|_| ())
}

/// Connections opened before waiting for their echoes, in C10K.
const C10K_BATCH: usize = 250;

/// One connection of `loadgen handshakes` to `port`: one echo of `payload` into
/// `buf` (over TLS with a full handshake if `tls`, then close_notify; plain, then the
/// client's half-close), and the server's close (EOF or reset) awaited, so that its CPU
/// for the connection is spent within the slice.
fn one_connection(
    tls: Option<&Arc<rustls::ClientConfig>>,
    port: u16,
    payload: &[u8],
    buf: &mut [u8],
) -> io::Result<()> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_nodelay(true)?;
    let echoed = &mut buf[..payload.len()];
    match tls {
        Some(config) => {
            let name =
                rustls_pki_types::ServerName::try_from("localhost").map_err(io::Error::other)?;
            let mut session =
                rustls::ClientConnection::new(config.clone(), name).map_err(io::Error::other)?;
            let mut tls = rustls::Stream::new(&mut session, &mut stream);
            tls.write_all(payload)?;
            tls.read_exact(echoed)?;
            session.send_close_notify();
            while session.wants_write() {
                session.write_tls(&mut stream)?;
            }
        }
        None => {
            stream.write_all(payload)?;
            stream.read_exact(echoed)?;
            stream.shutdown(std::net::Shutdown::Write)?;
        }
    }
    if echoed != payload {
        return Err(io::Error::other("echoed bytes differ"));
    }
    loop {
        match stream.read(buf) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Ok(()),
            Err(e) => return Err(e),
        }
    }
}

/// `conns` connectors making connections to `port` one after another for `length`:
/// the connections made and the latency of each, in µs.
fn connection_slice(
    tls: Option<&Arc<rustls::ClientConfig>>,
    port: u16,
    payload: &[u8],
    conns: usize,
    length: Duration,
) -> io::Result<(u64, Vec<u32>)> {
    let t0 = Instant::now();
    let connector = || {
        let mut buf = vec![0u8; payload.len().max(64 * 1024)];
        let (mut done, mut latencies) = (0u64, Vec::new());
        while t0.elapsed() < length {
            let started = Instant::now();
            one_connection(tls, port, payload, &mut buf)?;
            latencies.push(started.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
            done += 1;
        }
        io::Result::Ok((done, latencies))
    };
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..conns).map(|_| scope.spawn(connector)).collect();
        let (mut done, mut latencies) = (0u64, Vec::new());
        for worker in workers {
            let (n, l) = worker
                .join()
                .map_err(|_| io::Error::other("a connector panicked"))??;
            done += n;
            latencies.extend(l);
        }
        Ok((done, latencies))
    })
}

/// One server of `loadgen handshakes` and what was measured on it.
struct HandshakeTarget {
    name: String,
    pid: i32,
    port: u16,
    /// (connections, wall seconds, server CPU seconds) per slice.
    slices: Vec<(u64, f64, f64)>,
    latencies_us: Vec<u32>,
}

fn handshake_targets(specs: &[String]) -> io::Result<Vec<HandshakeTarget>> {
    let mut targets = Vec::new();
    for spec in specs {
        let parts: Vec<&str> = spec.split(',').collect();
        let [name, pid, port] = parts[..] else {
            return Err(io::Error::other(format!("bad target {spec}")));
        };
        targets.push(HandshakeTarget {
            name: name.to_string(),
            pid: pid.parse().map_err(io::Error::other)?,
            port: port.parse().map_err(io::Error::other)?,
            slices: Vec::new(),
            latencies_us: Vec::new(),
        });
    }
    Ok(targets)
}

/// The JSON `run` prints, plus `warmup`; every target is left running.
fn handshakes_json(targets: &mut [HandshakeTarget], warmup: u64) -> io::Result<String> {
    let mut json = String::from("{\"targets\": [");
    for (k, t) in targets.iter_mut().enumerate() {
        signal(t.pid, libc::SIGCONT)?;
        if k > 0 {
            json.push_str(", ");
        }
        target_json(&mut json, &t.name, &t.slices, &mut t.latencies_us);
    }
    let _ = write!(json, "], \"warmup\": {warmup}}}");
    Ok(json)
}

fn handshakes(args: &[String]) -> io::Result<()> {
    let mut size = 1024usize;
    let mut slice_ms = 100u64;
    let mut cycles = 20usize;
    let mut conns = 1usize;
    let mut ca = None;
    let mut specs = Vec::new();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = || {
            it.next()
                .cloned()
                .ok_or_else(|| io::Error::other(format!("{arg} needs a value")))
        };
        match arg.as_str() {
            "--size" => size = value()?.parse().map_err(io::Error::other)?,
            "--slice-ms" => slice_ms = value()?.parse().map_err(io::Error::other)?,
            "--cycles" => cycles = value()?.parse().map_err(io::Error::other)?,
            "--tls-ca" => ca = Some(value()?),
            "--target" => specs.push(value()?),
            "--conns" => conns = value()?.parse().map_err(io::Error::other)?,
            other => return Err(io::Error::other(format!("unknown argument {other}"))),
        }
    }
    let config = match ca {
        Some(ca) => {
            let mut config = Arc::into_inner(tls_config(&ca)?)
                .ok_or_else(|| io::Error::other("TLS configuration shared"))?;
            config.resumption = rustls::client::Resumption::disabled();
            Some(Arc::new(config))
        }
        None => None,
    };
    let mut targets = handshake_targets(&specs)?;
    let payload: Vec<u8> = (0..size).map(|i| pattern(0, 0, i)).collect();
    let slice_of = |t: &mut HandshakeTarget, length: Duration| {
        let (done, latencies) =
            connection_slice(config.as_ref(), t.port, &payload, conns.max(1), length)?;
        t.latencies_us.extend(latencies);
        io::Result::Ok(done)
    };
    // Connections made outside the measured slices, for a caller counting the server's
    // instructions over its whole run.
    let mut warmup = 0;
    for t in targets.iter_mut() {
        warmup += slice_of(t, Duration::from_millis(20))?;
        t.latencies_us.clear();
        signal(t.pid, libc::SIGSTOP)?;
    }
    let mut order: VecDeque<usize> = (0..targets.len()).collect();
    for cycle in 0..cycles {
        for &i in &order {
            let t = &mut targets[i];
            signal(t.pid, libc::SIGCONT)?;
            let cpu0 = cpu_seconds(t.pid)?;
            let t0 = Instant::now();
            let done = slice_of(t, Duration::from_millis(slice_ms))?;
            let wall = t0.elapsed().as_secs_f64();
            let cpu = cpu_seconds(t.pid)? - cpu0;
            signal(t.pid, libc::SIGSTOP)?;
            t.slices.push((done, wall, cpu));
        }
        order.rotate_left(1);
        eprint!("\r  cycle {}/{cycles}", cycle + 1);
    }
    eprint!("\r{:30}\r", "");
    println!("{}", handshakes_json(&mut targets, warmup)?);
    Ok(())
}

/// C10K: N connections opened and each echoing one byte, timed; then held idle until
/// stdin closes, so the caller can read the server's memory meanwhile.
fn c10k(args: &[String]) -> io::Result<()> {
    let (mut conns, mut spec) = (10_000usize, String::new());
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let value = it
            .next()
            .cloned()
            .ok_or_else(|| io::Error::other(format!("{arg} needs a value")))?;
        match arg.as_str() {
            "--conns" => conns = value.parse().map_err(io::Error::other)?,
            "--target" => spec = value,
            other => return Err(io::Error::other(format!("unknown argument {other}"))),
        }
    }
    let port: u16 = spec
        .rsplit(',')
        .next()
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| io::Error::other("--target NAME,PID,PORT needed"))?;
    raise_fd_limit()?;
    let epoll = Epoll::new()?;
    let started = Instant::now();
    let mut streams = Vec::with_capacity(conns);
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 1024];
    let mut byte = [0u8; 16];
    // In batches smaller than the listen backlog: an overflowing backlog drops SYNs and
    // the client's one-second retransmit would be measured instead of the server.
    for batch in (0..conns).step_by(C10K_BATCH) {
        let end = (batch + C10K_BATCH).min(conns);
        for id in batch..end {
            let stream = TcpStream::connect(("127.0.0.1", port))?;
            stream.set_nonblocking(true)?;
            epoll.ctl(
                libc::EPOLL_CTL_ADD,
                stream.as_raw_fd(),
                libc::EPOLLIN as u32,
                id as u64,
            )?;
            (&stream).write_all(b"x")?;
            streams.push(stream);
        }
        let mut left = end - batch;
        while left > 0 {
            let n = epoll.wait(&mut events, 30_000)?;
            if n == 0 {
                return Err(io::Error::other(format!("{left} connections never echoed")));
            }
            for ev in &events[..n] {
                let id = ev.u64 as usize;
                match (&streams[id]).read(&mut byte) {
                    Ok(1) if byte[0] == b'x' => {
                        left -= 1;
                        // Echoed once: idle from now on, no more events wanted.
                        epoll.ctl(libc::EPOLL_CTL_DEL, streams[id].as_raw_fd(), 0, 0)?;
                    }
                    Ok(_) => return Err(io::Error::other("wrong C10K echo")),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
            }
        }
    }
    println!(
        "{{\"conns\": {conns}, \"seconds\": {:.6}}}",
        started.elapsed().as_secs_f64()
    );
    io::stdout().flush()?;
    let mut sink = String::new();
    while io::stdin().read_line(&mut sink)? > 0 {}
    drop(streams);
    Ok(())
}

/// The ceiling: an epoll echo server with no language runtime on the path.
fn serve(args: &[String]) -> io::Result<()> {
    let port: u16 = match args {
        [flag, p] if flag == "--port" => p.parse().map_err(io::Error::other)?,
        _ => 0,
    };
    let listener = TcpListener::bind(("127.0.0.1", port))?;
    listener.set_nonblocking(true)?;
    println!("{}", listener.local_addr()?.port());
    io::stdout().flush()?;
    let epoll = Epoll::new()?;
    const LISTENER: u64 = u64::MAX;
    epoll.ctl(
        libc::EPOLL_CTL_ADD,
        listener.as_raw_fd(),
        libc::EPOLLIN as u32,
        LISTENER,
    )?;
    let mut conns: Vec<Option<(TcpStream, Vec<u8>)>> = Vec::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
    loop {
        let n = epoll.wait(&mut events, -1)?;
        for ev in &events[..n] {
            if ev.u64 == LISTENER {
                while let Ok((stream, _)) = listener.accept() {
                    stream.set_nonblocking(true)?;
                    stream.set_nodelay(true)?;
                    let id = conns
                        .iter()
                        .position(Option::is_none)
                        .unwrap_or(conns.len());
                    epoll.ctl(
                        libc::EPOLL_CTL_ADD,
                        stream.as_raw_fd(),
                        libc::EPOLLIN as u32,
                        id as u64,
                    )?;
                    if id == conns.len() {
                        conns.push(Some((stream, Vec::new())));
                    } else {
                        conns[id] = Some((stream, Vec::new()));
                    }
                }
                continue;
            }
            let id = ev.u64 as usize;
            let Some(Some((stream, pending))) = conns.get_mut(id) else {
                continue;
            };
            let mut closed = false;
            if pending.is_empty() {
                match stream.read(&mut buf) {
                    Ok(0) => closed = true,
                    Ok(n) => pending.extend_from_slice(&buf[..n]),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(_) => closed = true,
                }
            }
            while !closed && !pending.is_empty() {
                match stream.write(pending) {
                    Ok(n) => {
                        pending.drain(..n);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(_) => closed = true,
                }
            }
            if closed {
                conns[id] = None;
                continue;
            }
            let interest = if pending.is_empty() {
                libc::EPOLLIN
            } else {
                libc::EPOLLOUT
            };
            epoll.ctl(
                libc::EPOLL_CTL_MOD,
                stream.as_raw_fd(),
                interest as u32,
                id as u64,
            )?;
        }
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let outcome = match args.first().map(String::as_str) {
        Some("run") => run(&args[1..]),
        Some("serve") => serve(&args[1..]),
        Some("c10k") => c10k(&args[1..]),
        Some("handshakes") => handshakes(&args[1..]),
        _ => Err(io::Error::other(
            "usage: loadgen run --target NAME,PID,PORT ... | loadgen serve [--port P]",
        )),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("loadgen: {err}");
            ExitCode::FAILURE
        }
    }
}
