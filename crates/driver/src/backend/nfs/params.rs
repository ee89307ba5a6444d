//! The NFS StorageClass parameters, named as csi-driver-nfs names them, plus `uid`/`gid`
//! for the new directory's owner, and the rules for paths on an export: every
//! component checked ([`check_component`]), `subDir` templates rendered into checked
//! components ([`render_path`]). Pure parsing and checking; no I/O.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use stowage_api::keys::{PV_NAME, PVC_NAME, PVC_NAMESPACE};

use crate::backend::params::{
    ParameterError, Syntax, opt_from_str, opt_octal_mode, parse, substitute,
};

/// What DeleteVolume does with the directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnDelete {
    #[default]
    Delete,
    Retain,
    Archive,
}

impl OnDelete {
    pub fn as_str(self) -> &'static str {
        match self {
            OnDelete::Delete => "delete",
            OnDelete::Retain => "retain",
            OnDelete::Archive => "archive",
        }
    }
}

/// Mode of a new volume directory when `mountPermissions` is not given (like csi-driver-nfs).
pub const DEFAULT_MODE: u32 = 0o777;

/// The directory holding stowage's per-volume records at the share root.
pub const RECORDS_DIR: &str = ".stowage";

/// The directory holding finished snapshots: `<name>/data` (the copied tree) and
/// `<name>/record`.
pub const SNAPSHOTS_DIR: &str = ".stowage-snapshots";

/// Scratch space of copies under way (snapshots, clones) and of records being
/// rewritten; what a crash leaves here is removed by the next attempt.
pub const WORK_DIR: &str = ".stowage-work";

/// Names stowage keeps for itself at an export's root: no volume's directory may
/// start with one, wherever the directory comes from (a StorageClass `subDir`, a
/// rendered template, a volume id of a static PV or a CSI call).
pub const RESERVED: &[&str] = &[RECORDS_DIR, SNAPSHOTS_DIR, WORK_DIR];

/// The one rule for a volume's directory on an export, applied to every source of
/// one: each component a plain name without `#` ([`check_component`]), the first not
/// a name stowage reserves ([`RESERVED`]).
pub fn check_volume_dir(sub_dir: &[String]) -> Result<(), String> {
    let Some(first) = sub_dir.first() else {
        return Err("the directory is empty".into());
    };
    for component in sub_dir {
        check_component(component).and_then(|()| no_hash(component))?;
    }
    if RESERVED.contains(&first.as_str()) {
        return Err(format!(
            "{:?} is reserved: stowage keeps its records, snapshots and scratch copies under {}, so no volume may live there",
            sub_dir.join("/"),
            RESERVED.join(", ")
        ));
    }
    Ok(())
}

/// The NFS StorageClass keys, spelled as csi-driver-nfs spells them (any case works).
pub const KEYS: &[&str] = &[
    "server",
    "share",
    "subDir",
    "mountPermissions",
    "onDelete",
    "uid",
    "gid",
];

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    server: Option<String>,
    share: Option<String>,
    #[serde(rename = "subDir")]
    sub_dir: Option<String>,
    #[serde(
        default,
        rename = "mountPermissions",
        deserialize_with = "opt_octal_mode"
    )]
    mount_permissions: Option<u32>,
    #[serde(default, rename = "onDelete")]
    on_delete: OnDelete,
    #[serde(default, deserialize_with = "opt_from_str")]
    uid: Option<u32>,
    #[serde(default, deserialize_with = "opt_from_str")]
    gid: Option<u32>,
    #[serde(rename = "csi.storage.k8s.io/pvc/name")]
    _pvc_name: Option<String>,
    #[serde(rename = "csi.storage.k8s.io/pvc/namespace")]
    _pvc_namespace: Option<String>,
    #[serde(rename = "csi.storage.k8s.io/pv/name")]
    _pv_name: Option<String>,
}

