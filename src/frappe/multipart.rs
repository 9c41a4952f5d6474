//! Multipart bodies, judged field by field and re-encoded, so Frappe reads exactly what was judged.
//!
//! werkzeug parses `multipart/form-data` into `request.form` (fields) and `request.files`
//! (parts with a `filename`), and `frappe/app.py` `make_form_dict` merges `request.form` into
//! `form_dict` on every path. A client could therefore carry `cmd`, `sid` or `run_method` in a
//! multipart field. Rather than hope two multipart parsers agree on a hostile body, erpgate
//! parses the client's body with `multer` and *writes a new one* in the plainest form:
//!
//! ```text
//! --B\r\nContent-Disposition: form-data; name="N"[; filename="F"]\r\n[Content-Type: T\r\n]\r\n
//! <content>\r\n ... --B--\r\n
//! ```
//!
//! with a random boundary `B` of erpgate's own, forwarded with the Content-Type that names it
//! ([`MultipartRelay::content_type`]): the client's boundary only splits the client's body. What
//! werkzeug then finds in the forwarded bytes is what erpgate judged, provided no content
//! contains something werkzeug would take for a delimiter: its `MultipartDecoder` accepts `\r\n`, `\n` *or* `\r` before
//! `--B` (`sansio/multipart.py`, `LINE_BREAK`), where `multer` splits only at `\r\n--B`. So
//! content holding `\n--B` or `\r--B` (or starting with `--B`) is refused. Names with `"`, `\`,
//! `%` or control characters are refused too: they are the characters whose reading differs
//! between parsers (quoting, RFC 2231, percent-decoding), and no real form uses them.
//!
//! Field values (parts without a filename, or with an empty one) are buffered, bounded by
//! `max_inspected_body_bytes`, and forwarded only once complete and judged; their bytes are sent
//! as the UTF-8 text that was judged (werkzeug decodes field values as UTF-8 with replacement,
//! `formparser.MultiPartParser.get_part_charset` defaulting to `utf-8`). File content streams
//! through as it arrives. A field after a file is judged when it completes: if it is refused,
//! the body ends in an error, so the upstream sees a truncated body and werkzeug's `get_data`
//! raises `ClientDisconnected` (`wsgi.LimitedStream.on_disconnect`) before Frappe builds
//! `form_dict`, and the client gets the refusal. `sid` fields are dropped for every client.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::Stream;
use http_body_util::BodyDataStream;

use super::form_dict::{FormDict, FormKey, FormValue};
use crate::{Body, BoxError};

/// Longest boundary RFC 2046 allows.
const MAX_BOUNDARY: usize = 70;

/// Most parts a body may have: werkzeug's `Request.max_form_parts` (`sansio/request.py`), past
/// which `MultipartDecoder` raises `RequestEntityTooLarge` (`sansio/multipart.py`). Frappe
/// would refuse such a body anyway; erpgate refuses it at the first part over, before reading
/// on, so no body makes it judge more than this many fields.
pub const MAX_PARTS: usize = 1000;

/// Why a multipart body was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MultipartError {
    #[error("multipart/form-data needs one boundary of 1 to 70 RFC 2046 characters")]
    Boundary,
    #[error("malformed multipart body: {0}")]
    Malformed(String),
    #[error("a multipart part has no name")]
    NoName,
    #[error("a multipart part name or filename contains '\"', '\\', '%' or a control character")]
    Name,
    #[error("a multipart part contains a line that starts with its boundary")]
    DelimiterInContent,
    #[error("the multipart form fields are larger than {0} bytes")]
    FieldsTooLarge(u64),
    #[error("a multipart body may have at most {MAX_PARTS} parts")]
    TooManyParts,
    #[error("the multipart body paused for longer than {0:?}")]
    Stalled(Duration),
}

/// werkzeug's token characters for parameter names and unquoted values (`http._parameter_re`,
/// `[\w!#$%&'*+\-.^`|~]` under `re.ASCII`), less `*`: a name ending in `*` is RFC 2231
/// (`boundary*=utf-8''evil` replaces `boundary`) and `name*0`, `name*1` are continuations that
/// werkzeug joins, so erpgate refuses every name holding one rather than model them.
fn token_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "_!#$%&'+-.^`|~".contains(c)
}

