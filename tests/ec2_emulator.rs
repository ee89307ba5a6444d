//! The EC2 test infrastructure itself: moto, the fault proxy in front of it and the
//! loop-device "hypervisor". Each fault is shown to happen (and to stop after `n`),
//! so the EBS tests built on them can trust a green run.

mod common;

use std::time::{Duration, Instant};

use common::fault_proxy::FaultProxy;
use common::hypervisor::{GIB, Hypervisor, by_id_name};
use common::moto::{Ec2Query, Moto, xml};

const ZONE: &str = "us-east-1a";

#[tokio::test]
async fn moto_runs_instances_creates_volumes_and_resets() {
    let Some(moto) = Moto::start("moto_runs_instances_creates_volumes_and_resets") else {
        return;
    };
    assert!(moto.endpoint().starts_with("http://127.0.0.1:"));
    let instance = moto.run_instance("us-east-1b").await;
    assert!(instance.starts_with("i-"), "{instance}");
    assert_eq!(moto.count_volumes().await, 0, "no root volume");

    // Raw CreateVolume through the Query API.
    let body = moto
        .ok(
            "CreateVolume",
            &[
                ("AvailabilityZone", "us-east-1c"),
                ("Size", "7"),
                ("VolumeType", "gp3"),
                ("TagSpecification.1.ResourceType", "volume"),
                ("TagSpecification.1.Tag.1.Key", "CSIVolumeName"),
                ("TagSpecification.1.Tag.1.Value", "pvc-1"),
                ("TagSpecification.1.Tag.2.Key", "odd & <chars>"),
                ("TagSpecification.1.Tag.2.Value", "a=b+c%"),
            ],
        )
        .await;
    let id = xml::text(xml::root(&body), "volumeId").unwrap();
    assert!(id.starts_with("vol-"), "{body}");

    let volumes = moto.describe_volumes().await;
    assert_eq!(volumes.len(), 1);
    let volume = &volumes[0];
    assert_eq!(volume.id, id);
    assert_eq!(volume.size_gib, 7);
    assert_eq!(volume.state, "available");
    assert_eq!(
        volume.zone.as_deref(),
        Some("us-east-1c"),
        "moto keeps the zone"
    );
    assert_eq!(volume.volume_type.as_deref(), Some("gp3"));
    assert!(volume.attachments.is_empty());
    assert_eq!(volume.tags["CSIVolumeName"], "pvc-1");
    assert_eq!(volume.tags["odd & <chars>"], "a=b+c%");

    moto.attach_volume(&id, &instance, "/dev/xvdba").await;
    let volume = moto.volume(&id).await.unwrap();
    assert_eq!(volume.state, "in-use");
    assert_eq!(volume.attachments.len(), 1);
    assert_eq!(volume.attachments[0].instance_id, instance);
    assert_eq!(volume.attachments[0].device, "/dev/xvdba");
    assert_eq!(volume.attachments[0].state, "attached");

    // Errors come back as EC2 error documents.
    let reply = moto
        .call("DescribeVolumes", &[("VolumeId.1", "vol-0000000000000000")])
        .await;
    assert_eq!(reply.status, 400);
    assert_eq!(reply.code().as_deref(), Some("InvalidVolume.NotFound"));
    let reply = moto.call("DeleteVolume", &[("VolumeId", &id)]).await;
    assert_eq!(
        reply.code().as_deref(),
        Some("VolumeInUse"),
        "{}",
        reply.body
    );

    moto.reset().await;
    assert_eq!(moto.count_volumes().await, 0);
    let reply = moto
        .call("DescribeInstances", &[("InstanceId.1", &instance)])
        .await;
    assert_eq!(
        reply.code().as_deref(),
        Some("InvalidInstanceID.NotFound"),
        "{}",
        reply.body
    );
}

