//! `asr up`: the whole system on one machine. Orchestrator replicas (one leads, the
//! others stand by), the ingest gateway and N recognizers run as child processes of
//! this one (the same binary), each restarted when it dies; Ctrl-C stops them all, and
//! they stop by themselves if this supervisor is killed (see `shutdown`).
//!
//! The orchestrator decides how many recognizers run (its local scaling backend): it
//! keeps the worker ids it wants in Redis, and this supervisor keeps exactly those
//! running. A recognizer the autoscaler retired exits by itself once drained, and is
//! not restarted because its id is no longer wanted. With `--fixed-recognizers`,
//! exactly `--recognizers` run, whatever the load.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use eventlog::config::SharedArgs;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::process::{Child, Command};
use tokio::sync::watch;
use tokio::time::Instant;

use std::collections::HashMap;

use orchestrator::registry::{Fence, Registry};
use orchestrator::scaling::ScalingArgs;
use orchestrator::scaling::fleet::ordinal;

use crate::local_key::StateDir;
use crate::shutdown::{self, SUPERVISOR_PID_ENV};

#[derive(Args, Debug)]
pub struct UpArgs {
    /// Number of recognizer worker processes at the first start; after that the
    /// autoscaler's decisions, kept in Redis, count (unless --fixed-recognizers).
    #[arg(long, env = "ASR_RECOGNIZERS", default_value_t = 2)]
    recognizers: u16,
    /// Run exactly --recognizers recognizers, each restarted when it dies, instead of
    /// letting the orchestrator start and retire them by its scaling policy (the
    /// --scaling-* flags).
    #[arg(long, env = "ASR_FIXED_RECOGNIZERS")]
    fixed_recognizers: bool,
    /// The model the recognizers serve.
    #[arg(long, env = "ASR_MODEL_NAME", default_value = "whisper-tiny.en")]
    model_name: String,
    #[command(flatten)]
    scaling: ScalingArgs,
    /// Number of orchestrator replicas (`orchestrator-1` …): one leads, the others take
    /// over within the heartbeat timeout if it dies.
    #[arg(long, env = "ASR_ORCHESTRATORS", default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..))]
    orchestrators: u16,
    /// Ingest WebSocket listen address.
    #[arg(long, env = "ASR_INGEST_ADDR", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// The first orchestrator replica's gRPC address; the next listens on port + 1, ….
    #[arg(
        long,
        env = "ASR_ORCHESTRATOR_GRPC_ADDR",
        default_value = "127.0.0.1:50051"
    )]
    grpc_addr: SocketAddr,
    /// The first orchestrator replica's metrics/health address; the next on port + 1, ….
    #[arg(
        long,
        env = "ASR_ORCHESTRATOR_HTTP_ADDR",
        default_value = "127.0.0.1:9101"
    )]
    orchestrator_http_addr: SocketAddr,
    /// The first recognizer serves its metrics/health on this port, the next on port + 1, ….
    #[arg(long, env = "ASR_RECOGNIZER_BASE_PORT", default_value_t = 9201)]
    recognizer_base_port: u16,
    /// The projector's metrics/health address (it writes the read models to
    /// ASR_DATABASE_URL, schema ASR_DATABASE_SCHEMA).
    #[arg(
        long,
        env = "ASR_PROJECTOR_HTTP_ADDR",
        default_value = "127.0.0.1:9301"
    )]
    projector_http_addr: SocketAddr,
    #[command(flatten)]
    state: StateDir,
    #[command(flatten)]
    shared: SharedArgs,
}

/// One supervised role: how to start it and what to call it in logs.
struct Role {
    name: String,
    args: Vec<String>,
}

