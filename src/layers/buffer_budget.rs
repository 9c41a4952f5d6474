//! The budget for buffered bodies: how many bytes [`crate::layers::buffer`] (and
//! classification) may hold at once, in memory and on disk, over every request and response of
//! this process, and how much of each one client may take.
//!
//! Without it the only bound was `max_in_flight × max_body_bytes` per client: one client's slow
//! uploads could fill the disk, and everyone else's bodies then failed. Now a body is held only
//! against a [`Reservation`], grown before each frame's bytes are kept and given back when the
//! held bytes are dropped. A declared length is judged before a byte is read
//! ([`Reservation::admit_body`]) but not held: stalled heads that declare much hold nothing.
//!
//! Requests without a client (public routes) share one share, `anonymous`. The budget is shared
//! state: every [`crate::layers::buffer::BufferLayer`] built from the same settings draws on the
//! same one, and so does [`crate::layers::classify`], which reads JSON and urlencoded request
//! bodies whole into memory before any buffering (in memory only: a body the memory share cannot
//! hold is 413 there). Multipart field values it reads are not counted.
//!
//! Lock-free on the hot path: counters are atomics, and a client's share is found in a sharded
//! map whose entries are made once per client name (names come from the configuration, so the
//! map stays small).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use prometheus::{IntCounterVec, IntGauge, IntGaugeVec};

use crate::error::GatewayError;
use crate::layers::auth::Client;

/// Where held bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Store {
    /// In the process's memory.
    Memory,
    /// In an unlinked temporary file.
    Disk,
}

impl Store {
    fn label(self) -> &'static str {
        match self {
            Self::Memory => "memory",
            Self::Disk => "disk",
        }
    }
}

/// The limits of a [`BufferBudget`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BudgetLimits {
    /// Bytes held in memory by all buffered bodies together.
    pub max_memory: u64,
    /// Bytes held on disk by all buffered bodies together.
    pub max_disk: u64,
    /// The part of each of those one client (or all anonymous requests together) may hold,
    /// more than 0 and at most 1.
    pub client_share: f64,
}

/// The gauges and counter the budget keeps.
#[derive(Debug, Clone)]
pub struct BudgetMetrics {
    /// `erpgate_buffered_bytes{store}`.
    pub held: IntGaugeVec,
    /// `erpgate_buffer_refusals_total{direction,reason}`.
    pub refused: IntCounterVec,
}

/// Why a reservation was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The process-wide budget is taken by others' bodies: retry later.
    Full,
    /// This client's share is taken by its own other bodies: retry later.
    ClientShare,
    /// No budget could ever hold a body this size.
    TooLarge {
        /// The largest body that could be held.
        limit: u64,
    },
}

/// Which body a refusal was for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// A request body: refused with an error, never forwarded.
    Request,
    /// A response: sent on as it comes instead of being held.
    Response,
}

impl Refusal {
    fn reason(self) -> &'static str {
        match self {
            Self::Full => "budget",
            Self::ClientShare => "client_share",
            Self::TooLarge { .. } => "too_large",
        }
    }

    /// The error a request refused so gets.
    pub fn into_error(self) -> GatewayError {
        match self {
            // Bodies held are let go within a request's time: a second is a fair first wait.
            Self::Full | Self::ClientShare => GatewayError::BufferBudgetExhausted {
                retry_after: Duration::from_secs(1),
            },
            Self::TooLarge { limit } => GatewayError::PayloadTooLarge { limit },
        }
    }
}

/// Bytes taken against a limit.
#[derive(Debug)]
struct Pool {
    used: AtomicU64,
    limit: u64,
}

impl Pool {
    fn new(limit: u64) -> Self {
        Self {
            used: AtomicU64::new(0),
            limit,
        }
    }

