//! The only module with `unsafe`: SEAL 4.0's C API (`sealc`), which the
//! `sealy` crate builds and links, behind owned handles.
//!
//! Why not `sealy`'s safe types: they keep their C handles private
//! (`pub(crate)`), encode only at the first level, and always pass
//! `save_seed = false` to symmetric encryption. What this crate needs —
//! encoding at a chosen level, seeded symmetric ciphertexts, uncompressed
//! saving (so that decompression is bounded on our side) — therefore goes
//! straight to the same C functions `sealy` links, declared below.
//!
//! Safety rules, for every function here:
//! - every handle is created by the matching `*_Create` call, owned by exactly
//!   one wrapper and destroyed exactly once in `Drop`;
//! - objects that SEAL builds from a context (keys, encoder, evaluator,
//!   encryptor, decryptor) hold an `Arc` of it, so the context outlives them
//!   (ciphertexts and plaintexts are plain data in SEAL and need none);
//! - every return code is checked; SEAL's C API catches the C++ exceptions of
//!   the calls used here (`invalid_argument`, `logic_error`, and
//!   `runtime_error` for loading), and callers validate what SEAL would
//!   otherwise reject with an exception it does not catch (finite inputs,
//!   bounded buffer sizes, matching levels), so no exception crosses the FFI
//!   boundary;
//! - buffers passed to SEAL are sized from SEAL's own size queries or checked
//!   against the slot count first.
#![allow(unsafe_code)]

use std::ffi::{c_char, c_int, c_long, c_void};
use std::ptr::null_mut;
use std::sync::Arc;

type Hr = c_long;
type Handle = *mut c_void;
/// `CKKSEncoder_Encode1` and `CKKSEncoder_Encode2`: encoder, slot count,
/// numbers, parms id, scale, destination plaintext, memory pool.
type ArrayEncoder =
    unsafe extern "C" fn(Handle, u64, *mut f64, *mut u64, f64, Handle, Handle) -> Hr;

/// `Evaluator_TransformToNTT2` and `Evaluator_TransformFromNTT`: evaluator,
/// source ciphertext, destination ciphertext.
type Transform = unsafe extern "C" fn(Handle, Handle, Handle) -> Hr;

const S_OK: Hr = 0;
const E_POINTER: Hr = 0x8000_4003_u32 as i32 as Hr;
const E_INVALIDARG: Hr = 0x8007_0057_u32 as i32 as Hr;
const E_OUTOFMEMORY: Hr = 0x8007_000E_u32 as i32 as Hr;
const COR_E_IO: Hr = 0x8013_1620_u32 as i32 as Hr;
const COR_E_INVALIDOPERATION: Hr = 0x8013_1509_u32 as i32 as Hr;

/// `seal::scheme_type::ckks`.
const SCHEME_CKKS: u8 = 2;
/// `seal::compr_mode_type::none`: this crate compresses on its own side.
const COMPR_NONE: u8 = 0;
/// `seal::sec_level_type::tc128`.
pub(crate) const SEC_TC128: c_int = 128;
/// `seal::sec_level_type::none`.
pub(crate) const SEC_NONE: c_int = 0;

