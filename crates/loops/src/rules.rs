//! PURE provisioning rules: which claims to provision, what to ask CreateVolume for,
//! the PersistentVolume to create, the writes that complete the bind, and which PVs to
//! delete. No I/O, no API client: k8s-openapi objects in, decisions and objects out.
//!
//! These rules mirror kubernetes-csi/external-provisioner (`pkg/controller/controller.go`)
//! and sig-storage-lib-external-provisioner (`controller/controller.go`) field by field,
//! so a PV made by stowage is indistinguishable from one made by the upstream sidecar
//! and either provisioner can take over the other's volumes. Where stowage differs, the
//! function's doc says so.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    CSIPersistentVolumeSource, NodeSelector, NodeSelectorRequirement, NodeSelectorTerm,
    ObjectReference, PersistentVolume, PersistentVolumeClaim, PersistentVolumeClaimSpec,
    PersistentVolumeSpec, SecretReference, TypedLocalObjectReference, VolumeNodeAffinity,
};
use k8s_openapi::api::storage::v1::StorageClass;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde_json::{Value, json};

use stowage_api::convert::{KUBERNETES_ACCESS_MODES, access_mode_from_kubernetes};
use stowage_api::keys::{
    BACKEND_PARAMETER, DriverNames, FSTYPE_KEY, KNOWN_RESERVED_KEYS, PV_NAME, PVC_NAME,
    PVC_NAMESPACE, RESERVED_PREFIX,
};
use stowage_api::volume::{AccessMode, Volume};

/// PV annotation naming the provisioner that created it.
pub const ANN_PROVISIONED_BY: &str = "pv.kubernetes.io/provisioned-by";
/// PVC annotation set by the PV controller: which provisioner should act on the claim.
pub const ANN_STORAGE_PROVISIONER: &str = "volume.kubernetes.io/storage-provisioner";
/// The deprecated spelling of [`ANN_STORAGE_PROVISIONER`].
pub const ANN_BETA_STORAGE_PROVISIONER: &str = "volume.beta.kubernetes.io/storage-provisioner";
/// PVC annotation set by the scheduler for WaitForFirstConsumer claims.
pub const ANN_SELECTED_NODE: &str = "volume.kubernetes.io/selected-node";
/// The deprecated claim annotation naming the StorageClass (wins over the spec field).
pub const ANN_BETA_STORAGE_CLASS: &str = "volume.beta.kubernetes.io/storage-class";
/// PV annotations external-provisioner writes for DeleteVolume's secrets (empty = none).
pub const ANN_DELETION_SECRET_NAME: &str = "volume.kubernetes.io/provisioner-deletion-secret-name";
pub const ANN_DELETION_SECRET_NAMESPACE: &str =
    "volume.kubernetes.io/provisioner-deletion-secret-namespace";
/// The PV finalizer marking the provisioner as responsible for the backing volume.
pub const FINALIZER: &str = "external-provisioner.volume.kubernetes.io/finalizer";
/// The volume attribute external-provisioner adds to every PV it creates.
pub const PROVISIONER_IDENTITY_KEY: &str = "storage.kubernetes.io/csiProvisionerIdentity";

pub const BINDING_WAIT_FOR_FIRST_CONSUMER: &str = "WaitForFirstConsumer";
const RECLAIM_DELETE: &str = "Delete";
const RECLAIM_RETAIN: &str = "Retain";
const RECLAIM_RECYCLE: &str = "Recycle";
const PHASE_BOUND: &str = "Bound";
const PHASE_RELEASED: &str = "Released";
const VOLUME_MODE_BLOCK: &str = "Block";
const STORAGE: &str = "storage";

/// What to do with a claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Create a volume and a PV for it.
    Provision,
    /// Not ours or nothing to do; the reason is for debug logs only.
    Skip(String),
    /// Ours, but not yet: retry when the claim or its class changes.
    Wait(String),
    /// Ours and never provisionable as written: a ProvisioningFailed event.
    Reject(String),
}

/// The StorageClass name a claim asks for: the deprecated annotation
/// `volume.beta.kubernetes.io/storage-class` wins over `spec.storageClassName`, as in
/// sig-storage-lib's `GetPersistentVolumeClaimClass`. `None` (or `""`) means no class.
pub fn claim_class(pvc: &PersistentVolumeClaim) -> Option<&str> {
    annotation(&pvc.metadata, ANN_BETA_STORAGE_CLASS)
        .or_else(|| pvc.spec.as_ref()?.storage_class_name.as_deref())
        .filter(|class| !class.is_empty())
}

/// Should stowage provision a volume for `pvc`? `storage_class` is the class
/// [`claim_class`] names, when it exists.
///
/// Mirrors sig-storage-lib `shouldProvision` + `provisionClaimOperation` and
/// external-provisioner `Provision`: bound claims are skipped; the class's provisioner
/// must be the driver; a WaitForFirstConsumer class waits for the scheduler's
/// `selected-node`; claims with a selector are refused ("claim Selector is not
/// supported"). Differences: the class's provisioner alone is enough (upstream also
/// needs the PV controller's `storage-provisioner` annotation, which stowage accepts
/// as a fallback when the class is not found yet, then waits for the class); claims
/// being deleted are skipped.
pub fn should_provision(
    pvc: &PersistentVolumeClaim,
    storage_class: Option<&StorageClass>,
    drivers: &DriverNames,
) -> Decision {
    let spec = pvc.spec.as_ref();
    if let Some(volume) = spec.and_then(|s| s.volume_name.as_deref())
        && !volume.is_empty()
    {
        return Decision::Skip(format!("already bound to PV {volume}"));
    }
    if pvc.metadata.deletion_timestamp.is_some() {
        return Decision::Skip("claim is being deleted".to_owned());
    }
    let annotated = annotation(&pvc.metadata, ANN_STORAGE_PROVISIONER)
        .or_else(|| annotation(&pvc.metadata, ANN_BETA_STORAGE_PROVISIONER));
    let Some(class) = storage_class else {
        return match (claim_class(pvc), annotated) {
            (Some(name), Some(p)) if drivers.contains(p) => {
                Decision::Wait(format!("StorageClass {name} not found"))
            }
            (None, _) => Decision::Skip("claim names no StorageClass".to_owned()),
            (Some(name), _) => Decision::Skip(format!("StorageClass {name} not found")),
        };
    };
    let class_name = class.metadata.name.as_deref().unwrap_or_default();
    if !drivers.contains(&class.provisioner) {
        return Decision::Skip(format!(
            "StorageClass {class_name} is provisioned by {}",
            class.provisioner
        ));
    }
    if spec.is_some_and(|s| s.selector.is_some()) {
        return Decision::Reject(format!(
            "claim has spec.selector, which dynamic provisioning does not support \
             (StorageClass {class_name}): remove the selector, or create a matching PV \
             by hand and drop storageClassName"
        ));
    }
    if let Some(source) = spec.and_then(data_source)
        && source_kind(&source).is_none()
    {
        return Decision::Skip(format!(
            "claim's data source is a {} ({}): left to its volume populator",
            source.kind,
            source.api_group.as_deref().unwrap_or("core")
        ));
    }
    if spec
        .and_then(|s| s.data_source_ref.as_ref())
        .is_some_and(|r| {
            r.namespace
                .as_deref()
                .is_some_and(|ns| Some(ns) != pvc.metadata.namespace.as_deref())
        })
    {
        return Decision::Reject(
            "claim's dataSourceRef names another namespace: cross-namespace restores and clones are not supported; use a source in the claim's namespace".to_owned(),
        );
    }
    if class.volume_binding_mode.as_deref() == Some(BINDING_WAIT_FOR_FIRST_CONSUMER)
        && annotation(&pvc.metadata, ANN_SELECTED_NODE).is_none_or(str::is_empty)
    {
        return Decision::Wait(format!(
            "StorageClass {class_name} is WaitForFirstConsumer: waiting for a pod to be scheduled"
        ));
    }
    Decision::Provision
}

