//! A real `redis-server` for the cross-node tests (`cluster.rs`,
//! `cluster_v1.rs`, `cluster_presence.rs`, `load_balancer.rs`): the
//! binary found in `PATH` (failing, never skipping, when it is missing),
//! started on a free loopback port without persistence, and a minimal
//! RESP client to inspect it.

use std::io::{BufRead, BufReader, Write as _};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::{Guard, STARTUP, WAIT, free_port};

/// A Redis tool (`redis-server`, `redis-cli`) from `PATH`. Fails (never
/// skips) when it is missing, in CI and outside it: these tests are the
/// only proof that scale-out works.
pub fn redis_tool(name: &str) -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(name))
            .find(|candidate| candidate.is_file())
    });
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    found.unwrap_or_else(|| {
        panic!(
            "{name} is not installed (not found in PATH){}: the cross-node tests need a real \
             Redis 7. Install it with `apt-get install -y redis-server` (`scripts/test --deps` \
             does this).",
            if ci { " and CI=true" } else { "" }
        )
    })
}

/// `redis-server` from `PATH`, checked to be Redis 7 or later (sharded
/// pub/sub).
pub fn redis_server() -> PathBuf {
    let path = redis_tool("redis-server");
    let version = Command::new(&path)
        .arg("--version")
        .output()
        .expect("run redis-server --version");
    let text = String::from_utf8_lossy(&version.stdout);
    let major: u32 = text
        .split_once("v=")
        .and_then(|(_, rest)| rest.split('.').next())
        .and_then(|major| major.parse().ok())
        .unwrap_or_else(|| panic!("cannot read the version of redis-server: {text}"));
    assert!(
        major >= 7,
        "redis-server {text} is too old: sharded pub/sub needs Redis 7"
    );
    path
}

/// A RESP2 reply, enough for these tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resp {
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(Option<String>),
    Array(Vec<Resp>),
}

impl Resp {
    pub fn int(&self) -> i64 {
        match self {
            Self::Int(n) => *n,
            other => panic!("expected an integer reply, got {other:?}"),
        }
    }

    pub fn text(&self) -> String {
        match self {
            Self::Bulk(Some(text)) | Self::Simple(text) => text.clone(),
            Self::Int(n) => n.to_string(),
            other => panic!("expected a string reply, got {other:?}"),
        }
    }
}

pub fn read_resp(reader: &mut impl BufRead) -> std::io::Result<Resp> {
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let line = line.trim_end_matches("\r\n");
    let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "bad RESP");
    let (kind, rest) = line.split_at_checked(1).ok_or_else(bad)?;
    Ok(match kind {
        "+" => Resp::Simple(rest.to_owned()),
        "-" => Resp::Error(rest.to_owned()),
        ":" => Resp::Int(rest.parse().map_err(|_| bad())?),
        "$" => {
            let len: i64 = rest.parse().map_err(|_| bad())?;
            if len < 0 {
                Resp::Bulk(None)
            } else {
                let mut buf = vec![0; len as usize + 2];
                reader.read_exact(&mut buf)?;
                buf.truncate(len as usize);
                Resp::Bulk(Some(String::from_utf8_lossy(&buf).into_owned()))
            }
        }
        "*" => {
            let len: i64 = rest.parse().map_err(|_| bad())?;
            let mut items = Vec::new();
            for _ in 0..len.max(0) {
                items.push(read_resp(reader)?);
            }
            Resp::Array(items)
        }
        _ => return Err(bad()),
    })
}

/// One command to the Redis at `127.0.0.1:port`, on a new connection.
pub fn command_at(port: u16, args: &[&str]) -> std::io::Result<Resp> {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(WAIT))?;
    let mut request = format!("*{}\r\n", args.len());
    for arg in args {
        request.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
    }
    stream.write_all(request.as_bytes())?;
    read_resp(&mut BufReader::new(stream))
}

/// A `redis-server` on a loopback port, with no persistence; killed on
/// drop.
pub struct Redis {
    pub proc: Option<Guard>,
    pub port: u16,
}

impl Redis {
    pub fn start() -> Self {
        Self::start_on(free_port())
    }

    pub fn start_on(port: u16) -> Self {
        let child = Command::new(redis_server())
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                std::env::temp_dir().to_str().expect("temp dir is UTF-8"),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        let mut redis = Self {
            proc: Some(Guard(child)),
            port,
        };
        let deadline = Instant::now() + STARTUP;
        loop {
            if let Ok(reply) = redis.try_command(&["PING"]) {
                assert_eq!(reply, Resp::Simple("PONG".to_owned()));
                return redis;
            }
            if let Some(proc) = redis.proc.as_mut()
                && let Some(status) = proc.wait_timeout(Duration::ZERO)
            {
                panic!("redis-server on port {port} exited at startup: {status}");
            }
            assert!(
                Instant::now() < deadline,
                "redis-server on port {port} did not answer PING"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Stops the server (SIGKILL: no goodbye to its clients) and waits.
    pub fn stop(&mut self) {
        if let Some(mut proc) = self.proc.take() {
            proc.signal("-KILL");
            proc.wait_timeout(WAIT).expect("redis-server exits");
        }
    }

    /// SIGKILLs the server and starts an empty one on the same port (all
    /// data lost, as a Redis without persistence restarting).
    pub fn restart(mut self) -> Self {
        self.stop();
        Self::start_on(self.port)
    }

    pub fn try_command(&self, args: &[&str]) -> std::io::Result<Resp> {
        command_at(self.port, args)
    }

    /// The reply to `args` (an error reply is returned, not a panic).
    pub fn command(&self, args: &[&str]) -> Resp {
        self.try_command(args)
            .unwrap_or_else(|e| panic!("redis {args:?}: {e}"))
    }

    /// The reply to `args`, which must not be an error.
    pub fn command_ok(&self, args: &[&str]) -> Resp {
        let reply = self.command(args);
        if let Resp::Error(error) = &reply {
            panic!("redis {args:?}: {error}");
        }
        reply
    }

    /// A field of `INFO <section>`, as text.
    pub fn info(&self, section: &str, field: &str) -> String {
        let text = self.command_ok(&["INFO", section]).text();
        text.lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .unwrap_or_else(|| panic!("no {field} in INFO {section}"))
            .trim()
            .to_owned()
    }

    /// `INFO memory`'s `used_memory`, in bytes.
    pub fn used_memory(&self) -> i64 {
        self.info("memory", "used_memory")
            .parse()
            .expect("used_memory is a number")
    }

    /// How many subscribers the shard channel `channel` has here.
    pub fn shard_subscribers(&self, channel: &str) -> i64 {
        let reply = self.command_ok(&["PUBSUB", "SHARDNUMSUB", channel]);
        let Resp::Array(items) = reply else {
            panic!("PUBSUB SHARDNUMSUB: {reply:?}")
        };
        items.get(1).map_or(0, Resp::int)
    }
}
