//! Wiring: database, actors and HTTP server. `Application::build` binds the listener first, so
//! port 0 works and tests learn the real port before the server runs.

use std::net::TcpListener;
use std::sync::Arc;

use actix::prelude::*;
use actix_web::dev::Server;
use actix_web::middleware::ErrorHandlers;
use actix_web::{App, HttpServer, web};
use anyhow::Context;
use rand::Rng;

use crate::actors::{LiveHub, LiveSettings, Persister, PersisterStats, Registry};
use crate::config::Settings;
use crate::http::{self, AppState};
use crate::store::{self, Backend};

pub struct Application {
    port: u16,
    server: Server,
    live: Arc<LiveHub>,
}

impl Application {
    /// Connects and migrates the database, starts the actors and binds the listener.
    /// Must run inside an actix system (the arbiters are started from it).
    pub async fn build(settings: Settings) -> anyhow::Result<Application> {
        let backend = Backend::of_url(&settings.database_url)?;
        let db = store::connect(&settings.database_url, settings.db_max_connections).await?;
        store::migrate(&db).await?;

        // why: the persister writes through one dedicated connection. It runs one transaction at
        // a time anyway, and on SQLite a single writer keeps its page cache valid between
        // batches (a pooled connection would find its cache stale after another's write).
        let writer = store::connect(&settings.database_url, 1).await?;
        let stats = Arc::new(PersisterStats::default());
        let persister = {
            let (db, stats, max_batch) = (writer, stats.clone(), settings.max_batch);
            Persister::start_in_arbiter(&Arbiter::new().handle(), move |_| {
                Persister::new(db, backend, max_batch, stats)
            })
        };
        // Zero means: host event actors on the HTTP workers' arbiters (registered below).
        let arbiters = (0..settings.event_arbiters)
            .map(|_| Arbiter::new().handle())
            .collect();
        let share_workers = settings.event_arbiters == 0;
        let live = Arc::new(LiveHub::new(LiveSettings::from_settings(&settings)));
        let registry = Arc::new(
            Registry::new(arbiters, db.clone(), persister, settings.mailbox_capacity).with_live(live.clone()),
        );

        let admin_token = settings.admin_token.clone().unwrap_or_else(|| {
            let token = generate_token();
            tracing::info!(token = %token, "no FIRSTCOME_ADMIN_TOKEN set; generated this admin token");
            token
        });
        let state = web::Data::new(AppState {
            registry: registry.clone(),
            db,
            admin_token,
            body_limit: settings.body_limit,
            persister_stats: stats,
        });

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
                .wrap(ErrorHandlers::new().default_handler(http::problem_safety_net))
                .configure(http::configure)
                .default_service(web::to(http::not_found))
        })
        // why: WebSocket pushes are small writes; Nagle would hold one behind an unacknowledged ping.
        .tcp_nodelay(true)
        .workers(settings.http_workers.max(1))
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
        Ok(Application { port, server, live })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The WebSocket hub; its `close_all()` closes every live socket with a close frame.
    pub fn live(&self) -> Arc<LiveHub> {
        self.live.clone()
    }

    /// Serves until the process is told to stop.
    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        self.server.await
    }
}

/// A fresh admin token: 32 random bytes, hex.
fn generate_token() -> String {
    let bytes: [u8; 32] = rand::rng().random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