/// A claim's data source: `dataSourceRef` (the one the API server keeps in step with
/// `dataSource`, and the only one that can name other kinds), else `dataSource`.
pub fn data_source(spec: &PersistentVolumeClaimSpec) -> Option<TypedLocalObjectReference> {
    spec.data_source_ref
        .as_ref()
        .map(|r| TypedLocalObjectReference {
            api_group: r.api_group.clone().filter(|g| !g.is_empty()),
            kind: r.kind.clone(),
            name: r.name.clone(),
        })
        .or_else(|| {
            spec.data_source.clone().map(|mut s| {
                s.api_group = s.api_group.filter(|g| !g.is_empty());
                s
            })
        })
}

/// What a claim is made from, when the provisioner does it itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceKind {
    /// `snapshot.storage.k8s.io` VolumeSnapshot: a restore.
    Snapshot,
    /// A PersistentVolumeClaim: a clone.
    Claim,
}

/// The kinds the provisioner restores or clones from; `None` for a populator's kind.
pub fn source_kind(source: &TypedLocalObjectReference) -> Option<SourceKind> {
    match (source.api_group.as_deref(), source.kind.as_str()) {
        (Some("snapshot.storage.k8s.io"), "VolumeSnapshot") => Some(SourceKind::Snapshot),
        (None, "PersistentVolumeClaim") => Some(SourceKind::Claim),
        _ => None,
    }
}

/// A claim may be cloned from `source` (same namespace, checked by the caller): same
/// StorageClass and volume mode, bound to a PV of this driver, and not larger than the
/// new claim asks for. Returns the source PV's CSI volume handle.
pub fn clone_source_handle(
    pvc: &PersistentVolumeClaim,
    source: &PersistentVolumeClaim,
    source_pv: Option<&PersistentVolume>,
    drivers: &DriverNames,
    requested: i64,
) -> Result<String, String> {
    let source_name = display_name(&source.metadata);
    if claim_class(source) != claim_class(pvc) {
        return Err(format!(
            "the source claim {source_name} has StorageClass {:?}, not {:?}: a clone must use its source's class",
            claim_class(source).unwrap_or_default(),
            claim_class(pvc).unwrap_or_default()
        ));
    }
    let mode = |c: &PersistentVolumeClaim| {
        c.spec
            .as_ref()
            .and_then(|s| s.volume_mode.clone())
            .unwrap_or_else(|| "Filesystem".to_owned())
    };
    if mode(source) != mode(pvc) {
        return Err(format!(
            "the source claim {source_name} is volumeMode {}, the new claim {}",
            mode(source),
            mode(pvc)
        ));
    }
    let Some(pv) = source_pv else {
        return Err(format!("the source claim {source_name} is not bound yet"));
    };
    let csi = pv
        .spec
        .as_ref()
        .and_then(|s| s.csi.as_ref())
        .filter(|csi| drivers.contains(&csi.driver))
        .ok_or_else(|| format!("the source claim {source_name} is not a volume of {drivers}"))?;
    let source_size = source
        .status
        .as_ref()
        .and_then(|s| s.capacity.as_ref())
        .and_then(|c| c.get(STORAGE))
        .map(|q| parse_quantity(&q.0))
        .transpose()?
        .unwrap_or(0);
    if source_size > requested {
        return Err(format!(
            "the new claim asks for {} bytes, less than its source {source_name} holds ({source_size} bytes)",
            requested
        ));
    }
    Ok(csi.volume_handle.clone())
}

/// The PV name and CSI volume name for a claim: `pvc-<UID>` (external-provisioner's
/// default `--volume-name-prefix=pvc` with the whole UID).
pub fn pv_name(pvc: &PersistentVolumeClaim) -> Result<String, String> {
    match pvc.metadata.uid.as_deref() {
        Some(uid) if !uid.is_empty() => Ok(format!("pvc-{uid}")),
        _ => Err(format!(
            "claim {} has no metadata.uid",
            display_name(&pvc.metadata)
        )),
    }
}

/// A StorageClass under the NFS-only driver name gets the NFS backend: its volumes are
/// never attached (that name's CSIDriver says `attachRequired: false`), so a class there
/// naming another backend is refused rather than given volumes no pod could use.
pub fn backend_for_provisioner(
    parameters: &mut BTreeMap<String, String>,
    provisioner: &str,
    drivers: &DriverNames,
) -> Result<(), String> {
    if !drivers.is_nfs(provisioner) {
        return Ok(());
    }
    match parameters.get(BACKEND_PARAMETER).map(String::as_str) {
        None => {
            parameters.insert(BACKEND_PARAMETER.to_owned(), "nfs".to_owned());
            Ok(())
        }
        Some("nfs") => Ok(()),
        Some(other) => Err(format!(
            "the class's provisioner {provisioner} serves NFS volumes only (they are never attached), \
             but parameter `{BACKEND_PARAMETER}` is {other:?}: use provisioner {} for {other} volumes",
            drivers.main
        )),
    }
}

/// The CreateVolume parameters: the StorageClass parameters without the reserved
/// `csi.storage.k8s.io/*` keys (fstype and secret references are consumed by the
/// provisioner), plus the claim's name and namespace and the PV name, as
/// external-provisioner sends them with `--extra-create-metadata` (which stowage always
/// does: the NFS `subDir` templates need them). An unknown reserved key is an error.
pub fn create_parameters(
    storage_class_parameters: &BTreeMap<String, String>,
    pvc: &PersistentVolumeClaim,
    pv_name: &str,
) -> Result<BTreeMap<String, String>, String> {
    let mut parameters = BTreeMap::new();
    for (key, value) in storage_class_parameters {
        if key.starts_with(RESERVED_PREFIX) {
            if !KNOWN_RESERVED_KEYS.contains(&key.as_str()) {
                return Err(format!(
                    "StorageClass parameter `{key}` is not known: keys starting with \
                     {RESERVED_PREFIX} are reserved (known: {})",
                    KNOWN_RESERVED_KEYS.join(", ")
                ));
            }
        } else {
            parameters.insert(key.clone(), value.clone());
        }
    }
    parameters.insert(
        PVC_NAME.to_owned(),
        pvc.metadata.name.clone().unwrap_or_default(),
    );
    parameters.insert(
        PVC_NAMESPACE.to_owned(),
        pvc.metadata.namespace.clone().unwrap_or_default(),
    );
    parameters.insert(PV_NAME.to_owned(), pv_name.to_owned());
    Ok(parameters)
}

/// The filesystem type a StorageClass asks for (`csi.storage.k8s.io/fstype`), if any.
/// Upstream also reads a deprecated bare `fstype` key; stowage does not (backends
/// reject it as an unknown parameter, naming it).
pub fn fs_type(parameters: &BTreeMap<String, String>) -> Option<String> {
    parameters
        .get(FSTYPE_KEY)
        .filter(|v| !v.is_empty())
        .cloned()
}

/// The storage the claim requests (`spec.resources.requests.storage`) in bytes,
/// rounded up to a whole byte.
pub fn capacity_request(pvc: &PersistentVolumeClaim) -> Result<i64, String> {
    let quantity = pvc
        .spec
        .as_ref()
        .and_then(|s| s.resources.as_ref())
        .and_then(|r| r.requests.as_ref())
        .and_then(|r| r.get(STORAGE))
        .ok_or_else(|| {
            format!(
                "claim {} has no spec.resources.requests.storage",
                display_name(&pvc.metadata)
            )
        })?;
    let bytes = parse_quantity(&quantity.0).map_err(|e| {
        format!(
            "claim {}: storage request {:?} {e}",
            display_name(&pvc.metadata),
            quantity.0
        )
    })?;
    if bytes <= 0 {
        return Err(format!(
            "claim {}: storage request {:?} must be positive",
            display_name(&pvc.metadata),
            quantity.0
        ));
    }
    Ok(bytes)
}

