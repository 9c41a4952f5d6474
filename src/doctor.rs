//! `erpgate check --sites`: asks each site, as each of its service accounts, the questions a
//! newcomer's first request would fail on, and says what the answers mean in plain words —
//! reachable, the site name the bench answers for, credentials, the account's roles.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::config::LoadedConfig;
use crate::frappe::headers::X_FRAPPE_SITE_NAME;
use crate::frappe::probe::{self, SignIn};

/// One line of the report and whether it is a failure.
#[derive(Debug)]
pub struct Finding {
    /// Plain words.
    pub line: String,
    /// The gateway would not work as configured.
    pub failed: bool,
}

/// Asks every site, through its first backend, as every service account.
pub async fn probe_sites(loaded: &LoadedConfig) -> Vec<Finding> {
    let mut findings = Vec::new();
    for (name, site) in &loaded.config.sites {
        let Some(backend) = site.backends.first() else {
            continue;
        };
        let connector = match crate::upstream::https_connector(
            site.timeouts.connect,
            site.ca_file.as_deref(),
        ) {
            Ok(c) => c,
            Err(e) => {
                findings.push(fail(format!("sites.{name}: cannot set up TLS: {e}")));
                continue;
            }
        };
        let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build(connector);
        let site_name = site.site_name.0.as_str();
        let host = site.host.as_ref().map_or(site_name, |h| h.0.as_str());
        let base = backend.0.to_string();
        let base = base.trim_end_matches('/');
        let ask = |path: &str, key: &str, secret: &str| {
            let request = Request::get(format!("{base}{path}"))
                .header(header::HOST, host)
                .header(&X_FRAPPE_SITE_NAME, site_name)
                .header(header::AUTHORIZATION, format!("token {key}:{secret}"))
                .header(header::ACCEPT, "application/json")
                .body(Full::new(Bytes::new()));
            let client = client.clone();
            async move {
                let request = request.map_err(|e| e.to_string())?;
                let answer = tokio::time::timeout(Duration::from_secs(15), client.request(request))
                    .await
                    .map_err(|_| "no answer within 15 s".to_owned())?
                    .map_err(|e| error_chain(&e))?;
                let status = answer.status().as_u16();
                let body = answer
                    .into_body()
                    .collect()
                    .await
                    .map_err(|e| e.to_string())?
                    .to_bytes();
                Ok::<_, String>((status, body))
            }
        };
        for (account, _) in &site.service_accounts {
            let Some(secret) = loaded.secrets.get(&(name.clone(), account.clone())) else {
                continue;
            };
            let key = site.service_accounts[account].api_key.0.as_str();
            let at = format!("sites.{name}.service_accounts.{account} via {base}");
            let started = Instant::now();
            let (status, body) = match ask(probe::WHO_AM_I, key, &secret.0).await {
                Ok(answer) => answer,
                Err(e) => {
                    findings.push(fail(format!(
                        "{at}: cannot reach the site: {e}. Is gunicorn or nginx listening at \
                         sites.{name}.backends? From this machine: curl {base}{}",
                        probe::WHO_AM_I
                    )));
                    break; // the other accounts would fail the same way
                }
            };
            let took = started.elapsed().as_millis();
            match probe::sign_in(status, &body) {
                SignIn::As(user) => {
                    let mut line = format!("{at}: reachable ({took} ms), site '{site_name}', signed in as {user}");
                    match ask(probe::MY_ROLES, key, &secret.0).await {
                        Ok((200, body)) => match probe::roles(&body) {
                            Some(roles) => {
                                let _ = write!(line, "; roles: {}", roles.join(", "));
                                if roles.iter().any(|r| probe::ALL_POWERFUL.contains(&r.as_str()))
                                    || user == "Administrator"
                                {
                                    let _ = write!(
                                        line,
                                        ". WARNING: this account may do anything on the site, so a \
                                         client's allow rules are its only limit: give integrations \
                                         a user with a Role Profile of just what they need"
                                    );
                                }
                            }
                            None => line.push_str("; roles: (unreadable answer)"),
                        },
                        _ => line.push_str("; roles: (the site did not say)"),
                    }
                    findings.push(Finding { line, failed: false });
                }
                SignIn::NoSuchSite => {
                    findings.push(fail(format!(
                        "{at}: Frappe answers there but has no site named '{site_name}' (its 404 \
                         \"{site_name} does not exist\"). Set sites.{name}.site_name to your site's \
                         name: the folder under frappe-bench/sites/ (ls frappe-bench/sites), the \
                         name you give bench --site"
                    )));
                    break;
                }
                SignIn::Refused => findings.push(fail(format!(
                    "{at}: the site refused the API key and secret (HTTP {status}). In ERPNext open \
                     the account's user, Settings > API Access > Generate Keys, and give erpgate \
                     the key and secret (check the environment variables the config names)"
                ))),
                SignIn::Unexpected(status, excerpt) => findings.push(fail(format!(
                    "{at}: unexpected answer (HTTP {status}): {excerpt}"
                ))),
            }
        }
    }
    findings
}

fn fail(line: String) -> Finding {
    Finding { line, failed: true }
}

/// An error with its causes: "client error (Connect): tcp connect error: Connection refused".
fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let _ = write!(text, ": {cause}");
        source = cause.source();
    }
    text
}