impl UpArgs {
    /// Orchestrators (started first), then ingest, the projector and the recognizers.
    fn roles(&self) -> (Vec<Role>, Vec<Role>, Vec<Role>) {
        let shifted = |addr: SocketAddr, by: u16| SocketAddr::new(addr.ip(), addr.port() + by);
        let orchestrators = (0..self.orchestrators)
            .map(|i| {
                let mut args = vec![
                    "orchestrator".into(),
                    format!("--replica-id=orchestrator-{}", i + 1),
                    format!("--grpc-addr={}", shifted(self.grpc_addr, i)),
                    format!("--http-addr={}", shifted(self.orchestrator_http_addr, i)),
                ];
                if !self.fixed_recognizers {
                    args.push("--scaling-backend=local".into());
                    args.extend(self.scaling.to_args());
                }
                Role {
                    name: format!("orchestrator-{}", i + 1),
                    args,
                }
            })
            .collect();
        let services = vec![
            Role {
                name: "ingest".into(),
                args: vec!["ingest".into(), format!("--listen={}", self.listen)],
            },
            Role {
                name: "projector".into(),
                args: vec![
                    "projector".into(),
                    format!("--http-addr={}", self.projector_http_addr),
                ],
            },
        ];
        let recognizers = self
            .first_recognizers()
            .iter()
            .map(|id| self.recognizer_roles().role(id))
            .collect();
        (orchestrators, services, recognizers)
    }

    /// The recognizers' worker ids at the first start: `recognizer-1` ….
    fn first_recognizers(&self) -> Vec<String> {
        (1..=self.recognizers)
            .map(|i| format!("recognizer-{i}"))
            .collect()
    }

    fn recognizer_roles(&self) -> RecognizerRoles {
        RecognizerRoles {
            base_port: self.recognizer_base_port,
            model_name: self.model_name.clone(),
        }
    }
}

/// How a recognizer is started, given its worker id.
#[derive(Clone)]
struct RecognizerRoles {
    base_port: u16,
    model_name: String,
}

impl RecognizerRoles {
    /// Recognizer `id` (`recognizer-N`), serving its ops endpoints on base port + N - 1.
    fn role(&self, id: &str) -> Role {
        let index = ordinal(id).unwrap_or(1).saturating_sub(1);
        let port = u32::from(self.base_port) + index;
        Role {
            name: id.to_string(),
            args: vec![
                "recognizer".into(),
                format!("--worker-id={id}"),
                format!("--http-addr=127.0.0.1:{port}"),
                format!("--model-name={}", self.model_name),
            ],
        }
    }
}

