//! The system under test, as real processes: orchestrator replicas, an ingest node and
//! recognizers, each a separate OS process of the built `asr` binary, in a namespace
//! of their own (stream names and Redis keys; a Redis database of its own when a test
//! wipes it) and on free ports. Each process logs to a file, printed when a test fails
//! to start the system.
//!
//! Failover tests SIGKILL a process by its role ([`System::kill`]), start fresh
//! recognizers (waiting for their model: [`System::start_recognizer`], or not:
//! [`System::spawn_recognizer`]) or restart a killed one under its old worker id
//! ([`System::restart`]), and ask the
//! orchestrator's registry which worker holds a session ([`System::assignment`]).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use client::StreamOptions;
use eventlog::log::{LogConfig, StreamLog};
use eventlog::streams::StreamLayout;
use ingest::protocol::Secret;
use tokio::process::{Child, Command};

use crate::free_port;

/// What to start.
#[derive(Clone, Debug)]
pub struct SystemConfig {
    /// Orchestrator replicas, `orchestrator-1` … (one leads; the others stand by).
    pub orchestrators: usize,
    /// Ingest nodes: `ingest`, `ingest-2`, … (they share nothing but the log and Redis).
    pub ingests: usize,
    pub recognizers: usize,
    /// The Redis database every process uses (tests that wipe Redis take their own).
    pub redis_db: u8,
    /// Stream partitions (few keep the test's broker footprint small).
    pub partitions: u16,
    /// Extra environment for every process.
    pub env: Vec<(String, String)>,
    /// Run `asr projector` too, into a PostgreSQL schema of the system's own
    /// ([`System::database_schema`]).
    pub projector: bool,
}

impl Default for SystemConfig {
    fn default() -> Self {
        Self {
            orchestrators: 1,
            ingests: 1,
            recognizers: 1,
            redis_db: 0,
            partitions: 4,
            env: Vec::new(),
            projector: false,
        }
    }
}

/// One process of the system (running, or killed: its log stays).
pub struct Process {
    pub role: String,
    pub child: Child,
    pub log: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
}

/// Who holds a session, as the orchestrator's registry in Redis says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Assignment {
    /// The worker id (a recognizer's role name), while the session is assigned.
    pub worker: Option<String>,
    pub epoch: u64,
    /// `waiting`, `assigned` or `done`.
    pub state: String,
}

/// The role name of ingest node `i` (from 0).
pub fn ingest_role(i: usize) -> String {
    match i {
        0 => "ingest".into(),
        i => format!("ingest-{}", i + 1),
    }
}

/// The PostgreSQL database `deploy/services.sh` sets up (the projector's default).
pub const DATABASE_URL: &str = "postgres://asr:asr@127.0.0.1:5432/asr_test";

/// The tenant a test system's sessions belong to.
pub const TEST_TENANT: &str = "test";

pub struct System {
    pub namespace: String,
    pub layout: StreamLayout,
    /// The ingest nodes' WebSocket ports, in the order of their roles.
    pub ingest_ports: Vec<u16>,
    /// The key of [`TEST_TENANT`], which ingest is given.
    pub api_key: String,
    /// `redis://…/{db}`, as every process of the system is given it.
    pub redis_url: String,
    /// The projector's schema (the namespace, as an identifier), dropped at the end.
    pub database_schema: String,
    /// The projector's HTTP port (its audit API), when it runs.
    pub projector_port: Option<u16>,
    pub processes: Vec<Process>,
    bin: PathBuf,
    logs: PathBuf,
    env: Vec<(String, String)>,
}

