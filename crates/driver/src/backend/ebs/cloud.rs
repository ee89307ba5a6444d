//! The EC2 side of the EBS backend: one place for every aws-sdk-ec2 call, the error
//! mapping from EC2 codes to [`BackendError`], an interceptor that counts API calls by
//! action, and the batched waiter (concurrent waits for volume states share one
//! DescribeVolumes call per tick). Knows nothing of CSI or StorageClass keys.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_sdk_ec2::Client;
use aws_sdk_ec2::config::interceptors::BeforeTransmitInterceptorContextRef;
use aws_sdk_ec2::config::{
    BehaviorVersion, ConfigBag, Credentials, Intercept, Region, RuntimeComponents,
};
use aws_sdk_ec2::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_ec2::types::{
    Filter, ResourceType, Tag, TagSpecification, Volume as Ec2Volume, VolumeAttachmentState,
    VolumeState, VolumeType as Ec2VolumeType,
};
use aws_smithy_runtime_api::box_error::BoxError;
use aws_smithy_runtime_api::client::orchestrator::Metadata;
use aws_smithy_types::retry::RetryConfig;
use aws_smithy_types::timeout::TimeoutConfig;
use tokio::sync::{Notify, oneshot};

use super::params::EbsSpec;
use crate::backend::BackendError;

/// Tag holding the CSI volume name (as aws-ebs-csi-driver names it).
pub const NAME_TAG: &str = "CSIVolumeName";
/// Tag holding the CSI snapshot name.
pub const SNAPSHOT_NAME_TAG: &str = "CSIVolumeSnapshotName";
/// Tag marking volumes this driver manages, with the cluster id as value.
pub const CLUSTER_TAG: &str = "stowage.csi.dev/cluster";

/// How to reach EC2.
#[derive(Debug, Clone)]
pub struct Ec2Settings {
    pub region: String,
    /// Endpoint override, e.g. an emulator (`http://127.0.0.1:5000`).
    pub endpoint: Option<String>,
    /// Static credentials (emulators, tests); otherwise the default AWS chain.
    pub static_credentials: Option<(String, String)>,
    /// Value of [`CLUSTER_TAG`] on volumes this cluster creates.
    pub cluster_id: String,
    /// Attempts per EC2 call (standard retry mode, with backoff).
    pub max_attempts: u32,
    /// Timeout of one attempt of one EC2 call.
    pub call_timeout: Duration,
    /// How long to wait for a volume to reach a state (available, attached, …).
    pub wait_timeout: Duration,
    /// First and largest pause between two DescribeVolumes of the waiter.
    pub wait_interval: (Duration, Duration),
}

impl Default for Ec2Settings {
    fn default() -> Self {
        Self {
            region: "us-east-1".into(),
            endpoint: None,
            static_credentials: None,
            cluster_id: "stowage".into(),
            max_attempts: 3,
            call_timeout: Duration::from_secs(15),
            wait_timeout: Duration::from_secs(120),
            wait_interval: (Duration::from_millis(200), Duration::from_secs(5)),
        }
    }
}

/// A volume as EC2 describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloudVolume {
    pub id: String,
    pub name: Option<String>,
    pub size_gib: u64,
    pub zone: String,
    pub state: String,
    pub volume_type: String,
    pub iops: Option<u32>,
    pub throughput: Option<u32>,
    pub encrypted: bool,
    pub kms_key_id: Option<String>,
    /// (instance id, device, state)
    pub attachments: Vec<(String, String, String)>,
    pub tags: BTreeMap<String, String>,
    /// CreateTime.
    pub created: Option<std::time::SystemTime>,
}

/// EC2 tags as a map (tags without a key are dropped).
fn tag_map(tags: &[Tag]) -> BTreeMap<String, String> {
    tags.iter()
        .filter_map(|t| {
            Some((
                t.key()?.to_owned(),
                t.value().unwrap_or_default().to_owned(),
            ))
        })
        .collect()
}

