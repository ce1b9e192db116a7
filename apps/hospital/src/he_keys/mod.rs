//! The CKKS keys of a simulation, written once into its run folder and read
//! back on `--resume`: one key pair from the key authority (`--keys
//! single`), or multiparty keys (`--keys multiparty`): a secret share per
//! hospital, the collective key combined from their key shares (no secret
//! at the server), optionally threshold keys, and the output key the
//! hospitals open the global with.
//!
//! In a simulation every hospital is a thread of one process, so the key
//! ceremony runs here in one go: each hospital's share is made by its own
//! [`PartyKey`] and only its public key share and deals leave it.
//!
//! In a deployment ([`kit`]) each hospital makes its share on its own
//! machine (`hospital keygen`), and only its key share travels: the
//! operator collects them into the server's kit and hands the same shares
//! to every hospital, which checks that they are one per listed party and
//! that its own is among them.

pub mod kit;

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use fedcore::ClientId;
use fedcore_he::keyswitch::{KeySwitcher, MultipartySealer, key_switch_round};
use fedcore_he::multiparty::{
    CollectiveKey, Crs, DEFAULT_DISTANCE_BOUND, Deal, PartyKey, RelinShare, Roster, ThresholdKey,
};
use fedcore_he::{
    CkksContext, CkksParams, CkksSealer, EncryptedMedian, KeyAuthority, Public, Secret, SlotPacking,
};

use crate::recipe::{HeKeys, Rule, hospital};

/// File of the common reference string's seed (public).
pub(crate) const CRS_FILE: &str = "he-crs.bin";

/// The keys of a simulation's hospitals.
pub enum SimKeys {
    /// Every hospital holds the key authority's secret key.
    Single(CkksContext<Secret>),
    /// Multiparty keys.
    Multiparty(Box<MultipartyKeys>),
}

/// Multiparty keys of `n` hospitals (party `i + 1` is `hospital(i)`).
pub struct MultipartyKeys {
    /// The hospitals' output key: the sealed global is under it.
    output: CkksContext<Secret>,
    collective: CollectiveKey,
    parties: Vec<PartyKey>,
    /// Each party's threshold key, with a threshold.
    threshold: Option<Vec<ThresholdKey>>,
}

/// The multiparty parameters for what is sealed: the head's, or the
/// encrypted geometric median's (`whole`, `--encrypt all`: their upload
/// level holds a product of uploads with its smudging).
pub fn multiparty_params(whole: bool) -> CkksParams {
    if whole {
        CkksParams::multiparty_median()
    } else {
        CkksParams::multiparty()
    }
}

impl SimKeys {
    /// The keys in `dir`, made there first unless `resume` (then they must
    /// be there, of the same kind). `threshold` applies to multiparty keys,
    /// and `whole` (`--encrypt all`) picks their parameters
    /// ([`multiparty_params`]) and makes the collective relinearization key.
    pub fn load_or_create(
        dir: &Path,
        kind: HeKeys,
        hospitals: usize,
        threshold: Option<usize>,
        resume: bool,
        whole: bool,
    ) -> Result<Self> {
        let params = multiparty_params(whole);
        let secret = dir.join(KeyAuthority::SECRET_FILE);
        let saved = if secret.exists() {
            Some(if dir.join(CRS_FILE).exists() {
                HeKeys::Multiparty
            } else {
                HeKeys::Single
            })
        } else {
            None
        };
        match (saved, resume) {
            (Some(s), _) if s != kind => bail!(
                "the keys in {} are {} keys; this run asks for {} (--keys)",
                dir.display(),
                name(s),
                name(kind)
            ),
            (None, true) => bail!("no HE keys in {} to resume with", dir.display()),
            _ => {}
        }
        if saved.is_some() {
            return Ok(match kind {
                HeKeys::Single => Self::Single(
                    CkksContext::<Secret>::from_file(&secret)
                        .with_context(|| format!("reading {}", secret.display()))?,
                ),
                HeKeys::Multiparty => Self::Multiparty(Box::new(MultipartyKeys::read(
                    dir, hospitals, threshold, &params,
                )?)),
            });
        }
        // A new set is made in a folder of this process's own and renamed
        // into place whole, so that a ceremony cut short leaves nothing
        // half made where the keys are looked for.
        let partial = dir.with_extension(format!("partial-{}", std::process::id()));
        if partial.exists() {
            std::fs::remove_dir_all(&partial)
                .with_context(|| format!("removing {}", partial.display()))?;
        }
        if dir.exists() {
            if std::fs::read_dir(dir)?.next().is_some() {
                bail!(
                    "{} holds files but no complete set of keys: remove it to make new ones",
                    dir.display()
                );
            }
            std::fs::remove_dir(dir)?;
        }
        let keys = match kind {
            HeKeys::Single => Self::Single(KeyAuthority::write(CkksParams::default(), &partial)?.0),
            HeKeys::Multiparty => Self::Multiparty(Box::new(MultipartyKeys::create(
                &partial, hospitals, threshold, params,
            )?)),
        };
        std::fs::rename(&partial, dir)
            .with_context(|| format!("moving the new keys to {}", dir.display()))?;
        Ok(keys)
    }

