//! The `mesh` profile's outputs: `results.json`, `results.md` (also printed)
//! and PNG plots drawn with plotters' bitmap backend.

use std::path::Path;

use hdrhistogram::Histogram;
use plotters::coord::ranged1d::SegmentValue;
use plotters::prelude::*;
use serde_json::{Value, json};

use crate::mesh::{Results, Series};

/// Percentiles in the tables, as (label, quantile).
const PERCENTILES: [(&str, f64); 5] = [
    ("p50", 0.5),
    ("p90", 0.9),
    ("p99", 0.99),
    ("p99.9", 0.999),
    ("max", 1.0),
];

/// The font file the plots' text is drawn with (Debian's fonts-dejavu-core).
const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

/// What each proxy can and cannot check about the server's identity.
fn checks(topology: &str) -> &'static str {
    match topology {
        "rampart" => {
            "chain against the bundle, and the server's SPIFFE ID (URI SAN) against server_identities; the server side checks the client's SPIFFE ID per request (ALLOW policy)"
        }
        "nginx" => {
            "chain against the bundle, and proxy_ssl_name against the DNS SAN / CN only: nginx cannot match a URI SAN, so any SVID from the bundle carrying that DNS name passes; the server side (ssl_verify_client on) checks the chain only"
        }
        "haproxy" => {
            "chain against the bundle (verify required); verifyhost would match DNS SAN / CN, never a SPIFFE URI, so any SVID from the bundle passes; the server side (verify required) checks the chain only"
        }
        _ => "",
    }
}

/// Writes every output into `r.opts.out` and prints the Markdown.
pub fn write(r: &Results) {
    let out = &r.opts.out;
    std::fs::create_dir_all(out).expect("create the output directory");
    let json = to_json(r);
    std::fs::write(
        out.join("results.json"),
        serde_json::to_string_pretty(&json).expect("a json! value serializes"),
    )
    .expect("write results.json");
    let md = markdown(r, &json);
    std::fs::write(out.join("results.md"), &md).expect("write results.md");
    println!("{md}");
    let font: &'static [u8] = match std::fs::read(FONT) {
        Ok(bytes) => Box::leak(bytes.into_boxed_slice()),
        Err(e) => {
            eprintln!("{FONT}: {e}: no plots (benches/setup.sh installs fonts-dejavu-core)");
            std::process::exit(1);
        }
    };
    if plotters::style::register_font("sans-serif", FontStyle::Normal, font).is_err() {
        eprintln!("{FONT}: not a usable font: no plots");
        std::process::exit(1);
    }
    for (i, (phase, series)) in r.phases.iter().enumerate() {
        let path = out.join(format!("latency-{}.png", phase_slug(phase, i)));
        latency_plot(&path, phase, &r.topologies, series).expect("draw latency plot");
    }
    added_plot(&out.join("added-latency.png"), r).expect("draw added-latency plot");
    eprintln!("wrote {}", out.display());
}

fn phase_slug(phase: &str, i: usize) -> String {
    match phase.split_once(' ') {
        Some((rate, "rps")) => format!("{rate}rps"),
        _ if phase.starts_with("saturation") => "saturation".into(),
        _ => format!("phase{i}"),
    }
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Median over repetitions of a quantile, in microseconds.
fn quantile_us(hists: &[Histogram<u64>], q: f64) -> f64 {
    let v: Vec<f64> = hists
        .iter()
        .map(|h| if q >= 1.0 { h.max() } else { h.value_at_quantile(q) } as f64 / 1000.0)
        .collect();
    median(&v)
}

fn round(x: f64, digits: i32) -> f64 {
    let m = 10f64.powi(digits);
    (x * m).round() / m
}

fn series_json(name: &str, s: &Series, direct: &Series) -> Value {
    let mut o = serde_json::Map::new();
    o.insert("topology".into(), json!(name));
    for (label, q) in PERCENTILES {
        let key = label.replace('.', "");
        let v = quantile_us(&s.hists, q);
        o.insert(format!("{key}_us"), json!(round(v, 1)));
        o.insert(
            format!("added_{key}_us"),
            json!(round(v - quantile_us(&direct.hists, q), 1)),
        );
    }
    o.insert(
        "throughput_rps".into(),
        json!(round(median(&s.throughput), 0)),
    );
    o.insert(
        "cpu_s_per_10k_requests".into(),
        json!(round(median(&s.cpu_per_10k), 3)),
    );
    o.insert("failed_connections".into(), json!(s.errors));
    o.insert(
        "reps".into(),
        json!(
            s.hists
                .iter()
                .zip(&s.throughput)
                .zip(&s.cpu_per_10k)
                .map(|((h, t), c)| json!({
                    "p50_us": round(h.value_at_quantile(0.5) as f64 / 1000.0, 1),
                    "p99_us": round(h.value_at_quantile(0.99) as f64 / 1000.0, 1),
                    "max_us": round(h.max() as f64 / 1000.0, 1),
                    "requests": h.len(),
                    "throughput_rps": round(*t, 0),
                    "cpu_s_per_10k_requests": round(*c, 3),
                }))
                .collect::<Vec<_>>()
        ),
    );
    Value::Object(o)
}

fn cmd_line(cmd: &str, args: &[&str]) -> String {
    std::process::Command::new(cmd)
        .args(args)
        .output()
        .map(|o| {
            let text = if o.stdout.is_empty() {
                o.stderr
            } else {
                o.stdout
            };
            String::from_utf8_lossy(&text)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_string()
        })
        .unwrap_or_default()
}

fn machine() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")?
                .split_once(':')
                .map(|x| x.1.trim().to_string())
        })
        .unwrap_or_default();
    let mem = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    json!({
        "cpu": cpu,
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "memory": mem.lines().next().unwrap_or("").trim_start_matches("MemTotal:").trim(),
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
    })
}

