//! The negative control for the stampede test: a race test is only trusted if it catches the
//! race when the protection is removed. Here a tiny actix-web server exposes the same
//! reservation route with the classic bug — read the remaining stock, await something, then
//! decrement — and the same stampede driver and [`check_exact`] must report the oversell. The
//! same server with an atomic take must pass, so the check is not failing for another reason.

use std::net::TcpListener;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use actix_web::{App, HttpResponse, HttpServer, web};
use serde_json::json;
use uuid::Uuid;

use crate::helpers::{Stampede, check_exact, exclusive_machine};

/// The await between the check and the write (a database round trip, say).
const GAP: Duration = Duration::from_millis(5);

/// How the toy server decides whether a unit is left.
#[derive(Clone, Copy)]
enum Take {
    /// Check, await, then decrement: requests interleave in the gap and oversell.
    CheckThenDecrement,
    /// One atomic step: correct.
    Atomic,
}

struct Toy {
    remaining: AtomicI64,
    take: Take,
}

fn sold_out() -> HttpResponse {
    HttpResponse::Conflict()
        .content_type("application/problem+json")
        .json(json!({
            "type": "about:blank", "title": "Sold out", "status": 409, "detail": "-", "code": "sold_out",
        }))
}

fn issued() -> HttpResponse {
    HttpResponse::Created().json(json!({ "id": Uuid::now_v7(), "status": "issued" }))
}

async fn reserve(toy: web::Data<Toy>) -> HttpResponse {
    match toy.take {
        Take::CheckThenDecrement => {
            if toy.remaining.load(Ordering::SeqCst) <= 0 {
                return sold_out();
            }
            actix_web::rt::time::sleep(GAP).await;
            toy.remaining.fetch_sub(1, Ordering::SeqCst);
            issued()
        }
        Take::Atomic => {
            let taken = toy
                .remaining
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |left| {
                    (left > 0).then(|| left - 1)
                });
            actix_web::rt::time::sleep(GAP).await;
            if taken.is_ok() { issued() } else { sold_out() }
        }
    }
}

/// Runs the toy server on its own thread and actix system; stopped when dropped.
struct ToyServer {
    address: String,
    handle: actix_web::dev::ServerHandle,
    thread: Option<std::thread::JoinHandle<std::io::Result<()>>>,
}

impl ToyServer {
    fn start(stock: i64, take: Take) -> anyhow::Result<ToyServer> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let address = format!("http://{}", listener.local_addr()?);
        let toy = web::Data::new(Toy {
            remaining: AtomicI64::new(stock),
            take,
        });
        let (sender, receiver) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            actix_web::rt::System::new().block_on(async move {
                let server = HttpServer::new(move || {
                    App::new()
                        .app_data(toy.clone())
                        .route("/v1/events/{id}/reservations", web::post().to(reserve))
                })
                .workers(2)
                .disable_signals()
                .listen(listener)?
                .run();
                let _ = sender.send(server.handle());
                server.await
            })
        });
        let handle = receiver.recv_timeout(Duration::from_secs(10))?;
        Ok(ToyServer {
            address,
            handle,
            thread: Some(thread),
        })
    }
}

impl Drop for ToyServer {
    fn drop(&mut self) {
        // why: stop() resolves once workers are down; the thread's system then ends by itself.
        let stopping = self.handle.stop(false);
        drop(stopping);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The same stampede as `stampede.rs`: 1,500 clients, 1,000 units.
async fn stampede_against(take: Take) -> anyhow::Result<Result<(), String>> {
    let server = ToyServer::start(1_000, take)?;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()?;
    let outcome = Stampede::new(&client, &server.address, 1, Stampede::users("fan", 1_500))
        .run()
        .await;
    server.handle.stop(false).await;
    Ok(check_exact(&outcome, 1_000))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stampede_check_catches_a_check_then_decrement_oversell() -> anyhow::Result<()> {
    let _alone = exclusive_machine().await;
    // Arrange: the toy server with the race.

    // Act
    let verdict = stampede_against(Take::CheckThenDecrement).await?;

    // Assert
    let Err(violations) = verdict else {
        panic!("the check passed a server that checks, awaits, then decrements");
    };
    eprintln!("negative control: {violations}");
    assert!(violations.contains("oversell"), "{violations}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stampede_check_passes_the_same_server_with_an_atomic_take() -> anyhow::Result<()> {
    let _alone = exclusive_machine().await;
    // Arrange: the toy server without the race.

    // Act
    let verdict = stampede_against(Take::Atomic).await?;

    // Assert
    assert_eq!(verdict, Ok(()));
    Ok(())
}
