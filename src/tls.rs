//! TLS termination on the public listener: rustls with the certificate and key from the
//! config, HTTP/2 and HTTP/1.1 offered by ALPN. Built anew on every reload, so a renewed
//! certificate (a cert-manager Secret update) is picked up by `SIGHUP` or the file watch.

use std::sync::Arc;

use tokio_rustls::TlsAcceptor;

use crate::config::TlsConfig;

/// Why the listener's TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("tls.cert_file {path}: {message}")]
    Cert { path: String, message: String },
    #[error("tls.key_file {path}: {message}")]
    Key { path: String, message: String },
    #[error("tls: {0}")]
    Config(#[from] rustls::Error),
}

/// An acceptor for `config`'s certificate and key.
pub fn acceptor(config: &TlsConfig) -> Result<TlsAcceptor, TlsError> {
    let cert_error = |message: String| TlsError::Cert {
        path: config.cert_file.display().to_string(),
        message,
    };
    let key_error = |message: String| TlsError::Key {
        path: config.key_file.display().to_string(),
        message,
    };
    let pem = std::fs::read(&config.cert_file).map_err(|e| cert_error(e.to_string()))?;
    let certs = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| cert_error(e.to_string()))?;
    if certs.is_empty() {
        return Err(cert_error("no certificate in the file".into()));
    }
    let pem = std::fs::read(&config.key_file).map_err(|e| key_error(e.to_string()))?;
    let key = rustls_pemfile::private_key(&mut pem.as_slice())
        .map_err(|e| key_error(e.to_string()))?
        .ok_or_else(|| key_error("no private key in the file".into()))?;
    let mut server = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(certs, key)?;
    server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(server)))
}
