//! The plot of the publish section (`--plot`).

use std::path::Path;

use anyhow::Context;

use super::measure::Stat;

pub(crate) fn plot(
    path: &Path,
    font: &Path,
    levels: &[usize],
    series: &[(&str, Vec<Stat>)],
) -> anyhow::Result<()> {
    use plotters::prelude::*;
    let bytes: &'static [u8] = Box::leak(
        std::fs::read(font)
            .with_context(|| format!("reading font {}", font.display()))?
            .into_boxed_slice(),
    );
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| anyhow::anyhow!("{} is not a usable font", font.display()))?;
    let root = BitMapBackend::new(path, (1400, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(700);
    let xmax = *levels.iter().max().unwrap_or(&64) as f64;
    let colors = [RED, BLUE, GREEN, MAGENTA];
    for (area, title, is_rate) in [
        (&left, "throughput (msg/s)", true),
        (&right, "p99 latency (ms)", false),
    ] {
        let value = |s: &Stat| if is_rate { s.rate } else { s.p99 };
        let all: Vec<f64> = series
            .iter()
            .flat_map(|(_, v)| v.iter().map(value))
            .filter(|v| v.is_finite() && *v > 0.0)
            .collect();
        let lo = all.iter().cloned().fold(f64::MAX, f64::min) / 1.5;
        let hi = all.iter().cloned().fold(0.0, f64::max) * 1.5;
        let mut chart = ChartBuilder::on(area)
            .caption(
                format!("{title} vs concurrency"),
                ("sans-serif", 22).into_font(),
            )
            .margin(15)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d((0.8..xmax * 1.25).log_scale(), (lo..hi).log_scale())?;
        chart
            .configure_mesh()
            .light_line_style(WHITE)
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_label_formatter(&|y| {
                if *y >= 10.0 {
                    format!("{y:.0}")
                } else {
                    format!("{y:.1}")
                }
            })
            .x_desc("concurrent publishers")
            .y_desc(title)
            .label_style(("sans-serif", 14))
            .draw()?;
        for (i, (name, stats)) in series.iter().enumerate() {
            let color = colors[i % colors.len()];
            let points: Vec<(f64, f64)> = levels
                .iter()
                .zip(stats)
                .map(|(l, s)| (*l as f64, value(s)))
                .filter(|(_, v)| v.is_finite() && *v > 0.0)
                .collect();
            chart
                .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))?
                .label(*name)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
            chart.draw_series(points.iter().map(|p| Circle::new(*p, 4, color.filled())))?;
        }
        chart
            .configure_series_labels()
            .position(if is_rate {
                SeriesLabelPosition::LowerRight
            } else {
                SeriesLabelPosition::UpperLeft
            })
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font(("sans-serif", 14))
            .draw()?;
    }
    root.present()?;
    Ok(())
}
