//! Response compression: gzip, br and zstd, negotiated from `Accept-Encoding` with q-values.
//! erpgate takes the place of the bench's nginx, which is what compresses Frappe's responses
//! (gunicorn does not).
//!
//! tower-http's `CompressionLayer` does the streaming compression (a streamed body stays
//! streamed, frame by frame). Around it, this module:
//!
//! - **negotiates** once, here, and hands tower-http the single coding chosen (so the two can
//!   never disagree) — and `identity` when nothing else is acceptable: tower-http would
//!   otherwise turn the status into 406 *after* the request ran, and a client would be told a
//!   create failed that Frappe carried out;
//! - asks the site for `identity`, so the cache keeps one identity entry per resource and
//!   serves its own encoded copies (see `layers::cache`): a HIT is never compressed again;
//! - decides what is worth compressing ([`Settings::compressible`]): 2xx but not 206, a listed
//!   media type (never `text/event-stream`), not already encoded, no `no-transform`, not below
//!   `min_bytes` when the size is known;
//! - gives a compressed response its own `ETag` (`"x"` becomes `"x-br"`), since its bytes
//!   differ (RFC 9110 8.8.3);
//! - counts bytes before and after, per coding, into `erpgate_compression_bytes_total`.
//!
//! Inside CORS (whose headers are added after) and outside the cache (which serves its own
//! encoded copies) and the error edge (a large traceback envelope is compressed too).

use std::future::Future;
use std::io::Write as _;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body::{Body as _, Frame, SizeHint};
use pin_project_lite::pin_project;
use prometheus::{IntCounter, IntCounterVec};
use tower::{Layer, Service, ServiceBuilder};
use tower_http::compression::predicate::Predicate;
use tower_http::compression::{CompressionLayer as TowerCompressionLayer, CompressionLevel};

use crate::config::{CompressionConfig, CompressionLevel as Level, ContentCoding};
use crate::{Body, BoxError};

/// The coding chosen for a request, in its extensions for the layers inside (the cache).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Negotiated(pub ContentCoding);

/// What to compress and how, built once per configuration.
#[derive(Debug)]
pub struct Settings {
    /// Enabled codings, the server's preference first.
    codings: Vec<ContentCoding>,
    min_bytes: u64,
    level: Level,
    /// Exact media types, and `type/` prefixes for `type/*`.
    types: Vec<String>,
    /// Bytes before and after compression, by coding (`index`).
    identity_bytes: [IntCounter; 3],
    encoded_bytes: [IntCounter; 3],
}

/// A slot per coding, for arrays indexed by coding.
pub fn index(coding: ContentCoding) -> usize {
    match coding {
        ContentCoding::Br => 0,
        ContentCoding::Zstd => 1,
        ContentCoding::Gzip => 2,
    }
}

/// The coding's `Content-Encoding` token.
pub fn token(coding: ContentCoding) -> &'static str {
    match coding {
        ContentCoding::Br => "br",
        ContentCoding::Zstd => "zstd",
        ContentCoding::Gzip => "gzip",
    }
}

/// An `Accept-Encoding` q-value in thousandths; `None` when malformed (the item is ignored).
fn q_value(params: &str) -> Option<u16> {
    let mut q = None;
    for param in params.split(';') {
        let Some((name, value)) = param.split_once('=') else {
            continue;
        };
        if !name.trim().eq_ignore_ascii_case("q") {
            continue;
        }
        let value = value.trim();
        let (whole, fraction) = value.split_once('.').unwrap_or((value, ""));
        if fraction.len() > 3 || !fraction.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let thousandths = match whole {
            "0" => format!("{fraction:0<3}").parse::<u16>().ok()?,
            "1" if fraction.bytes().all(|b| b == b'0') => 1000,
            _ => return None,
        };
        q = Some(thousandths);
    }
    Some(q.unwrap_or(1000))
}