// The declarations match SEAL 4.0's `native/src/seal/c/*.h`; the symbols come
// from `libsealc-4.0.a`, which `sealy`'s build script builds and links.
#[allow(non_snake_case)]
unsafe extern "C" {
    fn EncParams_Create1(scheme: u8, out: *mut Handle) -> Hr;
    fn EncParams_Destroy(p: Handle) -> Hr;
    fn EncParams_SetPolyModulusDegree(p: Handle, degree: u64) -> Hr;
    fn EncParams_SetCoeffModulus(p: Handle, len: u64, coeffs: *mut Handle) -> Hr;
    fn EncParams_GetParmsId(p: Handle, parms_id: *mut u64) -> Hr;
    fn CoeffModulus_Create1(degree: u64, len: u64, bits: *mut c_int, coeffs: *mut Handle) -> Hr;
    fn CoeffModulus_MaxBitCount(degree: u64, sec_level: c_int, bits: *mut c_int) -> Hr;
    fn Modulus_Destroy(p: Handle) -> Hr;
    fn Modulus_Value(p: Handle, value: *mut u64) -> Hr;

    fn SEALContext_Create(params: Handle, expand: bool, sec_level: c_int, out: *mut Handle) -> Hr;
    fn SEALContext_Destroy(p: Handle) -> Hr;
    fn SEALContext_ParametersSet(p: Handle, set: *mut bool) -> Hr;
    fn SEALContext_ParameterErrorMessage(p: Handle, out: *mut c_char, len: *mut u64) -> Hr;
    fn SEALContext_FirstContextData(p: Handle, out: *mut Handle) -> Hr;
    fn ContextData_NextContextData(p: Handle, out: *mut Handle) -> Hr;
    fn ContextData_Parms(p: Handle, out: *mut Handle) -> Hr;
    fn ContextData_TotalCoeffModulusBitCount(p: Handle, bits: *mut c_int) -> Hr;

    fn KeyGenerator_Create1(ctx: Handle, out: *mut Handle) -> Hr;
    fn KeyGenerator_Destroy(p: Handle) -> Hr;
    fn KeyGenerator_SecretKey(p: Handle, out: *mut Handle) -> Hr;
    fn KeyGenerator_CreatePublicKey(p: Handle, save_seed: bool, out: *mut Handle) -> Hr;
    fn KeyGenerator_Create2(ctx: Handle, sk: Handle, out: *mut Handle) -> Hr;
    fn KeyGenerator_CreateRelinKeys(p: Handle, save_seed: bool, out: *mut Handle) -> Hr;
    fn KeyGenerator_CreateGaloisKeysFromSteps(
        p: Handle,
        count: u64,
        steps: *mut c_int,
        save_seed: bool,
        out: *mut Handle,
    ) -> Hr;

    // Relinearization and Galois keys are both `KSwitchKeys` in the C API.
    fn KSwitchKeys_Create1(out: *mut Handle) -> Hr;
    fn KSwitchKeys_Destroy(p: Handle) -> Hr;
    fn KSwitchKeys_Size(p: Handle, out: *mut u64) -> Hr;
    fn KSwitchKeys_SaveSize(p: Handle, compr: u8, out: *mut i64) -> Hr;
    fn KSwitchKeys_Save(p: Handle, buf: *mut u8, size: u64, compr: u8, written: *mut i64) -> Hr;
    fn KSwitchKeys_Load(p: Handle, ctx: Handle, buf: *mut u8, size: u64, read: *mut i64) -> Hr;

    fn SecretKey_Create1(out: *mut Handle) -> Hr;
    fn SecretKey_Destroy(p: Handle) -> Hr;
    fn SecretKey_SaveSize(p: Handle, compr: u8, out: *mut i64) -> Hr;
    fn SecretKey_Save(p: Handle, buf: *mut u8, size: u64, compr: u8, written: *mut i64) -> Hr;
    fn SecretKey_Load(p: Handle, ctx: Handle, buf: *mut u8, size: u64, read: *mut i64) -> Hr;
    fn PublicKey_Create1(out: *mut Handle) -> Hr;
    fn PublicKey_Destroy(p: Handle) -> Hr;
    fn PublicKey_SaveSize(p: Handle, compr: u8, out: *mut i64) -> Hr;
    fn PublicKey_Save(p: Handle, buf: *mut u8, size: u64, compr: u8, written: *mut i64) -> Hr;
    fn PublicKey_Load(p: Handle, ctx: Handle, buf: *mut u8, size: u64, read: *mut i64) -> Hr;

    fn Encryptor_Create(ctx: Handle, pk: Handle, sk: Handle, out: *mut Handle) -> Hr;
    fn Encryptor_Destroy(p: Handle) -> Hr;
    fn Encryptor_Encrypt(p: Handle, plain: Handle, dest: Handle, pool: Handle) -> Hr;
    fn Encryptor_EncryptSymmetric(
        p: Handle,
        plain: Handle,
        save_seed: bool,
        dest: Handle,
        pool: Handle,
    ) -> Hr;
    fn Decryptor_Create(ctx: Handle, sk: Handle, out: *mut Handle) -> Hr;
    fn Decryptor_Destroy(p: Handle) -> Hr;
    fn Decryptor_Decrypt(p: Handle, enc: Handle, dest: Handle) -> Hr;

    fn CKKSEncoder_Create(ctx: Handle, out: *mut Handle) -> Hr;
    fn CKKSEncoder_Destroy(p: Handle) -> Hr;
    fn CKKSEncoder_SlotCount(p: Handle, out: *mut u64) -> Hr;
    fn CKKSEncoder_Encode1(
        p: Handle,
        count: u64,
        values: *mut f64,
        parms_id: *mut u64,
        scale: f64,
        dest: Handle,
        pool: Handle,
    ) -> Hr;
    fn CKKSEncoder_Encode2(
        p: Handle,
        count: u64,
        complex_values: *mut f64,
        parms_id: *mut u64,
        scale: f64,
        dest: Handle,
        pool: Handle,
    ) -> Hr;
    fn CKKSEncoder_Encode3(
        p: Handle,
        value: f64,
        parms_id: *mut u64,
        scale: f64,
        dest: Handle,
        pool: Handle,
    ) -> Hr;
    fn CKKSEncoder_Decode1(
        p: Handle,
        plain: Handle,
        count: *mut u64,
        values: *mut f64,
        pool: Handle,
    ) -> Hr;

    fn CKKSEncoder_Decode2(
        p: Handle,
        plain: Handle,
        count: *mut u64,
        complex_values: *mut f64,
        pool: Handle,
    ) -> Hr;

    fn Evaluator_Create(ctx: Handle, out: *mut Handle) -> Hr;
    fn Evaluator_Destroy(p: Handle) -> Hr;
    fn Evaluator_Add(p: Handle, a: Handle, b: Handle, dest: Handle) -> Hr;
    fn Evaluator_Sub(p: Handle, a: Handle, b: Handle, dest: Handle) -> Hr;
    fn Evaluator_TransformToNTT2(p: Handle, a: Handle, dest: Handle) -> Hr;
    fn Evaluator_TransformFromNTT(p: Handle, a: Handle, dest: Handle) -> Hr;
    fn Evaluator_Multiply(p: Handle, a: Handle, b: Handle, dest: Handle, pool: Handle) -> Hr;
    fn Evaluator_Relinearize(
        p: Handle,
        enc: Handle,
        relin: Handle,
        dest: Handle,
        pool: Handle,
    ) -> Hr;
    fn Evaluator_RotateVector(
        p: Handle,
        enc: Handle,
        steps: c_int,
        galois: Handle,
        dest: Handle,
        pool: Handle,
    ) -> Hr;
    fn Evaluator_MultiplyPlain(
        p: Handle,
        enc: Handle,
        plain: Handle,
        dest: Handle,
        pool: Handle,
    ) -> Hr;

    fn Ciphertext_Create1(pool: Handle, out: *mut Handle) -> Hr;
    fn Ciphertext_Create2(copy: Handle, out: *mut Handle) -> Hr;
    fn Ciphertext_Destroy(p: Handle) -> Hr;
    fn Ciphertext_Size(p: Handle, out: *mut u64) -> Hr;
    fn Ciphertext_ParmsId(p: Handle, out: *mut u64) -> Hr;
    fn Ciphertext_Scale(p: Handle, out: *mut f64) -> Hr;
    fn Ciphertext_IsNTTForm(p: Handle, out: *mut bool) -> Hr;
    fn Ciphertext_IsTransparent(p: Handle, out: *mut bool) -> Hr;
    fn Ciphertext_SaveSize(p: Handle, compr: u8, out: *mut i64) -> Hr;
    fn Ciphertext_Save(p: Handle, buf: *mut u8, size: u64, compr: u8, written: *mut i64) -> Hr;
    fn Ciphertext_Load(p: Handle, ctx: Handle, buf: *mut u8, size: u64, read: *mut i64) -> Hr;

    fn Plaintext_Create1(pool: Handle, out: *mut Handle) -> Hr;
    fn Plaintext_Destroy(p: Handle) -> Hr;
}

