//! Multiparty keys in a deployment's startup kits.
//!
//! - `hospital provision --keys multiparty` writes the hospitals' output key
//!   (the key authority's, under the multiparty parameters: the sealed
//!   global is under it), the seed of the common random polynomial
//!   (`he-crs.bin`, public) and the list of parties (`he-parties.txt`:
//!   each site and its party number, public) into every kit, and each
//!   hospital's own number (`he-party.txt`) into its kit. No share of the
//!   collective key exists yet, and none is ever made on the server's side.
//! - `hospital keygen --kit <hospital kit>` makes the hospital's secret
//!   share on its own machine (`he-party.key`, mode 0600, never
//!   overwritten) and writes its key share (`he-keyshare.bin`, public).
//! - The operator copies each hospital's `he-keyshare.bin` to
//!   `<server kit>/he-keyshares/<site>.bin`, and those files into the same
//!   folder of every hospital's kit. The server combines the collective key from it; each
//!   hospital combines it too, after checking that the folder holds exactly
//!   one share per listed party, under its name and number, and that the
//!   share under its own name is its own.
//! - Run again with every share in its kit, `keygen` signs a statement of
//!   the keys the kit makes (`he-attestation.json`: seed, parties, a digest
//!   of the shares combined, the collective and output keys' ids, the
//!   roster) with the hospital's certificate key; the operator carries the
//!   statements into every kit's `he-attestations/<site>.json`. The server
//!   and each hospital start only if every hospital's statement checks
//!   against the project CA and states their own kit's keys: one set of
//!   shares, in which each hospital has found its own (equal collective
//!   key ids alone would not say that: shares can be made up to add up to
//!   any key).
//! - With a threshold (`provision --threshold T`, written to
//!   `he-threshold.txt` in every kit), `keygen` also writes the hospital's
//!   transport public key (`he-transport.bin`); the operator gathers those
//!   into `he-transport/<site>.bin` of every kit, as the key shares, and
//!   the statements state the roster they make. Once every statement
//!   agrees, `keygen --deal` deals once: `he-deals-out/<site>.bin`, one
//!   Shamir share of its secret for each member, sealed to that member's
//!   transport key. The operator carries each to
//!   `<that site's kit>/he-deals/<dealer>.bin`; at start a hospital opens
//!   the deals addressed to it into its threshold key, and any `T`
//!   hospitals then switch a round's sum.
//! - For whole updates (`provision --encrypt all`: the encrypted geometric
//!   median's parameters), the collective relinearization key takes two
//!   more rounds: with the statements written, `keygen` also writes the
//!   hospital's signed first-round share (`he-relin1.bin`); once every
//!   statement agrees and every first-round share is in `he-relin1/`, its
//!   signed second-round share (`he-relin2.bin`), for one first round only
//!   (`he-relin2.txt` records which). The operator carries both as the key
//!   shares, into `he-relin1/<site>.bin` and `he-relin2/<site>.bin` of
//!   every kit; the server and each hospital check every signature and
//!   make the relinearization key at start.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use fedcore::ClientId;
use fedcore::net::provision::{Kit, SignedStatement};
use fedcore_he::keyswitch::{KeySwitcher, MultipartySealer};
use fedcore_he::multiparty::{
    CollectiveKey, Crs, Deal, KeyShare, PartyKey, RelinShare, Roster as HeRoster, ThresholdKey,
};
use fedcore_he::{CkksContext, CkksParams, KeyAuthority, Public, Secret};

use super::CRS_FILE;

/// The folder of the hospitals' key shares, one `<site>.bin` each.
pub const KEYSHARES_DIR: &str = "he-keyshares";
/// A hospital's party number, written at provisioning.
const PARTY_NUMBER_FILE: &str = "he-party.txt";
/// Every site and its party number, written at provisioning into every kit.
const PARTIES_FILE: &str = "he-parties.txt";
/// A hospital's secret share, written by `hospital keygen`.
pub const PARTY_KEY_FILE: &str = "he-party.key";
/// A hospital's key share, written by `hospital keygen`.
pub const KEYSHARE_FILE: &str = "he-keyshare.bin";
/// The largest key-share file read (a share at the multiparty parameters
/// is 262 KB).
const MAX_SHARE_FILE: u64 = 4 << 20;
/// The threshold, written at provisioning with `--threshold` (public).
const THRESHOLD_FILE: &str = "he-threshold.txt";
/// A hospital's transport public key (X25519), written by `keygen` under a
/// threshold: the others' deals to it are sealed to it.
pub const TRANSPORT_FILE: &str = "he-transport.bin";
/// Every hospital's transport key, one `<site>.bin` each.
pub const TRANSPORT_DIR: &str = "he-transport";
/// The deals a hospital made, one `<recipient site>.bin` each, and the
/// fingerprint of the roster they were made for.
pub const DEALS_OUT_DIR: &str = "he-deals-out";
/// The deals addressed to a hospital, one `<dealer site>.bin` each.
pub const DEALS_DIR: &str = "he-deals";
/// In [`DEALS_OUT_DIR`]: the roster the deals were made for.
const DEALT_FOR_FILE: &str = "roster-fingerprint.txt";
/// In a hospital's kit: the roster it dealt for, written before its deals
/// can leave (it deals once, for that roster).
const DEALT_FILE: &str = "he-dealt.txt";
/// In a hospital's kit: its threshold key, opened from the deals at its
/// first start (mode 0600). Later starts read it: the deals' signatures
/// need not outlive the dealers' certificates.
pub const THRESHOLD_KEY_FILE: &str = "he-threshold.key";
/// A hospital's statement of the keys its kit makes, signed with its
/// kit's key, written by `keygen` for the operator to carry.
pub const ATTESTATION_FILE: &str = "he-attestation.json";
/// Every hospital's signed statement, one `<site>.json` each.
pub const ATTESTATIONS_DIR: &str = "he-attestations";
/// The largest statement file read (one is about 1.5 KB).
const MAX_ATTESTATION_FILE: u64 = 64 << 10;
/// The largest deal file read (a deal at the multiparty parameters is
/// 197 KB).
const MAX_DEAL_FILE: u64 = 4 << 20;

/// A whole-update kit's signed first-round relinearization share.
pub const RELIN1_FILE: &str = "he-relin1.bin";
/// The folder of every hospital's signed first-round share.
pub const RELIN1_DIR: &str = "he-relin1";
/// A whole-update kit's signed second-round relinearization share.
pub const RELIN2_FILE: &str = "he-relin2.bin";
/// The folder of every hospital's signed second-round share.
pub const RELIN2_DIR: &str = "he-relin2";
/// The first round (SHA-256 of its shares) this hospital answered the
/// second round for: it answers one.
const RELIN2_ANSWERED: &str = "he-relin2.txt";
/// A relinearization share (5.2 MB at the median's parameters) and its
/// signed statement.
const MAX_RELIN_FILE: u64 = 8 << 20;

