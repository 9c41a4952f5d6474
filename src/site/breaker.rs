//! The per-site circuit breaker's state (failsafe's state machine, mirrored into atomics so
//! `/readyz`, the gauge and `Retry-After` read it without a lock). The layer that applies it to
//! requests is [`crate::layers::breaker`].

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use failsafe::failure_policy::{
    consecutive_failures, success_rate_over_time_window, ConsecutiveFailures, OrElse,
    SuccessRateOverTimeWindow,
};
use failsafe::{FailurePolicy, Instrument, StateMachine};
use prometheus::{IntCounterVec, IntGauge};

const CLOSED: u8 = 0;
const HALF_OPEN: u8 = 1;
const OPEN: u8 = 2;

/// Breaker settings (from the site's config).
#[derive(Debug, Clone)]
pub struct BreakerSettings {
    /// Trip after this many failures in a row (0: never on this trigger).
    pub consecutive_failures: u32,
    /// Trip when more than this fraction of requests failed over `window`...
    pub failure_rate: Option<(f64, u32, Duration)>,
    /// First open period.
    pub open_base: Duration,
    /// Longest open period.
    pub open_max: Duration,
}

/// Open periods: `base`, doubling per reopening, capped at `max`. Records each period it hands
/// out, so the breaker can tell clients how long it will stay open.
#[derive(Debug, Clone)]
pub struct OpenBackoff {
    base: Duration,
    max: Duration,
    attempt: u32,
    last_ms: Arc<AtomicU64>,
}

impl Iterator for OpenBackoff {
    type Item = Duration;
    fn next(&mut self) -> Option<Duration> {
        let factor = 1u32.checked_shl(self.attempt).unwrap_or(u32::MAX);
        let delay = self.base.saturating_mul(factor).min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        self.last_ms
            .store(delay.as_millis() as u64, Ordering::SeqCst);
        Some(delay)
    }
}

type SitePolicy = OrElse<ConsecutiveFailures<OpenBackoff>, SuccessRateOverTimeWindow<OpenBackoff>>;

/// What the breaker's transitions update: the mirror of its state, metrics and logs.
#[derive(Debug)]
struct Mirror {
    site: Arc<str>,
    state: AtomicU8,
    epoch: Instant,
    opened_at_ms: AtomicU64,
    open_for_ms: Arc<AtomicU64>,
    gauge: IntGauge,
    transitions: IntCounterVec,
}

impl Mirror {
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn transition(&self, state: u8, name: &str) {
        let previous = self.state.swap(state, Ordering::SeqCst);
        if state == OPEN {
            self.opened_at_ms.store(self.now_ms(), Ordering::SeqCst);
        }
        self.gauge.set(i64::from(state));
        if previous != state {
            self.transitions
                .with_label_values(&[&self.site, name])
                .inc();
            tracing::warn!(site = %self.site, state = name, "circuit breaker");
        }
    }
}

#[derive(Debug, Clone)]
struct MirrorInstrument(Arc<Mirror>);

impl Instrument for MirrorInstrument {
    fn on_call_rejected(&self) {}
    fn on_open(&self) {
        self.0.transition(OPEN, "open");
    }
    fn on_half_open(&self) {
        self.0.transition(HALF_OPEN, "half_open");
    }
    fn on_closed(&self) {
        self.0.transition(CLOSED, "closed");
    }
}

/// A site's breaker.
pub struct Breaker {
    machine: StateMachine<SitePolicy, MirrorInstrument>,
    mirror: Arc<Mirror>,
    /// Half-open lets exactly one probe through; failsafe alone would let everyone through.
    probe_in_flight: AtomicBool,
    /// Whether a failure was recorded since the last success failsafe was told of.
    failed_since_success: AtomicBool,
    /// Whether the failure-rate trigger is on: then failsafe must count every success.
    counts_successes: bool,
}

impl std::fmt::Debug for Breaker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Breaker")
            .field("site", &self.mirror.site)
            .field("state", &self.mirror.state)
            .finish()
    }
}

/// What a call was allowed as.
/// How a call is let through.
pub enum Admission {
    Normal,
    Probe,
}

