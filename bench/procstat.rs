//! What `/proc` says of a process: its CPU time and its context switches. Shared by
//! the load generator (`main.rs`) and the fixed-count profiler (`profile.rs`).

/// The pid of the first process whose `comm` is `comm` (a scan of `/proc`).
pub fn find_pid(comm: &str) -> Option<String> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let name = e.file_name().to_string_lossy().into_owned();
        name.parse::<u32>().ok()?;
        let c = std::fs::read_to_string(e.path().join("comm")).ok()?;
        (c.trim() == comm).then_some(name)
    })
}

/// utime + stime (clock ticks, 100 a second) of a process (`self` for this one).
pub fn cpu_ticks(pid: &str) -> u64 {
    let (user, system) = user_system_ticks(pid);
    user + system
}

/// utime and stime (clock ticks, 100 a second) of a process (`self` for this one).
pub fn user_system_ticks(pid: &str) -> (u64, u64) {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return (0, 0);
    };
    // Fields after the `(comm)`, which may contain spaces.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state); utime is field 14, stime 15.
    let get = |i: usize| {
        f.get(i - 3)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    (get(14), get(15))
}

/// Voluntary and involuntary context switches of every thread of a process.
#[allow(dead_code)] // the load generator reads CPU only
pub fn context_switches(pid: &str) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .map(|task| std::fs::read_to_string(task.path().join("status")).unwrap_or_default())
        .flat_map(|status| {
            status
                .lines()
                .filter_map(|line| {
                    line.strip_prefix("voluntary_ctxt_switches:")
                        .or_else(|| line.strip_prefix("nonvoluntary_ctxt_switches:"))
                        .and_then(|v| v.trim().parse::<u64>().ok())
                })
                .collect::<Vec<_>>()
        })
        .sum()
}
