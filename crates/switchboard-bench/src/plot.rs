//! SVG plots of a `compare` run, drawn with `plotters`.
//!
//! * `latency-<workload>.svg`: latency percentiles (p50 … max, log scale) of
//!   every server for one workload;
//! * `echo-throughput-by-connections.svg` and
//!   `echo-per-cpu-by-connections.svg`: the echo (32 B) sweep over connection
//!   counts, as messages per second and per server CPU-second.

use std::path::{Path, PathBuf};

use anyhow::{Result, anyhow};
use plotters::prelude::*;

use crate::compare::CompareReport;
use crate::stats::Latency;

const PERCENTILES: [&str; 6] = ["p50", "p75", "p90", "p99", "p99.9", "max"];

fn color_of(server: &str) -> RGBColor {
    match server {
        "switchboard" => RGBColor(214, 39, 40),
        "ref-fastwebsockets" => RGBColor(31, 119, 180),
        "ref-tungstenite" => RGBColor(44, 160, 44),
        "node-ws" => RGBColor(148, 103, 189),
        "ref-uwebsockets" => RGBColor(255, 127, 14),
        _ => RGBColor(127, 127, 127),
    }
}

fn points(l: &Latency) -> [f64; 6] {
    [l.p50_us, l.p75_us, l.p90_us, l.p99_us, l.p999_us, l.max_us]
}

fn servers_of(report: &CompareReport) -> Vec<String> {
    let mut v: Vec<String> = Vec::new();
    for m in &report.measurements {
        if !v.contains(&m.server) {
            v.push(m.server.clone());
        }
    }
    v
}

/// Draws every plot into `dir`; returns the files written.
pub(crate) fn write_all(
    report: &CompareReport,
    sweep: &[(usize, String)],
    no_latency_plot: &[String],
    dir: &Path,
) -> Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    let mut workloads: Vec<&str> = Vec::new();
    for m in &report.measurements {
        if !workloads.contains(&m.workload.as_str())
            && !no_latency_plot.contains(&m.workload)
            && m.latency.as_ref().is_some_and(|l| l.count > 0)
        {
            workloads.push(&m.workload);
        }
    }
    for w in workloads {
        let series: Vec<(String, [f64; 6])> = report
            .measurements
            .iter()
            .filter(|m| m.workload == w)
            .filter_map(|m| {
                m.latency
                    .as_ref()
                    .filter(|l| l.count > 0)
                    .map(|l| (m.server.clone(), points(l)))
            })
            .collect();
        let path = dir.join(format!("latency-{w}.svg"));
        latency_plot(&path, w, &series)?;
        written.push(path);
    }

    if sweep.len() >= 2 {
        let servers = servers_of(report);
        let mut rate_series = Vec::new();
        let mut cpu_series = Vec::new();
        for s in &servers {
            let mut rates = Vec::new();
            let mut per_cpu = Vec::new();
            for (c, key) in sweep {
                if let Some(m) = report
                    .measurements
                    .iter()
                    .find(|m| &m.server == s && &m.workload == key && m.ok)
                {
                    if let Some(r) = m.rate {
                        rates.push((*c as f64, r));
                    }
                    if let Some(r) = m.per_server_cpu_sec {
                        per_cpu.push((*c as f64, r));
                    }
                }
            }
            if !rates.is_empty() {
                rate_series.push((s.clone(), rates));
            }
            if !per_cpu.is_empty() {
                cpu_series.push((s.clone(), per_cpu));
            }
        }
        if !rate_series.is_empty() {
            let path = dir.join("echo-throughput-by-connections.svg");
            sweep_plot(
                &path,
                "echo 32 B: messages per second",
                "messages/s",
                &rate_series,
            )?;
            written.push(path);
        }
        if !cpu_series.is_empty() {
            let path = dir.join("echo-per-cpu-by-connections.svg");
            sweep_plot(
                &path,
                "echo 32 B: messages per server CPU-second",
                "messages per server CPU-s",
                &cpu_series,
            )?;
            written.push(path);
        }
    }
    Ok(written)
}

fn latency_plot(path: &Path, workload: &str, series: &[(String, [f64; 6])]) -> Result<()> {
    let max = series
        .iter()
        .flat_map(|(_, p)| p.iter().copied())
        .fold(1.0f64, f64::max);
    let min = series
        .iter()
        .flat_map(|(_, p)| p.iter().copied())
        .filter(|&v| v > 0.0)
        .fold(f64::MAX, f64::min)
        .min(max);
    let root = SVGBackend::new(path, (820, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("{workload}: latency percentiles"),
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(80)
        .build_cartesian_2d(
            -0.2f64..5.2f64,
            ((min * 0.8).max(0.5)..max * 4.0).log_scale(),
        )
        .map_err(|e| anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .x_labels(6)
        .x_label_formatter(&|x| {
            let i = x.round();
            if (x - i).abs() < 0.01 && (0.0..=5.0).contains(&i) {
                PERCENTILES[i as usize].to_string()
            } else {
                String::new()
            }
        })
        .y_desc("latency (µs, log scale)")
        .y_label_formatter(&|y| format!("{y:.0}"))
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    for (server, pts) in series {
        let color = color_of(server);
        let data: Vec<(f64, f64)> = pts
            .iter()
            .enumerate()
            .map(|(i, v)| (i as f64, v.max(min * 0.8)))
            .collect();
        chart
            .draw_series(LineSeries::new(data.clone(), color.stroke_width(2)))
            .map_err(|e| anyhow!("{e}"))?
            .label(server.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart
            .draw_series(data.into_iter().map(|p| Circle::new(p, 3, color.filled())))
            .map_err(|e| anyhow!("{e}"))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    root.present().map_err(|e| anyhow!("{e}"))?;
    Ok(())
}

fn sweep_plot(
    path: &Path,
    title: &str,
    y_desc: &str,
    series: &[(String, Vec<(f64, f64)>)],
) -> Result<()> {
    let max_x = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|(x, _)| *x))
        .fold(1.0f64, f64::max);
    let max_y = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|(_, y)| *y))
        .fold(1.0f64, f64::max);
    let root = SVGBackend::new(path, (820, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(90)
        .build_cartesian_2d((0.8f64..max_x * 1.25).log_scale(), 0f64..max_y * 1.45)
        .map_err(|e| anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .x_desc("connections (log scale)")
        .y_desc(y_desc)
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{:.0}k", y / 1000.0))
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    for (server, pts) in series {
        let color = color_of(server);
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
            .map_err(|e| anyhow!("{e}"))?
            .label(server.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart
            .draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled())))
            .map_err(|e| anyhow!("{e}"))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    root.present().map_err(|e| anyhow!("{e}"))?;
    Ok(())
}
