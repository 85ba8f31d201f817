//! Reaching the apiserver from inside a network namespace (kube-proxy in a lab node) without
//! any listener outside loopback: a listener on the namespace's own 127.0.0.1, whose
//! connections are relayed to the apiserver on the host's 127.0.0.1.
//!
//! A socket stays in the namespace it was created in, so a short-lived thread enters the
//! namespace only to create the listener; accepting and relaying happen in the host
//! namespace.

use std::fs::File;
use std::io;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use crate::error::{io as io_err, Error, Result};
use crate::lab::KubeLab;

/// A relay from `127.0.0.1:port()` inside a network namespace to the lab's apiserver. Stops
/// (and cuts its connections) on drop.
#[derive(Debug)]
pub struct NetnsForward {
    port: u16,
    kubeconfig: PathBuf,
    stop: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
    acceptor: Option<thread::JoinHandle<()>>,
}

impl NetnsForward {
    /// The port on the namespace's 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// An admin kubeconfig whose server is `https://127.0.0.1:port()`, for processes run in
    /// the namespace.
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }
}

impl Drop for NetnsForward {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for conn in self
            .conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            let _ = conn.shutdown(Shutdown::Both);
        }
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
        let _ = std::fs::remove_file(&self.kubeconfig);
    }
}

/// Binds 127.0.0.1:0 inside the namespace at `netns` (e.g. `/var/run/netns/NAME`).
fn listen_in(netns: &Path) -> Result<TcpListener> {
    let file = File::open(netns).map_err(io_err(format!("open {}", netns.display())))?;
    let shown = netns.display().to_string();
    thread::spawn(move || -> io::Result<TcpListener> {
        // SAFETY: setns on this thread only; the thread ends right after.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(io::Error::last_os_error());
        }
        TcpListener::bind(("127.0.0.1", 0))
    })
    .join()
    .map_err(|_| Error::Other("netns listener thread panicked".into()))?
    .map_err(io_err(format!("listen on 127.0.0.1 in {shown}")))
}

fn relay(from: TcpStream, to: TcpStream) {
    let (mut from, mut to) = (from, to);
    let _ = io::copy(&mut from, &mut to);
    let _ = to.shutdown(Shutdown::Write);
}

impl KubeLab {
    /// Makes the apiserver reachable as `https://127.0.0.1:PORT` inside the network namespace
    /// at `netns`, and writes an admin kubeconfig for it. The serving certificate names
    /// 127.0.0.1, so clients there verify it as usual.
    pub fn forward_into_netns(&self, netns: &Path) -> Result<NetnsForward> {
        let listener = listen_in(netns)?;
        let port = listener.local_addr().map_err(io_err("local_addr"))?.port();
        listener
            .set_nonblocking(true)
            .map_err(io_err("set_nonblocking"))?;
        let target = self
            .url()
            .rsplit(':')
            .next()
            .and_then(|p| p.parse::<u16>().ok())
            .ok_or_else(|| Error::Other(format!("no port in {}", self.url())))?;
        let kubeconfig = self.dir().join(format!("netns-{port}.kubeconfig"));
        let text = std::fs::read_to_string(self.kubeconfig())
            .map_err(io_err("read the admin kubeconfig"))?
            .replace(self.url(), &format!("https://127.0.0.1:{port}"));
        std::fs::write(&kubeconfig, text)
            .map_err(io_err(format!("write {}", kubeconfig.display())))?;

        let stop = Arc::new(AtomicBool::new(false));
        let conns = Arc::new(Mutex::new(Vec::new()));
        let acceptor = {
            let (stop, conns) = (stop.clone(), conns.clone());
            thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    let inner = match listener.accept() {
                        Ok((inner, _)) => inner,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            thread::sleep(Duration::from_millis(20));
                            continue;
                        }
                        Err(_) => break,
                    };
                    let _ = inner.set_nonblocking(false);
                    let Ok(outer) = TcpStream::connect(("127.0.0.1", target)) else {
                        continue;
                    };
                    let (Ok(inner2), Ok(outer2)) = (inner.try_clone(), outer.try_clone()) else {
                        continue;
                    };
                    {
                        let mut list = conns.lock().unwrap_or_else(|p| p.into_inner());
                        list.retain(|c: &TcpStream| c.peer_addr().is_ok());
                        if let (Ok(a), Ok(b)) = (inner.try_clone(), outer.try_clone()) {
                            list.push(a);
                            list.push(b);
                        }
                    }
                    thread::spawn(move || relay(inner, outer));
                    thread::spawn(move || relay(outer2, inner2));
                }
            })
        };
        Ok(NetnsForward {
            port,
            kubeconfig,
            stop,
            conns,
            acceptor: Some(acceptor),
        })
    }
}
