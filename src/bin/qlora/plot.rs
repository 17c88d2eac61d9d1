//! The loss plot written next to the adapter: training loss per step (the raw points faint, an
//! exponential moving average over them, as TensorBoard and W&B smooth noisy small-batch losses)
//! and validation loss, against integer steps, as an SVG (plotters' SVG backend: no fonts or
//! system libraries needed).

use anyhow::{anyhow, Result};
use plotters::prelude::*;
use std::path::Path;

/// Weight of the past in the training curve's moving average (TensorBoard's slider; 0.6 is its
/// default, higher is smoother: batch-2 losses need more).
pub const EMA_WEIGHT: f64 = 0.8;

/// TensorBoard's smoothing: m_t = w·m_(t-1) + (1-w)·x_t from m_0 = 0, reported debiased as
/// m_t / (1 - w^t), so the first point is x_1 itself and a constant stays constant.
pub fn ema(xs: &[f64], w: f64) -> Vec<f64> {
    let (mut m, mut wt) = (0.0, 1.0);
    xs.iter()
        .map(|&x| {
            m = w * m + (1.0 - w) * x;
            wt *= w;
            m / (1.0 - wt)
        })
        .collect()
}

/// Writes `path`: training loss (faint raw points and line, the EMA over them) and validation
/// loss (line with points) against the step, with integer step ticks.
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
            // u64 steps: plotters places ticks on integers only.
            .build_cartesian_2d(0u64..last, (lo - pad)..(hi + pad))
            .map_err(|e| anyhow!("{}: {e}", path.display()))?;
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc("loss (mean over counted tokens)")
            .draw()
            .map_err(|e| anyhow!("{}: {e}", path.display()))?;
        let blue = RGBColor(31, 119, 180);
        let orange = RGBColor(255, 127, 14);
        let faint = blue.mix(0.3);
        chart.draw_series(LineSeries::new(train.iter().copied(), faint.stroke_width(1))).map_err(|e| anyhow!("{e}"))?;
        chart
            .draw_series(train.iter().map(|&p| Circle::new(p, 2, faint.filled())))
            .map_err(|e| anyhow!("{e}"))?
            .label("training (raw)")
            .legend(move |(x, y)| Circle::new((x + 9, y), 2, faint.filled()));
        let smooth = ema(&train.iter().map(|p| p.1).collect::<Vec<_>>(), EMA_WEIGHT);
        chart
            .draw_series(LineSeries::new(train.iter().zip(smooth).map(|(&(s, _), l)| (s, l)), blue.stroke_width(2)))
            .map_err(|e| anyhow!("{e}"))?
            .label(format!("training (EMA {EMA_WEIGHT})"))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], blue.stroke_width(2)));
        if !val.is_empty() {
            chart
                .draw_series(LineSeries::new(val.iter().copied(), orange.stroke_width(2)))
                .map_err(|e| anyhow!("{e}"))?
                .label("validation")
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], orange.stroke_width(2)));
            chart
                .draw_series(val.iter().map(|&p| Circle::new(p, 3, orange.filled())))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ema_is_debiased_tensorboard_smoothing() {
        assert!(ema(&[3.0; 5], 0.8).iter().all(|m| (m - 3.0).abs() < 1e-12));
        // By hand, w = 0.5: m = 1, 2.5, 2.25 over 1 - 0.5^t = 0.5, 0.75, 0.875.
        let got = ema(&[2.0, 4.0, 2.0], 0.5);
        for (g, w) in got.iter().zip([2.0, 2.5 / 0.75, 2.25 / 0.875]) {
            assert!((g - w).abs() < 1e-12, "{got:?}");
        }
    }

    #[test]
    fn plot_has_integer_step_ticks_and_the_smoothed_curve() {
        let path = std::env::temp_dir().join(format!("qlora-plot-{}.svg", std::process::id()));
        let train: Vec<(u64, f64)> = (1..=3).map(|s| (s, 10.0 + 0.1 * (s % 2) as f64)).collect();
        loss_svg(&path, &train, &[(0, 10.3), (3, 10.05)], "run").unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_file(&path).ok();
        for t in ["0", "1", "2", "3"] {
            assert!(svg.contains(&format!(">\n{t}\n</text>")), "tick {t}:\n{svg}");
        }
        for t in ["0.5", "1.5", "2.5"] {
            assert!(!svg.contains(&format!(">\n{t}\n</text>")), "a fractional step tick {t}");
        }
        assert!(svg.contains("training (EMA 0.8)") && svg.contains("training (raw)") && svg.contains("validation"));
    }
}
