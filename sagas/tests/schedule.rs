//! Property tests of schedules: random cron expressions and clocks.
//!
//! 1. the next tick is strictly later, matches every field (checked by a naive evaluator of
//!    the expression, not the parser's bit sets), and no second before it matches;
//! 2. `due`, called at random moments by a node that is sometimes down, fires every tick at
//!    most once, in order, never before its time; every tick found on time fires; missed ones
//!    follow the policy.

use std::collections::BTreeSet;

use proptest::prelude::*;
use sagas::Timestamp;
use sagas::schedule::{Cron, MAX_CATCH_UP, MISSED_AFTER_MS, Missed, When, due};

/// One field's text, from `lo..=hi`.
fn field(lo: u32, hi: u32) -> impl Strategy<Value = String> {
    prop_oneof![
        2 => Just("*".to_owned()),
        2 => (lo..=hi).prop_map(|n| n.to_string()),
        1 => (lo..=hi, lo..=hi).prop_map(|(a, b)| format!("{}-{}", a.min(b), a.max(b))),
        1 => (1u32..=7).prop_map(|s| format!("*/{s}")),
        1 => (lo..=hi, 1u32..=5).prop_map(|(a, s)| format!("{a}/{s}")),
        1 => (lo..=hi, lo..=hi).prop_map(|(a, b)| format!("{a},{b}")),
    ]
}

fn expr() -> impl Strategy<Value = String> {
    (field(0, 59), field(0, 59), field(0, 23), field(1, 28), field(1, 12), field(0, 6))
        .prop_map(|(s, mi, h, d, mo, w)| format!("{s} {mi} {h} {d} {mo} {w}"))
}

/// Whether `v` is in field `text` (read naively, part by part).
fn in_field(text: &str, v: u32, lo: u32, hi: u32) -> bool {
    text.split(',').any(|part| {
        let (range, step) = part.split_once('/').map_or((part, 1), |(r, s)| (r, s.parse::<u32>().unwrap()));
        let (a, b) = if range == "*" {
            (lo, hi)
        } else if let Some((a, b)) = range.split_once('-') {
            (a.parse().unwrap(), b.parse().unwrap())
        } else if part.contains('/') {
            (range.parse().unwrap(), hi)
        } else {
            let n = range.parse().unwrap();
            (n, n)
        };
        v >= a && v <= b && (v - a).is_multiple_of(step)
    })
}

/// (year, month, day, weekday from Sunday, hour, minute, second) of `t`, counted naively.
fn civil(t: Timestamp) -> (u32, u32, u32, u32, u32, u32, u32) {
    let secs = t.0 / 1000;
    let (mut days, rest) = (secs / 86_400, secs % 86_400);
    let weekday = u32::try_from((days + 4) % 7).unwrap();
    let is_leap = |y: u32| y.is_multiple_of(4) && (!y.is_multiple_of(100) || y.is_multiple_of(400));
    let mut year = 1970u32;
    loop {
        let len: u64 = if is_leap(year) { 366 } else { 365 };
        if days < len {
            break;
        }
        days -= len;
        year += 1;
    }
    let leap = is_leap(year);
    let lens: [u64; 12] = [31, if leap { 29 } else { 28 }, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];
    let mut month = 0;
    while days >= lens[month] {
        days -= lens[month];
        month += 1;
    }
    let r = |x: u64| u32::try_from(x).unwrap();
    (year, r(month as u64 + 1), r(days + 1), weekday, r(rest / 3600), r(rest / 60 % 60), r(rest % 60))
}

fn matches(expr: &str, t: Timestamp) -> bool {
    let f: Vec<&str> = expr.split_whitespace().collect();
    let (_, mo, d, w, h, mi, s) = civil(t);
    let day = match (f[3] == "*", f[5] == "*") {
        (true, true) => true,
        (false, true) => in_field(f[3], d, 1, 31),
        (true, false) => in_field(f[5], w, 0, 6),
        (false, false) => in_field(f[3], d, 1, 31) || in_field(f[5], w, 0, 6),
    };
    t.0.is_multiple_of(1000)
        && in_field(f[0], s, 0, 59)
        && in_field(f[1], mi, 0, 59)
        && in_field(f[2], h, 0, 23)
        && in_field(f[4], mo, 1, 12)
        && day
}

proptest! {
    #![proptest_config(ProptestConfig { cases: std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(256), ..ProptestConfig::default() })]

    #[test]
    fn the_next_tick_is_the_first_second_that_matches(expr in expr(), t in 946_684_800_000u64..4_102_444_800_000, probe in 0u64..1000) {
        let cron = Cron::parse(&expr).unwrap();
        let t = Timestamp(t);
        let n = cron.next_after(t).expect("days 1-28 exist in every month");
        prop_assert!(n > t);
        prop_assert!(matches(&expr, n), "{expr}: {n:?} does not match");
        // Nothing in between: from any moment in [t, n) the next tick is n.
        let between = Timestamp(t.0 + (n.0 - t.0 - 1) / 1000 * probe);
        prop_assert_eq!(cron.next_after(between), Some(n));
        // When the gap is short, check every second of it.
        if n.0 - t.0 <= 3_600_000 {
            let mut s = (t.0 / 1000 + 1) * 1000;
            while s < n.0 {
                prop_assert!(!matches(&expr, Timestamp(s)), "{expr}: {s} matches before {n:?}");
                s += 1000;
            }
        }
    }

    #[test]
    fn a_node_polling_fires_each_tick_once_and_in_order(
        secs in 1u64..30,
        policy in prop::sample::select(Missed::ALL.to_vec()),
        // Gaps between polls: mostly short, sometimes a node outage of minutes.
        gaps in prop::collection::vec(prop_oneof![8 => 100u64..3_000, 1 => 60_000u64..900_000], 1..60),
    ) {
        let when = When::Cron { expr: format!("*/{secs} * * * * *") };
        let start = Timestamp(1_767_225_600_000);
        let mut next = when.next_after(start);
        let (mut now, mut fired) = (start, Vec::<Timestamp>::new());
        for gap in gaps {
            now = now.plus_ms(gap);
            let Some(n) = next else { break };
            if n > now {
                continue;
            }
            let (ticks, after) = due(&when, n, now, policy);
            prop_assert!(ticks.windows(2).all(|w| w[0] < w[1]), "in order");
            prop_assert!(ticks.iter().all(|t| *t >= n && *t <= now), "none early, none before the stored next");
            prop_assert!(after.is_some_and(|a| a > now), "the next tick is in the future");
            let late: Vec<&Timestamp> = ticks.iter().filter(|t| now.ms_since(**t) > MISSED_AFTER_MS).collect();
            match policy {
                Missed::Skip => prop_assert!(late.is_empty()),
                Missed::FireOnce => prop_assert!(late.len() <= 1),
                Missed::FireAll => prop_assert!(late.len() <= MAX_CATCH_UP),
            }
            // Every tick found on time fires.
            let mut t = n;
            while t <= now {
                if now.ms_since(t) <= MISSED_AFTER_MS {
                    prop_assert!(ticks.contains(&t), "{t:?} was on time at {now:?} and did not fire");
                }
                t = when.next_after(t).unwrap();
            }
            fired.extend(ticks);
            next = after;
        }
        let unique: BTreeSet<&Timestamp> = fired.iter().collect();
        prop_assert_eq!(unique.len(), fired.len(), "no tick fired twice");
        prop_assert!(fired.windows(2).all(|w| w[0] < w[1]));
    }
}