/// Whether `kit` was provisioned for multiparty keys.
pub fn is_multiparty(kit: &Path) -> bool {
    kit.join(CRS_FILE).exists()
}

/// The multiparty parameters of `kit`: its output key's (the public key in
/// the server's kit, the secret key in a hospital's).
pub fn params(kit: &Path) -> Result<CkksParams> {
    // A hospital's own secret key first: a public key file dropped into its
    // kit must not decide.
    let secret = kit.join(KeyAuthority::SECRET_FILE);
    let params = if secret.exists() {
        CkksContext::<Secret>::from_file(&secret)?.params().clone()
    } else {
        CkksContext::<Public>::from_file(&kit.join(KeyAuthority::PUBLIC_FILE))?
            .params()
            .clone()
    };
    if params != super::multiparty_params(false) && params != super::multiparty_params(true) {
        bail!(
            "{}: keys of other parameters than multiparty keys'",
            kit.display()
        );
    }
    Ok(params)
}

/// Whether `kit`'s multiparty keys are for whole updates (`provision
/// --encrypt all`: the encrypted geometric median's parameters, with a
/// collective relinearization key).
pub fn is_whole(kit: &Path) -> Result<bool> {
    Ok(params(kit)? == super::multiparty_params(true))
}

/// Writes the output key, the seed, the party numbers and the threshold
/// (if any) into the kits (`sites`: each hospital's name and kit, party
/// `i + 1` for the `i`-th), at the parameters of what is sealed (`whole`:
/// whole updates, [`super::multiparty_params`]).
pub fn provision(
    server: &Path,
    sites: &[(String, PathBuf)],
    threshold: Option<usize>,
    whole: bool,
) -> Result<()> {
    if let Some(t) = threshold {
        super::check_threshold(t, sites.len())?;
    }
    // The key switch's smudging covers so many parties.
    let params = super::multiparty_params(whole);
    let error = fedcore_he::multiparty::switch_error(&params, sites.len(), sites.len(), 1.0);
    if error > fedcore_he::multiparty::MAX_SWITCH_ERROR {
        bail!(
            "{} hospitals are more than the multiparty parameters' key switch covers",
            sites.len()
        );
    }
    let kits: Vec<PathBuf> = sites.iter().map(|(_, k)| k.clone()).collect();
    KeyAuthority::write_kits(params, server, &kits)?;
    let crs = Crs::random()?;
    let list: String = sites
        .iter()
        .enumerate()
        .map(|(i, (site, _))| format!("{site} {}\n", i + 1))
        .collect();
    for dir in std::iter::once(server).chain(kits.iter().map(PathBuf::as_path)) {
        write(&dir.join(CRS_FILE), &crs.bytes())?;
        write(&dir.join(PARTIES_FILE), list.as_bytes())?;
        if let Some(t) = threshold {
            write(&dir.join(THRESHOLD_FILE), format!("{t}\n").as_bytes())?;
        }
    }
    for (i, (_, kit)) in sites.iter().enumerate() {
        write(
            &kit.join(PARTY_NUMBER_FILE),
            format!("{}\n", i + 1).as_bytes(),
        )?;
    }
    std::fs::create_dir_all(server.join(KEYSHARES_DIR))?;
    std::fs::create_dir_all(server.join(ATTESTATIONS_DIR))?;
    if threshold.is_some() {
        std::fs::create_dir_all(server.join(TRANSPORT_DIR))?;
    }
    if whole {
        std::fs::create_dir_all(server.join(RELIN1_DIR))?;
        std::fs::create_dir_all(server.join(RELIN2_DIR))?;
    }
    Ok(())
}

/// The threshold provisioned in `kit`, if any (checked as at
/// provisioning: 1 would let any one hospital open every upload).
pub fn threshold(kit: &Path) -> Result<Option<usize>> {
    let path = kit.join(THRESHOLD_FILE);
    if !path.exists() {
        return Ok(None);
    }
    let t = std::fs::read_to_string(&path)
        .with_context(|| format!("reading {}", path.display()))?
        .trim()
        .parse()
        .with_context(|| format!("{}: not a threshold", path.display()))?;
    super::check_threshold(t, parties(kit)?.len())
        .with_context(|| format!("{}", path.display()))?;
    Ok(Some(t))
}

fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))
}

/// `bytes` to `path` whole or not at all, synced to disk: written beside it
/// and renamed over it (a crash leaves the old file or the new one).
fn write_durably(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let context = || format!("writing {}", path.display());
    let partial = path.with_extension("partial");
    let mut file = std::fs::File::create(&partial).with_context(context)?;
    file.write_all(bytes).with_context(context)?;
    file.sync_all().with_context(context)?;
    std::fs::rename(&partial, path).with_context(context)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .with_context(context)?;
    }
    Ok(())
}

fn crs(kit: &Path) -> Result<Crs> {
    let path = kit.join(CRS_FILE);
    let seed: [u8; 32] = std::fs::read(&path)
        .with_context(|| format!("reading {}", path.display()))?
        .try_into()
        .map_err(|_| anyhow::anyhow!("{}: not a 32-byte seed", path.display()))?;
    Ok(Crs::new(seed))
}

/// The parties provisioning listed in `kit`: each site's number.
pub fn parties(kit: &Path) -> Result<BTreeMap<ClientId, u32>> {
    let path = kit.join(PARTIES_FILE);
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = BTreeMap::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let parsed = line
            .split_once(' ')
            .and_then(|(site, n)| Some((site, n.trim().parse::<u32>().ok()?)));
        let Some((site, party)) = parsed else {
            bail!("{}: `{line}` is not `<site> <party>`", path.display());
        };
        if out.insert(ClientId::new(site), party).is_some() {
            bail!("{}: {site} is listed twice", path.display());
        }
    }
    Ok(out)
}

