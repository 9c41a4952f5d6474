//! The shared event store: Redis Streams, so the replicas of one deployment share the work.
//!
//! - `<prefix>ev:feed`: every accepted event (the pull feed; its ids are the cursors).
//! - `<prefix>ev:q:<client/subscription>`: deliveries to make, read through the consumer group
//!   `relay` (each replica a consumer): Redis hands each entry to one replica only, so under
//!   normal operation each event is delivered once per subscription. An entry a replica took
//!   and never settled (it died) is claimed by another once it has been idle longer than any
//!   live delivery can take (twice the subscription's timeout, plus 5 s).
//! - `<prefix>ev:retry:<sub>`: failed deliveries waiting for their next attempt, scored by its
//!   time; when due they go back into the stream, atomically.
//! - `<prefix>ev:dead:<sub>`: dead letters by event id.
//!
//! Every change is one command or one Lua script, so a crash never leaves a delivery in two
//! places or none. Durability is Redis's: run it with `appendonly yes` (README "Events").
//! Ordering per document holds while deliveries succeed; a retried delivery goes behind
//! later ones (ordering "where possible", as the issue allows).

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use redis::streams::{
    StreamAutoClaimReply, StreamId, StreamRangeReply, StreamReadOptions, StreamReadReply,
};

use super::store::{
    Backlog, DeadLetter, Delivery, Event, EventStore, FeedEntry, FeedPage, StoreError,
};
use crate::shared_state::SharedState;

/// The consumer group every replica reads through.
const GROUP: &str = "relay";

/// Appends to the feed and to each subscription's stream, dropping the oldest beyond the cap.
/// KEYS: feed, then per subscription its stream and its retry set. ARGV: event JSON, cap.
static APPEND: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
local id = redis.call('XADD', KEYS[1], '*', 'e', ARGV[1])
local cap = tonumber(ARGV[2])
local dropped = {}
for i = 2, #KEYS, 2 do
  local queue, retry = KEYS[i], KEYS[i + 1]
  redis.pcall('XGROUP', 'CREATE', queue, 'relay', '0', 'MKSTREAM')
  local n = 0
  while redis.call('XLEN', queue) + redis.call('ZCARD', retry) >= cap do
    local oldest = redis.call('XRANGE', queue, '-', '+', 'COUNT', 1)
    if #oldest > 0 then
      redis.call('XACK', queue, 'relay', oldest[1][1])
      redis.call('XDEL', queue, oldest[1][1])
    else
      redis.call('ZPOPMIN', retry)
    end
    n = n + 1
  end
  redis.call('XADD', queue, '*', 'id', id, 'a', '0', 'e', ARGV[1])
  dropped[#dropped + 1] = n
end
return {id, dropped}
",
    )
});

/// Moves due retries back into the stream. KEYS: stream, retry set. ARGV: now (ms), max.
/// A retry member is `<event id>\n<attempts>\n<event JSON>`.
static PUMP: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, m in ipairs(due) do
  local a = string.find(m, '\n', 1, true)
  local b = string.find(m, '\n', a + 1, true)
  redis.call('ZREM', KEYS[2], m)
  redis.call('XADD', KEYS[1], '*', 'id', string.sub(m, 1, a - 1),
    'a', string.sub(m, a + 1, b - 1), 'e', string.sub(m, b + 1))
end
return #due
",
    )
});

/// Acknowledges a stream entry and files it elsewhere: `retry` (ZADD) or `dead` (HSET).
/// KEYS: stream, target. ARGV: entry id, 'retry'|'dead'|'done', score or field, member/value.
static SETTLE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
local acked = redis.call('XACK', KEYS[1], 'relay', ARGV[1])
redis.call('XDEL', KEYS[1], ARGV[1])
if acked == 0 then return 0 end
if ARGV[2] == 'retry' then
  redis.call('ZADD', KEYS[2], ARGV[3], ARGV[4])
elseif ARGV[2] == 'dead' then
  redis.call('HSET', KEYS[2], ARGV[3], ARGV[4])
end
return 1
",
    )
});

/// Everything still to deliver becomes a dead letter. KEYS: stream, retry set, dead hash.
/// ARGV: reason (JSON string), now (ms).
static BURY_ALL: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r#"
local n = 0
local function bury(id, a, e)
  redis.call('HSET', KEYS[3], id, '{"attempts":' .. a .. ',"reason":' .. ARGV[1] ..
    ',"dead_ms":' .. ARGV[2] .. ',"event":' .. e .. '}')
  n = n + 1
