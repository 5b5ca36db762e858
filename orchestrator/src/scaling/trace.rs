//! Arrival traces for the scaling simulator: the calls of one model (when each arrives,
//! how long it lasts), their CSV file format, and a seeded generator of a call-centre
//! day. Pure: the same parameters and seed always give the same trace.
//!
//! The file format is CSV with the header `arrival_ms,duration_ms` and one call per
//! line, sorted by arrival (milliseconds since the trace's start).
//!
//! The generator ([`generate`]) models an emergency call centre:
//!
//! - a daily curve: a night trough around 04:00 at a fraction of the peak, peaks late
//!   in the morning and early in the evening, arrivals a non-homogeneous Poisson
//!   process drawn by thinning;
//! - random bursts (an incident: a fire, a crash, many callers at once), themselves a
//!   Poisson process, each adding dozens of calls at once that die down over a minute
//!   or two (a sharp onset, then an exponential decay);
//! - heavy-tailed call lengths: log-normal (most calls are short, a few go on for
//!   very long), capped.

use std::io;
use std::str::FromStr;
use std::time::Duration;

use clap::Args;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Exp, LogNormal, Poisson};
use thiserror::Error;

/// The CSV header of a trace file.
pub const CSV_HEADER: &str = "arrival_ms,duration_ms";

/// One call of a trace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Call {
    /// Since the start of the trace.
    pub arrival: Duration,
    /// How long the call lasts once it has a worker.
    pub duration: Duration,
}

/// The calls of one model, sorted by arrival, over a span of time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Trace {
    calls: Vec<Call>,
    span: Duration,
}

impl Trace {
    /// A trace of `calls` (sorted here) lasting `span`, or until its last call ends if
    /// that is later.
    pub fn new(mut calls: Vec<Call>, span: Duration) -> Self {
        calls.sort_by_key(|c| c.arrival);
        let last_end = calls
            .iter()
            .map(|c| c.arrival + c.duration)
            .max()
            .unwrap_or_default();
        Self {
            calls,
            span: span.max(last_end),
        }
    }

    pub fn calls(&self) -> &[Call] {
        &self.calls
    }

    /// From the trace's start to its end: at least until the last call ends.
    pub fn span(&self) -> Duration {
        self.span
    }

    /// Writes the trace as CSV (its span is not written: a trace read back ends with
    /// its last call).
    pub fn write_csv(&self, mut out: impl io::Write) -> io::Result<()> {
        writeln!(out, "{CSV_HEADER}")?;
        for call in &self.calls {
            writeln!(
                out,
                "{},{}",
                call.arrival.as_millis(),
                call.duration.as_millis()
            )?;
        }
        Ok(())
    }

    /// What a trace looks like at a glance.
    pub fn summary(&self) -> TraceSummary {
        let mut lengths: Vec<Duration> = self.calls.iter().map(|c| c.duration).collect();
        lengths.sort_unstable();
        TraceSummary {
            calls: self.calls.len(),
            span: self.span,
            peak_per_minute: self.per_minute().into_iter().max().unwrap_or(0),
            length_p50: percentile(&lengths, 0.50),
            length_p99: percentile(&lengths, 0.99),
        }
    }

    /// Arrivals in each whole minute since the start.
    pub fn per_minute(&self) -> Vec<u32> {
        let minutes = self.span.as_secs().div_ceil(60) as usize;
        let mut counts = vec![0; minutes.max(1)];
        for call in &self.calls {
            counts[(call.arrival.as_secs() / 60) as usize] += 1;
        }
        counts
    }
}

/// A trace at a glance: what `asr trace` prints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceSummary {
    pub calls: usize,
    pub span: Duration,
    /// The most arrivals in one minute.
    pub peak_per_minute: u32,
    pub length_p50: Duration,
    pub length_p99: Duration,
}