impl System {
    /// Starts the orchestrator replicas, then ingest and the recognizers, and waits
    /// until a leader is elected, ingest accepts connections and every recognizer has
    /// loaded its model (its metrics port opens then; it registers right after).
    pub async fn start(bin: &Path, config: SystemConfig) -> System {
        let namespace = format!("t-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        let logs = std::env::temp_dir().join(format!("asr-{namespace}"));
        std::fs::create_dir_all(&logs).expect("log dir");
        let redis_url = format!("redis://127.0.0.1:6379/{}", config.redis_db);
        let api_key = format!("test-{}", uuid::Uuid::new_v4().simple());
        let database_schema = namespace.replace('-', "_");
        let mut env = vec![
            (
                "ASR_API_KEYS".to_string(),
                format!("{TEST_TENANT}={api_key}"),
            ),
            ("ASR_NAMESPACE".to_string(), namespace.clone()),
            ("ASR_DATABASE_SCHEMA".to_string(), database_schema.clone()),
            (
                "ASR_RESUME_SECRET".to_string(),
                uuid::Uuid::new_v4().simple().to_string(),
            ),
            ("ASR_PARTITIONS".to_string(), config.partitions.to_string()),
            ("ASR_REDIS_URL".to_string(), redis_url.clone()),
            ("RUST_LOG".to_string(), "info".to_string()),
        ];
        env.extend(config.env.iter().cloned());
        let mut system = System {
            layout: StreamLayout::new(namespace.clone(), config.partitions),
            namespace,
            ingest_ports: (0..config.ingests.max(1)).map(|_| free_port()).collect(),
            api_key,
            redis_url,
            database_schema,
            projector_port: None,
            processes: Vec::new(),
            bin: bin.to_path_buf(),
            logs,
            env,
        };
        for i in 1..=config.orchestrators {
            let replica = format!("orchestrator-{i}");
            let grpc = free_port();
            system.spawn(
                &replica,
                &[
                    "orchestrator".into(),
                    format!("--replica-id={replica}"),
                    format!("--grpc-addr=127.0.0.1:{grpc}"),
                    format!("--http-addr=127.0.0.1:{}", free_port()),
                ],
            );
            system.wait_for_port(grpc, &replica).await;
        }
        system.leader_after(None).await;
        let ingests: Vec<(String, u16)> = system
            .ingest_ports
            .iter()
            .enumerate()
            .map(|(i, port)| (ingest_role(i), *port))
            .collect();
        for (role, port) in &ingests {
            system.spawn(
                role,
                &["ingest".into(), format!("--listen=127.0.0.1:{port}")],
            );
        }
        if config.projector {
            let port = free_port();
            let http = format!("--http-addr=127.0.0.1:{port}");
            system.spawn("projector", &["projector".into(), http]);
            system.projector_port = Some(port);
        }
        for i in 0..config.recognizers {
            system
                .start_recognizer(&format!("recognizer-{}", i + 1))
                .await;
        }
        for (role, port) in &ingests {
            system.wait_for_port(*port, role).await;
        }
        system
    }

    /// The first ingest node's WebSocket URL.
    pub fn ws_url(&self) -> String {
        self.ws_url_of(0)
    }

    /// Ingest node `i`'s WebSocket URL (its role is `ingest`, then `ingest-2`, …).
    pub fn ws_url_of(&self, i: usize) -> String {
        format!("ws://127.0.0.1:{}/v1/stream", self.ingest_ports[i])
    }

    /// How a client streams to this system: its ingest URL and its tenant's key.
    pub fn stream_options(&self) -> StreamOptions {
        StreamOptions {
            urls: vec![self.ws_url()],
            api_key: Some(Secret(self.api_key.clone())),
            ..StreamOptions::default()
        }
    }

    /// Starts one more recognizer and waits until its model is loaded.
    pub async fn start_recognizer(&mut self, worker_id: &str) {
        self.start_recognizer_with(worker_id, &[]).await;
    }

    /// [`start_recognizer`](Self::start_recognizer) with extra environment for this
    /// process only (for instance `FAILPOINTS`).
    pub async fn start_recognizer_with(&mut self, worker_id: &str, env: &[(&str, &str)]) {
        let http = self.spawn_recognizer(worker_id, env);
        self.wait_for_port(http, worker_id).await;
    }

    /// Starts one more recognizer and returns at once, with its ops HTTP port; it
    /// registers with the orchestrator once its model is loaded (seconds). Failover
    /// tests use this to bring capacity back without pausing the session they watch.
    pub fn spawn_recognizer(&mut self, worker_id: &str, env: &[(&str, &str)]) -> u16 {
        let http = free_port();
        let args = [
            "recognizer".into(),
            format!("--worker-id={worker_id}"),
            format!("--http-addr=127.0.0.1:{http}"),
        ];
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.spawn_with(worker_id, &args, &env);
        http
    }

    /// The OS process id of the role's running process.
    pub fn pid_of(&self, role: &str) -> Option<u32> {
        self.processes
            .iter()
            .rev()
            .find(|p| p.role == role)
            .and_then(|p| p.child.id())
    }

    /// SIGKILLs the role's running process and waits until it is gone; panics if the
    /// role has no running process.
    pub async fn kill(&mut self, role: &str) {
        let process = self
            .processes
            .iter_mut()
            .rev()
            .find(|p| p.role == role && p.child.id().is_some())
            .unwrap_or_else(|| panic!("no running process {role}"));
        // tokio's kill is SIGKILL on Unix, then reaps the child.
        process
            .child
            .kill()
            .await
            .unwrap_or_else(|e| panic!("SIGKILL {role}: {e}"));
    }

    /// Starts the role again (killing it first if it still runs) with the same
    /// arguments and environment: the same worker id, a fresh process. Returns at once,
    /// like [`spawn_recognizer`](Self::spawn_recognizer).
    pub async fn restart(&mut self, role: &str) {
        if self.pid_of(role).is_some() {
            self.kill(role).await;
        }
        let last = self
            .processes
            .iter()
            .rev()
            .find(|p| p.role == role)
            .unwrap_or_else(|| panic!("{role} never ran"));
        let (args, env) = (last.args.clone(), last.env.clone());
        self.spawn_with(role, &args, &env);
    }

    /// SIGKILLs every running process of the system, all at once: a whole-system
    /// crash. Returns the roles that were running, in the order they started.
    pub async fn kill_all(&mut self) -> Vec<String> {
        let mut roles = Vec::new();
        for process in &mut self.processes {
            if process.child.id().is_some() {
                let _ = process.child.start_kill();
                roles.push(process.role.clone());
            }
        }
        for process in &mut self.processes {
            let _ = process.child.wait().await;
        }
        roles
    }

    /// Starts `roles` again, as [`restart`](Self::restart) does, orchestrators first;
    /// returns once the ingest nodes accept connections again.
    pub async fn restart_all(&mut self, roles: &[String]) {
        for role in roles {
            self.restart(role).await;
        }
        for (i, port) in self.ingest_ports.clone().into_iter().enumerate() {
            self.wait_for_port(port, &ingest_role(i)).await;
        }
    }

    /// Which worker holds the session under which epoch, from the orchestrator's
    /// registry; `None` before the orchestrator recorded the session.
    pub async fn assignment(&self, session: uuid::Uuid) -> Option<Assignment> {
        let mut redis = self.redis().await;
        let fields: std::collections::HashMap<String, String> = redis::cmd("HGETALL")
            .arg(format!("{}:session:{session}", self.namespace))
            .query_async(&mut redis)
            .await
            .expect("HGETALL session");
        let epoch = fields.get("epoch")?.parse().ok()?;
        Some(Assignment {
            worker: fields.get("worker").cloned(),
            epoch,
            state: fields.get("state").cloned().unwrap_or_default(),
        })
    }

    /// A connection to the system's Redis database.
    pub async fn redis(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.redis_url.as_str())
            .expect("redis url")
            .get_multiplexed_async_connection()
            .await
            .expect("redis connection")
    }