/// Parses a Kubernetes quantity ("10Gi", "1.5G", "500M", "1e3", "100") into bytes,
/// rounding a fraction up. Binary suffixes Ki…Ei, decimal k…E, milli `m`, exponents
/// `e`/`E`, an optional sign.
pub fn parse_quantity(text: &str) -> Result<i64, String> {
    let s = text.trim();
    let (negative, s) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    let number_end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(number_end);
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() && fraction.is_empty() {
        return Err("is not a number".to_owned());
    }
    // value = digits * numerator / denominator
    let digits: u128 = format!("{whole}{fraction}")
        .parse()
        .map_err(|_| "is not a number".to_owned())?;
    let mut numerator: u128 = 1;
    let mut denominator: u128 = 10u128
        .checked_pow(u32::try_from(fraction.len()).unwrap_or(u32::MAX))
        .ok_or("has too many digits")?;
    let binary = |power: u32| 1024u128.pow(power);
    let decimal = |power: u32| 10u128.pow(power);
    match suffix {
        "" => {}
        "Ki" => numerator = binary(1),
        "Mi" => numerator = binary(2),
        "Gi" => numerator = binary(3),
        "Ti" => numerator = binary(4),
        "Pi" => numerator = binary(5),
        "Ei" => numerator = binary(6),
        "m" => denominator *= 1000,
        "k" => numerator = decimal(3),
        "M" => numerator = decimal(6),
        "G" => numerator = decimal(9),
        "T" => numerator = decimal(12),
        "P" => numerator = decimal(15),
        "E" => numerator = decimal(18),
        exponent if exponent.starts_with(['e', 'E']) => {
            let power: i32 = exponent[1..]
                .parse()
                .map_err(|_| format!("has an invalid exponent {exponent:?}"))?;
            if !(-30..=30).contains(&power) {
                return Err("is out of range".to_owned());
            }
            if power >= 0 {
                numerator = decimal(power.unsigned_abs());
            } else {
                denominator *= decimal(power.unsigned_abs());
            }
        }
        other => {
            return Err(format!(
                "has an unknown suffix {other:?} (known: Ki Mi Gi Ti Pi Ei, k M G T P E, m)"
            ));
        }
    }
    let bytes = digits
        .checked_mul(numerator)
        .ok_or("is out of range")?
        .div_ceil(denominator);
    let bytes = i64::try_from(bytes).map_err(|_| "is out of range".to_owned())?;
    Ok(if negative { -bytes } else { bytes })
}

/// Formats bytes as Kubernetes canonicalises a BinarySI quantity (external-provisioner's
/// `bytesToQuantity`): the largest binary suffix that divides exactly ("5Gi", "1536Mi"),
/// else the plain number ("1000").
pub fn bytes_to_quantity(bytes: i64) -> Quantity {
    const SUFFIXES: [&str; 6] = ["Ei", "Pi", "Ti", "Gi", "Mi", "Ki"];
    if bytes != 0 {
        for (i, suffix) in SUFFIXES.iter().enumerate() {
            let unit = 1i64 << (10 * (6 - i));
            if bytes % unit == 0 {
                return Quantity(format!("{}{suffix}", bytes / unit));
            }
        }
    }
    Quantity(bytes.to_string())
}

/// What the claim asks of the volume: the CSI access modes and whether it wants a raw
/// block device (`volumeMode: Block`) rather than a filesystem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimModes {
    pub access_modes: Vec<AccessMode>,
    pub block: bool,
}

/// Maps the claim's access modes to CSI ones
/// ([`stowage_api::convert::access_mode_from_kubernetes`]). One capability per claim
/// mode, as upstream sends; an empty or unknown mode is an error.
pub fn access_modes(pvc: &PersistentVolumeClaim) -> Result<ClaimModes, String> {
    let spec = pvc.spec.as_ref();
    let modes = spec
        .and_then(|s| s.access_modes.as_deref())
        .unwrap_or_default();
    if modes.is_empty() {
        return Err(format!(
            "claim {} has no spec.accessModes",
            display_name(&pvc.metadata)
        ));
    }
    let mut access_modes = Vec::with_capacity(modes.len());
    for mode in modes {
        let Some(mode) = access_mode_from_kubernetes(mode) else {
            return Err(format!(
                "claim {}: access mode {mode:?} is not known (known: {})",
                display_name(&pvc.metadata),
                KUBERNETES_ACCESS_MODES.join(", ")
            ));
        };
        if !access_modes.contains(&mode) {
            access_modes.push(mode);
        }
    }
    let block = spec.and_then(|s| s.volume_mode.as_deref()) == Some(VOLUME_MODE_BLOCK);
    Ok(ClaimModes {
        access_modes,
        block,
    })
}

/// The `storage.kubernetes.io/csiProvisionerIdentity` value, spelled as the upstream
/// sidecar does: `<start time in ms>-<random 0..9999>-<driver name>`. Computed once
/// per process by the caller (which owns the clock and the randomness).
pub fn provisioner_identity(driver_name: &str, started_unix_millis: i64, random: u16) -> String {
    format!("{started_unix_millis}-{}-{driver_name}", random % 10000)
}

/// The capacity to record on the PV: what the backend created, or the request when the
/// backend reports 0 (unknown, e.g. NFS). Less than requested is an error; upstream then
/// deletes the volume and retries.
pub fn provisioned_capacity(volume: &Volume, requested_bytes: i64) -> Result<i64, String> {
    let created = i64::try_from(volume.capacity_bytes)
        .map_err(|_| format!("volume {} capacity is out of range", volume.id))?;
    if created == 0 {
        Ok(requested_bytes)
    } else if created < requested_bytes {
        Err(format!(
            "created volume {} has {created} bytes, less than the {requested_bytes} requested",
            volume.id
        ))
    } else {
        Ok(created)
    }
}

