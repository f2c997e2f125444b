//! Wiring: database, actors and HTTP server. `Application::build` binds the listener first, so
//! port 0 works and tests learn the real port before the server runs.

use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use actix_web::dev::Server;
use actix_web::middleware::{ErrorHandlers, from_fn};
use actix_web::{App, HttpServer, web};
use anyhow::Context;

use crate::actors::persister::{PersisterAddr, WriteAndWait};
use crate::actors::{LiveHub, LiveSettings, Persister, PersisterStats, Registry, WriteGate};
use crate::bulk::webhook::{Notifier, RetryPolicy, WebhookTarget};
use crate::cluster::Cluster;
use crate::config::Settings;
use crate::http::auth::Authenticator;
use crate::http::rate_limit::{RateLimit, RateLimits};
use crate::http::{self, AppState};
use crate::shutdown::{self, Drain};
use crate::store::{self, Backend};

/// Seconds actix-web gives connections to close once the drain is over (keep-alive ones close
/// at once; nothing should still be running).
const SERVER_STOP_TIMEOUT_SECS: u64 = 5;
/// How long shutdown waits for bulk-job webhooks already sent to be delivered.
const WEBHOOK_FLUSH_TIMEOUT: Duration = Duration::from_secs(3);
/// How long shutdown waits for live sockets to finish their close handshake.
const LIVE_CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Opens a one-connection pool on `url` from `arbiter`'s thread, for the actor that will use it
/// there.
///
/// why: a tokio socket is driven by the reactor of the runtime that opened it. The persister's
/// PostgreSQL (or MySQL) connection opened on the main thread made every answer to a commit wake
/// the main thread first, which then woke the persister's: one more thread hop on each commit's
/// critical path (`perf sched` under load: about 1,000 such wake-ups a second). Reconnections
/// happen where the pool is used, so they stay on the persister's thread.
async fn connect_on(
    arbiter: &actix_rt::ArbiterHandle,
    url: String,
) -> anyhow::Result<sea_orm::DatabaseConnection> {
    let (opened, connection) = tokio::sync::oneshot::channel();
    let spawned = arbiter.spawn(async move {
        // The receiver is gone only if start-up was abandoned; nothing to report to.
        let _ = opened.send(store::connect(&url, 1).await);
    });
    anyhow::ensure!(spawned, "the persister's thread stopped before it could connect");
    connection
        .await
        .context("the persister's thread stopped while connecting")?
}

pub struct Application {
    port: u16,
    server: Server,
    drain: web::Data<Drain>,
    persister: PersisterAddr,
    shutdown_timeout: Duration,
    live: Arc<LiveHub>,
    bulk: Arc<crate::bulk::BulkRunner>,
}

