//! Speed figures a reader can trust: timings repeated and summarized by their median and spread
//! ([`median_spread`]), and how busy the machine was meanwhile ([`LoadProbe`]): the load average
//! before and after, and the share of every core's time that other processes (or the hypervisor)
//! took, read from `/proc` (Linux; elsewhere there is no probe). A figure measured while others
//! took more than [`UNDER_LOAD`] of the machine is marked as such in reports.

use serde::{Deserialize, Serialize};

/// The share of the machine's CPU time taken by others above which a timing counts as measured
/// under load.
pub const UNDER_LOAD: f64 = 0.10;

/// The machine's load around one timing.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MachineLoad {
    /// The 1-minute load average when the timing started and when it ended (this process's own
    /// threads count in the second).
    pub loadavg_before: f64,
    pub loadavg_after: f64,
    /// The share of all cores' time, over the timing, that other processes used or the
    /// hypervisor took (steal): 0 on an idle machine.
    pub others: f64,
}

impl MachineLoad {
    /// Whether others took more than [`UNDER_LOAD`] of the machine during the timing.
    pub fn under_load(&self) -> bool {
        self.others > UNDER_LOAD
    }

    /// What a report says beside a figure measured under load (nothing otherwise).
    pub fn note(&self) -> Option<String> {
        self.under_load().then(|| {
            format!(
                "under load: others took {:.0}% of the CPU (load average {:.2} → {:.2})",
                self.others * 100.0,
                self.loadavg_before,
                self.loadavg_after
            )
        })
    }
}

/// The median of `samples` (the mean of the middle two when even) and their spread, the slowest
/// over the fastest (1 = none); `(0, 1)` for no samples.
pub fn median_spread(samples: &[f64]) -> (f64, f64) {
    let mut s = samples.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    match n {
        0 => (0.0, 1.0),
        _ => {
            let median = match n % 2 {
                1 => s[n / 2],
                _ => (s[n / 2 - 1] + s[n / 2]) / 2.0,
            };
            let spread = if s[0] > 0.0 { s[n - 1] / s[0] } else { 1.0 };
            (median, spread)
        }
    }
}

/// A wall-clock timing with the machine's load over it.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    start: std::time::Instant,
    probe: Option<LoadProbe>,
}

impl Timing {
    pub fn start() -> Self {
        Self {
            probe: LoadProbe::start(),
            start: std::time::Instant::now(),
        }
    }

    /// Seconds since the start.
    pub fn elapsed_s(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }

    /// The machine's load since the start, where it can be read.
    pub fn load(&self) -> Option<MachineLoad> {
        self.probe.as_ref().and_then(LoadProbe::finish)
    }
}

/// A reading of the machine's counters when a timing starts.
#[derive(Debug, Clone, Copy)]
pub struct LoadProbe {
    loadavg: f64,
    cpu: CpuTimes,
    own: u64,
}

/// All cores' time and busy time (clock ticks) from the `cpu` line of `/proc/stat`.
#[derive(Debug, Clone, Copy, PartialEq)]
struct CpuTimes {
    total: u64,
    busy: u64,
}

impl LoadProbe {
    /// Reads the counters now; `None` where `/proc` is not there.
    pub fn start() -> Option<Self> {
        Some(Self {
            loadavg: read_loadavg()?,
            cpu: read_cpu()?,
            own: read_own()?,
        })
    }

    /// The load since [`LoadProbe::start`].
    pub fn finish(&self) -> Option<MachineLoad> {
        let (loadavg, cpu, own) = (read_loadavg()?, read_cpu()?, read_own()?);
        Some(load_between(self, &LoadProbe { loadavg, cpu, own }))
    }
}

fn load_between(start: &LoadProbe, end: &LoadProbe) -> MachineLoad {
    let total = end.cpu.total.saturating_sub(start.cpu.total);
    let busy = end.cpu.busy.saturating_sub(start.cpu.busy);
    let own = end.own.saturating_sub(start.own);
    MachineLoad {
        loadavg_before: start.loadavg,
        loadavg_after: end.loadavg,
        others: match total {
            0 => 0.0,
            t => (busy.saturating_sub(own) as f64 / t as f64).clamp(0.0, 1.0),
        },
    }
}

fn read_loadavg() -> Option<f64> {
    parse_loadavg(&std::fs::read_to_string("/proc/loadavg").ok()?)
}

fn read_cpu() -> Option<CpuTimes> {
    parse_cpu(&std::fs::read_to_string("/proc/stat").ok()?)
}

fn read_own() -> Option<u64> {
    parse_own(&std::fs::read_to_string("/proc/self/stat").ok()?)
}

fn parse_loadavg(text: &str) -> Option<f64> {
    text.split_whitespace().next()?.parse().ok()
}

/// `cpu  user nice system idle iowait irq softirq steal guest guest_nice`: idle and iowait are
/// idle; guest time is already inside user and nice.
fn parse_cpu(text: &str) -> Option<CpuTimes> {
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    let total: u64 = v.iter().sum();
    let idle = v.get(3)? + v.get(4).copied().unwrap_or(0);
    Some(CpuTimes {
        total,
        busy: total - idle,
    })
}

/// This process's user and system time (fields 14 and 15 of `/proc/self/stat`, counted after
/// the command name, which may hold spaces, in parentheses).
fn parse_own(text: &str) -> Option<u64> {
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After ")": state is field 3, so utime (14) and stime (15) are at 11 and 12.
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

#[cfg(test)]
mod tests;
