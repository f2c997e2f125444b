//! Bulk issuance (issue 5): an operator hands the server a list of users (an upload of plain
//! lines or CSV, gzip or not, or a table in a database) and a job grants each of them one coupon
//! of an event. Every test checks the job's exact totals against the `bulk_grants` rows and the
//! event's counts: one grant per distinct listed user; users who already hold the coupon
//! (earlier grant, live claim, twice in the list) are skipped; stock caps the grants and live
//! claims beside a job never oversell; a job cut off by kill -9 resumes and grants each user
//! once; cancel stops a job with rows and counts in agreement; revoke returns the units;
//! malformed lines are counted by line number; bad submissions create no job; webhooks report
//! the job's life to a JSON and a Slack receiver, retrying a failed delivery.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use reqwest::Method;
use serde_json::{Value, json};

use crate::helpers::{
    ADMIN_TOKEN, Backend, Delivery, GrantRow, HookReceiver, Stampede, TestApp, TestDb, Totals, active_units,
    assert_acknowledged_are_durable, exclusive_machine, file_body, gzip, log_tail, mismatches, send,
    timestamp, write_lines,
};

on_backends!(
    every: [
        lists_as_plain_lines_csv_or_gzip_grant_one_coupon_to_each_listed_user,
        users_who_already_hold_the_coupon_or_are_listed_twice_are_skipped,
        a_list_longer_than_the_stock_issues_the_stock_and_counts_the_rest_unissued,
        malformed_lines_are_counted_with_their_line_numbers_and_the_rest_are_issued,
        unreadable_uploads_fail_the_job_with_the_reason_and_issue_nothing,
        bad_submissions_are_refused_and_create_no_job,
        revoking_a_job_returns_its_units_and_leaves_other_jobs_grants_alone,
        a_finished_job_cannot_be_cancelled,
        jobs_are_listed_newest_first,
        jobs_submitted_the_moment_their_event_is_created_run_to_the_end,
        a_job_submitted_right_after_a_restart_runs_to_the_end,
    ],
    sqlite_and_postgres: [
        a_million_line_upload_grants_a_million_coupons,
        a_job_cut_off_by_kill_9_resumes_after_the_restart_and_grants_each_user_once,
        live_claims_during_a_job_never_oversell_and_nobody_holds_both,
        cancelling_a_running_job_stops_it_with_rows_and_counts_in_agreement,
        a_table_in_the_servers_or_the_source_database_is_a_list_of_targets,
    ],
);

/// How long a job of a few thousand targets may take, start to end.
const SMALL_JOB: Duration = Duration::from_secs(60);
/// How long a job of a million targets may take in a debug build on a busy two-core machine.
const BIG_JOB: Duration = Duration::from_secs(900);
/// Targets per committed chunk in the tests that act while a job runs: many small chunks, so
/// there is a "while" to act in.
const SMALL_CHUNKS: &str = "2000";
/// The targets of the tests that kill or cancel a running job.
const INTERRUPTED_TARGETS: usize = 200_000;
/// How long a one-line job may take when it is the only thing the server does.
const ONE_LINE_JOB: Duration = Duration::from_secs(20);
/// How often the prompt-submission test submits a job the moment its event is created.
const PROMPT_SUBMISSIONS: usize = 100;
/// How often the restart test restarts the server and submits a job at once.
const PROMPT_RESTARTS: usize = 5;
/// How long after the job finished a webhook may arrive.
const WEBHOOK_WAIT: Duration = Duration::from_secs(15);

/// `users` as a plain-lines upload.
fn lines(users: &[String]) -> String {
    users.iter().map(|user| format!("{user}\n")).collect()
}

/// Waits for job `job_id` to end and fails unless it succeeded without an error.
async fn succeeded(app: &TestApp, job_id: i64, timeout: Duration) -> anyhow::Result<Value> {
    let job = app.wait_job(job_id, timeout).await?;
    ensure!(
        job["state"] == "succeeded" && job["error"].is_null(),
        "job {job_id} did not succeed: {job}\nthe server log ends with:\n{}",
        log_tail(app.log_path(), 30)
    );
    Ok(job)
}

/// The users of `rows`, failing if one appears twice.
fn distinct_users(rows: &[GrantRow]) -> anyhow::Result<BTreeSet<String>> {
    let mut users = BTreeSet::new();
    for row in rows {
        ensure!(
            users.insert(row.user_id.clone()),
            "two grant rows for {}",
            row.user_id
        );
    }
    Ok(users)
}

fn set<S: AsRef<str>>(users: &[S]) -> BTreeSet<String> {
    users.iter().map(|user| user.as_ref().to_owned()).collect()
}

