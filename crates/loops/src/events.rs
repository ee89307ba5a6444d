//! Events for `kubectl describe` (events.k8s.io/v1), published in the background so
//! they never sit on a claim's critical path: they wait in a bounded queue and go out
//! one at a time, as client-go's broadcaster sends them, so in a burst of claims the
//! API server spends itself on the binds first and the events follow (four at a time
//! took a quarter of the API server's writes during a 1,000-claim burst). A
//! full queue drops the event (counted in `stowage_events_dropped_total`), as client-go
//! does. An event repeated for the same object, type, reason and message (a retry
//! failing the same way, its `Provisioning` before each attempt) is aggregated into one
//! Event whose `series.count` grows, instead of a new object per retry, as client-go's
//! event correlator does; like its LRU cache, at most [`MAX_SERIES`] are remembered
//! (the least recently seen is dropped first), so memory does not grow with the number
//! of volumes.
//!
//! Owns only Event objects.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::{Event, EventSeries};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::Api;
use kube::api::{ObjectMeta, Patch, PatchParams, PostParams};
use prometheus_client::metrics::counter::Counter;
use serde_json::json;
use tokio::sync::mpsc;

/// How long a repeated event keeps counting into the same Event.
const SERIES_TTL: Duration = Duration::from_secs(10 * 60);
/// Most series remembered at once (least recently seen dropped first; client-go's
/// correlator keeps 4096 too).
pub const MAX_SERIES: usize = 4096;
/// The API limits notes to 1 kB.
const MAX_NOTE: usize = 1000;
/// Events waiting to be sent; more are dropped.
const QUEUE: usize = 10_000;

struct Pending {
    regarding: ObjectReference,
    type_: &'static str,
    reason: String,
    note: String,
}

struct Series {
    namespace: String,
    name: String,
    count: i32,
    last: Instant,
}

/// The handle the loops emit through (cheap to clone).
#[derive(Clone)]
pub struct Events {
    queue: mpsc::Sender<Pending>,
    dropped: Counter,
}

/// What sends the queued events.
struct Publisher {
    client: kube::Client,
    controller: String,
    instance: String,
    series: HashMap<u64, Series>,
}

fn now() -> MicroTime {
    MicroTime(k8s_openapi::jiff::Timestamp::now())
}

fn truncate(mut text: String) -> String {
    if text.len() > MAX_NOTE {
        let mut end = MAX_NOTE;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

impl Events {
    /// Start the publisher task (it ends when the last handle is dropped).
    pub fn start(client: kube::Client, driver_name: &str, dropped: Counter) -> Events {
        let instance = std::env::var("POD_NAME")
            .ok()
            .or_else(|| {
                nix::unistd::gethostname()
                    .ok()
                    .map(|h| h.to_string_lossy().into_owned())
            })
            .unwrap_or_else(|| driver_name.to_owned());
        let mut publisher = Publisher {
            client,
            controller: driver_name.to_owned(),
            instance,
            series: HashMap::new(),
        };
        let (queue, mut pending) = mpsc::channel::<Pending>(QUEUE);
        // One at a time (see the module docs).
        tokio::spawn(async move {
            while let Some(event) = pending.recv().await {
                if let Err(e) = publisher.publish(&event).await {
                    tracing::debug!(error = %e, reason = %event.reason, "publishing an event failed");
                }
            }
        });
        Events { queue, dropped }
    }

    pub fn normal(&self, regarding: ObjectReference, reason: &str, note: String) {
        self.emit(regarding, "Normal", reason, note);
    }

    pub fn warning(&self, regarding: ObjectReference, reason: &str, note: String) {
        self.emit(regarding, "Warning", reason, note);
    }

    fn emit(&self, regarding: ObjectReference, type_: &'static str, reason: &str, note: String) {
        let event = Pending {
            regarding,
            type_,
            reason: reason.to_owned(),
            note: truncate(note),
        };
        if let Err(e) = self.queue.try_send(event) {
            self.dropped.inc();
            let event = e.into_inner();
            tracing::debug!(reason = %event.reason, "event queue full; dropping the event");
        }
    }
}

impl Publisher {
    async fn publish(&mut self, event: &Pending) -> Result<(), kube::Error> {
        let (regarding, type_, reason, note) = (
            &event.regarding,
            event.type_,
            event.reason.as_str(),
            event.note.as_str(),
        );
        let namespace = regarding
            .namespace
            .clone()
            .unwrap_or_else(|| "default".to_owned());
        let api: Api<Event> = Api::namespaced(self.client.clone(), &namespace);
        let key = {
            let mut hasher = std::collections::hash_map::DefaultHasher::new();
            (
                &regarding.uid,
                &regarding.name,
                &regarding.namespace,
                type_,
                reason,
                note,
            )
                .hash(&mut hasher);
            hasher.finish()
        };
        self.series.retain(|_, s| s.last.elapsed() < SERIES_TTL);
        if let Some(series) = self.series.get_mut(&key) {
            series.count += 1;
            series.last = Instant::now();
            let patch = json!({
                "series": EventSeries { count: series.count, last_observed_time: now() }
            });
            return Api::<Event>::namespaced(self.client.clone(), &series.namespace)
                .patch(&series.name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .map(drop);
        }
        let time = now();
        let name = format!(
            "{}.{:x}",
            regarding.name.as_deref().unwrap_or("stowage"),
            time.0.as_nanosecond()
        );
        let event = Event {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(namespace.clone()),
                ..ObjectMeta::default()
            },
            action: Some(reason.to_owned()),
            reason: Some(reason.to_owned()),
            note: Some(note.to_owned()),
            type_: Some(type_.to_owned()),
            event_time: Some(time),
            regarding: Some(regarding.clone()),
            reporting_controller: Some(self.controller.clone()),
            reporting_instance: Some(self.instance.clone()),
            ..Event::default()
        };
        api.create(&PostParams::default(), &event).await?;
        let series = &mut self.series;
        if series.len() >= MAX_SERIES
            && let Some(oldest) = series.iter().min_by_key(|(_, s)| s.last).map(|(k, _)| *k)
        {
            series.remove(&oldest);
        }
        series.insert(
            key,
            Series {
                namespace,
                name,
                count: 1,
                last: Instant::now(),
            },
        );
        Ok(())
    }
}
