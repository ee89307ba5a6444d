//! Events for `kubectl describe` (events.k8s.io/v1), published in the background so
//! they never sit on a claim's critical path. A Warning repeated for the same object,
//! reason and message (a retry failing the same way) is aggregated into one Event whose
//! `series.count` grows, instead of a new object per retry; Normal events are one-shot
//! and remembered nowhere, so memory does not grow with the number of volumes.
//!
//! Owns only Event objects.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::{Event, EventSeries};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::Api;
use kube::api::{ObjectMeta, Patch, PatchParams, PostParams};
use serde_json::json;
use tokio::sync::Semaphore;

/// How long a repeated Warning keeps counting into the same Event.
const SERIES_TTL: Duration = Duration::from_secs(10 * 60);
/// Most Warning series remembered at once (oldest dropped first).
const MAX_SERIES: usize = 4096;
/// The API limits notes to 1 kB.
const MAX_NOTE: usize = 1000;

struct Series {
    namespace: String,
    name: String,
    count: i32,
    last: Instant,
}

#[derive(Clone)]
pub struct Events {
    client: kube::Client,
    controller: String,
    instance: String,
    in_flight: Arc<Semaphore>,
    series: Arc<Mutex<HashMap<u64, Series>>>,
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
    pub fn new(client: kube::Client, driver_name: &str) -> Events {
        let instance = std::env::var("POD_NAME")
            .ok()
            .or_else(|| {
                nix::unistd::gethostname()
                    .ok()
                    .map(|h| h.to_string_lossy().into_owned())
            })
            .unwrap_or_else(|| driver_name.to_owned());
        Events {
            client,
            controller: driver_name.to_owned(),
            instance,
            in_flight: Arc::new(Semaphore::new(64)),
            series: Arc::default(),
        }
    }

    pub fn normal(&self, regarding: ObjectReference, reason: &str, note: String) {
        self.emit(regarding, "Normal", reason, note);
    }

    pub fn warning(&self, regarding: ObjectReference, reason: &str, note: String) {
        self.emit(regarding, "Warning", reason, note);
    }

    fn emit(&self, regarding: ObjectReference, type_: &'static str, reason: &str, note: String) {
        let this = self.clone();
        let reason = reason.to_owned();
        let note = truncate(note);
        tokio::spawn(async move {
            let Ok(_slot) = this.in_flight.acquire().await else {
                return;
            };
            if let Err(e) = this.publish(&regarding, type_, &reason, &note).await {
                tracing::debug!(error = %e, %reason, "publishing an event failed");
            }
        });
    }

    async fn publish(
        &self,
        regarding: &ObjectReference,
        type_: &str,
        reason: &str,
        note: &str,
    ) -> Result<(), kube::Error> {
        let namespace = regarding
            .namespace
            .clone()
            .unwrap_or_else(|| "default".to_owned());
        let api: Api<Event> = Api::namespaced(self.client.clone(), &namespace);
        let key = (type_ == "Warning").then(|| {
            let mut hasher = std::collections::hash_map::DefaultHasher::new();
            (
                &regarding.uid,
                &regarding.name,
                &regarding.namespace,
                reason,
                note,
            )
                .hash(&mut hasher);
            hasher.finish()
        });
        if let Some(key) = key {
            let repeat = {
                let mut series = self.series.lock().unwrap_or_else(|e| e.into_inner());
                series.retain(|_, s| s.last.elapsed() < SERIES_TTL);
                series.get_mut(&key).map(|s| {
                    s.count += 1;
                    s.last = Instant::now();
                    (s.namespace.clone(), s.name.clone(), s.count)
                })
            };
            if let Some((namespace, name, count)) = repeat {
                let patch = json!({ "series": EventSeries { count, last_observed_time: now() } });
                return Api::<Event>::namespaced(self.client.clone(), &namespace)
                    .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                    .map(drop);
            }
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
        if let Some(key) = key {
            let mut series = self.series.lock().unwrap_or_else(|e| e.into_inner());
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
        }
        Ok(())
    }
}
