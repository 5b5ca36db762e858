//! The read models in PostgreSQL: schema set-up, where each stream's projection
//! stands, and a batch of writes committed in one transaction with the stream's next
//! offset (exactly-once: a batch is either all in, offset included, or not at all).

use std::collections::HashMap;
use std::str::FromStr;

use eventlog::SessionId;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{Postgres, Row, Transaction};
use thiserror::Error;

use crate::projection::{StoredResults, Write};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("PostgreSQL: {0}")]
    Sql(#[from] sqlx::Error),
    #[error("applying the migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error(
        "schema name {0:?} is not a plain identifier (lower-case letters, digits, underscores)"
    )]
    BadSchema(String),
}

/// Where a stream's projection stands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Position {
    pub next_offset: u64,
    /// The control fold's highest fencing token.
    pub highest_token: Option<u64>,
}

#[derive(Clone)]
pub struct Store {
    pool: PgPool,
}

impl Store {
    /// Connects with `schema` as the search path, creating it and applying the
    /// migrations if needed (concurrent starts are serialised by sqlx's migration lock).
    pub async fn connect(url: &str, schema: &str) -> Result<Self, StoreError> {
        if schema.is_empty()
            || !schema
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        {
            return Err(StoreError::BadSchema(schema.into()));
        }
        let options = PgConnectOptions::from_str(url)?
            .options([("search_path", schema), ("timezone", "UTC")]);
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .connect_with(options)
            .await?;
        // IF NOT EXISTS is not safe against a concurrent creation (another projector or
        // tool starting at the same moment): losing that race is fine.
        let created = sqlx::query(&format!("CREATE SCHEMA IF NOT EXISTS {schema}"))
            .execute(&pool)
            .await;
        match created {
            Err(sqlx::Error::Database(e))
                if matches!(e.code().as_deref(), Some("23505" | "42P06")) => {}
            other => {
                other?;
            }
        }
        MIGRATOR.run(&pool).await?;
        Ok(Self { pool })
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Where `stream`'s projection stands; `None` before its first commit.
    pub async fn position(&self, stream: &str) -> Result<Option<Position>, StoreError> {
        let row = sqlx::query("SELECT next_offset, state FROM projector_offsets WHERE stream = $1")
            .bind(stream)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|row| {
            let state: serde_json::Value = row.get("state");
            Position {
                next_offset: row.get::<i64, _>("next_offset") as u64,
                highest_token: state.get("highest_token").and_then(|t| t.as_u64()),
            }
        }))
    }

    /// The accepted results the tables hold for `sessions`.
    pub async fn stored_results(
        &self,
        sessions: &[SessionId],
    ) -> Result<HashMap<SessionId, StoredResults>, StoreError> {
        let mut stored: HashMap<SessionId, StoredResults> = HashMap::new();
        let rows = sqlx::query(
            "SELECT session_id, epoch, worker, segments FROM session_results WHERE session_id = ANY($1)",
        )
        .bind(sessions)
        .fetch_all(&self.pool)
        .await?;
        for row in rows {
            let entry = stored.entry(row.get("session_id")).or_default();
            entry.epoch = Some((row.get::<i64, _>("epoch") as u64, row.get("worker")));
            entry.completed = row.get::<Option<i32>, _>("segments").map(|s| s as u32);
        }
        let rows = sqlx::query(
            "SELECT session_id, segment, text, start_ms, end_ms FROM transcript_segments
             WHERE session_id = ANY($1) ORDER BY session_id, segment",
        )
        .bind(sessions)
        .fetch_all(&self.pool)
        .await?;
        for row in rows {
            stored
                .entry(row.get("session_id"))
                .or_default()
                .finals
                .push((
                    row.get::<i32, _>("segment") as u32,
                    row.get("text"),
                    row.get::<i64, _>("start_ms") as u64,
                    row.get::<i64, _>("end_ms") as u64,
                ));
        }
        Ok(stored)
    }

    /// Carries out `writes` and records `position` for `stream`, in one transaction.
    pub async fn commit(
        &self,
        stream: &str,
        position: Position,
        writes: &[Write],
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        for write in writes {
            apply(&mut tx, stream, write).await?;
        }
        let state = match position.highest_token {
            Some(token) => serde_json::json!({ "highest_token": token }),
            None => serde_json::json!({}),
        };
        sqlx::query(
            "INSERT INTO projector_offsets (stream, next_offset, state) VALUES ($1, $2, $3)
             ON CONFLICT (stream) DO UPDATE SET next_offset = excluded.next_offset, state = excluded.state",
        )
        .bind(stream)
        .bind(position.next_offset as i64)
        .bind(state)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }
}

