//! Contexts with their key role in the type, the key authority, key files.

use std::fmt;
use std::fs;
use std::io::Write;
use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sha2::{Digest, Sha256};

use crate::error::{HeError, Result};
use crate::params::{CkksParams, MIN_HEADROOM_BITS};
use crate::seal;
use crate::vector::SlotPacking;

mod sealed_role {
    pub trait Sealed {}
    impl Sealed for super::Secret {}
    impl Sealed for super::Public {}
}

/// What a context may do: [`Secret`] (hospitals: encrypt, decrypt) or
/// [`Public`] (the server: add, multiply by plaintext weights, encrypt with
/// the public key; no decryption at all).
pub trait Role: sealed_role::Sealed + Send + Sync + 'static {
    /// `secret` or `public`.
    const NAME: &'static str;
    /// The byte that marks the role in a key file.
    const TAG: u8;
}

/// The role of hospitals: holds the secret key.
#[derive(Debug, Clone, Copy)]
pub struct Secret;

/// The role of the aggregation server: holds only the public key.
#[derive(Debug, Clone, Copy)]
pub struct Public;

impl Role for Secret {
    const NAME: &'static str = "secret";
    const TAG: u8 = 1;
}

impl Role for Public {
    const NAME: &'static str = "public";
    const TAG: u8 = 2;
}

pub(crate) struct Inner {
    pub(crate) params: CkksParams,
    pub(crate) engine: seal::Engine,
    /// An engine of the same SEAL context without keys, which encrypted
    /// vectors keep to write themselves (the rounded form of a sum).
    pub(crate) keyless: Arc<seal::Engine>,
    pub(crate) key_id: [u8; 16],
    /// Index (into the context's levels) of the level uploads are encrypted at.
    pub(crate) level: usize,
    public_key: Arc<seal::PublicKey>,
    secret_key: Option<Arc<seal::SecretKey>>,
    /// Relinearization and rotation keys, when given
    /// ([`CkksContext::with_evaluation_keys`]).
    pub(crate) eval: Option<Arc<crate::gram::EvalKeys>>,
}

impl Inner {
    pub(crate) fn secret_key(&self) -> Option<&seal::SecretKey> {
        self.secret_key.as_deref()
    }
}

/// A CKKS context over SEAL, with the keys of its role `R`.
///
/// Cloning is cheap (shared). Every operation that the server needs —
/// [`weighted_sum`](CkksContext::weighted_sum),
/// [`accumulate`](CkksContext::accumulate),
/// [`encrypt_public`](CkksContext::encrypt_public), loading and saving —
/// exists for both roles; [`encrypt`](CkksContext::encrypt) (symmetric,
/// compact) and [`decrypt`](CkksContext::decrypt) exist only for
/// `CkksContext<Secret>`. The server's type has no way to decrypt:
///
/// ```compile_fail
/// use fedcore_he::{CkksContext, EncryptedVector, Public};
/// fn server_side(ctx: &CkksContext<Public>, v: &EncryptedVector) {
///     let _ = ctx.decrypt(v); // no `decrypt` on CkksContext<Public>
/// }
/// ```
///
/// while the same code with a hospital's context compiles:
///
/// ```
/// use fedcore_he::{CkksContext, EncryptedVector, Secret};
/// fn hospital_side(ctx: &CkksContext<Secret>, v: &EncryptedVector) {
///     let _ = ctx.decrypt(v);
/// }
/// ```
pub struct CkksContext<R: Role> {
    pub(crate) inner: Arc<Inner>,
    _role: PhantomData<R>,
    pub(crate) slot_packing: SlotPacking,
    /// How precisely the sums it writes are rounded
    /// ([`with_sum_rounding`](Self::with_sum_rounding)).
    pub(crate) sum_rounding: Option<u32>,
}

impl<R: Role> Clone for CkksContext<R> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            _role: PhantomData,
            slot_packing: self.slot_packing,
            sum_rounding: self.sum_rounding,
        }
    }
}

impl<R: Role> fmt::Debug for CkksContext<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CkksContext")
            .field("role", &R::NAME)
            .field("params", &self.inner.params)
            .field("key_id", &self.key_id())
            .finish()
    }
}

