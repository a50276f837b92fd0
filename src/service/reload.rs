//! Hot reload: watch the module file and, off the serving path, read, check,
//! compile and publish each new version. A version that fails leaves the last good
//! one serving and is reported once.
//!
//! The parent directory is watched, not the file, so that replace-by-rename,
//! delete-and-recreate and Kubernetes ConfigMap symlink swaps are all seen; events
//! about other files in it are ignored. A change of the module starts a short quiet
//! period (the debounce); when it ends the file's identity (inode, size, times) is
//! compared with what was last read, and only then is it read whole and its sha256
//! compared with the serving module's, so a burst of writes costs one compile and
//! touching the file costs none. A failing state (missing, not a regular file,
//! unreadable, refused) is reported once, until it changes.

use std::collections::HashSet;
use std::ffi::OsString;
use std::io;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::time::Duration;

use anyhow::Context as _;
use notify::event::{AccessKind, AccessMode};
use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher as _};
use sha2::{Digest, Sha256};

use crate::engine::read_module;
use crate::gateway::Publisher;
use crate::guest::{Env, short_hex};
/// Which of a listener's modules a reloader keeps current.
pub use crate::metrics::guest::Role;

/// How long the file must be left alone before it is read: long enough for a
/// `cp` to finish, short enough that a new module serves well within 250 ms.
pub const DEBOUNCE: Duration = Duration::from_millis(50);

/// How long dropping a [`Reloader`] waits for a reload in progress (a compile
/// can take seconds) before leaving it behind: shutdown must stay prompt.
const STOP_WAIT: Duration = Duration::from_millis(200);

enum Signal {
    /// Something changed in a watched directory: these paths (none if unknown).
    Changed(Vec<PathBuf>),
    /// Reload even if the content is unchanged (SIGHUP).
    Force,
    Stop,
}

/// Reloads one module file into one gateway. Stops when dropped.
pub struct Reloader {
    tx: Sender<Signal>,
    /// Set when the reloader is dropped: a reload finishing after that is not published.
    stopped: Arc<AtomicBool>,
    /// Closed (its sender dropped) when the reload thread ends.
    done: Receiver<()>,
}

impl Reloader {
    /// Starts reloading `path` into `publisher`: on every change of the file if
    /// `watch`, and on [`Reloader::force`] either way.
    pub fn start(env: Env, path: PathBuf, publisher: Publisher, watch: bool) -> anyhow::Result<Self> {
        Self::start_as(Role::Active, env, path, publisher, watch)
    }

    /// Like [`Reloader::start`], for the module of `role`.
    pub fn start_as(role: Role, env: Env, path: PathBuf, publisher: Publisher, watch: bool) -> anyhow::Result<Self> {
        let (tx, rx) = mpsc::channel();
        let watcher = if watch {
            let events = tx.clone();
            let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| match event {
                Ok(event) if is_change(&event.kind) => {
                    let _ = events.send(Signal::Changed(event.paths));
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "file watching reported an error"),
            })
            .context("cannot start watching files")?;
            Some(watcher)
        } else {
            None
        };
        let stopped = Arc::new(AtomicBool::new(false));
        let mut state = State {
            env,
            path,
            publisher,
            role,
            watcher,
            watched: HashSet::new(),
            names: HashSet::new(),
            last_read: None,
            last_problem: None,
            failed_sha: None,
            stopped: Arc::clone(&stopped),
        };
        state.watch_dirs()?;
        let (done_tx, done) = mpsc::channel::<()>();
        std::thread::Builder::new()
            .name("wasmgate-reload".into())
            .spawn(move || {
                let _done = done_tx;
                state.run(rx);
            })
            .context("cannot start the reload thread")?;
        Ok(Self { tx, stopped, done })
    }

    /// Stops reloading: nothing is published from now on. Dropping it also waits,
    /// briefly, for the thread; stopping several first lets them end together.
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::Relaxed);
        let _ = self.tx.send(Signal::Stop);
    }

    /// Reloads the module now, even if its content has not changed.
    pub fn force(&self) {
        let _ = self.tx.send(Signal::Force);
    }
}