/// The value below which a `fraction` of the `sorted` values lie (nearest rank); zero
/// for no values.
pub fn percentile(sorted: &[Duration], fraction: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = (fraction * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Why a trace file does not parse; lines count from 1, the header being line 1.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum TraceError {
    #[error("the trace is empty: expected the header `{CSV_HEADER}`")]
    Empty,
    #[error("line 1: expected the header `{CSV_HEADER}`, found `{found}`")]
    Header { found: String },
    #[error("line {line}: expected 2 fields `{CSV_HEADER}`, found {fields}")]
    FieldCount { line: usize, fields: usize },
    #[error("line {line}: {field} `{value}` is not a whole number of milliseconds")]
    Number {
        line: usize,
        field: &'static str,
        value: String,
    },
    #[error(
        "line {line}: arrival {arrival_ms} ms comes before the previous call's \
         {previous_ms} ms: a trace is sorted by arrival"
    )]
    Unsorted {
        line: usize,
        arrival_ms: u64,
        previous_ms: u64,
    },
}

impl FromStr for Trace {
    type Err = TraceError;

    /// Parses a trace file; blank lines are skipped. Its span ends with its last call.
    fn from_str(text: &str) -> Result<Self, TraceError> {
        let mut lines = text.lines().enumerate().map(|(i, l)| (i + 1, l.trim()));
        let (_, header) = lines.next().ok_or(TraceError::Empty)?;
        if header != CSV_HEADER {
            return Err(TraceError::Header {
                found: header.to_string(),
            });
        }
        let mut calls = Vec::new();
        let mut previous_ms = 0;
        for (line, text) in lines.filter(|(_, l)| !l.is_empty()) {
            let fields: Vec<&str> = text.split(',').map(str::trim).collect();
            let [arrival, duration] = fields[..] else {
                return Err(TraceError::FieldCount {
                    line,
                    fields: fields.len(),
                });
            };
            let millis = |field: &'static str, value: &str| {
                value.parse::<u64>().map_err(|_| TraceError::Number {
                    line,
                    field,
                    value: value.to_string(),
                })
            };
            let arrival_ms = millis("arrival_ms", arrival)?;
            let duration_ms = millis("duration_ms", duration)?;
            if arrival_ms < previous_ms {
                return Err(TraceError::Unsorted {
                    line,
                    arrival_ms,
                    previous_ms,
                });
            }
            previous_ms = arrival_ms;
            calls.push(Call {
                arrival: Duration::from_millis(arrival_ms),
                duration: Duration::from_millis(duration_ms),
            });
        }
        Ok(Trace::new(calls, Duration::ZERO))
    }
}

/// The generator's parameters; the defaults look like an emergency call centre's day
/// with enough load, daily swing and bursts for the scaling policies to differ.
#[derive(Args, Clone, Debug, PartialEq)]
pub struct TraceParams {
    /// Length of the trace, from midnight.
    #[arg(long, default_value_t = TraceParams::DEFAULT.duration_hours)]
    pub duration_hours: f64,
    /// Calls per minute at the daily peaks (late morning, early evening), bursts aside.
    #[arg(long, default_value_t = TraceParams::DEFAULT.peak_calls_per_minute)]
    pub peak_calls_per_minute: f64,
    /// The rate at the night trough (04:00), as a fraction of the peak.
    #[arg(long, default_value_t = TraceParams::DEFAULT.trough_fraction)]
    pub trough_fraction: f64,
    /// Incidents per day, each a burst of calls.
    #[arg(long, default_value_t = TraceParams::DEFAULT.bursts_per_day)]
    pub bursts_per_day: f64,
    /// Mean calls one burst adds (Poisson).
    #[arg(long, default_value_t = TraceParams::DEFAULT.burst_calls)]
    pub burst_calls: f64,
    /// How fast a burst dies down: the mean delay of its calls after its onset.
    #[arg(long, default_value_t = TraceParams::DEFAULT.burst_decay_secs)]
    pub burst_decay_secs: f64,
    /// Median call length.
    #[arg(long, default_value_t = TraceParams::DEFAULT.call_median_secs)]
    pub call_median_secs: f64,
    /// Spread of the call lengths: the sigma of their logarithm (1.0: the p99 is ten
    /// times the median).
    #[arg(long, default_value_t = TraceParams::DEFAULT.call_sigma)]
    pub call_sigma: f64,
    /// The longest call.
    #[arg(long, default_value_t = TraceParams::DEFAULT.call_max_secs)]
    pub call_max_secs: f64,
}