impl Breaker {
    /// A closed breaker for `site`, reporting into `gauge` (0 closed, 1 half-open, 2 open) and
    /// `transitions{site,state}`.
    pub fn new(
        site: Arc<str>,
        settings: &BreakerSettings,
        gauge: IntGauge,
        transitions: IntCounterVec,
    ) -> Self {
        let open_for_ms = Arc::new(AtomicU64::new(0));
        let backoff = OpenBackoff {
            base: settings.open_base,
            max: settings.open_max,
            attempt: 0,
            last_ms: open_for_ms.clone(),
        };
        let consecutive = match settings.consecutive_failures {
            0 => u32::MAX,
            n => n,
        };
        // A disabled rate trigger: a success rate of 0 is never undercut.
        let (required_success, min_requests, window) = match settings.failure_rate {
            Some((threshold, min, window)) => (1.0 - threshold, min, window),
            None => (0.0, u32::MAX, Duration::from_secs(1)),
        };
        let policy = consecutive_failures(consecutive, backoff.clone()).or_else(
            success_rate_over_time_window(required_success, min_requests, window, backoff),
        );
        let mirror = Arc::new(Mirror {
            site,
            state: AtomicU8::new(CLOSED),
            epoch: Instant::now(),
            opened_at_ms: AtomicU64::new(0),
            open_for_ms,
            gauge,
            transitions,
        });
        mirror.gauge.set(0);
        Self {
            machine: failsafe::Config::new()
                .failure_policy(policy)
                .instrument(MirrorInstrument(mirror.clone()))
                .build(),
            mirror,
            probe_in_flight: AtomicBool::new(false),
            failed_since_success: AtomicBool::new(false),
            counts_successes: settings.failure_rate.is_some(),
        }
    }

    /// How long until the breaker lets a probe through (at least a second, for `Retry-After`).
    pub fn retry_after(&self) -> Duration {
        let until = self.mirror.opened_at_ms.load(Ordering::SeqCst)
            + self.mirror.open_for_ms.load(Ordering::SeqCst);
        Duration::from_millis(until.saturating_sub(self.mirror.now_ms()))
            .max(Duration::from_secs(1))
    }

    /// True while open and not yet due for a probe.
    pub fn is_open(&self) -> bool {
        let until = self.mirror.opened_at_ms.load(Ordering::SeqCst)
            + self.mirror.open_for_ms.load(Ordering::SeqCst);
        self.mirror.state.load(Ordering::SeqCst) == OPEN && self.mirror.now_ms() < until
    }

    /// Lets a call through (a normal one, or the one probe while half-open), or not.
    ///
    /// While closed, failsafe permits every call without a change of state: the mirror answers
    /// without failsafe's lock, which every worker would otherwise take for every request to
    /// the site.
    pub fn admit(&self) -> Option<Admission> {
        if self.mirror.state.load(Ordering::Acquire) == CLOSED {
            return Some(Admission::Normal);
        }
        if !self.machine.is_call_permitted() {
            return None;
        }
        if self.mirror.state.load(Ordering::SeqCst) != HALF_OPEN {
            return Some(Admission::Normal);
        }
        self.probe_in_flight
            .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
            .ok()
            .map(|_| Admission::Probe)
    }

    /// Records how a call went.
    ///
    /// A success while closed, with no failure since the last success and no failure-rate
    /// window to count it in, changes nothing in failsafe (its consecutive-failure count is
    /// already zero): it is not taken to failsafe's lock. A failure always is, and marks that
    /// the next success must be.
    pub fn record(&self, outcome: Outcome) {
        match outcome {
            Outcome::Success => {
                let needed = self.counts_successes
                    || self.mirror.state.load(Ordering::Acquire) != CLOSED
                    || (self.failed_since_success.load(Ordering::Acquire)
                        && self.failed_since_success.swap(false, Ordering::AcqRel));
                if needed {
                    self.machine.on_success();
                }
            }
            Outcome::Failure => {
                self.machine.on_error();
                // After failsafe counted it: a success that sees the mark resets the count.
                self.failed_since_success.store(true, Ordering::Release);
            }
            Outcome::Neither => {}
        }
    }

    /// Frees the probe slot, however the probe ended.
    pub fn release_probe(&self) {
        self.probe_in_flight.store(false, Ordering::SeqCst);
    }
}