/// The PersistentVolume for a newly created volume, as external-provisioner's
/// `Provision` and sig-storage-lib's `provisionClaimOperation` build it together:
///
/// - name `pvc-<uid>`; annotations `pv.kubernetes.io/provisioned-by: <class
///   provisioner>` and the deletion-secret annotations (the provisioner secret, empty
///   when none); finalizer [`FINALIZER`];
/// - claimRef to the claim (apiVersion, kind, namespace, name, uid, resourceVersion);
/// - csi: driver, volumeHandle = volume id, fsType (filesystem mode only),
///   volumeAttributes = [`PROVISIONER_IDENTITY_KEY`] overlaid by the volume context;
/// - capacity per [`provisioned_capacity`] (the volume's, or the request when 0);
///   accessModes and volumeMode from the claim; reclaim policy (default Delete) and
///   mountOptions from the class; storageClassName; nodeAffinity from the topology.
///
/// Secret references (`csi.storage.k8s.io/<kind>-secret-*`) become the PV's csi secret
/// refs and the provisioner secret its deletion-secret annotations.
///
/// Call [`provisioned_capacity`] first to refuse a too-small volume. Fails when the
/// claim has no UID or a secret template does not resolve.
pub fn build_pv(
    pvc: &PersistentVolumeClaim,
    storage_class: &StorageClass,
    identity: &str,
    volume: &Volume,
    requested_bytes: i64,
) -> Result<PersistentVolume, String> {
    let name = pv_name(pvc)?;
    let spec = pvc.spec.clone().unwrap_or_default();
    let block = spec.volume_mode.as_deref() == Some(VOLUME_MODE_BLOCK);

    let mut attributes =
        BTreeMap::from([(PROVISIONER_IDENTITY_KEY.to_owned(), identity.to_owned())]);
    attributes.extend(volume.context.clone());
    let fs_type = if block {
        None
    } else {
        storage_class.parameters.as_ref().and_then(fs_type)
    };
    let capacity = match i64::try_from(volume.capacity_bytes) {
        Ok(0) | Err(_) => requested_bytes,
        Ok(bytes) => bytes,
    };

    let empty = BTreeMap::new();
    let parameters = storage_class.parameters.as_ref().unwrap_or(&empty);
    let deletion_secret = provisioner_secret(parameters, pvc, &name)?.unwrap_or_default();
    let mut secret_refs = Vec::with_capacity(PV_SECRET_KINDS.len());
    for kind in PV_SECRET_KINDS {
        secret_refs.push(
            secret_ref(parameters, kind, pvc, &name)?.map(|(namespace, name)| SecretReference {
                name: Some(name),
                namespace: Some(namespace),
            }),
        );
    }
    let [
        controller_publish,
        node_stage,
        node_publish,
        controller_expand,
        node_expand,
    ]: [Option<SecretReference>; 5] = secret_refs.try_into().expect("one per kind");
    let annotations = BTreeMap::from([
        (ANN_DELETION_SECRET_NAME.to_owned(), deletion_secret.1),
        (ANN_DELETION_SECRET_NAMESPACE.to_owned(), deletion_secret.0),
        (
            ANN_PROVISIONED_BY.to_owned(),
            storage_class.provisioner.clone(),
        ),
    ]);
    Ok(PersistentVolume {
        metadata: ObjectMeta {
            name: Some(name),
            annotations: Some(annotations),
            finalizers: Some(vec![FINALIZER.to_owned()]),
            ..ObjectMeta::default()
        },
        spec: Some(PersistentVolumeSpec {
            access_modes: spec.access_modes.clone(),
            capacity: Some(BTreeMap::from([(
                STORAGE.to_owned(),
                bytes_to_quantity(capacity),
            )])),
            claim_ref: Some(claim_ref(pvc)),
            csi: Some(CSIPersistentVolumeSource {
                driver: storage_class.provisioner.clone(),
                volume_handle: volume.id.clone(),
                fs_type,
                volume_attributes: Some(attributes),
                controller_publish_secret_ref: controller_publish,
                node_stage_secret_ref: node_stage,
                node_publish_secret_ref: node_publish,
                controller_expand_secret_ref: controller_expand,
                node_expand_secret_ref: node_expand,
                read_only: None,
            }),
            mount_options: storage_class.mount_options.clone(),
            node_affinity: node_affinity(&volume.topology),
            persistent_volume_reclaim_policy: Some(
                storage_class
                    .reclaim_policy
                    .clone()
                    .unwrap_or_else(|| RECLAIM_DELETE.to_owned()),
            ),
            storage_class_name: claim_class(pvc).map(str::to_owned),
            volume_mode: spec.volume_mode.clone(),
            volume_attributes_class_name: spec
                .volume_attributes_class_name
                .clone()
                .filter(|c| !c.is_empty()),
            ..PersistentVolumeSpec::default()
        }),
        status: None,
    })
}

/// `ref.GetReference(claim)`: what the PV's claimRef points at.
pub fn claim_ref(pvc: &PersistentVolumeClaim) -> ObjectReference {
    ObjectReference {
        api_version: Some("v1".to_owned()),
        kind: Some("PersistentVolumeClaim".to_owned()),
        namespace: pvc.metadata.namespace.clone(),
        name: pvc.metadata.name.clone(),
        uid: pvc.metadata.uid.clone(),
        resource_version: pvc.metadata.resource_version.clone(),
        field_path: None,
    }
}

/// One NodeSelectorTerm per topology segment map (terms are ORed, a term's expressions
/// ANDed), each key `In [value]`: external-provisioner's `GenerateVolumeNodeAffinity`.
/// No segments → no affinity.
pub fn node_affinity(topology: &[stowage_api::volume::Segments]) -> Option<VolumeNodeAffinity> {
    let terms: Vec<NodeSelectorTerm> = topology
        .iter()
        .filter(|segments| !segments.is_empty())
        .map(|segments| NodeSelectorTerm {
            match_expressions: Some(
                segments
                    .iter()
                    .map(|(key, value)| NodeSelectorRequirement {
                        key: key.clone(),
                        operator: "In".to_owned(),
                        values: Some(vec![value.clone()]),
                    })
                    .collect(),
            ),
            match_fields: None,
        })
        .collect();
    (!terms.is_empty()).then_some(VolumeNodeAffinity {
        required: Some(NodeSelector {
            node_selector_terms: terms,
        }),
    })
}

/// Is `pv` a PV someone created for this claim by hand: pre-bound by `claimRef`
/// (namespace and name; uid empty or the claim's) and able to take it (as large as the
/// request, the same volume mode, not being deleted)? The PV controller binds such a
/// claim to that PV (`findMatchingVolume` matches pre-bound volumes first) and never
/// asks for provisioning, so neither may stowage.
pub fn is_prebound_to(pv: &PersistentVolume, pvc: &PersistentVolumeClaim) -> bool {
    let Some(spec) = pv.spec.as_ref() else {
        return false;
    };
    let Some(claim_ref) = spec.claim_ref.as_ref() else {
        return false;
    };
    let uid_matches = match claim_ref.uid.as_deref().filter(|u| !u.is_empty()) {
        None => true,
        Some(uid) => pvc.metadata.uid.as_deref() == Some(uid),
    };
    let names_match =
        claim_ref.namespace == pvc.metadata.namespace && claim_ref.name == pvc.metadata.name;
    let pv_bytes = spec
        .capacity
        .as_ref()
        .and_then(|c| c.get(STORAGE))
        .and_then(|q| parse_quantity(&q.0).ok())
        .unwrap_or(0);
    let fits = capacity_request(pvc).is_ok_and(|wanted| pv_bytes >= wanted);
    let mode = |m: Option<&str>| m.unwrap_or("Filesystem").to_owned();
    let same_mode = mode(spec.volume_mode.as_deref())
        == mode(pvc.spec.as_ref().and_then(|s| s.volume_mode.as_deref()));
    names_match
        && uid_matches
        && fits
        && same_mode
        && pv.metadata.deletion_timestamp.is_none()
        && pv_name(pvc).ok().as_deref() != pv.metadata.name.as_deref()
}

/// Does stowage own this PV? Its `provisioned-by` annotation names the driver, or,
/// without the annotation (a static PV), its `spec.csi.driver` does
/// (sig-storage-lib `isProvisionerForVolume`).
pub fn is_ours(pv: &PersistentVolume, drivers: &DriverNames) -> bool {
    match annotation(&pv.metadata, ANN_PROVISIONED_BY) {
        Some(provisioner) => drivers.contains(provisioner),
        None => pv
            .spec
            .as_ref()
            .and_then(|s| s.csi.as_ref())
            .is_some_and(|csi| drivers.contains(&csi.driver)),
    }
}

fn has_finalizer(pv: &PersistentVolume) -> bool {
    pv.metadata
        .finalizers
        .as_ref()
        .is_some_and(|f| f.iter().any(|f| f == FINALIZER))
}

fn reclaim_policy(pv: &PersistentVolume) -> Option<&str> {
    pv.spec
        .as_ref()
        .and_then(|s| s.persistent_volume_reclaim_policy.as_deref())
}