/// Reads the boundary from a `multipart/form-data` Content-Type (already checked to be
/// printable ASCII), refusing every header that werkzeug could read differently.
///
/// werkzeug 3.0 `http.parse_options_header` scans the parameters with `_parameter_re`:
/// `\s*;\s*` then `token=` (no space around `=`) then a token or a quoted string with `\`
/// escapes; parts that do not match are skipped without a word, names are lower-cased, a
/// repeated name's last value wins, `name*` takes an RFC 2231 `charset'lang'%XX` value and
/// `name*N` continues one. `formparser.FormDataParser._parse_multipart` then takes
/// `options["boundary"]`. So the one form read alike by every parser is accepted: each
/// parameter exactly `token=token` or `token="text"` (no `\`, no `"` inside), no `*`, optional
/// whitespace around `;` only, and exactly one `boundary` of 1 to 70 RFC 2046 `bchars`
/// without the space. Anything else — `boundary*`, a repeated `boundary`, `boundary = x`,
/// `boundary=a/b` unquoted (werkzeug reads `a`), escapes — is refused for every client. erpgate
/// forwards its own Content-Type anyway ([`MultipartRelay::content_type`]), so this reading
/// only decides how the client's body is split, and refuses what would be ambiguous.
pub fn boundary(content_type: &str) -> Result<String, MultipartError> {
    let mut found = None;
    for param in content_type.split(';').skip(1) {
        let param = param.trim_matches([' ', '\t']);
        // An empty part (`;;`, a trailing `;`) is skipped by werkzeug too.
        if param.is_empty() {
            continue;
        }
        let (name, value) = param.split_once('=').ok_or(MultipartError::Boundary)?;
        if name.is_empty() || !name.chars().all(token_char) {
            return Err(MultipartError::Boundary);
        }
        let value = match value.strip_prefix('"') {
            Some(quoted) => quoted
                .strip_suffix('"')
                .filter(|inner| !inner.contains(['"', '\\']))
                .ok_or(MultipartError::Boundary)?,
            None if !value.is_empty() && value.chars().all(token_char) => value,
            None => return Err(MultipartError::Boundary),
        };
        if name.eq_ignore_ascii_case("boundary") && found.replace(value).is_some() {
            return Err(MultipartError::Boundary);
        }
    }
    let value = found.ok_or(MultipartError::Boundary)?;
    let bchar = |c: char| c.is_ascii_alphanumeric() || "'()+_,-./:=?".contains(c);
    if value.is_empty() || value.len() > MAX_BOUNDARY || !value.chars().all(bchar) {
        return Err(MultipartError::Boundary);
    }
    Ok(value.to_owned())
}

/// A fresh boundary for a body erpgate writes: random, so no content a client chose can hold
/// it (the content is still checked, see [`DelimiterGuard`]).
fn own_boundary() -> String {
    format!("erpgate-{:032x}", rand::random::<u128>())
}