#[tokio::test]
async fn proxy_forwards_and_counts_every_action() {
    let Some(moto) = Moto::start("proxy_forwards_and_counts_every_action") else {
        return;
    };
    let proxy = FaultProxy::start(&moto.endpoint()).await;
    let ec2 = Ec2Query::new(proxy.endpoint());
    let id = ec2.create_volume(ZONE, 1, &[("k", "v")]).await;
    assert_eq!(ec2.describe_volumes().await[0].id, id);
    assert_eq!(ec2.count_volumes().await, 1);
    let reply = ec2.call("NoSuchAction", &[]).await;
    assert_ne!(reply.status, 200);
    let counts = proxy.counts();
    assert_eq!(counts.get("CreateVolume"), Some(&1));
    assert_eq!(counts.get("DescribeVolumes"), Some(&2));
    assert_eq!(counts.get("NoSuchAction"), Some(&1));
    assert_eq!(counts.len(), 3, "{counts:?}");
    proxy.reset_counts();
    assert!(proxy.counts().is_empty());
}

#[tokio::test]
async fn proxy_throttles_with_request_limit_exceeded() {
    let Some(moto) = Moto::start("proxy_throttles_with_request_limit_exceeded") else {
        return;
    };
    let proxy = FaultProxy::start(&moto.endpoint()).await;
    let ec2 = Ec2Query::new(proxy.endpoint());
    proxy.throttle("CreateVolume", 2);
    let params = [("AvailabilityZone", ZONE), ("Size", "1")];
    for _ in 0..2 {
        let reply = ec2.call("CreateVolume", &params).await;
        assert_eq!(reply.status, 503);
        assert_eq!(reply.code().as_deref(), Some("RequestLimitExceeded"));
        assert!(
            reply.body.contains("<Response><Errors><Error>"),
            "{}",
            reply.body
        );
        // Other actions pass meanwhile.
        assert_eq!(
            ec2.count_volumes().await,
            0,
            "throttled calls never reach moto"
        );
    }
    assert_eq!(proxy.unfired(), 0);
    assert_eq!(ec2.call("CreateVolume", &params).await.status, 200);
    assert_eq!(moto.count_volumes().await, 1);
    assert_eq!(
        proxy.count("CreateVolume"),
        3,
        "faulted requests are counted"
    );
    assert_eq!(proxy.count("DescribeVolumes"), 2);
}

#[tokio::test]
async fn proxy_answers_idempotent_parameter_mismatch() {
    let Some(moto) = Moto::start("proxy_answers_idempotent_parameter_mismatch") else {
        return;
    };
    let proxy = FaultProxy::start(&moto.endpoint()).await;
    let ec2 = Ec2Query::new(proxy.endpoint());
    proxy.idempotent_mismatch(1);
    let params = [
        ("AvailabilityZone", ZONE),
        ("Size", "1"),
        ("ClientToken", "t"),
    ];
    let reply = ec2.call("CreateVolume", &params).await;
    assert_eq!(reply.status, 400);
    assert_eq!(reply.code().as_deref(), Some("IdempotentParameterMismatch"));
    assert_eq!(moto.count_volumes().await, 0);
    assert_eq!(ec2.call("CreateVolume", &params).await.status, 200);
    assert_eq!(moto.count_volumes().await, 1);

    proxy.fail(
        "DeleteVolume",
        1,
        500,
        "InternalError",
        "An internal error occurred",
    );
    let id = moto.describe_volumes().await[0].id.clone();
    let reply = ec2.call("DeleteVolume", &[("VolumeId", &id)]).await;
    assert_eq!(
        (reply.status, reply.code().as_deref()),
        (500, Some("InternalError"))
    );
    assert_eq!(moto.count_volumes().await, 1);
}

#[tokio::test]
async fn proxy_shows_available_volumes_as_creating() {
    let Some(moto) = Moto::start("proxy_shows_available_volumes_as_creating") else {
        return;
    };
    let proxy = FaultProxy::start(&moto.endpoint()).await;
    let ec2 = Ec2Query::new(proxy.endpoint());
    let instance = moto.run_instance(ZONE).await;
    let free = moto.create_volume(ZONE, 1, &[]).await;
    let used = moto.create_volume(ZONE, 1, &[]).await;
    moto.attach_volume(&used, &instance, "/dev/xvdbb").await;

    proxy.creating(2);
    for _ in 0..2 {
        let volumes = ec2.describe_volumes().await;
        let state = |id: &str| volumes.iter().find(|v| v.id == id).unwrap().state.clone();
        assert_eq!(state(&free), "creating");
        assert_eq!(state(&used), "in-use");
        let attachment = &volumes.iter().find(|v| v.id == used).unwrap().attachments[0];
        assert_eq!(attachment.state, "attached", "attachment states untouched");
    }
    assert_eq!(ec2.volume(&free).await.unwrap().state, "available");
    // An error answer doesn't use up a rewrite.
    proxy.creating(1);
    let reply = ec2
        .call("DescribeVolumes", &[("VolumeId.1", "vol-0000000000000000")])
        .await;
    assert_eq!(reply.status, 400);
    assert_eq!(proxy.unfired(), 1);
    assert_eq!(ec2.volume(&free).await.unwrap().state, "creating");
    assert_eq!(proxy.unfired(), 0);
}