impl Settings {
    /// From the validated section; `metric` is `erpgate_compression_bytes_total`.
    pub fn new(config: &CompressionConfig, metric: &IntCounterVec) -> Self {
        let per_coding = |stage: &str| {
            [ContentCoding::Br, ContentCoding::Zstd, ContentCoding::Gzip]
                .map(|c| metric.with_label_values(&[token(c), stage]))
        };
        let mut codings = Vec::new();
        for coding in &config.encodings {
            if !codings.contains(coding) {
                codings.push(*coding);
            }
        }
        Self {
            codings,
            min_bytes: config.min_bytes.0,
            level: config.level,
            types: config
                .types
                .iter()
                .map(|t| t.strip_suffix('*').unwrap_or(t).to_ascii_lowercase())
                .collect(),
            identity_bytes: per_coding("identity"),
            encoded_bytes: per_coding("encoded"),
        }
    }

    /// The coding to answer a request with these headers in; `None` for identity. The highest
    /// q-value wins (an explicit one over `*`), ties go to the configured order, and identity
    /// is the answer when nothing else is acceptable, even if the client refused it (RFC 9110
    /// 12.5.3 lets a server ignore the header rather than answer 406).
    pub fn negotiate(&self, headers: &HeaderMap) -> Option<ContentCoding> {
        let mut explicit: [Option<u16>; 3] = [None; 3];
        let mut identity = None;
        let mut wildcard = None;
        let items = headers
            .get_all(header::ACCEPT_ENCODING)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','));
        for item in items {
            let (name, params) = item.split_once(';').unwrap_or((item, ""));
            let Some(q) = q_value(params) else { continue };
            let name = name.trim();
            let slot = if name == "*" {
                &mut wildcard
            } else if name.eq_ignore_ascii_case("identity") {
                &mut identity
            } else if let Some(c) = self
                .codings
                .iter()
                .find(|c| name.eq_ignore_ascii_case(token(**c)))
            {
                &mut explicit[index(*c)]
            } else if name.eq_ignore_ascii_case("x-gzip")
                && self.codings.contains(&ContentCoding::Gzip)
            {
                &mut explicit[index(ContentCoding::Gzip)]
            } else {
                continue;
            };
            *slot = Some(q);
        }
        let identity_q = identity.or(wildcard).unwrap_or(0);
        let mut best: Option<(ContentCoding, u16)> = None;
        for coding in &self.codings {
            let q = explicit[index(*coding)].or(wildcard).unwrap_or(0);
            if q > 0 && best.is_none_or(|(_, b)| q > b) {
                best = Some((*coding, q));
            }
        }
        // Identity only wins outright: at a tie a client saving bytes is the better answer.
        best.filter(|(_, q)| *q >= identity_q).map(|(c, _)| c)
    }

    /// Whether a response with this status, these headers and this many bytes (when known) is
    /// compressed.
    pub fn compressible(&self, status: StatusCode, headers: &HeaderMap, len: Option<u64>) -> bool {
        if !status.is_success()
            || status == StatusCode::PARTIAL_CONTENT
            || status == StatusCode::NO_CONTENT
        {
            return false;
        }
        if headers.contains_key(header::CONTENT_ENCODING)
            || headers.contains_key(header::CONTENT_RANGE)
        {
            return false;
        }
        let no_transform = headers
            .get_all(header::CACHE_CONTROL)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|d| d.trim().eq_ignore_ascii_case("no-transform"));
        if no_transform {
            return false;
        }
        let Some(media_type) = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.split(';').next().unwrap_or_default().trim())
        else {
            return false;
        };
        // A stream of events must reach the page as each is sent.
        if media_type.eq_ignore_ascii_case("text/event-stream") {
            return false;
        }
        let listed = self.types.iter().any(|t| {
            if t.ends_with('/') {
                media_type.len() > t.len() && media_type[..t.len()].eq_ignore_ascii_case(t)
            } else {
                media_type.eq_ignore_ascii_case(t)
            }
        });
        let len = len.or_else(|| {
            headers
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())
        });
        listed && len.is_none_or(|len| len >= self.min_bytes)
    }

    /// `body` in `coding`, at the configured level, in one go (the cache's encoded copies).
    pub fn encode(&self, coding: ContentCoding, body: &[u8]) -> std::io::Result<Bytes> {
        let (gzip, br, zstd) = match self.level {
            Level::Fastest => (1, 0, 1),
            Level::Default => (6, 4, 3),
            Level::Best => (9, 11, 19),
        };
        let encoded = match coding {
            ContentCoding::Gzip => {
                let mut encoder = flate2::write::GzEncoder::new(
                    Vec::with_capacity(body.len() / 4),
                    flate2::Compression::new(gzip),
                );
                encoder.write_all(body)?;
                encoder.finish()?
            }
            ContentCoding::Br => {
                let mut out = Vec::with_capacity(body.len() / 4);
                let params = brotli::enc::BrotliEncoderParams {
                    quality: br,
                    lgwin: 22,
                    ..Default::default()
                };
                brotli::BrotliCompress(&mut &body[..], &mut out, &params)?;
                out
            }
            ContentCoding::Zstd => zstd::bulk::compress(body, zstd)?,
        };
        Ok(Bytes::from(encoded))
    }

    /// Counts one response compressed from `identity` to `encoded` bytes.
    pub fn count(&self, coding: ContentCoding, identity: u64, encoded: u64) {
        self.identity_bytes[index(coding)].inc_by(identity);
        self.encoded_bytes[index(coding)].inc_by(encoded);
    }

    fn tower_level(&self) -> CompressionLevel {
        match self.level {
            Level::Fastest => CompressionLevel::Fastest,
            Level::Default => CompressionLevel::Default,
            Level::Best => CompressionLevel::Best,
        }
    }
}