    /// The key the hospitals open the global with (and the evaluation site
    /// opens the head with).
    pub fn opener(&self) -> &CkksContext<Secret> {
        match self {
            Self::Single(s) => s,
            Self::Multiparty(m) => &m.output,
        }
    }

    /// The server's rule for these keys: `rule` itself for one key pair;
    /// under multiparty keys, a plain rule's round with the key switch
    /// (`server_learning_rate` must be the server's).
    pub fn server_rule(&self, rule: Rule, server_learning_rate: f32) -> Result<Rule> {
        let Self::Multiparty(m) = self else {
            return Ok(rule);
        };
        switch_rule(
            rule,
            m.collective.clone(),
            m.output.public(),
            m.parties(),
            server_learning_rate,
        )
    }

    /// The encrypted geometric median under multiparty keys: the distances
    /// computed under the collective key and decrypted together by the
    /// hospitals, the median's sum switched to the output key
    /// (`server_learning_rate` must be the server's).
    pub fn median_rule(&self, server_learning_rate: f32) -> Result<Rule> {
        let Self::Multiparty(m) = self else {
            bail!("the multiparty median needs multiparty keys");
        };
        median_rule(
            m.collective.clone(),
            m.output.public(),
            m.parties(),
            server_learning_rate,
        )
    }

    /// Hospital `i`'s (0-based) sealer and, under multiparty keys, its
    /// answer to the key-switch step (and to the distance step of the
    /// encrypted geometric median).
    pub fn hospital(&self, i: usize) -> Result<(Box<dyn fedcore::Sealer>, Option<KeySwitcher>)> {
        Ok(match self {
            Self::Single(s) => (Box::new(CkksSealer::new(s.clone())), None),
            Self::Multiparty(m) => {
                let sealer = MultipartySealer::new(&m.collective, m.output.clone());
                let output = m.output.public();
                let party = m
                    .parties
                    .get(i)
                    .with_context(|| format!("no hospital {}", i + 1))?;
                let switcher = match &m.threshold {
                    Some(keys) => {
                        KeySwitcher::threshold(keys[i].clone(), m.collective.clone(), output)?
                    }
                    None => KeySwitcher::new(party.clone(), m.collective.clone(), output)?,
                };
                (Box::new(sealer), Some(switcher))
            }
        })
    }
}

/// The encrypted geometric median under multiparty keys (`collective`
/// with its relinearization key): its distance step decrypted together by
/// the hospitals, its sum switched to `output` (`server_learning_rate` must
/// be the server's); one value per slot.
pub fn median_rule(
    collective: CollectiveKey,
    output: CkksContext<Public>,
    parties: BTreeMap<ClientId, u32>,
    server_learning_rate: f32,
) -> Result<Rule> {
    let median =
        EncryptedMedian::multiparty(collective.clone(), parties.clone(), DEFAULT_DISTANCE_BOUND)?;
    let (round, sum) = key_switch_round(median, collective, output, parties, server_learning_rate)?;
    Ok(Rule::KeySwitchMedian(
        Box::new(round),
        sum.with_slot_packing(SlotPacking::Real),
    ))
}

