//! Event streams on lean connections. hyper keeps an 8 KiB read buffer and an 8 KiB write
//! buffer for as long as a connection lives, which is most of what an idle SSE client would
//! cost. A fresh connection whose first request is a stream route is therefore served here
//! instead: the request head is parsed with `httparse` into a buffer dropped before the
//! stream starts, the router answers it as it would any request, and the response body is
//! written straight to the socket, delimited by closing the connection.
//!
//! Everything else — other routes, keep-alive connections that ask for a stream later, a
//! request line that has not fully arrived when the first bytes are peeked — goes to hyper.

use std::{io, pin::pin};

use app::wire::paths;
use axum::{
    Router,
    body::{Body, HttpBody as _},
    http::{HeaderValue, Request, StatusCode, Version, header},
    response::{IntoResponse, Response},
};
use http_body_util::BodyExt;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    time::{Instant, timeout_at},
};
use tower::ServiceExt;

use super::Conn;

/// Request lines served here: `GET` of these paths, with or without a query string.
const STREAM_PATHS: &[&str] = &[paths::SSE];
/// Bytes peeked from a new connection: enough for `GET ` and the longest stream path.
const SNIFF_LEN: usize = 32;
// The peek must reach the byte after the path; a longer stream path would never be
// recognised, and its streams would quietly go to hyper.
const _: () = assert!("GET ".len() + paths::SSE.len() < SNIFF_LEN);
/// Largest request head a stream connection accepts (hyper's default limit is larger, but a
/// stream request carries a token and a few headers).
const MAX_HEAD: usize = 8 * 1024;
/// Most headers a stream request may carry.
const MAX_HEADERS: usize = 64;

/// What the first bytes of a connection say.
pub(super) enum Sniffed {
    /// A stream request: serve it here.
    Stream,
    /// Anything else, or a request line not yet complete: hyper's.
    Other,
    /// Nothing before the head deadline, or the client left.
    Silent,
}

/// Looks at the first bytes of `conn` without consuming them, waiting for them until
/// `deadline`.
pub(super) async fn sniff(conn: &Conn, deadline: Instant) -> Sniffed {
    let mut start = [0u8; SNIFF_LEN];
    match timeout_at(deadline, conn.stream().peek(&mut start)).await {
        Ok(Ok(0) | Err(_)) | Err(_) => Sniffed::Silent,
        Ok(Ok(peeked)) if opens_stream(&start[..peeked]) => Sniffed::Stream,
        Ok(Ok(_)) => Sniffed::Other,
    }
}

/// Whether `start`, the first bytes of a connection, is a request line for a stream route.
fn opens_stream(start: &[u8]) -> bool {
    let Some(target) = start.strip_prefix(b"GET ") else {
        return false;
    };
    STREAM_PATHS.iter().any(|path| {
        target
            .strip_prefix(path.as_bytes())
            .is_some_and(|rest| matches!(rest.first(), Some(b' ' | b'?')))
    })
}

/// Reads one request (its head due by `deadline`), lets the router answer it and writes the
/// answer; then closes.
pub(super) async fn serve(mut conn: Conn, router: Router, deadline: Instant) {
    let response = match timeout_at(deadline, read_request(&mut conn)).await {
        Ok(Ok(request)) => match router.oneshot(request).await {
            Ok(response) => response,
            Err(never) => match never {},
        },
        Ok(Err(status)) => status.into_response(),
        Err(_) => StatusCode::REQUEST_TIMEOUT.into_response(),
    };
    if let Err(err) = respond(&mut conn, response).await {
        tracing::debug!(%err, "stream connection ended");
    }
    let _ = conn.shutdown().await;
}

/// Reads and parses the request head. Stream requests carry no body, so one that announces
/// a body is refused rather than left half-read.
async fn read_request(conn: &mut Conn) -> Result<Request<Body>, StatusCode> {
    let mut head = Vec::with_capacity(1024);
    loop {
        let room = (MAX_HEAD - head.len()) as u64;
        let read = (&mut *conn)
            .take(room)
            .read_buf(&mut head)
            .await
            .map_err(|_| StatusCode::BAD_REQUEST)?;
        if read == 0 {
            return Err(if head.len() == MAX_HEAD {
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
            } else {
                StatusCode::BAD_REQUEST
            });
        }
        if let Some(request) = parse_head(&head)? {
            return Ok(request);
        }
    }
}

/// Parses a request head read so far: `None` while it is incomplete. Never panics,
/// whatever the bytes (the property tests below feed it arbitrary input).
fn parse_head(head: &[u8]) -> Result<Option<Request<Body>>, StatusCode> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut headers);
    match parsed.parse(head) {
        Ok(httparse::Status::Complete(_)) => to_request(&parsed).map(Some),
        Ok(httparse::Status::Partial) => Ok(None),
        Err(httparse::Error::TooManyHeaders) => Err(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE),
        Err(_) => Err(StatusCode::BAD_REQUEST),
    }
}

