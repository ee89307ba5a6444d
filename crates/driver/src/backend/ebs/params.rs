//! The EBS StorageClass parameters, named as aws-ebs-csi-driver names them (`type`,
//! `iops`, `iopsPerGB`, `allowAutoIOPSPerGBIncrease`, `throughput`, `encrypted`,
//! `kmsKeyId`, `tagSpecification_<N>`, `blockSize`, `inodeSize`, `bytesPerInode`,
//! `numberOfInodes`), turned into a checked [`EbsSpec`] by [`spec`].
//!
//! This module owns EC2's volume rules: the size, IOPS and throughput limits of every
//! volume type ([`Limits`], one table per type), the tag rules, and the mkfs options a
//! filesystem type accepts. stowage enforces them itself, before any call to EC2, so a
//! bad StorageClass fails with a message that names the key and the allowed range (and
//! so EC2 emulators that accept anything behave like EC2). Pure: no I/O, no AWS SDK.
//!
//! Keys are matched case-insensitively, as aws-ebs-csi-driver matches them (`IOPS` is
//! `iops`); values are case-sensitive (`type: GP3` is an error, as EC2 would make it).
//!
//! Limits as of the EC2 API reference for CreateVolume (gp3 raised to 64 TiB, 80,000
//! IOPS and 2,000 MiB/s in September 2025). aws-ebs-csi-driver learns the IOPS maxima
//! from a dry-run CreateVolume and falls back to older constants (gp3 16,000); where the
//! two disagree the table follows EC2.

use std::collections::BTreeMap;
use std::fmt;

use serde::Deserialize;

use stowage_api::keys::{FSTYPE_KEY, PV_NAME, PVC_NAME, PVC_NAMESPACE, RESERVED_PREFIX};

use crate::backend::params::{ParameterError, parse, render_value};
use stowage_api::volume::{Bytes, CapacityRange, GIB};

/// Size of a volume whose claim asks for no particular size (aws-ebs-csi-driver's
/// `DefaultVolumeSize`), raised to the type's minimum (st1 and sc1 start at 125 GiB).
pub const DEFAULT_SIZE_GIB: u64 = 100;

/// Tag parameters are `tagSpecification_<N>: "key=value"`.
pub const TAG_PREFIX: &str = "tagSpecification";

/// EC2 allows 50 tags per volume; stowage keeps this many for its own (volume name,
/// cluster, claim metadata), so StorageClasses may add at most the rest.
pub const RESERVED_TAG_SLOTS: usize = 10;
/// Most user tags (`tagSpecification_<N>`) a StorageClass may set.
pub const MAX_USER_TAGS: usize = 50 - RESERVED_TAG_SLOTS;
/// EC2 tag limits, in Unicode characters.
pub const MAX_TAG_KEY_CHARS: usize = 128;
pub const MAX_TAG_VALUE_CHARS: usize = 256;

/// Tag keys stowage (or EC2) owns; a StorageClass must not set them. aws-ebs-csi-driver
/// reserves the same keys (plus its driver-name prefix, here stowage's).
pub const RESERVED_TAG_KEYS: [&str; 3] = [
    "CSIVolumeName",
    "CSIVolumeSnapshotName",
    "KubernetesCluster",
];
/// Tag key prefixes stowage (or EC2: `aws:`) owns. `kubernetes.io` covers
/// `kubernetes.io/cluster/*` and `kubernetes.io/created-for/*`.
pub const RESERVED_TAG_PREFIXES: [&str; 4] = [
    "kubernetes.io",
    "ebs.csi.aws.com/",
    "stowage.csi.dev/",
    "aws:",
];

/// An inclusive range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    pub min: u64,
    pub max: u64,
}

impl Bounds {
    pub const fn new(min: u64, max: u64) -> Self {
        Self { min, max }
    }

    pub const fn contains(self, value: u64) -> bool {
        self.min <= value && value <= self.max
    }
}

impl fmt::Display for Bounds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}–{}", self.min, self.max)
    }
}

/// Provisioned IOPS rules of a volume type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IopsLimits {
    /// IOPS a volume may be given; `range.min` is also EC2's default when none is asked.
    pub range: Bounds,
    /// Most IOPS per GiB of size; `range.min` is allowed at any size.
    pub per_gib: u64,
    /// EC2 needs an IOPS value for this type (`iops` or `iopsPerGB`).
    pub required: bool,
}

impl IopsLimits {
    /// The most IOPS a volume of `size_gib` may have.
    pub fn max_for_size(self, size_gib: u64) -> u64 {
        self.per_gib
            .saturating_mul(size_gib)
            .clamp(self.range.min, self.range.max)
    }
}

/// Provisioned throughput rules of a volume type, in MiB/s.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThroughputLimits {
    pub range: Bounds,
    /// Each MiB/s needs this many IOPS (EC2: at most 0.25 MiB/s per IOPS).
    pub iops_per_mibps: u64,
}

/// What EC2 allows for one volume type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub size_gib: Bounds,
    /// `None`: the type has no provisioned IOPS (`iops`/`iopsPerGB` are errors).
    pub iops: Option<IopsLimits>,
    /// `None`: the type has no provisioned throughput (`throughput` is an error).
    pub throughput: Option<ThroughputLimits>,
}

/// gp3: 1 GiB–64 TiB; 3,000 (baseline) to 80,000 IOPS at most 500 per GiB; 125 (baseline)
/// to 2,000 MiB/s at most 0.25 MiB/s per IOPS.
pub const GP3_LIMITS: Limits = Limits {
    size_gib: Bounds::new(1, 65_536),
    iops: Some(IopsLimits {
        range: Bounds::new(3_000, 80_000),
        per_gib: 500,
        required: false,
    }),
    throughput: Some(ThroughputLimits {
        range: Bounds::new(125, 2_000),
        iops_per_mibps: 4,
    }),
};

/// gp2: 1 GiB–16 TiB; IOPS follow the size (3 per GiB), not provisioned.
pub const GP2_LIMITS: Limits = Limits {
    size_gib: Bounds::new(1, 16_384),
    iops: None,
    throughput: None,
};

/// io1: 4 GiB–16 TiB; 100 to 64,000 IOPS, at most 50 per GiB; IOPS required.
pub const IO1_LIMITS: Limits = Limits {
    size_gib: Bounds::new(4, 16_384),
    iops: Some(IopsLimits {
        range: Bounds::new(100, 64_000),
        per_gib: 50,
        required: true,
    }),
    throughput: None,
};

/// io2 (all io2 is Block Express now): 4 GiB–64 TiB; 100 to 256,000 IOPS, at most 1,000
/// per GiB; IOPS required.
pub const IO2_LIMITS: Limits = Limits {
    size_gib: Bounds::new(4, 65_536),
    iops: Some(IopsLimits {
        range: Bounds::new(100, 256_000),
        per_gib: 1_000,
        required: true,
    }),
    throughput: None,
};

/// st1: 125 GiB–16 TiB; throughput follows the size.
pub const ST1_LIMITS: Limits = Limits {
    size_gib: Bounds::new(125, 16_384),
    iops: None,
    throughput: None,
};

/// sc1: 125 GiB–16 TiB; throughput follows the size.
pub const SC1_LIMITS: Limits = Limits {
    size_gib: Bounds::new(125, 16_384),
    iops: None,
    throughput: None,
};

/// standard (magnetic, previous generation): 1 GiB–1 TiB.
pub const STANDARD_LIMITS: Limits = Limits {
    size_gib: Bounds::new(1, 1_024),
    iops: None,
    throughput: None,
};

/// An EBS volume type, the `type` parameter. Default gp3, as in aws-ebs-csi-driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum VolumeType {
    #[default]
    Gp3,
    Gp2,
    Io1,
    Io2,
    St1,
    Sc1,
    Standard,
}

impl VolumeType {
    pub const ALL: [VolumeType; 7] = [
        VolumeType::Gp3,
        VolumeType::Gp2,
        VolumeType::Io1,
        VolumeType::Io2,
        VolumeType::St1,
        VolumeType::Sc1,
        VolumeType::Standard,
    ];

