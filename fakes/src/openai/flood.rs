//! A flood of output audio: `response.output_audio.delta`s sent as fast as the service's
//! socket accepts them, to test what the service does when the model outruns the caller.
//!
//! A background task emits the deltas through the session (so they get event ids, count as
//! the item's audio for truncation checks, and keep their place among scripted events), but
//! never more than [`WINDOW`] ahead of what the writer has flushed to the socket: when the
//! service stops reading, the flood stalls with it instead of piling up in the fake's memory,
//! and [`Flood::bytes_written`] says how far it got.

use std::sync::{
    atomic::{AtomicBool, AtomicU64, Ordering},
    Arc,
};

use base64::{engine::general_purpose::STANDARD, Engine as _};
use tokio::sync::{Notify, Semaphore};

use super::{lock, server::SessionCore, session::Out, DEFAULT_TIMEOUT, POLL};
use crate::g711;

/// Deltas queued but not yet flushed to the socket, at most.
const WINDOW: usize = 4;

/// What the flood task, the writer and the test's [`Flood`] share.
#[derive(Debug)]
pub(crate) struct FloodShared {
    /// One permit per delta that may be queued; the writer returns it once flushed.
    window: Semaphore,
    stop: AtomicBool,
    stop_notify: Notify,
    queued: AtomicU64,
    written: AtomicU64,
    finished: AtomicBool,
}

impl FloodShared {
    /// The writer flushed a delta of `bytes` audio bytes.
    pub(crate) fn written(&self, bytes: usize) {
        self.written.fetch_add(bytes as u64, Ordering::Relaxed);
        self.window.add_permits(1);
    }

    /// The connection is gone: nothing more will be written.
    pub(crate) fn abandon(&self) {
        self.window.close();
    }
}

/// The test's handle on a flood started by [`super::FakeSession::flood_audio`]. Dropping it
/// does not stop the flood.
#[derive(Clone, Debug)]
pub struct Flood {
    shared: Arc<FloodShared>,
}

impl Flood {
    /// Starts the flood task (see the module docs).
    pub(crate) fn start(
        core: Arc<SessionCore>,
        response_id: &str,
        item_id: &str,
        total_bytes: usize,
        chunk_bytes: usize,
    ) -> Flood {
        let shared = Arc::new(FloodShared {
            window: Semaphore::new(WINDOW),
            stop: AtomicBool::new(false),
            stop_notify: Notify::new(),
            queued: AtomicU64::new(0),
            written: AtomicU64::new(0),
            finished: AtomicBool::new(false),
        });
        let task = run(
            core,
            response_id.to_owned(),
            item_id.to_owned(),
            total_bytes,
            chunk_bytes.max(1),
            shared.clone(),
        );
        tokio::spawn(task);
        Flood { shared }
    }

    /// Stops queueing deltas; the few already queued (at most four) still go out.
    pub fn stop(&self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.stop_notify.notify_one();
    }

    /// µ-law bytes of the deltas flushed to the service's socket so far.
    pub fn bytes_written(&self) -> usize {
        self.shared.written.load(Ordering::Relaxed) as usize
    }

    /// µ-law bytes of the deltas emitted so far (written, or about to be).
    pub fn bytes_queued(&self) -> usize {
        self.shared.queued.load(Ordering::Relaxed) as usize
    }

    /// The flood task has ended: everything was queued, it was stopped, or the connection
    /// is gone.
    pub fn is_finished(&self) -> bool {
        self.shared.finished.load(Ordering::SeqCst)
    }

    /// Waits up to [`super::DEFAULT_TIMEOUT`] until at least `n` bytes were written; returns
    /// the bytes written, panicking on timeout.
    pub async fn wait_written(&self, n: usize) -> usize {
        let deadline = tokio::time::Instant::now() + DEFAULT_TIMEOUT;
        loop {
            let written = self.bytes_written();
            if written >= n {
                return written;
            }
            if tokio::time::Instant::now() >= deadline {
                panic!(
                    "Flood: timed out waiting for {n} bytes written (written {written}, queued {})",
                    self.bytes_queued()
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Waits until the written count has not moved for `quiet` (the service's socket is
    /// full, or the flood is over); returns the bytes written. Gives up (returning) after
    /// [`super::DEFAULT_TIMEOUT`].
    pub async fn wait_stalled(&self, quiet: std::time::Duration) -> usize {
        let deadline = tokio::time::Instant::now() + DEFAULT_TIMEOUT;
        let mut last = self.bytes_written();
        let mut since = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(POLL).await;
            let now = self.bytes_written();
            if now != last {
                last = now;
                since = tokio::time::Instant::now();
            } else if since.elapsed() >= quiet || tokio::time::Instant::now() >= deadline {
                return now;
            }
        }
    }
}

async fn run(
    core: Arc<SessionCore>,
    response_id: String,
    item_id: String,
    total: usize,
    chunk: usize,
    shared: Arc<FloodShared>,
) {
    // µ-law silence, encoded once: the hot loop only copies a string.
    let full = STANDARD.encode(vec![g711::SILENCE; chunk]);
    let mut sent = 0;
    let stopped = || shared.stop.load(Ordering::SeqCst);
    while sent < total && !stopped() {
        let permit = tokio::select! {
            biased;
            _ = shared.stop_notify.notified() => break,
            permit = shared.window.acquire() => permit,
        };
        let Ok(permit) = permit else {
            break; // the connection is gone
        };
        // Given back by the writer when this delta is flushed.
        permit.forget();
        let n = chunk.min(total - sent);
        let partial;
        let b64 = if n == chunk {
            &full
        } else {
            partial = STANDARD.encode(vec![g711::SILENCE; n]);
            &partial
        };
        {
            let mut st = lock(&core.state);
            if st.closed {
                break;
            }
            let text = st.audio_delta_text(&response_id, &item_id, b64);
            st.book_output_audio(&item_id, n);
            let out = Out::Flood {
                text,
                audio_bytes: n,
                flood: shared.clone(),
            };
            if !st.send_raw(out) {
                break;
            }
        }
        sent += n;
        shared.queued.fetch_add(n as u64, Ordering::Relaxed);
    }
    shared.finished.store(true, Ordering::SeqCst);
}
