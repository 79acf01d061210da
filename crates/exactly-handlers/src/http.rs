//! `http`: POSTs a job's payload to a URL configured on the node.
//!
//! This is how jobs reach a service written in any language without a process per attempt. The
//! URL comes from the node's configuration (`[http.<kind>]`), never from the job, for the same
//! reason as `exec`'s command: a client that may submit jobs must not be able to make the nodes
//! call arbitrary addresses.
//!
//! Every request carries what the receiving service needs to apply the job's effect once: the
//! job's `Idempotency-Key` (the same for every attempt), `X-Exactly-Job-Id`,
//! `X-Exactly-Attempt`, `X-Exactly-Fencing-Token` (strictly increasing per job), and a W3C
//! `traceparent` whose trace id is derived from the job id (every attempt of a job is one trace)
//! and whose span id is the fencing token (one span per attempt).
//!
//! The outcome follows the status: 2xx succeeds (the first `response-bytes-max` bytes of the body
//! are the job's result); 408, 429 and 5xx, connection errors and timeouts are retryable; every
//! other status is permanent. Redirects are not followed (see [`classify`]). When the
//! cancellation token fires, the request is dropped at once (its connection is closed) and the
//! attempt ends as [`HandlerOutcome::cancelled`].
//!
//! The client is hyper-util's pooled HTTP/1.1 client; `https://` goes through rustls with the
//! `ring` provider and the bundled Mozilla roots (`webpki-roots`), so the build needs no OpenSSL
//! and the node trusts the same roots on every machine. Proxy variables in the environment are
//! not read: the handler connects to the configured host itself.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::{BoxFuture, FutureExt};
use http::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE, LOCATION, USER_AGENT};
use http::{Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::{Handler, HandlerOutcome, JobContext, SpecError};

/// Default of [`HttpSpec::connect_timeout`].
pub const CONNECT_TIMEOUT_DEFAULT: Duration = Duration::from_secs(5);

/// Default of [`HttpSpec::response_bytes_max`]; matches the result size the state machine keeps.
pub const RESPONSE_BYTES_MAX_DEFAULT: usize = 4096;

/// Bytes of a response body a spec may keep as the result, at most.
pub const RESPONSE_BYTES_MAX_CEILING: usize = 1024 * 1024;

/// Bytes of an error response's body quoted in the attempt's error, at most.
pub const ERROR_BODY_BYTES_MAX: usize = 512;

/// Static headers a spec may set, at most.
pub const HEADERS_MAX: usize = 64;

/// How long an idle pooled connection is kept for the next attempt.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// The content type of the payload unless the spec's `headers` set one: the payload is opaque
/// bytes to exactly.
const CONTENT_TYPE_DEFAULT: &str = "application/octet-stream";

/// Headers the handler sets for every attempt (they describe the attempt and must be accurate),
/// or that HTTP framing owns. A spec's `headers` may not set them; nor any `x-exactly-*`.
const RESERVED_HEADERS: [&str; 9] = [
    "idempotency-key",
    "traceparent",
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "upgrade",
    "te",
];

/// A URL that a node POSTs jobs of one kind to: `[http.<kind>]` in the node's configuration.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct HttpSpec {
    /// Where to POST: `http://host:port/path?query`, or `https://`. `{job_id}`, `{attempt}`,
    /// `{fencing_token}` and `{node_id}` are replaced by the attempt's values, for services
    /// that take them in the URL rather than in the headers.
    pub url: String,
    /// How long opening the TCP connection may take.
    #[serde(default = "connect_timeout_default", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// How long the whole exchange (connect, send, the response and its body) may take.
    /// Unset: the job's own timeout (the executor cancels the attempt then in any case).
    #[serde(default, with = "humantime_serde")]
    pub request_timeout: Option<Duration>,
    /// Headers sent with every request, e.g. `{ Authorization = "Bearer …" }`. May override
    /// `Content-Type` (default `application/octet-stream`) and `User-Agent`.
    #[serde(default)]
    pub headers: std::collections::BTreeMap<String, String>,
    /// Bytes kept from the start of a 2xx response's body as the job's result.
    #[serde(default = "response_bytes_max_default")]
    pub response_bytes_max: usize,
}

fn connect_timeout_default() -> Duration {
    CONNECT_TIMEOUT_DEFAULT
}

fn response_bytes_max_default() -> usize {
    RESPONSE_BYTES_MAX_DEFAULT
}