impl CloudVolume {
    fn from_ec2(v: &Ec2Volume) -> Self {
        let tags = tag_map(v.tags());
        Self {
            id: v.volume_id().unwrap_or_default().to_owned(),
            name: tags.get(NAME_TAG).cloned(),
            size_gib: v.size().unwrap_or_default().max(0) as u64,
            zone: v.availability_zone().unwrap_or_default().to_owned(),
            state: v.state().map(|s| s.as_str().to_owned()).unwrap_or_default(),
            volume_type: v
                .volume_type()
                .map(|t| t.as_str().to_owned())
                .unwrap_or_default(),
            iops: v.iops().map(|i| i.max(0) as u32),
            throughput: v.throughput().map(|t| t.max(0) as u32),
            encrypted: v.encrypted().unwrap_or(false),
            kms_key_id: v.kms_key_id().map(str::to_owned),
            attachments: v
                .attachments()
                .iter()
                .map(|a| {
                    (
                        a.instance_id().unwrap_or_default().to_owned(),
                        a.device().unwrap_or_default().to_owned(),
                        a.state().map(|s| s.as_str().to_owned()).unwrap_or_default(),
                    )
                })
                .collect(),
            tags,
            created: v
                .create_time()
                .and_then(|t| std::time::SystemTime::try_from(*t).ok()),
        }
    }

    /// The device this volume is attached as on `instance`, if attached there.
    pub fn attached_to(&self, instance: &str) -> Option<&str> {
        self.attachments
            .iter()
            .find(|(i, _, state)| {
                i == instance && state == VolumeAttachmentState::Attached.as_str()
            })
            .map(|(_, device, _)| device.as_str())
    }
}

/// A snapshot as EC2 describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloudSnapshot {
    pub id: String,
    pub name: Option<String>,
    pub volume_id: String,
    pub size_gib: u64,
    pub state: String,
    /// Seconds and nanoseconds since the Unix epoch.
    pub started: (i64, i32),
}

impl CloudSnapshot {
    fn from_ec2(s: &aws_sdk_ec2::types::Snapshot) -> Self {
        let name = s
            .tags()
            .iter()
            .find(|t| t.key() == Some(SNAPSHOT_NAME_TAG))
            .and_then(|t| t.value().map(str::to_owned));
        Self {
            id: s.snapshot_id().unwrap_or_default().to_owned(),
            name,
            volume_id: s.volume_id().unwrap_or_default().to_owned(),
            size_gib: s.volume_size().unwrap_or_default().max(0) as u64,
            state: s.state().map(|x| x.as_str().to_owned()).unwrap_or_default(),
            started: s
                .start_time()
                .map(|t| (t.secs(), t.subsec_nanos() as i32))
                .unwrap_or_default(),
        }
    }

    pub fn ready(&self) -> bool {
        self.state == aws_sdk_ec2::types::SnapshotState::Completed.as_str()
    }
}

/// Counts EC2 API calls (each HTTP attempt, retries included) by action.
#[derive(Debug, Default, Clone)]
pub struct CallCounts(Arc<Mutex<BTreeMap<String, u64>>>);

impl CallCounts {
    pub fn snapshot(&self) -> BTreeMap<String, u64> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Intercept for CallCounts {
    fn name(&self) -> &'static str {
        "stowage-call-counts"
    }

    fn read_before_transmit(
        &self,
        _context: &BeforeTransmitInterceptorContextRef<'_>,
        _components: &RuntimeComponents,
        config: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        if let Some(metadata) = config.load::<Metadata>() {
            *self
                .0
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .entry(metadata.name().to_owned())
                .or_default() += 1;
        }
        Ok(())
    }
}

