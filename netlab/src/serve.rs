//! Echo servers inside lab namespaces: TCP and SCTP accept and echo what they read, UDP
//! echoes each datagram to its sender. All of them are tasks of the lab's runtime.

use std::time::Duration;

use palisade_policy::model::Protocol;
use socket2::Socket;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::runtime::Runtime;

/// A client that connects and never writes must not keep its task forever.
const IDLE_CONNECTION: Duration = Duration::from_secs(30);

/// Starts serving on a bound (and, for streams, listening) socket.
pub(crate) fn spawn(runtime: &Runtime, protocol: Protocol, socket: Socket) -> std::io::Result<()> {
    let _guard = runtime.enter();
    match protocol {
        Protocol::Udp => {
            let socket = tokio::net::UdpSocket::from_std(socket.into())?;
            runtime.spawn(async move {
                let mut buf = vec![0u8; 65536];
                loop {
                    match socket.recv_from(&mut buf).await {
                        Ok((n, peer)) => {
                            let _ = socket.send_to(&buf[..n], peer).await;
                        }
                        // ICMP errors from earlier replies surface here; keep serving.
                        Err(e) => tracing::trace!("udp echo: {e}"),
                    }
                }
            });
        }
        Protocol::Tcp | Protocol::Sctp => {
            let listener = tokio::net::TcpListener::from_std(socket.into())?;
            runtime.spawn(async move {
                loop {
                    match listener.accept().await {
                        Ok((stream, _)) => {
                            tokio::spawn(echo(stream));
                        }
                        Err(e) => {
                            tracing::debug!("echo listener: accept failed: {e}");
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                    }
                }
            });
        }
    }
    Ok(())
}

async fn echo(mut stream: tokio::net::TcpStream) {
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(IDLE_CONNECTION, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return,
            Ok(Ok(n)) => {
                if stream.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}
