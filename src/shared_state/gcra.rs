//! GCRA in Redis: the same algorithm governor runs in memory, on a theoretical arrival time
//! (TAT) per key, updated atomically by one Lua script on Redis's own clock (replicas' clocks
//! never matter). One round trip whatever the number of quotas a request is charged to.
//!
//! For a quota of `burst` requests refilling one per `interval` (T), with τ = T × burst: a
//! request at `now` is allowed when `max(TAT, now) + T − τ ≤ now`, and then TAT becomes
//! `max(TAT, now) + T`. Keys expire once their TAT is past, so idle clients cost nothing.
//!
//! A charge may ask for several requests at once (a replica leasing a batch, see
//! `shared_state.quota_batch`): it is granted as many as the key has room for now, at most
//! what it asked, and at least one or it is refused; TAT then moves by `granted × T`.

use std::sync::LazyLock;
use std::time::Duration;

use super::{SharedState, Unavailable};

/// The script. `ARGV[1]` is `all` (allow only if every key allows; charge all or none: a
/// request charged to its request and write quotas) or `each` (charge every key that allows:
/// failures counted per address and per key id). Then `T` and `τ` in microseconds and the
/// requests wanted, per key. Returns, per key: the requests granted (0: refused), the wait in
/// µs when refused, and the fill `TAT − now` in µs after the charge. Numbers are formatted with
/// `%.0f`, as Lua 5.1's default `%.14g` would round microsecond timestamps.
static SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r#"
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local all = ARGV[1] == 'all'
local out, tats, before, refused = {}, {}, {}, false
for i = 1, #KEYS do
  local t = tonumber(ARGV[3 * i - 1])
  local tau = tonumber(ARGV[3 * i])
  local want = tonumber(ARGV[3 * i + 1])
  local tat = tonumber(redis.call('GET', KEYS[i]) or now)
  if tat < now then tat = now end
  before[i] = tat - now
  local room = math.floor((now + tau - tat) / t)
  if room < 1 then
    refused = true
    out[3 * i - 2], out[3 * i - 1], out[3 * i] = 0, tat + t - tau - now, tat - now
  else
    local granted = math.min(want, room)
    tats[i] = tat + granted * t
    out[3 * i - 2], out[3 * i - 1], out[3 * i] = granted, 0, tats[i] - now
  end
end
for i = 1, #KEYS do
  if tats[i] and not (all and refused) then
    redis.call('SET', KEYS[i], string.format('%.0f', tats[i]), 'PX',
      string.format('%.0f', math.ceil((tats[i] - now) / 1000) + 1000))
  elseif all and refused and out[3 * i - 2] > 0 then
    out[3 * i - 2], out[3 * i] = 0, before[i]
  end
end
return out
"#,
    )
});

/// One quota to charge.
#[derive(Debug, Clone, Copy)]
pub struct Charge<'a> {
    /// The Redis key (prefixed).
    pub key: &'a str,
    /// Time to refill one request.
    pub interval: Duration,
    /// Requests allowed at once.
    pub burst: u32,
    /// Requests asked for: 1, or a batch this replica leases.
    pub want: u32,
}

/// What a key said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    /// The request was allowed by this key.
    pub allowed: bool,
    /// Requests granted (at least one when allowed, at most those asked for).
    pub granted: u32,
    /// When refused: how long until it would be allowed.
    pub wait: Duration,
    /// Time until the key's capacity is whole again.
    pub fill: Duration,
}

impl Verdict {
    /// Requests still allowed now after this one, for a quota of `burst` per `interval`.
    pub fn remaining(&self, interval: Duration, burst: u32) -> u32 {
        let tau = interval.as_micros() * u128::from(burst);
        let left = tau.saturating_sub(self.fill.as_micros());
        u32::try_from(left / interval.as_micros().max(1)).unwrap_or(u32::MAX)
    }
}

/// How several keys are charged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// All or none.
    All,
    /// Each key on its own.
    Each,
}

impl SharedState {
    /// Charges one request to `charges` in one round trip.
    pub async fn charge(
        &self,
        charges: &[Charge<'_>],
        mode: Mode,
    ) -> Result<Vec<Verdict>, Unavailable> {
        let values: Vec<i64> = self
            .run("gcra", |mut connection| async move {
                let mut invocation = SCRIPT.prepare_invoke();
                invocation.arg(if mode == Mode::All { "all" } else { "each" });
                for charge in charges {
                    let t = charge.interval.as_micros().max(1);
                    invocation
                        .key(charge.key)
                        .arg(u64::try_from(t).unwrap_or(u64::MAX))
                        .arg(u64::try_from(t * u128::from(charge.burst)).unwrap_or(u64::MAX))
                        .arg(charge.want.max(1));
                }
                invocation.invoke_async(&mut connection).await
            })
            .await?;
        if values.len() != charges.len() * 3 {
            return Err(Unavailable);
        }
        let micros = |v: i64| Duration::from_micros(u64::try_from(v).unwrap_or(0));
        Ok(values
            .chunks_exact(3)
            .map(|v| Verdict {
                allowed: v[0] > 0,
                granted: u32::try_from(v[0]).unwrap_or(0),
                wait: micros(v[1]),
                fill: micros(v[2]),
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remaining_follows_the_fill() {
        let t = Duration::from_secs(6);
        let fresh = Verdict {
            allowed: true,
            granted: 1,
            wait: Duration::ZERO,
            fill: t,
        };
        assert_eq!(fresh.remaining(t, 10), 9);
        let spent = Verdict {
            allowed: true,
            granted: 1,
            wait: Duration::ZERO,
            fill: t * 10,
        };
        assert_eq!(spent.remaining(t, 10), 0);
    }
}
