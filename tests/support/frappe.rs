#![allow(clippy::unwrap_used, clippy::expect_used)]
//! A Frappe-compatible upstream on 127.0.0.1:0, modelled on real Frappe 15 responses: it checks
//! the site header and the `token key:secret` it receives, answers in Frappe's v1/v2 envelopes
//! and status codes (tracebacks and Guest cookies included), records every request it gets, and
//! can be told to fail, stall or drop connections.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;

/// What the upstream does with the next requests.
#[derive(Debug, Clone, PartialEq)]
pub enum Behaviour {
    /// Answer like Frappe.
    Normal,
    /// Answer every request with this status and a Frappe-style error.
    Fail(u16),
    /// Read the request, then close the connection without answering.
    Drop,
    /// Never answer (until the connection is closed).
    Stall,
    /// Answer the next `n` requests with `status`, then answer like Frappe again.
    FailNext(u32, u16),
    /// Answer 429 `TooManyRequestsError` with `Retry-After: secs`, as Frappe's rate limiter.
    Throttle(u64),
    /// Send the status line, headers and half the body, then break the connection.
    BreakBody,
    /// Send the status line, headers and half the body, then nothing more (the connection
    /// stays open).
    StallBody,
    /// Answer this status at once and read the request body only afterwards, keeping the
    /// connection: a refusal sent before an upload is done.
    AnswerBeforeBody(u16),
}

/// One request as the upstream received it.
#[derive(Debug, Clone)]
pub struct Received {
    pub method: Method,
    /// The protocol it came over.
    pub version: http::Version,
    /// Path and query as they arrived on the wire.
    pub path_and_query: String,
    /// The request target's authority: HTTP/2's `:authority`, none for an HTTP/1.1 origin-form
    /// target.
    pub authority: Option<String>,
    pub headers: HeaderMap,
    pub body_len: usize,
    pub body_sha256: String,
    /// The body, when it is under 64 KiB.
    pub body: Option<Bytes>,
}

struct State {
    site_name: String,
    /// api_key -> (api_secret, user)
    tokens: BTreeMap<String, (String, String)>,
    behaviour: Mutex<Behaviour>,
    received: Mutex<Vec<Received>>,
    todos: Mutex<BTreeMap<String, Value>>,
    next_name: AtomicU64,
    /// Request body bytes received so far, over all requests (counted as they stream in).
    body_progress: AtomicU64,
    /// gunicorn's sync workers: each request holds one from its first byte to its answer.
    workers: Mutex<Option<Arc<tokio::sync::Semaphore>>>,
    /// OAuth Bearer Tokens by access token, as `OAuth Bearer Token` documents.
    oauth_tokens: Mutex<BTreeMap<String, OAuthToken>>,
    /// Calls to `introspect_token`.
    introspections: AtomicU64,
    /// TCP connections accepted.
    connections: AtomicU64,
    /// Close a keep-alive connection idle this long (gunicorn's `keepalive`), silently.
    idle_close: Mutex<Option<Duration>>,
}

/// An `OAuth Bearer Token` document.
#[derive(Debug, Clone)]
pub struct OAuthToken {
    pub client_id: String,
    pub user: String,
    /// `status == "Active"`.
    pub active: bool,
    /// `expiration_time`, Unix seconds.
    pub exp: i64,
    pub scopes: String,
}

