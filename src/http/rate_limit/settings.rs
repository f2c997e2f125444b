//! The rate limiter's settings: one quota per request class and scope, the trusted proxies, and
//! the pruning interval. Quotas are written `<count>/<s|min|h>`, optionally with a burst
//! (`5/s burst 10`), or `off`.

use std::fmt;
use std::num::NonZeroU32;
use std::str::FromStr;
use std::time::Duration;

use clap::Args;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// One quota: `count` requests per `per`, with bursts of up to `burst` requests; or no limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Limit {
    Off,
    Quota {
        count: NonZeroU32,
        per: Per,
        burst: NonZeroU32,
    },
}

/// The period of a quota's rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Per {
    Second,
    Minute,
    Hour,
}

impl Per {
    fn duration(self) -> Duration {
        Duration::from_secs(match self {
            Per::Second => 1,
            Per::Minute => 60,
            Per::Hour => 3600,
        })
    }

    fn unit(self) -> &'static str {
        match self {
            Per::Second => "s",
            Per::Minute => "min",
            Per::Hour => "h",
        }
    }
}

impl Limit {
    /// For a GCRA kept elsewhere (Redis): milliseconds per unit, and the burst.
    pub fn emission(self) -> Option<(f64, u32)> {
        match self {
            Limit::Off => None,
            Limit::Quota { count, per, burst } => Some((
                per.duration().as_secs_f64() * 1000.0 / f64::from(count.get()),
                burst.get(),
            )),
        }
    }

    /// `count` per `per` with a burst of `count`.
    pub const fn quota(count: NonZeroU32, per: Per, burst: NonZeroU32) -> Limit {
        Limit::Quota { count, per, burst }
    }

    /// The governor quota, or `None` when off.
    pub fn to_governor(self) -> Option<governor::Quota> {
        match self {
            Limit::Off => None,
            Limit::Quota { count, per, burst } => {
                governor::Quota::with_period(per.duration() / count.get()).map(|q| q.allow_burst(burst))
            }
        }
    }
}

impl FromStr for Limit {
    type Err = String;

    fn from_str(raw: &str) -> Result<Limit, String> {
        let text = raw.trim();
        if text.eq_ignore_ascii_case("off") {
            return Ok(Limit::Off);
        }
        let bad = || format!("{raw:?} is not a quota: write e.g. `10/s`, `600/min burst 50` or `off`");
        let (rate, burst) = match text.split_once("burst") {
            Some((rate, burst)) => (rate.trim(), Some(burst.trim())),
            None => (text, None),
        };
        let (count, unit) = rate.split_once('/').ok_or_else(bad)?;
        let count: NonZeroU32 = count.trim().parse().map_err(|_| bad())?;
        let per = match unit.trim() {
            "s" | "sec" | "second" => Per::Second,
            "m" | "min" | "minute" => Per::Minute,
            "h" | "hour" => Per::Hour,
            _ => return Err(bad()),
        };
        let burst = match burst {
            Some(burst) => burst.parse().map_err(|_| bad())?,
            None => count,
        };
        let limit = Limit::quota(count, per, burst);
        if limit.to_governor().is_none() {
            return Err(format!(
                "{raw:?} is a faster rate than one request per nanosecond"
            ));
        }
        Ok(limit)
    }
}

impl TryFrom<String> for Limit {
    type Error = String;
    fn try_from(raw: String) -> Result<Limit, String> {
        raw.parse()
    }
}

impl fmt::Display for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Limit::Off => f.write_str("off"),
            Limit::Quota { count, per, burst } => write!(f, "{count}/{} burst {burst}", per.unit()),
        }
    }
}

impl From<Limit> for String {
    fn from(limit: Limit) -> String {
        limit.to_string()
    }
}

/// A proxy address or network (`10.0.0.0/8`, `192.0.2.7`, `2001:db8::/32`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TrustedNet(pub IpNet);

impl FromStr for TrustedNet {
    type Err = String;
    fn from_str(raw: &str) -> Result<TrustedNet, String> {
        let raw = raw.trim();
        raw.parse::<IpNet>()
            .or_else(|_| raw.parse::<std::net::IpAddr>().map(IpNet::from))
            .map(TrustedNet)
            .map_err(|_| format!("{raw:?} is neither an IP address nor a CIDR network"))
    }
}

impl TryFrom<String> for TrustedNet {
    type Error = String;
    fn try_from(raw: String) -> Result<TrustedNet, String> {
        raw.parse()
    }
}

