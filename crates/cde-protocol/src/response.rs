//! What a response means for the batch that was sent (protocol v1, "Responses").

use serde::Deserialize;
use std::time::{Duration, SystemTime};

/// How much of a response body is kept in the feed table's `error` column.
pub const ERROR_SNIPPET: usize = 512;

/// The longest a `Retry-After` may hold a feed back, in either of its forms: a receiver asking
/// for more (a year, an overflow) is taken as asking for this.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub index: usize,
    pub error: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Classified {
    /// 2xx: every item is delivered except the listed ones.
    Accepted { rejected: Vec<Rejection> },
    /// 400, 409, 413, 422 and the other 4xx not listed below: the receiver will never take this
    /// batch as it is.
    Refused { status: u16, error: String },
    /// 401, 403, 404, 405, 407, 410, and TLS or DNS failures: the destination is misconfigured (a
    /// wrong key, URL, proxy or certificate), not the items. Nothing is rejected; the destination
    /// is held until the retry interval has passed or the settings are reloaded.
    Misconfigured { status: Option<u16>, reason: &'static str, error: String },
    /// 408, 429, 5xx, and anything the transport failed on: try again later.
    Retryable { status: Option<u16>, error: String, retry_after: Option<Duration> },
}

#[derive(Deserialize)]
struct AcceptBody {
    #[serde(default)]
    rejected: Vec<RejectedEntry>,
}

#[derive(Deserialize)]
struct RejectedEntry {
    index: usize,
    #[serde(default)]
    error: Option<String>,
}

/// Classify an HTTP response. `batch_len` bounds the indexes a 2xx body may reject; an index out of
/// range is ignored rather than trusted.
pub fn classify(status: u16, body: &str, retry_after: Option<&str>, batch_len: usize, now: SystemTime) -> Classified {
    match status {
        200..=299 => {
            let rejected = if body.trim().is_empty() {
                Vec::new()
            } else {
                match serde_json::from_str::<AcceptBody>(body) {
                    Ok(b) => b
                        .rejected
                        .into_iter()
                        .filter(|r| r.index < batch_len)
                        .map(|r| Rejection { index: r.index, error: r.error.unwrap_or_else(|| "rejected".into()) })
                        .collect(),
                    // A 2xx whose body is not the documented object means "all accepted": the
                    // receiver said yes, and we will not guess at rejections it did not spell out.
                    Err(_) => Vec::new(),
                }
            };
            Classified::Accepted { rejected }
        }
        401 | 403 | 404 | 405 | 407 | 410 => {
            let reason = misconfigured_reason(status);
            Classified::Misconfigured { status: Some(status), reason, error: format!("{reason} (HTTP {status}): {}", snippet(body)) }
        }
        408 | 429 | 500..=599 => Classified::Retryable {
            status: Some(status),
            error: format!("HTTP {status}: {}", snippet(body)),
            retry_after: retry_after.and_then(|v| parse_retry_after(v, now)),
        },
        400..=499 => Classified::Refused { status, error: format!("HTTP {status}: {}", snippet(body)) },
        // 1xx/3xx are not part of the protocol: treat as a fault of the receiver, and retry.
        _ => Classified::Retryable { status: Some(status), error: format!("unexpected HTTP {status}"), retry_after: None },
    }
}

/// What a destination-level status says, in words (docs/protocol.md, "Responses").
pub fn misconfigured_reason(status: u16) -> &'static str {
    match status {
        401 => "unauthorized",
        403 => "forbidden",
        404 => "not found",
        405 => "method not allowed",
        407 => "proxy authentication required",
        410 => "gone",
        _ => "misconfigured",
    }
}

/// The first part of a body, cut on a character boundary.
pub fn snippet(body: &str) -> String {
    let body = body.trim();
    if body.len() <= ERROR_SNIPPET {
        return body.to_string();
    }
    let mut end = ERROR_SNIPPET;
    while !body.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &body[..end])
}

