//! `asr up` as a supervisor, with real processes: it restarts a recognizer that was
//! SIGKILLed on its own (a fresh process under the same worker id, registered again),
//! again and again, without touching the other children; and its children die with
//! it, whether it is SIGKILLed or stopped by SIGTERM.
//!
//! Everything is observed, never waited for blindly: the children are found in /proc
//! (processes whose parent is the `asr up` process), readiness through each
//! recognizer's `/readyz` and the orchestrator's registry in Redis (`{ns}:workers`,
//! `{ns}:worker:{id}`), with short polling only.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use eventlog::log::{LogConfig, StreamLog};
use eventlog::streams::StreamLayout;
use futures::FutureExt;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use testkit::free_port;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};

const PARTITIONS: u16 = 4;
/// `asr up`'s default: a leader and a standby.
const ORCHESTRATORS: u16 = 2;
const POLL: Duration = Duration::from_millis(25);
/// The model `asr up`'s recognizers serve by default.
const MODEL: &str = "whisper-tiny.en";

/// A process as /proc shows it; `start` (clock ticks since boot) tells a fresh
/// process from an old one even if the kernel reused the pid.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Proc {
    pid: u32,
    ppid: u32,
    state: char,
    start: u64,
    args: Vec<String>,
}

impl Proc {
    fn read(pid: u32) -> Option<Proc> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The command name (field 2) is in parentheses and may hold spaces.
        let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        Some(Proc {
            pid,
            state: fields.first()?.chars().next()?,
            ppid: fields.get(1)?.parse().ok()?,
            start: fields.get(19)?.parse().ok()?,
            args: cmdline
                .split(|b| *b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect(),
        })
    }

    /// Still running: the same process (not a reused pid), not a zombie.
    fn alive(&self) -> bool {
        Proc::read(self.pid).is_some_and(|now| now.start == self.start && !"ZX".contains(now.state))
    }

    /// The role as `asr up` names it: the replica id, `ingest` or the worker id.
    fn role(&self) -> Option<String> {
        let flag = |name: &str| {
            self.args
                .iter()
                .find_map(|a| a.strip_prefix(name))
                .map(str::to_string)
        };
        match self.args.get(1)?.as_str() {
            "recognizer" => flag("--worker-id="),
            "orchestrator" => flag("--replica-id="),
            "ingest" | "projector" => Some(self.args[1].clone()),
            _ => None,
        }
    }
}

/// The live children of `parent`, by role.
fn children(parent: u32) -> BTreeMap<String, Proc> {
    let mut found = BTreeMap::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue;
        };
        if let Some(p) = Proc::read(pid)
            && p.ppid == parent
            && !"ZX".contains(p.state)
            && let Some(role) = p.role()
        {
            found.insert(role, p);
        }
    }
    found
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// One Redis command over RESP (the `asr` package has no Redis client of its own).
#[derive(Debug, PartialEq)]
enum Resp {
    Nil,
    Int(i64),
    Str(String),
    Array(Vec<Resp>),
}

fn redis(command: &[&str]) -> Resp {
    let mut stream = std::net::TcpStream::connect("127.0.0.1:6379").expect("redis");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut request = format!("*{}\r\n", command.len());
    for arg in command {
        request.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
    }
    stream.write_all(request.as_bytes()).expect("redis write");
    read_resp(&mut BufReader::new(stream))
}

fn read_resp(reader: &mut impl BufRead) -> Resp {
    let mut line = String::new();
    reader.read_line(&mut line).expect("redis read");
    let line = line.trim_end();
    let (kind, rest) = line.split_at(1);
    match kind {
        "+" => Resp::Str(rest.to_string()),
        "-" => panic!("redis error: {rest}"),
        ":" => Resp::Int(rest.parse().unwrap()),
        "$" | "*" if rest == "-1" => Resp::Nil,
        "$" => {
            let mut bytes = vec![0; rest.parse::<usize>().unwrap() + 2];
            std::io::Read::read_exact(reader, &mut bytes).expect("redis read");
            bytes.truncate(bytes.len() - 2);
            Resp::Str(String::from_utf8_lossy(&bytes).into_owned())
        }
        "*" => Resp::Array(
            (0..rest.parse().unwrap())
                .map(|_| read_resp(reader))
                .collect(),
        ),
        _ => panic!("unexpected redis reply {line:?}"),
    }
}

