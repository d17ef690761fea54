//! A real SMTP server per test that records what it receives and can be told to misbehave.

use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mail_parser::MimeHeaders;

/// One message received by [`SmtpSink`].
#[derive(Debug, Clone)]
pub struct ReceivedMail {
    /// Envelope sender.
    pub from: String,
    /// Envelope recipients.
    pub to: Vec<String>,
    /// Raw message.
    pub data: Vec<u8>,
    /// When its transfer began (DATA).
    pub at: std::time::Instant,
}

impl ReceivedMail {
    /// Parsed view of the message.
    pub fn parsed(&self) -> mail_parser::Message<'_> {
        mail_parser::MessageParser::default()
            .parse(&self.data)
            .expect("a parseable message")
    }

    /// Subject line.
    pub fn subject(&self) -> String {
        self.parsed().subject().unwrap_or_default().to_owned()
    }

    /// First text body.
    pub fn body(&self) -> String {
        self.parsed()
            .body_text(0)
            .map(|b| b.to_string())
            .unwrap_or_default()
    }

    /// Attachments as (name, bytes).
    pub fn attachments(&self) -> Vec<(String, Vec<u8>)> {
        let parsed = self.parsed();
        parsed
            .attachments()
            .map(|a| {
                (
                    a.attachment_name().unwrap_or_default().to_owned(),
                    a.contents().to_vec(),
                )
            })
            .collect()
    }
}

/// How an [`SmtpSink`] answers; changeable while it runs ([`SmtpSink::update`]). The
/// default accepts everything.
#[derive(Debug, Clone, Default)]
pub struct SinkRules {
    /// Messages larger than this (bytes of DATA) are refused with 552 at the end of DATA,
    /// as a relay with a size limit does; they are kept apart ([`SmtpSink::refused`]).
    pub max_message_bytes: Option<usize>,
    /// Recipients whose conversations stall: the end of DATA is not answered while the
    /// address is listed (at most two minutes); then the server answers 451 and keeps
    /// nothing, as a stuck server that finally gives up.
    pub stall: Vec<String>,
    /// Replies to `RCPT TO` for these recipients instead of 250 (e.g. 550 permanent, 451
    /// transient).
    pub rcpt_replies: Vec<(String, u16)>,
    /// Replies to the next ends of DATA, in order, instead of accepting (one used up per
    /// message): e.g. `[421, 451]` refuses two messages transiently and accepts the third.
    /// A message so refused is not kept; [`SmtpSink::scripted`] lists the codes used.
    pub data_end_script: Vec<u16>,
}

/// The text a scripted reply carries, as a real server words it.
fn scripted_text(code: u16) -> &'static str {
    match code {
        421 => "4.3.2 Service shutting down, closing transmission channel",
        451 => "4.3.0 Local error in processing, try again later",
        452 => "4.3.1 Insufficient system storage",
        550 => "5.7.1 Message rejected by policy",
        552 => "5.3.4 Message size exceeds fixed maximum message size",
        _ => "scripted reply",
    }
}

impl SinkRules {
    fn stalls(&self, to: &[String]) -> bool {
        to.iter()
            .any(|t| self.stall.iter().any(|s| same_address(s, t)))
    }
}

fn same_address(a: &str, b: &str) -> bool {
    let clean = |s: &str| {
        s.trim()
            .trim_matches(|c| c == '<' || c == '>')
            .to_ascii_lowercase()
    };
    clean(a) == clean(b)
}

type AcceptHook = Box<dyn Fn(&ReceivedMail) + Send + Sync>;
type DataHook = Box<dyn Fn(&ReceivedMail) + Send + Sync>;

#[derive(Default)]
struct SinkState {
    store: Mutex<Vec<ReceivedMail>>,
    refused: Mutex<Vec<ReceivedMail>>,
    rules: Mutex<SinkRules>,
    /// Signalled when the rules change (a stall lifted).
    changed: std::sync::Condvar,
    stalled: std::sync::atomic::AtomicU64,
    rcpt_refusals: std::sync::atomic::AtomicU64,
    on_accept: Mutex<Option<AcceptHook>>,
    on_data: Mutex<Option<DataHook>>,
    scripted: Mutex<Vec<u16>>,
}

#[derive(Clone, Default)]
struct SinkHandler {
    state: Arc<SinkState>,
    current: Option<ReceivedMail>,
}

impl mailin_embedded::Handler for SinkHandler {
    fn rcpt(&mut self, to: &str) -> mailin_embedded::Response {
        let code = self.state.rules.lock().ok().and_then(|r| {
            r.rcpt_replies
                .iter()
                .find(|(addr, _)| same_address(addr, to))
                .map(|(_, code)| *code)
        });
        match code {
            Some(code) => {
                self.state
                    .rcpt_refusals
                    .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                mailin_embedded::Response::custom(code, format!("rule for {to}"))
            }
            None => mailin_embedded::response::OK,
        }
    }

