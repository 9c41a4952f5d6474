//! State the replicas of one deployment share, kept in Redis: GCRA quotas ([`gcra`]),
//! `Idempotency-Key` claims and outcomes ([`records`]), and the messages that carry cache
//! invalidations and auth-failure blocks to every replica ([`messages`]).
//!
//! Redis is never allowed to take the gateway down with it. Every command has the configured
//! command timeout; the first failure marks Redis *down* (logged once at `warn`, the
//! `erpgate_redis_up` gauge at 0) and from then on requests decide on the replica's own state
//! without waiting for Redis at all, until a background ping finds it again (every 500 ms) and
//! shared mode comes back by itself. What each decision does while Redis is down is the caller's
//! (quotas: the local limiter; keyed writes: 503 or unprotected; cache: bypass).
//!
//! A Redis that restarts comes back empty unless it persists its data: quota windows start
//! over, and `Idempotency-Key` records and events stored there are gone. Nothing in the
//! commands' answers says so, so on every connect and reconnect the server's `run_id` (a new
//! one per start) is read and compared with the last one seen: a change is logged at `warn`
//! with what was lost and counted in `erpgate_redis_restarts_total`.
//!
//! A serving worker runs its commands on a multiplexed connection of its own, opened on its
//! own event loop, so a command never crosses to another thread's connection task (the shared
//! connection manager serves until it is open, and everything off the workers). Each time
//! Redis comes back, workers open new ones.
//!
//! This module knows Redis and nothing of the layers: they call it, and what must hear other
//! replicas' messages registers as a [`Listener`].

pub mod gcra;
pub mod lease;
pub mod messages;
pub mod records;

use std::cell::RefCell;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use arc_swap::{ArcSwap, ArcSwapOption};
use redis::aio::{
    ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection,
};
use redis::{
    AsyncConnectionConfig, Cmd, IntoConnectionInfo, Pipeline, RedisFuture, RedisResult, Value,
};
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;

use crate::config::{LoadedConfig, SharedStateConfig, WhenUnavailable};
use crate::metrics::RedisMetrics;
pub use messages::{Listener, Message};

/// How often a replica that lost Redis looks for it again.
const PROBE_INTERVAL: Duration = Duration::from_millis(500);
/// Messages waiting to be published; more make one "invalidate everything" instead.
const OUTBOX: usize = 4096;

/// Redis could not answer in time: decide without it.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("shared state unavailable")]
pub struct Unavailable;

/// The connection to the shared state and what depends on its health.
pub struct SharedState {
    client: redis::Client,
    connection: ArcSwapOption<ConnectionManager>,
    /// Tells this state's connections on the serving workers apart from another state's.
    id: u64,
    /// Bumped each time Redis comes back: workers then open new connections of their own.
    generation: AtomicU64,
    prefix: String,
    channel: String,
    connect_timeout: Duration,
    command_timeout: Duration,
    up: AtomicBool,
    /// True while this replica hears every message: cached answers are safe to serve.
    subscribed: AtomicBool,
    /// Wakes the subscriber when a command finds Redis gone, so it resubscribes.
    lost: Arc<Notify>,
    /// This replica's id, so it ignores its own messages.
    replica: String,
    when_unavailable: WhenUnavailable,
    readyz_requires_redis: bool,
    quota_batch: u32,
    metrics: RedisMetrics,
    outbox: mpsc::Sender<Message>,
    outbox_overflowed: AtomicBool,
    listeners: ArcSwap<Vec<Weak<dyn Listener>>>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    /// The Redis server's `run_id` when last read: another one means it restarted meanwhile.
    run_id: Mutex<Option<String>>,
}

impl std::fmt::Debug for SharedState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedState")
            .field("prefix", &self.prefix)
            .field("up", &self.up)
            .field("subscribed", &self.subscribed)
            .finish_non_exhaustive()
    }
}

impl Drop for SharedState {
    fn drop(&mut self) {
        if let Ok(tasks) = self.tasks.get_mut() {
            for task in tasks.drain(..) {
                task.abort();
            }
        }
    }
}

/// Why the shared state could not be set up from a validated config.
#[derive(Debug, thiserror::Error)]
#[error("shared_state.redis: {0}")]
pub struct SetupError(String);

