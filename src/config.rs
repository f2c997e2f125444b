//! Settings, layered: built-in defaults → optional TOML file (`--config`) → environment
//! (`FIRSTCOME_*`, `DATABASE_URL`) → command-line flags. Each flag's doc comment is its
//! `--help` text.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use figment::Figment;
use figment::providers::{Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

use crate::http::rate_limit::{RateLimitOverrides, RateLimitSettings};

#[derive(Debug, Parser)]
#[command(
    name = "firstcome",
    version,
    about = "Limited-inventory drop server: exact, durable, fast reservations"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run migrations, then serve the HTTP API.
    Serve(Overrides),
    /// Run database migrations and exit.
    Migrate(Overrides),
    /// Give an event's coupon to every user in a list (a bulk issuance job), with a progress
    /// bar: through a running server, or straight against a database.
    Issue(crate::bulk::cli::IssueArgs),
}

/// Settings given on the command line or in the environment; unset ones fall through to the
/// configuration file, then to the defaults.
#[derive(Debug, Default, Args, Serialize)]
pub struct Overrides {
    /// TOML file with any of the settings below (keys as in `--help`, with underscores).
    #[arg(long, env = "FIRSTCOME_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:8080].
    #[arg(long, env = "FIRSTCOME_BIND")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bind: Option<String>,
    /// Database URL: sqlite://…, postgres://… or mysql://… [default: sqlite://data/firstcome.db].
    #[arg(long, env = "DATABASE_URL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub database_url: Option<String>,
    /// Bearer token for admin routes; when unset, one is generated at start and logged once.
    #[arg(long, env = "FIRSTCOME_ADMIN_TOKEN", hide_env_values = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin_token: Option<String>,
    /// HTTP worker threads [default: one per core].
    #[arg(long, env = "FIRSTCOME_HTTP_WORKERS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http_workers: Option<usize>,
    /// Dedicated threads (arbiters) for event actors; 0 places them on the HTTP workers' threads
    /// (one per core) [default: 0].
    #[arg(long, env = "FIRSTCOME_EVENT_ARBITERS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event_arbiters: Option<usize>,
    /// Database connections in the pool [default: 8].
    #[arg(long, env = "FIRSTCOME_DB_MAX_CONNECTIONS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub db_max_connections: Option<u32>,
    /// Most writes committed in one transaction [default: 8192].
    #[arg(long, env = "FIRSTCOME_MAX_BATCH")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_batch: Option<usize>,
    /// Largest accepted request body, in bytes [default: 16384].
    #[arg(long, env = "FIRSTCOME_BODY_LIMIT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body_limit: Option<usize>,
    /// Requests queued for one event actor; beyond that, requests get 503 at once [default: 4096].
    #[arg(long, env = "FIRSTCOME_MAILBOX_CAPACITY")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mailbox_capacity: Option<usize>,
    /// Seconds to wait, on SIGTERM or SIGINT, for requests already inside to be answered before
    /// the server stops [default: 30].
    #[arg(long, env = "FIRSTCOME_SHUTDOWN_TIMEOUT_SECS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shutdown_timeout_secs: Option<u64>,
    /// Log format: `text` or `json` [default: text]. Levels come from RUST_LOG.
    #[arg(long, env = "FIRSTCOME_LOG_FORMAT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_format: Option<String>,
    /// How users are identified: `jwt` (bearer tokens) or `trusted_header` (`X-User-Id` from a
    /// gateway) [default: jwt when a JWT secret or key is set, else trusted_header].
    #[arg(long, env = "FIRSTCOME_AUTH_MODE", value_enum)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auth_mode: Option<AuthMode>,
    /// Start in trusted_header mode although the bind address is not loopback (only behind a
    /// gateway that sets X-User-Id itself) [default: false].
    #[arg(
        long,
        env = "FIRSTCOME_ALLOW_TRUSTED_HEADER_ON_PUBLIC_BIND",
        num_args = 0..=1,
        default_missing_value = "true"
    )]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allow_trusted_header_on_public_bind: Option<bool>,
    /// Shared secret for HS256/384/512 user tokens (at least 32 bytes).
    #[arg(long, env = "FIRSTCOME_JWT_SECRET", hide_env_values = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwt_secret: Option<String>,
    /// PEM file with the public key that verifies RS*/PS*/ES*/EdDSA user tokens.
    #[arg(long, env = "FIRSTCOME_JWT_PUBLIC_KEY")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwt_public_key: Option<PathBuf>,
    /// The one JWT algorithm accepted, e.g. HS256, RS256, ES256 [default: HS256 with a secret;
    /// RS256 or ES256 after the public key's type].
    #[arg(long, env = "FIRSTCOME_JWT_ALGORITHM")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwt_algorithm: Option<String>,
    /// Required `iss` of user tokens [default: not checked].
    #[arg(long, env = "FIRSTCOME_JWT_ISSUER")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwt_issuer: Option<String>,
    /// Required `aud` of user tokens [default: none; tokens carrying an `aud` are refused].
    #[arg(long, env = "FIRSTCOME_JWT_AUDIENCE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwt_audience: Option<String>,
    /// Clock skew allowed on `exp` and `nbf`, in seconds, at most 300 [default: 5].
    #[arg(long, env = "FIRSTCOME_JWT_LEEWAY_SECONDS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwt_leeway_seconds: Option<u64>,
    /// Token claim that lists a user's roles (a string or an array of strings) [default: roles].
    #[arg(long, env = "FIRSTCOME_JWT_ADMIN_CLAIM")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwt_admin_claim: Option<String>,
    /// Role in that claim that grants the admin routes [default: admin].
    #[arg(long, env = "FIRSTCOME_JWT_ADMIN_ROLE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwt_admin_role: Option<String>,
    #[command(flatten)]
    #[serde(rename = "rate_limit")]
    pub rate_limit: RateLimitOverrides,
    /// WebSocket: at most one `availability` message per event per this many ms [default: 100].
    #[arg(long, env = "FIRSTCOME_WS_COALESCE_MS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ws_coalesce_ms: Option<u64>,
    /// WebSocket: the server pings every this many ms [default: 5000].
    #[arg(long, env = "FIRSTCOME_WS_HEARTBEAT_MS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ws_heartbeat_ms: Option<u64>,
    /// WebSocket: a client silent (no pong, no message) this many ms is closed [default: 15000].
    #[arg(long, env = "FIRSTCOME_WS_CLIENT_TIMEOUT_MS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ws_client_timeout_ms: Option<u64>,
    /// WebSocket: largest message a client may send, in bytes; larger closes with 1009 [default: 4096].
    #[arg(long, env = "FIRSTCOME_WS_MAX_MESSAGE_BYTES")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ws_max_message_bytes: Option<usize>,
    /// WebSocket: messages buffered per event for slow clients; a client further behind is
    /// closed with 1013 [default: 64].
    #[arg(long, env = "FIRSTCOME_WS_CHANNEL_CAPACITY")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ws_channel_capacity: Option<usize>,
    /// WebSocket: comma-separated Origins allowed to connect (`https://shop.example`, or `*`);
    /// requests without Origin and from the server's own host are always allowed [default: none].
    #[arg(long, env = "FIRSTCOME_WS_ALLOWED_ORIGINS", value_delimiter = ',')]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ws_allowed_origins: Option<Vec<String>>,
    /// Several nodes: Redis holding the shared allocation ledger, e.g. redis://127.0.0.1:6379.
    /// Requires a PostgreSQL database [default: none, one node on its own].
    #[arg(long, env = "REDIS_URL", hide_env_values = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis_url: Option<String>,
    /// Several nodes: prefix of every Redis key and channel [default: firstcome].
    #[arg(long, env = "FIRSTCOME_REDIS_PREFIX")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis_prefix: Option<String>,
    /// Several nodes: longest wait for one Redis call; past it the request gets 503 [default: 1000].
    #[arg(long, env = "FIRSTCOME_REDIS_TIMEOUT_MS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis_timeout_ms: Option<u64>,
    /// Several nodes: an allocation whose row is still unknown this long after it was made (its
    /// node died or lost the database) is reconciled: released unless its row committed [default: 30].
    #[arg(long, env = "FIRSTCOME_RECONCILE_AFTER_SECS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reconcile_after_secs: Option<u64>,
    /// Several nodes: this node's name in logs [default: random].
    #[arg(long, env = "FIRSTCOME_NODE_ID")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_id: Option<String>,
    /// Bulk issuance: directory where uploaded target lists are stored until their job ends
    /// [default: `bulk` beside the SQLite file, else ./data/bulk].
    #[arg(long, env = "FIRSTCOME_BULK_DIR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bulk_dir: Option<PathBuf>,
    /// Bulk issuance: largest accepted upload, in bytes; larger gets 413 [default: 4294967296].
    #[arg(long, env = "FIRSTCOME_BULK_MAX_UPLOAD_BYTES")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bulk_max_upload_bytes: Option<u64>,
    /// Bulk issuance: targets per committed chunk [default: 10000 on SQLite, 25000 otherwise].
    #[arg(long, env = "FIRSTCOME_BULK_CHUNK_ROWS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bulk_chunk_rows: Option<usize>,
    /// Bulk issuance: seconds between `job.progress` webhooks and log lines [default: 10].
    #[arg(long, env = "FIRSTCOME_BULK_PROGRESS_SECS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bulk_progress_secs: Option<u64>,
    /// Bulk issuance: a read-only database that `{"source": {"database": "source", …}}` reads
    /// target tables from [default: none].
    #[arg(long, env = "FIRSTCOME_BULK_SOURCE_URL", hide_env_values = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bulk_source_url: Option<String>,
    /// Bulk issuance: where job events go, repeatable (comma-separated in the environment):
    /// `URL` or `json=URL` for a generic JSON POST, `slack=URL` for a Slack-compatible one
    /// [default: none].
    #[arg(
        long = "bulk-webhook",
        env = "FIRSTCOME_BULK_WEBHOOKS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bulk_webhooks: Option<Vec<String>>,
}