/// What the judge of the fields after a file part is asked.
#[derive(Debug, Clone, Copy)]
pub enum LateField<'a> {
    /// One field erpgate acts on has just completed: judged alone, once, before its bytes are
    /// queued — what no other field can make allowed (a `cmd` naming a refused method, a
    /// `filters` outside the grammar) is refused here.
    Entry(FormKey, &'a FormValue),
    /// The body is complete, with every field read: the whole request is judged once more,
    /// before the closing delimiter is sent (what a later field may still supply, a generic
    /// method's doctype, is only missing now).
    Complete(&'a FormDict),
}

/// Decides the fields that arrive after a file part. Each field is judged once and the whole
/// form once at the end, so the work is linear in the body, never quadratic.
pub type LateFieldJudge = Box<dyn Fn(LateField<'_>) -> Result<(), BoxError> + Send + Sync>;

/// Finds `--B` after a line break (or at the very start) in content streamed in chunks.
struct DelimiterGuard {
    needle: Vec<u8>,
    /// The last `needle.len() + 1` bytes seen; starts as `\n`, the end of the part's headers.
    tail: Vec<u8>,
}

impl DelimiterGuard {
    fn new(boundary: &str) -> Self {
        Self {
            needle: [b"--", boundary.as_bytes()].concat(),
            tail: b"\n".to_vec(),
        }
    }

    fn check(&mut self, chunk: &[u8]) -> Result<(), MultipartError> {
        let mut window = std::mem::take(&mut self.tail);
        window.extend_from_slice(chunk);
        let hit = memchr::memmem::find_iter(&window, &self.needle)
            .any(|i| i > 0 && matches!(window[i - 1], b'\r' | b'\n'));
        if hit {
            return Err(MultipartError::DelimiterInContent);
        }
        let keep = self.needle.len() + 1;
        window.drain(..window.len().saturating_sub(keep));
        self.tail = window;
        Ok(())
    }
}

enum Part {
    /// Between parts.
    Between,
    /// Streaming a file's content.
    File {
        field: multer::Field<'static>,
        guard: DelimiterGuard,
    },
    /// Buffering a field's value.
    Field {
        field: multer::Field<'static>,
        name: String,
        head: Bytes,
        value: Vec<u8>,
    },
    /// The closing delimiter is queued, or the body failed.
    Done,
}

/// A multipart body being read, judged and re-encoded: a [`Stream`] of the bytes to forward.
pub struct MultipartRelay {
    parts: multer::Multipart<'static>,
    /// The boundary of the body written, erpgate's own.
    boundary: String,
    part: Part,
    queue: VecDeque<Bytes>,
    form: FormDict,
    inspected: u64,
    max_inspected: u64,
    /// Parts begun so far, bounded by [`MAX_PARTS`].
    parts_seen: usize,
    judge: Option<LateFieldJudge>,
}

impl std::fmt::Debug for MultipartRelay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MultipartRelay")
            .field("boundary", &self.boundary)
            .field("form", &self.form)
            .finish_non_exhaustive()
    }
}

/// A parse error, or the client body's own error (a body limit, a broken connection) as it was.
fn malformed(e: multer::Error) -> BoxError {
    match e {
        multer::Error::StreamReadFailed(inner) => inner,
        e => Box::new(MultipartError::Malformed(e.to_string())),
    }
}

/// A name or filename every parser reads alike once written between quotes.
fn plain(s: &str, allow_percent: bool) -> bool {
    !s.chars()
        .any(|c| c.is_control() || c == '"' || c == '\\' || (c == '%' && !allow_percent))
}

impl MultipartRelay {
    /// Reads `body`, split at the client's `boundary`, and writes it again with a boundary of
    /// its own; field values may total `max_inspected` bytes.
    pub fn new(body: Body, boundary: String, max_inspected: u64) -> Self {
        Self::writing(body, boundary, own_boundary(), max_inspected)
    }

    /// [`Self::new`], writing with `own` as the boundary.
    fn writing(body: Body, client: String, own: String, max_inspected: u64) -> Self {
        let parts = multer::Multipart::new(BodyDataStream::new(body), client);
        Self {
            parts,
            boundary: own,
            part: Part::Between,
            queue: VecDeque::new(),
            form: FormDict::default(),
            inspected: 0,
            max_inspected,
            parts_seen: 0,
            judge: None,
        }
    }

    /// Reads every field before the first file part (or the whole body, if it has none), so
    /// that [`Self::form`] holds what they carry before anything is forwarded. Their re-encoded
    /// bytes wait in the relay and are the first it yields. A step (a part's start, a chunk, a
    /// part's end) that takes longer than `pause` is the client's timeout (408): a body being
    /// judged may not trickle for ever.
    pub async fn read_fields_before_files(&mut self, pause: Duration) -> Result<(), BoxError> {
        while !matches!(self.part, Part::File { .. } | Part::Done) {
            tokio::time::timeout(pause, std::future::poll_fn(|cx| self.advance(cx)))
                .await
                .map_err(|_| MultipartError::Stalled(pause))??;
        }
        Ok(())
    }

