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

/// Tracing to stderr, filtered by `RUST_LOG` (default `info`). Text lines
/// go through [`OneLine`], so a value from outside (an agent id, a
/// process name read from /proc, a Docker error) can never start a line
/// of its own; JSON escapes by itself. A panic is logged as one line with
/// its place ("panicked at FILE:LINE").
pub fn init_tracing(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let registry = tracing_subscriber::registry().with(filter);
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = match format {
        LogFormat::Text => {
            registry.with(fmt::layer().with_ansi(ansi).with_writer(move || OneLine { inner: std::io::stderr(), ansi })).try_init()
        }
        LogFormat::Json => registry.with(fmt::layer().json().with_writer(std::io::stderr)).try_init(),
    };
    std::panic::set_hook(Box::new(|info| {
        let at = info.location().map(|l| format!("{}:{}", l.file(), l.line())).unwrap_or_else(|| "an unknown place".into());
        let thread = std::thread::current().name().unwrap_or("unnamed").to_string();
        tracing::error!(thread, "panicked at {at}: {}", panic_text(info.payload()));
    }));
}

/// A writer for one formatted log event: every control character but the
/// final newline (and the colour codes of a terminal's own output) is
/// written escaped (`\n`, `\u{1b}`).
pub struct OneLine<W> {
    pub inner: W,
    /// Keep ESC: the formatter colours a terminal's output itself.
    pub ansi: bool,
}

impl<W: std::io::Write> std::io::Write for OneLine<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let (body, end) = match buf.split_last() {
            Some((b'\n', body)) => (body, &b"\n"[..]),
            _ => (buf, &b""[..]),
        };
        if !body.iter().any(|b| needs_escape(*b, self.ansi)) {
            self.inner.write_all(buf)?;
            return Ok(buf.len());
        }
        let mut out = Vec::with_capacity(buf.len() + 16);
        for &b in body {
            if needs_escape(b, self.ansi) {
                out.extend(std::ascii::escape_default(b));
            } else {
                out.push(b);
            }
        }
        out.extend_from_slice(end);
        self.inner.write_all(&out)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

fn needs_escape(b: u8, ansi: bool) -> bool {
    (b < 0x20 && b != b'\t' && !(ansi && b == 0x1b)) || b == 0x7f
}

/// The message of a panic payload (`&str` or `String`; else a placeholder).
pub fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic without a message".into()
    }
}

/// Run `fut`; a panic inside it is caught and returned as its message
/// (the panic hook has logged it with its place). For background tasks
/// whose end must be reported: a run that panics still ends with a verdict.
pub async fn catch_panic<F: Future>(fut: F) -> Result<F::Output, String> {
    use futures::FutureExt;
    std::panic::AssertUnwindSafe(fut).catch_unwind().await.map_err(|p| panic_text(&*p))
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn one_line(text: &[u8], ansi: bool) -> String {
        let mut w = OneLine { inner: Vec::new(), ansi };
        w.write_all(text).expect("write");
        String::from_utf8(w.inner).expect("utf-8")
    }

    #[test]
    fn a_value_from_outside_never_starts_a_log_line_of_its_own() {
        let line = one_line(b"INFO agent registered agent_id=a\nERROR forged\r\x07\x7f\n", false);
        assert_eq!(line, "INFO agent registered agent_id=a\\nERROR forged\\r\\x07\\x7f\n");
        assert_eq!(line.matches('\n').count(), 1);
        // A terminal's colours are the formatter's own; tabs stay.
        assert_eq!(one_line(b"\x1b[32mINFO\x1b[0m\tok\n", true), "\x1b[32mINFO\x1b[0m\tok\n");
        assert_eq!(one_line(b"\x1b[2J\n", false), "\\x1b[2J\n");
    }

    #[tokio::test]
    async fn a_panic_is_caught_with_its_message() {
        let r = catch_panic(async { panic!("boom {}", 7) }).await;
        assert_eq!(r.expect_err("panicked"), "boom 7");
        assert_eq!(catch_panic(async { 5 }).await, Ok(5));
    }
}
