use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

use bytes::BytesMut;

use super::*;

fn patterned(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 % 251) as u8).collect()
}

fn segments_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[test]
fn segments_read_back_in_order_and_each_is_deleted_once_read() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = patterned(10_000);
    let mut writer = SegmentWriter {
        dir: dir.path().to_path_buf(),
        segment_bytes: 1_000,
        written: 0,
        file: None,
    };
    for chunk in data.chunks(1_777) {
        writer.append(chunk).expect("append");
    }
    assert_eq!(writer.written, 10_000);
    assert_eq!(segments_in(dir.path()).len(), 10);
    let mut reader = SegmentReader {
        dir: dir.path().to_path_buf(),
        segment_bytes: 1_000,
        read: 0,
        file: None,
    };
    let mut input = BytesMut::new();
    reader
        .read_into(&mut input, writer.written, 2_500)
        .expect("read");
    assert_eq!(input.len(), 1_000, "a read stops at the end of a segment");
    assert_eq!(
        segments_in(dir.path()).first().map(String::as_str),
        Some("00000001.seg"),
        "the segment read to its end is deleted"
    );
    reader.read_into(&mut input, 1_300, 2_500).expect("read");
    assert_eq!(input.len(), 1_300, "a read stops at what is available");
    while reader.read < writer.written {
        reader
            .read_into(&mut input, writer.written, 333)
            .expect("read");
    }
    assert_eq!(&input[..], &data[..]);
    assert!(segments_in(dir.path()).is_empty());
}

#[test]
fn the_snapshot_end_is_counted_or_seen_as_the_mark_across_reads() {
    let mut counted = SnapshotWatch {
        end: SnapshotEnd::AfterBytes(10),
        seen: 0,
        tail: Vec::new(),
    };
    assert!(!counted.saw(b"12345"));
    assert!(!counted.saw(b"6789"));
    assert!(counted.saw(b"0 and the stream"));

    let mark = b"0123456789012345678901234567890123456789".to_vec();
    let mut marked = SnapshotWatch {
        end: SnapshotEnd::Mark(mark.clone()),
        seen: 0,
        tail: Vec::new(),
    };
    assert!(!marked.saw(b"REDIS0011 and a long snapshot body"));
    assert!(!marked.saw(&mark[..15]), "a mark cut by a read");
    assert!(marked.saw(&mark[15..]));
    assert!(!marked.saw(b"x"), "the mark must be the last bytes");
}

/// A spooler on a real socket: `primary` is the other end.
fn spooled(end: SnapshotEnd, received: &[u8], dir: &Path) -> (Spool, TcpStream, DurableOffset) {
    spooled_with_limit(end, received, dir, None)
}

fn spooled_with_limit(
    end: SnapshotEnd,
    received: &[u8],
    dir: &Path,
    limit: Option<u64>,
) -> (Spool, TcpStream, DurableOffset) {
    spooled_with(end, received, dir, limit, ACK_EVERY)
}

fn spooled_with(
    end: SnapshotEnd,
    received: &[u8],
    dir: &Path,
    limit: Option<u64>,
    ack_every: Duration,
) -> (Spool, TcpStream, DurableOffset) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let ours = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
    let (primary, _) = listener.accept().expect("accept");
    primary
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let durable = DurableOffset::default();
    let settings = SpoolSettings {
        limit,
        ack_every,
        unread: Default::default(),
        dir: dir.to_path_buf(),
        end,
        durable: durable.clone(),
        address: "primary".into(),
        timeout: Duration::from_secs(60),
    };
    let spool = Spool::start_with_segments(ours, received, settings, 4_096).expect("start");
    (spool, primary, durable)
}

/// Reads from `primary` until `expected` has arrived (keepalive newlines skipped).
fn expect_from_us(primary: &mut TcpStream, expected: &[u8]) {
    let mut got = Vec::new();
    while got.len() < expected.len() {
        let mut byte = [0u8; 1];
        primary
            .read_exact(&mut byte)
            .expect("read what the spooler sent");
        if !(got.is_empty() && byte[0] == b'\n') {
            got.push(byte[0]);
        }
    }
    assert_eq!(
        String::from_utf8_lossy(&got),
        String::from_utf8_lossy(expected)
    );
}

