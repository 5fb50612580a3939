//! What the sink holds and how it answers: ingest (protocol v1), faults, and the `/_sink/` API.

use crate::http::{bounded, Request};
use cde_protocol::{gunzip, ItemRef};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub enum Reply {
    Http { status: u16, headers: Vec<(String, String)>, body: Vec<u8>, delay: Option<Duration> },
    Close,
    Garbage,
}

fn json_reply(status: u16, v: &Value) -> Reply {
    Reply::Http {
        status,
        headers: vec![("Content-Type".into(), "application/json".into())],
        body: serde_json::to_vec(v).unwrap(),
        delay: None,
    }
}

/// One fault instruction, as posted to `/_sink/faults`. It applies to the next `count` ingest
/// requests (for its `feed`, or any feed), or to every request when `count` is absent.
#[derive(Debug, Deserialize, Clone)]
pub struct Fault {
    #[serde(default)]
    feed: Option<String>,
    #[serde(default)]
    count: Option<u64>,
    /// Answer with this status instead of processing the request.
    #[serde(default)]
    status: Option<u16>,
    #[serde(default)]
    body: Option<String>,
    #[serde(default)]
    retry_after: Option<String>,
    /// Wait this long before answering (the request is processed normally unless `status` is set).
    #[serde(default)]
    delay_ms: Option<u64>,
    /// Close the connection without answering.
    #[serde(default)]
    close: bool,
    /// Answer bytes that are not HTTP.
    #[serde(default)]
    garbage: bool,
    /// Reject the items matching this rule: listed in a 2xx body (`reject_mode` "item", default),
    /// or by refusing the whole batch with `status` (default 422) when it holds one ("batch").
    #[serde(default)]
    reject: Option<RejectRule>,
    #[serde(default)]
    reject_mode: Option<String>,
}

#[derive(Debug, Deserialize, Clone)]
pub struct RejectRule {
    #[serde(default)]
    key: Option<String>,
    /// Substring of the item's JSON text.
    #[serde(default)]
    contains: Option<String>,
    #[serde(default)]
    error: Option<String>,
}

impl RejectRule {
    fn matches(&self, item: &ItemRef) -> bool {
        self.key.as_deref().is_some_and(|k| k == item.key) || self.contains.as_deref().is_some_and(|c| compact(item).contains(c))
    }
}

/// The item as compact JSON, keys sorted: the text a `contains` rule is matched against.
fn compact(item: &ItemRef) -> String {
    let data: Value = item.data.map_or(Value::Null, |d| serde_json::from_str(d.get()).unwrap_or(Value::Null));
    json!({"key": item.key, "deleted": item.deleted, "data": data}).to_string()
}

struct Entry {
    deleted: bool,
    /// The document's JSON text as received: kept, not parsed, as a receiver that stores
    /// documents would (and parsing a million of them cost the sink more than anything else).
    data: Option<Box<RawValue>>,
    received: u64,
}

pub struct State {
    api_key: Option<String>,
    /// Standard Webhooks secret: requests whose signature does not verify are refused (401).
    signing_secret: Option<Vec<u8>>,
    /// Keep each ingest request's webhook headers and body in the log, for a verifier written
    /// elsewhere (the e2e suite's standardwebhooks).
    capture: bool,
    next_request_id: u64,
    docs: HashMap<String, BTreeMap<String, Entry>>,
    log: Vec<Value>,
    faults: Vec<Fault>,
    seen_keys: HashSet<String>,
    items_received: u64,
    duplicate_requests: u64,
    faults_injected: u64,
}

impl State {
    pub fn new(api_key: Option<String>) -> State {
        State {
            api_key,
            signing_secret: None,
            capture: false,
            next_request_id: 0,
            docs: HashMap::new(),
            log: Vec::new(),
            faults: Vec::new(),
            seen_keys: HashSet::new(),
            items_received: 0,
            duplicate_requests: 0,
            faults_injected: 0,
        }
    }

    /// The first fault that applies to `feed`, consuming one of its uses. Reject rules are
    /// standing orders, applied to every request besides: see `reject_rule`.
    fn take_fault(&mut self, feed: &str) -> Option<Fault> {
        let i = self
            .faults
            .iter()
            .position(|f| f.reject.is_none() && f.feed.as_deref().is_none_or(|x| x == feed) && f.count != Some(0))?;
        let f = &mut self.faults[i];
        if let Some(c) = f.count.as_mut() {
            *c -= 1;
        }
        let f = f.clone();
        if f.count == Some(0) {
            self.faults.remove(i);
        }
        self.faults_injected += 1;
        Some(f)
    }

