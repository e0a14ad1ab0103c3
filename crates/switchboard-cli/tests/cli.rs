//! The `switchboard` binary, run as a real process: configuration sources
//! and their precedence, startup errors and exit codes, logs, graceful
//! shutdown on SIGTERM, and memory over many connect/disconnect cycles.
//!
//! Every child process is owned by a guard that kills it on drop, so a
//! failing test leaves no server behind.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures_util::{SinkExt as _, StreamExt as _};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};

use support::{
    Server, TempDir, TempFile, WAIT, drain, http, next_message, occupied_port, run_to_exit,
    switchboard,
};

// ---------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------

async fn connections(addr: SocketAddr) -> serde_json::Value {
    let (status, body) = http(addr, "GET", "/api/connections", None).await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).expect("JSON body")
}

/// What `/echo` did with a message.
#[derive(Debug, PartialEq, Eq)]
enum Echo {
    Echoed,
    Closed(CloseCode),
}

/// Sends a 150-byte text message to `/echo`, whole or in two fragments
/// of 75 bytes, and reports whether it came back or the server closed.
async fn echo_150_bytes(server: &Server, fragmented: bool) -> Echo {
    let mut client = server.connect("/echo").await;
    let text = "x".repeat(150);
    if fragmented {
        let first = Frame::message(text[..75].to_owned(), OpCode::Data(Data::Text), false);
        let rest = Frame::message(text[75..].to_owned(), OpCode::Data(Data::Continue), true);
        client.feed(WsMessage::Frame(first)).await.expect("send");
        client.feed(WsMessage::Frame(rest)).await.expect("send");
        client.flush().await.expect("flush");
    } else {
        client
            .send(WsMessage::text(text.clone()))
            .await
            .expect("send");
    }
    let outcome = match next_message(&mut client).await {
        WsMessage::Text(echoed) => {
            assert_eq!(echoed.as_str(), text, "the echo is the message");
            Echo::Echoed
        }
        WsMessage::Close(Some(frame)) => Echo::Closed(frame.code),
        other => panic!("expected the echo or a close frame, got {other:?}"),
    };
    drain(&mut client).await;
    outcome
}

// ---------------------------------------------------------------------------
// Startup, help, configuration
// ---------------------------------------------------------------------------

#[tokio::test]
async fn runs_with_no_config_and_heartbeat_answers_200() {
    let mut server = Server::start(&[]);
    let (status, body) = http(server.http_url(), "GET", "/heartbeat", None).await;
    assert_eq!(status, 200, "{body}");
    let body: serde_json::Value = serde_json::from_str(&body).expect("JSON body");
    assert_eq!(body, serde_json::json!({"status": "ok"}));

    // The default text log names the address it bound.
    let log = server.log.lock().expect("log lock").clone();
    assert!(
        log.iter()
            .any(|l| l.contains(&format!("listening on http://{}", server.addr))),
        "{log:?}"
    );
    server.terminate();
    let (status, _) = server.wait_exit(WAIT);
    assert_eq!(status.code(), Some(0));
}

#[test]
fn help_lists_every_option_and_exits_0() {
    let mut command = switchboard();
    command.arg("--help");
    let run = run_to_exit(command);
    assert_eq!(run.code(), Some(0), "stderr: {}", run.stderr);
    let help = run.stdout;

    let mut options: Vec<String> = [
        "listen",
        "config",
        "log_format",
        "log_level",
        "shutdown_timeout",
        "drain_window",
        "drain_grace",
        "pid_file",
        "backend",
        "node_id",
        "redis_url",
        "redis_key_prefix",
        "redis_presence_ttl",
        "redis_request_timeout",
        "auth_mode",
        "auth_jwt_secret",
        "auth_jwt_public_key",
        "auth_jwt_jwks",
        "auth_jwks_require_kid",
        "auth_issuer",
        "auth_audience",
        "auth_clock_skew",
        "auth_expiry_grace",
        "insecure_allow_anonymous",
        "api_keys",
        "api_protect_metrics",
        "api_protect_heartbeat",
        "insecure_open_api",
        "allowed_origins",
        "allowed_hosts",
        "trusted_proxies",
        "tls_cert",
        "tls_key",
    ]
    .map(str::to_owned)
    .into();
    // Every field of `Limits`, so a new limit without a flag fails here.
    let limits = serde_json::to_value(switchboard::Limits::default()).expect("limits as JSON");
    let limits = limits.as_object().expect("limits are a table");
    assert!(limits.len() >= 11, "{limits:?}");
    options.extend(limits.keys().cloned());
    for option in &options {
        let flag = format!("--{}", option.replace('_', "-"));
        let env = format!("SWITCHBOARD_{}", option.to_uppercase());
        assert!(help.contains(&flag), "--help does not list {flag}:\n{help}");
        assert!(help.contains(&env), "--help does not list {env}:\n{help}");
    }
}

