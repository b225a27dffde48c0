//! Local state only the server's own user may read (SPEC §10): the data folder, the SQLite
//! files and the dev secret. Created owner-only rather than fixed afterwards, so there is no
//! moment at which another user could open them.

use std::{
    fs::{DirBuilder, OpenOptions},
    io::{self, Write},
    os::unix::fs::{DirBuilderExt, OpenOptionsExt},
    path::Path,
};

/// Creates `dir` and any missing parents as `rwx------`; folders that exist keep their mode.
///
/// # Errors
/// When a folder cannot be created.
pub fn create_dir(dir: &Path) -> io::Result<()> {
    DirBuilder::new().recursive(true).mode(0o700).create(dir)
}

/// Creates `path` empty as `rw-------` unless it exists. SQLite then gives its `-wal` and
/// `-shm` files the same mode.
///
/// # Errors
/// When the file cannot be created.
pub fn touch(path: &Path) -> io::Result<()> {
    OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)
        .map(drop)
}

/// Writes `contents` to `path`, created as `rw-------`.
///
/// # Errors
/// When the file cannot be written.
pub fn write(path: &Path, contents: &str) -> io::Result<()> {
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?
        .write_all(contents.as_bytes())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path)
            .expect("exists")
            .permissions()
            .mode()
            & 0o777
    }

    /// New folders and files are the owner's alone; an existing file keeps its contents.
    #[test]
    fn created_owner_only() {
        let root = tempfile::tempdir().expect("temp dir");
        let dir = root.path().join("a/b");
        create_dir(&dir).expect("created");
        assert_eq!(mode(&root.path().join("a")), 0o700);
        assert_eq!(mode(&dir), 0o700);
        let file = dir.join("db.sqlite");
        write(&file, "kept").expect("written");
        assert_eq!(mode(&file), 0o600);
        touch(&file).expect("touched");
        assert_eq!(std::fs::read_to_string(&file).expect("read"), "kept");
        touch(&dir.join("new")).expect("created");
        assert_eq!(mode(&dir.join("new")), 0o600);
    }
}