/// A failed SEAL call: which function, and SEAL's error class.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SealFailure {
    pub(crate) call: &'static str,
    pub(crate) class: &'static str,
}

impl std::fmt::Display for SealFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SEAL {} failed: {}", self.call, self.class)
    }
}

type SealResult<T> = Result<T, SealFailure>;

fn check(call: &'static str, hr: Hr) -> SealResult<()> {
    if hr == S_OK {
        return Ok(());
    }
    let class = match hr {
        E_POINTER => "null pointer",
        E_INVALIDARG => "invalid argument",
        E_OUTOFMEMORY => "out of memory",
        COR_E_IO => "malformed or truncated input",
        COR_E_INVALIDOPERATION => "invalid data or operation",
        _ => "unexpected error",
    };
    Err(SealFailure { call, class })
}

/// Destroys a handle; a failing destructor cannot be reported from `Drop`,
/// and SEAL's destructors only fail on a null pointer, which never reaches them.
macro_rules! owned {
    ($name:ident, $destroy:ident) => {
        impl Drop for $name {
            fn drop(&mut self) {
                // SAFETY: the handle was created by SEAL, is owned by this value
                // alone and is destroyed only here.
                let _ = unsafe { $destroy(self.h) };
            }
        }
    };
}

/// A new handle from a SEAL constructor, checked for success and non-null.
fn create(call: &'static str, f: impl FnOnce(*mut Handle) -> Hr) -> SealResult<Handle> {
    let mut h: Handle = null_mut();
    check(call, f(&mut h))?;
    if h.is_null() {
        return Err(SealFailure {
            call,
            class: "null handle",
        });
    }
    Ok(h)
}

/// A SEAL `parms_id`: the hash that names one level of the modulus chain.
pub(crate) type ParmsId = [u64; 4];

/// One level of the modulus chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Level {
    pub(crate) parms_id: ParmsId,
    /// Bits of the product of this level's primes.
    pub(crate) modulus_bits: u32,
    /// Number of primes at this level.
    pub(crate) primes: usize,
}

/// A SEAL context for CKKS with its modulus chain, data levels first.
pub(crate) struct Context {
    h: Handle,
    pub(crate) levels: Vec<Level>,
    /// Every prime of the coefficient modulus, in order: the data primes,
    /// then the special prime (the key level holds all of them; data level
    /// `i` holds the first `levels[i].primes`).
    pub(crate) primes: Vec<u64>,
}
owned!(Context, SEALContext_Destroy);
// SAFETY: a SEALContext is immutable after construction and SEAL documents
// const access to it as thread-safe.
unsafe impl Send for Context {}
// SAFETY: as above.
unsafe impl Sync for Context {}

/// The largest total coefficient-modulus bit count at 128-bit classical
/// security for `degree` (HE standard tables, as SEAL ships them); `None`
/// for degrees SEAL does not know.
pub(crate) fn max_bits_128(degree: usize) -> Option<u32> {
    let mut bits: c_int = 0;
    // SAFETY: plain value arguments and a valid out-pointer.
    let hr = unsafe { CoeffModulus_MaxBitCount(degree as u64, SEC_TC128, &mut bits) };
    (hr == S_OK && bits > 0).then_some(bits as u32)
}

/// Owned SEAL `Modulus` handles (null entries are skipped).
struct Moduli(Vec<Handle>);

impl Drop for Moduli {
    fn drop(&mut self) {
        for &m in &self.0 {
            if !m.is_null() {
                // SAFETY: each was allocated by CoeffModulus_Create1 and is
                // destroyed once, here.
                let _ = unsafe { Modulus_Destroy(m) };
            }
        }
    }
}

impl Context {
    /// A CKKS context; `sec_level` is [`SEC_TC128`] or [`SEC_NONE`]. Returns
    /// SEAL's own reason when the parameters are not valid.
    pub(crate) fn new(degree: usize, bits: &[u32], sec_level: c_int) -> Result<Self, String> {
        let mut sizes: Vec<c_int> = bits.iter().map(|&b| b as c_int).collect();
        let mut moduli = Moduli(vec![null_mut(); sizes.len()]);
        // SAFETY: `sizes` and `moduli` both hold `sizes.len()` elements; SEAL
        // writes one owned Modulus pointer per element on success.
        check("CoeffModulus_Create1", unsafe {
            CoeffModulus_Create1(
                degree as u64,
                sizes.len() as u64,
                sizes.as_mut_ptr(),
                moduli.0.as_mut_ptr(),
            )
        })
        .map_err(|_| {
            format!(
                "SEAL cannot make {} primes of {bits:?} bits for degree {degree}",
                bits.len()
            )
        })?;
        Self::with_moduli(degree, moduli, sec_level)
    }

    /// A CKKS context over `moduli` (destroyed when it returns: SEAL copies
    /// them).
    fn with_moduli(degree: usize, mut moduli: Moduli, sec_level: c_int) -> Result<Self, String> {
        let fail = |e: SealFailure| e.to_string();
        struct Params(Handle);
        impl Drop for Params {
            fn drop(&mut self) {
                // SAFETY: created below by EncParams_Create1, destroyed once.
                let _ = unsafe { EncParams_Destroy(self.0) };
            }
        }
        // SAFETY: valid out-pointer.
        let params = Params(
            create("EncParams_Create1", |o| unsafe {
                EncParams_Create1(SCHEME_CKKS, o)
            })
            .map_err(fail)?,
        );
        // SAFETY: live handle, plain value.
        check("EncParams_SetPolyModulusDegree", unsafe {
            EncParams_SetPolyModulusDegree(params.0, degree as u64)
        })
        .map_err(fail)?;
        let mut primes = Vec::with_capacity(moduli.0.len());
        for &m in &moduli.0 {
            let mut v = 0u64;
            // SAFETY: live Modulus handle, valid out-pointer.
            check("Modulus_Value", unsafe { Modulus_Value(m, &mut v) }).map_err(fail)?;
            primes.push(v);
        }
        // SAFETY: live handles; SEAL copies the moduli.
        check("EncParams_SetCoeffModulus", unsafe {
            EncParams_SetCoeffModulus(params.0, moduli.0.len() as u64, moduli.0.as_mut_ptr())
        })
        .map_err(fail)?;
        // SAFETY: live parameters handle, valid out-pointer.
        let h = create("SEALContext_Create", |o| unsafe {
            SEALContext_Create(params.0, true, sec_level, o)
        })
        .map_err(fail)?;
        let mut ctx = Self {
            h,
            levels: Vec::new(),
            primes,
        };
        let mut set = false;
        // SAFETY: live context handle, valid out-pointer.
        check("SEALContext_ParametersSet", unsafe {
            SEALContext_ParametersSet(ctx.h, &mut set)
        })
        .map_err(fail)?;
        if !set {
            return Err(ctx.error_message());
        }
        ctx.levels = ctx.chain().map_err(fail)?;
        Ok(ctx)
    }