impl Drop for Reloader {
    /// Stops reloading. A reload in progress is waited for briefly, then left to
    /// finish unpublished: the thread holds nothing that needs an orderly end.
    fn drop(&mut self) {
        self.stop();
        if let Err(RecvTimeoutError::Timeout) = self.done.recv_timeout(STOP_WAIT) {
            tracing::debug!("a reload was in progress at shutdown; it will not be published");
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
    env: Env,
    path: PathBuf,
    publisher: Publisher,
    role: Role,
    watcher: Option<RecommendedWatcher>,
    watched: HashSet<PathBuf>,
    /// The file names in the watched directories whose changes concern the module:
    /// its own, and those its symlinks pass through (Kubernetes' `..data`).
    names: HashSet<OsString>,
    /// The identity of the file when it was last read, so that an event that did not
    /// change it costs a `stat`, not a read and a hash.
    last_read: Option<Identity>,
    /// The last problem reported, so that a failing state is reported once.
    last_problem: Option<String>,
    /// The sha256 of the last content that failed to load, so that it is not
    /// compiled again until it changes (or a reload is forced).
    failed_sha: Option<[u8; 32]>,
    stopped: Arc<AtomicBool>,
}

/// What tells one version of a file from another without reading it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Identity {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Identity {
    fn of(meta: &std::fs::Metadata) -> Self {
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
            len: meta.len(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }
    }
}

impl State {
    fn run(mut self, rx: Receiver<Signal>) {
        loop {
            let mut force = match rx.recv() {
                Ok(Signal::Changed(paths)) if self.concerns(&paths) => false,
                Ok(Signal::Changed(_)) => continue,
                Ok(Signal::Force) => true,
                Ok(Signal::Stop) | Err(_) => return,
            };
            // Wait for a quiet spell so that a file being written is read whole.
            loop {
                match rx.recv_timeout(DEBOUNCE) {
                    Ok(Signal::Changed(_)) => {}
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

    /// Whether an event about `paths` may concern the module; an event that names
    /// no path might.
    fn concerns(&self, paths: &[PathBuf]) -> bool {
        paths.is_empty()
            || paths
                .iter()
                .any(|p| p.file_name().is_some_and(|n| self.names.contains(n)))
    }

    /// Watches the directory holding the path and, if the path is a symlink to a
    /// file outside it, the directory holding the target too; and notes which
    /// names in them concern the module.
    fn watch_dirs(&mut self) -> anyhow::Result<()> {
        let dir = parent(&self.path);
        let mut dirs = vec![dir.clone()];
        self.names.clear();
        self.names.extend(self.path.file_name().map(OsString::from));
        if let Ok(link) = std::fs::read_link(&self.path)
            && let Some(Component::Normal(first)) = link.components().next()
        {
            // `..data/module.wasm`: a swap of `..data` replaces the module.
            self.names.insert(first.to_os_string());
        }
        if let Ok(target) = self.path.canonicalize() {
            self.names.extend(target.file_name().map(OsString::from));
            let target_dir = parent(&target);
            let inside = dir.canonicalize().is_ok_and(|d| target_dir.starts_with(d));
            if !inside {
                dirs.push(target_dir);
            }
        }
        let Some(watcher) = self.watcher.as_mut() else {
            return Ok(());
        };
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

    /// Reports a failing state once: at error level (warning for a missing file)
    /// the first time, at debug level while it stays the same. A forced reload
    /// reports it again.
    fn problem(&mut self, force: bool, missing: bool, message: String) {
        if !force && self.last_problem.as_ref() == Some(&message) {
            tracing::debug!(module = %self.path.display(), "still failing: {message}");
            return;
        }
        let serving = self.serving().map_or_else(|| "none".to_string(), |p| p.short_sha256());
        let module = self.path.display().to_string();
        if missing {
            tracing::warn!(module, serving, "{message}");
        } else {
            self.publisher.failed();
            tracing::error!(module, serving, "{message}");
        }
        self.last_problem = Some(message);
    }

    fn attempt(&mut self, force: bool) {
        let name = self.path.display().to_string();
        let identity = std::fs::metadata(&self.path).ok().map(|m| Identity::of(&m));
        if !force && identity.is_some() && identity == self.last_read {
            tracing::debug!(module = %name, "module file unchanged; nothing to reload");
            return;
        }
        let bytes = match read_module(&self.path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                self.last_read = None;
                self.problem(
                    force,
                    true,
                    "module file is missing; the last good module keeps serving".into(),
                );
                return;
            }
            Err(e) => {
                self.last_read = None;
                self.problem(
                    force,
                    false,
                    format!("reload failed, the last good module keeps serving: cannot read module {name}: {e}"),
                );
                return;
            }
        };
        self.last_read = identity;
        let current = self.serving().map(|p| p.sha256());
        let sha: [u8; 32] = Sha256::digest(&bytes).into();
        if !force && self.failed_sha == Some(sha) {
            tracing::debug!(module = %name, "module content is the version that failed; nothing to reload");
            return;
        }
        if !force && Some(sha) == current {
            tracing::debug!(module = %name, "module content unchanged; nothing to reload");
            self.last_problem = None;
            return;
        }
        match self.env.load(name.clone(), &bytes) {
            Ok(program) if self.stopped.load(Ordering::Relaxed) => {
                tracing::debug!(module = %name, sha256 = program.short_sha256(), "loaded after shutdown began; not published");
            }
            Ok(program) => {
                let sha256 = program.short_sha256();
                let replaced = Some(program.sha256()) != current;
                let compile_ms = program.compile_time().as_secs_f64() * 1e3;
                let abi = program.kind().name();
                let unpooled_wasi = program.instance_per_call() && !self.env.has_instance_pool();
                let previous = match self.role {
                    Role::Active => self.publisher.publish(program).short_sha256(),
                    Role::Candidate => match self.publisher.publish_candidate(program) {
                        Ok(previous) => previous.map_or_else(|| "none".to_string(), |p| p.short_sha256()),
                        Err(e) => {
                            tracing::error!(candidate = %name, "cannot load the candidate: {e:#}");
                            return;
                        }
                    },
                };
                self.last_problem = None;
                self.failed_sha = None;
                tracing::info!(
                    module = %name,
                    abi,
                    sha256,
                    compile_ms = format_args!("{compile_ms:.1}"),
                    replaced,
                    previous,
                    role = self.role.as_str(),
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
                self.failed_sha = Some(sha);
                self.problem(
                    force,
                    false,
                    // The sha256 makes each new failing version a new state, reported once.
                    format!(
                        "reload failed, the last good module keeps serving: module {name} (sha256 {}): {e:#}",
                        short_hex(&sha)
                    ),
                );
            }
        }
    }
}

impl State {
    /// The module of this role serving now (a candidate may be unloaded).
    fn serving(&self) -> Option<Arc<crate::guest::Program>> {
        match self.role {
            Role::Active => Some(self.publisher.current()),
            Role::Candidate => self.publisher.candidate(),
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