/// How the caller of a user route is identified.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthMode {
    /// `Authorization: Bearer <JWT>`; `sub` is the user id.
    Jwt,
    /// The `X-User-Id` header, set by a gateway that authenticated the user.
    #[value(name = "trusted_header", alias = "trusted-header")]
    TrustedHeader,
}

/// The resolved settings.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub bind: String,
    pub database_url: String,
    pub admin_token: Option<String>,
    pub http_workers: usize,
    pub event_arbiters: usize,
    pub db_max_connections: u32,
    pub max_batch: usize,
    pub body_limit: usize,
    pub mailbox_capacity: usize,
    pub shutdown_timeout_secs: u64,
    pub log_format: String,
    pub auth_mode: Option<AuthMode>,
    pub allow_trusted_header_on_public_bind: bool,
    /// More admin tokens, TOML only (`admin_tokens = ["…", "…"]`), accepted beside `admin_token`.
    pub admin_tokens: Vec<String>,
    pub jwt_secret: Option<String>,
    pub jwt_public_key: Option<PathBuf>,
    pub jwt_algorithm: Option<String>,
    pub jwt_issuer: Option<String>,
    pub jwt_audience: Option<String>,
    pub jwt_leeway_seconds: u64,
    pub jwt_admin_claim: String,
    pub jwt_admin_role: String,
    /// `[rate_limit]` in the file.
    pub rate_limit: RateLimitSettings,
    pub ws_coalesce_ms: u64,
    pub ws_heartbeat_ms: u64,
    pub ws_client_timeout_ms: u64,
    pub ws_max_message_bytes: usize,
    pub ws_channel_capacity: usize,
    pub ws_allowed_origins: Vec<String>,
    pub redis_url: Option<String>,
    pub redis_prefix: String,
    pub redis_timeout_ms: u64,
    pub reconcile_after_secs: u64,
    pub node_id: Option<String>,
    pub bulk_dir: Option<PathBuf>,
    pub bulk_max_upload_bytes: u64,
    pub bulk_chunk_rows: Option<usize>,
    pub bulk_progress_secs: u64,
    pub bulk_source_url: Option<String>,
    pub bulk_webhooks: Vec<String>,
}

