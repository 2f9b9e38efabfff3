//! A small request/response client for ordinary Redis commands (`INFO`, `ROLE`, `FUNCTION`,
//! `XADD`, ...), over `redis-protocol` and tokio. The replication link has its own reader; this
//! is for everything else.

use std::time::Duration;

use bytes::BytesMut;
use redis_protocol::resp2::decode::decode_bytes_mut;
use redis_protocol::resp2::types::BytesFrame;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::config::RedisEndpoint;

/// Encodes a command as a RESP array of bulk strings.
pub fn encode_command<A: AsRef<[u8]>>(args: &[A]) -> Vec<u8> {
    let mut out =
        Vec::with_capacity(16 + args.iter().map(|a| a.as_ref().len() + 16).sum::<usize>());
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for arg in args {
        let arg = arg.as_ref();
        out.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        out.extend_from_slice(arg);
        out.extend_from_slice(b"\r\n");
    }
    out
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to Redis at {address}: {source}")]
    Connect {
        address: String,
        source: std::io::Error,
    },
    #[error("Redis at {address}: connection lost: {source}")]
    Io {
        address: String,
        source: std::io::Error,
    },
    #[error("Redis at {address} did not answer within {seconds} s")]
    Timeout { address: String, seconds: u64 },
    #[error("Redis at {address} answered {command}: {message}")]
    Reply {
        address: String,
        command: String,
        message: String,
    },
    #[error("Redis at {address} sent an undecodable reply: {message}")]
    Protocol { address: String, message: String },
}

/// One connection, one command in flight (or a pipeline).
pub struct RedisClient {
    stream: TcpStream,
    input: BytesMut,
    address: String,
    timeout: Duration,
    /// What TLS established, on a `rediss://` connection.
    tls: Option<crate::tls::Negotiated>,
}

impl RedisClient {
    /// Connects and authenticates with the endpoint's credentials.
    pub async fn connect(
        endpoint: &RedisEndpoint,
        timeout: Duration,
    ) -> Result<RedisClient, ClientError> {
        let address = endpoint.address();
        let (stream, tls) = crate::tls::connect_redis(
            &endpoint.host,
            endpoint.port,
            endpoint.tls.as_ref(),
            timeout,
        )
        .await
        .map_err(|source| match source.kind() {
            std::io::ErrorKind::TimedOut => ClientError::Timeout {
                address: address.clone(),
                seconds: timeout.as_secs(),
            },
            _ => ClientError::Connect {
                address: address.clone(),
                source,
            },
        })?;
        let mut client = RedisClient {
            stream,
            input: BytesMut::with_capacity(16 * 1024),
            address,
            timeout,
            tls,
        };
        if let Some(password) = &endpoint.password {
            let mut args: Vec<&[u8]> = vec![b"AUTH"];
            if let Some(user) = &endpoint.username {
                args.push(user.as_bytes());
            }
            args.push(password.as_bytes());
            client.command(&args).await?;
        }
        Ok(client)
    }

    pub fn address(&self) -> &str {
        &self.address
    }

    /// The connection was lost with `source`; with TLS, the TLS error behind it, if any.
    fn lost(&self, source: std::io::Error) -> ClientError {
        let source = match self.tls.as_ref().and_then(|t| t.failure()) {
            Some(failure) => std::io::Error::new(source.kind(), format!("{source} ({failure})")),
            None => source,
        };
        ClientError::Io {
            address: self.address.clone(),
            source,
        }
    }

    /// What TLS established, or `None` on plain text.
    pub fn tls(&self) -> Option<&crate::tls::Negotiated> {
        self.tls.as_ref()
    }

    /// Sends one command and returns its reply; an error reply is an `Err`.
    pub async fn command<A: AsRef<[u8]>>(&mut self, args: &[A]) -> Result<BytesFrame, ClientError> {
        let mut replies = self.pipeline(&[args]).await?;
        let reply = replies.pop().ok_or_else(|| ClientError::Protocol {
            address: self.address.clone(),
            message: "no reply".into(),
        })?;
        self.check(args, reply)
    }

