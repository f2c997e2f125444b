//! Bad input on the hot route: every malformed request is refused with the right status and a
//! problem+json body carrying our `code`, never a 500, and none of them changes anything.

use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use reqwest::{Method, RequestBuilder, StatusCode};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::helpers::{Backend, Reply, TestApp, refusals, send};

on_every_backend!(
    malformed_reservation_requests_are_refused_as_problems_and_change_nothing,
    json_arrays_are_refused_as_bodies_rather_than_read_field_by_field,
    inputs_at_the_limits_are_accepted,
);

/// How a bad request reaches the server.
enum Request {
    Http(Box<RequestBuilder>),
    /// Bytes on a raw TCP connection, for what an HTTP client will not send.
    Raw(Vec<u8>),
}

/// What the server must answer.
enum Expect {
    /// RFC 9457 problem+json with this status and `code`.
    Problem(u16, &'static str),
    /// A request that is not valid HTTP is refused by the HTTP parser before any route sees it:
    /// only the status is ours to check.
    Bare(u16),
}

struct Case {
    what: &'static str,
    request: Request,
    expect: Expect,
}

/// A raw `POST` of `body` to `path` with extra header lines (each ending in `\r\n`).
fn raw_post(path: &str, headers: &str, body: &[u8]) -> Vec<u8> {
    let mut bytes =
        format!("POST {path} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n{headers}\r\n").into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

/// `body` in 4 KiB chunks with `Transfer-Encoding: chunked`, so no Content-Length warns the
/// server of its size.
fn chunked(body: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::new();
    for chunk in body.chunks(4096) {
        bytes.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        bytes.extend_from_slice(chunk);
        bytes.extend_from_slice(b"\r\n");
    }
    bytes.extend_from_slice(b"0\r\n\r\n");
    bytes
}

/// Sends raw bytes and reads the whole answer (the request asks the server to close).
async fn raw_exchange(address: &str, request: &[u8]) -> anyhow::Result<Reply> {
    let host = address.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(host).await?;
    // The server may answer and close before reading everything (413): a failed write is fine.
    let _ = stream.write_all(request).await;
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut answer)).await?;
    if answer.is_empty() {
        read?;
    }
    let text = String::from_utf8_lossy(&answer).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse::<u16>().ok())
        .and_then(|code| StatusCode::from_u16(code).ok())
        .ok_or_else(|| anyhow::anyhow!("no status line in {text:?}"))?;
    let mut headers = HeaderMap::new();
    for line in lines {
        if let Some((name, value)) = line.split_once(':')
            && let (Ok(name), Ok(value)) = (
                HeaderName::from_bytes(name.trim().as_bytes()),
                HeaderValue::from_str(value.trim()),
            )
        {
            headers.insert(name, value);
        }
    }
    Ok(Reply {
        status,
        headers,
        body: serde_json::from_str(body).unwrap_or(Value::Null),
        text: body.to_owned(),
    })
}

