//! `rampart demo` end to end: the real binary runs scenario 1 and must say
//! so (exit 0), must catch a wrong policy (exit non-zero, a row marked
//! `NOT AS EXPECTED`), and must leave nothing behind when stopped.

use crate::support;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use support::{TempDir, rampart_bin};

/// Generous: the demo waits for one SVID rotation (a few seconds) first.
const DEMO_LIMIT: Duration = Duration::from_secs(120);

/// Runs `rampart demo ARGS` to completion.
fn demo(args: &[&str]) -> Output {
    let child = Command::new(rampart_bin())
        .arg("demo")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn rampart demo");
    let pid = child.id();
    // A watchdog: a hung demo fails the test instead of hanging it.
    let watchdog = std::thread::spawn(move || {
        let deadline = Instant::now() + DEMO_LIMIT;
        while Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(200));
            if !Path::new(&format!("/proc/{pid}")).exists() {
                return;
            }
        }
        // Our own child's pid; gone already is fine.
        kill(pid, rustix::process::Signal::KILL);
    });
    let out = child.wait_with_output().expect("wait for rampart demo");
    let _ = watchdog.join();
    out
}

fn describe(out: &Output) -> String {
    format!(
        "status {}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn assert_all_as_expected(out: &Output, policies: &str) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", describe(out));
    assert!(
        stdout.contains(&format!(
            "verdict: all 10 rows as expected ({policies} policies)"
        )),
        "{}",
        describe(out)
    );
    assert!(!stdout.contains("NOT AS EXPECTED"), "{}", describe(out));
}

#[test]
fn demo_native_policies_are_as_expected() {
    assert_all_as_expected(&demo(&[]), "native");
}

#[test]
fn demo_rego_policies_are_as_expected() {
    assert_all_as_expected(&demo(&["--rego"]), "Rego");
}

/// A policy that lets news-web call ec-backend: the demo must notice.
const TOO_OPEN_EC_BACKEND: &str = "\
policies:
  - name: ec-backend-too-open
    action: ALLOW
    rules:
      - name: any-web-reads-data
        from:
          principals: [\"spiffe://example.org/ec-web\", \"spiffe://example.org/news-web\"]
        to:
          methods: [GET]
          paths: [/data]
";

#[test]
fn demo_reports_a_wrong_policy_and_fails() {
    let dir = TempDir::new();
    let policy = dir.write("ec-backend.yaml", TOO_OPEN_EC_BACKEND);
    let arg = format!("ec-backend={}", policy.display());
    let out = demo(&["--policy", &arg]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{}", describe(&out));
    let wrong: Vec<&str> = stdout
        .lines()
        .filter(|l| l.contains("NOT AS EXPECTED"))
        .collect();
    assert_eq!(wrong.len(), 1, "{}", describe(&out));
    assert!(
        wrong[0].starts_with("GET ec-backend /data") && wrong[0].contains("news-web"),
        "{}",
        describe(&out)
    );
    assert!(
        stdout.contains("verdict: 1 of 10 rows NOT as expected"),
        "{}",
        describe(&out)
    );
}

/// Children of `pid`, from /proc.
fn children(pid: u32) -> Vec<u32> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return found;
    };
    for e in entries.flatten() {
        let Some(child) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else {
            continue;
        };
        // pid (comm) state ppid ...: comm may hold spaces, so split after ')'.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(pid) {
            found.push(child);
        }
    }
    found
}

#[test]
fn demo_keep_running_prints_curl_commands_and_stops_cleanly_on_sigint() {
    let mut child = Command::new(rampart_bin())
        .args(["demo", "--keep-running"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn rampart demo --keep-running");
    let pid = child.id();
    let stdout = child.stdout.take().expect("piped stdout");
    // Read lines on a thread, so that the deadline below holds.
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut seen = Vec::new();
    let mut socket: Option<PathBuf> = None;
    let deadline = Instant::now() + DEMO_LIMIT;
    let mut curls = 0;
    while curls < 6 {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(line) = rx.recv_timeout(left) else {
            let _ = child.kill();
            panic!(
                "no curl commands within {DEMO_LIMIT:?}:\n{}",
                seen.join("\n")
            );
        };
        if let Some(rest) = line.split("Workload API on ").nth(1) {
            socket = rest
                .split_whitespace()
                .next()
                .map(|s| PathBuf::from(s.trim_end_matches(';')));
        }
        if line.trim_start().starts_with("curl ") {
            curls += 1;
        }
        seen.push(line);
    }
    let socket = socket.unwrap_or_else(|| panic!("no socket path in:\n{}", seen.join("\n")));
    let dir = socket
        .parent()
        .expect("the socket lives in the temp dir")
        .to_owned();
    assert!(socket.exists() && dir.is_dir(), "{}", seen.join("\n"));
    let sidecars = children(pid);
    assert_eq!(sidecars.len(), 4, "four sidecar children: {sidecars:?}");

    kill(pid, rustix::process::Signal::INT);
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the demo did not stop within 20s of SIGINT");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let _ = reader.join();
    assert!(status.success(), "exit status after SIGINT: {status}");
    for s in &sidecars {
        assert!(
            !Path::new(&format!("/proc/{s}")).exists(),
            "sidecar {s} still running after the demo stopped"
        );
    }
    assert!(!socket.exists(), "{} left behind", socket.display());
    assert!(!dir.exists(), "{} left behind", dir.display());
}

#[test]
#[ignore = "needs root, network namespaces and iptables (as root: cargo test -- --include-ignored)"]
fn demo_transparent_runs_in_namespaces_and_cleans_up() {
    support::require_root();
    let out = demo(&["--transparent"]);
    assert_all_as_expected(&out, "native");
    let prefix = format!("rampart-demo-{}-", pid_of_last_demo(&out));
    let list = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let list = String::from_utf8_lossy(&list.stdout);
    assert!(!list.contains(&prefix), "namespaces left behind:\n{list}");
}

/// The demo's pid, from the namespace names it prints in transparent mode.
fn pid_of_last_demo(out: &Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout);
    stdout
        .split("rampart-demo-")
        .nth(1)
        .and_then(|rest| rest.split('-').next())
        .filter(|pid| pid.parse::<u32>().is_ok())
        .unwrap_or_else(|| panic!("no namespace names in:\n{}", describe(out)))
        .to_owned()
}

#[test]
fn demo_transparent_refuses_to_run_without_root() {
    let root = rustix::process::geteuid().is_root();
    let mut cmd = if root {
        // Drop to nobody, as a user without sudo would be.
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(rampart_bin());
        c
    } else {
        Command::new(rampart_bin())
    };
    let out = cmd
        .args(["demo", "--transparent"])
        .output()
        .expect("run rampart demo --transparent");
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("needs root"),
        "{}",
        describe(&out)
    );
}

/// Sends `signal` to process `pid` (our child); one already gone is fine.
fn kill(pid: u32, signal: rustix::process::Signal) {
    if let Some(pid) = rustix::process::Pid::from_raw(pid as i32) {
        let _ = rustix::process::kill_process(pid, signal);
    }
}