async fn lists_as_plain_lines_csv_or_gzip_grant_one_coupon_to_each_listed_user(
    backend: Backend,
) -> anyhow::Result<()> {
    // Arrange
    let app = TestApp::spawn(backend).await?;
    let stock = 10;
    let csv = "email,user_id,name\nana@example.com,ana,Ana\nben@example.com,ben,Ben\n";
    type Case = (
        &'static str,
        &'static str,
        &'static str,
        Vec<u8>,
        &'static str,
        Vec<&'static str>,
    );
    let cases: Vec<Case> = vec![
        (
            "plain lines with a blank line and no final newline",
            "text/plain",
            "",
            b"ana\nben\n\ncy".to_vec(),
            "lines",
            vec!["ana", "ben", "cy"],
        ),
        (
            "CSV with a header, column user_id by default",
            "text/csv",
            "",
            csv.as_bytes().to_vec(),
            "csv",
            vec!["ana", "ben"],
        ),
        (
            "CSV with ?column=member",
            "text/csv",
            "?column=member",
            b"member,score\ndan,1\neve,2\nfay,3\n".to_vec(),
            "csv",
            vec!["dan", "eve", "fay"],
        ),
        (
            "gzip-compressed lines as application/gzip",
            "application/gzip",
            "",
            gzip(b"gus\nhal\n")?,
            "lines",
            vec!["gus", "hal"],
        ),
        (
            "gzip-compressed CSV as application/octet-stream with ?format=csv",
            "application/octet-stream",
            "?format=csv",
            gzip(b"user_id\nivy\njo\n")?,
            "csv",
            vec!["ivy", "jo"],
        ),
        (
            "gzip sent as text/plain, recognised by its magic bytes",
            "text/plain",
            "",
            gzip(b"kim\nlu\n")?,
            "lines",
            vec!["kim", "lu"],
        ),
        (
            "?format=lines overrides text/csv: the header line is a user",
            "text/csv",
            "?format=lines",
            b"user_id\nmo\n".to_vec(),
            "lines",
            vec!["user_id", "mo"],
        ),
    ];

    for (what, content_type, query, body, format, users) in cases {
        let event = app.coupon_event(stock, 1).await?;
        let size = body.len();
        let compressed = body.starts_with(&[0x1f, 0x8b]);

        // Act
        let job_id = app.submit_upload_ok(event, content_type, query, body).await?;
        let job = succeeded(&app, job_id, SMALL_JOB).await.context(what)?;

        // Assert
        let n = i64::try_from(users.len())?;
        assert_eq!(
            Totals::of(&job)?,
            Totals {
                read: n,
                issued: n,
                ..Totals::default()
            },
            "{what}: {job}"
        );
        assert_eq!(
            (
                job["event_id"].as_i64(),
                job["source"]["kind"].as_str(),
                job["source"]["format"].as_str()
            ),
            (Some(event), Some("upload"), Some(format)),
            "{what}: {job}"
        );
        if !compressed {
            assert_eq!(
                job["source"]["bytes"].as_u64(),
                Some(u64::try_from(size)?),
                "{what}: {job}"
            );
        }
        assert_eq!(
            (&job["stock_exhausted"], &job["cancel_requested"]),
            (&json!(false), &json!(false)),
            "{what}: {job}"
        );
        timestamp(&job["started_at"]).context(what)?;
        timestamp(&job["finished_at"]).context(what)?;
        let rows = app.db.grants(event).await?;
        assert_eq!(distinct_users(&rows)?, set(&users), "{what}: the grant rows");
        assert!(
            rows.iter().all(|r| r.job_id == job_id && r.status == "issued"),
            "{what}: {rows:?}"
        );
        let counts = app.counts(event).await?;
        assert_eq!(
            (counts.sold, counts.remaining, counts.held),
            (n, i64::try_from(stock)? - n, 0),
            "{what}: the event's counts"
        );
        assert_eq!(app.db.bulk_issued(event).await?, n, "{what}: events.bulk_issued");
    }
    Ok(())
}

async fn users_who_already_hold_the_coupon_or_are_listed_twice_are_skipped(
    backend: Backend,
) -> anyhow::Result<()> {
    // Arrange: ana and ben claimed live before the job.
    let app = TestApp::spawn(backend).await?;
    let event = app.coupon_event(100, 1).await?;
    app.reserve_ok(event, "ana", None).await?;
    app.reserve_ok(event, "ben", None).await?;

    // Act: cy is listed twice; then a second job lists cy (granted by the first) again.
    let first = app
        .submit_upload_ok(event, "text/plain", "", "ana\ncy\nben\ndan\ncy\neve\n")
        .await?;
    let first = succeeded(&app, first, SMALL_JOB).await?;
    let second = app
        .submit_upload_ok(event, "text/plain", "", "cy\nfay\nana\n")
        .await?;
    let second = succeeded(&app, second, SMALL_JOB).await?;

    // Assert
    assert_eq!(
        Totals::of(&first)?,
        Totals {
            read: 6,
            issued: 3,
            skipped: 3,
            ..Totals::default()
        },
        "ana and ben hold live claims, cy is listed twice: {first}"
    );
    assert_eq!(
        Totals::of(&second)?,
        Totals {
            read: 3,
            issued: 1,
            skipped: 2,
            ..Totals::default()
        },
        "cy holds a grant of the first job, ana a live claim: {second}"
    );
    let rows = app.db.grants(event).await?;
    assert_eq!(distinct_users(&rows)?, set(&["cy", "dan", "eve", "fay"]));
    let reservations = app.db.reservations(event).await?;
    for user in ["ana", "ben"] {
        let mine: Vec<_> = reservations.iter().filter(|r| r.user_id == user).collect();
        assert!(
            mine.len() == 1 && mine[0].is_active() && mine[0].quantity == 1,
            "{user} still holds exactly one live reservation: {mine:?}"
        );
    }
    for user in ["dan", "fay"] {
        app.reserve(event, user, None, None)
            .await?
            .assert_problem(409, "limit_reached");
    }
    app.reserve_ok(event, "gil", None).await?; // someone never listed still gets one
    let counts = app.counts(event).await?;
    assert_eq!((counts.sold, counts.remaining), (2 + 4 + 1, 100 - 7));
    assert_eq!(active_units(&app.db.reservations(event).await?), (3, 3));
    assert_eq!(app.db.bulk_issued(event).await?, 4);
    Ok(())
}

async fn a_list_longer_than_the_stock_issues_the_stock_and_counts_the_rest_unissued(
    backend: Backend,
) -> anyhow::Result<()> {
    // Arrange
    let app = TestApp::spawn(backend).await?;
    let event = app.coupon_event(1_000, 1).await?;
    let users = Stampede::users("fan", 5_000);

    // Act
    let job_id = app
        .submit_upload_ok(event, "text/plain", "", lines(&users))
        .await?;
    let job = succeeded(&app, job_id, SMALL_JOB).await?;

    // Assert
    assert_eq!(
        Totals::of(&job)?,
        Totals {
            read: 5_000,
            issued: 1_000,
            unissued: 4_000,
            ..Totals::default()
        },
        "{job}"
    );
    assert_eq!(job["stock_exhausted"], true, "{job}");
    let rows = app.db.grants(event).await?;
    let granted = distinct_users(&rows)?;
    assert_eq!(granted.len(), 1_000);
    assert!(granted.is_subset(&set(&users)), "only listed users hold grants");
    let counts = app.counts(event).await?;
    assert_eq!(
        (counts.sold, counts.remaining, counts.status.as_str()),
        (1_000, 0, "sold_out")
    );
    app.reserve(event, "latecomer", None, None)
        .await?
        .assert_problem(409, "sold_out");
    assert_eq!(app.db.bulk_issued(event).await?, 1_000);
    Ok(())
}