pub(crate) fn make_context(params: &CkksParams) -> Result<Arc<seal::Context>> {
    params.check()?;
    let sec = if params.is_secure() {
        seal::SEC_TC128
    } else {
        seal::SEC_NONE
    };
    let ctx = seal::Context::new(params.degree(), params.coeff_bits(), sec)
        .map_err(HeError::InvalidParameters)?;
    Ok(Arc::new(ctx))
}

/// The lowest data level whose modulus holds a weighted sum.
fn upload_level(params: &CkksParams, ctx: &seal::Context) -> Result<usize> {
    let need = params.scale_bits() + params.weight_bits() + MIN_HEADROOM_BITS;
    ctx.levels
        .iter()
        .rposition(|l| l.modulus_bits >= need)
        .ok_or_else(|| {
            HeError::InvalidParameters(format!("no level holds {need} bits for a weighted sum"))
        })
}

fn key_id(public_key: &[u8]) -> [u8; 16] {
    let digest = Sha256::digest(public_key);
    let mut id = [0u8; 16];
    id.copy_from_slice(&digest[..16]);
    id
}

impl<R: Role> CkksContext<R> {
    fn from_parts(
        params: CkksParams,
        ctx: Arc<seal::Context>,
        public_key: Arc<seal::PublicKey>,
        secret_key: Option<Arc<seal::SecretKey>>,
    ) -> Result<Self> {
        let level = upload_level(&params, &ctx)?;
        let id = key_id(&public_key.to_bytes()?);
        let keyless = Arc::new(seal::Engine::new(ctx.clone(), None, None)?);
        let engine = seal::Engine::new(ctx, secret_key.clone(), Some(public_key.clone()))?;
        Ok(Self {
            inner: Arc::new(Inner {
                params,
                engine,
                keyless,
                key_id: id,
                level,
                public_key,
                secret_key,
                eval: None,
            }),
            _role: PhantomData,
            slot_packing: SlotPacking::Real,
            sum_rounding: Some(crate::vector::SUM_ROUNDING_PRECISION_BITS),
        })
    }

    /// The same context with `eval` as its evaluation keys.
    pub(crate) fn with_eval(&self, eval: crate::gram::EvalKeys) -> Result<Self> {
        let i = &self.inner;
        Ok(Self {
            inner: Arc::new(Inner {
                params: i.params.clone(),
                engine: seal::Engine::new(
                    i.engine.context().clone(),
                    i.secret_key.clone(),
                    Some(i.public_key.clone()),
                )?,
                keyless: i.keyless.clone(),
                key_id: i.key_id,
                level: i.level,
                public_key: i.public_key.clone(),
                secret_key: i.secret_key.clone(),
                eval: Some(Arc::new(eval)),
            }),
            _role: PhantomData,
            slot_packing: self.slot_packing,
            sum_rounding: self.sum_rounding,
        })
    }

    /// The index of the upload level in the SEAL context's data levels.
    pub(crate) fn upload_level_index(&self) -> usize {
        self.inner.level
    }

    /// The public key (the tests' coalition contexts reuse it).
    #[cfg(test)]
    pub(crate) fn public_key(&self) -> &Arc<seal::PublicKey> {
        &self.inner.public_key
    }

    /// The parameters.
    pub fn params(&self) -> &CkksParams {
        &self.inner.params
    }

    /// Slots per ciphertext: the values one ciphertext holds with
    /// [`SlotPacking::Real`], half of what it holds with
    /// [`SlotPacking::Complex`].
    pub fn slots(&self) -> usize {
        self.inner.engine.slots()
    }

    /// The same keys, encrypting with `packing` from now on (what is loaded
    /// keeps the packing its bytes say).
    pub fn with_slot_packing(mut self, packing: SlotPacking) -> Self {
        self.slot_packing = packing;
        self
    }

    /// How this context packs the values it encrypts
    /// ([`SlotPacking::Real`] unless set with
    /// [`with_slot_packing`](Self::with_slot_packing)).
    pub fn slot_packing(&self) -> SlotPacking {
        self.slot_packing
    }

