//! The compile cache: compiled modules kept on disk so that a restart with the
//! same module skips the compile. A cached artifact is machine code that
//! deserializing will run, so it is trusted only when authenticated: each entry
//! carries an HMAC-SHA256, under a key kept outside the cache directory, of the
//! engine's settings, the module's digest and the artifact. An entry that fails
//! the check, is not a regular file of ours, or cannot be read costs a recompile,
//! never a failure and never a wait (entries are opened without blocking).
//!
//! The directory must be this user's and not writable by group or others, and
//! so must the key; otherwise the cache is not used, with a warning.

use std::fs::{DirBuilder, File, OpenOptions};
use std::hash::{Hash as _, Hasher};
use std::io::{self, Read as _, Write as _};
use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use hmac::{Hmac, Mac as _};
use sha2::{Digest as _, Sha256};
use wasmtime::Engine;

/// What an entry starts with; a new layout gets a new one.
const MAGIC: &[u8; 8] = b"wgcache1";

/// Bytes of the HMAC-SHA256 tag after the magic.
const TAG: usize = 32;

/// Bytes of key.
const KEY: usize = 32;

/// The largest entry read: a compiled 64 MiB module stays well under this.
const MAX_ENTRY_BYTES: u64 = 1 << 30;

/// An open, checked cache directory and its key.
#[derive(Clone)]
pub struct Cache {
    dir: PathBuf,
    key: [u8; KEY],
}

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache").field("dir", &self.dir).finish_non_exhaustive()
    }
}

/// What looking a module up found.
#[derive(Debug)]
pub enum Lookup {
    /// An authenticated artifact.
    Hit(Vec<u8>),
    /// No entry.
    Miss,
    /// An entry that cannot be trusted or read, and why; it will be replaced.
    Rejected(String),
}

impl Cache {
    /// Opens the cache at `dir` (created, mode 0700, if missing) with the key at
    /// `key_file` (created, mode 0600, if missing). Refuses, saying why, a
    /// directory or key that is not this user's or that others may write, and a
    /// key inside the directory.
    pub fn open(dir: &Path, key_file: &Path) -> anyhow::Result<Self> {
        if key_file.starts_with(dir) {
            bail!(
                "its key {} is inside it: keep the key outside the cache directory (--cache-key)",
                key_file.display()
            );
        }
        private_dir(dir)?;
        let key = read_or_create_key(key_file)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            key,
        })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The entry of `wasm` compiled for `engine`, if it is there and authentic.
    pub fn get(&self, engine: &Engine, wasm: &[u8]) -> Lookup {
        let (path, id) = self.entry(engine, wasm);
        let mut file = match open_entry(&path) {
            Ok(Some(file)) => file,
            Ok(None) => return Lookup::Miss,
            Err(why) => return Lookup::Rejected(why),
        };
        let mut bytes = Vec::new();
        if let Err(e) = (&mut file).take(MAX_ENTRY_BYTES).read_to_end(&mut bytes) {
            return Lookup::Rejected(format!("cannot be read: {e}"));
        }
        let Some(rest) = bytes.strip_prefix(MAGIC) else {
            return Lookup::Rejected("is not a wasmgate cache entry".into());
        };
        if rest.len() < TAG {
            return Lookup::Rejected("is truncated".into());
        }
        let (tag, artifact) = rest.split_at(TAG);
        if self.mac(&id, artifact).verify_slice(tag).is_err() {
            return Lookup::Rejected(
                "failed authentication (changed since it was written, or written by someone else)".into(),
            );
        }
        Lookup::Hit(artifact.to_vec())
    }

    /// Stores `artifact`, what `wasm` compiled to for `engine`: written beside
    /// the entry and renamed over it, so that a reader never sees half of it.
    pub fn put(&self, engine: &Engine, wasm: &[u8], artifact: &[u8]) -> anyhow::Result<()> {
        let (path, id) = self.entry(engine, wasm);
        let folder = path.parent().unwrap_or(&self.dir);
        private_dir(folder)?;
        let tag = self.mac(&id, artifact).finalize().into_bytes();
        let temp = folder.join(format!(".tmp-{}-{}", std::process::id(), hex(&random_bytes::<8>()?)));
        let written = (|| -> io::Result<()> {
            let mut file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&temp)?;
            file.write_all(MAGIC)?;
            file.write_all(&tag)?;
            file.write_all(artifact)?;
            std::fs::rename(&temp, &path)
        })();
        if let Err(e) = written {
            let _ = std::fs::remove_file(&temp);
            return Err(e).with_context(|| format!("cannot write {}", path.display()));
        }
        Ok(())
    }

    /// Where `wasm`'s entry for `engine` lives, and what the tag covers besides
    /// the artifact: the engine's compatibility hash and the module's digest.
    fn entry(&self, engine: &Engine, wasm: &[u8]) -> (PathBuf, [u8; 64]) {
        let mut hasher = ShaHasher(Sha256::new());
        engine.precompile_compatibility_hash().hash(&mut hasher);
        let engine_id: [u8; 32] = hasher.0.finalize().into();
        let module_id: [u8; 32] = Sha256::digest(wasm).into();
        let path = self
            .dir
            .join("modules")
            .join(hex(&engine_id[..8]))
            .join(hex(&module_id));
        let mut id = [0; 64];
        id[..32].copy_from_slice(&engine_id);
        id[32..].copy_from_slice(&module_id);
        (path, id)
    }

    fn mac(&self, id: &[u8; 64], artifact: &[u8]) -> Hmac<Sha256> {
        let mut mac = <Hmac<Sha256> as hmac::Mac>::new_from_slice(&self.key).expect("HMAC takes a key of any length");
        mac.update(MAGIC);
        mac.update(id);
        mac.update(artifact);
        mac
    }
}