    fn error_message(&self) -> String {
        let mut len = 0u64;
        // SAFETY: a null buffer asks for the length only.
        if unsafe { SEALContext_ParameterErrorMessage(self.h, null_mut(), &mut len) } != S_OK {
            return "SEAL refused the parameters".into();
        }
        let mut buf = vec![0u8; len as usize];
        // SAFETY: `buf` has the `len` bytes SEAL copies.
        if unsafe { SEALContext_ParameterErrorMessage(self.h, buf.as_mut_ptr().cast(), &mut len) }
            != S_OK
        {
            return "SEAL refused the parameters".into();
        }
        format!(
            "SEAL refused the parameters: {}",
            String::from_utf8_lossy(&buf)
        )
    }

    /// The data levels, from the first (all primes but the special one) down
    /// to the last (one prime).
    fn chain(&self) -> SealResult<Vec<Level>> {
        let mut levels = Vec::new();
        // SAFETY: live context; the returned ContextData pointers are borrowed
        // from the context (never destroyed here) and live as long as it does.
        let mut data = create("SEALContext_FirstContextData", |o| unsafe {
            SEALContext_FirstContextData(self.h, o)
        })?;
        loop {
            let mut bits: c_int = 0;
            // SAFETY: `data` is a live ContextData of this context.
            check("ContextData_TotalCoeffModulusBitCount", unsafe {
                ContextData_TotalCoeffModulusBitCount(data, &mut bits)
            })?;
            // SAFETY: ContextData_Parms returns a new EncryptionParameters copy
            // that this block owns and destroys.
            let parms = create("ContextData_Parms", |o| unsafe {
                ContextData_Parms(data, o)
            })?;
            let mut parms_id = [0u64; 4];
            // SAFETY: live parameters, a 4-word out buffer.
            let hr = unsafe { EncParams_GetParmsId(parms, parms_id.as_mut_ptr()) };
            // SAFETY: destroyed once, right after its last use.
            let _ = unsafe { EncParams_Destroy(parms) };
            check("EncParams_GetParmsId", hr)?;
            levels.push(Level {
                parms_id,
                modulus_bits: bits as u32,
                primes: 0,
            });
            let mut next: Handle = null_mut();
            // SAFETY: live ContextData, valid out-pointer; null means the end.
            check("ContextData_NextContextData", unsafe {
                ContextData_NextContextData(data, &mut next)
            })?;
            if next.is_null() {
                break;
            }
            data = next;
        }
        let n = levels.len();
        for (i, l) in levels.iter_mut().enumerate() {
            l.primes = n - i;
        }
        Ok(levels)
    }

    /// The level a `parms_id` names, as an index into `levels`.
    pub(crate) fn level_of(&self, parms_id: &ParmsId) -> Option<usize> {
        self.levels.iter().position(|l| &l.parms_id == parms_id)
    }
}

/// Owned SEAL secret key.
pub(crate) struct SecretKey {
    h: Handle,
    _ctx: Arc<Context>,
}
owned!(SecretKey, SecretKey_Destroy);
// SAFETY: keys are immutable after creation.
unsafe impl Send for SecretKey {}
// SAFETY: as above.
unsafe impl Sync for SecretKey {}

/// Owned SEAL public key.
pub(crate) struct PublicKey {
    h: Handle,
    _ctx: Arc<Context>,
}
owned!(PublicKey, PublicKey_Destroy);
// SAFETY: keys are immutable after creation.
unsafe impl Send for PublicKey {}
// SAFETY: as above.
unsafe impl Sync for PublicKey {}

/// Owned SEAL key generator (only while keys are made).
struct KeyGenerator {
    h: Handle,
}
owned!(KeyGenerator, KeyGenerator_Destroy);

/// A fresh key pair for `ctx`.
pub(crate) fn keygen(ctx: &Arc<Context>) -> SealResult<(SecretKey, PublicKey)> {
    // SAFETY: live context, valid out-pointer.
    let kg = create("KeyGenerator_Create1", |o| unsafe {
        KeyGenerator_Create1(ctx.h, o)
    })?;
    let kg = KeyGenerator { h: kg };
    // SAFETY: live key generator; SEAL returns a new owned copy of each key.
    let sk = create("KeyGenerator_SecretKey", |o| unsafe {
        KeyGenerator_SecretKey(kg.h, o)
    })?;
    let sk = SecretKey {
        h: sk,
        _ctx: ctx.clone(),
    };
    // SAFETY: as above.
    let pk = create("KeyGenerator_CreatePublicKey", |o| unsafe {
        KeyGenerator_CreatePublicKey(kg.h, false, o)
    })?;
    Ok((
        sk,
        PublicKey {
            h: pk,
            _ctx: ctx.clone(),
        },
    ))
}

/// A scalar property of a live SEAL object, read through its getter.
fn get<T: Default>(
    call: &'static str,
    h: Handle,
    getter: unsafe extern "C" fn(Handle, *mut T) -> Hr,
) -> SealResult<T> {
    let mut out = T::default();
    // SAFETY: `h` is a live handle of the type `getter` reads, and `out` a
    // valid out-pointer of the type it writes.
    check(call, unsafe { getter(h, &mut out) })?;
    Ok(out)
}

