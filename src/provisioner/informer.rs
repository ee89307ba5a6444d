//! Shared informers: one list+watch per resource type, a kube-runtime reflector store
//! that every loop reads, and handlers called for each object seen (added, changed,
//! listed again after a re-watch, or deleted) that queue work.
//!
//! Owns only watching and caching; handlers must be cheap (they queue keys).

use std::fmt::Debug;
use std::sync::Arc;

use futures::StreamExt as _;
use kube::runtime::WatchStreamExt as _;
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher::{self, Event};
use kube::{Api, Resource, ResourceExt as _};
use serde::de::DeserializeOwned;
use tokio::task::JoinHandle;

/// Called with each object seen and whether it was deleted.
pub type Handler<K> = Arc<dyn Fn(&K, bool) + Send + Sync>;

/// A running informer: its store and the task that feeds it.
pub struct Informer<K: Resource + 'static>
where
    K::DynamicType: std::hash::Hash + Eq + Clone,
{
    pub store: Store<K>,
    pub task: JoinHandle<()>,
}

/// Start watching `api`, dropping managed fields (they are most of an object's size
/// and no loop reads them), and call every handler for every event.
pub fn start<K>(api: Api<K>, config: watcher::Config, handlers: Vec<Handler<K>>) -> Informer<K>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Default + std::hash::Hash + Eq + Clone + Send + Sync,
{
    let (store, writer) = reflector::store();
    let stream = watcher::watcher(api, config)
        .modify(|object: &mut K| object.managed_fields_mut().clear())
        .default_backoff();
    let task = tokio::spawn(async move {
        let mut events = std::pin::pin!(reflector::reflector(writer, stream));
        while let Some(event) = events.next().await {
            match event {
                Ok(Event::Apply(object) | Event::InitApply(object)) => {
                    for handler in &handlers {
                        handler(&object, false);
                    }
                }
                Ok(Event::Delete(object)) => {
                    for handler in &handlers {
                        handler(&object, true);
                    }
                }
                Ok(Event::Init | Event::InitDone) => {}
                Err(e) => {
                    tracing::warn!(kind = %K::kind(&K::DynamicType::default()), error = %e, "watch failed; retrying")
                }
            }
        }
    });
    Informer { store, task }
}

/// `namespace/name` (or `name` for cluster objects): the work queue key of an object.
pub fn key<K: Resource>(object: &K) -> String {
    match object.meta().namespace.as_deref() {
        Some(namespace) => format!("{namespace}/{}", object.name_any()),
        None => object.name_any(),
    }
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
