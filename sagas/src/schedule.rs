//! Schedules: when a saga is started by the clock, without IO.
//!
//! A schedule fires on a cron expression (UTC) or once at a time. The runtime keeps each
//! schedule's next tick; when the clock passes it, [`due`] says which ticks to start a saga for
//! (by the schedule's [`Missed`] policy, when ticks were missed because no node ran) and when
//! the next one is. Each tick's saga is started with the idempotency key
//! [`tick_key`]`(name, tick)`, so a tick starts one saga however many nodes fire it, and
//! however often a node that died mid-way fires it again.
//!
//! Cron expressions have five fields (`minute hour day-of-month month day-of-week`) or six
//! with seconds first; each field is `*`, a number, a range `a-b`, a step `*/n` or `a-b/n`, or a
//! list of those separated by commas. Day of week is 0–6 from Sunday (7 is Sunday too). When
//! both day fields are restricted, a day matching either one matches (as in Vixie cron).
//! `@hourly`, `@daily`, `@weekly`, `@monthly` and `@yearly` stand for their usual expressions.

use serde::{Deserialize, Serialize};

use crate::ids::Timestamp;

/// When a schedule fires.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum When {
    /// On every tick of a cron expression, in UTC.
    Cron {
        /// The expression (see the module's documentation).
        expr: String,
    },
    /// Once, at this time (ms since the epoch).
    At {
        /// The time.
        at: Timestamp,
    },
}

/// What happens to ticks missed while no node could fire them (the nodes were down, the
/// database away): a tick is missed when it is found more than [`MISSED_AFTER_MS`] late.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Missed {
    /// Start one saga for the latest missed tick, then carry on with the next tick.
    #[default]
    FireOnce,
    /// Start a saga for every missed tick (at most [`MAX_CATCH_UP`], the latest ones).
    FireAll,
    /// Start nothing for missed ticks; carry on with the next tick.
    Skip,
}

impl Missed {
    /// Every policy.
    pub const ALL: [Self; 3] = [Self::FireOnce, Self::FireAll, Self::Skip];

    /// The policy's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::FireOnce => "fire_once",
            Self::FireAll => "fire_all",
            Self::Skip => "skip",
        }
    }

    /// The policy named `s`.
    pub fn parse(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|m| m.as_str() == s)
            .ok_or_else(|| format!("missed-tick policy `{s}` is not one of fire_once, fire_all, skip"))
    }
}

/// A tick found later than this (ms) was missed; an earlier one is just due.
pub const MISSED_AFTER_MS: u64 = 60_000;

/// Most ticks [`Missed::FireAll`] starts at once.
pub const MAX_CATCH_UP: usize = 100;

/// The idempotency key of the saga a schedule starts for a tick: the same tick starts one saga.
pub fn tick_key(schedule: &str, tick: Timestamp) -> String {
    format!("schedule/{schedule}/{}", tick.0)
}

/// A parsed cron expression.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cron {
    seconds: u64,
    minutes: u64,
    hours: u32,
    days: u32,
    months: u16,
    weekdays: u8,
    /// Whether the day-of-month and day-of-week fields were `*` (or `?`).
    any_day: bool,
    any_weekday: bool,
}

const MS_PER_DAY: u64 = 86_400_000;

/// Look this many days ahead for a matching day at most (covers every valid expression: the
/// rarest, February 29th, comes within 8 years).
const SEARCH_DAYS: u64 = 366 * 9;