#[tokio::test]
async fn listen_precedence_is_file_then_env_then_flag() {
    let (_taken, busy) = occupied_port();
    let busy = busy.to_string();

    // The file alone applies: its (busy) address cannot be bound.
    let file = TempFile::config(&format!("listen = \"{busy}\"\n"));
    let mut command = switchboard();
    command.args(["--config", file.path()]);
    let run = run_to_exit(command);
    assert_eq!(run.code(), Some(3), "stderr: {}", run.stderr);
    assert!(run.stderr.contains(&busy), "{}", run.stderr);

    // The environment beats the file.
    let mut command = switchboard();
    command
        .args(["--config", file.path()])
        .env("SWITCHBOARD_LISTEN", "127.0.0.1:0");
    let server = Server::spawn(command);
    assert_ne!(server.addr.to_string(), busy);
    drop(server);

    // ...in both directions (and the config path may come from the
    // environment too).
    let free = TempFile::config("listen = \"127.0.0.1:0\"\n");
    let mut command = switchboard();
    command
        .env("SWITCHBOARD_CONFIG", free.path())
        .env("SWITCHBOARD_LISTEN", &busy);
    let run = run_to_exit(command);
    assert_eq!(run.code(), Some(3), "stderr: {}", run.stderr);
    assert!(run.stderr.contains(&busy), "{}", run.stderr);

    // A flag beats the environment and the file.
    let mut command = switchboard();
    command
        .args(["--config", file.path(), "--listen", "127.0.0.1:0"])
        .env("SWITCHBOARD_LISTEN", &busy);
    let server = Server::spawn(command);
    assert_ne!(server.addr.to_string(), busy);
}

#[tokio::test]
async fn listen_takes_a_host_name_from_the_flag_the_environment_and_the_file() {
    let file = TempFile::config("listen = \"localhost:0\"\n");
    let mut by_flag = switchboard();
    by_flag.args(["--listen", "localhost:0"]);
    let mut by_env = switchboard();
    by_env.env("SWITCHBOARD_LISTEN", "localhost:0");
    let mut by_file = switchboard();
    by_file.args(["--config", file.path()]);
    for (source, command) in [("flag", by_flag), ("env", by_env), ("file", by_file)] {
        let mut server = Server::spawn(command);
        // localhost is loopback: no API key or authentication needed.
        assert!(server.addr.ip().is_loopback(), "{source}: {}", server.addr);
        let (status, body) = http(server.addr, "GET", "/heartbeat", None).await;
        assert_eq!(status, 200, "{source}: {body}");
        // The log says what the name resolved to (before `listening on`).
        let log = server.log_text();
        assert!(
            log.lines()
                .any(|l| l.contains("resolved the listen address") && l.contains("localhost:0")),
            "{source}: {log}"
        );
        server.terminate();
        let (status, lines) = server.wait_exit(WAIT);
        assert_eq!(status.code(), Some(0), "{source}: {lines:?}");
    }
}

#[tokio::test]
async fn max_message_size_precedence_is_file_then_env_then_flag() {
    // (file, env, flag, what a 150-byte message gets)
    let cases: [(u32, Option<&str>, Option<&str>, Echo); 5] = [
        (100, None, None, Echo::Closed(CloseCode::Size)),
        (100, Some("200"), None, Echo::Echoed),
        (200, Some("100"), None, Echo::Closed(CloseCode::Size)),
        (100, Some("200"), Some("120"), Echo::Closed(CloseCode::Size)),
        (100, Some("100"), Some("200"), Echo::Echoed),
    ];
    for (file, env, flag, expected) in cases {
        let config = TempFile::config(&format!("[limits]\nmax_message_size = {file}\n"));
        let mut command = switchboard();
        command.args(["--listen", "127.0.0.1:0", "--config", config.path()]);
        if let Some(env) = env {
            command.env("SWITCHBOARD_MAX_MESSAGE_SIZE", env);
        }
        if let Some(flag) = flag {
            command.args(["--max-message-size", flag]);
        }
        let server = Server::spawn(command);
        // Two fragments of 75 bytes: each frame is under every limit tried,
        // so only the size of the joined message decides.
        let got = echo_150_bytes(&server, true).await;
        assert_eq!(
            got, expected,
            "file {file}, env {env:?}, flag {flag:?}: a 150-byte message"
        );
    }
}

