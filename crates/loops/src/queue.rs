//! A work queue of object keys, shaped like client-go's rate-limited workqueue: a key
//! is queued at most once, never handed to two workers at once (a key added while it
//! is being worked on is queued again when that work ends), and failures are retried
//! after a per-key exponential backoff that a success resets.
//!
//! Two ways in: [`Queue::add`] says "the object may have changed" (its own watch
//! event), and the worker may skip the key when the cache shows nothing new since its
//! last reconcile (a loop's own write coming back, a relist); a *forced* key
//! ([`Queue::add_forced`], and every key whose delay ran out: backoff, `Next::After`)
//! is always reconciled. An event never cancels a pending delay, so a loop's own
//! writes cannot cut its backoff short.
//!
//! Owns only scheduling. What a key means and how it is reconciled is the loops' job.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// Backoff for failed keys: `start`, doubled per consecutive failure, at most `max`.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub start: Duration,
    pub max: Duration,
}

impl Backoff {
    /// The delay after `failures` consecutive failures (1 = the first).
    pub fn delay(&self, failures: u32) -> Duration {
        let exponent = failures.saturating_sub(1).min(30);
        self.start.saturating_mul(1u32 << exponent).min(self.max)
    }
}

#[derive(Default)]
struct State {
    ready: VecDeque<String>,
    /// Keys in `ready` (no duplicates).
    queued: HashSet<String>,
    /// Keys a worker holds now.
    active: HashSet<String>,
    /// Keys added while active: queued again when released.
    dirty: HashSet<String>,
    /// Keys waiting for a time: the earliest wins.
    delayed: HashMap<String, Instant>,
    /// Keys that must be reconciled when next handed out, changed or not.
    forced: HashSet<String>,
    failures: HashMap<String, u32>,
    closed: bool,
}

impl State {
    /// The queue drained: give back the room a burst took (a start among 50,000
    /// objects queues each once; the empty tables would otherwise keep megabytes).
    fn release_spare_capacity(&mut self) {
        const KEEP: usize = 1024;
        if self.ready.capacity() > KEEP {
            self.ready.shrink_to(KEEP);
        }
        if self.queued.capacity() > KEEP {
            self.queued.shrink_to(KEEP);
        }
        if self.forced.capacity() > KEEP && self.forced.len() < KEEP {
            self.forced.shrink_to(KEEP);
        }
    }
}

/// A cloneable handle on one queue.
#[derive(Clone)]
pub struct Queue {
    state: Arc<Mutex<State>>,
    ready: Arc<Notify>,
    timer: Arc<Notify>,
    backoff: Backoff,
}

