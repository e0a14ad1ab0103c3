//! Shared support for the tests of the `switchboard` binary (`cli.rs`,
//! `cluster.rs`, `security.rs`): the binary run as a real child process,
//! temporary files and ports, and a minimal HTTP and WebSocket client.
//!
//! Every child process is owned by a [`Guard`] that kills it on drop, so a
//! failing test leaves no server behind. Each test file is its own crate
//! and uses only part of this module.
#![allow(dead_code, unreachable_pub, missing_docs)]

pub mod redis;
pub mod redis_cluster;

use std::io::{BufRead as _, Read as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub const BIN: &str = env!("CARGO_BIN_EXE_switchboard");

/// How long a test waits for something that should happen at once.
pub const WAIT: Duration = Duration::from_secs(5);

/// How long a process may take to start and log its address (a busy
/// machine, a debug build).
pub const STARTUP: Duration = Duration::from_secs(30);

/// A plain `ws://` client.
pub type Client = WebSocketStream<MaybeTlsStream<TcpStream>>;

// ---------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------

/// The binary with no `SWITCHBOARD_*` variable inherited from the test's
/// environment, so every test states its whole configuration.
pub fn switchboard() -> Command {
    let mut command = Command::new(BIN);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("SWITCHBOARD_") {
            command.env_remove(name);
        }
    }
    command.stdin(Stdio::null());
    command
}

/// Kills the child on drop (a no-op if it has exited and been reaped).
pub struct Guard(pub Child);

impl Guard {
    pub fn pid(&self) -> u32 {
        self.0.id()
    }

    /// Polls for the exit status until `timeout`; `None` if still running.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.0.try_wait().expect("try_wait") {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends `signal`, written as `kill` takes it (`-TERM`, `-KILL`), with
    /// the `kill` command, as a service manager would.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.pid().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {signal} failed: {status}");
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// What a process that ran to its end left behind.
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Finished {
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// The exit code and stderr, for tests that look at nothing else.
    pub fn into_code_and_stderr(self) -> (Option<i32>, String) {
        (self.status.code(), self.stderr)
    }
}

/// Runs the binary to its end (it must exit within `WAIT`). Both pipes are
/// read on threads, so a chatty child cannot block on a full pipe.
pub fn run_to_exit(mut command: Command) -> Finished {
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn switchboard");
    let mut stdout = child.stdout.take().expect("piped stdout");
    let mut stderr = child.stderr.take().expect("piped stderr");
    let mut guard = Guard(child);
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let Some(status) = guard.wait_timeout(WAIT) else {
        drop(guard); // kills it, which closes the pipes
        let stderr = err.join().unwrap_or_default();
        panic!("switchboard did not exit within {WAIT:?}; stderr:\n{stderr}");
    };
    Finished {
        status,
        stdout: out.join().expect("stdout reader"),
        stderr: err.join().expect("stderr reader"),
    }
}

/// Collects a pipe's lines on a thread: all of them into `log`, and each
/// one to `tx` as it comes.
fn collect_lines(
    pipe: impl std::io::Read + Send + 'static,
    log: Arc<Mutex<Vec<String>>>,
    tx: mpsc::Sender<String>,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            log.lock().expect("log lock").push(line.clone());
            let _ = tx.send(line);
        }
    })
}

/// A running server and its stderr (the logs).
pub struct Server {
    pub proc: Guard,
    pub addr: SocketAddr,
    /// Every stderr line so far.
    pub log: Arc<Mutex<Vec<String>>>,
    /// The stderr lines, as they come, that neither `spawn` nor
    /// `wait_for_log` has looked at yet.
    lines: mpsc::Receiver<String>,
    stderr_reader: Option<JoinHandle<()>>,
}

impl Server {
    /// `switchboard --listen 127.0.0.1:0` plus `args`.
    pub fn start(args: &[&str]) -> Self {
        let mut command = switchboard();
        command.args(["--listen", "127.0.0.1:0"]).args(args);
        Self::spawn(command)
    }

