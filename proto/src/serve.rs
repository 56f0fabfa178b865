//! What every chaos.v1 server shares: server reflection (v1 and v1alpha,
//! so grpcurl works with no .proto at hand), `grpc.health.v1`, the warning
//! for plaintext on a non-loopback address, tracing set-up, and the
//! shutdown signal.

use std::net::SocketAddr;

use tonic::service::RoutesBuilder;
use tracing::warn;
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

/// Log loudly when a plaintext server listens beyond loopback.
pub fn warn_if_exposed(what: &str, addr: SocketAddr) {
    if !addr.ip().is_loopback() {
        warn!(
            listen = %addr,
            "{what} listens on a non-loopback address WITHOUT TLS: anyone who can reach {addr} can inject or stop faults on this host. \
             Bind 127.0.0.1 or put it behind a trusted network until TLS support lands."
        );
    }
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
