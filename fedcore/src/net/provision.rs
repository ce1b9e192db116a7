//! Provisioning: a project CA, a server certificate and one certificate per
//! site, written into one startup kit folder per participant.
//!
//! ```text
//! <project>/
//!   ca/        ca.pem, ca.key (0600)                 kept by the project admin
//!   server/    kit.json, ca.pem, cert.pem, key.pem (0600), roster.json
//!   <site>/    kit.json, ca.pem, cert.pem, key.pem (0600)
//! ```
//!
//! A site's identity is its certificate's common name. The server admits a
//! client only with a certificate that chains to the project CA (checked in
//! the TLS handshake) and whose SHA-256 fingerprint the roster lists under
//! that identity, not revoked. Rotating a site issues a new certificate and
//! revokes the old ones; revoking a site revokes all of its certificates.
//! The server re-reads the roster when it changes, without a restart.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SerialNumber,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// The file a kit describes itself in.
const KIT_FILE: &str = "kit.json";
/// The roster file in the server's kit.
const ROSTER_FILE: &str = "roster.json";
const CA_DIR: &str = "ca";
const SERVER_DIR: &str = "server";

fn err(path: &Path, reason: impl std::fmt::Display) -> Error {
    Error::InvalidConfig(format!("{}: {reason}", path.display()))
}

fn cert_err(e: rcgen::Error) -> Error {
    Error::InvalidConfig(format!("certificate: {e}"))
}

/// What a participant is in the project.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// The aggregation server.
    Server,
    /// A site (a hospital).
    Client,
}

/// `kit.json`: who the kit belongs to and where the server is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KitInfo {
    /// The project's name.
    pub project: String,
    /// The participant's identity (its certificate's common name).
    pub identity: String,
    /// Server or client.
    pub role: Role,
    /// The server's address: where clients dial (`host:port`), or where the
    /// server listens.
    pub server_address: String,
    /// The host name clients check the server's certificate against.
    pub server_name: String,
    /// How long the certificates the project issues are valid, in days.
    #[serde(default = "default_validity_days")]
    pub validity_days: u64,
}

fn default_validity_days() -> u64 {
    365
}

/// A participant's startup kit, loaded from its folder.
#[derive(Debug, Clone)]
pub struct Kit {
    /// The folder.
    pub dir: PathBuf,
    /// `kit.json`.
    pub info: KitInfo,
    /// The project CA's certificate (PEM).
    pub ca_pem: String,
    /// The participant's certificate (PEM).
    pub cert_pem: String,
    /// The participant's private key (PEM).
    pub key_pem: String,
}

impl Kit {
    /// Loads a kit. A private key that the group or others can read is
    /// refused, as ssh does.
    pub fn load(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_owned();
        let read = |name: &str| {
            let path = dir.join(name);
            fs::read_to_string(&path).map_err(|e| err(&path, format!("cannot read: {e}")))
        };
        let info: KitInfo = serde_json::from_str(&read(KIT_FILE)?)
            .map_err(|e| err(&dir.join(KIT_FILE), format!("not a kit description: {e}")))?;
        let key_path = dir.join("key.pem");
        let mode = fs::metadata(&key_path)
            .map_err(|e| err(&key_path, format!("cannot read: {e}")))?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            return Err(err(
                &key_path,
                format!(
                    "private key is accessible to others (mode {:o}); chmod 600 it",
                    mode & 0o777
                ),
            ));
        }
        Ok(Self {
            info,
            ca_pem: read("ca.pem")?,
            cert_pem: read("cert.pem")?,
            key_pem: read("key.pem")?,
            dir,
        })
    }

    /// The SHA-256 fingerprint of the kit's certificate.
    pub fn fingerprint(&self) -> Result<String> {
        Ok(fingerprint(&pem_certificate(&self.cert_pem)?))
    }

    /// The roster file (server kits).
    pub fn roster_path(&self) -> PathBuf {
        self.dir.join(ROSTER_FILE)
    }

    /// Signs `statement` with the kit's private key, so that any kit of
    /// the project can check that this participant made it, whoever
    /// carried it ([`SignedStatement::verify`]).
    pub fn sign(&self, statement: &str) -> Result<SignedStatement> {
        use rustls_pki_types::PrivateKeyDer;
        use rustls_pki_types::pem::PemObject;
        let key = PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes()).map_err(|e| {
            err(
                &self.dir.join("key.pem"),
                format!("not a PEM private key: {e}"),
            )
        })?;
        let key = rustls::crypto::ring::sign::any_supported_type(&key)
            .map_err(|e| err(&self.dir.join("key.pem"), format!("unusable key: {e}")))?;
        let signer = key.choose_scheme(STATEMENT_SCHEMES).ok_or_else(|| {
            err(
                &self.dir.join("key.pem"),
                "a key of a kind statements are not signed with",
            )
        })?;
        let signature = signer
            .sign(&statement_message(statement))
            .map_err(|e| Error::Transport(format!("signing a statement: {e}")))?;
        Ok(SignedStatement {
            statement: statement.to_owned(),
            certificate: self.cert_pem.clone(),
            scheme: u16::from(signer.scheme()),
            signature: hex(&signature),
        })
    }
}