pub async fn run(args: UpArgs) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("locating the asr binary")?;
    let keys_file = args.state.ensure_local_key()?;
    let mut env: Vec<(&'static str, String)> = args.shared.to_env();
    env.push(("ASR_API_KEYS_FILE", keys_file.display().to_string()));
    if std::env::var_os("ASR_RESUME_SECRET").is_none() {
        env.push(("ASR_RESUME_SECRET", args.state.ensure_resume_secret()?));
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    let (orchestrators, services, recognizers) = args.roles();

    let supervisor = Supervisor {
        exe,
        env,
        stop: stop_rx.clone(),
    };
    let mut tasks: Vec<_> = orchestrators
        .into_iter()
        .map(|role| supervisor.spawn(role, Restart::Always))
        .collect();
    wait_for_port(args.grpc_addr, "orchestrator-1").await?;
    tasks.extend(
        services
            .into_iter()
            .map(|role| supervisor.spawn(role, Restart::Always)),
    );
    if !args.fixed_recognizers {
        let redis = args.shared.redis().await.context("connecting to Redis")?;
        // Reads, and the unfenced seeding: the fence matters to the leader only.
        let registry = Registry::new(redis, args.shared.namespace.clone(), Fence::default());
        registry
            .seed_local_workers(&args.model_name, &args.first_recognizers())
            .await?;
        let fleet = Fleet {
            registry,
            model: args.model_name.clone(),
            roles: args.recognizer_roles(),
            supervisor: supervisor.clone(),
        };
        tasks.push(tokio::spawn(fleet.keep()));
    } else {
        tasks.extend(
            recognizers
                .into_iter()
                .map(|role| supervisor.spawn(role, Restart::Always)),
        );
    }
    wait_for_port(args.listen, "ingest").await?;
    tracing::info!(
        url = %format!("ws://{}/v1/stream", args.listen),
        metrics = %format!("http://{}/metrics", args.listen),
        recognizers = args.recognizers,
        orchestrators = args.orchestrators,
        keys = %keys_file.display(),
        "system up: stream audio with `asr transcribe FILE.wav`; Ctrl-C stops everything"
    );

    shutdown::signal().await;
    let _ = stop_tx.send(true);
    for task in tasks {
        let _ = task.await;
    }
    tracing::info!("all children stopped");
    Ok(())
}

/// Starts roles as supervised child processes.
#[derive(Clone)]
struct Supervisor {
    exe: std::path::PathBuf,
    env: Vec<(&'static str, String)>,
    stop: watch::Receiver<bool>,
}

/// When a role that exited is started again.
#[derive(Clone)]
enum Restart {
    /// Whenever it exits, until the system stops.
    Always,
    /// While the autoscaler still wants it (its id is in the local backend's set).
    WhileWanted { registry: Registry, model: String },
}

impl Restart {
    async fn wanted(&self, role: &str) -> bool {
        match self {
            Restart::Always => true,
            Restart::WhileWanted { registry, model } => match registry.local_workers(model).await {
                Ok(ids) => ids.iter().any(|id| id == role),
                // Unsure: restart. A worker too many is drained again; one too few
                // could leave callers waiting.
                Err(e) => {
                    tracing::warn!(role, error = %e, "cannot read the wanted workers; restarting");
                    true
                }
            },
        }
    }
}

impl Supervisor {
    fn spawn(&self, role: Role, restart: Restart) -> tokio::task::JoinHandle<()> {
        tokio::spawn(self.clone().supervise(role, restart))
    }

    /// Runs a role, restarting it whenever it exits (or cannot be started) until the
    /// system stops, or until `restart` says it is no longer wanted.
    async fn supervise(mut self, role: Role, restart: Restart) {
        let mut backoff = Backoff::default();
        loop {
            let started = Instant::now();
            let child = Command::new(&self.exe)
                .args(&role.args)
                .envs(self.env.iter().map(|(k, v)| (*k, v)))
                .env(SUPERVISOR_PID_ENV, std::process::id().to_string())
                .kill_on_drop(true)
                .spawn();
            let delay = match child {
                Err(e) => {
                    let delay = backoff.after_exit(started.elapsed());
                    tracing::error!(role = %role.name, error = %e, retry_in = ?delay, "cannot start");
                    delay
                }
                Ok(mut child) => {
                    tracing::info!(role = %role.name, pid = child.id(), "started");
                    let status = tokio::select! {
                        status = child.wait() => status,
                        _ = stopped(&mut self.stop) => {
                            terminate(&role.name, &mut child).await;
                            return;
                        }
                    };
                    if !restart.wanted(&role.name).await {
                        tracing::info!(role = %role.name, ?status, "retired by the autoscaler; not restarted");
                        return;
                    }
                    let delay = backoff.after_exit(started.elapsed());
                    tracing::warn!(
                        role = %role.name, ?status, restarts = backoff.restarts, restart_in = ?delay,
                        "exited; restarting"
                    );
                    delay
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = stopped(&mut self.stop) => return,
            }
        }
    }
}

/// The recognizers of an autoscaling `asr up`: keeps one supervised process per worker id
/// the autoscaler wants, polling its set in Redis.
struct Fleet {
    registry: Registry,
    model: String,
    roles: RecognizerRoles,
    supervisor: Supervisor,
}

/// How often the fleet looks at the wanted ids: small next to a worker's start-up.
const FLEET_POLL: Duration = Duration::from_millis(200);

impl Fleet {
    async fn keep(self) {
        let mut stop = self.supervisor.stop.clone();
        let mut running: HashMap<String, tokio::task::JoinHandle<()>> = HashMap::new();
        loop {
            running.retain(|_, task| !task.is_finished());
            match self.registry.local_workers(&self.model).await {
                Ok(wanted) => {
                    for id in wanted {
                        if running.contains_key(&id) {
                            continue;
                        }
                        let restart = Restart::WhileWanted {
                            registry: self.registry.clone(),
                            model: self.model.clone(),
                        };
                        let task = self.supervisor.spawn(self.roles.role(&id), restart);
                        running.insert(id, task);
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot read the wanted workers"),
            }
            tokio::select! {
                _ = tokio::time::sleep(FLEET_POLL) => {}
                _ = stopped(&mut stop) => break,
            }
        }
        for (_, task) in running {
            let _ = task.await;
        }
    }
}

/// The first restart delay, doubled for each quick exit in a row, up to the maximum.
const RESTART_DELAY_MIN: Duration = Duration::from_millis(100);
const RESTART_DELAY_MAX: Duration = Duration::from_secs(5);
/// A process that ran this long was healthy: its exit (a crash, a kill) starts the
/// delays over.
const HEALTHY_RUN: Duration = Duration::from_secs(10);

/// When to restart a role: at once after a healthy run, so that a killed worker is
/// replaced quickly however many times it was killed before; backing off, within a
/// bound, while it keeps exiting quickly, so that a role that cannot start does not
/// spin.
#[derive(Debug, Default)]
struct Backoff {
    quick_exits: u32,
    restarts: u64,
}

impl Backoff {
    /// The delay before the next start of a process that exited after running `ran`.
    fn after_exit(&mut self, ran: Duration) -> Duration {
        if ran >= HEALTHY_RUN {
            self.quick_exits = 0;
        }
        let delay = RESTART_DELAY_MIN
            .saturating_mul(1 << self.quick_exits.min(16))
            .min(RESTART_DELAY_MAX);
        self.quick_exits = self.quick_exits.saturating_add(1);
        self.restarts += 1;
        delay
    }
}

/// Resolves once the system is stopping.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    // The guard wait_for returns is not Send: drop it here, not across an await.
    let _ = stop.wait_for(|s| *s).await;
}

/// SIGTERM, then SIGKILL if the child has not stopped within five seconds.
async fn terminate(name: &str, child: &mut Child) {
    if let Some(pid) = child.id() {
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
    }
    match tokio::time::timeout(Duration::from_secs(5), child.wait()).await {
        Ok(status) => tracing::info!(role = name, ?status, "stopped"),
        Err(_) => {
            tracing::warn!(role = name, "did not stop within 5 s; killing");
            let _ = child.kill().await;
        }
    }
}

async fn wait_for_port(addr: SocketAddr, what: &str) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!("{what} did not open {addr} within 60 s (see its log above)");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const QUICK: Duration = Duration::from_secs(1);

    #[test]
    fn a_role_that_ran_a_while_is_restarted_at_once_however_often_it_died() {
        let mut backoff = Backoff::default();
        for _ in 0..1000 {
            assert_eq!(backoff.after_exit(HEALTHY_RUN * 6), RESTART_DELAY_MIN);
        }
        assert_eq!(backoff.restarts, 1000);
    }

    #[test]
    fn quick_exits_back_off_doubling_up_to_a_bound_and_a_healthy_run_starts_over() {
        let mut backoff = Backoff::default();
        let delays: Vec<u64> = (0..8)
            .map(|_| backoff.after_exit(QUICK).as_millis() as u64)
            .collect();
        assert_eq!(delays, [100, 200, 400, 800, 1600, 3200, 5000, 5000]);
        // It never stops restarting, nor grows past the bound, however long it fails.
        for _ in 0..100_000 {
            assert_eq!(backoff.after_exit(Duration::ZERO), RESTART_DELAY_MAX);
        }
        assert_eq!(backoff.after_exit(HEALTHY_RUN), RESTART_DELAY_MIN);
        assert_eq!(backoff.after_exit(QUICK), RESTART_DELAY_MIN * 2);
    }
}
