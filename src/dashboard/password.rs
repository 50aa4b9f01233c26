//! Password hashes for dashboard users (`[dashboard] users = [{ name, password_hash }]`,
//! printed by `business-connector hash-password`).
//!
//! Argon2id (the `argon2` crate's defaults: 19 MiB, 2 passes, 1 lane — OWASP's minimum)
//! in a PHC string with a fresh random salt, e.g. `$argon2id$v=19$m=19456,t=2,p=1$…$…`.
//! Verification reads the parameters from the stored string, so hashes made with other
//! parameters keep working, and compares in constant time (the crate's `Output` equality).

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;

#[derive(Debug, thiserror::Error)]
pub enum PasswordError {
    #[error("hashing the password: {0}")]
    Hash(argon2::password_hash::Error),
}

/// A PHC string for `password` (argon2id, random salt): what goes into the config.
pub fn hash_password(password: &str) -> Result<String, PasswordError> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|hash| hash.to_string())
        .map_err(PasswordError::Hash)
}

/// Whether `password` matches `phc_hash`. A malformed or non-Argon2 hash never matches
/// (the config check should have rejected it; failing closed is the safe answer here).
pub fn verify_password(password: &str, phc_hash: &str) -> bool {
    let Ok(parsed) = PasswordHash::new(phc_hash) else {
        return false;
    };
    Argon2::default()
        .verify_password(password.as_bytes(), &parsed)
        .is_ok()
}

/// Whether `phc_hash` is a hash `verify_password` can check: for validating the config
/// at start rather than at the first login.
pub fn is_valid_hash(phc_hash: &str) -> bool {
    PasswordHash::new(phc_hash).is_ok_and(|parsed| {
        matches!(
            parsed.algorithm.as_str(),
            "argon2id" | "argon2i" | "argon2d"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_is_argon2id_phc_and_verifies() {
        let hash = hash_password("correct horse").expect("hash");
        assert!(hash.starts_with("$argon2id$v=19$"), "{hash}");
        assert!(!hash.contains("correct horse"));
        assert!(is_valid_hash(&hash));
        assert!(verify_password("correct horse", &hash));
        assert!(!verify_password("correct horsE", &hash));
        assert!(!verify_password("", &hash));
    }

    #[test]
    fn salts_differ() {
        let first = hash_password("same").expect("hash");
        let second = hash_password("same").expect("hash");
        assert_ne!(first, second);
        assert!(verify_password("same", &first) && verify_password("same", &second));
    }

    #[test]
    fn malformed_hashes_never_match() {
        for bad in ["", "plain", "$argon2id$", "$2b$12$abcdefghijklmnopqrstuv"] {
            assert!(!verify_password("plain", bad), "{bad}");
            assert!(!is_valid_hash(bad), "{bad}");
        }
    }

    #[test]
    fn empty_and_unicode_passwords_work() {
        for password in ["", "pässwörd ✓"] {
            let hash = hash_password(password).expect("hash");
            assert!(verify_password(password, &hash));
        }
    }
}
