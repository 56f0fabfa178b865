//! What every chaos.v1 server shares: server reflection (v1 and v1alpha,
//! so grpcurl works with no .proto at hand), `grpc.health.v1`, serving
//! behind the auth layer (mTLS on TCP, or `--insecure` plaintext on
//! loopback only; the agent's Unix socket), tracing set-up, and the
//! shutdown signal.

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use tonic::service::{Routes, RoutesBuilder};
use tracing::{info, warn};

use crate::{
    telemetry::RpcLayer,
    trust::{AuthLayer, AuthMode, Tls},
};
use tracing_subscriber::{EnvFilter, fmt, prelude::*};

/// Add reflection (v1 + v1alpha) to a router, advertising `services` (e.g.
/// `chaos.v1.Agent`) plus `grpc.health.v1.Health` and reflection itself.
/// Every chaos.v1 type stays resolvable for `grpcurl describe`.
pub fn add_reflection(routes: &mut RoutesBuilder, services: &[&str]) -> Result<(), tonic_reflection::server::Error> {
    let configure = || {
        let mut b = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .with_service_name("grpc.health.v1.Health");
        for s in services {
            b = b.with_service_name(*s);
        }
        b
    };
    let v1 = configure().with_service_name("grpc.reflection.v1.ServerReflection").build_v1()?;
    let v1alpha = configure().with_service_name("grpc.reflection.v1alpha.ServerReflection").build_v1alpha()?;
    routes.add_service(v1).add_service(v1alpha);
    Ok(())
}

/// `--insecure` (plaintext, nobody authenticated) is for loopback only: a
/// server asked to listen beyond it refuses to start.
pub fn check_plaintext_bind(what: &str, addr: SocketAddr) -> Result<(), String> {
    if addr.ip().is_loopback() {
        warn!(listen = %addr, "{what} runs --insecure: plaintext, no authentication, every caller may do everything (loopback only)");
        Ok(())
    } else {
        Err(format!(
            "--insecure: refusing to serve plaintext on {addr}: anyone who reaches it could inject or stop faults on this host. \
             Listen on 127.0.0.1, or run with certificates (chaos certs init / chaos certs issue; see README)"
        ))
    }
}

/// How a server's TCP listener speaks.
#[derive(Debug, Clone)]
pub enum Listen {
    /// TLS with client certificates from the fleet's CA (the default).
    Tls(Arc<Tls>),
    /// `--insecure`: plaintext on loopback.
    Insecure,
}

/// How long open calls get to finish once a server is asked to stop.
/// Streams that never end by themselves (a coordinator following an
/// agent's metrics, a `chaos watch`) are then cut, so an agent always goes
/// on to revert its faults and exit.
pub const DRAIN: Duration = Duration::from_secs(2);

type Signal = std::pin::Pin<Box<dyn Future<Output = ()> + Send>>;

/// Run the server `serve` builds around its own stop signal; once
/// `shutdown` resolves, give it [`DRAIN`] to finish open calls, then drop it.
async fn drain_then_drop<S>(
    what: &str,
    shutdown: impl Future<Output = ()>,
    serve: impl FnOnce(Signal) -> S,
) -> Result<(), tonic::transport::Error>
where
    S: Future<Output = Result<(), tonic::transport::Error>>,
{
    let (tx, mut rx) = tokio::sync::watch::channel(false);
    let signal: Signal = Box::pin(async move {
        let _ = rx.wait_for(|stop| *stop).await;
    });
    let server = serve(signal);
    tokio::pin!(server, shutdown);
    tokio::select! {
        r = &mut server => return r,
        () = &mut shutdown => {
            let _ = tx.send(true);
        }
    }
    match tokio::time::timeout(DRAIN, &mut server).await {
        Ok(r) => r,
        Err(_) => {
            info!("{what}: calls still open {DRAIN:?} after the stop (streams such as a coordinator following metrics): closing them");
            Ok(())
        }
    }
}

/// Serve `routes` on a TCP listener behind the RPC-metrics and auth layers:
/// mTLS ([`Listen::Tls`]) or plaintext ([`Listen::Insecure`]), until
/// `shutdown` (then [`DRAIN`] for open calls).
pub async fn serve_tcp(
    routes: Routes,
    listener: tokio::net::TcpListener,
    listen: &Listen,
    rpc: RpcLayer,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let listen = listen.clone();
    drain_then_drop("gRPC server", shutdown, move |signal| async move {
        match listen {
            Listen::Tls(tls) => {
                tonic::transport::Server::builder()
                    .layer(rpc)
                    .layer(AuthLayer::new(AuthMode::Certificates))
                    .add_routes(routes)
                    .serve_with_incoming_shutdown(crate::trust::tls::incoming(listener, tls), signal)
                    .await
            }
            Listen::Insecure => {
                tonic::transport::Server::builder()
                    .layer(rpc)
                    .layer(AuthLayer::new(AuthMode::Insecure))
                    .add_routes(routes)
                    .serve_with_incoming_shutdown(tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)), signal)
                    .await
            }
        }
    })
    .await
}

/// Serve `routes` on a Unix socket (the agent's break-glass): callers must
/// be root or this process's user, and act as a local admin.
pub async fn serve_unix(
    routes: Routes,
    listener: tokio::net::UnixListener,
    path: String,
    rpc: RpcLayer,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    drain_then_drop("break-glass socket", shutdown, move |signal| async move {
        tonic::transport::Server::builder()
            .layer(rpc)
            .layer(AuthLayer::new(AuthMode::LocalSocket(path)))
            .add_routes(routes)
            .serve_with_incoming_shutdown(tokio_stream::wrappers::UnixListenerStream::new(listener), signal)
            .await
    })
    .await
}

/// Log output format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Tracing to stderr, filtered by `RUST_LOG` (default `info`).
pub fn init_tracing(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let registry = tracing_subscriber::registry().with(filter);
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = match format {
        LogFormat::Text => registry.with(fmt::layer().with_ansi(ansi).with_writer(std::io::stderr)).try_init(),
        LogFormat::Json => registry.with(fmt::layer().json().with_writer(std::io::stderr)).try_init(),
    };
}

/// Resolves on the first SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        warn!("could not install signal handlers; stop with SIGKILL only");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
}