/// Where a volume lives and how its directory is made: the checked parameters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    /// Empty for the backend's default export (the embedded server in `stowage local`).
    pub server: String,
    pub share: String,
    pub sub_dir: Vec<String>,
    pub mode: u32,
    pub owner: Option<(u32, u32)>,
    pub on_delete: OnDelete,
}

/// Check a `server` value: a host name or IP literal, no separators.
pub fn check_server(server: &str) -> Result<(), String> {
    let ok = !server.is_empty()
        && server.len() <= 253
        && server
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']' | '_'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "parameter `server` {server:?} is not a host name or IP address"
        ))
    }
}

/// Check a `share` value: an absolute export path with clean components.
pub fn check_share(share: &str) -> Result<(), String> {
    if !share.starts_with('/') {
        return Err(format!(
            "parameter `share` {share:?} must be an absolute export path like /export"
        ));
    }
    for component in share.split('/').filter(|c| !c.is_empty()) {
        check_component(component)
            .and_then(|()| no_hash(component))
            .map_err(|e| format!("parameter `share` {share:?}: {e}"))?;
    }
    Ok(())
}

fn no_hash(component: &str) -> Result<(), String> {
    if component.contains('#') {
        Err(format!("path component {component:?} contains '#'"))
    } else {
        Ok(())
    }
}

/// Checks one path component that came from a user: not empty, not `.` or `..`, no `/`,
/// no NUL, at most 255 bytes. Servers have been seen to act on `../..` inside names,
/// so every component is checked before any I/O.
pub fn check_component(component: &str) -> Result<(), String> {
    let problem = if component.is_empty() {
        "is empty"
    } else if component == "." || component == ".." {
        "is a relative reference"
    } else if component.contains('/') {
        "contains '/'"
    } else if component.contains('\0') {
        "contains NUL"
    } else if component.len() > 255 {
        "is longer than 255 bytes"
    } else {
        return Ok(());
    };
    Err(format!("path component {component:?} {problem}"))
}

/// Renders a path template such as `${pvc.metadata.namespace}/${pvc.metadata.name}`
/// into checked components. Each substituted value must itself be a single valid
/// component (a namespace with `/` cannot add a level); the result is split on `/`
/// and every component is checked again.
pub fn render_path(
    key: &str,
    template: &str,
    parameters: &BTreeMap<String, String>,
) -> Result<Vec<String>, ParameterError> {
    let rendered = substitute(key, template, parameters, Syntax::Dollar, &check_component)
        .map_err(ParameterError::Invalid)?;
    let components: Vec<String> = rendered
        .trim_matches('/')
        .split('/')
        .map(str::to_owned)
        .collect();
    for component in &components {
        check_component(component).map_err(|e| {
            ParameterError::Invalid(format!("parameter `{key}` ({template:?}): {e}"))
        })?;
    }
    Ok(components)
}

/// The export a request names: `(server, share)`, both empty for the default export.
/// `has_default`: whether a default export is configured (then both may be omitted).
pub fn export(
    parameters: &BTreeMap<String, String>,
    has_default: bool,
) -> Result<(String, String), ParameterError> {
    let raw: Raw = parse(parameters, KEYS, &[PVC_NAME, PVC_NAMESPACE, PV_NAME])?;
    export_of(raw.server, raw.share, has_default).map_err(ParameterError::Invalid)
}

fn export_of(
    server: Option<String>,
    share: Option<String>,
    has_default: bool,
) -> Result<(String, String), String> {
    match (server, share) {
        (Some(server), Some(share)) => {
            check_server(&server)?;
            check_share(&share)?;
            Ok((server, normalise_share(&share)))
        }
        (None, None) if has_default => Ok((String::new(), String::new())),
        (None, None) => Err(
            "parameters `server` and `share` are required (no default NFS export is configured)"
                .into(),
        ),
        (Some(_), None) => Err("parameter `share` is required when `server` is set".into()),
        (None, Some(_)) => Err("parameter `server` is required when `share` is set".into()),
    }
}

