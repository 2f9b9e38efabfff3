//! The spool: a full sync, and the command stream whenever capture falls behind it, is drained
//! from the socket at network speed into files on disk and decoded from there.
//!
//! # Why
//!
//! A primary keeps every write it takes during a full sync in the replica's output buffer until
//! the replica has received the snapshot (and, for a diskless sync, acknowledged it), and cuts
//! the replica when that buffer passes `client-output-buffer-limit replica` (256 MB, or 64 MB
//! for 60 s, by default). Decoding and capturing a snapshot is slower than receiving it, so a
//! link that decodes straight from the socket makes the primary hold the difference: measured
//! before the spool, a 3.8 GB snapshot under 60,000 writes/s was cut 14 times in 600 s and never
//! completed (docs/benchmarks.md, "Long full syncs"). A real replica avoids this the same way:
//! by default it writes the snapshot to a file and loads it afterwards.
//!
//! # How
//!
//! From `+FULLRESYNC` until the consumer has decoded the snapshot and caught up with what
//! followed it, a thread of the link's own (the *spooler*) owns the socket:
//! - it reads everything the primary sends, the snapshot and then the command stream, appends
//!   it to segment files `<dir>/<n>.seg` of [`SEGMENT_BYTES`] each, and publishes the number of
//!   bytes written;
//! - it keeps the link alive: a `\n` every second until the whole snapshot has arrived (counted
//!   from its `$<len>` framing, or seen as the trailing 40-byte `$EOF:` mark at the end of a
//!   read, as a real replica does), then `REPLCONF ACK <durable offset>` at once and at every
//!   [`POLL`] until the command stream flows (a diskless primary streams commands only after
//!   an ACK that arrives once it considers the snapshot sent, which is when its child process
//!   has exited), every second after, and when the consumer asks (a `GETACK`, answered within
//!   [`POLL`]);
//! - it reports the first failure (the primary closed the link or was silent for the link's
//!   timeout, the disk refused a write) after everything read before it is in the files.
//!
//! The consumer ([`Spool::fill`]) reads the files in order, deletes each segment once read, and
//! waits for a notification when it has caught up: disk use is what has arrived and is not yet
//! decoded (the `writebehind_spool_bytes` gauge). Once the snapshot is decoded and the consumer
//! finds the files read to the end, it stops the spooler, takes the socket back
//! ([`Spool::take_socket`]), reads the last bytes the spooler wrote, and from then on reads the
//! socket directly: the command stream is not written to disk once the link has caught up.
//!
//! # The command stream, when the consumer falls behind
//!
//! Read straight from the socket, a consumer slower than the primary's writes slows the socket (TCP
//! backpressure), and the primary keeps the difference in the replica's output buffer: measured, 78
//! MB for a burst of a million `HSET`s that a real replica followed with 0.2 MB
//! (docs/benchmarks.md, session 16), and the same limit as above cuts the link past 256 MB, or past
//! 64 MB held for 60 s; the reconnection then needs a backlog that large or a full sync. So the
//! link spools the stream too whenever the kernel holds more unread bytes for it after a read than
//! a consumer that keeps up leaves there (256 KiB: `behind.rs`, `link.rs`), with
//! [`SnapshotEnd::AlreadyArrived`]: the spooler ACKs at once and every second, answers a `GETACK`
//! again once the synced offset reaches it, and stops reading once `limit` bytes are spooled and
//! unread (`[replication] stream_spool_mb`, and at most a quarter of the disk's free space when the
//! spool starts: past it the primary holds the rest, as without a spool). The consumer leaves such
//! a spool as above, once it has read it to its end, but not before [`STREAM_SPOOL_AT_LEAST`] has
//! passed, so that a consumer close to the primary's pace does not hand the socket back and forth
//! on every read. Unlike a snapshot's, a failed write (a full disk) does not end the link: the
//! spooler stops reading (it goes on sending ACKs) and hands the socket back with the bytes it read
//! and could not write, which the consumer takes after the files; the link then spools no stream
//! for a minute.
//!
//! Nothing in the spool outlives its link: the link's directory is removed when the link ends,
//! and the service empties its spool root (`<buffer path>/spool`) when it starts.

use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::sync::{oneshot, Notify};

use super::LinkError;
use crate::position::{DurableOffset, ReplOffset};
use crate::redis_client::encode_command;

