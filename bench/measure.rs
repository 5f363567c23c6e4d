//! Measuring a point: the measured window after the warm-up, latencies and their
//! percentiles, CPU per process over the window, and the table rows they print as.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use super::procstat;

/// Latencies (µs) of operations that ended inside the measured window.
pub(crate) struct Recorder {
    pub(crate) warm_end: Instant,
    pub(crate) end: Instant,
    pub(crate) lat: Vec<u32>,
    pub(crate) msgs: u64,
    /// Open-loop pacing: the next send time and the interval between sends.
    pub(crate) pace: Option<(Instant, Duration)>,
}

impl Recorder {
    pub(crate) fn new(w: Window, pace: Option<(Instant, Duration)>) -> Self {
        Recorder {
            warm_end: w.warm_end,
            end: w.end,
            lat: Vec::with_capacity(4096),
            msgs: 0,
            pace,
        }
    }
    /// Waits for the next paced send time, if paced.
    pub(crate) async fn wait_turn(&mut self) {
        if let Some((next, period)) = self.pace.as_mut() {
            tokio::time::sleep_until((*next).into()).await;
            *next += *period;
        }
    }
    /// Records one operation started at `t0` carrying `msgs` messages; false once over.
    /// An operation counts when it *completes* inside the window, wherever it started:
    /// counting only those that also started inside it would drop up to two
    /// latencies' worth of the window per publisher, which for 100-message batches
    /// taking 0.5 s (N = 64) is most of a 2 s window.
    pub(crate) fn record(&mut self, t0: Instant, msgs: u64) -> bool {
        let now = Instant::now();
        if now >= self.warm_end && now <= self.end {
            self.lat
                .push((now - t0).as_micros().min(u32::MAX as u128) as u32);
            self.msgs += msgs;
        }
        now < self.end
    }
}

#[derive(Clone, Copy)]
pub(crate) struct Window {
    pub(crate) warm_end: Instant,
    pub(crate) end: Instant,
    pub(crate) measured: Duration,
}

impl Window {
    pub(crate) fn new(seconds: f64) -> Self {
        let warm_end = Instant::now() + Duration::from_millis(500);
        let measured = Duration::from_secs_f64(seconds);
        Window {
            warm_end,
            end: warm_end + measured,
            measured,
        }
    }
}

impl Window {
    /// Samples the CPU of the processes over exactly this window, on a thread of its
    /// own so that a busy runtime cannot delay the samples.
    ///
    /// The CPU per message divides this by the operations that completed inside the
    /// same window (`Recorder::record`). That is more accurate than a probe around the
    /// whole point divided by every operation it completed: such a probe also charges
    /// the messages with the connections' set-up and teardown (channels, confirm mode,
    /// consumers, TCP accepts) and the cold start of the warm-up, whereas here the only
    /// error is the operations straddling the two edges, which cancel out in a steady
    /// state.
    pub(crate) fn probe(&self) -> std::thread::JoinHandle<[f64; 4]> {
        let (warm_end, end) = (self.warm_end, self.end);
        let pids = CpuProbe::pids();
        std::thread::spawn(move || {
            std::thread::sleep(warm_end.saturating_duration_since(Instant::now()));
            let probe = CpuProbe::start_with(pids);
            std::thread::sleep(end.saturating_duration_since(Instant::now()));
            probe.stop()
        })
    }
}

#[derive(Clone, Copy, Default, Debug)]
pub(crate) struct Stat {
    pub(crate) rate: f64,
    pub(crate) p50: f64,
    pub(crate) p99: f64,
    pub(crate) p999: f64,
    /// Percent of one core over the measured window: generator, warren, RabbitMQ, other.
    pub(crate) cpu: [f64; 4],
}

impl Stat {
    /// CPU time in µs per message of process `i` of `cpu` (1 warren, 2 RabbitMQ): CPU
    /// seconds over the window divided by the messages completed in it.
    pub(crate) fn us_per_msg(&self, i: usize) -> f64 {
        self.cpu[i] / 100.0 * 1e6 / self.rate
    }

    /// The `µs/msg gen/war/rmq` column (for direct AMQP the generator is the AMQP
    /// client, lapin: its CPU per message is the floor of a client built on it).
    pub(crate) fn fmt_us(&self) -> String {
        format!(
            "{:>6.1} {:>6.1} {:>6.1}",
            self.us_per_msg(0),
            self.us_per_msg(1),
            self.us_per_msg(2)
        )
    }
}