/// `Retry-After`: either delay-seconds or an HTTP date (RFC 9110 §10.2.3), at most
/// [`MAX_RETRY_AFTER`]. A date in the past means "now"; anything unparseable is ignored.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        // Digits beyond u64 are a very long time, not garbage.
        let secs = value.parse::<u64>().unwrap_or(u64::MAX);
        return Some(Duration::from_secs(secs).min(MAX_RETRY_AFTER));
    }
    let when = httpdate::parse_http_date(value).ok()?;
    Some(when.duration_since(now).unwrap_or(Duration::ZERO).min(MAX_RETRY_AFTER))
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: fn() -> SystemTime = SystemTime::now;

    #[test]
    fn accepted_with_and_without_rejections() {
        assert_eq!(classify(200, "", None, 3, NOW()), Classified::Accepted { rejected: vec![] });
        assert_eq!(classify(204, "", None, 3, NOW()), Classified::Accepted { rejected: vec![] });
        let c = classify(200, r#"{"rejected":[{"index":1,"error":"bad sku"},{"index":9}]}"#, None, 3, NOW());
        assert_eq!(c, Classified::Accepted { rejected: vec![Rejection { index: 1, error: "bad sku".into() }] });
        assert_eq!(classify(200, "garbage", None, 3, NOW()), Classified::Accepted { rejected: vec![] });
    }

    #[test]
    fn refused_statuses() {
        for s in [400, 409, 413, 422, 418] {
            assert!(matches!(classify(s, "nope", None, 1, NOW()), Classified::Refused { status, .. } if status == s), "{s}");
        }
    }

    #[test]
    fn destination_statuses_reject_nothing() {
        for (s, reason) in
            [(401, "unauthorized"), (403, "forbidden"), (404, "not found"), (405, "method not allowed"), (407, "proxy authentication required"), (410, "gone")]
        {
            match classify(s, "nope", None, 1, NOW()) {
                Classified::Misconfigured { status: Some(x), reason: r, error } => {
                    assert_eq!((x, r), (s, reason));
                    assert_eq!(error, format!("{reason} (HTTP {s}): nope"));
                }
                other => panic!("{s}: {other:?}"),
            }
        }
    }

    #[test]
    fn retryable_statuses() {
        for s in [408, 429, 500, 502, 503, 504] {
            assert!(matches!(classify(s, "", None, 1, NOW()), Classified::Retryable { status: Some(x), .. } if x == s), "{s}");
        }
        assert!(matches!(classify(302, "", None, 1, NOW()), Classified::Retryable { .. }));
    }

    #[test]
    fn retry_after_seconds_and_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(parse_retry_after("7", now), Some(Duration::from_secs(7)));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(120));
        assert_eq!(parse_retry_after(&later, now), Some(Duration::from_secs(120)));
        let past = httpdate::fmt_http_date(now - Duration::from_secs(120));
        assert_eq!(parse_retry_after(&past, now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon", now), None);
        // Clamped, both forms: no overflow, no year-long hold.
        assert_eq!(parse_retry_after("99999999999", now), Some(MAX_RETRY_AFTER));
        assert_eq!(parse_retry_after("999999999999999999999999", now), Some(MAX_RETRY_AFTER));
        let far = httpdate::fmt_http_date(now + Duration::from_secs(86_400 * 365));
        assert_eq!(parse_retry_after(&far, now), Some(MAX_RETRY_AFTER));
        match classify(429, "slow down", Some("3"), 1, now) {
            Classified::Retryable { retry_after, .. } => assert_eq!(retry_after, Some(Duration::from_secs(3))),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn snippet_cuts_on_char_boundary() {
        let long = "é".repeat(1000);
        let s = snippet(&long);
        assert!(s.len() <= ERROR_SNIPPET + '…'.len_utf8());
        assert!(s.ends_with('…'));
    }
}