impl std::fmt::Debug for Settings {
    /// Everything but the secrets: admin tokens, the JWT secret, the database password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("bind", &self.bind)
            .field("database_url", &redact_password(&self.database_url))
            .field("admin_token", &self.admin_token.as_ref().map(|_| "<set>"))
            .field("http_workers", &self.http_workers)
            .field("event_arbiters", &self.event_arbiters)
            .field("db_max_connections", &self.db_max_connections)
            .field("max_batch", &self.max_batch)
            .field("body_limit", &self.body_limit)
            .field("mailbox_capacity", &self.mailbox_capacity)
            .field("shutdown_timeout_secs", &self.shutdown_timeout_secs)
            .field("auth_mode", &self.auth_mode)
            .field(
                "allow_trusted_header_on_public_bind",
                &self.allow_trusted_header_on_public_bind,
            )
            .field("admin_tokens", &format_args!("<{} set>", self.admin_tokens.len()))
            .field("jwt_secret", &self.jwt_secret.as_ref().map(|_| "<set>"))
            .field("jwt_public_key", &self.jwt_public_key)
            .field("jwt_algorithm", &self.jwt_algorithm)
            .field("jwt_issuer", &self.jwt_issuer)
            .field("jwt_audience", &self.jwt_audience)
            .field("jwt_leeway_seconds", &self.jwt_leeway_seconds)
            .field("jwt_admin_claim", &self.jwt_admin_claim)
            .field("jwt_admin_role", &self.jwt_admin_role)
            .field("rate_limit", &self.rate_limit)
            .field("ws_coalesce_ms", &self.ws_coalesce_ms)
            .field("ws_heartbeat_ms", &self.ws_heartbeat_ms)
            .field("ws_client_timeout_ms", &self.ws_client_timeout_ms)
            .field("ws_max_message_bytes", &self.ws_max_message_bytes)
            .field("ws_channel_capacity", &self.ws_channel_capacity)
            .field("ws_allowed_origins", &self.ws_allowed_origins)
            .field("redis_url", &self.redis_url.as_deref().map(redact_password))
            .field("redis_prefix", &self.redis_prefix)
            .field("redis_timeout_ms", &self.redis_timeout_ms)
            .field("reconcile_after_secs", &self.reconcile_after_secs)
            .field("node_id", &self.node_id)
            .field("bulk_dir", &self.bulk_dir)
            .field("bulk_max_upload_bytes", &self.bulk_max_upload_bytes)
            .field("bulk_chunk_rows", &self.bulk_chunk_rows)
            .field("bulk_progress_secs", &self.bulk_progress_secs)
            .field(
                "bulk_source_url",
                &self.bulk_source_url.as_deref().map(redact_password),
            )
            // Webhook URLs often carry a secret (Slack's do): only their number is logged.
            .field(
                "bulk_webhooks",
                &format_args!("<{} set>", self.bulk_webhooks.len()),
            )
            .finish()
    }
}