/// The schemes a [`SignedStatement`] may be signed with (the kinds of key
/// a kit can hold; the project's own are ECDSA P-256).
const STATEMENT_SCHEMES: &[rustls::SignatureScheme] = &[
    rustls::SignatureScheme::ECDSA_NISTP256_SHA256,
    rustls::SignatureScheme::ECDSA_NISTP384_SHA384,
    rustls::SignatureScheme::ED25519,
    rustls::SignatureScheme::RSA_PSS_SHA256,
];

/// What a statement's signature covers: a context string (so that no
/// signature made for anything else, a TLS handshake's included, passes
/// for a statement), then the statement.
fn statement_message(statement: &str) -> Vec<u8> {
    [
        b"fedcore signed statement v1\0".as_slice(),
        statement.as_bytes(),
    ]
    .concat()
}

/// A statement signed by a participant with its kit's key
/// ([`Kit::sign`]), to be carried by anyone (the server, an operator) to
/// the other participants, who check it against the project CA
/// ([`SignedStatement::verify`]). A relay can withhold it, not alter it or
/// make one in another participant's name (short of the CA's key).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedStatement {
    /// What the signer states.
    pub statement: String,
    /// The signer's certificate (PEM).
    pub certificate: String,
    /// The signature scheme (TLS's code point, e.g. 0x0403 for ECDSA P-256
    /// with SHA-256).
    pub scheme: u16,
    /// The signature, lower-case hex.
    pub signature: String,
}

impl SignedStatement {
    /// Checks that the certificate is the project CA's (`ca_pem`), valid
    /// now, for a participant, and that its key signed the statement;
    /// returns the signer's identity (the certificate's common name).
    pub fn verify(&self, ca_pem: &str) -> Result<String> {
        let der = pem_certificate(&self.certificate)?;
        verify_client_certificate(&der, &pem_certificate(ca_pem)?)?;
        let bad = |m: &str| Error::InvalidConfig(format!("signed statement: {m}"));
        let scheme = rustls::SignatureScheme::from(self.scheme);
        if !STATEMENT_SCHEMES.contains(&scheme) {
            return Err(bad(&format!(
                "scheme {scheme:?} is not one statements are signed with"
            )));
        }
        let signature = unhex(&self.signature).ok_or_else(|| bad("the signature is not hex"))?;
        let (_, cert) = x509_parser::parse_x509_certificate(&der)
            .map_err(|e| bad(&format!("unreadable certificate: {e}")))?;
        let key = &cert.public_key().subject_public_key.data;
        let provider = rustls::crypto::ring::default_provider();
        let algorithms = provider
            .signature_verification_algorithms
            .mapping
            .iter()
            .find(|(s, _)| *s == scheme)
            .map(|(_, a)| *a)
            .unwrap_or_default();
        let message = statement_message(&self.statement);
        if !algorithms
            .iter()
            .any(|a| a.verify_signature(key, &message, &signature).is_ok())
        {
            return Err(bad(
                "the signature is not the certificate's key's over this statement",
            ));
        }
        common_name(&der)
    }

    /// The SHA-256 fingerprint of the signer's certificate, to check it
    /// against a [`Roster`] (revoked or rotated certificates).
    pub fn signer_fingerprint(&self) -> Result<String> {
        Ok(fingerprint(&pem_certificate(&self.certificate)?))
    }
}

/// Bytes to lower-case hex.
fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Lower-case or upper-case hex to bytes.
fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// One certificate the roster knows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RosterEntry {
    /// The site's identity.
    pub identity: String,
    /// Lower-case hex SHA-256 of the certificate (DER).
    pub fingerprint: String,
    /// The certificate's serial number (hex), for the record.
    pub serial: String,
    /// A revoked certificate is refused.
    pub revoked: bool,
}