impl Queue {
    /// A queue and the task that moves delayed keys to ready; the task ends on `close`.
    pub fn new(backoff: Backoff) -> Queue {
        let queue = Queue {
            state: Arc::default(),
            ready: Arc::new(Notify::new()),
            timer: Arc::new(Notify::new()),
            backoff,
        };
        tokio::spawn(queue.clone().run_timer());
        queue
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queue `key` now because its object may have changed (no-op if already queued;
    /// after the current work if active). A pending delay stays pending.
    pub fn add(&self, key: &str) {
        let mut state = self.lock();
        if state.closed {
            return;
        }
        if state.active.contains(key) {
            state.dirty.insert(key.to_owned());
        } else if state.queued.insert(key.to_owned()) {
            state.ready.push_back(key.to_owned());
            drop(state);
            self.ready.notify_one();
        }
    }

    /// Queue `key` now, to be reconciled whether or not its object changed (something
    /// it depends on did).
    pub fn add_forced(&self, key: &str) {
        {
            let mut state = self.lock();
            if state.closed {
                return;
            }
            state.forced.insert(key.to_owned());
        }
        self.add(key);
    }

    /// Queue `key` (forced) after `delay` (an earlier pending time wins).
    pub fn add_after(&self, key: &str, delay: Duration) {
        if delay.is_zero() {
            return self.add_forced(key);
        }
        let at = Instant::now() + delay;
        let mut state = self.lock();
        if state.closed {
            return;
        }
        let entry = state.delayed.entry(key.to_owned()).or_insert(at);
        if at < *entry {
            *entry = at;
        }
        drop(state);
        self.timer.notify_one();
    }

    /// Queue `key` after its backoff; returns the delay chosen.
    pub fn add_rate_limited(&self, key: &str) -> Duration {
        let failures = {
            let mut state = self.lock();
            let failures = state.failures.entry(key.to_owned()).or_insert(0);
            *failures = failures.saturating_add(1);
            *failures
        };
        let delay = self.backoff.delay(failures);
        self.add_after(key, delay);
        delay
    }

    /// Consecutive failures recorded for `key`.
    pub fn failures(&self, key: &str) -> u32 {
        self.lock().failures.get(key).copied().unwrap_or(0)
    }

    /// Reset `key`'s backoff (after a success).
    pub fn forget(&self, key: &str) {
        self.lock().failures.remove(key);
    }

    /// Reset `key`'s backoff and drop its pending delay: the reconcile is done with it
    /// until something changes.
    pub fn settle(&self, key: &str) {
        let mut state = self.lock();
        state.failures.remove(key);
        state.delayed.remove(key);
    }

    /// Must the key just handed out be reconciled even if its object is unchanged?
    /// (Consumes the mark.)
    pub fn take_forced(&self, key: &str) -> bool {
        self.lock().forced.remove(key)
    }

    /// Wait for a key to work on; `None` once the queue is closed.
    pub async fn next(&self) -> Option<String> {
        loop {
            let notified = self.ready.notified();
            {
                let mut state = self.lock();
                if state.closed {
                    return None;
                }
                if let Some(key) = state.ready.pop_front() {
                    state.queued.remove(&key);
                    state.active.insert(key.clone());
                    if state.ready.is_empty() {
                        state.release_spare_capacity();
                    } else {
                        self.ready.notify_one();
                    }
                    return Some(key);
                }
            }
            notified.await;
        }
    }

    /// The worker is done with `key`: queue it again if it was added meanwhile.
    pub fn done(&self, key: &str) {
        let mut state = self.lock();
        state.active.remove(key);
        if state.dirty.remove(key) && !state.closed && state.queued.insert(key.to_owned()) {
            state.ready.push_back(key.to_owned());
            drop(state);
            self.ready.notify_one();
        }
    }

    /// Stop handing out keys; pending ones are dropped.
    pub fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_waiters();
        self.timer.notify_one();
    }

    /// Keys queued, delayed or active (for tests and metrics).
    pub fn len(&self) -> usize {
        let state = self.lock();
        state.queued.len() + state.delayed.len() + state.active.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    async fn run_timer(self) {
        loop {
            let notified = self.timer.notified();
            let next = {
                let mut state = self.lock();
                if state.closed {
                    return;
                }
                let now = Instant::now();
                let due: Vec<String> = state
                    .delayed
                    .iter()
                    .filter(|(_, at)| **at <= now)
                    .map(|(key, _)| key.clone())
                    .collect();
                for key in &due {
                    state.delayed.remove(key);
                    state.forced.insert(key.clone());
                }
                let next = state.delayed.values().min().copied();
                drop(state);
                for key in due {
                    self.add(&key);
                }
                next
            };
            match next {
                Some(at) => {
                    tokio::select! {
                        _ = notified => {}
                        _ = tokio::time::sleep_until(at) => {}
                    }
                }
                None => notified.await,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backoff() -> Backoff {
        Backoff {
            start: Duration::from_secs(1),
            max: Duration::from_secs(300),
        }
    }

    #[test]
    fn backoff_doubles_to_the_cap() {
        let b = backoff();
        assert_eq!(b.delay(1), Duration::from_secs(1));
        assert_eq!(b.delay(2), Duration::from_secs(2));
        assert_eq!(b.delay(4), Duration::from_secs(8));
        assert_eq!(b.delay(9), Duration::from_secs(256));
        assert_eq!(b.delay(10), Duration::from_secs(300));
        assert_eq!(b.delay(1000), Duration::from_secs(300));
    }

    #[tokio::test]
    async fn a_key_is_queued_once_and_never_worked_twice_at_once() {
        let q = Queue::new(backoff());
        q.add("a");
        q.add("a");
        q.add("b");
        assert_eq!(q.next().await.as_deref(), Some("a"));
        // Added while active: not handed out again until done.
        q.add("a");
        assert_eq!(q.next().await.as_deref(), Some("b"));
        q.done("b");
        let pending = tokio::time::timeout(Duration::from_millis(50), q.next()).await;
        assert!(pending.is_err(), "a handed out while still active");
        q.done("a");
        assert_eq!(q.next().await.as_deref(), Some("a"));
        q.done("a");
        assert!(q.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn failures_back_off_and_forget_resets() {
        let q = Queue::new(backoff());
        assert_eq!(q.add_rate_limited("a"), Duration::from_secs(1));
        assert_eq!(q.add_rate_limited("a"), Duration::from_secs(2));
        assert_eq!(q.failures("a"), 2);
        let start = Instant::now();
        assert_eq!(q.next().await.as_deref(), Some("a"));
        // The earlier of the two pending times wins.
        assert_eq!(start.elapsed(), Duration::from_secs(1));
        q.done("a");
        q.forget("a");
        assert_eq!(q.add_rate_limited("a"), Duration::from_secs(1));
    }

    #[tokio::test]
    async fn close_wakes_waiting_workers() {
        let q = Queue::new(backoff());
        let worker = tokio::spawn({
            let q = q.clone();
            async move { q.next().await }
        });
        tokio::task::yield_now().await;
        q.close();
        assert_eq!(worker.await.unwrap(), None);
    }
}