/// Saves any SEAL object with the matching `SaveSize`/`Save` pair, uncompressed.
fn save(
    call: &'static str,
    h: Handle,
    size: unsafe extern "C" fn(Handle, u8, *mut i64) -> Hr,
    save: unsafe extern "C" fn(Handle, *mut u8, u64, u8, *mut i64) -> Hr,
) -> SealResult<Vec<u8>> {
    let mut n: i64 = 0;
    // SAFETY: live handle of the type `size` expects, valid out-pointer.
    check(call, unsafe { size(h, COMPR_NONE, &mut n) })?;
    let mut buf = vec![0u8; n.max(0) as usize];
    let mut written: i64 = 0;
    // SAFETY: `buf` has the `n` bytes SEAL asked for.
    check(call, unsafe {
        save(
            h,
            buf.as_mut_ptr(),
            buf.len() as u64,
            COMPR_NONE,
            &mut written,
        )
    })?;
    buf.truncate(written.max(0) as usize);
    Ok(buf)
}

/// Loads into a fresh object with `load`; SEAL validates the data against
/// `ctx` (parameters, ranges) and reports malformed input as an error code.
fn load(
    call: &'static str,
    h: Handle,
    ctx: &Context,
    bytes: &[u8],
    load: unsafe extern "C" fn(Handle, Handle, *mut u8, u64, *mut i64) -> Hr,
) -> SealResult<usize> {
    let mut read: i64 = 0;
    // SAFETY: SEAL only reads `bytes.len()` bytes from the pointer (the C API
    // takes it as non-const but does not write through it).
    check(call, unsafe {
        load(
            h,
            ctx.h,
            bytes.as_ptr().cast_mut(),
            bytes.len() as u64,
            &mut read,
        )
    })?;
    Ok(read.max(0) as usize)
}

/// [`load`] that must consume every byte: trailing bytes are an error.
fn load_all_of(
    call: &'static str,
    h: Handle,
    ctx: &Context,
    bytes: &[u8],
    loader: unsafe extern "C" fn(Handle, Handle, *mut u8, u64, *mut i64) -> Hr,
) -> SealResult<()> {
    if load(call, h, ctx, bytes, loader)? != bytes.len() {
        return Err(SealFailure {
            call,
            class: "trailing bytes after the object",
        });
    }
    Ok(())
}

impl SecretKey {
    pub(crate) fn to_bytes(&self) -> SealResult<Vec<u8>> {
        save("SecretKey_Save", self.h, SecretKey_SaveSize, SecretKey_Save)
    }

    pub(crate) fn from_bytes(ctx: &Arc<Context>, bytes: &[u8]) -> SealResult<Self> {
        // SAFETY: valid out-pointer.
        let h = create("SecretKey_Create1", |o| unsafe { SecretKey_Create1(o) })?;
        let key = Self {
            h,
            _ctx: ctx.clone(),
        };
        load("SecretKey_Load", key.h, ctx, bytes, SecretKey_Load)?;
        Ok(key)
    }
}

impl PublicKey {
    pub(crate) fn to_bytes(&self) -> SealResult<Vec<u8>> {
        save("PublicKey_Save", self.h, PublicKey_SaveSize, PublicKey_Save)
    }

    pub(crate) fn from_bytes(ctx: &Arc<Context>, bytes: &[u8]) -> SealResult<Self> {
        // SAFETY: valid out-pointer.
        let h = create("PublicKey_Create1", |o| unsafe { PublicKey_Create1(o) })?;
        let key = Self {
            h,
            _ctx: ctx.clone(),
        };
        load("PublicKey_Load", key.h, ctx, bytes, PublicKey_Load)?;
        Ok(key)
    }
}

/// Owned SEAL key-switching keys: the relinearization keys or the Galois
/// (rotation) keys.
pub(crate) struct KSwitchKeys {
    h: Handle,
    _ctx: Arc<Context>,
}
owned!(KSwitchKeys, KSwitchKeys_Destroy);
// SAFETY: keys are immutable after creation.
unsafe impl Send for KSwitchKeys {}
// SAFETY: as above.
unsafe impl Sync for KSwitchKeys {}

/// The relinearization keys and the Galois keys for rotations by `steps`,
/// derived from `sk`, as SEAL's seeded serializations (about half the
/// bytes; only loading makes them usable).
pub(crate) fn evaluation_keys(
    ctx: &Arc<Context>,
    sk: &SecretKey,
    steps: &[i32],
) -> SealResult<(Vec<u8>, Vec<u8>)> {
    // SAFETY: live context and secret key, valid out-pointer.
    let kg = create("KeyGenerator_Create2", |o| unsafe {
        KeyGenerator_Create2(ctx.h, sk.h, o)
    })?;
    let kg = KeyGenerator { h: kg };
    // SAFETY: live key generator; SEAL returns a new owned object.
    let relin = create("KeyGenerator_CreateRelinKeys", |o| unsafe {
        KeyGenerator_CreateRelinKeys(kg.h, true, o)
    })?;
    let relin = KSwitchKeys {
        h: relin,
        _ctx: ctx.clone(),
    };
    let mut steps: Vec<c_int> = steps.iter().map(|&s| s as c_int).collect();
    // SAFETY: SEAL reads `steps.len()` ints; returns a new owned object.
    let galois = create("KeyGenerator_CreateGaloisKeysFromSteps", |o| unsafe {
        KeyGenerator_CreateGaloisKeysFromSteps(
            kg.h,
            steps.len() as u64,
            steps.as_mut_ptr(),
            true,
            o,
        )
    })?;
    let galois = KSwitchKeys {
        h: galois,
        _ctx: ctx.clone(),
    };
    Ok((relin.to_bytes()?, galois.to_bytes()?))
}

impl KSwitchKeys {
    pub(crate) fn to_bytes(&self) -> SealResult<Vec<u8>> {
        save(
            "KSwitchKeys_Save",
            self.h,
            KSwitchKeys_SaveSize,
            KSwitchKeys_Save,
        )
    }

    /// Loads and validates against `ctx` (SEAL checks the parameters, the
    /// key level and every coefficient); a seeded serialization is expanded.
    pub(crate) fn from_bytes(ctx: &Arc<Context>, bytes: &[u8]) -> SealResult<Self> {
        // SAFETY: valid out-pointer.
        let h = create("KSwitchKeys_Create1", |o| unsafe { KSwitchKeys_Create1(o) })?;
        let keys = Self {
            h,
            _ctx: ctx.clone(),
        };
        load_all_of("KSwitchKeys_Load", keys.h, ctx, bytes, KSwitchKeys_Load)?;
        Ok(keys)
    }

