//! The scaling simulator: replays an arrival trace through a scaling policy, in
//! simulated time, and measures what callers wait and what the workers cost. Pure and
//! deterministic.
//!
//! It drives the orchestrator's own code, not a copy of it:
//!
//! - allocation: every arrival joins the model's wait queue, and the queue is served
//!   oldest first by [`allocator::plan`] from the free slots of the serving workers
//!   (draining ones take no new sessions), as the service does; the queue is served
//!   again whenever slots free up (a call ends, a worker becomes ready or is brought
//!   back from draining);
//! - scaling: every check interval, [`Scaler::decide`] on a [`LoadProjection`] of the
//!   simulated state, then [`reconcile`] to start workers (ready after the start-up
//!   delay), bring draining ones back and drain (a draining worker stops when its last
//!   call ends, an idle one at once);
//! - the drain timeout: a worker still draining after `--drain-timeout-secs` stops,
//!   and its calls go back to the head of the queue with the time they have left, as
//!   the autoscaler's handoff does; the time such a call waits for its next worker is
//!   a handoff pause (the caller's words are transcribed late, none is lost).
//!
//! Events at the same instant are taken in this order: calls ending, workers becoming
//! ready, drain timeouts, arrivals, the check; capacity is freed before it is claimed,
//! and a check sees every arrival of its instant. Leader changes are not simulated: a
//! new leader's policy starts with an empty arrival history (a cold start).
//!
//! A worker costs from the moment it is asked for (booting is paid for) until it stops
//! or the simulation ends: at the end of the trace, or when its last call ends if that
//! is later.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::time::Duration;

use eventlog::SessionId;
use thiserror::Error;

use super::trace::{Call, Trace, percentile};
use super::{
    LoadProjection, RemovalOrder, Scaler, ScalingArgs, ScalingPolicy, WorkerView, reconcile,
};
use crate::allocator::{self, WorkerLoad};

/// What a simulation runs: the policy and its flags, and what is measured against.
#[derive(Clone, Debug, PartialEq)]
pub struct SimulationSetup {
    /// The policy, its tuning, the bounds, the check interval and the worker start-up
    /// delay; the simulation starts with `scaling_min_workers` ready workers.
    pub scaling: ScalingArgs,
    /// Sessions one worker serves at once.
    pub capacity_per_worker: u32,
    /// The allocation wait a caller should not exceed.
    pub slo: Duration,
}

/// The fleet a simulation runs, in one line for the reader of its results.
impl std::fmt::Display for SimulationSetup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = &self.scaling;
        write!(
            f,
            "worker start-up {} ms, check every {} ms, {}..{} workers, scale down after {} s, \
             drain timeout {} s, capacity {}, SLO {} ms",
            s.worker_startup_ms,
            s.scaling_check_interval_ms,
            s.scaling_min_workers,
            s.scaling_max_workers,
            s.scaling_down_after_secs,
            s.drain_timeout_secs,
            self.capacity_per_worker,
            self.slo.as_millis()
        )
    }
}

/// What a simulation measured.
#[derive(Clone, Debug, PartialEq)]
pub struct Report {
    pub sessions: usize,
    pub wait_p50: Duration,
    pub wait_p99: Duration,
    pub wait_max: Duration,
    /// Sessions that waited longer than the SLO.
    pub slo_violations: usize,
    /// Calls moved off a worker whose drain timed out.
    pub handoffs: usize,
    /// The longest a handed-off call waited for its next worker.
    pub handoff_pause_max: Duration,
    /// Paid worker time, start-up included.
    pub worker_seconds: f64,
    /// The most workers (starting, ready or draining) at once.
    pub peak_workers: u32,
    /// Worker-seconds over the simulated time.
    pub mean_workers: f64,
    /// From the trace's start to the simulation's end.
    pub simulated: Duration,
    /// Each call's allocation wait, in the trace's order.
    pub waits: Vec<Duration>,
    /// Every worker that was asked for, in that order.
    pub workers: Vec<WorkerLifetime>,
}