    /// The same keys, writing sums ([`Form::Sum`](crate::Form::Sum)
    /// vectors, what the server sends back) rounded so that the rounding's
    /// noise stays about `2^-bits` per value (`Some(bits)`; the default is
    /// [`SUM_ROUNDING_PRECISION_BITS`](crate::SUM_ROUNDING_PRECISION_BITS)),
    /// or exactly (`None`: about 40 % more bytes). `bits` below
    /// [`SUM_ROUNDING_MIN_BITS`](crate::SUM_ROUNDING_MIN_BITS) (20) count as
    /// 20. Sums are read whichever way they were written: the bits dropped
    /// travel with them.
    pub fn with_sum_rounding(mut self, bits: Option<u32>) -> Self {
        self.sum_rounding = bits;
        self
    }

    /// How this context writes sums ([`with_sum_rounding`](Self::with_sum_rounding)).
    pub fn sum_rounding(&self) -> Option<u32> {
        self.sum_rounding
    }

    /// The key pair's id: the first 16 bytes of SHA-256 of the public key.
    /// Every encrypted vector carries it, so one made under other keys is
    /// refused instead of decrypting to noise.
    pub fn key_id(&self) -> [u8; 16] {
        self.inner.key_id
    }

    /// The largest magnitude a weighted sum may reach:
    /// `2^(upload level bits - scale bits - weight bits - 2)` (2^28 with the
    /// default parameters): a level's modulus `q` of `b` bits is at least
    /// `2^(b-1)`, and a centered value must stay below `q/2`. With
    /// [`SlotPacking::Complex`] it is `sqrt(2)` smaller: a slot holds two
    /// values, and its magnitude bounds the plaintext's coefficients.
    pub fn sum_bound(&self) -> f64 {
        let l = &self.inner.engine.context().levels[self.inner.level];
        let p = &self.inner.params;
        let real = 2f64.powi((l.modulus_bits - p.scale_bits() - p.weight_bits()) as i32 - 2);
        match self.slot_packing {
            SlotPacking::Real => real,
            SlotPacking::Complex => real / std::f64::consts::SQRT_2,
        }
    }

    /// Writes this context's public part (parameters and public key) to
    /// `path`, mode 0600; an existing file is an error, never overwritten.
    pub fn write_public(&self, path: &Path) -> Result<()> {
        let bytes = encode_key_file::<Public>(&self.inner.params, &self.inner.public_key, None)?;
        write_new(path, &bytes)
    }
}

impl CkksContext<Secret> {
    /// A new key pair for `params` (a key authority's job; see [`KeyAuthority`]).
    pub fn generate(params: CkksParams) -> Result<Self> {
        let ctx = make_context(&params)?;
        let (sk, pk) = seal::keygen(&ctx)?;
        Self::from_parts(params, ctx, Arc::new(pk), Some(Arc::new(sk)))
    }

    /// The server's view of the same keys: parameters and public key only.
    pub fn public(&self) -> CkksContext<Public> {
        CkksContext {
            inner: Arc::new(Inner {
                params: self.inner.params.clone(),
                engine: seal::Engine::new(
                    self.inner.engine.context().clone(),
                    None,
                    Some(self.inner.public_key.clone()),
                )
                .expect("an engine for a context that already has one"),
                keyless: self.inner.keyless.clone(),
                key_id: self.inner.key_id,
                level: self.inner.level,
                public_key: self.inner.public_key.clone(),
                secret_key: None,
                eval: self.inner.eval.clone(),
            }),
            _role: PhantomData,
            slot_packing: self.slot_packing,
            sum_rounding: self.sum_rounding,
        }
    }

    /// A context for a secret key made elsewhere: the tests' coalition
    /// keys (sums of some parties' shares), never a product path.
    #[cfg(test)]
    pub(crate) fn from_secret_key(
        params: CkksParams,
        ctx: Arc<seal::Context>,
        public_key: Arc<seal::PublicKey>,
        secret_key: seal::SecretKey,
    ) -> Result<Self> {
        Self::from_parts(params, ctx, public_key, Some(Arc::new(secret_key)))
    }

    /// Loads a hospital's context from a key file written by
    /// [`KeyAuthority::write`]. A public file is [`HeError::WrongRole`]; a
    /// secret file readable by group or others is refused.
    pub fn from_file(path: &Path) -> Result<Self> {
        check_private(path)?;
        let bytes = read_key_file(path)?;
        Self::decode(path, &bytes)
    }