/// An answer whose headers promise 1000 bytes, of which 500 are sent; then, after `pause`,
/// the body fails with `error` (the connection breaks).
fn half_body_then(
    pause: Duration,
    error: &'static str,
) -> Response<BoxBody<Bytes, std::io::Error>> {
    use futures_util::StreamExt as _;
    let first: Result<http_body::Frame<Bytes>, std::io::Error> =
        Ok(http_body::Frame::data(Bytes::from(vec![b' '; 500])));
    let chunks =
        futures_util::stream::iter([first]).chain(futures_util::stream::once(async move {
            tokio::time::sleep(pause).await;
            Err(std::io::Error::other(error))
        }));
    let mut r = Response::new(BodyExt::boxed(StreamBody::new(chunks)));
    r.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    r.headers_mut().insert("content-length", 1000.into());
    r
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// A running test upstream.
#[derive(Clone)]
pub struct FrappeUpstream {
    pub addr: SocketAddr,
    state: Arc<State>,
}

const GUEST_COOKIES: [&str; 5] = [
    "sid=Guest; Expires=Wed, 02 Dec 2026 12:44:15 GMT; Max-Age=612000; HttpOnly; Path=/; SameSite=Lax",
    "system_user=no; Path=/; SameSite=Lax",
    "full_name=Guest; Path=/; SameSite=Lax",
    "user_id=Guest; Path=/; SameSite=Lax",
    "user_image=; Path=/; SameSite=Lax",
];

impl FrappeUpstream {
    /// Starts an upstream for `site_name` accepting `(api_key, api_secret, user)` tokens.
    pub async fn start(site_name: &str, tokens: &[(&str, &str, &str)]) -> Self {
        Self::start_with(site_name, tokens, None, "127.0.0.1:0", false).await
    }

    /// Starts an upstream speaking HTTP/2 only, in cleartext with prior knowledge (h2c), as an
    /// nginx with `listen ... http2` and no TLS does.
    pub async fn start_h2c(site_name: &str, tokens: &[(&str, &str, &str)]) -> Self {
        Self::start_with(site_name, tokens, None, "127.0.0.1:0", true).await
    }

    /// Starts an upstream on `addr`: a port the gateway was refused on, now coming back.
    pub async fn start_on(
        addr: SocketAddr,
        site_name: &str,
        tokens: &[(&str, &str, &str)],
    ) -> Self {
        Self::start_with(site_name, tokens, None, &addr.to_string(), false).await
    }

    /// Starts an upstream serving HTTPS with `tls`: HTTP/2 on connections where ALPN picked
    /// `h2` (which `tls.alpn_protocols` must offer), HTTP/1.1 on the others.
    pub async fn start_tls(
        site_name: &str,
        tokens: &[(&str, &str, &str)],
        tls: Arc<rustls::ServerConfig>,
    ) -> Self {
        Self::start_with(
            site_name,
            tokens,
            Some(tokio_rustls::TlsAcceptor::from(tls)),
            "127.0.0.1:0",
            false,
        )
        .await
    }

    async fn start_with(
        site_name: &str,
        tokens: &[(&str, &str, &str)],
        tls: Option<tokio_rustls::TlsAcceptor>,
        bind: &str,
        h2c: bool,
    ) -> Self {
        let listener = TcpListener::bind(bind).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State {
            site_name: site_name.to_owned(),
            tokens: tokens
                .iter()
                .map(|(k, s, u)| (k.to_string(), (s.to_string(), u.to_string())))
                .collect(),
            behaviour: Mutex::new(Behaviour::Normal),
            received: Mutex::new(Vec::new()),
            todos: Mutex::new(BTreeMap::new()),
            next_name: AtomicU64::new(1),
            body_progress: AtomicU64::new(0),
            workers: Mutex::new(None),
            oauth_tokens: Mutex::new(BTreeMap::new()),
            introspections: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            idle_close: Mutex::new(None),
        });
        let upstream = Self { addr, state };
        let server = upstream.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                server.state.connections.fetch_add(1, Ordering::SeqCst);
                let idle_close = *server.state.idle_close.lock().unwrap();
                let server = server.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let server = server.clone();
                        async move { server.handle(req).await }
                    });
                    let mut http = hyper::server::conn::http1::Builder::new();
                    if let Some(idle) = idle_close {
                        // hyper closes a connection whose next request head has not arrived
                        // in time, without a word: what gunicorn does after `keepalive`.
                        http.timer(hyper_util::rt::TokioTimer::new())
                            .header_read_timeout(idle);
                    }
                    match tls {
                        None if h2c => serve_h2(TokioIo::new(stream), service, idle_close).await,
                        None => {
                            let _ = http.serve_connection(TokioIo::new(stream), service).await;
                        }
                        Some(tls) => {
                            let Ok(stream) = tls.accept(stream).await else {
                                return;
                            };
                            if stream.get_ref().1.alpn_protocol() == Some(b"h2".as_slice()) {
                                serve_h2(TokioIo::new(stream), service, idle_close).await;
                            } else {
                                let _ = http.serve_connection(TokioIo::new(stream), service).await;
                            }
                        }
                    }
                });
            }
        });
        upstream
    }

    /// Base URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Changes what the upstream does.
    pub fn set_behaviour(&self, behaviour: Behaviour) {
        *self.state.behaviour.lock().unwrap() = behaviour;
    }

    /// Every request received so far.
    pub fn received(&self) -> Vec<Received> {
        self.state.received.lock().unwrap().clone()
    }

    /// How many TCP connections were accepted.
    pub fn connections(&self) -> u64 {
        self.state.connections.load(Ordering::SeqCst)
    }

    /// Closes keep-alive connections (accepted from now on) once idle for `idle`, silently,
    /// as gunicorn does after its `keepalive` seconds. An HTTP/2 connection is closed with a
    /// GOAWAY that long after it opened, as nginx closes an idle one after `keepalive_timeout`.
    pub fn set_idle_close(&self, idle: Duration) {
        *self.state.idle_close.lock().unwrap() = Some(idle);
    }

    /// How many requests were received.
    pub fn count(&self) -> usize {
        self.state.received.lock().unwrap().len()
    }

    /// Serves at most `n` requests at once, as gunicorn's `n` sync workers do: a request holds a
    /// worker from the moment it arrives (body reading included) until it is answered.
    pub fn set_sync_workers(&self, n: usize) {
        *self.state.workers.lock().unwrap() = Some(Arc::new(tokio::sync::Semaphore::new(n)));
    }

    /// Request body bytes received so far, counted while they stream in.
    pub fn body_progress(&self) -> u64 {
        self.state.body_progress.load(Ordering::SeqCst)
    }

    /// Issues an OAuth access token of `client_id` for `user`, expiring in `expires_in` seconds
    /// (negative: already expired), with `scopes` (space-separated), as Frappe's token
    /// endpoint would.
    pub fn issue_oauth_token(
        &self,
        token: &str,
        client_id: &str,
        user: &str,
        expires_in: i64,
        scopes: &str,
    ) {
        self.state.oauth_tokens.lock().unwrap().insert(
            token.to_owned(),
            OAuthToken {
                client_id: client_id.to_owned(),
                user: user.to_owned(),
                active: true,
                exp: unix_now() + expires_in,
                scopes: scopes.to_owned(),
            },
        );
    }

    /// Revokes a token (`revoke_token` sets the status to Revoked).
    pub fn revoke_oauth_token(&self, token: &str) {
        if let Some(t) = self.state.oauth_tokens.lock().unwrap().get_mut(token) {
            t.active = false;
        }
    }

    /// Calls made to `introspect_token`.
    pub fn introspections(&self) -> u64 {
        self.state.introspections.load(Ordering::SeqCst)
    }

    /// The `OAuth Bearer Token` named `token`, found as MariaDB's `utf8mb4_unicode_ci`
    /// collation finds a name (any case, trailing spaces ignored): what `validate_oauth` and
    /// `introspect_token` get from `frappe.get_doc` / `frappe.db.get_value`.
    fn oauth_token(&self, token: &str) -> Option<OAuthToken> {
        let wanted = token.trim_end_matches(' ').to_lowercase();
        let tokens = self.state.oauth_tokens.lock().unwrap();
        tokens
            .iter()
            .find(|(name, _)| name.trim_end_matches(' ').to_lowercase() == wanted)
            .map(|(_, t)| t.clone())
    }

    /// Changes a ToDo behind the gateway's back, as an edit in the ERPNext desk would.
    pub fn edit_todo(&self, name: &str, field: &str, value: &str) {
        let mut todos = self.state.todos.lock().unwrap();
        let doc = todos.get_mut(name).expect("no such ToDo");
        doc[field] = Value::String(value.to_owned());
    }

    /// Forgets what was received.
    pub fn clear(&self) {
        self.state.received.lock().unwrap().clear();
    }

    async fn handle(
        &self,
        request: Request<Incoming>,
    ) -> Result<Response<BoxBody<Bytes, std::io::Error>>, std::io::Error> {
        let workers = self.state.workers.lock().unwrap().clone();
        let Some(workers) = workers else {
            return self.serve(request).await;
        };
        // The worker is held until the whole answer has been written out, 64 KiB at a time,
        // as a sync worker writes it.
        let worker = workers.acquire_owned().await.unwrap();
        let (parts, body) = self.serve(request).await?.into_parts();
        let bytes = body.collect().await?.to_bytes();
        let chunks =
            futures_util::stream::unfold((bytes, worker), |(mut rest, worker)| async move {
                if rest.is_empty() {
                    return None;
                }
                let chunk = rest.split_to(rest.len().min(64 << 10));
                Some((Ok(http_body::Frame::data(chunk)), (rest, worker)))
            });
        Ok(Response::from_parts(
            parts,
            BodyExt::boxed(StreamBody::new(chunks)),
        ))
    }

    async fn serve(
        &self,
        request: Request<Incoming>,
    ) -> Result<Response<BoxBody<Bytes, std::io::Error>>, std::io::Error> {
        let (parts, mut body) = request.into_parts();
        let early = match *self.state.behaviour.lock().unwrap() {
            Behaviour::AnswerBeforeBody(code) => Some(code),
            _ => None,
        };
        if let Some(code) = early {
            tokio::spawn(async move { while let Some(Ok(_)) = body.frame().await {} });
            let refusal = frappe_error(
                StatusCode::from_u16(code).unwrap(),
                "ServerError",
                "refused before the body",
            );
            return Ok(refusal.map(|b| b.map_err(|e| match e {}).boxed()));
        }
        // Stream the body so a 50 MB upload is hashed, not held.
        let mut hasher = Sha256::new();
        let mut len = 0usize;
        let mut kept = Vec::new();
        while let Some(frame) = body.frame().await {
            let Ok(frame) = frame else {
                return Err(std::io::Error::other("request body broke"));
            };
            if let Some(data) = frame.data_ref() {
                hasher.update(data);
                len += data.len();
                self.state
                    .body_progress
                    .fetch_add(data.len() as u64, Ordering::SeqCst);
                if kept.len() < 65536 {
                    kept.extend_from_slice(data);
                }
            }
        }
        let body_bytes = Bytes::from(kept);
        let received = Received {
            method: parts.method.clone(),
            version: parts.version,
            authority: parts.uri.authority().map(ToString::to_string),
            path_and_query: parts
                .uri
                .path_and_query()
                .map(|p| p.to_string())
                .unwrap_or_default(),
            headers: parts.headers.clone(),
            body_len: len,
            body_sha256: hex::encode(hasher.finalize()),
            body: (len < 65536).then(|| body_bytes.clone()),
        };
        self.state.received.lock().unwrap().push(received);

        let behaviour = {
            let mut current = self.state.behaviour.lock().unwrap();
            let now = current.clone();
            if let Behaviour::FailNext(n, status) = now {
                *current = match n {
                    0 | 1 => Behaviour::Normal,
                    n => Behaviour::FailNext(n - 1, status),
                };
            }
            now
        };
        let boxed = |r: Response<Full<Bytes>>| r.map(|b| b.map_err(|e| match e {}).boxed());
        match behaviour {
            Behaviour::Normal | Behaviour::FailNext(0, _) | Behaviour::AnswerBeforeBody(_) => {}
            Behaviour::Fail(code) | Behaviour::FailNext(_, code) => {
                let status = StatusCode::from_u16(code).unwrap();
                return Ok(boxed(frappe_error(
                    status,
                    "ServerError",
                    "injected failure",
                )));
            }
            Behaviour::Throttle(secs) => {
                let mut r = frappe_error(
                    StatusCode::TOO_MANY_REQUESTS,
                    "TooManyRequestsError",
                    "You hit the rate limit because of too many requests. Please try after sometime.",
                );
                r.headers_mut().insert("retry-after", secs.into());
                return Ok(boxed(r));
            }
            Behaviour::Drop => return Err(std::io::Error::other("dropping the connection")),
            Behaviour::Stall => {
                tokio::time::sleep(Duration::from_secs(3600)).await;
            }
            // Headers promise 1000 bytes; 500 arrive, then nothing more (the connection stays
            // open) or, after a pause that lets the head and first half go out, a break.
            Behaviour::StallBody => {
                return Ok(half_body_then(Duration::from_secs(3600), "an hour later"));
            }
            Behaviour::BreakBody => {
                return Ok(half_body_then(
                    Duration::from_millis(200),
                    "connection broken mid-response",
                ));
            }
        }
        Ok(boxed(
            self.answer(&parts.method, &parts.uri, &parts.headers, &body_bytes, len)
                .await,
        ))
    }

    async fn answer(
        &self,
        method: &Method,
        uri: &http::Uri,
        headers: &HeaderMap,
        body: &Bytes,
        len: usize,
    ) -> Response<Full<Bytes>> {
        // Site selection as Frappe does it: X-Frappe-Site-Name, else Host without port (over
        // HTTP/2, `:authority`, which werkzeug reads as the host).
        let site = headers
            .get("x-frappe-site-name")
            .or_else(|| headers.get("host"))
            .and_then(|v| v.to_str().ok())
            .or_else(|| uri.authority().map(|a| a.as_str()))
            .map(|h| h.split(':').next().unwrap_or(h).to_owned())
            .unwrap_or_default();
        if site != self.state.site_name {
            let html = format!("<!doctype html>\n<html lang=en>\n<title>404 Not Found</title>\n<h1>Not Found</h1>\n<p>{site} does not exist</p>\n");
            let mut r = Response::new(Full::new(Bytes::from(html)));
            *r.status_mut() = StatusCode::NOT_FOUND;
            r.headers_mut()
                .insert("content-type", "text/html; charset=utf-8".parse().unwrap());
            return r;
        }
        let path = uri.path();
        let query: BTreeMap<String, String> =
            form_urlencoded::parse(uri.query().unwrap_or_default().as_bytes())
                .into_owned()
                .collect();
        if path == "/api/method/ping" || path == "/api/v2/method/ping" {
            return ok(if path.contains("/v2/") {
                json!({"data": "pong"})
            } else {
                json!({"message": "pong"})
            });
        }
        if path == "/.well-known/openid-configuration" {
            return ok(json!({
                "issuer": format!("http://{}", self.state.site_name),
                "token_endpoint": "/api/method/frappe.integrations.oauth2.get_token",
                "introspection_endpoint": "/api/method/frappe.integrations.oauth2.introspect_token",
            }));
        }
        if path == "/api/method/frappe.integrations.oauth2.authorize" {
            // allow_guest: Guest is sent to /login, a signed-in user back to the app with a
            // code (an OAuth Client with skip_authorization), as oauth2.py `authorize` does.
            let signed_in = headers
                .get("cookie")
                .and_then(|c| c.to_str().ok())
                .is_some_and(|c| c.contains("sid=alice-session"));
            let location = if signed_in {
                format!(
                    "{}?code=good-code&state={}",
                    query.get("redirect_uri").cloned().unwrap_or_default(),
                    query.get("state").cloned().unwrap_or_default()
                )
            } else {
                format!(
                    "/login?redirect-to=http%3A%2F%2F{}{}",
                    self.state.site_name, uri
                )
            };
            let mut r = Response::new(Full::new(Bytes::new()));
            *r.status_mut() = StatusCode::FOUND;
            r.headers_mut()
                .insert("location", location.parse().unwrap());
            return with_cookies(r);
        }
        if path == "/api/method/frappe.integrations.oauth2.get_token" {
            // allow_guest; the client authenticates itself (client_secret_basic or the form).
            let form: BTreeMap<String, String> =
                form_urlencoded::parse(body).into_owned().collect();
            if form.get("grant_type").map(String::as_str) != Some("authorization_code")
                || form.get("code").map(String::as_str) != Some("good-code")
            {
                let mut r = ok(json!({"error": "invalid_grant"}));
                *r.status_mut() = StatusCode::BAD_REQUEST;
                return r;
            }
            let client_id = form.get("client_id").cloned().unwrap_or_default();
            let token = format!(
                "issued{}",
                self.state.next_name.fetch_add(1, Ordering::SeqCst)
            );
            self.issue_oauth_token(&token, &client_id, "alice@example.com", 3600, "all openid");
            return ok(json!({
                "access_token": token,
                "token_type": "Bearer",
                "expires_in": 3600,
                "refresh_token": "refresh-1",
                "scope": "all openid",
            }));
        }
        if path == "/api/method/frappe.integrations.oauth2.introspect_token" {
            // allow_guest; the whole response is the token_response dict (oauth2.py).
            self.state.introspections.fetch_add(1, Ordering::SeqCst);
            let form: BTreeMap<String, String> =
                form_urlencoded::parse(body).into_owned().collect();
            let token = form.get("token").cloned().unwrap_or_default();
            let found = self.oauth_token(&token);
            let answer = match found {
                None => json!({"active": false}),
                Some(t) => {
                    let mut answer = json!({
                        "client_id": t.client_id,
                        "trusted_client": 0,
                        "active": t.active,
                        "exp": t.exp,
                        "scope": t.scopes,
                    });
                    if t.scopes.split(' ').any(|s| s == "openid") {
                        answer["sub"] = json!(hex::encode(&Sha256::digest(t.user.as_bytes())[..8]));
                        answer["email"] = json!(t.user);
                    }
                    answer
                }
            };
            return ok(answer);
        }
        let user = match self.user(headers) {
            Ok(user) => user,
            Err(()) => return auth_failure(path.starts_with("/api/v2/")),
        };
        if let Some(doctype) = path
            .strip_prefix("/api/v2/doctype/")
            .and_then(|rest| rest.strip_suffix("/meta"))
        {
            return doctype_meta(
                &percent_encoding::percent_decode_str(doctype).decode_utf8_lossy(),
                &user,
            );
        }
        if path == "/api/method/test.slow" {
            let ms: u64 = query.get("ms").and_then(|m| m.parse().ok()).unwrap_or(1000);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            return ok(json!({"message": "slow done"}));
        }
        if path == "/api/method/test.big" {
            // `size` bytes of JSON, distinct per `i`; `cc` becomes Cache-Control.
            let size: usize = query
                .get("size")
                .and_then(|s| s.parse().ok())
                .unwrap_or(1000);
            let i = query.get("i").cloned().unwrap_or_default();
            let filler = "x".repeat(size.saturating_sub(40 + i.len()));
            let mut r = ok(json!({"message": {"i": i, "filler": filler}}));
            if let Some(cc) = query.get("cc") {
                r.headers_mut().insert("cache-control", cc.parse().unwrap());
            }
            return r;
        }
        if path == "/api/method/frappe.client.get_list"
            && query.get("doctype").map(String::as_str) == Some("ToDo")
        {
            // Rows shaped like a real ToDo list (hash names, as Frappe autonames them), the page
            // length asked for (Frappe's default 20).
            let rows: usize = query
                .get("limit_page_length")
                .and_then(|n| n.parse().ok())
                .unwrap_or(20);
            let rows: Vec<Value> = (0..rows)
                .map(|i| {
                    let hash = hex::encode(Sha256::digest(i.to_string().as_bytes()));
                    json!({"name": &hash[..10], "status": "Open", "description": format!("Follow up {i}")})
                })
                .collect();
            return ok(json!({"message": rows}));
        }
        if path == "/api/method/frappe.auth.get_logged_user" {
            return ok(json!({"message": user}));
        }
        if path == "/api/method/frappe.core.doctype.user.user.get_roles" {
            // `get_roles()`: the session user's roles; the sync account is all-powerful here.
            let roles = match user.as_str() {
                "sync@example.com" => json!(["System Manager", "All", "Guest"]),
                _ => json!(["Sales User", "All", "Guest"]),
            };
            return ok(json!({"message": roles}));
        }
        if path == "/api/method/upload_file" || path == "/api/v2/method/upload_file" {
            return ok(json!({"message": {"size": len, "user": user}}));
        }
        if path == "/api/method/test.echo" {
            return ok(json!({"message": {"query": query, "body": String::from_utf8_lossy(body)}}));
        }
        if path == "/api/method/test.db_error" || path == "/api/v2/method/test.db_error" {
            // `app.py` `handle_exception`: JSON for `/api/` unless `Accept` starts with "text",
            // else the "Server Error" web page with the escaped traceback (System Settings'
            // `allow_error_traceback`, on by default).
            let accept = headers
                .get("accept")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default();
            let duplicate = query.get("kind").map(String::as_str) == Some("duplicate");
            if accept.starts_with("text") {
                // Every status but 401, 403, 404 and 429 gets the page with the traceback.
                return match duplicate {
                    true => server_error_page(StatusCode::CONFLICT, DUPLICATE_ERROR),
                    false => server_error_page(StatusCode::INTERNAL_SERVER_ERROR, XPATH_ERROR),
                };
            }
            let messages = query.contains_key("messages");
            return database_error(path.starts_with("/api/v2/"), duplicate, messages);
        }
        if path == "/api/method/test.debug_log" {
            // `utils/response.py` `_make_logs_v1`: the request's SQL log goes out on any answer
            // whose debug log is not empty (a failed query and its values included).
            return ok(json!({
                "message": "ok",
                "_debug_messages": "[\"select name from tabUser where api_key='secretapikey'\"]",
            }));
        }
        if path == "/api/method/test.console" {
            // `system_console.execute_code` answers 200 with the document, the traceback of
            // the code that failed in `output` (`SystemConsole.run`: `frappe.get_traceback()`).
            let last = match query.get("kind").map(String::as_str) {
                Some("plain") => "NameError: name 'x' is not defined",
                _ => XPATH_ERROR,
            };
            return ok(json!({"message": {
                "doctype": "System Console",
                "name": "System Console",
                "type": "Python",
                "console": "frappe.db.sql(\"select extractvalue(1, concat('~', ...))\")",
                "output": format!("{}{last}\n", database_traceback_head()),
            }}));
        }
        if path == "/api/method/test.traceback" {
            return frappe_error(
                StatusCode::EXPECTATION_FAILED,
                "ValidationError",
                "Status cannot be \"BogusStatus\"",
            );
        }
        if let Some(rest) = path.strip_prefix("/api/resource/ToDo") {
            return self.todo(method, rest.trim_start_matches('/'), body, &user, false);
        }
        if let Some(rest) = path.strip_prefix("/api/v2/document/ToDo") {
            return self.todo(method, rest.trim_start_matches('/'), body, &user, true);
        }
        // `/api/v2/method/<doctype>/<attr>` is the doctype's controller module's `attr`
        // (`api/v2.py` `handle_rpc_call`); the catalog resolves `doctype/attr` so.
        let rpc = path
            .strip_prefix("/api/method/")
            .or_else(|| path.strip_prefix("/api/v2/method/"))
            .map(|name| percent_encoding::percent_decode_str(name).decode_utf8_lossy());
        if let Some(function) = rpc.as_deref().and_then(erpgate::frappe::call::resolve) {
            // `handler.py` `execute_cmd`: the name (any alias) resolves to the function object,
            // `frappe.call(fn, **form_dict)` passes what `get_newargs` keeps. The catalog holds
            // those facts as generated from Frappe's source; this answers with what the
            // function would have received.
            let form = form_dict(&query, headers, body);
            let takes_all = function.kwargs.is_some() || function.reads_form_dict;
            let args: serde_json::Map<String, Value> = form
                .into_iter()
                .filter(|(k, _)| {
                    !matches!(k.as_str(), "ignore_permissions" | "flags")
                        && (takes_all || function.params.iter().any(|p| p.name == *k))
                })
                .collect();
            // `api/v2.py` answers in `data` (`v2_method_ping.txt`: `{"data": "pong"}`).
            let key = if path.starts_with("/api/v2/") {
                "data"
            } else {
                "message"
            };
            return ok(json!({key: {"function": function.name, "args": args}}));
        }
        if let Some(name) = path.strip_prefix("/api/method/") {
            return frappe_error(
                StatusCode::EXPECTATION_FAILED,
                "ValidationError",
                &format!("Failed to get method for command {name} with No module named '{name}'"),
            );
        }
        let mut r = Response::new(Full::new(Bytes::from_static(b"{}")));
        *r.status_mut() = StatusCode::NOT_FOUND;
        r
    }

    /// Frappe's `validate_auth`: exactly two space-separated parts, token or Basic.
    fn user(&self, headers: &HeaderMap) -> Result<String, ()> {
        let Some(value) = headers.get("authorization") else {
            return Ok("Guest".into());
        };
        let value = value.to_str().map_err(|_| ())?;
        let parts: Vec<&str> = value.split(' ').collect();
        // auth.py validate_oauth: a Bearer token acts as its user while Active and unexpired
        // (oauthlib's validate_bearer_token), else the request is Guest's.
        if parts.len() == 2 && parts[0].eq_ignore_ascii_case("bearer") {
            return Ok(match self.oauth_token(parts[1]) {
                Some(t) if t.active && t.exp > unix_now() => t.user.clone(),
                _ => "Guest".into(),
            });
        }
        if parts.len() != 2 || !parts[0].eq_ignore_ascii_case("token") {
            return Err(());
        }
        let (key, secret) = parts[1].split_once(':').ok_or(())?;
        match self.state.tokens.get(key) {
            Some((s, user)) if s == secret => Ok(user.clone()),
            _ => Err(()),
        }
    }

    fn todo(
        &self,
        method: &Method,
        name: &str,
        body: &Bytes,
        user: &str,
        v2: bool,
    ) -> Response<Full<Bytes>> {
        if user == "Guest" {
            return frappe_error(
                StatusCode::FORBIDDEN,
                "PermissionError",
                "No permission for ToDo",
            );
        }
        let mut todos = self.state.todos.lock().unwrap();
        // Names are matched as MariaDB's `_ci` / PAD SPACE collation does: any case, trailing
        // spaces ignored.
        let decoded = percent_encoding::percent_decode_str(name).decode_utf8_lossy();
        let wanted = decoded.trim_end_matches(' ').to_lowercase();
        let stored = todos.keys().find(|k| k.to_lowercase() == wanted).cloned();
        let name = stored.as_deref().unwrap_or(name);
        let not_found = || {
            let body = if v2 {
                json!({"errors": [{"type": "DoesNotExistError", "message": format!("ToDo {name} not found")}]})
            } else {
                json!({"exc_type": "DoesNotExistError"})
            };
            let mut r = ok(body);
            *r.status_mut() = StatusCode::NOT_FOUND;
            r
        };
        match (method.as_str(), name.is_empty()) {
            ("GET", true) => ok(
                json!({"data": todos.values().map(|d| json!({"name": d["name"]})).collect::<Vec<_>>()}),
            ),
            ("POST", true) => {
                let fields: Value = serde_json::from_slice(body).unwrap_or(json!({}));
                let name = format!(
                    "todo{:04}",
                    self.state.next_name.fetch_add(1, Ordering::SeqCst)
                );
                let mut doc = json!({"name": name, "owner": user, "status": "Open", "doctype": "ToDo", "modified": "2026-11-25 16:14:15.763981"});
                if let (Some(doc), Some(fields)) = (doc.as_object_mut(), fields.as_object()) {
                    for (k, v) in fields {
                        doc.insert(k.clone(), v.clone());
                    }
                }
                todos.insert(name, doc.clone());
                ok(json!({"data": doc}))
            }
            ("GET", false) => match todos.get(name) {
                Some(doc) => ok(json!({"data": doc})),
                None => not_found(),
            },
            ("PUT" | "PATCH", false) => match todos.get_mut(name) {
                Some(doc) => {
                    let fields: Value = serde_json::from_slice(body).unwrap_or(json!({}));
                    if let (Some(doc), Some(fields)) = (doc.as_object_mut(), fields.as_object()) {
                        for (k, v) in fields {
                            doc.insert(k.clone(), v.clone());
                        }
                    }
                    ok(json!({"data": doc}))
                }
                None => not_found(),
            },
            ("DELETE", false) => match todos.remove(name) {
                Some(_) => {
                    let mut r = ok(json!({"data": "ok"}));
                    *r.status_mut() = StatusCode::ACCEPTED;
                    r
                }
                None => not_found(),
            },
            _ => frappe_error(
                StatusCode::METHOD_NOT_ALLOWED,
                "ValidationError",
                "method not allowed",
            ),
        }
    }
}