end
for _, entry in ipairs(redis.call('XRANGE', KEYS[1], '-', '+')) do
  local f = {}
  for i = 1, #entry[2], 2 do f[entry[2][i]] = entry[2][i + 1] end
  bury(f['id'], f['a'], f['e'])
  redis.call('XACK', KEYS[1], 'relay', entry[1])
  redis.call('XDEL', KEYS[1], entry[1])
end
for _, m in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
  local a = string.find(m, '\n', 1, true)
  local b = string.find(m, '\n', a + 1, true)
  bury(string.sub(m, 1, a - 1), string.sub(m, a + 1, b - 1), string.sub(m, b + 1))
end
redis.call('DEL', KEYS[2])
return n
"#,
    )
});

/// A dead letter back into the stream. KEYS: dead hash, stream. ARGV: event id.
static REPLAY: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r#"
local letter = redis.call('HGET', KEYS[1], ARGV[1])
if not letter then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.pcall('XGROUP', 'CREATE', KEYS[2], 'relay', '0', 'MKSTREAM')
local e = string.match(letter, ',"event":(.*)}$')
redis.call('XADD', KEYS[2], '*', 'id', ARGV[1], 'a', '0', 'e', e)
return 1
"#,
    )
});

/// The shared store.
pub struct RedisStore {
    state: Arc<SharedState>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RedisStore")
    }
}

fn unavailable<E>(_: E) -> StoreError {
    StoreError("Redis unavailable".into())
}

#[derive(serde::Deserialize)]
struct DeadRecord {
    attempts: u32,
    reason: String,
    dead_ms: u64,
    event: Event,
}

impl RedisStore {
    /// A store in `state`'s Redis.
    pub fn new(state: Arc<SharedState>) -> Self {
        Self { state }
    }

    fn feed_key(&self) -> String {
        self.state.key("ev:feed")
    }

    fn queue_key(&self, subscription: &str) -> String {
        self.state.key(&format!("ev:q:{subscription}"))
    }

    fn retry_key(&self, subscription: &str) -> String {
        self.state.key(&format!("ev:retry:{subscription}"))
    }

    fn dead_key(&self, subscription: &str) -> String {
        self.state.key(&format!("ev:dead:{subscription}"))
    }

    async fn query<T: redis::FromRedisValue>(
        &self,
        name: &'static str,
        command: redis::Cmd,
    ) -> Result<T, StoreError> {
        self.state
            .run(name, |mut connection| async move {
                command.query_async::<T>(&mut connection).await
            })
            .await
            .map_err(unavailable)
    }

    fn delivery(entry: &StreamId) -> Option<Delivery> {
        let event: String = entry.get("e")?;
        let event: Event = serde_json::from_str(&event).ok()?;
        Some(Delivery {
            event_id: entry.get("id")?,
            event: Arc::new(event),
            attempts: entry.get::<String>("a")?.parse().ok()?,
            handle: entry.id.clone(),
        })
    }

    async fn settle(
        &self,
        subscription: &str,
        delivery: &Delivery,
        action: &'static str,
        target: String,
        (score_or_field, value): (String, Vec<u8>),
    ) -> Result<(), StoreError> {
        let queue = self.queue_key(subscription);
        self.state
            .run("events_settle", |mut connection| async move {
                SETTLE
                    .key(&queue)
                    .key(&target)
                    .arg(&delivery.handle)
                    .arg(action)
                    .arg(&score_or_field)
                    .arg(&value)
                    .invoke_async::<i64>(&mut connection)
                    .await
            })
            .await
            .map_err(unavailable)?;
        Ok(())
    }
}

#[async_trait::async_trait]
impl EventStore for RedisStore {
    async fn append(
        &self,
        event: &Event,
        subscriptions: &[String],
        max_pending: u64,
    ) -> Result<(String, Vec<u64>), StoreError> {
        let json = serde_json::to_vec(event).map_err(StoreError::from)?;
        let mut keys = vec![self.feed_key()];
        for subscription in subscriptions {
            keys.push(self.queue_key(subscription));
            keys.push(self.retry_key(subscription));
        }
        let (id, dropped): (String, Vec<u64>) = self
            .state
            .run("events_append", |mut connection| async move {
                let mut invocation = APPEND.prepare_invoke();
                for key in &keys {
                    invocation.key(key);
                }
                invocation
                    .arg(&json)
                    .arg(max_pending)
                    .invoke_async(&mut connection)
                    .await
            })
            .await
            .map_err(unavailable)?;
        Ok((id, dropped))
    }

