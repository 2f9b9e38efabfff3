//! A check of RESP2 input before it is parsed: whether the frame at the front of a buffer is
//! complete, and whether its arrays nest deeper than a bound.
//!
//! The RESP decoder (`redis-protocol`) descends into nested arrays recursively, so a reply
//! nested deep enough (from a primary, a Sentinel, a `ROLE` answer, anything on the other end of
//! a socket) would overflow the stack. [`check`] walks the same bytes without recursion, with
//! one counter per open array, and stops at [`MAX_DEPTH`]: callers refuse such input with an
//! error naming the byte, and only then hand the bytes to the decoder.
//!
//! Grammar walked: `*<n>\r\n` then n values (`*-1` is a null array), `$<n>\r\n<n bytes>\r\n`
//! (`$-1` null), and the one-line kinds `+`, `-`, `:`. Anything else is left to the decoder to
//! refuse.

/// Deepest array nesting accepted: far more than any Redis reply uses (`COMMAND DOCS` nests about
/// eight levels).
pub const MAX_DEPTH: usize = 128;

/// What the front of a buffer holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// More bytes are needed before the frame is complete.
    Incomplete,
    /// A frame whose nesting is within bounds (or a kind this check leaves to the decoder).
    Complete,
    /// Arrays nested deeper than the bound, opened at this byte.
    TooDeep { at: usize },
}

/// `<number>\r\n` starting at `from`: the number and where the next value starts. `None` when
/// the line is not complete yet; `Some(None)` when it is not a number.
fn number_line(input: &[u8], from: usize) -> Option<Option<(i64, usize)>> {
    let rest = input.get(from..)?;
    let end = from + rest.iter().position(|&b| b == b'\r')?;
    if *input.get(end + 1)? != b'\n' {
        return Some(None);
    }
    let number = std::str::from_utf8(&input[from..end])
        .ok()
        .and_then(|t| t.parse().ok());
    Some(number.map(|n| (n, end + 2)))
}

/// Checks the frame at the front of `input` against `max_depth` levels of arrays (at most
/// [`MAX_DEPTH`]).
pub fn check(input: &[u8], max_depth: usize) -> Check {
    // Values still to read in each open array, innermost last (no allocation per frame: this
    // runs before every command of the replication stream).
    let max_depth = max_depth.min(MAX_DEPTH);
    let mut open = [0i64; MAX_DEPTH];
    let mut depth = 0;
    let mut pos = 0;
    loop {
        let Some(&kind) = input.get(pos) else {
            return Check::Incomplete;
        };
        let header = match kind {
            b'*' | b'$' => match number_line(input, pos + 1) {
                None => return Check::Incomplete,
                Some(None) => return Check::Complete,
                Some(Some(header)) => header,
            },
            b'+' | b'-' | b':' => match input[pos..].iter().position(|&b| b == b'\n') {
                None => return Check::Incomplete,
                Some(end) => (0, pos + end + 1),
            },
            _ => return Check::Complete,
        };
        let (n, next) = header;
        if kind == b'*' && n > 0 {
            if depth >= max_depth {
                return Check::TooDeep { at: pos };
            }
            open[depth] = n;
            depth += 1;
            pos = next;
            continue;
        }
        pos = if kind == b'$' && n >= 0 {
            let end = next.saturating_add(n as usize).saturating_add(2);
            if end > input.len() {
                return Check::Incomplete;
            }
            end
        } else {
            next
        };
        // One value is complete: so is every array it was the last value of.
        loop {
            if depth == 0 {
                return Check::Complete;
            }
            open[depth - 1] -= 1;
            if open[depth - 1] > 0 {
                break;
            }
            depth -= 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_complete_incomplete_or_too_deep() {
        assert_eq!(check(b"", 4), Check::Incomplete);
        assert_eq!(check(b"+OK\r\n", 4), Check::Complete);
        assert_eq!(check(b"+OK", 4), Check::Incomplete);
        assert_eq!(check(b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n", 4), Check::Complete);
        assert_eq!(check(b"*2\r\n$3\r\nGET\r\n$1\r\n", 4), Check::Incomplete);
        assert_eq!(check(b"*2\r\n*1\r\n:1\r\n$-1\r\n", 4), Check::Complete);
        assert_eq!(check(b"*0\r\n", 4), Check::Complete);
        assert_eq!(check(b"*-1\r\n", 4), Check::Complete);
        assert_eq!(check(b"*1\r\n*1\r\n*1\r\n:1\r\n", 3), Check::Complete);
        assert_eq!(
            check(b"*1\r\n*1\r\n*1\r\n:1\r\n", 2),
            Check::TooDeep { at: 8 }
        );
    }

    /// A million nested arrays: the decoder would recurse a million times; the check refuses
    /// them without recursing at all.
    #[test]
    fn a_million_levels_are_refused_without_recursion() {
        let deep = b"*1\r\n".repeat(1_000_000);
        assert_eq!(
            check(&deep, MAX_DEPTH),
            Check::TooDeep { at: 4 * MAX_DEPTH }
        );
    }
}
