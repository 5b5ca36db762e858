//! The audit HTTP API over the read models, with the OpenAPI document it serves at
//! `/openapi.json`.
//!
//! Every request carries a tenant's API key (`Authorization: Bearer …`, the keys
//! ingest uses); a tenant sees its own sessions only, and another tenant's session is
//! answered exactly like one that does not exist. Bad parameters get a 400 with a JSON
//! body that says what to fix.

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use ingest::tenants::ApiKeys;
use serde::{Deserialize, Serialize};
use sqlx::{PgPool, Row};
use utoipa::{IntoParams, OpenApi, ToSchema};
use uuid::Uuid;

use crate::audit::{self, AuditError};

/// Sessions per page unless `limit` says otherwise, and at most.
const DEFAULT_LIMIT: i64 = 50;
const MAX_LIMIT: i64 = 500;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "asr audit API",
        description = "Sessions, transcripts, timelines and audio of the live speech-recognition service, from the projector's read models."
    ),
    paths(list_sessions, session_detail, session_events, session_audio),
    components(schemas(SessionSummary, SessionPage, SessionDetail, Segment, Served, Event, EventPage, ApiError)),
    modifiers(&BearerAuth)
)]
pub struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        openapi.security = Some(vec![utoipa::openapi::security::SecurityRequirement::new(
            "api_key",
            Vec::<String>::new(),
        )]);
    }
}

#[derive(Clone)]
struct Api {
    pool: PgPool,
    keys: Arc<ApiKeys>,
}

/// `/v1/sessions…` and `/openapi.json`.
pub fn router(pool: PgPool, keys: ApiKeys) -> Router {
    Router::new()
        .route("/v1/sessions", get(list_sessions))
        .route("/v1/sessions/{id}", get(session_detail))
        .route("/v1/sessions/{id}/events", get(session_events))
        .route("/v1/sessions/{id}/audio.wav", get(session_audio))
        .route("/openapi.json", get(|| async { Json(ApiDoc::openapi()) }))
        .with_state(Api {
            pool,
            keys: Arc::new(keys),
        })
}

/// Every error: a stable code and a message for people.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ApiError {
    /// `bad_request`, `unauthorized`, `not_found` or `internal_error`.
    pub error: String,
    pub message: String,
}

/// Why a request is answered with an error.
#[derive(Debug)]
enum Refusal {
    BadRequest(String),
    Unauthorized,
    /// Unknown, or another tenant's: the same answer.
    NotFound(Uuid),
    /// Logged where it happened; the client learns nothing of it.
    Internal,
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let (status, code, message) = match self {
            Refusal::BadRequest(message) => (StatusCode::BAD_REQUEST, "bad_request", message),
            Refusal::Unauthorized => (
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "missing or unknown API key (Authorization: Bearer KEY)".into(),
            ),
            Refusal::NotFound(id) => (
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no session {id}"),
            ),
            Refusal::Internal => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal_error",
                "the read models could not be queried".into(),
            ),
        };
        let body = ApiError {
            error: code.into(),
            message,
        };
        (status, Json(body)).into_response()
    }
}

fn bad_request(message: impl Into<String>) -> Refusal {
    Refusal::BadRequest(message.into())
}

fn internal(e: impl std::fmt::Display) -> Refusal {
    tracing::error!(error = %e, "audit API");
    Refusal::Internal
}

/// The tenant of the request's key.
fn tenant(api: &Api, headers: &HeaderMap) -> Result<String, Refusal> {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    api.keys
        .authenticate(presented)
        .map_err(|_| Refusal::Unauthorized)
}

/// One session as the list shows it.
#[derive(Debug, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct SessionSummary {
    pub session_id: Uuid,
    pub tenant: String,
    pub model: String,
    pub sample_rate: i32,
    pub encoding: String,
    /// RFC 3339, UTC.
    pub opened_at: String,
    pub ended_at: Option<String>,
    /// `open` (audio still coming), `ending` (end of stream stored, transcript not
    /// complete yet), `completed`, or `closed` (ended by an error: `close_reason`).
    pub status: String,
    pub close_reason: Option<String>,
    pub audio_seconds: f64,
    /// Times the client resumed the session after a dropped connection.
    pub resumes: i32,
    pub transcript: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SessionPage {
    pub sessions: Vec<SessionSummary>,
    /// Pass as `page_token` for the next page; absent on the last one.
    pub next_page_token: Option<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    /// Sessions opened at or after this Unix millisecond.
    from_ms: Option<String>,
    /// Sessions opened before this Unix millisecond.
    to_ms: Option<String>,
    /// `open`, `ending`, `completed` or `closed`.
    status: Option<String>,
    /// Words that must appear in the session's transcript.
    q: Option<String>,
    /// Sessions per page, 1 to 500 (default 50).
    limit: Option<String>,
    /// From `next_page_token`.
    page_token: Option<String>,
}

