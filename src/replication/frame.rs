//! The frames of the replication stream, parsed in one pass.
//!
//! After `+CONTINUE` (or the snapshot of a full sync) a primary sends its replicas nothing but
//! commands, each a RESP2 array of bulk strings:
//!
//! ```text
//! *<n>\r\n            n >= 1 arguments
//! $<len>\r\n<len bytes>\r\n   n times
//! ```
//!
//! (Redis's `feedReplicationBuffer` only ever carries such arrays; its keepalive is a `PING`
//! command, and the newlines it sends while it prepares a snapshot come before the snapshot,
//! not in the stream.) [`parse`] reads exactly this shape: it walks the length lines, skips the
//! data, and records where each argument lies, so a command is looked at once. Anything else
//! (another RESP kind, a null array or bulk string, a nested array, a length that is not a
//! number, a missing CRLF) is an error naming the byte of the frame and what was there: the
//! stream is then not one this service can follow.
//!
//! Measured (scripts/bench-instructions.sh, session 18): the generic decoder of
//! `redis-protocol`, behind a separate check of the frame's nesting, was 37% of the
//! instructions of capture's thread. Nothing here recurses or allocates per argument beyond the
//! caller's vector of ranges; a frame that is not complete yet is parsed again from its start
//! when more bytes arrive (the length lines only: the data is skipped).

use std::ops::Range;

/// The most digits a length may have: an `i64` has at most 19.
const MAX_NUMBER_DIGITS: usize = 19;

/// What [`parse`] found at the front of the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    /// The frame is not complete yet: nothing is consumed.
    Incomplete,
    /// A whole command of `len` bytes; its arguments' ranges were pushed.
    Command { len: usize },
}

/// Bytes that are not a command frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameError {
    /// The byte of the frame where it went wrong (0 is the frame's first byte).
    pub at: usize,
    /// What was expected and what was seen.
    pub message: String,
}

/// Parses the command at the front of `input`, pushing each argument's range (within `input`)
/// to `args` (cleared first).
pub fn parse(input: &[u8], args: &mut Vec<Range<usize>>) -> Result<Parsed, FrameError> {
    args.clear();
    let Some(&first) = input.first() else {
        return Ok(Parsed::Incomplete);
    };
    if first != b'*' {
        return Err(unexpected(
            input,
            0,
            "a command (`*`, an array of bulk strings)",
        ));
    }
    let Some((count, mut pos)) = number_line(input, 1)? else {
        return Ok(Parsed::Incomplete);
    };
    if count < 1 {
        return Err(FrameError {
            at: 0,
            message: format!("a command of {count} arguments (a null or empty array)"),
        });
    }
    for _ in 0..count {
        let Some(&kind) = input.get(pos) else {
            return Ok(Parsed::Incomplete);
        };
        if kind != b'$' {
            return Err(unexpected(input, pos, "an argument (`$`, a bulk string)"));
        }
        let Some((len, data)) = number_line(input, pos + 1)? else {
            return Ok(Parsed::Incomplete);
        };
        if len < 0 {
            return Err(FrameError {
                at: pos,
                message: format!(
                    "an argument of length {len} (`$-1` is a null), not a bulk string"
                ),
            });
        }
        let Some(end) = usize::try_from(len).ok().and_then(|l| data.checked_add(l)) else {
            return Err(FrameError {
                at: pos,
                message: format!("an argument of {len} bytes"),
            });
        };
        let Some(terminator) = input
            .get(end..end.saturating_add(2))
            .filter(|t| t.len() == 2)
        else {
            return Ok(Parsed::Incomplete);
        };
        if terminator != b"\r\n" {
            return Err(unexpected(input, end, "CRLF after the argument's data"));
        }
        args.push(data..end);
        pos = end + 2;
    }
    Ok(Parsed::Command { len: pos })
}

/// `<number>\r\n` from `from`: the number and where the line after it starts, or `None` while
/// the line is not complete.
fn number_line(input: &[u8], from: usize) -> Result<Option<(i64, usize)>, FrameError> {
    let rest = &input[from.min(input.len())..];
    let negative = rest.first() == Some(&b'-');
    let digits_from = usize::from(negative);
    // At most 19 digits: their value fits a u64 without overflow checks per digit.
    let mut value: u64 = 0;
    let mut i = digits_from;
    while let Some(&b) = rest.get(i) {
        if !b.is_ascii_digit() {
            break;
        }
        if i - digits_from == MAX_NUMBER_DIGITS {
            return Err(unexpected(input, from + i, "a length of at most 19 digits"));
        }
        value = value * 10 + u64::from(b - b'0');
        i += 1;
    }
    let Some(&end) = rest.get(i) else {
        return Ok(None);
    };
    if end != b'\r' || i == digits_from {
        return Err(unexpected(input, from + i, "a length (digits, then CRLF)"));
    }
    let Ok(value) = i64::try_from(value) else {
        return Err(unexpected(input, from, "a length that fits 64 bits"));
    };
    match rest.get(i + 1) {
        None => Ok(None),
        Some(b'\n') => Ok(Some((if negative { -value } else { value }, from + i + 2))),
        Some(_) => Err(unexpected(input, from + i, "CRLF after a length")),
    }
}

