//! Statements sized to the server's `max_allowed_packet`.
//!
//! MySQL and MariaDB refuse a protocol packet larger than `max_allowed_packet` (MariaDB's
//! default is 16 MiB, MySQL 8's 64 MiB), and the driver refuses to send one (a client-side
//! `Packet is larger than max_allowed_packet`, reported as an I/O error). A batch of a large
//! transaction, or of rows with large values, would otherwise build such a statement, fail,
//! and be retried whole forever. So every statement a batch sends is sized here:
//! - multi-row `INSERT` and `DELETE ... IN (...)` are split into runs whose size, counted
//!   conservatively ([`param_bytes`] per value plus the SQL text a row adds), stays within the
//!   budget;
//! - the `LOAD DATA LOCAL INFILE` payload goes in chunks of at most [`INFILE_CHUNK`] bytes
//!   (each chunk is one packet);
//! - a row whose own statement exceeds the budget cannot be written by any statement: it is
//!   refused on every path (the grouped path hands the batch to the row-by-row one, which
//!   dead-letters the row with the reason), so no path writes what another refuses.
//!
//! The budget is `max_allowed_packet` as the server reports it at connect, less
//! [`PACKET_HEADROOM`] for the packet's own header and the statement id.

use super::super::convert::SqlValue;

/// Bytes kept out of the budget for the packet header, the statement id, flags and the null
/// bitmap's rounding.
pub(super) const PACKET_HEADROOM: usize = 1024;
/// The largest chunk of a `LOAD DATA LOCAL INFILE` payload (one packet each).
pub(super) const INFILE_CHUNK: usize = 1 << 20;

/// The most bytes `value` takes among a statement's parameters: a length prefix of up to 9
/// bytes and a type of 2, then the value.
pub(super) fn param_bytes(value: &SqlValue) -> usize {
    11 + match value {
        SqlValue::Null => 0,
        SqlValue::Int(_) | SqlValue::UInt(_) | SqlValue::Float(_) => 8,
        SqlValue::Text(text) => text.len(),
        SqlValue::Bytes(bytes) => bytes.len(),
    }
}

/// What a row of `width` placeholders adds to the SQL text: `(?,?,...)` and a comma.
pub(super) fn row_text_bytes(width: usize) -> usize {
    2 * width + 2
}

/// The statement budget for a server whose `max_allowed_packet` is `max_allowed_packet`.
pub(super) fn budget(max_allowed_packet: usize) -> usize {
    max_allowed_packet.saturating_sub(PACKET_HEADROOM)
}

/// Splits `rows` into consecutive runs that each stay within `budget` bytes (`size` of a row,
/// the SQL text `fixed` once per run) and `max_rows` rows. A row larger than the budget on
/// its own is a run of its own: the caller refuses it (see the module doc).
pub(super) fn runs<T>(
    rows: &[T],
    fixed: usize,
    budget: usize,
    max_rows: usize,
    size: impl Fn(&T) -> usize,
) -> Vec<&[T]> {
    let mut runs = Vec::new();
    let (mut start, mut bytes) = (0, fixed);
    for (i, row) in rows.iter().enumerate() {
        let row_bytes = size(row);
        let full = i - start >= max_rows.max(1) || bytes + row_bytes > budget;
        if i > start && full {
            runs.push(&rows[start..i]);
            (start, bytes) = (i, fixed);
        }
        bytes += row_bytes;
    }
    if start < rows.len() {
        runs.push(&rows[start..]);
    }
    runs
}

/// Whether `error` is the driver refusing to send a packet larger than `max_allowed_packet`.
pub(super) fn is_packet_too_large(error: &mysql_async::Error) -> bool {
    let mysql_async::Error::Io(mysql_async::IoError::Io(io)) = error else {
        return false;
    };
    io.get_ref()
        .and_then(|inner| {
            inner.downcast_ref::<mysql_common::proto::codec::error::PacketCodecError>()
        })
        .is_some_and(|codec| {
            matches!(
                codec,
                mysql_common::proto::codec::error::PacketCodecError::PacketTooLarge
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_stay_within_the_budget_and_keep_every_row_in_order() {
        let rows: Vec<usize> = vec![10, 10, 10, 50, 10, 200, 10, 10];
        let runs = runs(&rows, 5, 40, 100, |r| *r);
        assert_eq!(
            runs,
            vec![
                &[10, 10, 10][..],
                &[50][..],
                &[10][..],
                &[200][..],
                &[10, 10][..]
            ]
        );
        for run in &runs {
            let total: usize = 5 + run.iter().sum::<usize>();
            assert!(total <= 40 || run.len() == 1, "{run:?}");
        }
    }

    #[test]
    fn the_drivers_packet_too_large_is_recognised_and_not_retried() {
        use mysql_common::proto::codec::error::PacketCodecError;
        let too_large: mysql_async::Error = PacketCodecError::PacketTooLarge.into();
        assert!(is_packet_too_large(&too_large));
        assert_eq!(
            super::super::classify(too_large).kind(),
            crate::sink::SinkErrorKind::RowRefused
        );
        let lost: mysql_async::Error =
            std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset").into();
        assert!(!is_packet_too_large(&lost));
        assert_eq!(
            super::super::classify(lost).kind(),
            crate::sink::SinkErrorKind::Transient
        );
    }

    #[test]
    fn runs_also_stop_at_the_row_limit() {
        let rows = vec![1usize; 7];
        let lengths: Vec<usize> = runs(&rows, 0, 1000, 3, |r| *r)
            .iter()
            .map(|r| r.len())
            .collect();
        assert_eq!(lengths, vec![3, 3, 1]);
        assert!(runs::<usize>(&[], 0, 10, 3, |r| *r).is_empty());
    }
}