    /// The orchestrator replica holding the leader lock, and its fencing token.
    pub async fn leader(&self) -> Option<(String, u64)> {
        let value: Option<String> = redis::cmd("GET")
            .arg(orchestrator::leadership::leader_key(&self.namespace))
            .query_async(&mut self.redis().await)
            .await
            .expect("GET leader");
        let leader = orchestrator::leadership::Leader::parse(&value?)?;
        Some((leader.replica, leader.token))
    }

    /// Waits until a replica leads under a token above `after` (any, for `None`);
    /// returns it and its token.
    pub async fn leader_after(&self, after: Option<u64>) -> (String, u64) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Some((replica, token)) = self.leader().await
                && after.is_none_or(|after| token > after)
            {
                return (replica, token);
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no orchestrator leader after token {after:?}\n{}",
                self.all_logs()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn spawn(&mut self, role: &str, args: &[String]) {
        self.spawn_with(role, args, &[]);
    }

    fn spawn_with(&mut self, role: &str, args: &[String], env: &[(String, String)]) {
        // One log per process: a restarted role writes a second file.
        let n = self.processes.iter().filter(|p| p.role == role).count();
        let name = match n {
            0 => format!("{role}.log"),
            n => format!("{role}.{n}.log"),
        };
        let log = self.logs.join(name);
        let file = std::fs::File::create(&log).expect("log file");
        let child = Command::new(&self.bin)
            .args(args)
            .envs(self.env.iter().chain(env).map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(file)
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {role}: {e}"));
        self.processes.push(Process {
            role: role.into(),
            child,
            log,
            args: args.to_vec(),
            env: env.to_vec(),
        });
    }

    async fn wait_for_port(&mut self, port: u16, role: &str) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            let exited = self
                .processes
                .iter_mut()
                .rev()
                .find(|p| p.role == role)
                .and_then(|p| p.child.try_wait().ok().flatten());
            if exited.is_some() || tokio::time::Instant::now() > deadline {
                panic!(
                    "{role} did not open port {port} ({exited:?}); its log:\n{}",
                    self.log_of(role)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The log a process wrote so far.
    pub fn log_of(&self, role: &str) -> String {
        self.processes
            .iter()
            .filter(|p| p.role == role)
            .map(|p| std::fs::read_to_string(&p.log).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Every process's log, for a failing test's message.
    pub fn all_logs(&self) -> String {
        self.processes
            .iter()
            .map(|p| {
                let log = std::fs::read_to_string(&p.log).unwrap_or_default();
                format!("===== {} ({}) =====\n{log}", p.role, p.log.display())
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Stops every process and removes the namespace's streams and Redis keys.
    pub async fn stop(mut self) {
        for process in &mut self.processes {
            let _ = process.child.kill().await;
        }
        if let Ok(log) = StreamLog::connect(&LogConfig::default()).await {
            log.delete_streams(&self.layout.all_streams()).await;
        }
        if let Ok(client) = redis::Client::open(self.redis_url.as_str())
            && let Ok(mut redis) = client.get_multiplexed_async_connection().await
        {
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg(format!("{}:*", self.namespace))
                .query_async(&mut redis)
                .await
                .unwrap_or_default();
            if !keys.is_empty() {
                let _: redis::RedisResult<()> =
                    redis::cmd("DEL").arg(keys).query_async(&mut redis).await;
            }
        }
        if self.processes.iter().any(|p| p.role == "projector")
            && let Ok(pool) = sqlx::PgPool::connect(DATABASE_URL).await
        {
            let drop = format!("DROP SCHEMA IF EXISTS {} CASCADE", self.database_schema);
            let _ = sqlx::query(&drop).execute(&pool).await;
        }
        let _ = std::fs::remove_dir_all(&self.logs);
    }
}
