//! Context informers: one list+watch per resource type, a cache that every loop reads
//! (a kube-runtime reflector store of whole objects for the few — classes, snapshot
//! objects — and a compact [`Cache`] for the many: claims, PVs, attachments), and
//! handlers called for each object seen (added, changed, listed again after a
//! re-watch, or deleted) that queue work.
//!
//! Owns only watching and caching; handlers must be cheap (they queue keys).

use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt as _};
use kube::runtime::WatchStreamExt as _;
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher::{self, Event};
use kube::{Api, Resource, ResourceExt as _};
use serde::de::DeserializeOwned;
use tokio::task::JoinHandle;

use crate::cache::{Cache, Compact};
use stowage_api::keys::DriverNames;

/// Called with each object seen and whether it was deleted.
pub type Handler<K> = Arc<dyn Fn(&K, bool) + Send + Sync>;

/// A running informer: its store and the task that feeds it.
pub struct Informer<S> {
    pub store: S,
    pub task: JoinHandle<()>,
}

/// The watch of `api`, managed fields dropped as objects arrive (they are most of an
/// object's size and no loop reads them).
fn watch<K>(api: Api<K>, config: watcher::Config) -> impl Stream<Item = watcher::Result<Event<K>>>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
{
    watcher::watcher(api, config)
        .modify(|object: &mut K| object.managed_fields_mut().clear())
        .default_backoff()
}

/// Call every handler for an applied or deleted object.
fn dispatch<K>(handlers: &[Handler<K>], event: &Event<K>) {
    match event {
        Event::Apply(object) | Event::InitApply(object) => {
            for handler in handlers {
                handler(object, false);
            }
        }
        Event::Delete(object) => {
            for handler in handlers {
                handler(object, true);
            }
        }
        Event::Init | Event::InitDone => {}
    }
}

/// Start watching `api` into a store of whole objects, calling every handler for every
/// event.
pub fn start<K>(
    api: Api<K>,
    config: watcher::Config,
    handlers: Vec<Handler<K>>,
) -> Informer<Store<K>>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Default + std::hash::Hash + Eq + Clone + Send + Sync,
{
    let (store, writer) = reflector::store();
    let stream = watch(api, config);
    let task = tokio::spawn(async move {
        let mut events = std::pin::pin!(reflector::reflector(writer, stream));
        while let Some(event) = events.next().await {
            match event {
                Ok(event) => dispatch(&handlers, &event),
                Err(e) => {
                    tracing::warn!(kind = %K::kind(&K::DynamicType::default()), error = %e, "watch failed; retrying")
                }
            }
        }
    });
    Informer { store, task }
}

/// Start watching `api` into a compact [`Cache`] (what is kept depends on whether an
/// object is of `drivers`), calling every handler with the whole object of each event
/// after the cache holds it.
pub fn start_compact<K>(
    api: Api<K>,
    config: watcher::Config,
    drivers: DriverNames,
    handlers: Vec<Handler<K>>,
) -> Informer<Cache<K>>
where
    K: Compact + Debug,
{
    let (cache, writer) = Cache::new(drivers);
    let stream = watch(api, config);
    let task = tokio::spawn(async move {
        let mut events = std::pin::pin!(stream);
        while let Some(event) = events.next().await {
            match event {
                Ok(event) => {
                    match &event {
                        Event::Init => writer.list_started(),
                        Event::InitApply(object) | Event::Apply(object) => writer.apply(object),
                        Event::Delete(object) => writer.delete(object),
                        Event::InitDone => writer.list_done(),
                    }
                    dispatch(&handlers, &event);
                }
                Err(e) => {
                    tracing::warn!(kind = %K::kind(&()), error = %e, "watch failed; retrying")
                }
            }
        }
    });
    Informer { store: cache, task }
}

/// What a loop knows about the cache after its own work, per queue key:
///
/// - **Expectations**: after a write, a reconcile of that key waits (instead of acting
///   on the older cached object and repeating work) until the informer has seen the
///   written resourceVersion, or the object's deletion, or `EXPECTATION_TTL` has
///   passed. Like kube-controller-manager's controller expectations.
/// - **Handled versions**: the resourceVersion the loop last left each object at (the
///   one it reconciled, or its own last write). An event whose object is still at that
///   version brings nothing new (the loop's own write coming back, a relist), so the
///   worker skips it instead of reconciling again — which would repeat a failed call
///   ahead of its backoff.
#[derive(Clone, Default)]
pub struct Expectations {
    state: Arc<std::sync::Mutex<State>>,
}

#[derive(Default)]
struct State {
    pending: HashMap<String, (Expect, Instant)>,
    /// Handled version per key, both as [`fingerprint`]s: one entry per object the
    /// loop has looked at, so 16 bytes instead of two strings (50,000 claims).
    handled: HashMap<u64, u64>,
}

/// The cache state a reconciler waits for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Expect {
    /// An event carrying this resourceVersion (the reconciler's last write).
    Version(String),
    /// The object's deletion.
    Deleted,
}

/// How long an expectation holds at most (a missed event must not block a key).
pub const EXPECTATION_TTL: Duration = Duration::from_secs(30);

impl Expectations {
    /// Record the loop's own write (or deletion) of the key's object.
    pub fn expect(&self, key: &str, expect: Expect) {
        let mut state = self.lock();
        match &expect {
            Expect::Version(version) => {
                state.handled.insert(fingerprint(key), fingerprint(version))
            }
            Expect::Deleted => state.handled.remove(&fingerprint(key)),
        };
        state
            .pending
            .insert(key.to_owned(), (expect, Instant::now()));
    }

