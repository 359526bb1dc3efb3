//! CPU time and memory of proxy processes, read from `/proc` (Linux only):
//! what each topology costs besides latency.

use std::time::Duration;

/// `pid` and all its descendants (nginx's workers), parents first.
pub fn tree(pid: u32) -> Vec<u32> {
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() {
        let p = out[i];
        if let Ok(tasks) = std::fs::read_dir(format!("/proc/{p}/task")) {
            for t in tasks.flatten() {
                let children =
                    std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
                out.extend(
                    children
                        .split_whitespace()
                        .filter_map(|c| c.parse::<u32>().ok()),
                );
            }
        }
        i += 1;
    }
    out
}

/// User plus system CPU time used so far by `pids` (all their threads).
pub fn cpu_time(pids: &[u32]) -> Duration {
    let ticks: u64 = pids.iter().filter_map(|p| stat_ticks(*p)).sum();
    Duration::from_secs_f64(ticks as f64 / clock_ticks_per_sec() as f64)
}

/// The sum over `pids` of a `kB` field of `/proc/<pid>/status`, such as
/// `VmRSS` (resident now) or `VmHWM` (peak resident), in KiB.
pub fn status_kib(pids: &[u32], field: &str) -> u64 {
    pids.iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/status")).ok())
        .filter_map(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .sum()
}

/// utime + stime, in clock ticks.
fn stat_ticks(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces; fields resume after its ')'.
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // man 5 proc: utime is field 14, stime 15; `rest` starts at field 3.
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

fn clock_ticks_per_sec() -> u64 {
    static TCK: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *TCK.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            // USER_HZ is 100 on every Linux architecture we run on.
            .unwrap_or(100)
    })
}