impl SharedState {
    /// Connects in the background (the gateway starts whether Redis is there or not) and
    /// starts the health probe, the publisher and the subscriber. Must run inside a Tokio
    /// runtime that lives as long as the gateway.
    pub fn start(
        shared: &SharedStateConfig,
        loaded: &LoadedConfig,
        metrics: RedisMetrics,
    ) -> Result<Arc<Self>, SetupError> {
        let config = &shared.redis;
        let mut info = config
            .url
            .0
            .as_str()
            .into_connection_info()
            .map_err(|e| SetupError(format!("url: {e}")))?;
        let mut settings = info.redis_settings().clone();
        if let Some(user) = &config.username {
            settings = settings.set_username(&user.0);
        }
        if let Some(password) = &loaded.redis_password {
            settings = settings.set_password(&password.0);
        }
        info = info.set_redis_settings(settings);
        let client = redis::Client::open(info).map_err(|e| SetupError(e.to_string()))?;
        let (outbox, outgoing) = mpsc::channel(OUTBOX);
        let replica = format!("{:016x}", rand::random::<u64>());
        metrics.up.set(0);
        let state = Arc::new(Self {
            client,
            connection: ArcSwapOption::empty(),
            id: rand::random(),
            generation: AtomicU64::new(0),
            prefix: config.key_prefix.clone(),
            channel: format!("{}events", config.key_prefix),
            connect_timeout: config.connect_timeout,
            command_timeout: config.command_timeout,
            up: AtomicBool::new(false),
            subscribed: AtomicBool::new(false),
            lost: Arc::new(Notify::new()),
            replica,
            when_unavailable: config.idempotency_when_unavailable,
            readyz_requires_redis: config.readyz_requires_redis,
            quota_batch: shared.quota_batch,
            metrics,
            outbox,
            outbox_overflowed: AtomicBool::new(false),
            listeners: ArcSwap::from_pointee(Vec::new()),
            tasks: Mutex::new(Vec::new()),
            run_id: Mutex::new(None),
        });
        let weak = Arc::downgrade(&state);
        let tasks = vec![
            tokio::spawn(probe(weak.clone())),
            tokio::spawn(messages::publish(weak.clone(), outgoing)),
            tokio::spawn(messages::subscribe(weak)),
        ];
        if let Ok(mut held) = state.tasks.lock() {
            *held = tasks;
        }
        Ok(state)
    }

    /// `name` under this deployment's prefix.
    pub fn key(&self, name: &str) -> String {
        let mut key = String::with_capacity(self.prefix.len() + name.len());
        key.push_str(&self.prefix);
        key.push_str(name);
        key
    }

    /// This replica's id among the deployment's (random per start).
    pub fn replica(&self) -> &str {
        &self.replica
    }

    /// Whether Redis answered the last command (requests then use it).
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    /// Whether this replica hears every other replica's invalidations now.
    pub fn in_sync(&self) -> bool {
        self.subscribed.load(Ordering::Acquire)
    }

    /// What keyed writes get while Redis is down.
    pub fn when_unavailable(&self) -> WhenUnavailable {
        self.when_unavailable
    }

    /// Whether `/readyz` follows Redis.
    pub fn readyz_requires_redis(&self) -> bool {
        self.readyz_requires_redis
    }

    /// The most requests a replica takes from one shared quota per round trip (1: exact).
    pub fn quota_batch(&self) -> u32 {
        self.quota_batch
    }

    /// Counts a decision made without Redis.
    pub fn count_fallback(&self, what: &str) {
        self.metrics.fallbacks.with_label_values(&[what]).inc();
    }

    /// Replaces who hears other replicas' messages (a reload builds new ones).
    pub fn set_listeners(&self, listeners: Vec<Weak<dyn Listener>>) {
        self.listeners.store(Arc::new(listeners));
    }

