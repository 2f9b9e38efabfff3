//! The admin HTTP listener (`[admin] listen`, by default `127.0.0.1:9187`).
//!
//! Reads, `GET`/`HEAD`: `/metrics` (Prometheus text), `/health`, `/ready`, `/status` (see
//! `metrics.rs` for what they report), and `/dlq?from=N&limit=M` (dead letters with their row
//! ids and reasons: row data). Changes, `POST`: `/dlq/drop?seq=N&seq=M` or `?all` (forget dead
//! letters) and `/dlq/retry?seq=N` or `?all` (requeue them through capture, in the change
//! order: `capture/requeue.rs`).
//!
//! **Who may change state or see rows.** With `[admin] token` set, a request to `/dlq...` must
//! carry `Authorization: Bearer <token>` (compared in constant time), on any listener; 401
//! otherwise. Without a token, `/dlq...` is served on a loopback listener only (anyone who can
//! reach loopback can read the buffer's files anyway) and refused with 403 elsewhere. The other
//! reads show no row data and are open, as a scraper and a probe need.
//!
//! Bounded for an untrusted network: at most [`ADMIN_CONNECTIONS`] connections at once (more
//! are closed as they arrive), headers within [`ADMIN_HEADER_TIMEOUT`], a connection at most
//! [`ADMIN_CONNECTION_LIFETIME`], no request body read, at most [`DLQ_PAGE_LIMIT`] letters a
//! page.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Method, Request, Response, StatusCode};
use metrics_exporter_prometheus::PrometheusHandle;
use subtle::ConstantTimeEq;
use tokio::sync::{mpsc, oneshot};

use crate::buffer::{Batch, Store};
use crate::capture::requeue::{Letters, RequeueRequest};
use crate::metrics::{AdminError, Health};
use crate::position::ChangeSeq;

/// Connections the admin listener serves at once; more are closed as they arrive.
const ADMIN_CONNECTIONS: usize = 32;
/// A client must send a request's headers within this time.
const ADMIN_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// No connection is held longer (a scraper that keeps one open reconnects).
const ADMIN_CONNECTION_LIFETIME: Duration = Duration::from_secs(60);
/// How long a retry waits for capture's answer (capture answers between two events).
const REQUEUE_TIMEOUT: Duration = Duration::from_secs(30);
/// Dead letters `GET /dlq` shows at most.
pub const DLQ_PAGE_LIMIT: usize = 1000;

type Reply = Response<Full<Bytes>>;

/// What the admin listener serves from.
pub struct Admin {
    handle: PrometheusHandle,
    /// `[admin] token`: required for `/dlq...` when set.
    token: Option<String>,
    pipelines: Pipelines,
}

/// One pipeline's state, as the admin listener reaches it.
#[derive(Clone)]
pub struct PipelineAdmin {
    pub health: Arc<Health>,
    pub store: Arc<Store>,
    /// Where retries go (capture); `None`: retries are refused.
    pub requeue: Option<mpsc::Sender<RequeueRequest>>,
}

/// The pipelines served: the one of a single primary, or a cluster's, one per shard (a
/// `/dlq...` request then names its shard with `shard=<id>`, and `/status` lists the shards).
enum Pipelines {
    One(PipelineAdmin),
    Cluster(crate::cluster::ShardViews),
}

impl std::fmt::Debug for Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admin")
            .field("token", &self.token.as_ref().map(|_| "***"))
            .finish_non_exhaustive()
    }
}

