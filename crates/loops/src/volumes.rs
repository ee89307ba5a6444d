//! The PV reconciler for PVs this driver provisioned, once the PV controller has marked
//! one `Released` (its claim is gone; stowage never writes a PV's phase), per reclaim
//! policy: Delete → DeleteVolume (once no VolumeAttachment uses the PV) → delete the PV
//! → drop the provisioner finalizer; Retain → drop the finalizer only.
//!
//! Reads decisions from [`super::rules`]; touches only PVs [`rules::is_ours`] accepts.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use k8s_openapi::api::core::v1::PersistentVolume;
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::{Api, Resource as _, ResourceExt as _};

use crate::context::{Context, Next, is_api};
use crate::informer::Expect;
use crate::rules;

fn volumes(shared: &Context) -> Api<PersistentVolume> {
    Api::all(shared.client.clone())
}

fn phase(pv: &PersistentVolume) -> Option<&str> {
    pv.status.as_ref().and_then(|s| s.phase.as_deref())
}

/// Reconcile the PV `name`: one step per call (a step that writes returns
/// [`Next::Again`] and the next one starts from the cache that shows the write).
pub async fn reconcile(shared: Arc<Context>, name: String) -> anyhow::Result<Next> {
    let Some(pv) = shared.volumes.get(&name) else {
        return Ok(Next::Done);
    };
    if !rules::is_ours(&pv, &shared.driver) {
        return Ok(Next::Done);
    }
    if rules::needs_finalizer(&pv, &shared.driver)
        && let Some(patch) = rules::finalizer_patch(&pv, true)
    {
        patch_pv(&shared, &name, &patch).await?;
        return Ok(Next::Again);
    }
    if rules::should_delete(&pv, &shared.driver) {
        return delete(&shared, &pv).await;
    }
    if rules::finalizer_only(&pv, &shared.driver)
        && (pv.metadata.deletion_timestamp.is_some() || phase(&pv) == Some("Released"))
        && let Some(patch) = rules::finalizer_patch(&pv, false)
    {
        patch_pv(&shared, &name, &patch).await?;
    }
    Ok(Next::Done)
}

/// The cache must show this state of the PV before it is looked at again.
fn expect(shared: &Context, name: &str, what: Expect) {
    shared.expect.volumes.expect(name, what);
}

fn expect_written(shared: &Context, written: &PersistentVolume) {
    if let Some(version) = &written.metadata.resource_version {
        expect(
            shared,
            &written.name_any(),
            Expect::Version(version.clone()),
        );
    }
}

async fn patch_pv(shared: &Context, name: &str, patch: &serde_json::Value) -> anyhow::Result<()> {
    match volumes(shared)
        .patch(name, &PatchParams::default(), &Patch::Merge(patch))
        .await
    {
        Ok(written) => {
            expect_written(shared, &written);
            Ok(())
        }
        Err(e) if is_api(&e, 404) => Ok(()),
        Err(e) => Err(anyhow::Error::new(e).context(format!("patching PV {name}"))),
    }
}

/// Remove our finalizer from a deleted PV, guarded by its resourceVersion: the other
/// finalizers move meanwhile (kube-controller-manager drops `kubernetes.io/pv-protection`
/// of a deleted PV), and a patch from a stale list would put them back (which the API
/// server refuses on a deleted object). A conflict re-reads the PV and tries again;
/// DeleteVolume is not repeated for it.
async fn drop_finalizer(shared: &Context, mut pv: PersistentVolume) -> anyhow::Result<()> {
    let name = pv.name_any();
    for _ in 0..5 {
        let Some(patch) = rules::finalizer_patch(&pv, false) else {
            return Ok(());
        };
        match volumes(shared)
            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => return Ok(()),
            Err(e) if is_api(&e, 404) => return Ok(()),
            Err(e) if is_api(&e, 409) => {
                match volumes(shared)
                    .get_opt(&name)
                    .await
                    .with_context(|| format!("re-reading PV {name}"))?
                {
                    Some(live) => pv = live,
                    None => return Ok(()),
                }
            }
            Err(e) => {
                return Err(
                    anyhow::Error::new(e).context(format!("removing the finalizer of PV {name}"))
                );
            }
        }
    }
    anyhow::bail!("PV {name} kept changing; its finalizer is removed on the next attempt")
}

