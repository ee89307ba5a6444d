//! The fake Kubernetes API server itself, driven by a real `kube::Client` and
//! kube-runtime watchers: every behaviour the provisioner tests rely on is shown here.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::fake_kube::{FakeKube, HISTORY, http_client};
use futures::{Stream, StreamExt};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, PersistentVolume, PersistentVolumeClaim, Secret};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::{
    Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, Preconditions, ResourceExt,
    WatchEvent, WatchParams,
};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use serde_json::json;

type Pvc = PersistentVolumeClaim;

fn pvc(name: &str, labels: &[(&str, &str)]) -> Pvc {
    let labels: serde_json::Map<_, _> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), json!(v)))
        .collect();
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": labels},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
    }))
    .unwrap()
}

fn status(r: Result<impl std::fmt::Debug, kube::Error>) -> Box<kube::core::Status> {
    match r {
        Err(kube::Error::Api(s)) => s,
        other => panic!("expected an API error, got {other:?}"),
    }
}

fn names<K: ResourceExt>(items: impl IntoIterator<Item = K>) -> Vec<String> {
    items.into_iter().map(|o| o.name_any()).collect()
}

fn rv<K: ResourceExt>(o: &K) -> u64 {
    o.resource_version().unwrap().parse().unwrap()
}

fn labels(s: &str) -> ListParams {
    ListParams::default().labels(s)
}

/// The next non-bookmark watch event, within 10 s.
async fn next_event<K>(
    s: &mut (impl Stream<Item = kube::Result<WatchEvent<K>>> + Unpin),
) -> WatchEvent<K> {
    loop {
        let ev = tokio::time::timeout(Duration::from_secs(10), s.next())
            .await
            .expect("no watch event within 10 s")
            .expect("watch stream ended")
            .unwrap();
        if !matches!(ev, WatchEvent::Bookmark(_)) {
            return ev;
        }
    }
}

fn event_summary<K: ResourceExt>(ev: &WatchEvent<K>) -> String {
    match ev {
        WatchEvent::Added(o) => format!("ADDED {}", o.name_any()),
        WatchEvent::Modified(o) => format!("MODIFIED {}", o.name_any()),
        WatchEvent::Deleted(o) => format!("DELETED {}", o.name_any()),
        WatchEvent::Bookmark(_) => "BOOKMARK".into(),
        WatchEvent::Error(e) => format!("ERROR {} {}", e.code, e.reason),
    }
}

async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while !check() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn create_get_and_list_with_selectors() {
    let fk = FakeKube::start().await;
    let c = fk.client();
    let (a, b, all) = (
        Api::<Pvc>::namespaced(c.clone(), "a"),
        Api::<Pvc>::namespaced(c.clone(), "b"),
        Api::<Pvc>::all(c),
    );
    let pp = PostParams::default();
    a.create(&pp, &pvc("one", &[("app", "x"), ("tier", "db")]))
        .await
        .unwrap();
    a.create(&pp, &pvc("two", &[("app", "y")])).await.unwrap();
    let three = b.create(&pp, &pvc("three", &[("app", "x")])).await.unwrap();

    let one = a.get("one").await.unwrap();
    assert_eq!(one.namespace().as_deref(), Some("a"));
    assert_eq!(one.uid().unwrap().len(), 36);
    assert!(one.creation_timestamp().is_some());
    assert!(rv(&one) < rv(&three));
    assert_eq!(one.status.unwrap().phase.as_deref(), Some("Pending"));

    assert_eq!(names(a.list(&labels("app=x")).await.unwrap()), ["one"]);
    assert_eq!(
        names(all.list(&labels("app==x")).await.unwrap()),
        ["one", "three"]
    );
    assert_eq!(names(all.list(&labels("app!=x")).await.unwrap()), ["two"]);
    assert_eq!(
        names(all.list(&labels("app in (x, y),tier")).await.unwrap()),
        ["one"]
    );
    assert_eq!(
        names(all.list(&labels("app notin (x)")).await.unwrap()),
        ["two"]
    );
    assert_eq!(
        names(all.list(&labels("!tier")).await.unwrap()),
        ["two", "three"]
    );
    let by_name = ListParams::default().fields("metadata.name=three");
    assert_eq!(names(all.list(&by_name).await.unwrap()), ["three"]);
    let by_ns = ListParams::default().fields("metadata.namespace!=a");
    assert_eq!(names(all.list(&by_ns).await.unwrap()), ["three"]);
    let bad = status(
        all.list(&ListParams::default().fields("spec.volumeName=x"))
            .await,
    );
    assert_eq!((bad.code, bad.reason.as_str()), (400, "BadRequest"));

    let list = all.list(&ListParams::default()).await.unwrap();
    assert_eq!(
        list.metadata.resource_version,
        three.metadata.resource_version
    );
    assert_eq!(list.items.len(), 3);

    let missing = status(a.get("nope").await);
    assert_eq!((missing.code, missing.reason.as_str()), (404, "NotFound"));
    assert_eq!(
        missing.message,
        r#"persistentvolumeclaims "nope" not found"#
    );
    assert_eq!(missing.details.unwrap().name, "nope");
    assert!(a.get_opt("nope").await.unwrap().is_none());
}