/// The `ETag` of a response encoded in `coding`: its bytes differ from the identity ones, so
/// its strong validator must too (`"x"` → `"x-br"`, `W/"x"` → `W/"x-br"`).
pub fn encoded_etag(etag: &HeaderValue, coding: ContentCoding) -> Option<HeaderValue> {
    let text = etag.to_str().ok()?;
    let open = text.strip_suffix('"')?;
    HeaderValue::try_from(format!("{open}-{}\"", token(coding))).ok()
}

/// tower-http's predicate, deferring to [`Settings::compressible`].
#[derive(Debug, Clone)]
pub struct Worth(Arc<Settings>);

impl Predicate for Worth {
    fn should_compress<B: http_body::Body>(&self, response: &Response<B>) -> bool {
        self.0.compressible(
            response.status(),
            response.headers(),
            response.body().size_hint().exact(),
        )
    }
}

/// The layer: negotiation and accounting around tower-http's compression.
#[derive(Clone)]
pub struct CompressionLayer {
    settings: Arc<Settings>,
}

impl CompressionLayer {
    /// Compresses as `settings` say.
    pub fn new(settings: Arc<Settings>) -> Self {
        Self { settings }
    }
}

impl<S: Clone> Layer<S> for CompressionLayer {
    type Service = Negotiate<S>;
    fn layer(&self, inner: S) -> Self::Service {
        let settings = &self.settings;
        let tower = TowerCompressionLayer::new()
            .quality(settings.tower_level())
            .no_deflate()
            .compress_when(Worth(settings.clone()));
        let compressing = ServiceBuilder::new().layer(tower).service(Account {
            inner: inner.clone(),
            settings: settings.clone(),
        });
        Negotiate {
            plain: inner,
            compressing,
            settings: settings.clone(),
        }
    }
}

/// Outside tower-http's compression: negotiates; sends a request answered in identity straight
/// on (tower-http's wrapping of every body would cost each of them for nothing), and accounts
/// for and re-tags what tower-http encoded.
#[derive(Clone)]
pub struct Negotiate<S> {
    plain: S,
    compressing: tower_http::compression::Compression<Account<S>, Worth>,
    settings: Arc<Settings>,
}

/// A response tower-http is compressing: the marker `Account` leaves for `Negotiate`.
#[derive(Debug, Clone, Copy)]
struct CompressedHere(ContentCoding);