/// The files of `kit/<folder>/`: exactly one `<site>.bin` per party listed
/// at provisioning, each at most `max` bytes, by site (with its party). A
/// file for a site that is not listed is refused: a key share of whoever
/// made it would fold a secret of theirs into the collective key, and a
/// transport key of theirs would let them open a deal. `what` names the
/// files and `how` says how they get there, for the errors.
fn per_site(
    kit: &Path,
    folder: &str,
    ext: &str,
    max: u64,
    what: &str,
    how: &str,
) -> Result<BTreeMap<ClientId, (u32, Vec<u8>)>> {
    let listed = parties(kit)?;
    let dir = kit.join(folder);
    let mut out = BTreeMap::new();
    let entries = std::fs::read_dir(&dir)
        .with_context(|| format!("reading {} (one {what} <site>.{ext} each)", dir.display()))?;
    for entry in entries {
        let path = entry?.path();
        let name = || format!("{}", path.display());
        let meta = std::fs::symlink_metadata(&path).with_context(name)?;
        let site = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(ext)?.strip_suffix('.'))
            .filter(|_| meta.is_file());
        let Some(site) = site else {
            bail!(
                "{}: {folder}/ holds only files <site>.{ext} (copy the files, not their folder)",
                path.display()
            );
        };
        let Some(&party) = listed.get(&ClientId::new(site)) else {
            bail!(
                "{}: {site} is not a party provisioned in this kit",
                path.display()
            );
        };
        if meta.len() > max {
            bail!("{}: {} bytes is not a {what}", path.display(), meta.len());
        }
        let bytes = std::fs::read(&path).with_context(name)?;
        out.insert(ClientId::new(site), (party, bytes));
    }
    let missing: Vec<String> = listed
        .keys()
        .filter(|s| !out.contains_key(*s))
        .map(ToString::to_string)
        .collect();
    if !missing.is_empty() {
        bail!(
            "{} has no {what} of {}: {how}",
            dir.display(),
            missing.join(", ")
        );
    }
    Ok(out)
}

/// The key shares in `kit/he-keyshares/`, one per listed party, of that
/// party.
fn shares(kit: &Path) -> Result<BTreeMap<ClientId, KeyShare>> {
    let files = per_site(
        kit,
        KEYSHARES_DIR,
        "bin",
        MAX_SHARE_FILE,
        "key share",
        "every hospital runs `hospital keygen` first",
    )?;
    let dir = kit.join(KEYSHARES_DIR);
    let params = params(kit)?;
    let mut out = BTreeMap::new();
    for (site, (party, bytes)) in files {
        let path = dir.join(format!("{site}.bin"));
        let share =
            KeyShare::from_bytes(&params, &bytes).with_context(|| format!("{}", path.display()))?;
        if share.party() != party {
            bail!(
                "{}: a share of party {}, where {site} is party {party}",
                path.display(),
                share.party()
            );
        }
        out.insert(site, share);
    }
    Ok(out)
}

/// The threshold roster of `kit` (threshold `t`): each listed party with
/// the transport key in `kit/he-transport/<site>.bin`.
fn roster(kit: &Path, t: usize) -> Result<HeRoster> {
    let files = per_site(
        kit,
        TRANSPORT_DIR,
        "bin",
        32,
        "transport key",
        "every hospital runs `hospital keygen` and sends its he-transport.bin",
    )?;
    let mut members = Vec::with_capacity(files.len());
    for (site, (party, bytes)) in files {
        let key: [u8; 32] = bytes.try_into().map_err(|_| {
            anyhow::anyhow!(
                "{}/{site}.bin: not a 32-byte transport key",
                kit.join(TRANSPORT_DIR).display()
            )
        })?;
        members.push((party, key));
    }
    Ok(HeRoster::new(t, members)?)
}

/// The project CA's certificate in `kit` (`ca.pem`), which signed
/// statements are checked against.
fn ca_pem(kit: &Path) -> Result<String> {
    let path = kit.join("ca.pem");
    std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
}

/// Checks that `signed` (read from `path`) is signed by `site` with a
/// certificate of the project's CA (`ca`, PEM).
fn check_signer(signed: &SignedStatement, ca: &str, site: &ClientId, path: &Path) -> Result<()> {
    let signer = signed
        .verify(ca)
        .with_context(|| format!("{}", path.display()))?;
    if signer != site.as_str() {
        bail!("{}: signed by {signer}, not by {site}", path.display());
    }
    Ok(())
}

/// What a dealer signs with a deal: who dealt it to whom, for which
/// roster, and the SHA-256 of its bytes.
fn deal_statement(dealer: &str, recipient: &str, roster: &str, deal: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    format!(
        "fedcore-hospital deal v1\nfrom: {dealer}\nto: {recipient}\nroster: {roster}\nsha256: {}\n",
        hex(&Sha256::digest(deal))
    )
}

/// A signed file: `signer`'s signed `statement` (JSON, after its length as
/// a u32), then `bytes`.
fn signed_file(signer: &Kit, statement: &str, bytes: &[u8]) -> Result<Vec<u8>> {
    let json = serde_json::to_vec(&signer.sign(statement)?)?;
    let mut out = Vec::with_capacity(4 + json.len() + bytes.len());
    out.extend_from_slice(&u32::try_from(json.len())?.to_le_bytes());
    out.extend_from_slice(&json);
    out.extend_from_slice(bytes);
    Ok(out)
}

/// The bytes of a [`signed_file`] read from `path` (a `what`), once its
/// statement is signed by `site` with a certificate of the project's CA
/// (`ca`) and is `expected(bytes)` (`mismatch` says what else it could be).
fn open_signed<'a>(
    file: &'a [u8],
    path: &Path,
    ca: &str,
    site: &ClientId,
    what: &str,
    expected: impl Fn(&[u8]) -> String,
    mismatch: &str,
) -> Result<&'a [u8]> {
    let (json, raw) = file
        .split_at_checked(4)
        .and_then(|(n, rest)| rest.split_at_checked(u32::from_le_bytes(n.try_into().ok()?) as usize))
        .with_context(|| {
            format!(
                "{}: not a signed {what} (truncated, or made before they were signed: provision anew)",
                path.display()
            )
        })?;
    let signed: SignedStatement = serde_json::from_slice(json)
        .with_context(|| format!("{}: not a signed {what}", path.display()))?;
    check_signer(&signed, ca, site, path)?;
    if signed.statement != expected(raw) {
        bail!(
            "{}: {site}'s signature is not over this {what} {mismatch} (altered on the way, or made for \
             something else)",
            path.display()
        );
    }
    Ok(raw)
}

/// A deal's file: the dealer's signed statement of it, then the deal's
/// bytes. The signature makes a deal that is not its dealer's (made up by
/// whoever carried it, to spoil the recipient's threshold key) an error at
/// the recipient, not a key that silently decrypts nothing.
fn signed_deal(signer: &Kit, recipient: &str, roster: &str, deal: &[u8]) -> Result<Vec<u8>> {
    let statement = deal_statement(&signer.info.identity, recipient, roster, deal);
    signed_file(signer, &statement, deal)
}