impl TraceParams {
    pub const DEFAULT: TraceParams = TraceParams {
        duration_hours: 24.0,
        peak_calls_per_minute: 6.0,
        trough_fraction: 0.2,
        bursts_per_day: 6.0,
        burst_calls: 40.0,
        burst_decay_secs: 60.0,
        call_median_secs: 90.0,
        call_sigma: 1.0,
        call_max_secs: 1800.0,
    };

    pub fn duration(&self) -> Duration {
        Duration::from_secs_f64(self.duration_hours * 3600.0)
    }

    /// The daily curve's arrival rate (bursts aside), in calls per second, at `at`
    /// since the start (midnight).
    pub fn rate_per_second(&self, at: Duration) -> f64 {
        let hour = (at.as_secs_f64() / 3600.0) % 24.0;
        let fraction = self.trough_fraction + (1.0 - self.trough_fraction) * daily_shape(hour);
        self.peak_calls_per_minute * fraction / 60.0
    }

    fn validate(&self) -> Result<(), InvalidParam> {
        let checks = [
            (
                "duration_hours",
                self.duration_hours,
                self.duration_hours > 0.0,
            ),
            (
                "peak_calls_per_minute",
                self.peak_calls_per_minute,
                self.peak_calls_per_minute > 0.0,
            ),
            (
                "trough_fraction",
                self.trough_fraction,
                (0.0..=1.0).contains(&self.trough_fraction),
            ),
            (
                "bursts_per_day",
                self.bursts_per_day,
                self.bursts_per_day >= 0.0,
            ),
            ("burst_calls", self.burst_calls, self.burst_calls >= 0.0),
            (
                "burst_decay_secs",
                self.burst_decay_secs,
                self.burst_decay_secs > 0.0,
            ),
            (
                "call_median_secs",
                self.call_median_secs,
                self.call_median_secs > 0.0,
            ),
            ("call_sigma", self.call_sigma, self.call_sigma >= 0.0),
            (
                "call_max_secs",
                self.call_max_secs,
                self.call_max_secs > 0.0,
            ),
        ];
        match checks
            .into_iter()
            .find(|(_, value, ok)| !ok || !value.is_finite())
        {
            Some((name, value, _)) => Err(InvalidParam { name, value }),
            None => Ok(()),
        }
    }
}

