//! The robust rules and attacks the experiment examples (`byzantine`,
//! `fedopt`) select by name, with the strengths their tables use.

use anyhow::{Result, bail};
use fedcore::{Aggregator, FedAvg};
use fedcore_robust::attacks::Attack;
use fedcore_robust::{
    BulyanParams, CenteredClippingParams, CoordinateMedian, GeometricMedianParams, KrumParams,
    TrimmedMeanParams,
};

/// The attacks on the update (`None` for `none` and for `label-flip`, an
/// attack on the data).
pub fn attack(name: &str) -> Result<Option<Attack>> {
    Ok(Some(match name {
        "none" | "label-flip" => return Ok(None),
        "sign-flip" => Attack::SignFlip { scale: 4.0 },
        "gaussian" => Attack::Gaussian { std: 0.3 },
        "scaling" => Attack::Scaling { factor: 50.0 },
        "alie" => Attack::Alie { z: 1.0, samples: 3 },
        "ipm" => Attack::Ipm {
            epsilon: 0.5,
            samples: 2,
        },
        other => bail!("unknown attack `{other}`"),
    }))
}

/// An aggregator for `clients` updates of which `byzantine` may lie.
pub fn aggregator(name: &str, clients: usize, byzantine: usize) -> Result<Box<dyn Aggregator>> {
    Ok(match name {
        "fedavg" => Box::new(FedAvg),
        "median" => Box::new(CoordinateMedian),
        "trimmed-mean" => {
            let beta = (byzantine as f64 / clients as f64).max(0.1);
            Box::new(TrimmedMeanParams::new(beta).check()?)
        }
        "krum" => Box::new(KrumParams::new(clients, byzantine).check()?),
        // Needs clients >= 4 * byzantine + 3.
        "bulyan" => Box::new(BulyanParams::new(clients, byzantine).check()?),
        // Karimireddy et al. pair it with momentum at the workers.
        "centered-clipping" => Box::new(CenteredClippingParams::new(1.0).check()?),
        "geometric-median" => Box::new(GeometricMedianParams::new().check()?),
        other => bail!("unknown aggregator `{other}`"),
    })
}
