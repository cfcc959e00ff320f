//! The load generator: hyper 1.x HTTP/1.1 client connections (one
//! handshake each, kept alive), request bodies prepared before the clock
//! starts, and latencies kept as `u32` microseconds in pre-sized vectors.
//!
//! Two disciplines:
//! - closed loop: each connection sends its next request as soon as the
//!   previous answer arrived (peak throughput);
//! - open loop: request `i` is *intended* at `start + i / rate`, whatever
//!   happened before; connection `k` serves requests `k, k + C, k + 2C...`
//!   and, when it is still busy at an intended time, sends late. Latency is
//!   measured from the intended time, so a server stall is charged to every
//!   request it delayed (the coordinated-omission correction of wrk2).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Uri};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::data::Deliveries;

pub type Sender = SendRequest<Full<Bytes>>;

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("connecting to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("HTTP: {0}")]
    Http(#[from] hyper::Error),
    #[error("building a request: {0}")]
    Request(#[from] hyper::http::Error),
    #[error("{0}")]
    Other(String),
}

/// Where requests go and the headers every request carries.
#[derive(Debug, Clone)]
pub struct Target {
    pub addr: SocketAddr,
    host: HeaderValue,
    authorization: Option<HeaderValue>,
}

impl Target {
    pub fn new(addr: SocketAddr) -> Self {
        let host = HeaderValue::from_str(&addr.to_string())
            .unwrap_or_else(|_| HeaderValue::from_static("localhost"));
        Self {
            addr,
            host,
            authorization: None,
        }
    }

    pub fn with_bearer(mut self, key: &str) -> Self {
        self.authorization = HeaderValue::from_str(&format!("Bearer {key}")).ok();
        self
    }

    pub async fn connect(&self) -> Result<Sender, LoadError> {
        let stream = TcpStream::connect(self.addr)
            .await
            .map_err(|source| LoadError::Connect {
                addr: self.addr,
                source,
            })?;
        stream
            .set_nodelay(true)
            .map_err(|source| LoadError::Connect {
                addr: self.addr,
                source,
            })?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            // Ends when the sender is dropped or the server closes.
            let _ = conn.await;
        });
        Ok(sender)
    }

    pub fn post(&self, uri: &Uri, body: Bytes) -> Result<Request<Full<Bytes>>, LoadError> {
        Ok(Request::builder()
            .method(Method::POST)
            .uri(uri.clone())
            .header(header::HOST, self.host.clone())
            .header(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )
            .body(Full::new(body))?)
    }

    pub fn get(
        &self,
        uri: &Uri,
        accept: Option<&'static str>,
    ) -> Result<Request<Full<Bytes>>, LoadError> {
        let mut b = Request::builder()
            .method(Method::GET)
            .uri(uri.clone())
            .header(header::HOST, self.host.clone());
        if let Some(auth) = &self.authorization {
            b = b.header(header::AUTHORIZATION, auth.clone());
        }
        if let Some(accept) = accept {
            b = b.header(header::ACCEPT, HeaderValue::from_static(accept));
        }
        Ok(b.body(Full::new(Bytes::new()))?)
    }

    /// One request on a fresh connection: status and whole body.
    pub async fn fetch(&self, req: Request<Full<Bytes>>) -> Result<(u16, Bytes), LoadError> {
        let mut sender = self.connect().await?;
        send(&mut sender, req).await
    }
}

/// Sends one request and reads the whole answer.
pub async fn send(
    sender: &mut Sender,
    req: Request<Full<Bytes>>,
) -> Result<(u16, Bytes), LoadError> {
    sender.ready().await?;
    let res = sender.send_request(req).await?;
    let status = res.status().as_u16();
    let body = res.into_body().collect().await?.to_bytes();
    Ok((status, body))
}

/// Sends one request; returns the status and the value of one header
/// (the body is read and dropped).
pub async fn send_for_header(
    sender: &mut Sender,
    req: Request<Full<Bytes>>,
    name: &'static str,
) -> Result<(u16, Option<u64>), LoadError> {
    sender.ready().await?;
    let res = sender.send_request(req).await?;
    let status = res.status().as_u16();
    let value = res
        .headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok());
    res.into_body().collect().await?;
    Ok((status, value))
}

/// Answers other than 2xx, and failed connections.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Failures {
    pub non_2xx: u64,
    pub transport: u64,
    /// The first failure seen, for the report.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first: Option<String>,
}

impl Failures {
    fn status(&mut self, status: u16, body: &[u8]) {
        self.non_2xx += 1;
        self.first.get_or_insert_with(|| {
            format!(
                "HTTP {status}: {}",
                String::from_utf8_lossy(&body[..body.len().min(300)])
            )
        });
    }

    fn transport(&mut self, e: &LoadError) {
        self.transport += 1;
        self.first.get_or_insert_with(|| e.to_string());
    }

