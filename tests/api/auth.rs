//! Authentication: users by JWT (HS256 secret, RS256 / ES256 public key), admins by static
//! token or role claim, and the start-up refusal of trusted-header mode on a public address.
//! Tokens are minted here with `jsonwebtoken` and the key pairs in `tests/fixtures/auth/`.

use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::{Method, RequestBuilder};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::helpers::{ADMIN_TOKEN, Backend, Reply, TestApp, send, serve_command};

const SECRET: &str = "test-only-hs256-secret-0123456789abcdef";
const ISSUER: &str = "https://id.example.test/";
const AUDIENCE: &str = "firstcome-tests";
/// Environment variables for one server start.
type EnvVars = &'static [(&'static str, &'static str)];
/// How long a refused start may take to exit.
const EXIT_TIMEOUT: Duration = Duration::from_secs(20);

on_every_backend!(
    a_valid_token_makes_its_sub_the_owner_of_the_reservation,
    another_users_token_cannot_see_or_change_my_reservation,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rs256_and_es256_public_keys_verify_their_own_tokens_only() -> anyhow::Result<()> {
    // Arrange
    let rs = TestApp::spawn_with(Backend::Sqlite, &rs256_server_args()).await?;
    let es_key = fixture("ec-public.pem");
    let es = TestApp::spawn_with(
        Backend::Sqlite,
        &["--jwt-public-key", &es_key, "--jwt-algorithm", "ES256"],
    )
    .await?;
    let rs_event = rs.coupon_event(5, 1).await?;
    let es_event = es.coupon_event(5, 1).await?;
    let es_claims = json!({ "sub": "ana", "exp": now() + 600 });

    // Act
    let rs_ok = reserve(&rs, rs_event, &sign_rs256(&claims("ana"))?).await?;
    let es_ok = reserve(&es, es_event, &sign_es256(&es_claims)?).await?;
    let es_given_rs = reserve(&es, es_event, &sign_rs256(&es_claims)?).await?;
    let rs_given_es = reserve(&rs, rs_event, &sign_es256(&claims("ben"))?).await?;

    // Assert
    for (what, reply, app, event) in [("RS256", &rs_ok, &rs, rs_event), ("ES256", &es_ok, &es, es_event)] {
        reply.assert_status(201);
        assert_eq!(reply.body["user_id"], "ana", "{what}: {reply}");
        let rows = app.db.reservations(event).await?;
        assert_eq!(rows.len(), 1, "{what}");
        assert_eq!(rows[0].user_id, "ana", "{what}: the durable owner");
    }
    assert_invalid_token("an RS256 token on the ES256 server", &es_given_rs);
    assert_invalid_token("an ES256 token on the RS256 server", &rs_given_es);
    assert_eq!(
        es.db.reservations(es_event).await?.len(),
        1,
        "nothing more reserved"
    );
    assert_eq!(
        rs.db.reservations(rs_event).await?.len(),
        1,
        "nothing more reserved"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_are_refused_with_401_and_change_nothing() -> anyhow::Result<()> {
    // Arrange
    let rs = TestApp::spawn_with(Backend::Sqlite, &rs256_server_args()).await?;
    let hs = TestApp::spawn_with(Backend::Sqlite, &hs256_server_args()).await?;
    let rs_event = rs.ticket_event(5, 2, 600).await?;
    let hs_event = hs.ticket_event(5, 2, 600).await?;
    let public_pem = std::fs::read(fixture("rsa-public.pem")).context("reading the public key")?;
    let valid = sign_rs256(&claims("ana"))?;
    let with = |edit: &dyn Fn(&mut Value)| {
        let mut claims = claims("ana");
        edit(&mut claims);
        claims
    };
    let rs_cases: Vec<(&str, String)> = vec![
        (
            "forged: payload swapped under a valid signature",
            tamper(&valid, &claims("mallory"))?,
        ),
        (
            "forged: signature cut off",
            valid
                .rsplit_once('.')
                .map(|(m, _)| format!("{m}."))
                .unwrap_or_default(),
        ),
        (
            "expired an hour ago",
            sign_rs256(&with(&|c| c["exp"] = json!(now() - 3600)))?,
        ),
        (
            "expired 60 s ago (past the 5 s leeway)",
            sign_rs256(&with(&|c| c["exp"] = json!(now() - 60)))?,
        ),
        (
            "nbf an hour ahead",
            sign_rs256(&with(&|c| c["nbf"] = json!(now() + 3600)))?,
        ),
        (
            "wrong audience",
            sign_rs256(&with(&|c| c["aud"] = json!("someone-else")))?,
        ),
        (
            "no audience",
            sign_rs256(&with(&|c| drop(c.as_object_mut().map(|o| o.remove("aud")))))?,
        ),
        (
            "wrong issuer",
            sign_rs256(&with(&|c| c["iss"] = json!("https://evil.example/")))?,
        ),
        (
            "no issuer",
            sign_rs256(&with(&|c| drop(c.as_object_mut().map(|o| o.remove("iss")))))?,
        ),
        (
            "no exp",
            sign_rs256(&with(&|c| drop(c.as_object_mut().map(|o| o.remove("exp")))))?,
        ),
        (
            "exp not a number",
            sign_rs256(&with(&|c| c["exp"] = json!("tomorrow")))?,
        ),
        (
            "no sub",
            sign_rs256(&with(&|c| drop(c.as_object_mut().map(|o| o.remove("sub")))))?,
        ),
        ("sub not a string", sign_rs256(&with(&|c| c["sub"] = json!(42)))?),
        (
            "sub not a valid user id",
            sign_rs256(&with(&|c| c["sub"] = json!("ana smith")))?,
        ),
        ("alg none", unsigned(&claims("ana"))?),
        (
            "alg confusion: HS256 with the RSA public key as the secret",
            sign_hmac(Algorithm::HS256, &public_pem, &claims("ana"))?,
        ),
        (
            "wrong algorithm: RS512 with the right key",
            sign_rsa(Algorithm::RS512, &claims("ana"))?,
        ),
        (
            "wrong algorithm: PS256 with the right key",
            sign_rsa(Algorithm::PS256, &claims("ana"))?,
        ),
        ("malformed: two parts", "abc.def".to_owned()),
        ("malformed: garbage in three parts", "a.b.c".to_owned()),
        ("malformed: not base64", "!!!.???.***".to_owned()),
    ];
    let hs_cases: Vec<(&str, String)> = vec![
        (
            "signed with another secret",
            sign_hmac(
                Algorithm::HS256,
                b"another-secret-that-is-32-bytes-long!!",
                &claims("ana"),
            )?,
        ),
        (
            "HS512 with the right secret (one algorithm is accepted)",
            sign_hmac(Algorithm::HS512, SECRET.as_bytes(), &claims("ana"))?,
        ),
        ("alg none", unsigned(&claims("ana"))?),
        ("expired", sign_hs256(&with(&|c| c["exp"] = json!(now() - 3600)))?),
    ];
    let rs_counts = rs.counts(rs_event).await?;
    let hs_counts = hs.counts(hs_event).await?;

    // Act
    let mut failures = Vec::new();
    for (app, event, cases) in [(&rs, rs_event, rs_cases), (&hs, hs_event, hs_cases)] {
        for (what, token) in cases {
            let claim = reserve(app, event, &token).await?;
            let list = send(
                app.request(Method::GET, "/v1/me/reservations")
                    .bearer_auth(&token),
            )
            .await?;
            for (route, reply) in [("reserve", claim), ("list", list)] {
                if let Some(why) = invalid_token_mismatch(&reply) {
                    failures.push(format!("{what} ({route}): {why}"));
                }
            }
        }
    }
    let missing: Vec<(&str, RequestBuilder)> = vec![
        (
            "no Authorization",
            rs.request(Method::POST, &reservations(rs_event)),
        ),
        (
            "an X-User-Id header only",
            rs.as_user(Method::POST, &reservations(rs_event), "ana"),
        ),
        (
            "Basic credentials",
            rs.request(Method::POST, &reservations(rs_event))
                .basic_auth("ana", Some("pw")),
        ),
        (
            "an empty bearer token",
            rs.request(Method::POST, &reservations(rs_event))
                .header("authorization", "Bearer "),
        ),
    ];
    for (what, request) in missing {
        let reply = send(request).await?;
        if let Some(why) = reply.problem_mismatch(401, "missing_user") {
            failures.push(format!("{what}: {why}"));
        } else if reply.header("www-authenticate") != Some(r#"Bearer realm="firstcome""#) {
            failures.push(format!("{what}: no plain Bearer challenge: {:?}", reply.headers));
        }
    }

    // Assert
    assert!(
        failures.is_empty(),
        "{} cases failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(
        rs.db.reservations(rs_event).await?.is_empty(),
        "no reservation was made"
    );
    assert!(
        hs.db.reservations(hs_event).await?.is_empty(),
        "no reservation was made"
    );
    assert_eq!(rs.counts(rs_event).await?, rs_counts);
    assert_eq!(hs.counts(hs_event).await?, hs_counts);
    // The same server still accepts a good token: the refusals were about the tokens.
    reserve(&rs, rs_event, &valid).await?.assert_status(201);
    reserve(&hs, hs_event, &sign_hs256(&claims("ana"))?)
        .await?
        .assert_status(201);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_accepted_before_is_refused_once_it_expires() -> anyhow::Result<()> {
    // Arrange
    let mut args = rs256_server_args();
    args.extend(["--jwt-leeway-seconds", "0"]);
    let app = TestApp::spawn_with(Backend::Sqlite, &args).await?;
    let exp = now() + 2;
    let mut short_lived = claims("ana");
    short_lived["exp"] = json!(exp);
    let token = sign_rs256(&short_lived)?;
    let list = || {
        send(
            app.request(Method::GET, "/v1/me/reservations")
                .bearer_auth(&token),
        )
    };

    // Act
    let first = list().await?;
    let again = list().await?;
    while now() <= exp {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let after_exp = list().await?;

    // Assert
    first.assert_status(200);
    again.assert_status(200);
    assert_invalid_token("the same token after its exp", &after_exp);
    assert_eq!(after_exp.body["detail"], "The token has expired.", "{after_exp}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_routes_take_any_configured_token_or_the_admin_role_claim() -> anyhow::Result<()> {
    // Arrange
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("firstcome.toml");
    std::fs::write(
        &config,
        "admin_tokens = [\"second-admin-token\", \"third-admin-token\"]\n\
         jwt_admin_claim = \"permissions\"\njwt_admin_role = \"drops:admin\"\n",
    )?;
    let config = config.display().to_string();
    let mut args = hs256_server_args();
    args.extend(["--config", config.as_str()]);
    let app = TestApp::spawn_with(Backend::Sqlite, &args).await?;
    let with = |permissions: Value| {
        let mut claims = claims("operator");
        claims["permissions"] = permissions;
        sign_hs256(&claims)
    };
    let create = |what: &str| {
        app.request(Method::POST, "/v1/events")
            .json(&json!({ "name": what, "kind": "coupon", "stock": 1 }))
    };
    let admitted: Vec<(&str, String)> = vec![
        ("FIRSTCOME_ADMIN_TOKEN", ADMIN_TOKEN.to_owned()),
        ("the second TOML token", "second-admin-token".to_owned()),
        ("the third TOML token", "third-admin-token".to_owned()),
        (
            "a JWT whose permissions list the role",
            with(json!(["drops:read", "drops:admin"]))?,
        ),
        (
            "a JWT whose permissions string names the role",
            with(json!("drops:read drops:admin"))?,
        ),
    ];
    let mut roles_instead = claims("operator");
    roles_instead["roles"] = json!(["admin", "drops:admin"]);
    let forbidden: Vec<(&str, String)> = vec![
        ("a wrong static token", "second-admin-tokenx".to_owned()),
        ("a JWT without the claim", sign_hs256(&claims("operator"))?),
        ("a JWT with other permissions", with(json!(["drops:read"]))?),
        (
            "a JWT with the role in another claim",
            sign_hs256(&roles_instead)?,
        ),
        (
            "a JWT with a role that only starts alike",
            with(json!("drops:administrator"))?,
        ),
    ];
    let mut expired_admin = claims("operator");
    expired_admin["permissions"] = json!(["drops:admin"]);
    expired_admin["exp"] = json!(now() - 3600);
    let invalid: Vec<(&str, String)> = vec![
        ("an expired admin JWT", sign_hs256(&expired_admin)?),
        ("an admin JWT with another secret", {
            sign_hmac(
                Algorithm::HS256,
                b"another-secret-that-is-32-bytes-long!!",
                &json!({ "sub": "operator", "iss": ISSUER, "aud": AUDIENCE, "exp": now() + 600, "permissions": ["drops:admin"] }),
            )?
        }),
    ];

    // Act
    let mut failures = Vec::new();
    for (what, token) in &admitted {
        let reply = send(create(what).bearer_auth(token)).await?;
        if reply.status.as_u16() != 201 {
            failures.push(format!("{what}: expected 201, got {reply}"));
        }
    }
    for (what, token) in &forbidden {
        if let Some(why) = send(create(what).bearer_auth(token))
            .await?
            .problem_mismatch(403, "forbidden")
        {
            failures.push(format!("{what}: {why}"));
        }
    }
    for (what, token) in &invalid {
        if let Some(why) = invalid_token_mismatch(&send(create(what).bearer_auth(token)).await?) {
            failures.push(format!("{what}: {why}"));
        }
    }
    let anonymous = send(create("anonymous")).await?;
    let stats = send(
        app.request(Method::GET, "/v1/admin/stats")
            .bearer_auth(with(json!(["drops:admin"]))?),
    )
    .await?;

    // Assert
    assert!(
        failures.is_empty(),
        "{} cases failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    anonymous.assert_problem(401, "unauthorized");
    assert_eq!(
        anonymous.header("www-authenticate"),
        Some(r#"Bearer realm="firstcome""#)
    );
    stats.assert_status(200);
    assert_eq!(
        app.db.event_count().await?,
        i64::try_from(admitted.len())?,
        "only the admitted requests created events"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trusted_header_mode_on_a_public_address_refuses_to_start_unless_allowed() -> anyhow::Result<()> {
    // Arrange
    let public_key = fixture("rsa-public.pem");
    let refused: Vec<(&str, Vec<&str>, &str)> = vec![
        (
            "default mode on 0.0.0.0",
            vec!["--bind", "0.0.0.0:0"],
            "allow_trusted_header_on_public_bind",
        ),
        (
            "explicit trusted_header on 0.0.0.0, though a JWT secret is set",
            vec![
                "--bind",
                "0.0.0.0:0",
                "--auth-mode",
                "trusted_header",
                "--jwt-secret",
                SECRET,
            ],
            "is not loopback",
        ),
        (
            "the allow flag set to false",
            vec![
                "--bind",
                "0.0.0.0:0",
                "--allow-trusted-header-on-public-bind",
                "false",
            ],
            "is not loopback",
        ),
        (
            "jwt mode without a key",
            vec!["--bind", "127.0.0.1:0", "--auth-mode", "jwt"],
            "neither jwt_secret nor jwt_public_key",
        ),
        (
            "HS256 with a public key (algorithm confusion)",
            vec![
                "--bind",
                "127.0.0.1:0",
                "--jwt-public-key",
                &public_key,
                "--jwt-algorithm",
                "HS256",
            ],
            "HMAC algorithm cannot be used with a public key",
        ),
        (
            "a secret shorter than 32 bytes",
            vec!["--bind", "127.0.0.1:0", "--jwt-secret", "short"],
            "at least 32 bytes",
        ),
    ];
    let allowed: Vec<(&str, Vec<&str>, EnvVars)> = vec![
        (
            "the allow flag",
            vec!["--bind", "0.0.0.0:0", "--allow-trusted-header-on-public-bind"],
            &[],
        ),
        (
            "the allow environment variable",
            vec!["--bind", "0.0.0.0:0"],
            &[("FIRSTCOME_ALLOW_TRUSTED_HEADER_ON_PUBLIC_BIND", "true")],
        ),
        (
            "a JWT secret (jwt mode by default)",
            vec!["--bind", "0.0.0.0:0", "--jwt-secret", SECRET],
            &[],
        ),
    ];

    // Act
    let mut failures = Vec::new();
    for (what, args, message) in &refused {
        let dir = tempfile::tempdir()?;
        let output = tokio::time::timeout(EXIT_TIMEOUT, serve(dir.path(), args, &[]).output())
            .await
            .with_context(|| format!("{what}: the server did not exit"))?
            .context("running the server")?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        if output.status.success() || !stderr.contains(message) {
            failures.push(format!(
                "{what}: expected a failed start saying {message:?}, got {} and:\n{stderr}",
                output.status
            ));
        }
        if !output.stdout.is_empty() {
            failures.push(format!(
                "{what}: printed {:?}",
                String::from_utf8_lossy(&output.stdout)
            ));
        }
    }
    for (what, args, env) in &allowed {
        let dir = tempfile::tempdir()?;
        match started_and_healthy(dir.path(), args, env).await {
            Ok(()) => {}
            Err(error) => failures.push(format!("{what}: {error:#}")),
        }
    }

    // Assert
    assert!(
        failures.is_empty(),
        "{} cases failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    Ok(())
}

async fn a_valid_token_makes_its_sub_the_owner_of_the_reservation(backend: Backend) -> anyhow::Result<()> {
    // Arrange
    let app = TestApp::spawn_with(backend, &hs256_server_args()).await?;
    let coupons = app.coupon_event(5, 1).await?;
    let tickets = app.ticket_event(5, 2, 600).await?;
    let ana = sign_hs256(&claims("ana"))?;

    // Act
    let coupon = reserve(&app, coupons, &ana).await?;
    // why: in jwt mode the header is not trusted; the token alone names the user.
    let ticket = send(
        app.request(Method::POST, &reservations(tickets))
            .bearer_auth(&ana)
            .header("x-user-id", "ben"),
    )
    .await?;
    let header_only = app.reserve(tickets, "ben", None, None).await?;

    // Assert
    for reply in [&coupon, &ticket] {
        reply.assert_status(201);
        assert_eq!(reply.body["user_id"], "ana", "{reply}");
        let id = reply.id().context("no reservation id")?;
        let read = send(
            app.request(Method::GET, &format!("/v1/reservations/{id}"))
                .bearer_auth(&ana),
        )
        .await?;
        read.assert_status(200);
        assert_eq!(read.body["user_id"], "ana");
    }
    for event in [coupons, tickets] {
        let rows = app.db.reservations(event).await?;
        assert_eq!(rows.len(), 1, "event {event}");
        assert_eq!(
            rows[0].user_id, "ana",
            "the durable owner of event {event}'s reservation"
        );
    }
    header_only.assert_problem(401, "missing_user");
    let mine = send(app.request(Method::GET, "/v1/me/reservations").bearer_auth(&ana)).await?;
    assert_eq!(
        mine.body["reservations"].as_array().map(Vec::len),
        Some(2),
        "{mine}"
    );
    Ok(())
}

async fn another_users_token_cannot_see_or_change_my_reservation(backend: Backend) -> anyhow::Result<()> {
    // Arrange
    let app = TestApp::spawn_with(backend, &hs256_server_args()).await?;
    let tickets = app.ticket_event(5, 2, 600).await?;
    let coupons = app.coupon_event(5, 1).await?;
    let (ana, ben) = (sign_hs256(&claims("ana"))?, sign_hs256(&claims("ben"))?);
    let held = reserve(&app, tickets, &ben).await?;
    held.assert_status(201);
    let coupon = reserve(&app, coupons, &ben).await?;
    coupon.assert_status(201);
    let ana_own = reserve(&app, coupons, &ana).await?;
    ana_own.assert_status(201);
    let counts = (app.counts(tickets).await?, app.counts(coupons).await?);
    let as_ana = |method: Method, path: String| app.request(method, &path).bearer_auth(&ana);
    let mut attempts: Vec<(String, RequestBuilder)> = Vec::new();
    for (kind, reply) in [("held ticket", &held), ("coupon", &coupon)] {
        let id = reply.id().context("no reservation id")?.to_owned();
        attempts.push((
            format!("read of ben's {kind}"),
            as_ana(Method::GET, format!("/v1/reservations/{id}")),
        ));
        attempts.push((
            format!("confirm of ben's {kind}"),
            as_ana(Method::POST, format!("/v1/reservations/{id}/confirm")),
        ));
        attempts.push((
            format!("cancel of ben's {kind}"),
            as_ana(Method::POST, format!("/v1/reservations/{id}/cancel")),
        ));
    }

    // Act
    let mut failures = Vec::new();
    for (what, request) in attempts {
        if let Some(why) = send(request)
            .await?
            .problem_mismatch(404, "reservation_not_found")
        {
            failures.push(format!("{what}: {why}"));
        }
    }
    let ana_list = send(app.request(Method::GET, "/v1/me/reservations").bearer_auth(&ana)).await?;
    let ben_list = send(app.request(Method::GET, "/v1/me/reservations").bearer_auth(&ben)).await?;

    // Assert
    assert!(
        failures.is_empty(),
        "{} cases failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert_eq!(
        (app.counts(tickets).await?, app.counts(coupons).await?),
        counts,
        "nothing moved"
    );
    for (event, status) in [(tickets, "held"), (coupons, "issued")] {
        let bens: Vec<_> = app
            .db
            .reservations(event)
            .await?
            .into_iter()
            .filter(|r| r.user_id == "ben")
            .collect();
        assert_eq!(bens.len(), 1);
        assert_eq!(
            bens[0].status, status,
            "ben's reservation of event {event} is unchanged"
        );
    }
    let ids = |reply: &Reply| -> Vec<(String, String)> {
        reply.body["reservations"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|r| {
                (
                    r["id"].as_str().unwrap_or_default().to_owned(),
                    r["user_id"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect()
    };
    assert_eq!(
        ids(&ana_list),
        vec![(ana_own.id().unwrap_or_default().to_owned(), "ana".to_owned())],
        "{ana_list}"
    );
    let ben_listed = ids(&ben_list);
    assert_eq!(ben_listed.len(), 2, "{ben_list}");
    assert!(ben_listed.iter().all(|(_, user)| user == "ben"), "{ben_list}");
    // Ben himself still can.
    let held_id = held.id().unwrap_or_default();
    send(
        app.request(Method::POST, &format!("/v1/reservations/{held_id}/confirm"))
            .bearer_auth(&ben),
    )
    .await?
    .assert_status(200);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Tokens and servers
// ---------------------------------------------------------------------------------------------

fn fixture(name: &str) -> String {
    format!("{}/tests/fixtures/auth/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_per_user_rate_limit_keys_on_the_token_subject_not_on_the_token_or_a_header() -> anyhow::Result<()>
{
    // Arrange: jwt mode, two writes per user, the per-IP quota out of the way.
    let mut args = hs256_server_args();
    args.extend([
        "--rate-limit",
        "true",
        "--rate-limit-writes-per-user",
        "1/min burst 2",
        "--rate-limit-writes-per-ip",
        "100000/s",
    ]);
    let app = TestApp::spawn_with(Backend::Sqlite, &args).await?;
    let event = app
        .create_event(json!({"name": "limited", "kind": "coupon", "stock": 10, "per_user_limit": 10}))
        .await?;
    let path = format!("/v1/events/{event}/reservations");
    let token_for = |sub: &str, nonce: u64| -> anyhow::Result<String> {
        let mut claims = claims(sub);
        claims["jti"] = json!(nonce);
        sign_hs256(&claims)
    };

    // Act: ana claims with three different tokens (and a different X-User-Id on each); ben once.
    let mut ana = Vec::new();
    for nonce in 0..3 {
        let request = app
            .request(Method::POST, &path)
            .bearer_auth(token_for("ana", nonce)?)
            .header("x-user-id", format!("someone-else-{nonce}"));
        ana.push(send(request).await?);
    }
    let ben = send(app.request(Method::POST, &path).bearer_auth(token_for("ben", 9)?)).await?;

    // Assert: ana's third claim is over her quota whatever the token text or header said.
    ana[0].assert_status(201);
    ana[1].assert_status(201);
    ana[2].assert_problem(429, "rate_limited");
    ben.assert_status(201);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_socket_token_must_verify_and_no_token_means_an_anonymous_listener() -> anyhow::Result<()> {
    use tokio_tungstenite::tungstenite::Error as WsError;
    // Arrange
    let app = TestApp::spawn_with(Backend::Sqlite, &hs256_server_args()).await?;
    let event = app
        .create_event(json!({"name": "live", "kind": "coupon", "stock": 5}))
        .await?;
    let base = format!("{}/v1/events/{event}/live", app.address.replacen("http", "ws", 1));
    let good = sign_hs256(&claims("ana"))?;
    let forged = sign_hmac(
        Algorithm::HS256,
        b"another-secret-another-secret-0123",
        &claims("ana"),
    )?;

    // Act
    let with_good = tokio_tungstenite::connect_async(format!("{base}?access_token={good}")).await;
    let anonymous = tokio_tungstenite::connect_async(base.clone()).await;
    let with_forged = tokio_tungstenite::connect_async(format!("{base}?access_token={forged}")).await;

    // Assert
    assert!(with_good.is_ok(), "a valid token connects: {:?}", with_good.err());
    assert!(
        anonymous.is_ok(),
        "no token is an anonymous listener: {:?}",
        anonymous.err()
    );
    match with_forged {
        Err(WsError::Http(response)) => assert_eq!(response.status(), 401, "{response:?}"),
        other => panic!("a forged token must be refused before the upgrade, got {other:?}"),
    }
    Ok(())
}

/// Claims every server in this file accepts: issuer, audience, valid for ten more minutes.
fn claims(sub: &str) -> Value {
    json!({ "sub": sub, "iss": ISSUER, "aud": AUDIENCE, "exp": now() + 600, "nbf": now() - 10, "iat": now() })
}

fn hs256_server_args() -> Vec<&'static str> {
    vec![
        "--jwt-secret",
        SECRET,
        "--jwt-issuer",
        ISSUER,
        "--jwt-audience",
        AUDIENCE,
    ]
}

fn rs256_server_args() -> Vec<&'static str> {
    static KEY: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| fixture("rsa-public.pem"));
    vec![
        "--jwt-public-key",
        KEY.as_str(),
        "--jwt-issuer",
        ISSUER,
        "--jwt-audience",
        AUDIENCE,
    ]
}

fn sign_hs256(claims: &Value) -> anyhow::Result<String> {
    sign_hmac(Algorithm::HS256, SECRET.as_bytes(), claims)
}

fn sign_hmac(algorithm: Algorithm, secret: &[u8], claims: &Value) -> anyhow::Result<String> {
    let key = EncodingKey::from_secret(secret)?;
    Ok(jsonwebtoken::encode(&Header::new(algorithm), claims, &key)?)
}

fn sign_rsa(algorithm: Algorithm, claims: &Value) -> anyhow::Result<String> {
    let pem = std::fs::read(fixture("rsa-private.pem")).context("reading the RSA private key")?;
    let key = EncodingKey::from_rsa_pem(&pem)?;
    Ok(jsonwebtoken::encode(&Header::new(algorithm), claims, &key)?)
}

fn sign_rs256(claims: &Value) -> anyhow::Result<String> {
    sign_rsa(Algorithm::RS256, claims)
}

fn sign_es256(claims: &Value) -> anyhow::Result<String> {
    let pem = std::fs::read(fixture("ec-private.pem")).context("reading the EC private key")?;
    let key = EncodingKey::from_ec_pem(&pem)?;
    Ok(jsonwebtoken::encode(
        &Header::new(Algorithm::ES256),
        claims,
        &key,
    )?)
}

/// An `alg: none` token: header and claims, no signature.
fn unsigned(claims: &Value) -> anyhow::Result<String> {
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
    Ok(format!(
        "{header}.{}.",
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims)?)
    ))
}

/// `token` with its claims replaced by `claims`, keeping the original header and signature.
fn tamper(token: &str, claims: &Value) -> anyhow::Result<String> {
    let mut parts = token.split('.');
    let (Some(header), Some(_), Some(signature)) = (parts.next(), parts.next(), parts.next()) else {
        bail!("{token} is not a JWT");
    };
    Ok(format!(
        "{header}.{}.{signature}",
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims)?)
    ))
}

fn reservations(event: i64) -> String {
    format!("/v1/events/{event}/reservations")
}

async fn reserve(app: &TestApp, event: i64, token: &str) -> anyhow::Result<Reply> {
    send(app.request(Method::POST, &reservations(event)).bearer_auth(token)).await
}

/// Why `reply` is not a `401 invalid_token` with the RFC 6750 challenge, if it is not.
fn invalid_token_mismatch(reply: &Reply) -> Option<String> {
    if let Some(why) = reply.problem_mismatch(401, "invalid_token") {
        return Some(why);
    }
    let challenge = reply.header("www-authenticate").unwrap_or_default();
    (!challenge.starts_with("Bearer ") || !challenge.contains(r#"error="invalid_token""#))
        .then(|| format!("WWW-Authenticate is {challenge:?}"))
}

#[track_caller]
fn assert_invalid_token(what: &str, reply: &Reply) {
    if let Some(why) = invalid_token_mismatch(reply) {
        panic!("{what}: {why}");
    }
}

/// `firstcome serve` on a fresh SQLite file in `dir`, with only the given settings.
fn serve(dir: &std::path::Path, args: &[&str], env: &[(&str, &str)]) -> tokio::process::Command {
    let database_url = format!("sqlite://{}", dir.join("firstcome.db").display());
    serve_command(&database_url, args, env)
}

/// Starts a server that binds 0.0.0.0 and checks that it answers `/healthz` on loopback.
async fn started_and_healthy(
    dir: &std::path::Path,
    args: &[&str],
    env: &[(&str, &str)],
) -> anyhow::Result<()> {
    let mut command = serve(dir, args, env);
    command.stderr(Stdio::null());
    let mut child = command.spawn().context("starting the server")?;
    let stdout = child.stdout.take().context("no stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(EXIT_TIMEOUT, lines.next_line())
        .await
        .context("no port printed in time")??
        .context("the server exited before listening")?;
    let port: u16 = line
        .strip_prefix("firstcome listening on http://0.0.0.0:")
        .and_then(|port| port.trim().parse().ok())
        .with_context(|| format!("unexpected first line {line:?}"))?;
    let health = send(reqwest::Client::new().get(format!("http://127.0.0.1:{port}/healthz"))).await?;
    child.kill().await.context("stopping the server")?;
    if health.status.as_u16() != 200 {
        bail!("/healthz answered {health}");
    }
    Ok(())
}