    fn try_take(&self, n: u64) -> bool {
        let mut used = self.used.load(Ordering::Relaxed);
        loop {
            let Some(after) = used.checked_add(n).filter(|after| *after <= self.limit) else {
                return false;
            };
            match self
                .used
                .compare_exchange_weak(used, after, Ordering::Acquire, Ordering::Relaxed)
            {
                Ok(_) => return true,
                Err(now) => used = now,
            }
        }
    }

    fn give(&self, n: u64) {
        self.used.fetch_sub(n, Ordering::Release);
    }
}

/// One client's part of the budget.
#[derive(Debug)]
struct Share {
    memory: Pool,
    disk: Pool,
}

impl Share {
    fn pool(&self, store: Store) -> &Pool {
        match store {
            Store::Memory => &self.memory,
            Store::Disk => &self.disk,
        }
    }
}

/// How many bytes buffered bodies may hold, over the whole process and per client.
#[derive(Debug)]
pub struct BufferBudget {
    memory: Pool,
    disk: Pool,
    share_memory: u64,
    share_disk: u64,
    shares: DashMap<Arc<str>, Arc<Share>>,
    anonymous: Arc<Share>,
    memory_gauge: IntGauge,
    disk_gauge: IntGauge,
    refused: IntCounterVec,
}

impl BufferBudget {
    /// A budget of `limits`, reported in `metrics`.
    pub fn new(limits: BudgetLimits, metrics: &BudgetMetrics) -> Arc<Self> {
        let share = |limit: u64| {
            // Rounded down, but never to nothing: a share of 0 would refuse every body.
            let part = (limit as f64 * limits.client_share.clamp(0.0, 1.0)) as u64;
            part.clamp(limit.min(1), limit)
        };
        let (share_memory, share_disk) = (share(limits.max_memory), share(limits.max_disk));
        let anonymous = Arc::new(Share {
            memory: Pool::new(share_memory),
            disk: Pool::new(share_disk),
        });
        for direction in ["request", "response"] {
            for reason in ["budget", "client_share", "too_large"] {
                metrics.refused.with_label_values(&[direction, reason]);
            }
        }
        Arc::new(Self {
            memory: Pool::new(limits.max_memory),
            disk: Pool::new(limits.max_disk),
            share_memory,
            share_disk,
            shares: DashMap::new(),
            anonymous,
            memory_gauge: metrics.held.with_label_values(&[Store::Memory.label()]),
            disk_gauge: metrics.held.with_label_values(&[Store::Disk.label()]),
            refused: metrics.refused.clone(),
        })
    }

    /// An empty reservation on the share of `client` (the anonymous share for none), to grow.
    pub fn reservation(self: &Arc<Self>, client: Option<&Client>) -> Reservation {
        let share = match client {
            None => self.anonymous.clone(),
            Some(client) => match self.shares.get(&client.name) {
                Some(share) => share.clone(),
                None => self
                    .shares
                    .entry(client.name.clone())
                    .or_insert_with(|| {
                        Arc::new(Share {
                            memory: Pool::new(self.share_memory),
                            disk: Pool::new(self.share_disk),
                        })
                    })
                    .clone(),
            },
        };
        Reservation {
            budget: self.clone(),
            share,
            memory: 0,
            disk: 0,
        }
    }

    /// The most one body may ever hold in `store`: the budget, or one share of it.
    pub fn largest(&self, store: Store) -> u64 {
        match store {
            Store::Memory => self.share_memory,
            Store::Disk => self.share_disk,
        }
    }

    /// Counts `refusal` in `erpgate_buffer_refusals_total`.
    pub fn count(&self, refusal: Refusal, direction: Direction) {
        let direction = match direction {
            Direction::Request => "request",
            Direction::Response => "response",
        };
        self.refused
            .with_label_values(&[direction, refusal.reason()])
            .inc();
    }

    /// The largest body that could ever be held, with `per_body` bytes of a body kept in memory.
    fn largest_body(&self, per_body: u64) -> u64 {
        per_body
            .min(self.largest(Store::Memory))
            .max(self.largest(Store::Disk))
    }