/// Parse and check the parameters of a CreateVolume for volume `name`.
/// `has_default`: whether a default export is configured (then `server`/`share` may be omitted).
pub fn placement(
    name: &str,
    parameters: &BTreeMap<String, String>,
    has_default: bool,
) -> Result<Placement, ParameterError> {
    let raw: Raw = parse(parameters, KEYS, &[PVC_NAME, PVC_NAMESPACE, PV_NAME])?;
    let invalid = ParameterError::Invalid;
    let (server, share) = export_of(raw.server, raw.share, has_default).map_err(invalid)?;
    let (sub_dir, source) = match raw.sub_dir.as_deref() {
        Some(template) => (
            render_path("subDir", template, parameters)?,
            "parameter `subDir`",
        ),
        None => (vec![name.to_owned()], "volume name"),
    };
    check_volume_dir(&sub_dir).map_err(|e| invalid(format!("{source}: {e}")))?;
    if raw.uid.is_some() != raw.gid.is_some() {
        return Err(invalid(
            "parameters `uid` and `gid` must be given together".into(),
        ));
    }
    Ok(Placement {
        server,
        share,
        sub_dir,
        mode: raw.mount_permissions.unwrap_or(DEFAULT_MODE),
        owner: raw.uid.zip(raw.gid),
        on_delete: raw.on_delete,
    })
}