async fn malformed_lines_are_counted_with_their_line_numbers_and_the_rest_are_issued(
    backend: Backend,
) -> anyhow::Result<()> {
    // Arrange: 110 malformed lines of five kinds among valid ones, and blank lines (which count
    // for the line numbers but are no targets). A 128-character id is valid, 129 is not.
    let app = TestApp::spawn(backend).await?;
    let event = app.coupon_event(1_000, 1).await?;
    let malformed = |i: usize| match i % 5 {
        0 => format!("has space {i}"),
        1 => "x".repeat(129),
        2 => format!("tab\there{i}"),
        3 => format!("ünïcode-{i}"),
        _ => format!("del\u{7f}{i}"),
    };
    let mut file = vec!["v".repeat(128), String::new()];
    let (mut valid, mut invalid_at) = (vec!["v".repeat(128)], Vec::new());
    for i in 0..330 {
        if i % 3 == 1 {
            file.push(malformed(i));
            invalid_at.push(file.len());
        } else {
            let user = format!("ok-{i}");
            file.push(user.clone());
            valid.push(user);
        }
        if i % 50 == 0 {
            file.push(String::new());
        }
    }
    let csv = "name,user_id\nAna,ana\nzed\nBen,ben\nCy,has space\n\nDan,dan\n";
    let csv_event = app.coupon_event(1_000, 1).await?;

    // Act
    let job_id = app
        .submit_upload_ok(event, "text/plain", "", file.join("\n"))
        .await?;
    let job = succeeded(&app, job_id, SMALL_JOB).await?;
    let csv_job_id = app.submit_upload_ok(csv_event, "text/csv", "", csv).await?;
    let csv_job = succeeded(&app, csv_job_id, SMALL_JOB).await?;

    // Assert
    let (v, i) = (i64::try_from(valid.len())?, i64::try_from(invalid_at.len())?);
    assert_eq!(i, 110);
    assert_eq!(
        Totals::of(&job)?,
        Totals {
            read: v + i,
            issued: v,
            invalid: i,
            ..Totals::default()
        },
        "{job}"
    );
    let reported = job["invalid_lines"]
        .as_array()
        .with_context(|| format!("no invalid_lines in {job}"))?;
    let numbers: Vec<Option<u64>> = reported.iter().map(|l| l["line"].as_u64()).collect();
    let expected: Vec<Option<u64>> = invalid_at[..100].iter().map(|n| u64::try_from(*n).ok()).collect();
    assert_eq!(
        numbers, expected,
        "the first 100 malformed lines, by file line number"
    );
    assert!(
        reported
            .iter()
            .all(|l| l["reason"].as_str().is_some_and(|r| !r.is_empty())),
        "each with a reason: {reported:?}"
    );
    assert_eq!(distinct_users(&app.db.grants(event).await?)?, set(&valid));
    assert_eq!(app.counts(event).await?.sold, v);

    assert_eq!(
        Totals::of(&csv_job)?,
        Totals {
            read: 5,
            issued: 3,
            invalid: 2,
            ..Totals::default()
        },
        "a row without the column and a malformed id: {csv_job}"
    );
    let csv_lines: Vec<Option<u64>> = csv_job["invalid_lines"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|l| l["line"].as_u64())
        .collect();
    assert_eq!(csv_lines, [Some(3), Some(5)], "{csv_job}");
    assert_eq!(
        distinct_users(&app.db.grants(csv_event).await?)?,
        set(&["ana", "ben", "dan"])
    );
    Ok(())
}

async fn unreadable_uploads_fail_the_job_with_the_reason_and_issue_nothing(
    backend: Backend,
) -> anyhow::Result<()> {
    // Arrange
    let app = TestApp::spawn(backend).await?;
    let event = app.coupon_event(10, 1).await?;
    let mut bad_gzip = vec![0x1f, 0x8b, 0x08, 0x00, 0, 0, 0, 0, 0, 0xff];
    bad_gzip.extend_from_slice(b"this is not a deflate stream at all, not at all\n");
    let cases: Vec<(&str, &str, &str, Vec<u8>)> = vec![
        ("an empty upload", "text/plain", "", Vec::new()),
        ("blank lines only", "text/plain", "", b"\n\n\n".to_vec()),
        ("a CSV header and no rows", "text/csv", "", b"user_id\n".to_vec()),
        (
            "a CSV whose header lacks user_id",
            "text/csv",
            "",
            b"email,name\nana@example.com,Ana\n".to_vec(),
        ),
        (
            "a CSV whose header lacks ?column=member",
            "text/csv",
            "?column=member",
            b"user_id\nana\n".to_vec(),
        ),
        (
            "gzip magic bytes before garbage",
            "application/gzip",
            "",
            bad_gzip,
        ),
    ];

    for (what, content_type, query, body) in cases {
        // Act
        let job_id = app.submit_upload_ok(event, content_type, query, body).await?;
        let job = app.wait_job(job_id, SMALL_JOB).await?;

        // Assert
        assert_eq!(job["state"], "failed", "{what}: {job}");
        assert!(
            job["error"].as_str().is_some_and(|e| !e.trim().is_empty()),
            "{what}: the job says why it failed: {job}"
        );
        assert_eq!(job["totals"]["issued"], 0, "{what}: {job}");
        timestamp(&job["finished_at"]).context(what)?;
    }
    assert!(app.db.grants(event).await?.is_empty(), "no grant rows");
    let counts = app.counts(event).await?;
    assert_eq!((counts.sold, counts.remaining), (0, 10));
    Ok(())
}