    fn reject_rule(&self, feed: &str) -> Option<Fault> {
        self.faults.iter().find(|f| f.reject.is_some() && f.feed.as_deref().is_none_or(|x| x == feed)).cloned()
    }

    fn stats(&self) -> Value {
        let docs: usize = self.docs.values().map(|m| m.len()).sum();
        json!({
            "requests": self.log.len(),
            "items_received": self.items_received,
            "duplicate_requests": self.duplicate_requests,
            "faults_injected": self.faults_injected,
            "documents": docs,
        })
    }

    /// The documents held, of `feed` if given, and of `keys` only if given (a benchmark polls a
    /// few keys among hundreds of thousands).
    fn snapshot(&self, feed: Option<&str>, keys: Option<&[&str]>) -> Value {
        let mut feeds = Map::new();
        for (name, m) in &self.docs {
            if feed.is_some_and(|f| f != name) {
                continue;
            }
            let mut items = Map::new();
            let mut add = |k: &String, e: &Entry| {
                items.insert(k.clone(), json!({"deleted": e.deleted, "data": e.data, "received": e.received}));
            };
            match keys {
                Some(keys) => keys.iter().filter_map(|k| m.get_key_value(*k)).for_each(|(k, e)| add(k, e)),
                None => m.iter().for_each(|(k, e)| add(k, e)),
            }
            feeds.insert(name.clone(), Value::Object(items));
        }
        json!({ "feeds": feeds })
    }
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64
}

fn query_param<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query.split('&').find_map(|kv| kv.split_once('=').filter(|(k, _)| *k == name).map(|(_, v)| v))
}

pub fn handle(state: &Mutex<State>, req: &Request) -> Reply {
    if let Some(admin) = req.path.strip_prefix("/_sink/") {
        return handle_admin(state, req, admin);
    }
    if req.method != "POST" {
        return json_reply(404, &json!({"error": "POST /{feed} only"}));
    }
    ingest(state, req)
}

fn handle_admin(state: &Mutex<State>, req: &Request, what: &str) -> Reply {
    let mut s = state.lock().unwrap();
    match (req.method.as_str(), what) {
        ("GET", "health") => json_reply(200, &json!({"ok": true})),
        ("GET", "state") => {
            let keys: Option<Vec<&str>> = query_param(&req.query, "keys").map(|k| k.split(',').collect());
            json_reply(200, &s.snapshot(query_param(&req.query, "feed"), keys.as_deref()))
        }
        ("GET", "log") => {
            let since: usize = query_param(&req.query, "since").and_then(|v| v.parse().ok()).unwrap_or(0);
            let reqs: Vec<Value> = s.log.iter().skip(since).cloned().collect();
            json_reply(200, &json!({"requests": reqs, "stats": s.stats()}))
        }
        ("GET", "stats") => json_reply(200, &s.stats()),
        ("POST", "faults") => match serde_json::from_slice::<Fault>(&req.body) {
            Ok(f) => {
                s.faults.push(f);
                json_reply(200, &json!({"faults": s.faults.len()}))
            }
            Err(e) => json_reply(400, &json!({"error": format!("bad fault: {e}")})),
        },
        ("DELETE", "faults") => {
            s.faults.clear();
            json_reply(200, &json!({"faults": 0}))
        }
        ("POST", "reset") => {
            let key = s.api_key.take();
            let secret = s.signing_secret.take();
            *s = State::new(key);
            s.signing_secret = secret;
            json_reply(200, &json!({"reset": true}))
        }
        ("POST", "signing-secret") => {
            let text = String::from_utf8_lossy(&req.body).trim().to_string();
            if text.is_empty() {
                s.signing_secret = None;
            } else {
                match cde_protocol::sign::parse_secret(&text) {
                    Ok(secret) => s.signing_secret = Some(secret),
                    Err(e) => return json_reply(400, &json!({"error": e})),
                }
            }
            json_reply(200, &json!({"signature_required": s.signing_secret.is_some()}))
        }
        ("POST", "capture") => {
            s.capture = String::from_utf8_lossy(&req.body).trim() != "off";
            json_reply(200, &json!({"capture": s.capture}))
        }
        ("POST", "api-key") => {
            let k = String::from_utf8_lossy(&req.body).trim().to_string();
            s.api_key = if k.is_empty() { None } else { Some(k) };
            json_reply(200, &json!({"api_key_required": s.api_key.is_some()}))
        }
        _ => json_reply(404, &json!({"error": format!("no such sink endpoint: {} /_sink/{what}", req.method)})),
    }
}