async fn apply(
    tx: &mut Transaction<'_, Postgres>,
    stream: &str,
    write: &Write,
) -> Result<(), sqlx::Error> {
    match write {
        Write::Opened {
            session,
            tenant,
            model,
            format,
            at_ms,
        } => {
            sqlx::query(
                "INSERT INTO sessions (session_id, tenant, model, sample_rate, encoding, opened_at)
                 VALUES ($1, $2, $3, $4, $5, ms_to_ts($6)) ON CONFLICT DO NOTHING",
            )
            .bind(session)
            .bind(tenant)
            .bind(model)
            .bind(format.sample_rate as i32)
            .bind(format.encoding.name())
            .bind(*at_ms as i64)
            .execute(&mut **tx)
            .await?;
            load(tx, model, *at_ms, "sessions_opened", "1").await?;
        }
        Write::Chunk {
            session,
            seq,
            offset,
            at_ms,
            pcm,
        } => {
            // The first copy of a seq counts; the session's totals and its model's
            // audio seconds grow only when it is stored.
            sqlx::query("WITH stored AS (
                     INSERT INTO audio_chunks (session_id, seq, stream_offset, at, pcm)
                     VALUES ($1, $2, $3, ms_to_ts($4), $5) ON CONFLICT DO NOTHING RETURNING session_id
                 ), counted AS (
                     UPDATE sessions s SET chunks = chunks + 1,
                         audio_samples = audio_samples
                             + $6::bigint / (CASE s.encoding WHEN 'pcm_f32le' THEN 4 ELSE 2 END)
                     WHERE s.session_id = $1 AND EXISTS (SELECT 1 FROM stored)
                     RETURNING s.model, s.sample_rate, s.encoding
                 )
                 INSERT INTO model_load (model, minute, audio_us)
                 SELECT model, date_trunc('minute', ms_to_ts($4)),
                     ($6::bigint / (CASE encoding WHEN 'pcm_f32le' THEN 4 ELSE 2 END))
                         * 1000000 / sample_rate
                 FROM counted
                 ON CONFLICT (model, minute)
                 DO UPDATE SET audio_us = model_load.audio_us + excluded.audio_us")
            .bind(session)
            .bind(*seq as i64)
            .bind(*offset as i64)
            .bind(*at_ms as i64)
            .bind(&pcm[..])
            .bind(pcm.len() as i64)
            .execute(&mut **tx)
            .await?;
        }
        Write::Ended {
            session,
            at_ms,
            reason,
        } => {
            sqlx::query(
                "UPDATE sessions SET ended_at = ms_to_ts($3), close_reason = $2
                 WHERE session_id = $1 AND ended_at IS NULL",
            )
            .bind(session)
            .bind(reason)
            .bind(*at_ms as i64)
            .execute(&mut **tx)
            .await?;
        }
        Write::Resumed { session } => {
            sqlx::query("UPDATE sessions SET resumes = resumes + 1 WHERE session_id = $1")
                .bind(session)
                .execute(&mut **tx)
                .await?;
        }
        Write::EpochStarted {
            session,
            epoch,
            worker,
            at_ms,
        } => {
            sqlx::query(
                "INSERT INTO session_results (session_id, epoch, worker) VALUES ($1, $2, $3)
                 ON CONFLICT (session_id) DO UPDATE SET epoch = excluded.epoch, worker = excluded.worker",
            )
            .bind(session)
            .bind(*epoch as i64)
            .bind(worker)
            .execute(&mut **tx)
            .await?;
            sqlx::query(
                "INSERT INTO session_workers (session_id, epoch, worker, started_at)
                 VALUES ($1, $2, $3, ms_to_ts($4)) ON CONFLICT DO NOTHING",
            )
            .bind(session)
            .bind(*epoch as i64)
            .bind(worker)
            .bind(*at_ms as i64)
            .execute(&mut **tx)
            .await?;
        }
        Write::Final {
            session,
            segment,
            text,
            start_ms,
            end_ms,
            epoch,
            worker,
            at_ms,
        } => {
            sqlx::query(
                "INSERT INTO transcript_segments
                     (session_id, segment, text, start_ms, end_ms, epoch, worker, at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, ms_to_ts($8)) ON CONFLICT DO NOTHING",
            )
            .bind(session)
            .bind(*segment as i32)
            .bind(text)
            .bind(*start_ms as i64)
            .bind(*end_ms as i64)
            .bind(*epoch as i64)
            .bind(worker)
            .bind(*at_ms as i64)
            .execute(&mut **tx)
            .await?;
        }
        Write::Completed {
            session,
            at_ms,
            segments,
            transcript,
        } => {
            sqlx::query("UPDATE session_results SET completed_at = ms_to_ts($4), segments = $2, transcript = $3
                 WHERE session_id = $1")
            .bind(session)
            .bind(*segments as i32)
            .bind(transcript)
            .bind(*at_ms as i64)
            .execute(&mut **tx)
            .await?;
        }
        Write::Queued { model, at_ms } => load(tx, model, *at_ms, "sessions_queued", "1").await?,
        Write::Progress {
            session,
            at_ms,
            decoded_ms,
        } => {
            sqlx::query(
                "INSERT INTO session_progress (session_id, minute, decoded_ms)
                 VALUES ($1, date_trunc('minute', ms_to_ts($2)), $3)
                 ON CONFLICT (session_id, minute)
                 DO UPDATE SET decoded_ms = greatest(session_progress.decoded_ms, excluded.decoded_ms)",
            )
            .bind(session)
            .bind(*at_ms as i64)
            .bind(*decoded_ms as i64)
            .execute(&mut **tx)
            .await?;
        }
        Write::History {
            offset,
            session,
            at_ms,
            producer,
            kind,
            accepted,
            event,
        } => {
            sqlx::query(
                "INSERT INTO session_events
                     (stream, stream_offset, session_id, at, producer, kind, accepted, event)
                 VALUES ($1, $2, $3, ms_to_ts($4), $5, $6, $7, $8) ON CONFLICT DO NOTHING",
            )
            .bind(stream)
            .bind(*offset as i64)
            .bind(session)
            .bind(*at_ms as i64)
            .bind(producer)
            .bind(kind)
            .bind(accepted)
            .bind(event)
            .execute(&mut **tx)
            .await?;
        }
    }
    Ok(())
}

/// Adds `amount` to a `model_load` column for the minute of `at_ms`.
async fn load(
    tx: &mut Transaction<'_, Postgres>,
    model: &str,
    at_ms: u64,
    column: &'static str,
    amount: &'static str,
) -> Result<(), sqlx::Error> {
    sqlx::query(&format!(
        "INSERT INTO model_load (model, minute, {column}) VALUES ($1, date_trunc('minute', ms_to_ts($2)), {amount})
         ON CONFLICT (model, minute) DO UPDATE SET {column} = model_load.{column} + excluded.{column}"
    ))
    .bind(model)
    .bind(at_ms as i64)
    .execute(&mut **tx)
    .await?;
    Ok(())
}
