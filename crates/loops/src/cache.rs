//! Compact caches of the many objects (claims, PVs, VolumeAttachments): each object is
//! kept as the JSON of only the fields a loop reads ([`Keep`], per kind in
//! [`Compact`]), and decoded back into its Kubernetes type when a loop asks for it.
//! A whole `PersistentVolume` is 3.4 KB before its first string; the compact form of
//! one stowage provisioned is ~1 KB of JSON (its strings), and a PV of another driver keeps
//! only what tells the loops it is not theirs (and what pre-binding compares).
//!
//! Owns the cache's layout and what is kept; not the watch (see `informer`) and not
//! what the loops decide from the objects.

use std::collections::HashMap;
use std::marker::PhantomData;
use std::sync::{Arc, RwLock};

use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use k8s_openapi::api::storage::v1::VolumeAttachment;
use kube::Resource;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};
use tokio::sync::watch;

use stowage_api::keys::DriverNames;

/// Which fields of a JSON object are kept.
#[derive(Debug, Clone, Copy)]
pub enum Keep {
    /// The value, whole.
    All,
    /// Only these keys, each pruned by its own rule.
    Only(&'static [(&'static str, Keep)]),
    /// Every key but these (values whole).
    AllBut(&'static [&'static str]),
}

/// An annotation nobody reads and that can be as large as the object (a copy of it).
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// The metadata every loop reads of an object it acts on (no labels, owner references,
/// timestamps other than the deletion's, or managed fields: no loop reads them).
const META: Keep = Keep::Only(&[
    ("name", Keep::All),
    ("namespace", Keep::All),
    ("uid", Keep::All),
    ("resourceVersion", Keep::All),
    ("deletionTimestamp", Keep::All),
    ("finalizers", Keep::All),
    ("annotations", Keep::AllBut(&[LAST_APPLIED])),
]);

// `apiVersion` and `kind` are dropped too: the types know them (decoding accepts
// objects without them).

const CLAIM: Keep = Keep::Only(&[
    ("metadata", META),
    ("spec", Keep::All),
    ("status", Keep::All),
]);

/// The claim a PV names: no loop reads its `apiVersion`, `kind` or `resourceVersion`.
const CLAIM_REF: Keep = Keep::Only(&[
    ("namespace", Keep::All),
    ("name", Keep::All),
    ("uid", Keep::All),
]);

const VOLUME: Keep = Keep::Only(&[
    ("metadata", META),
    (
        "spec",
        Keep::Only(&[
            ("accessModes", Keep::All),
            ("capacity", Keep::All),
            ("claimRef", CLAIM_REF),
            ("csi", Keep::All),
            ("mountOptions", Keep::All),
            ("nodeAffinity", Keep::All),
            ("persistentVolumeReclaimPolicy", Keep::All),
            ("storageClassName", Keep::All),
            ("volumeAttributesClassName", Keep::All),
            ("volumeMode", Keep::All),
        ]),
    ),
    ("status", Keep::Only(&[("phase", Keep::All)])),
]);

/// A PV of another driver: what `rules::is_ours` and pre-binding (`is_prebound_to`)
/// read, so such a PV is known as not ours and a claim pre-bound to it is left alone.
const OTHER_VOLUME: Keep = Keep::Only(&[
    (
        "metadata",
        Keep::Only(&[
            ("name", Keep::All),
            ("uid", Keep::All),
            ("resourceVersion", Keep::All),
            ("deletionTimestamp", Keep::All),
            ("finalizers", Keep::All),
            (
                "annotations",
                Keep::Only(&[("pv.kubernetes.io/provisioned-by", Keep::All)]),
            ),
        ]),
    ),
    (
        "spec",
        Keep::Only(&[
            ("accessModes", Keep::All),
            ("capacity", Keep::All),
            ("claimRef", CLAIM_REF),
            ("csi", Keep::Only(&[("driver", Keep::All)])),
            ("persistentVolumeReclaimPolicy", Keep::All),
            ("storageClassName", Keep::All),
            ("volumeMode", Keep::All),
        ]),
    ),
    ("status", Keep::Only(&[("phase", Keep::All)])),
]);

const ATTACHMENT: Keep = Keep::Only(&[
    ("metadata", META),
    ("spec", Keep::All),
    ("status", Keep::All),
]);

/// An attachment of another attacher: enough for a deletion to reach its PV's loop.
const OTHER_ATTACHMENT: Keep = Keep::Only(&[
    (
        "metadata",
        Keep::Only(&[
            ("name", Keep::All),
            ("uid", Keep::All),
            ("resourceVersion", Keep::All),
        ]),
    ),
    (
        "spec",
        Keep::Only(&[
            ("attacher", Keep::All),
            ("nodeName", Keep::All),
            ("source", Keep::Only(&[("persistentVolumeName", Keep::All)])),
        ]),
    ),
]);