    /// Starts `command` and waits for `listening on http(s)://ADDR` in its
    /// log rather than sleeping: the server logs it once its socket is
    /// bound, and it names the port the OS chose for `:0`.
    pub fn spawn(mut command: Command) -> Self {
        let mut child = command
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn switchboard");
        let stderr = child.stderr.take().expect("piped stderr");
        let mut proc = Guard(child);
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, lines) = mpsc::channel();
        let stderr_reader = collect_lines(stderr, Arc::clone(&log), tx);
        let deadline = Instant::now() + STARTUP;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match lines.recv_timeout(left) {
                Ok(line) => {
                    if let Some(addr) = listening_addr(&line) {
                        return Self {
                            proc,
                            addr,
                            log,
                            lines,
                            stderr_reader: Some(stderr_reader),
                        };
                    }
                }
                Err(err) => {
                    let status = proc.wait_timeout(Duration::from_millis(100));
                    let log = log.lock().expect("log lock").join("\n");
                    panic!(
                        "{command:?}: no `listening on` line ({err}); exit status {status:?}; stderr:\n{log}"
                    );
                }
            }
        }
    }

    pub fn http_url(&self) -> SocketAddr {
        self.addr
    }

    pub fn ws_url(&self, path: &str) -> String {
        format!("ws://{}{}", self.addr, path)
    }

    pub async fn connect(&self, path: &str) -> Client {
        ws_connect(self.addr, path).await
    }

    /// Every stderr line so far, as one text.
    pub fn log_text(&self) -> String {
        self.log.lock().expect("log lock").join("\n")
    }

    /// Waits for a log line containing `text` (among the lines not looked
    /// at yet); panics after `WAIT`.
    pub fn wait_for_log(&self, text: &str) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(text) => return line,
                Ok(_) => {}
                Err(err) => panic!("no log line with {text:?} ({err}):\n{}", self.log_text()),
            }
        }
    }

    /// Sends the signal `name` (`HUP`, `TERM`) to the server.
    pub fn signal(&self, name: &str) {
        self.proc.signal(&format!("-{name}"));
    }

    /// Sends SIGTERM with `kill`, as a service manager would.
    pub fn terminate(&self) {
        self.signal("TERM");
    }

    /// Waits for the process to exit; panics after `timeout`. Then returns
    /// every stderr line it wrote.
    pub fn wait_exit(&mut self, timeout: Duration) -> (ExitStatus, Vec<String>) {
        let Some(status) = self.proc.wait_timeout(timeout) else {
            panic!(
                "switchboard still running {timeout:?} later; stderr:\n{}",
                self.log_text()
            );
        };
        if let Some(reader) = self.stderr_reader.take() {
            let _ = reader.join();
        }
        (status, self.log.lock().expect("log lock").clone())
    }

    /// The server's resident memory, from `/proc/PID/status`.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.proc.pid()))
            .expect("read /proc/PID/status");
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("a VmRSS line in kB")
    }
}

/// The address in a log line `… listening on http://127.0.0.1:PORT …` (or
/// `https://`), text or JSON.
pub fn listening_addr(line: &str) -> Option<SocketAddr> {
    ["listening on http://", "listening on https://"]
        .into_iter()
        .find_map(|prefix| {
            let at = line.find(prefix)?;
            let rest = &line[at + prefix.len()..];
            let end = rest
                .find(|c: char| c.is_whitespace() || c == '"')
                .unwrap_or(rest.len());
            rest[..end].parse().ok()
        })
}

// ---------------------------------------------------------------------------
// Files and ports
// ---------------------------------------------------------------------------

/// A file in the temp directory, removed on drop.
pub struct TempFile(PathBuf);

impl TempFile {
    /// A new file, named uniquely for this process and ending in `suffix`.
    pub fn new(suffix: &str, contents: &str) -> Self {
        let path = unique_temp_path(suffix);
        std::fs::write(&path, contents).expect("write temp file");
        Self(path)
    }

    /// A `.toml` config file.
    pub fn config(toml: &str) -> Self {
        Self::new(".toml", toml)
    }

    pub fn path(&self) -> &str {
        self.0.to_str().expect("temp path is UTF-8")
    }

