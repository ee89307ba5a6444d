//! Copies that outlast a CSI call: a snapshot or a clone of a large volume takes longer
//! than any caller waits, so each copy runs as a background task keyed by what it
//! makes ("snapshot <export> <name>", "clone <export> <name>"). A call starts the copy
//! or joins the one running, waits a little, and answers "done" or "still copying";
//! the caller's retry (the CSI sidecars and stowage's loops retry until done) joins the
//! same copy instead of starting over. A copy that failed is reported once, to the next
//! caller, and then forgotten, so the retry after that starts afresh.
//!
//! A copy never outlives the process: a crash leaves its scratch directory, which the
//! next attempt removes before copying again (the layout is `layout.rs`'s).

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use crate::backend::BackendError;

/// One copy: what it copies from, its progress and, once over, its outcome.
pub struct Copy {
    /// The id of what is copied (a volume or a snapshot).
    pub source: String,
    /// When it started (seconds, nanoseconds since the epoch).
    pub started: (i64, i32),
    /// Bytes of file contents copied so far.
    pub progress: Arc<AtomicU64>,
    outcome: watch::Receiver<Option<Result<(), BackendError>>>,
    task: tokio::task::AbortHandle,
}

impl Copy {
    pub fn copied(&self) -> u64 {
        self.progress.load(Ordering::Relaxed)
    }
}

/// Where a copy stands after a caller waited for it.
pub enum Waited {
    Done,
    Failed(BackendError),
    /// Still copying: this many bytes so far.
    Running(u64),
}

#[derive(Default)]
pub struct Copies {
    running: Mutex<HashMap<String, Arc<Copy>>>,
}

impl Copies {
    /// Join the copy `key`, or start it from `source` with `work` (given the
    /// progress counter and the start time). A copy that already ended is handed out
    /// once more (its outcome is the caller's to report) and forgotten. `Err` names
    /// the source of a copy under way for `key` from another source.
    pub fn start_or_join<F, W>(&self, key: &str, source: &str, work: W) -> Result<Arc<Copy>, String>
    where
        W: FnOnce(Arc<AtomicU64>, (i64, i32)) -> F,
        F: Future<Output = Result<(), BackendError>> + Send + 'static,
    {
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(copy) = running.get(key) {
            let copy = Arc::clone(copy);
            if copy.source != source {
                return Err(copy.source.clone());
            }
            if copy.outcome.borrow().is_some() {
                running.remove(key);
            }
            return Ok(copy);
        }
        let progress = Arc::new(AtomicU64::new(0));
        let (tx, rx) = watch::channel(None);
        let started = now();
        let future = work(Arc::clone(&progress), started);
        let task = tokio::spawn(async move {
            let outcome = future.await;
            if let Err(error) = &outcome {
                tracing::warn!(%error, "copy failed");
            }
            let _ = tx.send(Some(outcome));
        });
        let copy = Arc::new(Copy {
            source: source.to_owned(),
            started,
            progress,
            outcome: rx,
            task: task.abort_handle(),
        });
        running.insert(key.to_owned(), Arc::clone(&copy));
        Ok(copy)
    }

    /// The keys and copies under way whose key starts with `prefix`.
    pub fn under_way(&self, prefix: &str) -> Vec<(String, Arc<Copy>)> {
        self.running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(key, copy)| key.starts_with(prefix) && copy.outcome.borrow().is_none())
            .map(|(key, copy)| (key.clone(), Arc::clone(copy)))
            .collect()
    }

    /// The copy `key` if one is known (running, or ended and not yet reported).
    pub fn get(&self, key: &str) -> Option<Arc<Copy>> {
        self.running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .cloned()
    }

    /// Wait up to `wait` for `copy`; an ended copy is forgotten (`key`).
    pub async fn wait(&self, key: &str, copy: &Copy, wait: Duration) -> Waited {
        let mut outcome = copy.outcome.clone();
        let ended = tokio::time::timeout(wait, outcome.wait_for(Option::is_some)).await;
        let result = match ended {
            Ok(Ok(done)) => done.clone().expect("waited for Some"),
            Ok(Err(_)) => Err(BackendError::Internal(
                "the copy task ended without a result".into(),
            )),
            Err(_) => return Waited::Running(copy.copied()),
        };
        self.forget_ended(key);
        match result {
            Ok(()) => Waited::Done,
            Err(e) => Waited::Failed(e),
        }
    }

    /// Stop the copy `key` (its scratch directory stays for the caller to remove).
    pub async fn cancel(&self, key: &str) {
        let copy = self
            .running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
        if let Some(copy) = copy {
            copy.task.abort();
            let mut outcome = copy.outcome.clone();
            // The task is gone once its sender is dropped.
            let _ = outcome.wait_for(|_| false).await;
        }
    }

    pub fn forget_ended(&self, key: &str) {
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        if running
            .get(key)
            .is_some_and(|copy| copy.outcome.borrow().is_some())
        {
            running.remove(key);
        }
    }
}

/// Now, as seconds and nanoseconds since the epoch.
pub fn now() -> (i64, i32) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    (
        i64::try_from(now.as_secs()).unwrap_or(i64::MAX),
        i32::try_from(now.subsec_nanos()).unwrap_or(0),
    )
}