/// EC2 errors in backend terms. `what` names the operation and object.
fn map_sdk<E, R>(what: &str, error: SdkError<E, R>) -> BackendError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug,
{
    let (code, message) = match &error {
        SdkError::ServiceError(e) => (
            e.err().code().unwrap_or_default().to_owned(),
            e.err().message().unwrap_or_default().to_owned(),
        ),
        SdkError::TimeoutError(_) => {
            return BackendError::Timeout(format!("{what}: EC2 did not answer in time"));
        }
        SdkError::DispatchFailure(e) => {
            return BackendError::Unavailable(format!("{what}: cannot reach EC2: {e:?}"));
        }
        other => (String::new(), format!("{other:?}")),
    };
    let text = if code.is_empty() {
        format!("{what}: {message}")
    } else {
        format!("{what}: {code}: {message}")
    };
    match code.as_str() {
        "InvalidVolume.NotFound"
        | "InvalidInstanceID.NotFound"
        | "InvalidInstanceID.Malformed"
        | "InvalidVolumeID.Malformed"
        | "InvalidSnapshot.NotFound" => BackendError::NotFound(text),
        "VolumeInUse" | "IncorrectState" | "InvalidVolume.ZoneMismatch" => {
            BackendError::InUse(text)
        }
        "IdempotentParameterMismatch" => BackendError::AlreadyExists(text),
        "InvalidParameterValue"
        | "InvalidParameterCombination"
        | "InvalidParameter"
        | "MissingParameter"
        | "InvalidParameterDependency"
        | "InvalidZone.NotFound"
        | "InvalidKMSKey.NotFound" => BackendError::InvalidParameter(text),
        "AttachmentLimitExceeded"
        | "VolumeLimitExceeded"
        | "MaxIOPSLimitExceeded"
        | "InsufficientVolumeCapacity" => BackendError::Exhausted(text),
        "RequestLimitExceeded"
        | "Throttling"
        | "ServiceUnavailable"
        | "Unavailable"
        | "InternalError" => BackendError::Unavailable(text),
        "UnauthorizedOperation" | "AuthFailure" => BackendError::PermissionDenied(text),
        "" if matches!(&error, SdkError::ResponseError(_)) => BackendError::Unavailable(text),
        _ => BackendError::Internal(text),
    }
}

/// Does this error say the endpoint has no CopyVolumes (rather than that this copy
/// failed)?
fn copy_volumes_unsupported<E>(
    error: &SdkError<E, aws_smithy_runtime_api::client::orchestrator::HttpResponse>,
) -> bool
where
    E: ProvideErrorMetadata,
{
    let status = |raw: Option<u16>| raw.is_some_and(|s| s == 500 || s == 501);
    match error {
        SdkError::ServiceError(e) => match e.err().code() {
            Some(
                "InvalidAction" | "UnsupportedOperation" | "UnknownOperation" | "NotImplemented",
            ) => true,
            None => status(Some(e.raw().status().as_u16())),
            Some(_) => false,
        },
        SdkError::ResponseError(e) => status(Some(e.raw().status().as_u16())),
        _ => false,
    }
}

/// What a waiter waits for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Want {
    Available,
    /// The size EC2 reports has reached this many GiB (a modification took effect).
    SizeAtLeast(u64),
    AttachedTo(String),
    DetachedFrom(String),
}

impl Want {
    fn met(&self, volume: &CloudVolume) -> bool {
        match self {
            Want::Available => volume.state == VolumeState::Available.as_str(),
            Want::SizeAtLeast(gib) => volume.size_gib >= *gib,
            Want::AttachedTo(instance) => volume.attached_to(instance).is_some(),
            Want::DetachedFrom(instance) => {
                !volume.attachments.iter().any(|(i, _, _)| i == instance)
            }
        }
    }

    /// A state that will never reach the goal.
    fn failed(&self, volume: &CloudVolume) -> bool {
        matches!(self, Want::Available) && volume.state == VolumeState::Error.as_str()
    }
}

struct Waiting {
    volume_id: String,
    want: Want,
    deadline: Instant,
    reply: oneshot::Sender<Result<CloudVolume, BackendError>>,
}

/// The EC2 client plus the batched waiter.
pub struct Cloud {
    client: Client,
    calls: CallCounts,
    settings: Ec2Settings,
    waiting: Arc<Mutex<Vec<Waiting>>>,
    wake: Arc<Notify>,
}

