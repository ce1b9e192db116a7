//! Authentication and authorization: argon2 password hashes, JWT access
//! tokens (an HttpOnly SameSite cookie for the browser, `Authorization:
//! Bearer` for API clients), the role/permission table and login rate
//! limiting.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use argon2::Argon2;
use argon2::password_hash::phc::PasswordHash;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use rand::RngExt;
use serde::{Deserialize, Serialize};

use crate::store::{ERASED_PREFIX, Role, User};

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
    /// Stop the run after its current round.
    ControlTraining,
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
    /// The user's session version when issued: a request with a token whose
    /// version is behind the store's is refused (signed out, password or
    /// role changed, erased).
    pub ver: i64,
    /// When the user signed in with their password (seconds since the
    /// epoch); refreshing keeps it, so a session ends `max_session` after
    /// it.
    pub auth: u64,
}

/// Token signing and verification (HS256).
#[derive(Clone)]
pub struct Tokens {
    encoding: EncodingKey,
    decoding: DecodingKey,
    ttl: Duration,
    max_session: Duration,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokens")
            .field("ttl", &self.ttl)
            .field("max_session", &self.max_session)
            .finish()
    }
}

/// How long tokens and sessions live.
#[derive(Debug, Clone, Copy)]
pub struct TokenLife {
    /// One access token (the browser refreshes it before it ends).
    pub access: Duration,
    /// A session from sign-in: no refresh past this, the password is asked
    /// again.
    pub session: Duration,
}

impl Default for TokenLife {
    fn default() -> Self {
        Self {
            access: Duration::from_secs(15 * 60),
            session: Duration::from_secs(8 * 3600),
        }
    }
}

impl Tokens {
    /// Tokens signed with `secret` (at least 32 bytes) that live as `life`
    /// says.
    pub fn new(secret: &[u8], life: TokenLife) -> Result<Self> {
        if secret.len() < 32 {
            return Err(anyhow!("the JWT secret must be at least 32 bytes"));
        }
        Ok(Self {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            ttl: life.access,
            max_session: life.session,
        })
    }

