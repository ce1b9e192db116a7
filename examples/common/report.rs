//! What the experiment examples (`byzantine`, `fedopt`) share: a report
//! written as `<stem>.md`, `<stem>.json` and `<stem>.png`, and the font
//! their plots draw text with. Each includes this file as a module
//! (`#[path = "../../common/report.rs"]`): two binaries' worth of helpers
//! do not make a crate.

use std::path::Path;

use anyhow::{Context, Result};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Registers DejaVu Sans as plotters' "sans-serif" (ab_glyph needs the font
/// bytes; Debian's fonts-dejavu-core ships it).
pub fn register_font() -> Result<()> {
    const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";
    let font = std::fs::read(FONT)
        .with_context(|| format!("the plot needs {FONT} (Debian fonts-dejavu-core)"))?;
    // plotters keeps the font for the process: leaked once per plot.
    let font: &'static [u8] = Box::leak(font.into_boxed_slice());
    plotters::style::register_font("sans-serif", plotters::style::FontStyle::Normal, font)
        .map_err(|_| anyhow::anyhow!("cannot load the font {FONT}"))
}

/// Writes `<out>/<stem>.md` (the report), `<stem>.json` (the results, from
/// which `--plot-only` redraws) and `<stem>.png` (drawn by `plot`).
pub fn write<R: Serialize>(
    out: &Path,
    stem: &str,
    md: &str,
    results: &R,
    plot: impl FnOnce(&Path, &R) -> Result<()>,
) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    std::fs::write(out.join(format!("{stem}.md")), md)?;
    std::fs::write(
        out.join(format!("{stem}.json")),
        serde_json::to_vec_pretty(results)?,
    )?;
    plot(&out.join(format!("{stem}.png")), results)
}

/// Redraws `<out>/<stem>.png` from a `<stem>.json` written by [`write`].
pub fn redraw<R: DeserializeOwned>(
    out: &Path,
    json: &Path,
    plot: impl FnOnce(&Path, &R) -> Result<()>,
) -> Result<()> {
    let results: R = serde_json::from_slice(
        &std::fs::read(json).with_context(|| format!("reading {}", json.display()))?,
    )
    .with_context(|| format!("reading {}", json.display()))?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let stem = json.file_stem().context("the results file has no name")?;
    plot(&out.join(format!("{}.png", stem.display())), &results)
}