    fn data_start(
        &mut self,
        _domain: &str,
        from: &str,
        _is8bit: bool,
        to: &[String],
    ) -> mailin_embedded::Response {
        self.current = Some(ReceivedMail {
            from: from.to_owned(),
            to: to.to_vec(),
            data: Vec::new(),
            at: std::time::Instant::now(),
        });
        mailin_embedded::response::OK
    }

    fn data(&mut self, buf: &[u8]) -> std::io::Result<()> {
        match self.current.as_mut() {
            Some(m) => {
                m.data.extend_from_slice(buf);
                if let Ok(hook) = self.state.on_data.lock() {
                    if let Some(hook) = hook.as_ref() {
                        hook(m);
                    }
                }
                Ok(())
            }
            // mailin stays in its DATA state after `data_end` answered an error (552, 451),
            // so the client's next command (lettre sends QUIT) would be taken as message
            // text and never answered. Answering it with an error (554) lets the client
            // close the connection, as it would with a real server.
            None => Err(std::io::Error::other("command after a refused message")),
        }
    }

    fn data_end(&mut self) -> mailin_embedded::Response {
        let Some(m) = self.current.take() else {
            return mailin_embedded::response::OK;
        };
        let state = &self.state;
        let rules = state.rules.lock().map(|r| r.clone()).unwrap_or_default();
        if rules
            .max_message_bytes
            .is_some_and(|max| m.data.len() > max)
        {
            if let Ok(mut refused) = state.refused.lock() {
                refused.push(m);
            }
            return mailin_embedded::Response::custom(
                552,
                "5.3.4 Message size exceeds fixed maximum message size".into(),
            );
        }
        let scripted =
            state.rules.lock().ok().and_then(|mut r| {
                (!r.data_end_script.is_empty()).then(|| r.data_end_script.remove(0))
            });
        if let Some(code) = scripted {
            if let Ok(mut used) = state.scripted.lock() {
                used.push(code);
            }
            return mailin_embedded::Response::custom(code, scripted_text(code).into());
        }
        if rules.stalls(&m.to) {
            state
                .stalled
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let deadline = std::time::Instant::now() + Duration::from_secs(120);
            if let Ok(mut guard) = state.rules.lock() {
                while guard.stalls(&m.to) {
                    let left = deadline.saturating_duration_since(std::time::Instant::now());
                    if left.is_zero() {
                        break;
                    }
                    match state.changed.wait_timeout(guard, left) {
                        Ok((g, _)) => guard = g,
                        Err(_) => break,
                    }
                }
            }
            return mailin_embedded::Response::custom(
                451,
                "4.4.2 stalled conversation abandoned".into(),
            );
        }
        if let Ok(hook) = state.on_accept.lock() {
            if let Some(hook) = hook.as_ref() {
                hook(&m);
            }
        }
        if let Ok(mut store) = state.store.lock() {
            store.push(m);
        }
        mailin_embedded::response::OK
    }
}

/// A real SMTP server on a random loopback port, recording every message.
#[derive(Clone)]
pub struct SmtpSink {
    /// Port it listens on.
    pub port: u16,
    state: Arc<SinkState>,
}

impl std::fmt::Debug for SmtpSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmtpSink")
            .field("port", &self.port)
            .finish()
    }
}

impl SmtpSink {
    /// Starts the server on a background thread (it lives as long as the test process),
    /// accepting everything.
    pub fn start() -> anyhow::Result<Self> {
        Self::serve(SinkRules::default(), 2)
    }

    /// Starts a server answering by `rules`. It serves up to 32 conversations at once,
    /// since each stalled one holds a thread until the stall is lifted.
    pub fn start_with(rules: SinkRules) -> anyhow::Result<Self> {
        Self::serve(rules, 32)
    }

