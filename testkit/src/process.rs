//! Processes inside pods: long-running ones behind a [`Proc`] guard, and
//! commands run to completion with a time limit.

use std::fs::File;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A running process (and its process group). Killed on drop; when the
/// test is panicking, its stdout and stderr are printed first.
pub struct Proc {
    child: Child,
    label: String,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl Proc {
    /// Starts `command` in a new process group, output going to files in
    /// `logs`.
    pub fn spawn(mut command: Command, pod: &str, logs: &Path) -> Proc {
        let label = format!("{pod}: {}", describe_command(&command));
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let stdout = logs.join(format!("{pod}-{seq}.stdout"));
        let stderr = logs.join(format!("{pod}-{seq}.stderr"));
        let child = command
            .stdin(Stdio::null())
            .stdout(File::create(&stdout).expect("create stdout log"))
            .stderr(File::create(&stderr).expect("create stderr log"))
            // Its own group, so a drop also kills whatever it started.
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {label}: {e}"));
        Proc {
            child,
            label,
            stdout,
            stderr,
        }
    }

    /// The process id (also its process group id).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What it wrote to stdout so far.
    pub fn stdout(&self) -> String {
        std::fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    /// What it wrote to stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Its exit status, if it has exited.
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("wait for child")
    }

    /// Waits for it to exit; panics (with its output) after `within`.
    pub fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.try_status() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{} still running after {within:?}\n{}",
                self.label,
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Its command line and everything it wrote, for failure messages.
    pub fn logs(&self) -> String {
        format!(
            "--- {} stdout:\n{}--- stderr:\n{}",
            self.label,
            self.stdout(),
            self.stderr()
        )
    }

    /// Kills its process group and reaps it.
    pub fn kill(&mut self) {
        kill_group(&self.child);
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
        self.kill();
    }
}

/// Runs `command` to completion, killing it and panicking after `within`.
pub(crate) fn run(mut command: Command, within: Duration) -> Output {
    let label = describe_command(&command);
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {label}: {e}"));
    // Drain both pipes while waiting, so a chatty child cannot block.
    let stdout = drain(child.stdout.take().expect("piped stdout"));
    let stderr = drain(child.stderr.take().expect("piped stderr"));
    let deadline = Instant::now() + within;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for child") {
            break status;
        }
        if Instant::now() >= deadline {
            kill_group(&child);
            let status = child.wait().expect("reap a killed child");
            let output = Output {
                status,
                stdout: join(stdout),
                stderr: join(stderr),
            };
            panic!(
                "{label} did not finish within {within:?}: {}",
                describe(&output)
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    Output {
        status,
        stdout: join(stdout),
        stderr: join(stderr),
    }
}

/// Status, stdout and stderr of `output`, for failure messages.
pub(crate) fn describe(output: &Output) -> String {
    format!(
        "{}\nstdout: {}\nstderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn describe_command(command: &Command) -> String {
    std::iter::once(command.get_program())
        .chain(command.get_args())
        .map(|arg| arg.to_string_lossy().into_owned())
        // Inline scripts would drown the message.
        .map(|arg| {
            if arg.contains('\n') {
                "<script>".to_owned()
            } else {
                arg
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn kill_group(child: &Child) {
    // The group id is the child's pid: it was spawned with process_group(0).
    // An error means the group is gone already.
    let group = rustix::process::Pid::from_child(child);
    let _ = rustix::process::kill_process_group(group, rustix::process::Signal::KILL);
}

fn drain(mut pipe: impl Read + Send + 'static) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = pipe.read_to_end(&mut bytes);
        bytes
    })
}

fn join(reader: std::thread::JoinHandle<Vec<u8>>) -> Vec<u8> {
    reader.join().unwrap_or_default()
}
