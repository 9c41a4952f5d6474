//! The `Authorization` header formats Frappe clients send, and the one the gateway signs with.
//!
//! Frappe splits the header on a single space into exactly two parts and matches the scheme
//! case-insensitively: `token key:secret`, `Basic base64(key:secret)`, `Bearer <token>`. The
//! gateway accepts its own credentials in all three shapes, so the Python frappe-client (Basic or
//! token) and frappe-js-sdk (Bearer by default) work by changing only the base URL and key.

use base64::Engine as _;
use http::HeaderValue;

/// A credential presented to the gateway: a key id and its secret.
#[derive(Debug, PartialEq, Eq)]
pub struct PresentedCredential {
    /// The key id, as sent.
    pub key_id: String,
    /// The secret, as sent; only ever hashed.
    pub secret: String,
}

/// Why an `Authorization` header could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CredentialError {
    #[error("no Authorization header")]
    Missing,
    #[error("the Authorization header is malformed")]
    Malformed,
}

/// Reads `token id:secret`, `Basic base64(id:secret)` or `Bearer id:secret`.
pub fn parse_credential(
    value: Option<&HeaderValue>,
) -> Result<PresentedCredential, CredentialError> {
    let value = value.ok_or(CredentialError::Missing)?;
    let value = value.to_str().map_err(|_| CredentialError::Malformed)?;
    let mut parts = value.split(' ');
    let (Some(scheme), Some(param), None) = (parts.next(), parts.next(), parts.next()) else {
        return Err(CredentialError::Malformed);
    };
    let pair = if scheme.eq_ignore_ascii_case("basic") {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(param)
            .map_err(|_| CredentialError::Malformed)?;
        String::from_utf8(bytes).map_err(|_| CredentialError::Malformed)?
    } else if scheme.eq_ignore_ascii_case("token") || scheme.eq_ignore_ascii_case("bearer") {
        param.to_owned()
    } else {
        return Err(CredentialError::Malformed);
    };
    let (key_id, secret) = pair.split_once(':').ok_or(CredentialError::Malformed)?;
    if key_id.is_empty() || secret.is_empty() {
        return Err(CredentialError::Malformed);
    }
    Ok(PresentedCredential {
        key_id: key_id.to_owned(),
        secret: secret.to_owned(),
    })
}

/// The header value the gateway sends upstream for a service account, marked sensitive so that
/// hyper's HPACK never indexes it and `Debug` never prints it.
pub fn token_header(
    api_key: &str,
    api_secret: &str,
) -> Result<HeaderValue, http::header::InvalidHeaderValue> {
    let mut value = HeaderValue::try_from(format!("token {api_key}:{api_secret}"))?;
    value.set_sensitive(true);
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &'static str) -> Result<PresentedCredential, CredentialError> {
        parse_credential(Some(&HeaderValue::from_static(s)))
    }

    #[test]
    fn three_schemes() {
        let want = PresentedCredential {
            key_id: "ek_1".into(),
            secret: "s3cret".into(),
        };
        assert_eq!(parse("token ek_1:s3cret").unwrap(), want);
        assert_eq!(parse("TOKEN ek_1:s3cret").unwrap(), want);
        assert_eq!(parse("Bearer ek_1:s3cret").unwrap(), want);
        // base64("ek_1:s3cret")
        assert_eq!(parse("Basic ZWtfMTpzM2NyZXQ=").unwrap(), want);
    }

    #[test]
    fn malformed() {
        for bad in [
            "token",
            "token ek_1",
            "token  ek_1:x",
            "token a:b c",
            "Digest a:b",
            "Basic !!",
            "token :x",
            "token x:",
        ] {
            assert_eq!(parse(bad), Err(CredentialError::Malformed), "{bad}");
        }
        assert_eq!(parse_credential(None), Err(CredentialError::Missing));
    }

    #[test]
    fn token_header_is_sensitive() {
        let h = token_header("k", "s").unwrap();
        assert!(h.is_sensitive());
        assert_eq!(h, "token k:s");
    }
}