    fn merge(&mut self, other: Failures) {
        self.non_2xx += other.non_2xx;
        self.transport += other.transport;
        if self.first.is_none() {
            self.first = other.first;
        }
    }

    pub fn total(&self) -> u64 {
        self.non_2xx + self.transport
    }
}

/// What a closed-loop run did.
#[derive(Debug, Default)]
pub struct ClosedRun {
    pub ok: u64,
    pub failures: Failures,
    pub elapsed: Duration,
    /// Per-request latency, microseconds.
    pub latencies_us: Vec<u32>,
    /// Answers that said `"duplicate":true`.
    pub duplicates: u64,
}

/// Which requests a closed loop sends.
pub enum Work {
    /// Every delivery once, in order, spread over the connections.
    Deliveries { uri: Uri, bodies: Arc<Deliveries> },
    /// Deliveries round and round until the deadline.
    DeliveriesFor {
        uri: Uri,
        bodies: Arc<Deliveries>,
        duration: Duration,
    },
    /// GETs of these URIs round and round until the deadline.
    GetsFor {
        uris: Arc<Vec<Uri>>,
        duration: Duration,
    },
}

/// Closed loop over `connections` keep-alive connections.
pub async fn closed_loop(
    target: &Target,
    work: Work,
    connections: usize,
) -> Result<ClosedRun, LoadError> {
    let work = Arc::new(work);
    let next = Arc::new(AtomicUsize::new(0));
    let mut senders = Vec::with_capacity(connections);
    for _ in 0..connections.max(1) {
        senders.push(target.connect().await?);
    }
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(senders.len());
    for sender in senders {
        let (target, work, next) = (target.clone(), Arc::clone(&work), Arc::clone(&next));
        tasks.push(tokio::spawn(async move {
            closed_connection(target, sender, work, next, started).await
        }));
    }
    let mut run = ClosedRun::default();
    for task in tasks {
        let part = task
            .await
            .map_err(|e| LoadError::Other(format!("load task failed: {e}")))?;
        run.ok += part.ok;
        run.duplicates += part.duplicates;
        run.failures.merge(part.failures);
        run.latencies_us.extend_from_slice(&part.latencies_us);
    }
    run.elapsed = started.elapsed();
    Ok(run)
}

async fn closed_connection(
    target: Target,
    mut sender: Sender,
    work: Arc<Work>,
    next: Arc<AtomicUsize>,
    started: Instant,
) -> ClosedRun {
    let mut run = ClosedRun {
        latencies_us: Vec::with_capacity(4096),
        ..ClosedRun::default()
    };
    loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        let req = match &*work {
            Work::Deliveries { uri, bodies } => {
                if i >= bodies.len() {
                    break;
                }
                target.post(uri, bodies.body(i))
            }
            Work::DeliveriesFor {
                uri,
                bodies,
                duration,
            } => {
                if started.elapsed() >= *duration {
                    break;
                }
                target.post(uri, bodies.body(i % bodies.len().max(1)))
            }
            Work::GetsFor { uris, duration } => {
                if started.elapsed() >= *duration {
                    break;
                }
                target.get(&uris[i % uris.len().max(1)], None)
            }
        };
        let req = match req {
            Ok(r) => r,
            Err(e) => {
                run.failures.transport(&e);
                break;
            }
        };
        let t0 = Instant::now();
        match send(&mut sender, req).await {
            Ok((status, body)) => {
                run.latencies_us.push(micros(t0.elapsed()));
                if (200..300).contains(&status) {
                    run.ok += 1;
                    if is_duplicate(&body) {
                        run.duplicates += 1;
                    }
                } else {
                    run.failures.status(status, &body);
                }
            }
            Err(e) => {
                run.failures.transport(&e);
                match target.connect().await {
                    Ok(s) => sender = s,
                    Err(e) => {
                        run.failures.transport(&e);
                        break;
                    }
                }
            }
        }
    }
    run
}

/// What an open-loop run did.
#[derive(Debug, Default)]
pub struct OpenRun {
    pub ok: u64,
    pub failures: Failures,
    pub elapsed: Duration,
    /// From the intended send time to the whole answer (corrected).
    pub from_intended_us: Vec<u32>,
    /// From the actual send to the whole answer (uncorrected service time).
    pub service_us: Vec<u32>,
    /// How late the generator sent, when the connection was idle at the
    /// intended time (timer granularity and CPU contention, not the server).
    pub idle_send_lag_us: Vec<u32>,
    /// `(position, microseconds from start when the answer arrived)` of
    /// every accepted delivery.
    pub acks: Vec<(u64, u64)>,
    /// Requests whose connection was still waiting for an earlier answer at
    /// their intended time: the server did not keep up with the rate.
    pub late_sends: u64,
}

