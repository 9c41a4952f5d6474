//! The shared event store: Redis Streams, so the replicas of one deployment share the work.
//!
//! - `<prefix>ev:feed`: every accepted event (the pull feed; its ids are the cursors).
//! - `<prefix>ev:q:<client/subscription>`: deliveries not yet attempted, in arrival order, read
//!   through the consumer group `relay` (each replica a consumer): Redis hands each entry to one
//!   replica only, so under normal operation each event is delivered once per subscription. An
//!   entry a replica took and never settled (it died) is claimed by another once it has been
//!   idle longer than any live delivery can take (twice the subscription's timeout, plus 5 s).
//! - `<prefix>ev:retry:<sub>`: deliveries that failed, scored by the time of their next attempt;
//!   a replica takes a due one by pushing its score past that same claim delay (a lease), so
//!   again one replica at a time, and a dead one's lease runs out. `<prefix>ev:age:<sub>` holds
//!   the same members scored by the event's arrival, so the cap finds the oldest at once.
//! - `<prefix>ev:dead:<sub>` and `<prefix>ev:deadev:<sub>`: dead letters by event id (why
//!   and when; the event itself).
//!
//! Every change is one command or one Lua script, so a crash never leaves a delivery in two
//! places or none. Replicas take one delivery at a time, so a taken one is never left waiting
//! behind others long enough to be claimed again. Durability is Redis's: run it with
//! `appendonly yes` (README "Events"). Ordering per document holds while deliveries succeed; a
//! retried delivery goes after later ones (ordering "where possible", as the issue allows).

use std::collections::HashMap;
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

/// A handle on a delivery taken from the stream is `s<entry id>`; from the retry set,
/// `r<member>`, the member being `<event id>\n<attempts>\n<event JSON>`.
const FROM_STREAM: char = 's';
const FROM_RETRIES: char = 'r';

/// Appends to the feed and to each subscription's stream; beyond the cap, drops the oldest
/// event (of the stream's first entry and the retry set's oldest, by event id).
/// KEYS: feed, then per subscription its stream, retry set and age set. ARGV: event JSON, cap.
static APPEND: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
local function older(a, b)
  local am, as = string.match(a, '^(%d+)-(%d+)$')
  local bm, bs = string.match(b, '^(%d+)-(%d+)$')
  am, as, bm, bs = tonumber(am), tonumber(as), tonumber(bm), tonumber(bs)
  return am < bm or (am == bm and as < bs)
end
local id = redis.call('XADD', KEYS[1], '*', 'e', ARGV[1])
local cap = tonumber(ARGV[2])
local dropped = {}
for i = 2, #KEYS, 3 do
  local queue, retry, age = KEYS[i], KEYS[i + 1], KEYS[i + 2]
  redis.pcall('XGROUP', 'CREATE', queue, 'relay', '0', 'MKSTREAM')
  local n = 0
  while redis.call('XLEN', queue) + redis.call('ZCARD', retry) >= cap do
    local first = redis.call('XRANGE', queue, '-', '+', 'COUNT', 1)[1]
    local eldest = redis.call('ZRANGE', age, 0, 0)[1]
    local first_id
    if first then
      for j = 1, #first[2], 2 do
        if first[2][j] == 'id' then first_id = first[2][j + 1] end
      end
    end
    if eldest and (not first_id or older(string.sub(eldest, 1, string.find(eldest, '\n', 1, true) - 1), first_id)) then
      redis.call('ZREM', retry, eldest)
      redis.call('ZREM', age, eldest)
    elseif first then
      redis.call('XACK', queue, 'relay', first[1])
      redis.call('XDEL', queue, first[1])
    else
      break
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

/// Takes due retries: each one's score moves past the lease, so no other replica takes it
/// meanwhile. KEYS: retry set. ARGV: now (ms), lease (ms), max.
static TAKE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
for _, m in ipairs(due) do
  redis.call('ZADD', KEYS[1], tonumber(ARGV[1]) + tonumber(ARGV[2]), m)
end
return due
",
    )
});

/// Settles a taken delivery: removes it from where it was taken (stream entry or retry member;
/// 0 if it is no longer there: dropped, or ended meanwhile) and files it: `retry` (new member
/// ARGV[4] scored ARGV[5] for its time and ARGV[6] for its age) or `dead` (facts ARGV[4] and
/// event ARGV[5] under event id ARGV[6]) or `done`.
/// KEYS: stream, retry set, age set, dead facts, dead events. ARGV: source, handle, action, ...
static SETTLE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
if ARGV[1] == 's' then
  local acked = redis.call('XACK', KEYS[1], 'relay', ARGV[2])
  redis.call('XDEL', KEYS[1], ARGV[2])
  if acked == 0 then return 0 end