/// When a worker was paid for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WorkerLifetime {
    pub asked: Duration,
    /// When it stopped, or the simulation's end if it was still running.
    pub stopped: Duration,
}

/// Why a trace cannot be simulated to its end.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum SimulationError {
    #[error("no session can ever be served: at most {max_workers} workers of capacity {capacity}")]
    NoCapacity { max_workers: u32, capacity: u32 },
    #[error(
        "{waiting} sessions wait at {at:?}, after the trace's end, and the policy wants no worker"
    )]
    Stalled { at: Duration, waiting: usize },
}

/// Replays `trace` through the policy that `setup.scaling` chooses.
pub fn simulate(trace: &Trace, setup: &SimulationSetup) -> Result<Report, SimulationError> {
    simulate_with(trace, setup, setup.scaling.scaler())
}

/// Replays `trace` through `scaler` (for policies tuned beyond the flags); the rest of
/// `setup.scaling` (check interval, start-up delay, initial workers) applies as is.
pub fn simulate_with<P: ScalingPolicy>(
    trace: &Trace,
    setup: &SimulationSetup,
    mut scaler: Scaler<P>,
) -> Result<Report, SimulationError> {
    let bounds = setup.scaling.bounds();
    if !trace.calls().is_empty() && (bounds.max_workers == 0 || setup.capacity_per_worker == 0) {
        return Err(SimulationError::NoCapacity {
            max_workers: bounds.max_workers,
            capacity: setup.capacity_per_worker,
        });
    }
    let mut sim = Simulator::new(trace.calls(), setup);
    for _ in 0..bounds.min_workers {
        let worker = sim.ask_for_worker(Duration::ZERO);
        sim.workers[worker].phase = Phase::Serving;
    }
    let interval = setup.scaling.check_interval();
    let mut next_check = Duration::ZERO;
    loop {
        let next_event = sim.events.peek().map(|Reverse((at, _))| *at);
        let next_arrival = sim.calls.get(sim.arrived).map(|c| c.arrival);
        let next = next_event
            .into_iter()
            .chain(next_arrival)
            .fold(next_check, Duration::min);
        if sim.all_calls_done() && next > trace.span() {
            break;
        }
        if next_event == Some(next) {
            let Reverse((at, event)) = sim.events.pop().expect("peeked");
            sim.handle(at, event);
        } else if next_arrival == Some(next) {
            sim.queue.push_back(sim.arrived);
            sim.arrived += 1;
            sim.serve_queue(next);
        } else {
            sim.check(next, &mut scaler);
            if next > trace.span() && !sim.queue.is_empty() && sim.live.is_empty() {
                return Err(SimulationError::Stalled {
                    at: next,
                    waiting: sim.queue.len(),
                });
            }
            next_check += interval;
        }
    }
    let end = trace.span().max(sim.last_call_end);
    Ok(sim.report(end, setup.slo))
}

/// Simulated worker ids: the prefix, then the worker's index (which the fleet's
/// removal order reads as its ordinal).
const WORKER_ID_PREFIX: &str = "sim-";

fn index_of(id: &str) -> usize {
    id.strip_prefix(WORKER_ID_PREFIX)
        .and_then(|index| index.parse().ok())
        .expect("simulated worker ids are the prefix and an index")
}

/// Where a worker is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Starting,
    Serving,
    Draining,
    Stopped,
}

struct Worker {
    id: String,
    phase: Phase,
    assigned: u32,
    asked: Duration,
    stopped: Option<Duration>,
    /// Since when it drains (its drain timeout counts from there).
    draining_since: Option<Duration>,
}

/// Timed events; at the same instant, calls end before workers become ready, and both
/// before a drain times out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Event {
    /// The call ends, if it is still on that worker (not handed off).
    CallEnd {
        call: usize,
        worker: usize,
    },
    WorkerReady {
        worker: usize,
    },
    /// The worker's drain that began at `since` times out, if it still drains.
    DrainTimeout {
        worker: usize,
        since: Duration,
    },
}