    async fn due(
        &self,
        subscription: &str,
        now_ms: u64,
        max: usize,
        claim_after: Duration,
    ) -> Result<Vec<Delivery>, StoreError> {
        let queue = self.queue_key(subscription);
        let retry = self.retry_key(subscription);
        let (q, r) = (&queue, &retry);
        self.state
            .run("events_pump", |mut connection| async move {
                PUMP.key(q)
                    .key(r)
                    .arg(now_ms)
                    .arg(max)
                    .invoke_async::<i64>(&mut connection)
                    .await
            })
            .await
            .map_err(unavailable)?;
        let mut group = redis::cmd("XGROUP");
        group
            .arg("CREATE")
            .arg(&queue)
            .arg(GROUP)
            .arg("0")
            .arg("MKSTREAM");
        // Exists already, mostly: BUSYGROUP is the expected answer, not a failure.
        let _ = self
            .state
            .run("events_group", |mut connection| async move {
                Ok(group
                    .query_async::<redis::Value>(&mut connection)
                    .await
                    .is_ok())
            })
            .await;
        let consumer = self.state.replica().to_owned();
        let mut deliveries = Vec::new();
        // Entries a replica took and never settled (it died): after stale_after, ours.
        let mut claim = redis::cmd("XAUTOCLAIM");
        claim
            .arg(&queue)
            .arg(GROUP)
            .arg(&consumer)
            .arg(u64::try_from(claim_after.as_millis()).unwrap_or(u64::MAX))
            .arg("0-0")
            .arg("COUNT")
            .arg(max);
        let claimed: StreamAutoClaimReply = self.query("events_claim", claim).await?;
        deliveries.extend(claimed.claimed.iter().filter_map(Self::delivery));
        if deliveries.len() < max {
            let options = StreamReadOptions::default()
                .group(GROUP, &consumer)
                .count(max - deliveries.len());
            let mut read = redis::cmd("XREADGROUP");
            read.arg(&options).arg("STREAMS").arg(&queue).arg(">");
            let reply: Option<StreamReadReply> = self.query("events_read", read).await?;
            for key in reply.map(|r| r.keys).unwrap_or_default() {
                deliveries.extend(key.ids.iter().filter_map(Self::delivery));
            }
        }
        Ok(deliveries)
    }

    async fn delivered(&self, subscription: &str, delivery: &Delivery) -> Result<(), StoreError> {
        let queue = self.queue_key(subscription);
        self.settle(
            subscription,
            delivery,
            "done",
            queue,
            (String::new(), Vec::new()),
        )
        .await
    }

    async fn retry_at(
        &self,
        subscription: &str,
        delivery: &Delivery,
        at_ms: u64,
    ) -> Result<(), StoreError> {
        let mut member = format!("{}\n{}\n", delivery.event_id, delivery.attempts + 1).into_bytes();
        serde_json::to_writer(&mut member, &*delivery.event).map_err(StoreError::from)?;
        let retry = self.retry_key(subscription);
        self.settle(
            subscription,
            delivery,
            "retry",
            retry,
            (at_ms.to_string(), member),
        )
        .await
    }

    async fn bury(
        &self,
        subscription: &str,
        delivery: &Delivery,
        reason: &str,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        let value = serde_json::json!({
            "attempts": delivery.attempts + 1,
            "reason": reason,
            "dead_ms": now_ms,
            "event": &*delivery.event,
        });
        let value = serde_json::to_vec(&value).map_err(StoreError::from)?;
        let dead = self.dead_key(subscription);
        self.settle(
            subscription,
            delivery,
            "dead",
            dead,
            (delivery.event_id.clone(), value),
        )
        .await
    }

    async fn bury_all(
        &self,
        subscription: &str,
        reason: &str,
        now_ms: u64,
    ) -> Result<u64, StoreError> {
        let keys = [
            self.queue_key(subscription),
            self.retry_key(subscription),
            self.dead_key(subscription),
        ];
        let reason = serde_json::to_string(reason).map_err(StoreError::from)?;
        self.state
            .run("events_bury_all", |mut connection| async move {
                BURY_ALL
                    .key(&keys[0])
                    .key(&keys[1])
                    .key(&keys[2])
                    .arg(&reason)
                    .arg(now_ms)
                    .invoke_async::<u64>(&mut connection)
                    .await
            })
            .await
            .map_err(unavailable)
    }

    async fn dead_letters(
        &self,
        subscriptions: &[String],
        max: usize,
    ) -> Result<Vec<DeadLetter>, StoreError> {
        let mut letters = Vec::new();
        for subscription in subscriptions {
            let mut all = redis::cmd("HGETALL");
            all.arg(self.dead_key(subscription));
            let entries: Vec<(String, Vec<u8>)> = self.query("events_dead", all).await?;
            for (event_id, value) in entries {
                let Ok(record) = serde_json::from_slice::<DeadRecord>(&value) else {
                    continue;
                };
                letters.push(DeadLetter {
                    subscription: subscription.clone(),
                    event_id,
                    attempts: record.attempts,
                    reason: record.reason,
                    dead_ms: record.dead_ms,
                    event: Arc::new(record.event),
                });
            }
        }
        letters.sort_by_key(|l| l.dead_ms);
        letters.truncate(max);
        Ok(letters)
    }