/// Should the backing volume be deleted (DeleteVolume, then drop the finalizer)?
/// sig-storage-lib `shouldDelete` with `addFinalizer`: ours, phase Released, reclaim
/// policy Delete, and not already finished (a PV being deleted without our finalizer).
pub fn should_delete(pv: &PersistentVolume, drivers: &DriverNames) -> bool {
    is_ours(pv, drivers)
        && (has_finalizer(pv) || pv.metadata.deletion_timestamp.is_none())
        && pv.status.as_ref().and_then(|s| s.phase.as_deref()) == Some(PHASE_RELEASED)
        && reclaim_policy(pv) == Some(RECLAIM_DELETE)
}

/// Should only our finalizer be removed, keeping the storage? Ours, carries the
/// finalizer, and the reclaim policy is Retain or Recycle (sig-storage-lib
/// `handleProtectionFinalizer`).
pub fn finalizer_only(pv: &PersistentVolume, drivers: &DriverNames) -> bool {
    is_ours(pv, drivers)
        && has_finalizer(pv)
        && matches!(reclaim_policy(pv), Some(RECLAIM_RETAIN | RECLAIM_RECYCLE))
}

/// Should our finalizer be added? Ours, Delete policy, Bound, not being deleted and
/// without it (sig-storage-lib `handleProtectionFinalizer`; covers PVs made before the
/// finalizer existed).
pub fn needs_finalizer(pv: &PersistentVolume, drivers: &DriverNames) -> bool {
    is_ours(pv, drivers)
        && !has_finalizer(pv)
        && pv.metadata.deletion_timestamp.is_none()
        && reclaim_policy(pv) == Some(RECLAIM_DELETE)
        && pv.status.as_ref().and_then(|s| s.phase.as_deref()) == Some(PHASE_BOUND)
}

/// A merge patch (PV main resource) setting the finalizer list with ours added or
/// removed, guarded by the PV's resourceVersion. `None` when nothing changes.
pub fn finalizer_patch(pv: &PersistentVolume, present: bool) -> Option<Value> {
    let current = pv.metadata.finalizers.clone().unwrap_or_default();
    let mut wanted: Vec<String> = current
        .iter()
        .filter(|f| *f != FINALIZER)
        .cloned()
        .collect();
    if present {
        wanted.push(FINALIZER.to_owned());
    }
    if wanted == current {
        return None;
    }
    let mut metadata = json!({ "finalizers": wanted });
    if let Some(version) = &pv.metadata.resource_version {
        metadata["resourceVersion"] = json!(version);
    }
    Some(json!({ "metadata": metadata }))
}

/// A secret reference resolved from StorageClass parameters: (namespace, name).
pub type SecretName = (String, String);

/// The secrets a PV carries, by the `csi.storage.k8s.io/<kind>-secret-*` keys that set
/// them (external-provisioner's `csiSecretParams`).
pub const PV_SECRET_KINDS: [&str; 5] = [
    "controller-publish",
    "node-stage",
    "node-publish",
    "controller-expand",
    "node-expand",
];

/// The provisioner secret (`csi.storage.k8s.io/provisioner-secret-name` and
/// `-namespace`, or the deprecated `secret-name`/`secret-namespace`), with templates
/// resolved. Both keys or neither.
pub fn provisioner_secret(
    parameters: &BTreeMap<String, String>,
    pvc: &PersistentVolumeClaim,
    pv_name: &str,
) -> Result<Option<SecretName>, String> {
    match secret_ref(parameters, "provisioner", pvc, pv_name)? {
        Some(found) => Ok(Some(found)),
        None => secret_pair(
            parameters,
            &format!("{RESERVED_PREFIX}secret-name"),
            &format!("{RESERVED_PREFIX}secret-namespace"),
            pvc,
            pv_name,
        ),
    }
}

/// The secret for `kind` (e.g. `node-stage`) from `csi.storage.k8s.io/<kind>-secret-name`
/// and `-namespace`. Templates as in external-provisioner: the namespace may use
/// `${pv.name}` and `${pvc.namespace}`; the name also `${pvc.name}` and
/// `${pvc.annotations['<key>']}`. The result must be a valid object name.
pub fn secret_ref(
    parameters: &BTreeMap<String, String>,
    kind: &str,
    pvc: &PersistentVolumeClaim,
    pv_name: &str,
) -> Result<Option<SecretName>, String> {
    secret_pair(
        parameters,
        &format!("{RESERVED_PREFIX}{kind}-secret-name"),
        &format!("{RESERVED_PREFIX}{kind}-secret-namespace"),
        pvc,
        pv_name,
    )
}

fn secret_pair(
    parameters: &BTreeMap<String, String>,
    name_key: &str,
    namespace_key: &str,
    pvc: &PersistentVolumeClaim,
    pv_name: &str,
) -> Result<Option<SecretName>, String> {
    let (name, namespace) = match (parameters.get(name_key), parameters.get(namespace_key)) {
        (None, None) => return Ok(None),
        (Some(name), Some(namespace)) => (name, namespace),
        _ => {
            return Err(format!(
                "StorageClass parameters {name_key} and {namespace_key} must be given together"
            ));
        }
    };
    let claim_namespace = pvc.metadata.namespace.clone().unwrap_or_default();
    let claim_name = pvc.metadata.name.clone().unwrap_or_default();
    let namespace = render_secret_template(namespace_key, namespace, |var| match var {
        "pv.name" => Some(pv_name.to_owned()),
        "pvc.namespace" => Some(claim_namespace.clone()),
        _ => None,
    })?;
    let name = render_secret_template(name_key, name, |var| match var {
        "pv.name" => Some(pv_name.to_owned()),
        "pvc.namespace" => Some(claim_namespace.clone()),
        "pvc.name" => Some(claim_name.clone()),
        other => {
            let key = other
                .strip_prefix("pvc.annotations['")?
                .strip_suffix("']")?;
            Some(
                annotation(&pvc.metadata, key)
                    .unwrap_or_default()
                    .to_owned(),
            )
        }
    })?;
    for (key, value) in [(namespace_key, &namespace), (name_key, &name)] {
        if !is_dns_subdomain(value) {
            return Err(format!(
                "StorageClass parameter {key} resolves to {value:?}, not a valid object name"
            ));
        }
    }
    Ok(Some((namespace, name)))
}

