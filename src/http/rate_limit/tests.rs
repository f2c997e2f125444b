use std::time::Instant;

use anyhow::Context;

use super::*;

fn quota(raw: &str) -> anyhow::Result<Quota> {
    raw.parse::<Limit>()
        .map_err(anyhow::Error::msg)?
        .to_governor()
        .context("the quota is off")
}

/// Resident set size of this process, from /proc (Linux).
fn rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[test]
fn requests_are_classed_by_method_and_path() {
    let cases = [
        (
            Method::POST,
            "/v1/events/7/reservations",
            Some(Class::Writes),
            "reserve",
        ),
        (
            Method::POST,
            "/v1/reservations/abc/confirm",
            Some(Class::Writes),
            "confirm",
        ),
        (
            Method::POST,
            "/v1/reservations/abc/cancel",
            Some(Class::Writes),
            "cancel",
        ),
        (
            Method::PATCH,
            "/v1/reservations/abc",
            Some(Class::Writes),
            "a reservation PATCH",
        ),
        (Method::GET, "/v1/events/7", Some(Class::Reads), "an event read"),
        (
            Method::GET,
            "/v1/me/reservations",
            Some(Class::Reads),
            "own reservations",
        ),
        (
            Method::GET,
            "/v1/events/7/live",
            Some(Class::Live),
            "a WebSocket connect",
        ),
        (Method::POST, "/v1/events", None, "admin: create an event"),
        (Method::PATCH, "/v1/events/7", None, "admin: change an event"),
        (Method::GET, "/v1/admin/stats", None, "admin stats"),
        (Method::GET, "/healthz", None, "liveness"),
        (Method::GET, "/readyz", None, "readiness"),
        (Method::GET, "/metrics", None, "metrics"),
        (
            Method::GET,
            "/v1/administrator",
            Some(Class::Reads),
            "not an admin path",
        ),
    ];
    for (method, path, class, what) in cases {
        assert_eq!(Class::of(&method, path), class, "{what}: {method} {path}");
    }
}

#[test]
fn a_refusal_rounds_its_wait_up_to_whole_seconds() {
    let limited = |wait| Limited {
        name: "writes-user".into(),
        policy: HeaderValue::from_static(""),
        wait,
    };
    assert_eq!(limited(Duration::from_millis(1)).retry_after(), 1);
    assert_eq!(limited(Duration::from_millis(1000)).retry_after(), 1);
    assert_eq!(limited(Duration::from_millis(1001)).retry_after(), 2);
    assert_eq!(
        limited(Duration::ZERO).retry_after(),
        1,
        "never tells a client to retry at once"
    );
}

#[test]
fn the_policy_header_names_the_burst_and_its_refill_window() -> anyhow::Result<()> {
    let scoped: Scoped<u64> = Scoped::new("writes-user".into(), quota("5/s burst 10")?);
    assert_eq!(scoped.policy, "\"writes-user\";q=10;w=2");
    let scoped: Scoped<u64> = Scoped::new("live-ip".into(), quota("600/min burst 100")?);
    assert_eq!(scoped.policy, "\"live-ip\";q=100;w=10");
    Ok(())
}

#[test]
fn a_key_gets_its_burst_then_waits_one_interval() -> anyhow::Result<()> {
    let scoped: Scoped<u64> = Scoped::new("t".into(), quota("2/s burst 3")?);
    for i in 0..3 {
        assert_eq!(scoped.check(&1), Ok(()), "request {i} is within the burst");
    }
    let wait = scoped
        .check(&1)
        .err()
        .ok_or_else(|| anyhow::anyhow!("the 4th passed"))?;
    assert!(
        wait > Duration::from_millis(400) && wait <= Duration::from_millis(500),
        "{wait:?}"
    );
    assert_eq!(scoped.check(&2), Ok(()), "another key has its own state");
    Ok(())
}

#[test]
fn a_million_distinct_keys_are_pruned_back_to_none() -> anyhow::Result<()> {
    const KEYS: u64 = 1_000_000;
    // Arrange: a quota whose state is back to full 1 ms after a key's one request.
    let scoped: Scoped<u64> = Scoped::new("writes-user".into(), quota("1000/s burst 1")?);
    let rss_before = rss_kib();

    // Act
    let started = Instant::now();
    for key in 0..KEYS {
        assert_eq!(scoped.check(&key), Ok(()));
    }
    let filled_in = started.elapsed();
    let held = scoped.len();
    let rss_full = rss_kib();
    std::thread::sleep(Duration::from_millis(20));
    let started = Instant::now();
    scoped.prune();
    let pruned_in = started.elapsed();
    let rss_pruned = rss_kib();

    // Assert
    eprintln!(
        "{KEYS} keys: held {held} after {filled_in:?}; pruned to {} in {pruned_in:?}; \
         RSS KiB before {rss_before:?}, full {rss_full:?}, pruned {rss_pruned:?}",
        scoped.len()
    );
    assert_eq!(held, KEYS as usize, "every distinct key holds state");
    assert!(scoped.is_empty(), "{} keys left after pruning", scoped.len());
    Ok(())
}

#[test]
fn pruning_keeps_keys_that_are_still_limited() -> anyhow::Result<()> {
    // A negative control for the test above: state that still matters must survive.
    let scoped: Scoped<u64> = Scoped::new("reads-ip".into(), quota("1/h burst 1")?);
    for key in 0..1_000 {
        assert_eq!(scoped.check(&key), Ok(()));
    }
    scoped.prune();
    assert_eq!(scoped.len(), 1_000);
    assert!(
        scoped.check(&7).is_err(),
        "a pruned limiter would let key 7 through again"
    );
    Ok(())
}

#[test]
fn ipv6_clients_are_keyed_by_their_64_bit_prefix() -> anyhow::Result<()> {
    let a: IpAddr = "2001:db8:1:2::1".parse()?;
    let b: IpAddr = "2001:db8:1:2:ffff::9".parse()?;
    let c: IpAddr = "2001:db8:1:3::1".parse()?;
    assert_eq!(IpKey::from(a), IpKey::from(b));
    assert_ne!(IpKey::from(a), IpKey::from(c));
    Ok(())
}
