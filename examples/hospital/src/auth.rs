//! Authentication and authorization: argon2 password hashes, JWT access
//! tokens (an HttpOnly SameSite cookie for the browser, `Authorization:
//! Bearer` for API clients), the role/permission table and login rate
//! limiting.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use argon2::Argon2;
use argon2::password_hash::phc::PasswordHash;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use rand::RngExt;
use serde::{Deserialize, Serialize};

use crate::store::{Role, User};

/// The cookie that carries the browser's token.
pub const COOKIE: &str = "fedcore_token";

/// What a role may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permission {
    /// Metrics, rounds, clients, trust, privacy.
    ViewMetrics,
    /// Upload an X-ray and see findings; see one's own inference history.
    RunInference,
    /// See everyone's inference history.
    ViewAllInferences,
    /// Create users, change roles, export or erase a user's data.
    ManageUsers,
    /// Suspend or reactivate a hospital.
    ManageClients,
    /// Read the audit log.
    ViewAudit,
    /// Download the current global model.
    ExportModel,
}

/// The permission table.
pub fn allows(role: Role, p: Permission) -> bool {
    use Permission::*;
    match role {
        Role::Admin => true,
        Role::Doctor => matches!(p, ViewMetrics | RunInference),
        Role::Viewer => matches!(p, ViewMetrics),
    }
}

/// The claims of an access token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    /// The user id (a string, as JWT's `sub` is).
    pub sub: String,
    /// The role when issued (the current role is read from the store).
    pub role: Role,
    /// Issued at (seconds since the epoch).
    pub iat: u64,
    /// Expires at (seconds since the epoch).
    pub exp: u64,
}

/// Token signing and verification (HS256).
#[derive(Clone)]
pub struct Tokens {
    encoding: EncodingKey,
    decoding: DecodingKey,
    ttl: Duration,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokens").field("ttl", &self.ttl).finish()
    }
}

impl Tokens {
    /// Tokens signed with `secret` (at least 32 bytes), valid for `ttl`.
    pub fn new(secret: &[u8], ttl: Duration) -> Result<Self> {
        if secret.len() < 32 {
            return Err(anyhow!("the JWT secret must be at least 32 bytes"));
        }
        Ok(Self {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            ttl,
        })
    }

    /// How long a token lives.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// A token for `user`.
    pub fn issue(&self, user: &User) -> Result<String> {
        let iat = now_s();
        let claims = Claims {
            sub: user.id.to_string(),
            role: user.role,
            iat,
            exp: iat + self.ttl.as_secs(),
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .context("signing a token")
    }

    /// The claims of a valid, unexpired token.
    pub fn verify(&self, token: &str) -> Result<Claims> {
        let mut v = Validation::new(Algorithm::HS256);
        v.leeway = 0;
        v.set_required_spec_claims(&["exp", "sub"]);
        Ok(jsonwebtoken::decode::<Claims>(token, &self.decoding, &v)?.claims)
    }
}

fn now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// An argon2id hash (PHC string) of `password`.
pub fn hash_password(password: &str) -> Result<String> {
    // The salt (16 random bytes) comes from the operating system.
    Ok(Argon2::default()
        .hash_password(password.as_bytes())
        .map_err(|e| anyhow!("hashing: {e}"))?
        .to_string())
}

/// Whether `password` matches `hash` (a malformed hash never matches).
pub fn verify_password(password: &str, hash: &str) -> bool {
    PasswordHash::new(hash)
        .map(|h| {
            Argon2::default()
                .verify_password(password.as_bytes(), &h)
                .is_ok()
        })
        .unwrap_or(false)
}

/// The password rule for new users: 12 characters to 256 bytes, and not
/// easy to guess: zxcvbn (Dropbox's estimator, with its lists of common
/// passwords, names and words) must score it at least 3 of 4, counting
/// `context` (the user name, the app's name) as known to an attacker.
pub fn check_password(password: &str, context: &[&str]) -> std::result::Result<(), String> {
    if password.chars().count() < 12 {
        return Err("the password must have at least 12 characters".into());
    }
    if password.len() > 256 {
        return Err("the password must have at most 256 bytes".into());
    }
    let mut known = vec!["hospital", "fedcore", "dashboard"];
    known.extend_from_slice(context);
    let estimate = zxcvbn::zxcvbn(password, &known);
    if estimate.score() < zxcvbn::Score::Three {
        let why = estimate
            .feedback()
            .and_then(|f| f.warning())
            .map(|w| format!(" ({})", w.to_string().trim_end_matches('.')))
            .unwrap_or_default();
        return Err(format!(
            "the password is too easy to guess{why}: add more unrelated words or characters"
        ));
    }
    Ok(())
}

/// The rule for user names.
pub fn check_username(name: &str) -> std::result::Result<(), String> {
    let ok = (3..=64).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '@'));
    if ok {
        Ok(())
    } else {
        Err("user names have 3 to 64 characters: letters, digits, . _ - @".into())
    }
}

/// A random password of 20 characters from an unambiguous alphabet.
pub fn generate_password() -> String {
    const ALPHABET: &[u8] = b"abcdefghijkmnpqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789";
    let mut rng = rand::rng();
    (0..20)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}

/// Login attempts allowed per peer address and per user name.
#[derive(Debug, Clone, Copy)]
pub struct LoginLimit {
    /// Attempts in a burst.
    pub burst: u32,
    /// One more attempt after each of these.
    pub per: Duration,
}