impl Cloud {
    /// Build the client and start the waiter task (on the current runtime).
    pub async fn new(settings: Ec2Settings) -> Self {
        let calls = CallCounts::default();
        let mut builder = match &settings.static_credentials {
            Some((key, secret)) => aws_sdk_ec2::Config::builder()
                .behavior_version(BehaviorVersion::latest())
                .credentials_provider(Credentials::new(key, secret, None, None, "stowage-static")),
            None => {
                let shared = aws_config::defaults(aws_config::BehaviorVersion::latest())
                    .region(Region::new(settings.region.clone()))
                    .load()
                    .await;
                aws_sdk_ec2::config::Builder::from(&shared)
            }
        };
        builder = builder
            .region(Region::new(settings.region.clone()))
            .retry_config(RetryConfig::standard().with_max_attempts(settings.max_attempts.max(1)))
            .timeout_config(
                TimeoutConfig::builder()
                    .operation_attempt_timeout(settings.call_timeout)
                    .build(),
            )
            .interceptor(calls.clone());
        if let Some(endpoint) = &settings.endpoint {
            builder = builder.endpoint_url(endpoint);
        }
        let cloud = Self {
            client: Client::from_conf(builder.build()),
            calls,
            settings,
            waiting: Arc::default(),
            wake: Arc::default(),
        };
        cloud.spawn_waiter();
        cloud
    }

    pub fn settings(&self) -> &Ec2Settings {
        &self.settings
    }

    /// EC2 calls made so far, by action.
    pub fn call_counts(&self) -> BTreeMap<String, u64> {
        self.calls.snapshot()
    }

    /// The region's availability zones (DescribeAvailabilityZones): the cheapest call
    /// that proves EC2 answers with these credentials.
    pub async fn zones(&self) -> Result<Vec<String>, BackendError> {
        let out = self
            .client
            .describe_availability_zones()
            .send()
            .await
            .map_err(|e| map_sdk("DescribeAvailabilityZones", e))?;
        Ok(out
            .availability_zones()
            .iter()
            .filter_map(|z| z.zone_name().map(str::to_owned))
            .collect())
    }

    /// Every volume of this cluster (paginated DescribeVolumes on the cluster tag).
    pub async fn cluster_volumes(&self) -> Result<Vec<CloudVolume>, BackendError> {
        let mut volumes = Vec::new();
        let mut token = None;
        loop {
            let out = self
                .client
                .describe_volumes()
                .filters(
                    Filter::builder()
                        .name(format!("tag:{CLUSTER_TAG}"))
                        .values(&self.settings.cluster_id)
                        .build(),
                )
                .set_next_token(token)
                .send()
                .await
                .map_err(|e| map_sdk("DescribeVolumes (cluster volumes)", e))?;
            volumes.extend(out.volumes().iter().map(CloudVolume::from_ec2));
            match out.next_token() {
                Some(next) if !next.is_empty() => token = Some(next.to_owned()),
                _ => return Ok(volumes),
            }
        }
    }

    /// This cluster's volume named `name` (by its CSIVolumeName tag), if any.
    pub async fn find_by_name(&self, name: &str) -> Result<Option<CloudVolume>, BackendError> {
        let out = self
            .client
            .describe_volumes()
            .filters(
                Filter::builder()
                    .name(format!("tag:{CLUSTER_TAG}"))
                    .values(&self.settings.cluster_id)
                    .build(),
            )
            .filters(
                Filter::builder()
                    .name(format!("tag:{NAME_TAG}"))
                    .values(name)
                    .build(),
            )
            .send()
            .await
            .map_err(|e| map_sdk(&format!("DescribeVolumes (name {name})"), e))?;
        Ok(out.volumes().first().map(CloudVolume::from_ec2))
    }

    /// Volumes by id; ids that don't exist are left out (no error).
    pub async fn describe(&self, ids: &[String]) -> Result<Vec<CloudVolume>, BackendError> {
        if ids.is_empty() {
            return Ok(vec![]);
        }
        // Filtering by volume-id (not VolumeIds) makes unknown ids drop out instead
        // of failing the whole call.
        let out = self
            .client
            .describe_volumes()
            .filters(
                Filter::builder()
                    .name("volume-id")
                    .set_values(Some(ids.to_vec()))
                    .build(),
            )
            .send()
            .await
            .map_err(|e| map_sdk("DescribeVolumes", e))?;
        Ok(out.volumes().iter().map(CloudVolume::from_ec2).collect())
    }

