//! Retry and timeout policies: plain serde data stored with the definition and evaluated by
//! [`decide`](crate::decide()). Saga retries survive restarts because the runtime turns each
//! scheduled retry into a timer row.

use std::num::NonZeroU32;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::ids::{CommandKind, SagaId, StepIndex};

/// How long to wait before attempt `n + 1` after attempt `n` failed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Backoff {
    /// The same delay before every retry.
    Fixed {
        /// Delay in milliseconds.
        delay_ms: u64,
    },
    /// `initial_ms * factor^(n-1)`, capped at `max_ms`.
    Exponential {
        /// Delay before the first retry, in milliseconds.
        initial_ms: u64,
        /// Growth factor per retry (≥ 1.0).
        factor: f64,
        /// Upper bound of any delay, in milliseconds.
        max_ms: u64,
    },
}

/// How often and how fast a command is retried after a transient failure (or a timeout whose
/// consequence is [`OnTimeout::Retry`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RetryPolicy {
    /// The delay schedule.
    pub backoff: Backoff,
    /// Attempts in all, the first one included; `None` retries until the command succeeds.
    pub max_attempts: Option<NonZeroU32>,
    /// Share of each delay, in per mille (0..=1000), taken off at random. Deterministic per
    /// (saga, step, attempt) so that `decide` stays pure. Spreads retries of many sagas that
    /// failed together.
    #[serde(default)]
    pub jitter_permille: u16,
}

impl RetryPolicy {
    /// Never retry: the first failure is final.
    pub fn none() -> Self {
        Self { backoff: Backoff::Fixed { delay_ms: 0 }, max_attempts: NonZeroU32::new(1), jitter_permille: 0 }
    }

    /// A fixed delay between at most `max_attempts` attempts.
    pub fn fixed(delay: Duration, max_attempts: u32) -> Self {
        Self { backoff: Backoff::Fixed { delay_ms: millis(delay) }, max_attempts: NonZeroU32::new(max_attempts), jitter_permille: 0 }
    }

    /// Exponential backoff from `initial`, growing by `factor`, capped at 60 s, at most
    /// `max_attempts` attempts. Use [`max_delay`](Self::max_delay) and [`jitter`](Self::jitter)
    /// to tune it.
    pub fn exponential(initial: Duration, factor: f64, max_attempts: u32) -> Self {
        Self {
            backoff: Backoff::Exponential { initial_ms: millis(initial), factor, max_ms: 60_000 },
            max_attempts: NonZeroU32::new(max_attempts),
            jitter_permille: 0,
        }
    }

    /// Retry without limit (the delay schedule still applies).
    pub fn forever(mut self) -> Self {
        self.max_attempts = None;
        self
    }

    /// Cap every delay at `max`.
    pub fn max_delay(mut self, max: Duration) -> Self {
        match &mut self.backoff {
            Backoff::Fixed { delay_ms } => *delay_ms = (*delay_ms).min(millis(max)),
            Backoff::Exponential { max_ms, .. } => *max_ms = millis(max),
        }
        self
    }

    /// Take up to `ratio` (0.0..=1.0) of each delay off at random.
    pub fn jitter(mut self, ratio: f64) -> Self {
        let clamped = if ratio.is_finite() { ratio.clamp(0.0, 1.0) } else { 0.0 };
        // In 0.0..=1000.0 after the clamp, so the conversion is exact enough and in range.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let permille = (clamped * 1000.0).round() as u16;
        self.jitter_permille = permille;
        self
    }

    /// Whether attempt `attempt` (1-based) may be followed by another one.
    pub fn allows_after(&self, attempt: u32) -> bool {
        self.max_attempts.is_none_or(|max| attempt < max.get())
    }

    /// The delay before the attempt after `attempt` (1-based), jittered deterministically.
    pub fn delay_after(&self, attempt: u32, saga: SagaId, step: StepIndex, kind: CommandKind) -> u64 {
        let base = match self.backoff {
            Backoff::Fixed { delay_ms } => delay_ms,
            Backoff::Exponential { initial_ms, factor, max_ms } => {
                let exp = i32::try_from(attempt.saturating_sub(1)).unwrap_or(i32::MAX).min(1024);
                let factor = if factor.is_finite() && factor >= 1.0 { factor } else { 1.0 };
                let raw = (initial_ms as f64) * factor.powi(exp);
                let capped = raw.min(max_ms as f64).max(0.0);
                // Clamped to 0..=max_ms above, so it fits in a u64.
                #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
                let ms = capped as u64;
                ms
            }
        };
        if self.jitter_permille == 0 || base == 0 {
            return base;
        }
        let roll = mix(saga, step, kind, attempt) % 1001; // 0..=1000
        let cut = base / 1000 * u64::from(self.jitter_permille) * roll / 1000;
        base - cut.min(base)
    }