/// The sites the server admits: `roster.json` in the server's kit.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Roster {
    /// Every certificate ever issued to a site.
    pub certificates: Vec<RosterEntry>,
}

/// Why a certificate is not admitted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    /// Not on the roster at all.
    #[error("certificate {fingerprint} of `{identity}` is not on the roster")]
    Unknown {
        /// Its common name.
        identity: String,
        /// Its fingerprint.
        fingerprint: String,
    },
    /// On the roster, revoked.
    #[error("certificate {fingerprint} of `{identity}` is revoked")]
    Revoked {
        /// Its common name.
        identity: String,
        /// Its fingerprint.
        fingerprint: String,
    },
    /// Listed under another identity than its common name.
    #[error("certificate names `{identity}` but the roster lists it for `{listed}`")]
    Mismatch {
        /// Its common name.
        identity: String,
        /// The identity on the roster.
        listed: String,
    },
}

impl Roster {
    /// Reads a roster file.
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = fs::read(path).map_err(|e| err(path, format!("cannot read: {e}")))?;
        Self::from_json(&bytes).map_err(|e| err(path, e))
    }

    /// Parses a roster's bytes; the error is the reason.
    pub fn from_json(bytes: &[u8]) -> std::result::Result<Self, String> {
        serde_json::from_slice(bytes).map_err(|e| format!("not a roster: {e}"))
    }

    /// Writes it atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        crate::checkpoint::write_atomic(path, &serde_json::to_vec_pretty(self)?)
    }

    /// Reads the roster at `path`, applies `change` and writes the result
    /// back (only if `change` succeeded), holding an exclusive lock on
    /// `<path>.lock` throughout: two writers on one machine (a server's
    /// dashboard, `fedcore-deploy` where the CA is) never lose each other's
    /// change, such as a revocation.
    pub fn update<T>(path: &Path, change: impl FnOnce(&mut Roster) -> Result<T>) -> Result<T> {
        let mut lock_path = path.as_os_str().to_owned();
        lock_path.push(".lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| err(Path::new(&lock_path), format!("cannot open: {e}")))?;
        lock.lock()
            .map_err(|e| err(Path::new(&lock_path), format!("cannot lock: {e}")))?;
        let mut roster = Roster::load(path)?;
        let out = change(&mut roster)?;
        roster.save(path)?;
        Ok(out)
    }

    /// Admits the certificate `(identity, fingerprint)` or says why not.
    pub fn admit(&self, identity: &str, fingerprint: &str) -> std::result::Result<(), Refusal> {
        match self
            .certificates
            .iter()
            .find(|c| c.fingerprint == fingerprint)
        {
            None => Err(Refusal::Unknown {
                identity: identity.into(),
                fingerprint: fingerprint.into(),
            }),
            Some(c) if c.identity != identity => Err(Refusal::Mismatch {
                identity: identity.into(),
                listed: c.identity.clone(),
            }),
            Some(c) if c.revoked => Err(Refusal::Revoked {
                identity: identity.into(),
                fingerprint: fingerprint.into(),
            }),
            Some(_) => Ok(()),
        }
    }

    /// Revokes every certificate of `identity`; returns how many were active.
    pub fn revoke(&mut self, identity: &str) -> usize {
        let mut n = 0;
        for c in self
            .certificates
            .iter_mut()
            .filter(|c| c.identity == identity)
        {
            n += usize::from(!c.revoked);
            c.revoked = true;
        }
        n
    }

    /// Lists a site's new certificate (PEM), issued elsewhere by the
    /// project CA, so that the site can connect with it: the server's way
    /// to rotate a site without holding the CA key. The certificate must
    /// chain to `ca_pem` for client authentication and be valid now (the
    /// checks of the TLS handshake), name a valid identity, and not be on
    /// the roster already. With `revoke_previous`, the site's other
    /// certificates are revoked (rotation). Returns the new entry.
    pub fn add_certificate(
        &mut self,
        cert_pem: &str,
        ca_pem: &str,
        revoke_previous: bool,
    ) -> Result<RosterEntry> {
        let der = pem_certificate(cert_pem)?;
        verify_client_certificate(&der, &pem_certificate(ca_pem)?)?;
        let identity = common_name(&der).map_err(|e| Error::InvalidConfig(e.to_string()))?;
        check_identity(&identity)?;
        let (_, cert) = x509_parser::parse_x509_certificate(&der)
            .map_err(|e| Error::InvalidConfig(format!("unreadable certificate: {e}")))?;
        let serial = hex(cert.tbs_certificate.raw_serial());
        let fingerprint = fingerprint(&der);
        if let Some(c) = self
            .certificates
            .iter()
            .find(|c| c.fingerprint == fingerprint)
        {
            return Err(Error::InvalidConfig(format!(
                "certificate {fingerprint} is on the roster already (for `{}`{})",
                c.identity,
                if c.revoked { ", revoked" } else { "" }
            )));
        }
        if revoke_previous {
            self.revoke(&identity);
        }
        let entry = RosterEntry {
            identity,
            fingerprint,
            serial,
            revoked: false,
        };
        self.certificates.push(entry.clone());
        Ok(entry)
    }

    /// The identities with at least one active certificate.
    pub fn active(&self) -> Vec<String> {
        let mut ids: Vec<String> = self
            .certificates
            .iter()
            .filter(|c| !c.revoked)
            .map(|c| c.identity.clone())
            .collect();
        ids.sort();
        ids.dedup();
        ids
    }
}