/// Size of one segment file: the disk the consumer frees at a time.
pub(crate) const SEGMENT_BYTES: u64 = 64 << 20;
/// The spooler's read size.
const READ_BYTES: usize = 1 << 20;
/// The spooler's longest wait for the socket: how soon it sees a stop or an ACK request.
const POLL: Duration = Duration::from_millis(100);
/// Length of a diskless snapshot's EOF mark.
const MARK_LEN: usize = 40;
/// How often a replica sends `REPLCONF ACK` (a real one does, from its `replicationCron`).
pub(crate) const ACK_EVERY: Duration = Duration::from_secs(1);
/// The shortest time the command stream stays spooled once the link spools it.
pub(crate) const STREAM_SPOOL_AT_LEAST: Duration = Duration::from_secs(1);
/// How the spooler knows that the whole snapshot has arrived.
#[derive(Debug, Clone)]
pub(crate) enum SnapshotEnd {
    /// `$<len>` framing: after this many bytes.
    AfterBytes(u64),
    /// `$EOF:<mark>` framing: when the last bytes received are the mark.
    Mark(Vec<u8>),
    /// The snapshot is behind us: the link spools the command stream, its consumer being
    /// behind (see the module doc).
    AlreadyArrived,
}

/// Watches the received bytes for the end of the snapshot.
struct SnapshotWatch {
    end: SnapshotEnd,
    seen: u64,
    tail: Vec<u8>,
}

impl SnapshotWatch {
    /// True once the snapshot has arrived, judged after each read.
    fn saw(&mut self, bytes: &[u8]) -> bool {
        self.seen += bytes.len() as u64;
        match &self.end {
            SnapshotEnd::AlreadyArrived => true,
            SnapshotEnd::AfterBytes(len) => self.seen >= *len,
            SnapshotEnd::Mark(mark) => {
                self.tail
                    .extend_from_slice(&bytes[bytes.len().saturating_sub(MARK_LEN)..]);
                let excess = self.tail.len().saturating_sub(MARK_LEN);
                self.tail.drain(..excess);
                self.tail == *mark
            }
        }
    }
}

/// State the spooler and the consumer share.
#[derive(Default)]
struct Shared {
    /// Bytes appended to the segment files (published after each write).
    written: AtomicU64,
    /// Bytes the consumer has read (for the spooler's limit).
    read: AtomicU64,
    /// Why the spooler stopped reading, set once, after the last write.
    failure: OnceLock<LinkError>,
    /// Set by the consumer: stop and hand the socket back.
    stop: AtomicBool,
    /// Set by the consumer: send `REPLCONF ACK` now.
    ack_now: AtomicBool,
    /// The offset a `GETACK` asked for, when what was synced was below it (0: none): the
    /// spooler ACKs again once the durable offset reaches it, so that `WAIT` returns promptly.
    getack_target: AtomicU64,
    /// Told once the ACK asked for is written (a stop's last report waits for it).
    ack_written: Mutex<Option<oneshot::Sender<()>>>,
    /// Notified after each write and on failure.
    arrived: Notify,
    /// Set by a spooler of the command stream that could not write (a full disk): it stopped
    /// reading and hands the socket back, with what it read and could not write in `leftover`.
    ended: AtomicBool,
    /// Read from the socket, not written to the files: the consumer takes it after the files.
    leftover: Mutex<Vec<u8>>,
}

/// `mutex` locked; a panic while it was held leaves a value still whole (each use is one
/// assignment or take).
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Appends to numbered segment files of a fixed size.
struct SegmentWriter {
    dir: PathBuf,
    segment_bytes: u64,
    written: u64,
    file: Option<File>,
}

impl SegmentWriter {
    fn append(&mut self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let within = self.written % self.segment_bytes;
            if within == 0 {
                let path = segment_path(&self.dir, self.written / self.segment_bytes);
                self.file = Some(File::create(path)?);
            }
            let room = usize::try_from(self.segment_bytes - within).unwrap_or(usize::MAX);
            let (now, rest) = data.split_at(room.min(data.len()));
            match self.file.as_mut() {
                Some(file) => file.write_all(now)?,
                None => return Err(io::Error::other("no open segment")),
            }
            self.written += now.len() as u64;
            data = rest;
        }
        Ok(())
    }
}