async fn bad_submissions_are_refused_and_create_no_job(backend: Backend) -> anyhow::Result<()> {
    // Arrange
    let app = TestApp::spawn_with(backend, &["--bulk-max-upload-bytes", "1000"]).await?;
    let coupons = app.coupon_event(10, 1).await?;
    let tickets = app.ticket_event(10, 1, 60).await?;
    let submit = |event: i64, query: &str| {
        app.admin(
            Method::POST,
            &format!("/v1/admin/events/{event}/bulk-issues{query}"),
        )
    };
    let upload = |event: i64, query: &str, content_type: &str, body: &'static str| {
        submit(event, query)
            .header("content-type", content_type)
            .body(body)
    };
    let table = |source: Value| submit(coupons, "").json(&json!({ "source": source }));
    let big = "u\n".repeat(1_000); // 2,000 bytes
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = (0..4).map(|_| Ok(vec![b'u'; 500])).collect();
    let chunked = reqwest::Body::wrap_stream(futures_util::stream::iter(chunks));
    let wrong = format!("{ADMIN_TOKEN}x");
    let anonymous = |method: Method, path: &str| app.request(method, path);
    let cases = vec![
        (
            "an unknown event",
            upload(999_999, "", "text/plain", "ana\n"),
            404,
            "event_not_found",
        ),
        (
            "a ticket event",
            upload(tickets, "", "text/plain", "ana\n"),
            422,
            "invalid_bulk_issue",
        ),
        (
            "an unknown table",
            table(json!({ "table": "no_such_segment", "column": "user_id" })),
            422,
            "invalid_bulk_issue",
        ),
        (
            "an unknown column of a real table",
            table(json!({ "table": "events", "column": "no_such_column" })),
            422,
            "invalid_bulk_issue",
        ),
        (
            "a table name that is no identifier",
            table(json!({ "table": "events; DROP TABLE events", "column": "name" })),
            422,
            "invalid_bulk_issue",
        ),
        (
            "a column name that is no identifier",
            table(json!({ "table": "events", "column": "name\" FROM events --" })),
            422,
            "invalid_bulk_issue",
        ),
        (
            "the source database without --bulk-source-url",
            table(json!({ "table": "events", "column": "name", "database": "source" })),
            422,
            "invalid_bulk_issue",
        ),
        (
            "an unknown ?format",
            upload(coupons, "?format=xml", "text/plain", "ana\n"),
            422,
            "invalid_bulk_issue",
        ),
        (
            "an upload over --bulk-max-upload-bytes",
            submit(coupons, "").header("content-type", "text/plain").body(big),
            413,
            "payload_too_large",
        ),
        (
            "a chunked upload over --bulk-max-upload-bytes",
            submit(coupons, "")
                .header("content-type", "text/plain")
                .body(chunked),
            413,
            "payload_too_large",
        ),
        (
            "an XML upload",
            upload(coupons, "", "application/xml", "<users/>"),
            415,
            "unsupported_media_type",
        ),
        (
            "no admin token",
            anonymous(Method::POST, &format!("/v1/admin/events/{coupons}/bulk-issues"))
                .header("content-type", "text/plain")
                .body("ana\n"),
            401,
            "unauthorized",
        ),
        (
            "a wrong admin token",
            anonymous(Method::POST, &format!("/v1/admin/events/{coupons}/bulk-issues"))
                .bearer_auth(&wrong)
                .header("content-type", "text/plain")
                .body("ana\n"),
            403,
            "forbidden",
        ),
        (
            "listing jobs without a token",
            anonymous(Method::GET, "/v1/admin/jobs"),
            401,
            "unauthorized",
        ),
        (
            "reading a job without a token",
            anonymous(Method::GET, "/v1/admin/jobs/1"),
            401,
            "unauthorized",
        ),
        (
            "cancelling a job without a token",
            anonymous(Method::POST, "/v1/admin/jobs/1/cancel"),
            401,
            "unauthorized",
        ),
        (
            "revoking a job without a token",
            anonymous(Method::POST, "/v1/admin/jobs/1/revoke"),
            401,
            "unauthorized",
        ),
        (
            "reading an unknown job",
            app.admin(Method::GET, "/v1/admin/jobs/999999"),
            404,
            "job_not_found",
        ),
        (
            "cancelling an unknown job",
            app.admin(Method::POST, "/v1/admin/jobs/999999/cancel"),
            404,
            "job_not_found",
        ),
        (
            "revoking an unknown job",
            app.admin(Method::POST, "/v1/admin/jobs/999999/revoke"),
            404,
            "job_not_found",
        ),
    ];

    // Act
    let failures = mismatches(cases).await?;

    // Assert
    assert!(
        failures.is_empty(),
        "{} cases failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert_eq!(app.db.job_count().await?, 0, "no job was created");
    assert!(app.job_ids("").await?.is_empty());
    assert!(app.db.grants(coupons).await?.is_empty());
    assert_eq!(app.counts(coupons).await?.remaining, 10);
    Ok(())
}

