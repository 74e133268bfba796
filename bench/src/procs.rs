//! CPU seconds and peak memory of process groups, read from `/proc` (Linux).

use std::fs;

/// CPU seconds (user + system) and peak resident memory of one process.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Usage {
    /// User + system CPU time, in seconds.
    pub cpu_s: f64,
    /// Peak resident set (`VmHWM`), in MiB.
    pub peak_mib: f64,
}

impl std::ops::Add for Usage {
    type Output = Usage;
    fn add(self, o: Usage) -> Usage {
        Usage { cpu_s: self.cpu_s + o.cpu_s, peak_mib: self.peak_mib + o.peak_mib }
    }
}

/// The usage of process `pid`, if it exists.
pub fn usage(pid: u32) -> Option<Usage> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let hwm_kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0.0);
    Some(Usage { cpu_s: ticks / 100.0, peak_mib: hwm_kib / 1024.0 })
}

/// The current resident set of process `pid`, in MiB.
pub fn rss_mib(pid: u32) -> Option<f64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: f64 = status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?.trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kib / 1024.0)
}

/// Every process whose command line contains `needle`.
pub fn find(needle: &str) -> Vec<u32> {
    let Ok(dir) = fs::read_dir("/proc") else { return Vec::new() };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| String::from_utf8_lossy(&c).contains(needle)))
        .collect()
}

/// The summed usage of `pids`.
pub fn total(pids: &[u32]) -> Usage {
    pids.iter().filter_map(|p| usage(*p)).fold(Usage::default(), |a, b| a + b)
}