/// Feeds what `Hash` writes into SHA-256, for a digest that is the same in every
/// process (std's hashers promise no such thing).
struct ShaHasher(Sha256);

impl Hasher for ShaHasher {
    fn finish(&self) -> u64 {
        let digest = self.0.clone().finalize();
        u64::from_le_bytes(digest[..8].try_into().unwrap_or_default())
    }

    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
}

/// Creates `dir` (mode 0700) if needed and refuses it unless it is a directory
/// owned by this user that group and others cannot write.
fn private_dir(dir: &Path) -> anyhow::Result<()> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    let meta = std::fs::metadata(dir).with_context(|| format!("cannot read {}", dir.display()))?;
    check_private(dir, &meta, "directory")?;
    if !meta.is_dir() {
        bail!("{} is not a directory", dir.display());
    }
    Ok(())
}

/// Refuses what this user does not own or what group and others may write.
fn check_private(path: &Path, meta: &std::fs::Metadata, what: &str) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me {
        bail!(
            "the {what} {} belongs to user {}, not to this user ({me})",
            path.display(),
            meta.uid()
        );
    }
    if meta.mode() & 0o022 != 0 {
        bail!(
            "the {what} {} is writable by {} (mode {:o}): make it private (chmod go-w)",
            path.display(),
            if meta.mode() & 0o002 != 0 {
                "anyone"
            } else {
                "its group"
            },
            meta.mode() & 0o7777
        );
    }
    Ok(())
}

/// Opens an entry without following a symlink and without blocking (a FIFO
/// would otherwise wait for a writer); `None` when there is none.
fn open_entry(path: &Path) -> Result<Option<File>, String> {
    let file = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
    {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot be opened: {e}")),
    };
    let meta = file.metadata().map_err(|e| format!("cannot be read: {e}"))?;
    if !meta.file_type().is_file() {
        return Err("is not a regular file".into());
    }
    check_private(path, &meta, "entry").map_err(|e| format!("{e:#}"))?;
    if meta.len() > MAX_ENTRY_BYTES {
        return Err(format!("is over {MAX_ENTRY_BYTES} bytes"));
    }
    Ok(Some(file))
}

/// The key at `path`, made (32 random bytes, mode 0600, its folder 0700) when
/// there is none; refused when it is not private or not a key.
fn read_or_create_key(path: &Path) -> anyhow::Result<[u8; KEY]> {
    if let Some(folder) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(folder)
            .with_context(|| format!("cannot create {}", folder.display()))?;
    }
    match OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
    {
        Ok(mut file) => {
            let key = random_bytes::<KEY>()?;
            file.write_all(&key)
                .with_context(|| format!("cannot write the cache key {}", path.display()))?;
            return Ok(key);
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e).with_context(|| format!("cannot create the cache key {}", path.display())),
    }
    let mut file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .with_context(|| format!("cannot open the cache key {}", path.display()))?;
    let meta = file.metadata()?;
    if !meta.file_type().is_file() {
        bail!("the cache key {} is not a regular file", path.display());
    }
    check_private(path, &meta, "cache key")?;
    if meta.mode() & 0o044 != 0 {
        bail!(
            "the cache key {} is readable by others (mode {:o}): chmod 600 it",
            path.display(),
            meta.mode() & 0o7777
        );
    }
    let mut key = [0; KEY];
    let mut extra = [0; 1];
    file.read_exact(&mut key)
        .with_context(|| format!("the cache key {} is shorter than {KEY} bytes", path.display()))?;
    if file.read(&mut extra)? != 0 {
        bail!("the cache key {} is longer than {KEY} bytes", path.display());
    }
    Ok(key)
}