#[tokio::test]
async fn max_message_size_applies_to_a_message_sent_as_one_frame() {
    // The limit is the message size, "after joining fragments" (Limits
    // docs); a single frame of 150 bytes is a 150-byte message.
    let server = Server::start(&["--max-message-size", "100"]);
    assert_eq!(
        echo_150_bytes(&server, false).await,
        Echo::Closed(CloseCode::Size),
        "max_message_size = 100 must refuse a 150-byte single-frame message with 1009"
    );
    let server = Server::start(&["--max-message-size", "200"]);
    assert_eq!(echo_150_bytes(&server, false).await, Echo::Echoed);
}

/// Runs with `toml` as the config file (and `--listen 127.0.0.1:0`, so a
/// server that wrongly starts cannot take a real port) and expects exit 2
/// with every one of `named` in stderr.
fn assert_config_error(toml: &str, named: &[&str]) {
    let file = TempFile::config(toml);
    let mut command = switchboard();
    command.args(["--listen", "127.0.0.1:0", "--config", file.path()]);
    let run = run_to_exit(command);
    assert_eq!(
        run.code(),
        Some(2),
        "config {toml:?}: exit code; stderr:\n{}",
        run.stderr
    );
    for name in named {
        assert!(
            run.stderr.contains(name),
            "config {toml:?}: stderr does not name {name}:\n{}",
            run.stderr
        );
    }
}

#[test]
fn unknown_key_in_the_file_exits_2_naming_it() {
    assert_config_error("listn = \"127.0.0.1:0\"\n", &["listn"]);
    assert_config_error("[limit]\nmax_message_size = 10\n", &["limit"]);
}

#[test]
fn unknown_limits_key_exits_2_naming_it() {
    assert_config_error("[limits]\nmax_mesage_size = 10\n", &["max_mesage_size"]);
}

#[test]
fn invalid_values_in_the_file_exit_2_naming_the_key() {
    assert_config_error(
        "[limits]\nping_interval = \"5 parsecs\"\n",
        &["ping_interval", "parsecs"],
    );
    assert_config_error("[limits]\nmax_connections = 0\n", &["max_connections"]);
    assert_config_error("[limits]\nmax_message_size = -1\n", &["max_message_size"]);
    assert_config_error(
        "[limits]\nduplicate_ids = \"sometimes\"\n",
        &["duplicate_ids", "sometimes"],
    );
    assert_config_error("listen = \"not an address\"\n", &["listen"]);
    assert_config_error("listen = \"localhost\"\n", &["listen", "no port"]);
    assert_config_error("listen = \"::1:80\"\n", &["listen", "[::1]:8080"]);
    assert_config_error("shutdown_timeout = \"ten\"\n", &["shutdown_timeout"]);
    assert_config_error("log_format = \"xml\"\n", &["log_format", "xml"]);
}

#[test]
fn invalid_values_in_flags_and_env_exit_2_naming_the_option() {
    /// Flags, environment variables, and what stderr must name.
    type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str);
    let cases: [Case<'_>; 4] = [
        (&["--ping-interval", "5 parsecs"], &[], "--ping-interval"),
        (&["--max-connections", "0"], &[], "max_connections"),
        (
            &[],
            &[("SWITCHBOARD_MAX_CONNECTIONS", "0")],
            "max_connections",
        ),
        (
            &[],
            &[("SWITCHBOARD_PING_INTERVAL", "5 parsecs")],
            "ping-interval",
        ),
    ];
    for (args, envs, named) in cases {
        let mut command = switchboard();
        command.args(["--listen", "127.0.0.1:0"]).args(args);
        for (k, v) in envs {
            command.env(k, v);
        }
        let run = run_to_exit(command);
        assert_eq!(
            run.code(),
            Some(2),
            "{args:?} {envs:?}: stderr:\n{}",
            run.stderr
        );
        assert!(
            run.stderr.contains(named),
            "{args:?} {envs:?}: stderr does not name {named}:\n{}",
            run.stderr
        );
    }
}