/// A plain `rule`'s round with the key switch to `output`
/// (`server_learning_rate` must be the server's).
pub fn switch_rule(
    rule: Rule,
    collective: CollectiveKey,
    output: CkksContext<Public>,
    parties: BTreeMap<ClientId, u32>,
    server_learning_rate: f32,
) -> Result<Rule> {
    let Rule::Plain(inner) = rule else {
        bail!(
            "the key switch wraps a plain aggregator's rule (the encrypted geometric median under multiparty keys is SimKeys::median_rule)"
        );
    };
    let (round, sum) = key_switch_round(inner, collective, output, parties, server_learning_rate)?;
    Ok(Rule::KeySwitch(Box::new(round), sum))
}

/// What keys of `params` seal.
fn sealed_by(params: &CkksParams) -> &'static str {
    if *params == CkksParams::multiparty_median() {
        "whole updates (all)"
    } else {
        "the head (head)"
    }
}

fn name(k: HeKeys) -> &'static str {
    match k {
        HeKeys::Single => "single",
        HeKeys::Multiparty => "multiparty",
    }
}

fn party_file(dir: &Path, party: u32) -> std::path::PathBuf {
    dir.join(format!("he-party-{party}.key"))
}

fn threshold_file(dir: &Path, party: u32) -> std::path::PathBuf {
    dir.join(format!("he-threshold-{party}.key"))
}

impl MultipartyKeys {
    /// Every hospital's secret share, their key shares combined, the deals
    /// of a threshold, and the output key; each written to `dir`.
    fn create(
        dir: &Path,
        hospitals: usize,
        threshold: Option<usize>,
        params: CkksParams,
    ) -> Result<Self> {
        if let Some(t) = threshold {
            check_threshold(t, hospitals)?;
        }
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let crs = Crs::random()?;
        let parties = (1..=hospitals as u32)
            .map(|p| PartyKey::generate(params.clone(), p))
            .collect::<fedcore_he::Result<Vec<_>>>()?;
        for p in &parties {
            p.write(&party_file(dir, p.party()))?;
        }
        let threshold = match threshold {
            None => None,
            Some(t) => {
                let roster = roster(t, &parties)?;
                // Each hospital deals to every other; only its own deals
                // reach each one.
                let deals: Vec<Deal> = parties
                    .iter()
                    .map(|p| p.deal(&roster, &crs))
                    .collect::<fedcore_he::Result<Vec<_>>>()?
                    .into_iter()
                    .flatten()
                    .collect();
                let keys = parties
                    .iter()
                    .map(|p| p.threshold_key(&roster, &crs, &Deal::addressed_to(&deals, p.party())))
                    .collect::<fedcore_he::Result<Vec<_>>>()?;
                for k in &keys {
                    k.write(&threshold_file(dir, k.party()))?;
                }
                Some(keys)
            }
        };
        // Written last: the CRS file marks a complete multiparty key set.
        let (output, _) = KeyAuthority::write(params.clone(), dir)?;
        std::fs::write(dir.join(CRS_FILE), crs.bytes())
            .with_context(|| format!("writing {}", dir.join(CRS_FILE).display()))?;
        Self::assemble(output, crs, parties, threshold)
    }