/// The DER bytes of the first certificate in a PEM text.
pub(crate) fn pem_certificate(pem: &str) -> Result<Vec<u8>> {
    use rustls_pki_types::pem::PemObject;
    rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
        .map(|c| c.to_vec())
        .map_err(|e| Error::InvalidConfig(format!("not a PEM certificate: {e}")))
}

/// Lower-case hex SHA-256 of a certificate's DER bytes.
pub(crate) fn fingerprint(der: &[u8]) -> String {
    hex(&Sha256::digest(der))
}

/// The common name of a DER certificate.
pub(crate) fn common_name(der: &[u8]) -> Result<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| Error::Transport(format!("unreadable certificate: {e}")))?;
    cert.subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_owned)
        .ok_or_else(|| Error::Transport("certificate has no common name".into()))
}

/// Checks a client certificate (DER) as the server's TLS handshake does:
/// signed by the CA `ca_der`, valid now, for client authentication.
fn verify_client_certificate(der: &[u8], ca_der: &[u8]) -> Result<()> {
    use rustls_pki_types::{CertificateDer, UnixTime};
    let invalid = |e: &dyn std::fmt::Display| Error::InvalidConfig(format!("certificate: {e}"));
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from(ca_der.to_vec()))
        .map_err(|e| invalid(&e))?;
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        std::sync::Arc::new(roots),
        std::sync::Arc::new(rustls::crypto::ring::default_provider()),
    )
    .build()
    .map_err(|e| invalid(&e))?;
    verifier
        .verify_client_cert(&CertificateDer::from(der.to_vec()), &[], UnixTime::now())
        .map(|_| ())
        .map_err(|e| invalid(&e))
}

/// When a DER certificate expires (ms since the Unix epoch).
pub(crate) fn not_after_ms(der: &[u8]) -> Option<i64> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    cert.validity().not_after.timestamp().checked_mul(1000)
}

/// A valid identity: 1-64 of `[A-Za-z0-9._-]`, not starting with `.` or `-`
/// (it names a folder and appears in logs).
pub(crate) fn check_identity(id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && !id.starts_with(['.', '-'])
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
        && id != CA_DIR
        && id != SERVER_DIR;
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidConfig(format!(
            "`{id}` is not a valid site identity: 1-64 of A-Z a-z 0-9 . _ -, not starting with . or -, not `ca` or `server`"
        )))
    }
}

/// What [`Project::create`] creates.
#[derive(Debug, Clone)]
pub struct ProjectSpec {
    /// The project's name (in the CA's name and every kit).
    pub project: String,
    /// The server's host names and IP addresses (its certificate's names);
    /// the first one is what clients dial and check.
    pub server_hosts: Vec<String>,
    /// The server's port.
    pub port: u16,
    /// The sites' identities.
    pub sites: Vec<String>,
    /// How long certificates are valid.
    pub validity: Duration,
}

impl ProjectSpec {
    /// A project with the server on `localhost:port`, certificates valid one year.
    pub fn new(project: impl Into<String>, sites: Vec<String>, port: u16) -> Self {
        Self {
            project: project.into(),
            server_hosts: vec!["localhost".into(), "127.0.0.1".into()],
            port,
            sites,
            validity: Duration::from_secs(365 * 24 * 3600),
        }
    }
}

