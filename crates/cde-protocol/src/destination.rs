//! A destination's options (`cde_set_destination(name, endpoint, options)`): what they may say,
//! checked in one place for the SQL function that stores them and the worker that uses them.

use serde_json::{Map, Value};
use std::time::Duration;

/// The options, as given; `None`: the server's setting of the same name (cde.batch_size...).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Options {
    pub api_key_file: Option<String>,
    pub signing_secret_file: Option<String>,
    pub max_requests_per_second: Option<f64>,
    pub batch_size: Option<usize>,
    pub max_batch_bytes: Option<usize>,
    pub timeout: Option<Duration>,
    pub compression: Option<bool>,
    pub headers: Vec<(String, String)>,
    pub response_id_header: Option<String>,
    pub roles: Vec<String>,
}

/// Every key an options object may hold.
pub const KEYS: &[&str] = &[
    "api_key_file",
    "signing_secret_file",
    "max_requests_per_second",
    "batch_size",
    "max_batch_bytes",
    "timeout",
    "compression",
    "headers",
    "response_id_header",
    "roles",
];

/// Headers cde sets itself: `headers` may not replace them (the key comes from `api_key_file`).
const OWN_HEADERS: &[&str] =
    &["authorization", "content-type", "content-encoding", "content-length", "host", "idempotency-key", "transfer-encoding", "user-agent"];

/// Headers that carry credentials: their values would be in the statement, cde.destinations and
/// dumps. A key belongs in `api_key_file`.
const SECRET_HEADERS: &[&str] =
    &["proxy-authorization", "cookie", "x-api-key", "api-key", "apikey", "x-auth-token", "x-access-token", "x-secret"];

/// Parse and check an options object; the error names the key and what is wrong with it.
pub fn parse(options: &Value) -> Result<Options, String> {
    let empty = Map::new();
    let map = match options {
        Value::Object(m) => m,
        Value::Null => &empty,
        _ => return Err("options must be a JSON object".into()),
    };
    let mut o = Options::default();
    for (k, v) in map {
        match k.as_str() {
            "api_key_file" => o.api_key_file = Some(path(k, v)?),
            "signing_secret_file" => o.signing_secret_file = Some(path(k, v)?),
            "max_requests_per_second" => {
                let n = v.as_f64().filter(|n| *n > 0.0 && *n <= 100_000.0);
                o.max_requests_per_second = Some(n.ok_or_else(|| bad(k, v, "a number above 0 (at most 100000)"))?);
            }
            "batch_size" => o.batch_size = Some(int(k, v, 1, 100_000)?),
            "max_batch_bytes" => o.max_batch_bytes = Some(int(k, v, 1024, i32::MAX as u64)?),
            "timeout" => o.timeout = Some(duration(k, v)?),
            "compression" => o.compression = Some(v.as_bool().ok_or_else(|| bad(k, v, "true or false"))?),
            "headers" => o.headers = headers(k, v)?,
            "response_id_header" => {
                let name = v.as_str().filter(|s| is_token(s)).ok_or_else(|| bad(k, v, "a header name"))?;
                o.response_id_header = Some(name.to_ascii_lowercase());
            }
            "roles" => {
                let roles = v.as_array().and_then(|a| a.iter().map(|r| r.as_str().map(String::from)).collect::<Option<Vec<_>>>());
                o.roles = roles.ok_or_else(|| bad(k, v, "an array of role names"))?;
            }
            "api_key" | "signing_secret" => {
                return Err(format!(
                    "option {k} is not taken: a secret in SQL would be in pg_stat_activity, the log and dumps; put it in a file only the server's OS user reads and give {k}_file"
                ))
            }
            other => return Err(format!("unknown option {other:?} (known: {})", KEYS.join(", "))),
        }
    }
    Ok(o)
}

fn bad(key: &str, v: &Value, what: &str) -> String {
    format!("option {key} must be {what}, not {v}")
}

fn path(key: &str, v: &Value) -> Result<String, String> {
    match v.as_str() {
        Some(p) if p.starts_with('/') && !p.contains('\0') => Ok(p.to_string()),
        _ => Err(bad(key, v, "an absolute file path")),
    }
}

fn int(key: &str, v: &Value, min: u64, max: u64) -> Result<usize, String> {
    v.as_u64().filter(|n| (min..=max).contains(n)).map(|n| n as usize).ok_or_else(|| bad(key, v, &format!("an integer from {min} to {max}")))
}

