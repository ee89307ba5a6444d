//! Per-volume guard: at most one operation per key (volume id or name) at a time.
//! A second concurrent request gets ABORTED, as the CSI spec asks, instead of racing
//! the first one on the storage system.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

/// The set of keys with an operation in progress.
#[derive(Debug, Default, Clone)]
pub struct InFlight {
    keys: Arc<Mutex<HashSet<String>>>,
}

/// Held while an operation runs; releases the key when dropped.
#[derive(Debug)]
pub struct Guard {
    keys: Arc<Mutex<HashSet<String>>>,
    key: String,
}

impl InFlight {
    /// Claim `key`; `None` when another operation holds it.
    pub fn try_claim(&self, key: &str) -> Option<Guard> {
        let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        keys.insert(key.to_owned()).then(|| Guard {
            keys: Arc::clone(&self.keys),
            key: key.to_owned(),
        })
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        keys.remove(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_claim_fails_until_the_first_guard_drops() {
        let inflight = InFlight::default();
        let first = inflight.try_claim("vol-1").expect("first claim");
        assert!(inflight.try_claim("vol-1").is_none());
        assert!(
            inflight.try_claim("vol-2").is_some(),
            "other keys are independent"
        );
        drop(first);
        assert!(inflight.try_claim("vol-1").is_some());
    }
}
