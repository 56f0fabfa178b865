//! Dialing a chaos.v1 server: one function for the CLI, the agent's lease
//! link and the coordinator's channels to agents, so the scheme rules and
//! the identity checks are the same everywhere.
//!
//! With TLS (the default) URLs are `https://`; with `--insecure` they are
//! `http://`. A URL without a scheme gets the mode's; a URL with the other
//! mode's scheme is refused, naming both, rather than silently downgraded.

use std::{path::PathBuf, sync::Arc, time::Duration};

use tonic::transport::{Channel, Endpoint};

use super::{
    TrustError,
    tls::{Connector, Expect, Tls},
};

/// How a client talks to servers.
#[derive(Debug, Clone)]
pub enum ClientTls {
    /// mTLS with these credentials.
    Tls(Arc<Tls>),
    /// Plaintext (`--insecure`).
    Insecure,
}

impl ClientTls {
    pub fn is_tls(&self) -> bool {
        matches!(self, ClientTls::Tls(_))
    }
}

/// `url` with the scheme the mode uses (added when absent); refused when
/// it names the other one.
pub fn normalize_url(url: &str, tls: bool) -> Result<String, TrustError> {
    let (want, other) = if tls { ("https", "http") } else { ("http", "https") };
    match url.split_once("://") {
        None => Ok(format!("{want}://{url}")),
        Some((s, _)) if s == want => Ok(url.to_string()),
        Some((s, rest)) if s == other && tls => Err(TrustError::Invalid {
            field: "url".into(),
            why: format!("{url:?} is plaintext but TLS is on: use https://{rest} (or --insecure on every binary, loopback only)"),
        }),
        Some((s, rest)) if s == other => Err(TrustError::Invalid {
            field: "url".into(),
            why: format!("{url:?} asks for TLS but this side runs --insecure: use http://{rest}, or drop --insecure"),
        }),
        Some(_) => Err(TrustError::Invalid { field: "url".into(), why: format!("{url:?}: expected http:// or https://") }),
    }
}

/// Connection settings of a channel.
#[derive(Debug, Clone, Copy)]
pub struct Dial {
    pub connect_timeout: Duration,
    /// Deadline of each call; None: none (streams).
    pub timeout: Option<Duration>,
}

/// A lazily connecting channel to `url`. With TLS the server must be
/// `expect` (its role, and its name when given) besides matching the URL's
/// host. Keep-alive pings keep an idle channel's connection warm, so calls
/// never pay a handshake after the first.
pub fn channel(url: &str, tls: &ClientTls, expect: Expect, dial: Dial) -> Result<Channel, TrustError> {
    let url = normalize_url(url, tls.is_tls())?;
    let uri: tonic::codegen::http::Uri =
        url.parse().map_err(|e| TrustError::Invalid { field: "url".into(), why: format!("{url:?}: {e}") })?;
    let (host, _) = super::tls::host_port(&uri)?;
    let port = uri.port_u16().unwrap_or(if tls.is_tls() { 443 } else { 80 });
    let host = if host.contains(':') { format!("[{host}]") } else { host };
    // tonic's ClientTlsConfig is not used: the connector does the handshake
    // (and checks the server's chaos identity), so the endpoint itself is
    // plain http. (tonic's tls-ring feature is on for the server side's
    // TlsConnectInfo, which carries the verified client certificate.)
    let mut ep = Endpoint::from_shared(format!("http://{host}:{port}"))
        .map_err(|e| TrustError::Invalid { field: "url".into(), why: format!("{url:?}: {e}") })?
        .connect_timeout(dial.connect_timeout)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true)
        .tcp_nodelay(true);
    if let Some(t) = dial.timeout {
        ep = ep.timeout(t);
    }
    Ok(match tls {
        ClientTls::Insecure => ep.connect_lazy(),
        ClientTls::Tls(t) => ep.connect_with_connector_lazy(Connector { tls: Arc::clone(t), expect }),
    })
}

/// A channel to an agent's break-glass Unix socket.
pub fn local_channel(path: PathBuf, timeout: Option<Duration>) -> Channel {
    let mut ep = Endpoint::from_static("http://local.socket");
    if let Some(t) = timeout {
        ep = ep.timeout(t);
    }
    ep.connect_with_connector_lazy(tower::service_fn(move |_: tonic::codegen::http::Uri| {
        let path = path.clone();
        async move { Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tokio::net::UnixStream::connect(path).await?)) }
    }))
}

#[cfg(test)]
mod tests {
    use super::normalize_url;

    #[test]
    fn schemes_follow_the_mode_and_never_downgrade() {
        assert_eq!(normalize_url("127.0.0.1:1", true).expect("ok"), "https://127.0.0.1:1");
        assert_eq!(normalize_url("127.0.0.1:1", false).expect("ok"), "http://127.0.0.1:1");
        assert_eq!(normalize_url("https://h:1", true).expect("ok"), "https://h:1");
        let e = normalize_url("http://h:1", true).expect_err("plaintext under TLS").to_string();
        assert!(e.contains("https://h:1") && e.contains("--insecure"), "{e}");
        let e = normalize_url("https://h:1", false).expect_err("TLS under insecure").to_string();
        assert!(e.contains("http://h:1"), "{e}");
        assert!(normalize_url("ftp://h:1", true).is_err());
    }
}
