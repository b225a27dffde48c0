//! Dev mode's signing secret: generated once and kept in the data folder, so restarting
//! `make run` keeps browser sessions valid.

use std::{io, path::Path};

use rand::{Rng, distr::Alphanumeric};

use crate::owner_only;

/// File name of the generated secret inside the data folder.
pub const SECRET_FILE: &str = "dev-jwt-secret";
const SECRET_LEN: usize = 48;

/// Reads the dev secret from `data_dir`, creating it (readable by the owner only) if missing.
///
/// # Errors
/// When the folder or file cannot be read or written.
pub fn load_or_create_secret(data_dir: &Path) -> io::Result<String> {
    let path = data_dir.join(SECRET_FILE);
    match std::fs::read_to_string(&path) {
        Ok(secret) if secret.trim().len() >= 32 => return Ok(secret.trim().to_owned()),
        Ok(_) => tracing::warn!(path = %path.display(), "dev secret too short; replacing it"),
        Err(err) if err.kind() == io::ErrorKind::NotFound => {}
        Err(err) => return Err(err),
    }
    owner_only::create_dir(data_dir)?;
    let secret: String = rand::rng()
        .sample_iter(Alphanumeric)
        .take(SECRET_LEN)
        .map(char::from)
        .collect();
    owner_only::write(&path, &secret)?;
    tracing::info!(path = %path.display(), "generated a dev JWT secret");
    Ok(secret)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The secret is created once and read back unchanged on the next start.
    #[test]
    fn secret_survives_restart() {
        let dir = tempfile::tempdir().expect("temp dir");
        let first = load_or_create_secret(&dir.path().join("nested")).expect("created");
        assert_eq!(first.len(), SECRET_LEN);
        let second = load_or_create_secret(&dir.path().join("nested")).expect("read");
        assert_eq!(first, second);
    }
}