async fn revoking_a_job_returns_its_units_and_leaves_other_jobs_grants_alone(
    backend: Backend,
) -> anyhow::Result<()> {
    // Arrange: job A grants 30 users, job B 10 more, of 50 units.
    let app = TestApp::spawn(backend).await?;
    let event = app.coupon_event(50, 1).await?;
    let (a_users, b_users) = (Stampede::users("a", 30), Stampede::users("b", 10));
    let a = app
        .submit_upload_ok(event, "text/plain", "", lines(&a_users))
        .await?;
    succeeded(&app, a, SMALL_JOB).await?;
    let b = app
        .submit_upload_ok(event, "text/plain", "", lines(&b_users))
        .await?;
    succeeded(&app, b, SMALL_JOB).await?;
    assert_eq!(app.counts(event).await?.remaining, 10);

    // Act
    let revoked = send(app.admin(Method::POST, &format!("/v1/admin/jobs/{a}/revoke"))).await?;

    // Assert
    revoked.assert_status(200);
    assert_eq!(
        (
            revoked.body["revoked"].as_i64(),
            revoked.body["job"]["id"].as_i64()
        ),
        (Some(30), Some(a)),
        "{revoked}"
    );
    let rows = app.db.grants(event).await?;
    assert_eq!(rows.len(), 40, "revoked grants are kept (soft delete): {rows:?}");
    let with = |job: i64, status: &str| {
        let users: Vec<&str> = rows
            .iter()
            .filter(|r| r.job_id == job && r.status == status)
            .map(|r| r.user_id.as_str())
            .collect();
        set(&users)
    };
    assert_eq!(with(a, "revoked"), set(&a_users));
    assert_eq!(with(b, "issued"), set(&b_users));
    let counts = app.counts(event).await?;
    assert_eq!((counts.sold, counts.remaining), (10, 40));
    assert_eq!(app.db.bulk_issued(event).await?, 10);
    app.reserve_ok(event, "a-0", None).await?; // a revoked user may claim live
    app.reserve(event, "b-0", None, None)
        .await?
        .assert_problem(409, "limit_reached");
    assert_eq!(app.counts(event).await?.remaining, 39);
    Ok(())
}

async fn a_finished_job_cannot_be_cancelled(backend: Backend) -> anyhow::Result<()> {
    // Arrange
    let app = TestApp::spawn(backend).await?;
    let event = app.coupon_event(10, 1).await?;
    let job_id = app
        .submit_upload_ok(event, "text/plain", "", "ana\nben\n")
        .await?;
    let before = succeeded(&app, job_id, SMALL_JOB).await?;

    // Act
    let cancel = send(app.admin(Method::POST, &format!("/v1/admin/jobs/{job_id}/cancel"))).await?;

    // Assert
    cancel.assert_problem(409, "invalid_state");
    let after = app.job(job_id).await?.body;
    assert_eq!(
        (&after["state"], &after["totals"], &after["cancel_requested"]),
        (&before["state"], &before["totals"], &json!(false)),
        "the job is unchanged: {after}"
    );
    assert_eq!(app.db.grant_count(event, "issued").await?, 2);
    Ok(())
}

async fn jobs_are_listed_newest_first(backend: Backend) -> anyhow::Result<()> {
    // Arrange: three jobs on two events.
    let app = TestApp::spawn(backend).await?;
    let (one, two) = (app.coupon_event(10, 1).await?, app.coupon_event(10, 1).await?);
    let first = app.submit_upload_ok(one, "text/plain", "", "ana\n").await?;
    let second = app.submit_upload_ok(two, "text/plain", "", "ben\n").await?;
    let third = app.submit_upload_ok(one, "text/plain", "", "cy\n").await?;

    // Act
    let all = app.job_ids("").await?;
    let two_newest = app.job_ids("?limit=2").await?;
    let of_one = app.job_ids(&format!("?event_id={one}")).await?;

    // Assert
    assert_eq!(all, [third, second, first]);
    assert_eq!(two_newest, [third, second]);
    assert_eq!(of_one, [third, first]);
    Ok(())
}

async fn jobs_submitted_the_moment_their_event_is_created_run_to_the_end(
    backend: Backend,
) -> anyhow::Result<()> {
    // Arrange: an operator creates an event and submits its list at once, many times over, so
    // the job meets an event whose state is still being read from the database.
    let app = TestApp::spawn(backend).await?;

    for i in 0..PROMPT_SUBMISSIONS {
        let event = app.coupon_event(10, 1).await?;

        // Act
        let job_id = app
            .submit_upload_ok(event, "text/plain", "", format!("fan-{i}\n"))
            .await?;
        let job = succeeded(&app, job_id, ONE_LINE_JOB).await;

        // Assert
        if let Err(error) = job {
            panic!("submission {i}: the job of a just-created event did not run: {error:#}");
        }
        assert_eq!(app.counts(event).await?.sold, 1, "submission {i}");
    }
    Ok(())
}

async fn a_job_submitted_right_after_a_restart_runs_to_the_end(backend: Backend) -> anyhow::Result<()> {
    // Arrange: the event exists, and nothing has touched it since the server restarted.
    let mut app = TestApp::spawn(backend).await?;
    let event = app.coupon_event(10, 1).await?;

    for i in 0..PROMPT_RESTARTS {
        app.restart().await?;

        // Act
        let job_id = app
            .submit_upload_ok(event, "text/plain", "", format!("fan-{i}\n"))
            .await?;
        let job = succeeded(&app, job_id, ONE_LINE_JOB).await;

        // Assert
        if let Err(error) = job {
            panic!("restart {i}: the job submitted right after it did not run: {error:#}");
        }
    }
    assert_eq!(app.counts(event).await?.sold, i64::try_from(PROMPT_RESTARTS)?);
    Ok(())
}

async fn a_million_line_upload_grants_a_million_coupons(backend: Backend) -> anyhow::Result<()> {
    let _alone = exclusive_machine().await;
    // Arrange
    let targets = 1_000_000;
    let app = TestApp::spawn(backend).await?;
    let event = app.coupon_event(targets, 1).await?;
    let path = app.db.dir().join("million.txt");
    write_lines(&path, (0..targets).map(|i| format!("user-{i:07}")))?;
    let size = std::fs::metadata(&path)?.len();

    // Act: streamed from disk, chunked.
    let began = Instant::now();
    let job_id = app
        .submit_upload_ok(event, "text/plain", "", file_body(&path).await?)
        .await?;
    let uploaded = began.elapsed();
    let job = succeeded(&app, job_id, BIG_JOB).await?;
    let took = began.elapsed();

    // Assert
    eprintln!(
        "{backend:?}: {targets} targets ({size} bytes) uploaded in {uploaded:.1?}, issued in {took:.1?} \
         ({:.0}/s)",
        targets as f64 / took.as_secs_f64()
    );
    let n = i64::try_from(targets)?;
    assert_eq!(
        Totals::of(&job)?,
        Totals {
            read: n,
            issued: n,
            ..Totals::default()
        },
        "{job}"
    );
    assert_eq!(job["source"]["bytes"].as_u64(), Some(size), "{job}");
    assert_eq!(app.db.grant_count(event, "issued").await?, n);
    assert_eq!(app.db.bulk_issued(event).await?, n);
    let counts = app.counts(event).await?;
    assert_eq!((counts.sold, counts.remaining), (n, 0));
    Ok(())
}