const STATUSES: [&str; 4] = ["open", "ending", "completed", "closed"];

/// The session columns of the list and the detail, with the derived status.
const SUMMARY: &str = "
    WITH summary AS (
        SELECT s.session_id, s.tenant, s.model, s.sample_rate, s.encoding, s.opened_at,
            to_char(s.opened_at, 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"') AS opened_at_text,
            to_char(s.ended_at, 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"') AS ended_at_text,
            CASE WHEN s.close_reason IS NOT NULL THEN 'closed'
                 WHEN r.completed_at IS NOT NULL THEN 'completed'
                 WHEN s.ended_at IS NOT NULL THEN 'ending'
                 ELSE 'open' END AS status,
            s.close_reason, s.audio_samples::float8 / s.sample_rate AS audio_seconds,
            s.resumes, r.transcript,
            (extract(epoch FROM s.opened_at) * 1000000)::bigint AS opened_at_us
        FROM sessions s LEFT JOIN session_results r USING (session_id)
    )";

fn summary(row: &sqlx::postgres::PgRow) -> SessionSummary {
    SessionSummary {
        session_id: row.get("session_id"),
        tenant: row.get("tenant"),
        model: row.get("model"),
        sample_rate: row.get("sample_rate"),
        encoding: row.get("encoding"),
        opened_at: row.get("opened_at_text"),
        ended_at: row.get("ended_at_text"),
        status: row.get("status"),
        close_reason: row.get("close_reason"),
        audio_seconds: row.get("audio_seconds"),
        resumes: row.get("resumes"),
        transcript: row.get("transcript"),
    }
}

fn parse<T: std::str::FromStr>(name: &str, value: &Option<String>) -> Result<Option<T>, Refusal> {
    value
        .as_deref()
        .map(|v| {
            v.parse()
                .map_err(|_| bad_request(format!("{name} must be an integer, not {v:?}")))
        })
        .transpose()
}

/// Sessions of the key's tenant, newest first, filtered.
#[utoipa::path(
    get, path = "/v1/sessions", params(ListParams),
    responses(
        (status = 200, body = SessionPage),
        (status = 400, body = ApiError, description = "a parameter is malformed"),
        (status = 401, body = ApiError, description = "missing or unknown API key"),
    )
)]
async fn list_sessions(
    State(api): State<Api>,
    headers: HeaderMap,
    Query(p): Query<ListParams>,
) -> Result<Json<SessionPage>, Refusal> {
    let tenant = tenant(&api, &headers)?;
    let from: Option<i64> = parse("from_ms", &p.from_ms)?;
    let to: Option<i64> = parse("to_ms", &p.to_ms)?;
    let limit: i64 = parse("limit", &p.limit)?.unwrap_or(DEFAULT_LIMIT);
    if !(1..=MAX_LIMIT).contains(&limit) {
        return Err(bad_request(format!(
            "limit must be between 1 and {MAX_LIMIT}, not {limit}"
        )));
    }
    if let Some(status) = &p.status
        && !STATUSES.contains(&status.as_str())
    {
        return Err(bad_request(format!(
            "status must be one of {STATUSES:?}, not {status:?}"
        )));
    }
    let after = match &p.page_token {
        None => None,
        Some(token) => Some(
            token
                .split_once('.')
                .and_then(|(us, id)| Some((us.parse::<i64>().ok()?, id.parse::<Uuid>().ok()?)))
                .ok_or_else(|| bad_request("page_token is not one this API gave"))?,
        ),
    };
    let query = format!(
        "{SUMMARY}
         SELECT * FROM summary
         WHERE tenant = $1
           AND ($2::bigint IS NULL OR opened_at >= ms_to_ts($2))
           AND ($3::bigint IS NULL OR opened_at < ms_to_ts($3))
           AND ($4::text IS NULL OR status = $4)
           AND ($5::text IS NULL OR EXISTS (
               SELECT 1 FROM transcript_segments t WHERE t.session_id = summary.session_id
               AND to_tsvector('simple', t.text) @@ plainto_tsquery('simple', $5)))
           AND ($6::bigint IS NULL
                OR (opened_at, session_id) < (timestamptz 'epoch' + $6 * interval '1 microsecond', $7))
         ORDER BY opened_at DESC, session_id DESC
         LIMIT $8"
    );
    let rows = sqlx::query(&query)
        .bind(&tenant)
        .bind(from)
        .bind(to)
        .bind(&p.status)
        .bind(&p.q)
        .bind(after.map(|(us, _)| us))
        .bind(after.map(|(_, id)| id))
        .bind(limit + 1)
        .fetch_all(&api.pool)
        .await
        .map_err(internal)?;
    let more = rows.len() as i64 > limit;
    let rows = &rows[..rows.len().min(limit as usize)];
    let next_page_token = match rows.last() {
        Some(last) if more => Some(format!(
            "{}.{}",
            last.get::<i64, _>("opened_at_us"),
            last.get::<Uuid, _>("session_id")
        )),
        _ => None,
    };
    Ok(Json(SessionPage {
        sessions: rows.iter().map(summary).collect(),
        next_page_token,
    }))
}