fn ingest(state: &Mutex<State>, req: &Request) -> Reply {
    let feed = req.path.trim_end_matches('/').rsplit('/').next().unwrap_or_default().to_string();
    let idem = req.header("idempotency-key").unwrap_or_default().to_string();
    let gz = req.header("content-encoding").is_some_and(|v| v.eq_ignore_ascii_case("gzip"));
    let auth = req.header("authorization").map(String::from);
    let mut s = state.lock().unwrap();
    s.next_request_id += 1;
    let request_id = format!("sink-{}", s.next_request_id);
    let mut entry = json!({
        "t": now_ms(), "feed": feed, "bytes": req.body.len(), "gzip": gz,
        "idempotency_key": idem, "authorization": auth.is_some(),
        "content_type": req.header("content-type"), "request_id": request_id,
        "signed": req.header("webhook-signature").is_some(),
    });
    let mut reply = ingest_locked(&mut s, req, &feed, &idem, gz, auth, &mut entry);
    if let Reply::Http { headers, .. } = &mut reply {
        headers.push(("X-Request-Id".into(), request_id));
    }
    s.log.push(entry);
    reply
}

fn ingest_locked(
    s: &mut State,
    req: &Request,
    feed: &str,
    idem: &str,
    gz: bool,
    auth: Option<String>,
    entry: &mut Value,
) -> Reply {
    let feed = feed.to_string();
    let idem = idem.to_string();
    let headers = |names: &[&str]| -> Value {
        names.iter().map(|n| (n.to_string(), json!(req.header(n)))).collect::<Map<String, Value>>().into()
    };

    let fault = s.take_fault(&feed);
    let mut delay = None;
    if let Some(f) = &fault {
        entry["fault"] = json!(true);
        if f.close || f.garbage {
            entry["status"] = json!(if f.close { "closed" } else { "garbage" });
            return if f.close { Reply::Close } else { Reply::Garbage };
        }
        delay = f.delay_ms.map(bounded);
        if let Some(status) = f.status {
            let mut headers = vec![];
            if let Some(ra) = &f.retry_after {
                headers.push(("Retry-After".to_string(), ra.clone()));
            }
            entry["status"] = json!(status);
            return Reply::Http { status, headers, body: f.body.clone().unwrap_or_default().into_bytes(), delay };
        }
    }

    if let Some(expected) = &s.api_key {
        if auth.as_deref() != Some(&format!("Bearer {expected}")) {
            entry["status"] = json!(401);
            return json_reply(401, &json!({"error": "missing or wrong bearer token"}));
        }
    }

    let raw = if gz {
        // (decoded first: a signature covers the uncompressed body)
        match gunzip(&req.body) {
            Ok(b) => b,
            Err(e) => {
                entry["status"] = json!(400);
                    return json_reply(400, &json!({"error": format!("bad gzip: {e}")}));
            }
        }
    } else {
        req.body.clone()
    };
    if s.capture {
        entry["webhook"] = headers(&["webhook-id", "webhook-timestamp", "webhook-signature"]);
        entry["body"] = json!(String::from_utf8_lossy(&raw));
    }
    if let Some(secret) = &s.signing_secret {
        let (id, ts, sig) = (req.header("webhook-id"), req.header("webhook-timestamp"), req.header("webhook-signature"));
        let fresh = ts.and_then(|t| t.parse::<u64>().ok()).is_some_and(|t| (now_ms() / 1000).abs_diff(t) <= 300);
        let valid = matches!((id, ts, sig), (Some(id), Some(ts), Some(sig)) if cde_protocol::sign::verify(secret, id, ts, &raw, sig));
        if !(valid && fresh) {
            entry["status"] = json!(401);
            return json_reply(401, &json!({"error": "the webhook signature does not verify"}));
        }
    }
    let values: Vec<&RawValue> = match serde_json::from_slice(&raw) {
        Ok(v) => v,
        _ => {
            entry["status"] = json!(400);
            return json_reply(400, &json!({"error": "body must be a JSON array of items"}));
        }
    };
    let mut items = Vec::with_capacity(values.len());
    for v in values {
        match serde_json::from_str::<ItemRef>(v.get()) {
            Ok(it) if it.deleted || it.data.is_some() => items.push(it),
            _ => {
                entry["status"] = json!(400);
                    return json_reply(400, &json!({"error": "each item needs key, deleted and data"}));
            }
        }
    }
    entry["items"] = json!(items.len());
    entry["raw_bytes"] = json!(raw.len());
    entry["keys"] = json!(items.iter().map(|it| it.key.as_ref()).collect::<Vec<_>>());

    let mut rejected = vec![];
    if let Some(rule_fault) = s.reject_rule(&feed) {
        let rule = rule_fault.reject.clone().expect("a reject rule");
        let batch_mode = rule_fault.reject_mode.as_deref() == Some("batch");
        let error = rule.error.clone().unwrap_or_else(|| "rejected by rule".into());
        let hits: Vec<usize> = items.iter().enumerate().filter(|(_, it)| rule.matches(it)).map(|(i, _)| i).collect();
        if batch_mode && !hits.is_empty() {
            let status = rule_fault.status.unwrap_or(422);
            entry["status"] = json!(status);
            return Reply::Http { status, headers: vec![], body: format!("{{\"error\":{}}}", json!(error)).into_bytes(), delay };
        }
        rejected = hits.into_iter().map(|i| json!({"index": i, "error": error})).collect();
    }
    let duplicate = !idem.is_empty() && !s.seen_keys.insert(idem.clone());
    if duplicate {
        s.duplicate_requests += 1;
        entry["duplicate"] = json!(true);
    }
    let rejected_idx: HashSet<u64> = rejected.iter().filter_map(|r| r["index"].as_u64()).collect();
    let t = now_ms();
    let n = items.len();
    let docs = s.docs.entry(feed.clone()).or_default();
    for (i, it) in items.into_iter().enumerate() {
        if rejected_idx.contains(&(i as u64)) {
            continue;
        }
        docs.insert(it.key.into_owned(), Entry { deleted: it.deleted, data: it.data.map(ToOwned::to_owned), received: t });
    }
    s.items_received += n as u64;
    entry["status"] = json!(200);
    entry["rejected"] = json!(rejected.len());
    let body = if rejected.is_empty() { json!({}) } else { json!({"rejected": rejected}) };
    Reply::Http {
        status: 200,
        headers: vec![("Content-Type".into(), "application/json".into())],
        body: serde_json::to_vec(&body).unwrap(),
        delay,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn post(s: &Mutex<State>, path: &str, body: &str, headers: &[(&str, &str)]) -> (u16, Value) {
        let req = Request {
            method: "POST".into(),
            path: path.into(),
            query: String::new(),
            headers: headers.iter().map(|(k, v)| (k.to_ascii_lowercase(), v.to_string())).collect(),
            body: body.as_bytes().to_vec(),
        };
        match handle(s, &req) {
            Reply::Http { status, body, .. } => (status, serde_json::from_slice(&body).unwrap_or(Value::Null)),
            Reply::Close => (0, json!("closed")),
            Reply::Garbage => (0, json!("garbage")),
        }
    }

    fn fault(s: &Mutex<State>, rule: Value) {
        assert_eq!(post(s, "/_sink/faults", &rule.to_string(), &[]).0, 200);
    }

    const TWO: &str = r#"[{"key":"1","deleted":false,"data":{"a":1}},{"key":"2","deleted":true,"data":null}]"#;

    #[test]
    fn keeps_the_latest_document_per_feed_and_key() {
        let s = Mutex::new(State::new(None));
        assert_eq!(post(&s, "/ingest/products", TWO, &[]).0, 200);
        assert_eq!(post(&s, "/ingest/products", r#"[{"key":"1","deleted":false,"data":{"a":2}}]"#, &[]).0, 200);
        let st = s.lock().unwrap().snapshot(Some("products"), None);
        assert_eq!(st["feeds"]["products"]["1"]["data"], json!({"a": 2}));
        assert_eq!(st["feeds"]["products"]["2"]["deleted"], json!(true));
        let some = s.lock().unwrap().snapshot(Some("products"), Some(&["2", "7"]));
        assert_eq!(some["feeds"]["products"], json!({"2": {"deleted": true, "data": null, "received": st["feeds"]["products"]["2"]["received"]}}));
    }

    #[test]
    fn refuses_what_is_not_the_protocol() {
        let s = Mutex::new(State::new(None));
        assert_eq!(post(&s, "/p", "{}", &[]).0, 400);
        assert_eq!(post(&s, "/p", r#"[{"key":"1","deleted":false}]"#, &[]).0, 400);
        assert_eq!(post(&s, "/p", "not json", &[("Content-Encoding", "gzip")]).0, 400);
    }

    #[test]
    fn gzip_bodies_and_bearer_tokens() {
        let s = Mutex::new(State::new(Some("k".into())));
        assert_eq!(post(&s, "/p", TWO, &[]).0, 401);
        assert_eq!(post(&s, "/p", TWO, &[("Authorization", "Bearer k")]).0, 200);
        let z = cde_protocol::gzip(TWO.as_bytes());
        let req = Request {
            method: "POST".into(),
            path: "/p".into(),
            query: String::new(),
            headers: [
                ("content-encoding".to_string(), "gzip".to_string()),
                ("authorization".to_string(), "Bearer k".to_string()),
            ]
            .into_iter()
            .collect(),
            body: z,
        };
        assert!(matches!(handle(&s, &req), Reply::Http { status: 200, .. }));
    }

    #[test]
    fn faults_apply_count_times_to_their_feed() {
        let s = Mutex::new(State::new(None));
        fault(&s, json!({"feed": "a", "status": 503, "count": 2, "retry_after": "1"}));
        assert_eq!(post(&s, "/b", TWO, &[]).0, 200, "another feed is not affected");
        assert_eq!(post(&s, "/a", TWO, &[]).0, 503);
        assert_eq!(post(&s, "/a", TWO, &[]).0, 503);
        assert_eq!(post(&s, "/a", TWO, &[]).0, 200, "the fault is used up");
        fault(&s, json!({"close": true, "count": 1}));
        assert_eq!(post(&s, "/a", TWO, &[]).1, json!("closed"));
        assert_eq!(s.lock().unwrap().stats()["faults_injected"], json!(3));
    }

    #[test]
    fn reject_rules_by_item_or_by_batch() {
        let s = Mutex::new(State::new(None));
        fault(&s, json!({"reject": {"key": "2", "error": "no"}}));
        let (status, body) = post(&s, "/p", TWO, &[]);
        assert_eq!(status, 200);
        assert_eq!(body, json!({"rejected": [{"index": 1, "error": "no"}]}));
        s.lock().unwrap().faults.clear();
        fault(&s, json!({"reject": {"contains": "\"a\":1"}, "reject_mode": "batch", "status": 422}));
        assert_eq!(post(&s, "/p", TWO, &[]).0, 422);
        assert_eq!(post(&s, "/p", r#"[{"key":"3","deleted":false,"data":{"a":3}}]"#, &[]).0, 200);
    }

    #[test]
    fn signatures_are_verified_and_request_ids_answered() {
        let s = Mutex::new(State::new(None));
        let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        assert_eq!(post(&s, "/_sink/signing-secret", secret, &[]).0, 200);
        let ts = (now_ms() / 1000).to_string();
        let key = cde_protocol::sign::parse_secret(secret).unwrap();
        let sig = cde_protocol::sign::signature_header(&[key], "m1", ts.parse().unwrap(), TWO.as_bytes());
        let signed = [("webhook-id", "m1"), ("webhook-timestamp", ts.as_str()), ("webhook-signature", sig.as_str())];
        assert_eq!(post(&s, "/p", TWO, &signed).0, 200);
        assert_eq!(post(&s, "/p", TWO, &[]).0, 401, "unsigned");
        let tampered = TWO.replace("\"a\":1", "\"a\":2");
        assert_eq!(post(&s, "/p", &tampered, &signed).0, 401, "another body");
        let old = [("webhook-id", "m1"), ("webhook-timestamp", "1000"), ("webhook-signature", sig.as_str())];
        assert_eq!(post(&s, "/p", TWO, &old).0, 401, "a stale timestamp");
        let log = s.lock().unwrap().log.clone();
        assert_eq!(log[0]["request_id"], json!("sink-1"));
        assert_eq!(log[1]["status"], json!(401));
        let req = Request {
            method: "POST".into(),
            path: "/p".into(),
            query: String::new(),
            headers: signed.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            body: TWO.as_bytes().to_vec(),
        };
        match handle(&s, &req) {
            Reply::Http { headers, .. } => assert!(headers.iter().any(|(k, v)| k == "X-Request-Id" && v == "sink-5")),
            _ => panic!("an HTTP answer"),
        }
    }

    #[test]
    fn repeated_idempotency_keys_count_as_duplicates() {
        let s = Mutex::new(State::new(None));
        post(&s, "/p", TWO, &[("Idempotency-Key", "abc")]);
        post(&s, "/p", TWO, &[("Idempotency-Key", "abc")]);
        assert_eq!(s.lock().unwrap().stats()["duplicate_requests"], json!(1));
    }
}
