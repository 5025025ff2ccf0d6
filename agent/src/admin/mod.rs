//! The agent's listeners, all of them: this module owns every socket the process serves on,
//! the runtime they run on ([`server_runtime`]) and how they listen ([`listen`]).
//!
//! | listener | default address | endpoints | module |
//! |---|---|---|---|
//! | proxy health (`healthzBindAddress`) | `0.0.0.0:10256` | `/healthz` (proxy health and node eligibility, kube-proxy's JSON), `/livez` (proxy health only) | [`health`] ([`health::serve`]) |
//! | Service health checks (`healthCheckNodePort` of `externalTrafficPolicy: Local` load balancers) | node addresses (`nodePortAddresses`), one port per Service | any path: 200 with local endpoints and a healthy proxy, else 503; `X-Load-Balancing-Endpoint-Weight` | [`health`] ([`health::HealthCheckServers`]) |
//! | metrics (`metricsBindAddress`) | `127.0.0.1:10249` | `/metrics` (OpenMetrics text: kube-proxy's series and the agent's own) | [`metrics`] ([`metrics::serve`]) |
//!
//! Every listener runs on [`server_runtime`]: a thread and runtime of their own, which nothing
//! else uses, so an answer never waits for a sync (the agent's main runtime has one thread, and
//! a sync keeps it busy for as long as it computes) nor for a sweep of the datapath maps (a
//! thread of its own too). `health` reads the metrics' sync state; `metrics` depends on
//! nothing here but this module.

pub mod health;
pub mod metrics;

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::OnceLock;

use axum::Router;
use tokio::net::{TcpListener, TcpSocket};
use tokio::task::JoinHandle;

/// The runtime the health, health check and metrics servers run on: a current-thread runtime on
/// a thread of its own (`servers`), started on first use and kept for the life of the process.
/// Where that thread cannot be started, the caller's runtime (logged once).
pub fn server_runtime() -> tokio::runtime::Handle {
    static RUNTIME: OnceLock<Option<tokio::runtime::Handle>> = OnceLock::new();
    let handle = RUNTIME.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel();
        let started = std::thread::Builder::new()
            .name("servers".into())
            .spawn(move || {
                match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => {
                        let _ = tx.send(Ok(rt.handle().clone()));
                        rt.block_on(std::future::pending::<()>());
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                    }
                }
            });
        let result = match started {
            Ok(_) => rx.recv().unwrap_or_else(|e| Err(std::io::Error::other(e))),
            Err(e) => Err(e),
        };
        match result {
            Ok(handle) => Some(handle),
            Err(e) => {
                tracing::error!("cannot start the servers' runtime, they share the agent's: {e}");
                None
            }
        }
    });
    handle
        .clone()
        .unwrap_or_else(tokio::runtime::Handle::current)
}

/// Listens on `address` and serves `app` there, on [`server_runtime`]. Binding happens before
/// this returns; serving runs in the returned task.
pub async fn spawn_server(
    address: SocketAddr,
    app: Router,
    what: &'static str,
) -> std::io::Result<JoinHandle<()>> {
    let rt = server_runtime();
    // The listener registers with the runtime it is created on: the servers'.
    let listener = rt
        .spawn(listen(address))
        .await
        .map_err(std::io::Error::other)??;
    Ok(rt.spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(%address, "{what} server stopped: {e}");
        }
    }))
}

/// Opens a TCP listener on `address`; an unspecified IPv4 address listens on both families
/// (`[::]` with `IPV6_V6ONLY` off) where IPv6 is available, as Go's listener does.
pub async fn listen(address: SocketAddr) -> std::io::Result<TcpListener> {
    if address.ip() == IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)
        && let Ok(l) = listen_dual_stack(address.port())
    {
        return Ok(l);
    }
    let socket = match address {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(address)?;
    socket.listen(1024)
}

fn listen_dual_stack(port: u16) -> std::io::Result<TcpListener> {
    let socket = TcpSocket::new_v6()?;
    nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::Ipv6V6Only, &false)
        .map_err(std::io::Error::from)?;
    socket.set_reuseaddr(true)?;
    socket.bind(SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port))?;
    socket.listen(1024)
}