/// `count` lines for the interrupted-job tests, every tenth of them repeating the user five
/// lines before it: the lines and how many distinct users they name.
fn list_with_repeats(path: &Path, count: usize) -> anyhow::Result<BTreeSet<String>> {
    let user = |i: usize| {
        if i % 10 == 9 {
            format!("k-{}", i - 5)
        } else {
            format!("k-{i}")
        }
    };
    write_lines(path, (0..count).map(user))?;
    Ok((0..count).map(user).collect())
}

async fn a_job_cut_off_by_kill_9_resumes_after_the_restart_and_grants_each_user_once(
    backend: Backend,
) -> anyhow::Result<()> {
    let _alone = exclusive_machine().await;
    // Arrange
    let mut app = TestApp::spawn_with(backend, &["--bulk-chunk-rows", SMALL_CHUNKS]).await?;
    let event = app.coupon_event(u64::try_from(INTERRUPTED_TARGETS)?, 1).await?;
    let path = app.db.dir().join("targets.txt");
    let distinct = list_with_repeats(&path, INTERRUPTED_TARGETS)?;
    let job_id = app
        .submit_upload_ok(event, "text/plain", "", file_body(&path).await?)
        .await?;
    let running = app
        .poll_job(job_id, SMALL_JOB, |job| {
            job["state"] == "running" && job["totals"]["issued"].as_i64() > Some(0)
        })
        .await?;

    // Act
    app.kill();
    app.start().await?;
    let job = succeeded(&app, job_id, BIG_JOB).await?;

    // Assert
    let issued_at_kill = Totals::of(&running)?.issued;
    let d = i64::try_from(distinct.len())?;
    eprintln!("{backend:?}: killed at {issued_at_kill} of {d} grants");
    let rows = app.db.grants(event).await?;
    let users = distinct_users(&rows)?; // fails on a user granted twice
    assert_eq!(users, distinct, "exactly the distinct listed users hold grants");
    assert!(rows.iter().all(|r| r.status == "issued" && r.job_id == job_id));
    let totals = Totals::of(&job)?;
    assert_eq!(
        totals,
        Totals {
            read: i64::try_from(INTERRUPTED_TARGETS)?,
            issued: d,
            skipped: i64::try_from(INTERRUPTED_TARGETS)? - d,
            ..Totals::default()
        },
        "the totals count each line once across the restart: {job}"
    );
    assert_eq!(totals.issued, i64::try_from(rows.len())?);
    assert_eq!(app.db.bulk_issued(event).await?, d);
    let counts = app.counts(event).await?;
    assert_eq!(
        (counts.sold, counts.remaining),
        (d, i64::try_from(INTERRUPTED_TARGETS)? - d)
    );
    Ok(())
}

async fn live_claims_during_a_job_never_oversell_and_nobody_holds_both(
    backend: Backend,
) -> anyhow::Result<()> {
    let _alone = exclusive_machine().await;
    // Arrange: 150,000 targets for 100,000 units, and 2,000 live users, half of them on the list
    // (spread over all of it), half not.
    let (stock, targets) = (100_000_i64, 150_000_i64);
    let app = TestApp::spawn_with(backend, &["--bulk-chunk-rows", SMALL_CHUNKS]).await?;
    let event = app.coupon_event(u64::try_from(stock)?, 1).await?;
    let path = app.db.dir().join("targets.txt");
    write_lines(&path, (0..targets).map(|i| format!("t-{i}")))?;
    let mut crowd: Vec<String> = (0..1_000).map(|i| format!("t-{}", i * 150)).collect();
    crowd.extend(Stampede::users("walk-in", 1_000));
    let job_id = app
        .submit_upload_ok(event, "text/plain", "", file_body(&path).await?)
        .await?;
    app.poll_job(job_id, SMALL_JOB, |job| job["state"] == "running")
        .await?;

    // Act
    let outcome = Stampede::new(&app.client, &app.address, event, crowd)
        .retrying_unread()
        .run()
        .await;
    let during = app.job(job_id).await?.body;
    let job = succeeded(&app, job_id, BIG_JOB).await?;

    // Assert
    let totals = Totals::of(&job)?;
    let live = i64::try_from(outcome.granted.len())?;
    eprintln!(
        "{backend:?}: {live} live claims granted while the job ran (at the end of the stampede it was \
         {} with {} issued); refused {:?}; unanswered {}; sent again {}; slowest {:?}; job {totals:?}",
        during["state"],
        during["totals"]["issued"],
        outcome.refused,
        outcome.unanswered.len(),
        outcome.retried,
        outcome.slowest
    );
    assert!(outcome.unanswered.is_empty(), "{:?}", outcome.unanswered.first());
    assert!(
        outcome
            .refused
            .keys()
            .all(|answer| answer == "409 sold_out" || answer == "409 limit_reached"),
        "{:?}",
        outcome.refused
    );
    assert_eq!(
        live + totals.issued,
        stock,
        "live claims plus grants are the stock exactly: {live} live, job {totals:?}"
    );
    assert_eq!(job["stock_exhausted"], true, "{job}");
    assert!(totals.adds_up() && totals.read == targets, "{job}");
    let reservations = app.db.reservations(event).await?;
    assert_acknowledged_are_durable(&outcome, &reservations);
    let (rows, units) = active_units(&reservations);
    let grants = app.db.grants(event).await?;
    let granted = distinct_users(&grants)?;
    assert_eq!(
        (units, i64::try_from(grants.len())?),
        (live, totals.issued),
        "the database holds the live units and the grants"
    );
    assert_eq!(units + i64::try_from(grants.len())?, stock);
    assert_eq!(i64::try_from(rows)?, live, "one unit per live claim");
    let both: Vec<&str> = reservations
        .iter()
        .filter(|r| r.is_active() && granted.contains(&r.user_id))
        .map(|r| r.user_id.as_str())
        .collect();
    assert!(both.is_empty(), "users with a live claim and a grant: {both:?}");
    let counts = app.counts(event).await?;
    assert_eq!((counts.sold, counts.remaining), (stock, 0));
    Ok(())
}