    /// The EC2 name (`gp3`).
    pub fn as_str(self) -> &'static str {
        match self {
            VolumeType::Gp3 => "gp3",
            VolumeType::Gp2 => "gp2",
            VolumeType::Io1 => "io1",
            VolumeType::Io2 => "io2",
            VolumeType::St1 => "st1",
            VolumeType::Sc1 => "sc1",
            VolumeType::Standard => "standard",
        }
    }

    /// EC2's limits for this type.
    pub fn limits(self) -> &'static Limits {
        match self {
            VolumeType::Gp3 => &GP3_LIMITS,
            VolumeType::Gp2 => &GP2_LIMITS,
            VolumeType::Io1 => &IO1_LIMITS,
            VolumeType::Io2 => &IO2_LIMITS,
            VolumeType::St1 => &ST1_LIMITS,
            VolumeType::Sc1 => &SC1_LIMITS,
            VolumeType::Standard => &STANDARD_LIMITS,
        }
    }

    /// Parse a `type` value. Empty means the default (the driver passes "" on as gp3).
    /// EC2 names are lowercase and EC2 rejects other spellings, so `GP3` is an error
    /// (one that says which spelling to use).
    pub fn from_parameter(value: &str) -> Result<Self, ParameterError> {
        if value.is_empty() {
            return Ok(VolumeType::default());
        }
        if let Some(t) = Self::ALL.into_iter().find(|t| t.as_str() == value) {
            return Ok(t);
        }
        let hint = Self::ALL
            .into_iter()
            .find(|t| t.as_str().eq_ignore_ascii_case(value.trim()))
            .map(|t| format!(" (did you mean {}?)", t.as_str()))
            .unwrap_or_default();
        Err(invalid(format!(
            "parameter `type` is {value:?}{hint}; expected one of {}",
            Self::ALL.map(VolumeType::as_str).join(", ")
        )))
    }
}

impl fmt::Display for VolumeType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The filesystem made on a new volume. Default ext4, as in aws-ebs-csi-driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum FsType {
    #[default]
    Ext4,
    Ext3,
    Xfs,
}

impl FsType {
    pub const ALL: [FsType; 3] = [FsType::Ext4, FsType::Ext3, FsType::Xfs];

    pub fn as_str(self) -> &'static str {
        match self {
            FsType::Ext4 => "ext4",
            FsType::Ext3 => "ext3",
            FsType::Xfs => "xfs",
        }
    }

    /// The program that makes this filesystem (`mkfs.ext4`).
    pub fn mkfs_program(self) -> &'static str {
        match self {
            FsType::Ext4 => "mkfs.ext4",
            FsType::Ext3 => "mkfs.ext3",
            FsType::Xfs => "mkfs.xfs",
        }
    }

    fn is_ext(self) -> bool {
        matches!(self, FsType::Ext4 | FsType::Ext3)
    }

    /// Parse an fs type name; empty means the default. Case-sensitive, like mount(8).
    pub fn from_name(name: &str) -> Result<Self, String> {
        if name.is_empty() {
            return Ok(FsType::default());
        }
        Self::ALL
            .into_iter()
            .find(|t| t.as_str() == name)
            .ok_or_else(|| {
                format!(
                    "fstype {name:?} is not supported; expected one of {}",
                    Self::ALL.map(FsType::as_str).join(", ")
                )
            })
    }
}

impl fmt::Display for FsType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How the node formats a new volume: the fs type and the checked mkfs options.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FsOptions {
    pub fs_type: FsType,
    /// `blockSize`, bytes.
    pub block_size: Option<u32>,
    /// `inodeSize`, bytes.
    pub inode_size: Option<u32>,
    /// `bytesPerInode` (ext3/ext4 only).
    pub bytes_per_inode: Option<u64>,
    /// `numberOfInodes` (ext3/ext4 only).
    pub number_of_inodes: Option<u64>,
}

impl FsOptions {
    /// Arguments for [`FsType::mkfs_program`], before the device, as aws-ebs-csi-driver
    /// passes them:
    ///
    /// | option | ext3 / ext4 (mke2fs) | xfs (mkfs.xfs) |
    /// |---|---|---|
    /// | `block_size` | `-b N` | `-b size=N` |
    /// | `inode_size` | `-I N` | `-i size=N` |
    /// | `bytes_per_inode` | `-i N` | — |
    /// | `number_of_inodes` | `-N N` | — |
    ///
    /// Empty when no option is set (mkfs defaults). Force/quiet flags are the caller's.
    pub fn mkfs_args(&self) -> Vec<String> {
        let mut args = Vec::new();
        let xfs = self.fs_type == FsType::Xfs;
        if let Some(size) = self.block_size {
            args.push("-b".to_owned());
            args.push(if xfs {
                format!("size={size}")
            } else {
                size.to_string()
            });
        }
        if let Some(size) = self.inode_size {
            if xfs {
                args.extend(["-i".to_owned(), format!("size={size}")]);
            } else {
                args.extend(["-I".to_owned(), size.to_string()]);
            }
        }
        if let Some(ratio) = self.bytes_per_inode {
            args.extend(["-i".to_owned(), ratio.to_string()]);
        }
        if let Some(count) = self.number_of_inodes {
            args.extend(["-N".to_owned(), count.to_string()]);
        }
        args
    }
}

/// A checked EBS volume request: what CreateVolume sends and how the node formats it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EbsSpec {
    pub volume_type: VolumeType,
    pub size_gib: u64,
    /// Provisioned IOPS; `None` leaves EC2's default (gp3: 3,000; others: none).
    pub iops: Option<u32>,
    /// Provisioned throughput (gp3 only); `None` leaves EC2's default (125 MiB/s).
    pub throughput_mibps: Option<u32>,
    pub encrypted: bool,
    pub kms_key_id: Option<String>,
    /// User tags from `tagSpecification_<N>`, templates rendered. stowage's own tags are
    /// not here (and may not be overridden).
    pub tags: BTreeMap<String, String>,
    pub fs: FsOptions,
}

/// The canonical spelling of every non-reserved, non-tag key. Keys are matched against
/// these case-insensitively; [`Raw`] must name the same keys.
pub const KEYS: [&str; 12] = [
    "type",
    "iops",
    "iopsPerGB",
    "allowAutoIOPSPerGBIncrease",
    "throughput",
    "encrypted",
    "kmsKeyId",
    "blockSize",
    "inodeSize",
    "bytesPerInode",
    "numberOfInodes",
    "blockExpress",
];

/// The parameters as strings; every value is checked by hand so errors name key, value
/// and range the same way.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    #[serde(rename = "type")]
    volume_type: Option<String>,
    iops: Option<String>,
    #[serde(rename = "iopsPerGB")]
    iops_per_gb: Option<String>,
    #[serde(rename = "allowAutoIOPSPerGBIncrease")]
    allow_auto_iops: Option<String>,
    throughput: Option<String>,
    encrypted: Option<String>,
    #[serde(rename = "kmsKeyId")]
    kms_key_id: Option<String>,
    #[serde(rename = "blockSize")]
    block_size: Option<String>,
    #[serde(rename = "inodeSize")]
    inode_size: Option<String>,
    #[serde(rename = "bytesPerInode")]
    bytes_per_inode: Option<String>,
    #[serde(rename = "numberOfInodes")]
    number_of_inodes: Option<String>,
    /// Deprecated in aws-ebs-csi-driver and ignored there (every io2 is Block Express);
    /// accepted and ignored here so its StorageClasses keep working.
    #[serde(rename = "blockExpress")]
    _block_express: Option<String>,
    #[serde(rename = "csi.storage.k8s.io/fstype")]
    fs_type: Option<String>,
    #[serde(rename = "csi.storage.k8s.io/pvc/name")]
    _pvc_name: Option<String>,
    #[serde(rename = "csi.storage.k8s.io/pvc/namespace")]
    _pvc_namespace: Option<String>,
    #[serde(rename = "csi.storage.k8s.io/pv/name")]
    _pv_name: Option<String>,
}

/// One `tagSpecification_<N>` parameter.
struct TagParameter {
    number: u64,
    key: String,
    value: String,
}

/// Parse and check the parameters of a CreateVolume.
///
/// `capability_fs_type`: the fs type from the CSI capability (`None` or empty if unset).
/// When both it and `csi.storage.k8s.io/fstype` are given they must agree.
///
/// Errors: [`ParameterError::Invalid`] for a key or value that can never work,
/// [`ParameterError::OutOfRange`] for a size, IOPS or throughput outside EC2's limits.
/// Both name the key (or the claim's size) and the allowed values.
pub fn spec(
    capacity: CapacityRange,
    parameters: &BTreeMap<String, String>,
    capability_fs_type: Option<&str>,
) -> Result<EbsSpec, ParameterError> {
    let (rest, tag_parameters) = split_keys(parameters)?;
    let raw: Raw = parse(
        &rest,
        &KEYS,
        &[PVC_NAME, PVC_NAMESPACE, PV_NAME, FSTYPE_KEY],
    )
    .map_err(|e| match e {
        ParameterError::Invalid(m) if m.contains("unknown field") => invalid(format!(
            "{m}; tags are set with `{TAG_PREFIX}_<N>: \"key=value\"`"
        )),
        other => other,
    })?;

    let volume_type = VolumeType::from_parameter(raw.volume_type.as_deref().unwrap_or(""))?;
    let fs_type = fs_type(raw.fs_type.as_deref(), capability_fs_type)?;
    let size_gib = size_gib(capacity, volume_type)?;
    let iops = iops(&raw, volume_type, size_gib)?;
    let throughput_mibps = throughput(&raw, volume_type, iops)?;
    let encrypted = boolean("encrypted", raw.encrypted.as_deref())?;
    let kms_key_id = kms_key_id(raw.kms_key_id.as_deref(), encrypted)?;
    let tags = tags(tag_parameters, parameters)?;
    let fs = fs_options(&raw, fs_type)?;
    Ok(EbsSpec {
        volume_type,
        size_gib,
        iops,
        throughput_mibps,
        encrypted,
        kms_key_id,
        tags,
        fs,
    })
}