    /// One volume by id; `None` when it doesn't exist.
    pub async fn get(&self, id: &str) -> Result<Option<CloudVolume>, BackendError> {
        Ok(self.describe(&[id.to_owned()]).await?.into_iter().next())
    }

    /// CreateVolume with the name and cluster tags and a ClientToken derived from the
    /// name (EC2 answers a retry with the same volume; emulators may not).
    pub async fn create(
        &self,
        name: &str,
        spec: &EbsSpec,
        zone: &str,
        snapshot: Option<&str>,
    ) -> Result<CloudVolume, BackendError> {
        let mut tags = vec![
            Tag::builder().key(NAME_TAG).value(name).build(),
            Tag::builder()
                .key(CLUSTER_TAG)
                .value(&self.settings.cluster_id)
                .build(),
        ];
        tags.extend(
            spec.tags
                .iter()
                .map(|(k, v)| Tag::builder().key(k).value(v).build()),
        );
        let mut request = self
            .client
            .create_volume()
            .availability_zone(zone)
            .size(i32::try_from(spec.size_gib).unwrap_or(i32::MAX))
            .volume_type(Ec2VolumeType::from(spec.volume_type.as_str()))
            .encrypted(spec.encrypted)
            .client_token(client_token(name))
            .tag_specifications(
                TagSpecification::builder()
                    .resource_type(ResourceType::Volume)
                    .set_tags(Some(tags))
                    .build(),
            );
        if let Some(iops) = spec.iops {
            request = request.iops(iops as i32);
        }
        if let Some(throughput) = spec.throughput_mibps {
            request = request.throughput(throughput as i32);
        }
        if let Some(key) = &spec.kms_key_id {
            request = request.kms_key_id(key);
        }
        if let Some(snapshot) = snapshot {
            request = request.snapshot_id(snapshot);
        }
        let out = request
            .send()
            .await
            .map_err(|e| map_sdk(&format!("CreateVolume {name}"), e))?;
        let id = out.volume_id().unwrap_or_default().to_owned();
        Ok(CloudVolume {
            id,
            name: Some(name.to_owned()),
            size_gib: out.size().unwrap_or_default().max(0) as u64,
            zone: out.availability_zone().unwrap_or(zone).to_owned(),
            state: out
                .state()
                .map(|s| s.as_str().to_owned())
                .unwrap_or_default(),
            volume_type: out
                .volume_type()
                .map(|t| t.as_str().to_owned())
                .unwrap_or_default(),
            iops: out.iops().map(|i| i.max(0) as u32),
            throughput: out.throughput().map(|t| t.max(0) as u32),
            encrypted: out.encrypted().unwrap_or(false),
            kms_key_id: out.kms_key_id().map(str::to_owned),
            attachments: vec![],
            tags: tag_map(out.tags()),
            created: out
                .create_time()
                .and_then(|t| std::time::SystemTime::try_from(*t).ok()),
        })
    }