/// `/export/` and `/export` name the same share.
fn normalise_share(share: &str) -> String {
    let trimmed = share.trim_end_matches('/');
    if trimmed.is_empty() {
        "/".into()
    } else {
        trimmed.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn component_checks_reject_hostile_names() {
        for bad in ["", ".", "..", "a/b", "/", "a\0b", &"x".repeat(256)] {
            assert!(check_component(bad).is_err(), "{bad:?} accepted");
        }
        for good in ["pvc-1", "...", "a..b", "data-db-0", &"x".repeat(255)] {
            assert!(check_component(good).is_ok(), "{good:?} rejected");
        }
    }

    #[test]
    fn renders_templates_into_components() {
        let p = params(&[
            (PVC_NAME, "data-db-0"),
            (PVC_NAMESPACE, "prod"),
            (PV_NAME, "pvc-1"),
        ]);
        assert_eq!(
            render_path(
                "subDir",
                "${pvc.metadata.namespace}/${pvc.metadata.name}",
                &p
            )
            .unwrap(),
            vec!["prod", "data-db-0"]
        );
        assert_eq!(
            render_path("subDir", "vols/${pv.metadata.name}-x", &p).unwrap(),
            vec!["vols", "pvc-1-x"]
        );
    }

    #[test]
    fn hostile_template_values_are_rejected() {
        let cases = [
            (PVC_NAME, "..", "${pvc.metadata.name}"),
            (PVC_NAMESPACE, "a/b", "${pvc.metadata.namespace}/x"),
            (PVC_NAMESPACE, "../../etc", "${pvc.metadata.namespace}"),
            (PVC_NAME, "", "${pvc.metadata.name}"),
            (PVC_NAME, "a\0", "${pvc.metadata.name}"),
        ];
        for (key, value, template) in cases {
            let err = render_path("subDir", template, &params(&[(key, value)]))
                .unwrap_err()
                .to_string();
            assert!(err.contains("subDir"), "{err}");
        }
        // Literal traversal in the template itself.
        for template in ["../x", "a/../b", "a//b", "./a"] {
            assert!(
                render_path("subDir", template, &params(&[])).is_err(),
                "{template}"
            );
        }
    }

    #[test]
    fn unknown_or_unfilled_templates_say_what_to_fix() {
        let err = render_path("subDir", "${pvc.metadata.uid}", &params(&[]))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("${pvc.metadata.uid}") && err.contains("known"),
            "{err}"
        );
        let err = render_path("subDir", "${pvc.metadata.name}", &params(&[]))
            .unwrap_err()
            .to_string();
        assert!(err.contains(PVC_NAME), "{err}");
    }

    #[test]
    fn defaults_to_the_volume_name_on_the_default_export() {
        let p = placement("pvc-1", &params(&[]), true).unwrap();
        assert_eq!(
            p,
            Placement {
                server: String::new(),
                share: String::new(),
                sub_dir: vec!["pvc-1".into()],
                mode: DEFAULT_MODE,
                owner: None,
                on_delete: OnDelete::Delete,
            }
        );
        let err = placement("pvc-1", &params(&[]), false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("`server`"), "{err}");
    }

    #[test]
    fn full_parameter_set() {
        let p = placement(
            "pvc-1",
            &params(&[
                ("server", "nfs.example.com"),
                ("share", "/export/"),
                ("subDir", "${pvc.metadata.namespace}/${pvc.metadata.name}"),
                ("mountPermissions", "0750"),
                ("onDelete", "archive"),
                ("uid", "1000"),
                ("gid", "2000"),
                (PVC_NAME, "data-db-0"),
                (PVC_NAMESPACE, "prod"),
                (PV_NAME, "pvc-1"),
                ("csi.storage.k8s.io/fstype", "nfs"),
            ]),
            false,
        )
        .unwrap();
        assert_eq!(p.server, "nfs.example.com");
        assert_eq!(p.share, "/export");
        assert_eq!(p.sub_dir, ["prod", "data-db-0"]);
        assert_eq!(p.mode, 0o750);
        assert_eq!(p.owner, Some((1000, 2000)));
        assert_eq!(p.on_delete, OnDelete::Archive);
    }

    #[test]
    fn keys_are_case_insensitive_like_ebs_keys() {
        let upper = placement(
            "pvc-1",
            &params(&[
                ("SERVER", "10.0.0.1"),
                ("Share", "/export"),
                ("SUBDIR", "a/b"),
            ]),
            false,
        )
        .unwrap();
        let exact = placement(
            "pvc-1",
            &params(&[
                ("server", "10.0.0.1"),
                ("share", "/export"),
                ("subDir", "a/b"),
            ]),
            false,
        )
        .unwrap();
        assert_eq!(upper, exact);
        for key in KEYS {
            let parsed: Result<Raw, ParameterError> = parse(&params(&[(key, "1")]), KEYS, &[]);
            assert!(
                !matches!(&parsed, Err(e) if e.to_string().contains("unknown field")),
                "{key} is not a field: {parsed:?}"
            );
        }
    }

    #[test]
    fn bad_parameters_name_the_key() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (&[("onDelet", "retain")], "onDelet"),
            (&[("onDelete", "shred")], "onDelete"),
            (&[("mountPermissions", "999")], "mountPermissions"),
            (&[("uid", "x"), ("gid", "1")], "uid"),
            (&[("uid", "1")], "gid"),
            (&[("server", "a/b"), ("share", "/x")], "server"),
            (&[("server", "a"), ("share", "relative")], "share"),
            (&[("server", "a"), ("share", "/x/../y")], "share"),
            (&[("server", "a")], "share"),
            (&[("subDir", "a#b")], "subDir"),
            (&[("subDir", ".stowage")], "subDir"),
            (&[("subDir", ".stowage/x")], "reserved"),
            (
                &[("subDir", "${pvc.metadata.name}/x"), (PVC_NAME, ".stowage")],
                "reserved",
            ),
            (
                &[("subDir", "${pvc.metadata.name}"), (PVC_NAME, "..")],
                "subDir",
            ),
            (
                &[
                    ("subDir", "${pvc.metadata.namespace}"),
                    (PVC_NAMESPACE, "a/b"),
                ],
                "subDir",
            ),
        ];
        for (pairs, key) in cases {
            let err = placement("pvc-1", &params(pairs), true)
                .unwrap_err()
                .to_string();
            assert!(err.contains(key), "{pairs:?}: {err}");
        }
        assert!(placement("..", &params(&[]), true).is_err());
        let err = placement(".stowage", &params(&[]), true).unwrap_err();
        assert!(err.to_string().contains("volume name"), "{err}");
    }
}