/// What a hospital signs with a relinearization share: who made it, for
/// which round and collective key, and the SHA-256 of its bytes.
fn relin_statement(site: &str, round: u8, collective: [u8; 16], share: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    format!(
        "fedcore-hospital relinearization share v1\nfrom: {site}\nround: {round}\ncollective key: {}\nsha256: {}\n",
        hex(&collective),
        hex(&Sha256::digest(share))
    )
}

/// The relinearization shares of `round` in `kit` (`he-relin1/` or
/// `he-relin2/`): one per listed party, each signed by the site its file is
/// named after for this round and `collective`, of that site's party.
fn relin_shares(kit: &Path, round: u8, collective: &CollectiveKey) -> Result<Vec<RelinShare>> {
    let (folder, file) = if round == 1 {
        (RELIN1_DIR, RELIN1_FILE)
    } else {
        (RELIN2_DIR, RELIN2_FILE)
    };
    let how = format!(
        "every hospital runs `hospital keygen` {} and its {file} is copied here as <site>.bin",
        if round == 1 {
            "once every key share is in its kit"
        } else {
            "once every statement agrees and every first-round share is in its kit"
        }
    );
    let files = per_site(
        kit,
        folder,
        "bin",
        MAX_RELIN_FILE,
        "relinearization share",
        &how,
    )?;
    let ca = ca_pem(kit)?;
    let params = params(kit)?;
    let key_id = collective.context().key_id();
    let dir = kit.join(folder);
    let mut out = Vec::with_capacity(files.len());
    for (site, (party, bytes)) in files {
        let path = dir.join(format!("{site}.bin"));
        let raw = open_signed(
            &bytes,
            &path,
            &ca,
            &site,
            "relinearization share",
            |raw| relin_statement(site.as_str(), round, key_id, raw),
            &format!("of round {round} for collective key {}", hex(&key_id)),
        )?;
        let share =
            RelinShare::from_bytes(&params, raw).with_context(|| format!("{}", path.display()))?;
        if share.party() != party || share.round() != round {
            bail!(
                "{}: party {}'s share of round {}, where {site} is party {party} and this is round {round}",
                path.display(),
                share.party(),
                share.round()
            );
        }
        out.push(share);
    }
    Ok(out)
}

/// `collective` with the relinearization key of the signed shares in a
/// whole-update `kit`'s `he-relin1/` and `he-relin2/` (the server calls it
/// once the statements check; a hospital's keys come with it).
pub fn relinearized(kit: &Path, collective: CollectiveKey) -> Result<CollectiveKey> {
    let make = || -> Result<CollectiveKey> {
        let round1 = relin_shares(kit, 1, &collective)?;
        let round2 = relin_shares(kit, 2, &collective)?;
        Ok(collective.clone().with_relinearization(&round1, &round2)?)
    };
    make().with_context(|| {
        format!(
            "the relinearization key from {}/ and {}/ (a signature that no longer checks because a \
             certificate expired or was renewed: run `hospital keygen` again in every kit and carry the \
             new files; the shares stay the same)",
            kit.join(RELIN1_DIR).display(),
            kit.join(RELIN2_DIR).display()
        )
    })
}

/// The sites of `kit` whose file is not in `kit/<folder>/<site>.<ext>`.
fn missing_in(kit: &Path, folder: &str, ext: &str) -> Result<Vec<String>> {
    let dir = kit.join(folder);
    Ok(parties(kit)?
        .keys()
        .filter(|s| !dir.join(format!("{s}.{ext}")).exists())
        .map(ToString::to_string)
        .collect())
}

/// The deals in `kit/he-deals/` addressed to `me` (party `party`) for the
/// roster `roster` (fingerprint): one from every listed party, each signed
/// by the site its file is named after (a certificate of the project's
/// CA, `ca.pem` in the kit), from that site's party.
fn deals(kit: &Path, me: &str, party: u32, roster: &str) -> Result<Vec<Deal>> {
    let files = per_site(
        kit,
        DEALS_DIR,
        "bin",
        MAX_DEAL_FILE,
        "deal",
        "every hospital deals (`hospital keygen --deal` once every statement is in its kit) and \
         its he-deals-out/<this site>.bin is copied here as <dealer>.bin",
    )?;
    let ca = ca_pem(kit)?;
    let params = params(kit)?;
    let dir = kit.join(DEALS_DIR);
    let mut out = Vec::with_capacity(files.len());
    for (site, (dealer, bytes)) in files {
        let path = dir.join(format!("{site}.bin"));
        let what = || format!("{}", path.display());
        let raw = open_signed(
            &bytes,
            &path,
            &ca,
            &site,
            "deal",
            |raw| deal_statement(site.as_str(), me, roster, raw),
            &format!("to {me} for roster {roster}"),
        )?;
        let deal = Deal::from_bytes(&params, raw).with_context(what)?;
        if deal.dealer() != dealer || deal.recipient() != party {
            bail!(
                "{}: a deal from party {} to party {}, where {site} is party {dealer} and this hospital party {party}",
                path.display(),
                deal.dealer(),
                deal.recipient()
            );
        }
        out.push(deal);
    }
    Ok(out)
}

/// The collective key from `shares` (by site) of `kit`'s seed, with the
/// kit's threshold roster if it has one, and each site's party.
fn combine(
    kit: &Path,
    shares: &BTreeMap<ClientId, KeyShare>,
) -> Result<(CollectiveKey, BTreeMap<ClientId, u32>)> {
    let parties = shares
        .iter()
        .map(|(site, s)| (site.clone(), s.party()))
        .collect();
    let list: Vec<KeyShare> = shares.values().cloned().collect();
    let mut collective =
        CollectiveKey::combine(&params(kit)?, &crs(kit)?, &list).with_context(|| {
            format!(
                "combining the key shares in {}",
                kit.join(KEYSHARES_DIR).display()
            )
        })?;
    if let Some(t) = threshold(kit)? {
        collective = collective.with_roster(roster(kit, t)?)?;
    }
    Ok((collective, parties))
}

/// The site listed as `party` in `listed` (a kit's [`parties`]).
fn site_of(listed: &BTreeMap<ClientId, u32>, party: u32) -> Option<&ClientId> {
    listed.iter().find(|(_, p)| **p == party).map(|(s, _)| s)
}

/// A threshold roster as `keygen` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RosterInfo {
    /// How many hospitals must answer a key switch.
    pub threshold: usize,
    /// How many hospitals it lists.
    pub parties: usize,
    /// [`HeRoster::fingerprint`].
    pub fingerprint: String,
}

/// `threshold T of N, roster <fingerprint>`: what `keygen`, the server and
/// the hospitals print.
impl std::fmt::Display for RosterInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "threshold {} of {}, roster {}",
            self.threshold, self.parties, self.fingerprint
        )
    }
}

