//! The log against a real RabbitMQ: append and read back, read from an offset, follow
//! one session on a shared partition, and broker-side deduplication of a re-sent
//! publishing id. Each test uses streams of its own and deletes them.

use std::time::Duration;

use bytes::Bytes;
use eventlog::events::AudioChunk;
use eventlog::log::{LogConfig, ReadFrom, Reader, StreamLog};
use eventlog::{Envelope, Event, SessionId};
use uuid::Uuid;

async fn log() -> StreamLog {
    StreamLog::connect(&LogConfig::default())
        .await
        .expect("RabbitMQ streams on localhost:5552 (run deploy/services.sh)")
}

/// A stream of the test's own (the caller deletes it).
async fn fresh_stream(log: &StreamLog) -> String {
    let stream = format!("t-{}.log", Uuid::new_v4());
    log.ensure_streams(std::slice::from_ref(&stream))
        .await
        .unwrap();
    stream
}

fn chunk(session: SessionId, seq: u64) -> Envelope {
    Envelope {
        session: Some(session),
        at_ms: eventlog::now_ms(),
        producer: "test".into(),
        event: Event::AudioChunk(AudioChunk {
            seq,
            bytes: Bytes::from(vec![seq as u8; 640]),
        }),
    }
}

async fn read_n(reader: &mut Reader, n: usize) -> Vec<(u64, Envelope)> {
    let mut out = Vec::new();
    while out.len() < n {
        let record = tokio::time::timeout(Duration::from_secs(10), reader.next())
            .await
            .expect("records arrive")
            .expect("reader open")
            .expect("record decodes");
        out.push((record.offset, record.envelope));
    }
    out
}

/// Everything the stream holds, read until it stays quiet.
async fn read_all(log: &StreamLog, stream: &str) -> Vec<Envelope> {
    let mut reader = log.reader(stream, ReadFrom::Start, None).await.unwrap();
    let mut out = Vec::new();
    while let Ok(Some(record)) = tokio::time::timeout(Duration::from_secs(2), reader.next()).await {
        out.push(record.unwrap().envelope);
    }
    reader.close().await;
    out
}

fn seq_of(envelope: &Envelope) -> u64 {
    match &envelope.event {
        Event::AudioChunk(c) => c.seq,
        other => panic!("not audio: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn append_then_read_from_start_and_from_an_offset() {
    let log = log().await;
    let stream = fresh_stream(&log).await;
    let session = Uuid::new_v4();
    let appender = log
        .appender(&stream, "test-producer", true, 1024)
        .await
        .unwrap();
    let mut pending = Vec::new();
    for seq in 0..50 {
        pending.push(appender.append(&chunk(session, seq)).await.unwrap());
    }
    for (i, p) in pending.into_iter().enumerate() {
        assert_eq!(
            p.confirmed().await.unwrap(),
            i as u64 + 1,
            "ids count from 1"
        );
    }

    let mut reader = log.reader(&stream, ReadFrom::Start, None).await.unwrap();
    let all = read_n(&mut reader, 50).await;
    reader.close().await;
    for (i, (offset, envelope)) in all.iter().enumerate() {
        assert_eq!(*offset, i as u64);
        assert_eq!(seq_of(envelope), i as u64);
        assert_eq!(envelope.session, Some(session));
    }

    let mut reader = log
        .reader(&stream, ReadFrom::Offset(37), None)
        .await
        .unwrap();
    let tail = read_n(&mut reader, 13).await;
    reader.close().await;
    assert_eq!(
        tail[0].0, 37,
        "delivery starts exactly at the offset, not its chunk"
    );
    assert_eq!(seq_of(&tail[12].1), 49);

    appender.close().await;
    log.delete_streams(&[stream]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_session_reader_sees_only_its_session_with_true_offsets() {
    let log = log().await;
    let stream = fresh_stream(&log).await;
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    let appender = log.appender(&stream, "mixed", true, 1024).await.unwrap();
    for seq in 0..40 {
        let session = if seq % 3 == 0 { a } else { b };
        appender
            .append_confirmed(&chunk(session, seq))
            .await
            .unwrap();
    }
    let mut reader = log.reader(&stream, ReadFrom::Start, Some(a)).await.unwrap();
    let only_a = read_n(&mut reader, 14).await;
    reader.close().await;
    for (offset, envelope) in &only_a {
        assert_eq!(envelope.session, Some(a));
        // offsets are the stream's own: message k went to offset k
        assert_eq!(*offset, seq_of(envelope));
    }
    appender.close().await;
    log.delete_streams(&[stream]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn broker_drops_a_resent_publishing_id() {
    let log = log().await;
    let stream = fresh_stream(&log).await;
    let session = Uuid::new_v4();

    let first = log
        .appender(&stream, "retrying", false, 1024)
        .await
        .unwrap();
    for seq in 0..10 {
        first.append_confirmed(&chunk(session, seq)).await.unwrap();
    }
    first.close().await;
    assert_eq!(
        log.last_publishing_id("retrying", &stream).await.unwrap(),
        10
    );

    // A restarted producer with the same name re-sends ids 6..=10 (their confirms were
    // "lost") and then goes on: the broker confirms the re-sends but stores them once.
    let second = log
        .appender(&stream, "retrying", false, 1024)
        .await
        .unwrap();
    for seq in 5..10 {
        let id = second
            .append_with_id(seq + 1, &chunk(session, seq))
            .await
            .unwrap()
            .confirmed()
            .await
            .unwrap();
        assert_eq!(id, seq + 1);
    }
    assert_eq!(
        second.append_confirmed(&chunk(session, 10)).await.unwrap(),
        11
    );
    second.close().await;

    let seqs: Vec<u64> = read_all(&log, &stream).await.iter().map(seq_of).collect();
    assert_eq!(seqs, (0..=10).collect::<Vec<_>>());
    log.delete_streams(&[stream]).await;
}