/// The project folder's parts.
#[derive(Debug, Clone)]
pub struct Project {
    /// The project folder.
    pub dir: PathBuf,
}

impl Project {
    /// Creates a project in `dir` (which must not hold one): the CA, the
    /// server's kit with the roster, one kit per site.
    pub fn create(dir: impl AsRef<Path>, spec: &ProjectSpec) -> Result<Self> {
        let dir = dir.as_ref();
        if dir.join(CA_DIR).exists() {
            return Err(err(dir, "already holds a project (ca/ exists)"));
        }
        let host = spec.server_hosts.first().ok_or_else(|| {
            Error::InvalidConfig("the server needs at least one host name".into())
        })?;
        let mut seen = std::collections::BTreeSet::new();
        for s in &spec.sites {
            check_identity(s)?;
            if !seen.insert(s) {
                return Err(Error::InvalidConfig(format!("site `{s}` listed twice")));
            }
        }

        // The project CA.
        let ca_key = KeyPair::generate().map_err(cert_err)?;
        let mut ca_params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("{} project CA", spec.project));
        dn.push(DnType::OrganizationName, spec.project.clone());
        ca_params.distinguished_name = dn;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        ca_params.serial_number = Some(random_serial().0);
        validity_window(&mut ca_params, spec.validity * 5);
        let ca_cert = ca_params.self_signed(&ca_key).map_err(cert_err)?;
        let ca_pem = ca_cert.pem();
        let ca_dir = dir.join(CA_DIR);
        make_private_dir(&ca_dir)?;
        write_private(&ca_dir.join("ca.key"), ca_key.serialize_pem().as_bytes())?;
        fs::write(ca_dir.join("ca.pem"), &ca_pem)?;
        let issuer = Issuer::new(ca_params, &ca_key);

        // The server.
        let (_, cert, key, _) = leaf(host, &spec.server_hosts, spec.validity, &issuer, true)?;
        let server_info = KitInfo {
            project: spec.project.clone(),
            identity: SERVER_DIR.into(),
            role: Role::Server,
            server_address: format!("{host}:{}", spec.port),
            server_name: host.clone(),
            validity_days: (spec.validity.as_secs() / (24 * 3600)).max(1),
        };
        let project = Project::open(dir);
        write_kit(&project.server_kit(), &server_info, &ca_pem, &cert, &key)?;

        // The sites.
        let mut roster = Roster::default();
        for site in &spec.sites {
            let (info, cert, key) =
                new_site(site, &server_info, spec.validity, &issuer, &mut roster)?;
            write_kit(&project.site_kit(site), &info, &ca_pem, &cert, &key)?;
        }
        roster.save(&project.server_kit().join(ROSTER_FILE))?;
        Ok(project)
    }

    /// The project at `dir`, created earlier by [`Project::create`].
    pub fn open(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// The server's kit folder.
    pub fn server_kit(&self) -> PathBuf {
        self.dir.join(SERVER_DIR)
    }

    /// A site's kit folder.
    pub fn site_kit(&self, site: &str) -> PathBuf {
        self.dir.join(site)
    }

    fn ca(&self) -> Result<(String, KeyPair)> {
        let dir = self.dir.join(CA_DIR);
        let read = |n: &str| {
            let p = dir.join(n);
            fs::read_to_string(&p).map_err(|e| err(&p, format!("cannot read: {e}")))
        };
        let key = KeyPair::from_pem(&read("ca.key")?).map_err(cert_err)?;
        Ok((read("ca.pem")?, key))
    }

    /// Issues a certificate for `site` into its kit (replacing a previous
    /// kit) and lists it on the roster. With `revoke_previous`, the site's
    /// earlier certificates are revoked (rotation). Returns the kit folder.
    pub fn issue_site(&self, site: &str, revoke_previous: bool) -> Result<PathBuf> {
        check_identity(site)?;
        let (ca_pem, ca_key) = self.ca()?;
        let server = Kit::load(self.server_kit())?;
        let validity = Duration::from_secs(server.info.validity_days * 24 * 3600);
        let issuer = Issuer::from_ca_cert_pem(&ca_pem, &ca_key).map_err(cert_err)?;
        // The roster first: a kit whose certificate is not on the roster
        // would lock its site out; a roster entry nobody holds is harmless.
        let (info, cert_pem, key_pem) = Roster::update(&server.roster_path(), |roster| {
            if revoke_previous {
                roster.revoke(site);
            }
            new_site(site, &server.info, validity, &issuer, roster)
        })?;
        let dir = self.site_kit(site);
        write_kit(&dir, &info, &ca_pem, &cert_pem, &key_pem)?;
        Ok(dir)
    }

    /// Revokes every certificate of `site` on the server's roster; returns
    /// how many were active.
    pub fn revoke_site(&self, site: &str) -> Result<usize> {
        Roster::update(&self.server_kit().join(ROSTER_FILE), |roster| {
            let n = roster.revoke(site);
            if n == 0 && !roster.certificates.iter().any(|c| c.identity == site) {
                return Err(Error::InvalidConfig(format!(
                    "no site `{site}` on the roster"
                )));
            }
            Ok(n)
        })
    }
}