impl RosterInfo {
    fn of(roster: &HeRoster) -> Self {
        Self {
            threshold: roster.threshold(),
            parties: roster.parties().len(),
            fingerprint: roster.fingerprint(),
        }
    }
}

/// The keys a kit makes, as the hospitals state them to each other: the
/// seed, the parties, the digest of the very key shares combined (not only
/// the collective key: shares chosen to add up to a key of someone else's
/// would give the same key in every kit, each holding its own hospital's
/// genuine share), the collective key's id, the output key's id and,
/// under a threshold, the roster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyView {
    seed: [u8; 32],
    parties: String,
    shares: [u8; 32],
    output: [u8; 16],
    /// The collective key's id.
    pub key_id: [u8; 16],
    /// Under a threshold: the roster.
    pub roster: Option<RosterInfo>,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|x| format!("{x:02x}")).collect()
}

impl KeyView {
    fn of(
        kit: &Path,
        shares: &BTreeMap<ClientId, KeyShare>,
        collective: &CollectiveKey,
        output: [u8; 16],
    ) -> Result<Self> {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        h.update(b"fedcore-hospital key shares v1");
        for (site, share) in shares {
            let bytes = share.to_bytes();
            h.update((site.as_str().len() as u64).to_le_bytes());
            h.update(site.as_str());
            h.update((bytes.len() as u64).to_le_bytes());
            h.update(&bytes);
        }
        let parties = parties(kit)?
            .iter()
            .map(|(site, p)| format!("{site}={p}"))
            .collect::<Vec<_>>()
            .join(" ");
        Ok(Self {
            seed: collective.crs().bytes(),
            parties,
            shares: h.finalize().into(),
            output,
            key_id: collective.context().key_id(),
            roster: collective.roster().map(RosterInfo::of),
        })
    }

    /// What `site` signs: these keys, in words.
    fn statement(&self, site: &str) -> String {
        let roster = self.roster.as_ref().map_or_else(
            || "every hospital (N-of-N)".to_owned(),
            |r| format!("{} of {}, roster {}", r.threshold, r.parties, r.fingerprint),
        );
        format!(
            "fedcore-hospital multiparty keys v2\nsite: {site}\nseed: {}\nparties: {}\nkey shares: {}\n\
             collective key: {}\noutput key: {}\nthreshold: {roster}\n",
            hex(&self.seed),
            self.parties,
            hex(&self.shares),
            hex(&self.key_id),
            hex(&self.output)
        )
    }
}

/// The collective key of `kit`, each site's party, and what the keys are,
/// from the server's side (the output key's public key in the kit).
pub fn server_view(kit: &Path) -> Result<(CollectiveKey, BTreeMap<ClientId, u32>, KeyView)> {
    let listed = shares(kit)?;
    let (collective, parties) = combine(kit, &listed)?;
    let output = CkksContext::<Public>::from_file(&kit.join(KeyAuthority::PUBLIC_FILE))?.key_id();
    let view = KeyView::of(kit, &listed, &collective, output)?;
    Ok((collective, parties, view))
}

/// Whether every hospital's statement is in a kit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Statements {
    /// Every listed hospital's is there, and all state the kit's keys.
    Agree,
    /// These hospitals' are not there yet.
    Missing(Vec<String>),
}

/// Who is checking statements, and against what.
#[derive(Clone, Copy)]
pub enum Checker<'a> {
    /// A hospital (its site): its own statement must be the one it makes
    /// now.
    Hospital(&'a str),
    /// The server: each signer's certificate must be one the roster
    /// admits, except for the sites named (parties without a valid
    /// certificate, already reported).
    Server(&'a fedcore::net::provision::Roster, &'a [String]),
}

/// Checks the hospitals' signed statements in `kit/he-attestations/`: one
/// per listed site, signed with that site's certificate from the
/// project's CA (`ca.pem` in the kit), stating the keys of `view`. Equal
/// statements mean that every hospital combined the same key shares (in
/// which each found its own genuine share), the same transport keys, the
/// same parties and output key; whoever carried them could not make a
/// hospital state what it did not (short of the CA's key or a copy of a
/// hospital's kit). Errors on a statement that does not check or states
/// other keys.
pub fn check_attestations(kit: &Path, view: &KeyView, checker: Checker<'_>) -> Result<Statements> {
    let dir = kit.join(ATTESTATIONS_DIR);
    let missing: Vec<String> = parties(kit)?
        .keys()
        .filter(|s| !dir.join(format!("{s}.json")).exists())
        .map(ToString::to_string)
        .collect();
    if !missing.is_empty() {
        return Ok(Statements::Missing(missing));
    }
    let ca = ca_pem(kit)?;
    let files = per_site(
        kit,
        ATTESTATIONS_DIR,
        "json",
        MAX_ATTESTATION_FILE,
        "signed statement",
        "every hospital runs `hospital keygen` once every key share is in its kit, and its \
         he-attestation.json is copied here as <site>.json",
    )?;
    for (site, (_, bytes)) in files {
        let path = dir.join(format!("{site}.json"));
        let signed: SignedStatement = serde_json::from_slice(&bytes)
            .with_context(|| format!("{}: not a signed statement", path.display()))?;
        check_signer(&signed, &ca, &site, &path)?;
        if let Checker::Server(roster, unadmitted) = checker
            && !unadmitted.iter().any(|s| s == site.as_str())
            && let Err(refusal) = roster.admit(site.as_str(), &signed.signer_fingerprint()?)
        {
            bail!(
                "{}: signed with a certificate the roster does not admit ({refusal}); if {site}'s \
                 certificate was rotated or renewed, run `hospital keygen` in its kit and carry its new \
                 {ATTESTATION_FILE} here",
                path.display()
            );
        }
        let mine = view.statement(site.as_str());
        if signed.statement == mine {
            continue;
        }
        if matches!(checker, Checker::Hospital(me) if me == site.as_str()) {
            bail!(
                "{}: this kit makes other keys than this hospital stated: run `hospital keygen` again and \
                 carry the new {ATTESTATION_FILE} to every kit (the server's too); if this kit was not \
                 meant to change, find out what changed it",
                path.display()
            );
        }
        bail!(
            "{site} states other keys than this kit makes:\n{}\nthis kit:\n{mine}\nthe kits hold different \
             key shares, transport keys, parties or output keys: do not deal or start; find out which kit \
             was changed",
            signed.statement
        );
    }
    Ok(Statements::Agree)
}