#[test]
fn a_bad_value_from_the_environment_names_the_variable() {
    // (variable, value, what else stderr must say)
    let cases = [
        ("SWITCHBOARD_PING_INTERVAL", "5 parsecs", "unknown unit"),
        ("SWITCHBOARD_SLOW_CONSUMER", "sometimes", "drop-oldest"),
        ("SWITCHBOARD_COMPRESSION", "yes", "true, false"),
        ("SWITCHBOARD_MAX_CONNECTIONS", "lots", "--max-connections"),
        ("SWITCHBOARD_LISTEN", "localhost", "no port"),
    ];
    for (name, value, says) in cases {
        let mut command = switchboard();
        command.env(name, value);
        if name != "SWITCHBOARD_LISTEN" {
            command.args(["--listen", "127.0.0.1:0"]);
        }
        let run = run_to_exit(command);
        assert_eq!(run.code(), Some(2), "{name}={value}: {}", run.stderr);
        for named in [name, value, says] {
            assert!(
                run.stderr.contains(named),
                "{name}={value}: stderr does not name {named:?}:\n{}",
                run.stderr
            );
        }
    }

    // A bad flag with a good variable: the flag is named, not the variable.
    let mut command = switchboard();
    command
        .args(["--listen", "127.0.0.1:0", "--ping-interval", "5parsecs"])
        .env("SWITCHBOARD_PING_INTERVAL", "5s");
    let run = run_to_exit(command);
    assert_eq!(run.code(), Some(2), "{}", run.stderr);
    assert!(run.stderr.contains("--ping-interval"), "{}", run.stderr);
    assert!(
        !run.stderr.contains("SWITCHBOARD_PING_INTERVAL"),
        "{}",
        run.stderr
    );
}

#[tokio::test]
async fn a_flag_overrides_a_bad_value_in_the_environment() {
    let mut command = switchboard();
    command
        .args(["--listen", "127.0.0.1:0", "--ping-interval", "5s"])
        .env("SWITCHBOARD_PING_INTERVAL", "5 parsecs");
    let server = Server::spawn(command);
    let (status, _) = http(server.addr, "GET", "/heartbeat", None).await;
    assert_eq!(status, 200);
}

#[test]
fn unknown_switchboard_env_var_exits_2_naming_it() {
    let mut command = switchboard();
    command
        .args(["--listen", "127.0.0.1:0"])
        .env("SWITCHBOARD_LISTN", "127.0.0.1:0");
    let run = run_to_exit(command);
    assert_eq!(run.code(), Some(2), "stderr:\n{}", run.stderr);
    assert!(run.stderr.contains("SWITCHBOARD_LISTN"), "{}", run.stderr);
}

#[test]
fn address_in_use_exits_3_and_says_so_once() {
    let (_taken, busy) = occupied_port();
    let message = format!("cannot listen on {busy}");
    for format in ["text", "json"] {
        let mut command = switchboard();
        command.args(["--listen", &busy.to_string(), "--log-format", format]);
        let run = run_to_exit(command);
        assert_eq!(run.code(), Some(3), "{format}: stderr:\n{}", run.stderr);
        assert_eq!(
            run.stderr.matches(&message).count(),
            1,
            "{format}: `{message}` must appear exactly once:\n{}",
            run.stderr
        );
        if format == "json" {
            for line in run.stderr.lines().filter(|l| !l.trim().is_empty()) {
                let value: serde_json::Value = serde_json::from_str(line)
                    .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
                assert!(value.get("level").is_some(), "{line}");
            }
        }
    }
    // With errors filtered out of the log, the error still shows, once.
    let mut command = switchboard();
    command.args(["--listen", &busy.to_string(), "--log-level", "off"]);
    let run = run_to_exit(command);
    assert_eq!(run.code(), Some(3), "stderr:\n{}", run.stderr);
    assert_eq!(run.stderr.matches(&message).count(), 1, "{}", run.stderr);
}

// ---------------------------------------------------------------------------
// Logs and shutdown
// ---------------------------------------------------------------------------