/// Milliseconds as a number, or a string with a unit: "500ms", "30s", "2min".
fn duration(key: &str, v: &Value) -> Result<Duration, String> {
    let ms = match v {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => {
            let s = s.trim();
            let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
            let n: Option<u64> = num.parse().ok();
            match unit.trim() {
                "" | "ms" => n,
                "s" => n.map(|n| n * 1000),
                "min" => n.map(|n| n * 60_000),
                _ => None,
            }
        }
        _ => None,
    };
    ms.filter(|ms| (100..=3_600_000).contains(ms))
        .map(Duration::from_millis)
        .ok_or_else(|| bad(key, v, "a duration from 100ms to 1h (milliseconds, or a string such as \"30s\")"))
}

fn is_token(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

fn headers(key: &str, v: &Value) -> Result<Vec<(String, String)>, String> {
    let map = v.as_object().ok_or_else(|| bad(key, v, "an object of header names and values"))?;
    let mut out = Vec::new();
    for (name, value) in map {
        let lower = name.to_ascii_lowercase();
        if !is_token(name) {
            return Err(format!("option headers: {name:?} is not a header name"));
        }
        if OWN_HEADERS.contains(&lower.as_str()) || lower.starts_with("webhook-") {
            return Err(format!("option headers: {name} is set by cde itself (a bearer key goes in api_key_file)"));
        }
        if SECRET_HEADERS.contains(&lower.as_str()) {
            return Err(format!(
                "option headers: {name} carries a credential, which would be kept in clear in cde.destinations and in dumps; use api_key_file"
            ));
        }
        match value.as_str() {
            Some(s) if !s.contains(['\r', '\n', '\0']) => out.push((name.clone(), s.to_string())),
            _ => return Err(format!("option headers: the value of {name} must be a string on one line")),
        }
    }
    Ok(out)
}

/// How long to wait between two request starts to stay within `max_requests_per_second`: a
/// little more than 1/rate, so that no window of one second, measured at the receiver with some
/// jitter, ever holds more than the rate.
pub fn request_spacing(max_requests_per_second: Option<f64>) -> Option<Duration> {
    max_requests_per_second.map(|r| Duration::from_secs_f64(1.0 / r).mul_f64(1.02) + Duration::from_millis(2))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn every_option_parses() {
        let o = parse(&json!({
            "api_key_file": "/etc/k", "signing_secret_file": "/etc/s", "max_requests_per_second": 2,
            "batch_size": 100, "max_batch_bytes": 65536, "timeout": "5s", "compression": false,
            "headers": {"X-Tenant": "eu-1"}, "response_id_header": "X-Trace-Id", "roles": ["shop"]
        }))
        .unwrap();
        assert_eq!(o.max_requests_per_second, Some(2.0));
        assert_eq!(o.timeout, Some(Duration::from_secs(5)));
        assert_eq!(o.headers, vec![("X-Tenant".to_string(), "eu-1".to_string())]);
        assert_eq!(o.response_id_header.as_deref(), Some("x-trace-id"));
        assert_eq!(parse(&json!({})).unwrap(), Options::default());
        assert_eq!(parse(&json!({"timeout": 250})).unwrap().timeout, Some(Duration::from_millis(250)));
        assert_eq!(parse(&json!({"timeout": "2min"})).unwrap().timeout, Some(Duration::from_secs(120)));
    }

    #[test]
    fn bad_options_are_named() {
        let err = |v: Value| parse(&v).unwrap_err();
        assert!(err(json!({"batchsize": 1})).contains("unknown option \"batchsize\""));
        assert!(err(json!({"batch_size": 0})).contains("option batch_size"));
        assert!(err(json!({"max_requests_per_second": "fast"})).contains("option max_requests_per_second"));
        assert!(err(json!({"timeout": "soon"})).contains("option timeout"));
        assert!(err(json!({"api_key_file": "relative"})).contains("absolute file path"));
        assert!(err(json!({"api_key": "s3cret"})).contains("api_key_file"));
        assert!(!err(json!({"api_key": "s3cret"})).contains("s3cret"));
        assert!(err(json!({"headers": {"Authorization": "Bearer x"}})).contains("set by cde itself"));
        assert!(err(json!({"headers": {"webhook-id": "x"}})).contains("set by cde itself"));
        assert!(err(json!({"headers": {"X-Api-Key": "k"}})).contains("carries a credential"));
        assert!(err(json!({"headers": {"X-A": "a\r\nb: c"}})).contains("one line"));
        assert!(err(json!([1])).contains("JSON object"));
    }

    #[test]
    fn spacing_keeps_any_second_within_the_rate() {
        let s = request_spacing(Some(2.0)).unwrap();
        assert!(s > Duration::from_millis(500) && s < Duration::from_millis(520), "{s:?}");
        // Three starts spaced so span more than one second.
        assert!(s * 2 > Duration::from_secs(1));
        assert_eq!(request_spacing(None), None);
    }
}
