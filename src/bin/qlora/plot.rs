//! The loss plot written next to the adapter: training loss per step and validation loss, as an
//! SVG (plotters' SVG backend: no fonts or system libraries needed).

use anyhow::{anyhow, Result};
use plotters::prelude::*;
use std::path::Path;

/// Writes `path`: training loss (line) and validation loss (line with points) against the step.
pub fn loss_svg(path: &Path, train: &[(u64, f64)], val: &[(u64, f64)], title: &str) -> Result<()> {
    let all = train.iter().chain(val).map(|p| p.1).filter(|x| x.is_finite());
    let (lo, hi) = all.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), x| (a.min(x), b.max(x)));
    if !lo.is_finite() {
        return Ok(());
    }
    let pad = ((hi - lo) * 0.05).max(1e-3);
    let last = train.iter().chain(val).map(|p| p.0).max().unwrap_or(1).max(1);
    let tmp = path.with_extension("svg.tmp");
    {
        let root = SVGBackend::new(&tmp, (800, 480)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| anyhow!("{}: {e}", path.display()))?;
        let name = Path::new(title).file_name().map_or_else(|| title.to_owned(), |n| n.to_string_lossy().into_owned());
        let mut chart = ChartBuilder::on(&root)
            .caption(format!("qlora train: {name}"), ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(56)
            .build_cartesian_2d(0f64..last as f64, (lo - pad)..(hi + pad))
            .map_err(|e| anyhow!("{}: {e}", path.display()))?;
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc("loss (mean over counted tokens)")
            .draw()
            .map_err(|e| anyhow!("{}: {e}", path.display()))?;
        let blue = RGBColor(31, 119, 180);
        let orange = RGBColor(255, 127, 14);
        chart
            .draw_series(LineSeries::new(train.iter().map(|&(s, l)| (s as f64, l)), blue.stroke_width(2)))
            .map_err(|e| anyhow!("{e}"))?
            .label("training")
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], blue.stroke_width(2)));
        if !val.is_empty() {
            chart
                .draw_series(LineSeries::new(val.iter().map(|&(s, l)| (s as f64, l)), orange.stroke_width(2)))
                .map_err(|e| anyhow!("{e}"))?
                .label("validation")
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], orange.stroke_width(2)));
            chart
                .draw_series(val.iter().map(|&(s, l)| Circle::new((s as f64, l), 3, orange.filled())))
                .map_err(|e| anyhow!("{e}"))?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperRight)
            .draw()
            .map_err(|e| anyhow!("{e}"))?;
        root.present().map_err(|e| anyhow!("{}: {e}", path.display()))?;
    }
    std::fs::rename(&tmp, path)?;
    Ok(())
}