/// A kind the loops keep compact.
pub trait Compact:
    Resource<DynamicType = ()> + Serialize + DeserializeOwned + Clone + Send + Sync + 'static
{
    /// What is kept of this object, given the driver names the loops act for.
    fn keep(&self, drivers: &DriverNames) -> &'static Keep;
    /// A tag scans select on without decoding (`None`: never scanned for).
    fn tag(&self) -> Option<String> {
        None
    }
}

/// The tag of a claim not bound to a PV yet: the only claims any loop scans for (their
/// class appearing, the snapshot they restore, the source they clone).
pub const UNBOUND: &str = "unbound";

impl Compact for PersistentVolumeClaim {
    fn keep(&self, _: &DriverNames) -> &'static Keep {
        &CLAIM
    }
    fn tag(&self) -> Option<String> {
        let bound = self
            .spec
            .as_ref()
            .and_then(|s| s.volume_name.as_deref())
            .is_some_and(|v| !v.is_empty());
        (!bound).then(|| UNBOUND.to_owned())
    }
}

impl Compact for PersistentVolume {
    fn keep(&self, drivers: &DriverNames) -> &'static Keep {
        if crate::rules::is_ours(self, drivers) {
            &VOLUME
        } else {
            &OTHER_VOLUME
        }
    }
    /// The `namespace/name` of the claim the PV's claimRef names.
    fn tag(&self) -> Option<String> {
        crate::informer::claim_key_of(self)
    }
}

impl Compact for VolumeAttachment {
    fn keep(&self, drivers: &DriverNames) -> &'static Keep {
        if drivers.contains(&self.spec.attacher) {
            &ATTACHMENT
        } else {
            &OTHER_ATTACHMENT
        }
    }
    /// The name of the PV attached (a PV's deletion waits for its attachments).
    fn tag(&self) -> Option<String> {
        self.spec.source.persistent_volume_name.clone()
    }
}

/// Drop from `value` what `keep` does not keep.
pub fn prune(value: &mut Value, keep: &Keep) {
    let Value::Object(map) = value else { return };
    match keep {
        Keep::All => {}
        Keep::AllBut(dropped) => map.retain(|k, _| !dropped.contains(&k.as_str())),
        Keep::Only(fields) => {
            let mut kept = Map::new();
            for (name, rule) in *fields {
                if let Some(mut v) = map.remove(*name) {
                    prune(&mut v, rule);
                    kept.insert((*name).to_owned(), v);
                }
            }
            *map = kept;
        }
    }
}

struct Entry {
    /// The compact JSON of the object.
    json: Box<[u8]>,
    version: Box<str>,
    /// The [`Compact::tag`]'s fingerprint (callers re-check what they select).
    tag: Option<u64>,
    /// The list (see [`Inner::epoch`]) that last saw the object.
    epoch: u32,
}

#[derive(Default)]
struct Inner {
    objects: HashMap<Box<str>, Entry>,
    /// Incremented by each (re)list; what a list did not see is gone when it ends.
    epoch: u32,
}

/// A compact cache of one kind, keyed like the work queues (`namespace/name` or
/// `name`). Cheap to clone (shared).
pub struct Cache<K> {
    inner: Arc<RwLock<Inner>>,
    drivers: Arc<DriverNames>,
    ready: watch::Receiver<bool>,
    kind: PhantomData<fn() -> K>,
}

impl<K> Clone for Cache<K> {
    fn clone(&self) -> Self {
        Cache {
            inner: Arc::clone(&self.inner),
            drivers: Arc::clone(&self.drivers),
            ready: self.ready.clone(),
            kind: PhantomData,
        }
    }
}

/// The writing side of a [`Cache`], held by its informer.
pub struct Writer<K> {
    cache: Cache<K>,
    ready: watch::Sender<bool>,
}

impl<K: Compact> Cache<K> {
    /// An empty cache and its writer.
    pub fn new(drivers: DriverNames) -> (Cache<K>, Writer<K>) {
        let (ready_tx, ready_rx) = watch::channel(false);
        let cache = Cache {
            inner: Arc::default(),
            drivers: Arc::new(drivers),
            ready: ready_rx,
            kind: PhantomData,
        };
        let writer = Writer {
            cache: cache.clone(),
            ready: ready_tx,
        };
        (cache, writer)
    }

    /// A cache holding `objects`, as an informer's after its first list.
    pub fn of(objects: &[K], drivers: DriverNames) -> Cache<K> {
        let (cache, writer) = Cache::new(drivers);
        writer.list_started();
        for object in objects {
            writer.apply(object);
        }
        writer.list_done();
        cache
    }

