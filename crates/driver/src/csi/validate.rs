//! Pure request validation: protobuf messages in, domain types or an INVALID_ARGUMENT /
//! OUT_OF_RANGE status out. No I/O, so every rule is table-tested below.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use tonic::Status;

use super::proto::{self, volume_capability as vc};
use stowage_api::convert::access_mode_from_proto;
use stowage_api::volume::{AccessType, Capability, CapacityRange, ContentSource, CreateRequest};

/// Longest volume id or name accepted (ids end up in paths and API objects).
const MAX_ID_LEN: usize = 1024;

/// A required string field: present, not too long, no NUL.
pub fn required<'a>(field: &str, value: &'a str) -> Result<&'a str, Status> {
    if value.is_empty() {
        return Err(Status::invalid_argument(format!("{field} is required")));
    }
    if value.len() > MAX_ID_LEN || value.contains('\0') {
        return Err(Status::invalid_argument(format!(
            "{field} must be at most {MAX_ID_LEN} bytes without NUL"
        )));
    }
    Ok(value)
}

/// A path on the node given by the CO: absolute, normalised, no `..`.
pub fn node_path(field: &str, value: &str) -> Result<PathBuf, Status> {
    required(field, value)?;
    let path = Path::new(value);
    // `Path::components` hides `.`; look at the raw segments.
    let clean = path.is_absolute() && value.split('/').all(|s| s != "." && s != "..");
    if !clean {
        return Err(Status::invalid_argument(format!(
            "{field} {value:?} must be an absolute path without `.` or `..`"
        )));
    }
    Ok(path.to_path_buf())
}

/// `path` (a [`node_path`]) strictly below `root`, compared component by component:
/// the part below `root`. `root` is kubelet's directory, the only place the node
/// service acts on; the symlink half of that check is `node::confine`'s.
pub fn under_root<'a>(field: &str, path: &'a Path, root: &Path) -> Result<&'a Path, Status> {
    match path.strip_prefix(root) {
        Ok(below) if below.components().next().is_some() => Ok(below),
        _ => Err(Status::invalid_argument(format!(
            "{field} {:?} is not under the kubelet directory {} (--kubelet-dir); the node plugin acts only on paths under it",
            path.display().to_string(),
            root.display()
        ))),
    }
}

/// One capability: access type and a known access mode are both required.
pub fn capability(capability: &proto::VolumeCapability) -> Result<Capability, Status> {
    let access_type = match &capability.access_type {
        Some(vc::AccessType::Mount(mount)) => AccessType::Mount {
            fs_type: Some(mount.fs_type.clone()).filter(|f| !f.is_empty()),
            mount_flags: mount.mount_flags.clone(),
        },
        Some(vc::AccessType::Block(_)) => AccessType::Block,
        None => {
            return Err(Status::invalid_argument(
                "volume capability access_type is required (mount or block)",
            ));
        }
    };
    let mode = capability
        .access_mode
        .as_ref()
        .ok_or_else(|| Status::invalid_argument("volume capability access_mode is required"))?;
    let access_mode = access_mode_from_proto(mode.mode).ok_or_else(|| {
        Status::invalid_argument(format!(
            "volume capability access_mode {} is not a known mode",
            mode.mode
        ))
    })?;
    Ok(Capability {
        access_type,
        access_mode,
    })
}

/// A non-empty list of capabilities.
pub fn capabilities(list: &[proto::VolumeCapability]) -> Result<Vec<Capability>, Status> {
    if list.is_empty() {
        return Err(Status::invalid_argument("volume_capabilities is required"));
    }
    list.iter().map(capability).collect()
}

