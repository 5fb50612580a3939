//! One HTTP request of protocol v1, and what came of it. Runs outside any transaction, on a
//! destination's sender thread (src/pump.rs): nothing here may call into PostgreSQL.

use crate::destination::Destination;
use cde_protocol::{classify, gzip, idempotency_key, Body, Classified, Item, SendResult};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub struct Transport {
    agent: ureq::Agent,
    timeout: Duration,
    /// When the last request started: with max_requests_per_second, the next waits its turn.
    last_start: Option<Instant>,
    pub bytes_sent: Arc<AtomicU64>,
    /// With cde.log_payloads: lines for the server log. Posting runs on a sender thread, which
    /// must not call into PostgreSQL; the worker's main thread logs them.
    pub payload_log: Vec<String>,
}

fn agent(timeout: Duration) -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_global(Some(timeout))
        .http_status_as_error(false)
        .user_agent(concat!("cde/", env!("CARGO_PKG_VERSION")))
        .max_idle_connections_per_host(2)
        .build()
        .new_agent()
}

impl Transport {
    pub fn new(timeout: Duration, bytes_sent: Arc<AtomicU64>) -> Transport {
        Transport { agent: agent(timeout), timeout, last_start: None, bytes_sent, payload_log: Vec::new() }
    }

    /// POST one batch to `{endpoint}/{feed}` of the destination and classify the answer.
    pub fn post(&mut self, dest: &Destination, feed: &str, items: &[Item]) -> SendResult {
        // ureq bakes the timeout into the agent: a new one (and new connections) when it changed.
        if self.timeout != dest.timeout {
            self.agent = agent(dest.timeout);
            self.timeout = dest.timeout;
        }
        let Some(endpoint) = dest.endpoint.as_deref() else {
            return (Classified::Misconfigured { status: None, reason: "no endpoint", error: "no endpoint".into() }, None);
        };
        let body = Body::build(items);
        let key = idempotency_key(feed, &body);
        if dest.log_payloads {
            let line = format!(
                "cde: payload to feed {feed} ({} items, destination {}): {}",
                items.len(),
                dest.name,
                cde_protocol::response::snippet(&body.0)
            );
            self.payload_log.push(line);
        }
        let url = format!("{endpoint}/{feed}");
        let mut req = self.agent.post(&url).header("Content-Type", "application/json").header("Idempotency-Key", &key);
        for (name, value) in &dest.headers {
            req = req.header(name, value);
        }
        if let Some(k) = &dest.api_key {
            req = req.header("Authorization", &format!("Bearer {k}"));
        }
        if !dest.secrets.is_empty() {
            // Standard Webhooks: the batch's idempotency key is the message id, so that a batch
            // sent again is recognised as the same message; signed over the uncompressed body.
            let ts = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
            let sig = cde_protocol::sign::signature_header(&dest.secrets, &key, ts, body.0.as_bytes());
            req = req.header("webhook-id", &key).header("webhook-timestamp", &ts.to_string()).header("webhook-signature", &sig);
        }
        let payload = if dest.compression {
            req = req.header("Content-Encoding", "gzip");
            gzip(body.0.as_bytes())
        } else {
            body.0.into_bytes()
        };
        if let (Some(spacing), Some(last)) = (dest.spacing, self.last_start) {
            let next = last + spacing;
            let now = Instant::now();
            if next > now {
                std::thread::sleep(next - now);
            }
        }
        self.last_start = Some(Instant::now());
        self.bytes_sent.fetch_add(payload.len() as u64, Ordering::Relaxed);
        match req.send(&payload[..]) {
            Ok(mut resp) => {
                let status = resp.status().as_u16();
                let header = |name: &str| resp.headers().get(name).and_then(|v| v.to_str().ok()).map(String::from);
                let retry_after = header("retry-after");
                let response_id = header(&dest.response_id_header).map(|id| id.chars().take(200).collect());
                let text = resp.body_mut().with_config().limit(1 << 20).read_to_string().unwrap_or_default();
                (classify(status, &text, retry_after.as_deref(), items.len(), SystemTime::now()), response_id)
            }
            Err(e) => (failure(&e), None),
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
