//! Compiles `proto/` with protox (pure Rust), so a fresh machine needs no `protoc`.
//!
//! Clients and servers are generated with different codecs: servers with
//! `crate::codec::RequestCodec` (an undecodable request is INVALID_ARGUMENT), clients with
//! tonic-prost's `ProstCodec` (an undecodable response stays INTERNAL). tonic-prost-build takes
//! one codec path per build, so one prost pass runs two tonic service generators.

use std::path::PathBuf;

use prost_build::{Service, ServiceGenerator};

/// Generates each service's client with one generator and its server with another.
struct ClientAndServer {
    client: Box<dyn ServiceGenerator>,
    server: Box<dyn ServiceGenerator>,
}

impl ServiceGenerator for ClientAndServer {
    fn generate(&mut self, service: Service, buf: &mut String) {
        self.client.generate(service.clone(), buf);
        self.server.generate(service, buf);
    }

    fn finalize(&mut self, buf: &mut String) {
        self.client.finalize(buf);
        self.server.finalize(buf);
    }

    fn finalize_package(&mut self, package: &str, buf: &mut String) {
        self.client.finalize_package(package, buf);
        self.server.finalize_package(package, buf);
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let files = [
        root.join("exactly/v1/exactly.proto"),
        root.join("exactly/internal/v1/raft.proto"),
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    let fds = protox::compile(&files, [&root])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("exactly_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    let generators = ClientAndServer {
        client: tonic_prost_build::configure()
            .build_server(false)
            .service_generator(),
        server: tonic_prost_build::configure()
            .build_client(false)
            .codec_path("crate::codec::RequestCodec")
            .service_generator(),
    };
    let mut config = prost_build::Config::new();
    config.out_dir(&out);
    config.service_generator(Box::new(generators));
    config.compile_fds(fds)?;
    Ok(())
}