    fn serve(rules: SinkRules, threads: u32) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let state = Arc::new(SinkState {
            rules: Mutex::new(rules),
            ..SinkState::default()
        });
        let handler = SinkHandler {
            state: state.clone(),
            current: None,
        };
        let mut server = mailin_embedded::Server::new(handler);
        server
            .with_name("sink.test")
            .with_ssl(mailin_embedded::SslConfig::None)
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .with_num_threads(threads)
            .with_tcp_listener(listener);
        std::thread::spawn(move || {
            let _ = server.serve();
        });
        Ok(Self { port, state })
    }

    /// `smtp://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("smtp://127.0.0.1:{}", self.port)
    }

    /// Everything received (accepted) so far.
    pub fn messages(&self) -> Vec<ReceivedMail> {
        self.state
            .store
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default()
    }

    /// Messages accepted for `address`.
    pub fn messages_to(&self, address: &str) -> Vec<ReceivedMail> {
        self.messages()
            .into_iter()
            .filter(|m| m.to.iter().any(|t| same_address(t, address)))
            .collect()
    }

    /// Messages refused with 552 (too large).
    pub fn refused(&self) -> Vec<ReceivedMail> {
        self.state
            .refused
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default()
    }

    /// Conversations that stalled so far.
    pub fn stalled(&self) -> u64 {
        self.state.stalled.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// `RCPT TO` commands answered by a [`SinkRules::rcpt_replies`] rule so far.
    pub fn rcpt_refusals(&self) -> u64 {
        self.state
            .rcpt_refusals
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Changes the rules; a stall lifted this way ends the conversations waiting on it.
    pub fn update(&self, change: impl FnOnce(&mut SinkRules)) {
        if let Ok(mut rules) = self.state.rules.lock() {
            change(&mut rules);
        }
        self.state.changed.notify_all();
    }

    /// The codes of [`SinkRules::data_end_script`] answered so far, in order.
    pub fn scripted(&self) -> Vec<u16> {
        self.state
            .scripted
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default()
    }

    /// Runs `hook` in the middle of DATA: on every piece of message text as it arrives
    /// (the message so far), before the end of DATA is seen or answered. The conversation
    /// waits while the hook runs, e.g. to kill the client or cut the connection there.
    pub fn on_data(&self, hook: impl Fn(&ReceivedMail) + Send + Sync + 'static) {
        if let Ok(mut h) = self.state.on_data.lock() {
            *h = Some(Box::new(hook));
        }
    }

    /// Runs `hook` on every message just before it is accepted (before the 250 reply is
    /// written), e.g. to cut the notifier's database at that moment.
    pub fn on_accept(&self, hook: impl Fn(&ReceivedMail) + Send + Sync + 'static) {
        if let Ok(mut h) = self.state.on_accept.lock() {
            *h = Some(Box::new(hook));
        }
    }
}

/// A TCP proxy in front of an SMTP server that, while armed, cuts a conversation in the
/// middle of DATA: it forwards the `DATA` command and the first half of the first piece of
/// message text that follows, then closes both sides. The server sees half a message and
/// the connection gone (no end of DATA); the client sees its connection dropped while it is
/// sending the message or waiting for the answer. Each arming cuts one conversation.
#[derive(Debug, Clone)]
pub struct DataCutter {
    /// Port it listens on.
    pub port: u16,
    armed: Arc<std::sync::atomic::AtomicU64>,
    cuts: Arc<std::sync::atomic::AtomicU64>,
}

impl DataCutter {
    /// Starts forwarding `127.0.0.1:<port>` to the SMTP server on `target_port`, armed for
    /// `cuts` conversations.
    pub fn start(target_port: u16, cuts: u64) -> anyhow::Result<Self> {
        use std::sync::atomic::Ordering;
        let listener = TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let port = listener.local_addr()?.port();
        let cutter = Self {
            port,
            armed: Arc::new(std::sync::atomic::AtomicU64::new(cuts)),
            cuts: Arc::new(std::sync::atomic::AtomicU64::new(0)),
        };
        let (armed, done) = (cutter.armed.clone(), cutter.cuts.clone());
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                return;
            };
            while let Ok((inbound, _)) = listener.accept().await {
                let Ok(outbound) = tokio::net::TcpStream::connect(("127.0.0.1", target_port)).await
                else {
                    continue;
                };
                let (armed, done) = (armed.clone(), done.clone());
                tokio::spawn(async move {
                    let (mut client_r, mut client_w) = inbound.into_split();
                    let (mut server_r, mut server_w) = outbound.into_split();
                    let down = tokio::spawn(async move {
                        let _ = tokio::io::copy(&mut server_r, &mut client_w).await;
                    });
                    let mut seen = Vec::new();
                    let mut in_data = false;
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = match client_r.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        let piece = &buf[..n];
                        if in_data
                            && armed
                                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |a| {
                                    a.checked_sub(1)
                                })
                                .is_ok()
                        {
                            // Half of the message's first piece, then the line goes dead.
                            let _ = server_w.write_all(&piece[..n / 2]).await;
                            let _ = server_w.flush().await;
                            done.fetch_add(1, Ordering::SeqCst);
                            break;
                        }
                        if server_w.write_all(piece).await.is_err() {
                            break;
                        }
                        seen.extend_from_slice(piece);
                        if seen.len() > 4096 {
                            seen.drain(..seen.len() - 4096);
                        }
                        in_data = seen.ends_with(b"DATA\r\n");
                    }
                    down.abort();
                });
            }
        });
        Ok(cutter)
    }

    /// `smtp://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("smtp://127.0.0.1:{}", self.port)
    }

    /// Conversations cut so far.
    pub fn cuts(&self) -> u64 {
        self.cuts.load(std::sync::atomic::Ordering::SeqCst)
    }
}
