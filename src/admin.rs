//! The admin HTTP listener (`[admin] listen`, by default `127.0.0.1:9187`): `GET /metrics`
//! (Prometheus text), `GET /health`, `GET /ready`, `GET /status` (see `metrics.rs` for what
//! they report), and `POST /dlq/drop` (forget dead letters while the service runs).
//!
//! Bounded for an untrusted network: at most [`ADMIN_CONNECTIONS`] connections at once (more
//! are closed as they arrive), headers within [`ADMIN_HEADER_TIMEOUT`], a connection at most
//! [`ADMIN_CONNECTION_LIFETIME`]; reads are `GET`/`HEAD`. What changes state is served only on
//! a loopback listener (there is no authentication yet: `[admin] token` is issue 15's).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Method, Request, Response, StatusCode};
use metrics_exporter_prometheus::PrometheusHandle;

use crate::buffer::{Batch, Store};
use crate::metrics::{AdminError, Health};
use crate::position::ChangeSeq;

/// Connections the admin listener serves at once; more are closed as they arrive.
const ADMIN_CONNECTIONS: usize = 32;
/// A client must send a request's headers within this time.
const ADMIN_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// No connection is held longer (a scraper that keeps one open reconnects).
const ADMIN_CONNECTION_LIFETIME: Duration = Duration::from_secs(60);

/// Serves the admin endpoints until `stop` resolves (see the module doc).
pub async fn serve(
    listen: SocketAddr,
    handle: PrometheusHandle,
    health: Arc<Health>,
    store: Arc<Store>,
    stop: impl std::future::Future<Output = ()>,
) -> Result<(), AdminError> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|source| AdminError::Listen { listen, source })?;
    tracing::info!(%listen, "admin endpoints: /metrics /health /ready /status");
    tokio::pin!(stop);
    let slots = Arc::new(tokio::sync::Semaphore::new(ADMIN_CONNECTIONS));
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "admin listener accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = &mut stop => return Ok(()),
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tracing::debug!("admin listener at its connection limit: a connection closed");
            continue;
        };
        let loopback = listen.ip().is_loopback();
        let (handle, health, store) = (handle.clone(), health.clone(), store.clone());
        tokio::spawn(async move {
            let service =
                hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
                    let (method, uri) = (request.method(), request.uri());
                    let response = match (method, uri.path()) {
                        (&Method::GET | &Method::HEAD, path) => {
                            respond(path, &handle, &health, &store)
                        }
                        (&Method::POST, "/dlq/drop") => {
                            drop_dead_letters(&store, uri.query().unwrap_or(""), loopback)
                        }
                        _ => method_not_allowed(),
                    };
                    async move { Ok::<_, std::convert::Infallible>(response) }
                });
            let io = hyper_util::rt::TokioIo::new(stream);
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(ADMIN_HEADER_TIMEOUT)
                .serve_connection(io, service);
            match tokio::time::timeout(ADMIN_CONNECTION_LIFETIME, connection).await {
                Ok(Err(e)) => tracing::debug!(error = %e, "admin connection ended"),
                Err(_) => tracing::debug!("admin connection closed at its lifetime"),
                Ok(Ok(())) => {}
            }
            drop(permit);
        });
    }
}

fn method_not_allowed() -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(
        "method not allowed: the admin endpoints are read with GET; POST is for /dlq/drop\n",
    )));
    *response.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
    response.headers_mut().insert(
        hyper::header::ALLOW,
        hyper::header::HeaderValue::from_static("GET, HEAD, POST"),
    );
    response
}

fn reply(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(value) = content_type.parse() {
        response
            .headers_mut()
            .insert(hyper::header::CONTENT_TYPE, value);
    }
    response
}

/// `POST /dlq/drop?seq=N&seq=M` or `?all`: forgets those dead letters (what `writebehind dlq
/// drop` asks a running service). Only on a loopback listener: nothing authenticates yet.
fn drop_dead_letters(store: &Store, query: &str, loopback: bool) -> Response<Full<Bytes>> {
    if !loopback {
        return reply(
            StatusCode::FORBIDDEN,
            "text/plain",
            "forbidden: dead letters are changed only through a loopback admin listener\n".into(),
        );
    }
    let mut seqs = Vec::new();
    let mut all = false;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("seq", n)) => match n.parse::<u64>() {
                Ok(n) => seqs.push(ChangeSeq(n)),
                Err(_) => {
                    return reply(
                        StatusCode::BAD_REQUEST,
                        "text/plain",
                        format!("bad request: seq `{n}` is not a number\n"),
                    )
                }
            },
            None if pair == "all" => all = true,
            _ => {
                return reply(
                    StatusCode::BAD_REQUEST,
                    "text/plain",
                    format!("bad request: `{pair}`; use seq=N (repeated) or all\n"),
                )
            }
        }
    }
    if !all && seqs.is_empty() {
        return reply(
            StatusCode::BAD_REQUEST,
            "text/plain",
            "bad request: name the letters with seq=N, or all\n".into(),
        );
    }
    let dropped = store.dead_letters().and_then(|letters| {
        let mut batch = Batch::default();
        let mut dropped = 0;
        for letter in letters.iter().filter(|l| all || seqs.contains(&l.seq)) {
            batch.delete_dead_letter(letter.seq);
            dropped += 1;
        }
        store.write(batch, true).map(|()| dropped)
    });
    match dropped {
        Ok(dropped) => reply(
            StatusCode::OK,
            "text/plain",
            format!("{dropped} dead letters dropped\n"),
        ),
        Err(e) => reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            format!("error: {e}\n"),
        ),
    }
}

fn respond(
    path: &str,
    handle: &PrometheusHandle,
    health: &Health,
    store: &Store,
) -> Response<Full<Bytes>> {
    match path {
        "/metrics" => {
            health.publish();
            reply(StatusCode::OK, "text/plain; version=0.0.4", handle.render())
        }
        "/health" => reply(StatusCode::OK, "text/plain", "ok\n".into()),
        "/ready" => match health.not_ready() {
            None => reply(StatusCode::OK, "text/plain", "ready\n".into()),
            Some(reason) => reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!("not ready: {reason}\n"),
            ),
        },
        "/status" => reply(
            StatusCode::OK,
            "application/json",
            health
                .status(&store.dead_letter_summary().unwrap_or_default())
                .to_string(),
        ),
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: try /metrics /health /ready /status\n".into(),
        ),
    }
}
