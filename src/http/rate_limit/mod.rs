//! # Rate limits
//!
//! Our own actix-web middleware over `governor`: keyed GCRA limiters per user and per client IP,
//! with separate quotas for reservation writes, reads and WebSocket connects. A request must pass
//! its class's per-IP limiter, then its per-user one; the first refusal answers
//! `429 rate_limited` with `Retry-After`, `RateLimit-Policy` and `RateLimit`. Admin routes and
//! the probes are never limited. Idle keys are pruned on an interval ([`RateLimits::prune`]).
//!
//! Limits are per node: N nodes behind a balancer that does not pin clients allow up to N times
//! the quota. With several nodes, `rate_limit.global` also checks each per-user quota in Redis
//! (a GCRA shared by all nodes, one call per request), so it holds across nodes.

mod client_ip;
mod settings;

use std::future::{Ready, ready};
use std::hash::{BuildHasher, Hash};
use std::net::IpAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use actix_web::body::EitherBody;
use actix_web::dev::{Service, ServiceRequest, ServiceResponse, Transform, forward_ready};
use actix_web::http::Method;
use actix_web::http::header::{HeaderName, HeaderValue, RETRY_AFTER};
use actix_web::{HttpResponse, ResponseError};
use futures_util::TryFutureExt;
use futures_util::future::{Either, LocalBoxFuture, MapOk};
use governor::clock::Clock;
use governor::{Quota, RateLimiter};

pub use self::client_ip::TrustedProxies;
pub use self::settings::{Limit, Per, RateLimitOverrides, RateLimitSettings, TrustedNet};
use crate::domain::UserId;
use crate::error::{ApiError, Code};

type Hasher = foldhash::fast::RandomState;
type Keyed<K> = governor::DefaultKeyedRateLimiter<K, governor::middleware::NoOpMiddleware, Hasher>;

/// The header that names the user until bearer auth lands.
const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");

/// Who the user is, for the per-user limiter: the identity the routes will see (the verified
/// token's `sub` in jwt mode, `X-User-Id` in trusted-header mode). A request that does not
/// authenticate counts per IP only, and its route refuses it with 401 anyway. The route reuses
/// this authentication instead of verifying again.
pub fn user_key(req: &ServiceRequest) -> Option<UserId> {
    super::extract::remember_caller(req.request())
}

/// Which quota a request counts against; `None` for requests that are never limited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Reservation changes: reserve, confirm, cancel (any non-read outside the admin routes).
    Writes,
    /// `GET`/`HEAD`.
    Reads,
    /// WebSocket connects: `GET …/live`.
    Live,
}

impl Class {
    const ALL: [Class; 3] = [Class::Writes, Class::Reads, Class::Live];

    fn name(self) -> &'static str {
        match self {
            Class::Writes => "writes",
            Class::Reads => "reads",
            Class::Live => "live",
        }
    }

    /// The class of `method path`; admin routes and probes have none.
    pub fn of(method: &Method, path: &str) -> Option<Class> {
        let admin = path == "/v1/admin"
            || path.starts_with("/v1/admin/")
            // Creating and changing events take the admin token.
            || (*method == Method::POST && path == "/v1/events")
            || (*method == Method::PATCH
                && path.strip_prefix("/v1/events/").is_some_and(|id| !id.contains('/')));
        if admin || matches!(path, "/healthz" | "/readyz" | "/metrics") {
            return None;
        }
        Some(match *method {
            Method::GET | Method::HEAD if path.ends_with("/live") => Class::Live,
            Method::GET | Method::HEAD | Method::OPTIONS => Class::Reads,
            _ => Class::Writes,
        })
    }
}

/// The client's IP as a limiter key: an IPv4 address, or an IPv6 /64 (one subscriber usually
/// holds a whole /64, so keying single IPv6 addresses would be trivial to evade).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IpKey {
    V4(u32),
    V6(u64),
}

impl From<IpAddr> for IpKey {
    fn from(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => IpKey::V4(v4.to_bits()),
            IpAddr::V6(v6) => IpKey::V6((v6.to_bits() >> 64) as u64),
        }
    }
}