fn unexpected(input: &[u8], at: usize, expected: &str) -> FrameError {
    let seen = &input[at.min(input.len())..input.len().min(at + 16)];
    FrameError {
        at,
        message: format!(
            "expected {expected}, found {:?}",
            String::from_utf8_lossy(seen)
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args_of(input: &[u8]) -> Result<(usize, Vec<&[u8]>), FrameError> {
        let mut ranges = Vec::new();
        match parse(input, &mut ranges)? {
            Parsed::Incomplete => panic!("incomplete: {:?}", String::from_utf8_lossy(input)),
            Parsed::Command { len } => Ok((len, ranges.into_iter().map(|r| &input[r]).collect())),
        }
    }

    #[test]
    fn a_command_is_its_arguments_and_its_length() {
        let frame = b"*3\r\n$4\r\nHSET\r\n$1\r\nk\r\n$0\r\n\r\n*1\r\n";
        let (len, args) = args_of(frame).unwrap();
        assert_eq!(len, frame.len() - 4);
        assert_eq!(args, vec![&b"HSET"[..], b"k", b""]);
        // Data is data: CRLF and `$` inside an argument are bytes like any other.
        let (_, args) = args_of(b"*1\r\n$6\r\n$1\r\n\r\n\r\n").unwrap();
        assert_eq!(args, vec![&b"$1\r\n\r\n"[..]]);
    }

    #[test]
    fn every_prefix_of_a_command_is_incomplete() {
        let frame = b"*2\r\n$4\r\nPING\r\n$12\r\nhello world!\r\n";
        let mut ranges = Vec::new();
        for end in 0..frame.len() {
            assert_eq!(
                parse(&frame[..end], &mut ranges),
                Ok(Parsed::Incomplete),
                "prefix of {end} bytes"
            );
        }
        assert_eq!(
            parse(frame, &mut ranges),
            Ok(Parsed::Command { len: frame.len() })
        );
    }

    #[test]
    fn what_is_not_a_command_is_an_error_naming_the_byte() {
        let cases: &[(&[u8], usize, &str)] = &[
            (b"+OK\r\n", 0, "expected a command"),
            (b"*0\r\n", 0, "0 arguments"),
            (b"*-1\r\n", 0, "-1 arguments"),
            (b"*1\r\n:1\r\n", 4, "expected an argument"),
            (b"*1\r\n*1\r\n$1\r\na\r\n", 4, "expected an argument"),
            (b"*1\r\n$-1\r\n", 4, "length -1"),
            (b"*1\r\n$-5\r\n", 4, "length -5"),
            (b"*1\r\n$x\r\n", 5, "expected a length"),
            (b"*1\r\n$\r\n", 5, "expected a length"),
            (b"*1\r\n$1\rx", 6, "CRLF after a length"),
            (b"*1\r\n$1\r\nabc", 9, "CRLF after the argument"),
            (b"*9999999999999999999\r\n", 1, "fits 64 bits"),
            (b"*1\r\n$9223372036854775808\r\n", 5, "fits 64 bits"),
            (b"*1\r\n$00000000000000000001\r\n", 24, "at most 19 digits"),
            (b"*1\r\n$-\r\n", 6, "expected a length"),
        ];
        let mut ranges = Vec::new();
        for (input, at, says) in cases {
            let err = parse(input, &mut ranges).unwrap_err();
            assert_eq!(
                err.at,
                *at,
                "{:?}: {}",
                String::from_utf8_lossy(input),
                err.message
            );
            assert!(
                err.message.contains(says),
                "{:?}: {}",
                String::from_utf8_lossy(input),
                err.message
            );
        }
    }

    /// A small deterministic generator (no dependency for a test).
    struct Xorshift(u64);

    impl Xorshift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: u64) -> usize {
            (self.next() % n) as usize
        }
    }

    /// Random commands, concatenated and cut at random points: parsed back exactly, each
    /// prefix of a frame incomplete, never an error.
    #[test]
    fn random_commands_cut_anywhere_parse_back_exactly() {
        let mut rng = Xorshift(0x9e37_79b9_7f4a_7c15);
        let mut stream = Vec::new();
        let mut commands = Vec::new();
        for _ in 0..500 {
            let args: Vec<Vec<u8>> = (0..1 + rng.below(9))
                .map(|_| (0..rng.below(40)).map(|_| rng.next() as u8).collect())
                .collect();
            stream.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
            for arg in &args {
                stream.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
                stream.extend_from_slice(arg);
                stream.extend_from_slice(b"\r\n");
            }
            commands.push(args);
        }
        let mut ranges = Vec::new();
        let (mut buffered, mut consumed, mut parsed) = (0, 0, Vec::<Vec<Vec<u8>>>::new());
        while consumed < stream.len() {
            buffered = (buffered + 1 + rng.below(64)).min(stream.len());
            loop {
                let input = &stream[consumed..buffered];
                match parse(input, &mut ranges).expect("a valid stream") {
                    Parsed::Incomplete => break,
                    Parsed::Command { len } => {
                        parsed.push(ranges.iter().map(|r| input[r.clone()].to_vec()).collect());
                        consumed += len;
                    }
                }
            }
        }
        assert_eq!(parsed, commands);
    }

    /// Arbitrary bytes are a command, incomplete or an error, never a panic, and a command
    /// never claims more than the input holds.
    #[test]
    fn random_bytes_never_panic() {
        let mut rng = Xorshift(0x2545_f491_4f6c_dd1d);
        let alphabet = b"*$-0123456789\r\nab";
        let mut ranges = Vec::new();
        for _ in 0..20_000 {
            let input: Vec<u8> = (0..rng.below(48))
                .map(|_| match rng.below(4) {
                    0 => rng.next() as u8,
                    _ => alphabet[rng.below(alphabet.len() as u64)],
                })
                .collect();
            if let Ok(Parsed::Command { len }) = parse(&input, &mut ranges) {
                assert!(len <= input.len());
                assert!(ranges.iter().all(|r| r.end <= len));
            }
        }
    }
}