    /// CopyVolumes: an instant copy of `source` in its zone, tagged with `name` and the
    /// cluster, with a ClientToken from the name (EC2 answers a retry with the same
    /// copy). `Ok(None)` when this endpoint does not offer CopyVolumes (an older
    /// region or partition answers InvalidAction/UnsupportedOperation; an emulator
    /// without it fails with a 5xx and no code): the caller clones another way.
    pub async fn copy_volume(
        &self,
        source: &CloudVolume,
        name: &str,
        spec: &EbsSpec,
    ) -> Result<Option<CloudVolume>, BackendError> {
        let mut tags = vec![
            Tag::builder().key(NAME_TAG).value(name).build(),
            Tag::builder()
                .key(CLUSTER_TAG)
                .value(&self.settings.cluster_id)
                .build(),
        ];
        tags.extend(
            spec.tags
                .iter()
                .map(|(k, v)| Tag::builder().key(k).value(v).build()),
        );
        let mut request = self
            .client
            .copy_volumes()
            .source_volume_id(&source.id)
            .size(i32::try_from(spec.size_gib).unwrap_or(i32::MAX))
            .volume_type(Ec2VolumeType::from(spec.volume_type.as_str()))
            .client_token(client_token(name))
            .tag_specifications(
                TagSpecification::builder()
                    .resource_type(ResourceType::Volume)
                    .set_tags(Some(tags))
                    .build(),
            );
        if let Some(iops) = spec.iops {
            request = request.iops(iops as i32);
        }
        if let Some(throughput) = spec.throughput_mibps {
            request = request.throughput(throughput as i32);
        }
        match request.send().await {
            Ok(out) => {
                let copy = out
                    .volumes()
                    .first()
                    .map(CloudVolume::from_ec2)
                    .ok_or_else(|| {
                        BackendError::Internal(format!(
                            "CopyVolumes {name} of {}: EC2 answered without a volume",
                            source.id
                        ))
                    })?;
                Ok(Some(copy))
            }
            Err(error) if copy_volumes_unsupported(&error) => {
                tracing::info!(error = ?error, "CopyVolumes is not offered by this EC2 endpoint");
                Ok(None)
            }
            Err(error) => Err(map_sdk(
                &format!("CopyVolumes {name} of {}", source.id),
                error,
            )),
        }
    }

    /// DeleteVolume; a volume that is already gone is fine.
    pub async fn delete(&self, id: &str) -> Result<(), BackendError> {
        match self.client.delete_volume().volume_id(id).send().await {
            Ok(_) => Ok(()),
            Err(e) => match map_sdk(&format!("DeleteVolume {id}"), e) {
                BackendError::NotFound(_) => Ok(()),
                other => Err(other),
            },
        }
    }

    /// Device names in use on an instance (block device mappings).
    pub async fn instance_devices(&self, instance: &str) -> Result<Vec<String>, BackendError> {
        let out = self
            .client
            .describe_instances()
            .instance_ids(instance)
            .send()
            .await
            .map_err(|e| map_sdk(&format!("DescribeInstances {instance}"), e))?;
        let instance_found = out.reservations().iter().flat_map(|r| r.instances()).next();
        let Some(found) = instance_found else {
            return Err(BackendError::NotFound(format!(
                "instance {instance} does not exist"
            )));
        };
        Ok(found
            .block_device_mappings()
            .iter()
            .filter_map(|m| m.device_name().map(str::to_owned))
            .collect())
    }