/// One keyed limiter and the policy it announces.
pub struct Scoped<K: Hash + Eq + Clone> {
    limiter: Keyed<K>,
    /// `"writes-user"` etc.: the policy name in the RateLimit headers.
    name: String,
    /// `RateLimit-Policy`, built once.
    policy: HeaderValue,
}

impl<K: Hash + Eq + Clone> Scoped<K> {
    pub fn new(name: String, quota: Quota) -> Self {
        // why: the draft's policy is "q units per w seconds"; a GCRA quota allows a burst of
        // `burst` and refills it fully in `burst × interval`, so that is the window announced.
        let window = quota.burst_size_replenished_in().as_secs_f64().ceil().max(1.0) as u64;
        let policy = format!("\"{name}\";q={};w={window}", quota.burst_size());
        Self {
            limiter: RateLimiter::dashmap_with_hasher(quota, Hasher::default()),
            policy: HeaderValue::from_str(&policy).unwrap_or(HeaderValue::from_static("")),
            name,
        }
    }

    /// Takes one request's cell for `key`, or says how long to wait.
    pub fn check(&self, key: &K) -> Result<(), Duration> {
        self.limiter
            .check_key(key)
            .map_err(|not_until| not_until.wait_time_from(self.limiter.clock().now()))
    }

    /// Keys currently held.
    pub fn len(&self) -> usize {
        self.limiter.len()
    }

    pub fn is_empty(&self) -> bool {
        self.limiter.is_empty()
    }

    /// Drops keys whose state is back to full (indistinguishable from a new key) and gives the
    /// freed capacity back.
    pub fn prune(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }
}

struct ClassLimits {
    user: Option<Scoped<u64>>,
    ip: Option<Scoped<IpKey>>,
}

/// Every limiter of a node, shared by all HTTP workers.
pub struct RateLimits {
    classes: [ClassLimits; 3],
    proxies: TrustedProxies,
    /// why: user keys are stored as a seeded 64-bit hash, so the hot path never allocates and
    /// each key is 16 bytes of state; the per-process seed keeps collisions unguessable.
    user_hasher: Hasher,
    /// Requests answered 429, for the admin stats.
    refused: AtomicU64,
    /// Several nodes: per-user quotas also checked across nodes in Redis.
    global: Option<Global>,
}

struct Global {
    cluster: Arc<crate::cluster::Cluster>,
    /// Per class: milliseconds per unit and burst of its per-user quota.
    quotas: [Option<(f64, u32)>; 3],
}

/// A per-user check left to Redis once the local ones passed.
pub struct GlobalCheck {
    cluster: Arc<crate::cluster::Cluster>,
    user: UserId,
    emission_ms: f64,
    burst: u32,
    name: String,
    policy: HeaderValue,
}

impl GlobalCheck {
    /// `Err` when the quota is spent across the nodes. A Redis that does not answer lets the
    /// request through: the local limiters still hold, and a rate limit must not take the
    /// service down with Redis.
    async fn run(self) -> Result<(), Limited> {
        match self
            .cluster
            .rate_check(&self.name, self.user.as_str(), self.emission_ms, self.burst)
            .await
        {
            Ok(None) => Ok(()),
            Ok(Some(wait)) => Err(Limited {
                name: self.name,
                policy: self.policy,
                wait,
            }),
            Err(error) => {
                tracing::warn!(
                    error = format!("{error:#}"),
                    "global rate limit unavailable; the local one applies"
                );
                Ok(())
            }
        }
    }
}

/// A refusal: which policy and how long to wait.
#[derive(Debug)]
pub struct Limited {
    name: String,
    policy: HeaderValue,
    wait: Duration,
}

impl Limited {
    /// Whole seconds to wait, rounded up (at least 1).
    pub fn retry_after(&self) -> u64 {
        let secs = self.wait.as_secs() + u64::from(self.wait.subsec_nanos() > 0);
        secs.max(1)
    }

