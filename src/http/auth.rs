//! Who is calling. Users are identified by a JWT bearer token (`sub` is the user id) or, behind
//! a gateway that authenticates them, by the `X-User-Id` header; operators by a static admin
//! token or by a user token that carries the admin role.
//!
//! The [`Authenticator`] is built once at start-up: the key is parsed and the validation rules
//! (one algorithm, `exp`/`nbf` with a small leeway, `iss`/`aud` when configured) are fixed
//! there, so a request only verifies. It lives in `AppState`; the `User` and `Admin`
//! extractors call it, and so can anything else that receives a raw token (the WebSocket
//! handshake's `access_token`) through [`Authenticator::authenticate_token`].
//!
//! Start-up refuses configurations that would trust strangers: trusted-header mode on a
//! non-loopback address (unless explicitly allowed), an HMAC algorithm with a public key
//! (algorithm confusion), short secrets, empty admin tokens.

use std::net::ToSocketAddrs;

use actix_web::http::header::{self, HeaderMap, HeaderName};
use anyhow::{Context, bail};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, Validation};
use rand::Rng;
use serde_json::{Map, Value};

use crate::config::{AuthMode, Settings};
use crate::domain::UserId;
use crate::error::{ApiError, Code};

/// The header a trusted gateway sets to the authenticated user's id.
///
/// why a `HeaderName`: looking a header up by `&str` parses the name again on every request.
pub const USER_HEADER: HeaderName = HeaderName::from_static("x-user-id");
/// The largest `exp`/`nbf` clock skew an operator may allow.
const MAX_LEEWAY_SECONDS: u64 = 300;
/// HS256 needs a key at least as long as its hash (RFC 7518 §3.2).
const MIN_SECRET_BYTES: usize = 32;
/// Verified tokens remembered, and the longest remembered: at most ~16 MiB of token text.
const CACHED_TOKENS: usize = 16_384;
const MAX_CACHED_TOKEN_LEN: usize = 1024;

/// Verifies credentials; built once from the settings.
pub struct Authenticator {
    mode: AuthMode,
    jwt: Option<JwtVerifier>,
    admin_tokens: Vec<Box<[u8]>>,
}

/// The fixed key and rules for user tokens.
struct JwtVerifier {
    key: DecodingKey,
    validation: Validation,
    admin_claim: String,
    admin_role: String,
    verified: VerifiedTokens,
}

/// What a valid token says about its bearer.
#[derive(Clone)]
struct Verified {
    user: UserId,
    admin: bool,
}

/// Tokens whose signature and claims already verified, by their exact text, until they expire.
///
/// why: an RS256 verification costs ~40–100 µs and ES256 ~150–300 µs of CPU, far more than the
/// rest of a reservation; a client sends the same token on every request until it expires.
/// Only verified tokens enter, so a stranger cannot fill it; `exp` is re-checked on every hit
/// (the other claims cannot change without changing the text, hence the signature).
struct VerifiedTokens {
    tokens: papaya::HashMap<Box<str>, (Verified, u64)>,
    len: std::sync::atomic::AtomicUsize,
}

