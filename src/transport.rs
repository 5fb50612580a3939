//! One HTTP request of protocol v1, and what came of it. Runs outside any transaction, on the
//! sender thread (src/deliver.rs): nothing here may call into PostgreSQL.

use crate::gucs::Settings;
use cde_protocol::{classify, gzip, idempotency_key, Body, Classified, Item};
use std::time::{Duration, SystemTime};

pub struct Transport {
    agent: ureq::Agent,
    timeout: Duration,
    pub bytes_sent: u64,
    /// With cde.log_payloads: lines for the server log. Posting runs on the sender thread, which
    /// must not call into PostgreSQL; the worker's main thread logs them.
    pub payload_log: Vec<String>,
}

impl Transport {
    pub fn new(settings: &Settings) -> Transport {
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(settings.http_timeout))
            .http_status_as_error(false)
            .user_agent(concat!("cde/", env!("CARGO_PKG_VERSION")))
            .max_idle_connections_per_host(2)
            .build()
            .new_agent();
        Transport { agent, timeout: settings.http_timeout, bytes_sent: 0, payload_log: Vec::new() }
    }

    /// Keep the connection pool unless the timeout changed (ureq bakes it into the agent).
    pub fn refresh(&mut self, settings: &Settings) {
        if self.timeout != settings.http_timeout {
            *self = Transport::new(settings);
        }
    }

    /// POST one batch to `{endpoint}/{feed}` and classify the answer.
    pub fn post(&mut self, settings: &Settings, endpoint: &str, feed: &str, items: &[Item]) -> Classified {
        let body = Body::build(items);
        let key = idempotency_key(feed, &body);
        if settings.log_payloads {
            let line =
                format!("cde: payload to feed {feed} ({} items): {}", items.len(), cde_protocol::response::snippet(&body.0));
            self.payload_log.push(line);
        }
        let url = format!("{endpoint}/{feed}");
        let mut req = self.agent.post(&url).header("Content-Type", "application/json").header("Idempotency-Key", &key);
        if let Some(k) = &settings.api_key {
            req = req.header("Authorization", &format!("Bearer {k}"));
        }
        let payload = if settings.compression {
            req = req.header("Content-Encoding", "gzip");
            gzip(body.0.as_bytes())
        } else {
            body.0.into_bytes()
        };
        self.bytes_sent += payload.len() as u64;
        match req.send(&payload[..]) {
            Ok(mut resp) => {
                let status = resp.status().as_u16();
                let retry_after = resp.headers().get("retry-after").and_then(|v| v.to_str().ok()).map(String::from);
                let text = resp.body_mut().with_config().limit(1 << 20).read_to_string().unwrap_or_default();
                classify(status, &text, retry_after.as_deref(), items.len(), SystemTime::now())
            }
            Err(e) => failure(&e),
        }
    }
}

/// A request that got no answer. A TLS or DNS failure says the destination is misconfigured (a
/// certificate, a host name): held, like a 401. Anything else (refused, reset, timeout) may pass.
fn failure(e: &ureq::Error) -> Classified {
    let text = e.to_string();
    let lower = text.to_lowercase();
    let dns = matches!(e, ureq::Error::HostNotFound)
        || ["failed to lookup address", "name or service not known", "no address associated", "name resolution"]
            .iter()
            .any(|m| lower.contains(m));
    let tls = matches!(e, ureq::Error::Tls(_) | ureq::Error::Rustls(_) | ureq::Error::Pem(_) | ureq::Error::TlsRequired)
        || ["certificate", "tls", "handshake"].iter().any(|m| lower.contains(m));
    if dns {
        Classified::Misconfigured { status: None, reason: "DNS failure", error: format!("DNS failure: {text}") }
    } else if tls {
        Classified::Misconfigured { status: None, reason: "TLS failure", error: format!("TLS failure: {text}") }
    } else {
        Classified::Retryable { status: None, error: describe(e), retry_after: None }
    }
}

fn describe(e: &ureq::Error) -> String {
    match e {
        ureq::Error::Timeout(_) => "timeout".to_string(),
        ureq::Error::Io(io) if io.kind() == std::io::ErrorKind::ConnectionRefused => "connection refused".to_string(),
        other => format!("transport: {other}"),
    }
}