type CompressingFuture<F> = tower_http::compression::ResponseFuture<AccountFuture<F>, Worth>;

impl<S> Service<Request<Body>> for Negotiate<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = BoxError>,
{
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = NegotiateFuture<S::Future, CompressingFuture<S::Future>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        std::task::ready!(self.compressing.poll_ready(cx))?;
        self.plain.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<Body>) -> Self::Future {
        // A HEAD answer describes the identity representation: its Content-Length stays true.
        let coding = if request.method() == http::Method::HEAD {
            None
        } else {
            self.settings.negotiate(request.headers())
        };
        let settings = self.settings.clone();
        let Some(coding) = coding else {
            // erpgate encodes; the site sends what the cache and the rules can read.
            request.headers_mut().insert(
                header::ACCEPT_ENCODING,
                HeaderValue::from_static("identity"),
            );
            return NegotiateFuture::Plain {
                future: self.plain.call(request),
                settings,
            };
        };
        // tower-http sees only the coding chosen here, so it cannot choose otherwise, nor
        // answer 406.
        request.headers_mut().insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_static(token(coding)),
        );
        request.extensions_mut().insert(Negotiated(coding));
        NegotiateFuture::Compressing {
            future: self.compressing.call(request),
            settings,
        }
    }
}

pin_project! {
    /// [`Negotiate`]'s future.
    #[project = Projected]
    pub enum NegotiateFuture<P, C> {
        /// Answered in identity, without tower-http.
        Plain { #[pin] future: P, settings: Arc<Settings> },
        /// Through tower-http's compression.
        Compressing { #[pin] future: C, settings: Arc<Settings> },
    }
}

impl<P, C, B> Future for NegotiateFuture<P, C>
where
    P: Future<Output = Result<Response<Body>, BoxError>>,
    C: Future<Output = Result<Response<B>, BoxError>>,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Output = Result<Response<Body>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let (response, settings) = match self.project() {
            Projected::Plain { future, settings } => {
                let mut response = std::task::ready!(future.poll(cx))?;
                // The answer depended on Accept-Encoding all the same, for shared caches.
                let len = response.body().size_hint().exact();
                if settings.compressible(response.status(), response.headers(), len) {
                    add_vary_accept_encoding(response.headers_mut());
                }
                return Poll::Ready(Ok(response));
            }
            Projected::Compressing { future, settings } => {
                (std::task::ready!(future.poll(cx))?, settings)
            }
        };
        let Some(CompressedHere(coding)) = response.extensions().get::<CompressedHere>().copied()
        else {
            return Poll::Ready(Ok(response.map(Body::new)));
        };
        let (mut parts, body) = response.into_parts();
        if let Some(etag) = parts.headers.get(header::ETAG) {
            match encoded_etag(etag, coding) {
                Some(tagged) => parts.headers.insert(header::ETAG, tagged),
                None => parts.headers.remove(header::ETAG),
            };
        }
        let counter = settings.encoded_bytes[index(coding)].clone();
        Poll::Ready(Ok(Response::from_parts(
            parts,
            Body::new(Counted::new(body, counter)),
        )))
    }
}

/// Appends `Vary: accept-encoding` unless a `Vary` names it already.
pub fn add_vary_accept_encoding(headers: &mut HeaderMap) {
    let varies = headers.get_all(header::VARY).iter().any(|v| {
        v.as_bytes()
            .windows(15)
            .any(|w| w.eq_ignore_ascii_case(b"accept-encoding"))
    });
    if !varies {
        headers.append(header::VARY, HeaderValue::from_static("accept-encoding"));
    }
}

/// Inside tower-http's compression: marks and counts what it is about to compress, and asks
/// the site for identity.
#[derive(Clone)]
pub struct Account<S> {
    inner: S,
    settings: Arc<Settings>,
}

