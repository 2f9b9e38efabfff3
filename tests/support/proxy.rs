//! A TCP proxy in front of a server on 127.0.0.1 that can hold back the replication stream: on
//! the connection whose client sent `PSYNC`, what the server sends passes only while a byte
//! budget lasts. A test uses it to stop the stream at a chosen point (inside a transaction)
//! for as long as it looks, then lets the rest through.

use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

/// How much of the replication stream may still pass (`None`: all of it).
#[derive(Default)]
struct Gate {
    budget: Mutex<Option<u64>>,
    changed: Notify,
    /// Bytes of the stream are waiting for the budget.
    holding: std::sync::atomic::AtomicBool,
}

impl Gate {
    /// Takes up to `wanted` bytes from the budget; how many may pass now.
    fn take(&self, wanted: usize) -> usize {
        let mut budget = self.budget.lock().unwrap();
        match budget.as_mut() {
            None => wanted,
            Some(left) => {
                let allowed = (*left).min(wanted as u64);
                *left -= allowed;
                allowed as usize
            }
        }
    }

    fn set(&self, budget: Option<u64>) {
        *self.budget.lock().unwrap() = budget;
        self.changed.notify_waiters();
    }
}

pub struct LinkProxy {
    pub port: u16,
    gate: Arc<Gate>,
    accept: tokio::task::JoinHandle<()>,
}

impl LinkProxy {
    /// A proxy to `127.0.0.1:<target>`, letting everything through until told otherwise.
    pub async fn start(target: u16) -> LinkProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let gate = Arc::new(Gate::default());
        let accept = tokio::spawn({
            let gate = gate.clone();
            async move {
                while let Ok((client, _)) = listener.accept().await {
                    let Ok(server) = TcpStream::connect(("127.0.0.1", target)).await else {
                        continue;
                    };
                    tokio::spawn(relay(client, server, gate.clone()));
                }
            }
        });
        LinkProxy { port, gate, accept }
    }

    /// From now on, at most `bytes` more of the replication stream pass, then it is held.
    pub fn hold_after(&self, bytes: u64) {
        self.gate.set(Some(bytes));
    }

    /// Whether bytes of the replication stream are held back now.
    pub fn holding(&self) -> bool {
        self.gate.holding.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Everything passes again.
    pub fn release(&self) {
        self.gate.set(None);
    }
}

impl Drop for LinkProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Copies both ways; what the server sends after the client sent `PSYNC` passes through the
/// gate.
async fn relay(client: TcpStream, server: TcpStream, gate: Arc<Gate>) {
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let (psync_sent, psync_seen) = tokio::sync::watch::channel(false);
    let upstream = tokio::spawn(async move {
        let mut buffer = vec![0u8; 64 << 10];
        while let Ok(n) = client_read.read(&mut buffer).await {
            if n == 0 || server_write.write_all(&buffer[..n]).await.is_err() {
                break;
            }
            if buffer[..n]
                .windows(5)
                .any(|w| w.eq_ignore_ascii_case(b"PSYNC"))
            {
                let _ = psync_sent.send(true);
            }
        }
    });
    let mut buffer = vec![0u8; 64 << 10];
    'relay: while let Ok(n) = server_read.read(&mut buffer).await {
        if n == 0 {
            break;
        }
        let mut rest = &buffer[..n];
        while !rest.is_empty() {
            // Created before the budget is read: a change after the read still wakes it.
            let changed = gate.changed.notified();
            let allowed = match *psync_seen.borrow() {
                true => gate.take(rest.len()),
                false => rest.len(),
            };
            if allowed == 0 {
                gate.holding
                    .store(true, std::sync::atomic::Ordering::SeqCst);
                changed.await;
                gate.holding
                    .store(false, std::sync::atomic::Ordering::SeqCst);
                continue;
            }
            if client_write.write_all(&rest[..allowed]).await.is_err() {
                break 'relay;
            }
            rest = &rest[allowed..];
        }
    }
    upstream.abort();
}
