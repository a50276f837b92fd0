//! Hot reload: watch the module file and, off the serving path, read, check,
//! compile and publish each new version. A version that fails leaves the last good
//! one serving and is reported once.
//!
//! The parent directory is watched, not the file, so that replace-by-rename,
//! delete-and-recreate and Kubernetes ConfigMap symlink swaps are all seen. Any
//! change starts a short quiet period (the debounce); when it ends the file is read
//! whole and its sha256 compared with the serving module's, so a burst of writes
//! costs one compile and touching the file costs none.

use std::collections::HashSet;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context as _;
use notify::event::{AccessKind, AccessMode};
use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher as _};
use sha2::{Digest, Sha256};

use crate::abi::GuestKind;
use crate::sandbox::{Sandbox, read_module};
use crate::server::Publisher;

/// How long the file must be left alone before it is read: long enough for a
/// `cp` to finish, short enough that a new module serves well within 250 ms.
pub const DEBOUNCE: Duration = Duration::from_millis(50);

enum Signal {
    /// Something changed in a watched directory.
    Changed,
    /// Reload even if the content is unchanged (SIGHUP).
    Force,
    Stop,
}

/// Reloads one module file into one gateway. Stops when dropped.
pub struct Reloader {
    tx: Sender<Signal>,
    thread: Option<JoinHandle<()>>,
}

impl Reloader {
    /// Starts reloading `path` into `publisher`: on every change of the file if
    /// `watch`, and on [`Reloader::force`] either way.
    pub fn start(sandbox: Sandbox, path: PathBuf, publisher: Publisher, watch: bool) -> anyhow::Result<Self> {
        let (tx, rx) = mpsc::channel();
        let watcher = if watch {
            let events = tx.clone();
            let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| match event {
                Ok(event) if is_change(&event.kind) => {
                    let _ = events.send(Signal::Changed);
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "file watching reported an error"),
            })
            .context("cannot start watching files")?;
            Some(watcher)
        } else {
            None
        };
        let mut state = State {
            sandbox,
            path,
            publisher,
            watcher,
            watched: HashSet::new(),
            last_failed: None,
        };
        state.watch_dirs()?;
        let thread = std::thread::Builder::new()
            .name("wasmgate-reload".into())
            .spawn(move || state.run(rx))
            .context("cannot start the reload thread")?;
        Ok(Self {
            tx,
            thread: Some(thread),
        })
    }

    /// Reloads the module now, even if its content has not changed.
    pub fn force(&self) {
        let _ = self.tx.send(Signal::Force);
    }
}