/// Serves the admin endpoints until `stop` resolves (see the module doc).
pub async fn serve(
    listen: SocketAddr,
    admin: Admin,
    stop: impl std::future::Future<Output = ()>,
) -> Result<(), AdminError> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|source| AdminError::Listen { listen, source })?;
    tracing::info!(%listen, token = admin.token.is_some(), "admin endpoints: /metrics /health /ready /status /dlq");
    if admin.token.is_none() && !listen.ip().is_loopback() {
        tracing::warn!(%listen, "the admin listener is not on loopback and [admin] token is not set: /dlq (dead letters, their retry and drop) is refused; set a token to use it");
    }
    let admin = Arc::new(admin);
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
        let admin = admin.clone();
        tokio::spawn(async move {
            let service =
                hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
                    let admin = admin.clone();
                    async move {
                        Ok::<_, std::convert::Infallible>(admin.route(&request, loopback).await)
                    }
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

impl Admin {
    /// Serves one primary's pipeline.
    pub fn new(handle: PrometheusHandle, token: Option<String>, pipeline: PipelineAdmin) -> Admin {
        Admin {
            handle,
            token,
            pipelines: Pipelines::One(pipeline),
        }
    }

    /// Serves every shard of a cluster (the list grows as shards are found).
    pub fn for_cluster(
        handle: PrometheusHandle,
        shards: crate::cluster::ShardViews,
        token: Option<String>,
    ) -> Admin {
        Admin {
            handle,
            token,
            pipelines: Pipelines::Cluster(shards),
        }
    }

    /// Every pipeline with its shard id (`None` for a single primary).
    fn pipelines(&self) -> Vec<(Option<String>, PipelineAdmin)> {
        match &self.pipelines {
            Pipelines::One(one) => vec![(None, one.clone())],
            Pipelines::Cluster(shards) => shards
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .map(|v| (Some(v.id.clone()), v.admin()))
                .collect(),
        }
    }

    /// The pipeline a `/dlq...` request is for, and its query without `shard=`.
    fn pipeline_of(&self, query: &str) -> Result<(PipelineAdmin, String), String> {
        let (shard, rest): (Vec<&str>, Vec<&str>) = query
            .split('&')
            .filter(|p| !p.is_empty())
            .partition(|p| p.starts_with("shard="));
        let rest = rest.join("&");
        match (&self.pipelines, shard.as_slice()) {
            (Pipelines::One(one), []) => Ok((one.clone(), rest)),
            (Pipelines::One(_), _) => {
                Err("`shard=` is for a cluster; this service follows one primary".into())
            }
            (Pipelines::Cluster(_), [pair]) => {
                let id = &pair["shard=".len()..];
                self.pipelines()
                    .into_iter()
                    .find(|(shard, _)| shard.as_deref() == Some(id))
                    .map(|(_, pipeline)| (pipeline, rest))
                    .ok_or_else(|| format!("no shard `{id}`; /status lists them"))
            }
            (Pipelines::Cluster(_), _) => {
                Err("name one shard with shard=<id> (/status lists them)".into())
            }
        }
    }

    async fn route<B>(&self, request: &Request<B>, loopback: bool) -> Reply {
        let (method, uri) = (request.method(), request.uri());
        let query = uri.query().unwrap_or("");
        let guarded = uri.path() == "/dlq" || uri.path().starts_with("/dlq/");
        if guarded {
            if let Some(refusal) = self.refusal(request, loopback) {
                return refusal;
            }
        }
        let path = uri.path();
        if !guarded || (path != "/dlq" && matches!(method, &Method::GET | &Method::HEAD)) {
            return match method {
                &Method::GET | &Method::HEAD => self.respond(path),
                _ => method_not_allowed(),
            };
        }
        let (pipeline, query) = match self.pipeline_of(query) {
            Ok(found) => found,
            Err(problem) => return bad_request(&problem),
        };
        let query = query.as_str();
        match (method, path) {
            (&Method::GET | &Method::HEAD, _) => list_dead_letters(&pipeline.store, query),
            (&Method::POST, "/dlq/drop") => match parse_letters(query) {
                Ok(letters) => drop_dead_letters(&pipeline.store, &letters),
                Err(problem) => bad_request(&problem),
            },
            (&Method::POST, "/dlq/retry") => match parse_letters(query) {
                Ok(letters) => requeue_dead_letters(&pipeline, letters).await,
                Err(problem) => bad_request(&problem),
            },
            _ => method_not_allowed(),
        }
    }

    /// Why a request may not reach `/dlq...`, if it may not (see the module doc).
    fn refusal<B>(&self, request: &Request<B>, loopback: bool) -> Option<Reply> {
        let Some(token) = &self.token else {
            return match loopback {
                true => None,
                false => Some(reply(
                    StatusCode::FORBIDDEN,
                    "text/plain",
                    "forbidden: /dlq is served off loopback only with [admin] token set\n".into(),
                )),
            };
        };
        let presented = request
            .headers()
            .get(hyper::header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "));
        match presented {
            Some(presented) if bool::from(presented.as_bytes().ct_eq(token.as_bytes())) => None,
            _ => {
                let mut refusal = reply(
                    StatusCode::UNAUTHORIZED,
                    "text/plain",
                    "unauthorized: /dlq needs the header `Authorization: Bearer <[admin] token>`\n"
                        .into(),
                );
                refusal.headers_mut().insert(
                    hyper::header::WWW_AUTHENTICATE,
                    hyper::header::HeaderValue::from_static("Bearer"),
                );
                Some(refusal)
            }
        }
    }
}

/// `GET /dlq?from=N&limit=M`: a page of dead letters, a line each (what `dlq list` prints).
fn list_dead_letters(store: &Store, query: &str) -> Reply {
    let (mut from, mut limit) = (0u64, DLQ_PAGE_LIMIT);
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let parsed = match pair.split_once('=') {
            Some(("from", n)) => n.parse().map(|n| from = n).is_ok(),
            Some(("limit", n)) => n
                .parse()
                .map(|n: usize| limit = n.min(DLQ_PAGE_LIMIT))
                .is_ok(),
            _ => false,
        };
        if !parsed {
            return bad_request(&format!("`{pair}`; use from=N and limit=M"));
        }
    }
    match store.dead_letters_from(ChangeSeq(from), limit) {
        Ok(letters) => {
            let mut body = String::new();
            for letter in &letters {
                body.push_str(&letter.line());
                body.push('\n');
            }
            reply(StatusCode::OK, "text/plain", body)
        }
        Err(e) => internal_error(&e.to_string()),
    }
}

/// `POST /dlq/drop`: forgets those dead letters (what `dlq drop` asks a running service),
/// a page at a time.
fn drop_dead_letters(store: &Store, letters: &Letters) -> Reply {
    match drop_letters(store, letters) {
        Ok(dropped) => reply(
            StatusCode::OK,
            "text/plain",
            format!("{dropped} dead letters dropped\n"),
        ),
        Err(e) => internal_error(&e.to_string()),
    }
}

/// `POST /dlq/retry`: asks capture to requeue those dead letters (see
/// `capture/requeue.rs`) and answers with what it did.
async fn requeue_dead_letters(pipeline: &PipelineAdmin, letters: Letters) -> Reply {
    let Some(requeue) = &pipeline.requeue else {
        return reply(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "unavailable: this service does not requeue dead letters\n".into(),
        );
    };
    let (answer, answered) = oneshot::channel();
    let request = RequeueRequest {
        letters,
        reply: answer,
    };
    // Queued and answered within the timeout (the queue holds a few requests).
    let asked = async {
        requeue.send(request).await.map_err(|_| ())?;
        answered.await.map_err(|_| ())
    };
    match tokio::time::timeout(REQUEUE_TIMEOUT, asked).await {
        Ok(Ok(Ok(requeued))) => reply(StatusCode::OK, "text/plain", requeued.report()),
        Ok(Ok(Err(reason))) => unavailable(&reason),
        Ok(Err(())) => unavailable("capture has stopped"),
        Err(_) => unavailable(&format!(
            "capture did not answer within {} s; see the service's log",
            REQUEUE_TIMEOUT.as_secs()
        )),
    }
}

impl Admin {
    fn respond(&self, path: &str) -> Reply {
        let pipelines = self.pipelines();
        match path {
            "/metrics" => {
                for (_, pipeline) in &pipelines {
                    pipeline.health.publish();
                }
                reply(
                    StatusCode::OK,
                    "text/plain; version=0.0.4",
                    self.handle.render(),
                )
            }
            "/health" => reply(StatusCode::OK, "text/plain", "ok\n".into()),
            "/ready" => match not_ready(&pipelines) {
                None => reply(StatusCode::OK, "text/plain", "ready\n".into()),
                Some(reason) => reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    format!("not ready: {reason}\n"),
                ),
            },
            "/status" => reply(StatusCode::OK, "application/json", self.status(&pipelines)),
            _ => reply(
                StatusCode::NOT_FOUND,
                "text/plain",
                "not found: try /metrics /health /ready /status /dlq\n".into(),
            ),
        }
    }

    /// `/status`: one pipeline's status, or `{"shards": [...]}` with each shard's status and id.
    fn status(&self, pipelines: &[(Option<String>, PipelineAdmin)]) -> String {
        let one = |pipeline: &PipelineAdmin| {
            pipeline
                .health
                .status(&pipeline.store.dead_letter_summary().unwrap_or_default())
        };
        match &self.pipelines {
            Pipelines::One(pipeline) => one(pipeline).to_string(),
            Pipelines::Cluster(_) => {
                let shards: Vec<serde_json::Value> = pipelines
                    .iter()
                    .map(|(id, pipeline)| {
                        let mut status = one(pipeline);
                        if let Some(fields) = status.as_object_mut() {
                            fields.insert("shard".into(), serde_json::json!(id));
                        }
                        status
                    })
                    .collect();
                serde_json::json!({ "shards": shards }).to_string()
            }
        }
    }
}

/// Why the service is not ready: the first pipeline's reason (with its shard), or no pipeline.
fn not_ready(pipelines: &[(Option<String>, PipelineAdmin)]) -> Option<String> {
    if pipelines.is_empty() {
        return Some("no shard of the cluster found yet".into());
    }
    pipelines.iter().find_map(|(shard, pipeline)| {
        let reason = pipeline.health.not_ready()?;
        Some(match shard {
            Some(shard) => format!("shard {shard}: {reason}"),
            None => reason,
        })
    })
}

/// Deletes the letters named (those that exist), or all of them a page at a time; returns how
/// many were deleted.
pub fn drop_letters(store: &Store, letters: &Letters) -> Result<usize, crate::buffer::StoreError> {
    let mut dropped = 0;
    match letters {
        Letters::Seqs(seqs) => {
            let mut batch = Batch::default();
            for &seq in seqs {
                if store.dead_letter(seq)?.is_some() {
                    batch.delete_dead_letter(seq);
                    dropped += 1;
                }
            }
            store.write(batch, true)?;
        }
        Letters::All => loop {
            let page = store.dead_letters_from(ChangeSeq(0), DLQ_PAGE_LIMIT)?;
            if page.is_empty() {
                break;
            }
            let mut batch = Batch::default();
            for letter in &page {
                batch.delete_dead_letter(letter.seq);
            }
            store.write(batch, true)?;
            dropped += page.len();
        },
    }
    Ok(dropped)
}

/// `seq=N` (repeated) or `all`.
fn parse_letters(query: &str) -> Result<Letters, String> {
    let mut seqs = Vec::new();
    let mut all = false;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("seq", n)) => match n.parse::<u64>() {
                Ok(n) => seqs.push(ChangeSeq(n)),
                Err(_) => return Err(format!("seq `{n}` is not a number")),
            },
            None if pair == "all" => all = true,
            _ => return Err(format!("`{pair}`; use seq=N (repeated) or all")),
        }
    }
    match (all, seqs.is_empty()) {
        (true, _) => Ok(Letters::All),
        (false, false) => Ok(Letters::Seqs(seqs)),
        (false, true) => Err("name the letters with seq=N, or all".into()),
    }
}

fn bad_request(what: &str) -> Reply {
    reply(
        StatusCode::BAD_REQUEST,
        "text/plain",
        format!("bad request: {what}\n"),
    )
}

fn internal_error(what: &str) -> Reply {
    reply(
        StatusCode::INTERNAL_SERVER_ERROR,
        "text/plain",
        format!("error: {what}\n"),
    )
}

fn unavailable(what: &str) -> Reply {
    reply(
        StatusCode::SERVICE_UNAVAILABLE,
        "text/plain",
        format!("unavailable: {what}\n"),
    )
}

fn method_not_allowed() -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(
        "method not allowed: the admin endpoints are read with GET; POST is for /dlq/drop and /dlq/retry\n",
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
