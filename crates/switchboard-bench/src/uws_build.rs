//! Builds the `ref-uwebsockets` reference server (C++, in
//! `crates/switchboard-bench/cpp/ref_uwebsockets.cpp`) against the
//! uWebSockets and uSockets sources vendored in the crates.io package
//! `libuwebsockets-sys`.
//!
//! Why this way: uWebSockets is not on crates.io as a Rust library one could
//! depend on without bindgen and libclang, but `libuwebsockets-sys` ships its
//! C++ headers and the uSockets C library (Apache-2.0) in its package.
//! `switchboard-bench` lists that package as a dependency for the target
//! `cfg(any())`, which is never true: Cargo locks and downloads it (`cargo
//! fetch`, or any build) but never compiles it. Its source directory is read
//! from `cargo metadata`, and the server is compiled from there with the
//! system's `cc` and `c++` (overridable with `CC`/`CXX`) into the target
//! directory. Nothing is copied into this repository.
//!
//! Flags: those of uWebSockets' own build for throughput. uSockets' Makefile
//! compiles its C files with `-flto -O3 -DLIBUS_NO_SSL -std=c11` (no TLS:
//! every workload here is plain `ws://`; the epoll event loop is uSockets'
//! default on Linux); uWebSockets' `build.c` compiles its examples with
//! `-march=native -O3 -flto -std=c++20` and links the uSockets objects into
//! them. `-DUWS_NO_ZLIB` (the `WITH_ZLIB=0` of `build.c`) leaves zlib out:
//! permessage-deflate is off in this server and no workload offers it, so
//! zlib is never on a measured path.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::{Context, Result, bail};
use tokio::process::Command;

/// The crates.io package whose source carries uWebSockets.
const SOURCE_PACKAGE: &str = "libuwebsockets-sys";

/// Flags for the uSockets C files (uSockets' Makefile, no SSL).
const C_FLAGS: &[&str] = &["-flto", "-O3", "-DLIBUS_NO_SSL", "-std=c11"];

/// Flags for the server (uWebSockets' `build.c`, without zlib).
const CXX_FLAGS: &[&str] = &[
    "-march=native",
    "-O3",
    "-flto",
    "-std=c++20",
    "-DLIBUS_NO_SSL",
    "-DUWS_NO_ZLIB",
];

/// The server's C++ source in this crate.
pub(crate) fn server_source() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("cpp")
        .join("ref_uwebsockets.cpp")
}

/// The `uWebSockets` directory of the vendored source (it holds `src/` with
/// the headers and `uSockets/` with the C library), found with `cargo
/// metadata` in `workspace` (which downloads the package if it is missing).
pub(crate) async fn locate_source(workspace: &Path) -> Result<PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(&cargo)
        .args(["metadata", "--format-version", "1", "--manifest-path"])
        .arg(workspace.join("Cargo.toml"))
        .output()
        .await
        .context("running cargo metadata")?;
    if !out.status.success() {
        bail!(
            "cargo metadata failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let meta: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("parsing the output of cargo metadata")?;
    let manifest = meta["packages"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["name"] == SOURCE_PACKAGE)
        .and_then(|p| p["manifest_path"].as_str())
        .with_context(|| {
            format!(
                "cargo metadata lists no package {SOURCE_PACKAGE}: is it still a \
                 dependency of switchboard-bench (Cargo.toml, target cfg(any()))?"
            )
        })?;
    let dir = Path::new(manifest)
        .parent()
        .map(|p| p.join("uWebSockets"))
        .with_context(|| format!("no directory above {manifest}"))?;
    for needed in ["src/App.h", "uSockets/src/libusockets.h"] {
        if !dir.join(needed).is_file() {
            bail!("{} has no {needed}", dir.display());
        }
    }
    Ok(dir)
}

/// The C files of uSockets that its Makefile compiles (those of other event
/// loops and of TLS compile to nothing without their defines).
fn usockets_sources(uws: &Path) -> Result<Vec<PathBuf>> {
    let src = uws.join("uSockets").join("src");
    let mut files = Vec::new();
    for dir in [
        src.clone(),
        src.join("eventing"),
        src.join("crypto"),
        src.join("io_uring"),
    ] {
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            // io_uring/ is missing in older uSockets.
            Err(_) if dir != src => continue,
            Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
        };
        for entry in entries {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "c") {
                files.push(path);
            }
        }
    }
    files.sort();
    if files.is_empty() {
        bail!("no C files in {}", src.display());
    }
    Ok(files)
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

async fn compile(cmd: &mut Command, what: &str, log: &Path) -> Result<()> {
    let out = cmd
        .output()
        .await
        .with_context(|| format!("{what}: cannot run the compiler"))?;
    // The compiler's warnings (uWebSockets' headers raise a few under LTO)
    // go to a log instead of the terminal.
    let mut text = out.stdout;
    text.extend_from_slice(&out.stderr);
    let _ = std::fs::write(log, &text);
    if !out.status.success() {
        let tail: Vec<&str> = std::str::from_utf8(&text)
            .unwrap_or("")
            .lines()
            .rev()
            .take(15)
            .collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        bail!("{what} failed ({}):\n{}", out.status, tail.join("\n"));
    }
    Ok(())
}