#[tokio::test]
async fn log_format_json_writes_json_objects() {
    let mut server = Server::start(&["--log-format", "json"]);
    let (status, _) = http(server.http_url(), "GET", "/heartbeat", None).await;
    assert_eq!(status, 200);
    server.terminate();
    let (status, lines) = server.wait_exit(WAIT);
    assert_eq!(status.code(), Some(0), "{lines:?}");

    let mut listening = false;
    let mut shut_down = false;
    for line in lines.iter().filter(|l| !l.trim().is_empty()) {
        let value: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("log line is not JSON ({e}): {line}"));
        let object = value
            .as_object()
            .unwrap_or_else(|| panic!("log line is not a JSON object: {line}"));
        assert!(object.contains_key("level"), "{line}");
        let message = value["fields"]["message"].as_str().unwrap_or_default();
        listening |= message.contains(&format!("listening on http://{}", server.addr));
        shut_down |= message.contains("shut down cleanly");
    }
    assert!(
        listening,
        "no JSON line with `listening on http://`: {lines:?}"
    );
    assert!(shut_down, "no JSON line for the clean shutdown: {lines:?}");
}

/// The startup `security` line's fields, from a server started with
/// `--log-format json` and `args`.
fn json_security_fields(args: &[&str]) -> serde_json::Value {
    let mut all = vec!["--log-format", "json"];
    all.extend_from_slice(args);
    let server = Server::start(&all);
    let log = server.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("\"security\""))
        .unwrap_or_else(|| panic!("no security line in:\n{log}"));
    let value: serde_json::Value =
        serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
    assert_eq!(value["fields"]["message"], "security", "{line}");
    value["fields"].clone()
}

#[test]
fn startup_log_values_are_json_values_in_json_logs() {
    let origins = "https://a.example.com,https://*.example.com";
    let fields = json_security_fields(&[
        "--allowed-origins",
        origins,
        "--trusted-proxies",
        "10.0.0.0/8,::1",
    ]);
    assert_eq!(
        fields["origins"],
        serde_json::json!(["https://a.example.com", "https://*.example.com"]),
        "{fields}"
    );
    assert_eq!(
        fields["trusted_proxies"],
        serde_json::json!(["10.0.0.0/8", "::1"]),
        "{fields}"
    );
    assert_eq!(fields["auth"], "none", "{fields}");
    assert_eq!(fields["api_keys"], 0, "{fields}");
    assert_eq!(fields["tls"], false, "{fields}");

    // Not set: null (any origin), and an empty list.
    let fields = json_security_fields(&[]);
    assert!(fields["origins"].is_null(), "{fields}");
    assert_eq!(fields["trusted_proxies"], serde_json::json!([]), "{fields}");
}

#[test]
fn startup_log_values_are_plain_values_in_text_logs() {
    let server = Server::start(&[
        "--allowed-origins",
        "https://a.example.com,https://*.example.com",
        "--trusted-proxies",
        "10.0.0.0/8",
    ]);
    let log = server.log_text();
    assert!(
        log.contains(r#"origins=["https://a.example.com","https://*.example.com"]"#),
        "{log}"
    );
    assert!(log.contains(r#"trusted_proxies=["10.0.0.0/8"]"#), "{log}");
    let server = Server::start(&[]);
    let bare = server.log_text();
    assert!(bare.contains("origins=null"), "{bare}");
    for text in [log, bare] {
        for debug in ["Some(", "None"] {
            assert!(
                !text.contains(debug),
                "Rust debug text {debug:?} in:\n{text}"
            );
        }
    }
}

// ---------------------------------------------------------------------------
// The pid file
// ---------------------------------------------------------------------------

/// The process ID in the pid file at `path`.
fn pid_in(path: &str) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("read the pid file {path}: {e}"))
        .trim()
        .to_owned()
}

#[tokio::test]
async fn pid_file_serves_the_documented_reload_recipe_and_is_removed_on_exit() {
    let dir = TempDir::new();
    let pid_file = dir.join("switchboard.pid");
    let mut server = Server::start(&["--pid-file", &pid_file]);
    // Written by the time the server says it listens.
    assert_eq!(pid_in(&pid_file), server.proc.pid().to_string());

    // The recipe in docs/configuration.md, run by a shell.
    let status = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("kill -HUP \"$(cat '{pid_file}')\""))
        .status()
        .expect("run sh");
    assert!(status.success(), "kill -HUP failed: {status}");
    server.wait_for_log("received SIGHUP");
    let (status, body) = http(server.addr, "GET", "/heartbeat", None).await;
    assert_eq!(status, 200, "still serving after SIGHUP: {body}");
    assert_eq!(pid_in(&pid_file), server.proc.pid().to_string());

    server.terminate();
    let (status, lines) = server.wait_exit(WAIT);
    assert_eq!(status.code(), Some(0), "{lines:?}");
    assert!(
        !std::path::Path::new(&pid_file).exists(),
        "the pid file outlived a clean exit"
    );
}