fn invalid(message: String) -> ParameterError {
    ParameterError::Invalid(message)
}

fn out_of_range(message: String) -> ParameterError {
    ParameterError::OutOfRange(message)
}

/// Separates `tagSpecification_<N>` parameters from the rest (which [`parse`] reads,
/// keys in any case, as in aws-ebs-csi-driver) and refuses the deprecated bare `fstype`.
fn split_keys(
    parameters: &BTreeMap<String, String>,
) -> Result<(BTreeMap<String, String>, Vec<TagParameter>), ParameterError> {
    let mut rest = BTreeMap::new();
    let mut tag_parameters = Vec::new();
    for (key, value) in parameters {
        if key.starts_with(RESERVED_PREFIX) {
            rest.insert(key.clone(), value.clone());
            continue;
        }
        let is_tag = key
            .get(..TAG_PREFIX.len())
            .is_some_and(|p| p.eq_ignore_ascii_case(TAG_PREFIX));
        if is_tag {
            let number = key[TAG_PREFIX.len()..]
                .strip_prefix('_')
                .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|n| n.parse::<u64>().ok())
                .ok_or_else(|| {
                    invalid(format!(
                        "parameter `{key}` is not a tag parameter name; tags are set with `{TAG_PREFIX}_<N>` where <N> is a number, e.g. `{TAG_PREFIX}_1: \"team=db\"`"
                    ))
                })?;
            tag_parameters.push(TagParameter {
                number,
                key: key.clone(),
                value: value.clone(),
            });
            continue;
        }
        if key.eq_ignore_ascii_case("fstype") {
            return Err(invalid(format!(
                "parameter `{key}` is deprecated and ignored by aws-ebs-csi-driver; use `{FSTYPE_KEY}`"
            )));
        }
        rest.insert(key.clone(), value.clone());
    }
    tag_parameters.sort_by(|a, b| (a.number, &a.key).cmp(&(b.number, &b.key)));
    Ok((rest, tag_parameters))
}

/// A whole number, as the driver's integer parameters.
fn number(key: &str, value: &str) -> Result<u64, ParameterError> {
    value.trim().parse().map_err(|_| {
        invalid(format!(
            "parameter `{key}` is {value:?}; expected a whole number"
        ))
    })
}

fn optional_number(key: &str, value: Option<&str>) -> Result<Option<u64>, ParameterError> {
    value.map(|v| number(key, v)).transpose()
}

/// "true" or "false". aws-ebs-csi-driver treats anything but "true" as false, which turns
/// `encrypted: "True"` into an unencrypted volume; stowage refuses to guess.
fn boolean(key: &str, value: Option<&str>) -> Result<bool, ParameterError> {
    match value {
        None | Some("false") => Ok(false),
        Some("true") => Ok(true),
        Some(other) => Err(invalid(format!(
            "parameter `{key}` is {other:?}; expected \"true\" or \"false\""
        ))),
    }
}

fn fs_type(parameter: Option<&str>, capability: Option<&str>) -> Result<FsType, ParameterError> {
    let parameter = parameter.filter(|s| !s.is_empty());
    let capability = capability.filter(|s| !s.is_empty());
    match (parameter, capability) {
        (Some(p), Some(c)) if p != c => Err(invalid(format!(
            "parameter `{FSTYPE_KEY}` is {p:?} but the volume capability asks for fs_type {c:?}; make them agree"
        ))),
        (Some(p), _) => {
            FsType::from_name(p).map_err(|e| invalid(format!("parameter `{FSTYPE_KEY}`: {e}")))
        }
        (None, c) => FsType::from_name(c.unwrap_or(""))
            .map_err(|e| invalid(format!("volume capability: {e}"))),
    }
}

/// The size in GiB: the request rounded up to whole GiB, or the default when the claim
/// asks for nothing (aws-ebs-csi-driver: 100 GiB; here raised to the type's minimum and
/// lowered to the claim's limit). A limit of 0 means no limit (CSI).
fn size_gib(capacity: CapacityRange, volume_type: VolumeType) -> Result<u64, ParameterError> {
    let range = volume_type.limits().size_gib;
    let limit = capacity.limit.filter(|l| *l > 0);
    let (size, asked) = if capacity.required == 0 {
        let default = DEFAULT_SIZE_GIB.clamp(range.min, range.max);
        match limit {
            Some(limit) if limit / GIB < default => (
                limit / GIB,
                format!("the claim allows at most {}", Bytes(limit)),
            ),
            _ => (default, format!("the default size is {default} GiB")),
        }
    } else {
        let size = capacity.required.div_ceil(GIB);
        if let Some(limit) = limit
            && size.saturating_mul(GIB) > limit
        {
            return Err(out_of_range(format!(
                "the claim asks for {}, which rounds up to {size} GiB (EBS sizes are whole GiB), above its limit of {}",
                Bytes(capacity.required),
                Bytes(limit)
            )));
        }
        (size, format!("the claim asks for {size} GiB"))
    };
    if range.contains(size) {
        Ok(size)
    } else {
        Err(out_of_range(format!(
            "type {volume_type} needs {range} GiB; {asked}"
        )))
    }
}

/// Checks a new size for an existing volume of EC2 type `volume_type` (ControllerExpand):
/// it must fit the type's range. A type this table does not know is left to EC2.
pub fn check_size(volume_type: &str, size_gib: u64) -> Result<(), ParameterError> {
    let Some(t) = VolumeType::ALL
        .into_iter()
        .find(|t| t.as_str() == volume_type)
    else {
        return Ok(());
    };
    let range = t.limits().size_gib;
    if range.contains(size_gib) {
        Ok(())
    } else {
        Err(out_of_range(format!(
            "type {t} needs {range} GiB; the claim asks for {size_gib} GiB"
        )))
    }
}

/// The provisioned IOPS from `iops` or `iopsPerGB` × size.
///
/// An explicit `iops` must fit the type's range and IOPS:GiB ratio. `iopsPerGB` follows
/// aws-ebs-csi-driver: a result above what the type allows for the size is capped at that
/// maximum (the documented behaviour: provisioning succeeds); a result below the type's
/// minimum is an error unless `allowAutoIOPSPerGBIncrease` is "true", which raises it to
/// the minimum. (The driver also applies both to an explicit `iops`; stowage checks an
/// explicit value strictly, since the user asked for that exact number.)
fn iops(raw: &Raw, volume_type: VolumeType, size_gib: u64) -> Result<Option<u32>, ParameterError> {
    let requested = optional_number("iops", raw.iops.as_deref())?;
    let per_gb = optional_number("iopsPerGB", raw.iops_per_gb.as_deref())?;
    let allow_increase = boolean("allowAutoIOPSPerGBIncrease", raw.allow_auto_iops.as_deref())?;
    let Some(limits) = volume_type.limits().iops else {
        if let Some(key) = [("iops", requested), ("iopsPerGB", per_gb)]
            .into_iter()
            .find_map(|(key, v)| v.map(|_| key))
        {
            return Err(invalid(format!(
                "parameter `{key}` does not apply to type {volume_type}: only gp3, io1 and io2 take provisioned IOPS; remove `{key}` or change `type`"
            )));
        }
        return Ok(None);
    };
    let range = limits.range;
    let max_for_size = limits.max_for_size(size_gib);
    let iops = match (requested, per_gb) {
        (Some(_), Some(_)) => {
            return Err(invalid(
                "parameters `iops` and `iopsPerGB` exclude each other; set one".into(),
            ));
        }
        (None, None) if limits.required => {
            return Err(invalid(format!(
                "type {volume_type} needs provisioned IOPS: set `iops` ({range}, at most {} per GiB) or `iopsPerGB`",
                limits.per_gib
            )));
        }
        (None, None) => return Ok(None),
        (Some(iops), None) => {
            if !range.contains(iops) {
                return Err(out_of_range(format!(
                    "parameter `iops` is {iops}; type {volume_type} allows {range} IOPS"
                )));
            }
            if iops > max_for_size {
                return Err(out_of_range(format!(
                    "parameter `iops` is {iops}, but type {volume_type} allows at most {} IOPS per GiB: {max_for_size} IOPS for {size_gib} GiB; lower `iops` or ask for at least {} GiB",
                    limits.per_gib,
                    iops.div_ceil(limits.per_gib)
                )));
            }
            iops
        }
        (None, Some(per_gb)) => {
            if per_gb == 0 {
                return Err(invalid(
                    "parameter `iopsPerGB` is 0; expected at least 1 (or remove it)".into(),
                ));
            }
            let wanted = per_gb.saturating_mul(size_gib);
            if wanted >= range.min {
                // Capped like aws-ebs-csi-driver's capIOPS: never above the type's maximum
                // or its IOPS:GiB ratio.
                wanted.min(max_for_size)
            } else if allow_increase {
                range.min
            } else {
                return Err(out_of_range(format!(
                    "parameter `iopsPerGB` is {per_gb}: {per_gb} × {size_gib} GiB = {wanted} IOPS, below the type {volume_type} minimum of {}; raise `iopsPerGB`, ask for a larger volume, or set `allowAutoIOPSPerGBIncrease: \"true\"`",
                    range.min
                )));
            }
        }
    };
    // Every table maximum fits in u32.
    Ok(Some(u32::try_from(iops).unwrap_or(u32::MAX)))
}