    /// Loads a hospital's context from a key file's bytes (already read;
    /// [`CkksContext::from_file`] also checks the file's permissions). Errors
    /// name the file as `<bytes>`.
    pub fn from_key_bytes(bytes: &[u8]) -> Result<Self> {
        Self::decode(Path::new("<bytes>"), bytes)
    }

    fn decode(path: &Path, bytes: &[u8]) -> Result<Self> {
        let (file, ctx, pk) = load_key_file(path, bytes, Secret::TAG)?;
        let sk = seal::SecretKey::from_bytes(&ctx, file.secret.unwrap_or_default())
            .map_err(|e| key_err(path, format!("secret key: {e}")))?;
        Self::from_parts(file.params, ctx, Arc::new(pk), Some(Arc::new(sk)))
    }

    /// Writes this context with its secret key to `path`, mode 0600; an
    /// existing file is an error, never overwritten.
    pub fn write_secret(&self, path: &Path) -> Result<()> {
        let sk = self
            .inner
            .secret_key
            .as_ref()
            .expect("a CkksContext<Secret> holds its secret key");
        let bytes =
            encode_key_file::<Secret>(&self.inner.params, &self.inner.public_key, Some(sk))?;
        write_new(path, &bytes)
    }
}

impl CkksContext<Public> {
    /// A public context for a public key made elsewhere (the collective key
    /// of [`crate::multiparty`]).
    pub(crate) fn from_public_key(
        params: CkksParams,
        ctx: Arc<seal::Context>,
        public_key: seal::PublicKey,
    ) -> Result<Self> {
        Self::from_parts(params, ctx, Arc::new(public_key), None)
    }

    /// Loads the server's context from a key file written by
    /// [`KeyAuthority::write`]. A secret file is [`HeError::WrongRole`]: the
    /// server must never be handed the secret key.
    pub fn from_file(path: &Path) -> Result<Self> {
        let bytes = read_key_file(path)?;
        Self::decode(path, &bytes)
    }

    /// Loads the server's context from a key file's bytes. Errors name the
    /// file as `<bytes>`.
    pub fn from_key_bytes(bytes: &[u8]) -> Result<Self> {
        Self::decode(Path::new("<bytes>"), bytes)
    }

    fn decode(path: &Path, bytes: &[u8]) -> Result<Self> {
        let (file, ctx, pk) = load_key_file(path, bytes, Public::TAG)?;
        Self::from_parts(file.params, ctx, Arc::new(pk), None)
    }
}

/// Creates the keys of a federation once and writes them for each role.
#[derive(Debug)]
pub struct KeyAuthority;

/// Where [`KeyAuthority::write`] put the key files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyFiles {
    /// The hospitals' file (secret key): `he-secret.key`.
    pub secret: PathBuf,
    /// The server's file (public key only): `he-public.key`.
    pub public: PathBuf,
    /// The server's evaluation keys (public: they let their holder compute
    /// on ciphertexts, never decrypt): `he-evaluation.keys`, for
    /// [`EncryptedMedian`](crate::EncryptedMedian).
    pub evaluation: PathBuf,
}

impl KeyAuthority {
    /// File name of the hospitals' context.
    pub const SECRET_FILE: &'static str = "he-secret.key";
    /// File name of the server's context.
    pub const PUBLIC_FILE: &'static str = "he-public.key";
    /// File name of the server's evaluation keys.
    pub const EVALUATION_FILE: &'static str = "he-evaluation.keys";

    /// Generates a key pair for `params` and writes the secret context to
    /// `dir/he-secret.key`, the public context to `dir/he-public.key` and
    /// the evaluation keys to `dir/he-evaluation.keys`, all mode 0600 (the
    /// directory is created if needed). Existing key files are never
    /// overwritten. Returns the hospitals' context too.
    pub fn write(params: CkksParams, dir: &Path) -> Result<(CkksContext<Secret>, KeyFiles)> {
        let files = KeyFiles {
            secret: dir.join(Self::SECRET_FILE),
            public: dir.join(Self::PUBLIC_FILE),
            evaluation: dir.join(Self::EVALUATION_FILE),
        };
        for p in [&files.secret, &files.public, &files.evaluation] {
            if p.exists() {
                return Err(key_err(p, "exists already; keys are created once".into()));
            }
        }
        fs::create_dir_all(dir).map_err(|e| key_err(dir, e.to_string()))?;
        let ctx = CkksContext::generate(params)?;
        ctx.write_secret(&files.secret)?;
        ctx.write_public(&files.public)?;
        write_new(&files.evaluation, &ctx.evaluation_keys()?)?;
        Ok((ctx, files))
    }