/// A URL as error texts show it: scheme, host, port and path, with a query (which may carry an
/// API key) replaced by `?…`. Credentials in the authority are refused by validation.
fn shown_uri(uri: &Uri) -> String {
    let base = format!(
        "{}://{}{}",
        uri.scheme_str().unwrap_or("http"),
        uri.authority().map_or("", |a| a.as_str()),
        uri.path()
    );
    match uri.query() {
        Some(_) => format!("{base}?…"),
        None => base,
    }
}

impl HttpSpec {
    /// A spec POSTing to `url` with the defaults for everything else.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            connect_timeout: CONNECT_TIMEOUT_DEFAULT,
            request_timeout: None,
            headers: std::collections::BTreeMap::new(),
            response_bytes_max: RESPONSE_BYTES_MAX_DEFAULT,
        }
    }

    /// Checks every value.
    pub fn validate(&self) -> Result<(), SpecError> {
        self.prepare().map(|_| ())
    }

    /// Checks every value and returns the URL template and the static headers, parsed.
    fn prepare(&self) -> Result<(UrlTemplate, HeaderMap), SpecError> {
        let url =
            UrlTemplate::parse(&self.url).map_err(|why| SpecError::new("url", &self.url, why))?;
        if self.connect_timeout.is_zero() {
            return Err(SpecError::new(
                "connect-timeout",
                humantime::format_duration(self.connect_timeout).to_string(),
                "must be positive",
            ));
        }
        if let Some(timeout) = self.request_timeout.filter(|t| t.is_zero()) {
            return Err(SpecError::new(
                "request-timeout",
                humantime::format_duration(timeout).to_string(),
                "must be positive (leave it unset for the job's timeout)",
            ));
        }
        if !(1..=RESPONSE_BYTES_MAX_CEILING).contains(&self.response_bytes_max) {
            return Err(SpecError::new(
                "response-bytes-max",
                self.response_bytes_max,
                format!("must be 1..={RESPONSE_BYTES_MAX_CEILING}"),
            ));
        }
        if self.headers.len() > HEADERS_MAX {
            return Err(SpecError::new(
                "headers",
                self.headers.len(),
                format!("at most {HEADERS_MAX} headers"),
            ));
        }
        let mut headers = HeaderMap::new();
        for (name, value) in &self.headers {
            let key = format!("headers.{name}");
            let parsed = HeaderName::from_str(name)
                .map_err(|_| SpecError::new(&key, name, "not a valid header name"))?;
            if RESERVED_HEADERS.contains(&parsed.as_str())
                || parsed.as_str().starts_with("x-exactly-")
            {
                return Err(SpecError::new(
                    &key,
                    name,
                    "set by the handler for every attempt (or by HTTP itself)",
                ));
            }
            let value = HeaderValue::from_str(value).map_err(|_| {
                SpecError::new(
                    &key,
                    value,
                    "not a valid header value (no control characters)",
                )
            })?;
            if headers.insert(parsed, value).is_some() {
                return Err(SpecError::new(
                    &key,
                    name,
                    "set twice (header names are case-insensitive)",
                ));
            }
        }
        Ok((url, headers))
    }
}

/// The `traceparent` header of an attempt (W3C Trace Context, version 00, sampled).
///
/// The trace id is derived from the job id alone, so every attempt of a job, on any node, lands
/// in one trace: its low 64 bits are the job id (readable in a tracing UI), its high 64 bits a
/// fixed mix of it (so ids of consecutive jobs do not share a long prefix). The span id is the
/// fencing token, which differs per attempt and matches `X-Exactly-Fencing-Token`. Neither is
/// ever all zeros (invalid): the low half of the trace id is zero only for job 0, whose high half
/// is not, and tokens start at 1.
pub fn traceparent(job_id: u64, fencing_token: u64) -> String {
    let span = fencing_token.max(1);
    format!("00-{:016x}{job_id:016x}-{span:016x}-01", mix64(job_id))
}

/// SplitMix64's finalizer: a fixed bijection that spreads the bits of its input.
fn mix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// One piece of a URL template.
#[derive(Clone, Debug)]
enum Part {
    Text(String),
    JobId,
    Attempt,
    FencingToken,
    NodeId,
}

/// A URL with `{placeholders}`, checked once when the spec is validated.
#[derive(Clone, Debug)]
struct UrlTemplate {
    parts: Vec<Part>,
}

