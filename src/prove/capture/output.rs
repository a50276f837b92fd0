//! Output files that hold clients' payloads (`--record`, `--shadow-mismatches`),
//! made so that another user of the host cannot redirect them: a planted
//! symbolic link at the file's name (or at a temporary name beside it) must not
//! make a gateway running as root overwrite a file of its choosing, nor put
//! client data in a file that user can read.
//!
//! Each file is written under a random name in the target's own directory,
//! created exclusively without following links (`O_CREAT | O_EXCL |
//! O_NOFOLLOW`, mode 0600), then renamed over the target: a rename replaces a
//! link at the target's name, never what it points to. A directory that others
//! may write without the sticky bit is refused (anyone could swap the file
//! after the rename), and so is a target that is not a regular file of this
//! user.

use std::fs::{File, OpenOptions};
use std::io::Read as _;
use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};

/// A private file written beside its target, not yet in its place.
pub(crate) struct Pending {
    pub(crate) file: File,
    temporary: PathBuf,
}

impl Pending {
    /// Puts the file in `target`'s place, atomically.
    pub(crate) fn publish(self, target: &Path) -> anyhow::Result<File> {
        if let Err(e) = std::fs::rename(&self.temporary, target) {
            let _ = std::fs::remove_file(&self.temporary);
            return Err(e).context("cannot move the new file into place");
        }
        Ok(self.file)
    }
}

impl Pending {
    /// Removes the temporary file when it was never published.
    pub(crate) fn discard(self) {
        let _ = std::fs::remove_file(&self.temporary);
    }
}

/// A new file, readable and writable by this user only, for `target`.
pub(crate) fn beside(target: &Path) -> anyhow::Result<Pending> {
    let name = target
        .file_name()
        .with_context(|| format!("{} names no file", target.display()))?;
    let dir = match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    check_dir(dir)?;
    check_target(target)?;
    let mut random = [0u8; 8];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut random))
        .context("cannot read /dev/urandom")?;
    let suffix: String = random.iter().map(|b| format!("{b:02x}")).collect();
    let mut temporary_name = std::ffi::OsString::from(".");
    temporary_name.push(name);
    temporary_name.push(format!(".{suffix}.tmp"));
    let temporary = dir.join(temporary_name);
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&temporary)
        .with_context(|| format!("cannot create {}", temporary.display()))?;
    Ok(Pending { file, temporary })
}

/// A new file in `target`'s place at once (for a file written as it goes).
pub(crate) fn create(target: &Path) -> anyhow::Result<File> {
    beside(target)?.publish(target)
}

fn check_dir(dir: &Path) -> anyhow::Result<()> {
    let meta = std::fs::metadata(dir).with_context(|| format!("cannot use the directory {}", dir.display()))?;
    if !meta.is_dir() {
        bail!("{} is not a directory", dir.display());
    }
    let mode = meta.mode();
    if mode & 0o002 != 0 && mode & 0o1000 == 0 {
        bail!(
            "the directory {} may be written by any user and has no sticky bit: another user could replace the file",
            dir.display()
        );
    }
    Ok(())
}

fn check_target(target: &Path) -> anyhow::Result<()> {
    let meta = match std::fs::symlink_metadata(target) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("cannot look at {}", target.display())),
    };
    if !meta.file_type().is_file() {
        bail!(
            "{} exists and is not a regular file (a link, a directory, a device?)",
            target.display()
        );
    }
    // SAFETY: geteuid has no preconditions.
    if meta.uid() != unsafe { libc::geteuid() } {
        bail!("{} belongs to another user", target.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    #[test]
    fn a_link_planted_at_the_target_is_refused_and_its_target_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let target = dir.path().join("record.pcapng");
        std::os::unix::fs::symlink(&victim, &target).unwrap();
        let err = create(&target).expect_err("refused");
        assert!(format!("{err:#}").contains("not a regular file"), "{err:#}");
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    }

    #[test]
    fn a_link_planted_at_the_old_temporary_name_is_never_followed() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let target = dir.path().join("mismatches.pcapng");
        std::os::unix::fs::symlink(&victim, dir.path().join("mismatches.pcapng.tmp")).unwrap();
        let pending = beside(&target).unwrap();
        let mut file = pending.publish(&target).unwrap();
        file.write_all(b"payloads").unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        assert_eq!(std::fs::read(&target).unwrap(), b"payloads");
        let meta = std::fs::symlink_metadata(&target).unwrap();
        assert!(meta.file_type().is_file());
        assert_eq!(meta.mode() & 0o777, 0o600, "readable by this user only");
    }

    #[test]
    fn a_directory_others_may_write_needs_the_sticky_bit() {
        let dir = tempfile::tempdir().unwrap();
        let open = dir.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = create(&open.join("f")).expect_err("refused");
        assert!(format!("{err:#}").contains("no sticky bit"), "{err:#}");
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o1777)).unwrap();
        create(&open.join("f")).unwrap();
    }

    #[test]
    fn an_existing_file_of_this_user_is_replaced_not_written_through() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("old");
        std::fs::write(&target, b"old contents").unwrap();
        let hard = dir.path().join("hard link");
        std::fs::hard_link(&target, &hard).unwrap();
        let mut file = create(&target).unwrap();
        file.write_all(b"new").unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"new");
        // A hard link to the old file keeps the old contents: nothing was
        // written through the name.
        assert_eq!(std::fs::read(&hard).unwrap(), b"old contents");
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(left.len(), 2, "no temporary file is left behind");
    }
}