/// The collective key of `kit` as hospital `me` (`key` its secret share)
/// combines it, once the share under its name is its own and, under a
/// threshold, the transport key under its name too; and what the keys
/// are (`output`: the output key's id).
fn hospital_view(
    kit: &Path,
    key: &PartyKey,
    me: &str,
    output: [u8; 16],
) -> Result<(CollectiveKey, KeyView)> {
    let mine = key.key_share(&crs(kit)?)?;
    let listed = shares(kit)?;
    match listed.get(&ClientId::new(me)) {
        Some(s) if *s == mine => {}
        Some(_) => bail!(
            "{}/{me}.bin is not this hospital's key share: the collective key would not be the one it made",
            kit.join(KEYSHARES_DIR).display()
        ),
        None => bail!(
            "{} has no share of {me}: copy the server kit's {KEYSHARES_DIR}/ here once every hospital's is in it",
            kit.join(KEYSHARES_DIR).display()
        ),
    }
    let (collective, _) = combine(kit, &listed)?;
    if let Some(roster) = collective.roster()
        && roster.transport(key.party()) != Some(key.transport_key())
    {
        bail!(
            "{}/{me}.bin is not this hospital's transport key ({TRANSPORT_FILE}): deals to it would be sealed to someone else",
            kit.join(TRANSPORT_DIR).display()
        );
    }
    let view = KeyView::of(kit, &listed, &collective, output)?;
    Ok((collective, view))
}

/// What `keygen` wrote, and where the kit stands.
#[derive(Debug)]
pub struct Keygen {
    /// The key share, for the server's operator.
    pub share: PathBuf,
    /// Under a threshold: the transport key, for the operator too.
    pub transport: Option<PathBuf>,
    /// Once every key share (and transport key) is in the kit: the keys
    /// it makes and the signed statement of them, for the operator.
    pub attested: Option<(KeyView, PathBuf)>,
    /// Whether every hospital's statement is in the kit and agrees.
    pub agreed: bool,
    /// The hospitals whose statements are not in the kit yet.
    pub missing: Vec<String>,
    /// Under a threshold, once dealt: whether this call made the deals
    /// (`false`: an earlier one, for the same roster).
    pub dealt: Option<bool>,
    /// A whole-update kit, once attested: the signed first-round
    /// relinearization share, for the operator.
    pub relin1: Option<PathBuf>,
    /// Once every statement agrees and every first-round share is in the
    /// kit: the signed second-round share, for the operator.
    pub relin2: Option<PathBuf>,
    /// The hospitals whose first-round shares are not in the kit yet.
    pub relin_missing: Vec<String>,
}

/// `hospital keygen`, run at each hospital as the operator brings the
/// others' public files:
/// 1. the hospital's secret share (made here once, read back after), its
///    key share (`he-keyshare.bin`) and, under a threshold, its transport
///    key (`he-transport.bin`);
/// 2. once every key share (and transport key) is in the kit: the
///    collective key, and a statement of it signed with the kit's key
///    (`he-attestation.json`);
/// 3. once every hospital's statement is in `he-attestations/`: whether
///    they agree; under a threshold, with `deal`, its deals (made once);
/// 4. for whole updates: from step 2 its signed first-round
///    relinearization share, and once the statements agree and every
///    first-round share is in `he-relin1/`, its signed second-round share
///    (for one first round only).
pub fn keygen(kit: &Path, deal: bool) -> Result<Keygen> {
    if !is_multiparty(kit) {
        bail!(
            "{} was not provisioned for multiparty keys (no {CRS_FILE}; `hospital provision --keys multiparty`)",
            kit.display()
        );
    }
    let threshold = threshold(kit)?;
    if deal && threshold.is_none() {
        bail!(
            "--deal applies to a kit provisioned with --threshold: under N-of-N nothing is dealt"
        );
    }
    let signer = Kit::load(kit)?;
    let me = signer.info.identity.clone();
    let key_path = kit.join(PARTY_KEY_FILE);
    let number = kit.join(PARTY_NUMBER_FILE);
    let party: u32 = std::fs::read_to_string(&number)
        .with_context(|| format!("reading {}", number.display()))?
        .trim()
        .parse()
        .with_context(|| format!("{}: not a party number", number.display()))?;
    if site_of(&parties(kit)?, party).map(ClientId::as_str) != Some(me.as_str()) {
        bail!("{}: party {party} is not {me}", number.display());
    }
    let key = if key_path.exists() {
        let key = PartyKey::from_file(&key_path).with_context(|| {
            format!(
                "{} (cut short by a crash? remove it and run keygen again)",
                key_path.display()
            )
        })?;
        if key.party() != party {
            bail!(
                "{} is party {}'s secret share; this kit is party {party}'s",
                key_path.display(),
                key.party()
            );
        }
        key
    } else {
        let key = PartyKey::generate(params(kit)?, party)?;
        key.write(&key_path)?;
        key
    };
    // The same share for the same secret and seed: writing it again is safe.
    let share = kit.join(KEYSHARE_FILE);
    write(&share, &key.key_share(&crs(kit)?)?.to_bytes())?;
    let transport = match threshold {
        Some(_) => {
            let path = kit.join(TRANSPORT_FILE);
            write(&path, &key.transport_key())?;
            Some(path)
        }
        None => None,
    };
    let mut made = Keygen {
        share,
        transport,
        attested: None,
        agreed: false,
        missing: Vec::new(),
        dealt: None,
        relin1: None,
        relin2: None,
        relin_missing: Vec::new(),
    };
    let ready = kit.join(KEYSHARES_DIR).exists()
        && (threshold.is_none() || kit.join(TRANSPORT_DIR).exists());
    if !ready {
        if deal {
            bail!("--deal: every hospital's key share and transport key come first");
        }
        return Ok(made);
    }
    let written = || {
        format!(
            "(this hospital's {KEYSHARE_FILE}{} written)",
            if threshold.is_some() {
                format!(" and {TRANSPORT_FILE} are")
            } else {
                " is".into()
            }
        )
    };
    let output = CkksContext::<Secret>::from_file(&kit.join(KeyAuthority::SECRET_FILE))?.key_id();
    let (collective, view) = hospital_view(kit, &key, &me, output).with_context(written)?;
    let statement = signer.sign(&view.statement(&me))?;
    let path = kit.join(ATTESTATION_FILE);
    write(&path, &serde_json::to_vec_pretty(&statement)?)?;
    made.attested = Some((view.clone(), path));
    // A statement that does not check or states other keys is an error
    // (written after this hospital's own: carry it, examine the kits).
    match check_attestations(kit, &view, Checker::Hospital(&me))? {
        Statements::Agree => made.agreed = true,
        Statements::Missing(sites) => made.missing = sites,
    }
    if let Some(roster) = collective.roster() {
        made.dealt = dealing(kit, &signer, &key, roster, deal, made.agreed)?;
    }
    if is_whole(kit)? {
        relinearizing(kit, &signer, &key, &collective, &mut made)?;
    }
    Ok(made)
}

