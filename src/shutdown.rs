//! # Graceful shutdown
//!
//! On SIGTERM or SIGINT the server drains before it stops:
//! 1. it stops taking new work: a request that would change state (any method but GET, HEAD
//!    and OPTIONS) gets 503 `unavailable` with `Retry-After`, so a client retries elsewhere;
//! 2. it waits for every request already inside to be answered — a reservation's answer comes
//!    only after its commit, so waiting for answers is waiting for commits;
//! 3. it waits for the persister to finish what is queued (expiries, for example);
//! 4. it stops the HTTP server, closing idle keep-alive connections, and the process exits 0.
//!
//! why drain before stopping the HTTP server: event actors live on the HTTP workers' threads;
//! a worker that stops takes its actors with it, so a request on another worker still waiting
//! for one of them would lose its answer.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use actix_web::body::{EitherBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::Method;
use actix_web::middleware::Next;
use actix_web::{ResponseError, web};

use crate::error::ApiError;

/// How often the drain checks whether the last request has been answered.
const DRAIN_POLL: Duration = Duration::from_millis(10);

/// Whether the server is draining, and how many requests are inside it.
#[derive(Debug, Default)]
pub struct Drain {
    draining: AtomicBool,
    in_flight: AtomicUsize,
}

impl Drain {
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Refuses new state changes from now on, then waits until every request inside has been
    /// answered or `timeout` passes. Returns how many were still inside at the end.
    pub async fn drain(&self, timeout: Duration) -> usize {
        self.draining.store(true, Ordering::Release);
        let deadline = Instant::now() + timeout;
        while self.in_flight() > 0 && Instant::now() < deadline {
            tokio::time::sleep(DRAIN_POLL).await;
        }
        self.in_flight()
    }
}

/// Counts a request while it is inside; dropped when its answer is ready (or it is cancelled).
struct Inside(Arc<Drain>);

impl Drop for Inside {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Middleware: counts requests inside, and refuses state changes once draining.
pub async fn track(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<EitherBody<impl MessageBody>>, actix_web::Error> {
    let Some(drain) = req.app_data::<web::Data<Drain>>().map(|d| d.clone().into_inner()) else {
        return next.call(req).await.map(ServiceResponse::map_into_left_body);
    };
    drain.in_flight.fetch_add(1, Ordering::AcqRel);
    let _inside = Inside(drain.clone());
    let reads_only = matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
    if drain.is_draining() && !reads_only {
        let refusal = ApiError::unavailable_because("The server is shutting down; retry shortly.");
        let (req, _) = req.into_parts();
        return Ok(ServiceResponse::new(req, refusal.error_response()).map_into_right_body());
    }
    next.call(req).await.map(ServiceResponse::map_into_left_body)
}

/// Resolves at the first SIGTERM or SIGINT.
pub async fn signalled() -> std::io::Result<&'static str> {
    #[cfg(unix)]
    {
        let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = terminate.recv() => Ok("SIGTERM"),
            result = tokio::signal::ctrl_c() => result.map(|()| "SIGINT"),
        }
    }
    #[cfg(not(unix))]
    {
        tokio::signal::ctrl_c().await.map(|()| "SIGINT")
    }
}