    /// This worker's own connection, when it runs its own event loop and has one; otherwise
    /// starts opening it there (the request meanwhile uses the shared one).
    fn own_connection(&self) -> Option<MultiplexedConnection> {
        let generation = self.generation.load(Ordering::Acquire);
        OWN.with(|own| {
            let mut own = own.borrow_mut();
            // Only a serving worker's thread ever fills its slot: a match needs no more checks.
            if let Some(o) = own
                .as_ref()
                .filter(|o| (o.state, o.generation) == (self.id, generation))
            {
                return o.connection.clone();
            }
            let runtime = tokio::runtime::Handle::try_current().ok()?;
            if runtime.runtime_flavor() != tokio::runtime::RuntimeFlavor::CurrentThread {
                return None;
            }
            *own = Some(OwnConnection {
                state: self.id,
                generation,
                connection: None,
            });
            let client = self.client.clone();
            let config = AsyncConnectionConfig::new()
                .set_connection_timeout(Some(self.connect_timeout))
                .set_response_timeout(Some(self.command_timeout));
            let state = self.id;
            // On a current-thread runtime the task runs on this thread: it fills this slot.
            runtime.spawn(async move {
                if let Ok(connection) = client
                    .get_multiplexed_async_connection_with_config(&config)
                    .await
                {
                    OWN.with(|own| {
                        if let Some(o) = own
                            .borrow_mut()
                            .as_mut()
                            .filter(|o| (o.state, o.generation) == (state, generation))
                        {
                            o.connection = Some(connection);
                        }
                    });
                }
            });
            None
        })
    }

    /// Runs one command under the command timeout; a timeout or a lost connection marks Redis
    /// down.
    pub async fn run<T, F>(
        &self,
        command: &'static str,
        call: impl FnOnce(Connection) -> F,
    ) -> Result<T, Unavailable>
    where
        F: Future<Output = RedisResult<T>>,
    {
        if !self.is_up() {
            return Err(Unavailable);
        }
        let connection = match self.own_connection() {
            Some(own) => Connection::Own(own),
            None => match self.connection.load_full() {
                Some(shared) => Connection::Shared(ConnectionManager::clone(&shared)),
                None => return Err(Unavailable),
            },
        };
        let started = Instant::now();
        let result = tokio::time::timeout(self.command_timeout, call(connection)).await;
        self.metrics
            .command_duration
            .with_label_values(&[command])
            .observe(started.elapsed().as_secs_f64());
        match result {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => {
                self.metrics.errors.with_label_values(&[command]).inc();
                // Only a lost or refused connection means Redis is gone; an error reply (a
                // command a request's input made invalid, a script error) fails that command
                // alone, or a client could take shared mode down by sending bad input.
                if e.is_io_error()
                    || e.is_connection_dropped()
                    || e.is_connection_refusal()
                    || e.is_timeout()
                    || e.is_unrecoverable_error()
                {
                    self.mark_down(command, &e.to_string());
                } else {
                    tracing::debug!(command, error = %e, "shared state: command refused");
                }
                Err(Unavailable)
            }
            Err(_) => {
                self.metrics.errors.with_label_values(&[command]).inc();
                self.mark_down(command, "timed out");
                Err(Unavailable)
            }
        }
    }

    fn mark_down(&self, command: &str, error: &str) {
        if self.up.swap(false, Ordering::AcqRel) {
            self.metrics.up.set(0);
            tracing::warn!(
                command,
                error,
                "shared state: Redis unavailable; quotas are per replica, keyed writes follow \
                 idempotency_when_unavailable, the cache is bypassed until Redis is back"
            );
        }
        self.lost.notify_waiters();
    }

    fn mark_up(&self) {
        if !self.up.swap(true, Ordering::AcqRel) {
            self.generation.fetch_add(1, Ordering::AcqRel);
            self.metrics.up.set(1);
            // Healthy is not news: `warn` is kept for what an operator must act on.
            tracing::info!("shared state: Redis reachable; quotas and records are shared");
        }
    }

    /// Notes which Redis server answered `INFO` (its `run_id`, and whether it keeps an
    /// append-only file): another `run_id` than the last one seen is a restart.
    fn note_server(&self, info: &redis::InfoDict) {
        let Some(run_id) = info.get::<String>("run_id") else {
            return;
        };
        let append_only = info.get::<i64>("aof_enabled") == Some(1);
        let Ok(mut last) = self.run_id.lock() else {
            return;
        };
        match last.as_deref() {
            Some(known) if known == run_id => {}
            Some(known) => {
                self.metrics.restarts.inc();
                tracing::warn!(
                    previous_run_id = known,
                    run_id = %run_id,
                    append_only,
                    "shared state: Redis restarted; what it did not persist is gone: quota \
                     windows and auth-failure counts start over, Idempotency-Key records are \
                     lost (a repeated keyed write runs again), and so are the events stored in \
                     Redis (feed and pending deliveries)"
                );
                *last = Some(run_id);
            }
            None => {
                tracing::info!(run_id = %run_id, append_only, "shared state: connected to Redis");
                *last = Some(run_id);
            }
        }
    }

