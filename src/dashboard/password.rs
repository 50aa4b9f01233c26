//! Password hashes for dashboard users (`[dashboard] users = [{ name, password_hash }]`,
//! printed by `business-connector hash-password`).
//!
//! Argon2id (the `argon2` crate's defaults: 19 MiB, 2 passes, 1 lane — OWASP's minimum)
//! in a PHC string with a fresh random salt, e.g. `$argon2id$v=19$m=19456,t=2,p=1$…$…`.
//! Verification reads the parameters from the stored string, so hashes made with other
//! parameters keep working, and compares in constant time (the crate's `Output` equality).

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{Output, PasswordHash, PasswordHasher, SaltString};
use argon2::{Algorithm, Argon2, Block, Params, Version};

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
/// Allocates the hash's memory cost for this one check: a caller that checks often
/// keeps a [`Checker`] instead.
pub fn verify_password(password: &str, phc_hash: &str) -> bool {
    Checker::default().verify(password, phc_hash)
}

/// Checks passwords in memory of its own, allocated at the first check and reused:
/// Argon2's memory cost (19 MiB by default) is then held once per checker. Allocating
/// it per check does not free it in practice: glibc keeps large freed blocks in the
/// arena of the thread that used them, several per thread.
#[derive(Default)]
pub struct Checker {
    memory: Vec<Block>,
}

impl Checker {
    /// As [`verify_password`], without allocating after the first check (as long as
    /// the hashes' memory cost does not grow).
    pub fn verify(&mut self, password: &str, phc_hash: &str) -> bool {
        self.compute(password, phc_hash).unwrap_or(false)
    }

    fn compute(&mut self, password: &str, phc_hash: &str) -> Option<bool> {
        let parsed = PasswordHash::new(phc_hash).ok()?;
        let expected = parsed.hash?;
        let algorithm = Algorithm::try_from(parsed.algorithm).ok()?;
        let version = match parsed.version {
            Some(version) => Version::try_from(version).ok()?,
            None => Version::default(),
        };
        let params = Params::try_from(&parsed).ok()?;
        let mut salt = [0u8; 64];
        let salt = parsed.salt?.decode_b64(&mut salt).ok()?;
        let blocks = params.block_count();
        if self.memory.len() < blocks {
            self.memory.resize(blocks, Block::default());
        }
        let mut computed = vec![0u8; expected.len()];
        Argon2::new(algorithm, version, params)
            .hash_password_into_with_memory(
                password.as_bytes(),
                salt,
                &mut computed,
                &mut self.memory[..blocks],
            )
            .ok()?;
        // `Output`'s equality is constant-time.
        Some(Output::new(&computed).ok()? == expected)
    }
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
    fn a_checker_reuses_its_memory_and_agrees_with_the_crate() {
        use argon2::password_hash::PasswordVerifier;
        let hash = hash_password("correct horse").expect("hash");
        let parsed = PasswordHash::new(&hash).expect("parsed");
        let mut checker = Checker::default();
        for (password, expected) in [
            ("correct horse", true),
            ("correct horsE", false),
            ("", false),
        ] {
            assert_eq!(checker.verify(password, &hash), expected, "{password}");
            assert_eq!(
                Argon2::default()
                    .verify_password(password.as_bytes(), &parsed)
                    .is_ok(),
                expected
            );
        }
        assert_eq!(checker.memory.len(), 19 * 1024, "19 MiB, allocated once");
        let address = checker.memory.as_ptr();
        assert!(checker.verify("correct horse", &hash));
        assert_eq!(checker.memory.as_ptr(), address, "reused");
        // Other parameters (argon2i, a small cost) are read from the hash itself.
        let params = Params::new(64, 1, 1, None).expect("params");
        let small = Argon2::new(Algorithm::Argon2i, Version::V0x13, params)
            .hash_password(b"x", &SaltString::generate(&mut OsRng))
            .expect("hash")
            .to_string();
        assert!(checker.verify("x", &small));
        assert!(!checker.verify("y", &small));
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
