//! cde-sink: a small, real HTTP server implementing cde's ingest protocol v1 (docs/protocol.md).
//!
//! It keeps the latest document per feed and key, a log of requests, and takes fault instructions
//! so that tests, the demo and the benchmarks can make it misbehave on purpose. It listens on
//! loopback only. Everything it holds is served as JSON under `/_sink/`.
//!
//! ```text
//! cde-sink [--listen 127.0.0.1:8787] [--api-key KEY]
//! ```

mod http;
mod state;

use std::net::{SocketAddr, TcpListener};
use std::sync::{Arc, Mutex};

fn main() {
    let mut listen = "127.0.0.1:8787".to_string();
    let mut api_key = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--listen" => listen = args.next().unwrap_or_else(|| usage("--listen needs an address")),
            "--api-key" => api_key = Some(args.next().unwrap_or_else(|| usage("--api-key needs a value"))),
            "-h" | "--help" => usage(""),
            other => usage(&format!("unknown argument {other}")),
        }
    }
    let addr: SocketAddr = listen.parse().unwrap_or_else(|_| usage(&format!("not an address: {listen}")));
    if !addr.ip().is_loopback() {
        usage(&format!("{addr} is not a loopback address; the sink listens on loopback only"));
    }
    let listener = TcpListener::bind(addr).unwrap_or_else(|e| {
        eprintln!("cde-sink: cannot listen on {addr}: {e}");
        std::process::exit(1)
    });
    let state = Arc::new(Mutex::new(state::State::new(api_key)));
    eprintln!("cde-sink: listening on http://{addr}");
    for conn in listener.incoming() {
        let Ok(stream) = conn else { continue };
        let state = Arc::clone(&state);
        std::thread::spawn(move || http::serve_connection(stream, state));
    }
}

fn usage(msg: &str) -> ! {
    if !msg.is_empty() {
        eprintln!("cde-sink: {msg}");
    }
    eprintln!("usage: cde-sink [--listen 127.0.0.1:8787] [--api-key KEY]");
    std::process::exit(if msg.is_empty() { 0 } else { 2 })
}
