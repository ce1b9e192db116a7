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
//!   share under its own name is its own. Each prints the collective key's
//!   id: the hospitals compare it with each other (not only with the
//!   operator, who carried the shares): equal ids mean one set of shares,
//!   in which each hospital has found its own.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use fedcore::ClientId;
use fedcore_he::keyswitch::{KeySwitcher, MultipartySealer};
use fedcore_he::multiparty::{CollectiveKey, Crs, KeyShare, PartyKey};
use fedcore_he::{CkksContext, CkksParams, KeyAuthority, Secret};

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

/// Whether `kit` was provisioned for multiparty keys.
pub fn is_multiparty(kit: &Path) -> bool {
    kit.join(CRS_FILE).exists()
}

/// Writes the output key, the seed and the party numbers into the kits
/// (`sites`: each hospital's name and kit, party `i + 1` for the `i`-th).
pub fn provision(server: &Path, sites: &[(String, PathBuf)]) -> Result<()> {
    // The key switch's smudging covers so many parties.
    let params = CkksParams::multiparty();
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
    }
    for (i, (_, kit)) in sites.iter().enumerate() {
        write(
            &kit.join(PARTY_NUMBER_FILE),
            format!("{}\n", i + 1).as_bytes(),
        )?;
    }
    std::fs::create_dir_all(server.join(KEYSHARES_DIR))?;
    Ok(())
}

fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))
}

fn crs(kit: &Path) -> Result<Crs> {
    let path = kit.join(CRS_FILE);
    let seed: [u8; 32] = std::fs::read(&path)
        .with_context(|| format!("reading {}", path.display()))?
        .try_into()
        .map_err(|_| anyhow::anyhow!("{}: not a 32-byte seed", path.display()))?;
    Ok(Crs::new(seed))
}

/// `hospital keygen`: the hospital's secret share (made here once, read
/// back after) and its key share, written to `he-keyshare.bin`; returns
/// that file's path.
pub fn keygen(kit: &Path) -> Result<PathBuf> {
    if !is_multiparty(kit) {
        bail!(
            "{} was not provisioned for multiparty keys (no {CRS_FILE}; `hospital provision --keys multiparty`)",
            kit.display()
        );
    }
    let key_path = kit.join(PARTY_KEY_FILE);
    let number = kit.join(PARTY_NUMBER_FILE);
    let party: u32 = std::fs::read_to_string(&number)
        .with_context(|| format!("reading {}", number.display()))?
        .trim()
        .parse()
        .with_context(|| format!("{}: not a party number", number.display()))?;
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
        let key = PartyKey::generate(CkksParams::multiparty(), party)?;
        key.write(&key_path)?;
        key
    };
    // The same share for the same secret and seed: writing it again is safe.
    let share = kit.join(KEYSHARE_FILE);
    write(&share, &key.key_share(&crs(kit)?)?.to_bytes())?;
    Ok(share)
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

/// The key shares in `kit/he-keyshares/`: exactly one `<site>.bin` per
/// party listed at provisioning, of that party. A share for a site that is
/// not listed would let whoever made it fold a secret of their own into
/// the collective key.
fn shares(kit: &Path) -> Result<BTreeMap<ClientId, KeyShare>> {
    let listed = parties(kit)?;
    let dir = kit.join(KEYSHARES_DIR);
    let mut out = BTreeMap::new();
    let entries = std::fs::read_dir(&dir).with_context(|| {
        format!(
            "reading {} (the hospitals' {KEYSHARE_FILE} files, one <site>.bin each)",
            dir.display()
        )
    })?;
    for entry in entries {
        let path = entry?.path();
        let what = || format!("{}", path.display());
        let meta = std::fs::symlink_metadata(&path).with_context(what)?;
        let site = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".bin"))
            .filter(|_| meta.is_file());
        let Some(site) = site else {
            bail!(
                "{}: {KEYSHARES_DIR}/ holds only files <site>.bin (copy the shares' files, not their folder)",
                path.display()
            );
        };
        let Some(&party) = listed.get(&ClientId::new(site)) else {
            bail!(
                "{}: {site} is not a party provisioned in this kit",
                path.display()
            );
        };
        if meta.len() > MAX_SHARE_FILE {
            bail!(
                "{}: {} bytes is not a key share",
                path.display(),
                meta.len()
            );
        }
        let bytes = std::fs::read(&path).with_context(what)?;
        let share = KeyShare::from_bytes(&CkksParams::multiparty(), &bytes).with_context(what)?;
        if share.party() != party {
            bail!(
                "{}: a share of party {}, where {site} is party {party}",
                path.display(),
                share.party()
            );
        }
        out.insert(ClientId::new(site), share);
    }
    let missing: Vec<String> = listed
        .keys()
        .filter(|s| !out.contains_key(*s))
        .map(ToString::to_string)
        .collect();
    if !missing.is_empty() {
        bail!(
            "{} has no key share of {}: every hospital runs `hospital keygen` first",
            dir.display(),
            missing.join(", ")
        );
    }
    Ok(out)
}

/// The collective key from `shares` (by site) of `kit`'s seed, and each
/// site's party.
fn combine(
    kit: &Path,
    shares: BTreeMap<ClientId, KeyShare>,
) -> Result<(CollectiveKey, BTreeMap<ClientId, u32>)> {
    let parties = shares
        .iter()
        .map(|(site, s)| (site.clone(), s.party()))
        .collect();
    let list: Vec<KeyShare> = shares.into_values().collect();
    let collective = CollectiveKey::combine(&CkksParams::multiparty(), &crs(kit)?, &list)
        .with_context(|| {
            format!(
                "combining the key shares in {}",
                kit.join(KEYSHARES_DIR).display()
            )
        })?;
    Ok((collective, parties))
}

/// The collective key from the key shares in `kit` and each site's party.
pub fn collective(kit: &Path) -> Result<(CollectiveKey, BTreeMap<ClientId, u32>)> {
    combine(kit, shares(kit)?)
}

/// A hospital's sealer, key switcher and the collective key's id.
pub type HospitalKeys = (MultipartySealer, KeySwitcher, [u8; 16]);

/// A hospital's keys from its kit (`identity` is its site): its secret
/// share, the output key, and the collective key of the shares in its
/// kit, once the share under its name is checked to be its own.
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
    let mine = key.key_share(&crs(kit)?)?;
    let listed = shares(kit)?;
    match listed.get(&ClientId::new(identity)) {
        Some(s) if *s == mine => {}
        Some(_) => bail!(
            "{}/{identity}.bin is not this hospital's key share: the collective key would not be the one it made",
            kit.join(KEYSHARES_DIR).display()
        ),
        None => bail!(
            "{} has no share of {identity}: copy the server kit's {KEYSHARES_DIR}/ here once every hospital's is in it",
            kit.join(KEYSHARES_DIR).display()
        ),
    }
    let (collective, _) = combine(kit, listed)?;
    let output = CkksContext::<Secret>::from_file(&kit.join(KeyAuthority::SECRET_FILE))?;
    let id = collective.context().key_id();
    let switcher = KeySwitcher::new(key, collective.clone(), output.public())?;
    Ok((MultipartySealer::new(&collective, output), switcher, id))
}
