//! Marks credential headers sensitive on the way in and out (tower-http's
//! `SetSensitiveHeadersLayer`): HTTP/2 never adds them to its HPACK tables, where a later
//! stream could probe them, and `Debug` output (a log line, a panic message) prints
//! `Sensitive` instead of the value. The service account's own `Authorization` is made
//! sensitive where it is made (`frappe::auth_header`).
//!
//! Outermost, so every layer and every log line sees them marked.

use http::header::{AUTHORIZATION, COOKIE, PROXY_AUTHORIZATION, SET_COOKIE};
use http::HeaderName;
use tower_http::sensitive_headers::SetSensitiveHeadersLayer;

/// Frappe's CSRF token: a session credential.
const X_FRAPPE_CSRF_TOKEN: HeaderName = HeaderName::from_static("x-frappe-csrf-token");

/// The layer, for the client's credentials and any cookie either way.
pub fn layer() -> SetSensitiveHeadersLayer {
    SetSensitiveHeadersLayer::new([
        AUTHORIZATION,
        PROXY_AUTHORIZATION,
        COOKIE,
        SET_COOKIE,
        X_FRAPPE_CSRF_TOKEN,
    ])
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{Request, Response};
    use tower::{Layer, ServiceExt};

    #[tokio::test]
    async fn credentials_are_marked_both_ways() {
        let inner = tower::service_fn(|request: Request<()>| async move {
            for name in [AUTHORIZATION, COOKIE, X_FRAPPE_CSRF_TOKEN] {
                assert!(request.headers()[&name].is_sensitive(), "{name}");
            }
            assert!(!request.headers()["accept"].is_sensitive());
            let response = Response::builder()
                .header(SET_COOKIE, "sid=abc")
                .body(())
                .unwrap();
            Ok::<_, std::convert::Infallible>(response)
        });
        let request = Request::builder()
            .header(AUTHORIZATION, "token ek_shop:secret")
            .header(COOKIE, "sid=abc")
            .header(X_FRAPPE_CSRF_TOKEN, "csrf")
            .header("accept", "application/json")
            .body(())
            .unwrap();
        let response = layer().layer(inner).oneshot(request).await.unwrap();
        assert!(response.headers()[SET_COOKIE].is_sensitive());
    }
}