/// Builds `ref-uwebsockets` at `out` (objects and logs in `work`), unless it
/// is newer than its source and was built from the same uWebSockets
/// directory with the same flags. Returns the uWebSockets directory used.
pub(crate) async fn build(workspace: &Path, out: &Path, work: &Path) -> Result<PathBuf> {
    let uws = locate_source(workspace).await?;
    let source = server_source();
    if !source.is_file() {
        bail!("{} is missing", source.display());
    }
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let stamp_text = format!(
        "{}\n{cc} {}\n{cxx} {}\n",
        uws.display(),
        C_FLAGS.join(" "),
        CXX_FLAGS.join(" ")
    );
    let stamp = work.join("build-stamp");
    let up_to_date = std::fs::read_to_string(&stamp).is_ok_and(|s| s == stamp_text)
        && matches!((modified(out), modified(&source)), (Some(b), Some(s)) if b > s);
    if up_to_date {
        return Ok(uws);
    }
    let objects = work.join("obj");
    std::fs::create_dir_all(&objects).with_context(|| format!("creating {}", objects.display()))?;
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let _ = std::fs::remove_file(&stamp);
    let sources = usockets_sources(&uws)?;
    let usockets_include = uws.join("uSockets").join("src");
    compile(
        Command::new(&cc)
            .args(C_FLAGS)
            .arg("-I")
            .arg(&usockets_include)
            .arg("-c")
            .args(&sources)
            .current_dir(&objects),
        "compiling uSockets",
        &work.join("usockets.log"),
    )
    .await?;
    let object_files: Vec<PathBuf> = sources
        .iter()
        .filter_map(|s| s.file_stem())
        .map(|stem| objects.join(format!("{}.o", stem.to_string_lossy())))
        .collect();
    compile(
        Command::new(&cxx)
            .args(CXX_FLAGS)
            .arg("-I")
            .arg(uws.join("src"))
            .arg("-I")
            .arg(&usockets_include)
            .arg(&source)
            .args(&object_files)
            .arg("-o")
            .arg(out),
        "compiling ref-uwebsockets",
        &work.join("ref-uwebsockets.log"),
    )
    .await?;
    std::fs::write(&stamp, stamp_text).with_context(|| format!("writing {}", stamp.display()))?;
    Ok(uws)
}

/// Options of `build-uws`.
#[derive(clap::Args, Clone, Debug)]
pub(crate) struct BuildArgs {
    /// Where to write the binary (default: `<target>/release/ref-uwebsockets`).
    #[arg(long)]
    pub(crate) out: Option<PathBuf>,
    /// Workspace root (default: where this crate was built from).
    #[arg(long)]
    pub(crate) workspace: Option<PathBuf>,
}

/// What `build-uws` prints as its JSON line.
#[derive(serde::Serialize)]
pub(crate) struct BuildReport {
    /// The binary.
    pub(crate) binary: PathBuf,
    /// The uWebSockets source directory it was built from.
    pub(crate) uwebsockets_source: PathBuf,
}

/// The workspace root this crate was built in.
pub(crate) fn default_workspace() -> Result<PathBuf> {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .context("cannot derive the workspace root; pass --workspace")
}

/// The target directory (`CARGO_TARGET_DIR`, relative to the workspace, or
/// `<workspace>/target`).
pub(crate) fn target_dir(workspace: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|p| {
            if p.is_absolute() {
                p
            } else {
                workspace.join(p)
            }
        })
        .unwrap_or_else(|| workspace.join("target"))
}

/// Where `compare` keeps the objects and compiler logs of the build.
pub(crate) fn work_dir(target: &Path) -> PathBuf {
    target.join("switchboard-bench").join("uws-build")
}

/// `build-uws`: builds the server and says where it is.
pub(crate) async fn run(args: &BuildArgs) -> Result<BuildReport> {
    let workspace = match &args.workspace {
        Some(w) => w.clone(),
        None => default_workspace()?,
    };
    let target = target_dir(&workspace);
    let binary = args
        .out
        .clone()
        .unwrap_or_else(|| target.join("release").join("ref-uwebsockets"));
    let work = match &args.out {
        // A separate work directory per output, so concurrent builds (tests)
        // never share object files.
        Some(out) => {
            let name = out
                .file_name()
                .map_or_else(|| "out".to_string(), |n| n.to_string_lossy().into_owned());
            out.parent()
                .unwrap_or(Path::new("."))
                .join(format!("{name}.build"))
        }
        None => work_dir(&target),
    };
    let uwebsockets_source = build(&workspace, &binary, &work).await?;
    println!(
        "built {} from {}",
        binary.display(),
        uwebsockets_source.display()
    );
    Ok(BuildReport {
        binary,
        uwebsockets_source,
    })
}