#[test]
fn a_pid_file_naming_a_running_server_is_refused_from_every_source() {
    let dir = TempDir::new();
    let pid_file = dir.join("switchboard.pid");
    let first = Server::start(&["--pid-file", &pid_file]);
    let first_pid = first.proc.pid().to_string();
    // In the file, relative to the file's folder.
    let config = dir.file("switchboard.toml", "pid_file = \"switchboard.pid\"\n");

    let mut by_flag = switchboard();
    by_flag.args(["--pid-file", &pid_file]);
    let mut by_env = switchboard();
    by_env.env("SWITCHBOARD_PID_FILE", &pid_file);
    let mut by_file = switchboard();
    by_file.args(["--config", config.to_str().expect("UTF-8")]);
    for (source, mut command) in [("flag", by_flag), ("env", by_env), ("file", by_file)] {
        command.args(["--listen", "127.0.0.1:0"]);
        let run = run_to_exit(command);
        assert_eq!(run.code(), Some(2), "{source}: {}", run.stderr);
        for named in [pid_file.as_str(), &first_pid, "--pid-file"] {
            assert!(
                run.stderr.contains(named),
                "{source}: stderr does not name {named}:\n{}",
                run.stderr
            );
        }
        // Neither overwritten nor removed.
        assert_eq!(pid_in(&pid_file), first_pid, "{source}");
    }
}

#[test]
fn a_stale_pid_file_is_replaced_and_one_without_a_pid_is_refused() {
    let dir = TempDir::new();
    let pid_file = dir.join("switchboard.pid");
    // A process that has exited, and one that is not a switchboard (this
    // test): both leftovers, replaced with a warning.
    let mut exited = std::process::Command::new("true")
        .spawn()
        .expect("spawn true");
    exited.wait().expect("wait for true");
    let cases = [
        (exited.id(), "not running"),
        (std::process::id(), "not a switchboard"),
    ];
    for (stale, warning) in cases {
        std::fs::write(&pid_file, format!("{stale}\n")).expect("write pid file");
        let server = Server::start(&["--pid-file", &pid_file]);
        assert_eq!(pid_in(&pid_file), server.proc.pid().to_string());
        let log = server.log_text();
        assert!(log.contains(warning), "pid {stale}: {log}");
    }

    // Not a pid file at all (a mistyped path?): refused, left alone.
    std::fs::write(&pid_file, "hello\n").expect("write pid file");
    let mut command = switchboard();
    command.args(["--listen", "127.0.0.1:0", "--pid-file", &pid_file]);
    let run = run_to_exit(command);
    assert_eq!(run.code(), Some(2), "{}", run.stderr);
    assert!(run.stderr.contains(&pid_file), "{}", run.stderr);
    assert!(
        run.stderr.contains("does not hold a process ID"),
        "{}",
        run.stderr
    );
    assert_eq!(pid_in(&pid_file), "hello");
}

/// Text of the `switchboard_bytes_out_total` counter.
async fn bytes_out(addr: SocketAddr) -> u64 {
    let (status, body) = http(addr, "GET", "/metrics", None).await;
    assert_eq!(status, 200);
    body.lines()
        .find_map(|l| l.strip_prefix("switchboard_bytes_out_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no switchboard_bytes_out_total in:\n{body}"))
}