impl From<TrustedNet> for String {
    fn from(net: TrustedNet) -> String {
        net.0.to_string()
    }
}

const fn nz(n: u32) -> NonZeroU32 {
    match NonZeroU32::new(n) {
        Some(n) => n,
        None => NonZeroU32::MIN,
    }
}

/// The resolved rate-limit settings (`[rate_limit]` in the TOML file).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitSettings {
    /// Off: no request is rate limited (load shedding stays on).
    pub enabled: bool,
    /// Peers whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<TrustedNet>,
    /// How often idle keys are dropped from the limiters' state.
    pub prune_interval_secs: u64,
    /// Several nodes: per-user quotas also hold across all nodes together, checked in Redis
    /// (one call per limited request).
    pub global: bool,
    pub writes_per_user: Limit,
    pub writes_per_ip: Limit,
    pub reads_per_user: Limit,
    pub reads_per_ip: Limit,
    pub live_per_user: Limit,
    pub live_per_ip: Limit,
}

impl Default for RateLimitSettings {
    /// Per node. Per-IP quotas are far above per-user ones: many users share one address behind
    /// NAT or a carrier-grade NAT.
    fn default() -> Self {
        Self {
            enabled: true,
            trusted_proxies: Vec::new(),
            prune_interval_secs: 60,
            global: false,
            writes_per_user: Limit::quota(nz(5), Per::Second, nz(10)),
            writes_per_ip: Limit::quota(nz(100), Per::Second, nz(200)),
            reads_per_user: Limit::quota(nz(20), Per::Second, nz(40)),
            reads_per_ip: Limit::quota(nz(400), Per::Second, nz(800)),
            live_per_user: Limit::quota(nz(10), Per::Minute, nz(5)),
            live_per_ip: Limit::quota(nz(600), Per::Minute, nz(100)),
        }
    }
}