pub(crate) fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i] as f64 / 1000.0
}

pub(crate) fn summarize(recs: Vec<Recorder>, measured: Duration) -> Stat {
    let msgs: u64 = recs.iter().map(|r| r.msgs).sum();
    let mut lat: Vec<u32> = recs.into_iter().flat_map(|r| r.lat).collect();
    lat.sort_unstable();
    Stat {
        rate: msgs as f64 / measured.as_secs_f64(),
        p50: percentile(&lat, 0.50),
        p99: percentile(&lat, 0.99),
        p999: percentile(&lat, 0.999),
        cpu: [0.0; 4],
    }
}

// ---------------------------------------------------------------- CPU per process

/// Busy clock ticks of the whole machine (all CPUs; not idle, not iowait).
pub(crate) fn machine_busy_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        return 0;
    };
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest is inside user).
    v.iter().take(8).sum::<u64>() - v.get(3).unwrap_or(&0) - v.get(4).unwrap_or(&0)
}

/// CPU used by the load generator, Warren, RabbitMQ and everything else over an interval.
pub(crate) struct CpuProbe {
    pub(crate) pids: [String; 3],
    pub(crate) start: [u64; 3],
    pub(crate) machine: u64,
    pub(crate) t0: Instant,
}

/// The running Warren, whose CPU the probes measure (set by `Warren::start_on`).
pub(crate) static WARREN_PID: AtomicU32 = AtomicU32::new(0);

impl CpuProbe {
    pub(crate) fn start() -> Self {
        Self::start_with(Self::pids())
    }

    /// The generator, the current Warren and RabbitMQ (looked up once: a scan of /proc).
    pub(crate) fn pids() -> [String; 3] {
        [
            "self".to_owned(),
            WARREN_PID.load(Ordering::Relaxed).to_string(),
            procstat::find_pid("beam.smp").unwrap_or_else(|| "0".to_owned()),
        ]
    }

    pub(crate) fn start_with(pids: [String; 3]) -> Self {
        let start = [
            procstat::cpu_ticks(&pids[0]),
            procstat::cpu_ticks(&pids[1]),
            procstat::cpu_ticks(&pids[2]),
        ];
        CpuProbe {
            pids,
            start,
            machine: machine_busy_ticks(),
            t0: Instant::now(),
        }
    }
    /// Percent of one core for (generator, warren, rabbitmq, other processes).
    pub(crate) fn stop(&self) -> [f64; 4] {
        let secs = self.t0.elapsed().as_secs_f64();
        let pct = |ticks: u64| ticks as f64 / 100.0 / secs * 100.0; // USER_HZ = 100
        let mut out = [0.0; 4];
        for (o, (pid, start)) in out.iter_mut().zip(self.pids.iter().zip(self.start)) {
            *o = pct(procstat::cpu_ticks(pid).saturating_sub(start));
        }
        let all = pct(machine_busy_ticks().saturating_sub(self.machine));
        out[3] = (all - out[0] - out[1] - out[2]).max(0.0);
        out
    }
}

pub(crate) fn fmt_cpu(c: [f64; 4]) -> String {
    format!(
        "{:>4.0}% {:>4.0}% {:>4.0}% {:>4.0}%",
        c[0], c[1], c[2], c[3]
    )
}

/// The header of a table of closed-loop points (`unit`: msg/s, calls/s).
pub(crate) fn print_header(unit: &str, per: &str) {
    println!(
        "{:<22} {:>5} {:>10} {:>9} {:>9} {:>9}   {:>23}  {:>20}",
        "path",
        "conc",
        unit,
        "p50 ms",
        "p99 ms",
        "p99.9 ms",
        "CPU gen/war/rmq/other",
        format!("µs/{per} gen/war/rmq")
    );
}

pub(crate) fn print_row(name: &str, n: usize, s: &Stat) {
    println!(
        "{name:<22} {n:>5} {:>10.0} {:>9.2} {:>9.2} {:>9.2}   {}  {}",
        s.rate,
        s.p50,
        s.p99,
        s.p999,
        fmt_cpu(s.cpu),
        s.fmt_us()
    );
}