fn random_bytes<const N: usize>() -> anyhow::Result<[u8; N]> {
    let mut bytes = [0; N];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .context("cannot read /dev/urandom")?;
    Ok(bytes)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    fn engine() -> Engine {
        Engine::default()
    }

    fn cache(root: &Path) -> Cache {
        Cache::open(&root.join("cache"), &root.join("state").join("cache.key")).unwrap()
    }

    fn entry_path(c: &Cache, wasm: &[u8]) -> PathBuf {
        c.entry(&engine(), wasm).0
    }

    #[test]
    fn an_entry_is_found_only_when_its_tag_checks_out() {
        let root = tempfile::tempdir().unwrap();
        let c = cache(root.path());
        let engine = engine();
        assert!(matches!(c.get(&engine, b"module"), Lookup::Miss));
        c.put(&engine, b"module", b"machine code").unwrap();
        assert!(matches!(c.get(&engine, b"module"), Lookup::Hit(a) if a == b"machine code"));
        // Another module's lookup does not find it.
        assert!(matches!(c.get(&engine, b"other"), Lookup::Miss));

        // One byte of the artifact changed: refused.
        let path = entry_path(&c, b"module");
        let mut bytes = std::fs::read(&path).unwrap();
        *bytes.last_mut().unwrap() ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        assert!(matches!(c.get(&engine, b"module"), Lookup::Rejected(why) if why.contains("authentication")));

        // An entry made with another key (another gateway's, or an attacker's): refused.
        let other = Cache::open(&root.path().join("cache"), &root.path().join("other.key")).unwrap();
        other.put(&engine, b"module", b"evil code").unwrap();
        assert!(matches!(c.get(&engine, b"module"), Lookup::Rejected(_)));
        assert!(matches!(other.get(&engine, b"module"), Lookup::Hit(_)));

        // Truncated, or not an entry at all.
        std::fs::write(&path, b"wgcache1short").unwrap();
        assert!(matches!(c.get(&engine, b"module"), Lookup::Rejected(why) if why.contains("truncated")));
        std::fs::write(&path, b"\x7fELF").unwrap();
        assert!(matches!(c.get(&engine, b"module"), Lookup::Rejected(_)));
    }

    #[test]
    fn a_fifo_or_a_symlink_as_an_entry_is_skipped_without_blocking_and_replaced() {
        let root = tempfile::tempdir().unwrap();
        let c = cache(root.path());
        let engine = engine();
        c.put(&engine, b"module", b"code").unwrap();
        let path = entry_path(&c, b"module");
        std::fs::remove_file(&path).unwrap();
        let fifo = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
        // SAFETY: a valid C string.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        assert!(matches!(c.get(&engine, b"module"), Lookup::Rejected(why) if why.contains("regular")));
        c.put(&engine, b"module", b"code").unwrap();
        assert!(matches!(c.get(&engine, b"module"), Lookup::Hit(_)));
        std::fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink("/dev/zero", &path).unwrap();
        assert!(matches!(c.get(&engine, b"module"), Lookup::Rejected(_)));
    }

    #[test]
    fn a_directory_others_may_write_or_a_key_inside_it_or_readable_is_refused() {
        let root = tempfile::tempdir().unwrap();
        let open = root.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let key = root.path().join("k");
        let err = format!("{:#}", Cache::open(&open, &key).unwrap_err());
        assert!(err.contains("writable by anyone (mode 777)"), "{err}");
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o770)).unwrap();
        let err = format!("{:#}", Cache::open(&open, &key).unwrap_err());
        assert!(err.contains("writable by its group"), "{err}");
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o700)).unwrap();
        let err = format!("{:#}", Cache::open(&open, &open.join("key")).unwrap_err());
        assert!(err.contains("inside it"), "{err}");
        Cache::open(&open, &key).unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = format!("{:#}", Cache::open(&open, &key).unwrap_err());
        assert!(err.contains("readable by others"), "{err}");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(&key, b"short").unwrap();
        let err = format!("{:#}", Cache::open(&open, &key).unwrap_err());
        assert!(err.contains("shorter"), "{err}");
        // A new directory is made private.
        let fresh = root.path().join("a").join("b");
        Cache::open(&fresh, &key.with_file_name("k2")).unwrap();
        assert_eq!(std::fs::metadata(&fresh).unwrap().mode() & 0o777, 0o700);
    }
}