    /// The `Content-Type` of the body this relay writes: the only one to forward with it, so
    /// that what werkzeug reads is what was judged, whatever parameters the client's had.
    pub fn content_type(&self) -> http::HeaderValue {
        let value = format!("multipart/form-data; boundary={}", self.boundary);
        http::HeaderValue::from_str(&value)
            .unwrap_or_else(|_| http::HeaderValue::from_static("multipart/form-data"))
    }

    /// Whether the whole body has been read (no file part made the reading stop early).
    pub fn is_complete(&self) -> bool {
        matches!(self.part, Part::Done)
    }

    /// The `form_dict` keys read so far.
    pub fn form(&self) -> &FormDict {
        &self.form
    }

    /// Judges every field that completes from now on, with all fields read so far.
    pub fn judge_later_fields(&mut self, judge: LateFieldJudge) {
        self.judge = Some(judge);
    }

    fn head(&self, name: &str, filename: Option<&str>, content_type: Option<String>) -> Bytes {
        let mut head = format!(
            "--{}\r\nContent-Disposition: form-data; name=\"{name}\"",
            self.boundary
        );
        if let Some(filename) = filename {
            head.push_str(&format!("; filename=\"{filename}\""));
        }
        head.push_str("\r\n");
        if let Some(ct) = content_type {
            head.push_str(&format!("Content-Type: {ct}\r\n"));
        }
        head.push_str("\r\n");
        Bytes::from(head)
    }

    fn start_part(&mut self, field: multer::Field<'static>) -> Result<Part, MultipartError> {
        self.parts_seen += 1;
        if self.parts_seen > MAX_PARTS {
            return Err(MultipartError::TooManyParts);
        }
        let name = field.name().ok_or(MultipartError::NoName)?.to_owned();
        if !plain(&name, false) {
            return Err(MultipartError::Name);
        }
        match field.file_name() {
            Some(filename) if !filename.is_empty() => {
                if !plain(filename, true) {
                    return Err(MultipartError::Name);
                }
                let content_type = field.content_type().map(ToString::to_string);
                let head = self.head(&name, Some(filename), content_type);
                self.queue.push_back(head);
                Ok(Part::File {
                    field,
                    guard: DelimiterGuard::new(&self.boundary),
                })
            }
            // An empty filename is how a browser sends "no file chosen"; judged as a field
            // whichever way a parser reads it.
            filename => {
                let head = self.head(&name, filename, None);
                Ok(Part::Field {
                    field,
                    name,
                    head,
                    value: Vec::new(),
                })
            }
        }
    }

    fn finish_field(&mut self, name: &str, head: Bytes, value: &[u8]) -> Result<(), BoxError> {
        DelimiterGuard::new(&self.boundary).check(value)?;
        let text = String::from_utf8_lossy(value).into_owned();
        let key = FormKey::of_any(name);
        if key == FormKey::Sid {
            return Ok(());
        }
        self.form.push(name, || FormValue::Text(text.clone()));
        if let (Some(judge), Some(entry)) = (&self.judge, self.form.entries().last()) {
            judge(LateField::Entry(key, &entry.value))?;
        }
        self.queue.push_back(head);
        self.queue.push_back(Bytes::from(text));
        self.queue.push_back(Bytes::from_static(b"\r\n"));
        Ok(())
    }