impl Cron {
    /// Parse `expr`; the error says which field is wrong and why.
    pub fn parse(expr: &str) -> Result<Self, String> {
        let expanded = match expr.trim() {
            "@yearly" | "@annually" => "0 0 1 1 *",
            "@monthly" => "0 0 1 * *",
            "@weekly" => "0 0 * * 0",
            "@daily" | "@midnight" => "0 0 * * *",
            "@hourly" => "0 * * * *",
            other => other,
        };
        let fields: Vec<&str> = expanded.split_whitespace().collect();
        let (sec, rest) = match fields.len() {
            5 => ("0", &fields[..]),
            6 => (fields[0], &fields[1..]),
            n => {
                return Err(format!(
                    "`{expr}` has {n} fields; a cron expression has 5 (minute hour day month weekday) or 6 (seconds first)"
                ));
            }
        };
        let field = |name: &str, text: &str, lo: u32, hi: u32| field(text, lo, hi, hi).map_err(|e| format!("{name} field `{text}`: {e}"));
        // Day of week: `*` and `a/n` run to Saturday (6); 7 may be written for Sunday.
        let weekdays = self::field(rest[4], 0, 6, 7).map_err(|e| format!("day-of-week field `{}`: {e}", rest[4]))?;
        // 7 is Sunday too.
        let weekdays = (weekdays & 0x7f) | (weekdays >> 7 & 1);
        let any = |t: &str| t == "*" || t == "?";
        Ok(Self {
            seconds: field("second", sec, 0, 59)?,
            minutes: field("minute", rest[0], 0, 59)?,
            hours: u32::try_from(field("hour", rest[1], 0, 23)?).unwrap_or(0),
            days: u32::try_from(field("day-of-month", rest[2], 1, 31)?).unwrap_or(0),
            months: u16::try_from(field("month", rest[3], 1, 12)?).unwrap_or(0),
            weekdays: u8::try_from(weekdays).unwrap_or(0),
            any_day: any(rest[2]),
            any_weekday: any(rest[4]),
        })
    }

    fn day_matches(&self, day: u64) -> bool {
        let (_, month, dom) = civil_from_days(day);
        if self.months & (1 << month) == 0 {
            return false;
        }
        // 1970-01-01 was a Thursday (4).
        let weekday = (day + 4) % 7;
        let by_dom = self.days & (1 << dom) != 0;
        let by_dow = self.weekdays & (1 << weekday) != 0;
        match (self.any_day, self.any_weekday) {
            (true, true) => true,
            (false, true) => by_dom,
            (true, false) => by_dow,
            (false, false) => by_dom || by_dow,
        }
    }

    /// The first tick strictly after `t` (to the second), or `None` when there is none (an
    /// expression like `0 0 31 2 *` never matches).
    pub fn next_after(&self, t: Timestamp) -> Option<Timestamp> {
        let from = t.0 / 1000 + 1; // whole seconds, strictly after
        let first = from / 86_400;
        (first..first + SEARCH_DAYS).find_map(|day| {
            let second_of_day = if day == first { from % 86_400 } else { 0 };
            let s = if self.day_matches(day) { self.first_second_from(second_of_day)? } else { return None };
            Some(Timestamp(day * MS_PER_DAY + s * 1000))
        })
    }

    /// The first second of a day at or after `from` (seconds since midnight) that matches.
    fn first_second_from(&self, from: u64) -> Option<u64> {
        let (h0, m0, s0) = (from / 3600, from / 60 % 60, from % 60);
        for h in h0..24 {
            if self.hours & (1 << h) == 0 {
                continue;
            }
            let m_start = if h == h0 { m0 } else { 0 };
            for m in m_start..60 {
                if self.minutes & (1 << m) == 0 {
                    continue;
                }
                let s_start = if h == h0 && m == m0 { s0 } else { 0 };
                if let Some(s) = (s_start..60).find(|s| self.seconds & (1 << s) != 0) {
                    return Some(h * 3600 + m * 60 + s);
                }
            }
        }
        None
    }
}

/// One cron field as a bit set of the values it matches: `*` and `a/n` span `lo..=end`, a
/// number may be up to `hi`.
fn field(text: &str, lo: u32, end: u32, hi: u32) -> Result<u64, String> {
    let mut bits = 0u64;
    for part in text.split(',') {
        let (range, step) = match part.split_once('/') {
            Some((r, s)) => (r, s.parse::<u32>().map_err(|_| format!("step `{s}` is not a number"))?),
            None => (part, 1),
        };
        if step == 0 {
            return Err("a step of 0".into());
        }
        let (a, b) = match range {
            "*" | "?" => (lo, end),
            r => match r.split_once('-') {
                Some((a, b)) => (num(a, lo, hi)?, num(b, lo, hi)?),
                // `5/15` runs from 5 to the end, like `5-59/15`.
                None if part.contains('/') => (num(r, lo, hi)?, end),
                None => {
                    let n = num(r, lo, hi)?;
                    (n, n)
                }
            },
        };
        if a > b {
            return Err(format!("range `{range}` runs backwards"));
        }
        bits |= (a..=b).step_by(step as usize).fold(0, |acc, v| acc | 1 << v);
    }
    Ok(bits)
}