    /// The default for commands: exponential from 200 ms, doubling, capped at 30 s, 5 attempts,
    /// 10 % jitter.
    pub fn default_invoke() -> Self {
        Self::exponential(Duration::from_millis(200), 2.0, 5).max_delay(Duration::from_secs(30)).jitter(0.1)
    }

    /// The default for compensations: exponential from 500 ms, doubling, capped at 60 s,
    /// 10 attempts, 10 % jitter. When they are spent the saga stops in `compensation_failed`.
    pub fn default_compensate() -> Self {
        Self::exponential(Duration::from_millis(500), 2.0, 10).max_delay(Duration::from_secs(60)).jitter(0.1)
    }

    /// The default for retriable steps (after the pivot): like [`default_invoke`](Self::default_invoke)
    /// but without an attempt limit.
    pub fn default_retriable() -> Self {
        Self::default_invoke().forever()
    }

    pub(crate) fn validate(&self) -> Result<(), String> {
        if let Backoff::Exponential { factor, .. } = self.backoff
            && !(factor.is_finite() && factor >= 1.0)
        {
            return Err(format!("exponential backoff factor must be a finite number >= 1.0, got {factor}"));
        }
        if self.jitter_permille > 1000 {
            return Err(format!("jitter must be at most 1000 per mille, got {}", self.jitter_permille));
        }
        Ok(())
    }
}

/// What happens when a command gets no reply within its step's timeout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnTimeout {
    /// Send the command again under the step's retry policy (the participant dedupes a repeated
    /// step, so an attempt that did run is not applied twice). When the policy is spent the step
    /// fails as in [`Fail`](Self::Fail).
    Retry,
    /// Fail the step. Its command may have run, so its compensation runs too (compensations must
    /// tolerate a command that never ran). After the pivot the saga stops in `timed_out`.
    Fail,
    /// Emit an `escalated` event for an operator and keep waiting for the reply.
    Escalate,
}

/// A step's timeout: how long to wait for a reply, and what to do when it does not come.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimeoutPolicy {
    /// Time allowed for each attempt, in milliseconds.
    pub after_ms: u64,
    /// The consequence.
    pub then: OnTimeout,
}

/// What happens when a wait for an external event passes its deadline.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnDeadline {
    /// Fail the saga: compensate the completed steps.
    Fail,
    /// Carry on without the event.
    Continue,
}

pub(crate) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// A small deterministic mix (splitmix64) of the retry's identity, for jitter.
fn mix(saga: SagaId, step: StepIndex, kind: CommandKind, attempt: u32) -> u64 {
    let (hi, lo) = saga.0.as_u64_pair();
    let mut x = hi ^ lo.rotate_left(17) ^ (u64::from(step.0) << 32) ^ u64::from(attempt) ^ (kind as u64) << 63;
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    #[test]
    fn exponential_grows_caps_and_jitters_within_bounds() {
        let p = RetryPolicy::exponential(Duration::from_millis(100), 2.0, 10).max_delay(Duration::from_millis(1000));
        let id = SagaId(Uuid::from_u128(7));
        let d: Vec<u64> = (1..=6).map(|a| p.delay_after(a, id, StepIndex(0), CommandKind::Invoke)).collect();
        assert_eq!(d, vec![100, 200, 400, 800, 1000, 1000]);
        let j = p.clone().jitter(0.5);
        for a in 1..=6 {
            let v = j.delay_after(a, id, StepIndex(0), CommandKind::Invoke);
            assert!(v <= d[a as usize - 1] && v >= d[a as usize - 1] / 2, "attempt {a}: {v}");
            assert_eq!(v, j.delay_after(a, id, StepIndex(0), CommandKind::Invoke), "deterministic");
        }
    }

    #[test]
    fn attempt_limits() {
        let p = RetryPolicy::fixed(Duration::from_millis(10), 3);
        assert!(p.allows_after(1) && p.allows_after(2) && !p.allows_after(3));
        assert!(!RetryPolicy::none().allows_after(1));
        assert!(RetryPolicy::default_retriable().allows_after(1_000_000));
    }
}