/// Serves HTTP/2 on `io`; with `close_after`, says GOAWAY that long after the connection opened
/// and closes once its streams are done.
async fn serve_h2<I, S>(io: I, service: S, close_after: Option<Duration>)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::HttpService<Incoming> + Send,
    S::Future: Send + 'static,
    S::ResBody: Send + 'static,
    <S::ResBody as http_body::Body>::Data: Send,
    <S::ResBody as http_body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let h2 = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new());
    let mut connection = std::pin::pin!(h2.serve_connection(io, service));
    let Some(after) = close_after else {
        let _ = connection.await;
        return;
    };
    tokio::select! {
        _ = connection.as_mut() => {}
        _ = tokio::time::sleep(after) => {
            connection.as_mut().graceful_shutdown();
            let _ = connection.await;
        }
    }
}

/// `frappe/app.py` `make_form_dict`: a JSON object body alone, else the query overlaid with
/// the form (urlencoded or multipart); `_` is popped. Later repeats win, as in a dict.
fn form_dict(
    query: &BTreeMap<String, String>,
    headers: &HeaderMap,
    body: &Bytes,
) -> serde_json::Map<String, Value> {
    let content_type = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let mut form = serde_json::Map::new();
    if !body.is_empty() && content_type.starts_with("application/json") {
        if let Ok(Value::Object(object)) = serde_json::from_slice::<Value>(body) {
            form = object;
        }
    } else {
        for (k, v) in query {
            form.insert(k.clone(), json!(v));
        }
        if content_type.starts_with("application/x-www-form-urlencoded") {
            for (k, v) in form_urlencoded::parse(body) {
                form.insert(k.into_owned(), json!(v));
            }
        } else if let Some(boundary) = content_type.split("boundary=").nth(1) {
            for (k, v) in super::werkzeug::multipart_fields(body, boundary) {
                form.insert(k, json!(v));
            }
        }
    }
    form.remove("_");
    form
}