async fn delete(shared: &Context, pv: &PersistentVolume) -> anyhow::Result<Next> {
    let started = Instant::now();
    let name = pv.name_any();
    let attached = shared.attachments.find_tagged(&name, |va| {
        va.spec.source.persistent_volume_name.as_deref() == Some(name.as_str())
    });
    if let Some(va) = attached {
        tracing::debug!(pv = %name, attachment = %va.name_any(), "waiting for the VolumeAttachment to go before DeleteVolume");
        return Ok(Next::After(Duration::from_secs(5)));
    }
    let Some(handle) = pv
        .spec
        .as_ref()
        .and_then(|s| s.csi.as_ref())
        .map(|c| c.volume_handle.clone())
    else {
        anyhow::bail!("PV {name} has no csi volumeHandle");
    };
    let secrets = deletion_secrets(shared, pv).await?;
    if let Err(e) = shared.csi.delete_volume(&handle, secrets).await {
        shared.metrics.failed("delete", &format!("{:?}", e.code()));
        shared.events.warning(
            pv.object_ref(&()),
            "VolumeFailedDelete",
            format!("deleting volume {handle}: {}", e.message()),
        );
        return Err(anyhow::Error::new(e).context("DeleteVolume"));
    }
    // Delete the PV object, then let it go by dropping our finalizer.
    let pending = if pv.metadata.deletion_timestamp.is_none() {
        match volumes(shared)
            .delete(&name, &DeleteParams::default())
            .await
        {
            // Still there (finalizers): its new version; `None` when gone already.
            Ok(deleted) => deleted.left(),
            Err(e) if is_api(&e, 404) => return Ok(Next::Done),
            Err(e) => return Err(anyhow::Error::new(e).context(format!("deleting PV {name}"))),
        }
    } else {
        Some(pv.clone())
    };
    if let Some(pending) = pending {
        drop_finalizer(shared, pending).await?;
    }
    // Gone once the finalizer is off: nothing to do until its deletion is seen.
    expect(shared, &name, Expect::Deleted);
    shared.metrics.succeeded("delete", started);
    tracing::info!(pv = %name, volume = %handle, "deleted");
    Ok(Next::Done)
}

/// The DeleteVolume secrets named by the PV's deletion-secret annotations.
async fn deletion_secrets(
    shared: &Context,
    pv: &PersistentVolume,
) -> anyhow::Result<HashMap<String, String>> {
    let annotations = pv.annotations();
    let name = annotations
        .get(rules::ANN_DELETION_SECRET_NAME)
        .filter(|n| !n.is_empty());
    let namespace = annotations
        .get(rules::ANN_DELETION_SECRET_NAMESPACE)
        .filter(|n| !n.is_empty());
    let (Some(name), Some(namespace)) = (name, namespace) else {
        return Ok(HashMap::new());
    };
    crate::context::read_secret(&shared.client, namespace, name)
        .await
        .with_context(|| format!("reading deletion secret {namespace}/{name}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{Caches, FakeDriver, Recorded, attachment, fixture, provisioned_pv};

    const PV: &str = "/api/v1/persistentvolumes/pvc-1";

    fn lines(requests: &[Recorded]) -> Vec<String> {
        requests.iter().map(Recorded::line).collect()
    }

    #[tokio::test]
    async fn a_released_pv_with_delete_policy_loses_its_volume_then_goes() {
        let f = fixture(
            Caches {
                volumes: vec![provisioned_pv("pvc-1", "vol-1", "Delete", "Released")],
                ..Default::default()
            },
            FakeDriver::default(),
        )
        .await;
        let next = reconcile(Arc::clone(&f.context), "pvc-1".into())
            .await
            .expect("deleted");
        assert_eq!(next, Next::Done);
        assert_eq!(
            *f.driver.deletes.lock().unwrap(),
            ["vol-1"],
            "one DeleteVolume"
        );
        assert_eq!(
            lines(&f.api.writes()),
            [format!("DELETE {PV}"), format!("PATCH {PV}")],
            "the PV is deleted, then our finalizer comes off"
        );
        assert!(
            f.api.object::<PersistentVolume>(None, "pvc-1").is_none(),
            "gone"
        );
    }

    #[tokio::test]
    async fn a_pv_still_attached_waits_for_its_attachment() {
        let f = fixture(
            Caches {
                volumes: vec![provisioned_pv("pvc-1", "vol-1", "Delete", "Released")],
                attachments: vec![attachment("csi-1", "pvc-1", "node-1")],
                ..Default::default()
            },
            FakeDriver::default(),
        )
        .await;
        let next = reconcile(Arc::clone(&f.context), "pvc-1".into())
            .await
            .expect("waits");
        assert_eq!(next, Next::After(Duration::from_secs(5)));
        assert!(f.driver.deletes.lock().unwrap().is_empty());
        assert!(
            f.api.requests().is_empty(),
            "{:?}",
            lines(&f.api.requests())
        );
    }

    #[tokio::test]
    async fn a_released_pv_with_retain_policy_keeps_its_volume() {
        let f = fixture(
            Caches {
                volumes: vec![provisioned_pv("pvc-1", "vol-1", "Retain", "Released")],
                ..Default::default()
            },
            FakeDriver::default(),
        )
        .await;
        reconcile(Arc::clone(&f.context), "pvc-1".into())
            .await
            .expect("finalizer dropped");
        assert!(
            f.driver.deletes.lock().unwrap().is_empty(),
            "no DeleteVolume"
        );
        assert_eq!(lines(&f.api.writes()), [format!("PATCH {PV}")]);
        let pv: PersistentVolume = f.api.object(None, "pvc-1").expect("kept");
        assert!(pv.finalizers().is_empty(), "{:?}", pv.metadata.finalizers);
    }

    #[tokio::test]
    async fn a_bound_pv_is_not_touched() {
        let f = fixture(
            Caches {
                volumes: vec![provisioned_pv("pvc-1", "vol-1", "Delete", "Bound")],
                ..Default::default()
            },
            FakeDriver::default(),
        )
        .await;
        let next = reconcile(Arc::clone(&f.context), "pvc-1".into())
            .await
            .expect("nothing to do");
        assert_eq!(next, Next::Done);
        assert!(f.driver.deletes.lock().unwrap().is_empty());
        assert!(
            f.api.requests().is_empty(),
            "{:?}",
            lines(&f.api.requests())
        );
    }
}