fn to_request(parsed: &httparse::Request<'_, '_>) -> Result<Request<Body>, StatusCode> {
    let version = match parsed.version {
        Some(0) => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    let mut request = Request::builder()
        .method(parsed.method.unwrap_or_default())
        .uri(parsed.path.unwrap_or_default())
        .version(version);
    for field in parsed.headers.iter() {
        let announces_body = (field.name.eq_ignore_ascii_case("content-length")
            && field.value != b"0")
            || field.name.eq_ignore_ascii_case("transfer-encoding");
        if announces_body {
            return Err(StatusCode::BAD_REQUEST);
        }
        request = request.header(field.name, field.value);
    }
    request
        .body(Body::empty())
        .map_err(|_| StatusCode::BAD_REQUEST)
}

/// Writes the response head, then each body frame as it comes, until the body ends or the
/// client goes away.
async fn respond(conn: &mut Conn, response: Response) -> io::Result<()> {
    let (parts, body) = response.into_parts();
    let mut head = Vec::with_capacity(256);
    head.extend_from_slice(b"HTTP/1.1 ");
    head.extend_from_slice(parts.status.as_str().as_bytes());
    head.push(b' ');
    head.extend_from_slice(parts.status.canonical_reason().unwrap_or("").as_bytes());
    head.extend_from_slice(b"\r\n");
    let mut headers = parts.headers;
    headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    if let Some(length) = body.size_hint().exact() {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    }
    for (name, value) in &headers {
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"\r\n");
    conn.write_all(&head).await?;
    drop(head);

    let mut body = pin!(body);
    loop {
        let frame = tokio::select! {
            frame = body.frame() => frame,
            () = peer_gone(conn.stream()) => return Ok(()),
        };
        let Some(frame) = frame else { return Ok(()) };
        let frame = frame.map_err(io::Error::other)?;
        if let Ok(data) = frame.into_data() {
            conn.write_all(&data).await?;
        }
    }
}

/// Completes when the client closes the connection or sends anything more: a stream client
/// has nothing further to say, and idle streams must not outlive their clients.
async fn peer_gone(stream: &TcpStream) {
    let mut scratch = [0u8; 16];
    loop {
        if stream.readable().await.is_err() {
            return;
        }
        match stream.try_read(&mut scratch) {
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
            Ok(_) | Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only a `GET` of a stream path, with a query or nothing after it, is diverted.
    #[test]
    fn recognises_stream_requests() {
        assert!(opens_stream(b"GET /api/credits/sse HTTP/1.1\r\n"));
        assert!(opens_stream(b"GET /api/credits/sse?token=abc HTTP/1.1"));
        assert!(!opens_stream(b"GET /api/credits/sse/x HTTP/1.1"));
        assert!(!opens_stream(b"GET /api/credits/sseq HTTP/1.1"));
        assert!(!opens_stream(b"POST /api/credits/sse HTTP/1.1"));
        assert!(!opens_stream(b"GET /api/credits/balance HTTP/1.1"));
        // Not all of the request line has arrived yet: hyper takes it.
        assert!(!opens_stream(b"GET /api/credits/s"));
        assert!(!opens_stream(b"GET /api/credits/sse"));
        assert!(!opens_stream(b""));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig {
            cases: 2_000,
            failure_persistence: None,
            ..Default::default()
        })]

        /// Any bytes at all get an answer from the head parser, never a panic.
        #[test]
        fn head_parser_takes_any_bytes(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..2048)) {
            let _ = parse_head(&bytes);
        }

        /// A stream request with arbitrary header fields is parsed or refused as a client
        /// error, never panics; a complete head without a body always yields the path sent.
        #[test]
        fn head_parser_takes_any_fields(
            query in "[ -~]{0,64}",
            fields in proptest::collection::vec(
                ("[!-~]{0,24}", proptest::collection::vec(proptest::num::u8::ANY, 0..64)),
                0..8,
            ),
        ) {
            let mut head = format!("GET {}?{query} HTTP/1.1\r\n", paths::SSE).into_bytes();
            for (name, value) in &fields {
                head.extend_from_slice(name.as_bytes());
                head.extend_from_slice(b": ");
                head.extend_from_slice(value);
                head.extend_from_slice(b"\r\n");
            }
            head.extend_from_slice(b"\r\n");
            match parse_head(&head) {
                Ok(Some(request)) => {
                    proptest::prop_assert!(request.uri().path() == paths::SSE);
                }
                Ok(None) => {}
                Err(status) => proptest::prop_assert!(status.is_client_error()),
            }
        }
    }
}
