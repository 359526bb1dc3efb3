//! nginx from Debian as a static file server on a loopback port (a plain
//! process serving a temporary directory; nginx sets ETags on static
//! files), for policy bundle tests in `tests/` and `central/tests/`.

// Each test binary uses part of it.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant, SystemTime};

/// nginx serving `www/` of a temporary directory on 127.0.0.1.
pub struct Nginx {
    child: Child,
    dir: tempfile::TempDir,
    port: u16,
}

impl Nginx {
    /// Starts nginx; panics when it is not installed (tests that use it
    /// are `#[ignore]`d for it).
    pub fn start() -> Nginx {
        let bin = ["/usr/sbin/nginx", "/usr/bin/nginx"]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| p.exists());
        let Some(bin) = bin else {
            panic!("nginx is not installed (apt-get install nginx)");
        };
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("www")).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let d = dir.path().display();
        let conf = format!(
            "daemon off;\nmaster_process off;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
             events {{ worker_connections 64; }}\n\
             http {{\n  access_log {d}/access.log;\n  client_body_temp_path {d}/tmp;\n\
               proxy_temp_path {d}/tmp;\n  fastcgi_temp_path {d}/tmp;\n  uwsgi_temp_path {d}/tmp;\n\
               scgi_temp_path {d}/tmp;\n\
               server {{ listen 127.0.0.1:{port}; root {d}/www; }}\n}}\n"
        );
        std::fs::write(dir.path().join("nginx.conf"), conf).unwrap();
        let child = Command::new(bin)
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(dir.path().join("nginx.conf"))
            .arg("-e")
            .arg(dir.path().join("error.log"))
            .spawn()
            .unwrap();
        let n = Nginx { child, dir, port };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "nginx did not start: {}",
                n.log("error.log")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        n
    }

    pub fn url(&self, file: &str) -> http::Uri {
        self.url_string(file).parse().unwrap()
    }

    /// The URL of a served file, as text (for configuration files).
    pub fn url_string(&self, file: &str) -> String {
        format!("http://127.0.0.1:{}/{file}", self.port)
    }

    /// Replaces a served file atomically, with a later modification time so
    /// that nginx's ETag (mtime and size) changes even within one second.
    pub fn publish(&self, file: &str, bytes: &[u8]) {
        static STEP: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let www = self.dir.path().join("www");
        let tmp = www.join(format!(".{file}.tmp"));
        std::fs::write(&tmp, bytes).unwrap();
        let step = STEP.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let f = std::fs::File::options().write(true).open(&tmp).unwrap();
        f.set_modified(SystemTime::now() + Duration::from_secs(10 * step))
            .unwrap();
        drop(f);
        std::fs::rename(&tmp, www.join(file)).unwrap();
    }

    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default()
    }

    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        self.stop();
    }
}
