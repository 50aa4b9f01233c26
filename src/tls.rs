//! Northbound TLS: the `[tls]` table, the rustls `ServerConfig` for the listener, and a
//! certificate resolver whose certificate and key are re-read on SIGHUP.
//!
//! The resolver holds the current `CertifiedKey` behind a lock and hands a clone of the
//! `Arc` to each handshake, so a reload swaps it for new connections while established
//! ones keep theirs. A new file that cannot be read, parsed or does not match its key
//! leaves the old certificate in place: a botched renewal must not take the gateway down.
//! With `client_ca_file`, every client must present a certificate issued by one of those
//! CAs (`WebPkiClientVerifier`); a handshake without an accepted one fails.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{RootCertStore, ServerConfig};
use serde::Deserialize;

/// `[tls]`: without this table the listener speaks plain HTTP.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain, leaf first.
    pub cert_file: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// PEM CA certificates: when given, clients must present a certificate they issued.
    #[serde(default)]
    pub client_ca_file: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// Names the key (`tls.cert_file`, ...) and the file.
    #[error("{key} {path}: {message}")]
    File {
        key: &'static str,
        path: String,
        message: String,
    },
    #[error("tls.key_file: the key does not belong to the certificate in tls.cert_file: {0}")]
    Key(rustls::Error),
    #[error("tls.client_ca_file: {0}")]
    ClientVerifier(String),
    #[error("tls: {0}")]
    Config(rustls::Error),
}

fn file_error(key: &'static str, path: &Path, message: impl ToString) -> TlsError {
    TlsError::File {
        key,
        path: path.display().to_string(),
        message: message.to_string(),
    }
}

/// The crypto provider the whole gateway uses (rustls is built with aws-lc-rs only;
/// naming it keeps us independent of a process-wide default).
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn read_certificates(
    key: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certificates = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_error(key, path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(key, path, e))?;
    if certificates.is_empty() {
        return Err(file_error(key, path, "no PEM certificate in the file"));
    }
    Ok(certificates)
}

/// Reads the chain and key and checks that they belong together.
fn load_certified_key(config: &TlsConfig) -> Result<CertifiedKey, TlsError> {
    let chain = read_certificates("tls.cert_file", &config.cert_file)?;
    let key = PrivateKeyDer::from_pem_file(&config.key_file)
        .map_err(|e| file_error("tls.key_file", &config.key_file, e))?;
    CertifiedKey::from_der(chain, key, &provider()).map_err(TlsError::Key)
}

/// The server certificate, replaceable while serving.
#[derive(Debug)]
pub struct ReloadingCert {
    files: TlsConfig,
    current: RwLock<Arc<CertifiedKey>>,
}

impl ReloadingCert {
    pub fn load(files: &TlsConfig) -> Result<Self, TlsError> {
        Ok(Self {
            current: RwLock::new(Arc::new(load_certified_key(files)?)),
            files: files.clone(),
        })
    }

    /// Re-reads certificate and key; on any error the current pair stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        let fresh = Arc::new(load_certified_key(&self.files)?);
        // A poisoned lock only means a panic elsewhere while swapping an Arc: the value
        // is still a whole CertifiedKey.
        let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
        *current = fresh;
        Ok(())
    }

    /// The certificate new handshakes get.
    pub fn current(&self) -> Arc<CertifiedKey> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

/// The listener's rustls configuration and the resolver to reload on SIGHUP.
pub fn server_config(files: &TlsConfig) -> Result<(ServerConfig, Arc<ReloadingCert>), TlsError> {
    let resolver = Arc::new(ReloadingCert::load(files)?);
    let provider = provider();
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Config)?;
    let builder = match &files.client_ca_file {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let mut roots = RootCertStore::empty();
            for certificate in read_certificates("tls.client_ca_file", path)? {
                roots.add(certificate).map_err(|e| {
                    file_error(
                        "tls.client_ca_file",
                        path,
                        format!("not a CA certificate: {e}"),
                    )
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| TlsError::ClientVerifier(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let config = builder.with_cert_resolver(resolver.clone());
    Ok((config, resolver))
}

/// Reloads the certificate on every SIGHUP, logging the outcome, for as long as the
/// runtime runs.
#[cfg(unix)]
pub fn reload_on_sighup(resolver: Arc<ReloadingCert>) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hangups = match signal(SignalKind::hangup()) {
        Ok(stream) => stream,
        Err(error) => {
            tracing::warn!(%error, "cannot listen for SIGHUP: the certificate will not be reloaded");
            return;
        }
    };
    actix_web::rt::spawn(async move {
        while hangups.recv().await.is_some() {
            match resolver.reload() {
                Ok(()) => tracing::info!("SIGHUP: TLS certificate and key reloaded"),
                Err(error) => {
                    tracing::error!(%error, "SIGHUP: TLS reload failed, keeping the current certificate")
                }
            }
        }
    });
}

#[cfg(not(unix))]
pub fn reload_on_sighup(_resolver: Arc<ReloadingCert>) {}

#[cfg(test)]
mod tests {
    use super::*;

    struct Files {
        dir: PathBuf,
        config: TlsConfig,
    }

    impl Drop for Files {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn files(name: &str) -> Files {
        let dir = std::env::temp_dir().join(format!("bc-tls-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let config = TlsConfig {
            cert_file: dir.join("server.pem"),
            key_file: dir.join("server.key"),
            client_ca_file: None,
        };
        Files { dir, config }
    }

    fn write_pair(files: &Files, host: &str) -> Vec<u8> {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec![host.to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        std::fs::write(&files.config.cert_file, cert.pem()).unwrap();
        std::fs::write(&files.config.key_file, key.serialize_pem()).unwrap();
        cert.der().to_vec()
    }

    #[test]
    fn reload_swaps_the_certificate_and_a_bad_file_keeps_the_old_one() {
        let files = files("reload");
        let first = write_pair(&files, "one.example");
        let (_, resolver) = server_config(&files.config).unwrap();
        assert_eq!(resolver.current().cert[0].as_ref(), first.as_slice());

        let second = write_pair(&files, "two.example");
        resolver.reload().unwrap();
        assert_eq!(resolver.current().cert[0].as_ref(), second.as_slice());

        std::fs::write(&files.config.cert_file, "not a certificate").unwrap();
        assert!(resolver.reload().is_err());
        assert_eq!(resolver.current().cert[0].as_ref(), second.as_slice());

        // A key that belongs to another certificate is refused too.
        let other_key = rcgen::KeyPair::generate().unwrap();
        write_pair(&files, "three.example");
        std::fs::write(&files.config.key_file, other_key.serialize_pem()).unwrap();
        assert!(matches!(resolver.reload(), Err(TlsError::Key(_))));
        assert_eq!(resolver.current().cert[0].as_ref(), second.as_slice());
    }

    #[test]
    fn missing_files_name_the_path() {
        let files = files("missing");
        let error = server_config(&files.config).unwrap_err().to_string();
        assert!(error.contains("server.pem"), "{error}");
    }
}