    pub async fn attach(&self, id: &str, instance: &str, device: &str) -> Result<(), BackendError> {
        self.client
            .attach_volume()
            .volume_id(id)
            .instance_id(instance)
            .device(device)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| map_sdk(&format!("AttachVolume {id} to {instance} as {device}"), e))
    }

    pub async fn detach(&self, id: &str, instance: &str) -> Result<(), BackendError> {
        self.client
            .detach_volume()
            .volume_id(id)
            .instance_id(instance)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| map_sdk(&format!("DetachVolume {id} from {instance}"), e))
    }

    /// This cluster's snapshots, optionally only the one named `name`.
    pub async fn snapshots(&self, name: Option<&str>) -> Result<Vec<CloudSnapshot>, BackendError> {
        let mut request = self.client.describe_snapshots().filters(
            Filter::builder()
                .name(format!("tag:{CLUSTER_TAG}"))
                .values(&self.settings.cluster_id)
                .build(),
        );
        if let Some(name) = name {
            request = request.filters(
                Filter::builder()
                    .name(format!("tag:{SNAPSHOT_NAME_TAG}"))
                    .values(name)
                    .build(),
            );
        }
        let out = request
            .send()
            .await
            .map_err(|e| map_sdk("DescribeSnapshots", e))?;
        Ok(out
            .snapshots()
            .iter()
            .map(CloudSnapshot::from_ec2)
            .collect())
    }

    /// One snapshot by id; `None` when it doesn't exist.
    pub async fn snapshot(&self, id: &str) -> Result<Option<CloudSnapshot>, BackendError> {
        let out = self
            .client
            .describe_snapshots()
            .filters(Filter::builder().name("snapshot-id").values(id).build())
            .send()
            .await
            .map_err(|e| map_sdk(&format!("DescribeSnapshots {id}"), e))?;
        Ok(out.snapshots().first().map(CloudSnapshot::from_ec2))
    }

    pub async fn create_snapshot(
        &self,
        volume_id: &str,
        name: &str,
    ) -> Result<CloudSnapshot, BackendError> {
        let tags = vec![
            Tag::builder().key(SNAPSHOT_NAME_TAG).value(name).build(),
            Tag::builder()
                .key(CLUSTER_TAG)
                .value(&self.settings.cluster_id)
                .build(),
        ];
        let out = self
            .client
            .create_snapshot()
            .volume_id(volume_id)
            .description(format!("stowage snapshot {name}"))
            .tag_specifications(
                TagSpecification::builder()
                    .resource_type(ResourceType::Snapshot)
                    .set_tags(Some(tags))
                    .build(),
            )
            .send()
            .await
            .map_err(|e| map_sdk(&format!("CreateSnapshot {name} of {volume_id}"), e))?;
        Ok(CloudSnapshot {
            id: out.snapshot_id().unwrap_or_default().to_owned(),
            name: Some(name.to_owned()),
            volume_id: out.volume_id().unwrap_or(volume_id).to_owned(),
            size_gib: out.volume_size().unwrap_or_default().max(0) as u64,
            state: out
                .state()
                .map(|x| x.as_str().to_owned())
                .unwrap_or_default(),
            started: out
                .start_time()
                .map(|t| (t.secs(), t.subsec_nanos() as i32))
                .unwrap_or_default(),
        })
    }

    /// DeleteSnapshot; one that is already gone is fine.
    pub async fn delete_snapshot(&self, id: &str) -> Result<(), BackendError> {
        match self.client.delete_snapshot().snapshot_id(id).send().await {
            Ok(_) => Ok(()),
            Err(e) => match map_sdk(&format!("DeleteSnapshot {id}"), e) {
                BackendError::NotFound(_) => Ok(()),
                other => Err(other),
            },
        }
    }

    /// ModifyVolume type and performance.
    pub async fn modify(
        &self,
        id: &str,
        volume_type: &str,
        iops: Option<u32>,
        throughput: Option<u32>,
    ) -> Result<(), BackendError> {
        let mut request = self
            .client
            .modify_volume()
            .volume_id(id)
            .volume_type(Ec2VolumeType::from(volume_type));
        if let Some(iops) = iops {
            request = request.iops(iops as i32);
        }
        if let Some(throughput) = throughput {
            request = request.throughput(throughput as i32);
        }
        request
            .send()
            .await
            .map(|_| ())
            .map_err(|e| map_sdk(&format!("ModifyVolume {id}"), e))
    }

    /// ModifyVolume to a new size (EC2 grows volumes only).
    pub async fn resize(&self, id: &str, size_gib: u64) -> Result<(), BackendError> {
        self.client
            .modify_volume()
            .volume_id(id)
            .size(i32::try_from(size_gib).unwrap_or(i32::MAX))
            .send()
            .await
            .map(|_| ())
            .map_err(|e| map_sdk(&format!("ModifyVolume {id} to {size_gib} GiB"), e))
    }

    /// Wait until `id` reaches `want`. Concurrent waits share one DescribeVolumes per
    /// tick; the pause between ticks grows from the first to the largest interval.
    pub async fn wait(&self, id: &str, want: Want) -> Result<CloudVolume, BackendError> {
        let (reply, answer) = oneshot::channel();
        self.waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Waiting {
                volume_id: id.to_owned(),
                want,
                deadline: Instant::now() + self.settings.wait_timeout,
                reply,
            });
        self.wake.notify_one();
        answer
            .await
            .map_err(|_| BackendError::Internal("the EBS waiter stopped".into()))?
    }

    fn spawn_waiter(&self) {
        let client = self.client.clone();
        let waiting = Arc::clone(&self.waiting);
        let wake = Arc::clone(&self.wake);
        let (first, largest) = self.settings.wait_interval;
        // Hold only weak references so the task ends with the Cloud.
        let alive = Arc::downgrade(&self.waiting);
        tokio::spawn(async move {
            let mut pause = first;
            loop {
                if waiting.lock().unwrap_or_else(|e| e.into_inner()).is_empty() {
                    pause = first;
                    wake.notified().await;
                    if alive.strong_count() <= 1 {
                        return;
                    }
                }
                let ids: Vec<String> = {
                    let list = waiting.lock().unwrap_or_else(|e| e.into_inner());
                    let mut ids: Vec<String> = list.iter().map(|w| w.volume_id.clone()).collect();
                    ids.sort();
                    ids.dedup();
                    ids
                };
                let described = client
                    .describe_volumes()
                    .filters(
                        Filter::builder()
                            .name("volume-id")
                            .set_values(Some(ids))
                            .build(),
                    )
                    .send()
                    .await;
                let now = Instant::now();
                let more = {
                    let volumes: HashMap<String, CloudVolume> = match &described {
                        Ok(out) => out
                            .volumes()
                            .iter()
                            .map(|v| {
                                let v = CloudVolume::from_ec2(v);
                                (v.id.clone(), v)
                            })
                            .collect(),
                        Err(_) => HashMap::new(),
                    };
                    let described_ok = described.is_ok();
                    let mut list = waiting.lock().unwrap_or_else(|e| e.into_inner());
                    let pending = std::mem::take(&mut *list);
                    for w in pending {
                        match resolve(&w, described_ok, volumes.get(&w.volume_id), now) {
                            Some(result) => {
                                let _ = w.reply.send(result);
                            }
                            None => list.push(w),
                        }
                    }
                    !list.is_empty()
                };
                if more {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(largest);
                }
            }
        });
    }
}

