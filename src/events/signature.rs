//! Standard Webhooks signatures (<https://www.standardwebhooks.com>, "Verifying webhooks"): a
//! delivery carries `webhook-id`, `webhook-timestamp` (Unix seconds) and
//! `webhook-signature: v1,<base64(HMAC-SHA256(key, "{id}.{timestamp}.{body}"))>`, where the key
//! is the base64 after the secret's `whsec_` prefix. Subscribers verify with any of the
//! scheme's libraries.

use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The secret's prefix in the scheme.
const PREFIX: &str = "whsec_";

/// A subscription's signing key, ready to sign.
#[derive(Clone)]
pub struct SigningKey(Hmac<Sha256>);

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SigningKey(<redacted>)")
    }
}

/// The HMAC key of a `whsec_` secret, or why the secret is unusable.
pub fn signing_key(secret: &str) -> Result<SigningKey, &'static str> {
    let Some(encoded) = secret.strip_prefix(PREFIX) else {
        return Err(
            "must be a Standard Webhooks secret: whsec_ then base64 of 24 to 64 random \
                    bytes (e.g. echo whsec_$(openssl rand -base64 32))",
        );
    };
    let key = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .map_err(|_| "the part after whsec_ is not base64")?;
    if !(24..=64).contains(&key.len()) {
        return Err("the key after whsec_ must be 24 to 64 bytes");
    }
    Hmac::<Sha256>::new_from_slice(&key)
        .map(SigningKey)
        .map_err(|_| "unusable key")
}

/// The `webhook-signature` value for one delivery attempt.
pub fn sign(key: &SigningKey, id: &str, timestamp: u64, body: &[u8]) -> String {
    let mut mac = key.0.clone();
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(itoa::Buffer::new().format(timestamp).as_bytes());
    mac.update(b".");
    mac.update(body);
    let mut value = String::from("v1,");
    base64::engine::general_purpose::STANDARD
        .encode_string(mac.finalize().into_bytes(), &mut value);
    value
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_must_be_standard_webhooks_secrets() {
        assert!(signing_key("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").is_ok());
        assert!(signing_key("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").is_err());
        assert!(signing_key("whsec_c2hvcnQ=").is_err());
        assert!(signing_key("whsec_not base64!").is_err());
    }

    /// The scheme's own example (standard-webhooks spec, "Verifying webhooks").
    #[test]
    fn signs_the_scheme_example() {
        let key = signing_key("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let body = br#"{"test": 2432232314}"#;
        assert_eq!(
            sign(&key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }
}