    /// The object behind a queue key.
    pub fn get(&self, key: &str) -> Option<Arc<K>> {
        let inner = self.read();
        inner.objects.get(key).and_then(|e| decode(key, e))
    }

    /// The resourceVersion of the object behind a key (no decoding).
    pub fn version(&self, key: &str) -> Option<String> {
        let inner = self.read();
        inner.objects.get(key).map(|e| e.version.to_string())
    }

    /// Every object with this tag (see [`Compact::tag`]; tags are kept as 64-bit
    /// fingerprints, so a caller that must not meet another tag's object checks it).
    pub fn tagged(&self, tag: &str) -> Vec<Arc<K>> {
        let tag = fingerprint(tag);
        let inner = self.read();
        inner
            .objects
            .iter()
            .filter(|(_, e)| e.tag == Some(tag))
            .filter_map(|(key, e)| decode(key, e))
            .collect()
    }

    /// The first object with this tag for which `matches` holds.
    pub fn find_tagged(&self, tag: &str, matches: impl Fn(&K) -> bool) -> Option<Arc<K>> {
        self.tagged(tag).into_iter().find(|o| matches(o))
    }

    /// How many objects the cache holds.
    pub fn len(&self) -> usize {
        self.read().objects.len()
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bytes the cached objects' compact JSON takes (for `stowage bench scale`'s
    /// account of where memory goes, and tests).
    pub fn compact_bytes(&self) -> usize {
        self.read().objects.values().map(|e| e.json.len()).sum()
    }

    /// Wait for the informer's first list to be complete.
    pub async fn wait_until_ready(&self) -> Result<(), CacheClosed> {
        let mut ready = self.ready.clone();
        ready
            .wait_for(|r| *r)
            .await
            .map(|_| ())
            .map_err(|_| CacheClosed)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }
}

/// The informer feeding a cache stopped before its first list was complete.
#[derive(Debug, thiserror::Error)]
#[error("the informer stopped before its first list")]
pub struct CacheClosed;

/// The object of an entry. It was encoded from its own type, so this fails only if a
/// `Keep` rule dropped a field the type cannot do without: then the object is missing
/// to the loops (and says so) rather than a panic in a worker.
fn decode<K: DeserializeOwned>(key: &str, entry: &Entry) -> Option<Arc<K>> {
    match serde_json::from_slice(&entry.json) {
        Ok(object) => Some(Arc::new(object)),
        Err(e) => {
            tracing::error!(%key, error = %e, "a cached object does not decode; a Keep rule drops a field its type needs");
            None
        }
    }
}

impl<K: Compact> Writer<K> {
    /// A (re)list begins.
    pub fn list_started(&self) {
        let mut inner = self.write();
        inner.epoch = inner.epoch.wrapping_add(1);
    }

    /// Keep the object's compact form.
    pub fn apply(&self, object: &K) {
        let Some(key) = key_of(object) else { return };
        let mut value = match serde_json::to_value(object) {
            Ok(value) => value,
            Err(e) => {
                tracing::warn!(%key, error = %e, "object not cached: it does not serialize");
                return;
            }
        };
        prune(&mut value, object.keep(&self.cache.drivers));
        let json = serde_json::to_vec(&value)
            .expect("a JSON value serializes")
            .into_boxed_slice();
        let entry = Entry {
            json,
            version: object
                .meta()
                .resource_version
                .clone()
                .unwrap_or_default()
                .into_boxed_str(),
            tag: object.tag().as_deref().map(fingerprint),
            epoch: 0,
        };
        let mut inner = self.write();
        let epoch = inner.epoch;
        inner
            .objects
            .insert(key.into_boxed_str(), Entry { epoch, ..entry });
    }

    /// The object is gone.
    pub fn delete(&self, object: &K) {
        if let Some(key) = key_of(object) {
            self.write().objects.remove(key.as_str());
        }
    }

    /// The (re)list is complete: what it did not see is gone; the cache is ready.
    pub fn list_done(&self) {
        {
            let mut inner = self.write();
            let epoch = inner.epoch;
            inner.objects.retain(|_, e| e.epoch == epoch);
            inner.objects.shrink_to_fit();
        }
        let _ = self.ready.send(true);
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.cache.inner.write().unwrap_or_else(|e| e.into_inner())
    }
}

/// Hand the heap's free pages back to the kernel. The first lists parse every object
/// whole before it is compacted; glibc's allocator keeps the freed pages of those
/// (in the middle of its arenas) unless asked. Called once the caches are synced.
pub fn return_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own arenas and releases free
    // pages; it touches no memory the program holds.
    unsafe {
        libc::malloc_trim(0);
    }
}

use crate::informer::fingerprint;

fn key_of<K: Resource>(object: &K) -> Option<String> {
    object.meta().name.as_ref()?;
    Some(crate::informer::key(object))
}

#[cfg(test)]
mod tests;