/// The provisioned throughput (gp3 only): in range, and at most one MiB/s per
/// `iops_per_mibps` IOPS of the volume (its provisioned IOPS, else the baseline).
fn throughput(
    raw: &Raw,
    volume_type: VolumeType,
    iops: Option<u32>,
) -> Result<Option<u32>, ParameterError> {
    let Some(mibps) = optional_number("throughput", raw.throughput.as_deref())? else {
        return Ok(None);
    };
    let limits = volume_type.limits();
    let Some(rules) = limits.throughput else {
        return Err(invalid(format!(
            "parameter `throughput` does not apply to type {volume_type}: only gp3 takes provisioned throughput; remove `throughput` or use `type: gp3`"
        )));
    };
    if !rules.range.contains(mibps) {
        return Err(out_of_range(format!(
            "parameter `throughput` is {mibps} MiB/s; type {volume_type} allows {} MiB/s",
            rules.range
        )));
    }
    let (effective, which) = match iops {
        Some(iops) => (u64::from(iops), "`iops`"),
        None => (
            limits.iops.map_or(0, |l| l.range.min),
            "the baseline, as `iops` is unset",
        ),
    };
    if mibps.saturating_mul(rules.iops_per_mibps) > effective {
        return Err(out_of_range(format!(
            "parameter `throughput` is {mibps} MiB/s, but type {volume_type} allows at most 1 MiB/s per {} IOPS: {} MiB/s with {effective} IOPS ({which}); lower `throughput` or set `iops` to at least {}",
            rules.iops_per_mibps,
            effective / rules.iops_per_mibps,
            mibps * rules.iops_per_mibps
        )));
    }
    Ok(Some(u32::try_from(mibps).unwrap_or(u32::MAX)))
}

/// `kmsKeyId` only with `encrypted: "true"` (EC2 rejects a key for an unencrypted
/// volume). Empty means unset, as in aws-ebs-csi-driver.
fn kms_key_id(key: Option<&str>, encrypted: bool) -> Result<Option<String>, ParameterError> {
    let Some(key) = key.filter(|k| !k.is_empty()) else {
        return Ok(None);
    };
    if !encrypted {
        return Err(invalid(
            "parameter `kmsKeyId` needs `encrypted: \"true\"`; set `encrypted` or remove `kmsKeyId`"
                .into(),
        ));
    }
    if key.len() > 2048 || key.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(invalid(format!(
            "parameter `kmsKeyId` is {key:?}; expected a KMS key id, alias or ARN (no spaces, at most 2048 characters)"
        )));
    }
    Ok(Some(key.to_owned()))
}

/// `tagSpecification_<N>: "key=value"` → tags. The value may be empty (`"key="`) and may
/// use the `${pvc.metadata.name}`-style templates (see [`render_value`]); the key is
/// literal. Keys stowage owns, EC2 length limits, duplicates and too many tags are errors.
fn tags(
    tag_parameters: Vec<TagParameter>,
    parameters: &BTreeMap<String, String>,
) -> Result<BTreeMap<String, String>, ParameterError> {
    let mut tags = BTreeMap::new();
    let mut set_by = BTreeMap::<String, String>::new();
    for TagParameter {
        key: param, value, ..
    } in tag_parameters
    {
        let Some((key, template)) = value.split_once('=') else {
            return Err(invalid(format!(
                "parameter `{param}` is {value:?}; expected \"key=value\" (the value may be empty: \"key=\")"
            )));
        };
        check_tag_key(&param, key)?;
        let rendered = render_value(&param, template, parameters)?;
        let chars = rendered.chars().count();
        if chars > MAX_TAG_VALUE_CHARS {
            return Err(invalid(format!(
                "parameter `{param}`: the value of tag {key:?} is {chars} characters (after templates); EC2 allows at most {MAX_TAG_VALUE_CHARS}"
            )));
        }
        if let Some(other) = set_by.insert(key.to_owned(), param.clone()) {
            return Err(invalid(format!(
                "parameters `{other}` and `{param}` both set tag {key:?}; keep one"
            )));
        }
        tags.insert(key.to_owned(), rendered);
    }
    if tags.len() > MAX_USER_TAGS {
        return Err(invalid(format!(
            "{} `{TAG_PREFIX}_<N>` tags; at most {MAX_USER_TAGS} (EC2 allows 50 per volume, {RESERVED_TAG_SLOTS} are kept for stowage's own)",
            tags.len()
        )));
    }
    Ok(tags)
}

fn check_tag_key(param: &str, key: &str) -> Result<(), ParameterError> {
    let chars = key.chars().count();
    if chars == 0 {
        return Err(invalid(format!(
            "parameter `{param}` has an empty tag key; expected \"key=value\""
        )));
    }
    if chars > MAX_TAG_KEY_CHARS {
        return Err(invalid(format!(
            "parameter `{param}`: tag key {key:?} is {chars} characters; EC2 allows at most {MAX_TAG_KEY_CHARS}"
        )));
    }
    let reserved = RESERVED_TAG_KEYS.contains(&key)
        || RESERVED_TAG_PREFIXES.iter().any(|prefix| {
            key.get(..prefix.len())
                .is_some_and(|p| p.eq_ignore_ascii_case(prefix))
        });
    if reserved {
        return Err(invalid(format!(
            "parameter `{param}`: tag key {key:?} is reserved (stowage and EC2 own {} and keys starting with {}); choose another key",
            RESERVED_TAG_KEYS.join(", "),
            RESERVED_TAG_PREFIXES.join(", ")
        )));
    }
    Ok(())
}

/// mkfs limits. ext3/ext4 (mke2fs): block size a power of two 1 KiB–64 KiB; inode size a
/// power of two from 128 up to the block size (mke2fs default 4 KiB for volumes of 1 GiB
/// and more); bytes per inode 1 KiB–64 MiB; inode count 1–2³²−1. xfs (mkfs.xfs, v5 format
/// with CRCs, the default): block size a power of two 1 KiB–64 KiB; inode size a power of
/// two 512–2048 and at most half the block size. Block sizes above the node's page size
/// (4 KiB on x86_64) may not mount on older kernels.
const EXT_BLOCK_SIZE: Bounds = Bounds::new(1_024, 65_536);
const EXT_INODE_SIZE: Bounds = Bounds::new(128, 65_536);
const EXT_DEFAULT_BLOCK_SIZE: u64 = 4_096;
const EXT_BYTES_PER_INODE: Bounds = Bounds::new(1_024, 67_108_864);
const EXT_NUMBER_OF_INODES: Bounds = Bounds::new(1, u32::MAX as u64);
const XFS_BLOCK_SIZE: Bounds = Bounds::new(1_024, 65_536);
const XFS_INODE_SIZE: Bounds = Bounds::new(512, 2_048);
const XFS_DEFAULT_BLOCK_SIZE: u64 = 4_096;