    /// The keys [`MultipartyKeys::create`] wrote, for `hospitals` hospitals
    /// with `threshold` (as the run that wrote them).
    fn read(
        dir: &Path,
        hospitals: usize,
        threshold: Option<usize>,
        params: &CkksParams,
    ) -> Result<Self> {
        let seed: [u8; 32] = std::fs::read(dir.join(CRS_FILE))
            .with_context(|| format!("reading {}", dir.join(CRS_FILE).display()))?
            .try_into()
            .map_err(|_| anyhow::anyhow!("{CRS_FILE}: not a 32-byte seed"))?;
        let output = CkksContext::<Secret>::from_file(&dir.join(KeyAuthority::SECRET_FILE))?;
        let mut parties = Vec::with_capacity(hospitals);
        for p in 1..=hospitals as u32 {
            let path = party_file(dir, p);
            if !path.exists() {
                bail!(
                    "{} is missing: the keys were made for another number of hospitals",
                    path.display()
                );
            }
            let party = PartyKey::from_file(&path)?;
            if party.params() != params {
                bail!(
                    "the keys in {} were made for {}; this run seals {} (--encrypt)",
                    dir.display(),
                    sealed_by(party.params()),
                    sealed_by(params)
                );
            }
            parties.push(party);
        }
        if party_file(dir, hospitals as u32 + 1).exists() {
            bail!(
                "the keys in {} are for more than {hospitals} hospitals",
                dir.display()
            );
        }
        let mut keys = Vec::new();
        for p in (1..=hospitals as u32).filter(|p| threshold_file(dir, *p).exists()) {
            let path = threshold_file(dir, p);
            let k = ThresholdKey::from_file(&path)?;
            if k.party() != p
                || keys
                    .first()
                    .is_some_and(|f: &ThresholdKey| f.roster() != k.roster())
            {
                bail!(
                    "{}: not party {p}'s threshold key, or of another roster than the others",
                    path.display()
                );
            }
            keys.push(k);
        }
        let saved = keys.first().map(|k| k.roster().threshold());
        if saved != threshold || (!keys.is_empty() && keys.len() != hospitals) {
            bail!(
                "the keys in {} were made for {}; this run asks for {}",
                dir.display(),
                describe(saved),
                describe(threshold)
            );
        }
        Self::assemble(output, Crs::new(seed), parties, threshold.map(|_| keys))
    }

    /// The collective key from each party's key share (with the roster of
    /// the threshold keys, if any) and, at the median's parameters, the
    /// collective relinearization key from both rounds of every party's
    /// shares (made again on resume: a party's shares are the same every
    /// time for the same secret and seed).
    fn assemble(
        output: CkksContext<Secret>,
        crs: Crs,
        parties: Vec<PartyKey>,
        threshold: Option<Vec<ThresholdKey>>,
    ) -> Result<Self> {
        let params = parties.first().context("no hospitals")?.params().clone();
        let shares = parties
            .iter()
            .map(|p| p.key_share(&crs))
            .collect::<fedcore_he::Result<Vec<_>>>()?;
        let mut collective = CollectiveKey::combine(&params, &crs, &shares)?;
        if params == CkksParams::multiparty_median() {
            let round1 = parties
                .iter()
                .map(|p| p.relin_round1(&collective))
                .collect::<fedcore_he::Result<Vec<RelinShare>>>()?;
            let round2 = parties
                .iter()
                .map(|p| p.relin_round2(&collective, &round1))
                .collect::<fedcore_he::Result<Vec<RelinShare>>>()?;
            collective = collective.with_relinearization(&round1, &round2)?;
        }
        if let Some(keys) = &threshold {
            let first = keys.first().context("a threshold with no keys")?;
            collective = collective.with_roster(first.roster().clone())?;
        }
        Ok(Self {
            output,
            collective,
            parties,
            threshold,
        })
    }

    /// Each hospital's client id and party number.
    fn parties(&self) -> BTreeMap<ClientId, u32> {
        self.parties
            .iter()
            .map(|p| (ClientId::new(hospital(p.party() as usize - 1)), p.party()))
            .collect()
    }
}

/// A threshold of 1 would let any one hospital's share (with the
/// server's aggregate) open every upload.
pub(crate) fn check_threshold(threshold: usize, hospitals: usize) -> Result<()> {
    if threshold < 2 || threshold > hospitals {
        bail!(
            "--threshold {threshold}: between 2 and the {hospitals} hospitals (with 1, any one hospital's key would open every upload)"
        );
    }
    Ok(())
}

fn roster(threshold: usize, parties: &[PartyKey]) -> Result<Roster> {
    check_threshold(threshold, parties.len())?;
    Ok(Roster::new(
        threshold,
        parties
            .iter()
            .map(|p| (p.party(), p.transport_key()))
            .collect(),
    )?)
}

fn describe(threshold: Option<usize>) -> String {
    threshold.map_or_else(
        || "every hospital (N-of-N)".into(),
        |t| format!("a threshold of {t}"),
    )
}