#[tokio::test]
async fn create_conflict_generate_name_and_validation() {
    let fk = FakeKube::start().await;
    let api = Api::<Pvc>::namespaced(fk.client(), "a");
    let pp = PostParams::default();
    api.create(&pp, &pvc("x", &[])).await.unwrap();
    let dup = status(api.create(&pp, &pvc("x", &[])).await);
    assert_eq!((dup.code, dup.reason.as_str()), (409, "AlreadyExists"));
    assert_eq!(dup.message, r#"persistentvolumeclaims "x" already exists"#);

    let mut generated = pvc("", &[]);
    generated.metadata.name = None;
    generated.metadata.generate_name = Some("gen-".into());
    let made = api.create(&pp, &generated).await.unwrap();
    assert!(
        made.name_any().starts_with("gen-") && made.name_any().len() == 9,
        "{}",
        made.name_any()
    );

    generated.metadata.generate_name = None;
    let noname = status(api.create(&pp, &generated).await);
    assert_eq!((noname.code, noname.reason.as_str()), (422, "Invalid"));

    let mut other_ns = pvc("y", &[]);
    other_ns.metadata.namespace = Some("b".into());
    let bad = status(api.create(&pp, &other_ns).await);
    assert_eq!((bad.code, bad.reason.as_str()), (400, "BadRequest"));

    let mut with_rv = pvc("z", &[]);
    with_rv.metadata.resource_version = Some("1".into());
    assert_eq!(status(api.create(&pp, &with_rv).await).code, 500);
    assert_eq!(fk.objects("persistentvolumeclaims").len(), 2);
}

#[tokio::test]
async fn update_with_stale_resource_version_conflicts() {
    let fk = FakeKube::start().await;
    let api = Api::<Pvc>::namespaced(fk.client(), "a");
    let pp = PostParams::default();
    let created = api.create(&pp, &pvc("x", &[])).await.unwrap();

    let mut v1 = created.clone();
    v1.labels_mut().insert("k".into(), "1".into());
    let updated = api.replace("x", &pp, &v1).await.unwrap();
    assert!(rv(&updated) > rv(&created));
    assert_eq!(updated.uid(), created.uid());
    assert_eq!(updated.creation_timestamp(), created.creation_timestamp());

    let mut stale = created.clone();
    stale.labels_mut().insert("k".into(), "2".into());
    let c = status(api.replace("x", &pp, &stale).await);
    assert_eq!((c.code, c.reason.as_str()), (409, "Conflict"));
    assert_eq!(
        c.message,
        r#"Operation cannot be fulfilled on persistentvolumeclaims "x": the object has been modified; please apply your changes to the latest version and try again"#
    );
    assert_eq!(api.get("x").await.unwrap().labels()["k"], "1");

    // no resourceVersion: unconditional
    stale.metadata.resource_version = None;
    let forced = api.replace("x", &pp, &stale).await.unwrap();
    assert_eq!(forced.labels()["k"], "2");

    // a no-op update writes nothing
    let same = api.replace("x", &pp, &forced).await.unwrap();
    assert_eq!(same.resource_version(), forced.resource_version());

    let mut other_uid = forced.clone();
    other_uid.metadata.uid = Some("not-the-uid".into());
    let imm = status(api.replace("x", &pp, &other_uid).await);
    assert_eq!((imm.code, imm.reason.as_str()), (422, "Invalid"));

    let missing = status(api.replace("nope", &pp, &pvc("nope", &[])).await);
    assert_eq!(missing.code, 404);
}

#[tokio::test]
async fn merge_json_and_strategic_patches() {
    let fk = FakeKube::start().await;
    let api = Api::<Pvc>::namespaced(fk.client(), "a");
    let created = api
        .create(&PostParams::default(), &pvc("x", &[("keep", "1")]))
        .await
        .unwrap();
    let pp = PatchParams::default();

    let merged = api
        .patch(
            "x",
            &pp,
            &Patch::Merge(json!({"metadata": {"labels": {"a": "1", "keep": null}}})),
        )
        .await
        .unwrap();
    assert_eq!(merged.labels().keys().collect::<Vec<_>>(), ["a"]);
    assert!(rv(&merged) > rv(&created));

    let ops: json_patch::Patch = serde_json::from_value(json!([
        {"op": "test", "path": "/metadata/labels/a", "value": "1"},
        {"op": "add", "path": "/metadata/annotations", "value": {"n": "v"}},
        {"op": "add", "path": "/spec/volumeName", "value": "pv-1"},
    ]))
    .unwrap();
    let jp = api.patch("x", &pp, &Patch::Json::<()>(ops)).await.unwrap();
    assert_eq!(jp.annotations()["n"], "v");
    assert_eq!(
        jp.spec.as_ref().unwrap().volume_name.as_deref(),
        Some("pv-1")
    );

    let failing: json_patch::Patch = serde_json::from_value(json!([
        {"op": "test", "path": "/metadata/labels/a", "value": "2"},
        {"op": "remove", "path": "/metadata/labels/a"},
    ]))
    .unwrap();
    let t = status(api.patch("x", &pp, &Patch::Json::<()>(failing)).await);
    assert_eq!((t.code, t.reason.as_str()), (422, "Invalid"));
    assert_eq!(api.get("x").await.unwrap().labels()["a"], "1");

    // metadata.resourceVersion in a patch is a precondition
    let stale =
        json!({"metadata": {"resourceVersion": created.resource_version(), "labels": {"b": "2"}}});
    let c = status(api.patch("x", &pp, &Patch::Merge(&stale)).await);
    assert_eq!((c.code, c.reason.as_str()), (409, "Conflict"));
    let fresh =
        json!({"metadata": {"resourceVersion": jp.resource_version(), "labels": {"b": "2"}}});
    api.patch("x", &pp, &Patch::Merge(&fresh)).await.unwrap();

    // strategic merge: approximated as a merge patch
    let sp = api
        .patch(
            "x",
            &pp,
            &Patch::Strategic(json!({"metadata": {"labels": {"c": "3"}}})),
        )
        .await
        .unwrap();
    assert_eq!(sp.labels().keys().collect::<Vec<_>>(), ["a", "b", "c"]);

    let apply = status(
        api.patch("x", &PatchParams::apply("t"), &Patch::Apply(json!({})))
            .await,
    );
    assert_eq!(apply.code, 415);
    let missing = status(api.patch("nope", &pp, &Patch::Merge(json!({}))).await);
    assert_eq!(missing.code, 404);
}

#[tokio::test]
async fn status_subresource_is_isolated() {
    let fk = FakeKube::start().await;
    let api = Api::<Pvc>::namespaced(fk.client(), "a");
    let pp = PostParams::default();
    let mut body = pvc("x", &[]);
    body.status = Some(serde_json::from_value(json!({"phase": "Bound"})).unwrap());
    let created = api.create(&pp, &body).await.unwrap();
    assert_eq!(
        created.status.as_ref().unwrap().phase.as_deref(),
        Some("Pending")
    );

    // PUT on the main resource changes spec, not status
    let mut main = created.clone();
    main.spec.as_mut().unwrap().volume_name = Some("pv-1".into());
    main.status.as_mut().unwrap().phase = Some("Lost".into());
    let after = api.replace("x", &pp, &main).await.unwrap();
    assert_eq!(
        after.spec.as_ref().unwrap().volume_name.as_deref(),
        Some("pv-1")
    );
    assert_eq!(
        after.status.as_ref().unwrap().phase.as_deref(),
        Some("Pending")
    );

    // PATCH on /status changes status only
    let patch = json!({"spec": {"volumeName": "other"}, "metadata": {"labels": {"z": "1"}},
                       "status": {"phase": "Bound"}});
    let st = api
        .patch_status("x", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    assert_eq!(st.status.as_ref().unwrap().phase.as_deref(), Some("Bound"));
    assert_eq!(
        st.spec.as_ref().unwrap().volume_name.as_deref(),
        Some("pv-1")
    );
    assert!(st.labels().is_empty());

    // PUT on /status likewise, with optimistic concurrency
    let mut put = st.clone();
    put.status.as_mut().unwrap().phase = Some("Lost".into());
    put.spec.as_mut().unwrap().volume_name = Some("other".into());
    let st2 = api.replace_status("x", &pp, &put).await.unwrap();
    assert_eq!(st2.status.as_ref().unwrap().phase.as_deref(), Some("Lost"));
    assert_eq!(
        st2.spec.as_ref().unwrap().volume_name.as_deref(),
        Some("pv-1")
    );
    assert_eq!(status(api.replace_status("x", &pp, &put).await).code, 409);

    // no status subresource on secrets
    let secrets = Api::<Secret>::namespaced(fk.client(), "a");
    secrets
        .create(
            &pp,
            &serde_json::from_value(json!({"metadata": {"name": "s"}})).unwrap(),
        )
        .await
        .unwrap();
    let none = status(
        secrets
            .patch_status("s", &PatchParams::default(), &Patch::Merge(json!({})))
            .await,
    );
    assert_eq!(none.code, 404);
}

#[tokio::test]
async fn finalizers_hold_deletion_until_removed() {
    let fk = FakeKube::start().await;
    let api = Api::<Pvc>::namespaced(fk.client(), "a");
    let mut body = pvc("x", &[]);
    body.metadata.finalizers = Some(vec!["stowage.io/protect".into()]);
    api.create(&PostParams::default(), &body).await.unwrap();

    let deleting = api
        .delete("x", &DeleteParams::default())
        .await
        .unwrap()
        .left()
        .expect("object, not Status");
    assert!(deleting.metadata.deletion_timestamp.is_some());
    assert_eq!(deleting.metadata.deletion_grace_period_seconds, Some(0));
    let still = api.get("x").await.unwrap();
    assert_eq!(still.resource_version(), deleting.resource_version());
    // a second delete changes nothing
    let again = api
        .delete("x", &DeleteParams::default())
        .await
        .unwrap()
        .left()
        .unwrap();
    assert_eq!(again.resource_version(), deleting.resource_version());

    let pp = PatchParams::default();
    let more = json!({"metadata": {"finalizers": ["stowage.io/protect", "other"]}});
    let refused = status(api.patch("x", &pp, &Patch::Merge(&more)).await);
    assert_eq!((refused.code, refused.reason.as_str()), (422, "Invalid"));
    // the deletionTimestamp cannot be taken back
    let undelete = json!({"metadata": {"deletionTimestamp": null}});
    let kept = api.patch("x", &pp, &Patch::Merge(&undelete)).await.unwrap();
    assert!(kept.metadata.deletion_timestamp.is_some());

    let wp = WatchParams::default();
    let mut events = api
        .watch(&wp, deleting.resource_version().as_deref().unwrap())
        .await
        .unwrap()
        .boxed();
    api.patch(
        "x",
        &pp,
        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
    )
    .await
    .unwrap();
    assert_eq!(status(api.get("x").await).code, 404);
    match next_event(&mut events).await {
        WatchEvent::Deleted(o) => {
            assert_eq!(o.name_any(), "x");
            assert!(rv(&o) > rv(&deleting));
        }
        other => panic!("expected DELETED, got {}", event_summary(&other)),
    }

    // DeleteOptions preconditions
    let y = api
        .create(&PostParams::default(), &pvc("y", &[]))
        .await
        .unwrap();
    let wrong = DeleteParams {
        preconditions: Some(Preconditions {
            uid: Some("wrong".into()),
            resource_version: None,
        }),
        ..DeleteParams::default()
    };
    let c = status(api.delete("y", &wrong).await);
    assert_eq!((c.code, c.reason.as_str()), (409, "Conflict"));
    let right = DeleteParams {
        preconditions: Some(Preconditions {
            uid: y.uid(),
            resource_version: y.resource_version(),
        }),
        ..DeleteParams::default()
    };
    let done = api
        .delete("y", &right)
        .await
        .unwrap()
        .right()
        .expect("Status");
    assert_eq!(
        done.status,
        Some(kube::core::response::StatusSummary::Success)
    );
    assert!(fk.objects("persistentvolumeclaims").is_empty());
    match next_event(&mut events).await {
        WatchEvent::Added(o) => assert_eq!(o.name_any(), "y"),
        other => panic!("expected ADDED y, got {}", event_summary(&other)),
    }
    assert!(matches!(
        next_event(&mut events).await,
        WatchEvent::Deleted(_)
    ));
}

#[tokio::test]
async fn watch_replays_from_an_old_resource_version_and_follows_selectors() {
    let fk = FakeKube::start().await;
    let c = fk.client();
    let (a, b) = (
        Api::<Pvc>::namespaced(c.clone(), "a"),
        Api::<Pvc>::namespaced(c, "b"),
    );
    let pp = PostParams::default();
    let first = a.create(&pp, &pvc("first", &[])).await.unwrap();
    let since = first.resource_version().unwrap();
    a.create(&pp, &pvc("second", &[])).await.unwrap();
    b.create(&pp, &pvc("elsewhere", &[])).await.unwrap();
    let sel = Patch::Merge(json!({"metadata": {"labels": {"sel": "yes"}}}));
    a.patch("second", &PatchParams::default(), &sel)
        .await
        .unwrap();
    a.delete("first", &DeleteParams::default()).await.unwrap();

    let mut s = a
        .watch(&WatchParams::default(), &since)
        .await
        .unwrap()
        .boxed();
    let mut seen = Vec::new();
    for _ in 0..3 {
        seen.push(event_summary(&next_event(&mut s).await));
    }
    assert_eq!(seen, ["ADDED second", "MODIFIED second", "DELETED first"]);

    // with a label selector, entering/leaving the selection is ADDED/DELETED
    let mut s = a
        .watch(&WatchParams::default().labels("sel=yes"), &since)
        .await
        .unwrap()
        .boxed();
    assert_eq!(event_summary(&next_event(&mut s).await), "ADDED second");
    let unsel = Patch::Merge(json!({"metadata": {"labels": {"sel": null}}}));
    a.patch("second", &PatchParams::default(), &unsel)
        .await
        .unwrap();
    assert_eq!(event_summary(&next_event(&mut s).await), "DELETED second");

    // "0": the current objects first
    let all = Api::<Pvc>::all(fk.client());
    let mut s = all
        .watch(&WatchParams::default(), "0")
        .await
        .unwrap()
        .boxed();
    let mut seen = BTreeSet::new();
    for _ in 0..2 {
        seen.insert(event_summary(&next_event(&mut s).await));
    }
    assert_eq!(
        seen,
        BTreeSet::from(["ADDED elsewhere".to_string(), "ADDED second".to_string()])
    );

    // timeoutSeconds ends the stream
    let mut s = a
        .watch(&WatchParams::default().timeout(1), "0")
        .await
        .unwrap()
        .boxed();
    assert!(matches!(next_event(&mut s).await, WatchEvent::Added(_)));
    let end = tokio::time::timeout(Duration::from_secs(5), async {
        while s.next().await.is_some() {}
    });
    end.await.expect("watch did not end after timeoutSeconds");
}

/// 1,000 claims and 10 patches each through the fake (prints the rate), which also pushes
/// the first event out of the watch history: watching from there is 410 Gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_claims_and_expired_resource_version() {
    let fk = FakeKube::start().await;
    let api = Api::<Pvc>::namespaced(fk.client(), "a");
    let first = api
        .create(&PostParams::default(), &pvc("first", &[]))
        .await
        .unwrap();
    let started = Instant::now();
    futures::stream::iter(0..1000)
        .map(|i| {
            let api = api.clone();
            async move {
                let name = format!("claim-{i}");
                api.create(&PostParams::default(), &pvc(&name, &[]))
                    .await
                    .unwrap();
                for n in 0..10 {
                    let p =
                        Patch::Merge(json!({"metadata": {"annotations": {"n": n.to_string()}}}));
                    api.patch(&name, &PatchParams::default(), &p).await.unwrap();
                }
            }
        })
        .buffer_unordered(32)
        .collect::<Vec<()>>()
        .await;
    let writes = fk.total_writes();
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{writes} writes in {secs:.2} s: {:.0} writes/s",
        writes as f64 / secs
    );
    assert_eq!(fk.objects("persistentvolumeclaims").len(), 1001);
    assert!(writes as usize > HISTORY);

    let mut s = api
        .watch(
            &WatchParams::default(),
            first.resource_version().as_deref().unwrap(),
        )
        .await
        .unwrap()
        .boxed();
    match next_event(&mut s).await {
        WatchEvent::Error(e) => assert_eq!((e.code, e.reason.as_str()), (410, "Expired")),
        other => panic!("expected 410, got {}", event_summary(&other)),
    }
    // a recent resourceVersion still works
    let recent = api
        .list(&ListParams::default())
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();
    let mut s = api
        .watch(&WatchParams::default(), &recent)
        .await
        .unwrap()
        .boxed();
    api.delete("first", &DeleteParams::default()).await.unwrap();
    assert_eq!(event_summary(&next_event(&mut s).await), "DELETED first");
}