    /// How long a token lives.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// A token for `user` at session version `version`, signed in at `auth`
    /// (seconds since the epoch; `None`: now). It never outlives the
    /// session; `None` when the session is over.
    pub fn issue(&self, user: &User, version: i64, auth: Option<u64>) -> Result<Option<String>> {
        let iat = now_s();
        let auth = auth.unwrap_or(iat);
        let end = auth.saturating_add(self.max_session.as_secs());
        if iat >= end {
            return Ok(None);
        }
        let claims = Claims {
            sub: user.id.to_string(),
            role: user.role,
            iat,
            exp: (iat + self.ttl.as_secs()).min(end),
            ver: version,
            auth,
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .map(Some)
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

/// Seconds since the epoch.
pub fn now_s() -> u64 {
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

/// The password rule for new users: 12 to 256 characters, and not
/// easy to guess: zxcvbn (Dropbox's estimator, with its lists of common
/// passwords, names and words) must score it at least 3 of 4, counting
/// `context` (the user name, the app's name) as known to an attacker.
pub fn check_password(password: &str, context: &[&str]) -> std::result::Result<(), String> {
    if password.chars().count() < 12 {
        return Err("the password must have at least 12 characters".into());
    }
    if password.chars().count() > 256 {
        return Err("the password must have at most 256 characters".into());
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

/// The rule for a new user's name: [`check_username`], and not the
/// prefix of erased users' names (erasing user 7 renames it `deleted-7`,
/// which an account so named would block). Signing in checks only the
/// shape, so an account named so before this rule can still sign in.
pub fn check_new_username(name: &str) -> std::result::Result<(), String> {
    check_username(name)?;
    if name.to_ascii_lowercase().starts_with(ERASED_PREFIX) {
        return Err(format!(
            "user names cannot start with {ERASED_PREFIX:?}: erased users are named so"
        ));
    }
    Ok(())
}

/// A random password of 20 characters from an unambiguous alphabet.
pub fn generate_password() -> String {
    const ALPHABET: &[u8] = b"abcdefghijkmnpqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789";
    let mut rng = rand::rng();
    (0..20)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}

/// Login attempts allowed per client address, per user name from one
/// address, and failures per user name from everywhere.
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

type Pair = (IpAddr, String);

/// What a block holds back.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Block {
    Address(IpAddr),
    Pair(Pair),
    Name(String),
}

/// Sign-in throttling that slows guessing without letting anyone lock a
/// user out. Only failures count (a hospital's staff signing in from one
/// NAT address are never held back by each other's successes):
/// - failures from one client address (four times the quota: no spraying
///   many names from one address);
/// - failures at one name from one address, so an address failing at
///   `admin` does not block `admin` from elsewhere;
/// - failures at one name from anywhere; while that bucket is empty
///   (guessing from many addresses) the name is guarded: addresses that
///   failed at it recently are refused before their password is checked,
///   and an address that has not failed still gets its password checked.
///
/// A bucket that runs empty blocks its key until it has room again. IPv6
/// clients are keyed by their /64 (one customer's network), IPv4-mapped
/// addresses as IPv4. The buckets are governor's; governor cannot tell
/// whether a key's bucket is empty without taking from it, so the blocks
/// and which addresses failed at a name are two small maps here. All are
/// pruned as they go (`prune`, every 256 attempts).
#[derive(Clone)]
pub struct LoginLimiter {
    by_address: Arc<DefaultKeyedRateLimiter<IpAddr>>,
    by_pair: Arc<DefaultKeyedRateLimiter<Pair>>,
    by_name: Arc<DefaultKeyedRateLimiter<String>>,
    blocked: Arc<Mutex<HashMap<Block, Instant>>>,
    failed: Arc<Mutex<HashMap<Pair, Instant>>>,
    /// How long a failure is remembered: the time a bucket takes to refill.
    memory: Duration,
    attempts: Arc<AtomicU64>,
}

impl std::fmt::Debug for LoginLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LoginLimiter")
    }
}

fn wait_of(e: &governor::NotUntil<governor::clock::QuantaInstant>) -> Duration {
    let clock = governor::clock::DefaultClock::default();
    e.wait_time_from(governor::clock::Clock::now(&clock))
        .max(Duration::from_secs(1))
}

/// The key an address is throttled by: IPv4 as it is (IPv4-mapped IPv6
/// too), IPv6 by its /64.
fn address_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(bits.into())
        }
        v4 => v4,
    }
}

impl LoginLimiter {
    /// A limiter with `limit` for each bucket (four times it per address).
    pub fn new(limit: LoginLimit) -> Result<Self> {
        let burst = NonZeroU32::new(limit.burst).context("the login burst must be positive")?;
        let quota = Quota::with_period(limit.per)
            .context("the login period must be positive")?
            .allow_burst(burst);
        let per_address = Quota::with_period(limit.per / 4)
            .context("the login period must be positive")?
            .allow_burst(burst.saturating_mul(NonZeroU32::MIN.saturating_add(3)));
        Ok(Self {
            by_address: Arc::new(RateLimiter::keyed(per_address)),
            by_pair: Arc::new(RateLimiter::keyed(quota)),
            by_name: Arc::new(RateLimiter::keyed(quota)),
            blocked: Arc::default(),
            failed: Arc::default(),
            memory: limit.per.saturating_mul(limit.burst),
            attempts: Arc::default(),
        })
    }