impl<S> Service<Request<Body>> for Account<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = BoxError>,
{
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = AccountFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<Body>) -> Self::Future {
        let coding = request.extensions().get::<Negotiated>().map(|n| n.0);
        // erpgate encodes; the site sends what the cache and the rules can read.
        request.headers_mut().insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_static("identity"),
        );
        AccountFuture {
            future: self.inner.call(request),
            coding,
            settings: self.settings.clone(),
        }
    }
}

pin_project! {
    /// [`Account`]'s future.
    pub struct AccountFuture<F> {
        #[pin]
        future: F,
        coding: Option<ContentCoding>,
        settings: Arc<Settings>,
    }
}

impl<F> Future for AccountFuture<F>
where
    F: Future<Output = Result<Response<Body>, BoxError>>,
{
    type Output = Result<Response<Body>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let response = std::task::ready!(this.future.poll(cx))?;
        let Some(coding) = *this.coding else {
            return Poll::Ready(Ok(response));
        };
        // The same test tower-http applies next: what passes it is compressed.
        let len = response.body().size_hint().exact();
        if !this
            .settings
            .compressible(response.status(), response.headers(), len)
        {
            return Poll::Ready(Ok(response));
        }
        let (mut parts, body) = response.into_parts();
        parts.extensions.insert(CompressedHere(coding));
        let counter = this.settings.identity_bytes[index(coding)].clone();
        Poll::Ready(Ok(Response::from_parts(
            parts,
            Body::new(Counted::new(body, counter)),
        )))
    }
}

pin_project! {
    /// A body that adds the bytes it passed to a counter once, when it is dropped (so a
    /// response cut short counts what was sent).
    struct Counted<B> {
        #[pin]
        inner: B,
        bytes: u64,
        counter: IntCounter,
    }

    impl<B> PinnedDrop for Counted<B> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            this.counter.inc_by(*this.bytes);
        }
    }
}

impl<B> Counted<B> {
    fn new(inner: B, counter: IntCounter) -> Self {
        Self {
            inner,
            bytes: 0,
            counter,
        }
    }
}