/// A final segment of the transcript.
#[derive(Debug, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct Segment {
    pub segment: i32,
    pub text: String,
    pub start_ms: i64,
    pub end_ms: i64,
    pub epoch: i64,
    pub worker: String,
}

/// A worker that served the session, under an epoch.
#[derive(Debug, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct Served {
    pub epoch: i64,
    pub worker: String,
    pub started_at: String,
}

/// An event of the session, as its raw history holds it.
#[derive(Debug, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct Event {
    pub at: String,
    pub stream: String,
    pub offset: i64,
    pub producer: String,
    /// `session_opened`, `epoch_started`, `final`, `worker_allocated`, …
    pub kind: String,
    /// Whether it counted (a zombie's result or a deposed leader's event does not).
    pub accepted: bool,
    #[schema(value_type = Object)]
    pub event: serde_json::Value,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SessionDetail {
    pub session: SessionSummary,
    pub segments: Vec<Segment>,
    pub workers: Vec<Served>,
    /// Every event but audio chunks and partials, in time order: opening, queueing,
    /// allocations, epochs (a failover is a new one), resumes, finals, the end.
    pub timeline: Vec<Event>,
}

/// The session owned by the key's tenant, or the 404 every other case gets.
async fn owned(api: &Api, headers: &HeaderMap, id: Uuid) -> Result<SessionSummary, Refusal> {
    let tenant = tenant(api, headers)?;
    let row = sqlx::query(&format!(
        "{SUMMARY} SELECT * FROM summary WHERE session_id = $1"
    ))
    .bind(id)
    .fetch_optional(&api.pool)
    .await
    .map_err(internal)?;
    match row.map(|row| summary(&row)) {
        Some(session) if session.tenant == tenant => Ok(session),
        _ => Err(Refusal::NotFound(id)),
    }
}

fn event(row: &sqlx::postgres::PgRow) -> Event {
    Event {
        at: row.get("at_text"),
        stream: row.get("stream"),
        offset: row.get("stream_offset"),
        producer: row.get("producer"),
        kind: row.get("kind"),
        accepted: row.get("accepted"),
        event: row.get("event"),
    }
}

const EVENTS: &str = "SELECT to_char(at, 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"') AS at_text, stream,
    stream_offset, producer, kind, accepted, event FROM session_events WHERE session_id = $1";