    /// Takes one step: a part starts, a chunk arrives, a part or the body ends.
    fn advance(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        let step = match std::mem::replace(&mut self.part, Part::Done) {
            Part::Between => match self.parts.poll_next_field(cx) {
                Poll::Pending => {
                    self.part = Part::Between;
                    return Poll::Pending;
                }
                Poll::Ready(Err(e)) => Err(malformed(e)),
                Poll::Ready(Ok(None)) => {
                    if let Some(judge) = &self.judge {
                        judge(LateField::Complete(&self.form))?;
                    }
                    let end = format!("--{}--\r\n", self.boundary);
                    self.queue.push_back(Bytes::from(end));
                    Ok(Part::Done)
                }
                Poll::Ready(Ok(Some(field))) => self.start_part(field).map_err(Into::into),
            },
            Part::File {
                mut field,
                mut guard,
            } => match Pin::new(&mut field).poll_next(cx) {
                Poll::Pending => {
                    self.part = Part::File { field, guard };
                    return Poll::Pending;
                }
                Poll::Ready(Some(Err(e))) => Err(malformed(e)),
                Poll::Ready(Some(Ok(chunk))) => match guard.check(&chunk) {
                    Ok(()) => {
                        self.queue.push_back(chunk);
                        Ok(Part::File { field, guard })
                    }
                    Err(e) => Err(e.into()),
                },
                Poll::Ready(None) => {
                    self.queue.push_back(Bytes::from_static(b"\r\n"));
                    Ok(Part::Between)
                }
            },
            Part::Field {
                mut field,
                name,
                head,
                mut value,
            } => match Pin::new(&mut field).poll_next(cx) {
                Poll::Pending => {
                    self.part = Part::Field {
                        field,
                        name,
                        head,
                        value,
                    };
                    return Poll::Pending;
                }
                Poll::Ready(Some(Err(e))) => Err(malformed(e)),
                Poll::Ready(Some(Ok(chunk))) => {
                    self.inspected += chunk.len() as u64;
                    if self.inspected > self.max_inspected {
                        Err(MultipartError::FieldsTooLarge(self.max_inspected).into())
                    } else {
                        value.extend_from_slice(&chunk);
                        Ok(Part::Field {
                            field,
                            name,
                            head,
                            value,
                        })
                    }
                }
                Poll::Ready(None) => self
                    .finish_field(&name, head, &value)
                    .map(|()| Part::Between),
            },
            Part::Done => Ok(Part::Done),
        };
        Poll::Ready(step.map(|part| self.part = part))
    }
}

