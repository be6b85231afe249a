//! The HTTP endpoint of Lifeboat's processes (the operator and the node agent): `/metrics`
//! (Prometheus text), `/healthz` (the process answers) and `/readyz` (its caches are in sync,
//! or it waits as a standby replica). A few lines of hyper, which kube already brings, rather
//! than a web framework.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// What `/metrics` serves: a registry rendered as Prometheus text.
pub trait MetricsText: Send + Sync + 'static {
    /// The metrics as Prometheus text.
    ///
    /// # Errors
    ///
    /// Formatting failed.
    fn encode(&self) -> Result<String, std::fmt::Error>;
}

fn respond(
    status: StatusCode,
    content_type: &str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    if let Ok(value) = content_type.parse() {
        response
            .headers_mut()
            .insert(http::header::CONTENT_TYPE, value);
    }
    response
}

fn route(
    request: &Request<Incoming>,
    metrics: &dyn MetricsText,
    ready: &AtomicBool,
) -> Response<Full<Bytes>> {
    const TEXT: &str = "text/plain; charset=utf-8";
    if request.method() != Method::GET {
        return respond(StatusCode::METHOD_NOT_ALLOWED, TEXT, "GET only\n");
    }
    match request.uri().path() {
        "/metrics" => match metrics.encode() {
            Ok(text) => respond(
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                text,
            ),
            Err(_) => respond(StatusCode::INTERNAL_SERVER_ERROR, TEXT, "encode metrics\n"),
        },
        "/healthz" => respond(StatusCode::OK, TEXT, "ok\n"),
        "/readyz" if ready.load(Ordering::Relaxed) => respond(StatusCode::OK, TEXT, "ready\n"),
        "/readyz" => respond(
            StatusCode::SERVICE_UNAVAILABLE,
            TEXT,
            "caches not synced yet\n",
        ),
        _ => respond(StatusCode::NOT_FOUND, TEXT, "not found\n"),
    }
}

/// Serve the endpoint on `listener` until the task is dropped.
pub async fn serve<M: MetricsText>(listener: TcpListener, metrics: Arc<M>, ready: Arc<AtomicBool>) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(connection) => connection,
            Err(error) => {
                tracing::warn!(%error, "accept a metrics connection");
                continue;
            }
        };
        let (metrics, ready) = (Arc::clone(&metrics), Arc::clone(&ready));
        tokio::spawn(async move {
            let service = service_fn(move |request: Request<Incoming>| {
                let response = route(&request, metrics.as_ref(), &ready);
                async move { Ok::<_, Infallible>(response) }
            });
            if let Err(error) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(%error, "metrics connection");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A registry of one line.
    struct OneLine;

    impl MetricsText for OneLine {
        fn encode(&self) -> Result<String, std::fmt::Error> {
            Ok("lifeboat_leader 1\n# EOF\n".into())
        }
    }

    async fn get(addr: std::net::SocketAddr, path: &str) -> String {
        let mut stream = tokio::net::TcpStream::connect(addr)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let request = format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
        stream
            .write_all(request.as_bytes())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let mut answer = String::new();
        stream
            .read_to_string(&mut answer)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        answer
    }

    #[tokio::test]
    async fn metrics_health_and_readiness() {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
        let metrics = Arc::new(OneLine);
        let ready = Arc::new(AtomicBool::new(false));
        let server = tokio::spawn(serve(listener, metrics, Arc::clone(&ready)));
        assert!(get(addr, "/healthz").await.starts_with("HTTP/1.1 200"));
        assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 503"));
        ready.store(true, Ordering::Relaxed);
        assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 200"));
        assert!(get(addr, "/metrics").await.contains("lifeboat_leader 1"));
        assert!(get(addr, "/nope").await.starts_with("HTTP/1.1 404"));
        server.abort();
    }
}