impl Drop for Reloader {
    fn drop(&mut self) {
        let _ = self.tx.send(Signal::Stop);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Whether an event may have changed the file. Opening and reading it (as the
/// reloader itself does) do not; a writer closing it does.
fn is_change(kind: &EventKind) -> bool {
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        _ => true,
    }
}

struct State {
    sandbox: Sandbox,
    path: PathBuf,
    publisher: Publisher,
    watcher: Option<RecommendedWatcher>,
    watched: HashSet<PathBuf>,
    /// The sha256 of the last content that failed, so it is reported once, not on
    /// every event, until the content changes.
    last_failed: Option<[u8; 32]>,
}

impl State {
    fn run(mut self, rx: Receiver<Signal>) {
        loop {
            let mut force = match rx.recv() {
                Ok(Signal::Changed) => false,
                Ok(Signal::Force) => true,
                Ok(Signal::Stop) | Err(_) => return,
            };
            // Wait for a quiet spell so that a file being written is read whole.
            loop {
                match rx.recv_timeout(DEBOUNCE) {
                    Ok(Signal::Changed) => {}
                    Ok(Signal::Force) => force = true,
                    Ok(Signal::Stop) | Err(RecvTimeoutError::Disconnected) => return,
                    Err(RecvTimeoutError::Timeout) => break,
                }
            }
            self.attempt(force);
            if let Err(e) = self.watch_dirs() {
                tracing::warn!(module = %self.path.display(), "{e:#}");
            }
        }
    }

    /// Watches the directory holding the path and, if the path is a symlink to a
    /// file outside it, the directory holding the target too.
    fn watch_dirs(&mut self) -> anyhow::Result<()> {
        let Some(watcher) = self.watcher.as_mut() else {
            return Ok(());
        };
        let dir = parent(&self.path);
        let mut dirs = vec![dir.clone()];
        if let Ok(target) = self.path.canonicalize() {
            let target_dir = parent(&target);
            let inside = dir.canonicalize().is_ok_and(|d| target_dir.starts_with(d));
            if !inside {
                dirs.push(target_dir);
            }
        }
        for d in dirs {
            if !self.watched.contains(&d) {
                watcher
                    .watch(&d, RecursiveMode::NonRecursive)
                    .with_context(|| format!("cannot watch {} for changes", d.display()))?;
                self.watched.insert(d);
            }
        }
        Ok(())
    }

    fn attempt(&mut self, force: bool) {
        let name = self.path.display().to_string();
        let current = self.publisher.current();
        let bytes = match read_module(&self.path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                tracing::warn!(
                    module = %name,
                    serving = current.short_sha256(),
                    "module file is missing; the last good module keeps serving"
                );
                return;
            }
            Err(e) => {
                self.publisher.failed();
                tracing::error!(module = %name, serving = current.short_sha256(), "reload failed: cannot read module {name}: {e}");
                return;
            }
        };
        let sha: [u8; 32] = Sha256::digest(&bytes).into();
        if !force && (sha == current.sha256() || self.last_failed == Some(sha)) {
            tracing::debug!(module = %name, "module content unchanged; nothing to reload");
            return;
        }
        match self.sandbox.load(name.clone(), &bytes) {
            Ok(program) => {
                let sha256 = program.short_sha256();
                let replaced = program.sha256() != current.sha256();
                let compile_ms = program.compile_time().as_secs_f64() * 1e3;
                let abi = program.kind().name();
                let unpooled_wasi = program.kind() == GuestKind::WasiCommand && !self.sandbox.has_instance_pool();
                let previous = self.publisher.publish(program).short_sha256();
                self.last_failed = None;
                tracing::info!(
                    module = %name,
                    abi,
                    sha256,
                    compile_ms = format_args!("{compile_ms:.1}"),
                    replaced,
                    previous,
                    "reloaded"
                );
                if unpooled_wasi {
                    tracing::warn!(
                        module = %name,
                        "this listener started with an ABI v1 module and --isolation reuse, so it has no \
                         instance pool: the WASI command serves, but a fresh instance per datagram costs about \
                         4 times as much (measured 44 µs against 10 µs); restart it, or set isolation fresh"
                    );
                }
            }
            Err(e) => {
                self.publisher.failed();
                self.last_failed = Some(sha);
                tracing::error!(
                    module = %name,
                    serving = current.short_sha256(),
                    "reload failed, the last good module keeps serving: module {name}: {e:#}"
                );
            }
        }
    }
}

fn parent(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use notify::event::{CreateKind, ModifyKind, RemoveKind};

    #[test]
    fn reads_are_not_changes_but_writes_are() {
        assert!(!is_change(&EventKind::Access(AccessKind::Open(AccessMode::Any))));
        assert!(!is_change(&EventKind::Access(AccessKind::Close(AccessMode::Read))));
        assert!(is_change(&EventKind::Access(AccessKind::Close(AccessMode::Write))));
        assert!(is_change(&EventKind::Modify(ModifyKind::Any)));
        assert!(is_change(&EventKind::Create(CreateKind::File)));
        assert!(is_change(&EventKind::Remove(RemoveKind::File)));
    }

    #[test]
    fn a_bare_file_name_lives_in_the_current_directory() {
        assert_eq!(parent(Path::new("guest.wasm")), PathBuf::from("."));
        assert_eq!(parent(Path::new("a/guest.wasm")), PathBuf::from("a"));
    }
}