fn with_cookies(mut r: Response<Full<Bytes>>) -> Response<Full<Bytes>> {
    r.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    r.headers_mut()
        .insert("server", "gunicorn".parse().unwrap());
    for cookie in GUEST_COOKIES {
        r.headers_mut()
            .append("set-cookie", cookie.parse().unwrap());
    }
    r
}

/// `api/v2.py` `get_meta`: the metadata of ToDo, User and its Has Role rows as captured from
/// Frappe 15 (`meta/`), after `frappe.has_permission(doctype, "read")`: only the sync account
/// (a System Manager) may read User; the others (Sales Users, OAuth users) are refused its
/// metadata.
fn doctype_meta(doctype: &str, user: &str) -> Response<Full<Bytes>> {
    let meta = match doctype {
        "ToDo" => include_str!("meta/todo.json"),
        "User" => include_str!("meta/user.json"),
        "Has Role" => include_str!("meta/has_role.json"),
        _ => {
            let mut r = v2_error(
                StatusCode::NOT_FOUND,
                "DoesNotExistError",
                &format!("DocType {doctype} not found"),
            );
            *r.status_mut() = StatusCode::NOT_FOUND;
            return r;
        }
    };
    if user == "Guest" || (doctype == "User" && user != "sync@example.com") {
        return v2_error(
            StatusCode::FORBIDDEN,
            "PermissionError",
            &format!("No permission for {doctype}"),
        );
    }
    let mut r = Response::new(Full::new(Bytes::from_static(meta.as_bytes())));
    r.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    r
}