async fn cancelling_a_running_job_stops_it_with_rows_and_counts_in_agreement(
    backend: Backend,
) -> anyhow::Result<()> {
    let _alone = exclusive_machine().await;
    // Arrange
    let app = TestApp::spawn_with(backend, &["--bulk-chunk-rows", SMALL_CHUNKS]).await?;
    let stock = i64::try_from(INTERRUPTED_TARGETS)?;
    let event = app.coupon_event(u64::try_from(stock)?, 1).await?;
    let path = app.db.dir().join("targets.txt");
    let distinct = list_with_repeats(&path, INTERRUPTED_TARGETS)?;
    let job_id = app
        .submit_upload_ok(event, "text/plain", "", file_body(&path).await?)
        .await?;
    app.poll_job(job_id, SMALL_JOB, |job| {
        job["state"] == "running" && job["totals"]["issued"].as_i64() > Some(0)
    })
    .await?;
    let revoke_running = send(app.admin(Method::POST, &format!("/v1/admin/jobs/{job_id}/revoke"))).await?;

    // Act
    let cancel = send(app.admin(Method::POST, &format!("/v1/admin/jobs/{job_id}/cancel"))).await?;
    let job = app.wait_job(job_id, SMALL_JOB).await?;

    // Assert
    revoke_running.assert_problem(409, "invalid_state");
    cancel.assert_status(200);
    assert!(
        cancel.body["cancel_requested"] == true || cancel.body["state"] == "cancelled",
        "{cancel}"
    );
    assert_eq!(job["state"], "cancelled", "{job}");
    let issued = Totals::of(&job)?.issued;
    let d = i64::try_from(distinct.len())?;
    eprintln!("{backend:?}: cancelled after {issued} of {d} grants");
    assert!(issued > 0 && issued < d, "the job stopped part-way: {job}");
    let rows = app.db.grants(event).await?;
    let users = distinct_users(&rows)?;
    assert_eq!(i64::try_from(rows.len())?, issued, "one row per grant counted");
    assert!(users.is_subset(&distinct));
    assert_eq!(app.db.bulk_issued(event).await?, issued);
    let counts = app.counts(event).await?;
    assert_eq!((counts.sold, counts.remaining), (issued, stock - issued));
    let again = send(app.admin(Method::POST, &format!("/v1/admin/jobs/{job_id}/cancel"))).await?;
    again.assert_problem(409, "invalid_state");
    Ok(())
}

/// `CREATE TABLE segment (user_id …)` filled with `users` on `db`.
async fn segment_table(db: &TestDb, users: &[String]) -> anyhow::Result<()> {
    db.execute_owned("CREATE TABLE segment (user_id VARCHAR(128) NOT NULL, region VARCHAR(8))".to_owned())
        .await?;
    for batch in users.chunks(500) {
        let values: Vec<String> = batch.iter().map(|user| format!("('{user}', 'eu')")).collect();
        db.execute_owned(format!(
            "INSERT INTO segment (user_id, region) VALUES {}",
            values.join(", ")
        ))
        .await?;
    }
    Ok(())
}