    /// Sends several commands in one write and reads all replies (error replies included, as
    /// `BytesFrame::Error`).
    pub async fn pipeline<A: AsRef<[u8]>>(
        &mut self,
        commands: &[&[A]],
    ) -> Result<Vec<BytesFrame>, ClientError> {
        let mut out = Vec::new();
        for args in commands {
            out.extend_from_slice(&encode_command(args));
        }
        self.stream
            .write_all(&out)
            .await
            .map_err(|source| self.lost(source))?;
        let mut replies = Vec::with_capacity(commands.len());
        while replies.len() < commands.len() {
            replies.push(self.next_frame(Some(self.timeout)).await?);
        }
        Ok(replies)
    }

    fn check<A: AsRef<[u8]>>(
        &self,
        args: &[A],
        reply: BytesFrame,
    ) -> Result<BytesFrame, ClientError> {
        match reply {
            BytesFrame::Error(message) => Err(ClientError::Reply {
                address: self.address.clone(),
                command: args
                    .first()
                    .map(|a| String::from_utf8_lossy(a.as_ref()).to_ascii_uppercase())
                    .unwrap_or_default(),
                message: message.to_string(),
            }),
            other => Ok(other),
        }
    }

    /// Sends a command without reading its reply (for `SUBSCRIBE`).
    pub async fn send<A: AsRef<[u8]>>(&mut self, args: &[A]) -> Result<(), ClientError> {
        self.stream
            .write_all(&encode_command(args))
            .await
            .map_err(|source| self.lost(source))
    }

    /// The next frame the server sends (a reply or a pushed message), waiting at most
    /// `timeout` (forever with `None`).
    pub async fn next_frame(
        &mut self,
        timeout: Option<Duration>,
    ) -> Result<BytesFrame, ClientError> {
        let address = self.address.clone();
        loop {
            if let crate::resp::Check::TooDeep { at } =
                crate::resp::check(&self.input, crate::resp::MAX_DEPTH)
            {
                return Err(ClientError::Protocol {
                    address,
                    message: format!(
                        "a reply nests arrays deeper than {} levels (at byte {at})",
                        crate::resp::MAX_DEPTH
                    ),
                });
            }
            match decode_bytes_mut(&mut self.input) {
                Ok(Some((frame, _, _))) => return Ok(frame),
                Ok(None) => {
                    self.input.reserve(16 * 1024);
                    let read = match timeout {
                        Some(t) => tokio::time::timeout(t, self.stream.read_buf(&mut self.input))
                            .await
                            .map_err(|_| ClientError::Timeout {
                                address: address.clone(),
                                seconds: t.as_secs(),
                            })?,
                        None => self.stream.read_buf(&mut self.input).await,
                    }
                    .map_err(|source| self.lost(source))?;
                    if read == 0 {
                        return Err(self.lost(std::io::ErrorKind::UnexpectedEof.into()));
                    }
                }
                Err(e) => {
                    return Err(ClientError::Protocol {
                        address,
                        message: format!("{e:?}"),
                    })
                }
            }
        }
    }

    /// `INFO <section>` as text.
    pub async fn info(&mut self, section: &str) -> Result<String, ClientError> {
        let reply = self.command(&["INFO", section]).await?;
        Ok(frame_text(&reply))
    }
}

/// The text of a string reply (empty for other kinds).
pub fn frame_text(frame: &BytesFrame) -> String {
    match frame {
        BytesFrame::SimpleString(b) | BytesFrame::BulkString(b) => {
            String::from_utf8_lossy(b).into_owned()
        }
        BytesFrame::Integer(i) => i.to_string(),
        BytesFrame::Error(e) => e.to_string(),
        _ => String::new(),
    }
}

/// One `name:value` line of an `INFO` reply.
pub fn info_field<'a>(info: &'a str, name: &str) -> Option<&'a str> {
    info.lines().find_map(|line| {
        line.strip_prefix(name)
            .and_then(|rest| rest.strip_prefix(':'))
            .map(str::trim)
    })
}