/// Reads the segment files in order, deleting each once read to its end.
struct SegmentReader {
    dir: PathBuf,
    segment_bytes: u64,
    read: u64,
    file: Option<File>,
}

impl SegmentReader {
    /// Appends up to `want` bytes (at least one when `available > read`) to `input`, never past
    /// `available` or the end of the current segment.
    fn read_into(&mut self, input: &mut BytesMut, available: u64, want: usize) -> io::Result<()> {
        let within = self.read % self.segment_bytes;
        let index = self.read / self.segment_bytes;
        if self.file.is_none() {
            let mut file = File::open(segment_path(&self.dir, index))?;
            file.seek(SeekFrom::Start(within))?;
            self.file = Some(file);
        }
        let limit = (available - self.read).min(self.segment_bytes - within);
        let count = usize::try_from(limit).unwrap_or(usize::MAX).min(want);
        let start = input.len();
        input.resize(start + count, 0);
        match self.file.as_mut() {
            Some(file) => file.read_exact(&mut input[start..])?,
            None => return Err(io::Error::other("no open segment")),
        }
        self.read += count as u64;
        if self.read % self.segment_bytes == 0 {
            self.file = None;
            // Already gone is as good as removed.
            match fs::remove_file(segment_path(&self.dir, index)) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        Ok(())
    }
}

fn segment_path(dir: &Path, index: u64) -> PathBuf {
    dir.join(format!("{index:08}.seg"))
}

/// What the spooler needs besides the socket.
pub(crate) struct SpoolSettings {
    /// This link's directory (created; removed when the spool ends).
    pub dir: PathBuf,
    pub end: SnapshotEnd,
    /// What `REPLCONF ACK` reports.
    pub durable: DurableOffset,
    pub address: String,
    /// Silence after which the primary is considered gone.
    pub timeout: Duration,
    /// The most bytes spooled and not yet read before the spooler stops reading the socket
    /// (`None`: no limit, for a snapshot, which must arrive whole).
    pub limit: Option<u64>,
    /// How often `REPLCONF ACK` is sent once the snapshot has arrived ([`ACK_EVERY`]).
    pub ack_every: Duration,
    /// Where the consumer publishes the bytes spooled and not yet read (with the
    /// `writebehind_spool_bytes` gauge).
    pub unread: Arc<AtomicU64>,
}

/// The consumer's side of a spooled link.
pub(crate) struct Spool {
    shared: Arc<Shared>,
    reader: SegmentReader,
    socket: Option<oneshot::Receiver<TcpStream>>,
    /// A handle on the spooler's socket, to close the link at once when the spool is dropped
    /// before it handed the socket back (a primary keeps what it sends to a replica that is
    /// still connected, and its backlog with it).
    closer: Option<TcpStream>,
    address: String,
    /// When the spooler started.
    started: Instant,
    /// Spooling the command stream only (the snapshot had arrived before).
    stream_only: bool,
    /// [`SpoolSettings::unread`].
    unread: Arc<AtomicU64>,
}

impl Drop for Spool {
    fn drop(&mut self) {
        self.publish_unread(0);
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(socket) = self.closer.take() {
            let _ = socket.shutdown(std::net::Shutdown::Both);
        }
        let _ = fs::remove_dir_all(&self.reader.dir);
    }
}

impl Spool {
    /// Hands `socket` to a new spooler thread. `received` is what was read past the snapshot
    /// header already (it stays with the consumer; the spooler counts it toward the snapshot).
    pub(crate) fn start(
        socket: TcpStream,
        received: &[u8],
        settings: SpoolSettings,
    ) -> Result<Spool, LinkError> {
        Self::start_with_segments(socket, received, settings, SEGMENT_BYTES)
    }

