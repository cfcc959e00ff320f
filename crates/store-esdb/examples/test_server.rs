//! Runs the in-process test server on its own, for trying the adapter (or
//! the real-server contract cases) against it:
//!
//! ```sh
//! cargo run -p tracker-store-esdb --features test-server --example test_server -- 127.0.0.1:2113
//! TRACKER_TEST_EVENTSTORE_URL='esdb://127.0.0.1:2113?tls=false' cargo test -p tracker-store-esdb contract_real_server
//! ```
//!
//! It is a stand-in: a real EventStoreDB is what the real-server run is for.

use std::net::SocketAddr;

use tracker_store_esdb::test_server::TestServer;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr: SocketAddr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:2113".to_owned())
        .parse()?;
    let server = TestServer::start_at(addr).await?;
    println!("test EventStoreDB server: {}", server.url());
    tokio::signal::ctrl_c().await?;
    Ok(())
}