    pub fn response(&self) -> HttpResponse {
        let secs = self.retry_after();
        let mut response = ApiError::new(
            Code::RateLimited,
            format!(
                "Too many requests under the {:?} policy; retry in {secs} s.",
                self.name
            ),
        )
        .with("policy", self.name.as_str())
        .with("retry_after", secs)
        .error_response();
        let headers = response.headers_mut();
        headers.insert(RETRY_AFTER, HeaderValue::from(secs));
        headers.insert(RATELIMIT_POLICY, self.policy.clone());
        if let Ok(value) = HeaderValue::from_str(&format!("\"{}\";r=0;t={secs}", self.name)) {
            headers.insert(RATELIMIT, value);
        }
        response
    }
}

impl RateLimits {
    pub fn new(settings: &RateLimitSettings) -> Self {
        let quotas = |class: Class| match class {
            Class::Writes => (settings.writes_per_user, settings.writes_per_ip),
            Class::Reads => (settings.reads_per_user, settings.reads_per_ip),
            Class::Live => (settings.live_per_user, settings.live_per_ip),
        };
        let classes = Class::ALL.map(|class| {
            let (user, ip) = quotas(class);
            ClassLimits {
                user: user
                    .to_governor()
                    .map(|q| Scoped::new(format!("{}-user", class.name()), q)),
                ip: ip
                    .to_governor()
                    .map(|q| Scoped::new(format!("{}-ip", class.name()), q)),
            }
        });
        Self {
            classes,
            proxies: TrustedProxies::new(&settings.trusted_proxies),
            user_hasher: Hasher::default(),
            refused: AtomicU64::new(0),
            global: None,
        }
    }

    /// Several nodes: per-user quotas also hold across nodes, checked in `cluster`.
    pub fn with_global(
        mut self,
        settings: &RateLimitSettings,
        cluster: Arc<crate::cluster::Cluster>,
    ) -> Self {
        self.global = Some(Global {
            cluster,
            quotas: [
                settings.writes_per_user.emission(),
                settings.reads_per_user.emission(),
                settings.live_per_user.emission(),
            ],
        });
        self
    }

    fn limits(&self, class: Class) -> &ClassLimits {
        &self.classes[class as usize]
    }

    /// Counts `req` against its quotas: per IP first (so one address cannot mint unlimited
    /// per-user keys), then per user. With global limits, what is left to check in Redis.
    pub fn check(&self, req: &ServiceRequest) -> Result<Option<GlobalCheck>, Limited> {
        let Some(class) = Class::of(req.method(), req.path()) else {
            return Ok(None);
        };
        let limits = self.limits(class);
        if let Some(scoped) = &limits.ip
            && let Some(ip) = self.proxies.client_ip(req.peer_addr(), req.headers())
        {
            scoped
                .check(&IpKey::from(ip))
                .map_err(|wait| limited(scoped, wait))?;
        }
        // Authenticates only when a per-user quota applies to this class.
        if let Some(scoped) = &limits.user
            && let Some(user) = user_key(req)
        {
            let key = self.user_hasher.hash_one(user.as_str());
            scoped.check(&key).map_err(|wait| limited(scoped, wait))?;
            if let Some(global) = &self.global
                && let Some((emission_ms, burst)) = global.quotas[class as usize]
            {
                return Ok(Some(GlobalCheck {
                    cluster: global.cluster.clone(),
                    user,
                    emission_ms,
                    burst,
                    name: scoped.name.clone(),
                    policy: scoped.policy.clone(),
                }));
            }
        }
        Ok(None)
    }

    /// Answers `req` with 429 and counts it.
    fn refuse<B>(&self, req: ServiceRequest, limited: &Limited) -> ServiceResponse<EitherBody<B>> {
        self.refused.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(crate::metrics::RATE_LIMITED_TOTAL).increment(1);
        req.into_response(limited.response()).map_into_right_body()
    }