impl<B> http_body::Body for Counted<B>
where
    B: http_body::Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.project();
        let frame = std::task::ready!(this.inner.poll_frame(cx));
        if let Some(Ok(data)) = frame.as_ref().map(|f| f.as_ref().map(Frame::data_ref)) {
            *this.bytes += data.map_or(0, |d| d.len() as u64);
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(codings: &[ContentCoding]) -> Settings {
        let config = CompressionConfig {
            encodings: codings.to_vec(),
            ..CompressionConfig::default()
        };
        let metric = IntCounterVec::new(prometheus::Opts::new("t", "t"), &["encoding", "stage"])
            .unwrap_or_else(|e| panic!("{e}"));
        Settings::new(&config, &metric)
    }

    fn accept(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_str(value).unwrap_or_else(|e| panic!("{e}")),
        );
        headers
    }

    #[test]
    fn negotiation_follows_q_values_then_the_configured_order() {
        use ContentCoding::*;
        let all = settings(&[Zstd, Br, Gzip]);
        let cases: [(&str, Option<ContentCoding>); 14] = [
            ("", None),
            ("gzip", Some(Gzip)),
            ("gzip, deflate, br, zstd", Some(Zstd)),
            ("gzip;q=1.0, br;q=0.8", Some(Gzip)),
            ("gzip;q=0.5, zstd;q=0.9, br;q=0.1", Some(Zstd)),
            ("br;q=0, gzip", Some(Gzip)),
            ("*", Some(Zstd)),
            ("*;q=0.5, zstd;q=0", Some(Br)),
            ("identity", None),
            ("identity;q=1, gzip;q=0.5", None),
            ("identity;q=0.5, gzip;q=0.5", Some(Gzip)),
            ("GZIP", Some(Gzip)),
            ("x-gzip", Some(Gzip)),
            // Malformed q-values drop the item; identity stays acceptable.
            ("gzip;q=2, br;q=abc, zstd;q=0.1234", None),
        ];
        for (header, expect) in cases {
            assert_eq!(all.negotiate(&accept(header)), expect, "{header:?}");
        }
        // Nothing acceptable but identity refused: identity anyway, never 406.
        assert_eq!(all.negotiate(&accept("identity;q=0, deflate")), None);
        // Only the enabled codings, in the configured order.
        let gzip_first = settings(&[Gzip, Br]);
        assert_eq!(gzip_first.negotiate(&accept("br, gzip, zstd")), Some(Gzip));
        assert_eq!(gzip_first.negotiate(&accept("zstd")), None);
    }

    #[test]
    fn only_listed_types_of_sufficient_size_not_yet_encoded_are_compressible() {
        let s = settings(&[ContentCoding::Gzip]);
        let headers = |pairs: &[(&str, &str)]| {
            let mut h = HeaderMap::new();
            for (k, v) in pairs {
                h.append(
                    http::HeaderName::from_bytes(k.as_bytes()).unwrap_or_else(|e| panic!("{e}")),
                    HeaderValue::from_str(v).unwrap_or_else(|e| panic!("{e}")),
                );
            }
            h
        };
        let json = headers(&[("content-type", "application/json; charset=utf-8")]);
        assert!(s.compressible(StatusCode::OK, &json, Some(5000)));
        assert!(
            s.compressible(StatusCode::OK, &json, None),
            "unknown size: a stream"
        );
        assert!(!s.compressible(StatusCode::OK, &json, Some(1023)));
        assert!(!s.compressible(StatusCode::PARTIAL_CONTENT, &json, Some(5000)));
        assert!(!s.compressible(StatusCode::NOT_MODIFIED, &json, Some(5000)));
        assert!(s.compressible(
            StatusCode::OK,
            &headers(&[("content-type", "text/html")]),
            None
        ));
        for refused in [
            vec![("content-type", "image/png")],
            vec![("content-type", "application/pdf")],
            vec![("content-type", "text/event-stream")],
            vec![
                ("content-type", "application/json"),
                ("content-encoding", "gzip"),
            ],
            vec![
                ("content-type", "application/json"),
                ("cache-control", "public, no-transform"),
            ],
            vec![
                ("content-type", "application/json"),
                ("content-length", "20"),
            ],
            vec![],
        ] {
            assert!(
                !s.compressible(StatusCode::OK, &headers(&refused), None),
                "{refused:?}"
            );
        }
    }

    #[test]
    fn encoded_copies_decode_to_the_original_and_etags_differ_per_coding() {
        let s = settings(&[ContentCoding::Br, ContentCoding::Zstd, ContentCoding::Gzip]);
        let body = br#"{"message":[{"name":"abc","description":"a ToDo"}]}"#.repeat(50);
        let gz = s
            .encode(ContentCoding::Gzip, &body)
            .unwrap_or_else(|e| panic!("{e}"));
        let mut out = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&gz[..]), &mut out)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(out, body);
        let zs = s
            .encode(ContentCoding::Zstd, &body)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            zstd::decode_all(&zs[..]).unwrap_or_else(|e| panic!("{e}")),
            body
        );
        let b = s
            .encode(ContentCoding::Br, &body)
            .unwrap_or_else(|e| panic!("{e}"));
        let mut out = Vec::new();
        brotli::BrotliDecompress(&mut &b[..], &mut out).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(out, body);
        assert!(gz.len() < body.len() / 5 && b.len() < body.len() / 5);

        let etag = HeaderValue::from_static("\"abc\"");
        assert_eq!(
            encoded_etag(&etag, ContentCoding::Br).unwrap_or_else(|| panic!()),
            "\"abc-br\""
        );
        let weak = HeaderValue::from_static("W/\"abc\"");
        assert_eq!(
            encoded_etag(&weak, ContentCoding::Gzip).unwrap_or_else(|| panic!()),
            "W/\"abc-gzip\""
        );
        assert_eq!(
            encoded_etag(&HeaderValue::from_static("abc"), ContentCoding::Gzip),
            None
        );
    }
}
