//! Who this node is on EC2: instance id, zone and instance type. Flags (or their
//! environment variables) win; what they leave out comes from the instance metadata
//! service (IMDSv2, through aws-config's client, which has its own timeouts).

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceMetadata {
    pub instance_id: String,
    pub zone: String,
    pub instance_type: String,
}

/// What the flags already say about this instance; the rest is asked of IMDSv2.
#[derive(Debug, Clone, Default)]
pub struct KnownMetadata {
    pub instance_id: Option<String>,
    pub zone: Option<String>,
    pub instance_type: Option<String>,
}

/// Flags first; IMDSv2 only for what they leave unset.
pub async fn metadata(ebs: &KnownMetadata) -> anyhow::Result<InstanceMetadata> {
    if let (Some(instance_id), Some(zone), Some(instance_type)) =
        (&ebs.instance_id, &ebs.zone, &ebs.instance_type)
    {
        return Ok(InstanceMetadata {
            instance_id: instance_id.clone(),
            zone: zone.clone(),
            instance_type: instance_type.clone(),
        });
    }
    let imds = aws_config::imds::Client::builder().build();
    let get = |path: &'static str| {
        let imds = imds.clone();
        async move {
            imds.get(path)
                .await
                .map(String::from)
                .map_err(|e| anyhow::anyhow!("instance metadata {path}: {e} (set --instance-id, --zone and --instance-type when not on EC2)"))
        }
    };
    Ok(InstanceMetadata {
        instance_id: match &ebs.instance_id {
            Some(id) => id.clone(),
            None => get("/latest/meta-data/instance-id").await?,
        },
        zone: match &ebs.zone {
            Some(zone) => zone.clone(),
            None => get("/latest/meta-data/placement/availability-zone").await?,
        },
        instance_type: match &ebs.instance_type {
            Some(t) => t.clone(),
            None => get("/latest/meta-data/instance-type").await?,
        },
    })
}

/// EBS volumes an instance type can attach besides its root volume. Nitro instances
/// share 28 attachment slots between EBS volumes, network interfaces and NVMe instance
/// stores (one ENI and the root volume assumed: 26); Xen instances take 39.
/// `--max-volumes` overrides this.
pub fn attach_limit(instance_type: &str) -> i64 {
    const XEN_FAMILIES: [&str; 14] = [
        "t1", "t2", "m1", "m2", "m3", "m4", "c1", "c3", "c4", "r3", "r4", "i2", "d2", "x1",
    ];
    let family = instance_type.split('.').next().unwrap_or_default();
    if XEN_FAMILIES.contains(&family) {
        39
    } else {
        26
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attach_limits_by_family() {
        assert_eq!(attach_limit("m4.large"), 39);
        assert_eq!(attach_limit("m5.large"), 26);
        assert_eq!(attach_limit("c7g.xlarge"), 26);
    }
}
