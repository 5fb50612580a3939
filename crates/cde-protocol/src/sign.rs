//! Standard Webhooks signatures (standardwebhooks.com): `webhook-signature: v1,<base64 of
//! HMAC-SHA256(secret, "{id}.{timestamp}.{body}")>`, one per secret, space-separated while a secret
//! is being rotated. Secrets are written `whsec_<base64 of the secret bytes>`.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use sha2::{Digest, Sha256};

/// HMAC-SHA256 (RFC 2104), over SHA-256's 64-byte blocks.
pub fn hmac_sha256(key: &[u8], message: &[&[u8]]) -> [u8; 32] {
    let mut block = [0u8; 64];
    if key.len() > 64 {
        block[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let mut inner = Sha256::new();
    inner.update(block.map(|b| b ^ 0x36));
    for part in message {
        inner.update(part);
    }
    let mut outer = Sha256::new();
    outer.update(block.map(|b| b ^ 0x5c));
    outer.update(inner.finalize());
    outer.finalize().into()
}

/// The secret bytes of a `whsec_...` secret; the error says what is wrong, never the secret.
pub fn parse_secret(text: &str) -> Result<Vec<u8>, &'static str> {
    let b64 = text.trim().strip_prefix("whsec_").ok_or("a signing secret starts with whsec_")?;
    let bytes = STANDARD.decode(b64).map_err(|_| "a signing secret is whsec_ followed by base64")?;
    if bytes.len() < 16 {
        return Err("a signing secret has at least 16 bytes (24 characters of base64)");
    }
    Ok(bytes)
}

/// The secrets of a signing secret file: one `whsec_...` per line (two while rotating: the
/// receiver accepts either), blank lines and `#` comments ignored.
pub fn parse_secret_file(text: &str) -> Result<Vec<Vec<u8>>, String> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        out.push(parse_secret(line).map_err(|e| format!("line {}: {e}", i + 1))?);
    }
    if out.is_empty() {
        return Err("it holds no secret (one whsec_... per line)".into());
    }
    Ok(out)
}

/// The `webhook-signature` header's value: `v1,<sig>` for each secret, space-separated.
pub fn signature_header(secrets: &[Vec<u8>], id: &str, timestamp: u64, body: &[u8]) -> String {
    let ts = timestamp.to_string();
    secrets
        .iter()
        .map(|s| format!("v1,{}", STANDARD.encode(hmac_sha256(s, &[id.as_bytes(), b".", ts.as_bytes(), b".", body]))))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Does any signature of the header verify with `secret`? (The receiver's side: the sink.)
pub fn verify(secret: &[u8], id: &str, timestamp: &str, body: &[u8], header: &str) -> bool {
    let expected = STANDARD.encode(hmac_sha256(secret, &[id.as_bytes(), b".", timestamp.as_bytes(), b".", body]));
    header.split(' ').filter_map(|s| s.strip_prefix("v1,")).any(|sig| constant_time_eq(sig.as_bytes(), expected.as_bytes()))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    #[test]
    fn hmac_matches_rfc_4231() {
        // Test cases 1 and 6 (a key longer than the block).
        assert_eq!(
            hex(&hmac_sha256(&[0x0b; 20], &[b"Hi There"])),
            "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7"
        );
        assert_eq!(
            hex(&hmac_sha256(&[0xaa; 131], &[b"Test Using Larger Than Block-Size Key - Hash Key First"])),
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
    }

    #[test]
    fn signs_as_the_standard_webhooks_reference() {
        // The example of the Standard Webhooks libraries' own tests.
        let secret = parse_secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let body = br#"{"test": 2432232314}"#;
        let header = signature_header(&[secret.clone()], "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body);
        assert_eq!(header, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
        assert!(verify(&secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", "1614265330", body, &header));
        assert!(!verify(&secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", "1614265331", body, &header));
    }

    #[test]
    fn one_signature_per_secret_while_rotating() {
        let file = "# old, then new\nwhsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\n\nwhsec_AAECAwQFBgcICQoLDA0ODxAREhM=\n";
        let secrets = parse_secret_file(file).unwrap();
        assert_eq!(secrets.len(), 2);
        let header = signature_header(&secrets, "id", 1, b"[]");
        assert_eq!(header.split(' ').count(), 2);
        assert!(verify(&secrets[0], "id", "1", b"[]", &header));
        assert!(verify(&secrets[1], "id", "1", b"[]", &header));
        assert!(!verify(&[7u8; 16], "id", "1", b"[]", &header));
    }

    #[test]
    fn bad_secrets_are_named_not_shown() {
        assert!(parse_secret("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").is_err());
        assert!(parse_secret("whsec_***").is_err());
        assert!(parse_secret("whsec_AAAA").is_err());
        let e = parse_secret_file("whsec_ok\nnope").unwrap_err();
        assert!(e.starts_with("line 1"), "{e}");
        assert!(!e.contains("nope"));
        assert!(parse_secret_file("\n# nothing\n").is_err());
    }
}