#[tokio::test]
async fn proxy_delays_requests_and_answers() {
    let Some(moto) = Moto::start("proxy_delays_requests_and_answers") else {
        return;
    };
    let proxy = FaultProxy::start(&moto.endpoint()).await;
    let ec2 = Ec2Query::new(proxy.endpoint());
    let hold = Duration::from_millis(400);

    // A held request: a client that gives up…
    proxy.delay("DescribeVolumes", 2, hold);
    let client = ec2.clone();
    abandon(&proxy, "DescribeVolumes", 1, async move {
        client.describe_volumes().await
    })
    .await;
    // …a patient one gets the answer after the hold…
    let started = Instant::now();
    assert_eq!(ec2.count_volumes().await, 0);
    assert!(started.elapsed() >= hold, "{:?}", started.elapsed());
    // …and then requests are fast again.
    let started = Instant::now();
    ec2.describe_volumes().await;
    assert!(started.elapsed() < hold, "{:?}", started.elapsed());
    assert_eq!(proxy.unfired(), 0);

    // A held request whose client gave up is dropped: it never reaches moto.
    proxy.delay("CreateVolume", 1, Duration::from_secs(30));
    let client = ec2.clone();
    abandon(&proxy, "CreateVolume", 1, async move {
        client.create_volume(ZONE, 1, &[]).await
    })
    .await;
    proxy.wait_idle(Duration::from_secs(5)).await;
    assert_eq!(moto.count_volumes().await, 0);

    // A held answer: late for a patient client…
    proxy.delay_response("DescribeVolumes", 1, hold);
    let started = Instant::now();
    assert_eq!(ec2.count_volumes().await, 0);
    assert!(started.elapsed() >= hold, "{:?}", started.elapsed());
    // …and moto acted although a client gave up.
    proxy.delay_response("CreateVolume", 1, Duration::from_secs(30));
    let client = ec2.clone();
    abandon(&proxy, "CreateVolume", 2, async move {
        client
            .create_volume(ZONE, 1, &[("CSIVolumeName", "pvc-late")])
            .await
    })
    .await;
    proxy.wait_idle(Duration::from_secs(5)).await;
    let volumes = moto.describe_volumes().await;
    assert_eq!(
        volumes.len(),
        1,
        "only the delay_response CreateVolume reached moto"
    );
    assert_eq!(volumes[0].tags["CSIVolumeName"], "pvc-late");
    assert_eq!(proxy.count("CreateVolume"), 2);
}