fn num(s: &str, lo: u32, hi: u32) -> Result<u32, String> {
    let n: u32 = s.parse().map_err(|_| format!("`{s}` is not a number"))?;
    if n < lo || n > hi {
        return Err(format!("{n} is outside {lo}-{hi}"));
    }
    Ok(n)
}

/// (year, month 1–12, day 1–31) of day `z` since 1970-01-01 (H. Hinnant's algorithm).
fn civil_from_days(z: u64) -> (u64, u32, u32) {
    let z = z + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = u32::try_from(doy - (153 * mp + 2) / 5 + 1).unwrap_or(1);
    let m = u32::try_from(if mp < 10 { mp + 3 } else { mp - 9 }).unwrap_or(1);
    (era * 400 + yoe + u64::from(m <= 2), m, d)
}

impl When {
    /// Check the schedule's timing: a cron expression that parses and has a tick.
    pub fn check(&self) -> Result<(), String> {
        match self {
            Self::Cron { expr } => {
                let c = Cron::parse(expr)?;
                c.next_after(Timestamp(0)).map(drop).ok_or_else(|| format!("`{expr}` never matches a day"))
            }
            Self::At { .. } => Ok(()),
        }
    }

    /// The first tick after `t` (an `At` schedule's only tick, if it is after `t`).
    pub fn next_after(&self, t: Timestamp) -> Option<Timestamp> {
        match self {
            Self::Cron { expr } => Cron::parse(expr).ok()?.next_after(t),
            Self::At { at } => (*at > t).then_some(*at),
        }
    }
}