/// The answer for one waiter after a DescribeVolumes, or `None` to keep waiting.
fn resolve(
    w: &Waiting,
    described: bool,
    volume: Option<&CloudVolume>,
    now: Instant,
) -> Option<Result<CloudVolume, BackendError>> {
    match (described, volume) {
        (true, Some(v)) if w.want.met(v) => Some(Ok(v.clone())),
        (true, Some(v)) if w.want.failed(v) => Some(Err(BackendError::Internal(format!(
            "volume {} went to state {}",
            v.id, v.state
        )))),
        (true, None) if w.want != Want::Available || now > w.deadline => Some(Err(
            BackendError::NotFound(format!("volume {} does not exist", w.volume_id)),
        )),
        _ if now > w.deadline => Some(Err(BackendError::Timeout(format!(
            "volume {} did not become {:?} within the wait timeout",
            w.volume_id, w.want
        )))),
        _ => None,
    }
}

impl Drop for Cloud {
    fn drop(&mut self) {
        // Let the waiter task notice it is alone and end.
        self.wake.notify_one();
    }
}

/// A ClientToken derived from the volume name: stable across retries and restarts,
/// at most 64 ASCII characters as EC2 requires.
pub fn client_token(name: &str) -> String {
    // FNV-1a over the name with two seeds: stable across processes and versions
    // (std's hasher is randomly seeded).
    let fnv = |seed: u64| {
        name.bytes()
            .fold(seed, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100000001b3))
    };
    format!(
        "stowage-{:016x}{:016x}",
        fnv(0xcbf29ce484222325),
        fnv(0x84222325cbf29ce4)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_tokens_are_stable_short_and_distinct() {
        let a = client_token("pvc-1");
        assert_eq!(a, client_token("pvc-1"));
        assert_ne!(a, client_token("pvc-2"));
        assert!(a.len() <= 64 && a.is_ascii());
        assert_eq!(client_token(&"x".repeat(128)).len(), a.len());
    }
}
