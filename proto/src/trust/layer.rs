//! The one place both servers check who calls what: a tower layer that
//! finds the caller of each request from its connection (the verified
//! client certificate, the Unix socket's peer credentials, or nobody on an
//! `--insecure` server), checks [`super::roles::authorize`], and puts the
//! [`Caller`] in the request's extensions for the handlers and the audit.
//!
//! No certificate: UNAUTHENTICATED. Wrong role: PERMISSION_DENIED naming
//! the role needed and the caller.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use tonic::{
    Status,
    codegen::http,
    transport::server::{TcpConnectInfo, TlsConnectInfo, UdsConnectInfo},
};
use tracing::{info, warn};

use super::{
    identity::{Caller, Identity, Role, Via},
    roles::authorize,
};

/// How the server a layer guards authenticates its callers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthMode {
    /// TLS with client certificates from the fleet's CA.
    Certificates,
    /// The agent's break-glass Unix socket at this path: the peer must be
    /// root (or the agent's own user); it acts as a local admin.
    LocalSocket(String),
    /// `--insecure`: plaintext, nobody authenticated, every call allowed.
    Insecure,
}

/// The auth layer for `tonic::transport::Server::builder().layer(..)`.
#[derive(Debug, Clone)]
pub struct AuthLayer {
    mode: AuthMode,
}

impl AuthLayer {
    pub fn new(mode: AuthMode) -> Self {
        AuthLayer { mode }
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = Auth<S>;
    fn layer(&self, inner: S) -> Auth<S> {
        Auth { inner, mode: self.mode.clone() }
    }
}

#[derive(Debug, Clone)]
pub struct Auth<S> {
    inner: S,
    mode: AuthMode,
}

/// The name every local-socket caller acts under.
pub const LOCAL_NAME: &str = "local-root";

/// Find the caller of a request from the connection it came on.
pub fn caller_of<B>(req: &http::Request<B>, mode: &AuthMode) -> Result<Caller, Status> {
    let method = req.uri().path().trim_start_matches('/');
    let ext = req.extensions();
    match mode {
        AuthMode::Certificates => {
            let Some(info) = ext.get::<TlsConnectInfo<TcpConnectInfo>>() else {
                return Err(Status::unauthenticated(format!("{method}: this server accepts TLS connections only")));
            };
            let address = info.get_ref().remote_addr().map(|a| a.to_string()).unwrap_or_else(|| "unknown".into());
            let certs = info.peer_certs().unwrap_or_default();
            let Some(leaf) = certs.first() else {
                return Err(Status::unauthenticated(format!(
                    "{method}: no client certificate from {address}: this server needs one signed by its CA \
                     (make one with `chaos certs issue --role ROLE --name NAME`)"
                )));
            };
            let identity = Identity::from_cert_der(leaf.as_ref()).map_err(|e| Status::unauthenticated(format!("{method}: {e}")))?;
            Ok(Caller { identity: Some(identity), via: Via::Certificate, address })
        }
        AuthMode::LocalSocket(path) => {
            let Some(info) = ext.get::<UdsConnectInfo>() else {
                return Err(Status::unauthenticated(format!("{method}: the local socket server takes Unix connections only")));
            };
            let cred = info.peer_cred.ok_or_else(|| Status::unauthenticated(format!("{method}: peer credentials unknown on {path}")))?;
            let me = nix::unistd::geteuid().as_raw();
            if cred.uid() != 0 && cred.uid() != me {
                return Err(Status::permission_denied(format!(
                    "{method}: {path} serves root only (and the agent's own user, uid {me}); the caller has uid {}",
                    cred.uid()
                )));
            }
            Ok(Caller {
                identity: Some(Identity { role: Role::Admin, name: LOCAL_NAME.into() }),
                via: Via::LocalSocket { uid: cred.uid(), pid: cred.pid() },
                address: path.clone(),
            })
        }
        AuthMode::Insecure => {
            let address =
                ext.get::<TcpConnectInfo>().and_then(|i| i.remote_addr()).map(|a| a.to_string()).unwrap_or_else(|| "unknown".into());
            Ok(Caller { identity: None, via: Via::Insecure, address })
        }
    }
}

impl<S, B, ResBody> tower::Service<http::Request<B>> for Auth<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let checked = caller_of(&req, &self.mode).and_then(|c| authorize(req.uri().path(), &c).map(|()| c));
        match checked {
            Ok(caller) => {
                req.extensions_mut().insert(caller);
                Box::pin(self.inner.call(req))
            }
            Err(status) => {
                if status.code() == tonic::Code::PermissionDenied {
                    warn!(method = req.uri().path(), refusal = status.message(), "call refused");
                } else {
                    info!(method = req.uri().path(), refusal = status.message(), "unauthenticated call refused");
                }
                Box::pin(async move { Ok(status.into_http()) })
            }
        }
    }
}