    fn start_with_segments(
        socket: TcpStream,
        received: &[u8],
        settings: SpoolSettings,
        segment_bytes: u64,
    ) -> Result<Spool, LinkError> {
        let address = settings.address.clone();
        let dir = settings.dir.clone();
        let stream_only = matches!(settings.end, SnapshotEnd::AlreadyArrived);
        let unread = settings.unread.clone();
        let io_error = |what: &str, e: io::Error| LinkError::Io {
            address: address.clone(),
            message: format!(
                "cannot {what} the spool in {}: {e}; check the buffer directory's disk",
                dir.display()
            ),
        };
        fs::create_dir_all(&settings.dir).map_err(|e| io_error("create", e))?;
        let prepare = || -> io::Result<(TcpStream, TcpStream)> {
            socket.set_nonblocking(false)?;
            socket.set_read_timeout(Some(POLL))?;
            Ok((socket.try_clone()?, socket.try_clone()?))
        };
        let (sender, closer) = prepare().map_err(|e| io_error("hand the socket to", e))?;
        let shared = Arc::new(Shared::default());
        let (give_back, socket_back) = oneshot::channel();
        let mut watch = SnapshotWatch {
            end: settings.end.clone(),
            seen: 0,
            tail: Vec::new(),
        };
        let arrived = watch.saw(received);
        let spooler = Spooler {
            socket,
            sender,
            segments: SegmentWriter {
                dir: settings.dir.clone(),
                segment_bytes,
                written: 0,
                file: None,
            },
            watch,
            arrived,
            shared: shared.clone(),
            settings,
        };
        std::thread::Builder::new()
            .name("writebehind-spool".into())
            .spawn(move || spooler.run(give_back))
            .map_err(|e| io_error("start the thread of", e))?;
        Ok(Spool {
            shared,
            reader: SegmentReader {
                dir: dir.clone(),
                segment_bytes,
                read: 0,
                file: None,
            },
            socket: Some(socket_back),
            closer: Some(closer),
            address,
            started: Instant::now(),
            stream_only,
            unread,
        })
    }

    /// Appends at least one spooled byte to `input`, waiting for the spooler when everything
    /// written is read; the spooler's failure once everything before it is read.
    pub(crate) async fn fill(
        &mut self,
        input: &mut BytesMut,
        want: usize,
    ) -> Result<(), LinkError> {
        loop {
            // Read before the failure is looked at: everything written before it counts.
            let failure = self.shared.failure.get().cloned();
            let ended = self.shared.ended.load(Ordering::SeqCst);
            if self.try_fill(input, want)? {
                return Ok(());
            }
            if let Some(failure) = failure {
                return Err(failure);
            }
            if ended {
                // Nothing more comes from the files: the caller takes the socket back
                // ([`Spool::may_leave`]).
                return Ok(());
            }
            self.shared.arrived.notified().await;
        }
    }

    /// Appends what is spooled and unread (up to `want` bytes); false when there is nothing.
    pub(crate) fn try_fill(
        &mut self,
        input: &mut BytesMut,
        want: usize,
    ) -> Result<bool, LinkError> {
        let written = self.shared.written.load(Ordering::Acquire);
        if written == self.reader.read {
            return Ok(false);
        }
        self.reader
            .read_into(input, written, want)
            .map_err(|e| self.read_error(e))?;
        self.shared.read.store(self.reader.read, Ordering::Release);
        self.publish_unread(written - self.reader.read);
        Ok(true)
    }

    /// True when everything the spooler wrote is read.
    pub(crate) fn caught_up(&self) -> bool {
        self.shared.written.load(Ordering::Acquire) == self.reader.read
    }

    /// True when the link may read the socket directly again: the spool is read to its end,
    /// and a spool of the command stream alone has lasted [`STREAM_SPOOL_AT_LEAST`].
    pub(crate) fn may_leave(&self) -> bool {
        self.caught_up()
            && (!self.stream_only
                || self.shared.ended.load(Ordering::SeqCst)
                || self.started.elapsed() >= STREAM_SPOOL_AT_LEAST)
    }

    /// Asks the spooler to send `REPLCONF ACK` now; `written`, if any, is told once it is.
    pub(crate) fn request_ack(&self, written: Option<oneshot::Sender<()>>) {
        if let Some(written) = written {
            *lock(&self.shared.ack_written) = Some(written);
        }
        self.shared.ack_now.store(true, Ordering::SeqCst);
    }

    /// A `GETACK` asked for `before`: answered now with what is synced, and again once the
    /// synced offset reaches `before` if it was lower.
    pub(crate) fn answer_getack(&self, before: ReplOffset) {
        self.shared
            .getack_target
            .fetch_max(before.0, Ordering::SeqCst);
        self.shared.ack_now.store(true, Ordering::SeqCst);
    }

    /// Whether the spooler stopped early, unable to write (see [`Spooler::end_early`]).
    pub(crate) fn ended_early(&self) -> bool {
        self.shared.ended.load(Ordering::SeqCst)
    }