impl UrlTemplate {
    fn parse(url: &str) -> Result<Self, String> {
        let mut parts = Vec::new();
        let mut rest = url;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(Part::Text(rest[..open].to_string()));
            }
            let Some(close) = rest[open..].find('}') else {
                return Err("a `{` without its `}`".to_string());
            };
            let name = &rest[open + 1..open + close];
            parts.push(match name {
                "job_id" => Part::JobId,
                "attempt" => Part::Attempt,
                "fencing_token" => Part::FencingToken,
                "node_id" => Part::NodeId,
                _ => {
                    return Err(format!(
                        "unknown placeholder {{{name}}} (known: {{job_id}}, {{attempt}}, \
                         {{fencing_token}}, {{node_id}})"
                    ))
                }
            });
            rest = &rest[open + close + 1..];
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_string()));
        }
        let template = Self { parts };
        // Every placeholder renders as digits, so a URL valid with sample values is valid for
        // every attempt.
        let uri = template.render(1, 1, 1, 1)?;
        match uri.scheme_str() {
            Some("http" | "https") => {}
            _ => return Err("must start with http:// or https://".to_string()),
        }
        let Some(authority) = uri.authority() else {
            return Err("names no host".to_string());
        };
        if authority.host().is_empty() {
            return Err("names no host".to_string());
        }
        if authority.as_str().contains('@') {
            return Err("must not hold credentials (send them in `headers`)".to_string());
        }
        Ok(template)
    }

    fn render(
        &self,
        job_id: u64,
        attempt: u32,
        fencing_token: u64,
        node_id: u64,
    ) -> Result<Uri, String> {
        let mut url = String::new();
        for part in &self.parts {
            match part {
                Part::Text(text) => url.push_str(text),
                Part::JobId => url.push_str(&job_id.to_string()),
                Part::Attempt => url.push_str(&attempt.to_string()),
                Part::FencingToken => url.push_str(&fencing_token.to_string()),
                Part::NodeId => url.push_str(&node_id.to_string()),
            }
        }
        Uri::from_str(&url).map_err(|err| format!("not a valid URL: {err}"))
    }
}

type HttpClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// POSTs each job of its kind to an [`HttpSpec`]'s URL. Holds one connection pool, shared by
/// every attempt this handler runs.
#[derive(Clone)]
pub struct HttpHandler {
    inner: Arc<Inner>,
}

struct Inner {
    spec: HttpSpec,
    url: UrlTemplate,
    headers: HeaderMap,
    client: HttpClient,
}

impl std::fmt::Debug for HttpHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpHandler")
            .field("spec", &self.inner.spec)
            .finish_non_exhaustive()
    }
}

impl HttpHandler {
    /// A handler for `spec`, after checking it.
    pub fn new(spec: HttpSpec) -> Result<Self, SpecError> {
        let (url, headers) = spec.prepare()?;
        let mut http = HttpConnector::new();
        // The https connector below hands us https:// URLs too.
        http.enforce_http(false);
        http.set_connect_timeout(Some(spec.connect_timeout));
        http.set_nodelay(true);
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())
            .map_err(|err| SpecError::new("url", &spec.url, format!("cannot set up TLS: {err}")))?
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .build(https);
        Ok(Self {
            inner: Arc::new(Inner {
                spec,
                url,
                headers,
                client,
            }),
        })
    }

    /// The spec this handler runs.
    pub fn spec(&self) -> &HttpSpec {
        &self.inner.spec
    }
}

impl Handler for HttpHandler {
    fn run(
        &self,
        ctx: JobContext,
        cancel: CancellationToken,
    ) -> BoxFuture<'static, HandlerOutcome> {
        run(Arc::clone(&self.inner), ctx, cancel).boxed()
    }
}