/// One session: its transcript with timings, the workers that served it, its timeline.
#[utoipa::path(
    get, path = "/v1/sessions/{id}", params(("id" = Uuid, Path, description = "session id")),
    responses(
        (status = 200, body = SessionDetail),
        (status = 401, body = ApiError), (status = 404, body = ApiError),
    )
)]
async fn session_detail(
    State(api): State<Api>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<SessionDetail>, Refusal> {
    let id = session_id(&id)?;
    let session = owned(&api, &headers, id).await?;
    let segments = sqlx::query(
        "SELECT segment, text, start_ms, end_ms, epoch, worker FROM transcript_segments
             WHERE session_id = $1 ORDER BY segment",
    )
    .bind(id)
    .fetch_all(&api.pool)
    .await
    .map_err(internal)?
    .iter()
    .map(|r| Segment {
        segment: r.get("segment"),
        text: r.get("text"),
        start_ms: r.get("start_ms"),
        end_ms: r.get("end_ms"),
        epoch: r.get("epoch"),
        worker: r.get("worker"),
    })
    .collect();
    let workers = sqlx::query(
        "SELECT epoch, worker, to_char(started_at, 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"') AS at
             FROM session_workers WHERE session_id = $1 ORDER BY epoch",
    )
    .bind(id)
    .fetch_all(&api.pool)
    .await
    .map_err(internal)?
    .iter()
    .map(|r| Served {
        epoch: r.get("epoch"),
        worker: r.get("worker"),
        started_at: r.get("at"),
    })
    .collect();
    let timeline = sqlx::query(&format!(
        "{EVENTS} AND kind <> 'partial' ORDER BY at, stream, stream_offset"
    ))
    .bind(id)
    .fetch_all(&api.pool)
    .await
    .map_err(internal)?
    .iter()
    .map(event)
    .collect();
    Ok(Json(SessionDetail {
        session,
        segments,
        workers,
        timeline,
    }))
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct EventPage {
    pub events: Vec<Event>,
    /// Pass as `after` for the next page; absent on the last one.
    pub next_after: Option<i64>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct EventParams {
    /// Events already read (0 or a previous `next_after`).
    after: Option<String>,
    /// Events per page, 1 to 500 (default 50).
    limit: Option<String>,
}

/// The session's raw event history (every event but its audio chunks), in time order,
/// paged.
#[utoipa::path(
    get, path = "/v1/sessions/{id}/events",
    params(("id" = Uuid, Path, description = "session id"), EventParams),
    responses(
        (status = 200, body = EventPage),
        (status = 400, body = ApiError), (status = 401, body = ApiError), (status = 404, body = ApiError),
    )
)]
async fn session_events(
    State(api): State<Api>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(params): Query<EventParams>,
) -> Result<Json<EventPage>, Refusal> {
    let id = session_id(&id)?;
    let after: i64 = parse("after", &params.after)?.unwrap_or(0);
    let limit: i64 = parse("limit", &params.limit)?.unwrap_or(DEFAULT_LIMIT);
    if after < 0 || !(1..=MAX_LIMIT).contains(&limit) {
        return Err(bad_request(format!(
            "after must be 0 or more and limit between 1 and {MAX_LIMIT}"
        )));
    }
    owned(&api, &headers, id).await?;
    let rows = sqlx::query(&format!(
        "{EVENTS} ORDER BY at, stream, stream_offset OFFSET $2 LIMIT $3"
    ))
    .bind(id)
    .bind(after)
    .bind(limit + 1)
    .fetch_all(&api.pool)
    .await
    .map_err(internal)?;
    let more = rows.len() as i64 > limit;
    let events: Vec<Event> = rows.iter().take(limit as usize).map(event).collect();
    let next_after = more.then(|| after + events.len() as i64);
    Ok(Json(EventPage { events, next_after }))
}

/// The session's audio exactly as the client sent it, as a WAV file.
#[utoipa::path(
    get, path = "/v1/sessions/{id}/audio.wav", params(("id" = Uuid, Path, description = "session id")),
    responses(
        (status = 200, content_type = "audio/wav", description = "mono WAV, 16-bit or float, at the session's rate"),
        (status = 401, body = ApiError), (status = 404, body = ApiError),
    )
)]
async fn session_audio(
    State(api): State<Api>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, Refusal> {
    let id = session_id(&id)?;
    owned(&api, &headers, id).await?;
    let audio = audit::session_audio(&api.pool, id)
        .await
        .map_err(|e| match e {
            AuditError::UnknownSession(id) => Refusal::NotFound(id),
            other => internal(other),
        })?;
    let recording = client::Recording {
        format: audio.format,
        pcm: audio.pcm,
    };
    let wav = recording.to_wav().map_err(internal)?;
    Ok(([(header::CONTENT_TYPE, "audio/wav")], wav))
}

fn session_id(text: &str) -> Result<Uuid, Refusal> {
    text.parse()
        .map_err(|_| bad_request(format!("{text:?} is not a session id (a UUID)")))
}