    /// Stops the spooler and waits for the socket (blocking, with a read timeout: the caller
    /// resets both). Cancel-safe: a cancelled call leaves the spool as it was, stopping.
    pub(crate) async fn take_socket(&mut self) -> Result<TcpStream, LinkError> {
        self.shared.stop.store(true, Ordering::SeqCst);
        let returned = match self.socket.as_mut() {
            Some(receiver) => receiver.await.ok(),
            None => None,
        };
        self.socket = None;
        match (returned, self.shared.failure.get()) {
            (Some(socket), _) => {
                // The link keeps the socket: dropping the spool must not close it.
                self.closer = None;
                Ok(socket)
            }
            (None, Some(failure)) => Err(failure.clone()),
            (None, None) => Err(LinkError::Io {
                address: self.address.clone(),
                message: "the spooler ended without handing the socket back".into(),
            }),
        }
    }

    /// Appends everything written and not read to `input` (after [`Spool::take_socket`]: the
    /// spooler writes no more); dropping the spool then removes its directory.
    pub(crate) fn drain(&mut self, input: &mut BytesMut) -> Result<(), LinkError> {
        while self.try_fill(input, usize::MAX)? {}
        let leftover = std::mem::take(&mut *lock(&self.shared.leftover));
        input.extend_from_slice(&leftover);
        self.publish_unread(0);
        Ok(())
    }

    fn publish_unread(&self, bytes: u64) {
        // Published as `writebehind_spool_bytes` by the health it belongs to (with its shard).
        self.unread.store(bytes, Ordering::Relaxed);
    }

    fn read_error(&self, e: io::Error) -> LinkError {
        LinkError::Io {
            address: self.address.clone(),
            message: format!(
                "cannot read the spool in {}: {e}",
                self.reader.dir.display()
            ),
        }
    }
}

/// The thread that owns the socket while the link is spooled.
struct Spooler {
    socket: TcpStream,
    /// A clone of the socket for keepalives and ACKs.
    sender: TcpStream,
    segments: SegmentWriter,
    watch: SnapshotWatch,
    /// The whole snapshot has arrived.
    arrived: bool,
    shared: Arc<Shared>,
    settings: SpoolSettings,
}

impl Spooler {
    fn run(mut self, give_back: oneshot::Sender<TcpStream>) {
        let failure = self.spool();
        let dir = self.settings.dir.clone();
        match failure {
            Some(failure) => {
                let _ = self.shared.failure.set(failure);
                self.shared.arrived.notify_one();
            }
            None => {
                if give_back.send(self.socket).is_err() {
                    // The link is gone: nobody reads what is here.
                    let _ = fs::remove_dir_all(dir);
                }
            }
        }
    }

    /// Reads and writes until stopped (None) or failed.
    fn spool(&mut self) -> Option<LinkError> {
        let mut buffer = vec![0u8; READ_BYTES];
        let mut heard = Instant::now();
        // The first message goes out at once: an ACK when the snapshot already arrived.
        let mut sent: Option<Instant> = None;
        let mut just_arrived = self.arrived;
        // Bytes arrived after the snapshot: the command stream flows.
        let mut streaming = matches!(self.settings.end, SnapshotEnd::AlreadyArrived);
        loop {
            if self.shared.stop.load(Ordering::SeqCst) {
                return None;
            }
            if self.full() || self.shared.ended.load(Ordering::SeqCst) {
                // The primary holds what follows until the consumer reads (or, after a failed
                // write, takes the socket back): not silence. ACKs go on meanwhile, or the
                // primary would drop the link after its `repl-timeout`.
                std::thread::sleep(POLL);
                heard = Instant::now();
                if let Some(failure) = self.keep_alive(&mut sent, &mut just_arrived, streaming) {
                    return Some(failure);
                }
                continue;
            }
            match self.socket.read(&mut buffer) {
                Ok(0) => return Some(self.io_failure("the primary closed the connection".into())),
                Ok(read) => {
                    let before = self.segments.written;
                    if let Err(e) = self.segments.append(&buffer[..read]) {
                        if matches!(self.settings.end, SnapshotEnd::AlreadyArrived) {
                            let appended = (self.segments.written - before) as usize;
                            self.end_early(&buffer[appended..read], &e);
                            continue;
                        }
                        return Some(self.io_failure(format!(
                            "cannot write the spool in {}: {e}; free disk space there or move [buffer] path",
                            self.settings.dir.display()
                        )));
                    }
                    self.shared
                        .written
                        .store(self.segments.written, Ordering::Release);
                    self.shared.arrived.notify_one();
                    // Published here too: a stalled consumer publishes nothing.
                    let consumed = self.shared.read.load(Ordering::Acquire);
                    let unread = self.segments.written.saturating_sub(consumed);
                    self.settings.unread.store(unread, Ordering::Relaxed);
                    heard = Instant::now();
                    if self.arrived {
                        streaming = true;
                    } else if self.watch.saw(&buffer[..read]) {
                        self.arrived = true;
                        just_arrived = true;
                    }
                }
                Err(e) if is_timeout(&e) => {
                    if heard.elapsed() > self.settings.timeout {
                        return Some(LinkError::Timeout {
                            address: self.settings.address.clone(),
                            seconds: self.settings.timeout.as_secs(),
                        });
                    }
                }
                Err(e) => return Some(self.io_failure(e.to_string())),
            }
            if let Some(failure) = self.keep_alive(&mut sent, &mut just_arrived, streaming) {
                return Some(failure);
            }
        }
    }