    async fn replay(
        &self,
        subscriptions: &[String],
        event_id: Option<&str>,
    ) -> Result<u64, StoreError> {
        let mut replayed = 0;
        for subscription in subscriptions {
            let dead = self.dead_key(subscription);
            let ids: Vec<String> = match event_id {
                Some(id) => vec![id.to_owned()],
                None => {
                    let mut keys = redis::cmd("HKEYS");
                    keys.arg(&dead);
                    self.query("events_dead", keys).await?
                }
            };
            let queue = self.queue_key(subscription);
            for id in ids {
                let (dead, queue) = (&dead, &queue);
                replayed += self
                    .state
                    .run("events_replay", |mut connection| async move {
                        REPLAY
                            .key(dead)
                            .key(queue)
                            .arg(&id)
                            .invoke_async::<u64>(&mut connection)
                            .await
                    })
                    .await
                    .map_err(unavailable)?;
            }
        }
        Ok(replayed)
    }

    async fn feed(&self, after: Option<&str>, max: usize) -> Result<FeedPage, StoreError> {
        let start = after.map_or_else(|| "-".to_owned(), |a| format!("({a}"));
        let mut range = redis::cmd("XRANGE");
        range
            .arg(self.feed_key())
            .arg(start)
            .arg("+")
            .arg("COUNT")
            .arg(max);
        let reply: StreamRangeReply = self.query("events_feed", range).await?;
        let mut page = FeedPage::default();
        for entry in &reply.ids {
            page.last = Some(entry.id.clone());
            let Some(event) = entry
                .get::<String>("e")
                .and_then(|e| serde_json::from_str::<Event>(&e).ok())
            else {
                continue;
            };
            page.entries.push(FeedEntry {
                id: entry.id.clone(),
                event: Arc::new(event),
            });
        }
        Ok(page)
    }

    async fn tip(&self) -> Result<String, StoreError> {
        let mut last = redis::cmd("XREVRANGE");
        last.arg(self.feed_key())
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1);
        let reply: StreamRangeReply = self.query("events_feed", last).await?;
        Ok(reply
            .ids
            .first()
            .map_or_else(|| "0-0".to_owned(), |e| e.id.clone()))
    }

    fn valid_cursor(&self, cursor: &str) -> bool {
        cursor
            .split_once('-')
            .is_some_and(|(ms, seq)| ms.parse::<u64>().is_ok() && seq.parse::<u64>().is_ok())
    }

    async fn backlog(&self, subscription: &str) -> Result<Backlog, StoreError> {
        let mut pipe = redis::pipe();
        pipe.cmd("XLEN")
            .arg(self.queue_key(subscription))
            .cmd("ZCARD")
            .arg(self.retry_key(subscription))
            .cmd("HLEN")
            .arg(self.dead_key(subscription))
            .cmd("XRANGE")
            .arg(self.queue_key(subscription))
            .arg("-")
            .arg("+")
            .arg("COUNT")
            .arg(1)
            .cmd("ZRANGE")
            .arg(self.retry_key(subscription))
            .arg(0)
            .arg(31);
        let (queued, retrying, dead, first, retries): (
            u64,
            u64,
            u64,
            StreamRangeReply,
            Vec<Vec<u8>>,
        ) = self
            .state
            .run("events_backlog", |mut connection| async move {
                pipe.query_async(&mut connection).await
            })
            .await
            .map_err(unavailable)?;
        let first = first.ids.first().and_then(Self::delivery);
        let retried = retries.iter().filter_map(|m| {
            let json = m.splitn(3, |b| *b == b'\n').nth(2)?;
            serde_json::from_slice::<Event>(json).ok()
        });
        let oldest = first
            .map(|d| d.event.received_ms)
            .into_iter()
            .chain(retried.map(|e| e.received_ms))
            .min();
        Ok(Backlog {
            pending: queued + retrying,
            oldest_ms: oldest,
            dead,
        })
    }

    async fn trim_feed(&self, before_ms: u64, max_events: u64) -> Result<u64, StoreError> {
        let mut by_age = redis::cmd("XTRIM");
        by_age
            .arg(self.feed_key())
            .arg("MINID")
            .arg(format!("{before_ms}-0"));
        let mut by_count = redis::cmd("XTRIM");
        by_count.arg(self.feed_key()).arg("MAXLEN").arg(max_events);
        let aged: u64 = self.query("events_trim", by_age).await?;
        let counted: u64 = self.query("events_trim", by_count).await?;
        Ok(aged + counted)
    }
}