#[tokio::test]
async fn reflectors_converge_after_break_watches() {
    let fk = FakeKube::start().await;
    fk.stream_lists();
    let api = Api::<Pvc>::all(fk.client());
    let ns = Api::<Pvc>::namespaced(fk.client(), "a");
    let pp = PostParams::default();
    for i in 0..5 {
        ns.create(&pp, &pvc(&format!("c{i}"), &[])).await.unwrap();
    }
    let mut readers = Vec::new();
    for config in [
        watcher::Config::default(),
        watcher::Config::default().streaming_lists(),
    ] {
        let (reader, writer) = reflector::store::<Pvc>();
        let stream = reflector(writer, watcher(api.clone(), config).default_backoff());
        tokio::spawn(stream.for_each(|_| futures::future::ready(())));
        readers.push(reader);
    }
    let state = |r: &reflector::Store<Pvc>| -> BTreeSet<String> {
        r.state().iter().map(|o| o.name_any()).collect()
    };
    let want: BTreeSet<String> = (0..5).map(|i| format!("c{i}")).collect();
    for r in &readers {
        eventually("initial sync", || state(r) == want).await;
    }

    // break, change things while the watches are down, converge; twice. A break only
    // ends watches already open: wait for both readers' (a reader synced by its list
    // may not have started its watch yet).
    eventually("both watches open", || fk.open_watches() >= 2).await;
    fk.break_watches();
    for i in 5..8 {
        ns.create(&pp, &pvc(&format!("c{i}"), &[])).await.unwrap();
    }
    ns.delete("c0", &DeleteParams::default()).await.unwrap();
    let want: BTreeSet<String> = (1..8).map(|i| format!("c{i}")).collect();
    for r in &readers {
        eventually("re-sync after break_watches", || state(r) == want).await;
    }
    eventually("both watches open again", || fk.open_watches() >= 2).await;
    fk.break_watches();
    ns.delete("c1", &DeleteParams::default()).await.unwrap();
    let relabel = Patch::Merge(json!({"metadata": {"labels": {"v": "2"}}}));
    ns.patch("c2", &PatchParams::default(), &relabel)
        .await
        .unwrap();
    let want: BTreeSet<String> = (2..8).map(|i| format!("c{i}")).collect();
    let c2 = reflector::ObjectRef::new("c2").within("a");
    for r in &readers {
        eventually("second re-sync", || {
            state(r) == want && r.get(&c2).is_some_and(|o| o.labels().contains_key("v"))
        })
        .await;
    }
    let calls = fk.calls();
    let watches = calls[&("watch".to_string(), "persistentvolumeclaims".to_string())];
    assert!(watches >= 6, "each reflector re-watched twice: {watches}");
    assert_eq!(
        calls[&("list".to_string(), "persistentvolumeclaims".to_string())],
        1,
        "no re-list needed"
    );
    tokio::time::timeout(Duration::from_secs(10), fk.shutdown())
        .await
        .expect("shutdown with open watches");
}