    /// Whether an attempt at `username` (folded) from `ip` may have its
    /// password checked; `Err(seconds)` to wait when it is held back.
    pub fn check(&self, ip: IpAddr, username: &str) -> std::result::Result<(), u64> {
        if self.attempts.fetch_add(1, Ordering::Relaxed) % 256 == 255 {
            self.prune();
        }
        let ip = address_key(ip);
        let now = Instant::now();
        let pair = (ip, username.to_owned());
        let blocked = lock(&self.blocked);
        let until = |b: &Block| blocked.get(b).copied().filter(|u| *u > now);
        let wait = |u: Instant| u.duration_since(now).as_secs().max(1);
        if let Some(u) = until(&Block::Address(ip)).or_else(|| until(&Block::Pair(pair.clone()))) {
            return Err(wait(u));
        }
        if let Some(u) = until(&Block::Name(username.to_owned())) {
            let failed_here = lock(&self.failed)
                .get(&pair)
                .is_some_and(|t| now.duration_since(*t) < self.memory);
            if failed_here {
                return Err(wait(u));
            }
        }
        Ok(())
    }

    /// Records a wrong password for `username` from `ip`: it takes from the
    /// three buckets, and a bucket that runs empty blocks its key.
    pub fn failed(&self, ip: IpAddr, username: &str) {
        let ip = address_key(ip);
        let now = Instant::now();
        let pair = (ip, username.to_owned());
        lock(&self.failed).insert(pair.clone(), now);
        let mut over = Vec::new();
        if let Err(e) = self.by_address.check_key(&ip) {
            over.push((Block::Address(ip), wait_of(&e)));
        }
        if let Err(e) = self.by_pair.check_key(&pair) {
            over.push((Block::Pair(pair), wait_of(&e)));
        }
        if let Err(e) = self.by_name.check_key(&username.to_owned()) {
            over.push((Block::Name(username.to_owned()), wait_of(&e)));
        }
        let mut blocked = lock(&self.blocked);
        for (block, wait) in over {
            let until = now + wait;
            let entry = blocked.entry(block).or_insert(until);
            *entry = (*entry).max(until);
        }
    }

    /// Records a sign-in: the address's failures at the name are forgotten.
    pub fn succeeded(&self, ip: IpAddr, username: &str) {
        lock(&self.failed).remove(&(address_key(ip), username.to_owned()));
    }

    /// Drops what no longer limits anything: full buckets, old failures,
    /// blocks that ended.
    pub fn prune(&self) {
        self.by_address.retain_recent();
        self.by_pair.retain_recent();
        self.by_name.retain_recent();
        let now = Instant::now();
        lock(&self.failed).retain(|_, t| now.duration_since(*t) < self.memory);
        lock(&self.blocked).retain(|_, until| *until > now);
    }

    /// How many keys the limiter holds (buckets and maps together).
    pub fn len(&self) -> usize {
        self.by_address.len()
            + self.by_pair.len()
            + self.by_name.len()
            + lock(&self.failed).len()
            + lock(&self.blocked).len()
    }

    /// Whether it holds no key.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Where the client's address comes from: the TCP peer, or, when the peer
/// is one of the trusted reverse proxies, the last address that proxy
/// appended to `X-Forwarded-For` (anything before it came from the client
/// and can be forged).
#[derive(Debug, Clone, Default)]
pub struct ClientAddress {
    /// The proxies' own addresses (`TRUSTED_PROXIES`, comma-separated).
    pub trusted_proxies: Vec<IpAddr>,
}

impl ClientAddress {
    /// From `TRUSTED_PROXIES` (comma-separated addresses; none when unset).
    pub fn from_env() -> Result<Self> {
        let Ok(v) = std::env::var("TRUSTED_PROXIES") else {
            return Ok(Self::default());
        };
        let trusted_proxies = v
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| {
                s.parse()
                    .with_context(|| format!("TRUSTED_PROXIES: `{s}` is not an IP address"))
            })
            .collect::<Result<_>>()?;
        Ok(Self { trusted_proxies })
    }

