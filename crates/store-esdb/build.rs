//! Compiles the EventStoreDB protocol for the in-process test server, and
//! only with the `test-server` feature: the adapter itself uses the
//! `eventstore` client's own generated code and needs nothing built here.
//!
//! It also tells the test suite whether a real server is there: with
//! `TRACKER_TEST_EVENTSTORE_URL` set, `cfg(tracker_esdb_real)` is on and the
//! contract cases against that server run instead of being ignored.

const REAL_SERVER_URL: &str = "TRACKER_TEST_EVENTSTORE_URL";

fn main() {
    println!("cargo::rustc-check-cfg=cfg(tracker_esdb_real)");
    println!("cargo::rerun-if-env-changed={REAL_SERVER_URL}");
    println!("cargo::rerun-if-changed=build.rs");
    if std::env::var_os(REAL_SERVER_URL).is_some_and(|url| !url.is_empty()) {
        println!("cargo::rustc-cfg=tracker_esdb_real");
    }
    #[cfg(feature = "test-server")]
    test_server::compile();
}

#[cfg(feature = "test-server")]
mod test_server {
    use std::path::PathBuf;

    const PROTOS: [&str; 6] = [
        "shared.proto",
        "streams.proto",
        "serverfeatures.proto",
        "gossip.proto",
        "status.proto",
        "code.proto",
    ];

    pub fn compile() {
        // A protoc shipped inside a crate: no system package, no download.
        let protoc = protoc_bin_vendored::protoc_bin_path()
            .unwrap_or_else(|err| panic!("no vendored protoc for this platform: {err}"));
        let well_known = protoc_bin_vendored::include_path()
            .unwrap_or_else(|err| panic!("no vendored protobuf includes: {err}"));
        let mut config = prost_build::Config::new();
        config.protoc_executable(protoc);

        for file in PROTOS {
            println!("cargo:rerun-if-changed=protos/{file}");
        }
        let dir = PathBuf::from("protos");
        let roots = ["streams.proto", "serverfeatures.proto", "gossip.proto"].map(|f| dir.join(f));
        tonic_build::configure()
            .build_client(false)
            .build_server(true)
            .compile_protos_with_config(config, &roots, &[dir, well_known])
            .unwrap_or_else(|err| panic!("compiling the EventStoreDB protos: {err}"));
    }
}