/// A URL without its password, for logs and messages.
pub fn redact_password(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            let _ = parsed.set_password(Some("***"));
            parsed.to_string()
        }
        _ => url.to_owned(),
    }
}

impl Default for Settings {
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        Self {
            bind: "127.0.0.1:8080".into(),
            database_url: "sqlite://data/firstcome.db".into(),
            admin_token: None,
            http_workers: cores,
            event_arbiters: 0,
            db_max_connections: 8,
            max_batch: 8192,
            body_limit: 16 * 1024,
            mailbox_capacity: 4096,
            shutdown_timeout_secs: 30,
            log_format: "text".into(),
            auth_mode: None,
            allow_trusted_header_on_public_bind: false,
            admin_tokens: Vec::new(),
            jwt_secret: None,
            jwt_public_key: None,
            jwt_algorithm: None,
            jwt_issuer: None,
            jwt_audience: None,
            jwt_leeway_seconds: 5,
            jwt_admin_claim: "roles".into(),
            jwt_admin_role: "admin".into(),
            rate_limit: RateLimitSettings::default(),
            ws_coalesce_ms: 100,
            ws_heartbeat_ms: 5_000,
            ws_client_timeout_ms: 15_000,
            ws_max_message_bytes: 4096,
            ws_channel_capacity: 64,
            ws_allowed_origins: Vec::new(),
            redis_url: None,
            redis_prefix: "firstcome".into(),
            redis_timeout_ms: 1000,
            reconcile_after_secs: 30,
            node_id: None,
            bulk_dir: None,
            bulk_max_upload_bytes: 4 << 30,
            bulk_chunk_rows: None,
            bulk_progress_secs: 10,
            bulk_source_url: None,
            bulk_webhooks: Vec::new(),
        }
    }
}