fn random_serial() -> (SerialNumber, String) {
    let mut bytes: [u8; 16] = rand::random();
    // Positive, and no leading zero byte: the DER encoding keeps all 16
    // bytes, so the serial reads back as the same 32 hex digits.
    bytes[0] = (bytes[0] & 0x7f) | 0x01;
    (SerialNumber::from_slice(&bytes), hex(&bytes))
}

fn validity_window(params: &mut CertificateParams, validity: Duration) {
    let now = SystemTime::now();
    // An hour of slack for clocks that differ a little.
    params.not_before = (now - Duration::from_secs(3600)).into();
    params.not_after = (now + validity).into();
}

/// Signs a leaf certificate for `name` (the common name) with `hosts` as
/// subject alternative names. Returns (DER, PEM, key PEM, serial hex).
fn leaf(
    name: &str,
    hosts: &[String],
    validity: Duration,
    issuer: &Issuer<'_, &KeyPair>,
    server: bool,
) -> Result<(Vec<u8>, String, String, String)> {
    let mut params = CertificateParams::new(hosts.to_vec()).map_err(cert_err)?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    params.distinguished_name = dn;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![if server {
        ExtendedKeyUsagePurpose::ServerAuth
    } else {
        ExtendedKeyUsagePurpose::ClientAuth
    }];
    params.use_authority_key_identifier_extension = true;
    let (serial, serial_hex) = random_serial();
    params.serial_number = Some(serial);
    validity_window(&mut params, validity);
    let key = KeyPair::generate().map_err(cert_err)?;
    let cert = params.signed_by(&key, issuer).map_err(cert_err)?;
    Ok((
        cert.der().to_vec(),
        cert.pem(),
        key.serialize_pem(),
        serial_hex,
    ))
}

/// Signs a certificate for `site`, lists it on `roster`, and returns the
/// site's kit description (the server's, for a client) with its
/// certificate and key (PEM).
fn new_site(
    site: &str,
    server: &KitInfo,
    validity: Duration,
    issuer: &Issuer<'_, &KeyPair>,
    roster: &mut Roster,
) -> Result<(KitInfo, String, String)> {
    let (der, cert, key, serial) = leaf(site, &[], validity, issuer, false)?;
    roster.certificates.push(RosterEntry {
        identity: site.into(),
        fingerprint: fingerprint(&der),
        serial,
        revoked: false,
    });
    let info = KitInfo {
        identity: site.into(),
        role: Role::Client,
        ..server.clone()
    };
    Ok((info, cert, key))
}

/// Writes a file readable by its owner only.
fn write_private(path: &Path, contents: &[u8]) -> Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| err(path, format!("cannot write: {e}")))?;
    // `mode` applies only when the file is created; make sure of it otherwise.
    f.set_permissions(fs::Permissions::from_mode(0o600))?;
    f.write_all(contents)?;
    f.sync_all()?;
    Ok(())
}

fn make_private_dir(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).map_err(|e| err(dir, format!("cannot create: {e}")))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
    Ok(())
}

