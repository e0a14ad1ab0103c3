//! `--pid-file`: the server's process ID in a file, for
//! `kill -HUP "$(cat /run/switchboard.pid)"` when several servers run on
//! one machine (where `pidof switchboard` names them all).
//!
//! The file is checked before the server binds and written (atomically)
//! once it has; it is removed when the server exits, if it still names
//! this process. An existing file is never overwritten silently:
//! - naming a running process with this program's name: refused (exit
//!   code 2), it is another server using the same file;
//! - naming a process that is gone, or that is another program (the ID was
//!   reused after a crash): replaced, with a warning;
//! - holding anything but a process ID: refused, it may not be a pid file
//!   at all (a mistyped path).

use std::io::ErrorKind;
use std::path::{Path, PathBuf};

/// Why the pid file cannot be used; the binary exits with code 2.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PidFileError {
    #[error(
        "pid file {path} names process {pid}, a running {name}: stop that server first (kill -TERM {pid}), or give this one its own --pid-file"
    )]
    Running {
        path: PathBuf,
        pid: u32,
        name: String,
    },
    #[error(
        "pid file {path} exists but does not hold a process ID (it starts {start:?}): check --pid-file, and remove the file if it is a leftover"
    )]
    NotAPid { path: PathBuf, start: String },
    #[error("cannot read pid file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write pid file {path}: check that its folder exists and is writable")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Checks that `path` may be written: absent, empty, or naming a process
/// that is not another running server.
pub(crate) fn check(path: &Path) -> Result<(), PidFileError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(err) if err.kind() == ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(PidFileError::Read {
                path: path.to_owned(),
                source,
            });
        }
    };
    let text = text.trim();
    if text.is_empty() {
        return Ok(());
    }
    let pid = match text.parse::<u32>() {
        Ok(pid) if pid > 0 => pid,
        _ => {
            return Err(PidFileError::NotAPid {
                path: path.to_owned(),
                start: text.chars().take(20).collect(),
            });
        }
    };
    if pid == std::process::id() {
        return Ok(());
    }
    match process(pid) {
        Process::Gone => tracing::warn!(
            path = %path.display(),
            pid,
            "the pid file names a process that is not running (left by a crash?): replacing it"
        ),
        Process::Other(name) => tracing::warn!(
            path = %path.display(),
            pid,
            name = %name,
            "the pid file names a process that is not a switchboard (its ID was reused?): replacing it"
        ),
        Process::Same(name) => {
            return Err(PidFileError::Running {
                path: path.to_owned(),
                pid,
                name,
            });
        }
    }
    Ok(())
}

/// The pid file, written; removed on drop if it still names this process.
#[derive(Debug)]
pub(crate) struct PidFile {
    path: PathBuf,
    pid: u32,
}

impl PidFile {
    /// Writes this process's ID to `path`, through a temporary file in the
    /// same folder renamed over it, so a reader never sees half a file.
    pub(crate) fn write(path: &Path) -> Result<Self, PidFileError> {
        let pid = std::process::id();
        let mut name = path.file_name().unwrap_or_default().to_owned();
        name.push(format!(".{pid}.tmp"));
        let temporary = path.with_file_name(name);
        let written = std::fs::write(&temporary, format!("{pid}\n"))
            .and_then(|()| std::fs::rename(&temporary, path));
        if let Err(source) = written {
            let _ = std::fs::remove_file(&temporary);
            return Err(PidFileError::Write {
                path: path.to_owned(),
                source,
            });
        }
        tracing::info!(path = %path.display(), pid, "wrote the pid file");
        Ok(Self {
            path: path.to_owned(),
            pid,
        })
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        // Another server may have replaced it (after this one was reported
        // gone): its file is not ours to remove.
        let ours = std::fs::read_to_string(&self.path)
            .is_ok_and(|text| text.trim().parse() == Ok(self.pid));
        if ours && let Err(err) = std::fs::remove_file(&self.path) {
            tracing::warn!(path = %self.path.display(), %err, "cannot remove the pid file");
        }
    }
}

/// What runs under a process ID, as far as this machine tells.
enum Process {
    Gone,
    /// Running, with this program's name.
    Same(String),
    /// Running, another program.
    Other(String),
}

/// Looks `pid` up in `/proc`. Without `/proc` (not Linux) a process
/// cannot be told apart, so it counts as another server: refusing is
/// safer than overwriting.
fn process(pid: u32) -> Process {
    let ours = std::fs::read_to_string("/proc/self/comm");
    let Ok(ours) = ours else {
        return Process::Same("process (cannot tell which without /proc)".to_owned());
    };
    match std::fs::read_to_string(format!("/proc/{pid}/comm")) {
        Ok(name) if name.trim() == ours.trim() => Process::Same(name.trim().to_owned()),
        Ok(name) => Process::Other(name.trim().to_owned()),
        Err(_) => Process::Gone,
    }
}