else
  local removed = redis.call('ZREM', KEYS[2], ARGV[2])
  redis.call('ZREM', KEYS[3], ARGV[2])
  if removed == 0 then return 0 end
end
if ARGV[3] == 'retry' then
  redis.call('ZADD', KEYS[2], ARGV[5], ARGV[4])
  redis.call('ZADD', KEYS[3], ARGV[6], ARGV[4])
elseif ARGV[3] == 'dead' then
  redis.call('HSET', KEYS[4], ARGV[6], ARGV[4])
  redis.call('HSET', KEYS[5], ARGV[6], ARGV[5])
end
return 1
",
    )
});

/// Everything still to deliver becomes a dead letter. KEYS: stream, retry set, age set, dead
/// facts, dead events. ARGV: reason (a JSON string), now (ms).
static BURY_ALL: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r#"
local n = 0
local function bury(id, a, e)
  redis.call('HSET', KEYS[4], id, '{"attempts":' .. tonumber(a) .. ',"reason":' .. ARGV[1] ..
    ',"dead_ms":' .. ARGV[2] .. '}')
  redis.call('HSET', KEYS[5], id, e)
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
redis.call('DEL', KEYS[2], KEYS[3])
return n
"#,
    )
});

/// A dead letter back into the stream, attempts reset. KEYS: dead facts, dead events, stream.
/// ARGV: event id.
static REPLAY: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
local e = redis.call('HGET', KEYS[2], ARGV[1])
if not e then return 0 end
redis.pcall('XGROUP', 'CREATE', KEYS[3], 'relay', '0', 'MKSTREAM')
redis.call('XADD', KEYS[3], '*', 'id', ARGV[1], 'a', '0', 'e', e)
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
return 1
",
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
struct DeadFacts {
    attempts: u32,
    reason: String,
    dead_ms: u64,
}

/// The keys of one subscription.
struct Keys {
    queue: String,
    retry: String,
    age: String,
    dead: String,
    dead_events: String,
}

/// A retry-set member's parts: event id, attempts, event JSON.
fn member_parts(member: &[u8]) -> Option<(String, u32, &[u8])> {
    let mut parts = member.splitn(3, |b| *b == b'\n');
    let id = std::str::from_utf8(parts.next()?).ok()?.to_owned();
    let attempts = std::str::from_utf8(parts.next()?).ok()?.parse().ok()?;
    Some((id, attempts, parts.next()?))
}

impl RedisStore {
    /// A store in `state`'s Redis.
    pub fn new(state: Arc<SharedState>) -> Self {
        Self { state }
    }

    fn feed_key(&self) -> String {
        self.state.key("ev:feed")
    }

