//! The `erpgate` command: run, check, keygen.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use base64::Engine as _;
use clap::{Parser, Subcommand};
use sha2::{Digest, Sha256};
use tracing_subscriber::EnvFilter;

use erpgate::config::{Config, LogFormat};

use erpgate::server::RunningGateway;

/// erpgate: the API gateway in front of ERPNext / Frappe sites.
///
/// Clients hold gateway keys; erpgate checks them and their access rules, and signs each request
/// with the ERPNext service account's token, so ERPNext secrets never leave the gateway.
#[derive(Parser)]
#[command(version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway until SIGTERM or SIGINT, then drain in-flight requests and exit.
    Run {
        /// The configuration file.
        #[arg(long, short, default_value = "gateway.yaml")]
        config: PathBuf,
    },
    /// Validate a configuration file; print every problem with its key path and line.
    ///
    /// Exits 0 when the file is valid, 1 when it is not.
    Check {
        /// The configuration file.
        file: PathBuf,
        /// Only the file: skip the checks that need this machine to be the one erpgate runs
        /// on (that the spool and event-store directories can be written). For validating a
        /// config meant for another machine or a container.
        #[arg(long)]
        config_only: bool,
        /// Also ask each site, as each service account, whether it is reachable, answers for
        /// the configured site name, accepts the credentials, and with which roles.
        #[arg(long)]
        sites: bool,
    },
    /// Make a new client credential: a key id, a secret for the client, and the
    /// `secret_sha256` to put in the config (the secret itself is never stored).
    Keygen {
        /// Prefix of the key id.
        #[arg(long, default_value = "ek_")]
        prefix: String,
    },
    /// Ask a running gateway's admin listener whether it is alive (`GET /healthz`); exits 0 if
    /// so, 1 if not. For container HEALTHCHECKs in images without curl.
    Health {
        /// The admin address.
        #[arg(long, default_value = "127.0.0.1:9090")]
        admin: std::net::SocketAddr,
    },
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Run { config } => run(config),
        Command::Health { admin } => health(admin),
        Command::Check {
            file,
            config_only,
            sites,
        } => check(&file, config_only, sites),
        Command::Keygen { prefix } => {
            keygen(&prefix);
            ExitCode::SUCCESS
        }
    }
}