    /// The client's address for a request from `peer` with these headers:
    /// the last `X-Forwarded-For` entry (what the trusted proxy appended),
    /// taken strictly: when it is not an address (with or without a port)
    /// the peer's is used, never an earlier, client-written entry.
    pub fn of(&self, peer: IpAddr, headers: &axum::http::HeaderMap) -> IpAddr {
        let peer = peer.to_canonical();
        if !self
            .trusted_proxies
            .iter()
            .any(|p| p.to_canonical() == peer)
        {
            return peer;
        }
        let Some(last) = headers
            .get_all("x-forwarded-for")
            .iter()
            .next_back()
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.rsplit(',').next())
            .map(str::trim)
        else {
            return peer;
        };
        last.parse::<IpAddr>()
            .or_else(|_| last.parse::<std::net::SocketAddr>().map(|a| a.ip()))
            .map_or(peer, |ip| ip.to_canonical())
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
        let life = |access, session| TokenLife {
            access: Duration::from_secs(access),
            session: Duration::from_secs(session),
        };
        let t = Tokens::new(&[1; 32], life(60, 3600)).unwrap();
        let c = t
            .verify(&t.issue(&user, 3, None).unwrap().unwrap())
            .unwrap();
        assert_eq!((c.sub.as_str(), c.role, c.ver), ("7", Role::Doctor, 3));
        assert_eq!(c.exp - c.iat, 60);
        let other = Tokens::new(&[2; 32], life(60, 3600)).unwrap();
        assert!(
            other
                .verify(&t.issue(&user, 0, None).unwrap().unwrap())
                .is_err()
        );
        // A refresh keeps the sign-in time; a token never outlives the
        // session, and a session that is over gets no token.
        let now = now_s();
        let c = t
            .verify(&t.issue(&user, 0, Some(now - 3590)).unwrap().unwrap())
            .unwrap();
        assert_eq!((c.auth, c.exp), (now - 3590, now + 10));
        assert!(t.issue(&user, 0, Some(now - 3600)).unwrap().is_none());
        let expired = Tokens::new(&[1; 32], life(0, 3600)).unwrap();
        let token = expired.issue(&user, 0, None).unwrap().unwrap();
        std::thread::sleep(Duration::from_millis(1100));
        assert!(t.verify(&token).is_err());
        assert!(Tokens::new(b"short", life(1, 1)).is_err());
    }

    #[test]
    fn permission_table() {
        use Permission::*;
        assert!(allows(Role::Admin, ManageUsers));
        assert!(allows(Role::Doctor, RunInference) && allows(Role::Doctor, ViewMetrics));
        assert!(!allows(Role::Doctor, ManageClients) && !allows(Role::Doctor, ViewAudit));
        assert!(allows(Role::Viewer, ViewMetrics));
        assert!(!allows(Role::Viewer, RunInference) && !allows(Role::Viewer, ExportModel));
        assert!(allows(Role::Admin, ControlTraining) && !allows(Role::Doctor, ControlTraining));
    }

    fn limiter(burst: u32) -> LoginLimiter {
        LoginLimiter::new(LoginLimit {
            burst,
            per: Duration::from_secs(60),
        })
        .unwrap()
    }

    #[test]
    fn failures_block_an_address_and_a_name_at_an_address_but_successes_never() {
        let l = limiter(2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        // Successes do not count: a hospital behind one address signs in
        // as often as it likes.
        for _ in 0..50 {
            assert!(l.check(a, "doc").is_ok());
            l.succeeded(a, "doc");
        }
        // Failures at many names from one address: 8 fit its bucket, the
        // ninth blocks the address.
        for name in ["p", "q", "r", "s", "t", "u", "v", "w", "z"] {
            assert!(l.check(a, name).is_ok(), "{name}");
            l.failed(a, name);
        }
        assert!(l.check(a, "doc").is_err(), "the address is blocked");
        // Failures at one name from one address block that pair only.
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        for _ in 0..3 {
            assert!(l.check(b, "x").is_ok());
            l.failed(b, "x");
        }
        assert!(l.check(b, "x").is_err(), "x from b is blocked");
        assert!(l.check(b, "y").is_ok(), "other names from b are not");
        let c: IpAddr = "10.0.0.3".parse().unwrap();
        assert!(l.check(c, "x").is_ok(), "x from elsewhere is not");
    }

    #[test]
    fn ipv6_clients_are_throttled_by_their_network() {
        let l = limiter(1);
        for i in 1..=6u16 {
            let ip = IpAddr::from([0x2001, 0xdb8, 0, 7, 0, 0, 0, i]);
            let _ = l.check(ip, "admin");
            l.failed(ip, "admin");
        }
        // One /64: the fifth failure from it blocked the whole network.
        let next = IpAddr::from([0x2001, 0xdb8, 0, 7, 0xffff, 0, 0, 1]);
        assert!(l.check(next, "someone").is_err());
        let other = IpAddr::from([0x2001, 0xdb8, 0, 8, 0, 0, 0, 1]);
        assert!(l.check(other, "someone").is_ok());
        assert_eq!(
            address_key("::ffff:10.1.2.3".parse().unwrap()),
            "10.1.2.3".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn guessing_from_many_addresses_cannot_lock_out_the_owner() {
        let l = limiter(3);
        // Failures at `admin` from many addresses empty the name's bucket.
        let attackers: Vec<IpAddr> = (1..=6)
            .map(|i| format!("192.0.2.{i}").parse().unwrap())
            .collect();
        for ip in &attackers {
            assert!(l.check(*ip, "admin").is_ok());
            l.failed(*ip, "admin");
        }
        // While it is empty, an address that failed is refused before its
        // password is checked ...
        assert!(l.check(attackers[0], "admin").is_err());
        assert!(l.check(attackers[5], "admin").is_err());
        // ... and one that has not failed still gets to try.
        let owner: IpAddr = "10.1.1.1".parse().unwrap();
        assert!(l.check(owner, "admin").is_ok());
        l.succeeded(owner, "admin");
        assert!(l.check(owner, "admin").is_ok());
        // Other names are not guarded.
        assert!(l.check(attackers[0], "doctor").is_ok());
    }

    #[test]
    fn the_limiter_forgets_what_no_longer_limits() {
        let l = LoginLimiter::new(LoginLimit {
            burst: 1,
            per: Duration::from_millis(50),
        })
        .unwrap();
        for i in 0..100u8 {
            let ip = IpAddr::from([10, 0, 1, i]);
            let _ = l.check(ip, &format!("user{i}"));
            l.failed(ip, &format!("user{i}"));
        }
        assert!(l.len() >= 300, "{}", l.len());
        std::thread::sleep(Duration::from_millis(120));
        l.prune();
        assert!(l.is_empty(), "{} keys left", l.len());
    }

    #[test]
    fn the_client_address_comes_from_a_trusted_proxy_only() {
        use axum::http::{HeaderMap, HeaderValue};
        let proxy: IpAddr = "10.0.0.254".parse().unwrap();
        let c = ClientAddress {
            trusted_proxies: vec![proxy],
        };
        let mut h = HeaderMap::new();
        h.insert(
            "x-forwarded-for",
            HeaderValue::from_static("6.6.6.6, 203.0.113.9"),
        );
        assert_eq!(c.of(proxy, &h), "203.0.113.9".parse::<IpAddr>().unwrap());
        let direct: IpAddr = "198.51.100.1".parse().unwrap();
        assert_eq!(c.of(direct, &h), direct, "a client cannot name itself");
        assert_eq!(c.of(proxy, &HeaderMap::new()), proxy);
        // The proxy seen as IPv4-mapped IPv6 is still the proxy; its entry
        // with a port is read; one that is not an address falls back to the
        // peer, never to the client-written entry before it.
        let mapped: IpAddr = "::ffff:10.0.0.254".parse().unwrap();
        assert_eq!(c.of(mapped, &h), "203.0.113.9".parse::<IpAddr>().unwrap());
        h.insert(
            "x-forwarded-for",
            HeaderValue::from_static("6.6.6.6, 203.0.113.9:5123"),
        );
        assert_eq!(c.of(proxy, &h), "203.0.113.9".parse::<IpAddr>().unwrap());
        h.insert(
            "x-forwarded-for",
            HeaderValue::from_static("6.6.6.6, unknown"),
        );
        assert_eq!(c.of(proxy, &h), proxy);
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