async fn run(inner: Arc<Inner>, ctx: JobContext, cancel: CancellationToken) -> HandlerOutcome {
    if cancel.is_cancelled() {
        return HandlerOutcome::cancelled();
    }
    let uri = match inner
        .url
        .render(ctx.job_id, ctx.attempt, ctx.fencing_token, ctx.node_id)
    {
        Ok(uri) => uri,
        // Unreachable: the template was checked with values of the same shape.
        Err(why) => return HandlerOutcome::permanent(format!("url of kind {}: {why}", ctx.kind)),
    };
    // What errors (stored in the job, shown to every reader) may say of the URL: not its query,
    // which may carry a key.
    let shown = shown_uri(&uri);
    let request = match build_request(&inner, &ctx, uri.clone()) {
        Ok(request) => request,
        Err(outcome) => return outcome,
    };
    let timeout = inner.spec.request_timeout.unwrap_or(ctx.timeout);
    tracing::debug!(job_id = ctx.job_id, attempt = ctx.attempt, %uri, "http request");
    let exchange = tokio::time::timeout(
        timeout,
        exchange(&inner.client, request, inner.spec.response_bytes_max),
    );
    tokio::select! {
        // Biased towards the response: a request that completed as the token fired did its
        // work, and reporting it is the truth (a stale attempt's completion is refused upstream).
        biased;
        outcome = exchange => match outcome {
            Ok(outcome) => outcome.map_err(|why| format!("POST {shown}: {why}")).into_outcome(),
            Err(_) => HandlerOutcome::retryable(format!(
                "POST {shown}: no complete response within {}",
                humantime::format_duration(timeout)
            )),
        },
        // Dropping the exchange closes its connection: the server sees the request end.
        () = cancel.cancelled() => HandlerOutcome::cancelled(),
    }
}

/// The request of one attempt: the spec's headers, then the attempt's.
fn build_request(
    inner: &Inner,
    ctx: &JobContext,
    uri: Uri,
) -> Result<Request<Full<Bytes>>, HandlerOutcome> {
    let mut headers = inner.headers.clone();
    headers
        .entry(CONTENT_TYPE)
        .or_insert(HeaderValue::from_static(CONTENT_TYPE_DEFAULT));
    headers
        .entry(USER_AGENT)
        .or_insert(HeaderValue::from_static(concat!(
            "exactly/",
            env!("CARGO_PKG_VERSION")
        )));
    let idempotency_key = HeaderValue::from_str(&ctx.idempotency_key).map_err(|_| {
        HandlerOutcome::permanent(format!(
            "the idempotency key {:?} cannot be sent as an HTTP header value",
            ctx.idempotency_key
        ))
    })?;
    headers.insert(HeaderName::from_static("idempotency-key"), idempotency_key);
    let numbers = [
        ("x-exactly-job-id", ctx.job_id),
        ("x-exactly-attempt", u64::from(ctx.attempt)),
        ("x-exactly-fencing-token", ctx.fencing_token),
        ("x-exactly-node-id", ctx.node_id),
    ];
    for (name, value) in numbers {
        headers.insert(HeaderName::from_static(name), HeaderValue::from(value));
    }
    let traceparent = traceparent(ctx.job_id, ctx.fencing_token);
    headers.insert(
        HeaderName::from_static("traceparent"),
        HeaderValue::from_str(&traceparent).map_err(|_| {
            HandlerOutcome::permanent(format!("traceparent {traceparent:?} is not a header value"))
        })?,
    );
    let mut request = Request::builder()
        .method(Method::POST)
        .uri(uri)
        .body(Full::new(Bytes::from(ctx.payload.clone())))
        .map_err(|err| HandlerOutcome::permanent(format!("building the request: {err}")))?;
    *request.headers_mut() = headers;
    Ok(request)
}

/// What one exchange came to, before the URL is put in front of its error.
enum Exchanged {
    Succeeded(Vec<u8>),
    Failed { why: String, retryable: bool },
}

impl Exchanged {
    fn map_err(self, f: impl FnOnce(String) -> String) -> Self {
        match self {
            Self::Failed { why, retryable } => Self::Failed {
                why: f(why),
                retryable,
            },
            ok => ok,
        }
    }

    fn into_outcome(self) -> HandlerOutcome {
        match self {
            Self::Succeeded(result) => HandlerOutcome::Succeeded(result),
            Self::Failed { why, retryable } => HandlerOutcome::Failed {
                error: why,
                retryable,
            },
        }
    }
}

/// How a response status ends the attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatusClass {
    /// 2xx.
    Success,
    /// 408, 429 and 5xx: the server may do better later, or another node may reach a healthier
    /// instance.
    Retryable,
    /// Every other status: the same request would get the same answer. That includes 3xx: a
    /// redirect is not followed, because a client following it may replay the POST as a GET
    /// (301, 302, 303) and would send the job's payload, idempotency key and tokens to an
    /// address that nobody configured and that may not deduplicate; configure the final URL.
    Permanent,
}