impl VerifiedTokens {
    fn new() -> Self {
        Self {
            tokens: papaya::HashMap::new(),
            len: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    /// The bearer of `token` if it verified before and `now` (Unix seconds) is not past its
    /// `exp` plus leeway.
    fn get(&self, token: &str, now: u64) -> Option<Verified> {
        let tokens = self.tokens.pin();
        let (verified, valid_until) = tokens.get(token)?;
        if now <= *valid_until {
            return Some(verified.clone());
        }
        tokens.remove(token);
        None
    }

    /// Remembers a verified token; past [`CACHED_TOKENS`], everything is forgotten at once
    /// (expired entries of clients that never came back go too).
    fn insert(&self, token: &str, verified: &Verified, valid_until: u64) {
        use std::sync::atomic::Ordering::Relaxed;
        if token.len() > MAX_CACHED_TOKEN_LEN {
            return;
        }
        let tokens = self.tokens.pin();
        if self.len.fetch_add(1, Relaxed) >= CACHED_TOKENS {
            tokens.clear();
            self.len.store(1, Relaxed);
        }
        tokens.insert(token.into(), (verified.clone(), valid_until));
    }
}

impl Authenticator {
    /// Parses the JWT key, settles the mode and refuses unsafe configurations. When no admin
    /// token is configured at all, one is generated and logged once.
    pub fn from_settings(settings: &Settings) -> anyhow::Result<Authenticator> {
        let jwt = JwtVerifier::from_settings(settings)?;
        let mode = match (settings.auth_mode, &jwt) {
            (Some(AuthMode::Jwt), None) => {
                bail!("auth_mode is jwt, but neither jwt_secret nor jwt_public_key is set")
            }
            (Some(mode), _) => mode,
            (None, Some(_)) => AuthMode::Jwt,
            (None, None) => AuthMode::TrustedHeader,
        };
        if mode == AuthMode::TrustedHeader
            && !settings.allow_trusted_header_on_public_bind
            && !binds_loopback_only(&settings.bind)?
        {
            bail!(
                "refusing to start: auth_mode is trusted_header, which believes any client's \
                 X-User-Id header, and the bind address {} is not loopback. Configure JWT \
                 (jwt_secret or jwt_public_key), or, if a gateway in front authenticates users \
                 and sets X-User-Id itself, set allow_trusted_header_on_public_bind \
                 (--allow-trusted-header-on-public-bind, \
                 FIRSTCOME_ALLOW_TRUSTED_HEADER_ON_PUBLIC_BIND=true)",
                settings.bind
            );
        }
        let mut admin_tokens: Vec<Box<[u8]>> = Vec::new();
        for token in settings.admin_token.iter().chain(&settings.admin_tokens) {
            if token.trim().is_empty() {
                bail!("admin tokens must not be empty");
            }
            admin_tokens.push(token.as_bytes().into());
        }
        if admin_tokens.is_empty() {
            let token = generate_token();
            tracing::info!(token = %token, "no FIRSTCOME_ADMIN_TOKEN set; generated this admin token");
            admin_tokens.push(token.into_bytes().into());
        }
        tracing::info!(?mode, jwt = jwt.is_some(), "authentication configured");
        Ok(Authenticator {
            mode,
            jwt,
            admin_tokens,
        })
    }

    pub fn mode(&self) -> AuthMode {
        self.mode
    }

    /// The user a raw JWT names, whatever the mode; `401 invalid_token` unless it verifies.
    pub fn authenticate_token(&self, token: &str) -> Result<UserId, ApiError> {
        self.verify(token).map(|verified| verified.user)
    }

    /// The caller of a user route, as the mode says: the bearer token's `sub`, or the
    /// gateway's `X-User-Id`.
    pub fn user(&self, headers: &HeaderMap) -> Result<UserId, ApiError> {
        match self.mode {
            AuthMode::Jwt => match bearer(headers) {
                Some(token) => self.authenticate_token(token),
                None => Err(ApiError::new(
                    Code::MissingUser,
                    "A bearer token is required: Authorization: Bearer <JWT>.",
                )),
            },
            AuthMode::TrustedHeader => trusted_user(headers),
        }
    }

    /// Admits an operator: a configured admin token, or a valid user token with the admin
    /// role. No credentials is `401 unauthorized`; credentials without admin rights are
    /// `403 forbidden`; a token that looks like a JWT but does not verify is `401 invalid_token`.
    pub fn admin(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let Some(token) = bearer(headers) else {
            return Err(ApiError::new(
                Code::Unauthorized,
                "An admin bearer token is required.",
            ));
        };
        // why: compare against every token without stopping early, so the timing does not
        // tell which (or whether a) configured token shares a prefix with the guess.
        let matched = self.admin_tokens.iter().fold(false, |found, expected| {
            found | constant_time_eq::constant_time_eq(token.as_bytes(), expected)
        });
        if matched {
            return Ok(());
        }
        if self.jwt.is_some() && looks_like_jwt(token) {
            if self.verify(token)?.admin {
                return Ok(());
            }
            return Err(ApiError::new(
                Code::Forbidden,
                "This user's token does not carry the admin role.",
            ));
        }
        Err(ApiError::new(
            Code::Forbidden,
            "This token does not grant admin access.",
        ))
    }

    fn verify(&self, token: &str) -> Result<Verified, ApiError> {
        let Some(jwt) = &self.jwt else {
            return Err(invalid_token(
                "This server is not configured to accept user tokens.",
            ));
        };
        let now = jsonwebtoken::get_current_timestamp();
        if let Some(verified) = jwt.verified.get(token, now) {
            return Ok(verified);
        }
        let data = jsonwebtoken::decode::<Map<String, Value>>(token, &jwt.key, &jwt.validation).map_err(
            |error| {
                tracing::debug!(%error, "refusing a bearer token");
                invalid_token(refusal_detail(error.kind()))
            },
        )?;
        let sub = data
            .claims
            .get("sub")
            .and_then(Value::as_str)
            .ok_or_else(|| invalid_token("The token's sub claim must be a string."))?;
        let user = UserId::parse(sub)
            .map_err(|e| invalid_token(format!("The token's sub is not a valid user id: {e}.")))?;
        let admin = has_role(data.claims.get(&jwt.admin_claim), &jwt.admin_role);
        let verified = Verified { user, admin };
        if let Some(exp) = data.claims.get("exp").and_then(Value::as_u64) {
            let valid_until = exp.saturating_add(jwt.validation.leeway);
            jwt.verified.insert(token, &verified, valid_until);
        }
        Ok(verified)
    }
}

impl JwtVerifier {
    fn from_settings(settings: &Settings) -> anyhow::Result<Option<JwtVerifier>> {
        let algorithm = settings
            .jwt_algorithm
            .as_deref()
            .map(|name| {
                name.parse::<Algorithm>().ok().with_context(|| {
                    format!(
                        "jwt_algorithm {name:?} is not one of HS256, HS384, HS512, RS256, RS384, \
                         RS512, PS256, PS384, PS512, ES256, ES384, EdDSA"
                    )
                })
            })
            .transpose()?;
        let (key, algorithm) = match (&settings.jwt_secret, &settings.jwt_public_key) {
            (None, None) => {
                let dangling = [
                    ("jwt_algorithm", settings.jwt_algorithm.is_some()),
                    ("jwt_issuer", settings.jwt_issuer.is_some()),
                    ("jwt_audience", settings.jwt_audience.is_some()),
                ];
                if let Some((name, _)) = dangling.iter().find(|(_, set)| *set) {
                    bail!("{name} is set, but neither jwt_secret nor jwt_public_key is");
                }
                return Ok(None);
            }
            (Some(_), Some(_)) => bail!("set jwt_secret or jwt_public_key, not both"),
            (Some(secret), None) => {
                let algorithm = algorithm.unwrap_or(Algorithm::HS256);
                if algorithm.family() != AlgorithmFamily::Hmac {
                    bail!("jwt_algorithm {algorithm:?} needs jwt_public_key, not jwt_secret");
                }
                if secret.len() < MIN_SECRET_BYTES {
                    bail!("jwt_secret must be at least {MIN_SECRET_BYTES} bytes long");
                }
                let key = DecodingKey::from_secret(secret.as_bytes()).context("reading jwt_secret")?;
                (key, algorithm)
            }
            (None, Some(path)) => {
                let pem = std::fs::read(path)
                    .with_context(|| format!("reading jwt_public_key {}", path.display()))?;
                let (key, algorithm) = public_key(&pem, algorithm)
                    .with_context(|| format!("loading jwt_public_key {}", path.display()))?;
                (key, algorithm)
            }
        };
        if settings.jwt_leeway_seconds > MAX_LEEWAY_SECONDS {
            bail!("jwt_leeway_seconds must be at most {MAX_LEEWAY_SECONDS}");
        }
        let mut validation = Validation::new(algorithm);
        validation.leeway = settings.jwt_leeway_seconds;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        let mut required = vec!["exp", "sub"];
        // why: jsonwebtoken checks iss/aud only when the token carries them; a configured
        // issuer or audience must also be present.
        if let Some(issuer) = &settings.jwt_issuer {
            validation.set_issuer(&[issuer]);
            required.push("iss");
        }
        if let Some(audience) = &settings.jwt_audience {
            validation.set_audience(&[audience]);
            required.push("aud");
        }
        validation.set_required_spec_claims(&required);
        if settings.jwt_admin_claim.is_empty() || settings.jwt_admin_role.is_empty() {
            bail!("jwt_admin_claim and jwt_admin_role must not be empty");
        }
        if jsonwebtoken::crypto::CryptoProvider::try_get_default().is_none() {
            bail!("no JWT crypto provider is built in");
        }
        Ok(Some(JwtVerifier {
            key,
            validation,
            admin_claim: settings.jwt_admin_claim.clone(),
            admin_role: settings.jwt_admin_role.clone(),
            verified: VerifiedTokens::new(),
        }))
    }
}

/// The verifying key in `pem`, and the one algorithm it serves: `configured`, or RS256 / ES256 /
/// EdDSA after the key's type.
fn public_key(pem: &[u8], configured: Option<Algorithm>) -> anyhow::Result<(DecodingKey, Algorithm)> {
    let family = configured.map(Algorithm::family);
    let parsed = match family {
        // why: an HMAC algorithm "verified" with a public key accepts any token signed with
        // that (public) key as the secret: the classic algorithm-confusion forgery.
        Some(AlgorithmFamily::Hmac) => bail!("an HMAC algorithm cannot be used with a public key"),
        Some(AlgorithmFamily::Rsa) => DecodingKey::from_rsa_pem(pem).map(|k| (k, Algorithm::RS256)),
        Some(AlgorithmFamily::Ec) => DecodingKey::from_ec_pem(pem).map(|k| (k, Algorithm::ES256)),
        Some(AlgorithmFamily::Ed) => DecodingKey::from_ed_pem(pem).map(|k| (k, Algorithm::EdDSA)),
        None => DecodingKey::from_rsa_pem(pem)
            .map(|k| (k, Algorithm::RS256))
            .or_else(|_| DecodingKey::from_ec_pem(pem).map(|k| (k, Algorithm::ES256)))
            .or_else(|_| DecodingKey::from_ed_pem(pem).map(|k| (k, Algorithm::EdDSA))),
    };
    let (key, inferred) =
        parsed.map_err(|e| anyhow::anyhow!("not a PEM public key of the expected type: {e}"))?;
    Ok((key, configured.unwrap_or(inferred)))
}

/// Whether every address `bind` resolves to is a loopback address.
fn binds_loopback_only(bind: &str) -> anyhow::Result<bool> {
    let addresses: Vec<_> = bind
        .to_socket_addrs()
        .with_context(|| format!("resolving the bind address {bind}"))?
        .collect();
    Ok(!addresses.is_empty() && addresses.iter().all(|a| a.ip().is_loopback()))
}

/// The `X-User-Id` header of trusted-header mode.
fn trusted_user(headers: &HeaderMap) -> Result<UserId, ApiError> {
    match headers.get(USER_HEADER).map(|v| v.to_str()) {
        None => Err(ApiError::new(
            Code::MissingUser,
            "The X-User-Id header is required.",
        )),
        Some(Err(_)) => Err(ApiError::new(
            Code::MissingUser,
            "X-User-Id may contain only visible ASCII characters.",
        )),
        Some(Ok(raw)) => UserId::parse(raw)
            .map_err(|e| ApiError::new(Code::MissingUser, format!("X-User-Id is malformed: {e}."))),
    }
}

/// The token of an `Authorization: Bearer <token>` header; `None` when absent, another scheme,
/// or empty.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// Three dot-separated parts: a compact JWS, rather than a (wrong) static admin token.
fn looks_like_jwt(token: &str) -> bool {
    token.split('.').count() == 3
}

/// Whether the role claim names `role`: an array of strings containing it, or a string equal to
/// it or listing it among space-separated values (OAuth `scope` style).
fn has_role(claim: Option<&Value>, role: &str) -> bool {
    match claim {
        Some(Value::Array(roles)) => roles.iter().any(|r| r.as_str() == Some(role)),
        Some(Value::String(roles)) => roles.split(' ').any(|r| r == role),
        _ => false,
    }
}

fn invalid_token(detail: impl Into<std::borrow::Cow<'static, str>>) -> ApiError {
    ApiError::new(Code::InvalidToken, detail)
}

/// Why a token was refused, in words a client can act on; nothing about the key.
fn refusal_detail(kind: &ErrorKind) -> String {
    match kind {
        ErrorKind::ExpiredSignature => "The token has expired.".into(),
        ErrorKind::ImmatureSignature => "The token is not valid yet (nbf).".into(),
        ErrorKind::InvalidIssuer => "The token's issuer is not accepted.".into(),
        ErrorKind::InvalidAudience => "The token's audience is not accepted.".into(),
        ErrorKind::InvalidSignature => "The token's signature does not verify.".into(),
        ErrorKind::InvalidAlgorithm | ErrorKind::MissingAlgorithm | ErrorKind::UnsupportedAlgorithm => {
            "The token is not signed with the algorithm this server accepts.".into()
        }
        ErrorKind::MissingRequiredClaim(claim) => format!("The token has no {claim} claim."),
        ErrorKind::InvalidClaimFormat(claim) => format!("The token's {claim} claim is malformed."),
        ErrorKind::InvalidToken | ErrorKind::Base64(_) | ErrorKind::Json(_) | ErrorKind::Utf8(_) => {
            "The token is malformed (or names an algorithm this server does not accept).".into()
        }
        _ => "The token is not valid.".into(),
    }
}

/// A fresh admin token: 32 random bytes, hex.
fn generate_token() -> String {
    let bytes: [u8; 32] = rand::rng().random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(edit: impl FnOnce(&mut Settings)) -> Settings {
        let mut settings = Settings {
            admin_token: Some("admin".into()),
            ..Settings::default()
        };
        edit(&mut settings);
        settings
    }

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    #[test]
    fn the_mode_defaults_to_jwt_once_a_key_is_configured() -> anyhow::Result<()> {
        let header = Authenticator::from_settings(&settings(|_| {}))?;
        assert_eq!(header.mode(), AuthMode::TrustedHeader);
        let jwt = Authenticator::from_settings(&settings(|s| s.jwt_secret = Some(SECRET.into())))?;
        assert_eq!(jwt.mode(), AuthMode::Jwt);
        Ok(())
    }

    #[test]
    fn unsafe_or_incomplete_configurations_are_refused() {
        let cases: [(&str, Settings); 8] = [
            (
                "trusted header on 0.0.0.0",
                settings(|s| s.bind = "0.0.0.0:0".into()),
            ),
            (
                "explicit trusted header on [::]",
                settings(|s| {
                    s.bind = "[::]:0".into();
                    s.auth_mode = Some(AuthMode::TrustedHeader);
                    s.jwt_secret = Some(SECRET.into());
                }),
            ),
            (
                "jwt mode without a key",
                settings(|s| s.auth_mode = Some(AuthMode::Jwt)),
            ),
            (
                "a short secret",
                settings(|s| s.jwt_secret = Some("short".into())),
            ),
            (
                "secret and public key",
                settings(|s| {
                    s.jwt_secret = Some(SECRET.into());
                    s.jwt_public_key = Some("/nonexistent.pem".into());
                }),
            ),
            (
                "RS256 with a secret",
                settings(|s| {
                    s.jwt_secret = Some(SECRET.into());
                    s.jwt_algorithm = Some("RS256".into());
                }),
            ),
            (
                "alg none",
                settings(|s| {
                    s.jwt_secret = Some(SECRET.into());
                    s.jwt_algorithm = Some("none".into());
                }),
            ),
            (
                "an issuer without a key",
                settings(|s| s.jwt_issuer = Some("me".into())),
            ),
        ];
        for (what, settings) in cases {
            assert!(
                Authenticator::from_settings(&settings).is_err(),
                "{what} was accepted"
            );
        }
    }

    #[test]
    fn trusted_header_on_a_public_address_starts_only_when_allowed() -> anyhow::Result<()> {
        let allowed = settings(|s| {
            s.bind = "0.0.0.0:0".into();
            s.allow_trusted_header_on_public_bind = true;
        });
        assert_eq!(
            Authenticator::from_settings(&allowed)?.mode(),
            AuthMode::TrustedHeader
        );
        assert!(binds_loopback_only("127.0.0.1:0")?);
        assert!(binds_loopback_only("[::1]:0")?);
        assert!(!binds_loopback_only("0.0.0.0:0")?);
        Ok(())
    }

    #[test]
    fn only_a_non_empty_bearer_token_is_taken_from_authorization() -> anyhow::Result<()> {
        let cases = [
            ("Bearer abc.def.ghi", Some("abc.def.ghi")),
            ("bearer  abc", Some("abc")),
            ("Bearer ", None),
            ("Bearer", None),
            ("Basic YW5hOnB3", None),
            ("Token abc", None),
        ];
        for (value, expected) in cases {
            let mut headers = HeaderMap::new();
            headers.insert(header::AUTHORIZATION, header::HeaderValue::from_str(value)?);
            assert_eq!(bearer(&headers), expected, "{value:?}");
        }
        assert_eq!(bearer(&HeaderMap::new()), None);
        Ok(())
    }

    #[test]
    fn admin_tokens_are_compared_whole_and_all_are_accepted() -> anyhow::Result<()> {
        let auth = Authenticator::from_settings(&settings(|s| {
            s.admin_tokens = vec!["second".into(), "third".into()];
        }))?;
        let with = |token: &str| -> anyhow::Result<HeaderMap> {
            let mut headers = HeaderMap::new();
            let value = header::HeaderValue::from_str(&format!("Bearer {token}"))?;
            headers.insert(header::AUTHORIZATION, value);
            Ok(headers)
        };
        for token in ["admin", "second", "third"] {
            assert!(auth.admin(&with(token)?).is_ok(), "{token}");
        }
        for token in ["admi", "adminx", "secon", "a.b.c"] {
            let refused = auth.admin(&with(token)?).err().map(|e| e.code);
            assert_eq!(refused, Some(Code::Forbidden), "{token}");
        }
        let missing = auth.admin(&HeaderMap::new()).err().map(|e| e.code);
        assert_eq!(missing, Some(Code::Unauthorized));
        Ok(())
    }

    #[test]
    fn remembered_tokens_expire_and_the_memory_stays_bounded() -> anyhow::Result<()> {
        let cache = VerifiedTokens::new();
        let ana = Verified {
            user: UserId::parse("ana").map_err(|e| anyhow::anyhow!("{}", e.0))?,
            admin: false,
        };
        cache.insert("t", &ana, 100);
        assert!(cache.get("t", 100).is_some(), "valid until its exp plus leeway");
        assert!(cache.get("t", 101).is_none(), "expired");
        assert!(cache.get("t", 50).is_none(), "an expired entry is removed");
        cache.insert(&"x".repeat(MAX_CACHED_TOKEN_LEN + 1), &ana, 100);
        assert!(
            cache.get(&"x".repeat(MAX_CACHED_TOKEN_LEN + 1), 0).is_none(),
            "too long to keep"
        );
        for i in 0..=CACHED_TOKENS {
            cache.insert(&i.to_string(), &ana, 100);
        }
        assert!(cache.tokens.len() <= CACHED_TOKENS, "{}", cache.tokens.len());
        Ok(())
    }

    #[test]
    fn the_role_claim_may_be_an_array_or_a_space_separated_string() {
        let cases = [
            (Some(serde_json::json!(["user", "admin"])), true),
            (Some(serde_json::json!("read admin")), true),
            (Some(serde_json::json!("admin")), true),
            (Some(serde_json::json!("administrator")), false),
            (Some(serde_json::json!(["Admin"])), false),
            (Some(serde_json::json!({"admin": true})), false),
            (Some(serde_json::json!(true)), false),
            (None, false),
        ];
        for (claim, expected) in cases {
            assert_eq!(has_role(claim.as_ref(), "admin"), expected, "{claim:?}");
        }
    }
}