    /// Reads `INFO` on the connection commands use, while Redis is up: the subscription was
    /// (re)made, and the server behind it may be another since the last read. Through
    /// [`Self::run`], so a dead connection marks Redis down, and the probe reads it once Redis
    /// is back.
    pub(crate) async fn check_server(&self) {
        let info = self
            .run("info", |mut connection| async move {
                redis::cmd("INFO")
                    .query_async::<redis::InfoDict>(&mut connection)
                    .await
            })
            .await;
        if let Ok(info) = info {
            self.note_server(&info);
        }
    }

    /// Queues `message` for every other replica; never waits.
    pub fn broadcast(&self, message: Message) {
        if self.outbox.try_send(message).is_err() {
            // Too many to keep: the publisher sends "everything is invalid" instead, which
            // covers whatever was dropped.
            self.outbox_overflowed.store(true, Ordering::Release);
        }
    }
}

/// One serving worker's own connection to one shared state (a worker runs one event loop on
/// one thread, so its commands never cross to another thread's connection task).
struct OwnConnection {
    state: u64,
    generation: u64,
    /// None while it is being opened.
    connection: Option<MultiplexedConnection>,
}

thread_local! {
    static OWN: RefCell<Option<OwnConnection>> = const { RefCell::new(None) };
}

/// The connection one command runs on.
pub enum Connection {
    /// The shared connection manager (reconnects by itself).
    Shared(ConnectionManager),
    /// The serving worker's own.
    Own(MultiplexedConnection),
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Shared(c) => c.req_packed_command(cmd),
            Self::Own(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Shared(c) => c.req_packed_commands(pipeline, offset, count),
            Self::Own(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Shared(c) => c.get_db(),
            Self::Own(c) => c.get_db(),
        }
    }
}

/// Connects, then checks Redis while it is down and brings shared mode back when it answers.
async fn probe(state: Weak<SharedState>) {
    loop {
        let Some(shared) = state.upgrade() else {
            return;
        };
        if !shared.is_up() {
            if shared.connection.load().is_none() {
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(shared.connect_timeout))
                    .set_response_timeout(Some(shared.command_timeout))
                    .set_number_of_retries(1)
                    .set_max_delay(PROBE_INTERVAL);
                let client = shared.client.clone();
                let connecting = client.get_connection_manager_with_config(config);
                match tokio::time::timeout(shared.connect_timeout * 2, connecting).await {
                    Ok(Ok(connection)) => shared.connection.store(Some(Arc::new(connection))),
                    Ok(Err(e)) => tracing::debug!(error = %e, "shared state: connecting"),
                    Err(_) => tracing::debug!("shared state: connecting timed out"),
                }
            }
            if let Some(connection) = shared.connection.load_full() {
                let mut connection = ConnectionManager::clone(&connection);
                let command = redis::cmd("PING");
                let ping = command.query_async::<String>(&mut connection);
                if let Ok(Ok(_)) = tokio::time::timeout(shared.command_timeout, ping).await {
                    // Read before requests use it again, so a restart is reported before its
                    // effects show. A server that refuses INFO (an ACL without @dangerous) is
                    // used all the same: only its restarts go unnoticed.
                    let info = redis::cmd("INFO");
                    let info = info.query_async::<redis::InfoDict>(&mut connection);
                    match tokio::time::timeout(shared.command_timeout, info).await {
                        Ok(Ok(info)) => shared.note_server(&info),
                        Ok(Err(e)) => tracing::info!(
                            error = %e,
                            "shared state: Redis refused INFO; its restarts cannot be noticed"
                        ),
                        Err(_) => {}
                    }
                    shared.mark_up();
                }
            }
        }
        drop(shared);
        tokio::time::sleep(PROBE_INTERVAL).await;
    }
}