    /// Called for every informer event before its key is queued: drops an expectation
    /// the event meets, and forgets deleted objects.
    pub fn observe(&self, key: &str, resource_version: Option<&str>, deleted: bool) {
        let mut state = self.lock();
        let cached = if deleted { None } else { resource_version };
        if state
            .pending
            .get(key)
            .is_some_and(|(expect, _)| met(expect, cached))
        {
            state.pending.remove(key);
        }
        if deleted {
            state.handled.remove(&fingerprint(key));
        }
    }

    /// How long the key should still wait, given the cache's resourceVersion of the
    /// object (`None`: not in the cache). Checking the cache, not only the events,
    /// covers an event that arrived before its write's reply.
    pub fn wait(&self, key: &str, cached: Option<&str>) -> Option<Duration> {
        let mut state = self.lock();
        let (expect, since) = state.pending.get(key)?;
        let left = EXPECTATION_TTL.checked_sub(since.elapsed());
        if left.is_none() || met(expect, cached) {
            state.pending.remove(key);
            return None;
        }
        left
    }

    /// A reconcile of the key starts with the object at `cached`: returns false when
    /// the loop already left it at exactly that version (nothing new to look at), else
    /// records it as handled.
    pub fn begin(&self, key: &str, cached: Option<&str>, forced: bool) -> bool {
        let mut state = self.lock();
        let Some(cached) = cached else {
            state.handled.remove(&fingerprint(key));
            return true;
        };
        let (key, cached) = (fingerprint(key), fingerprint(cached));
        if !forced && state.handled.get(&key) == Some(&cached) {
            return false;
        }
        state.handled.insert(key, cached);
        true
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A 64-bit digest of a key or resourceVersion (SipHash, fixed keys): two different
/// ones collide once in ~10^19, far below anything the loops could meet.
pub(crate) fn fingerprint(text: &str) -> u64 {
    use std::hash::{Hash as _, Hasher as _};
    let mut hasher = std::hash::DefaultHasher::new();
    text.hash(&mut hasher);
    hasher.finish()
}

/// Does a cache holding `cached` (`None`: no object) meet `expect`? resourceVersions
/// are compared as numbers when both are (etcd revisions, so a later write counts),
/// else only for equality (then an expectation may only end by its TTL).
fn met(expect: &Expect, cached: Option<&str>) -> bool {
    match (expect, cached) {
        (_, None) => true,
        (Expect::Deleted, Some(_)) => false,
        (Expect::Version(wanted), Some(seen)) => {
            match (wanted.parse::<u64>(), seen.parse::<u64>()) {
                (Ok(wanted), Ok(seen)) => seen >= wanted,
                _ => wanted == seen,
            }
        }
    }
}

/// `namespace/name` (or `name` for cluster objects): the work queue key of an object.
pub fn key<K: Resource>(object: &K) -> String {
    match object.meta().namespace.as_deref() {
        Some(namespace) => format!("{namespace}/{}", object.name_any()),
        None => object.name_any(),
    }
}

/// The queue key of the claim a PV's `claimRef` names, if it names one.
pub fn claim_key_of(pv: &k8s_openapi::api::core::v1::PersistentVolume) -> Option<String> {
    let claim = pv.spec.as_ref()?.claim_ref.as_ref()?;
    Some(format!(
        "{}/{}",
        claim.namespace.as_deref()?,
        claim.name.as_deref()?
    ))
}

/// The object behind a queue key, from `store`.
pub fn get<K>(store: &Store<K>, key: &str) -> Option<Arc<K>>
where
    K: Resource + Clone + 'static,
    K::DynamicType: Default + std::hash::Hash + Eq + Clone,
{
    let reference = match key.split_once('/') {
        Some((namespace, name)) => reflector::ObjectRef::new(name).within(namespace),
        None => reflector::ObjectRef::new(key),
    };
    store.get(&reference)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_expectation_holds_until_the_cache_has_the_write() {
        let e = Expectations::default();
        e.expect("db/data-0", Expect::Version("12".into()));
        assert!(
            e.wait("db/data-0", Some("11")).is_some(),
            "older cache must wait"
        );
        e.observe("db/data-0", Some("11"), false);
        assert!(e.wait("db/data-0", Some("11")).is_some());
        // A later write by someone else also shows ours is in.
        assert!(e.wait("db/data-0", Some("13")).is_none());
        assert!(
            e.wait("db/data-0", Some("11")).is_none(),
            "met expectations are gone"
        );
    }

    #[test]
    fn an_unchanged_object_is_skipped_unless_forced() {
        let e = Expectations::default();
        assert!(e.begin("db/data-0", Some("10"), false), "first look");
        assert!(!e.begin("db/data-0", Some("10"), false), "nothing new");
        assert!(e.begin("db/data-0", Some("10"), true), "forced");
        // The loop's own write: its event brings nothing new either.
        e.expect("db/data-0", Expect::Version("12".into()));
        assert!(!e.begin("db/data-0", Some("12"), false));
        // Someone else's write does.
        assert!(e.begin("db/data-0", Some("13"), false));
        // A deleted object is forgotten; a new one by that name is looked at.
        e.observe("db/data-0", Some("14"), true);
        assert!(e.begin("db/data-0", Some("13"), false));
    }

    #[test]
    fn deletion_is_met_only_by_absence() {
        let e = Expectations::default();
        e.expect("pvc-1", Expect::Deleted);
        assert!(e.wait("pvc-1", Some("99")).is_some());
        e.observe("pvc-1", Some("100"), true);
        assert!(e.wait("pvc-1", Some("100")).is_none());
    }

    #[test]
    fn opaque_versions_compare_for_equality_only() {
        let e = Expectations::default();
        e.expect("k", Expect::Version("abc".into()));
        assert!(e.wait("k", Some("abd")).is_some());
        assert!(e.wait("k", Some("abc")).is_none());
    }
}