/// Where a call is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CallState {
    /// Not arrived, or waiting for its first worker.
    Unserved,
    /// On `worker` until `ends`.
    On {
        worker: usize,
        ends: Duration,
    },
    /// Handed off at `since`, with `left` of the call still to serve.
    HandedOff {
        since: Duration,
        left: Duration,
    },
    Done,
}

struct Simulator<'a> {
    calls: &'a [Call],
    capacity: u32,
    startup: Duration,
    drain_timeout: Duration,
    /// Every worker ever asked for, by index.
    workers: Vec<Worker>,
    /// The workers not stopped, oldest first.
    live: Vec<usize>,
    /// Waiting calls, oldest first.
    queue: VecDeque<usize>,
    events: BinaryHeap<Reverse<(Duration, Event)>>,
    /// Calls that arrived so far; the next one to arrive.
    arrived: usize,
    active: u32,
    /// Each call's wait, once it has a worker.
    waits: Vec<Option<Duration>>,
    states: Vec<CallState>,
    /// How long each handed-off call waited for its next worker.
    handoff_pauses: Vec<Duration>,
    last_call_end: Duration,
    peak_workers: u32,
}

impl<'a> Simulator<'a> {
    fn new(calls: &'a [Call], setup: &SimulationSetup) -> Self {
        Self {
            calls,
            capacity: setup.capacity_per_worker,
            startup: setup.scaling.worker_startup(),
            drain_timeout: setup.scaling.drain_timeout(),
            workers: Vec::new(),
            live: Vec::new(),
            queue: VecDeque::new(),
            events: BinaryHeap::new(),
            arrived: 0,
            active: 0,
            waits: vec![None; calls.len()],
            states: vec![CallState::Unserved; calls.len()],
            handoff_pauses: Vec::new(),
            last_call_end: Duration::ZERO,
            peak_workers: 0,
        }
    }

    fn all_calls_done(&self) -> bool {
        self.arrived == self.calls.len() && self.queue.is_empty() && self.active == 0
    }

    fn handle(&mut self, now: Duration, event: Event) {
        match event {
            Event::CallEnd { call, worker } => {
                if self.states[call] != (CallState::On { worker, ends: now }) {
                    return; // handed off: it ends elsewhere
                }
                self.states[call] = CallState::Done;
                self.active -= 1;
                self.last_call_end = now;
                let w = &mut self.workers[worker];
                w.assigned -= 1;
                if w.phase == Phase::Draining && w.assigned == 0 {
                    self.stop(now, worker);
                } else {
                    self.serve_queue(now);
                }
            }
            Event::WorkerReady { worker } => {
                self.workers[worker].phase = Phase::Serving;
                self.serve_queue(now);
            }
            Event::DrainTimeout { worker, since } => {
                let w = &self.workers[worker];
                if w.phase == Phase::Draining && w.draining_since == Some(since) {
                    self.hand_off(now, worker);
                }
            }
        }
    }

    /// Stops a worker whose drain timed out; its calls go to the head of the queue,
    /// in arrival order, as the service requeues a retired worker's sessions.
    fn hand_off(&mut self, now: Duration, worker: usize) {
        let moving: Vec<usize> = (0..self.calls.len())
            .filter(
                |&call| matches!(self.states[call], CallState::On { worker: w, .. } if w == worker),
            )
            .collect();
        for &call in moving.iter().rev() {
            let CallState::On { ends, .. } = self.states[call] else {
                unreachable!("filtered on it")
            };
            self.states[call] = CallState::HandedOff {
                since: now,
                left: ends - now,
            };
            self.queue.push_front(call);
            self.active -= 1;
        }
        self.workers[worker].assigned = 0;
        self.stop(now, worker);
        self.serve_queue(now);
    }