/// Capacity bounds: non-negative, and limit ≥ required when both are set.
pub fn capacity_range(range: Option<&proto::CapacityRange>) -> Result<CapacityRange, Status> {
    let Some(range) = range else {
        return Ok(CapacityRange::default());
    };
    if range.required_bytes < 0 || range.limit_bytes < 0 {
        return Err(Status::out_of_range(
            "capacity_range bytes must not be negative",
        ));
    }
    if range.required_bytes == 0 && range.limit_bytes == 0 {
        return Err(Status::out_of_range(
            "capacity_range must set required_bytes or limit_bytes (a volume of 0 bytes is not a volume); leave capacity_range out to get the default size",
        ));
    }
    let required = range.required_bytes as u64;
    let limit = (range.limit_bytes > 0).then_some(range.limit_bytes as u64);
    if let Some(limit) = limit
        && limit < required
    {
        return Err(Status::out_of_range(format!(
            "capacity_range limit_bytes {limit} is below required_bytes {required}"
        )));
    }
    Ok(CapacityRange { required, limit })
}

/// CreateVolume: name, capabilities and capacity checked; parameters copied.
pub fn create_volume(request: &proto::CreateVolumeRequest) -> Result<CreateRequest, Status> {
    let name = required("name", &request.name)?.to_owned();
    let capabilities = capabilities(&request.volume_capabilities)?;
    let capacity = capacity_range(request.capacity_range.as_ref())?;
    use proto::volume_content_source::Type as Source;
    let source = match request
        .volume_content_source
        .as_ref()
        .and_then(|s| s.r#type.as_ref())
    {
        None if request.volume_content_source.is_none() => None,
        Some(Source::Snapshot(snapshot)) => Some(ContentSource::Snapshot(
            required(
                "volume_content_source.snapshot.snapshot_id",
                &snapshot.snapshot_id,
            )?
            .to_owned(),
        )),
        Some(Source::Volume(volume)) => Some(ContentSource::Volume(
            required("volume_content_source.volume.volume_id", &volume.volume_id)?.to_owned(),
        )),
        None => {
            return Err(Status::invalid_argument(
                "volume_content_source has no type",
            ));
        }
    };
    let segments = |topologies: &[proto::Topology]| -> Vec<stowage_api::volume::Segments> {
        topologies.iter().map(|t| to_btree(&t.segments)).collect()
    };
    let accessibility = request
        .accessibility_requirements
        .as_ref()
        .map(|a| stowage_api::volume::Accessibility {
            requisite: segments(&a.requisite),
            preferred: segments(&a.preferred),
        })
        .unwrap_or_default();
    // A VolumeAttributesClass at creation: its keys join the StorageClass parameters
    // (and win), as they would after a ControllerModifyVolume.
    let mut parameters = to_btree(&request.parameters);
    parameters.extend(to_btree(&request.mutable_parameters));
    Ok(CreateRequest {
        name,
        capacity,
        capabilities,
        parameters,
        accessibility,
        secrets: to_btree(&request.secrets),
        source,
    })
}

/// protobuf maps are HashMaps; the domain uses ordered maps.
pub fn to_btree(map: &std::collections::HashMap<String, String>) -> BTreeMap<String, String> {
    map.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    fn mount_cap(mode: vc::access_mode::Mode) -> proto::VolumeCapability {
        proto::VolumeCapability {
            access_type: Some(vc::AccessType::Mount(vc::MountVolume::default())),
            access_mode: Some(vc::AccessMode { mode: mode as i32 }),
        }
    }

    #[test]
    fn required_fields() {
        assert_eq!(
            required("volume_id", "").unwrap_err().code(),
            Code::InvalidArgument
        );
        assert_eq!(
            required("volume_id", "a\0b").unwrap_err().code(),
            Code::InvalidArgument
        );
        assert_eq!(
            required("volume_id", &"x".repeat(1025)).unwrap_err().code(),
            Code::InvalidArgument
        );
        assert_eq!(required("volume_id", "vol-1").unwrap(), "vol-1");
    }

    #[test]
    fn node_paths_must_be_absolute_and_normal() {
        for bad in ["", "relative/path", "/a/../b", "/a/./b", "/a/\0"] {
            assert!(node_path("target_path", bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(
            node_path("target_path", "/var/lib/x").unwrap(),
            PathBuf::from("/var/lib/x")
        );
    }

    #[test]
    fn node_paths_must_be_strictly_under_the_root() {
        fn under(value: &str) -> Result<&Path, Status> {
            under_root(
                "target_path",
                Path::new(value),
                Path::new("/var/lib/kubelet"),
            )
        }
        assert_eq!(
            under("/var/lib/kubelet/pods/x").unwrap(),
            Path::new("pods/x")
        );
        for outside in [
            "/var/lib/kubelet",
            "/var/lib/kubelet-other/x",
            "/var/lib",
            "/tmp/x",
        ] {
            let err = under(outside).unwrap_err();
            assert_eq!(err.code(), Code::InvalidArgument, "{outside}");
            assert!(
                err.message().contains("--kubelet-dir") && err.message().contains(outside),
                "{}",
                err.message()
            );
        }
        // A trailing slash on the root changes nothing.
        assert!(under_root("t", Path::new("/k/x"), Path::new("/k/")).is_ok());
    }

    #[test]
    fn capabilities_need_type_and_known_mode() {
        use vc::access_mode::Mode;
        assert!(capabilities(&[]).is_err());
        let no_type = proto::VolumeCapability {
            access_type: None,
            access_mode: Some(vc::AccessMode {
                mode: Mode::SingleNodeWriter as i32,
            }),
        };
        assert!(capability(&no_type).is_err());
        let no_mode = proto::VolumeCapability {
            access_type: Some(vc::AccessType::Block(vc::BlockVolume {})),
            access_mode: None,
        };
        assert!(capability(&no_mode).is_err());
        assert!(capability(&mount_cap(Mode::Unknown)).is_err());
        let bogus = proto::VolumeCapability {
            access_mode: Some(vc::AccessMode { mode: 99 }),
            ..mount_cap(Mode::SingleNodeWriter)
        };
        assert!(capability(&bogus).is_err());
        let ok = capability(&mount_cap(Mode::MultiNodeMultiWriter)).unwrap();
        assert_eq!(
            ok.access_mode,
            stowage_api::volume::AccessMode::MultiNodeMultiWriter
        );
        assert_eq!(
            ok.access_type,
            AccessType::Mount {
                fs_type: None,
                mount_flags: vec![]
            }
        );
    }

    #[test]
    fn capacity_ranges() {
        let range = |required_bytes, limit_bytes| proto::CapacityRange {
            required_bytes,
            limit_bytes,
        };
        assert_eq!(capacity_range(None).unwrap(), CapacityRange::default());
        assert_eq!(
            capacity_range(Some(&range(0, 0))).unwrap_err().code(),
            Code::OutOfRange,
            "a present range must set a size"
        );
        assert_eq!(
            capacity_range(Some(&range(-1, 0))).unwrap_err().code(),
            Code::OutOfRange
        );
        assert_eq!(
            capacity_range(Some(&range(10, 5))).unwrap_err().code(),
            Code::OutOfRange
        );
        assert_eq!(
            capacity_range(Some(&range(10, 0))).unwrap(),
            CapacityRange {
                required: 10,
                limit: None
            }
        );
        assert_eq!(
            capacity_range(Some(&range(10, 10))).unwrap(),
            CapacityRange {
                required: 10,
                limit: Some(10)
            }
        );
    }

    #[test]
    fn create_volume_requires_name_and_capabilities() {
        use vc::access_mode::Mode;
        let good = proto::CreateVolumeRequest {
            name: "pvc-1".into(),
            volume_capabilities: vec![mount_cap(Mode::SingleNodeWriter)],
            ..Default::default()
        };
        assert!(create_volume(&good).is_ok());
        let no_name = proto::CreateVolumeRequest {
            name: String::new(),
            ..good.clone()
        };
        assert_eq!(
            create_volume(&no_name).unwrap_err().code(),
            Code::InvalidArgument
        );
        let no_caps = proto::CreateVolumeRequest {
            volume_capabilities: vec![],
            ..good.clone()
        };
        assert_eq!(
            create_volume(&no_caps).unwrap_err().code(),
            Code::InvalidArgument
        );
        let from_snapshot = proto::CreateVolumeRequest {
            volume_content_source: Some(proto::VolumeContentSource::default()),
            ..good
        };
        assert_eq!(
            create_volume(&from_snapshot).unwrap_err().code(),
            Code::InvalidArgument
        );
    }
}