fn to_json(r: &Results) -> Value {
    let direct = &r.phases;
    json!({
        "profile": "mesh",
        "date": cmd_line("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"]),
        "command": std::env::args().collect::<Vec<_>>().join(" "),
        "machine": machine(),
        "versions": {
            "nginx": r.topologies.contains(&"nginx").then(|| cmd_line("nginx", &["-v"])),
            "haproxy": r.topologies.contains(&"haproxy").then(|| cmd_line("haproxy", &["-v"])),
        },
        "options": {
            "rates_rps": r.opts.rates,
            "connections": r.opts.conns,
            "duration_s": r.opts.duration.as_secs_f64(),
            "reps": r.opts.reps,
        },
        "method": "HTTP/1.1 GET /bench (2-byte response) over keep-alive connections; fixed rates are open loop, latency from each request's intended send time; saturation is closed loop; repetitions interleaved, medians over repetitions; added = topology minus direct in the same run; CPU and RSS are both sides of a pair summed",
        "topologies": r.topologies,
        "skipped": r.skipped.iter().map(|(t, why)| json!({"topology": t, "reason": why})).collect::<Vec<_>>(),
        "phases": direct.iter().map(|(name, series)| json!({
            "name": name,
            "results": r.topologies.iter().zip(series).map(|(t, s)| series_json(t, s, &series[0])).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "memory": r.memory.iter().map(|(t, m)| json!({
            "topology": t, "idle_rss_kib": m.idle_rss_kib, "peak_rss_kib": m.peak_rss_kib,
        })).collect::<Vec<_>>(),
        "verification": r.verification.iter().map(|v| json!({
            "topology": v.topology,
            "server_presented": crate::topology::IMPOSTER_ID,
            "client_expected": crate::topology::SERVER_ID,
            "refused_before_request": v.refused,
            "client_saw": v.client_saw,
            "what_it_checks": checks(v.topology),
        })).collect::<Vec<_>>(),
    })
}

fn markdown(r: &Results, j: &Value) -> String {
    let mut md = String::new();
    let o = &j["options"];
    md += &format!(
        "Method: {}.\n\n{} s per run, {} interleaved repetitions, {} connections.\n",
        j["method"].as_str().unwrap_or(""),
        o["duration_s"],
        o["reps"],
        o["connections"]
    );
    for (t, why) in &r.skipped {
        md += &format!("\nSkipped {t}: {why}.\n");
    }
    for phase in j["phases"].as_array().into_iter().flatten() {
        md += &format!(
            "\n### {}\n\n| topology | p50 µs | p90 µs | p99 µs | p99.9 µs | max µs | added p50 µs | added p99 µs | achieved req/s | CPU s / 10k req | failed conns |\n|---|---|---|---|---|---|---|---|---|---|---|\n",
            phase["name"].as_str().unwrap_or("")
        );
        for s in phase["results"].as_array().into_iter().flatten() {
            md += &format!(
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
                s["topology"].as_str().unwrap_or(""),
                s["p50_us"],
                s["p90_us"],
                s["p99_us"],
                s["p999_us"],
                s["max_us"],
                s["added_p50_us"],
                s["added_p99_us"],
                s["throughput_rps"],
                s["cpu_s_per_10k_requests"],
                s["failed_connections"]
            );
        }
    }
    md += "\n### Memory (both sides of the pair)\n\n| topology | idle RSS MiB | peak RSS MiB |\n|---|---|---|\n";
    for (t, m) in &r.memory {
        md += &format!(
            "| {t} | {:.1} | {:.1} |\n",
            m.idle_rss_kib as f64 / 1024.0,
            m.peak_rss_kib as f64 / 1024.0
        );
    }
    md += &format!(
        "\n### Verification: server presents a valid SVID for `{}`, client expects `{}`\n\n| topology | refused before the request reached the app | client saw | what it checks |\n|---|---|---|---|\n",
        crate::topology::IMPOSTER_ID,
        crate::topology::SERVER_ID
    );
    for v in &r.verification {
        md += &format!(
            "| {} | {} | {} | {} |\n",
            v.topology,
            if v.refused { "yes" } else { "**no**" },
            v.client_saw,
            checks(v.topology)
        );
    }
    md
}

const COLORS: [RGBColor; 4] = [
    RGBColor(0, 0, 0),
    RGBColor(200, 30, 30),
    RGBColor(30, 90, 200),
    RGBColor(30, 150, 60),
];

type PlotResult = Result<(), Box<dyn std::error::Error>>;

/// Latency by percentile, one line per topology; the percentile axis is
/// log-scaled in 1 / (1 - q), so p90, p99, p99.9 are evenly spaced.
fn latency_plot(path: &Path, phase: &str, names: &[&str], series: &[Series]) -> PlotResult {
    let xs: Vec<f64> = (0..=40).map(|k| 10f64.powf(k as f64 / 10.0)).collect();
    let lines: Vec<Vec<(f64, f64)>> = series
        .iter()
        .map(|s| {
            xs.iter()
                .map(|x| (*x, quantile_us(&s.hists, 1.0 - 1.0 / x).max(1.0)))
                .collect()
        })
        .collect();
    let ymax = lines.iter().flatten().map(|p| p.1).fold(1.0, f64::max) * 1.5;
    let ymin = lines.iter().flatten().map(|p| p.1).fold(f64::MAX, f64::min) / 1.5;
    let root = BitMapBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("Latency by percentile, {phase}"),
            ("sans-serif", 22),
        )
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d((1f64..1e4f64).log_scale(), (ymin..ymax).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("latency (µs)")
        .x_label_formatter(&|x| {
            let p = 100.0 * (1.0 - 1.0 / x);
            format!("p{}", round(p, 3))
        })
        .draw()?;
    for (i, (name, line)) in names.iter().zip(lines).enumerate() {
        let color = COLORS[i % COLORS.len()];
        chart
            .draw_series(LineSeries::new(line, color.stroke_width(2)))?
            .label(*name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

/// Added p50 and p99 over `direct` per phase, one bar per proxy topology.
fn added_plot(path: &Path, r: &Results) -> PlotResult {
    let proxies = r.topologies.len() - 1;
    let mut cats = Vec::new();
    for (phase, series) in &r.phases {
        for (label, q) in [("p50", 0.5), ("p99", 0.99)] {
            let d = quantile_us(&series[0].hists, q);
            let vals: Vec<f64> = series[1..]
                .iter()
                .map(|s| quantile_us(&s.hists, q) - d)
                .collect();
            cats.push((
                format!("{} {label}", phase.split(" (").next().unwrap_or(phase)),
                vals,
            ));
        }
    }
    // One segment per bar, plus a gap after each category.
    let width = proxies + 1;
    let segs = (cats.len() * width).max(1) as i32;
    let all = cats.iter().flat_map(|c| c.1.iter().copied());
    let ymax = all.clone().fold(1.0, f64::max) * 1.15;
    let ymin = all.fold(0.0, f64::min) * 1.15;
    let root = BitMapBackend::new(path, (1000, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Added latency over direct (medians of repetitions)",
            ("sans-serif", 22),
        )
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d((0..segs).into_segmented(), ymin..ymax)?;
    let labels: Vec<String> = cats.iter().map(|c| c.0.clone()).collect();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(segs as usize)
        .y_desc("added latency (µs)")
        .x_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) | SegmentValue::Exact(i)
                if (*i as usize) % width == proxies / 2 =>
            {
                labels.get(*i as usize / width).cloned().unwrap_or_default()
            }
            _ => String::new(),
        })
        .draw()?;
    for p in 0..proxies {
        let color = COLORS[(p + 1) % COLORS.len()];
        chart
            .draw_series(cats.iter().enumerate().map(|(c, (_, vals))| {
                let x = (c * width + p) as i32;
                Rectangle::new(
                    [
                        (SegmentValue::Exact(x), 0.0),
                        (SegmentValue::Exact(x + 1), vals[p]),
                    ],
                    color.filled(),
                )
            }))?
            .label(r.topologies[p + 1])
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 15, y + 5)], color.filled()));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}