    /// Requests refused so far.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Keys held across all limiters.
    pub fn keys(&self) -> usize {
        self.classes
            .iter()
            .map(|c| c.user.as_ref().map_or(0, Scoped::len) + c.ip.as_ref().map_or(0, Scoped::len))
            .sum()
    }

    /// Drops idle keys from every limiter.
    pub fn prune(&self) {
        for class in &self.classes {
            if let Some(user) = &class.user {
                user.prune();
            }
            if let Some(ip) = &class.ip {
                ip.prune();
            }
        }
    }

    /// Prunes every `interval` on the current actix arbiter until the limits are dropped.
    pub fn spawn_pruning(self: &Arc<Self>, interval: Duration) {
        let limits: Weak<RateLimits> = Arc::downgrade(self);
        actix_rt::spawn(async move {
            let mut ticks = tokio::time::interval(interval.max(Duration::from_secs(1)));
            ticks.tick().await;
            loop {
                ticks.tick().await;
                let Some(limits) = limits.upgrade() else { break };
                let before = limits.keys();
                limits.prune();
                tracing::debug!(before, after = limits.keys(), "pruned rate-limit keys");
            }
        });
    }
}

fn limited<K: Hash + Eq + Clone>(scoped: &Scoped<K>, wait: Duration) -> Limited {
    Limited {
        name: scoped.name.clone(),
        policy: scoped.policy.clone(),
        wait,
    }
}

/// The middleware factory; `None` limits nothing.
#[derive(Clone)]
pub struct RateLimit {
    limits: Option<Arc<RateLimits>>,
}

impl RateLimit {
    pub fn new(limits: Option<Arc<RateLimits>>) -> Self {
        Self { limits }
    }
}

impl<S, B> Transform<S, ServiceRequest> for RateLimit
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = actix_web::Error> + 'static,
    S::Future: 'static,
    B: 'static,
{
    type Response = ServiceResponse<EitherBody<B>>;
    type Error = actix_web::Error;
    type Transform = RateLimitMiddleware<S>;
    type InitError = ();
    type Future = Ready<Result<Self::Transform, ()>>;

    fn new_transform(&self, service: S) -> Self::Future {
        ready(Ok(RateLimitMiddleware {
            service: Rc::new(service),
            limits: self.limits.clone(),
        }))
    }
}

pub struct RateLimitMiddleware<S> {
    service: Rc<S>,
    limits: Option<Arc<RateLimits>>,
}

type Passed<B> = fn(ServiceResponse<B>) -> ServiceResponse<EitherBody<B>>;

impl<S, B> Service<ServiceRequest> for RateLimitMiddleware<S>
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = actix_web::Error> + 'static,
    S::Future: 'static,
    B: 'static,
{
    type Response = ServiceResponse<EitherBody<B>>;
    type Error = actix_web::Error;
    // why: no boxed future on the hot path; a passed request only maps the inner response.
    // Only a global (Redis) check, which must wait, boxes.
    type Future = Either<
        Ready<Result<Self::Response, Self::Error>>,
        Either<MapOk<S::Future, Passed<B>>, LocalBoxFuture<'static, Result<Self::Response, Self::Error>>>,
    >;

    forward_ready!(service);

    fn call(&self, req: ServiceRequest) -> Self::Future {
        let passed: Passed<B> = ServiceResponse::map_into_left_body;
        let Some(limits) = &self.limits else {
            return Either::Right(Either::Left(self.service.call(req).map_ok(passed)));
        };
        match limits.check(&req) {
            Err(limited) => Either::Left(ready(Ok(limits.refuse(req, &limited)))),
            Ok(None) => Either::Right(Either::Left(self.service.call(req).map_ok(passed))),
            Ok(Some(global)) => {
                let (service, limits) = (self.service.clone(), limits.clone());
                Either::Right(Either::Right(Box::pin(async move {
                    match global.run().await {
                        Err(limited) => Ok(limits.refuse(req, &limited)),
                        Ok(()) => service.call(req).await.map(passed),
                    }
                })))
            }
        }
    }
}

#[cfg(test)]
mod tests;