    /// Replaces the contents (a certificate renewed in place, say).
    pub fn write(&self, contents: &str) {
        std::fs::write(&self.0, contents).expect("rewrite temp file");
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A path in the temp directory, unique to this process and call.
fn unique_temp_path(suffix: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    std::env::temp_dir().join(format!(
        "switchboard-cli-test-{}-{}{suffix}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ))
}

/// A folder in the temp directory, removed with its contents on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    /// A new empty folder; its path has no symbolic link in it, so it is
    /// the path a process started in it sees as its working directory.
    pub fn new() -> Self {
        let path = unique_temp_path("-dir");
        std::fs::create_dir(&path).expect("create temp dir");
        Self(path.canonicalize().expect("canonical temp dir"))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Writes `name` (which may hold subfolders) in the folder; returns
    /// its path.
    pub fn file(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.0.join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).expect("create temp subfolder");
        }
        std::fs::write(&path, contents).expect("write temp file");
        path
    }

    /// `name` in the folder, as text.
    pub fn join(&self, name: &str) -> String {
        self.0
            .join(name)
            .to_str()
            .expect("temp path is UTF-8")
            .to_owned()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A loopback port that is taken for as long as the listener lives.
pub fn occupied_port() -> (std::net::TcpListener, SocketAddr) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    let addr = listener.local_addr().expect("local addr");
    (listener, addr)
}

/// A free loopback port (taken by nobody once this returns; the caller
/// binds it right after), for a process that must be told its port
/// rather than report the one it got for `:0`.
pub fn free_port() -> u16 {
    occupied_port().1.port()
}

// ---------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------

/// One HTTP/1.1 request over a fresh connection; returns status and body.
/// `connection: close` makes the response end with the stream, so reading
/// to the end needs no HTTP parser. A `body` is sent as JSON.
pub async fn http(addr: SocketAddr, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await.expect("connect for HTTP");
        let mut request =
            format!("{method} {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n");
        if let Some(body) = body {
            request.push_str(&format!(
                "content-type: application/json\r\ncontent-length: {}\r\n",
                body.len()
            ));
        }
        request.push_str("\r\n");
        request.push_str(body.unwrap_or(""));
        stream
            .write_all(request.as_bytes())
            .await
            .expect("write request");
        let mut response = Vec::new();
        stream
            .read_to_end(&mut response)
            .await
            .expect("read response");
        response
    };
    let response = tokio::time::timeout(WAIT, exchange)
        .await
        .unwrap_or_else(|_| panic!("{method} {path}: no response within {WAIT:?}"));
    let text = String::from_utf8(response).expect("UTF-8 response");
    assert!(
        text.contains("\r\n\r\n"),
        "not a complete response: {text:?}"
    );
    status_and_body(&text)
}

/// The status code and body of a raw HTTP/1.1 response (bodies here are
/// small and not chunked).
pub fn status_and_body(text: &str) -> (u16, String) {
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((text, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {text:?}"));
    (status, body.to_owned())
}

/// A WebSocket connection to `ws://ADDR{path}`, upgraded with 101.
pub async fn ws_connect(addr: SocketAddr, path: &str) -> Client {
    let url = format!("ws://{addr}{path}");
    let (client, response) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(&url))
        .await
        .expect("connect within the timeout")
        .unwrap_or_else(|e| panic!("connect to {url}: {e}"));
    assert_eq!(response.status(), 101);
    client
}

/// The next data or close message, skipping pings; panics after `WAIT`.
pub async fn next_message<S>(client: &mut WebSocketStream<S>) -> WsMessage
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    try_next(client, WAIT)
        .await
        .unwrap_or_else(|| panic!("no message within {WAIT:?}"))
}

/// The next data or close message, skipping pings, or `None` after `limit`.
pub async fn try_next<S>(client: &mut WebSocketStream<S>, limit: Duration) -> Option<WsMessage>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let next = tokio::time::timeout_at(deadline, client.next())
            .await
            .ok()?;
        match next
            .expect("stream still open")
            .expect("no websocket error")
        {
            WsMessage::Ping(_) | WsMessage::Pong(_) => continue,
            other => return Some(other),
        }
    }
}

/// The next message, which must be text.
pub async fn next_text<S>(client: &mut WebSocketStream<S>) -> String
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    match next_message(client).await {
        WsMessage::Text(text) => text.as_str().to_owned(),
        other => panic!("expected a text message, got {other:?}"),
    }
}

/// Reads to the end of the stream so the client answers the server's close
/// frame and sees the TCP connection end.
pub async fn drain<S>(client: &mut WebSocketStream<S>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let _ = tokio::time::timeout(WAIT, async {
        while let Some(Ok(_)) = client.next().await {}
    })
    .await;
}

/// Polls `check` every 25 ms until it returns `Some`, for at most `limit`.
pub async fn wait_for<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}