impl Application {
    /// Connects and migrates the database, starts the actors and binds the listener.
    /// Must run inside an actix system (the arbiters are started from it).
    pub async fn build(settings: Settings) -> anyhow::Result<Application> {
        let auth = Arc::new(Authenticator::from_settings(&settings)?);
        let backend = Backend::of_url(&settings.database_url)?;
        let db = store::connect(&settings.database_url, settings.db_max_connections).await?;
        store::migrate(&db).await?;

        // why: the persister writes through one dedicated connection. It runs one transaction at
        // a time anyway, and on SQLite a single writer keeps its page cache valid between
        // batches (a pooled connection would find its cache stale after another's write).
        let persister_thread = Arbiter::new().handle();
        let writer = connect_on(&persister_thread, settings.database_url.clone()).await?;
        let stats = Arc::new(PersisterStats::default());
        let write_gate = (backend == Backend::Sqlite).then(WriteGate::default);
        // SQLite serves `GET /v1/me/reservations` from memory (see `store::UserIndex`).
        let user_index = match backend {
            Backend::Sqlite => {
                // Its own connection, closed after: the scan would leave a pooled one holding a
                // page cache full of rows nobody reads again.
                let loader = store::connect(&settings.database_url, 1).await?;
                let index = store::UserIndex::load(&loader).await?;
                loader
                    .close()
                    .await
                    .context("closing the user index's connection")?;
                Some(Arc::new(index))
            }
            Backend::Postgres | Backend::MySql => None,
        };
        let persister = {
            let (db, stats, max_batch, gate, index) = (
                writer,
                stats.clone(),
                settings.max_batch,
                write_gate.clone(),
                user_index.clone(),
            );
            Persister::start_on(&persister_thread, move || {
                Persister::new(db, backend, max_batch, stats)
                    .with_write_gate(gate)
                    .with_user_index(index)
            })
        };
        // Zero means: host event actors on the HTTP workers' arbiters (registered below).
        let arbiters = (0..settings.event_arbiters)
            .map(|_| Arbiter::new().handle())
            .collect();
        let share_workers = settings.event_arbiters == 0;
        let live = Arc::new(LiveHub::new(LiveSettings::from_settings(&settings)));
        let metrics = web::Data::new(crate::metrics::install()?);
        let cluster = match &settings.redis_url {
            None => None,
            Some(url) => {
                let node = settings
                    .node_id
                    .clone()
                    .unwrap_or_else(|| uuid::Uuid::now_v7().simple().to_string());
                let cluster = Cluster::connect(
                    url,
                    settings.redis_prefix.clone(),
                    Duration::from_millis(settings.redis_timeout_ms.max(1)),
                    Duration::from_secs(settings.reconcile_after_secs),
                    node.clone(),
                    db.clone(),
                )
                .await?;
                tracing::info!(
                    node,
                    prefix = settings.redis_prefix,
                    "several nodes: allocating through the Redis ledger"
                );
                Some(cluster)
            }
        };
        let registry = Arc::new(
            Registry::new(arbiters, db.clone(), persister.clone(), settings.mailbox_capacity)
                .with_live(live.clone())
                .with_cluster(cluster.clone()),
        );
        if let Some(cluster) = &cluster {
            crate::cluster::spawn_bridge(cluster.clone(), registry.clone());
        }

        let rate_limits = settings.rate_limit.enabled.then(|| {
            let mut limits = RateLimits::new(&settings.rate_limit);
            if settings.rate_limit.global
                && let Some(cluster) = &cluster
            {
                limits = limits.with_global(&settings.rate_limit, cluster.clone());
            }
            let limits = Arc::new(limits);
            limits.spawn_pruning(Duration::from_secs(settings.rate_limit.prune_interval_secs));
            limits
        });

        let webhooks = settings
            .bulk_webhooks
            .iter()
            .map(|spec| spec.parse::<WebhookTarget>().context("reading --bulk-webhook"))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let notifier = Notifier::new(webhooks, RetryPolicy::default())?;
        let bulk = crate::bulk::BulkRunner::new(
            db.clone(),
            backend,
            registry.clone(),
            crate::bulk::BulkSettings::from_settings(&settings, backend),
            notifier,
            cluster.is_some(),
            write_gate,
        );
        bulk.spawn();

        let state = web::Data::new(AppState {
            bulk: bulk.clone(),
            registry: registry.clone(),
            db,
            auth,
            body_limit: settings.body_limit,
            persister_stats: stats,
            user_index,
            rate_limits: rate_limits.clone(),
            cluster,
        });

        let drain = web::Data::new(Drain::default());
        let server_drain = drain.clone();

        let listener =
            TcpListener::bind(&settings.bind).with_context(|| format!("binding {}", settings.bind))?;
        let port = listener.local_addr().context("reading the bound address")?.port();
        let server = HttpServer::new(move || {
            // Runs once on each worker's own thread.
            if share_workers {
                state.registry.add_arbiter(actix_rt::Arbiter::current());
            }
            App::new()
                .app_data(state.clone())
                .app_data(metrics.clone())
                .app_data(server_drain.clone())
                .wrap(ErrorHandlers::new().default_handler(http::problem_safety_net))
                .wrap(RateLimit::new(rate_limits.clone()))
                .wrap(from_fn(shutdown::track))
                .wrap(from_fn(http::observe))
                .configure(http::configure)
                .default_service(web::to(http::not_found))
        })
        // why: WebSocket pushes are small writes; Nagle would hold one behind an unacknowledged ping.
        .tcp_nodelay(true)
        .workers(settings.http_workers.max(1))
        // Signals are ours: `run_until_stopped` drains before it stops the server.
        .disable_signals()
        .shutdown_timeout(SERVER_STOP_TIMEOUT_SECS)
        .listen(listener)
        .context("starting the HTTP server")?
        .run();
        let expected_arbiters = if share_workers {
            settings.http_workers.max(1)
        } else {
            0
        };
        actix_rt::spawn(async move {
            if let Err(error) = registry.start_actors_with_holds(expected_arbiters).await {
                tracing::error!(
                    error = format!("{error:#}"),
                    "cannot start the actors of events with holds"
                );
            }
        });
        Ok(Application {
            port,
            server,
            drain,
            persister,
            shutdown_timeout: Duration::from_secs(settings.shutdown_timeout_secs),
            live,
            bulk,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The WebSocket hub; its `close_all()` closes every live socket with a close frame.
    pub fn live(&self) -> Arc<LiveHub> {
        self.live.clone()
    }

    /// Serves until SIGTERM or SIGINT, then drains (see [`crate::shutdown`]) and stops.
    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        let handle = self.server.handle();
        // why spawned: the server future must keep running while `stop` below waits for it.
        let mut server = actix_rt::spawn(self.server);
        let signal = tokio::select! {
            result = &mut server => return result.map_err(std::io::Error::other)?,
            signal = shutdown::signalled() => signal?,
        };
        tracing::info!(
            signal,
            in_flight = self.drain.in_flight(),
            "draining before shutdown"
        );
        // Live sockets get a close frame (1001 going away) at once; new ones are refused.
        self.live.close_all();
        let left = self.drain.drain(self.shutdown_timeout).await;
        if left > 0 {
            tracing::warn!(left, "shutdown timeout reached with requests still inside");
        }
        // Whatever the actors decided without a request waiting (expiries) commits too.
        if let Err(error) = self.persister.send(WriteAndWait(None)).await {
            tracing::warn!(%error, "the persister stopped before the final barrier");
        }
        if !self.bulk.flush_webhooks(WEBHOOK_FLUSH_TIMEOUT).await {
            tracing::warn!("bulk job webhooks still undelivered at shutdown");
        }
        if !self.live.drained(LIVE_CLOSE_TIMEOUT).await {
            tracing::warn!(open = self.live.sessions(), "live sockets still open at shutdown");
        }
        handle.stop(true).await;
        server.await.map_err(std::io::Error::other)??;
        tracing::info!("stopped");
        Ok(())
    }
}
