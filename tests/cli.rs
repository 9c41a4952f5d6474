//! The `erpgate` binary: `check`, `keygen`, and `run` with a graceful SIGTERM.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::process::Command;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode};
use sha2::{Digest, Sha256};
use support::*;

const BIN: &str = env!("CARGO_BIN_EXE_erpgate");

fn temp_file(name: &str, contents: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("erpgate-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    path
}

#[test]
fn check_accepts_the_shipped_config_and_lists_every_problem_of_a_bad_one() {
    let ok = Command::new(BIN)
        .args([
            "check",
            concat!(env!("CARGO_MANIFEST_DIR"), "/gateway.yaml"),
        ])
        .env("ERP_SYNC_API_KEY", "k")
        .env("ERP_SYNC_API_SECRET", "s")
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );

    let bad = temp_file(
        "bad.yaml",
        "sites:\n  erp:\n    backends: [http://127.0.0.1:1]\n    site_name: erp.localhost\n    service_accounts:\n      sync: { api_key: k, api_secret: s }\nclients:\n  a:\n    key_id: ek_a\n    secret_sha256: \"00\"\n    site: nowhere\n    service_account: sync\n",
    );
    let out = Command::new(BIN)
        .args(["check", bad.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("2 problem(s)"), "{err}");
    assert!(
        err.contains("clients.a.secret_sha256 (line 10): must be 64 hex digits"),
        "{err}"
    );
    assert!(
        err.contains("clients.a.service_account (line 12): no site named 'nowhere'"),
        "{err}"
    );

    let broken = temp_file("broken.yaml", "sites:\n  erp:\n    backend: [http://x]\n");
    let out = Command::new(BIN)
        .args(["check", broken.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("sites.erp")
            && err.contains("unknown field `backend`")
            && err.contains("line 3"),
        "{err}"
    );
}

#[test]
fn keygen_prints_a_credential_whose_hash_matches() {
    let out = Command::new(BIN).arg("keygen").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(&format!("{name}: ")))
            .unwrap_or_else(|| panic!("no {name} in {text}"))
            .trim_matches('"')
            .to_owned()
    };
    let (key_id, secret, hash) = (field("key_id"), field("secret"), field("secret_sha256"));
    assert!(key_id.starts_with("ek_"));
    assert!(secret.len() >= 40 && !secret.contains([':', ' ']));
    assert_eq!(hash, hex::encode(Sha256::digest(secret.as_bytes())));
    let again = Command::new(BIN).arg("keygen").output().unwrap();
    assert_ne!(String::from_utf8(again.stdout).unwrap(), text);
}