#[tokio::test]
async fn fail_next_injects_then_stops() {
    let fk = FakeKube::start().await;
    let api = Api::<Pvc>::namespaced(fk.client(), "a");
    let pp = PostParams::default();
    fk.fail_next("create", "persistentvolumeclaims", 2, 500, "InternalError");
    for _ in 0..2 {
        let e = status(api.create(&pp, &pvc("x", &[])).await);
        assert_eq!((e.code, e.reason.as_str()), (500, "InternalError"));
    }
    assert!(fk.objects("persistentvolumeclaims").is_empty());
    api.create(&pp, &pvc("x", &[])).await.unwrap();

    fk.fail_next("patch", "persistentvolumeclaims/status", 1, 409, "Conflict");
    let patch = Patch::Merge(json!({"status": {"phase": "Bound"}}));
    api.patch("x", &PatchParams::default(), &Patch::Merge(json!({})))
        .await
        .unwrap();
    let e = status(api.patch_status("x", &PatchParams::default(), &patch).await);
    assert_eq!((e.code, e.reason.as_str()), (409, "Conflict"));
    assert_eq!(
        api.get("x").await.unwrap().status.unwrap().phase.as_deref(),
        Some("Pending")
    );
    let ok = api
        .patch_status("x", &PatchParams::default(), &patch)
        .await
        .unwrap();
    assert_eq!(ok.status.unwrap().phase.as_deref(), Some("Bound"));

    fk.fail_next("watch", "persistentvolumeclaims", 1, 500, "InternalError");
    assert_eq!(
        status(api.watch(&WatchParams::default(), "0").await.map(|_| ())).code,
        500
    );
    let _stream = api.watch(&WatchParams::default(), "0").await.unwrap();

    // kube's client retries 503 by itself: the failure shows only in calls()
    fk.fail_next(
        "get",
        "persistentvolumeclaims",
        2,
        503,
        "ServiceUnavailable",
    );
    api.get("x").await.unwrap();
    assert_eq!(
        fk.calls()[&("get".to_string(), "persistentvolumeclaims".to_string())],
        4
    );
}