fn write_kit(dir: &Path, info: &KitInfo, ca: &str, cert: &str, key: &str) -> Result<()> {
    make_private_dir(dir)?;
    write_private(&dir.join("key.pem"), key.as_bytes())?;
    fs::write(dir.join("cert.pem"), cert)?;
    fs::write(dir.join("ca.pem"), ca)?;
    fs::write(dir.join(KIT_FILE), serde_json::to_vec_pretty(info)?)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pem_der(pem: &str) -> Vec<u8> {
        pem_certificate(pem).unwrap()
    }

    #[test]
    fn provisioning_writes_kits_with_private_keys_and_a_roster() {
        let tmp = tempfile::tempdir().unwrap();
        let spec = ProjectSpec::new(
            "demo",
            vec!["hospital-1".into(), "hospital-2".into()],
            50051,
        );
        let project = Project::create(tmp.path(), &spec).unwrap();
        for dir in [
            project.server_kit(),
            project.site_kit("hospital-1"),
            project.site_kit("hospital-2"),
        ] {
            let kit = Kit::load(&dir).unwrap();
            let mode = fs::metadata(dir.join("key.pem"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
            assert_eq!(kit.info.server_address, "localhost:50051");
        }
        let ca_mode = fs::metadata(tmp.path().join("ca/ca.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(ca_mode & 0o777, 0o600);

        let kit = Kit::load(project.site_kit("hospital-1")).unwrap();
        let der = pem_der(&kit.cert_pem);
        assert_eq!(common_name(&der).unwrap(), "hospital-1");
        let roster = Roster::load(&project.server_kit().join(ROSTER_FILE)).unwrap();
        assert_eq!(roster.admit("hospital-1", &fingerprint(&der)), Ok(()));
        assert!(matches!(
            roster.admit("hospital-2", &fingerprint(&der)),
            Err(Refusal::Mismatch { .. })
        ));
        assert!(Project::create(tmp.path(), &spec).is_err(), "no overwrite");
    }

    #[test]
    fn rotation_revokes_the_old_certificate_and_revocation_all() {
        let tmp = tempfile::tempdir().unwrap();
        let spec = ProjectSpec::new("demo", vec!["h1".into()], 1);
        let project = Project::create(tmp.path(), &spec).unwrap();
        let old = fingerprint(&pem_der(
            &Kit::load(project.site_kit("h1")).unwrap().cert_pem,
        ));
        project.issue_site("h1", true).unwrap();
        let new = fingerprint(&pem_der(
            &Kit::load(project.site_kit("h1")).unwrap().cert_pem,
        ));
        assert_ne!(old, new);
        let roster_path = project.server_kit().join(ROSTER_FILE);
        let roster = Roster::load(&roster_path).unwrap();
        assert!(matches!(
            roster.admit("h1", &old),
            Err(Refusal::Revoked { .. })
        ));
        assert_eq!(roster.admit("h1", &new), Ok(()));
        assert_eq!(project.revoke_site("h1").unwrap(), 1);
        let roster = Roster::load(&roster_path).unwrap();
        assert!(roster.admit("h1", &new).is_err());
        assert!(project.revoke_site("nobody").is_err());
        assert!(project.issue_site("../evil", false).is_err());
    }

    /// The server lists a certificate the CA issued elsewhere (rotation
    /// without the CA key at the server), and refuses what the TLS
    /// handshake would refuse.
    #[test]
    fn a_certificate_from_the_project_ca_is_added_and_others_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let spec = ProjectSpec::new("demo", vec!["h1".into(), "h2".into()], 1);
        let project = Project::create(tmp.path().join("p"), &spec).unwrap();
        let server = Kit::load(project.server_kit()).unwrap();
        let mut roster = Roster::load(&server.roster_path()).unwrap();
        let old = Kit::load(project.site_kit("h1")).unwrap();
        // Issued where the CA is: the project's roster lists it, the
        // server's copy (here: `roster`, read before) does not yet.
        project.issue_site("h1", true).unwrap();
        let new = Kit::load(project.site_kit("h1")).unwrap();
        let new_fp = new.fingerprint().unwrap();
        assert!(roster.admit("h1", &new_fp).is_err());
        let entry = roster
            .add_certificate(&new.cert_pem, &server.ca_pem, true)
            .unwrap();
        assert_eq!(
            (entry.identity.as_str(), &entry.fingerprint),
            ("h1", &new_fp)
        );
        let listed = Roster::load(&project.server_kit().join(ROSTER_FILE)).unwrap();
        let issued = listed
            .certificates
            .iter()
            .find(|c| c.fingerprint == new_fp)
            .unwrap();
        assert_eq!(
            entry.serial, issued.serial,
            "the serial reads back as issued"
        );
        assert_eq!(roster.admit("h1", &new_fp), Ok(()));
        assert!(matches!(
            roster.admit("h1", &old.fingerprint().unwrap()),
            Err(Refusal::Revoked { .. })
        ));
        assert!(
            roster
                .admit(
                    "h2",
                    &Kit::load(project.site_kit("h2"))
                        .unwrap()
                        .fingerprint()
                        .unwrap()
                )
                .is_ok()
        );
        let e = roster
            .add_certificate(&new.cert_pem, &server.ca_pem, true)
            .unwrap_err();
        assert!(e.to_string().contains("on the roster already"), "{e}");

        // Another project's CA; the server's own certificate (server
        // authentication only); not a certificate at all.
        let other = Project::create(tmp.path().join("q"), &spec).unwrap();
        let foreign = Kit::load(other.site_kit("h2")).unwrap();
        let e = roster
            .add_certificate(&foreign.cert_pem, &server.ca_pem, false)
            .unwrap_err();
        assert!(e.to_string().contains("certificate"), "{e}");
        let e = roster
            .add_certificate(&server.cert_pem, &server.ca_pem, false)
            .unwrap_err();
        assert!(e.to_string().contains("certificate"), "{e}");
        assert!(
            roster
                .add_certificate("hello", &server.ca_pem, false)
                .is_err()
        );
        assert_eq!(roster.active(), ["h1", "h2"]);
        assert_eq!(roster.certificates.len(), 3);
    }

    #[test]
    fn a_signed_statement_names_its_signer_and_nothing_altered_or_foreign_passes() {
        let tmp = tempfile::tempdir().unwrap();
        let spec = ProjectSpec::new("demo", vec!["h1".into(), "h2".into()], 1);
        let project = Project::create(tmp.path().join("a"), &spec).unwrap();
        let h1 = Kit::load(project.site_kit("h1")).unwrap();
        let h2 = Kit::load(project.site_kit("h2")).unwrap();
        let signed = h1.sign("key id 00ff").unwrap();
        assert_eq!(signed.verify(&h2.ca_pem).unwrap(), "h1");
        let json = serde_json::to_string(&signed).unwrap();
        let back: SignedStatement = serde_json::from_str(&json).unwrap();
        assert_eq!(back.verify(&h2.ca_pem).unwrap(), "h1");
        // Another statement under the same signature.
        let altered = SignedStatement {
            statement: "key id 00fe".into(),
            ..signed.clone()
        };
        let e = altered.verify(&h2.ca_pem).unwrap_err().to_string();
        assert!(e.contains("not the certificate's key's"), "{e}");
        // h2's certificate on h1's signature: h2 did not say it.
        let claimed = SignedStatement {
            certificate: h2.cert_pem.clone(),
            ..signed.clone()
        };
        let e = claimed.verify(&h2.ca_pem).unwrap_err().to_string();
        assert!(e.contains("not the certificate's key's"), "{e}");
        assert_ne!(
            claimed.signer_fingerprint().unwrap(),
            signed.signer_fingerprint().unwrap()
        );
        // A kit whose certificate is not a participant's of this project.
        let refused = |kit: &Kit| {
            let e = kit
                .sign("key id 00ff")
                .unwrap()
                .verify(&h2.ca_pem)
                .unwrap_err()
                .to_string();
            assert!(e.contains("certificate"), "{e}");
        };
        // The server's (server authentication only).
        refused(&Kit::load(project.server_kit()).unwrap());
        // Another scheme than the one it was signed with.
        let rescheme = SignedStatement {
            scheme: u16::from(rustls::SignatureScheme::ECDSA_NISTP384_SHA384),
            ..signed.clone()
        };
        assert!(rescheme.verify(&h2.ca_pem).is_err());
        // A certificate of another project's CA (the same names).
        let other = Project::create(tmp.path().join("b"), &spec).unwrap();
        refused(&Kit::load(other.site_kit("h1")).unwrap());
        // A signature cut short, or not hex.
        let mut cut = signed.clone();
        cut.signature.truncate(cut.signature.len() - 2);
        assert!(cut.verify(&h2.ca_pem).is_err());
        cut.signature.push_str("zz");
        assert!(
            cut.verify(&h2.ca_pem)
                .unwrap_err()
                .to_string()
                .contains("not hex")
        );
        cut.signature = format!("+{}", &signed.signature[1..]);
        assert!(
            cut.verify(&h2.ca_pem)
                .unwrap_err()
                .to_string()
                .contains("not hex")
        );
    }

    #[test]
    fn a_world_readable_key_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let project =
            Project::create(tmp.path(), &ProjectSpec::new("p", vec!["a".into()], 1)).unwrap();
        let key = project.site_kit("a").join("key.pem");
        fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
        let e = Kit::load(project.site_kit("a")).unwrap_err();
        assert!(e.to_string().contains("chmod 600"), "{e}");
    }
}