/// A whole-update kit's relinearization rounds at `keygen`: this
/// hospital's signed first-round share (the same every time for its
/// secret and seed) and, once every statement agrees and every first-round
/// share is in the kit, its signed second-round share. It answers the
/// second round for one first round only (`he-relin2.txt`): a second round
/// is this hospital's secret times the first round's sum plus a small
/// error, and answers for first rounds varied by whoever carries them
/// could be averaged toward the secret.
fn relinearizing(
    kit: &Path,
    signer: &Kit,
    key: &PartyKey,
    collective: &CollectiveKey,
    made: &mut Keygen,
) -> Result<()> {
    let me = signer.info.identity.as_str();
    let key_id = collective.context().key_id();
    // Writes this hospital's signed share of `round` into `file`.
    let signed = |round: u8, file: &str, share: &[u8]| -> Result<PathBuf> {
        let path = kit.join(file);
        write(
            &path,
            &signed_file(signer, &relin_statement(me, round, key_id, share), share)?,
        )?;
        Ok(path)
    };
    let share = key.relin_round1(collective)?.to_bytes();
    made.relin1 = Some(signed(1, RELIN1_FILE, &share)?);
    if !made.agreed {
        return Ok(());
    }
    made.relin_missing = missing_in(kit, RELIN1_DIR, "bin")?;
    if !made.relin_missing.is_empty() {
        return Ok(());
    }
    let round1 = relin_shares(kit, 1, collective)?;
    let first = {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        h.update(b"fedcore-hospital relinearization round 1 v1");
        for s in &round1 {
            let bytes = s.to_bytes();
            h.update((bytes.len() as u64).to_le_bytes());
            h.update(&bytes);
        }
        hex(&h.finalize())
    };
    let record = kit.join(RELIN2_ANSWERED);
    if record.exists() {
        let before = std::fs::read_to_string(&record)
            .with_context(|| format!("reading {}", record.display()))?;
        if before.trim() != first {
            bail!(
                "this hospital answered the second relinearization round for another first round ({}): \
                 it answers one (answers for varied first rounds could be averaged toward its secret); \
                 the shares in {}/ changed since: find out why, or provision anew",
                record.display(),
                kit.join(RELIN1_DIR).display()
            );
        }
    }
    let share = key.relin_round2(collective, &round1)?.to_bytes();
    // Recorded, whole and on disk, before the share can leave.
    write_durably(&record, format!("{first}\n").as_bytes())?;
    made.relin2 = Some(signed(2, RELIN2_FILE, &share)?);
    Ok(())
}

/// `key`'s deals to `roster` in `he-deals-out/`, made once and only when
/// `deal` is asked and every hospital's statement `agreed` with this kit:
/// before that, an operator who put transport keys of his own in the kits
/// could open the deals. `he-dealt.txt`, written before the deals can
/// leave, records the roster: a second set of deals for one roster (some
/// members opening the first, some the second) would give threshold keys
/// that do not fit together, and deals for another roster mean the kit
/// changed under it. Returns whether this call dealt (`None`: not dealt).
fn dealing(
    kit: &Path,
    signer: &Kit,
    key: &PartyKey,
    roster: &HeRoster,
    deal: bool,
    agreed: bool,
) -> Result<Option<bool>> {
    let me = signer.info.identity.as_str();
    let fingerprint = roster.fingerprint();
    let out = kit.join(DEALS_OUT_DIR);
    let partial = kit.join(format!("{DEALS_OUT_DIR}.partial"));
    let me = ClientId::new(me);
    if let Some(before) = dealt_for(kit)? {
        if before != fingerprint {
            bail!(
                "this hospital dealt for roster {before} ({DEALT_FILE}); this kit's roster is {fingerprint}: the \
                 kit's transport keys or threshold changed since, and it deals once (for new members, provision anew)"
            );
        }
        if !out.exists() {
            // Cut short between the record and the rename: the deals are
            // in the partial folder, and none has left.
            let made = std::fs::read_to_string(partial.join(DEALT_FOR_FILE)).unwrap_or_default();
            if made.trim() != fingerprint {
                bail!(
                    "{DEALT_FILE} says this hospital dealt for roster {before}, but {} is gone: restore it \
                     (the operator has copies); dealing again would hand out shares that do not fit the first",
                    out.display()
                );
            }
            std::fs::rename(&partial, &out)
                .with_context(|| format!("moving the deals to {}", out.display()))?;
        }
        keep_own_deal(kit, &out, &me)?;
        return Ok(Some(false));
    }
    if !deal {
        return Ok(None);
    }
    if !agreed {
        bail!(
            "--deal needs every hospital's signed statement in {}/, agreeing with this kit's: \
             before that, deals could be sealed to transport keys that are not the hospitals'",
            kit.join(ATTESTATIONS_DIR).display()
        );
    }
    let names = parties(kit)?;
    let site =
        |party: u32| site_of(&names, party).expect("the roster's parties are the listed ones");
    // Written whole, recorded, then renamed: a crash leaves no half set
    // of deals where the operator collects them.
    if partial.exists() {
        std::fs::remove_dir_all(&partial)
            .with_context(|| format!("removing {}", partial.display()))?;
    }
    std::fs::create_dir_all(&partial)?;
    for d in key.deal(roster, &crs(kit)?)? {
        let to = site(d.recipient());
        write(
            &partial.join(format!("{to}.bin")),
            &signed_deal(signer, to.as_str(), &fingerprint, &d.to_bytes())?,
        )?;
    }
    let record = format!("{fingerprint}\n");
    write(&partial.join(DEALT_FOR_FILE), record.as_bytes())?;
    write(&kit.join(DEALT_FILE), record.as_bytes())?;
    std::fs::rename(&partial, &out)
        .with_context(|| format!("moving the deals to {}", out.display()))?;
    keep_own_deal(kit, &out, &me)?;
    Ok(Some(true))
}

/// The roster fingerprint this hospital dealt for, if it has dealt.
fn dealt_for(kit: &Path) -> Result<Option<String>> {
    let path = kit.join(DEALT_FILE);
    if !path.exists() {
        return Ok(None);
    }
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    Ok(Some(text.trim().to_owned()))
}

