//! Whether the link's consumer is behind the command stream, and whether the disk has room to
//! spool it (`spool.rs`, "The command stream, when the consumer falls behind").

use std::time::Duration;

use tokio::net::tcp::OwnedReadHalf;
use tokio::net::TcpStream;

/// Unread bytes in the kernel that show a consumer of the command stream is behind.
const BEHIND_BYTES: u64 = 256 << 10;

/// The unread bytes in the kernel past which a consumer of the command stream is behind: 256
/// KiB, or a quarter of the socket's receive buffer when that is smaller (measured on loopback,
/// Linux's autotuned buffer held up to about 500 KB while capture lagged by 90 MB; a threshold
/// above what the buffer can hold would never be reached).
fn behind_threshold(receive_buffer: u64) -> u64 {
    BEHIND_BYTES.min(receive_buffer / 4).max(1)
}

/// How long the command stream is not spooled after its spool could not write.
pub(super) const SPOOL_PAUSE_AFTER_FAILURE: Duration = Duration::from_secs(60);

/// How often starting a spool of the command stream is logged at most.
pub(super) const SPOOL_LOG_EVERY: Duration = Duration::from_secs(60);

/// The smallest spool of the command stream worth starting: below it the primary holds the lag.
pub(super) const MIN_STREAM_SPOOL_BYTES: u64 = 16 << 20;

/// Bytes free for an unprivileged writer on the disk holding `path` (or its nearest existing
/// ancestor); 0 when it cannot be read.
pub(super) fn available_disk(path: &std::path::Path) -> u64 {
    path.ancestors()
        .find_map(|dir| rustix::fs::statvfs(dir).ok())
        .map_or(0, |disk| disk.f_bavail.saturating_mul(disk.f_frsize))
}

/// Whether the kernel still holds more unread bytes for `socket` than a consumer that keeps up
/// leaves there (checked only after a read of a whole chunk: a consumer that waits for its
/// reads is not behind). An error reads as "not behind": the link goes on as it is.
pub(super) fn left_behind(socket: &OwnedReadHalf) -> bool {
    let socket: &TcpStream = socket.as_ref();
    let unread = rustix::io::ioctl_fionread(socket).unwrap_or(0);
    let buffer = rustix::net::sockopt::socket_recv_buffer_size(socket).unwrap_or(0);
    buffer > 0 && unread >= behind_threshold(buffer as u64)
}
