//! The HTTP endpoints (`/metrics`, `/api`, `/ui`, `/v1/completions`) served with the same TLS
//! and tokens as gRPC.
//!
//! Every route but `/` and `/ui` needs a token with role read (`Authorization: Bearer
//! TOKEN`; Prometheus sends one with `authorization: { credentials_file: ... }`). The `/ui`
//! page itself holds no data; its script sends the token it was given in the address's
//! fragment (`/ui#token=...`), which browsers never send to the server.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, Request};
use axum::middleware::Next;
use axum::response::IntoResponse;
use axum::serve::{IncomingStream, Listener};
use axum::Router;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use crate::layer::check;
use crate::{Access, ServerSecurity, Verifier};

/// What an HTTP route needs.
pub fn access_of(path: &str) -> Access {
    match path {
        "/" | "/ui" => Access::Open,
        _ => Access::Read,
    }
}

/// Serves `router` on `listener` until `shutdown` completes: TLS when `security` has a
/// certificate, tokens when it has a verifier.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    security: &ServerSecurity,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let router = guard(router, security.verifier.clone());
    let app = router.into_make_service_with_connect_info::<Peer>();
    match &security.tls {
        None => axum::serve(listener, app).with_graceful_shutdown(shutdown).await,
        Some(tls) => {
            let config = tls.rustls().map_err(std::io::Error::other)?;
            let mut config = Arc::unwrap_or_clone(config);
            // axum here speaks HTTP/1.1 only.
            config.alpn_protocols = vec![b"http/1.1".to_vec()];
            let listener = TlsListener::spawn(listener, TlsAcceptor::from(Arc::new(config)))?;
            axum::serve(listener, app).with_graceful_shutdown(shutdown).await
        }
    }
}

/// `router` with every request checked against [`access_of`]; unchanged without a verifier.
pub fn guard(router: Router, verifier: Option<Arc<Verifier>>) -> Router {
    let Some(verifier) = verifier else {
        return router;
    };
    router.layer(axum::middleware::from_fn(move |req: Request, next: Next| {
        let verifier = verifier.clone();
        async move {
            let path = req.uri().path().to_owned();
            match check(&verifier, access_of(&path), req.headers()) {
                Ok(_) => next.run(req).await,
                Err(denial) => {
                    let peer = req.extensions().get::<ConnectInfo<Peer>>().map(|c| c.0 .0);
                    denial.log(peer, &path);
                    let code = match denial.status.code() {
                        tonic::Code::PermissionDenied => http::StatusCode::FORBIDDEN,
                        _ => http::StatusCode::UNAUTHORIZED,
                    };
                    let mut resp = (code, format!("{}\n", denial.status.message())).into_response();
                    if code == http::StatusCode::UNAUTHORIZED {
                        resp.headers_mut()
                            .insert(http::header::WWW_AUTHENTICATE, "Bearer".parse().unwrap());
                    }
                    resp
                }
            }
        }
    }))
}

/// The caller's address, for denial logs.
#[derive(Clone, Copy, Debug)]
pub struct Peer(pub SocketAddr);

impl axum::extract::connect_info::Connected<IncomingStream<'_, TcpListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, TcpListener>) -> Self {
        Peer(*stream.remote_addr())
    }
}

impl axum::extract::connect_info::Connected<IncomingStream<'_, TlsListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, TlsListener>) -> Self {
        Peer(*stream.remote_addr())
    }
}

/// Accepts TCP connections and completes their TLS handshakes concurrently (one slow or
/// hostile client does not hold up the others); yields only finished handshakes.
pub struct TlsListener {
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
}

/// A handshake not done in this long is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

impl TlsListener {
    fn spawn(listener: TcpListener, acceptor: TlsAcceptor) -> std::io::Result<Self> {
        let local = listener.local_addr()?;
        let (tx, ready) = mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                let (tcp, addr) = match listener.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!("accept: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let (acceptor, done) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => {
                            let _ = done.send((tls, addr)).await;
                        }
                        Ok(Err(e)) => tracing::info!(caller = %addr, "TLS handshake failed: {e}"),
                        Err(_) => tracing::info!(caller = %addr, "TLS handshake timed out"),
                    }
                });
                if tx.is_closed() {
                    return;
                }
            }
        });
        Ok(TlsListener { ready, local })
    }
}

impl Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(conn) => conn,
            // The accept task only ends when this listener is dropped.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.local)
    }
}