impl Default for LoginLimit {
    fn default() -> Self {
        Self {
            burst: 5,
            per: Duration::from_secs(12),
        }
    }
}

/// Login rate limiting, by peer address and by user name (so neither many
/// names from one address nor one name from many addresses gets through).
#[derive(Clone)]
pub struct LoginLimiter {
    by_ip: Arc<DefaultKeyedRateLimiter<IpAddr>>,
    by_name: Arc<DefaultKeyedRateLimiter<String>>,
}

impl std::fmt::Debug for LoginLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LoginLimiter")
    }
}

impl LoginLimiter {
    /// A limiter with `limit` for each key.
    pub fn new(limit: LoginLimit) -> Result<Self> {
        let burst = NonZeroU32::new(limit.burst).context("the login burst must be positive")?;
        let quota = Quota::with_period(limit.per)
            .context("the login period must be positive")?
            .allow_burst(burst);
        Ok(Self {
            by_ip: Arc::new(RateLimiter::keyed(quota)),
            by_name: Arc::new(RateLimiter::keyed(quota)),
        })
    }

    /// Takes one attempt; `Err(seconds)` to wait when over the limit.
    pub fn check(&self, ip: IpAddr, username: &str) -> std::result::Result<(), u64> {
        let clock = governor::clock::DefaultClock::default();
        let wait = |e: governor::NotUntil<_>| {
            e.wait_time_from(governor::clock::Clock::now(&clock))
                .as_secs()
                .max(1)
        };
        self.by_ip.check_key(&ip).map_err(wait)?;
        self.by_name
            .check_key(&username.to_ascii_lowercase())
            .map_err(wait)?;
        Ok(())
    }
}

/// Reads a secret from `NAME` or from the file named by `NAME_FILE`.
pub fn secret_from_env(name: &str) -> Result<Option<String>> {
    if let Ok(v) = std::env::var(name) {
        return Ok(Some(v));
    }
    let file_var = format!("{name}_FILE");
    match std::env::var(&file_var) {
        Ok(path) => {
            let v = std::fs::read_to_string(&path)
                .with_context(|| format!("{file_var}: cannot read {path}"))?;
            Ok(Some(v.trim_end_matches(['\n', '\r']).to_owned()))
        }
        Err(_) => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_hash_and_verify() {
        let h = hash_password("correct horse battery").unwrap();
        assert!(h.starts_with("$argon2id$"));
        assert!(verify_password("correct horse battery", &h));
        assert!(!verify_password("correct horse batterY", &h));
        assert!(!verify_password("x", "not a hash"));
        assert_ne!(h, hash_password("correct horse battery").unwrap(), "salted");
    }

    #[test]
    fn tokens_expire_and_are_bound_to_the_key() {
        let user = User {
            id: 7,
            username: "a".into(),
            role: Role::Doctor,
            created_at: 0,
        };
        let t = Tokens::new(&[1; 32], Duration::from_secs(60)).unwrap();
        let c = t.verify(&t.issue(&user).unwrap()).unwrap();
        assert_eq!((c.sub.as_str(), c.role), ("7", Role::Doctor));
        let other = Tokens::new(&[2; 32], Duration::from_secs(60)).unwrap();
        assert!(other.verify(&t.issue(&user).unwrap()).is_err());
        let expired = Tokens::new(&[1; 32], Duration::ZERO).unwrap();
        let token = expired.issue(&user).unwrap();
        std::thread::sleep(Duration::from_millis(1100));
        assert!(t.verify(&token).is_err());
        assert!(Tokens::new(b"short", Duration::from_secs(1)).is_err());
    }

    #[test]
    fn permission_table() {
        use Permission::*;
        assert!(allows(Role::Admin, ManageUsers));
        assert!(allows(Role::Doctor, RunInference) && allows(Role::Doctor, ViewMetrics));
        assert!(!allows(Role::Doctor, ManageClients) && !allows(Role::Doctor, ViewAudit));
        assert!(allows(Role::Viewer, ViewMetrics));
        assert!(!allows(Role::Viewer, RunInference) && !allows(Role::Viewer, ExportModel));
    }

    #[test]
    fn limiter_stops_bursts_per_ip_and_per_name() {
        let l = LoginLimiter::new(LoginLimit {
            burst: 2,
            per: Duration::from_secs(60),
        })
        .unwrap();
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        assert!(l.check(a, "x").is_ok() && l.check(a, "y").is_ok());
        assert!(l.check(a, "z").is_err(), "third from one address");
        assert!(l.check(b, "x").is_ok());
        assert!(
            l.check(b, "X").is_err(),
            "third for one name, case-insensitive"
        );
    }

    #[test]
    fn common_or_guessable_passwords_are_refused() {
        for weak in [
            "password1234",
            "qwertyuiop123",
            "111111111111",
            "dr.house1234",
        ] {
            let e = check_password(weak, &["dr.house"]).expect_err(weak);
            assert!(e.contains("too easy to guess"), "{weak}: {e}");
        }
        assert!(check_password("admin-password-123", &["admin"]).is_ok());
        assert!(check_password(&generate_password(), &["admin"]).is_ok());
        assert!(
            check_password("short", &[])
                .unwrap_err()
                .contains("12 characters")
        );
    }
}