fn render_secret_template(
    key: &str,
    template: &str,
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = template;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let end = rest[start..].find('}').ok_or_else(|| {
            format!("StorageClass parameter {key}: unterminated ${{ in {template:?}")
        })?;
        let var = &rest[start + 2..start + end];
        let value = lookup(var).ok_or_else(|| {
            format!(
                "StorageClass parameter {key}: ${{{var}}} is not a template variable allowed here"
            )
        })?;
        out.push_str(&value);
        rest = &rest[start + end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

fn is_dns_subdomain(value: &str) -> bool {
    !value.is_empty()
        && value.len() <= 253
        && value.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// The segments a class allows (`allowedTopologies`): each term's label expressions
/// expanded to every combination of their values (external-provisioner's
/// `GenerateAccessibilityRequirements` for Immediate binding).
pub fn allowed_topologies(class: &StorageClass) -> Vec<stowage_api::volume::Segments> {
    let mut all = Vec::new();
    for term in class.allowed_topologies.iter().flatten() {
        let mut combos = vec![stowage_api::volume::Segments::new()];
        for expression in term.match_label_expressions.iter().flatten() {
            combos = combos
                .into_iter()
                .flat_map(|combo| {
                    expression.values.iter().map(move |value| {
                        let mut next = combo.clone();
                        next.insert(expression.key.clone(), value.clone());
                        next
                    })
                })
                .collect();
        }
        for combo in combos {
            if !combo.is_empty() && !all.contains(&combo) {
                all.push(combo);
            }
        }
    }
    all
}

fn annotation<'a>(metadata: &'a ObjectMeta, key: &str) -> Option<&'a str> {
    metadata.annotations.as_ref()?.get(key).map(String::as_str)
}

fn display_name(metadata: &ObjectMeta) -> String {
    format!(
        "{}/{}",
        metadata.namespace.as_deref().unwrap_or_default(),
        metadata.name.as_deref().unwrap_or_default()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{
        PersistentVolumeClaimSpec, PersistentVolumeStatus, VolumeResourceRequirements,
    };
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, Time};

    const DRIVER: &str = "stowage.csi.dev";

    fn names() -> DriverNames {
        DriverNames::new(DRIVER, "nfs.stowage.csi.dev")
    }

    #[test]
    fn a_class_under_the_nfs_name_gets_the_nfs_backend_and_no_other() {
        let mut parameters = BTreeMap::from([("server".to_owned(), "nfs.example".to_owned())]);
        backend_for_provisioner(&mut parameters, "nfs.stowage.csi.dev", &names()).unwrap();
        assert_eq!(
            parameters.get(BACKEND_PARAMETER).map(String::as_str),
            Some("nfs")
        );
        backend_for_provisioner(&mut parameters, "nfs.stowage.csi.dev", &names()).unwrap();

        let mut ebs = BTreeMap::from([(BACKEND_PARAMETER.to_owned(), "ebs".to_owned())]);
        let error = backend_for_provisioner(&mut ebs, "nfs.stowage.csi.dev", &names()).unwrap_err();
        assert!(
            error.contains("use provisioner stowage.csi.dev for ebs"),
            "{error}"
        );
        assert_eq!(ebs.get(BACKEND_PARAMETER).map(String::as_str), Some("ebs"));

        // The main name routes as the class says (or to the first backend).
        let mut main = BTreeMap::new();
        backend_for_provisioner(&mut main, DRIVER, &names()).unwrap();
        assert!(main.is_empty());
    }

    fn pvc(name: &str) -> PersistentVolumeClaim {
        PersistentVolumeClaim {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                namespace: Some("db".to_owned()),
                uid: Some("0b3c-uid".to_owned()),
                resource_version: Some("42".to_owned()),
                ..ObjectMeta::default()
            },
            spec: Some(PersistentVolumeClaimSpec {
                access_modes: Some(vec!["ReadWriteOnce".to_owned()]),
                storage_class_name: Some("fast".to_owned()),
                resources: Some(VolumeResourceRequirements {
                    requests: Some(BTreeMap::from([(
                        STORAGE.to_owned(),
                        Quantity("1Gi".to_owned()),
                    )])),
                    limits: None,
                }),
                ..PersistentVolumeClaimSpec::default()
            }),
            status: None,
        }
    }

    trait ClaimBuilder {
        fn annotated(self, key: &str, value: &str) -> Self;
        fn spec_mut(&mut self) -> &mut PersistentVolumeClaimSpec;
        fn with(mut self, f: impl FnOnce(&mut PersistentVolumeClaimSpec)) -> Self
        where
            Self: Sized,
        {
            f(self.spec_mut());
            self
        }
    }

    impl ClaimBuilder for PersistentVolumeClaim {
        fn annotated(mut self, key: &str, value: &str) -> Self {
            self.metadata
                .annotations
                .get_or_insert_default()
                .insert(key.to_owned(), value.to_owned());
            self
        }
        fn spec_mut(&mut self) -> &mut PersistentVolumeClaimSpec {
            self.spec.get_or_insert_default()
        }
    }

    fn requesting(quantity: &str) -> PersistentVolumeClaim {
        pvc("data").with(|s| {
            s.resources = Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([(
                    STORAGE.to_owned(),
                    Quantity(quantity.to_owned()),
                )])),
                limits: None,
            });
        })
    }

    fn class(name: &str, provisioner: &str) -> StorageClass {
        StorageClass {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                ..ObjectMeta::default()
            },
            provisioner: provisioner.to_owned(),
            ..StorageClass::default()
        }
    }

    fn volume() -> Volume {
        Volume {
            id: "vol-1".to_owned(),
            capacity_bytes: 2 << 30,
            context: BTreeMap::from([("server".to_owned(), "nfs.local".to_owned())]),
            topology: vec![],
            source: None,
        }
    }

    fn pv(phase: &str, policy: &str) -> PersistentVolume {
        PersistentVolume {
            metadata: ObjectMeta {
                name: Some("pvc-0b3c-uid".to_owned()),
                annotations: Some(BTreeMap::from([(
                    ANN_PROVISIONED_BY.to_owned(),
                    DRIVER.to_owned(),
                )])),
                finalizers: Some(vec![FINALIZER.to_owned()]),
                resource_version: Some("7".to_owned()),
                ..ObjectMeta::default()
            },
            spec: Some(PersistentVolumeSpec {
                persistent_volume_reclaim_policy: Some(policy.to_owned()),
                ..PersistentVolumeSpec::default()
            }),
            status: Some(PersistentVolumeStatus {
                phase: Some(phase.to_owned()),
                ..PersistentVolumeStatus::default()
            }),
        }
    }

    fn deleting<T>(mut metadata_owner: T, meta: impl FnOnce(&mut T) -> &mut ObjectMeta) -> T {
        meta(&mut metadata_owner).deletion_timestamp =
            Some(Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH));
        metadata_owner
    }

    fn is_skip(d: &Decision) -> bool {
        matches!(d, Decision::Skip(_))
    }

    #[test]
    fn provisions_an_unbound_claim_of_our_class() {
        let class = class("fast", DRIVER);
        assert_eq!(
            should_provision(&pvc("data"), Some(&class), &names()),
            Decision::Provision
        );
    }

    #[test]
    fn skips_bound_deleted_and_foreign_claims() {
        let ours = class("fast", DRIVER);
        let bound = pvc("data").with(|s| s.volume_name = Some("pv-x".to_owned()));
        assert!(is_skip(&should_provision(&bound, Some(&ours), &names())));
        let gone = deleting(pvc("data"), |p| &mut p.metadata);
        assert!(is_skip(&should_provision(&gone, Some(&ours), &names())));
        let foreign = class("fast", "ebs.csi.aws.com");
        let annotated = pvc("data").annotated(ANN_STORAGE_PROVISIONER, DRIVER);
        assert!(is_skip(&should_provision(
            &annotated,
            Some(&foreign),
            &names()
        )));
        let no_class = pvc("data").with(|s| s.storage_class_name = Some(String::new()));
        assert!(is_skip(&should_provision(&no_class, None, &names())));
        assert!(is_skip(&should_provision(&pvc("data"), None, &names())));
    }

    #[test]
    fn annotated_claim_without_its_class_waits_for_the_class() {
        for key in [ANN_STORAGE_PROVISIONER, ANN_BETA_STORAGE_PROVISIONER] {
            let claim = pvc("data").annotated(key, DRIVER);
            assert!(matches!(
                should_provision(&claim, None, &names()),
                Decision::Wait(reason) if reason.contains("fast")
            ));
        }
    }

    #[test]
    fn rejects_a_selector() {
        let claim = pvc("data").with(|s| s.selector = Some(LabelSelector::default()));
        let decision = should_provision(&claim, Some(&class("fast", DRIVER)), &names());
        assert!(matches!(decision, Decision::Reject(m) if m.contains("selector")));
    }

    #[test]
    fn wait_for_first_consumer_waits_for_the_selected_node() {
        let mut class = class("fast", DRIVER);
        class.volume_binding_mode = Some("WaitForFirstConsumer".to_owned());
        assert!(matches!(
            should_provision(&pvc("data"), Some(&class), &names()),
            Decision::Wait(_)
        ));
        let empty = pvc("data").annotated(ANN_SELECTED_NODE, "");
        assert!(matches!(
            should_provision(&empty, Some(&class), &names()),
            Decision::Wait(_)
        ));
        let scheduled = pvc("data").annotated(ANN_SELECTED_NODE, "node-1");
        assert_eq!(
            should_provision(&scheduled, Some(&class), &names()),
            Decision::Provision
        );
    }

    #[test]
    fn claim_class_prefers_the_beta_annotation() {
        assert_eq!(claim_class(&pvc("data")), Some("fast"));
        let annotated = pvc("data").annotated(ANN_BETA_STORAGE_CLASS, "slow");
        assert_eq!(claim_class(&annotated), Some("slow"));
    }

    #[test]
    fn pv_name_is_pvc_dash_uid() {
        assert_eq!(pv_name(&pvc("data")).unwrap(), "pvc-0b3c-uid");
        let mut anonymous = pvc("data");
        anonymous.metadata.uid = None;
        assert!(pv_name(&anonymous).unwrap_err().contains("db/data"));
    }

    #[test]
    fn create_parameters_strip_reserved_keys_and_add_metadata() {
        let sc = BTreeMap::from([
            ("server".to_owned(), "nfs.local".to_owned()),
            (FSTYPE_KEY.to_owned(), "xfs".to_owned()),
            (
                "csi.storage.k8s.io/provisioner-secret-name".to_owned(),
                "s".to_owned(),
            ),
        ]);
        let parameters = create_parameters(&sc, &pvc("data"), "pvc-0b3c-uid").unwrap();
        assert_eq!(
            parameters,
            BTreeMap::from([
                ("server".to_owned(), "nfs.local".to_owned()),
                (PVC_NAME.to_owned(), "data".to_owned()),
                (PVC_NAMESPACE.to_owned(), "db".to_owned()),
                (PV_NAME.to_owned(), "pvc-0b3c-uid".to_owned()),
            ])
        );
        assert_eq!(fs_type(&sc).as_deref(), Some("xfs"));
        assert_eq!(fs_type(&BTreeMap::new()), None);
    }

    #[test]
    fn create_parameters_name_an_unknown_reserved_key() {
        let sc = BTreeMap::from([("csi.storage.k8s.io/fsType".to_owned(), "xfs".to_owned())]);
        let err = create_parameters(&sc, &pvc("data"), "pv").unwrap_err();
        assert!(err.contains("`csi.storage.k8s.io/fsType`"), "{err}");
    }

    #[test]
    fn parses_quantities() {
        let cases = [
            ("1Gi", 1 << 30),
            ("10Mi", 10 << 20),
            ("1.5Gi", 3 << 29),
            ("1Ki", 1024),
            ("2Ti", 2 << 40),
            ("1Pi", 1 << 50),
            ("1Ei", 1 << 60),
            ("1k", 1000),
            ("1.5G", 1_500_000_000),
            ("500M", 500_000_000),
            ("1T", 1_000_000_000_000),
            ("1P", 1_000_000_000_000_000),
            ("1E", 1_000_000_000_000_000_000),
            ("100", 100),
            ("0.5", 1),
            ("1001m", 2),
            ("1e3", 1000),
            (".5Ki", 512),
        ];
        for (text, bytes) in cases {
            assert_eq!(parse_quantity(text), Ok(bytes), "{text}");
        }
        for bad in ["", "Gi", "1GB", "1gi", "abc", "9Ei", "1e99", "1.2.3", "."] {
            assert!(parse_quantity(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn capacity_request_rounds_up_and_refuses_nonsense() {
        assert_eq!(capacity_request(&requesting("1Gi")), Ok(1 << 30));
        assert_eq!(capacity_request(&requesting("2.5")), Ok(3));
        for bad in ["0", "-1Gi", "1GB"] {
            assert!(capacity_request(&requesting(bad)).is_err(), "{bad}");
        }
        let missing = pvc("data").with(|s| s.resources = None);
        assert!(
            capacity_request(&missing)
                .unwrap_err()
                .contains("requests.storage")
        );
    }

    #[test]
    fn formats_quantities_like_binary_si() {
        assert_eq!(bytes_to_quantity(5 << 30).0, "5Gi");
        assert_eq!(bytes_to_quantity(1536 << 20).0, "1536Mi");
        assert_eq!(bytes_to_quantity(1000).0, "1000");
        assert_eq!(bytes_to_quantity(1024).0, "1Ki");
        assert_eq!(bytes_to_quantity(0).0, "0");
        for bytes in [1, 1000, 1 << 30, 3 << 29, 1_500_000_000] {
            assert_eq!(parse_quantity(&bytes_to_quantity(bytes).0), Ok(bytes));
        }
    }

    #[test]
    fn maps_access_modes_and_volume_mode() {
        let claim = pvc("data").with(|s| {
            s.access_modes = Some(
                [
                    "ReadWriteOnce",
                    "ReadOnlyMany",
                    "ReadWriteMany",
                    "ReadWriteOncePod",
                ]
                .map(str::to_owned)
                .to_vec(),
            );
            s.volume_mode = Some("Block".to_owned());
        });
        assert_eq!(
            access_modes(&claim),
            Ok(ClaimModes {
                access_modes: vec![
                    AccessMode::SingleNodeWriter,
                    AccessMode::MultiNodeReaderOnly,
                    AccessMode::MultiNodeMultiWriter,
                    AccessMode::SingleNodeSingleWriter,
                ],
                block: true,
            })
        );
        assert!(!access_modes(&pvc("data")).unwrap().block);
        let odd = pvc("data").with(|s| s.access_modes = Some(vec!["ReadMostly".to_owned()]));
        assert!(access_modes(&odd).unwrap_err().contains("ReadMostly"));
        let none = pvc("data").with(|s| s.access_modes = None);
        assert!(access_modes(&none).is_err());
    }

    #[test]
    fn builds_the_pv_like_external_provisioner() {
        let mut sc = class("fast", DRIVER);
        sc.parameters = Some(BTreeMap::from([(FSTYPE_KEY.to_owned(), "xfs".to_owned())]));
        sc.mount_options = Some(vec!["noatime".to_owned()]);
        let pv = build_pv(&pvc("data"), &sc, "1-2-stowage", &volume(), 1 << 30).unwrap();

        assert_eq!(pv.metadata.name.as_deref(), Some("pvc-0b3c-uid"));
        assert_eq!(pv.metadata.finalizers, Some(vec![FINALIZER.to_owned()]));
        assert_eq!(annotation(&pv.metadata, ANN_PROVISIONED_BY), Some(DRIVER));
        assert_eq!(annotation(&pv.metadata, ANN_DELETION_SECRET_NAME), Some(""));
        let spec = pv.spec.unwrap();
        assert_eq!(
            spec.claim_ref,
            Some(ObjectReference {
                api_version: Some("v1".to_owned()),
                kind: Some("PersistentVolumeClaim".to_owned()),
                namespace: Some("db".to_owned()),
                name: Some("data".to_owned()),
                uid: Some("0b3c-uid".to_owned()),
                resource_version: Some("42".to_owned()),
                field_path: None,
            })
        );
        let csi = spec.csi.unwrap();
        assert_eq!(csi.driver, DRIVER);
        assert_eq!(csi.volume_handle, "vol-1");
        assert_eq!(csi.fs_type.as_deref(), Some("xfs"));
        assert_eq!(
            csi.volume_attributes,
            Some(BTreeMap::from([
                ("server".to_owned(), "nfs.local".to_owned()),
                (
                    PROVISIONER_IDENTITY_KEY.to_owned(),
                    "1-2-stowage".to_owned()
                ),
            ]))
        );
        assert_eq!(
            spec.capacity,
            Some(BTreeMap::from([(
                STORAGE.to_owned(),
                Quantity("2Gi".to_owned())
            )]))
        );
        assert_eq!(spec.access_modes, Some(vec!["ReadWriteOnce".to_owned()]));
        assert_eq!(
            spec.persistent_volume_reclaim_policy.as_deref(),
            Some("Delete")
        );
        assert_eq!(spec.mount_options, Some(vec!["noatime".to_owned()]));
        assert_eq!(spec.storage_class_name.as_deref(), Some("fast"));
        assert_eq!(spec.volume_mode, None);
        assert_eq!(spec.node_affinity, None);
    }

    #[test]
    fn pv_takes_the_request_when_capacity_is_unknown_and_block_has_no_fstype() {
        let mut sc = class("fast", DRIVER);
        sc.parameters = Some(BTreeMap::from([(FSTYPE_KEY.to_owned(), "xfs".to_owned())]));
        sc.reclaim_policy = Some("Retain".to_owned());
        let claim = pvc("data").with(|s| s.volume_mode = Some("Block".to_owned()));
        let unknown = Volume {
            capacity_bytes: 0,
            ..volume()
        };
        let spec = build_pv(&claim, &sc, "id", &unknown, 1000)
            .unwrap()
            .spec
            .unwrap();
        assert_eq!(spec.capacity.unwrap()[STORAGE].0, "1000");
        assert_eq!(spec.csi.unwrap().fs_type, None);
        assert_eq!(spec.volume_mode.as_deref(), Some("Block"));
        assert_eq!(
            spec.persistent_volume_reclaim_policy.as_deref(),
            Some("Retain")
        );
    }

    #[test]
    fn provisioned_capacity_refuses_a_small_volume() {
        assert_eq!(provisioned_capacity(&volume(), 1 << 30), Ok(2 << 30));
        let unknown = Volume {
            capacity_bytes: 0,
            ..volume()
        };
        assert_eq!(provisioned_capacity(&unknown, 5), Ok(5));
        assert!(provisioned_capacity(&volume(), 3 << 30).is_err());
    }

    #[test]
    fn node_affinity_has_one_term_per_segment_map() {
        let zone = |z: &str| {
            BTreeMap::from([
                ("topology.kubernetes.io/zone".to_owned(), z.to_owned()),
                ("kubernetes.io/os".to_owned(), "linux".to_owned()),
            ])
        };
        let affinity = node_affinity(&[zone("a"), BTreeMap::new(), zone("b")]).unwrap();
        let terms = affinity.required.unwrap().node_selector_terms;
        assert_eq!(terms.len(), 2);
        let expressions = terms[1].match_expressions.as_ref().unwrap();
        assert_eq!(expressions.len(), 2);
        assert_eq!(expressions[1].key, "topology.kubernetes.io/zone");
        assert_eq!(expressions[1].operator, "In");
        assert_eq!(expressions[1].values, Some(vec!["b".to_owned()]));
        assert_eq!(node_affinity(&[BTreeMap::new()]), None);
    }

    #[test]
    fn deletes_only_released_delete_policy_volumes_of_ours() {
        assert!(should_delete(&pv("Released", "Delete"), &names()));
        assert!(!should_delete(&pv("Bound", "Delete"), &names()));
        assert!(!should_delete(&pv("Released", "Retain"), &names()));
        assert!(!should_delete(
            &pv("Released", "Delete"),
            &DriverNames::single("other.csi")
        ));
        // being deleted with our finalizer: still ours to clean up
        let finishing = deleting(pv("Released", "Delete"), |p| &mut p.metadata);
        assert!(should_delete(&finishing, &names()));
        // being deleted without the finalizer: already done
        let mut done = finishing.clone();
        done.metadata.finalizers = None;
        assert!(!should_delete(&done, &names()));
        // static PV: no annotation, the CSI driver decides
        let mut static_pv = pv("Released", "Delete");
        static_pv.metadata.annotations = None;
        assert!(!should_delete(&static_pv, &names()));
        static_pv.spec.as_mut().unwrap().csi = Some(CSIPersistentVolumeSource {
            driver: DRIVER.to_owned(),
            ..CSIPersistentVolumeSource::default()
        });
        assert!(should_delete(&static_pv, &names()));
    }

    #[test]
    fn a_claim_with_a_prebound_pv_is_left_to_the_pv_controller() {
        let claim = pvc("data"); // asks for 1Gi (see pvc())
        let static_pv = |uid: Option<&str>, size: &str| {
            let mut pv = pv("Available", "Retain");
            pv.metadata.name = Some("static-1".to_owned());
            pv.metadata.annotations = None;
            let spec = pv.spec.as_mut().unwrap();
            spec.capacity = Some(BTreeMap::from([(
                "storage".to_owned(),
                Quantity(size.to_owned()),
            )]));
            spec.claim_ref = Some(ObjectReference {
                namespace: claim.metadata.namespace.clone(),
                name: claim.metadata.name.clone(),
                uid: uid.map(str::to_owned),
                ..ObjectReference::default()
            });
            pv
        };
        assert!(is_prebound_to(&static_pv(None, "1Gi"), &claim));
        assert!(is_prebound_to(&static_pv(None, "5Gi"), &claim));
        assert!(is_prebound_to(
            &static_pv(claim.metadata.uid.as_deref(), "1Gi"),
            &claim
        ));
        assert!(!is_prebound_to(&static_pv(Some("other"), "1Gi"), &claim));
        assert!(
            !is_prebound_to(&static_pv(None, "512Mi"), &claim),
            "too small"
        );
        let mut block = static_pv(None, "1Gi");
        block.spec.as_mut().unwrap().volume_mode = Some("Block".to_owned());
        assert!(!is_prebound_to(&block, &claim), "other volume mode");
        let mut other = static_pv(None, "1Gi");
        other
            .spec
            .as_mut()
            .unwrap()
            .claim_ref
            .as_mut()
            .unwrap()
            .name = Some("x".to_owned());
        assert!(!is_prebound_to(&other, &claim));
        let gone = deleting(static_pv(None, "1Gi"), |p| &mut p.metadata);
        assert!(!is_prebound_to(&gone, &claim));
        // The PV stowage made for this claim is not "pre-bound": it is bound by stowage.
        let mut own = static_pv(claim.metadata.uid.as_deref(), "1Gi");
        own.metadata.name = Some(pv_name(&claim).unwrap());
        assert!(!is_prebound_to(&own, &claim));
    }

    #[test]
    fn retain_only_drops_the_finalizer() {
        assert!(finalizer_only(&pv("Released", "Retain"), &names()));
        assert!(finalizer_only(&pv("Bound", "Recycle"), &names()));
        assert!(!finalizer_only(&pv("Released", "Delete"), &names()));
        let mut bare = pv("Released", "Retain");
        bare.metadata.finalizers = None;
        assert!(!finalizer_only(&bare, &names()));
        assert!(!finalizer_only(
            &pv("Released", "Retain"),
            &DriverNames::single("other.csi")
        ));
    }

    #[test]
    fn finalizer_is_added_to_bound_delete_volumes_and_patched_in_place() {
        let mut bare = pv("Bound", "Delete");
        bare.metadata.finalizers = Some(vec!["kubernetes.io/pv-protection".to_owned()]);
        assert!(needs_finalizer(&bare, &names()));
        assert!(!needs_finalizer(&pv("Bound", "Delete"), &names()));
        assert_eq!(
            finalizer_patch(&bare, true),
            Some(json!({ "metadata": {
                "finalizers": ["kubernetes.io/pv-protection", FINALIZER],
                "resourceVersion": "7",
            }}))
        );
        assert_eq!(finalizer_patch(&bare, false), None);
        assert_eq!(
            finalizer_patch(&pv("Released", "Retain"), false),
            Some(json!({ "metadata": { "finalizers": [], "resourceVersion": "7" } }))
        );
    }

    #[test]
    fn identity_is_spelled_like_the_sidecar() {
        assert_eq!(
            provisioner_identity(DRIVER, 1700000000000, 12345),
            "1700000000000-2345-stowage.csi.dev"
        );
    }
}