impl Settings {
    pub fn load(overrides: &Overrides) -> anyhow::Result<Settings> {
        let mut figment = Figment::from(Serialized::defaults(Settings::default()));
        if let Some(path) = &overrides.config {
            if !path.is_file() {
                bail!("configuration file {} does not exist", path.display());
            }
            figment = figment.merge(Toml::file(path));
        }
        let settings: Settings = figment
            .merge(Serialized::defaults(overrides))
            .extract()
            .context("reading the configuration")?;
        if settings.log_format != "text" && settings.log_format != "json" {
            bail!(
                "log_format must be `text` or `json`, not {:?}",
                settings.log_format
            );
        }
        if settings.rate_limit.global && settings.redis_url.is_none() {
            bail!("rate_limit.global (per-user quotas across nodes) needs REDIS_URL");
        }
        if settings.redis_url.is_some() && !settings.database_url.starts_with("postgres") {
            bail!(
                "REDIS_URL (several nodes) needs a PostgreSQL database as the shared record; \
                 DATABASE_URL is {}",
                redact_password(&settings.database_url)
            );
        }
        Ok(settings)
    }

    /// Where bulk uploads are stored: the configured directory, or `bulk` beside the SQLite
    /// database file, or `./data/bulk`.
    pub fn bulk_dir(&self) -> PathBuf {
        if let Some(dir) = &self.bulk_dir {
            return dir.clone();
        }
        let sqlite_file = self
            .database_url
            .strip_prefix("sqlite://")
            .or_else(|| self.database_url.strip_prefix("sqlite:"))
            .map(|rest| rest.split('?').next().unwrap_or(rest));
        match sqlite_file.map(std::path::Path::new).and_then(|f| f.parent()) {
            Some(parent) if !parent.as_os_str().is_empty() => parent.join("bulk"),
            _ => PathBuf::from("data/bulk"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_the_file_which_overrides_defaults() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let file = dir.path().join("firstcome.toml");
        std::fs::write(&file, "bind = \"0.0.0.0:9000\"\nmax_batch = 100\n")?;
        let overrides = Overrides {
            config: Some(file),
            max_batch: Some(7),
            ..Overrides::default()
        };
        let settings = Settings::load(&overrides)?;
        assert_eq!(settings.bind, "0.0.0.0:9000", "from the file");
        assert_eq!(settings.max_batch, 7, "the flag wins over the file");
        assert_eq!(settings.body_limit, 16 * 1024, "default");
        Ok(())
    }

    #[test]
    fn auth_settings_come_from_the_file_and_admin_tokens_may_be_a_list() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let file = dir.path().join("firstcome.toml");
        std::fs::write(
            &file,
            "auth_mode = \"jwt\"\nadmin_tokens = [\"a\", \"b\"]\njwt_leeway_seconds = 0\n",
        )?;
        let overrides = Overrides {
            config: Some(file),
            allow_trusted_header_on_public_bind: Some(true),
            ..Overrides::default()
        };
        let settings = Settings::load(&overrides)?;
        assert_eq!(settings.auth_mode, Some(AuthMode::Jwt));
        assert_eq!(settings.admin_tokens, ["a", "b"]);
        assert_eq!(settings.jwt_leeway_seconds, 0);
        assert!(settings.allow_trusted_header_on_public_bind, "from the flag");
        assert_eq!(settings.jwt_admin_claim, "roles", "default");
        Ok(())
    }

    #[test]
    fn several_node_settings_refuse_what_cannot_work() {
        let global_alone = Overrides {
            rate_limit: RateLimitOverrides {
                global: Some(true),
                ..RateLimitOverrides::default()
            },
            ..Overrides::default()
        };
        let error = Settings::load(&global_alone).err().map(|e| format!("{e:#}"));
        assert!(
            error.is_some_and(|e| e.contains("REDIS_URL")),
            "a global limit needs Redis"
        );
        let redis_on_sqlite = Overrides {
            redis_url: Some("redis://127.0.0.1:6379".into()),
            ..Overrides::default()
        };
        let error = Settings::load(&redis_on_sqlite).err().map(|e| format!("{e:#}"));
        assert!(
            error.is_some_and(|e| e.contains("PostgreSQL")),
            "several nodes need PostgreSQL"
        );
    }

    #[test]
    fn an_unknown_key_in_the_file_is_an_error() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let file = dir.path().join("firstcome.toml");
        std::fs::write(&file, "bnid = \"0.0.0.0:9000\"\n")?;
        let overrides = Overrides {
            config: Some(file),
            ..Overrides::default()
        };
        assert!(Settings::load(&overrides).is_err());
        Ok(())
    }
}