    /// Bytes held now in `store`, over all bodies.
    pub fn held(&self, store: Store) -> u64 {
        self.pool(store).used.load(Ordering::Relaxed)
    }

    fn pool(&self, store: Store) -> &Pool {
        match store {
            Store::Memory => &self.memory,
            Store::Disk => &self.disk,
        }
    }

    fn gauge(&self, store: Store) -> &IntGauge {
        match store {
            Store::Memory => &self.memory_gauge,
            Store::Disk => &self.disk_gauge,
        }
    }
}

/// Bytes one body holds against the budget; given back when dropped, that is when the bytes
/// it stands for are dropped (it travels with them).
#[derive(Debug)]
pub struct Reservation {
    budget: Arc<BufferBudget>,
    share: Arc<Share>,
    memory: u64,
    disk: u64,
}

impl Reservation {
    /// Bytes reserved in `store`.
    pub fn reserved(&self, store: Store) -> u64 {
        match store {
            Store::Memory => self.memory,
            Store::Disk => self.disk,
        }
    }

    /// Makes the reservation in `store` at least `total` bytes.
    pub fn reserve_up_to(&mut self, store: Store, total: u64) -> Result<(), Refusal> {
        let more = total.saturating_sub(self.reserved(store));
        if more == 0 {
            return Ok(());
        }
        if total > self.budget.largest(store) {
            return Err(Refusal::TooLarge {
                limit: self.budget.largest(store),
            });
        }
        // The client's share first: a client over its own share is told so, whatever others hold.
        if !self.share.pool(store).try_take(more) {
            return Err(Refusal::ClientShare);
        }
        if !self.budget.pool(store).try_take(more) {
            self.share.pool(store).give(more);
            return Err(Refusal::Full);
        }
        self.budget.gauge(store).add(more as i64);
        match store {
            Store::Memory => self.memory = total,
            Store::Disk => self.disk = total,
        }
        Ok(())
    }

    /// Makes the reservation cover a body of `total` bytes: in memory while the body fits in
    /// `per_body` and the memory budget has room, otherwise on disk. Once on disk, a body stays
    /// there. Returns where the body is to be held; the caller moves memory bytes to disk (and
    /// [`release`](Self::release)s the memory) when that changes.
    pub fn reserve_body(&mut self, total: u64, per_body: u64) -> Result<Store, Refusal> {
        let in_memory = if self.disk == 0 && total <= per_body {
            match self.reserve_up_to(Store::Memory, total) {
                Ok(()) => return Ok(Store::Memory),
                Err(refusal) => Some(refusal),
            }
        } else {
            None
        };
        match (self.reserve_up_to(Store::Disk, total), in_memory) {
            (Ok(()), _) => Ok(Store::Disk),
            // Memory could take it once others let go: that is a wait, not a size refusal.
            (
                Err(Refusal::TooLarge { .. }),
                Some(memory @ (Refusal::Full | Refusal::ClientShare)),
            ) => Err(memory),
            (Err(Refusal::TooLarge { .. }), _) => Err(Refusal::TooLarge {
                limit: self.budget.largest_body(per_body),
            }),
            (Err(disk), _) => Err(disk),
        }
    }

    /// Whether a body of a declared `total` bytes fits now ([`Self::reserve_body`]'s answer),
    /// without holding it: the length is judged before a byte is read, but only the bytes that
    /// arrive are held, as they arrive — a client that declares much and sends little (or
    /// nothing) holds little, however long its pauses are allowed to be.
    pub fn admit_body(&mut self, total: u64, per_body: u64) -> Result<(), Refusal> {
        let admitted = self.reserve_body(total, per_body).map(drop);
        self.release(Store::Memory);
        self.release(Store::Disk);
        admitted
    }

    /// [`Self::admit_body`] for a body held in `store` only.
    pub fn admit(&mut self, store: Store, total: u64) -> Result<(), Refusal> {
        let admitted = self.reserve_up_to(store, total);
        self.release(store);
        admitted
    }