/// The status mapping of the `http` handler.
pub fn classify(status: StatusCode) -> StatusClass {
    match status.as_u16() {
        200..=299 => StatusClass::Success,
        408 | 429 | 500..=599 => StatusClass::Retryable,
        _ => StatusClass::Permanent,
    }
}

async fn exchange(
    client: &HttpClient,
    request: Request<Full<Bytes>>,
    response_bytes_max: usize,
) -> Exchanged {
    let response = match client.request(request).await {
        Ok(response) => response,
        // Refused, reset, unreachable, a TLS handshake that failed, a connect timeout: nothing
        // says the job is at fault, and the downstream dedupes a request that did arrive.
        Err(err) => {
            return Exchanged::Failed {
                why: error_chain(&err),
                retryable: true,
            }
        }
    };
    let status = response.status();
    let class = classify(status);
    let location = response
        .headers()
        .get(LOCATION)
        .map(|l| String::from_utf8_lossy(l.as_bytes()).into_owned());
    let limit = match class {
        StatusClass::Success => response_bytes_max,
        _ => ERROR_BODY_BYTES_MAX,
    };
    let mut body = response.into_body();
    let mut kept = Vec::new();
    let mut truncated = false;
    while kept.len() <= limit {
        match body.frame().await {
            None => break,
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    kept.extend_from_slice(&data);
                }
            }
            Some(Err(err)) => {
                if class == StatusClass::Success {
                    // The server reported success but the body broke off: we cannot tell what it
                    // did, and another attempt is safe (same idempotency key).
                    return Exchanged::Failed {
                        why: format!(
                            "HTTP {status}, then the body broke off: {}",
                            error_chain(&err)
                        ),
                        retryable: true,
                    };
                }
                break;
            }
        }
    }
    if kept.len() > limit {
        // The rest of the body is not read: dropping it closes the connection.
        kept.truncate(limit);
        truncated = true;
    }
    match class {
        StatusClass::Success => Exchanged::Succeeded(kept),
        StatusClass::Retryable | StatusClass::Permanent => {
            let snippet = String::from_utf8_lossy(&kept);
            let snippet = snippet.trim();
            let mut why = format!("HTTP {status}");
            if status.is_redirection() {
                why.push_str(" (redirects are not followed; configure the final URL");
                if let Some(location) = location {
                    why.push_str(&format!(": Location {location:?}"));
                }
                why.push(')');
            }
            if !snippet.is_empty() {
                why.push_str(": ");
                why.push_str(snippet);
                if truncated {
                    why.push('…');
                }
            }
            Exchanged::Failed {
                why,
                retryable: class == StatusClass::Retryable,
            }
        }
    }
}