#[tokio::test]
async fn namespaced_and_cluster_scoped_paths() {
    let fk = FakeKube::start().await;
    let c = fk.client();
    let pp = PostParams::default();
    let pvs = Api::<PersistentVolume>::all(c.clone());
    let pv: PersistentVolume = serde_json::from_value(json!({
        "metadata": {"name": "pv-1", "namespace": "ignored"},
        "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"],
                 "csi": {"driver": "stowage.io", "volumeHandle": "h"}},
        "status": {"phase": "Bound"},
    }))
    .unwrap();
    let made = pvs.create(&pp, &pv).await.unwrap();
    assert_eq!(made.metadata.namespace, None);
    assert_eq!(made.status.unwrap().phase.as_deref(), Some("Pending"));
    assert_eq!(pvs.get("pv-1").await.unwrap().name_any(), "pv-1");
    assert_eq!(fk.objects("persistentvolumes")[0]["apiVersion"], "v1");

    let scs = Api::<StorageClass>::all(c.clone());
    let sc: StorageClass =
        serde_json::from_value(json!({"metadata": {"name": "nfs"}, "provisioner": "stowage.io"}))
            .unwrap();
    scs.create(&pp, &sc).await.unwrap();
    let stored = &fk.objects("storageclasses")[0];
    assert_eq!(
        (stored["apiVersion"].as_str(), stored["kind"].as_str()),
        (Some("storage.k8s.io/v1"), Some("StorageClass"))
    );

    Api::<Namespace>::all(c.clone())
        .create(
            &pp,
            &serde_json::from_value(json!({"metadata": {"name": "a"}})).unwrap(),
        )
        .await
        .unwrap();
    let leases = Api::<Lease>::namespaced(c.clone(), "a");
    leases
        .create(
            &pp,
            &serde_json::from_value(json!({"metadata": {"name": "l"}})).unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(fk.objects("leases")[0]["metadata"]["namespace"], "a");
    let ev = json!({"metadata": {"name": "e"}, "eventTime": "2024-01-01T00:00:00.000000Z",
                    "reportingController": "x", "reportingInstance": "y", "action": "A", "reason": "R"});
    let events = Api::<k8s_openapi::api::events::v1::Event>::namespaced(c.clone(), "a");
    events
        .create(&pp, &serde_json::from_value(ev).unwrap())
        .await
        .unwrap();
    assert_eq!(fk.objects("events.events.k8s.io").len(), 1);
    assert!(fk.objects("events").is_empty());

    let get = |path: &str| {
        let c = c.clone();
        let req = axum::http::Request::get(path).body(Vec::new()).unwrap();
        async move { c.request_text(req).await }
    };
    for path in [
        "/api/v1/namespaces/a/persistentvolumes",
        "/api/v1/namespaces/a/persistentvolumes/pv-1",
        "/api/v1/persistentvolumeclaims/x",
        "/api/v1/widgets",
        "/apis/storage.k8s.io/v1/namespaces/a/storageclasses/nfs",
        "/api/v1/namespaces/a/secrets/s/status",
    ] {
        let e = status(get(path).await);
        assert_eq!((e.code, e.reason.as_str()), (404, "NotFound"), "{path}");
    }
    let disco = get("/apis/storage.k8s.io/v1").await.unwrap();
    assert!(
        disco.contains(r#""name":"volumeattachments/status""#),
        "{disco}"
    );
    assert!(c.apiserver_version().await.is_ok());
}

#[tokio::test]
async fn calls_are_counted() {
    let fk = FakeKube::start().await;
    let api = Api::<Pvc>::namespaced(fk.client(), "a");
    let pp = PostParams::default();
    let x = api.create(&pp, &pvc("x", &[])).await.unwrap();
    api.get("x").await.unwrap();
    api.get("x").await.unwrap();
    api.list(&ListParams::default()).await.unwrap();
    api.patch(
        "x",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"a": "1"}}})),
    )
    .await
    .unwrap();
    api.patch_status(
        "x",
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"phase": "Bound"}})),
    )
    .await
    .unwrap();
    assert_eq!(status(api.replace("x", &pp, &x).await).code, 409);
    let _stream = api.watch(&WatchParams::default(), "0").await.unwrap();
    api.delete("x", &DeleteParams::default()).await.unwrap();
    let count = |verb: &str, res: &str| {
        fk.calls()
            .get(&(verb.to_string(), res.to_string()))
            .copied()
    };
    assert_eq!(count("create", "persistentvolumeclaims"), Some(1));
    assert_eq!(count("get", "persistentvolumeclaims"), Some(2));
    assert_eq!(count("list", "persistentvolumeclaims"), Some(1));
    assert_eq!(count("watch", "persistentvolumeclaims"), Some(1));
    assert_eq!(count("patch", "persistentvolumeclaims"), Some(1));
    assert_eq!(count("patch", "persistentvolumeclaims/status"), Some(1));
    assert_eq!(count("update", "persistentvolumeclaims"), Some(1));
    assert_eq!(count("delete", "persistentvolumeclaims"), Some(1));
    assert_eq!(fk.calls().len(), 8);
    assert_eq!(fk.total_writes(), 5);
}