impl Stream for MultipartRelay {
    type Item = Result<Bytes, BoxError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Some(bytes) = this.queue.pop_front() {
                return Poll::Ready(Some(Ok(bytes)));
            }
            if matches!(this.part, Part::Done) {
                return Poll::Ready(None);
            }
            if let Err(e) = ready!(this.advance(cx)) {
                this.part = Part::Done;
                this.queue.clear();
                return Poll::Ready(Some(Err(e)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;

    fn relay(body: &str, max: u64) -> MultipartRelay {
        MultipartRelay::writing(
            crate::full_body(body.to_owned()),
            "XyZ".into(),
            "XyZ".into(),
            max,
        )
    }

    async fn forwarded(mut relay: MultipartRelay) -> Result<String, BoxError> {
        relay
            .read_fields_before_files(Duration::from_secs(5))
            .await?;
        let mut out = Vec::new();
        while let Some(chunk) = relay.next().await {
            out.extend_from_slice(&chunk?);
        }
        Ok(String::from_utf8(out).unwrap())
    }

    #[test]
    fn boundaries() {
        assert_eq!(
            boundary("multipart/form-data; boundary=abc-1").unwrap(),
            "abc-1"
        );
        assert_eq!(
            boundary("multipart/form-data; BOUNDARY=\"a'b\"").unwrap(),
            "a'b"
        );
        for bad in [
            "multipart/form-data",
            "multipart/form-data; boundary=",
            "multipart/form-data; boundary=a b",
            "multipart/form-data; boundary=a; boundary=b",
            "multipart/form-data; boundary=a\"b",
            // What werkzeug reads another way (RFC 2231, continuations, last-wins, skipped
            // parts, escapes).
            "multipart/form-data; boundary=good; boundary*=utf-8''evil",
            "multipart/form-data; boundary*=utf-8''evil",
            "multipart/form-data; boundary*0=ev; boundary*1=il",
            "multipart/form-data; boundary=good; charset*=utf-8''x",
            "multipart/form-data; boundary=a; BOUNDARY=b",
            "multipart/form-data; boundary = a",
            "multipart/form-data; boundary=a/b",
            "multipart/form-data; boundary=\"a\\\"b\"",
            "multipart/form-data; boundary=\"ab",
            "multipart/form-data; boundary=a; junk",
            "multipart/form-data; boundary=a b=c",
        ] {
            assert!(boundary(bad).is_err(), "{bad}");
        }
        assert!(boundary(&format!("multipart/form-data; boundary={}", "a".repeat(71))).is_err());
        for good in [
            "multipart/form-data; boundary=abc; charset=utf-8",
            "multipart/form-data;boundary=abc;",
            "multipart/form-data; boundary=\"abc\"",
        ] {
            assert_eq!(boundary(good).unwrap(), "abc", "{good}");
        }
    }

    #[tokio::test]
    async fn the_body_is_written_under_a_boundary_of_its_own() {
        let body =
            "--client\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\n1\r\n--client--\r\n";
        let relay = MultipartRelay::new(crate::full_body(body), "client".into(), 100);
        let content_type = relay.content_type();
        let own = boundary(content_type.to_str().unwrap()).unwrap();
        assert!(own.starts_with("erpgate-") && own.len() == 40, "{own}");
        let other = MultipartRelay::new(crate::full_body(body), "client".into(), 100);
        assert_ne!(other.content_type(), content_type);
        let written = forwarded(relay).await.unwrap();
        assert_eq!(
            written,
            format!(
                "--{own}\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\n1\r\n--{own}--\r\n"
            )
        );
    }

    #[tokio::test]
    async fn fields_and_files_are_re_encoded_plainly() {
        let body = "preamble\r\n--XyZ\r\ncontent-disposition: form-data; name=a\r\n\r\n1\r\n\
             --XyZ\r\nContent-Disposition: form-data; name=\"f\"; filename=\"x.txt\"\r\n\
             Content-Type: text/plain\r\nX-Other: y\r\n\r\nfile\r\nbody\r\n\
             --XyZ\r\nContent-Disposition: form-data; name=\"sid\"\r\n\r\nabc\r\n\
             --XyZ\r\nContent-Disposition: form-data; name=\"cmd\"\r\n\r\nping\r\n--XyZ--\r\nepilogue";
        let mut relay = relay(body, 100);
        relay
            .read_fields_before_files(Duration::from_secs(5))
            .await
            .unwrap();
        assert!(!relay.form().has(FormKey::Cmd));
        let queued: Vec<u8> = relay.queue.iter().flat_map(|b| b.to_vec()).collect();
        assert_eq!(
            &queued[..],
            b"--XyZ\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\n1\r\n\
              --XyZ\r\nContent-Disposition: form-data; name=\"f\"; filename=\"x.txt\"\r\n\
              Content-Type: text/plain\r\n\r\n"
        );
        let all = forwarded(relay).await.unwrap();
        assert_eq!(
            all.split_at(queued.len()).1,
            "file\r\nbody\r\n--XyZ\r\nContent-Disposition: form-data; name=\"cmd\"\r\n\r\nping\r\n--XyZ--\r\n"
        );
    }

    #[tokio::test]
    async fn a_late_field_is_judged_and_can_end_the_body() {
        let body = "--XyZ\r\nContent-Disposition: form-data; name=\"f\"; filename=\"x\"\r\n\r\ndata\r\n\
             --XyZ\r\nContent-Disposition: form-data; name=\"cmd\"\r\n\r\nfrappe.client.insert\r\n--XyZ--\r\n";
        let mut relay = relay(body, 100);
        relay
            .read_fields_before_files(Duration::from_secs(5))
            .await
            .unwrap();
        relay.judge_later_fields(Box::new(|late: LateField<'_>| match late {
            LateField::Entry(FormKey::Cmd, _) => Err("refused".into()),
            _ => Ok(()),
        }));
        let mut sent = Vec::new();
        let mut failed = false;
        while let Some(chunk) = relay.next().await {
            match chunk {
                Ok(c) => sent.extend_from_slice(&c),
                Err(_) => failed = true,
            }
        }
        assert!(failed);
        assert!(!String::from_utf8_lossy(&sent).contains("frappe.client.insert"));
    }

    #[tokio::test]
    async fn what_werkzeug_would_split_differently_is_refused() {
        // A bare `\n--XyZ` inside a value is a delimiter to werkzeug, not to multer.
        for content in [
            "x\n--XyZ\r\nContent-Disposition: form-data; name=\"cmd\"\r\n\r\ny",
            "--XyZ-",
            "a\r--XyZ",
        ] {
            let body = format!(
                "--XyZ\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\n{content}\r\n--XyZ--\r\n"
            );
            assert!(forwarded(relay(&body, 1000)).await.is_err(), "{content:?}");
            let file = format!(
                "--XyZ\r\nContent-Disposition: form-data; name=\"a\"; filename=\"f\"\r\n\r\n{content}\r\n--XyZ--\r\n"
            );
            assert!(forwarded(relay(&file, 1000)).await.is_err(), "{content:?}");
        }
        for name in ["c%6Dd", "a\\b"] {
            let body = format!(
                "--XyZ\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\nv\r\n--XyZ--\r\n"
            );
            assert!(forwarded(relay(&body, 1000)).await.is_err(), "{name}");
        }
        let nameless = "--XyZ\r\nContent-Disposition: form-data\r\n\r\nv\r\n--XyZ--\r\n";
        assert!(forwarded(relay(nameless, 1000)).await.is_err());
        let truncated = "--XyZ\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\nv";
        assert!(forwarded(relay(truncated, 1000)).await.is_err());
    }

    #[tokio::test]
    async fn field_values_are_bounded_but_files_are_not() {
        let big = "v".repeat(200);
        let field = format!(
            "--XyZ\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\n{big}\r\n--XyZ--\r\n"
        );
        assert!(forwarded(relay(&field, 100)).await.is_err());
        let file = format!(
            "--XyZ\r\nContent-Disposition: form-data; name=\"a\"; filename=\"f\"\r\n\r\n{big}\r\n--XyZ--\r\n"
        );
        assert!(forwarded(relay(&file, 100)).await.unwrap().contains(&big));
    }

    #[tokio::test]
    async fn parts_are_capped_as_werkzeug_caps_them() {
        let part = "--XyZ\r\nContent-Disposition: form-data; name=\"x\"\r\n\r\nv\r\n";
        let body = |n: usize| format!("{}--XyZ--\r\n", part.repeat(n));
        assert!(forwarded(relay(&body(MAX_PARTS), 1 << 20)).await.is_ok());
        let e = forwarded(relay(&body(MAX_PARTS + 1), 1 << 20))
            .await
            .unwrap_err();
        assert_eq!(
            e.downcast_ref::<MultipartError>(),
            Some(&MultipartError::TooManyParts)
        );
    }

    #[tokio::test]
    async fn each_late_field_is_judged_once_and_the_whole_form_once() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::Arc;
        let file =
            "--XyZ\r\nContent-Disposition: form-data; name=\"f\"; filename=\"x\"\r\n\r\nd\r\n";
        let field = |name: &str| {
            format!("--XyZ\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\nv\r\n")
        };
        let body = format!(
            "{file}{}{}--XyZ--\r\n",
            field("fields").repeat(300),
            field("other").repeat(300)
        );
        let mut relay = relay(&body, 1 << 20);
        relay
            .read_fields_before_files(Duration::from_secs(5))
            .await
            .unwrap();
        let (entries, wholes) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (e, w) = (entries.clone(), wholes.clone());
        relay.judge_later_fields(Box::new(move |late: LateField<'_>| {
            match late {
                LateField::Entry(..) => e.fetch_add(1, Ordering::Relaxed),
                LateField::Complete(form) => {
                    assert_eq!(form.values(FormKey::Fields).count(), 300);
                    assert_eq!(form.values_named("other").count(), 300);
                    w.fetch_add(1, Ordering::Relaxed)
                }
            };
            Ok(())
        }));
        while let Some(chunk) = relay.next().await {
            chunk.unwrap();
        }
        // Every field is offered once (any may be an argument of the function called), and
        // the whole form once.
        assert_eq!(entries.load(Ordering::Relaxed), 600);
        assert_eq!(wholes.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn the_guard_sees_delimiters_across_chunks() {
        let mut guard = DelimiterGuard::new("XyZ");
        guard.check(b"abc\r").unwrap();
        assert!(guard.check(b"--XyZ").is_err());
        let mut guard = DelimiterGuard::new("XyZ");
        guard.check(b"abc--").unwrap();
        guard.check(b"XyZ").unwrap();
        let mut guard = DelimiterGuard::new("XyZ");
        assert!(guard
            .check(b"--X")
            .and_then(|()| guard.check(b"yZ"))
            .is_err());
    }
}