    /// Stops spooling the command stream after a failed write: the files keep what they hold,
    /// `unwritten` goes to the consumer after them, and the socket back to the link once the
    /// consumer has read the files (the spooler reads no more but goes on sending ACKs until
    /// then); the link then reads the primary directly again (the primary holds what capture
    /// has not read, as without a spool). A spool of a snapshot cannot do that: its failure
    /// ends the link.
    fn end_early(&mut self, unwritten: &[u8], error: &io::Error) {
        tracing::warn!(dir = %self.settings.dir.display(), %error, "cannot write the spool of the command stream; reading the primary directly again");
        self.shared
            .written
            .store(self.segments.written, Ordering::Release);
        lock(&self.shared.leftover).extend_from_slice(unwritten);
        self.shared.ended.store(true, Ordering::SeqCst);
        self.shared.arrived.notify_one();
    }

    /// Whether the limit of unread spooled bytes is reached.
    fn full(&self) -> bool {
        self.settings.limit.is_some_and(|limit| {
            let read = self.shared.read.load(Ordering::Acquire);
            self.segments.written.saturating_sub(read) >= limit
        })
    }

    /// Sends what keeps the link alive when it is due: an ACK, or a `\n` before the snapshot
    /// has arrived.
    fn keep_alive(
        &mut self,
        sent: &mut Option<Instant>,
        just_arrived: &mut bool,
        streaming: bool,
    ) -> Option<LinkError> {
        // Until the stream flows, ACK at every poll: a primary that got our first ACK before
        // it considered the snapshot sent (a diskless one waits for its child to exit) starts
        // the stream only on the next.
        let interval = if self.arrived && !streaming {
            POLL
        } else {
            self.settings.ack_every
        };
        let due = sent.is_none_or(|at| at.elapsed() >= interval);
        let asked = self.shared.ack_now.swap(false, Ordering::SeqCst);
        let target = self.shared.getack_target.load(Ordering::SeqCst);
        let reached = target != 0 && self.settings.durable.get().0 >= target;
        if reached {
            // A later GETACK's larger target stays.
            let _ = self.shared.getack_target.compare_exchange(
                target,
                0,
                Ordering::SeqCst,
                Ordering::SeqCst,
            );
        }
        let message = if *just_arrived || asked || reached || (self.arrived && due) {
            let offset = self.settings.durable.get().to_string();
            encode_command(&[&b"REPLCONF"[..], b"ACK", offset.as_bytes()])
        } else if due {
            b"\n".to_vec()
        } else {
            return None;
        };
        *just_arrived = false;
        if let Err(e) = self.sender.write_all(&message) {
            return Some(self.io_failure(e.to_string()));
        }
        *sent = Some(Instant::now());
        if asked {
            let written = lock(&self.shared.ack_written).take();
            if let Some(written) = written {
                let _ = written.send(());
            }
        }
        None
    }

    fn io_failure(&self, message: String) -> LinkError {
        LinkError::Io {
            address: self.settings.address.clone(),
            message,
        }
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

#[cfg(test)]
#[path = "spool_tests.rs"]
mod tests;
