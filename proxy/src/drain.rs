//! Graceful drain: a signal that tells listeners to stop accepting, and a
//! count of open connections to wait for, up to a deadline.

use std::time::Duration;

use tokio::sync::{mpsc, watch};

/// Starts a drain and waits for it.
#[derive(Debug)]
pub struct Drain {
    signal: watch::Sender<bool>,
    tracker: Option<mpsc::Sender<()>>,
    done: mpsc::Receiver<()>,
}

/// Held by listeners and connections: tells them to stop, keeps the drain
/// waiting while alive.
#[derive(Debug, Clone)]
pub struct Watch {
    signal: watch::Receiver<bool>,
    _tracker: mpsc::Sender<()>,
}

impl Default for Drain {
    fn default() -> Self {
        Self::new()
    }
}

impl Drain {
    /// A drain not yet started.
    pub fn new() -> Self {
        let (signal, _) = watch::channel(false);
        let (tracker, done) = mpsc::channel(1);
        Drain {
            signal,
            tracker: Some(tracker),
            done,
        }
    }

    /// A handle for a listener or connection.
    pub fn watch(&self) -> Watch {
        Watch {
            signal: self.signal.subscribe(),
            // Invariant: `tracker` is only taken by `drain`, which consumes self.
            _tracker: self.tracker.clone().expect("drain not started"),
        }
    }

    /// Signals every watcher and waits until all are dropped or `deadline` passes.
    /// Returns true when everything finished in time.
    pub async fn drain(mut self, deadline: Duration) -> bool {
        self.signal.send_replace(true);
        drop(self.tracker.take());
        tokio::time::timeout(deadline, self.done.recv())
            .await
            .is_ok()
    }
}

impl Watch {
    /// Resolves when the drain starts.
    pub async fn signaled(&mut self) {
        // An error means the Drain was dropped: treat it as a drain too.
        let _ = self.signal.wait_for(|d| *d).await;
    }

    /// True once the drain has started.
    pub fn is_draining(&self) -> bool {
        *self.signal.borrow()
    }
}

/// Drives a hyper server connection (`$conn`) to its end. When the drain
/// starts (`$watch`) or `$idle` resolves, it is asked to finish
/// gracefully: GOAWAY on HTTP/2, `Connection: close` on HTTP/1.1, in-flight
/// requests completed. On a drain it is first served on for `$grace`
/// (zero for HTTP/2, whose GOAWAY tells the client which requests were
/// not taken): an HTTP/1 client cannot tell an idle keep-alive connection
/// closed under it from a request lost, so the connection stays until its
/// next response, which the service marks `Connection: close`
/// ([`crate::server::Shared::is_draining`]), or until the grace ends.
/// Evaluates to the connection's result. A macro because hyper's
/// connection types share `graceful_shutdown` but no trait.
macro_rules! serve_gracefully {
    ($conn:expr, $watch:expr, $idle:expr, $grace:expr) => {{
        let conn = $conn;
        tokio::pin!(conn);
        tokio::select! {
            r = conn.as_mut() => r,
            _ = $watch.signaled() => {
                let grace: std::time::Duration = $grace;
                let ended = if grace.is_zero() {
                    None
                } else {
                    tokio::time::timeout(grace, conn.as_mut()).await.ok()
                };
                match ended {
                    Some(r) => r,
                    None => {
                        conn.as_mut().graceful_shutdown();
                        conn.await
                    }
                }
            }
            _ = $idle => {
                tracing::debug!("idle connection closed");
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        }
    }};
}
pub(crate) use serve_gracefully;
