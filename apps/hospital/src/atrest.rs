//! Encryption at rest with AES-256-GCM (`aes-gcm`), for the health data the
//! dashboard stores (inference findings) and for exported models.
//!
//! A sealed value is `enc:v1:<key id>:<base64(nonce || ciphertext)>`; the key
//! id (8 hex digits of SHA-256 of the key) says which key opens it. A value
//! stored in a database row is sealed as `enc:v2:...` with associated data
//! that names the row and column ([`AtRest::seal_for`]): moved to another
//! row it no longer authenticates. `v1` values (exports, and rows written
//! before `v2`) still open. A key can be rotated: configure the new key as `FEDCORE_DATA_KEY` and the old
//! one as `FEDCORE_DATA_KEY_OLD`; values sealed with either open, new ones are
//! sealed with the new key (docs/dashboard.md, "Key rotation").

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use anyhow::{Context, Result, anyhow, bail};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use rand::RngExt;
use sha2::{Digest, Sha256};

const PREFIX: &str = "enc:v1:";
/// Values bound to their place (associated data).
const PREFIX_BOUND: &str = "enc:v2:";

/// One key.
#[derive(Clone)]
struct DataKey {
    id: String,
    cipher: Aes256Gcm,
}

impl DataKey {
    fn new(bytes: &[u8]) -> Result<Self> {
        if bytes.len() != 32 {
            bail!(
                "a data key is 32 bytes (base64 of 32 random bytes), got {}",
                bytes.len()
            );
        }
        let id = Sha256::digest(bytes)[..4]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        Ok(Self {
            id,
            cipher: Aes256Gcm::new(
                &Key::<Aes256Gcm>::try_from(bytes).map_err(|_| anyhow!("key length"))?,
            ),
        })
    }
}

/// The current key and older ones still accepted for opening.
#[derive(Clone)]
pub struct AtRest {
    current: DataKey,
    old: Vec<DataKey>,
}

impl std::fmt::Debug for AtRest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AtRest")
            .field("key", &self.current.id)
            .field("old_keys", &self.old.len())
            .finish()
    }
}

impl AtRest {
    /// From base64 keys: the current one and older ones.
    pub fn from_base64(current: &str, old: &[String]) -> Result<Self> {
        let decode = |s: &str| {
            STANDARD
                .decode(s.trim())
                .context("a data key must be base64")
                .and_then(|b| DataKey::new(&b))
        };
        Ok(Self {
            current: decode(current)?,
            old: old.iter().map(|s| decode(s)).collect::<Result<_>>()?,
        })
    }

    /// From `FEDCORE_DATA_KEY` (or `_FILE`) and `FEDCORE_DATA_KEY_OLD`
    /// (or `_FILE`); `None` when no key is configured.
    pub fn from_env() -> Result<Option<Self>> {
        let Some(current) = crate::auth::secret_from_env("FEDCORE_DATA_KEY")? else {
            return Ok(None);
        };
        let old: Vec<String> = crate::auth::secret_from_env("FEDCORE_DATA_KEY_OLD")?
            .into_iter()
            .collect();
        Self::from_base64(&current, &old).map(Some)
    }

    /// The current key's id.
    pub fn key_id(&self) -> &str {
        &self.current.id
    }

    /// Seals bytes with the current key.
    pub fn seal_bytes(&self, plain: &[u8]) -> Result<String> {
        self.seal_with(PREFIX, plain, b"")
    }

    /// Seals text stored at `place` (e.g. a table, column and the row's
    /// identifying fields): it opens only with the same `place`
    /// ([`AtRest::open_for`]).
    pub fn seal_for(&self, plain: &str, place: &str) -> Result<String> {
        self.seal_with(PREFIX_BOUND, plain.as_bytes(), place.as_bytes())
    }

    fn seal_with(&self, prefix: &str, plain: &[u8], aad: &[u8]) -> Result<String> {
        let mut nonce = [0u8; 12];
        rand::rng().fill(&mut nonce);
        let ct = self
            .current
            .cipher
            .encrypt(&Nonce::from(nonce), Payload { msg: plain, aad })
            .map_err(|_| anyhow!("encryption failed"))?;
        let mut blob = nonce.to_vec();
        blob.extend_from_slice(&ct);
        Ok(format!(
            "{prefix}{}:{}",
            self.current.id,
            STANDARD.encode(blob)
        ))
    }