/// An error and its sources, `outer: inner: innermost`.
fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(inner) = source {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The trace id depends on the job id only, the span id on the token only; both have the
    /// W3C shape and are never all zeros.
    #[test]
    fn traceparent_shape() {
        let a = traceparent(7, 42);
        let b = traceparent(7, 43);
        assert_eq!(a.len(), 55, "{a}");
        assert_eq!(&a[..3], "00-");
        assert_eq!(&a[3..35], &b[3..35], "one trace per job");
        assert_ne!(&a[36..52], &b[36..52], "one span per token");
        assert_eq!(&a[36..52], "000000000000002a");
        assert!(a.ends_with("-01"));
        assert!(a[3..35].ends_with("0000000000000007"));
        assert_ne!(&traceparent(8, 42)[3..35], &a[3..35]);
        let zero = traceparent(0, 0);
        assert_ne!(&zero[3..35], "0".repeat(32));
        assert_ne!(&zero[36..52], "0".repeat(16));
    }

    /// The status classes: 2xx success; 408, 429, 5xx retryable; every other status, 3xx
    /// included, permanent.
    #[test]
    fn statuses_are_classified() {
        let class = |code: u16| classify(StatusCode::from_u16(code).expect("status"));
        for code in [200, 201, 202, 204, 299] {
            assert_eq!(class(code), StatusClass::Success, "{code}");
        }
        for code in [408, 429, 500, 502, 503, 504, 599] {
            assert_eq!(class(code), StatusClass::Retryable, "{code}");
        }
        for code in [
            100, 301, 302, 303, 307, 308, 400, 401, 403, 404, 409, 410, 422, 499, 600,
        ] {
            assert_eq!(class(code), StatusClass::Permanent, "{code}");
        }
    }

    /// Error texts show a URL without its query, which may carry a key.
    #[test]
    fn errors_do_not_show_a_urls_query() {
        let uri = Uri::from_static("https://hooks.example.com:8443/v1/mail?api_key=s3cret&x=1");
        assert_eq!(shown_uri(&uri), "https://hooks.example.com:8443/v1/mail?…");
        let plain = Uri::from_static("http://127.0.0.1:9090/effect");
        assert_eq!(shown_uri(&plain), "http://127.0.0.1:9090/effect");
    }

    /// Placeholders render the attempt's values; unknown ones, unclosed braces, other schemes,
    /// credentials and hostless URLs are refused with the key `url`.
    #[test]
    fn url_templates() {
        let t = UrlTemplate::parse(
            "http://127.0.0.1:9090/effect?job={job_id}&token={fencing_token}&node={node_id}&a={attempt}",
        )
        .expect("valid");
        assert_eq!(
            t.render(7, 2, 42, 3).expect("renders").to_string(),
            "http://127.0.0.1:9090/effect?job=7&token=42&node=3&a=2"
        );
        let plain = UrlTemplate::parse("https://example.com/hook").expect("valid");
        assert_eq!(
            plain.render(1, 1, 1, 1).expect("renders").to_string(),
            "https://example.com/hook"
        );
        for bad in [
            "http://h/{job}",
            "http://h/{job_id",
            "ftp://h/x",
            "127.0.0.1:9090/x",
            "/relative",
            "http://user:pw@h/x",
            "http:///x",
            "",
        ] {
            let err = HttpSpec::new(bad).validate().expect_err(bad);
            assert_eq!(err.key, "url", "{bad}");
        }
    }

    /// Validation names the key of a zero timeout, an out-of-range response limit, a reserved or
    /// malformed header.
    #[test]
    fn validation_names_the_key() {
        let key = |spec: HttpSpec| spec.validate().expect_err("invalid").key;
        let ok = HttpSpec::new("http://127.0.0.1:1/");
        ok.validate().expect("valid");
        assert_eq!(
            key(HttpSpec {
                connect_timeout: Duration::ZERO,
                ..ok.clone()
            }),
            "connect-timeout"
        );
        assert_eq!(
            key(HttpSpec {
                request_timeout: Some(Duration::ZERO),
                ..ok.clone()
            }),
            "request-timeout"
        );
        assert_eq!(
            key(HttpSpec {
                response_bytes_max: 0,
                ..ok.clone()
            }),
            "response-bytes-max"
        );
        for (name, value, expected) in [
            ("Idempotency-Key", "x", "headers.Idempotency-Key"),
            ("X-Exactly-Job-Id", "1", "headers.X-Exactly-Job-Id"),
            ("traceparent", "x", "headers.traceparent"),
            ("Content-Length", "1", "headers.Content-Length"),
            ("bad name", "x", "headers.bad name"),
            ("X-Ok", "line\nbreak", "headers.X-Ok"),
        ] {
            let mut spec = ok.clone();
            spec.headers.insert(name.to_string(), value.to_string());
            assert_eq!(key(spec), expected);
        }
        let mut spec = ok.clone();
        spec.headers
            .insert("Content-Type".to_string(), "application/json".to_string());
        spec.headers
            .insert("Authorization".to_string(), "Bearer t".to_string());
        spec.validate().expect("overridable headers");
    }

    /// A spec table parses with kebab-case keys, humane durations and defaults.
    #[test]
    fn spec_parses_from_toml() {
        let spec: HttpSpec = toml::from_str(
            r#"
            url = "http://127.0.0.1:9090/effect"
            connect-timeout = "250ms"
            request-timeout = "10s"
            headers = { Authorization = "Bearer t" }
            response-bytes-max = 100
            "#,
        )
        .expect("valid spec");
        assert_eq!(spec.connect_timeout, Duration::from_millis(250));
        assert_eq!(spec.request_timeout, Some(Duration::from_secs(10)));
        assert_eq!(spec.response_bytes_max, 100);
        assert_eq!(spec.headers["Authorization"], "Bearer t");
        spec.validate().expect("valid");

        let spec: HttpSpec = toml::from_str(r#"url = "http://h/""#).expect("minimal spec");
        assert_eq!(spec, HttpSpec::new("http://h/"));
        assert!(toml::from_str::<HttpSpec>("url = \"http://h/\"\nmethod = \"PUT\"").is_err());
    }
}