/// `erpgate check`: the file, what each method rule grants, and (unless `config_only`) the
/// directories erpgate writes on this machine.
fn check(file: &Path, config_only: bool, sites: bool) -> ExitCode {
    use std::io::Write;
    let loaded = if config_only {
        Config::load(file)
    } else {
        Config::load_and_probe_leaving_nothing(file)
    };
    match loaded {
        Ok(loaded) => {
            // Written, not printed: `erpgate check ... | head` must not panic on a closed pipe.
            let mut out = std::io::stdout().lock();
            let _ = writeln!(
                out,
                "{}: OK ({} sites, {} routes, {} clients)",
                file.display(),
                loaded.config.sites.len(),
                loaded.config.routes.len(),
                loaded.config.clients.len()
            );
            for line in erpgate::config::grants::describe(&loaded.config) {
                let _ = writeln!(out, "  {line}");
            }
            if !sites {
                return ExitCode::SUCCESS;
            }
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let findings = runtime.block_on(erpgate::doctor::probe_sites(&loaded));
            for finding in &findings {
                let mark = if finding.failed { "FAIL" } else { "ok" };
                let _ = writeln!(out, "{mark}: {}", finding.line);
            }
            if findings.iter().any(|f| f.failed) {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}

fn keygen(prefix: &str) {
    let key_id = format!("{prefix}{:016x}", rand::random::<u64>());
    let secret =
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>());
    let hash = hex::encode(Sha256::digest(secret.as_bytes()));
    println!("# Give the client these two (the secret is shown only now):");
    println!("key_id: {key_id}");
    println!("secret: {secret}");
    println!("# The client sends:  Authorization: token {key_id}:<secret>");
    println!("# Put these in gateway.yaml under clients.<name>:");
    println!("    key_id: {key_id}");
    println!("    secret_sha256: \"{hash}\"");
}

/// `GET /healthz` over a plain TCP connection, answered within 3 s with a 200.
fn health(admin: std::net::SocketAddr) -> ExitCode {
    use std::io::{Read, Write};
    let timeout = Duration::from_secs(3);
    let answer = std::net::TcpStream::connect_timeout(&admin, timeout).and_then(|mut stream| {
        stream.set_read_timeout(Some(timeout))?;
        stream.write_all(b"GET /healthz HTTP/1.0\r\nHost: erpgate\r\n\r\n")?;
        let mut head = [0u8; 12];
        stream.read_exact(&mut head)?;
        Ok(head)
    });
    match answer {
        Ok(head) if head.starts_with(b"HTTP/1.") && &head[9..12] == b"200" => ExitCode::SUCCESS,
        Ok(_) => {
            eprintln!("{admin}: not healthy");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("{admin}: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(path: PathBuf) -> ExitCode {
    // Taken before the load: a change made while starting is then seen as a change.
    let loaded_digest = file_digest(&path);
    let loaded = match Config::load_and_probe(&path) {
        Ok(loaded) => loaded,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(&loaded.config.log.level));
    // Lines go to a buffer a writer thread drains to stdout: a worker never waits for a slow
    // log pipe, and when the buffer is full lines are dropped and counted
    // (`erpgate_log_lines_dropped_total`), never waited for. The guard flushes what is
    // buffered when `run` returns. The writer thread writes what it drained through a 64 KiB
    // buffer and flushes once the queue is empty: a write per batch of lines under load, not
    // one per line (stdout alone is line-buffered), and no line waits once the load stops.
    let (writer, _flush_on_exit) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .buffered_lines_limit(loaded.config.log.buffer_lines.max(1))
        .lossy(true)
        .finish(std::io::BufWriter::with_capacity(
            64 * 1024,
            std::io::stdout(),
        ));
    erpgate::metrics::count_dropped_log_lines(writer.error_counter());
    // Colour codes only for a person at a terminal: piped into a file or a log collector
    // they are noise in every line (the JSON format never writes any).
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stdout().is_terminal())
        .with_writer(writer);
    match loaded.config.log.format {
        LogFormat::Json => subscriber
            .event_format(erpgate::log_format::JsonLines)
            .init(),
        LogFormat::Pretty => subscriber.init(),
    }
    // This thread runs the admin listener, signals and reloads; the serving workers run their
    // own event loops (see `server`).
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let gateway = match RunningGateway::start(loaded).await {
            Ok(g) => g,
            Err(e) => {
                tracing::error!(error = %e, "cannot start");
                return ExitCode::FAILURE;
            }
        };
        serve_until_shutdown(&gateway, &path, loaded_digest).await;
        tracing::info!("shutdown requested");
        gateway.begin_shutdown();
        gateway.wait().await;
        tracing::info!("stopped");
        ExitCode::SUCCESS
    })
}

/// Serves until SIGTERM (Kubernetes) or SIGINT (Ctrl-C); meanwhile SIGHUP, and a change of the
/// config file when `reload.watch` is on, reload the configuration.
async fn serve_until_shutdown(
    gateway: &RunningGateway,
    path: &Path,
    loaded_digest: Option<[u8; 32]>,
) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut hup)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::hangup()),
        ) else {
            tracing::error!("cannot install signal handlers; stopping on Ctrl-C only");
            let _ = tokio::signal::ctrl_c().await;
            return;
        };
        let mut seen = loaded_digest;
        loop {
            // The interval follows the configuration in force; off, the file is not read.
            let watch = gateway.watch_interval();
            let tick = tokio::time::sleep(watch.unwrap_or(Duration::from_secs(3600)));
            tokio::select! {
                _ = term.recv() => return,
                _ = tokio::signal::ctrl_c() => return,
                _ = hup.recv() => {
                    tracing::info!("SIGHUP: reloading the configuration");
                    gateway.reload_file(path).await;
                    seen = file_digest(path);
                }
                _ = tick, if watch.is_some() => {
                    let now = file_digest(path);
                    if now != seen {
                        tracing::info!("configuration file changed: reloading");
                        gateway.reload_file(path).await;
                        seen = now;
                    }
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// A digest of the file's content (`None` while it cannot be read).
fn file_digest(path: &Path) -> Option<[u8; 32]> {
    std::fs::read(path)
        .ok()
        .map(|bytes| Sha256::digest(&bytes).into())
}