async fn a_table_in_the_servers_or_the_source_database_is_a_list_of_targets(
    backend: Backend,
) -> anyhow::Result<()> {
    // Arrange: a segment of 2,500 users in the server's database, 25 of them twice, and one of
    // 700 others in a separate database given as --bulk-source-url. The table is read in chunks
    // of 100 rows, and each repeated user is the 100th row of a chunk in column order (seg-0099,
    // seg-0199, ...): its second row is the first of the next chunk.
    let source = TestDb::create(backend).await?;
    if let Some(path) = source.url.strip_prefix("sqlite://") {
        std::fs::File::create(path).with_context(|| format!("creating {path}"))?;
    }
    let outside = Stampede::users("crm", 700);
    segment_table(&source, &outside).await?;
    let flags = ["--bulk-source-url", &source.url, "--bulk-chunk-rows", "100"];
    let app = TestApp::spawn_with(backend, &flags).await?;
    let event = app.coupon_event(10_000, 1).await?;
    let mut inside: Vec<String> = (0..2_500).map(|i| format!("seg-{i:04}")).collect();
    inside.extend((0..25).map(|i| format!("seg-{:04}", i * 100 + 99)));
    segment_table(&app.db, &inside).await?;

    // Act
    let here = app
        .submit_table(event, json!({ "table": "segment", "column": "user_id" }))
        .await?;
    let here_id = app.accepted_job(&here)?;
    let here_job = succeeded(&app, here_id, SMALL_JOB).await?;
    let there = app
        .submit_table(
            event,
            json!({ "table": "segment", "column": "user_id", "database": "source" }),
        )
        .await?;
    let there_id = app.accepted_job(&there)?;
    let there_job = succeeded(&app, there_id, SMALL_JOB).await?;

    // Assert
    assert_eq!(
        here.body["source"],
        json!({ "kind": "table", "table": "segment", "column": "user_id", "database": "server" }),
        "{here}"
    );
    assert_eq!(
        Totals::of(&here_job)?,
        Totals {
            read: 2_525,
            issued: 2_500,
            skipped: 25,
            ..Totals::default()
        },
        "{here_job}"
    );
    assert_eq!(there.body["source"]["database"], "source", "{there}");
    assert_eq!(
        Totals::of(&there_job)?,
        Totals {
            read: 700,
            issued: 700,
            ..Totals::default()
        },
        "{there_job}"
    );
    let rows = app.db.grants(event).await?;
    let by_job = |job: i64| {
        let users: Vec<&str> = rows
            .iter()
            .filter(|r| r.job_id == job)
            .map(|r| r.user_id.as_str())
            .collect();
        set(&users)
    };
    assert_eq!(by_job(here_id), set(&inside));
    assert_eq!(by_job(there_id), set(&outside));
    assert_eq!(rows.len(), 3_200);
    let counts = app.counts(event).await?;
    assert_eq!((counts.sold, counts.remaining), (3_200, 10_000 - 3_200));
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Webhooks (SQLite only: delivery does not depend on the database)
// ---------------------------------------------------------------------------------------------

/// The generic JSON deliveries of `deliveries` to `path`, in arrival order.
fn to_path<'a>(deliveries: &'a [Delivery], path: &str) -> Vec<&'a Delivery> {
    deliveries.iter().filter(|d| d.path == path).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_events_reach_the_json_and_slack_webhooks_in_order() -> anyhow::Result<()> {
    // Arrange
    let hooks = HookReceiver::start(0).await?;
    let (json_hook, slack_hook) = (
        format!("json={}", hooks.url("/hook")),
        format!("slack={}", hooks.url("/slack")),
    );
    let flags = [
        "--bulk-webhook",
        &json_hook,
        "--bulk-webhook",
        &slack_hook,
        "--bulk-progress-secs",
        "1",
    ];
    let app = TestApp::spawn_with(Backend::Sqlite, &flags).await?;
    let event = app.coupon_event(10, 1).await?;

    // Act
    let job_id = app
        .submit_upload_ok(event, "text/plain", "", "ana\nben\ncy\nana\n")
        .await?;
    let job = succeeded(&app, job_id, SMALL_JOB).await?;
    let received = hooks
        .wait_for(WEBHOOK_WAIT, |all| {
            to_path(all, "/hook")
                .last()
                .is_some_and(|d| d.event() == "job.succeeded")
                && to_path(all, "/slack")
                    .iter()
                    .any(|d| d.body["text"].as_str().is_some_and(|t| t.contains("succeeded")))
        })
        .await?;

    // Assert
    let generic = to_path(&received, "/hook");
    let events: Vec<&str> = generic.iter().map(|d| d.event()).collect();
    assert!(
        events.first() == Some(&"job.started")
            && events.last() == Some(&"job.succeeded")
            && events[1..events.len() - 1].iter().all(|e| *e == "job.progress"),
        "job.started, any job.progress, then job.succeeded: {events:?}"
    );
    for delivery in &generic {
        assert!(
            delivery
                .headers
                .get("content-type")
                .is_some_and(|ct| ct.starts_with("application/json"))
                && delivery
                    .headers
                    .get("user-agent")
                    .is_some_and(|ua| ua.starts_with("firstcome/")),
            "{delivery:?}"
        );
        assert_eq!(delivery.body["job"]["id"].as_i64(), Some(job_id), "{delivery:?}");
        timestamp(&delivery.body["sent_at"])?;
    }
    let reported = &generic[generic.len() - 1].body["job"];
    assert_eq!(
        Totals::of(reported)?,
        Totals {
            read: 4,
            issued: 3,
            skipped: 1,
            ..Totals::default()
        },
        "{reported}"
    );
    for member in [
        "id",
        "event_id",
        "state",
        "source",
        "totals",
        "invalid_lines",
        "finished_at",
        "error",
    ] {
        assert_eq!(
            reported[member], job[member],
            "job.succeeded carries the final job's {member}"
        );
    }
    let slack = to_path(&received, "/slack");
    let texts: Vec<&str> = slack.iter().filter_map(|d| d.body["text"].as_str()).collect();
    assert_eq!(
        texts.len(),
        slack.len(),
        "every Slack body is {{\"text\": …}}: {slack:?}"
    );
    let done = texts
        .iter()
        .find(|t| t.contains("succeeded"))
        .copied()
        .unwrap_or_default();
    assert!(
        done.contains(&format!("job {job_id}")) && done.contains("3 issued") && done.contains("1 skipped"),
        "{done:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_that_answers_500_first_gets_the_event_on_a_retry() -> anyhow::Result<()> {
    // Arrange: the receiver fails its first request; a bare URL is a generic JSON target.
    let hooks = HookReceiver::start(1).await?;
    let url = hooks.url("/flaky");
    let app = TestApp::spawn_with(Backend::Sqlite, &["--bulk-webhook", &url]).await?;
    let event = app.coupon_event(10, 1).await?;

    // Act
    let job_id = app.submit_upload_ok(event, "text/plain", "", "ana\n").await?;
    succeeded(&app, job_id, SMALL_JOB).await?;
    let received = hooks
        .wait_for(WEBHOOK_WAIT, |all| {
            all.iter()
                .any(|d| d.event() == "job.succeeded" && d.answered == 200)
        })
        .await?;

    // Assert
    let seen: Vec<(&str, u16)> = received.iter().map(|d| (d.event(), d.answered)).collect();
    assert_eq!(
        seen.get(..2),
        Some(&[("job.started", 500), ("job.started", 200)][..]),
        "the failed job.started is sent again, before anything else: {seen:?}"
    );
    assert_eq!(
        seen.last(),
        Some(&("job.succeeded", 200)),
        "delivered in order: {seen:?}"
    );
    if received
        .iter()
        .any(|d| d.body["job"]["id"].as_i64() != Some(job_id))
    {
        bail!("a delivery about another job: {seen:?}");
    }
    Ok(())
}
