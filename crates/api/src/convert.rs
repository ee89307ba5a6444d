//! The conversions between CSI's protobufs, the domain types of [`crate::volume`] and
//! Kubernetes' names for the same things, each written once: access modes (CSI enum ↔
//! domain ↔ `ReadWriteOnce` …) and volumes (CSI `Volume` ↔ domain `Volume`).
//! Validation of what a CO sent stays with the driver (`csi/validate.rs`), which calls
//! these for the parts that are plain mappings.

use crate::proto::csi as proto;
use crate::proto::csi::volume_capability::access_mode::Mode;
use crate::volume::{AccessMode, ContentSource, Volume};

/// Kubernetes' access mode names, in the order error messages list them.
pub const KUBERNETES_ACCESS_MODES: [&str; 4] = [
    "ReadWriteOnce",
    "ReadOnlyMany",
    "ReadWriteMany",
    "ReadWriteOncePod",
];

/// A Kubernetes access mode → the CSI one, as external-provisioner's `accessmodes`
/// package maps it without SINGLE_NODE_MULTI_WRITER support: ReadWriteOnce →
/// SingleNodeWriter, ReadOnlyMany → MultiNodeReaderOnly, ReadWriteMany →
/// MultiNodeMultiWriter, ReadWriteOncePod → SingleNodeSingleWriter. `None` when unknown.
pub fn access_mode_from_kubernetes(name: &str) -> Option<AccessMode> {
    Some(match name {
        "ReadWriteOnce" => AccessMode::SingleNodeWriter,
        "ReadOnlyMany" => AccessMode::MultiNodeReaderOnly,
        "ReadWriteMany" => AccessMode::MultiNodeMultiWriter,
        "ReadWriteOncePod" => AccessMode::SingleNodeSingleWriter,
        _ => return None,
    })
}

/// The domain access mode as CSI's enum.
pub fn access_mode_to_proto(mode: AccessMode) -> Mode {
    match mode {
        AccessMode::SingleNodeWriter => Mode::SingleNodeWriter,
        AccessMode::SingleNodeReaderOnly => Mode::SingleNodeReaderOnly,
        AccessMode::MultiNodeReaderOnly => Mode::MultiNodeReaderOnly,
        AccessMode::MultiNodeSingleWriter => Mode::MultiNodeSingleWriter,
        AccessMode::MultiNodeMultiWriter => Mode::MultiNodeMultiWriter,
        AccessMode::SingleNodeSingleWriter => Mode::SingleNodeSingleWriter,
        AccessMode::SingleNodeMultiWriter => Mode::SingleNodeMultiWriter,
    }
}

/// CSI's access mode number as the domain one; `None` for UNKNOWN or a number CSI
/// does not define.
pub fn access_mode_from_proto(mode: i32) -> Option<AccessMode> {
    Some(match Mode::try_from(mode).ok()? {
        Mode::SingleNodeWriter => AccessMode::SingleNodeWriter,
        Mode::SingleNodeReaderOnly => AccessMode::SingleNodeReaderOnly,
        Mode::MultiNodeReaderOnly => AccessMode::MultiNodeReaderOnly,
        Mode::MultiNodeSingleWriter => AccessMode::MultiNodeSingleWriter,
        Mode::MultiNodeMultiWriter => AccessMode::MultiNodeMultiWriter,
        Mode::SingleNodeSingleWriter => AccessMode::SingleNodeSingleWriter,
        Mode::SingleNodeMultiWriter => AccessMode::SingleNodeMultiWriter,
        Mode::Unknown => return None,
    })
}

/// The domain volume as CSI's `Volume` (capacity saturates at `i64::MAX`).
pub fn volume_to_proto(volume: Volume) -> proto::Volume {
    let content_source = volume.source.map(source_to_proto);
    proto::Volume {
        capacity_bytes: i64::try_from(volume.capacity_bytes).unwrap_or(i64::MAX),
        volume_id: volume.id,
        volume_context: volume.context.into_iter().collect(),
        content_source,
        accessible_topology: volume
            .topology
            .into_iter()
            .map(|segments| proto::Topology {
                segments: segments.into_iter().collect(),
            })
            .collect(),
    }
}

/// CSI's `Volume` as the domain one (a negative capacity reads as 0, unknown).
pub fn volume_from_proto(volume: proto::Volume) -> Volume {
    let source = volume.content_source.and_then(source_from_proto);
    Volume {
        id: volume.volume_id,
        capacity_bytes: u64::try_from(volume.capacity_bytes).unwrap_or(0),
        context: volume.volume_context.into_iter().collect(),
        topology: volume
            .accessible_topology
            .into_iter()
            .map(|t| t.segments.into_iter().collect())
            .collect(),
        source,
    }
}

/// A content source as CSI sends it.
pub fn source_to_proto(source: ContentSource) -> proto::VolumeContentSource {
    use proto::volume_content_source::{SnapshotSource, Type, VolumeSource};
    proto::VolumeContentSource {
        r#type: Some(match source {
            ContentSource::Snapshot(snapshot_id) => Type::Snapshot(SnapshotSource { snapshot_id }),
            ContentSource::Volume(volume_id) => Type::Volume(VolumeSource { volume_id }),
        }),
    }
}

/// CSI's content source as the domain one (`None` when it names neither kind).
pub fn source_from_proto(source: proto::VolumeContentSource) -> Option<ContentSource> {
    use proto::volume_content_source::Type;
    match source.r#type? {
        Type::Snapshot(snapshot) => Some(ContentSource::Snapshot(snapshot.snapshot_id)),
        Type::Volume(volume) => Some(ContentSource::Volume(volume.volume_id)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::Segments;

    const ALL: [AccessMode; 7] = [
        AccessMode::SingleNodeWriter,
        AccessMode::SingleNodeReaderOnly,
        AccessMode::MultiNodeReaderOnly,
        AccessMode::MultiNodeSingleWriter,
        AccessMode::MultiNodeMultiWriter,
        AccessMode::SingleNodeSingleWriter,
        AccessMode::SingleNodeMultiWriter,
    ];

    #[test]
    fn access_modes_round_trip_through_proto() {
        for mode in ALL {
            assert_eq!(
                access_mode_from_proto(access_mode_to_proto(mode) as i32),
                Some(mode)
            );
        }
        assert_eq!(access_mode_from_proto(Mode::Unknown as i32), None);
        assert_eq!(access_mode_from_proto(99), None);
    }

    #[test]
    fn every_kubernetes_mode_is_known_and_nothing_else() {
        for name in KUBERNETES_ACCESS_MODES {
            assert!(access_mode_from_kubernetes(name).is_some(), "{name}");
        }
        assert_eq!(access_mode_from_kubernetes("readwriteonce"), None);
        assert_eq!(access_mode_from_kubernetes(""), None);
    }

    #[test]
    fn volumes_round_trip_through_proto() {
        let volume = Volume {
            id: "vol-1".into(),
            capacity_bytes: 5 << 30,
            context: [("subDir".to_owned(), "a/b".to_owned())].into(),
            topology: vec![Segments::from([(
                "topology.ebs.csi.aws.com/zone".to_owned(),
                "us-east-1a".to_owned(),
            )])],
            source: Some(ContentSource::Snapshot("snap-1".into())),
        };
        assert_eq!(volume_from_proto(volume_to_proto(volume.clone())), volume);
        let huge = Volume {
            capacity_bytes: u64::MAX,
            ..volume
        };
        assert_eq!(volume_to_proto(huge).capacity_bytes, i64::MAX);
    }
}
