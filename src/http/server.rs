//! The listener: accepts at most `server.max_connections` connections at once (past that it
//! stops accepting and the kernel queues them), serves each with hyper's HTTP/1.1 under a
//! header-read timeout that also bounds how long a kept-alive connection may sit idle, and stops
//! gracefully: no new connections, in-flight requests finish.
//!
//! Hyper answers a few malformed requests itself, before any handler runs; its limits are set
//! well above the server's own (`max_uri_bytes`, `max_header_bytes`, `max_headers`, checked in
//! [`super::limits`]), so every ordinary violation gets the JSON error shape.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::Semaphore;

use crate::config::ServerConfig;

/// Hyper's own ceiling on the header section; the server's JSON 431 triggers well below it.
const HYPER_MAX_BUF: usize = 1024 * 1024;
/// Hyper's own ceiling on header fields (it answers a bare 431 past it).
const HYPER_MAX_HEADERS: usize = 1000;

/// Binds `addr` with an accept queue as deep as the connections the server will hold (the
/// kernel caps it at `net.core.somaxconn`). Tokio's default of 1024 overflows under a burst of a
/// few thousand connects, and a dropped SYN costs the client a 1 s retransmit — health checks
/// included.
pub fn listen(addr: SocketAddr, max_connections: usize) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    // As `TcpListener::bind` does: a restarted server may bind while old connections linger.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(u32::try_from(max_connections).unwrap_or(u32::MAX).max(128))
}

/// Serves `app` on `listener` until `shutdown` resolves, then waits for open connections to
/// finish their in-flight requests (the caller bounds that wait).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    config: &ServerConfig,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let slots = Arc::new(Semaphore::new(config.max_connections));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(Duration::from_millis(config.header_read_timeout_ms))
        .max_headers(HYPER_MAX_HEADERS.max(config.max_headers))
        .max_buf_size(HYPER_MAX_BUF.max(config.max_header_bytes * 2));
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => p.map_err(std::io::Error::other)?,
            _ = &mut shutdown => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(app.clone());
        let conn = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}