    /// Seals text.
    pub fn seal(&self, plain: &str) -> Result<String> {
        self.seal_bytes(plain.as_bytes())
    }

    /// Opens a sealed value with whichever configured key sealed it.
    pub fn open_bytes(&self, sealed: &str) -> Result<Vec<u8>> {
        let rest = sealed.strip_prefix(PREFIX).context("not a sealed value")?;
        self.open_with(rest, b"")
    }

    /// Opens text stored at `place`: a `v2` value sealed for that place
    /// ([`AtRest::seal_for`]), or a `v1` value from before places were bound.
    pub fn open_for(&self, sealed: &str, place: &str) -> Result<String> {
        let plain = match sealed.strip_prefix(PREFIX_BOUND) {
            Some(rest) => self.open_with(rest, place.as_bytes())?,
            None => self.open_bytes(sealed)?,
        };
        String::from_utf8(plain).context("sealed text is not UTF-8")
    }

    fn open_with(&self, rest: &str, aad: &[u8]) -> Result<Vec<u8>> {
        let (id, blob) = rest.split_once(':').context("malformed sealed value")?;
        let key = std::iter::once(&self.current)
            .chain(&self.old)
            .find(|k| k.id == id)
            .with_context(|| format!("sealed with key {id}, which is not configured"))?;
        let blob = STANDARD.decode(blob).context("malformed sealed value")?;
        if blob.len() < 12 + 16 {
            bail!("malformed sealed value");
        }
        let (nonce, ct) = blob.split_at(12);
        key.cipher
            .decrypt(
                &Nonce::try_from(nonce).map_err(|_| anyhow!("nonce length"))?,
                Payload { msg: ct, aad },
            )
            .map_err(|_| {
                anyhow!("sealed value fails authentication (tampered, moved from another row, or wrong key)")
            })
    }

    /// Opens sealed text.
    pub fn open(&self, sealed: &str) -> Result<String> {
        String::from_utf8(self.open_bytes(sealed)?).context("sealed text is not UTF-8")
    }
}

/// Whether a stored value is sealed.
pub fn is_sealed(value: &str) -> bool {
    value.starts_with(PREFIX) || value.starts_with(PREFIX_BOUND)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> String {
        STANDARD.encode([b; 32])
    }

    #[test]
    fn seal_open_rotate_and_tamper() {
        let a = AtRest::from_base64(&key(1), &[]).unwrap();
        let s = a.seal("findings").unwrap();
        assert!(is_sealed(&s) && !s.contains("findings"));
        assert_eq!(a.open(&s).unwrap(), "findings");
        assert_ne!(s, a.seal("findings").unwrap(), "fresh nonce");

        // Rotation: the new key opens old values when the old key is listed.
        let rotated = AtRest::from_base64(&key(2), &[key(1)]).unwrap();
        assert_eq!(rotated.open(&s).unwrap(), "findings");
        let only_new = AtRest::from_base64(&key(2), &[]).unwrap();
        assert!(
            only_new
                .open(&s)
                .unwrap_err()
                .to_string()
                .contains("not configured")
        );

        let mut t = s.clone().into_bytes();
        let n = t.len();
        t[n - 3] = if t[n - 3] == b'A' { b'B' } else { b'A' };
        assert!(a.open(std::str::from_utf8(&t).unwrap()).is_err());
        assert!(a.open("plain").is_err());
        assert!(AtRest::from_base64("c2hvcnQ=", &[]).is_err());
    }

    #[test]
    fn a_value_sealed_for_a_place_opens_only_there() {
        let a = AtRest::from_base64(&key(1), &[]).unwrap();
        let s = a.seal_for("findings", "row 1").unwrap();
        assert!(is_sealed(&s) && s.starts_with(PREFIX_BOUND));
        assert_eq!(a.open_for(&s, "row 1").unwrap(), "findings");
        let e = a.open_for(&s, "row 2").unwrap_err();
        assert!(e.to_string().contains("fails authentication"), "{e}");
        // Values sealed before places were bound still open anywhere.
        let legacy = a.seal("findings").unwrap();
        assert_eq!(a.open_for(&legacy, "row 2").unwrap(), "findings");
        // A bound value is not a v1 value.
        assert!(a.open(&s).is_err());
    }
}
