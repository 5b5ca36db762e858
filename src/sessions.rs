//! `asr sessions list|show`: the audit API (`asr projector`) from the command line, as
//! the tenant of the key (`--api-key`, `ASR_API_KEY`, or the local key of `asr up`).

use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use projector::api::{ApiError, SessionDetail, SessionPage};
use serde::de::DeserializeOwned;

use crate::local_key::StateDir;

#[derive(Args, Debug)]
pub struct SessionsArgs {
    #[command(subcommand)]
    command: SessionsCommand,
    /// The audit API: the projector's HTTP address.
    #[arg(
        long,
        env = "ASR_AUDIT_URL",
        default_value = "http://127.0.0.1:9301",
        global = true
    )]
    url: String,
    /// The tenant's API key. Without it, the local key `asr up` created is used.
    #[arg(long, env = "ASR_API_KEY", hide_env_values = true, global = true)]
    api_key: Option<String>,
    #[command(flatten)]
    state: StateDir,
}

#[derive(Subcommand, Debug)]
enum SessionsCommand {
    /// Sessions, newest first.
    List {
        /// `open`, `ending`, `completed` or `closed`.
        #[arg(long)]
        status: Option<String>,
        /// Words that must appear in the transcript.
        #[arg(long)]
        text: Option<String>,
        /// Only sessions opened in the last this many minutes.
        #[arg(long)]
        since_minutes: Option<u64>,
        /// At most this many sessions.
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// One session: transcript with timings, the workers that served it, its timeline.
    Show { session: uuid::Uuid },
}

pub async fn run(args: SessionsArgs) -> anyhow::Result<()> {
    let key = args.state.key_or_local(args.api_key.clone())?;
    let api = Api {
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()?,
        url: args.url.trim_end_matches('/').to_string(),
        key,
    };
    match args.command {
        SessionsCommand::List {
            status,
            text,
            since_minutes,
            limit,
        } => {
            let mut query: Vec<(&str, String)> = vec![("limit", limit.to_string())];
            query.extend(status.map(|s| ("status", s)));
            query.extend(text.map(|t| ("q", t)));
            if let Some(minutes) = since_minutes {
                let from = eventlog::now_ms().saturating_sub(minutes * 60_000);
                query.push(("from_ms", from.to_string()));
            }
            let page: SessionPage = api.get("/v1/sessions", &query).await?;
            println!(
                "{:<36}  {:<24}  {:<9}  {:>7}  transcript",
                "session", "opened", "status", "audio s"
            );
            for s in &page.sessions {
                let transcript = s.transcript.clone().unwrap_or_default();
                println!(
                    "{:<36}  {:<24}  {:<9}  {:>7.1}  {}",
                    s.session_id,
                    s.opened_at,
                    s.status,
                    s.audio_seconds,
                    shorten(&transcript, 60)
                );
            }
            if page.next_page_token.is_some() {
                eprintln!("(more: raise --limit or narrow the filters)");
            }
        }
        SessionsCommand::Show { session } => {
            let detail: SessionDetail = api.get(&format!("/v1/sessions/{session}"), &[]).await?;
            let s = &detail.session;
            println!("session   {}", s.session_id);
            println!("tenant    {}    model {}", s.tenant, s.model);
            println!(
                "audio     {:.1} s of {} Hz {}",
                s.audio_seconds, s.sample_rate, s.encoding
            );
            println!(
                "opened    {}    ended {}",
                s.opened_at,
                s.ended_at.as_deref().unwrap_or("-")
            );
            let reason = s.close_reason.as_deref().map(|r| format!(" ({r})"));
            println!(
                "status    {}{}    resumes {}",
                s.status,
                reason.unwrap_or_default(),
                s.resumes
            );
            println!("\ntranscript");
            for seg in &detail.segments {
                println!(
                    "  [{:>7.2}s – {:>7.2}s] {}    ({} epoch {})",
                    seg.start_ms as f64 / 1000.0,
                    seg.end_ms as f64 / 1000.0,
                    seg.text,
                    seg.worker,
                    seg.epoch
                );
            }
            println!("\ntimeline");
            for e in &detail.timeline {
                let mark = if e.accepted { " " } else { "x" };
                println!("  {mark} {}  {:<22} {}", e.at, e.kind, e.producer);
            }
        }
    }
    Ok(())
}

struct Api {
    http: reqwest::Client,
    url: String,
    key: Option<String>,
}

impl Api {
    async fn get<T: DeserializeOwned>(
        &self,
        path: &str,
        query: &[(&str, String)],
    ) -> anyhow::Result<T> {
        let mut request = self.http.get(format!("{}{path}", self.url)).query(query);
        if let Some(key) = &self.key {
            request = request.bearer_auth(key);
        }
        let response = request.send().await.with_context(|| {
            format!(
                "asking the audit API at {} (is `asr up` or `asr projector` running?)",
                self.url
            )
        })?;
        let status = response.status();
        if !status.is_success() {
            let error: ApiError = response
                .json()
                .await
                .with_context(|| format!("the audit API answered {status}"))?;
            anyhow::bail!("{}: {} ({status})", error.error, error.message);
        }
        Ok(response.json().await?)
    }
}

/// At most `max` characters, with an ellipsis when cut.
fn shorten(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_string(),
    }
}