#[tokio::test]
async fn sigterm_lets_an_in_flight_request_finish_then_exits_0() {
    let up = upstream().await;
    let config = base_config(&up).replace(
        "log: { format: pretty, level: warn }",
        "log: { format: json, level: info }",
    );
    let path = temp_file("run.yaml", &config);
    let mut gateway = GatewayProcess::start(&path);
    let (listen, admin) = (gateway.listen.clone(), gateway.admin.clone());
    let base = format!("http://{listen}");

    // The container health check: alive, and a dead address is not.
    let health = |addr: &str| {
        Command::new(BIN)
            .args(["health", "--admin", addr])
            .output()
            .unwrap()
            .status
            .code()
    };
    assert_eq!(health(&admin), Some(0));
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    assert_eq!(health(&dead.to_string()), Some(1));

    let slow = tokio::spawn({
        let url = format!("{base}/api/method/test.slow?ms=1500");
        async move { get(&url, FULL).await }
    });
    // Wait until the slow request is at the upstream, then ask the gateway to stop.
    while up.count() == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The shell's kill builtin: no dependency on a kill binary being installed.
    let killed = Command::new("sh")
        .args(["-c", &format!("kill -TERM {}", gateway.child.id())])
        .status()
        .unwrap();
    assert!(killed.success());

    // Draining: /readyz says so at once...
    let mut ready = StatusCode::OK;
    for _ in 0..100 {
        ready = send(
            Method::GET,
            &format!("http://{admin}/readyz"),
            &[],
            Bytes::new(),
        )
        .await
        .status;
        if ready == StatusCode::SERVICE_UNAVAILABLE {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(ready, StatusCode::SERVICE_UNAVAILABLE);
    // ...no new connections are taken (the listener closes right after, without a drain delay)...
    let mut refused = false;
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(&listen).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(refused, "still accepting after SIGTERM");
    // ...and the request in flight completes.
    let reply = slow.await.unwrap();
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.json()["message"], "slow done");

    let (status, gateway) = tokio::task::spawn_blocking(move || {
        let status = gateway.child.wait();
        (status, gateway)
    })
    .await
    .unwrap();
    assert_eq!(status.unwrap().code(), Some(0));
    // One access-log line per request, with the fields operators need.
    let logs: Vec<String> = gateway.logs_so_far();
    let access = logs
        .iter()
        .find(|l| l.contains("erpgate::access"))
        .expect("an access log line");
    let access: serde_json::Value = serde_json::from_str(access).unwrap();
    for field in [
        "request_id",
        "client",
        "site",
        "kind",
        "status",
        "latency_ms",
    ] {
        assert!(
            !access[field].is_null(),
            "access log lacks {field}: {access}"
        );
    }
    assert_eq!(access["client"], "full");
    assert!(
        logs.iter()
            .all(|l| !l.contains(SYNC_SECRET) && !l.contains(FULL.1)),
        "a secret reached the log"
    );
}

#[test]
fn check_says_what_each_method_rule_grants_and_refuses_what_cannot_be_judged() {
    let head = "sites:\n  erp:\n    backends: [http://127.0.0.1:1]\n    site_name: erp.localhost\n    service_accounts:\n      sync: { api_key: k, api_secret: s }\nclients:\n  shop:\n    key_id: ek_shop\n    secret_sha256: \"0000000000000000000000000000000000000000000000000000000000000000\"\n    site: erp\n    service_account: sync\n    allow:\n      methods:\n";
    let granted = temp_file(
        "grants.yaml",
        &format!(
            "{head}        - frappe.email.inbox.set_value\n        - \"myapp.*\"\n        - {{ name: otherapp.api.sync, args: {{ doctype: \"doctype:read\" }} }}\n"
        ),
    );
    let out = Command::new(BIN)
        .args(["check", granted.to_str().unwrap()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("frappe.email.inbox.set_value (is frappe.client.set_value): reviewed")
            && text.contains("doctype: doctype:update"),
        "{text}"
    );
    assert!(
        text.contains("myapp.* grants every method under myapp."),
        "{text}"
    );
    assert!(
        text.contains(
            "otherapp.api.sync (outside the catalog) with arguments doctype: doctype:read"
        ),
        "{text}"
    );

    let refused = temp_file(
        "refused.yaml",
        &format!("{head}        - \"frappe.desk.*\"\n        - frappe.client.get_password\n"),
    );
    let out = Command::new(BIN)
        .args(["check", refused.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("clients.shop.allow.methods[0]") && err.contains("catalog covers"),
        "{err}"
    );
    assert!(
        err.contains("clients.shop.allow.methods[1]") && err.contains("never allowed"),
        "{err}"
    );
}

#[test]
fn a_directory_erpgate_cannot_write_fails_check_and_start_not_the_first_large_body() {
    // A path under a regular file can never be a directory, whoever runs the test.
    let blocker = temp_file("not-a-directory", "x");
    let spool = format!("{}/spool", blocker.display());
    std::env::set_var("ERPGATE_TEST_BLOCKED", &spool);
    let config = temp_file(
        "unwritable.yaml",
        // An address this machine cannot bind: should the probe ever pass, `run` still ends.
        "listen: 192.0.2.1:9\nadmin_listen: 192.0.2.1:10\nbuffering: { directory: \"${ERPGATE_TEST_BLOCKED}\" }\nsites:\n  erp:\n    backends: [http://127.0.0.1:1]\n    site_name: erp.localhost\n    service_accounts:\n      sync: { api_key: k, api_secret: s }\n",
    );
    let out = Command::new(BIN)
        .args(["check", config.to_str().unwrap()])
        .env("ERPGATE_TEST_BLOCKED", &spool)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("buffering.directory")
            && err.contains(&spool)
            && err.contains("cannot be written"),
        "{err}"
    );
    // Only the file, for a config meant for another machine.
    let out = Command::new(BIN)
        .args(["check", "--config-only", config.to_str().unwrap()])
        .env("ERPGATE_TEST_BLOCKED", &spool)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A directory that does not exist yet but can be made passes, and check leaves nothing.
    let fresh = std::env::temp_dir().join(format!("erpgate-fresh-{}/a/b", std::process::id()));
    let out = Command::new(BIN)
        .args(["check", config.to_str().unwrap()])
        .env("ERPGATE_TEST_BLOCKED", &fresh)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!fresh.parent().unwrap().parent().unwrap().exists());
    // Start-up refuses it too, at once.
    let out = Command::new(BIN)
        .args(["run", "--config", config.to_str().unwrap()])
        .env("ERPGATE_TEST_BLOCKED", &spool)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("buffering.directory"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn check_sites_says_in_plain_words_what_a_first_request_would_fail_on() {
    let up = upstream().await;
    let config = |site_name: &str, backend: &str, reader_secret: &str| {
        format!(
            "sites:\n  erp:\n    backends: [{backend}]\n    site_name: {site_name}\n    service_accounts:\n      sync: {{ api_key: {SYNC_KEY}, api_secret: {SYNC_SECRET} }}\n      reader: {{ api_key: {READER_KEY}, api_secret: {reader_secret} }}\n"
        )
    };
    let run = |name: &'static str, yaml: String| async move {
        let path = temp_file(name, &yaml);
        tokio::task::spawn_blocking(move || {
            Command::new(BIN)
                .args(["check", "--sites", path.to_str().unwrap()])
                .output()
                .unwrap()
        })
        .await
        .unwrap()
    };
    let good = run("sites-good.yaml", config(SITE, &up.url(), READER_SECRET)).await;
    let text = String::from_utf8_lossy(&good.stdout);
    assert!(good.status.success(), "{text}");
    assert!(
        text.contains("signed in as reader@example.com; roles: Sales User"),
        "{text}"
    );
    // The all-powerful account is named as such.
    assert!(
        text.contains("signed in as sync@example.com") && text.contains("WARNING"),
        "{text}"
    );

    let wrong_site = run(
        "sites-wrong-name.yaml",
        config("erp.example.com", &up.url(), READER_SECRET),
    )
    .await;
    let text = String::from_utf8_lossy(&wrong_site.stdout);
    assert_eq!(wrong_site.status.code(), Some(1), "{text}");
    assert!(
        text.contains("has no site named 'erp.example.com'")
            && text.contains("sites.erp.site_name"),
        "{text}"
    );

    let wrong_secret = run("sites-wrong-secret.yaml", config(SITE, &up.url(), "nope")).await;
    let text = String::from_utf8_lossy(&wrong_secret.stdout);
    assert_eq!(wrong_secret.status.code(), Some(1), "{text}");
    assert!(
        text.contains("sites.erp.service_accounts.reader") && text.contains("refused the API key"),
        "{text}"
    );
    assert!(
        text.contains("ok: sites.erp.service_accounts.sync"),
        "{text}"
    );

    let dead = run(
        "sites-dead.yaml",
        config(SITE, "http://127.0.0.1:1", READER_SECRET),
    )
    .await;
    let text = String::from_utf8_lossy(&dead.stdout);
    assert_eq!(dead.status.code(), Some(1), "{text}");
    assert!(text.contains("cannot reach the site"), "{text}");
}

/// The `pretty` log format piped into a file or a collector (stdout not a terminal) is plain
/// text: no ANSI colour codes in any line, the access line included.
#[tokio::test]
async fn pretty_logs_written_to_a_pipe_have_no_colour_codes() {
    use std::io::BufRead as _;
    let up = upstream().await;
    let config = base_config(&up).replace(
        "log: { format: pretty, level: warn }",
        "log: { format: pretty, level: info }",
    );
    assert!(config.contains("format: pretty, level: info"));
    let path = temp_file("pretty.yaml", &config);
    /// Killed when the test ends, passed or not.
    struct Running(std::process::Child);
    impl Drop for Running {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut child = Running(
        Command::new(BIN)
            .args(["run", "--config", path.to_str().unwrap()])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let stdout = child.0.stdout.take().unwrap();
    let (tx, lines) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let next_line_with = |text: &str| loop {
        let line = lines
            .recv_timeout(Duration::from_secs(20))
            .expect("no log line within 20s");
        assert!(
            !line.contains("\x1b["),
            "colour codes in a piped log: {line:?}"
        );
        if line.contains(text) {
            return line;
        }
    };
    let listening = next_line_with("erpgate listening");
    let listen = listening
        .split_whitespace()
        .find_map(|field| field.strip_prefix("listen_addr="))
        .unwrap_or_else(|| panic!("no listen_addr in {listening:?}"))
        .to_owned();
    let reply = get(
        &format!("http://{listen}/api/method/frappe.auth.get_logged_user"),
        FULL,
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    let access = next_line_with("erpgate::access");
    assert!(access.contains("status=200"), "{access}");
}