    /// Generates a key pair for `params` and writes it into startup kits
    /// (the folders of `fedcore::net::provision`): the public context and
    /// the evaluation keys into the server's kit, the secret context into
    /// each site's kit, all mode
    /// 0600. Nothing is written if any of the files already exists. Returns
    /// the sites' context.
    pub fn write_kits(
        params: CkksParams,
        server_kit: &Path,
        site_kits: &[PathBuf],
    ) -> Result<CkksContext<Secret>> {
        let public = server_kit.join(Self::PUBLIC_FILE);
        let evaluation = server_kit.join(Self::EVALUATION_FILE);
        let secrets: Vec<PathBuf> = site_kits
            .iter()
            .map(|d| d.join(Self::SECRET_FILE))
            .collect();
        for p in [&public, &evaluation].into_iter().chain(&secrets) {
            if p.exists() {
                return Err(key_err(p, "exists already; keys are created once".into()));
            }
            let dir = p.parent().unwrap_or(Path::new("."));
            if !dir.is_dir() {
                return Err(key_err(dir, "is not a kit folder".into()));
            }
        }
        let ctx = CkksContext::generate(params)?;
        ctx.write_public(&public)?;
        write_new(&evaluation, &ctx.evaluation_keys()?)?;
        for s in &secrets {
            ctx.write_secret(s)?;
        }
        Ok(ctx)
    }
}

pub(crate) fn key_err(path: &Path, reason: String) -> HeError {
    HeError::KeyFile {
        path: path.to_path_buf(),
        reason,
    }
}

const KEY_MAGIC: &[u8; 8] = b"FCHEKEY1";
/// Key files are a few MB at most (a secret + public key at degree 32768).
const MAX_KEY_FILE: u64 = 64 << 20;

struct KeyFile<'a> {
    params: CkksParams,
    public: &'a [u8],
    secret: Option<&'a [u8]>,
}

// Layout: magic (8) | role (1) | params JSON length (u32 LE) | params JSON |
// public key length (u64 LE) | public key (SEAL, uncompressed) |
// [secret key length (u64 LE) | secret key] for the secret role.
fn encode_key_file<R: Role>(
    params: &CkksParams,
    pk: &seal::PublicKey,
    sk: Option<&Arc<seal::SecretKey>>,
) -> Result<Vec<u8>> {
    let json = serde_json::to_vec(params).map_err(|e| HeError::Seal(e.to_string()))?;
    let pk = pk.to_bytes()?;
    let mut out = Vec::with_capacity(32 + json.len() + 2 * pk.len());
    out.extend_from_slice(KEY_MAGIC);
    out.push(R::TAG);
    out.extend_from_slice(&(json.len() as u32).to_le_bytes());
    out.extend_from_slice(&json);
    out.extend_from_slice(&(pk.len() as u64).to_le_bytes());
    out.extend_from_slice(&pk);
    if let Some(sk) = sk {
        let sk = sk.to_bytes()?;
        out.extend_from_slice(&(sk.len() as u64).to_le_bytes());
        out.extend_from_slice(&sk);
    }
    Ok(out)
}

/// A key file whose header is valid (small insecure parameters, role from
/// the first byte of `rest`) around arbitrary key bytes (the rest, split in
/// two for the public and the secret key): the fuzz target `key_file` uses it
/// to reach SEAL's key parsers.
pub fn fuzz_key_file(rest: &[u8]) -> Vec<u8> {
    let params = CkksParams::dangerous()
        .insecure(4096, &[40, 40, 40, 40], 30)
        .expect("valid small parameters");
    let json = serde_json::to_vec(&params).unwrap_or_default();
    let (tag, keys) = match rest.split_first() {
        Some((b, keys)) if b & 1 == 1 => (Secret::TAG, keys),
        Some((_, keys)) => (Public::TAG, keys),
        None => (Public::TAG, rest),
    };
    let (pk, sk) = keys.split_at(keys.len() / 2);
    let mut out = Vec::new();
    out.extend_from_slice(KEY_MAGIC);
    out.push(tag);
    out.extend_from_slice(&(json.len() as u32).to_le_bytes());
    out.extend_from_slice(&json);
    out.extend_from_slice(&(pk.len() as u64).to_le_bytes());
    out.extend_from_slice(pk);
    if tag == Secret::TAG {
        out.extend_from_slice(&(sk.len() as u64).to_le_bytes());
        out.extend_from_slice(sk);
    }
    out
}

