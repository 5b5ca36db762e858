//! `asr trace` and `asr simulate` as an operator runs them: a generated trace written to
//! a file, replayed through both policies, the results read back as JSON; and a trace
//! that is not one refused with a message naming the file and the line.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn asr(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_asr"))
        .args(args)
        .output()
        .expect("running asr")
}

/// A folder of this test's own.
fn scratch() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("asr-simulate-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Four hours of a busy morning, capacity 4: enough calls for drains with calls on them.
fn write_trace(out: &Path) -> usize {
    let run = asr(&[
        "trace",
        "--seed",
        "7",
        "--out",
        out.to_str().unwrap(),
        "--duration-hours",
        "4",
        "--peak-calls-per-minute",
        "20",
        "--trough-fraction",
        "1",
    ]);
    assert!(run.status.success(), "{}", text(&run.stderr));
    let csv = std::fs::read_to_string(out).unwrap();
    let mut lines = csv.lines();
    assert_eq!(lines.next(), Some("arrival_ms,duration_ms"));
    lines.count()
}

/// `asr simulate` of both policies on `trace`, with `extra` flags: its stdout.
fn simulate_both(trace: &Path, extra: &[&str]) -> Vec<u8> {
    let mut args = vec![
        "simulate",
        "--trace",
        trace.to_str().unwrap(),
        "--policy",
        "idle-target",
        "--policy",
        "predictive",
    ];
    args.extend_from_slice(extra);
    let run = asr(&args);
    assert!(run.status.success(), "{}", text(&run.stderr));
    run.stdout
}

#[test]
fn a_generated_trace_runs_through_both_policies_side_by_side() {
    let dir = scratch();
    let trace = dir.join("day.csv");
    let calls = write_trace(&trace);
    assert!(calls > 3_000, "{calls} calls in four busy hours");

    let simulate = |drain_timeout: &str| -> Value {
        let flags = [
            "--capacity",
            "4",
            "--scaling-max-workers",
            "64",
            "--drain-timeout-secs",
            drain_timeout,
            "--json",
        ];
        serde_json::from_slice(&simulate_both(&trace, &flags)).expect("JSON on stdout")
    };
    let report = simulate("60");
    assert_eq!(report["calls"], calls);
    assert_eq!(report["scaling"]["drain_timeout_secs"], 60);
    let runs = report["runs"].as_array().unwrap();
    let policies: Vec<&str> = runs.iter().map(|r| r["policy"].as_str().unwrap()).collect();
    assert_eq!(policies, ["idle-target", "predictive"]);
    for run in runs {
        assert_eq!(run["sessions"], calls, "every call served: {run}");
        let (p50, p99, max) = (
            run["wait_p50_ms"].as_u64().unwrap(),
            run["wait_p99_ms"].as_u64().unwrap(),
            run["wait_max_ms"].as_u64().unwrap(),
        );
        assert!(p50 <= p99 && p99 <= max, "{run}");
        assert!(run["worker_seconds"].as_f64().unwrap() > 0.0);
        // A minute's drain timeout with four calls per worker: drained workers still
        // hold calls when it runs out.
        assert!(run["handoffs"].as_u64().unwrap() > 0, "{run}");
    }

    // Never timing out: no handoff, and drained workers are paid for longer.
    let patient = simulate("86400");
    for (quick, slow) in runs.iter().zip(patient["runs"].as_array().unwrap()) {
        assert_eq!(slow["handoffs"], 0, "{slow}");
        assert!(
            slow["worker_seconds"].as_f64().unwrap() > quick["worker_seconds"].as_f64().unwrap(),
            "{slow} vs {quick}"
        );
    }

    // The table an operator reads names both policies and the handoffs.
    let table = text(&simulate_both(&trace, &[]));
    for expected in [
        "idle-target",
        "predictive",
        "allocation wait p99 (ms)",
        "drain handoffs",
        "worker-seconds",
    ] {
        assert!(
            table.contains(expected),
            "{expected} missing from:\n{table}"
        );
    }
    std::fs::remove_dir_all(dir).unwrap();
}

/// What `asr simulate` says on stderr when it refuses `trace`.
fn refusal(trace: &Path) -> String {
    let run = asr(&[
        "simulate",
        "--trace",
        trace.to_str().unwrap(),
        "--policy",
        "idle-target",
    ]);
    assert!(!run.status.success(), "{}", text(&run.stdout));
    text(&run.stderr)
}

#[test]
fn a_file_that_is_no_trace_is_refused_with_where() {
    let dir = scratch();
    let trace = dir.join("bad.csv");
    std::fs::write(&trace, "arrival_ms,duration_ms\n0,1000\nsoon,1000\n").unwrap();
    let error = refusal(&trace);
    assert!(error.contains("bad.csv"), "{error}");
    assert!(error.contains("line 3"), "{error}");

    let error = refusal(&dir.join("missing.csv"));
    assert!(error.contains("missing.csv"), "{error}");
    std::fs::remove_dir_all(dir).unwrap();
}