#[tokio::test]
async fn sigterm_flushes_queued_frames_then_closes_1001_and_exits_0() {
    const FRAMES: usize = 8000;
    const PAYLOAD: usize = 2048;
    // Big queues so that a client that does not read is not cut off
    // (1008) while frames pile up for it. No drain window: every client is
    // closed at once (the spread-out drain is tested in drain.rs).
    let mut server = Server::start(&[
        "--drain-window",
        "0s",
        "--drain-grace",
        "0s",
        "--max-queued-messages",
        "100000",
        "--max-queued-bytes",
        "1000000000",
    ]);
    let mut reader = server.connect("/ws?id=1").await;
    let mut sender = server.connect("/ws?id=2").await;

    // 16 MiB for client 1, which does not read yet: more than the socket
    // buffers hold (Linux caps the send buffer at 4 MiB by default), so
    // most of it waits in the server.
    let filler = "y".repeat(PAYLOAD - 8);
    for i in 0..FRAMES {
        let frame = format!(r#"{{"targets":[1],"payload":"{i:07}:{filler}"}}"#);
        sender
            .feed(WsMessage::text(frame))
            .await
            .expect("feed relay frame");
    }
    sender.flush().await.expect("flush");
    // Frames of one connection are handled in order: once the sender's
    // note to itself is back, all of the above sit in client 1's queue.
    sender
        .send(WsMessage::text(r#"{"targets":[2],"payload":"marker"}"#))
        .await
        .expect("send marker");
    match tokio::time::timeout(Duration::from_secs(60), next_message(&mut sender)).await {
        Ok(WsMessage::Text(text)) => assert_eq!(text.as_str(), r#""marker""#),
        other => panic!("expected the marker back, got {other:?}"),
    }
    let total = (FRAMES * (PAYLOAD + 4)) as u64;
    let out = bytes_out(server.http_url()).await;
    eprintln!("before SIGTERM: {out} of {total} bytes written to sockets");
    assert!(
        out + (1 << 20) < total,
        "precondition: at least 1 MiB of frames still queued in the server ({out} of {total} bytes written)"
    );

    let signalled = Instant::now();
    server.terminate();

    // Client 1 gets every frame, in order, then 1001.
    let received = tokio::time::timeout(Duration::from_secs(60), async {
        for i in 0..FRAMES {
            match next_message(&mut reader).await {
                WsMessage::Text(text) => {
                    let expected = format!("\"{i:07}:");
                    assert!(
                        text.as_str().starts_with(&expected),
                        "frame {i} out of order or lost: {}…",
                        &text.as_str()[..20.min(text.as_str().len())]
                    );
                }
                other => panic!("frame {i}: expected text, got {other:?}"),
            }
        }
        next_message(&mut reader).await
    })
    .await
    .expect("every queued frame within the timeout");
    match received {
        WsMessage::Close(Some(frame)) => {
            assert_eq!(frame.code, CloseCode::Away, "{frame:?}");
            assert_eq!(frame.reason.as_str(), "server shutting down");
        }
        other => panic!("expected close 1001 after the queued frames, got {other:?}"),
    }
    drain(&mut reader).await;

    // The idle sender is closed the same way.
    match next_message(&mut sender).await {
        WsMessage::Close(Some(frame)) => assert_eq!(frame.code, CloseCode::Away),
        other => panic!("expected close 1001, got {other:?}"),
    }
    drain(&mut sender).await;

    let (status, lines) = server.wait_exit(Duration::from_secs(5));
    assert_eq!(status.code(), Some(0), "{lines:?}");
    let took = signalled.elapsed();
    assert!(took < Duration::from_secs(8), "shutdown took {took:?}");
    assert!(
        lines.iter().any(|l| l.contains("received SIGTERM")),
        "{lines:?}"
    );
}

// ---------------------------------------------------------------------------
// Memory over connect/disconnect cycles
// ---------------------------------------------------------------------------

/// One cycle on `/ws?id=N`: connect over our own socket, relay one frame to
/// itself, then either close politely or reset the TCP connection.
async fn cycle(addr: SocketAddr, id: u64, abrupt: bool) {
    let stream = TcpStream::connect(addr).await.expect("connect");
    if abrupt {
        // Dropping the socket then sends RST instead of FIN.
        stream.set_zero_linger().expect("SO_LINGER 0");
    }
    let url = format!("ws://{addr}/ws?id={id}");
    let (mut ws, _) = tokio_tungstenite::client_async(url, stream)
        .await
        .expect("websocket handshake");
    let frame = format!(r#"{{"targets":[{id}],"payload":{id}}}"#);
    ws.send(WsMessage::text(frame)).await.expect("send");
    loop {
        match ws.next().await {
            Some(Ok(WsMessage::Text(text))) => {
                assert_eq!(text.as_str(), id.to_string());
                break;
            }
            Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_))) => continue,
            other => panic!("client {id}: expected its own frame, got {other:?}"),
        }
    }
    if abrupt {
        drop(ws);
    } else {
        ws.close(None).await.expect("close");
        while let Some(Ok(_)) = ws.next().await {}
    }
}

/// Waits until the server has no client ID and no connection left.
async fn wait_until_empty(addr: SocketAddr) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let state = connections(addr).await;
        if state["clients_total"] == 0 && state["connections_open"] == 0 {
            return state;
        }
        assert!(
            Instant::now() < deadline,
            "connections never drained: {state}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Connect/disconnect cycles must not leak: the registry ends empty and
/// memory stops growing once warm.
///
/// Tolerance: 2 MiB between round 2 and round 8 (3,000 cycles), i.e. under
/// 700 bytes per cycle. Rounds 1–2 warm up the allocator and the runtime
/// (thread-local read buffers, hash-map capacity, the allocator's arenas);
/// after that a leak of a connection's state (mailbox, registry entry,
/// socket buffers) would add several KiB per cycle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_disconnect_cycles_leave_no_entries_and_no_memory_growth() {
    const ROUNDS: u64 = 8;
    const PER_ROUND: u64 = 500;
    const PARALLEL: u64 = 25;
    const TOLERANCE_KIB: u64 = 2 * 1024;

    let server = Server::start(&[]);
    let addr = server.addr;
    let mut warm = None;
    let mut rss = Vec::new();
    for round in 1..=ROUNDS {
        let started = Instant::now();
        for batch in 0..PER_ROUND / PARALLEL {
            let mut tasks = tokio::task::JoinSet::new();
            for k in 0..PARALLEL {
                let n = batch * PARALLEL + k;
                // A fresh ID every cycle: a registry that kept dead IDs
                // would grow.
                let id = round * 1_000_000 + n;
                tasks.spawn(cycle(addr, id, n % 2 == 1));
            }
            let all = async {
                while let Some(done) = tasks.join_next().await {
                    done.expect("cycle task");
                }
            };
            tokio::time::timeout(Duration::from_secs(30), all)
                .await
                .expect("a batch of cycles within 30 s");
        }
        wait_until_empty(addr).await;
        let now = server.rss_kib();
        rss.push(now);
        eprintln!(
            "round {round}: {PER_ROUND} cycles in {:?}, VmRSS {now} KiB",
            started.elapsed()
        );
        if round == 2 {
            warm = Some(now);
        }
    }
    let warm = warm.expect("round 2 ran");
    let last = *rss.last().expect("round 8 ran");
    assert!(
        last <= warm + TOLERANCE_KIB,
        "VmRSS grew from {warm} KiB after round 2 to {last} KiB after round {ROUNDS} (all rounds: {rss:?})"
    );

    let state = wait_until_empty(addr).await;
    assert_eq!(state["clients"], serde_json::json!([]), "{state}");
}

#[test]
fn unknown_v1_key_exits_2_naming_it() {
    assert_config_error("[v1]\ninbox_sise = 10\n", &["inbox_sise"]);
    assert_config_error("[v1]\ninbox_ttl = \"soon\"\n", &["inbox_ttl"]);
}

/// A `switchboard.v1` connection to `path` (no hello sent yet).
async fn connect_v1(server: &Server, path: &str) -> support::Client {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
    let mut request = server.ws_url(path).into_client_request().expect("request");
    request.headers_mut().insert(
        "sec-websocket-protocol",
        "switchboard.v1".parse().expect("header value"),
    );
    tokio_tungstenite::connect_async(request)
        .await
        .expect("connect")
        .0
}

#[tokio::test]
async fn the_v1_table_sets_the_hello_deadline() {
    let file = TempFile::config("[v1]\nhello_timeout = \"300ms\"\ninbox_size = 7\n");
    let server = Server::start(&["--config", file.path()]);
    let mut client = connect_v1(&server, "/ws?id=late").await;
    let started = Instant::now();
    let closed = loop {
        match tokio::time::timeout(WAIT, client.next()).await {
            Ok(Some(Ok(WsMessage::Close(frame)))) => break frame,
            Ok(Some(Ok(_))) => continue,
            other => panic!("no close frame: {other:?}"),
        }
    };
    assert_eq!(closed.map(|f| u16::from(f.code)), Some(4400));
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );

    // And the inbox size reaches the welcome.
    let mut client = connect_v1(&server, "/ws?id=on-time").await;
    client
        .send(WsMessage::text(r#"{"type":"hello"}"#))
        .await
        .expect("send hello");
    let welcome = match tokio::time::timeout(WAIT, client.next()).await {
        Ok(Some(Ok(WsMessage::Text(text)))) => text.to_string(),
        other => panic!("no welcome: {other:?}"),
    };
    let welcome: serde_json::Value = serde_json::from_str(&welcome).expect("JSON");
    assert_eq!(welcome["limits"]["inbox_size"], 7, "{welcome}");
}