impl Default for TraceParams {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// A generator parameter out of its range.
#[derive(Debug, Error, PartialEq)]
#[error("trace parameter {name} = {value} is out of range")]
pub struct InvalidParam {
    pub name: &'static str,
    pub value: f64,
}

/// The daily curve's shape at each hour from 00:00 to 24:00, from 0 (the 04:00
/// trough) to 1 (the peaks at 11:00 and 18:00), with a lull after lunch.
const DAILY_SHAPE: [f64; 25] = [
    0.35, 0.22, 0.12, 0.04, 0.00, 0.05, 0.15, 0.35, 0.58, 0.78, 0.93, 1.00, 0.94, 0.84, 0.78, 0.80,
    0.87, 0.96, 1.00, 0.93, 0.80, 0.66, 0.54, 0.44, 0.35,
];

/// The daily shape at `hour` (0 to 24), linear between the hours.
fn daily_shape(hour: f64) -> f64 {
    let whole = (hour.floor() as usize).min(23);
    let part = hour - whole as f64;
    DAILY_SHAPE[whole] + (DAILY_SHAPE[whole + 1] - DAILY_SHAPE[whole]) * part
}

/// A call-centre trace from `params`, the same for the same `seed`.
pub fn generate(params: &TraceParams, seed: u64) -> Result<Trace, InvalidParam> {
    params.validate()?;
    let mut rng = StdRng::seed_from_u64(seed);
    let end = params.duration().as_secs_f64();
    let lengths = LogNormal::new(params.call_median_secs.ln(), params.call_sigma)
        .expect("validated: sigma is finite and not negative");
    let mut arrivals = Vec::new();

    // The daily curve by thinning: candidates at the peak rate, each kept with the
    // ratio of the rate at its time to the peak rate.
    let peak_rate = params.peak_calls_per_minute / 60.0;
    let candidates = Exp::new(peak_rate).expect("validated: the peak is positive");
    let mut t = candidates.sample(&mut rng);
    while t < end {
        if rng.random::<f64>() * peak_rate < params.rate_per_second(Duration::from_secs_f64(t)) {
            arrivals.push(t);
        }
        t += candidates.sample(&mut rng);
    }

    // Bursts: onsets a Poisson process; each adds a Poisson number of calls whose
    // delays after the onset are exponential (the most calls right at the onset).
    if params.bursts_per_day > 0.0 && params.burst_calls > 0.0 {
        let onsets = Exp::new(params.bursts_per_day / 86_400.0).expect("validated: positive");
        let size = Poisson::new(params.burst_calls).expect("validated: positive");
        let delays = Exp::new(1.0 / params.burst_decay_secs).expect("validated: positive");
        let mut onset = onsets.sample(&mut rng);
        while onset < end {
            let calls = size.sample(&mut rng) as usize;
            arrivals.extend(
                (0..calls)
                    .map(|_| onset + delays.sample(&mut rng))
                    .filter(|&t| t < end),
            );
            onset += onsets.sample(&mut rng);
        }
    }

    let calls = arrivals
        .into_iter()
        .map(|arrival| Call {
            arrival: Duration::from_millis((arrival * 1000.0) as u64),
            // Whole milliseconds, as the file keeps them; never zero.
            duration: Duration::from_millis(
                (lengths.sample(&mut rng).min(params.call_max_secs) * 1000.0).round() as u64,
            )
            .max(Duration::from_millis(1)),
        })
        .collect();
    Ok(Trace::new(calls, params.duration()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINUTE: Duration = Duration::from_secs(60);
    const HOUR: Duration = Duration::from_secs(3600);

    fn day(seed: u64) -> Trace {
        generate(&TraceParams::default(), seed).expect("default parameters are valid")
    }

    fn arrivals_between(trace: &Trace, from: Duration, to: Duration) -> usize {
        trace
            .calls()
            .iter()
            .filter(|c| (from..to).contains(&c.arrival))
            .count()
    }

    #[test]
    fn the_same_seed_gives_the_same_trace_and_another_seed_another() {
        assert_eq!(day(7), day(7));
        assert_ne!(day(7).calls(), day(8).calls());
    }

    #[test]
    fn a_day_is_sorted_and_about_as_busy_as_the_curve_says() {
        let trace = day(1);
        assert!(trace.calls().is_sorted_by_key(|c| c.arrival));
        assert!(trace.span() >= 24 * HOUR);
        // The curve's integral is about 5,800 calls (6/min at the peaks, a 20 % trough,
        // shape mean 0.59), plus ~240 from bursts.
        let calls = trace.calls().len();
        assert!((5_500..6_500).contains(&calls), "{calls} calls");
    }

    #[test]
    fn the_peak_hour_is_much_busier_than_the_night_trough() {
        for seed in 1..=5 {
            let trace = generate(
                &TraceParams {
                    bursts_per_day: 0.0,
                    ..TraceParams::default()
                },
                seed,
            )
            .unwrap();
            let trough = arrivals_between(&trace, 3 * HOUR + 30 * MINUTE, 4 * HOUR + 30 * MINUTE);
            let peak = arrivals_between(&trace, 10 * HOUR + 30 * MINUTE, 11 * HOUR + 30 * MINUTE);
            // Expected about 75 and 355.
            assert!(
                peak > 3 * trough,
                "seed {seed}: peak {peak}, trough {trough}"
            );
        }
    }

    #[test]
    fn bursts_stand_out_of_the_curve() {
        let params = TraceParams::default();
        let curve_peak = params.peak_calls_per_minute as u32;
        for seed in 1..=5 {
            let bursty = day(seed).summary().peak_per_minute;
            let calm = generate(
                &TraceParams {
                    bursts_per_day: 0.0,
                    ..params.clone()
                },
                seed,
            )
            .unwrap()
            .summary()
            .peak_per_minute;
            // A burst puts ~25 calls into its first minute; Poisson noise alone tops
            // out around twice the curve's peak.
            assert!(
                bursty >= 3 * curve_peak,
                "seed {seed}: {bursty} in the busiest minute"
            );
            assert!(calm < 3 * curve_peak, "seed {seed}: {calm} without bursts");
        }
    }

    #[test]
    fn call_lengths_are_heavy_tailed_and_capped() {
        let trace = day(3);
        let summary = trace.summary();
        let median = summary.length_p50.as_secs_f64();
        assert!((75.0..105.0).contains(&median), "median {median} s");
        let ratio = summary.length_p99.as_secs_f64() / median;
        assert!(ratio > 6.0, "p99/p50 {ratio}");
        let longest = trace.calls().iter().map(|c| c.duration).max().unwrap();
        assert!(longest <= Duration::from_secs(1800));
    }

    #[test]
    fn csv_round_trips() {
        let trace = day(4);
        let mut csv = Vec::new();
        trace.write_csv(&mut csv).unwrap();
        let parsed: Trace = String::from_utf8(csv).unwrap().parse().unwrap();
        assert_eq!(parsed.calls(), trace.calls());
    }

    #[test]
    fn a_file_trace_ends_with_its_last_call() {
        let trace: Trace = "arrival_ms,duration_ms\n0,5000\n1000,1000\n\n2000,500\n"
            .parse()
            .unwrap();
        assert_eq!(trace.calls().len(), 3);
        assert_eq!(trace.span(), Duration::from_secs(5));
    }

    #[test]
    fn parse_errors_name_the_line() {
        let parse = |text: &str| text.parse::<Trace>().unwrap_err();
        assert_eq!(parse(""), TraceError::Empty);
        assert_eq!(
            parse("arrival,duration\n"),
            TraceError::Header {
                found: "arrival,duration".into()
            }
        );
        assert_eq!(
            parse("arrival_ms,duration_ms\n0,1000\n5\n"),
            TraceError::FieldCount { line: 3, fields: 1 }
        );
        assert_eq!(
            parse("arrival_ms,duration_ms\n0,1000\n10,-4\n"),
            TraceError::Number {
                line: 3,
                field: "duration_ms",
                value: "-4".into()
            }
        );
        let unsorted = parse("arrival_ms,duration_ms\n500,1000\n400,1000\n");
        assert_eq!(
            unsorted,
            TraceError::Unsorted {
                line: 3,
                arrival_ms: 400,
                previous_ms: 500
            }
        );
        assert!(unsorted.to_string().starts_with("line 3: "));
    }

    #[test]
    fn parameters_out_of_range_are_refused() {
        let params = TraceParams {
            trough_fraction: 1.5,
            ..TraceParams::default()
        };
        assert_eq!(
            generate(&params, 1).unwrap_err(),
            InvalidParam {
                name: "trough_fraction",
                value: 1.5
            }
        );
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let values: Vec<Duration> = (1..=100).map(Duration::from_secs).collect();
        assert_eq!(percentile(&values, 0.5), Duration::from_secs(50));
        assert_eq!(percentile(&values, 0.99), Duration::from_secs(99));
        assert_eq!(percentile(&values, 1.0), Duration::from_secs(100));
        assert_eq!(percentile(&[], 0.5), Duration::ZERO);
    }
}