#[tokio::test]
async fn a_spooled_diskless_snapshot_is_acknowledged_on_arrival_and_read_back_whole() {
    let dir = tempfile::tempdir().expect("tempdir");
    let link_dir = dir.path().join("link");
    let mark = b"abcdefghijabcdefghijabcdefghijabcdefghij".to_vec();
    let (mut spool, mut primary, durable) =
        spooled(SnapshotEnd::Mark(mark.clone()), b"REDIS", &link_dir);
    durable.advance(crate::position::ReplOffset(0));
    let body = patterned(50_000);
    primary.write_all(&body).expect("send");
    primary.write_all(&mark).expect("send the mark");
    // Nobody reads the spool yet: the spooler alone acknowledges the snapshot.
    expect_from_us(
        &mut primary,
        b"*3\r\n$8\r\nREPLCONF\r\n$3\r\nACK\r\n$1\r\n0\r\n",
    );
    primary.write_all(b"*1\r\n$4\r\nPING\r\n").expect("send");

    let mut input = BytesMut::from(&b"REDIS"[..]);
    let total = 5 + body.len() + mark.len() + 14;
    while input.len() < total {
        spool.fill(&mut input, 10_000).await.expect("fill");
    }
    assert_eq!(&input[5..5 + body.len()], &body[..]);
    assert_eq!(&input[total - 14..], b"*1\r\n$4\r\nPING\r\n");
    assert!(spool.caught_up());
    let socket = spool.take_socket().await.expect("the socket back");
    spool.drain(&mut input).expect("drain");
    assert_eq!(input.len(), total, "nothing more was spooled");
    drop(spool);
    assert!(!link_dir.exists(), "the spool directory is removed");
    // The socket still reaches the primary.
    let mut socket = socket;
    socket.write_all(b"back").expect("write");
    expect_from_us(&mut primary, b"back");
}

#[tokio::test]
async fn the_spooler_reports_a_closed_link_after_what_arrived_before_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut spool, mut primary, _) = spooled(
        SnapshotEnd::AfterBytes(1_000_000),
        b"",
        &dir.path().join("l"),
    );
    let body = patterned(9_000);
    primary.write_all(&body).expect("send");
    // A FIN, not a close: closing a socket with our unread replies in it (a `REPLCONF ACK`)
    // sends a reset, which may discard what was sent before it (the test's intermittent failure).
    primary
        .shutdown(std::net::Shutdown::Write)
        .expect("shutdown");
    let mut input = BytesMut::new();
    let error = loop {
        match spool.fill(&mut input, 1_000).await {
            Ok(()) => continue,
            Err(e) => break e,
        }
    };
    assert_eq!(
        &input[..],
        &body[..],
        "every byte before the failure is read"
    );
    assert!(
        error.to_string().contains("closed the connection"),
        "{error}"
    );
    drop(primary);
}

#[tokio::test]
async fn a_length_framed_snapshot_is_acknowledged_once_its_bytes_arrived() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (spool, mut primary, durable) = spooled(
        SnapshotEnd::AfterBytes(20_000),
        &[0; 100],
        &dir.path().join("l"),
    );
    durable.advance(crate::position::ReplOffset(1234));
    primary.write_all(&patterned(19_900)).expect("send");
    expect_from_us(
        &mut primary,
        b"*3\r\n$8\r\nREPLCONF\r\n$3\r\nACK\r\n$4\r\n1234\r\n",
    );
    drop(spool);
}

/// Polls `done` until it holds, for at most 10 s.
fn poll_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(std::time::Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[tokio::test]
async fn a_spooled_stream_is_acknowledged_at_once_and_read_no_further_than_its_limit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut spool, mut primary, durable) = spooled_with_limit(
        SnapshotEnd::AlreadyArrived,
        b"",
        &dir.path().join("l"),
        Some(10),
    );
    durable.advance(crate::position::ReplOffset(77));
    // No snapshot to wait for: the first message is an ACK.
    expect_from_us(
        &mut primary,
        b"*3\r\n$8\r\nREPLCONF\r\n$3\r\nACK\r\n$2\r\n77\r\n",
    );
    let first = patterned(25);
    primary.write_all(&first).expect("send");
    poll_until("the spooler never read the first bytes", || {
        spool.shared.written.load(Ordering::Acquire) == 25
    });
    // 25 unread bytes are past the limit of 10: what follows stays in the kernel.
    let second: Vec<u8> = patterned(60)[30..].to_vec();
    primary.write_all(&second).expect("send");
    let socket = spool.closer.as_ref().expect("the spooler's socket");
    poll_until("the second bytes never arrived", || {
        rustix::io::ioctl_fionread(socket).unwrap_or(0) == 30
    });
    // An ACK asked for now is sent after the spooler's next look at the socket: by then it
    // would have read what is there.
    spool.request_ack(None);
    expect_from_us(
        &mut primary,
        b"*3\r\n$8\r\nREPLCONF\r\n$3\r\nACK\r\n$2\r\n77\r\n",
    );
    assert_eq!(spool.shared.written.load(Ordering::Acquire), 25);
    assert_eq!(rustix::io::ioctl_fionread(socket).unwrap_or(0), 30);
    // Read, the spool has room again: the spooler reads on.
    let mut input = BytesMut::new();
    while input.len() < 55 {
        tokio::time::timeout(Duration::from_secs(10), spool.fill(&mut input, 1_000))
            .await
            .expect("the spooler read on")
            .expect("fill");
    }
    assert_eq!(&input[..], &[first, second].concat()[..]);
}