fn strings(reply: Resp) -> Vec<String> {
    match reply {
        Resp::Array(items) => items
            .into_iter()
            .filter_map(|i| match i {
                Resp::Str(s) => Some(s),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// `GET /readyz` answered 200.
async fn ready(port: u16) -> bool {
    let probe = async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        stream
            .write_all(b"GET /readyz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            .await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        std::io::Result::Ok(response.starts_with(b"HTTP/1.1 200"))
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(3), probe).await,
        Ok(Ok(true))
    )
}

async fn port_open(port: u16) -> bool {
    tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_ok()
}

/// `n` consecutive ports that were free a moment ago (`asr up` numbers its replicas' and
/// recognizers' ports up from a base).
fn free_ports(n: u16) -> u16 {
    loop {
        let base = free_port();
        if base.checked_add(n).is_some()
            && (1..n).all(|i| std::net::TcpListener::bind(("127.0.0.1", base + i)).is_ok())
        {
            return base;
        }
    }
}

/// One `asr up`, in a namespace of its own, on free ports, logging to a file.
struct Up {
    child: Child,
    pid: u32,
    namespace: String,
    ingest_port: u16,
    /// The first orchestrator replica's `/metrics` port; the next one's is + 1.
    orchestrator_http_port: u16,
    recognizer_base_port: u16,
    recognizers: u16,
    log: PathBuf,
    /// Where `asr up` keeps its local API key.
    state_dir: PathBuf,
    /// Every child ever seen, so that cleanup leaves none behind even when supervision
    /// is broken.
    seen: Mutex<Vec<Proc>>,
}

impl Up {
    /// `asr up` with `recognizers` workers and `extra` flags.
    fn start(recognizers: u16, extra: &[&str]) -> Up {
        let namespace = format!("t-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        let log = std::env::temp_dir().join(format!("asr-up-{namespace}.log"));
        let state_dir = std::env::temp_dir().join(format!("asr-up-{namespace}-state"));
        let ingest_port = free_port();
        let (grpc_port, http_port) = (free_ports(ORCHESTRATORS), free_ports(ORCHESTRATORS));
        // Room for the recognizers an autoscaling test may add.
        let recognizer_base_port = free_ports(recognizers.max(4));
        let child = Command::new(env!("CARGO_BIN_EXE_asr"))
            .args([
                "up".to_string(),
                format!("--recognizers={recognizers}"),
                format!("--listen=127.0.0.1:{ingest_port}"),
                format!("--grpc-addr=127.0.0.1:{grpc_port}"),
                format!("--orchestrator-http-addr=127.0.0.1:{http_port}"),
                format!("--recognizer-base-port={recognizer_base_port}"),
                format!("--namespace={namespace}"),
                format!("--partitions={PARTITIONS}"),
                format!("--state-dir={}", state_dir.display()),
                format!("--projector-http-addr=127.0.0.1:{}", free_port()),
            ])
            .args(extra)
            .env("ASR_DATABASE_SCHEMA", namespace.replace('-', "_"))
            .env("RUST_LOG", "info")
            .env_remove("ASR_SUPERVISOR_PID")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .kill_on_drop(true)
            .spawn()
            .expect("starting asr up");
        let pid = child.id().expect("asr up's pid");
        Up {
            child,
            pid,
            namespace,
            ingest_port,
            orchestrator_http_port: http_port,
            recognizer_base_port,
            recognizers,
            log,
            state_dir,
            seen: Mutex::new(Vec::new()),
        }
    }

    /// The live children of `asr up`, by role.
    fn children(&self) -> BTreeMap<String, Proc> {
        let kids = children(self.pid);
        let mut seen = self.seen.lock().unwrap();
        for p in kids.values() {
            if !seen.contains(p) {
                seen.push(p.clone());
            }
        }
        kids
    }

    fn worker_ids(&self) -> Vec<String> {
        (1..=self.recognizers)
            .map(|i| format!("recognizer-{i}"))
            .collect()
    }

    fn ops_port(&self, worker: &str) -> u16 {
        let i: u16 = worker["recognizer-".len()..].parse().unwrap();
        self.recognizer_base_port + i - 1
    }

    /// A counter summed over the orchestrator replicas' `/metrics` (only the leader's
    /// moves), 0 where it is not exported yet.
    async fn orchestrator_counter(&self, series: &str) -> f64 {
        let mut total = 0.0;
        for port in (0..ORCHESTRATORS).map(|i| self.orchestrator_http_port + i) {
            let Ok(response) = reqwest::get(format!("http://127.0.0.1:{port}/metrics")).await
            else {
                continue;
            };
            let body = response.text().await.unwrap_or_default();
            total += body
                .lines()
                .filter_map(|line| line.strip_prefix(series))
                .filter_map(|value| value.trim().parse::<f64>().ok())
                .sum::<f64>();
        }
        total
    }

    fn ws_url(&self) -> String {
        format!("ws://127.0.0.1:{}/v1/stream", self.ingest_port)
    }

    /// The worker ids the orchestrator's registry holds.
    fn registered(&self) -> Vec<String> {
        let mut ids = strings(redis(&["SMEMBERS", &format!("{}:workers", self.namespace)]));
        ids.sort();
        ids
    }

    /// When the worker last registered, as the registry says.
    fn registered_at_ms(&self, worker: &str) -> Option<u64> {
        let key = format!("{}:worker:{worker}", self.namespace);
        match redis(&["HGET", &key, "registered_at_ms"]) {
            Resp::Str(ms) => ms.parse().ok(),
            _ => None,
        }
    }

    /// The worker serves its ops port with /readyz 200 and is in the registry,
    /// registered at `since_ms` or later.
    async fn worker_ready(&self, worker: &str, since_ms: u64) -> bool {
        self.registered_at_ms(worker)
            .is_some_and(|at| at >= since_ms)
            && self.registered().iter().any(|w| w == worker)
            && ready(self.ops_port(worker)).await
    }

    async fn all_workers_ready(&self) -> bool {
        for worker in self.worker_ids() {
            if !self.worker_ready(&worker, 0).await {
                return false;
            }
        }
        true
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Panics with the log if `asr up` exited (it is then a zombie until reaped).
    fn assert_running(&self, what: &str) {
        if Proc::read(self.pid).is_none_or(|p| p.state == 'Z') {
            panic!("asr up exited while {what}; its log:\n{}", self.log());
        }
    }

    /// Polls `check` until it holds, failing with the log after `limit`.
    async fn wait_until<F: AsyncFnMut(&Up) -> bool>(
        &self,
        what: &str,
        limit: Duration,
        mut check: F,
    ) -> Duration {
        let started = Instant::now();
        loop {
            self.assert_running(what);
            if check(self).await {
                return started.elapsed();
            }
            if started.elapsed() > limit {
                panic!(
                    "not within {limit:?}: {what}; children now {:?}; registry {:?}; the log:\n{}",
                    self.children().keys().collect::<Vec<_>>(),
                    self.registered(),
                    self.log()
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Streams `wav` through the system with the CLI (which finds the local API key
    /// `asr up` created without being told), at `speed` times real time (0: unpaced),
    /// and returns the transcript it prints.
    async fn transcribe(&self, wav: &std::path::Path, speed: f64) -> String {
        let output = Command::new(env!("CARGO_BIN_EXE_asr"))
            .arg("transcribe")
            .arg(wav)
            .args(["--speed", &speed.to_string(), "--url", &self.ws_url()])
            .arg("--state-dir")
            .arg(&self.state_dir)
            .env_remove("ASR_API_KEY")
            .output()
            .await
            .expect("running asr transcribe");
        assert!(
            output.status.success(),
            "the session failed: {}; the log:\n{}",
            String::from_utf8_lossy(&output.stderr),
            self.log()
        );
        String::from_utf8_lossy(&output.stdout).trim().to_string()
    }

    /// The recognizer children now, sorted by worker id.
    fn recognizers(&self) -> Vec<String> {
        self.children()
            .into_keys()
            .filter(|role| role.starts_with("recognizer-"))
            .collect()
    }

    /// The worker ids the autoscaler wants running (the local backend's set).
    fn wanted(&self) -> Vec<String> {
        let key = format!("{}:local:{MODEL}:workers", self.namespace);
        let mut ids = strings(redis(&["SMEMBERS", &key]));
        ids.sort();
        ids
    }

    /// The sessions the registry gives `worker`.
    fn sessions_of(&self, worker: &str) -> Vec<String> {
        strings(redis(&[
            "SMEMBERS",
            &format!("{}:worker:{worker}:sessions", self.namespace),
        ]))
    }

    /// The roles `asr up` runs as children, sorted.
    fn roles(&self) -> Vec<String> {
        let mut roles = vec!["ingest".to_string(), "projector".to_string()];
        roles.extend((1..=ORCHESTRATORS).map(|i| format!("orchestrator-{i}")));
        roles.extend(self.worker_ids());
        roles.sort();
        roles
    }

    /// Waits until ingest accepts connections and every recognizer is registered;
    /// returns the children by role.
    async fn wait_ready(&mut self) -> BTreeMap<String, Proc> {
        let took = self
            .wait_until("the system comes up", Duration::from_secs(90), async |up| {
                port_open(up.ingest_port).await && up.all_workers_ready().await
            })
            .await;
        println!("asr up ready in {took:.2?}");
        let kids = self.children();
        let roles = self.roles();
        assert_eq!(
            kids.keys().cloned().collect::<Vec<_>>(),
            roles,
            "asr up's children: {kids:?}"
        );
        kids
    }

    /// Stops `asr up` if it still runs (and SIGKILLs any child that outlived it), then
    /// removes the namespace's streams, Redis keys and read-model schema, its state
    /// folder, and the log unless `keep_log`.
    async fn cleanup(self, keep_log: bool) {
        let (namespace, log) = (self.namespace.clone(), self.log.clone());
        let _ = std::fs::remove_dir_all(&self.state_dir);
        let seen = std::mem::take(&mut *self.seen.lock().unwrap());
        let mut up = self;
        if let Ok(None) = up.child.try_wait() {
            let _ = kill(Pid::from_raw(up.pid as i32), Signal::SIGTERM);
            let _ = tokio::time::timeout(Duration::from_secs(10), up.child.wait()).await;
        }
        drop(up); // kill_on_drop: SIGKILL if it still runs
        let deadline = Instant::now() + Duration::from_secs(5);
        while seen.iter().any(Proc::alive) && Instant::now() < deadline {
            tokio::time::sleep(POLL).await;
        }
        for p in seen.iter().filter(|p| p.alive()) {
            eprintln!("SIGKILL {p:?}: it outlived asr up");
            sigkill(p);
        }
        if let Ok(stream_log) = StreamLog::connect(&LogConfig::default()).await {
            let layout = StreamLayout::new(namespace.clone(), PARTITIONS);
            stream_log.delete_streams(&layout.all_streams()).await;
        }
        let keys = strings(redis(&["KEYS", &format!("{namespace}:*")]));
        if !keys.is_empty() {
            let mut del = vec!["DEL"];
            del.extend(keys.iter().map(String::as_str));
            redis(&del);
        }
        if let Ok(pool) = sqlx::PgPool::connect(testkit::system::DATABASE_URL).await {
            let schema = namespace.replace('-', "_");
            let drop = format!("DROP SCHEMA IF EXISTS {schema} CASCADE");
            let _ = sqlx::query(&drop).execute(&pool).await;
        }
        if keep_log {
            eprintln!("asr up's log: {}", log.display());
        } else {
            let _ = std::fs::remove_file(log);
        }
    }
}

/// `asr up` as it runs by default (autoscaling), kept from scaling down while a test
/// counts the recognizers it started: with no call, one idle worker is the target.
const NO_SCALE_DOWN: [&str; 1] = ["--scaling-down-after-secs=3600"];

/// A fixed number of recognizers: no autoscaler adds or retires any.
const FIXED: [&str; 1] = ["--fixed-recognizers"];

/// Runs `test` against a fresh `asr up` with `recognizers` workers and `extra` flags,
/// holding the heavy-test lock, and cleans up after it, also when it fails.
async fn with_up(recognizers: u16, extra: &[&str], test: impl AsyncFnOnce(&mut Up)) {
    let _serial = testkit::serial::heavy();
    let mut up = Up::start(recognizers, extra);
    let outcome = AssertUnwindSafe(test(&mut up)).catch_unwind().await;
    up.cleanup(outcome.is_err()).await;
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

fn sigkill(p: &Proc) {
    kill(Pid::from_raw(p.pid as i32), Signal::SIGKILL)
        .unwrap_or_else(|e| panic!("SIGKILL {}: {e}", p.pid));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_recognizer_is_replaced_by_a_fresh_process_every_time() {
    with_up(2, &NO_SCALE_DOWN, async |up| {
        let mut kids = up.wait_ready().await;

        let rounds: [&[&str]; 4] = [
            &["recognizer-1"],
            &["recognizer-2"],
            &["recognizer-1", "recognizer-2"],
            &["recognizer-1"],
        ];
        for (round, victims) in rounds.iter().enumerate() {
            let killed_at_ms = now_ms();
            let killed_at = Instant::now();
            for victim in *victims {
                sigkill(&kids[*victim]);
            }
            // A fresh process appears under each victim's worker id and registers (the
            // orchestrator dropped the dead one when its registration stream broke).
            let mut replaced = BTreeMap::new();
            let mut registered = BTreeMap::new();
            up.wait_until(
                &format!("fresh processes replace and register {victims:?}"),
                Duration::from_secs(30),
                async |up| {
                    let now = up.children();
                    for victim in *victims {
                        let old = &kids[*victim];
                        if !replaced.contains_key(victim)
                            && now.get(*victim).is_some_and(|p| p.start != old.start)
                        {
                            assert!(!old.alive(), "the killed {victim} is gone");
                            replaced.insert(*victim, killed_at.elapsed());
                        }
                        if replaced.contains_key(victim)
                            && !registered.contains_key(victim)
                            && up.worker_ready(victim, killed_at_ms).await
                        {
                            registered.insert(*victim, killed_at.elapsed());
                        }
                    }
                    registered.len() == victims.len()
                },
            )
            .await;
            for victim in *victims {
                println!(
                    "round {}: {victim} SIGKILLed; a new process after {:.2?}, registered after {:.2?}",
                    round + 1,
                    replaced[victim],
                    registered[victim],
                );
            }
            // Nobody else was touched, and every worker is back.
            let now = up.children();
            for (role, before) in &kids {
                if victims.contains(&role.as_str()) {
                    assert_ne!(now[role].pid, before.pid, "{role} is a new process");
                } else {
                    assert_eq!(now.get(role), Some(before), "{role} kept its process");
                }
            }
            // Every worker is registered and ready. Polled, not asserted at one instant: a
            // freshly registered recognizer may re-register once right away (its first
            // heartbeat can reach the orchestrator before its registration does).
            up.wait_until(
                "every worker is registered",
                Duration::from_secs(10),
                async |up| up.all_workers_ready().await,
            )
            .await;
            kids = now;
        }

        // The system still serves: a session streamed through it by the CLI, which
        // finds the local API key `asr up` created without being told it, completes.
        let sentence = "please send an ambulance to the main street";
        let wav = up.state_dir.join("call.wav");
        testkit::speech::write_wav(&testkit::speech::sentences(&[sentence], 800), &wav);
        let transcript = up.transcribe(&wav, 0.0).await;
        println!("after the kills, heard {transcript:?}");
        assert!(
            !transcript.trim().is_empty(),
            "a transcript after the kills"
        );
        up.assert_running("the session ran");
        assert_eq!(up.children(), kids, "no child died during the session");
    })
    .await;
}

/// Waits until none of `procs` runs any more; returns how long that took.
async fn all_gone(procs: &[Proc], limit: Duration, log: &str) -> Duration {
    let started = Instant::now();
    loop {
        let alive: Vec<&Proc> = procs.iter().filter(|p| p.alive()).collect();
        if alive.is_empty() {
            return started.elapsed();
        }
        if started.elapsed() > limit {
            panic!("still running after {limit:?}: {alive:?}; the log:\n{log}");
        }
        tokio::time::sleep(POLL).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn children_die_with_a_sigkilled_asr_up() {
    with_up(2, &NO_SCALE_DOWN, async |up| {
        let kids: Vec<Proc> = up.wait_ready().await.into_values().collect();
        up.child.kill().await.expect("SIGKILL asr up"); // and reap it
        let took = all_gone(&kids, Duration::from_secs(5), &up.log()).await;
        println!(
            "every child of a SIGKILLed asr up exited within {took:.2?}: {:?}",
            kids.iter().map(|p| p.pid).collect::<Vec<_>>()
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn children_die_with_a_sigkilled_asr_up_even_while_they_start() {
    with_up(2, &FIXED, async |up| {
        // As soon as both recognizers run, and long before their model is loaded.
        let roles = up.roles();
        up.wait_until(
            "asr up starts its children",
            Duration::from_secs(60),
            async |up| up.children().keys().cloned().collect::<Vec<_>>() == roles,
        )
        .await;
        let kids: Vec<Proc> = up.children().into_values().collect();
        let loaded = |log: &str| log.matches("model loaded").count();
        let loaded_before = loaded(&up.log());
        up.child.kill().await.expect("SIGKILL asr up");
        let took = all_gone(&kids, Duration::from_secs(2), &up.log()).await;
        let log = up.log();
        println!(
            "every child of asr up SIGKILLed while starting exited within {took:.2?} ({loaded_before} models loaded at the kill)"
        );
        assert_eq!(
            loaded(&log),
            loaded_before,
            "the recognizers died while loading their model, not after it:\n{log}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_stops_every_child_and_asr_up_exits_zero() {
    with_up(2, &FIXED, async |up| {
        let kids: Vec<Proc> = up.wait_ready().await.into_values().collect();
        let sent = Instant::now();
        kill(Pid::from_raw(up.pid as i32), Signal::SIGTERM).expect("SIGTERM asr up");
        let status = tokio::time::timeout(Duration::from_secs(20), up.child.wait())
            .await
            .unwrap_or_else(|_| panic!("asr up still runs 20 s after SIGTERM:\n{}", up.log()))
            .expect("waiting for asr up");
        let took = sent.elapsed();
        let log = up.log();
        assert!(status.success(), "asr up exited with {status}; log:\n{log}");
        // asr up waits for its children before it exits: none is left.
        let alive: Vec<&Proc> = kids.iter().filter(|p| p.alive()).collect();
        assert!(
            alive.is_empty(),
            "children outlived asr up: {alive:?}\n{log}"
        );
        assert!(
            !log.contains("did not stop within"),
            "every child stopped on SIGTERM, none had to be killed:\n{log}"
        );
        println!("SIGTERM: asr up and its children stopped in {took:.2?}");
    })
    .await;
}

/// Flags for `asr up`'s own autoscaling: the report's policy with no spare slot (a
/// session each, so the burst alone decides), checked often.
const AUTOSCALE: [&str; 5] = [
    "--scaling-policy=idle-target",
    "--scaling-target=0",
    "--scaling-min-workers=1",
    "--scaling-max-workers=3",
    "--scaling-check-interval-ms=200",
];

fn call(up: &Up, name: &str, sentences: &[&str]) -> PathBuf {
    let wav = up.state_dir.join(format!("{name}.wav"));
    std::fs::create_dir_all(&up.state_dir).unwrap();
    testkit::speech::write_wav(&testkit::speech::sentences(sentences, 600), &wav);
    wav
}

const CALLS: [&[&str]; 3] = [
    &[
        "there is a fire in the kitchen of the restaurant",
        "the smoke is getting worse",
    ],
    &[
        "my father fell down the stairs",
        "he is breathing but he does not answer",
    ],
    &[
        "a car hit a cyclist at the crossing",
        "please send an ambulance quickly",
    ],
];

#[tokio::test(flavor = "multi_thread")]
async fn autoscale_starts_recognizers_for_a_burst_and_retires_them_when_idle() {
    let mut flags = AUTOSCALE.to_vec();
    flags.push("--scaling-down-after-secs=3");
    with_up(1, &flags, async |up| {
        up.wait_ready().await;
        assert_eq!(up.wanted(), ["recognizer-1"], "seeded with --recognizers");

        // A burst: three callers at once, one worker with one slot.
        let wavs: Vec<PathBuf> = (0..CALLS.len())
            .map(|i| call(up, &format!("burst-{i}"), CALLS[i]))
            .collect();
        let sessions = futures::future::join_all(wavs.iter().map(|wav| up.transcribe(wav, 0.0)));
        let mut peak = Vec::new();
        let watch = async {
            loop {
                let now = up.recognizers();
                if now.len() > peak.len() {
                    peak = now;
                }
                tokio::time::sleep(POLL).await;
            }
        };
        let transcripts = tokio::select! {
            t = sessions => t,
            () = watch => unreachable!(),
        };
        println!("recognizers at the peak of the burst: {peak:?}");
        assert_eq!(
            peak,
            ["recognizer-1", "recognizer-2", "recognizer-3"],
            "one recognizer per caller"
        );
        // Everyone was served, whole: nothing lost while waiting for a worker.
        for (transcript, sentences) in transcripts.iter().zip(CALLS) {
            let expected = sentences.join(" ");
            let wer = client::words::word_error_rate(&expected, transcript);
            println!("heard {transcript:?} (WER {wer:.2})");
            assert!(wer <= 0.35, "{transcript:?} against {expected:?}");
        }

        // Idle again: after the 3 s cool-down two workers (idle ones: whichever
        // finished first) are drained and retired, and their processes exit for good.
        // Their supervisors log it just after reaping them: wait for that too.
        let retired = |up: &Up| {
            up.log()
                .matches("retired by the autoscaler; not restarted")
                .count()
        };
        let took = up
            .wait_until(
                "the extra recognizers are retired",
                Duration::from_secs(30),
                async |up| {
                    up.recognizers().len() == 1
                        && up.wanted() == up.recognizers()
                        && retired(up) >= 2
                },
            )
            .await;
        let kept = up.recognizers();
        println!("back to {kept:?} {took:.2?} after the burst");
        assert_eq!(up.registered(), kept);
        assert_eq!(
            retired(up),
            2,
            "both retired processes exited and stayed down"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(up.recognizers(), kept, "nothing restarted them");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn draining_a_worker_hands_its_live_session_off_without_losing_a_word() {
    let mut flags = AUTOSCALE.to_vec();
    // No scale-down of its own during the test; the drain gives up after 1 s.
    flags.extend(["--scaling-down-after-secs=600", "--drain-timeout-secs=1"]);
    with_up(2, &flags, async |up| {
        up.wait_ready().await;
        let sentences = [
            "the caller reports a gas leak in the basement",
            "everyone has left the building",
            "the fire brigade should use the back entrance",
        ];
        let wav = call(up, "drained", &sentences);
        // The transcript of record: the same audio, nobody drained.
        let reference = up.transcribe(&wav, 0.0).await;
        // Its worker releases it just after the client has its transcript.
        up.wait_until(
            "the reference call is released",
            Duration::from_secs(30),
            async |up| up.registered().iter().all(|w| up.sessions_of(w).is_empty()),
        )
        .await;

        // The same call again, at the caller's pace this time, drained mid-call.
        let session = up.transcribe(&wav, 1.0);
        let drain = async {
            let serving = async |up: &Up| {
                up.registered().into_iter().find_map(|w| {
                    let sessions = up.sessions_of(&w);
                    sessions.first().map(|s| (w.clone(), s.clone()))
                })
            };
            let mut found = None;
            up.wait_until(
                "the call is assigned",
                Duration::from_secs(30),
                async |up| {
                    found = serving(up).await;
                    found.is_some()
                },
            )
            .await;
            let (worker, session) = found.expect("the serving worker");
            // Drain once the first sentence is final: the session's checkpoint exists.
            let checkpoint = format!("{}:checkpoint:{session}", up.namespace);
            up.wait_until(
                "the first sentence is checkpointed",
                Duration::from_secs(30),
                async |_| redis(&["EXISTS", &checkpoint]) == Resp::Int(1),
            )
            .await;
            let output = Command::new(env!("CARGO_BIN_EXE_asr"))
                .args(["workers", "drain", &worker])
                .arg(format!("--namespace={}", up.namespace))
                .output()
                .await
                .expect("running asr workers drain");
            let said = String::from_utf8_lossy(&output.stdout);
            assert!(
                output.status.success(),
                "{said} {}",
                String::from_utf8_lossy(&output.stderr)
            );
            assert!(said.contains("1 session(s)"), "{said}");
            worker
        };
        let (transcript, drained) = tokio::join!(session, drain);
        println!("reference {reference:?}; drained {drained} mid-call, heard {transcript:?}");
        assert_eq!(
            transcript, reference,
            "the handed-off call lost or doubled nothing"
        );

        // The drained worker was retired with its session moved, and stays down; the
        // autoscaler replaced its capacity.
        up.wait_until(
            "the drained worker is gone",
            Duration::from_secs(30),
            async |up| !up.recognizers().contains(&drained) && !up.registered().contains(&drained),
        )
        .await;
        assert!(!up.wanted().contains(&drained));
        assert!(
            up.log().contains("moved=1"),
            "its live session was handed off"
        );
        let handoffs = up
            .orchestrator_counter(r#"orchestrator_scaling_handoffs_total{model="whisper-tiny.en"}"#)
            .await;
        assert_eq!(handoffs, 1.0, "the handoff is counted");
    })
    .await;
}