/// The rate-limit flags and environment variables; unset ones fall through to the file and the
/// defaults (`[rate_limit]` keys without the `rate-limit-` prefix).
#[derive(Debug, Default, Args, Serialize)]
pub struct RateLimitOverrides {
    /// Rate limiting on or off (`true`/`false`) [default: true].
    #[arg(long = "rate-limit", env = "FIRSTCOME_RATE_LIMIT", value_name = "BOOL")]
    #[serde(rename = "enabled", skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// Proxies (IPs or CIDRs, comma-separated) whose X-Forwarded-For names the client [default: none].
    #[arg(
        long,
        env = "FIRSTCOME_TRUSTED_PROXIES",
        value_delimiter = ',',
        value_name = "NETS"
    )]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trusted_proxies: Option<Vec<String>>,
    /// Seconds between prunings of idle rate-limit keys [default: 60].
    #[arg(
        long = "rate-limit-prune-interval",
        env = "FIRSTCOME_RATE_LIMIT_PRUNE_INTERVAL"
    )]
    #[serde(rename = "prune_interval_secs", skip_serializing_if = "Option::is_none")]
    pub prune_interval_secs: Option<u64>,
    /// Several nodes: per-user quotas hold across all nodes together, checked in Redis with one
    /// call per request (`true`/`false`; needs REDIS_URL) [default: false, per node].
    #[arg(
        long = "rate-limit-global",
        env = "FIRSTCOME_RATE_LIMIT_GLOBAL",
        value_name = "BOOL"
    )]
    #[serde(rename = "global", skip_serializing_if = "Option::is_none")]
    pub global: Option<bool>,
    /// Reservation writes (reserve, confirm, cancel) per user, e.g. `5/s burst 10` or `off` [default: 5/s burst 10].
    #[arg(
        long = "rate-limit-writes-per-user",
        env = "FIRSTCOME_RATE_LIMIT_WRITES_PER_USER"
    )]
    #[serde(rename = "writes_per_user", skip_serializing_if = "Option::is_none")]
    pub writes_per_user: Option<String>,
    /// Reservation writes per client IP [default: 100/s burst 200].
    #[arg(long = "rate-limit-writes-per-ip", env = "FIRSTCOME_RATE_LIMIT_WRITES_PER_IP")]
    #[serde(rename = "writes_per_ip", skip_serializing_if = "Option::is_none")]
    pub writes_per_ip: Option<String>,
    /// Reads (GET) per user [default: 20/s burst 40].
    #[arg(
        long = "rate-limit-reads-per-user",
        env = "FIRSTCOME_RATE_LIMIT_READS_PER_USER"
    )]
    #[serde(rename = "reads_per_user", skip_serializing_if = "Option::is_none")]
    pub reads_per_user: Option<String>,
    /// Reads (GET) per client IP [default: 400/s burst 800].
    #[arg(long = "rate-limit-reads-per-ip", env = "FIRSTCOME_RATE_LIMIT_READS_PER_IP")]
    #[serde(rename = "reads_per_ip", skip_serializing_if = "Option::is_none")]
    pub reads_per_ip: Option<String>,
    /// WebSocket connects (`GET …/live`) per user [default: 10/min burst 5].
    #[arg(long = "rate-limit-live-per-user", env = "FIRSTCOME_RATE_LIMIT_LIVE_PER_USER")]
    #[serde(rename = "live_per_user", skip_serializing_if = "Option::is_none")]
    pub live_per_user: Option<String>,
    /// WebSocket connects per client IP [default: 600/min burst 100].
    #[arg(long = "rate-limit-live-per-ip", env = "FIRSTCOME_RATE_LIMIT_LIVE_PER_IP")]
    #[serde(rename = "live_per_ip", skip_serializing_if = "Option::is_none")]
    pub live_per_ip: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotas_parse_with_and_without_a_burst() -> Result<(), String> {
        let cases = [
            ("10/s", "10/s burst 10"),
            ("600/min burst 50", "600/min burst 50"),
            (" 3 / h burst 1 ", "3/h burst 1"),
            ("OFF", "off"),
        ];
        for (raw, shown) in cases {
            assert_eq!(raw.parse::<Limit>()?.to_string(), shown, "{raw}");
        }
        Ok(())
    }

    #[test]
    fn malformed_quotas_are_refused() {
        for raw in [
            "",
            "10",
            "0/s",
            "10/day",
            "10/s burst 0",
            "10/s burst",
            "-1/s",
            "5000000000/s",
        ] {
            assert!(raw.parse::<Limit>().is_err(), "{raw:?} should be refused");
        }
    }

    #[test]
    fn a_quota_maps_to_governor_rate_and_burst() -> Result<(), String> {
        let quota = "5/s burst 10".parse::<Limit>()?.to_governor().ok_or("off")?;
        assert_eq!(quota.replenish_interval(), Duration::from_millis(200));
        assert_eq!(quota.burst_size().get(), 10);
        Ok(())
    }

    #[test]
    fn trusted_proxies_are_addresses_or_networks() -> Result<(), String> {
        assert_eq!(String::from("10.0.0.0/8".parse::<TrustedNet>()?), "10.0.0.0/8");
        assert_eq!(String::from("192.0.2.7".parse::<TrustedNet>()?), "192.0.2.7/32");
        assert_eq!(String::from("::1".parse::<TrustedNet>()?), "::1/128");
        assert!("10.0.0.0/33".parse::<TrustedNet>().is_err());
        assert!("proxy.local".parse::<TrustedNet>().is_err());
        Ok(())
    }
}

#[cfg(test)]
mod layering {
    use crate::config::{Overrides, Settings};

    #[test]
    fn rate_limit_flags_override_the_file_table_key_by_key() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let file = dir.path().join("firstcome.toml");
        std::fs::write(
            &file,
            "[rate_limit]\nwrites_per_user = \"1/s\"\nreads_per_ip = \"off\"\ntrusted_proxies = [\"10.0.0.0/8\"]\n",
        )?;
        let mut overrides = Overrides {
            config: Some(file),
            ..Overrides::default()
        };
        overrides.rate_limit.writes_per_user = Some("7/min burst 3".into());
        overrides.rate_limit.enabled = Some(false);
        let settings = Settings::load(&overrides)?.rate_limit;
        assert!(!settings.enabled, "the flag");
        assert_eq!(
            settings.writes_per_user.to_string(),
            "7/min burst 3",
            "the flag wins"
        );
        assert_eq!(settings.reads_per_ip.to_string(), "off", "from the file");
        assert_eq!(settings.reads_per_user.to_string(), "20/s burst 40", "default");
        assert_eq!(settings.trusted_proxies.len(), 1);
        Ok(())
    }

    #[test]
    fn a_malformed_quota_stops_the_start() {
        let mut overrides = Overrides::default();
        overrides.rate_limit.writes_per_ip = Some("lots".into());
        assert!(Settings::load(&overrides).is_err());
    }
}