    /// Assigns the oldest waiting calls to free slots, as the service does.
    fn serve_queue(&mut self, now: Duration) {
        if self.queue.is_empty() {
            return;
        }
        let loads: Vec<WorkerLoad> = self
            .live
            .iter()
            .map(|&i| &self.workers[i])
            .filter(|w| w.phase == Phase::Serving)
            .map(|w| WorkerLoad {
                worker: w.id.clone(),
                capacity: self.capacity,
                assigned: w.assigned,
            })
            .collect();
        let free: u32 = loads.iter().map(WorkerLoad::free_slots).sum();
        let waiting: Vec<SessionId> = self
            .queue
            .iter()
            .take(free as usize)
            .map(|&call| SessionId::from_u128(call as u128))
            .collect();
        for (session, worker) in allocator::plan(&waiting, loads) {
            // The plan serves the queue from its head, in order.
            let call = self
                .queue
                .pop_front()
                .expect("the plan serves waiting calls");
            debug_assert_eq!(call as u128, session.as_u128());
            let worker = index_of(&worker);
            self.workers[worker].assigned += 1;
            self.active += 1;
            let ends = match self.states[call] {
                CallState::HandedOff { since, left } => {
                    self.handoff_pauses.push(now - since);
                    now + left
                }
                _ => {
                    let call_at = self.calls[call];
                    self.waits[call] = Some(now - call_at.arrival);
                    now + call_at.duration
                }
            };
            self.states[call] = CallState::On { worker, ends };
            self.events
                .push(Reverse((ends, Event::CallEnd { call, worker })));
        }
    }

    fn projection(&self) -> LoadProjection {
        let mut load = LoadProjection {
            active_sessions: self.active,
            waiting_sessions: self.queue.len() as u32,
            arrivals_total: self.arrived as u64,
            capacity_per_worker: self.capacity,
            ..LoadProjection::default()
        };
        for &i in &self.live {
            match self.workers[i].phase {
                Phase::Starting => load.workers_starting += 1,
                Phase::Serving => load.workers_ready += 1,
                Phase::Draining => load.workers_draining += 1,
                Phase::Stopped => {}
            }
        }
        load
    }

    /// One run of the policy, and the fleet brought to what it decided.
    fn check<P: ScalingPolicy>(&mut self, now: Duration, scaler: &mut Scaler<P>) {
        let load = self.projection();
        let desired = scaler.decide(now, &load);
        // At the desired count the reconciliation does nothing: skip building its input
        // (the common case, checked twice a second for a whole day).
        if desired == load.workers_ready + load.workers_starting {
            return;
        }
        let views: Vec<WorkerView> = self
            .live
            .iter()
            .map(|&i| &self.workers[i])
            .filter(|w| matches!(w.phase, Phase::Serving | Phase::Draining))
            .map(|w| WorkerView {
                id: w.id.clone(),
                assigned: w.assigned,
                draining: w.phase == Phase::Draining,
            })
            .collect();
        let plan = reconcile(
            desired,
            &views,
            load.workers_starting,
            RemovalOrder::LeastLoaded,
        );
        for id in &plan.drain {
            let worker = index_of(id);
            if self.workers[worker].assigned == 0 {
                self.stop(now, worker);
            } else {
                let w = &mut self.workers[worker];
                w.phase = Phase::Draining;
                w.draining_since = Some(now);
                self.events.push(Reverse((
                    now + self.drain_timeout,
                    Event::DrainTimeout { worker, since: now },
                )));
            }
        }
        for id in &plan.undrain {
            let w = &mut self.workers[index_of(id)];
            w.phase = Phase::Serving;
            w.draining_since = None;
        }
        for _ in 0..plan.start {
            let worker = self.ask_for_worker(now);
            self.events
                .push(Reverse((now + self.startup, Event::WorkerReady { worker })));
        }
        if !plan.undrain.is_empty() {
            self.serve_queue(now);
        }
    }

    /// A new worker, starting (and paid for) from `now`.
    fn ask_for_worker(&mut self, now: Duration) -> usize {
        let index = self.workers.len();
        self.workers.push(Worker {
            id: format!("{WORKER_ID_PREFIX}{index}"),
            phase: Phase::Starting,
            assigned: 0,
            asked: now,
            stopped: None,
            draining_since: None,
        });
        self.live.push(index);
        self.peak_workers = self.peak_workers.max(self.live.len() as u32);
        index
    }

    fn stop(&mut self, now: Duration, worker: usize) {
        let w = &mut self.workers[worker];
        w.phase = Phase::Stopped;
        w.stopped = Some(now);
        self.live.retain(|&i| i != worker);
    }

