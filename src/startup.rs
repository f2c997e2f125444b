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

use crate::actors::{Persister, PersisterStats, Registry};
use crate::config::Settings;
use crate::http::{self, AppState};
use crate::store::{self, Backend};

pub struct Application {
    port: u16,
    server: Server,
}

impl Application {
    /// Connects and migrates the database, starts the actors and binds the listener.
    /// Must run inside an actix system (the arbiters are started from it).
    pub async fn build(settings: Settings) -> anyhow::Result<Application> {
        let backend = Backend::of_url(&settings.database_url)?;
        let db = store::connect(&settings.database_url, settings.db_max_connections).await?;
        store::migrate(&db).await?;

        let stats = Arc::new(PersisterStats::default());
        let persister = {
            let (db, stats, max_batch) = (db.clone(), stats.clone(), settings.max_batch);
            Persister::start_in_arbiter(&Arbiter::new().handle(), move |_| {
                Persister::new(db, backend, max_batch, stats)
            })
        };
        let arbiters = (0..settings.event_arbiters.max(1))
            .map(|_| Arbiter::new().handle())
            .collect();
        let registry = Arc::new(Registry::new(
            arbiters,
            db.clone(),
            persister,
            settings.mailbox_capacity,
        ));

        let admin_token = settings.admin_token.clone().unwrap_or_else(|| {
            let token = generate_token();
            tracing::info!(token = %token, "no FIRSTCOME_ADMIN_TOKEN set; generated this admin token");
            token
        });
        let state = web::Data::new(AppState {
            registry,
            db,
            admin_token,
            body_limit: settings.body_limit,
            persister_stats: stats,
        });

        let listener =
            TcpListener::bind(&settings.bind).with_context(|| format!("binding {}", settings.bind))?;
        let port = listener.local_addr().context("reading the bound address")?.port();
        let server = HttpServer::new(move || {
            App::new()
                .app_data(state.clone())
                .wrap(ErrorHandlers::new().default_handler(http::problem_safety_net))
                .configure(http::configure)
                .default_service(web::to(http::not_found))
        })
        .workers(settings.http_workers.max(1))
        .listen(listener)
        .context("starting the HTTP server")?
        .run();
        Ok(Application { port, server })
    }

    pub fn port(&self) -> u16 {
        self.port
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