fn fs_options(raw: &Raw, fs_type: FsType) -> Result<FsOptions, ParameterError> {
    let block_size = optional_number("blockSize", raw.block_size.as_deref())?;
    let inode_size = optional_number("inodeSize", raw.inode_size.as_deref())?;
    let bytes_per_inode = optional_number("bytesPerInode", raw.bytes_per_inode.as_deref())?;
    let number_of_inodes = optional_number("numberOfInodes", raw.number_of_inodes.as_deref())?;

    let check = |key: &str, value: Option<u64>, range: Bounds, power_of_two: bool| {
        let Some(value) = value else { return Ok(()) };
        if range.contains(value) && (!power_of_two || value.is_power_of_two()) {
            return Ok(());
        }
        let shape = if power_of_two {
            "a power of two in "
        } else {
            ""
        };
        Err(invalid(format!(
            "parameter `{key}` is {value}; {fs_type} needs {shape}{range} bytes"
        )))
    };
    if fs_type.is_ext() {
        check("blockSize", block_size, EXT_BLOCK_SIZE, true)?;
        check("inodeSize", inode_size, EXT_INODE_SIZE, true)?;
        let block = block_size.unwrap_or(EXT_DEFAULT_BLOCK_SIZE);
        if let Some(inode) = inode_size
            && inode > block
        {
            return Err(invalid(format!(
                "parameter `inodeSize` is {inode}; {fs_type} inodes can't be larger than the block size ({block}{}); lower `inodeSize` or raise `blockSize`",
                if block_size.is_some() {
                    ""
                } else {
                    ", the default"
                }
            )));
        }
        check("bytesPerInode", bytes_per_inode, EXT_BYTES_PER_INODE, false)?;
        if let Some(count) = number_of_inodes
            && !EXT_NUMBER_OF_INODES.contains(count)
        {
            return Err(invalid(format!(
                "parameter `numberOfInodes` is {count}; {fs_type} allows {EXT_NUMBER_OF_INODES} inodes"
            )));
        }
    } else {
        for (key, value) in [
            ("bytesPerInode", bytes_per_inode),
            ("numberOfInodes", number_of_inodes),
        ] {
            if value.is_some() {
                return Err(invalid(format!(
                    "parameter `{key}` applies only to ext3 and ext4, but the fstype is {fs_type}; remove `{key}`"
                )));
            }
        }
        check("blockSize", block_size, XFS_BLOCK_SIZE, true)?;
        check("inodeSize", inode_size, XFS_INODE_SIZE, true)?;
        let block = block_size.unwrap_or(XFS_DEFAULT_BLOCK_SIZE);
        if let Some(inode) = inode_size
            && inode * 2 > block
        {
            return Err(invalid(format!(
                "parameter `inodeSize` is {inode}; xfs inodes can be at most half the block size ({block}{}); lower `inodeSize` or raise `blockSize`",
                if block_size.is_some() {
                    ""
                } else {
                    ", the default"
                }
            )));
        }
    }
    // The ranges above keep both sizes within u32.
    let small = |v: Option<u64>| v.map(|v| u32::try_from(v).unwrap_or(u32::MAX));
    Ok(FsOptions {
        fs_type,
        block_size: small(block_size),
        inode_size: small(inode_size),
        bytes_per_inode,
        number_of_inodes,
    })
}

#[cfg(test)]
mod tests {
    use std::fmt::Debug;

    use super::*;

    const MIB: u64 = 1 << 20;

    type Pairs = &'static [(&'static str, &'static str)];

