//! `--check-config`: what the start would read, checked without starting. The config
//! itself is already parsed and validated (keys, ranges, dashboard users' hashes); this
//! reads the files it names the way the start does: the TLS certificate, key (and that
//! they belong together) and client CA; each cluster's `ca_file`; and that the SQLite
//! history file is a history this version can use (read only) or can be created. Nothing is bound, nothing is written (the
//! history probe creates and removes a file next to the database only when the database
//! does not exist yet), and a PostgreSQL history is not contacted: at start an
//! unreachable one does not stop the gateway either.

use std::path::{Path, PathBuf};

use crate::config::Config;
use crate::tls::{self, TlsError};

#[derive(Debug, thiserror::Error)]
pub enum PreflightError {
    #[error("{0}")]
    Tls(#[from] TlsError),
    #[error("cluster {code}: {message}")]
    Cluster { code: String, message: String },
    #[error("history.path {path}: {message}")]
    HistoryPath { path: PathBuf, message: String },
    #[error("history.url: {0}")]
    HistoryUrl(String),
}

/// Every check, in the order the start makes them; the first failure is returned.
pub fn check(config: &Config) -> Result<(), PreflightError> {
    if let Some(files) = &config.tls {
        tls::server_config(files)?;
    }
    for cluster in &config.clusters {
        actors::em::client::http_client(&cluster.client_settings()).map_err(|error| {
            PreflightError::Cluster {
                code: cluster.normalized_code(),
                message: error.to_string(),
            }
        })?;
    }
    if config.history.enabled {
        match &config.history.url {
            Some(url) => {
                // Parsed, not connected: the error never quotes the URL (a password).
                history::postgres::PostgresStore::new(url)
                    .map_err(|error| PreflightError::HistoryUrl(error.to_string()))?;
            }
            None => history_file_usable(&config.history.path)?,
        }
    }
    Ok(())
}

/// The SQLite file can be opened for writing, or created in its directory.
fn history_file_usable(path: &Path) -> Result<(), PreflightError> {
    let failed = |message: String| PreflightError::HistoryPath {
        path: path.to_path_buf(),
        message,
    };
    if path.exists() {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map(drop)
            .map_err(|error| failed(error.to_string()))?;
        return history::sqlite::SqliteStore::check_existing(path)
            .map_err(|error| failed(error.to_string()));
    }
    let directory = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !directory.is_dir() {
        return Err(failed(format!(
            "directory {} does not exist",
            directory.display()
        )));
    }
    let probe = directory.join(format!(".business-connector-check-{}", std::process::id()));
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)
        .map_err(|error| {
            failed(format!(
                "cannot create a file in {}: {error}",
                directory.display()
            ))
        })?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_history_file_in_a_missing_directory_is_named() {
        let error = history_file_usable(Path::new("/nonexistent-bc-dir/h.sqlite"))
            .expect_err("no such directory")
            .to_string();
        assert!(
            error.starts_with("history.path /nonexistent-bc-dir/h.sqlite: directory"),
            "{error}"
        );
    }

    #[test]
    fn a_creatable_history_file_is_not_created() {
        let directory = tempfile::tempdir().expect("temp dir");
        let path = directory.path().join("h.sqlite");
        history_file_usable(&path).expect("creatable");
        assert!(!path.exists());
        assert_eq!(std::fs::read_dir(directory.path()).unwrap().count(), 0);
    }
}