/// Open loop at `rate` requests/s over `connections` connections; every
/// delivery of `bodies` once. `started` is the schedule's origin.
pub async fn open_loop(
    target: &Target,
    uri: Uri,
    bodies: Arc<Deliveries>,
    connections: usize,
    rate: f64,
    started: Instant,
) -> Result<OpenRun, LoadError> {
    let connections = connections.max(1);
    let mut senders = Vec::with_capacity(connections);
    for _ in 0..connections {
        senders.push(target.connect().await?);
    }
    let uri = Arc::new(uri);
    let mut tasks = Vec::with_capacity(connections);
    for (k, sender) in senders.into_iter().enumerate() {
        let (target, uri, bodies) = (target.clone(), Arc::clone(&uri), Arc::clone(&bodies));
        tasks.push(tokio::spawn(async move {
            open_connection(target, sender, uri, bodies, k, connections, rate, started).await
        }));
    }
    let mut run = OpenRun::default();
    for task in tasks {
        let part = task
            .await
            .map_err(|e| LoadError::Other(format!("load task failed: {e}")))?;
        run.ok += part.ok;
        run.failures.merge(part.failures);
        run.from_intended_us
            .extend_from_slice(&part.from_intended_us);
        run.service_us.extend_from_slice(&part.service_us);
        run.idle_send_lag_us
            .extend_from_slice(&part.idle_send_lag_us);
        run.acks.extend_from_slice(&part.acks);
        run.late_sends += part.late_sends;
    }
    run.elapsed = started.elapsed();
    Ok(run)
}

#[allow(clippy::too_many_arguments)]
async fn open_connection(
    target: Target,
    mut sender: Sender,
    uri: Arc<Uri>,
    bodies: Arc<Deliveries>,
    k: usize,
    connections: usize,
    rate: f64,
    started: Instant,
) -> OpenRun {
    let per_conn = bodies.len() / connections + 1;
    let mut run = OpenRun {
        from_intended_us: Vec::with_capacity(per_conn),
        service_us: Vec::with_capacity(per_conn),
        idle_send_lag_us: Vec::with_capacity(per_conn),
        acks: Vec::with_capacity(per_conn),
        ..OpenRun::default()
    };
    let mut i = k;
    // When this connection's previous answer arrived.
    let mut answered = started;
    while i < bodies.len() {
        let intended = started + Duration::from_secs_f64(i as f64 / rate);
        let idle = Instant::now() <= intended;
        // Late because of the server: the connection was still waiting for
        // its previous answer at this request's intended time (not the
        // generator's own scheduling, which generator_send_lag shows).
        if answered > intended {
            run.late_sends += 1;
        }
        if idle {
            tokio::time::sleep_until(intended.into()).await;
        }
        let req = match target.post(&uri, bodies.body(i)) {
            Ok(r) => r,
            Err(e) => {
                run.failures.transport(&e);
                break;
            }
        };
        let sent = Instant::now();
        if idle {
            run.idle_send_lag_us.push(micros(sent - intended));
        }
        match send(&mut sender, req).await {
            Ok((status, body)) => {
                let done = Instant::now();
                answered = done;
                run.from_intended_us.push(micros(done - intended));
                run.service_us.push(micros(done - sent));
                if (200..300).contains(&status) {
                    run.ok += 1;
                    if let Some(p) = position(&body).filter(|_| !is_duplicate(&body)) {
                        run.acks.push((p, (done - started).as_micros() as u64));
                    }
                } else {
                    run.failures.status(status, &body);
                }
            }
            Err(e) => {
                run.failures.transport(&e);
                answered = Instant::now();
                match target.connect().await {
                    Ok(s) => sender = s,
                    Err(e) => {
                        run.failures.transport(&e);
                        break;
                    }
                }
            }
        }
        i += connections;
    }
    run
}

pub fn micros(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

/// `"position":123` in a webhook answer, without a JSON parse.
pub fn position(body: &[u8]) -> Option<u64> {
    let key = b"\"position\":";
    let at = body.windows(key.len()).position(|w| w == key)? + key.len();
    let digits = body[at..]
        .iter()
        .skip_while(|b| **b == b' ')
        .take_while(|b| b.is_ascii_digit());
    let mut n = 0u64;
    let mut any = false;
    for d in digits {
        n = n.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
        any = true;
    }
    any.then_some(n)
}

fn is_duplicate(body: &[u8]) -> bool {
    let key = b"\"duplicate\":true";
    body.windows(key.len()).any(|w| w == key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_position_and_duplicate_from_an_answer() {
        let body = br#"{"event_id":"8a4c","position":1234,"duplicate":true}"#;
        assert_eq!(position(body), Some(1234));
        assert!(is_duplicate(body));
        assert_eq!(position(br#"{"error":{}}"#), None);
    }
}
