-- The projector's read models. Every table is written by the projection of one kind of
-- stream, in the same transaction as that stream's consumed offset
-- (projector_offsets), so a restart reprocesses exactly what was not committed.

-- Events carry Unix milliseconds.
CREATE FUNCTION ms_to_ts(ms bigint) RETURNS timestamptz
    AS 'SELECT to_timestamp(ms / 1000.0)' LANGUAGE sql IMMUTABLE;

-- Where each stream's projection stands: the next offset to read, and the state its
-- fold carries across batches (the control stream's highest fencing token).
CREATE TABLE projector_offsets (
    stream      text PRIMARY KEY,
    next_offset bigint NOT NULL,
    state       jsonb NOT NULL DEFAULT '{}'
);

-- From the audio partitions: one row per session.
CREATE TABLE sessions (
    session_id    uuid PRIMARY KEY,
    tenant        text NOT NULL,
    model         text NOT NULL,
    sample_rate   integer NOT NULL,
    encoding      text NOT NULL,
    opened_at     timestamptz NOT NULL,
    -- end of stream or closure, whichever came first
    ended_at      timestamptz,
    close_reason  text,
    -- distinct chunks stored (the first copy of each sequence number counts)
    chunks        bigint NOT NULL DEFAULT 0,
    audio_samples bigint NOT NULL DEFAULT 0,
    resumes       integer NOT NULL DEFAULT 0
);
CREATE INDEX sessions_tenant_opened ON sessions (tenant, opened_at DESC);
CREATE INDEX sessions_opened ON sessions (opened_at DESC);

-- The session's audio as the client sent it: the archive replay and audit read, which
-- outlives the streams' retention.
CREATE TABLE audio_chunks (
    session_id    uuid NOT NULL,
    seq           bigint NOT NULL,
    stream_offset bigint NOT NULL,
    at            timestamptz NOT NULL,
    pcm           bytea NOT NULL,
    PRIMARY KEY (session_id, seq)
);

-- From the results partitions, through the pipeline's one acceptance rule.
CREATE TABLE session_results (
    session_id   uuid PRIMARY KEY,
    -- the latest started epoch and its worker
    epoch        bigint NOT NULL,
    worker       text NOT NULL,
    completed_at timestamptz,
    segments     integer,
    transcript   text
);

CREATE TABLE transcript_segments (
    session_id uuid NOT NULL,
    segment    integer NOT NULL,
    text       text NOT NULL,
    start_ms   bigint NOT NULL,
    end_ms     bigint NOT NULL,
    epoch      bigint NOT NULL,
    worker     text NOT NULL,
    at         timestamptz NOT NULL,
    PRIMARY KEY (session_id, segment)
);
CREATE INDEX transcript_segments_text ON transcript_segments
    USING gin (to_tsvector('simple', text));

-- Workers that served a session, one row per accepted epoch.
CREATE TABLE session_workers (
    session_id uuid NOT NULL,
    epoch      bigint NOT NULL,
    worker     text NOT NULL,
    started_at timestamptz NOT NULL,
    PRIMARY KEY (session_id, epoch)
);

-- Every event of a session but its audio chunks, from every stream (audio, results,
-- control), as its raw history: `accepted` says whether the event counted (a deposed
-- leader's control event, a zombie's result, a duplicate final do not).
CREATE TABLE session_events (
    stream        text NOT NULL,
    stream_offset bigint NOT NULL,
    -- none for worker-level control events (a worker lost, a leader elected)
    session_id    uuid,
    at            timestamptz NOT NULL,
    producer      text NOT NULL,
    kind          text NOT NULL,
    accepted      boolean NOT NULL,
    event         jsonb NOT NULL,
    PRIMARY KEY (stream, stream_offset)
);
CREATE INDEX session_events_session ON session_events (session_id, at);

-- Load per model and minute, from the audio and control streams (what is counted);
-- model_load_series below adds what is derived.
CREATE TABLE model_load (
    model           text NOT NULL,
    minute          timestamptz NOT NULL,
    sessions_opened integer NOT NULL DEFAULT 0,
    sessions_queued integer NOT NULL DEFAULT 0,
    -- whole microseconds per chunk, summed: integers add up the same in any order,
    -- so the rows do not depend on how the partitions' batches interleaved
    audio_us        bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (model, minute)
);

-- Decoding progress from the heartbeats (each worker's own account of how far it has
-- decoded each session), the latest per session and minute; with the audio received
-- by the end of that minute it gives the backlog: audio appended but not yet decoded.
CREATE TABLE session_progress (
    session_id uuid NOT NULL,
    minute     timestamptz NOT NULL,
    decoded_ms bigint NOT NULL,
    PRIMARY KEY (session_id, minute)
);

-- The load per model and minute as dashboards read it: opened, queued, audio seconds,
-- the sessions active during the minute (from their open intervals) and the backlog.
CREATE VIEW model_load_series AS
SELECT l.model,
       l.minute,
       l.sessions_opened,
       l.sessions_queued,
       l.audio_us / 1e6 AS audio_seconds,
       (SELECT count(*) FROM sessions s
         WHERE s.model = l.model
           AND s.opened_at < l.minute + interval '1 minute'
           AND (s.ended_at IS NULL OR s.ended_at >= l.minute)) AS sessions_active,
       (SELECT coalesce(sum(greatest(0,
                   (SELECT coalesce(sum(length(c.pcm)), 0) FROM audio_chunks c
                     WHERE c.session_id = p.session_id
                       AND c.at < l.minute + interval '1 minute')::float8
                   / (CASE s.encoding WHEN 'pcm_f32le' THEN 4 ELSE 2 END) / s.sample_rate
                   - p.decoded_ms / 1000.0)), 0)
          FROM session_progress p JOIN sessions s USING (session_id)
         WHERE s.model = l.model AND p.minute = l.minute) AS backlog_seconds
FROM model_load l;