    fn report(self, end: Duration, slo: Duration) -> Report {
        let waits: Vec<Duration> = self
            .waits
            .into_iter()
            .map(|w| w.expect("every call is served before the simulation ends"))
            .collect();
        let mut sorted = waits.clone();
        sorted.sort_unstable();
        let workers: Vec<WorkerLifetime> = self
            .workers
            .iter()
            .map(|w| WorkerLifetime {
                asked: w.asked,
                stopped: w.stopped.unwrap_or(end),
            })
            .collect();
        let worker_seconds: f64 = workers
            .iter()
            .map(|w| (w.stopped - w.asked).as_secs_f64())
            .sum();
        Report {
            sessions: waits.len(),
            wait_p50: percentile(&sorted, 0.50),
            wait_p99: percentile(&sorted, 0.99),
            wait_max: sorted.last().copied().unwrap_or_default(),
            slo_violations: sorted.iter().filter(|&&w| w > slo).count(),
            handoffs: self.handoff_pauses.len(),
            handoff_pause_max: self
                .handoff_pauses
                .iter()
                .max()
                .copied()
                .unwrap_or_default(),
            worker_seconds,
            peak_workers: self.peak_workers,
            mean_workers: if end.is_zero() {
                0.0
            } else {
                worker_seconds / end.as_secs_f64()
            },
            simulated: end,
            waits,
            workers,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scaling::trace::{TraceParams, generate};
    use crate::scaling::{Bounds, PolicyKind, test_args};

    const S: Duration = Duration::from_secs(1);
    const MS: Duration = Duration::from_millis(1);

    fn args(min_workers: u32, idle_target: u32) -> ScalingArgs {
        ScalingArgs {
            scaling_target: idle_target,
            scaling_min_workers: min_workers,
            ..test_args()
        }
    }

    fn setup(scaling: ScalingArgs, capacity: u32) -> SimulationSetup {
        SimulationSetup {
            scaling,
            capacity_per_worker: capacity,
            slo: S,
        }
    }

    fn call(arrival: Duration, duration: Duration) -> Call {
        Call { arrival, duration }
    }

    #[test]
    fn a_trace_without_calls_costs_the_minimum_fleet_for_its_span() {
        let trace = Trace::new(Vec::new(), 3600 * S);
        let report = simulate(&trace, &setup(args(2, 1), 1)).unwrap();
        assert_eq!(report.sessions, 0);
        assert_eq!(report.worker_seconds, 7200.0);
        assert_eq!(report.peak_workers, 2);
        assert_eq!(report.mean_workers, 2.0);
        assert_eq!(report.simulated, 3600 * S);
    }

    #[test]
    fn a_call_finding_an_idle_worker_does_not_wait() {
        let trace = Trace::new(vec![call(10 * S, 30 * S)], 60 * S);
        let report = simulate(&trace, &setup(args(1, 0), 1)).unwrap();
        assert_eq!(report.waits, [Duration::ZERO]);
        assert_eq!(report.slo_violations, 0);
        assert_eq!(report.worker_seconds, 60.0);
    }

    #[test]
    fn without_an_idle_worker_a_call_waits_for_one_to_start() {
        // Arrives at 0.2 s; the check at 0.5 s starts a worker, ready at 3.0 s.
        let trace = Trace::new(vec![call(200 * MS, 10 * S)], 60 * S);
        let report = simulate(&trace, &setup(args(0, 0), 1)).unwrap();
        let wait = report.waits[0];
        assert!(wait >= 2500 * MS && wait <= 3000 * MS, "waited {wait:?}");
        assert_eq!(wait, 2800 * MS);
        assert_eq!(report.slo_violations, 1);
        // The call ends at 13 s; the worker is drained (idle: stopped at once) after
        // the 5 s cool-down.
        assert_eq!(
            report.workers,
            [WorkerLifetime {
                asked: 500 * MS,
                stopped: 18 * S
            }]
        );
        assert_eq!(report.worker_seconds, 17.5);
    }

    #[test]
    fn waiting_calls_are_served_in_arrival_order() {
        // One worker at most: each call waits for the previous one to end.
        let scaling = ScalingArgs {
            scaling_max_workers: 1,
            ..args(1, 0)
        };
        let calls: Vec<Call> = (0..5).map(|i| call(i * 100 * MS, (10 - i) * S)).collect();
        let trace = Trace::new(calls.clone(), Duration::ZERO);
        let report = simulate(&trace, &setup(scaling, 1)).unwrap();
        let mut free_at = Duration::ZERO;
        for (c, wait) in calls.iter().zip(&report.waits) {
            let assigned = c.arrival + *wait;
            assert_eq!(assigned, free_at.max(c.arrival), "{c:?}");
            free_at = assigned + c.duration;
        }
    }

    /// Capacity 2. A and B take sim-0 at 0 s; C waits, so a second worker starts at
    /// the 0 s check and takes C at 2.5 s. B ends at 4 s: A and C need one worker; after
    /// the 5 s cool-down the check at 9 s drains one of the two equally loaded workers,
    /// the highest id: sim-1, holding C until 52.5 s.
    fn drain_scenario() -> Vec<Call> {
        vec![
            call(Duration::ZERO, 100 * S),
            call(Duration::ZERO, 4 * S),
            call(Duration::ZERO, 50 * S),
        ]
    }

    #[test]
    fn a_drained_worker_stops_only_after_its_last_call() {
        let trace = Trace::new(drain_scenario(), Duration::ZERO);
        let report = simulate(&trace, &setup(args(1, 0), 2)).unwrap();
        assert_eq!(report.waits, [Duration::ZERO, Duration::ZERO, 2500 * MS]);
        assert_eq!(
            report.workers,
            [
                WorkerLifetime {
                    asked: Duration::ZERO,
                    stopped: 100 * S
                },
                WorkerLifetime {
                    asked: Duration::ZERO,
                    stopped: 52500 * MS
                },
            ]
        );
        assert_eq!(report.worker_seconds, 152.5);
        assert_eq!(report.peak_workers, 2);
        assert_eq!(report.mean_workers, 1.525);
        assert_eq!(report.simulated, 100 * S);
    }

    #[test]
    fn a_drain_that_times_out_hands_the_call_to_a_free_slot() {
        // sim-1 drains from 9 s holding C; at 29 s its drain times out: C moves to
        // sim-0's free slot at once with its 23.5 s left, and sim-1 stops.
        let trace = Trace::new(drain_scenario(), Duration::ZERO);
        let scaling = ScalingArgs {
            drain_timeout_secs: 20,
            ..args(1, 0)
        };
        let report = simulate(&trace, &setup(scaling, 2)).unwrap();
        assert_eq!(report.waits, [Duration::ZERO, Duration::ZERO, 2500 * MS]);
        let stopped: Vec<Duration> = report.workers.iter().map(|w| w.stopped).collect();
        assert_eq!(stopped, [100 * S, 29 * S]);
        assert_eq!(report.worker_seconds, 129.0);
        assert_eq!(
            (report.handoffs, report.handoff_pause_max),
            (1, Duration::ZERO)
        );
        assert_eq!(report.simulated, 100 * S);
    }

    #[test]
    fn a_handed_off_call_with_no_free_slot_waits_for_a_new_worker() {
        // As above, but D takes sim-0's free slot at 28.9 s: at 29 s C is handed off
        // with nowhere to go, the check starts sim-2, and C resumes on it at 31.5 s
        // (a 2.5 s pause), ending at 55 s instead of 52.5 s.
        let mut calls = drain_scenario();
        calls.push(call(28_900 * MS, 60 * S));
        let trace = Trace::new(calls, Duration::ZERO);
        let scaling = ScalingArgs {
            drain_timeout_secs: 20,
            ..args(1, 0)
        };
        let report = simulate(&trace, &setup(scaling, 2)).unwrap();
        assert_eq!(report.waits[3], Duration::ZERO);
        assert_eq!((report.handoffs, report.handoff_pause_max), (1, 2500 * MS));
        assert_eq!(report.workers.len(), 3);
        assert_eq!(report.workers[1].stopped, 29 * S);
        assert_eq!(report.workers[2].asked, 29 * S);
        // sim-2 serves C to 55 s, then idles until the check after the cool-down.
        assert!(report.workers[2].stopped >= 55 * S);
        assert_eq!(report.simulated, 100 * S);
    }

    #[test]
    fn a_draining_worker_is_brought_back_before_a_new_one_starts() {
        // At 20 s, while sim-1 drains, D, E and F arrive: D takes sim-0's free slot;
        // the check wants 3 workers for 5 sessions, brings sim-1 back (E takes it at
        // once) and starts sim-2 for F.
        let mut calls = drain_scenario();
        calls.extend((0..3).map(|_| call(20 * S, 30 * S)));
        let trace = Trace::new(calls, Duration::ZERO);
        let report = simulate(&trace, &setup(args(1, 0), 2)).unwrap();
        assert_eq!(
            &report.waits[3..],
            [Duration::ZERO, Duration::ZERO, 2500 * MS]
        );
        assert_eq!(report.workers.len(), 3);
        assert_eq!(report.workers[2].asked, 20 * S);
        // Brought back, sim-1 kept serving past C's end.
        assert!(report.workers[1].stopped > 52500 * MS);
    }

    #[test]
    fn an_idle_worker_drained_stops_at_once() {
        // Idle target 2: sim-0 takes the call at 0 s, sim-1 and sim-2 start as spares.
        // The call ends at 10 s; the lower target (2) holds from the 10 s check to the
        // 15 s one, which drains the idle worker with the highest id.
        let trace = Trace::new(vec![call(Duration::ZERO, 10 * S)], 30 * S);
        let report = simulate(&trace, &setup(args(1, 2), 1)).unwrap();
        let stopped: Vec<Duration> = report.workers.iter().map(|w| w.stopped).collect();
        assert_eq!(stopped, [30 * S, 30 * S, 15 * S]);
        assert_eq!(report.worker_seconds, 75.0);
    }

    #[test]
    fn a_policy_that_never_wants_a_worker_is_reported_stalled() {
        struct Nothing;
        impl ScalingPolicy for Nothing {
            fn target(&mut self, _: Duration, _: &LoadProjection) -> u32 {
                0
            }
        }
        let trace = Trace::new(vec![call(S, S)], 10 * S);
        let bounds = Bounds {
            min_workers: 0,
            max_workers: 4,
            scale_down_after: S,
        };
        let error =
            simulate_with(&trace, &setup(args(0, 0), 1), Scaler::new(Nothing, bounds)).unwrap_err();
        assert!(
            matches!(error, SimulationError::Stalled { waiting: 1, .. }),
            "{error}"
        );
    }

    #[test]
    fn no_capacity_at_all_is_refused() {
        let trace = Trace::new(vec![call(S, S)], 10 * S);
        let error = simulate(&trace, &setup(args(0, 0), 0)).unwrap_err();
        assert_eq!(
            error,
            SimulationError::NoCapacity {
                max_workers: 8,
                capacity: 0
            }
        );
    }

    #[test]
    fn a_generated_trace_runs_through_both_policies() {
        // Three hours keep the test quick in a debug build (a day takes seconds).
        let params = TraceParams {
            duration_hours: 3.0,
            ..TraceParams::default()
        };
        let trace = generate(&params, 1).unwrap();
        for policy in [PolicyKind::IdleTarget, PolicyKind::Predictive] {
            let scaling = ScalingArgs {
                scaling_policy: policy,
                scaling_max_workers: 64,
                ..args(1, 2)
            };
            let report = simulate(&trace, &setup(scaling, 1)).unwrap();
            assert_eq!(report.sessions, trace.calls().len());
            // Never fewer workers than calls need on average.
            let busy: f64 = trace.calls().iter().map(|c| c.duration.as_secs_f64()).sum();
            assert!(report.worker_seconds > busy, "{policy:?}");
        }
    }
}
