//! The CSI conformance cases csi-sanity v5.4 runs for the capabilities stowage
//! advertises, against `stowage local` (real gRPC server on a temp unix socket, real
//! embedded NFS server, real bind mounts). Idempotent calls are repeated 10×, as
//! csi-sanity does.

mod common;

use common::*;
use stowage_api::proto::csi::{
    self as proto, controller_service_capability as csc, node_service_capability as nsc,
    plugin_capability as pc,
};
use tonic::Code;

const REPEAT: usize = 10;

#[tokio::test]
async fn identity_reports_name_version_capabilities_and_readiness() {
    let local = Local::start().await;
    let mut identity = local.identity();
    let info = identity
        .get_plugin_info(proto::GetPluginInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.name, "stowage.csi.dev");
    assert!(!info.vendor_version.is_empty());
    let caps = identity
        .get_plugin_capabilities(proto::GetPluginCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner()
        .capabilities;
    let controller = pc::service::Type::ControllerService as i32;
    assert!(
        caps.iter()
            .any(|c| matches!(&c.r#type, Some(pc::Type::Service(s)) if s.r#type == controller))
    );
    let probe = identity
        .probe(proto::ProbeRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(probe.ready, Some(true));
    local.stop().await;
}

#[tokio::test]
async fn controller_and_node_capabilities_are_exactly_what_is_implemented() {
    let local = Local::start().await;
    let caps = local
        .controller()
        .controller_get_capabilities(proto::ControllerGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner()
        .capabilities;
    let mut rpcs: Vec<i32> = caps
        .iter()
        .map(|c| match &c.r#type {
            Some(csc::Type::Rpc(rpc)) => rpc.r#type,
            None => panic!("capability without type"),
        })
        .collect();
    rpcs.sort();
    use csc::rpc::Type;
    let mut expected = vec![
        Type::CreateDeleteVolume as i32,
        Type::ListVolumes as i32,
        Type::GetCapacity as i32,
        Type::ExpandVolume as i32,
        Type::CreateDeleteSnapshot as i32,
        Type::ListSnapshots as i32,
        Type::CloneVolume as i32,
    ];
    expected.sort();
    assert_eq!(rpcs, expected);

    let node_caps = local
        .node()
        .node_get_capabilities(proto::NodeGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner()
        .capabilities;
    let node_rpcs: Vec<i32> = node_caps
        .iter()
        .map(|c| match &c.r#type {
            Some(nsc::Type::Rpc(rpc)) => rpc.r#type,
            None => panic!("capability without type"),
        })
        .collect();
    assert_eq!(node_rpcs, [nsc::rpc::Type::GetVolumeStats as i32]);

    let info = local
        .node()
        .node_get_info(proto::NodeGetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.node_id, "test-node");
    assert!(info.max_volumes_per_node >= 0);
    local.stop().await;
}

#[tokio::test]
async fn create_volume_argument_checks() {
    let local = Local::start().await;
    let mut c = local.controller();
    let no_name = proto::CreateVolumeRequest {
        name: String::new(),
        ..create_request("x", GIB, &[])
    };
    assert_eq!(
        c.create_volume(no_name).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    let no_caps = proto::CreateVolumeRequest {
        volume_capabilities: vec![],
        ..create_request("x", GIB, &[])
    };
    assert_eq!(
        c.create_volume(no_caps).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    let block = proto::CreateVolumeRequest {
        volume_capabilities: vec![block_capability()],
        ..create_request("x", GIB, &[])
    };
    let err = c.create_volume(block).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("volumeMode"), "{}", err.message());
    let before = tree(&local.data_dir());
    let unknown = create_request("x", GIB, &[("onDelet", "retain")]);
    let err = c.create_volume(unknown).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("`onDelet`") && err.message().contains("`onDelete`"),
        "{}",
        err.message()
    );
    assert_eq!(
        tree(&local.data_dir()),
        before,
        "a rejected request changed nothing"
    );
    local.stop().await;
}

#[tokio::test]
async fn create_volume_is_idempotent_by_name() {
    let local = Local::start().await;
    let mut c = local.controller();
    let first = create(&mut c, "same-name", &[]).await;
    assert!(first.capacity_bytes >= GIB);
    for _ in 0..REPEAT {
        let again = create(&mut c, "same-name", &[]).await;
        assert_eq!(again.volume_id, first.volume_id);
        assert_eq!(again.capacity_bytes, first.capacity_bytes);
    }
    assert!(local.data_dir().join("same-name").is_dir());
    delete(&mut c, &first.volume_id).await;
    local.stop().await;
}

#[tokio::test]
async fn same_name_with_other_capacity_is_already_exists() {
    let local = Local::start().await;
    let mut c = local.controller();
    let exact = |bytes| proto::CreateVolumeRequest {
        capacity_range: Some(proto::CapacityRange {
            required_bytes: bytes,
            limit_bytes: bytes,
        }),
        ..create_request("sized", bytes, &[])
    };
    let volume = c
        .create_volume(exact(GIB))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(
        volume.capacity_bytes, GIB,
        "required == limit gives exactly that size"
    );
    let err = c.create_volume(exact(2 * GIB)).await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{}", err.message());
    // Other parameters for the same name are ALREADY_EXISTS too.
    let err = c
        .create_volume(create_request(
            "sized",
            GIB,
            &[("mountPermissions", "0700")],
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{}", err.message());
    delete(&mut c, &volume.volume_id).await;
    local.stop().await;
}

#[tokio::test]
async fn maximum_length_name_and_no_capacity() {
    let local = Local::start().await;
    let mut c = local.controller();
    let long = "a".repeat(128);
    let volume = create(&mut c, &long, &[]).await;
    assert!(!volume.volume_id.is_empty());
    let no_capacity = proto::CreateVolumeRequest {
        capacity_range: None,
        ..create_request("nocap", 0, &[])
    };
    let nocap = c
        .create_volume(no_capacity)
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert!(!nocap.volume_id.is_empty());
    delete(&mut c, &volume.volume_id).await;
    delete(&mut c, &nocap.volume_id).await;
    local.stop().await;
}

#[tokio::test]
async fn delete_volume_is_idempotent_and_removes_the_directory() {
    let local = Local::start().await;
    let mut c = local.controller();
    let empty = c
        .delete_volume(proto::DeleteVolumeRequest::default())
        .await
        .unwrap_err();
    assert_eq!(empty.code(), Code::InvalidArgument);
    for fake in ["fake-vol-id", "nfs###x#x#delete"] {
        c.delete_volume(proto::DeleteVolumeRequest {
            volume_id: fake.into(),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("{fake}: {e}"));
    }
    // An id naming a directory no volume may have is refused, not "already gone".
    let hostile = c
        .delete_volume(proto::DeleteVolumeRequest {
            volume_id: "nfs#1.2.3.4#/x#../../etc#y#delete".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(hostile.code(), Code::InvalidArgument, "{hostile:?}");
    assert!(hostile.message().contains("\"..\""), "{hostile:?}");
    let volume = create(&mut c, "to-delete", &[]).await;
    std::fs::write(local.data_dir().join("to-delete/file"), "data").unwrap();
    for _ in 0..REPEAT {
        delete(&mut c, &volume.volume_id).await;
    }
    assert!(!local.data_dir().join("to-delete").exists());
    local.stop().await;
}

#[tokio::test]
async fn on_delete_retain_and_archive() {
    let local = Local::start().await;
    let mut c = local.controller();
    let kept = create(&mut c, "kept", &[("onDelete", "retain")]).await;
    delete(&mut c, &kept.volume_id).await;
    assert!(
        local.data_dir().join("kept").is_dir(),
        "retain keeps the directory"
    );
    let archived = create(&mut c, "old", &[("onDelete", "archive")]).await;
    std::fs::write(local.data_dir().join("old/file"), "data").unwrap();
    delete(&mut c, &archived.volume_id).await;
    assert!(!local.data_dir().join("old").exists());
    assert_eq!(
        std::fs::read_to_string(local.data_dir().join("archived-old/file")).unwrap(),
        "data"
    );
    local.stop().await;
}

#[tokio::test]
async fn validate_volume_capabilities() {
    let local = Local::start().await;
    let mut c = local.controller();
    let no_id = proto::ValidateVolumeCapabilitiesRequest {
        volume_capabilities: vec![mount_capability()],
        ..Default::default()
    };
    assert_eq!(
        c.validate_volume_capabilities(no_id)
            .await
            .unwrap_err()
            .code(),
        Code::InvalidArgument
    );
    let volume = create(&mut c, "validate", &[]).await;
    let no_caps = proto::ValidateVolumeCapabilitiesRequest {
        volume_id: volume.volume_id.clone(),
        ..Default::default()
    };
    assert_eq!(
        c.validate_volume_capabilities(no_caps)
            .await
            .unwrap_err()
            .code(),
        Code::InvalidArgument
    );
    let fake = proto::ValidateVolumeCapabilitiesRequest {
        volume_id: "fake-vol-id".into(),
        volume_capabilities: vec![mount_capability()],
        ..Default::default()
    };
    assert_eq!(
        c.validate_volume_capabilities(fake)
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    let ok = c
        .validate_volume_capabilities(proto::ValidateVolumeCapabilitiesRequest {
            volume_id: volume.volume_id.clone(),
            volume_capabilities: vec![mount_capability()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(ok.confirmed.is_some(), "{}", ok.message);
    let block = c
        .validate_volume_capabilities(proto::ValidateVolumeCapabilitiesRequest {
            volume_id: volume.volume_id.clone(),
            volume_capabilities: vec![block_capability()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(block.confirmed.is_none() && !block.message.is_empty());
    delete(&mut c, &volume.volume_id).await;
    local.stop().await;
}

async fn list_all(
    c: &mut proto::controller_client::ControllerClient<tonic::transport::Channel>,
    max: i32,
) -> Vec<String> {
    let mut ids = Vec::new();
    let mut token = String::new();
    loop {
        let page = c
            .list_volumes(proto::ListVolumesRequest {
                max_entries: max,
                starting_token: token,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(max == 0 || page.entries.len() <= max as usize);
        ids.extend(
            page.entries
                .into_iter()
                .map(|e| e.volume.unwrap().volume_id),
        );
        if page.next_token.is_empty() {
            return ids;
        }
        token = page.next_token;
    }
}

#[tokio::test]
async fn list_volumes_counts_pages_and_rejects_bad_tokens() {
    let local = Local::start().await;
    let mut c = local.controller();
    let bad = c
        .list_volumes(proto::ListVolumesRequest {
            max_entries: 0,
            starting_token: "invalid-token".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::Aborted);
    let negative = c
        .list_volumes(proto::ListVolumesRequest {
            max_entries: -1,
            ..Default::default()
        })
        .await;
    assert_eq!(negative.unwrap_err().code(), Code::InvalidArgument);
    assert_eq!(list_all(&mut c, 0).await.len(), 0);
    let mut created = Vec::new();
    for i in 0..5 {
        created.push(create(&mut c, &format!("list-{i}"), &[]).await.volume_id);
    }
    let all = list_all(&mut c, 0).await;
    assert_eq!(all.len(), 5);
    let paged = list_all(&mut c, 2).await;
    assert_eq!(paged, all, "paging returns every volume once, in order");
    delete(&mut c, &created[0]).await;
    assert_eq!(list_all(&mut c, 0).await.len(), 4);
    local.stop().await;
}

#[tokio::test]
async fn get_capacity_reports_the_export_free_space() {
    let local = Local::start().await;
    let capacity = local
        .controller()
        .get_capacity(proto::GetCapacityRequest::default())
        .await
        .unwrap()
        .into_inner()
        .available_capacity;
    let usage = stowage_driver::node::usage(&local.data_dir()).unwrap();
    assert!(capacity > 0);
    let diff = (capacity - usage.bytes_available as i64).abs();
    assert!(
        diff < (usage.bytes_total as i64) / 10,
        "capacity {capacity} vs statvfs {usage:?}"
    );
    local.stop().await;
}

#[tokio::test]
async fn concurrent_creates_of_one_name_make_one_volume() {
    let local = Local::start().await;
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let mut c = local.controller();
        tasks.push(tokio::spawn(async move {
            c.create_volume(create_request("racy", GIB, &[])).await
        }));
    }
    let mut ids = std::collections::BTreeSet::new();
    for task in tasks {
        match task.await.unwrap() {
            Ok(r) => {
                ids.insert(r.into_inner().volume.unwrap().volume_id);
            }
            Err(status) => assert_eq!(status.code(), Code::Aborted, "{status}"),
        }
    }
    assert_eq!(ids.len(), 1, "every success names the same volume");
    let entries: Vec<_> = std::fs::read_dir(local.data_dir())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(
        entries
            .iter()
            .filter(|n| n.to_string_lossy().starts_with("racy"))
            .count(),
        1
    );
    local.stop().await;
}
