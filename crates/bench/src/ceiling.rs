//! The machine's ceiling: a minimal actix-web server, in this process, on
//! the same route as the tracker's receiver. It reads the body, parses it
//! into a typed delivery (the same JSON the tracker parses), and answers 200
//! with an answer of the tracker's shape, storing nothing. Driven by the same
//! load generator, it tells how fast this machine can do HTTP + JSON alone,
//! so ingest can be reported as a fraction of it.

use std::net::SocketAddr;
use std::sync::mpsc;
use std::thread::JoinHandle;

use actix_web::dev::ServerHandle;
use actix_web::{App, HttpResponse, HttpServer, web};
use serde::{Deserialize, Serialize};

#[derive(Deserialize)]
#[allow(dead_code)] // Parsed to be paid for, not read.
struct Delivery {
    event: Envelope,
    data: Data,
}

#[derive(Deserialize)]
#[allow(dead_code)]
struct Envelope {
    name: String,
    slug: String,
    send_at: String,
}

#[derive(Deserialize)]
#[allow(dead_code)]
struct Data {
    institution: Id,
    user: User,
    trail: Trail,
}

#[derive(Deserialize)]
#[allow(dead_code)]
struct Id {
    id: u64,
}

#[derive(Deserialize)]
#[allow(dead_code)]
struct User {
    id: u64,
    name: String,
    email: String,
}

#[derive(Deserialize)]
#[allow(dead_code)]
struct Trail {
    id: u64,
    name: String,
    finished_at: String,
    courses: Vec<Course>,
}

#[derive(Deserialize)]
#[allow(dead_code)]
struct Course {
    id: u64,
    title: String,
}

#[derive(Serialize)]
struct Accepted {
    event_id: String,
    position: u64,
    duplicate: bool,
}

async fn receive(body: web::Bytes) -> HttpResponse {
    match serde_json::from_slice::<Delivery>(&body) {
        Ok(d) => HttpResponse::Ok().json(Accepted {
            // Same length as a UUID, so the answer is the tracker's size.
            event_id: format!(
                "{:016x}-0000-5000-8000-{:012x}",
                d.data.user.id, d.data.trail.id
            ),
            position: d.data.institution.id,
            duplicate: false,
        }),
        Err(e) => HttpResponse::BadRequest().body(e.to_string()),
    }
}

/// The running ceiling server.
pub struct Ceiling {
    pub addr: SocketAddr,
    handle: ServerHandle,
    thread: Option<JoinHandle<std::io::Result<()>>>,
}

impl Ceiling {
    /// Starts on `127.0.0.1:0` with `workers` worker threads (the tracker
    /// starts one per core).
    pub fn start(workers: usize) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("ceiling".into())
            .spawn(move || {
                actix_web::rt::System::new().block_on(async move {
                    let server = HttpServer::new(|| {
                        App::new()
                            .app_data(web::PayloadConfig::new(65_536))
                            .route("/webhooks/toolzz/{token}", web::post().to(receive))
                    })
                    .workers(workers.max(1))
                    .disable_signals()
                    .bind("127.0.0.1:0");
                    let server = match server {
                        Ok(s) => s,
                        Err(e) => {
                            let _ = tx.send(Err(e));
                            return Ok(());
                        }
                    };
                    let addr = server.addrs().first().copied();
                    let server = server.run();
                    let _ = tx.send(addr.map(|a| (a, server.handle())).ok_or_else(|| {
                        std::io::Error::other("the ceiling server bound no address")
                    }));
                    server.await
                })
            })?;
        let (addr, handle) = rx
            .recv()
            .map_err(|_| std::io::Error::other("the ceiling server thread ended"))??;
        Ok(Self {
            addr,
            handle,
            thread: Some(thread),
        })
    }

    pub async fn stop(mut self) {
        self.handle.stop(true).await;
        if let Some(t) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
    }
}