/// What a call showed about the site.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// It answered: alive.
    Success,
    /// It failed (connect error, timeout, 502/503/504).
    Failure,
    /// It says nothing about the site (the client's own error).
    Neither,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker_with(settings: &BreakerSettings) -> Breaker {
        let gauge = IntGauge::new("g", "g").unwrap();
        let transitions =
            IntCounterVec::new(prometheus::Opts::new("t", "t"), &["site", "state"]).unwrap();
        Breaker::new("erp".into(), settings, gauge, transitions)
    }

    fn breaker(consecutive: u32) -> Breaker {
        breaker_with(&BreakerSettings {
            consecutive_failures: consecutive,
            failure_rate: None,
            open_base: Duration::from_millis(100),
            open_max: Duration::from_millis(400),
        })
    }

    /// Only the failure-rate trigger: above 0.5 over 10 s, with at least 6 requests.
    fn rate_breaker() -> Breaker {
        breaker_with(&BreakerSettings {
            consecutive_failures: 0,
            failure_rate: Some((0.5, 6, Duration::from_secs(10))),
            open_base: Duration::from_secs(1),
            open_max: Duration::from_secs(1),
        })
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let b = OpenBackoff {
            base: Duration::from_millis(100),
            max: Duration::from_millis(350),
            attempt: 0,
            last_ms: Arc::default(),
        };
        let got: Vec<u64> = b.take(4).map(|d| d.as_millis() as u64).collect();
        assert_eq!(got, vec![100, 200, 350, 350]);
    }

    #[test]
    fn opens_after_consecutive_failures_and_lets_one_probe_through() {
        failsafe::clock::freeze(|clock| {
            let b = breaker(3);
            for _ in 0..2 {
                assert!(b.admit().is_some());
                b.record(Outcome::Failure);
            }
            assert!(b.admit().is_some());
            b.record(Outcome::Success); // a success resets the count
            for _ in 0..3 {
                assert!(b.admit().is_some());
                b.record(Outcome::Failure);
            }
            assert!(b.admit().is_none(), "open after 3 failures in a row");
            assert!(b.is_open());
            assert_eq!(b.mirror.gauge.get(), 2);

            clock.advance(Duration::from_millis(101));
            let probe = b.admit();
            assert!(matches!(probe, Some(Admission::Probe)));
            assert!(b.admit().is_none(), "only one probe while half-open");
            b.record(Outcome::Failure);
            b.probe_in_flight.store(false, Ordering::SeqCst);
            assert!(b.admit().is_none(), "reopened");
            // The second open period is twice the first.
            clock.advance(Duration::from_millis(150));
            assert!(b.admit().is_none());
            clock.advance(Duration::from_millis(60));
            assert!(matches!(b.admit(), Some(Admission::Probe)));
            b.record(Outcome::Success);
            b.probe_in_flight.store(false, Ordering::SeqCst);
            assert!(
                matches!(b.admit(), Some(Admission::Normal)),
                "closed after a good probe"
            );
            assert_eq!(b.mirror.gauge.get(), 0);
        });
    }

    #[test]
    fn successes_skipped_on_the_fast_path_still_reset_the_count_after_a_failure() {
        let b = breaker(3);
        // Many successes with no failure: none needs failsafe, and none leaves a trace.
        for _ in 0..100 {
            assert!(matches!(b.admit(), Some(Admission::Normal)));
            b.record(Outcome::Success);
        }
        // Two failures, then successes: the first success after them resets the count, so
        // two more failures still leave the breaker closed...
        for round in 0..3 {
            b.record(Outcome::Failure);
            b.record(Outcome::Failure);
            b.record(Outcome::Success);
            b.record(Outcome::Success);
            assert!(b.admit().is_some(), "closed in round {round}");
        }
        // ...and three in a row open it.
        for _ in 0..3 {
            b.record(Outcome::Failure);
        }
        assert!(b.admit().is_none());
    }

    #[test]
    fn the_failure_rate_trips_on_mostly_failures_over_the_window_not_on_a_few() {
        failsafe::clock::freeze(|clock| {
            let b = rate_breaker();
            // The rate is judged once a whole window has been seen.
            clock.advance(Duration::from_secs(10));
            // One failure in five, for 20 s: healthy enough.
            for i in 0..40 {
                clock.advance(Duration::from_millis(500));
                assert!(b.admit().is_some(), "open too early");
                b.record(if i % 5 == 4 {
                    Outcome::Failure
                } else {
                    Outcome::Success
                });
            }
            // Then only failures: the rate over the window climbs past one half and trips.
            let mut failures = 0;
            while b.admit().is_some() {
                clock.advance(Duration::from_millis(500));
                b.record(Outcome::Failure);
                failures += 1;
                assert!(failures <= 20, "never tripped");
            }
            assert!(failures >= 3, "tripped after only {failures} failures");
            assert!(b.is_open());
        });
    }

    #[test]
    fn the_failure_rate_needs_a_minimum_of_requests_in_the_window() {
        failsafe::clock::freeze(|clock| {
            let b = rate_breaker();
            clock.advance(Duration::from_secs(10));
            // A failure every 3 s: never 6 requests within 10 s.
            for _ in 0..10 {
                clock.advance(Duration::from_secs(3));
                assert!(b.admit().is_some());
                b.record(Outcome::Failure);
            }
        });
    }
}