async fn malformed_reservation_requests_are_refused_as_problems_and_change_nothing(
    backend: Backend,
) -> anyhow::Result<()> {
    // Arrange: an event with one reservation already made.
    let app = TestApp::spawn(backend).await?;
    let event = app
        .create_event(serde_json::json!({
            "name": "strict", "kind": "ticket", "stock": 10, "per_user_limit": 2, "max_per_request": 2,
        }))
        .await?;
    app.reserve_ok(event, "ana", Some(1)).await?;
    let counts_before = app.counts(event).await?;
    let rows_before = app.db.reservations(event).await?.len();

    let path = format!("/v1/events/{event}/reservations");
    let post = |user: &str| app.as_user(Method::POST, &path, user);
    let json = |body: &str| {
        Request::Http(Box::new(
            post("bob")
                .header("content-type", "application/json")
                .body(body.to_owned()),
        ))
    };
    let with_header = |name: &'static str, value: &[u8]| -> anyhow::Result<Request> {
        let value = HeaderValue::from_bytes(value)?;
        Ok(Request::Http(Box::new(
            app.request(Method::POST, &path).header(name, value),
        )))
    };
    let with_key = |key: &[u8]| -> anyhow::Result<Request> {
        Ok(Request::Http(Box::new(
            post("bob").header("idempotency-key", HeaderValue::from_bytes(key)?),
        )))
    };
    let reserve_at = |event_path: &str| Request::Http(Box::new(app.as_user(Method::POST, event_path, "bob")));
    let oversized = format!("{{\"quantity\":1{}}}", " ".repeat(17 * 1024));

    use Expect::{Bare, Problem};
    let cases = vec![
        Case {
            what: "malformed JSON",
            request: json(r#"{"quantity":"#),
            expect: Problem(400, "malformed_json"),
        },
        Case {
            what: "quantity as a string",
            request: json(r#"{"quantity":"2"}"#),
            expect: Problem(422, "invalid_body"),
        },
        Case {
            what: "quantity as a float",
            request: json(r#"{"quantity":1.5}"#),
            expect: Problem(422, "invalid_body"),
        },
        Case {
            what: "quantity as a boolean",
            request: json(r#"{"quantity":true}"#),
            expect: Problem(422, "invalid_body"),
        },
        Case {
            what: "quantity beyond any integer",
            request: json(r#"{"quantity":1e30}"#),
            expect: Problem(422, "invalid_body"),
        },
        Case {
            what: "quantity zero",
            request: json(r#"{"quantity":0}"#),
            expect: Problem(422, "invalid_quantity"),
        },
        Case {
            what: "negative quantity",
            request: json(r#"{"quantity":-1}"#),
            expect: Problem(422, "invalid_quantity"),
        },
        Case {
            what: "quantity above 10,000",
            request: json(r#"{"quantity":10001}"#),
            expect: Problem(422, "invalid_quantity"),
        },
        Case {
            what: "quantity above u32",
            request: json(r#"{"quantity":4294967297}"#),
            expect: Problem(422, "invalid_quantity"),
        },
        Case {
            what: "quantity above the event's max_per_request",
            request: json(r#"{"quantity":3}"#),
            expect: Problem(422, "invalid_quantity"),
        },
        Case {
            what: "unknown field",
            request: json(r#"{"quantity":1,"colour":"red"}"#),
            expect: Problem(422, "invalid_body"),
        },
        Case {
            what: "body over 16 KiB",
            request: json(&oversized),
            expect: Problem(413, "payload_too_large"),
        },
        Case {
            what: "body over 16 KiB sent chunked, without Content-Length",
            request: Request::Raw(raw_post(
                &path,
                "x-user-id: bob\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n",
                &chunked(oversized.as_bytes()),
            )),
            expect: Problem(413, "payload_too_large"),
        },
        Case {
            what: "text/plain body",
            request: Request::Http(Box::new(
                post("bob")
                    .header("content-type", "text/plain")
                    .body(r#"{"quantity":1}"#),
            )),
            expect: Problem(415, "unsupported_media_type"),
        },
        Case {
            what: "JSON body without a Content-Type",
            request: Request::Http(Box::new(post("bob").body(r#"{"quantity":1}"#))),
            expect: Problem(415, "unsupported_media_type"),
        },
        Case {
            what: "form-encoded body",
            request: Request::Http(Box::new(
                post("bob")
                    .header("content-type", "application/x-www-form-urlencoded")
                    .body("quantity=1"),
            )),
            expect: Problem(415, "unsupported_media_type"),
        },
        Case {
            what: "missing X-User-Id",
            request: Request::Http(Box::new(app.request(Method::POST, &path))),
            expect: Problem(401, "missing_user"),
        },
        Case {
            what: "empty X-User-Id",
            request: with_header("x-user-id", b"")?,
            expect: Problem(401, "missing_user"),
        },
        Case {
            what: "X-User-Id of 129 characters",
            request: with_header("x-user-id", "u".repeat(129).as_bytes())?,
            expect: Problem(401, "missing_user"),
        },
        Case {
            what: "X-User-Id with a space",
            request: with_header("x-user-id", b"bob smith")?,
            expect: Problem(401, "missing_user"),
        },
        Case {
            what: "X-User-Id with a tab",
            request: with_header("x-user-id", b"bob\tsmith")?,
            expect: Problem(401, "missing_user"),
        },
        Case {
            what: "non-ASCII X-User-Id",
            request: with_header("x-user-id", "jérôme".as_bytes())?,
            expect: Problem(401, "missing_user"),
        },
        Case {
            what: "unknown event",
            request: reserve_at("/v1/events/999999/reservations"),
            expect: Problem(404, "event_not_found"),
        },
        Case {
            what: "non-numeric event id",
            request: reserve_at("/v1/events/abc/reservations"),
            expect: Problem(404, "event_not_found"),
        },
        Case {
            what: "event id zero",
            request: reserve_at("/v1/events/0/reservations"),
            expect: Problem(404, "event_not_found"),
        },
        Case {
            what: "event id beyond i64",
            request: reserve_at("/v1/events/99999999999999999999/reservations"),
            expect: Problem(404, "event_not_found"),
        },
        Case {
            what: "Idempotency-Key of 256 characters",
            request: with_key("k".repeat(256).as_bytes())?,
            expect: Problem(400, "invalid_idempotency_key"),
        },
        Case {
            what: "empty Idempotency-Key",
            request: with_key(b"")?,
            expect: Problem(400, "invalid_idempotency_key"),
        },
        Case {
            what: "Idempotency-Key with a tab (a control character HTTP allows)",
            request: with_key(b"key\twith-tab")?,
            expect: Problem(400, "invalid_idempotency_key"),
        },
        Case {
            what: "Idempotency-Key with a space",
            request: with_key(b"key with-space")?,
            expect: Problem(400, "invalid_idempotency_key"),
        },
        Case {
            what: "non-ASCII Idempotency-Key",
            request: with_key("clé".as_bytes())?,
            expect: Problem(400, "invalid_idempotency_key"),
        },
        Case {
            what: "Idempotency-Key with a control character HTTP forbids (0x01)",
            request: Request::Raw(raw_post(
                &path,
                "x-user-id: bob\r\nidempotency-key: a\x01b\r\ncontent-length: 0\r\n",
                b"",
            )),
            expect: Bare(400),
        },
        Case {
            what: "unknown route",
            request: Request::Http(Box::new(app.as_user(Method::GET, "/v1/nope", "bob"))),
            expect: Problem(404, "not_found"),
        },
        Case {
            what: "misspelt reservation route",
            request: reserve_at(&format!("/v1/events/{event}/reservation")),
            expect: Problem(404, "not_found"),
        },
        Case {
            what: "GET on the reservation route",
            request: Request::Http(Box::new(app.as_user(Method::GET, &path, "bob"))),
            expect: Problem(405, "method_not_allowed"),
        },
        Case {
            what: "DELETE on the reservation route",
            request: Request::Http(Box::new(app.as_user(Method::DELETE, &path, "bob"))),
            expect: Problem(405, "method_not_allowed"),
        },
        Case {
            what: "PUT on an event",
            request: Request::Http(Box::new(app.admin(Method::PUT, &format!("/v1/events/{event}")))),
            expect: Problem(405, "method_not_allowed"),
        },
    ];

    // Act
    let mut failures = Vec::new();
    for case in cases {
        let reply = match case.request {
            Request::Http(request) => send(*request).await,
            Request::Raw(bytes) => raw_exchange(&app.address, &bytes).await,
        };
        let reply = match reply {
            Ok(reply) => reply,
            Err(error) => {
                failures.push(format!("{}: no answer: {error:#}", case.what));
                continue;
            }
        };
        let mismatch = match case.expect {
            Problem(status, code) => reply.problem_mismatch(status, code).or_else(|| {
                // A malformed key's detail says what is wrong with it, naming the header once.
                let detail = reply.body["detail"].as_str().unwrap_or_default();
                (code == "invalid_idempotency_key" && detail.matches("Idempotency-Key").count() != 1)
                    .then(|| format!("the detail should name Idempotency-Key once: {detail:?}"))
            }),
            Bare(status) => {
                (reply.status.as_u16() != status).then(|| format!("expected {status}, got {reply}"))
            }
        };
        if let Some(mismatch) = mismatch {
            failures.push(format!("{}: {mismatch}", case.what));
        }
    }

    // Assert
    assert!(
        failures.is_empty(),
        "{} cases failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert_eq!(
        app.counts(event).await?,
        counts_before,
        "the event's counts are unchanged"
    );
    assert_eq!(
        app.db.reservations(event).await?.len(),
        rows_before,
        "no row was written"
    );
    Ok(())
}

async fn json_arrays_are_refused_as_bodies_rather_than_read_field_by_field(
    backend: Backend,
) -> anyhow::Result<()> {
    // Arrange
    let app = TestApp::spawn(backend).await?;
    let event = app.ticket_event(10, 2, 600).await?;
    let counts_before = app.counts(event).await?;
    let path = format!("/v1/events/{event}/reservations");
    let as_json = |request: RequestBuilder, body: &str| {
        request
            .header("content-type", "application/json")
            .body(body.to_owned())
    };
    let cases = [
        (
            "a reservation body [2]",
            as_json(app.as_user(Method::POST, &path, "bob"), "[2]"),
        ),
        (
            "an event spec as an array",
            as_json(
                app.admin(Method::POST, "/v1/events"),
                r#"["array drop","coupon",5,null,null,null,null,null]"#,
            ),
        ),
        (
            "an event patch as an array",
            as_json(app.admin(Method::PATCH, &format!("/v1/events/{event}")), "[20]"),
        ),
    ];

    // Act
    let failures = refusals(cases.into(), 422, "invalid_body").await?;

    // Assert
    assert!(
        failures.is_empty(),
        "{} cases failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert_eq!(
        app.counts(event).await?,
        counts_before,
        "nothing was reserved or changed"
    );
    assert_eq!(app.db.event_count().await?, 1, "no event was created");
    Ok(())
}

async fn inputs_at_the_limits_are_accepted(backend: Backend) -> anyhow::Result<()> {
    // Arrange
    let app = TestApp::spawn(backend).await?;
    let event = app.coupon_event(10, 1).await?;
    let path = format!("/v1/events/{event}/reservations");
    let padded = |len: usize| {
        let mut body = String::from(r#"{"quantity":1"#);
        body.push_str(&" ".repeat(len - body.len() - 1));
        body.push('}');
        body
    };
    let longest_user = "u".repeat(128);
    let longest_key = "k".repeat(255);

    // Act
    let long_names = app
        .reserve(event, &longest_user, None, Some(&longest_key))
        .await?;
    let replay = app
        .reserve(event, &longest_user, None, Some(&longest_key))
        .await?;
    let full_body = send(
        app.as_user(Method::POST, &path, "carl")
            .header("content-type", "application/json")
            .body(padded(16 * 1024)),
    )
    .await?;
    let one_byte_more = send(
        app.as_user(Method::POST, &path, "dee")
            .header("content-type", "application/json")
            .body(padded(16 * 1024 + 1)),
    )
    .await?;
    let with_charset = send(
        app.as_user(Method::POST, &path, "eve")
            .header("content-type", "application/json; charset=utf-8")
            .body(r#"{"quantity":1}"#),
    )
    .await?;
    let empty_object = send(
        app.as_user(Method::POST, &path, "fay")
            .header("content-type", "application/json")
            .body("{}"),
    )
    .await?;

    // Assert
    long_names.assert_status(201);
    assert_eq!(long_names.body["user_id"].as_str(), Some(longest_user.as_str()));
    replay.assert_status(201);
    assert_eq!(replay.header("idempotent-replayed"), Some("true"));
    assert_eq!(replay.id(), long_names.id());
    full_body.assert_status(201);
    one_byte_more.assert_problem(413, "payload_too_large");
    with_charset.assert_status(201);
    empty_object.assert_status(201);
    assert_eq!(
        empty_object.body["quantity"], 1,
        "an empty object asks for one unit"
    );
    assert_eq!(app.counts(event).await?.sold, 4);
    let rows = app.db.reservations(event).await?;
    assert!(
        rows.iter()
            .any(|r| r.user_id == longest_user && r.idempotency_key.as_deref() == Some(&longest_key)),
        "the longest user id and key are stored whole"
    );
    Ok(())
}
