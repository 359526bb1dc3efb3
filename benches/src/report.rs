//! The `mesh` profile's outputs: `results.json`, `results.md` (also printed)
//! and PNG plots drawn with plotters' bitmap backend: one latency-by-
//! percentile plot per phase (`latency-<slug>.png`), and added-latency bars
//! per workload (see [`added_plot_file`]).

use std::path::Path;

use hdrhistogram::Histogram;
use plotters::coord::ranged1d::SegmentValue;
use plotters::prelude::*;
use serde_json::{Value, json};

use crate::mesh::{Phase, Results, Series, Workload};

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
        "rampart-opaque" => {
            "the same SPIFFE checks as rampart during the handshake; the server side authorizes each connection (allowed_peers), not each request: the L4 reference"
        }
        "haproxy" => {
            "chain against the bundle (verify required); verifyhost would match DNS SAN / CN, never a SPIFFE URI, so any SVID from the bundle passes; the server side (verify required) checks the chain only"
        }
        _ => "",
    }
}

/// What each topology does between the proxies, per workload: what the
/// comparison is fair about and what it is not.
const HOP_NOTES: &str = "\
- **http1, concurrency**: Rampart carries each client connection's requests as they are, \
HTTP/1.1, on a pooled mTLS connection that the client connection holds until it closes \
(then it goes back to the pool for the next one); the server sidecar parses and \
authorizes every request. nginx (upstream `keepalive 32`) and HAProxy (`http-reuse \
always`) reuse idle HTTP/1.1 mTLS connections, one request at a time each. \
`rampart-opaque` is the same pair with the port declared opaque on both sides (L4: one \
mTLS connection per client connection, authorized once), the reference the HTTP-aware \
pair is measured against.
- **newconn**: the client opens a TCP connection per request and closes it after the \
response. `rampart`, `nginx` and `haproxy` keep reusing their hop connections, so the \
cost is the client-side accept plus the proxies' per-connection work, and no mTLS \
handshake. The `-nopool` variants make one mTLS connection on the hop per client \
connection: Rampart with the port in `outbound.opaque_ports` (tunneled, the server \
sidecar detects HTTP/1.1 and still authorizes each request), nginx without upstream \
keep-alive, HAProxy with `http-reuse never`. All three resume TLS sessions by default \
(rustls's in-memory session cache, nginx's `proxy_ssl_session_reuse on`, HAProxy's \
server-side session reuse), so these are mostly resumed TLS 1.3 handshakes; \
`cargo bench -p rampart-bench --bench handshake` has full versus resumed in memory.
- **h2, grpc**: the client speaks h2c with prior knowledge to the client side. Rampart \
tunnels HTTP/2 from an app over an mTLS connection of its own per client connection \
(only HTTP/1.1 rides the pooled connection), and the server sidecar serves it as HTTP/2 \
and authorizes every request and call. HAProxy speaks h2 on the hop (ALPN) and h2c to the \
app. nginx's `proxy_pass` speaks only HTTP/1.1 upstream, so its `h2` hop is HTTP/1.1 \
keep-alive; gRPC goes through `grpc_pass grpcs://` (h2 on the hop, kept alive).
- **transparent**: the client pod's connection to the server pod's address is redirected \
by `rampart init`'s iptables rules to the outbound sidecar, and the server pod's to the \
inbound sidecar (sidecars as UID 2102); `direct-netns` is the same app on a port both \
pods exclude from capture, over the same switch.";

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
    for p in &r.phases {
        let path = out.join(format!("latency-{}.png", p.slug));
        latency_plot(&path, p).expect("draw latency plot");
    }
    for w in Workload::ALL {
        let phases: Vec<&Phase> = r.phases.iter().filter(|p| p.workload == w).collect();
        if phases.is_empty() {
            continue;
        }
        added_plot(&out.join(added_plot_file(w)), w.name(), &phases)
            .expect("draw added-latency plot");
    }
    eprintln!("wrote {}", out.display());
}

/// `added-latency.png` for keep-alive HTTP/1.1 (the main comparison),
/// `added-latency-<workload>.png` for the others.
pub fn added_plot_file(w: Workload) -> String {
    match w {
        Workload::Http1 => "added-latency.png".into(),
        _ => format!("added-latency-{}.png", w.name()),
    }
}