#[tokio::test]
async fn a_spooled_stream_that_cannot_be_written_hands_the_socket_back_with_every_byte() {
    let dir = tempfile::tempdir().expect("tempdir");
    let link_dir = dir.path().join("l");
    let (mut spool, mut primary, durable) =
        spooled_with_limit(SnapshotEnd::AlreadyArrived, b"", &link_dir, Some(1 << 20));
    durable.advance(crate::position::ReplOffset(99));
    let data = patterned(6_000);
    primary.write_all(&data[..3_000]).expect("send");
    let mut input = BytesMut::new();
    while input.len() < 3_000 {
        spool.fill(&mut input, 10_000).await.expect("fill");
    }
    // The next segment (of 4,096 bytes) cannot be created: the spooler's write fails after
    // the 1,096 bytes that still fit in the open one.
    fs::remove_dir_all(&link_dir).expect("remove the spool's directory");
    primary.write_all(&data[3_000..]).expect("send");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !spool.may_leave() {
        assert!(
            std::time::Instant::now() < deadline,
            "the spooler never gave up"
        );
        tokio::time::timeout(Duration::from_secs(10), spool.fill(&mut input, 10_000))
            .await
            .expect("fill returns once the spooler has stopped")
            .expect("a failed write of the stream's spool is not a link failure");
    }
    assert!(spool.ended_early());
    // Until the link takes the socket back, the spooler still sends ACKs (the primary drops a
    // replica silent for its `repl-timeout`): one asked for now is written.
    primary.set_nonblocking(true).expect("nonblocking");
    let mut sent_before = [0u8; 4096];
    while primary.read(&mut sent_before).is_ok_and(|n| n > 0) {}
    primary.set_nonblocking(false).expect("blocking");
    let (done, written) = oneshot::channel();
    spool.request_ack(Some(done));
    tokio::time::timeout(Duration::from_secs(10), written)
        .await
        .expect("the ACK asked for was written")
        .expect("told");
    expect_from_us(
        &mut primary,
        b"*3\r\n$8\r\nREPLCONF\r\n$3\r\nACK\r\n$2\r\n99\r\n",
    );
    let mut socket = spool.take_socket().await.expect("the socket back");
    spool.drain(&mut input).expect("drain");
    assert_eq!(&input[..], &data[..], "every byte once, in order");
    // The link goes on over the socket.
    primary.write_all(b"more").expect("send");
    let mut more = [0u8; 4];
    socket
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    socket.read_exact(&mut more).expect("read");
    assert_eq!(&more, b"more");
}

/// The offset of the next `REPLCONF ACK` the spooler sends to `primary`.
fn next_ack(primary: &mut TcpStream) -> String {
    let mut lines = Vec::new();
    let mut line = Vec::new();
    while lines.len() < 7 {
        let mut byte = [0u8; 1];
        primary.read_exact(&mut byte).expect("read an ACK");
        match byte[0] {
            b'\n' if line.is_empty() => {}
            b'\n' => lines.push(String::from_utf8_lossy(&std::mem::take(&mut line)).into_owned()),
            b'\r' => {}
            other => line.push(other),
        }
    }
    assert_eq!(lines[2..5], ["REPLCONF", "$3", "ACK"], "{lines:?}");
    lines[6].clone()
}

#[tokio::test]
async fn a_getack_above_the_synced_offset_is_answered_again_once_it_is_synced() {
    let dir = tempfile::tempdir().expect("tempdir");
    // No periodic ACK within the test: every ACK seen answers something.
    let (spool, mut primary, durable) = spooled_with(
        SnapshotEnd::AlreadyArrived,
        b"",
        &dir.path().join("l"),
        Some(1 << 20),
        Duration::from_secs(3600),
    );
    // The spool's first ACK (sent as it starts).
    next_ack(&mut primary);
    durable.advance(crate::position::ReplOffset(10));
    // A GETACK is answered now with what is synced...
    spool.answer_getack(crate::position::ReplOffset(50));
    assert_eq!(next_ack(&mut primary), "10");
    // ... and again, at once, when what is synced passes what it asked for.
    durable.advance(crate::position::ReplOffset(60));
    assert_eq!(next_ack(&mut primary), "60");
}