/// What to do for a schedule whose next tick `next` has come, at `now`: the ticks to start a
/// saga for (oldest first) and the next tick after them (`None`: the schedule is done).
///
/// Ticks at most [`MISSED_AFTER_MS`] late are due and always fire; earlier ones were missed,
/// and `missed` says which of them fire.
pub fn due(when: &When, next: Timestamp, now: Timestamp, missed: Missed) -> (Vec<Timestamp>, Option<Timestamp>) {
    let cron = match when {
        When::Cron { expr } => Cron::parse(expr).ok(),
        When::At { .. } => None,
    };
    let next_after = |t: Timestamp| match (&cron, when) {
        (Some(c), _) => c.next_after(t),
        (None, When::At { at }) => (*at > t).then_some(*at),
        (None, When::Cron { .. }) => None,
    };
    // Missed ticks come before due ones: walk them in order (bounded: a second-by-second
    // schedule left for days jumps to the present after a million).
    let (mut fired_missed, mut due_now) = (std::collections::VecDeque::new(), Vec::new());
    let (mut walked, mut tick) = (0usize, Some(next));
    while let Some(t) = tick.filter(|t| *t <= now) {
        if now.ms_since(t) <= MISSED_AFTER_MS {
            due_now.push(t);
        } else {
            match missed {
                Missed::Skip => {}
                Missed::FireOnce => {
                    fired_missed.clear();
                    fired_missed.push_back(t);
                }
                Missed::FireAll => {
                    if fired_missed.len() == MAX_CATCH_UP {
                        fired_missed.pop_front();
                    }
                    fired_missed.push_back(t);
                }
            }
            walked += 1;
            if walked > 1_000_000 {
                tick = next_after(Timestamp(now.0.saturating_sub(MISSED_AFTER_MS + 1)));
                continue;
            }
        }
        tick = next_after(t);
    }
    let mut ticks: Vec<Timestamp> = fired_missed.into();
    ticks.extend(due_now);
    (ticks, tick)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// ms since the epoch of a UTC date and time.
    fn at(y: u64, mo: u64, d: u64, h: u64, mi: u64, s: u64) -> Timestamp {
        // days from civil (H. Hinnant)
        let (y, mo) = if mo <= 2 { (y - 1, mo + 9) } else { (y, mo - 3) };
        let era = y / 400;
        let yoe = y - era * 400;
        let doy = (153 * mo + 2) / 5 + d - 1;
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
        let days = era * 146_097 + doe - 719_468;
        Timestamp(days * MS_PER_DAY + (h * 3600 + mi * 60 + s) * 1000)
    }

    fn next(expr: &str, t: Timestamp) -> Timestamp {
        Cron::parse(expr).unwrap().next_after(t).unwrap()
    }

    #[test]
    fn cron_expressions_find_their_next_tick() {
        let t = at(2026, 11, 30, 19, 42, 17);
        assert_eq!(next("* * * * *", t), at(2026, 11, 30, 19, 43, 0));
        assert_eq!(next("*/2 * * * * *", t), at(2026, 11, 30, 19, 42, 18));
        assert_eq!(next("0 9 * * 1-5", t), at(2026, 12, 1, 9, 0, 0), "Tuesday");
        assert_eq!(next("30 2 1 * *", t), at(2026, 12, 1, 2, 30, 0));
        assert_eq!(next("0 0 29 2 *", t), at(2028, 2, 29, 0, 0, 0), "the next leap day");
        assert_eq!(next("@weekly", t), at(2026, 12, 6, 0, 0, 0), "Sunday");
        assert_eq!(next("0 12 * * 7", t), at(2026, 12, 6, 12, 0, 0), "7 is Sunday");
        assert_eq!(next("0 0 13 * 5", at(2026, 11, 30, 0, 0, 0)), at(2026, 12, 4, 0, 0, 0), "either day field matches");
        assert_eq!(next("15,45 * * * *", at(2026, 11, 30, 19, 45, 0)), at(2026, 11, 30, 20, 15, 0), "strictly after");
        assert_eq!(next("5/20 * * * *", t), at(2026, 11, 30, 19, 45, 0));
        assert_eq!(next("59 23 31 12 *", at(2026, 12, 31, 23, 59, 30)), at(2027, 12, 31, 23, 59, 0));
    }

    #[test]
    fn bad_expressions_say_what_is_wrong() {
        for (expr, says) in [
            ("* * * *", "4 fields"),
            ("60 * * * *", "minute field `60`: 60 is outside 0-59"),
            ("* 5-2 * * *", "runs backwards"),
            ("*/0 * * * *", "a step of 0"),
            ("* * * jan *", "`jan` is not a number"),
            ("0 0 32 * *", "day-of-month"),
        ] {
            let e = Cron::parse(expr).unwrap_err();
            assert!(e.contains(says), "{expr}: {e}");
        }
        assert!(When::Cron { expr: "0 0 31 2 *".into() }.check().unwrap_err().contains("never matches"));
    }

    #[test]
    fn missed_ticks_follow_the_policy() {
        let every_minute = When::Cron { expr: "* * * * *".into() };
        let next = at(2026, 11, 30, 10, 0, 0);
        // On time (a few seconds late): that tick, then the next minute.
        let (ticks, after) = due(&every_minute, next, next.plus_ms(3_000), Missed::Skip);
        assert_eq!((ticks, after), (vec![next], Some(at(2026, 11, 30, 10, 1, 0))));
        // Ten minutes down: 10:00 … 10:09 were missed, 10:10 is due now.
        let now = at(2026, 11, 30, 10, 10, 20);
        let (skip, after) = due(&every_minute, next, now, Missed::Skip);
        assert_eq!(skip, vec![at(2026, 11, 30, 10, 10, 0)]);
        assert_eq!(after, Some(at(2026, 11, 30, 10, 11, 0)));
        let (once, _) = due(&every_minute, next, now, Missed::FireOnce);
        assert_eq!(once, vec![at(2026, 11, 30, 10, 9, 0), at(2026, 11, 30, 10, 10, 0)], "the latest missed, then the due one");
        let (all, _) = due(&every_minute, next, now, Missed::FireAll);
        assert_eq!(all.len(), 11);
        assert_eq!(all[0], next);
        // Days of a per-second schedule: at most MAX_CATCH_UP, the latest.
        let per_second = When::Cron { expr: "* * * * * *".into() };
        let (all, after) = due(&per_second, next, next.plus_ms(2 * MS_PER_DAY), Missed::FireAll);
        assert_eq!(all.len(), MAX_CATCH_UP + 61, "the latest missed ones, and every one of the last minute");
        assert!(all.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(after, Some(next.plus_ms(2 * MS_PER_DAY + 1000)));
        // A one-off: its tick, then nothing.
        let once = When::At { at: next };
        assert_eq!(due(&once, next, next.plus_ms(10), Missed::Skip), (vec![next], None));
        assert_eq!(due(&once, next, next.plus_ms(MS_PER_DAY), Missed::Skip), (vec![], None), "missed and skipped");
    }

    #[test]
    fn a_tick_s_key_is_the_same_whoever_fires_it() {
        assert_eq!(tick_key("nightly", Timestamp(1_000)), "schedule/nightly/1000");
    }
}