/// A v2 error envelope (`api/v2.py` `handle_exception`'s `errors` list).
fn v2_error(status: StatusCode, exc_type: &str, message: &str) -> Response<Full<Bytes>> {
    let mut r = ok(json!({"errors": [{"type": exc_type, "message": message,
        "exception": format!("frappe.exceptions.{exc_type}: {message}")}]}));
    *r.status_mut() = status;
    r
}

fn ok(body: Value) -> Response<Full<Bytes>> {
    with_cookies(Response::new(Full::new(Bytes::from(body.to_string()))))
}

/// A Frappe v1 error with a full Python traceback, as `frappe.app.handle_exception` makes it.
fn frappe_error(status: StatusCode, exc_type: &str, message: &str) -> Response<Full<Bytes>> {
    let traceback = format!(
        "Traceback (most recent call last):\n  File \"apps/frappe/frappe/app.py\", line 114, in application\n    response = frappe.api.handle(request)\n  File \"apps/frappe/frappe/__init__.py\", line 519, in _raise_exception\n    raise exc\nfrappe.exceptions.{exc_type}: {message}\n"
    );
    let server_message =
        json!({"message": message, "title": "Message", "indicator": "red", "raise_exception": 1})
            .to_string();
    let body = json!({
        "exception": format!("frappe.exceptions.{exc_type}: {message}"),
        "exc_type": exc_type,
        "exc": json!([traceback]).to_string(),
        "_server_messages": json!([server_message]).to_string(),
    });
    let mut r = ok(body);
    *r.status_mut() = status;
    r
}