    /// Number of keys held (1 for relinearization keys, one per rotation
    /// step for Galois keys).
    pub(crate) fn size(&self) -> SealResult<u64> {
        get("KSwitchKeys_Size", self.h, KSwitchKeys_Size)
    }
}

/// Owned SEAL ciphertext.
pub(crate) struct Ciphertext {
    h: Handle,
}
owned!(Ciphertext, Ciphertext_Destroy);
// SAFETY: a ciphertext is plain data; this crate never mutates one that
// another thread reads (`&mut` is needed for writes).
unsafe impl Send for Ciphertext {}
// SAFETY: as above.
unsafe impl Sync for Ciphertext {}

impl Ciphertext {
    fn empty() -> SealResult<Self> {
        // SAFETY: null pool = SEAL's global pool; valid out-pointer.
        let h = create("Ciphertext_Create1", |o| unsafe {
            Ciphertext_Create1(null_mut(), o)
        })?;
        Ok(Self { h })
    }

    pub(crate) fn parms_id(&self) -> SealResult<ParmsId> {
        let mut id = [0u64; 4];
        // SAFETY: live handle, a 4-word out buffer.
        check("Ciphertext_ParmsId", unsafe {
            Ciphertext_ParmsId(self.h, id.as_mut_ptr())
        })?;
        Ok(id)
    }

    pub(crate) fn scale(&self) -> SealResult<f64> {
        get("Ciphertext_Scale", self.h, Ciphertext_Scale)
    }

    /// Number of polynomials (2 for a fresh or plaintext-multiplied ciphertext).
    pub(crate) fn size(&self) -> SealResult<u64> {
        get("Ciphertext_Size", self.h, Ciphertext_Size)
    }

    pub(crate) fn is_ntt_form(&self) -> SealResult<bool> {
        get("Ciphertext_IsNTTForm", self.h, Ciphertext_IsNTTForm)
    }

    /// Whether the second polynomial is zero, so that the first is the
    /// plaintext itself: no encryption at all (SEAL refuses products with
    /// such a ciphertext).
    pub(crate) fn is_transparent(&self) -> SealResult<bool> {
        get("Ciphertext_IsTransparent", self.h, Ciphertext_IsTransparent)
    }

    /// SEAL's uncompressed serialization. A ciphertext from seeded symmetric
    /// encryption is written as its first polynomial plus the 64-byte seed.
    pub(crate) fn to_bytes(&self) -> SealResult<Vec<u8>> {
        save(
            "Ciphertext_Save",
            self.h,
            Ciphertext_SaveSize,
            Ciphertext_Save,
        )
    }

    /// Loads and validates against `ctx` (parameters known to the context,
    /// coefficients reduced, sizes consistent); a seeded ciphertext is expanded.
    pub(crate) fn from_bytes(ctx: &Context, bytes: &[u8]) -> SealResult<Self> {
        let c = Self::empty()?;
        load_all_of("Ciphertext_Load", c.h, ctx, bytes, Ciphertext_Load)?;
        Ok(c)
    }
}

/// Owned SEAL plaintext (an encoded polynomial).
pub(crate) struct Plaintext {
    h: Handle,
}
owned!(Plaintext, Plaintext_Destroy);
// SAFETY: plain data, written only through `&mut`.
unsafe impl Send for Plaintext {}
// SAFETY: as above.
unsafe impl Sync for Plaintext {}

impl Plaintext {
    fn empty() -> SealResult<Self> {
        // SAFETY: null pool = SEAL's global pool; valid out-pointer.
        let h = create("Plaintext_Create1", |o| unsafe {
            Plaintext_Create1(null_mut(), o)
        })?;
        Ok(Self { h })
    }
}

/// CKKS encoder, evaluator and, where a key is given, encryptor and decryptor
/// for one context. SEAL's `const` operations on these objects are
/// thread-safe, so one `Engine` serves every thread.
pub(crate) struct Engine {
    ctx: Arc<Context>,
    encoder: Handle,
    evaluator: Handle,
    encryptor: Handle,
    decryptor: Handle,
    slots: usize,
    // The keys the encryptor and decryptor point into.
    keys: (Option<Arc<SecretKey>>, Option<Arc<PublicKey>>),
}
// SAFETY: see the type's documentation; the handles are owned and only used
// through SEAL's const (thread-safe) methods.
unsafe impl Send for Engine {}
// SAFETY: as above.
unsafe impl Sync for Engine {}

impl Drop for Engine {
    fn drop(&mut self) {
        // SAFETY: each non-null handle was created in `Engine::new` and is
        // destroyed once, before the keys and context they refer to.
        unsafe {
            if !self.encryptor.is_null() {
                let _ = Encryptor_Destroy(self.encryptor);
            }
            if !self.decryptor.is_null() {
                let _ = Decryptor_Destroy(self.decryptor);
            }
            let _ = Evaluator_Destroy(self.evaluator);
            let _ = CKKSEncoder_Destroy(self.encoder);
        }
    }
}

impl Engine {
    pub(crate) fn new(
        ctx: Arc<Context>,
        secret: Option<Arc<SecretKey>>,
        public: Option<Arc<PublicKey>>,
    ) -> SealResult<Self> {
        let mut e = Self {
            encoder: null_mut(),
            evaluator: null_mut(),
            encryptor: null_mut(),
            decryptor: null_mut(),
            slots: 0,
            keys: (secret, public),
            ctx,
        };
        // SAFETY (all below): live context and key handles, valid out-pointers;
        // the handles are stored in `e` at once so that `Drop` frees them on
        // any later error.
        e.encoder = create("CKKSEncoder_Create", |o| unsafe {
            CKKSEncoder_Create(e.ctx.h, o)
        })?;
        e.evaluator = create("Evaluator_Create", |o| unsafe {
            Evaluator_Create(e.ctx.h, o)
        })?;
        let sk = e.keys.0.as_ref().map_or(null_mut(), |k| k.h);
        let pk = e.keys.1.as_ref().map_or(null_mut(), |k| k.h);
        if !sk.is_null() || !pk.is_null() {
            e.encryptor = create("Encryptor_Create", |o| unsafe {
                Encryptor_Create(e.ctx.h, pk, sk, o)
            })?;
        }
        if !sk.is_null() {
            e.decryptor = create("Decryptor_Create", |o| unsafe {
                Decryptor_Create(e.ctx.h, sk, o)
            })?;
        }
        let mut slots = 0u64;
        // SAFETY: live encoder, valid out-pointer.
        check("CKKSEncoder_SlotCount", unsafe {
            CKKSEncoder_SlotCount(e.encoder, &mut slots)
        })?;
        e.slots = slots as usize;
        Ok(e)
    }

