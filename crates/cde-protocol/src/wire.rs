//! What travels on the wire: items, request bodies, gzip and the Idempotency-Key.

use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::io::{Read, Write};

/// One item as the worker holds it before sending: the document is already JSON text
/// (PostgreSQL's `jsonb` output), so it is copied into the body as is, never parsed again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    pub key: String,
    pub deleted: bool,
    /// JSON text of the document; `None` for a deletion.
    pub doc: Option<String>,
}

impl Item {
    /// Bytes this item adds to a request body (before compression), including its comma.
    pub fn encoded_len(&self) -> usize {
        // {"key":<k>,"deleted":false,"data":<doc>},
        let key = escaped_len(&self.key);
        let data = self.doc.as_ref().map_or(4, |d| d.len());
        32 + key + data + 1
    }

    fn write_to(&self, out: &mut String) {
        out.push_str("{\"key\":");
        out.push_str(&serde_json::to_string(&self.key).expect("a string always serialises"));
        out.push_str(if self.deleted { ",\"deleted\":true,\"data\":" } else { ",\"deleted\":false,\"data\":" });
        match (&self.doc, self.deleted) {
            (Some(doc), false) => out.push_str(doc),
            _ => out.push_str("null"),
        }
        out.push('}');
    }
}

fn escaped_len(s: &str) -> usize {
    // Exact for the common case (no characters to escape); escapes only make it longer, and the
    // byte budget is a limit we keep with margin rather than an exact science.
    s.len() + 2 + s.bytes().filter(|b| *b == b'"' || *b == b'\\' || *b < 0x20).count() * 5
}

/// A request body: the JSON array of items, as text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Body(pub String);

impl Body {
    pub fn build<'a>(items: impl IntoIterator<Item = &'a Item>) -> Body {
        let mut out = String::with_capacity(4096);
        out.push('[');
        for (i, item) in items.into_iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            item.write_to(&mut out);
        }
        out.push(']');
        Body(out)
    }
}

/// An item as a receiver reads it back from a request body: borrowed from the body, the
/// document left as its JSON text (`None` for null), so that reading a batch allocates little.
#[derive(Debug, Deserialize)]
pub struct ItemRef<'a> {
    #[serde(borrow)]
    pub key: std::borrow::Cow<'a, str>,
    #[serde(default)]
    pub deleted: bool,
    #[serde(default, borrow)]
    pub data: Option<&'a serde_json::value::RawValue>,
}

/// `Idempotency-Key` for a batch: a digest of the feed and the exact body, so that the same batch
/// content sent again (after a crash between the POST and recording it) carries the same key,
/// and any different content carries a different one.
pub fn idempotency_key(feed: &str, body: &Body) -> String {
    let mut h = Sha256::new();
    h.update(feed.as_bytes());
    h.update([0u8]);
    h.update(body.0.as_bytes());
    let digest = h.finalize();
    digest[..16].iter().map(|b| format!("{b:02x}")).collect()
}

/// gzip at a fast level: bodies are highly repetitive JSON, so level 1 already gains most of the
/// ratio at a fraction of the CPU of the default level.
pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::with_capacity(data.len() / 4 + 64), flate2::Compression::fast());
    enc.write_all(data).expect("writing to a Vec cannot fail");
    enc.finish().expect("writing to a Vec cannot fail")
}

pub fn gunzip(data: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(data.len() * 4);
    flate2::read::GzDecoder::new(data).read_to_end(&mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(key: &str, doc: Option<&str>) -> Item {
        Item { key: key.into(), deleted: doc.is_none(), doc: doc.map(String::from) }
    }

    #[test]
    fn body_is_the_documented_json_array() {
        let body = Body::build(&[item("1", Some(r#"{"a": 1}"#)), item("x\"y", None)]);
        let parsed: Vec<ItemRef> = serde_json::from_str(&body.0).unwrap();
        assert_eq!(parsed.len(), 2);
        assert_eq!(parsed[0].key, "1");
        assert!(!parsed[0].deleted);
        assert_eq!(parsed[0].data.map(|d| d.get()), Some(r#"{"a": 1}"#));
        assert_eq!(parsed[1].key, "x\"y");
        assert!(parsed[1].deleted);
        assert!(parsed[1].data.is_none());
    }

    #[test]
    fn encoded_len_is_never_short() {
        let items = [item("1", Some(r#"{"a": 1}"#)), item("a\\b", None), item("ключ", Some("[]"))];
        for it in &items {
            let alone = Body::build(std::slice::from_ref(it)).0.len() - 2;
            assert!(it.encoded_len() >= alone, "{it:?}: {} < {alone}", it.encoded_len());
        }
    }

    #[test]
    fn idempotency_key_follows_content() {
        let a = Body::build(&[item("1", Some("{}"))]);
        let b = Body::build(&[item("1", Some("{}"))]);
        let c = Body::build(&[item("1", Some("{\"v\":2}"))]);
        assert_eq!(idempotency_key("p", &a), idempotency_key("p", &b));
        assert_ne!(idempotency_key("p", &a), idempotency_key("p", &c));
        assert_ne!(idempotency_key("p", &a), idempotency_key("q", &a));
        assert_eq!(idempotency_key("p", &a).len(), 32);
    }

    #[test]
    fn gzip_round_trips() {
        let data = b"[{\"key\":\"1\"}]".repeat(100);
        let z = gzip(&data);
        assert!(z.len() < data.len());
        assert_eq!(gunzip(&z).unwrap(), data);
    }
}