/// The last line of a MariaDB `extractvalue` error as pymysql raises it: MariaDB's message
/// quotes the value the XPATH was built from.
pub const XPATH_ERROR: &str =
    "pymysql.err.OperationalError: (1105, \"XPATH syntax error: '~secretapikey'\")";

/// Frappe's "Server Error" page (`respond_as_web_page`) for a database error, its traceback
/// HTML-escaped in a `<pre>`.
fn server_error_page(status: StatusCode, last: &str) -> Response<Full<Bytes>> {
    let traceback = format!("{}{last}\n", database_traceback_head())
        .replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#x27;");
    let page = format!(
        "<!DOCTYPE html><html><head><title>Server Error</title></head><body>\
         <div class=\"page-card\"><h4>Server Error</h4><pre>{traceback}</pre></div></body></html>"
    );
    let mut r = Response::new(Full::new(Bytes::from(page)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert("content-type", "text/html; charset=utf-8".parse().unwrap());
    r
}

/// A document insert's duplicate key, as Frappe 15 words it.
pub const DUPLICATE_ERROR: &str = "frappe.exceptions.DuplicateEntryError: ('ToDo', 'secretname', IntegrityError(1062, \"Duplicate entry 'secretname' for key 'PRIMARY'\"))";

/// Where a database error's traceback goes: Frappe's `Database.sql` into pymysql.
fn database_traceback_head() -> &'static str {
    "Traceback (most recent call last):\n  File \"apps/frappe/frappe/app.py\", line 114, in application\n    response = frappe.api.handle(request)\n  File \"apps/frappe/frappe/database/database.py\", line 247, in sql\n    self._cursor.execute(query, values)\n  File \"env/lib/python3.11/site-packages/pymysql/err.py\", line 150, in raise_mysql_exception\n    raise errorclass(errno, errval)\n"
}

/// A database error as Frappe 15 answers it (`frappe/utils/response.py` `report_error`, with
/// tracebacks allowed): v1 `exc_type` the class's `__name__`, `exception` the traceback's last
/// line, `exc` the traceback list; v2 `errors: [{type, exception}]`. `duplicate`: a document
/// insert's `DuplicateEntryError` (409) wrapping pymysql's `IntegrityError`; `messages`: a
/// `msgprint` of the driver's message in `_server_messages` (v2 `messages`).
fn database_error(v2: bool, duplicate: bool, messages: bool) -> Response<Full<Bytes>> {
    let (status, exc_type, last) = if duplicate {
        (
            StatusCode::CONFLICT,
            "DuplicateEntryError",
            DUPLICATE_ERROR.to_owned(),
        )
    } else {
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            "OperationalError",
            XPATH_ERROR.to_owned(),
        )
    };
    let traceback = format!("{}{last}\n", database_traceback_head());
    let detail = last.split_once(": ").map(|(_, d)| d).unwrap_or_default();
    let message = json!({"message": detail, "title": "Message", "indicator": "red"});
    let mut body = if v2 {
        json!({"errors": [{"type": exc_type, "exception": traceback}]})
    } else {
        json!({
            "exception": last,
            "exc_type": exc_type,
            "exc": json!([traceback]).to_string(),
        })
    };
    if messages {
        if v2 {
            body["messages"] = json!([message]);
        } else {
            let keep = json!({"message": "Saved earlier rows", "title": "Message"});
            body["_server_messages"] =
                json!(json!([keep.to_string(), message.to_string()]).to_string());
        }
    }
    let mut r = ok(body);
    *r.status_mut() = status;
    r
}

fn auth_failure(v2: bool) -> Response<Full<Bytes>> {
    let traceback = "Traceback (most recent call last):\n  File \"apps/frappe/frappe/app.py\", line 101, in application\n    validate_auth()\n  File \"apps/frappe/frappe/auth.py\", line 690, in validate_api_key_secret\n    raise frappe.AuthenticationError\nfrappe.exceptions.AuthenticationError\n";
    let body = if v2 {
        json!({"errors": [{"type": "AuthenticationError", "exception": traceback}]})
    } else {
        json!({"exception": "frappe.exceptions.AuthenticationError", "exc_type": "AuthenticationError", "exc": json!([traceback]).to_string()})
    };
    let mut r = ok(body);
    *r.status_mut() = StatusCode::UNAUTHORIZED;
    r
}