/// Every topology name, in order of first appearance.
fn all_topologies(r: &Results) -> Vec<&str> {
    let mut names: Vec<&str> = Vec::new();
    for (n, _) in r.phases.iter().flat_map(|p| &p.series) {
        if !names.contains(&n.as_str()) {
            names.push(n);
        }
    }
    names
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

fn mib(kib: u64) -> f64 {
    round(kib as f64 / 1024.0, 1)
}

/// Per side, the highest RSS over the repetitions.
fn rss_by_side(s: &Series) -> Vec<u64> {
    let sides = s.rss_kib_by_side.first().map_or(0, Vec::len);
    (0..sides)
        .map(|i| s.rss_kib_by_side.iter().map(|r| r[i]).max().unwrap_or(0))
        .collect()
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
    o.insert("failures".into(), json!(s.errors));
    o.insert("max_rss_kib_by_side".into(), json!(rss_by_side(s)));
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
    let o = &r.opts;
    json!({
        "profile": "mesh",
        "date": cmd_line("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"]),
        "command": std::env::args().collect::<Vec<_>>().join(" "),
        "machine": machine(),
        "versions": {
            "nginx": r.kinds.contains(&"nginx").then(|| cmd_line("nginx", &["-v"])),
            "haproxy": r.kinds.contains(&"haproxy").then(|| cmd_line("haproxy", &["-v"])),
        },
        "options": {
            "workloads": o.only.iter().map(|w| w.name()).collect::<Vec<_>>(),
            "rates_rps": o.rates,
            "connections": o.conns,
            "h2_rates_rps": o.h2_rates,
            "h2_connections": o.h2_conns,
            "newconn_rate_rps": o.newconn_rate,
            "many_connections": o.many_conns,
            "many_rate_rps": o.many_rate,
            "duration_s": o.duration.as_secs_f64(),
            "reps": o.reps,
        },
        "method": "fixed rates are open loop, latency from each request's intended send time; saturation is closed loop; repetitions interleaved, medians over repetitions; added = topology minus the phase's first (baseline) topology in the same run; CPU is all processes of both sides of a pair; RSS per side (client side first)",
        "topologies": all_topologies(r),
        "skipped": r.skipped.iter().map(|(t, why)| json!({"topology": t, "reason": why})).collect::<Vec<_>>(),
        "phases": r.phases.iter().map(|p| json!({
            "name": p.name,
            "slug": p.slug,
            "workload": p.workload.name(),
            "fixed_rate": p.fixed_rate,
            "results": p.series.iter().map(|(t, s)| series_json(t, s, &p.series[0].1)).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "memory": r.memory.iter().map(|(t, m)| json!({
            "topology": t,
            "idle_rss_kib": m.idle_rss_kib.iter().sum::<u64>(),
            "peak_rss_kib": m.peak_rss_kib.iter().sum::<u64>(),
            "idle_rss_kib_by_side": m.idle_rss_kib,
            "peak_rss_kib_by_side": m.peak_rss_kib,
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

/// `a / b`, or a dash when `b` is not positive (a noise-made negative
/// "added" value has no meaningful ratio).
fn ratio(a: f64, b: f64) -> String {
    if a > 0.0 && b > 0.0 {
        format!("{:.2}", a / b)
    } else {
        "-".into()
    }
}

/// Rampart against nginx and HAProxy in each phase where they all ran.
fn summary(j: &Value) -> String {
    let mut md = String::from(
        "### Summary (ratios are rampart / other; lower is better except throughput)\n\n| phase | metric | rampart | rampart-opaque | nginx | haproxy | rampart / rampart-opaque | rampart / nginx | rampart / haproxy |\n|---|---|---|---|---|---|---|---|---|\n",
    );
    for phase in j["phases"].as_array().into_iter().flatten() {
        let results = phase["results"].as_array().cloned().unwrap_or_default();
        let get = |t: &str, key: &str| {
            results
                .iter()
                .find(|r| r["topology"] == t)
                .and_then(|r| r[key].as_f64())
        };
        let metrics: &[(&str, &str)] = if phase["fixed_rate"] == true {
            &[
                ("added p50 µs", "added_p50_us"),
                ("added p99 µs", "added_p99_us"),
                ("added p99.9 µs", "added_p999_us"),
                ("CPU s / 10k req", "cpu_s_per_10k_requests"),
            ]
        } else {
            &[
                ("throughput req/s", "throughput_rps"),
                ("added p50 µs", "added_p50_us"),
                ("CPU s / 10k req", "cpu_s_per_10k_requests"),
            ]
        };
        for (label, key) in metrics {
            let Some(r) = get("rampart", key) else {
                continue;
            };
            let (o, n, h) = (
                get("rampart-opaque", key),
                get("nginx", key),
                get("haproxy", key),
            );
            if o.is_none() && n.is_none() && h.is_none() {
                continue;
            }
            let show = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v}"));
            let rat = |v: Option<f64>| v.map_or("-".into(), |v| ratio(r, v));
            md += &format!(
                "| {} | {label} | {r} | {} | {} | {} | {} | {} | {} |\n",
                phase["name"].as_str().unwrap_or(""),
                show(o),
                show(n),
                show(h),
                rat(o),
                rat(n),
                rat(h),
            );
        }
        // Memory per sidecar: the larger side, while the phase ran.
        if phase["workload"] == "concurrency" {
            let side = |t: &str| {
                results.iter().find(|r| r["topology"] == t).and_then(|r| {
                    let sides = r["max_rss_kib_by_side"].as_array()?;
                    sides.iter().filter_map(Value::as_u64).max()
                })
            };
            if let Some(r) = side("rampart") {
                md += &memory_row(
                    phase["name"].as_str().unwrap_or(""),
                    "larger side's RSS MiB",
                    r,
                    [side("rampart-opaque"), side("nginx"), side("haproxy")],
                );
            }
        }
    }
    let idle = |t: &str| {
        j["memory"]
            .as_array()?
            .iter()
            .find(|m| m["topology"] == t)
            .and_then(|m| {
                m["idle_rss_kib_by_side"]
                    .as_array()?
                    .iter()
                    .filter_map(Value::as_u64)
                    .max()
            })
    };
    if let Some(r) = idle("rampart") {
        md += &memory_row(
            "idle, after start",
            "larger side's RSS MiB",
            r,
            [idle("rampart-opaque"), idle("nginx"), idle("haproxy")],
        );
    }
    md
}

/// `others`: rampart-opaque, nginx, haproxy.
fn memory_row(phase: &str, label: &str, r: u64, others: [Option<u64>; 3]) -> String {
    let show = |v: Option<u64>| v.map_or("-".into(), |k| format!("{}", mib(k)));
    let rat = |v: Option<u64>| v.map_or("-".into(), |k| ratio(r as f64, k as f64));
    let [o, n, h] = others;
    format!(
        "| {phase} | {label} | {} | {} | {} | {} | {} | {} | {} |\n",
        mib(r),
        show(o),
        show(n),
        show(h),
        rat(o),
        rat(n),
        rat(h)
    )
}

fn markdown(r: &Results, j: &Value) -> String {
    let mut md = String::new();
    let o = &j["options"];
    md += &format!(
        "Method: {}.\n\n{} s per run, {} interleaved repetitions.\n",
        j["method"].as_str().unwrap_or(""),
        o["duration_s"],
        o["reps"],
    );
    for (t, why) in &r.skipped {
        md += &format!("\nSkipped {t}: {why}.\n");
    }
    md += &format!("\n### What each topology does on the hop\n\n{HOP_NOTES}\n\n");
    md += &summary(j);
    for (phase, p) in j["phases"].as_array().into_iter().flatten().zip(&r.phases) {
        md += &format!(
            "\n### {}\n\n| topology | p50 µs | p90 µs | p99 µs | p99.9 µs | max µs | added p50 µs | added p99 µs | achieved req/s | CPU s / 10k req | failures |\n|---|---|---|---|---|---|---|---|---|---|---|\n",
            p.name
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
                s["failures"]
            );
        }
        if p.workload == Workload::Concurrency {
            md += &format!(
                "\nRSS while the {} connections were open (highest 50 ms sample of any repetition; target: under 40 MiB per sidecar):\n\n| topology | client side MiB | server side MiB |\n|---|---|---|\n",
                r.opts.many_conns
            );
            for (t, s) in p.series.iter().skip(1) {
                let rss = rss_by_side(s);
                md += &format!(
                    "| {t} | {} | {} |\n",
                    rss.first().map_or(0.0, |k| mib(*k)),
                    rss.get(1).map_or(0.0, |k| mib(*k)),
                );
            }
        }
    }
    if !r.memory.is_empty() {
        md += "\n### Memory of the keep-alive HTTP/1.1 pairs, per side (client / server)\n\n| topology | idle RSS MiB | peak RSS MiB (VmHWM after the http1 phases) | idle, both sides | peak, both sides |\n|---|---|---|---|---|\n";
        for (t, m) in &r.memory {
            let pair = |v: &[u64]| {
                v.iter()
                    .map(|k| format!("{}", mib(*k)))
                    .collect::<Vec<_>>()
                    .join(" / ")
            };
            md += &format!(
                "| {t} | {} | {} | {} | {} |\n",
                pair(&m.idle_rss_kib),
                pair(&m.peak_rss_kib),
                mib(m.idle_rss_kib.iter().sum()),
                mib(m.peak_rss_kib.iter().sum()),
            );
        }
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

/// A topology's colour, the same in every plot: one hue per proxy, a
/// lighter or darker one for its variants, black for baselines.
fn color(name: &str) -> RGBColor {
    match name {
        "rampart" => RGBColor(200, 30, 30),
        "rampart-nopool" => RGBColor(240, 130, 20),
        "rampart-opaque" => RGBColor(120, 20, 20),
        "rampart-transparent" => RGBColor(140, 60, 170),
        "nginx" => RGBColor(30, 90, 200),
        "nginx-nopool" => RGBColor(0, 170, 200),
        "haproxy" => RGBColor(30, 150, 60),
        "haproxy-nopool" => RGBColor(150, 190, 40),
        _ => RGBColor(0, 0, 0),
    }
}

type PlotResult = Result<(), Box<dyn std::error::Error>>;

/// Latency by percentile, one line per topology; the percentile axis is
/// log-scaled in 1 / (1 - q), so p90, p99, p99.9 are evenly spaced.
fn latency_plot(path: &Path, phase: &Phase) -> PlotResult {
    let xs: Vec<f64> = (0..=40).map(|k| 10f64.powf(k as f64 / 10.0)).collect();
    let lines: Vec<Vec<(f64, f64)>> = phase
        .series
        .iter()
        .map(|(_, s)| {
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
            format!("Latency by percentile, {}", phase.name),
            ("sans-serif", 20),
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
    for ((name, _), line) in phase.series.iter().zip(lines) {
        let c = color(name);
        chart
            .draw_series(LineSeries::new(line, c.stroke_width(2)))?
            .label(name.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
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

/// Added p50 and p99 over each phase's baseline, one bar per other
/// topology of the phase, grouped by phase and percentile.
fn added_plot(path: &Path, title: &str, phases: &[&Phase]) -> PlotResult {
    // (category label, [(topology, added µs)])
    let mut cats: Vec<(String, Vec<(&str, f64)>)> = Vec::new();
    for p in phases {
        for (label, q) in [("p50", 0.5), ("p99", 0.99)] {
            let d = quantile_us(&p.series[0].1.hists, q);
            let vals = p.series[1..]
                .iter()
                .map(|(n, s)| (n.as_str(), quantile_us(&s.hists, q) - d))
                .collect();
            let prefix = format!("{}-", p.workload.name());
            let short = p.slug.strip_prefix(&prefix).unwrap_or(&p.slug);
            cats.push((format!("{short} {label}"), vals));
        }
    }
    // One segment per bar, plus a gap after each category.
    let mut starts = Vec::new();
    let mut segs = 0i32;
    for (_, vals) in &cats {
        starts.push(segs);
        segs += vals.len() as i32 + 1;
    }
    let segs = segs.max(1);
    let all = cats.iter().flat_map(|c| c.1.iter().map(|v| v.1));
    let ymax = all.clone().fold(1.0, f64::max) * 1.15;
    let ymin = all.fold(0.0, f64::min) * 1.15;
    let width = (60 * segs as u32).clamp(900, 2000);
    let root = BitMapBackend::new(path, (width, 600)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("Added latency over the baseline, {title} (medians of repetitions)"),
            ("sans-serif", 20),
        )
        .margin(15)
        .x_label_area_size(60)
        .y_label_area_size(70)
        .build_cartesian_2d((0..segs).into_segmented(), ymin..ymax)?;
    let labels: Vec<(i32, String)> = cats
        .iter()
        .zip(&starts)
        .map(|((l, vals), s)| (s + vals.len() as i32 / 2, l.clone()))
        .collect();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(segs as usize)
        .x_label_style(("sans-serif", 11))
        .y_desc("added latency (µs)")
        .x_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) | SegmentValue::Exact(i) => labels
                .iter()
                .find(|(at, _)| at == i)
                .map(|(_, l)| l.clone())
                .unwrap_or_default(),
            SegmentValue::Last => String::new(),
        })
        .draw()?;
    let mut legend: Vec<&str> = Vec::new();
    for (name, _) in cats.iter().flat_map(|c| &c.1) {
        if !legend.contains(name) {
            legend.push(name);
        }
    }
    for name in legend {
        let c = color(name);
        let bars: Vec<_> = cats
            .iter()
            .zip(&starts)
            .filter_map(|((_, vals), start)| {
                let k = vals.iter().position(|v| v.0 == name)?;
                let x = start + k as i32;
                Some(Rectangle::new(
                    [
                        (SegmentValue::Exact(x), 0.0),
                        (SegmentValue::Exact(x + 1), vals[k].1),
                    ],
                    c.filled(),
                ))
            })
            .collect();
        chart
            .draw_series(bars)?
            .label(name)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 15, y + 5)], c.filled()));
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