/// Puts a hospital's deal to itself into its own `he-deals/`.
fn keep_own_deal(kit: &Path, out: &Path, me: &ClientId) -> Result<()> {
    let from = out.join(format!("{me}.bin"));
    let bytes = std::fs::read(&from).with_context(|| format!("reading {}", from.display()))?;
    let mine = kit.join(DEALS_DIR);
    std::fs::create_dir_all(&mine)?;
    write(&mine.join(format!("{me}.bin")), &bytes)
}

/// A hospital's keys from its kit.
pub struct HospitalKeys {
    /// Uploads under the collective key; opens the global with the output key.
    pub sealer: MultipartySealer,
    /// Answers the key switch with the secret share or the threshold key.
    pub switcher: KeySwitcher,
    /// The keys, as every hospital stated them.
    pub view: KeyView,
}

/// A hospital's keys from its kit (`identity` is its site): its secret
/// share (or, under a threshold, the threshold key it opens from the deals
/// addressed to it), the output key, and the collective key of the shares
/// in its kit, once the share under its name is checked to be its own and
/// every hospital's signed statement agrees with it.
pub fn hospital(kit: &Path, identity: &str) -> Result<HospitalKeys> {
    let key_path = kit.join(PARTY_KEY_FILE);
    if !key_path.exists() {
        bail!(
            "{} is missing: run `hospital keygen --kit {}` and send its {KEYSHARE_FILE} to the server's operator",
            key_path.display(),
            kit.display()
        );
    }
    let key = PartyKey::from_file(&key_path)?;
    let output = CkksContext::<Secret>::from_file(&kit.join(KeyAuthority::SECRET_FILE))?;
    let (collective, view) = hospital_view(kit, &key, identity, output.key_id())?;
    if let Statements::Missing(sites) = check_attestations(kit, &view, Checker::Hospital(identity))?
    {
        bail!(
            "{} has no signed statement of {}: every hospital runs `hospital keygen` once every key share \
             is in its kit, and the operator copies each he-attestation.json here as <site>.json",
            kit.join(ATTESTATIONS_DIR).display(),
            sites.join(", ")
        );
    }
    let collective = if is_whole(kit)? {
        relinearized(kit, collective)?
    } else {
        collective
    };
    let switcher = match collective.roster().cloned() {
        None => KeySwitcher::new(key, collective.clone(), output.public())?,
        Some(roster) => {
            match dealt_for(kit)? {
                Some(f) if f == roster.fingerprint() => {}
                Some(f) => bail!(
                    "this hospital dealt for roster {f} ({DEALT_FILE}); this kit's roster is {}: the kit changed \
                     since (provision anew for new members)",
                    roster.fingerprint()
                ),
                None => bail!(
                    "this hospital has not dealt yet: `hospital keygen --kit {} --deal`",
                    kit.display()
                ),
            }
            let path = kit.join(THRESHOLD_KEY_FILE);
            let threshold = if path.exists() {
                let threshold = ThresholdKey::from_file(&path)?;
                if threshold.roster() != &roster || threshold.party() != key.party() {
                    bail!(
                        "{} is party {}'s threshold key for roster {}; this kit is party {}'s, roster {}: \
                         the kit changed since (provision anew for new members)",
                        path.display(),
                        threshold.party(),
                        threshold.roster().fingerprint(),
                        key.party(),
                        roster.fingerprint()
                    );
                }
                threshold
            } else {
                let threshold = key
                    .threshold_key(
                        &roster,
                        &crs(kit)?,
                        &deals(kit, identity, key.party(), &roster.fingerprint())?,
                    )
                    .with_context(|| {
                        format!(
                            "opening the deals in {} (roster {})",
                            kit.join(DEALS_DIR).display(),
                            roster.fingerprint()
                        )
                    })?;
                threshold.write(&path)?;
                threshold
            };
            KeySwitcher::threshold(threshold, collective.clone(), output.public())?
        }
    };
    Ok(HospitalKeys {
        sealer: MultipartySealer::new(&collective, output),
        switcher,
        view,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two kits, each holding its hospital's genuine key share and a share
    /// made up for the other, chosen so that both add up to one collective
    /// key: the key ids agree, the statements (which digest the shares) do
    /// not.
    #[test]
    fn kits_with_shares_that_add_up_to_one_key_state_different_keys() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(PARTIES_FILE),
            "hospital-1 1\nhospital-2 2\n",
        )
        .unwrap();
        let params = CkksParams::multiparty();
        let crs = Crs::random().unwrap();
        let genuine: Vec<KeyShare> = [1, 2]
            .iter()
            .map(|&p| {
                PartyKey::generate(params.clone(), p)
                    .unwrap()
                    .key_share(&crs)
                    .unwrap()
            })
            .collect();
        // The same coefficient of each, lowered by one: p1 + (p2 - 1) and
        // (p1 - 1) + p2 are the same polynomial.
        let header = 4 + 1 + 4 + 32 + 4;
        let bytes: Vec<Vec<u8>> = genuine.iter().map(KeyShare::to_bytes).collect();
        let word = |b: &[u8], i: usize| {
            u64::from_le_bytes(b[header + 8 * i..header + 8 * i + 8].try_into().unwrap())
        };
        let i = (0..)
            .find(|&i| word(&bytes[0], i) > 0 && word(&bytes[1], i) > 0)
            .unwrap();
        let lowered: Vec<KeyShare> = bytes
            .iter()
            .map(|b| {
                let mut b = b.clone();
                let w = (word(&b, i) - 1).to_le_bytes();
                b[header + 8 * i..header + 8 * i + 8].copy_from_slice(&w);
                KeyShare::from_bytes(&params, &b).unwrap()
            })
            .collect();
        let set = |a: &KeyShare, b: &KeyShare| -> BTreeMap<ClientId, KeyShare> {
            [
                (ClientId::new("hospital-1"), a.clone()),
                (ClientId::new("hospital-2"), b.clone()),
            ]
            .into_iter()
            .collect()
        };
        let view = |shares: BTreeMap<ClientId, KeyShare>| {
            let list: Vec<KeyShare> = shares.values().cloned().collect();
            let collective = CollectiveKey::combine(&params, &crs, &list).unwrap();
            KeyView::of(dir.path(), &shares, &collective, [7; 16]).unwrap()
        };
        let first = view(set(&genuine[0], &lowered[1]));
        let second = view(set(&lowered[0], &genuine[1]));
        assert_eq!(first.key_id, second.key_id, "one collective key");
        assert_ne!(
            first.statement("hospital-1"),
            second.statement("hospital-1")
        );
        // The genuine set states itself the same way every time.
        assert_eq!(
            view(set(&genuine[0], &genuine[1])).statement("hospital-2"),
            view(set(&genuine[0], &genuine[1])).statement("hospital-2")
        );
    }
}
