//! The tower layer in front of a gRPC server: reads `authorization: Bearer TOKEN`, verifies
//! it, checks the method's [`Access`] against the token's role, and answers
//! `Unauthenticated` (no token, a bad one) or `PermissionDenied` (wrong role) itself, naming
//! what is missing. Every denial is logged with the caller's address and, where known, the
//! token's subject; the token itself never is.
//!
//! A call that passes carries the verified [`Claims`] in its request extensions
//! (`request.extensions().get::<Claims>()`), for handlers that record who did what.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tonic::transport::server::TcpConnectInfo;
use tonic::transport::server::TlsConnectInfo;
use tonic::Status;

use crate::{Access, Claims, Verifier};

/// Enforces the policy; with no verifier (`--insecure`) every call passes.
#[derive(Clone)]
pub struct AuthLayer {
    verifier: Option<Arc<Verifier>>,
}

impl AuthLayer {
    pub fn new(verifier: Option<Arc<Verifier>>) -> Self {
        AuthLayer { verifier }
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = Auth<S>;
    fn layer(&self, inner: S) -> Auth<S> {
        Auth { inner, verifier: self.verifier.clone() }
    }
}

#[derive(Clone)]
pub struct Auth<S> {
    inner: S,
    verifier: Option<Arc<Verifier>>,
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S, B, RB> tower::Service<http::Request<B>> for Auth<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
    RB: Default + Send + 'static,
{
    type Response = http::Response<RB>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let Some(verifier) = &self.verifier else {
            return Box::pin(self.inner.call(req));
        };
        let path = req.uri().path().to_owned();
        let access = Access::of_grpc(&path);
        match check(verifier, access, req.headers()) {
            Ok(None) => Box::pin(self.inner.call(req)),
            Ok(Some(claims)) => {
                req.extensions_mut().insert(claims);
                Box::pin(self.inner.call(req))
            }
            Err(denial) => {
                denial.log(peer(req.extensions()), &path);
                let response = denial.status.into_http::<RB>();
                Box::pin(async move { Ok(response) })
            }
        }
    }
}

/// A refused call: the status for the caller and who it was, for the log.
pub struct Denial {
    pub status: Status,
    pub subject: Option<String>,
}

impl Denial {
    pub fn log(&self, caller: Option<SocketAddr>, what: &str) {
        let caller = caller.map_or_else(|| "unknown".to_owned(), |a| a.to_string());
        let subject = self.subject.as_deref().unwrap_or("-");
        tracing::warn!(%caller, subject, call = what, "denied: {}", self.status.message());
    }
}

/// The caller's claims if `access` is granted (`None` for open calls), or why not.
pub fn check(
    verifier: &Verifier,
    access: Access,
    headers: &http::HeaderMap,
) -> Result<Option<Claims>, Denial> {
    if access == Access::Open {
        return Ok(None);
    }
    let unauthenticated =
        |why: String| Denial { status: Status::unauthenticated(why), subject: None };
    let Some(value) = headers.get(http::header::AUTHORIZATION) else {
        return Err(unauthenticated(format!(
            "no token: this call needs a token with role {} (`authorization: Bearer TOKEN`; \
             --token or FERRITE_TOKEN on the command line)",
            access.roles()
        )));
    };
    let token =
        value.to_str().ok().and_then(|v| v.strip_prefix("Bearer ")).ok_or_else(|| {
            unauthenticated("the authorization header is not `Bearer TOKEN`".into())
        })?;
    let claims = verifier.verify(token.trim()).map_err(|e| unauthenticated(e.to_string()))?;
    if !access.granted_to(claims.role) {
        return Err(Denial {
            status: Status::permission_denied(format!(
                "token of `{}` has role {}; this call needs role {}",
                claims.sub,
                claims.role,
                access.roles()
            )),
            subject: Some(claims.sub),
        });
    }
    Ok(Some(claims))
}

/// The remote address tonic records for the connection, plain or TLS.
fn peer(ext: &http::Extensions) -> Option<SocketAddr> {
    ext.get::<TcpConnectInfo>().and_then(|i| i.remote_addr()).or_else(|| {
        ext.get::<TlsConnectInfo<TcpConnectInfo>>().and_then(|i| i.get_ref().remote_addr())
    })
}
