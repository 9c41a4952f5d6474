//! Requests a replica leased from a shared quota in one batch (`shared_state.quota_batch`),
//! handed out one by one without a round trip to Redis.
//!
//! Why this bounds the overshoot: every leased request was charged in Redis, so the shared
//! GCRA still counts it; a lease only moves *when* it is used. Requests that pass in a window
//! are then at most the exact quota's plus those leased before the window and still unused at
//! its start. One replica fetches one batch per quota at a time (the others meanwhile charge
//! their request alone, exactly), and fetches only once its lease is spent or expired, so at
//! most `batch − 1` are outstanding per replica: across replicas at most `replicas × batch`
//! beyond the exact quota. A lease expires after the quota's window (the time to refill its
//! burst), at most 1 s, so a replica never withholds requests from the others for long.
//!
//! One word of atomic state per quota, taken by compare-and-swap: no lock on the hot path.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::LazyLock;
use std::time::{Duration, Instant};

/// Longest a leased request stays usable.
const MAX_LIFETIME: Duration = Duration::from_secs(1);
/// Low bits of the packed word: requests left (a batch is at most 1000).
const COUNT_BITS: u32 = 20;
const COUNT_MASK: u64 = (1 << COUNT_BITS) - 1;

/// Milliseconds since the first lease of this process: deadlines fit the high 44 bits for
/// half a millennium.
fn clock_ms() -> u64 {
    static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);
    u64::try_from(EPOCH.elapsed().as_millis()).unwrap_or(u64::MAX >> COUNT_BITS)
}

fn pack(deadline_ms: u64, count: u32) -> u64 {
    (deadline_ms << COUNT_BITS) | (u64::from(count) & COUNT_MASK)
}

fn unpack(word: u64) -> (u64, u32) {
    (word >> COUNT_BITS, (word & COUNT_MASK) as u32)
}

/// The shared quota as the last batch left it, for the headers of leased requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SharedView {
    /// Requests Redis had left after the batch.
    pub remaining: u32,
    /// Seconds until its capacity was whole again.
    pub reset_secs: u32,
}

/// One quota's leased requests on this replica.
#[derive(Debug, Default)]
pub struct Lease {
    /// Deadline (ms on [`clock_ms`]) high, requests left low.
    packed: AtomicU64,
    /// A batch is being fetched: the others charge one request exactly meanwhile.
    fetching: AtomicBool,
    /// [`SharedView`] packed: remaining high, reset low.
    view: AtomicU64,
}

/// Ends a fetch when dropped (also when the request is cancelled mid-fetch).
#[derive(Debug)]
pub struct Fetching<'a>(&'a Lease);

impl Drop for Fetching<'_> {
    fn drop(&mut self) {
        self.0.fetching.store(false, Ordering::Release);
    }
}

impl Lease {
    /// Takes one leased request: how many are left after it, and the view for the headers.
    pub fn take(&self) -> Option<(u32, SharedView)> {
        let now = clock_ms();
        let mut word = self.packed.load(Ordering::Acquire);
        loop {
            let (deadline, count) = unpack(word);
            if count == 0 || deadline <= now {
                return None;
            }
            match self.packed.compare_exchange_weak(
                word,
                pack(deadline, count - 1),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Some((count - 1, self.view())),
                Err(actual) => word = actual,
            }
        }
    }

    /// Returns a request taken but not used (another quota of the request refused it); dropped
    /// if the lease has expired meanwhile.
    pub fn give_back(&self) {
        let now = clock_ms();
        let _ = self
            .packed
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |word| {
                let (deadline, count) = unpack(word);
                (deadline > now && u64::from(count) < COUNT_MASK).then(|| pack(deadline, count + 1))
            });
    }

    /// Starts fetching a batch, unless this replica already is, or still holds leased requests
    /// (a fetch that ended since this request looked): then this request goes alone. Only the
    /// fetcher fills, so what it finds empty here is still empty when it fills: nothing leased
    /// is ever overwritten, and at most one batch is outstanding.
    pub fn start_fetch(&self) -> Option<Fetching<'_>> {
        if self.fetching.swap(true, Ordering::AcqRel) {
            return None;
        }
        let fetch = Fetching(self);
        let (deadline, count) = unpack(self.packed.load(Ordering::Acquire));
        (count == 0 || deadline <= clock_ms()).then_some(fetch)
    }

    /// Keeps `count` requests of a batch just granted, usable for `lifetime` (at most 1 s).
    pub fn fill(&self, _fetch: &Fetching<'_>, count: u32, lifetime: Duration, view: SharedView) {
        self.view.store(
            (u64::from(view.remaining) << 32) | u64::from(view.reset_secs),
            Ordering::Release,
        );
        let lifetime = u64::try_from(lifetime.min(MAX_LIFETIME).as_millis()).unwrap_or(1);
        let count = count.min(COUNT_MASK as u32);
        // Only the fetcher fills, and it started on a spent or expired lease (`start_fetch`).
        self.packed
            .store(pack(clock_ms() + lifetime.max(1), count), Ordering::Release);
    }

    fn view(&self) -> SharedView {
        let word = self.view.load(Ordering::Acquire);
        SharedView {
            remaining: (word >> 32) as u32,
            reset_secs: word as u32,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VIEW: SharedView = SharedView {
        remaining: 7,
        reset_secs: 2,
    };

    #[test]
    fn a_batch_is_handed_out_once_then_refetched() {
        let lease = Lease::default();
        assert_eq!(lease.take(), None);
        let fetch = lease.start_fetch().unwrap();
        assert!(lease.start_fetch().is_none(), "one fetch at a time");
        lease.fill(&fetch, 3, Duration::from_secs(1), VIEW);
        drop(fetch);
        let left: Vec<u32> = (0..3).map(|_| lease.take().unwrap().0).collect();
        assert_eq!(left, [2, 1, 0]);
        assert_eq!(lease.take(), None);
        lease.give_back();
        assert!(
            lease.start_fetch().is_none(),
            "no fetch while leased requests are left"
        );
        assert_eq!(lease.take(), Some((0, VIEW)));
        assert!(
            lease.start_fetch().is_some(),
            "the fetch ended with its guard"
        );
    }

    #[test]
    fn an_expired_lease_hands_out_nothing() {
        let lease = Lease::default();
        let fetch = lease.start_fetch().unwrap();
        lease.fill(&fetch, 5, Duration::from_millis(1), VIEW);
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(lease.take(), None);
        lease.give_back();
        assert_eq!(lease.take(), None);
    }

    #[test]
    fn concurrent_takers_never_get_more_than_the_batch() {
        let lease = std::sync::Arc::new(Lease::default());
        let fetch = lease.start_fetch().unwrap();
        lease.fill(&fetch, 1000, Duration::from_secs(1), VIEW);
        drop(fetch);
        let takers: Vec<_> = (0..4)
            .map(|_| {
                let lease = lease.clone();
                std::thread::spawn(move || (0..600).filter(|_| lease.take().is_some()).count())
            })
            .collect();
        let taken: usize = takers.into_iter().map(|t| t.join().unwrap()).sum();
        assert_eq!(taken, 1000);
    }
}