    /// What a case expects: a value picked from the spec, or an error of one kind whose
    /// message contains a text.
    #[derive(Debug, Clone, Copy)]
    enum Want<T> {
        Is(T),
        Invalid(&'static str),
        Range(&'static str),
    }
    use Want::{Invalid, Is, Range};

    fn params(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn gib(n: u64) -> CapacityRange {
        CapacityRange {
            required: n * GIB,
            limit: None,
        }
    }

    fn with(pairs: &[(&str, &str)], size_gib: u64) -> Result<EbsSpec, ParameterError> {
        spec(gib(size_gib), &params(pairs), None)
    }

    fn check<T: PartialEq + Debug>(
        case: &str,
        got: Result<EbsSpec, ParameterError>,
        want: Want<T>,
        pick: impl Fn(&EbsSpec) -> T,
    ) {
        match (got, want) {
            (Ok(spec), Is(want)) => assert_eq!(pick(&spec), want, "{case}"),
            (Err(ParameterError::Invalid(m)), Invalid(needle))
            | (Err(ParameterError::OutOfRange(m)), Range(needle)) => {
                assert!(m.contains(needle), "{case}: {m:?} lacks {needle:?}");
            }
            (got, want) => panic!("{case}: want {want:?}, got {got:?}"),
        }
    }

    #[test]
    fn happy_path_for_every_type() {
        let base = |volume_type, size_gib, iops| EbsSpec {
            volume_type,
            size_gib,
            iops,
            throughput_mibps: None,
            encrypted: false,
            kms_key_id: None,
            tags: BTreeMap::new(),
            fs: FsOptions::default(),
        };
        let gp3_provisioned = EbsSpec {
            throughput_mibps: Some(1000),
            ..base(VolumeType::Gp3, 8, Some(4000))
        };
        #[rustfmt::skip]
        let cases: Vec<(Pairs, u64, EbsSpec)> = vec![
            (&[], 10, base(VolumeType::Gp3, 10, None)),
            (&[("type", "")], 10, base(VolumeType::Gp3, 10, None)),
            (&[("type", "gp3"), ("iops", "4000"), ("throughput", "1000")], 8, gp3_provisioned),
            (&[("type", "gp2")], 1, base(VolumeType::Gp2, 1, None)),
            (&[("type", "io1"), ("iops", "200")], 4, base(VolumeType::Io1, 4, Some(200))),
            (&[("type", "io2"), ("iopsPerGB", "1000")], 256, base(VolumeType::Io2, 256, Some(256_000))),
            (&[("type", "st1")], 125, base(VolumeType::St1, 125, None)),
            (&[("type", "sc1")], 16_384, base(VolumeType::Sc1, 16_384, None)),
            (&[("type", "standard")], 1_024, base(VolumeType::Standard, 1_024, None)),
        ];
        for (pairs, size, want) in cases {
            assert_eq!(with(pairs, size).unwrap(), want, "{pairs:?}");
        }
    }

    #[test]
    fn full_parameter_set() {
        let p = params(&[
            ("type", "gp3"),
            ("iops", "16000"),
            ("throughput", "2000"),
            ("encrypted", "true"),
            (
                "kmsKeyId",
                "arn:aws:kms:us-east-1:111122223333:key/1234abcd",
            ),
            ("tagSpecification_1", "team=db"),
            (
                "tagSpecification_2",
                "claim=${pvc.metadata.namespace}/${pvc.metadata.name}",
            ),
            ("tagSpecification_10", "pv={{ .PVName }}"),
            ("tagSpecification_3", "empty="),
            ("tagSpecification_4", "formula=a=b"),
            ("blockSize", "4096"),
            ("inodeSize", "512"),
            ("bytesPerInode", "16384"),
            ("numberOfInodes", "100000"),
            ("blockExpress", "true"),
            (FSTYPE_KEY, "ext4"),
            (PVC_NAME, "data-db-0"),
            (PVC_NAMESPACE, "prod"),
            (PV_NAME, "pvc-1"),
            ("csi.storage.k8s.io/provisioner-secret-name", "ignored"),
        ]);
        let capacity = CapacityRange {
            required: 50 * GIB,
            limit: Some(60 * GIB),
        };
        let s = spec(capacity, &p, Some("ext4")).unwrap();
        let tags = params(&[
            ("team", "db"),
            ("claim", "prod/data-db-0"),
            ("pv", "pvc-1"),
            ("empty", ""),
            ("formula", "a=b"),
        ]);
        let want = EbsSpec {
            volume_type: VolumeType::Gp3,
            size_gib: 50,
            iops: Some(16_000),
            throughput_mibps: Some(2_000),
            encrypted: true,
            kms_key_id: Some("arn:aws:kms:us-east-1:111122223333:key/1234abcd".into()),
            tags,
            fs: FsOptions {
                fs_type: FsType::Ext4,
                block_size: Some(4096),
                inode_size: Some(512),
                bytes_per_inode: Some(16384),
                number_of_inodes: Some(100_000),
            },
        };
        assert_eq!(s, want);
    }

    #[test]
    fn type_values() {
        for t in VolumeType::ALL {
            assert_eq!(VolumeType::from_parameter(t.as_str()).unwrap(), t);
            assert_eq!(t.to_string(), t.as_str());
        }
        #[rustfmt::skip]
        let cases: [(&str, Want<VolumeType>); 6] = [
            ("", Is(VolumeType::Gp3)),
            ("gp2", Is(VolumeType::Gp2)),
            ("gp9", Invalid("parameter `type` is \"gp9\"; expected one of gp3, gp2, io1, io2, st1, sc1, standard")),
            ("GP3", Invalid("\"GP3\" (did you mean gp3?)")),
            ("io3", Invalid("`type`")),
            (" gp3", Invalid("did you mean gp3?")),
        ];
        for (value, want) in cases {
            check(value, with(&[("type", value)], 10), want, |s| s.volume_type);
        }
    }

    #[test]
    fn keys_are_case_insensitive_and_unknown_keys_are_named() {
        type Picked = (VolumeType, Option<u32>, bool);
        #[rustfmt::skip]
        let cases: Vec<(Pairs, Want<Picked>)> = vec![
            (&[("TYPE", "io1"), ("IOPS", "400"), ("Encrypted", "true")], Is((VolumeType::Io1, Some(400), true))),
            (&[("iopspergb", "10"), ("type", "io1")], Is((VolumeType::Io1, Some(100), false))),
            (&[("csi.storage.k8s.io/node-stage-secret-name", "x")], Is((VolumeType::Gp3, None, false))),
            (&[("iopps", "3000")], Invalid("unknown field `iopps`")),
            (&[("iopps", "3000")], Invalid("`iopsPerGB`")),
            (&[("iopps", "3000")], Invalid("tagSpecification_<N>")),
            (&[("volumeInitializationRate", "100")], Invalid("`volumeInitializationRate`")),
            (&[("iops", "3000"), ("IOPS", "3000")], Invalid("parameters `IOPS` and `iops` both set `iops` (keys are case-insensitive); keep one")),
            (&[("fstype", "xfs")], Invalid("use `csi.storage.k8s.io/fstype`")),
            (&[("tagSpecification", "a=b")], Invalid("tagSpecification_<N>")),
            (&[("tagSpecification_", "a=b")], Invalid("`tagSpecification_`")),
            (&[("tagSpecification_x", "a=b")], Invalid("`tagSpecification_x`")),
            (&[("tagSpecificationFoo", "a=b")], Invalid("`tagSpecificationFoo`")),
            (&[("tagSpecification_-1", "a=b")], Invalid("`tagSpecification_-1`")),
        ];
        for (pairs, want) in cases {
            check(&format!("{pairs:?}"), with(pairs, 10), want, |s| {
                (s.volume_type, s.iops, s.encrypted)
            });
        }
        // Tag parameter names are case-insensitive too.
        let s = with(&[("tagspecification_1", "a=b")], 10).unwrap();
        assert_eq!(s.tags, params(&[("a", "b")]));
    }

    #[test]
    fn every_canonical_key_is_a_raw_field() {
        for key in KEYS {
            let raw: Result<Raw, ParameterError> = parse(&params(&[(key, "x")]), &KEYS, &[]);
            assert!(raw.is_ok(), "{key}: {raw:?}");
        }
    }

    #[test]
    fn capacity() {
        let range = |required, limit| CapacityRange { required, limit };
        #[rustfmt::skip]
        let cases: Vec<(CapacityRange, &str, Want<u64>)> = vec![
            (range(0, None), "gp3", Is(DEFAULT_SIZE_GIB)),
            (range(0, Some(0)), "gp3", Is(DEFAULT_SIZE_GIB)),
            (range(0, None), "st1", Is(125)),
            (range(0, None), "standard", Is(100)),
            (range(0, Some(50 * GIB)), "gp3", Is(50)),
            (range(0, Some(50 * GIB + 1)), "gp3", Is(50)),
            (range(0, Some(500 * GIB)), "gp3", Is(100)),
            (range(0, Some(50 * GIB)), "st1", Range("type st1 needs 125–16384 GiB; the claim allows at most 50 GiB")),
            (range(0, Some(512 * MIB)), "gp3", Range("type gp3 needs 1–65536 GiB; the claim allows at most 512 MiB")),
            (range(1, None), "gp3", Is(1)),
            (range(GIB, Some(GIB)), "gp3", Is(1)),
            (range(GIB + 1, None), "gp3", Is(2)),
            (range(GIB + 1, Some(GIB + 1)), "gp3", Range("the claim asks for 1073741825 bytes, which rounds up to 2 GiB")),
            (range(GIB, None), "io1", Range("type io1 needs 4–16384 GiB; the claim asks for 1 GiB")),
            (range(4 * GIB, None), "io1", Is(4)),
            (range(65_536 * GIB, None), "gp3", Is(65_536)),
            (range(65_537 * GIB, None), "gp3", Range("type gp3 needs 1–65536 GiB")),
            (range(16_385 * GIB, None), "gp2", Range("type gp2 needs 1–16384 GiB")),
            (range(16_385 * GIB, None), "io1", Range("type io1 needs 4–16384 GiB")),
            (range(65_536 * GIB, None), "io2", Is(65_536)),
            (range(65_537 * GIB, None), "io2", Range("type io2 needs 4–65536 GiB")),
            (range(124 * GIB, None), "sc1", Range("type sc1 needs 125–16384 GiB")),
            (range(1_025 * GIB, None), "standard", Range("type standard needs 1–1024 GiB")),
            (range(u64::MAX, None), "gp3", Range("1–65536")),
        ];
        for (capacity, volume_type, want) in cases {
            let mut p = params(&[("type", volume_type)]);
            if volume_type.starts_with("io") {
                p.insert("iops".into(), "100".into());
            }
            let case = format!("{capacity:?} {volume_type}");
            check(&case, spec(capacity, &p, None), want, |s| s.size_gib);
        }
    }

    #[test]
    fn expansion_sizes() {
        assert_eq!(check_size("gp3", 65_536), Ok(()));
        assert_eq!(check_size("gp2", 16_384), Ok(()));
        assert_eq!(check_size("future-type", 1 << 40), Ok(()));
        for (volume_type, size, needle) in [
            (
                "gp2",
                16_385,
                "type gp2 needs 1–16384 GiB; the claim asks for 16385 GiB",
            ),
            ("standard", 2_000, "type standard needs 1–1024 GiB"),
            ("io2", 65_537, "type io2 needs 4–65536 GiB"),
        ] {
            match check_size(volume_type, size) {
                Err(ParameterError::OutOfRange(m)) => assert!(m.contains(needle), "{m}"),
                other => panic!("{volume_type} {size}: {other:?}"),
            }
        }
    }

    #[test]
    fn iops_rules() {
        #[rustfmt::skip]
        let cases: Vec<(Pairs, u64, Want<Option<u32>>)> = vec![
            // gp3: 3000–80000, at most 500 per GiB, 3000 at any size.
            (&[], 1, Is(None)),
            (&[("iops", "99999")], 200, Range("parameter `iops` is 99999; type gp3 allows 3000–80000 IOPS")),
            (&[("iops", "2999")], 200, Range("parameter `iops` is 2999")),
            (&[("iops", "3000")], 1, Is(Some(3000))),
            (&[("iops", "5000")], 5, Range("at most 500 IOPS per GiB: 3000 IOPS for 5 GiB; lower `iops` or ask for at least 10 GiB")),
            (&[("iops", "5000")], 10, Is(Some(5000))),
            (&[("iops", "80000")], 160, Is(Some(80_000))),
            (&[("iops", "80000")], 159, Range("parameter `iops` is 80000")),
            (&[("iops", "abc")], 10, Invalid("parameter `iops` is \"abc\"; expected a whole number")),
            (&[("iops", "-1")], 10, Invalid("parameter `iops` is \"-1\"")),
            (&[("iops", "99999999999999999999999")], 10, Invalid("`iops`")),
            // io1: 100–64000, at most 50 per GiB, required.
            (&[("type", "io1")], 10, Invalid("type io1 needs provisioned IOPS: set `iops` (100–64000, at most 50 per GiB) or `iopsPerGB`")),
            (&[("type", "io1"), ("iops", "64000")], 1280, Is(Some(64_000))),
            (&[("type", "io1"), ("iops", "64001")], 2000, Range("type io1 allows 100–64000 IOPS")),
            (&[("type", "io1"), ("iops", "99")], 10, Range("parameter `iops` is 99")),
            (&[("type", "io1"), ("iops", "1000")], 10, Range("at most 50 IOPS per GiB: 500 IOPS for 10 GiB")),
            // io2: 100–256000, at most 1000 per GiB, required.
            (&[("type", "io2")], 10, Invalid("type io2 needs provisioned IOPS")),
            (&[("type", "io2"), ("iops", "256000")], 256, Is(Some(256_000))),
            (&[("type", "io2"), ("iops", "256000")], 255, Range("at most 1000 IOPS per GiB")),
            (&[("type", "io2"), ("iops", "256001")], 1000, Range("type io2 allows 100–256000 IOPS")),
            // Types without provisioned IOPS.
            (&[("type", "gp2"), ("iops", "3000")], 10, Invalid("parameter `iops` does not apply to type gp2")),
            (&[("type", "st1"), ("iopsPerGB", "10")], 125, Invalid("parameter `iopsPerGB` does not apply to type st1")),
            (&[("type", "sc1"), ("iops", "100")], 125, Invalid("does not apply to type sc1")),
            (&[("type", "standard"), ("iops", "100")], 10, Invalid("does not apply to type standard")),
            // One or the other.
            (&[("iops", "3000"), ("iopsPerGB", "50")], 100, Invalid("parameters `iops` and `iopsPerGB` exclude each other")),
            // iopsPerGB × size, capped at the type's maximum for the size (like the driver).
            (&[("type", "io1"), ("iopsPerGB", "10")], 100, Is(Some(1000))),
            (&[("type", "io1"), ("iopsPerGB", "100")], 100, Is(Some(5000))),
            (&[("type", "io1"), ("iopsPerGB", "50")], 16_384, Is(Some(64_000))),
            (&[("type", "io2"), ("iopsPerGB", "2000")], 200, Is(Some(200_000))),
            (&[("iopsPerGB", "50")], 100, Is(Some(5000))),
            (&[("iopsPerGB", "1000")], 1000, Is(Some(80_000))),
            // Below the type's minimum: an error, or raised with allowAutoIOPSPerGBIncrease.
            (&[("iopsPerGB", "10")], 100, Range("parameter `iopsPerGB` is 10: 10 × 100 GiB = 1000 IOPS, below the type gp3 minimum of 3000")),
            (&[("iopsPerGB", "10")], 100, Range("set `allowAutoIOPSPerGBIncrease: \"true\"`")),
            (&[("iopsPerGB", "10"), ("allowAutoIOPSPerGBIncrease", "true")], 100, Is(Some(3000))),
            (&[("type", "io1"), ("iopsPerGB", "2")], 10, Range("below the type io1 minimum of 100")),
            (&[("type", "io1"), ("iopsPerGB", "2"), ("allowAutoIOPSPerGBIncrease", "true")], 10, Is(Some(100))),
            (&[("type", "io1"), ("iopsPerGB", "2"), ("allowAutoIOPSPerGBIncrease", "false")], 10, Range("`iopsPerGB`")),
            (&[("iopsPerGB", "0")], 100, Invalid("parameter `iopsPerGB` is 0; expected at least 1")),
            (&[("iopsPerGB", "1.5")], 100, Invalid("parameter `iopsPerGB` is \"1.5\"")),
            (&[("type", "io1"), ("iopsPerGB", "10"), ("allowAutoIOPSPerGBIncrease", "yes")], 100, Invalid("parameter `allowAutoIOPSPerGBIncrease` is \"yes\"")),
            // allowAutoIOPSPerGBIncrease never loosens an explicit `iops`.
            (&[("type", "io1"), ("iops", "50"), ("allowAutoIOPSPerGBIncrease", "true")], 10, Range("parameter `iops` is 50")),
        ];
        for (pairs, size, want) in cases {
            let case = format!("{pairs:?} {size} GiB");
            check(&case, with(pairs, size), want, |s| s.iops);
        }
    }

    #[test]
    fn throughput_rules() {
        #[rustfmt::skip]
        let cases: Vec<(Pairs, Want<Option<u32>>)> = vec![
            (&[], Is(None)),
            (&[("throughput", "125")], Is(Some(125))),
            (&[("throughput", "750")], Is(Some(750))),
            (&[("throughput", "751")], Range("parameter `throughput` is 751 MiB/s, but type gp3 allows at most 1 MiB/s per 4 IOPS: 750 MiB/s with 3000 IOPS (the baseline, as `iops` is unset); lower `throughput` or set `iops` to at least 3004")),
            (&[("throughput", "1000"), ("iops", "4000")], Is(Some(1000))),
            (&[("throughput", "1001"), ("iops", "4000")], Range("1000 MiB/s with 4000 IOPS (`iops`)")),
            (&[("throughput", "2000"), ("iops", "8000")], Is(Some(2000))),
            (&[("throughput", "2001"), ("iops", "10000")], Range("parameter `throughput` is 2001 MiB/s; type gp3 allows 125–2000 MiB/s")),
            (&[("throughput", "124")], Range("type gp3 allows 125–2000 MiB/s")),
            (&[("throughput", "0")], Range("parameter `throughput` is 0 MiB/s")),
            (&[("throughput", "fast")], Invalid("parameter `throughput` is \"fast\"")),
            (&[("throughput", "1000"), ("iopsPerGB", "100")], Is(Some(1000))),
            (&[("throughput", "125"), ("type", "io1"), ("iops", "1000")], Invalid("parameter `throughput` does not apply to type io1")),
            (&[("throughput", "125"), ("type", "gp2")], Invalid("does not apply to type gp2")),
            (&[("throughput", "250"), ("type", "st1")], Invalid("does not apply to type st1")),
        ];
        for (pairs, want) in cases {
            check(&format!("{pairs:?}"), with(pairs, 200), want, |s| {
                s.throughput_mibps
            });
        }
    }

    #[test]
    fn encryption() {
        type Encryption = (bool, Option<String>);
        let key = || Some("alias/ebs".to_owned());
        #[rustfmt::skip]
        let cases: Vec<(Pairs, Want<Encryption>)> = vec![
            (&[], Is((false, None))),
            (&[("encrypted", "false")], Is((false, None))),
            (&[("encrypted", "true")], Is((true, None))),
            (&[("encrypted", "true"), ("kmsKeyId", "alias/ebs")], Is((true, key()))),
            (&[("encrypted", "true"), ("kmsKeyId", "")], Is((true, None))),
            (&[("kmsKeyId", "")], Is((false, None))),
            (&[("encrypted", "yes")], Invalid("parameter `encrypted` is \"yes\"; expected \"true\" or \"false\"")),
            (&[("encrypted", "True")], Invalid("parameter `encrypted` is \"True\"")),
            (&[("kmsKeyId", "alias/ebs")], Invalid("parameter `kmsKeyId` needs `encrypted: \"true\"`")),
            (&[("kmsKeyId", "alias/ebs"), ("encrypted", "false")], Invalid("set `encrypted` or remove `kmsKeyId`")),
            (&[("kmsKeyId", "my key"), ("encrypted", "true")], Invalid("parameter `kmsKeyId` is \"my key\"")),
        ];
        for (pairs, want) in cases {
            check(&format!("{pairs:?}"), with(pairs, 10), want, |s| {
                (s.encrypted, s.kms_key_id.clone())
            });
        }
    }

    #[test]
    fn tag_rules() {
        let claim = [
            (PVC_NAME, "data-db-0"),
            (PVC_NAMESPACE, "prod"),
            (PV_NAME, "pvc-1"),
        ];
        let tags = |pairs: &[(&str, &str)]| {
            let mut p = params(&claim);
            p.extend(params(pairs));
            spec(gib(10), &p, None)
        };
        let one = |k: &str, v: &str| Is(params(&[(k, v)]));
        #[rustfmt::skip]
        let cases: Vec<(Pairs, Want<BTreeMap<String, String>>)> = vec![
            (&[], Is(BTreeMap::new())),
            (&[("tagSpecification_1", "a=b")], one("a", "b")),
            (&[("tagSpecification_1", "a=")], one("a", "")),
            (&[("tagSpecification_1", "a=b=c")], one("a", "b=c")),
            (&[("tagSpecification_1", "a b=hello world")], one("a b", "hello world")),
            (&[("tagSpecification_1", "Name=${pvc.metadata.namespace}-{{ .PVCName }}")], one("Name", "prod-data-db-0")),
            (&[("tagSpecification_1", "novalue")], Invalid("parameter `tagSpecification_1` is \"novalue\"; expected \"key=value\"")),
            (&[("tagSpecification_2", "=v")], Invalid("parameter `tagSpecification_2` has an empty tag key")),
            (&[("tagSpecification_1", "a=1"), ("tagSpecification_2", "a=2")], Invalid("parameters `tagSpecification_1` and `tagSpecification_2` both set tag \"a\"; keep one")),
            (&[("tagSpecification_1", "a=${pvc.metadata.uid}")], Invalid("parameter `tagSpecification_1`: ${pvc.metadata.uid} is not a known template")),
            (&[("tagSpecification_1", "a={{ .PVCName | toUpper }}")], Invalid("parameter `tagSpecification_1`: {{ .PVCName | toUpper }} is not a known template")),
        ];
        for (pairs, want) in cases {
            check(&format!("{pairs:?}"), tags(pairs), want, |s| s.tags.clone());
        }

        // EC2's length limits, in characters, on the key and on the rendered value.
        let key = "k".repeat(MAX_TAG_KEY_CHARS);
        let value = "é".repeat(MAX_TAG_VALUE_CHARS);
        let fits = tags(&[("tagSpecification_1", &format!("{key}={value}"))]);
        assert_eq!(fits.unwrap().tags, params(&[(&key, &value)]));
        #[rustfmt::skip]
        let too_long = [
            (format!("{key}k=v"), "tag key \"kkk"),
            (format!("k={value}é"), "257 characters"),
            // 250 literal characters and a 9-character claim name.
            (format!("k={}${{pvc.metadata.name}}", "v".repeat(250)), "259 characters (after templates); EC2 allows at most 256"),
        ];
        for (tag, needle) in too_long {
            let got = tags(&[("tagSpecification_1", &tag)]);
            check(needle, got, Invalid::<()>(needle), |_| ());
        }

        // A template needs the claim metadata the provisioner adds.
        let got = with(&[("tagSpecification_1", "a=${pvc.metadata.name}")], 10);
        check(
            "no metadata",
            got,
            Invalid::<()>("--extra-create-metadata"),
            |_| (),
        );
    }

    #[test]
    fn reserved_tag_keys_are_refused() {
        for key in [
            "CSIVolumeName",
            "CSIVolumeSnapshotName",
            "KubernetesCluster",
            "kubernetes.io/cluster/prod",
            "kubernetes.io/created-for/pvc/name",
            "ebs.csi.aws.com/cluster",
            "ebs.csi.aws.com/cluster-name",
            "stowage.csi.dev/cluster",
            "aws:cloudformation:stack-name",
            "AWS:x",
        ] {
            let got = with(&[("tagSpecification_7", &format!("{key}=x"))], 10);
            check(
                key,
                got,
                Invalid::<()>("`tagSpecification_7`: tag key"),
                |_| (),
            );
            let got = with(&[("tagSpecification_7", &format!("{key}=x"))], 10);
            check(key, got, Invalid::<()>("is reserved"), |_| ());
        }
        for key in ["csivolumename", "Name", "kubernetes", "team/kubernetes.io"] {
            let got = with(&[("tagSpecification_1", &format!("{key}=x"))], 10);
            assert_eq!(got.unwrap().tags, params(&[(key, "x")]), "{key}");
        }
        // stowage's own prefix is its default driver name.
        let own = format!("{}/", stowage_api::keys::DEFAULT_DRIVER_NAME);
        assert!(RESERVED_TAG_PREFIXES.contains(&own.as_str()));
    }

    #[test]
    fn tag_count_is_bounded() {
        let all: BTreeMap<String, String> = (0..=MAX_USER_TAGS)
            .map(|i| (format!("tagSpecification_{i}"), format!("k{i}=v")))
            .collect();
        let got = spec(gib(10), &all, None);
        check(
            "41 tags",
            got,
            Invalid::<()>("41 `tagSpecification_<N>` tags; at most 40"),
            |_| (),
        );
        let mut fewer = all.clone();
        fewer.remove("tagSpecification_0");
        assert_eq!(
            spec(gib(10), &fewer, None).unwrap().tags.len(),
            MAX_USER_TAGS
        );
    }

    #[test]
    fn fs_type_from_parameter_or_capability() {
        #[rustfmt::skip]
        let cases: Vec<(Option<&str>, Option<&str>, Want<FsType>)> = vec![
            (None, None, Is(FsType::Ext4)),
            (None, Some(""), Is(FsType::Ext4)),
            (Some(""), None, Is(FsType::Ext4)),
            (None, Some("xfs"), Is(FsType::Xfs)),
            (Some("ext3"), None, Is(FsType::Ext3)),
            (Some("xfs"), Some("xfs"), Is(FsType::Xfs)),
            (Some("xfs"), Some(""), Is(FsType::Xfs)),
            (Some("xfs"), Some("ext4"), Invalid("parameter `csi.storage.k8s.io/fstype` is \"xfs\" but the volume capability asks for fs_type \"ext4\"; make them agree")),
            (Some("ntfs"), None, Invalid("parameter `csi.storage.k8s.io/fstype`: fstype \"ntfs\" is not supported; expected one of ext4, ext3, xfs")),
            (Some("EXT4"), None, Invalid("fstype \"EXT4\" is not supported")),
            (None, Some("btrfs"), Invalid("volume capability: fstype \"btrfs\" is not supported")),
        ];
        for (parameter, capability, want) in cases {
            let p = parameter
                .map(|v| params(&[(FSTYPE_KEY, v)]))
                .unwrap_or_default();
            let case = format!("{parameter:?} {capability:?}");
            check(&case, spec(gib(10), &p, capability), want, |s| s.fs.fs_type);
        }
        assert_eq!(FsType::Xfs.mkfs_program(), "mkfs.xfs");
        assert_eq!(FsType::Ext3.to_string(), "ext3");
    }

    #[test]
    fn format_options() {
        #[rustfmt::skip]
        let cases: Vec<(&str, Pairs, Want<&[&str]>)> = vec![
            ("ext4", &[], Is(&[])),
            ("xfs", &[], Is(&[])),
            ("ext4", &[("blockSize", "4096"), ("inodeSize", "256"), ("bytesPerInode", "8192"), ("numberOfInodes", "1000")],
                Is(&["-b", "4096", "-I", "256", "-i", "8192", "-N", "1000"])),
            ("ext3", &[("blockSize", "1024"), ("inodeSize", "128")], Is(&["-b", "1024", "-I", "128"])),
            ("ext4", &[("blockSize", "65536"), ("inodeSize", "8192")], Is(&["-b", "65536", "-I", "8192"])),
            ("ext4", &[("bytesPerInode", "67108864"), ("numberOfInodes", "4294967295")], Is(&["-i", "67108864", "-N", "4294967295"])),
            ("xfs", &[("blockSize", "4096"), ("inodeSize", "512")], Is(&["-b", "size=4096", "-i", "size=512"])),
            ("xfs", &[("inodeSize", "2048")], Is(&["-i", "size=2048"])),
            ("xfs", &[("blockSize", "65536")], Is(&["-b", "size=65536"])),
            // ext3/ext4.
            ("ext4", &[("blockSize", "3000")], Invalid("parameter `blockSize` is 3000; ext4 needs a power of two in 1024–65536 bytes")),
            ("ext4", &[("blockSize", "512")], Invalid("parameter `blockSize` is 512")),
            ("ext4", &[("blockSize", "131072")], Invalid("parameter `blockSize` is 131072")),
            ("ext4", &[("blockSize", "4k")], Invalid("parameter `blockSize` is \"4k\"; expected a whole number")),
            ("ext4", &[("inodeSize", "64")], Invalid("parameter `inodeSize` is 64; ext4 needs a power of two in 128–65536 bytes")),
            ("ext4", &[("inodeSize", "300")], Invalid("parameter `inodeSize` is 300")),
            ("ext4", &[("inodeSize", "8192")], Invalid("can't be larger than the block size (4096, the default)")),
            ("ext4", &[("inodeSize", "4096"), ("blockSize", "2048")], Invalid("can't be larger than the block size (2048)")),
            ("ext4", &[("bytesPerInode", "512")], Invalid("parameter `bytesPerInode` is 512; ext4 needs 1024–67108864 bytes")),
            ("ext4", &[("bytesPerInode", "67108865")], Invalid("parameter `bytesPerInode` is 67108865")),
            ("ext3", &[("numberOfInodes", "0")], Invalid("parameter `numberOfInodes` is 0; ext3 allows 1–4294967295 inodes")),
            ("ext3", &[("numberOfInodes", "4294967296")], Invalid("parameter `numberOfInodes` is 4294967296")),
            // xfs.
            ("xfs", &[("bytesPerInode", "16384")], Invalid("parameter `bytesPerInode` applies only to ext3 and ext4, but the fstype is xfs")),
            ("xfs", &[("numberOfInodes", "1000")], Invalid("parameter `numberOfInodes` applies only to ext3 and ext4")),
            ("xfs", &[("blockSize", "512")], Invalid("parameter `blockSize` is 512; xfs needs a power of two in 1024–65536 bytes")),
            ("xfs", &[("inodeSize", "256")], Invalid("parameter `inodeSize` is 256; xfs needs a power of two in 512–2048 bytes")),
            ("xfs", &[("inodeSize", "4096")], Invalid("parameter `inodeSize` is 4096")),
            ("xfs", &[("inodeSize", "2048"), ("blockSize", "2048")], Invalid("at most half the block size (2048)")),
        ];
        for (fs, pairs, want) in cases {
            let case = format!("{fs} {pairs:?}");
            let want = match want {
                Is(args) => Is(args.iter().map(|a| a.to_string()).collect()),
                Invalid(m) => Invalid(m),
                Range(m) => Range(m),
            };
            check(&case, spec(gib(10), &params(pairs), Some(fs)), want, |s| {
                s.fs.mkfs_args()
            });
        }
    }

    #[test]
    fn limits_table_is_consistent() {
        for t in VolumeType::ALL {
            let l = t.limits();
            assert!(
                l.size_gib.min >= 1 && l.size_gib.min < l.size_gib.max,
                "{t}"
            );
            if let Some(iops) = l.iops {
                // The largest volume can reach the maximum; the smallest the minimum.
                assert_eq!(iops.max_for_size(l.size_gib.max), iops.range.max, "{t}");
                assert!(iops.max_for_size(l.size_gib.min) >= iops.range.min, "{t}");
                assert!(u32::try_from(iops.range.max).is_ok(), "{t}");
            }
            let provisioned = matches!(t, VolumeType::Gp3 | VolumeType::Io1 | VolumeType::Io2);
            assert_eq!(l.iops.is_some(), provisioned, "{t}");
            assert_eq!(l.throughput.is_some(), t == VolumeType::Gp3, "{t}");
        }
    }
}