/// A key file's bytes for role `tag`: its fields, the SEAL context of its
/// parameters and its public key (both roles' files hold one).
fn load_key_file<'a>(
    path: &Path,
    bytes: &'a [u8],
    tag: u8,
) -> Result<(KeyFile<'a>, Arc<seal::Context>, seal::PublicKey)> {
    if bytes.len() as u64 > MAX_KEY_FILE {
        return Err(key_err(path, format!("{} bytes is too large", bytes.len())));
    }
    let file = decode_key_file(path, bytes, tag)?;
    let ctx = make_context(&file.params).map_err(|e| key_err(path, e.to_string()))?;
    let pk = seal::PublicKey::from_bytes(&ctx, file.public)
        .map_err(|e| key_err(path, format!("public key: {e}")))?;
    Ok((file, ctx, pk))
}

fn role_name(tag: u8) -> &'static str {
    match tag {
        t if t == Secret::TAG => Secret::NAME,
        t if t == Public::TAG => Public::NAME,
        _ => "unknown",
    }
}

fn decode_key_file<'a>(path: &Path, bytes: &'a [u8], want: u8) -> Result<KeyFile<'a>> {
    let mut r = crate::reader::Reader::new(bytes);
    let bad = |m: &str| key_err(path, m.to_owned());
    if r.take(8).map_err(|_| bad("too short"))? != KEY_MAGIC {
        return Err(bad("not a fedcore-he key file"));
    }
    let tag = r.u8().map_err(|_| bad("truncated"))?;
    if tag != want {
        return Err(HeError::WrongRole {
            path: path.to_path_buf(),
            expected: role_name(want),
            found: role_name(tag),
        });
    }
    let n = r.u32().map_err(|_| bad("truncated"))? as usize;
    let json = r.take(n).map_err(|_| bad("truncated parameters"))?;
    let params: CkksParams =
        serde_json::from_slice(json).map_err(|e| key_err(path, format!("parameters: {e}")))?;
    let n = r.u64().map_err(|_| bad("truncated"))?;
    let public = r
        .take(usize::try_from(n).map_err(|_| bad("bad length"))?)
        .map_err(|_| bad("truncated public key"))?;
    let secret = if tag == Secret::TAG {
        let n = r.u64().map_err(|_| bad("truncated"))?;
        Some(
            r.take(usize::try_from(n).map_err(|_| bad("bad length"))?)
                .map_err(|_| bad("truncated secret key"))?,
        )
    } else {
        None
    };
    if !r.is_empty() {
        return Err(bad("trailing bytes"));
    }
    Ok(KeyFile {
        params,
        public,
        secret,
    })
}

pub(crate) fn read_key_file(path: &Path) -> Result<Vec<u8>> {
    let meta = fs::metadata(path).map_err(|e| key_err(path, e.to_string()))?;
    if meta.len() > MAX_KEY_FILE {
        return Err(key_err(path, format!("{} bytes is too large", meta.len())));
    }
    fs::read(path).map_err(|e| key_err(path, e.to_string()))
}

#[cfg(unix)]
pub(crate) fn check_private(path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mode = fs::metadata(path)
        .map_err(|e| key_err(path, e.to_string()))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(key_err(
            path,
            format!(
                "holds a secret key but has mode {:o}; chmod 600 it",
                mode & 0o777
            ),
        ));
    }
    Ok(())
}

#[cfg(not(unix))]
pub(crate) fn check_private(_: &Path) -> Result<()> {
    Ok(())
}

/// Writes a new file with mode 0600 (created with it, never widened first),
/// refusing to replace an existing one.
pub(crate) fn write_new(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path).map_err(|e| key_err(path, e.to_string()))?;
    let written = f.write_all(bytes).and_then(|()| f.sync_all());
    if let Err(e) = written {
        let _ = fs::remove_file(path);
        return Err(key_err(path, e.to_string()));
    }
    Ok(())
}
