//! The `palisade-agent` binary as a child process of a test, and plain HTTP to its metrics
//! port.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Child;
use std::time::{Duration, Instant};

/// Kills and reaps the agent when dropped, also when the test fails.
pub struct Agent(pub Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `METHOD path` on 127.0.0.1:`port`: (status, whole response).
pub fn http(port: u16, method: &str, path: &str) -> Option<(u16, String)> {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let status = text.split(' ').nth(1)?.parse().ok()?;
    Some((status, text))
}

pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    http(port, "GET", path)
}

/// Waits up to `secs` for `f` to hold.
pub fn eventually_within(secs: u64, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("timed out waiting for: {what}");
}

pub fn eventually(what: &str, f: impl FnMut() -> bool) {
    eventually_within(10, what, f)
}

/// Whether a root test can run ([`super::can_run`]); with `PALISADE_NO_SKIP=1` a skip is a
/// failure.
pub fn runnable(_test: &str) -> bool {
    super::can_run(&[super::ROOT, super::IP, super::NFT])
}
