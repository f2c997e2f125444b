//! `firstcome serve`, `firstcome migrate` and `firstcome issue`: parse the command line, then
//! hand over to the library.

use anyhow::Context;
use clap::Parser;
use firstcome::config::{Cli, Command, Settings};
use firstcome::startup::Application;
use firstcome::{store, telemetry};

/// why: the request path allocates and frees many small objects across threads; glibc's
/// allocator showed up at ~16% of worker CPU under load, mimalloc removes most of it.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Turns transparent huge pages off for this process (the kernel checks the flag at each page
/// fault, so memory mapped before this call is covered too).
///
/// why: mimalloc asks for huge pages on its arenas, and the kernel zeroes a whole 2 MiB page on
/// its first touch. When an event's maps double past a million entries, the new table is touched
/// all over at once: on the benchmark VM that stalled the event's claims for 0.75–0.9 s, with
/// 4 KiB pages for 0.18 s, and reservations/s were no lower (BENCHMARKS.md, "Transparent huge
/// pages and map growth"). Redis and most databases advise the same.
fn disable_transparent_huge_pages() {
    #[cfg(target_os = "linux")]
    if let Err(error) = nix::sys::prctl::set_thp_disable(true) {
        tracing::warn!(%error, "could not turn transparent huge pages off; large maps may stall when they grow");
    }
}

#[actix_web::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(overrides) => {
            let settings = Settings::load(&overrides)?;
            telemetry::init(settings.log_format == "json");
            disable_transparent_huge_pages();
            tracing::info!(?settings, "starting");
            let bind = settings.bind.clone();
            let app = Application::build(settings).await?;
            let host = bind.rsplit_once(':').map_or(bind.as_str(), |(host, _)| host);
            // Tests and scripts read this line to learn the port (with --bind …:0).
            println!("firstcome listening on http://{host}:{}", app.port());
            app.run_until_stopped().await.context("serving")
        }
        Command::Migrate(overrides) => {
            let settings = Settings::load(&overrides)?;
            telemetry::init(settings.log_format == "json");
            let db = store::connect(&settings.database_url, 1).await?;
            store::migrate(&db).await?;
            tracing::info!("migrations applied");
            Ok(())
        }
        Command::Issue(args) => {
            // Logs would tear the progress bar; RUST_LOG asks for them.
            if std::env::var_os("RUST_LOG").is_some() {
                telemetry::init(false);
            }
            if firstcome::bulk::cli::run(args).await? {
                Ok(())
            } else {
                std::process::exit(1)
            }
        }
    }
}