    pub(crate) fn context(&self) -> &Arc<Context> {
        &self.ctx
    }

    pub(crate) fn slots(&self) -> usize {
        self.slots
    }

    /// Encodes at most `slots` finite values at `level` with `scale`.
    pub(crate) fn encode(&self, values: &[f64], level: usize, scale: f64) -> SealResult<Plaintext> {
        debug_assert!(values.len() <= self.slots && values.iter().all(|v| v.is_finite()));
        self.encode_array(
            ("CKKSEncoder_Encode1", CKKSEncoder_Encode1),
            values,
            1,
            level,
            scale,
        )
    }

    /// Encodes `data` with one of SEAL's array encoders, whose slots hold
    /// `per` numbers each (1: `CKKSEncoder_Encode1`, reals; 2:
    /// `CKKSEncoder_Encode2`, interleaved real and imaginary parts).
    fn encode_array(
        &self,
        (name, encoder): (&'static str, ArrayEncoder),
        data: &[f64],
        per: usize,
        level: usize,
        scale: f64,
    ) -> SealResult<Plaintext> {
        assert!(data.len().is_multiple_of(per) && data.len() <= per * self.slots);
        let p = Plaintext::empty()?;
        let mut id = self.ctx.levels[level].parms_id;
        // SAFETY: live encoder and plaintext; SEAL reads `per` numbers for
        // each of the `data.len() / per` slots (at most the slot count,
        // asserted above), all within `data`, and 4 id words.
        check(name, unsafe {
            encoder(
                self.encoder,
                (data.len() / per) as u64,
                data.as_ptr().cast_mut(),
                id.as_mut_ptr(),
                scale,
                p.h,
                null_mut(),
            )
        })?;
        Ok(p)
    }

    /// Encodes at most `2 * slots` finite values at `level` with `scale`,
    /// two per slot: `values[2k]` as slot `k`'s real part, `values[2k + 1]`
    /// as its imaginary part (0 when `values` has odd length).
    pub(crate) fn encode_complex(
        &self,
        values: &[f64],
        level: usize,
        scale: f64,
    ) -> SealResult<Plaintext> {
        debug_assert!(values.len() <= 2 * self.slots && values.iter().all(|v| v.is_finite()));
        let mut padded;
        let pairs = if values.len() % 2 == 1 {
            padded = values.to_vec();
            padded.push(0.0);
            &padded[..]
        } else {
            values
        };
        self.encode_array(
            ("CKKSEncoder_Encode2", CKKSEncoder_Encode2),
            pairs,
            2,
            level,
            scale,
        )
    }

    /// Encodes one finite value in every slot at `level` with `scale`.
    pub(crate) fn encode_scalar(
        &self,
        value: f64,
        level: usize,
        scale: f64,
    ) -> SealResult<Plaintext> {
        debug_assert!(value.is_finite());
        let p = Plaintext::empty()?;
        let mut id = self.ctx.levels[level].parms_id;
        // SAFETY: live encoder and plaintext, a 4-word id.
        check("CKKSEncoder_Encode3", unsafe {
            CKKSEncoder_Encode3(self.encoder, value, id.as_mut_ptr(), scale, p.h, null_mut())
        })?;
        Ok(p)
    }

    /// Decodes all `slots` values.
    pub(crate) fn decode(&self, p: &Plaintext) -> SealResult<Vec<f64>> {
        let mut out = vec![0.0f64; self.slots];
        let mut n = 0u64;
        // SAFETY: SEAL writes at most `slots` values (a CKKS plaintext decodes
        // to exactly the slot count) into a buffer of that size.
        check("CKKSEncoder_Decode1", unsafe {
            CKKSEncoder_Decode1(self.encoder, p.h, &mut n, out.as_mut_ptr(), null_mut())
        })?;
        out.truncate(n as usize);
        Ok(out)
    }

    /// Decodes all `slots` complex values as `2 * slots` numbers: slot
    /// `k`'s real part, then its imaginary part.
    pub(crate) fn decode_complex(&self, p: &Plaintext) -> SealResult<Vec<f64>> {
        let mut out = vec![0.0f64; 2 * self.slots];
        let mut n = 0u64;
        // SAFETY: SEAL writes `slots` complex values (two doubles each; a
        // CKKS plaintext decodes to exactly the slot count) into a buffer of
        // twice that size.
        check("CKKSEncoder_Decode2", unsafe {
            CKKSEncoder_Decode2(self.encoder, p.h, &mut n, out.as_mut_ptr(), null_mut())
        })?;
        out.truncate(2 * n as usize);
        Ok(out)
    }

    /// Public-key encryption (asymmetric): anyone with the public key.
    pub(crate) fn encrypt_public(&self, p: &Plaintext) -> SealResult<Ciphertext> {
        self.require(self.keys.1.is_some(), "Encryptor_Encrypt")?;
        let c = Ciphertext::empty()?;
        // SAFETY: live encryptor with a public key, plaintext and destination.
        check("Encryptor_Encrypt", unsafe {
            Encryptor_Encrypt(self.encryptor, p.h, c.h, null_mut())
        })?;
        Ok(c)
    }

    /// Secret-key encryption. With `seeded`, the second polynomial is replaced
    /// by the PRNG seed it expands from: about half the bytes when saved, but
    /// such a ciphertext is only good for saving (SEAL expands it on load).
    pub(crate) fn encrypt_symmetric(&self, p: &Plaintext, seeded: bool) -> SealResult<Ciphertext> {
        self.require(self.keys.0.is_some(), "Encryptor_EncryptSymmetric")?;
        let c = Ciphertext::empty()?;
        // SAFETY: live encryptor with a secret key, plaintext and destination.
        check("Encryptor_EncryptSymmetric", unsafe {
            Encryptor_EncryptSymmetric(self.encryptor, p.h, seeded, c.h, null_mut())
        })?;
        Ok(c)
    }

    pub(crate) fn decrypt(&self, c: &Ciphertext) -> SealResult<Plaintext> {
        self.require(!self.decryptor.is_null(), "Decryptor_Decrypt")?;
        let p = Plaintext::empty()?;
        // SAFETY: live decryptor, a valid (loaded or computed) ciphertext.
        check("Decryptor_Decrypt", unsafe {
            Decryptor_Decrypt(self.decryptor, c.h, p.h)
        })?;
        Ok(p)
    }

    /// The same ciphertext with every polynomial taken to the NTT domain;
    /// `c` must be in coefficient form (SEAL refuses one already in NTT form).
    pub(crate) fn to_ntt(&self, c: &Ciphertext) -> SealResult<Ciphertext> {
        self.transform(("Evaluator_TransformToNTT2", Evaluator_TransformToNTT2), c)
    }

    /// The same ciphertext with every polynomial taken back to coefficient
    /// form; `c` must be in NTT form (SEAL refuses one that is not).
    pub(crate) fn to_coefficients(&self, c: &Ciphertext) -> SealResult<Ciphertext> {
        self.transform(
            ("Evaluator_TransformFromNTT", Evaluator_TransformFromNTT),
            c,
        )
    }

    /// `c` through one of SEAL's NTT transforms, into a new ciphertext.
    fn transform(
        &self,
        (name, transform): (&'static str, Transform),
        c: &Ciphertext,
    ) -> SealResult<Ciphertext> {
        let d = Ciphertext::empty()?;
        // SAFETY: live evaluator, a valid ciphertext and a fresh destination;
        // SEAL checks the form and the parameters and reports a mismatch as an
        // `invalid_argument`, which its C API catches.
        check(name, unsafe { transform(self.evaluator, c.h, d.h) })?;
        Ok(d)
    }

    /// A deep copy of `c`.
    pub(crate) fn copy(&self, c: &Ciphertext) -> SealResult<Ciphertext> {
        // SAFETY: live source handle; SEAL deep-copies it into a new object.
        let h = create("Ciphertext_Create2", |o| unsafe {
            Ciphertext_Create2(c.h, o)
        })?;
        Ok(Ciphertext { h })
    }

    /// `a += b` (same level and scale, checked by SEAL).
    pub(crate) fn add_inplace(&self, a: &mut Ciphertext, b: &Ciphertext) -> SealResult<()> {
        // SAFETY: live handles; SEAL allows the destination to alias the
        // first operand.
        check("Evaluator_Add", unsafe {
            Evaluator_Add(self.evaluator, a.h, b.h, a.h)
        })
    }

    /// `c * p` into a new ciphertext (same level, checked by SEAL; the
    /// product of scales must stay below the level's modulus).
    pub(crate) fn multiply_plain(&self, c: &Ciphertext, p: &Plaintext) -> SealResult<Ciphertext> {
        let out = Ciphertext::empty()?;
        // SAFETY: live handles, distinct destination.
        check("Evaluator_MultiplyPlain", unsafe {
            Evaluator_MultiplyPlain(self.evaluator, c.h, p.h, out.h, null_mut())
        })?;
        Ok(out)
    }

    /// `a - b` into a new ciphertext (same level and scale, checked by SEAL).
    pub(crate) fn sub(&self, a: &Ciphertext, b: &Ciphertext) -> SealResult<Ciphertext> {
        let out = Ciphertext::empty()?;
        // SAFETY: live handles, distinct destination.
        check("Evaluator_Sub", unsafe {
            Evaluator_Sub(self.evaluator, a.h, b.h, out.h)
        })?;
        Ok(out)
    }

    /// `a * b` into a new ciphertext of size 3 (same level, checked by SEAL;
    /// the product of scales must stay below the level's modulus).
    pub(crate) fn multiply(&self, a: &Ciphertext, b: &Ciphertext) -> SealResult<Ciphertext> {
        let out = Ciphertext::empty()?;
        // SAFETY: live handles, distinct destination.
        check("Evaluator_Multiply", unsafe {
            Evaluator_Multiply(self.evaluator, a.h, b.h, out.h, null_mut())
        })?;
        Ok(out)
    }

    /// Back to size 2 with the relinearization keys, in place.
    pub(crate) fn relinearize_inplace(
        &self,
        c: &mut Ciphertext,
        relin: &KSwitchKeys,
    ) -> SealResult<()> {
        // SAFETY: live handles; SEAL allows the destination to alias the
        // source. The keys were loaded as relinearization keys (`KSwitchKeys`
        // is what SEAL's `RelinKeys` adds nothing to).
        check("Evaluator_Relinearize", unsafe {
            Evaluator_Relinearize(self.evaluator, c.h, relin.h, c.h, null_mut())
        })
    }

    /// The slots of `c` rotated left by `steps`, with the Galois keys (which
    /// must hold that step; SEAL reports a missing one as an error).
    pub(crate) fn rotate(
        &self,
        c: &Ciphertext,
        steps: i32,
        galois: &KSwitchKeys,
    ) -> SealResult<Ciphertext> {
        let out = Ciphertext::empty()?;
        // SAFETY: live handles, distinct destination; as above for the keys.
        check("Evaluator_RotateVector", unsafe {
            Evaluator_RotateVector(
                self.evaluator,
                c.h,
                steps as c_int,
                galois.h,
                out.h,
                null_mut(),
            )
        })?;
        Ok(out)
    }

    fn require(&self, ok: bool, call: &'static str) -> SealResult<()> {
        if ok {
            Ok(())
        } else {
            Err(SealFailure {
                call,
                class: "this context holds no key for it",
            })
        }
    }
}