    /// Gives back everything reserved in `store` (the bytes moved elsewhere).
    pub fn release(&mut self, store: Store) {
        let n = std::mem::take(match store {
            Store::Memory => &mut self.memory,
            Store::Disk => &mut self.disk,
        });
        if n > 0 {
            self.share.pool(store).give(n);
            self.budget.pool(store).give(n);
            self.budget.gauge(store).sub(n as i64);
        }
    }

    /// The budget this reservation draws on.
    pub fn budget(&self) -> &BufferBudget {
        &self.budget
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.release(Store::Memory);
        self.release(Store::Disk);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(max_memory: u64, max_disk: u64, client_share: f64) -> Arc<BufferBudget> {
        let metrics = BudgetMetrics {
            held: IntGaugeVec::new(prometheus::Opts::new("held", "h"), &["store"]).unwrap(),
            refused: IntCounterVec::new(
                prometheus::Opts::new("refused", "r"),
                &["direction", "reason"],
            )
            .unwrap(),
        };
        BufferBudget::new(
            BudgetLimits {
                max_memory,
                max_disk,
                client_share,
            },
            &metrics,
        )
    }

    #[test]
    fn a_share_is_bounded_and_given_back_on_drop() {
        let budget = budget(100, 1000, 0.5);
        let mut one = budget.reservation(None);
        assert_eq!(one.reserve_up_to(Store::Memory, 50), Ok(()));
        // The anonymous share (50) is full; the budget is not.
        let mut two = budget.reservation(None);
        assert_eq!(
            two.reserve_up_to(Store::Memory, 1),
            Err(Refusal::ClientShare)
        );
        assert_eq!(
            two.reserve_up_to(Store::Memory, 51),
            Err(Refusal::TooLarge { limit: 50 })
        );
        assert_eq!(two.reserve_up_to(Store::Disk, 500), Ok(()));
        assert_eq!(budget.held(Store::Memory), 50);
        assert_eq!(budget.held(Store::Disk), 500);
        drop(one);
        assert_eq!(budget.held(Store::Memory), 0);
        assert_eq!(budget.memory_gauge.get(), 0);
        assert_eq!(two.reserve_up_to(Store::Memory, 50), Ok(()));
        two.release(Store::Memory);
        drop(two);
        assert_eq!(budget.held(Store::Disk), 0);
        assert_eq!(budget.disk_gauge.get(), 0);
        assert_eq!(budget.held(Store::Memory), 0);
    }

    #[test]
    fn the_whole_budget_is_shared_by_all_shares() {
        let budget = budget(100, 100, 0.6);
        let mut anonymous = budget.reservation(None);
        assert_eq!(anonymous.reserve_up_to(Store::Disk, 60), Ok(()));
        let mut more = budget.reservation(None);
        // 60 of 100 held: a second share of 60 would not fit in what is left.
        let client = test_client("c");
        let mut other = budget.reservation(Some(&client));
        assert_eq!(other.reserve_up_to(Store::Disk, 41), Err(Refusal::Full));
        assert_eq!(other.reserve_up_to(Store::Disk, 40), Ok(()));
        assert_eq!(
            more.reserve_up_to(Store::Disk, 1),
            Err(Refusal::ClientShare)
        );
        // A failed reservation took nothing from the client's share.
        drop(anonymous);
        assert_eq!(other.reserve_up_to(Store::Disk, 60), Ok(()));
        assert_eq!(budget.held(Store::Disk), 60);
    }

    fn test_client(name: &str) -> Client {
        Client {
            name: name.into(),
            secret_sha256: [0; 32],
            site: "erp".into(),
            service_account: "sync".into(),
            extra_sites: Default::default(),
            rules: None,
            quotas: crate::layers::rate_limit::ClientQuotas {
                requests: None,
                writes: None,
            },
            in_flight: crate::layers::concurrency::InFlight::new(1),
            limits_fingerprint: String::new(),
        }
    }
}