#[tokio::test]
async fn kubeconfig_points_at_the_fake() {
    let fk = FakeKube::start().await;
    assert!(fk.url().starts_with("http://127.0.0.1:"));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kubeconfig");
    fk.write_kubeconfig(&path);
    let kc = kube::config::Kubeconfig::read_from(&path).unwrap();
    let config =
        kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
            .await
            .unwrap();
    assert_eq!(config.default_namespace, "default");
    assert_eq!(
        config.cluster_url.to_string().trim_end_matches('/'),
        fk.url()
    );
    let client = http_client(config);
    let made = Api::<Pvc>::default_namespaced(client)
        .create(&PostParams::default(), &pvc("x", &[]))
        .await
        .unwrap();
    assert_eq!(made.namespace().as_deref(), Some("default"));
    assert_eq!(
        fk.objects("persistentvolumeclaims")[0]["metadata"]["namespace"],
        "default"
    );
    fk.shutdown().await;
}

#[tokio::test]
async fn a_streamed_list_is_refused_until_turned_on() {
    let fk = FakeKube::start().await;
    let api = Api::<Pvc>::all(fk.client());
    let mut events = watcher(api.clone(), watcher::Config::default().streaming_lists()).boxed();
    let message = loop {
        let event = tokio::time::timeout(Duration::from_secs(10), events.next())
            .await
            .expect("an answer within 10 s")
            .expect("an event");
        match event {
            Ok(watcher::Event::Init) => {}
            Ok(other) => panic!("served although streams are off: {other:?}"),
            Err(e) => break e.to_string(),
        }
    };
    assert!(message.contains("RequestWatchProgress"), "{message}");
    fk.stream_lists();
    let mut events = watcher(api, watcher::Config::default().streaming_lists()).boxed();
    loop {
        let event = tokio::time::timeout(Duration::from_secs(10), events.next())
            .await
            .expect("an event within 10 s")
            .expect("the stream goes on")
            .expect("served");
        if matches!(event, watcher::Event::InitDone) {
            break;
        }
    }
}