    fn keys(&self, subscription: &str) -> Keys {
        let key = |kind: &str| self.state.key(&format!("ev:{kind}:{subscription}"));
        Keys {
            queue: key("q"),
            retry: key("retry"),
            age: key("age"),
            dead: key("dead"),
            dead_events: key("deadev"),
        }
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

    fn from_stream(entry: &StreamId) -> Option<Delivery> {
        let event: String = entry.get("e")?;
        let event: Event = serde_json::from_str(&event).ok()?;
        Some(Delivery {
            event_id: entry.get("id")?,
            event: Arc::new(event),
            attempts: entry.get::<String>("a")?.parse().ok()?,
            handle: format!("{FROM_STREAM}{}", entry.id),
        })
    }

    fn from_retries(member: &[u8]) -> Option<Delivery> {
        let (event_id, attempts, json) = member_parts(member)?;
        let event: Event = serde_json::from_slice(json).ok()?;
        Some(Delivery {
            event_id,
            event: Arc::new(event),
            attempts,
            handle: format!("{FROM_RETRIES}{}", std::str::from_utf8(member).ok()?),
        })
    }

    /// Removes `delivery` from where it was taken and files it as `action` with `args`.
    async fn settle(
        &self,
        subscription: &str,
        delivery: &Delivery,
        action: &'static str,
        args: [Vec<u8>; 3],
    ) -> Result<(), StoreError> {
        let keys = self.keys(subscription);
        let (source, handle) = delivery.handle.split_at(1);
        self.state
            .run("events_settle", |mut connection| async move {
                SETTLE
                    .key(&keys.queue)
                    .key(&keys.retry)
                    .key(&keys.age)
                    .key(&keys.dead)
                    .key(&keys.dead_events)
                    .arg(source)
                    .arg(handle)
                    .arg(action)
                    .arg(&args[0])
                    .arg(&args[1])
                    .arg(&args[2])
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
            let k = self.keys(subscription);
            keys.extend([k.queue, k.retry, k.age]);
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

    fn batch(&self) -> usize {
        1
    }

    async fn due(
        &self,
        subscription: &str,
        now_ms: u64,
        max: usize,
        claim_after: Duration,
    ) -> Result<Vec<Delivery>, StoreError> {
        let keys = self.keys(subscription);
        let lease = u64::try_from(claim_after.as_millis()).unwrap_or(u64::MAX);
        // Due retries first: their events are older than anything not yet attempted.
        let retry = &keys.retry;
        let taken: Vec<Vec<u8>> = self
            .state
            .run("events_take", |mut connection| async move {
                TAKE.key(retry)
                    .arg(now_ms)
                    .arg(lease)
                    .arg(max)
                    .invoke_async(&mut connection)
                    .await
            })
            .await
            .map_err(unavailable)?;
        let mut deliveries: Vec<Delivery> =
            taken.iter().filter_map(|m| Self::from_retries(m)).collect();
        if deliveries.len() >= max {
            return Ok(deliveries);
        }
        let mut group = redis::cmd("XGROUP");
        group
            .arg("CREATE")
            .arg(&keys.queue)
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
        // Entries a replica took and never settled (it died): after claim_after, ours.
        let mut claim = redis::cmd("XAUTOCLAIM");
        claim
            .arg(&keys.queue)
            .arg(GROUP)
            .arg(&consumer)
            .arg(lease)
            .arg("0-0")
            .arg("COUNT")
            .arg(max - deliveries.len());
        let claimed: StreamAutoClaimReply = self.query("events_claim", claim).await?;
        deliveries.extend(claimed.claimed.iter().filter_map(Self::from_stream));
        if deliveries.len() < max {
            let options = StreamReadOptions::default()
                .group(GROUP, &consumer)
                .count(max - deliveries.len());
            let mut read = redis::cmd("XREADGROUP");
            read.arg(&options).arg("STREAMS").arg(&keys.queue).arg(">");
            let reply: Option<StreamReadReply> = self.query("events_read", read).await?;
            for key in reply.map(|r| r.keys).unwrap_or_default() {
                deliveries.extend(key.ids.iter().filter_map(Self::from_stream));
            }
        }
        Ok(deliveries)
    }

    async fn delivered(&self, subscription: &str, delivery: &Delivery) -> Result<(), StoreError> {
        self.settle(subscription, delivery, "done", Default::default())
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
        self.settle(
            subscription,
            delivery,
            "retry",
            [
                member,
                at_ms.to_string().into_bytes(),
                delivery.event.received_ms.to_string().into_bytes(),
            ],
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
        let facts = serde_json::json!({
            "attempts": delivery.attempts + 1,
            "reason": reason,
            "dead_ms": now_ms,
        });
        let facts = serde_json::to_vec(&facts).map_err(StoreError::from)?;
        let event = serde_json::to_vec(&*delivery.event).map_err(StoreError::from)?;
        self.settle(
            subscription,
            delivery,
            "dead",
            [facts, event, delivery.event_id.clone().into_bytes()],
        )
        .await
    }

    async fn bury_all(
        &self,
        subscription: &str,
        reason: &str,
        now_ms: u64,
    ) -> Result<u64, StoreError> {
        let keys = self.keys(subscription);
        let reason = serde_json::to_string(reason).map_err(StoreError::from)?;
        self.state
            .run("events_bury_all", |mut connection| async move {
                BURY_ALL
                    .key(&keys.queue)
                    .key(&keys.retry)
                    .key(&keys.age)
                    .key(&keys.dead)
                    .key(&keys.dead_events)
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
            let mut all = redis::pipe();
            let keys = self.keys(subscription);
            all.cmd("HGETALL")
                .arg(&keys.dead)
                .cmd("HGETALL")
                .arg(&keys.dead_events);
            let (facts, events): (HashMap<String, Vec<u8>>, HashMap<String, Vec<u8>>) = self
                .state
                .run("events_dead", |mut connection| async move {
                    all.query_async(&mut connection).await
                })
                .await
                .map_err(unavailable)?;
            for (event_id, facts) in facts {
                let Ok(facts) = serde_json::from_slice::<DeadFacts>(&facts) else {
                    continue;
                };
                let Some(event) = events
                    .get(&event_id)
                    .and_then(|e| serde_json::from_slice::<Event>(e).ok())
                else {
                    continue;
                };
                letters.push(DeadLetter {
                    subscription: subscription.clone(),
                    event_id,
                    attempts: facts.attempts,
                    reason: facts.reason,
                    dead_ms: facts.dead_ms,
                    event: Arc::new(event),
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
            let Keys {
                dead,
                dead_events: events,
                queue,
                ..
            } = self.keys(subscription);
            let ids: Vec<String> = match event_id {
                Some(id) => vec![id.to_owned()],
                None => {
                    let mut keys = redis::cmd("HKEYS");
                    keys.arg(&events);
                    self.query("events_dead", keys).await?
                }
            };
            for id in ids {
                let keys = (&dead, &events, &queue);
                replayed += self
                    .state
                    .run("events_replay", |mut connection| async move {
                        REPLAY
                            .key(keys.0)
                            .key(keys.1)
                            .key(keys.2)
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

    async fn trim_dead(&self, subscription: &str, max: u64) -> Result<u64, StoreError> {
        let keys = self.keys(subscription);
        let mut count = redis::cmd("HLEN");
        count.arg(&keys.dead_events);
        let held: u64 = self.query("events_dead", count).await?;
        if held <= max {
            return Ok(0);
        }
        let mut keys = redis::cmd("HKEYS");
        keys.arg(&self.keys(subscription).dead_events);
        let mut ids: Vec<String> = self.query("events_dead", keys).await?;
        // Stream ids order by time: the oldest events go first.
        ids.sort_by_key(|id| {
            id.split_once('-')
                .and_then(|(ms, seq)| Some((ms.parse::<u64>().ok()?, seq.parse::<u64>().ok()?)))
        });
        let excess: Vec<String> = ids
            .into_iter()
            .take(usize::try_from(held - max).unwrap_or(usize::MAX))
            .collect();
        let mut drop = redis::pipe();
        let keys = self.keys(subscription);
        drop.cmd("HDEL")
            .arg(&keys.dead)
            .arg(&excess)
            .ignore()
            .cmd("HDEL")
            .arg(&keys.dead_events)
            .arg(&excess)
            .ignore();
        self.state
            .run("events_dead", |mut connection| async move {
                drop.query_async::<()>(&mut connection).await
            })
            .await
            .map_err(unavailable)?;
        Ok(excess.len() as u64)
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
        // Any stream id but the largest, which has nothing after it (XRANGE refuses "(max").
        cursor.split_once('-').is_some_and(|(ms, seq)| {
            match (ms.parse::<u64>(), seq.parse::<u64>()) {
                (Ok(ms), Ok(seq)) => (ms, seq) != (u64::MAX, u64::MAX),
                _ => false,
            }
        })
    }

    async fn backlog(&self, subscription: &str) -> Result<Backlog, StoreError> {
        let keys = self.keys(subscription);
        let mut pipe = redis::pipe();
        pipe.cmd("XLEN")
            .arg(&keys.queue)
            .cmd("ZCARD")
            .arg(&keys.retry)
            .cmd("HLEN")
            .arg(&keys.dead_events)
            .cmd("XRANGE")
            .arg(&keys.queue)
            .arg("-")
            .arg("+")
            .arg("COUNT")
            .arg(1)
            .cmd("ZRANGE")
            .arg(&keys.age)
            .arg(0)
            .arg(0)
            .arg("WITHSCORES");
        let (queued, retrying, dead, first, eldest): (
            u64,
            u64,
            u64,
            StreamRangeReply,
            Vec<(Vec<u8>, f64)>,
        ) = self
            .state
            .run("events_backlog", |mut connection| async move {
                pipe.query_async(&mut connection).await
            })
            .await
            .map_err(unavailable)?;
        let first = first.ids.first().and_then(Self::from_stream);
        let oldest = first
            .map(|d| d.event.received_ms)
            .into_iter()
            .chain(eldest.first().map(|(_, at)| *at as u64))
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