/// Runs `call` as a client that gives up once the proxy has received its
/// `n`-th `action` request (and before the answer).
async fn abandon<T: Send + 'static>(
    proxy: &FaultProxy,
    action: &str,
    n: usize,
    call: impl Future<Output = T> + Send + 'static,
) {
    let client = tokio::spawn(call);
    proxy
        .wait_for_count(action, n, Duration::from_secs(10))
        .await;
    client.abort();
    let outcome = client.await;
    assert!(
        outcome.is_err_and(|e| e.is_cancelled()),
        "the call must still be waiting for its answer"
    );
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Size in bytes of /dev/loopN, from sysfs; None when no file is bound to it.
fn loop_size(device: &std::path::Path) -> Option<u64> {
    let name = device.file_name().unwrap().to_str().unwrap();
    std::fs::metadata(format!("/sys/block/{name}/loop")).ok()?;
    let sectors = std::fs::read_to_string(format!("/sys/block/{name}/size")).ok()?;
    Some(sectors.trim().parse::<u64>().unwrap() * 512)
}

fn read_marker(device: &std::path::Path) -> Vec<u8> {
    use std::io::Read;
    let mut buf = vec![0; 16];
    std::fs::File::open(device)
        .unwrap()
        .read_exact(&mut buf)
        .unwrap();
    buf
}

#[tokio::test]
async fn hypervisor_turns_attachments_into_loop_devices() {
    let test = "hypervisor_turns_attachments_into_loop_devices";
    if !is_root() {
        eprintln!("SKIPPED {test}: needs root (loop devices)");
        return;
    }
    let Some(moto) = Moto::start(test) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let instance = moto.run_instance(ZONE).await;
    let other = moto.run_instance(ZONE).await;
    let hypervisor = Hypervisor::new(
        moto.endpoint(),
        instance.clone(),
        dir.path().join("by-id"),
        dir.path().join("images"),
    );
    let volume = moto.create_volume(ZONE, 1, &[]).await;
    let elsewhere = moto.create_volume(ZONE, 2, &[]).await;
    moto.attach_volume(&elsewhere, &other, "/dev/xvdba").await;
    hypervisor.sync().await;
    assert!(
        hypervisor.devices().await.is_empty(),
        "nothing attached here yet"
    );

    moto.attach_volume(&volume, &instance, "/dev/xvdba").await;
    hypervisor.sync().await;
    let link = dir.path().join("by-id").join(format!(
        "nvme-Amazon_Elastic_Block_Store_vol{}",
        volume.strip_prefix("vol-").unwrap()
    ));
    assert_eq!(link, hypervisor.link(&volume));
    assert_eq!(
        by_id_name("vol-0abc"),
        "nvme-Amazon_Elastic_Block_Store_vol0abc"
    );
    let device = std::fs::canonicalize(&link).unwrap();
    assert!(
        device.to_str().unwrap().starts_with("/dev/loop"),
        "{device:?}"
    );
    assert_eq!(loop_size(&device), Some(GIB));
    assert_eq!(
        std::fs::read_dir(dir.path().join("by-id")).unwrap().count(),
        1,
        "only this instance's volume"
    );
    hypervisor.sync().await; // idempotent
    assert_eq!(hypervisor.device(&volume), Some(device.clone()));

    // Data written to the device survives detach + re-attach.
    {
        use std::io::Write;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .open(&device)
            .unwrap();
        file.write_all(b"stowage-marker-1").unwrap();
        file.sync_all().unwrap();
    }
    moto.detach_volume(&volume, &instance).await;
    hypervisor.sync().await;
    assert!(std::fs::symlink_metadata(&link).is_err(), "symlink removed");
    assert_eq!(loop_size(&device), None, "loop device detached");
    assert!(
        hypervisor.image(&volume).exists(),
        "image kept while the volume exists"
    );

    moto.attach_volume(&volume, &instance, "/dev/xvdbc").await;
    hypervisor.sync().await;
    let device = hypervisor.device(&volume).unwrap();
    assert_eq!(read_marker(&device), b"stowage-marker-1");

    // ModifyVolume: the device grows.
    moto.resize_volume(&volume, 2).await;
    hypervisor.sync().await;
    assert_eq!(loop_size(&device), Some(2 * GIB));
    assert_eq!(read_marker(&device), b"stowage-marker-1");

    // Detach + delete: device and image gone.
    moto.detach_volume(&volume, &instance).await;
    moto.delete_volume(&volume).await;
    hypervisor.sync().await;
    assert_eq!(loop_size(&device), None);
    assert!(!hypervisor.image(&volume).exists());

    // Drop detaches whatever is still attached.
    moto.detach_volume(&elsewhere, &other).await;
    moto.attach_volume(&elsewhere, &instance, "/dev/xvdbd")
        .await;
    hypervisor.sync().await;
    let device = hypervisor.device(&elsewhere).unwrap();
    assert_eq!(loop_size(&device), Some(2 * GIB));
    drop(hypervisor);
    assert_eq!(loop_size(&device), None);
    assert!(
        std::fs::read_dir(dir.path().join("by-id"))
            .unwrap()
            .next()
            .is_none()
    );
    assert!(
        std::fs::read_dir(dir.path().join("images"))
            .unwrap()
            .next()
            .is_none()
    );
}
