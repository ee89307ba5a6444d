//! The Helm chart (`charts/stowage`) agrees with the code and with Kubernetes:
//!
//! - `helm lint` is clean and `helm template` renders for the default values and for
//!   every file of the values matrix `charts/stowage/ci/*.yaml`;
//! - every rendered manifest deserializes into its k8s-openapi type and serializes
//!   back to the same JSON: a field the type does not know would be dropped, and the
//!   path of any dropped or changed field is reported;
//! - every `--flag` of a stowage container exists for its subcommand and the whole
//!   command line parses with the real `Cli`; every environment variable it sets is
//!   one stowage reads;
//! - driver name, node socket, registration and plugin paths equal the code's;
//! - RBAC: one ClusterRole per loop with exactly the verbs it uses, no wildcard,
//!   Secrets only `get` and only when enabled; the node plugin gets no role;
//! - the values schema rejects an unknown top-level key and a wrong type.
//!
//! helm: `STOWAGE_HELM`, else `/opt/k8s/bin/helm`, else `helm` on PATH (`tests/run`
//! installs it). Without helm the tests skip with a message, or fail when
//! `STOWAGE_REQUIRE_HELM=1`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use clap::CommandFactory;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use stowage::config::{Cli, default_endpoint};
use stowage_api::keys::{DEFAULT_DRIVER_NAME, DEFAULT_NFS_DRIVER_NAME};

const NAMESPACE: &str = "kube-system";
const RELEASE: &str = "stowage";
/// Where kubelet looks for plugin registration sockets (under its root directory).
const REGISTRATION_DIR: &str = "plugins_registry";
const DEFAULT_KUBELET_DIR: &str = "/var/lib/kubelet";

fn chart_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("charts/stowage")
}

/// The helm binary, or `None` (skip) when there is none and it is not required.
fn helm(test: &str) -> Option<PathBuf> {
    if let Some(helm) = std::env::var_os("STOWAGE_HELM").map(PathBuf::from) {
        assert!(
            helm.is_file(),
            "{test}: STOWAGE_HELM={} is not a file",
            helm.display()
        );
        return Some(helm);
    }
    let candidates = [PathBuf::from("/opt/k8s/bin/helm")].into_iter().chain(
        std::env::var_os("PATH")
            .map(|path| {
                std::env::split_paths(&path)
                    .map(|dir| dir.join("helm"))
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default(),
    );
    for candidate in candidates {
        if candidate.is_file() {
            return Some(candidate);
        }
    }
    if std::env::var("STOWAGE_REQUIRE_HELM").as_deref() == Ok("1") {
        panic!(
            "{test}: STOWAGE_REQUIRE_HELM=1 but no helm found (STOWAGE_HELM, /opt/k8s/bin/helm, PATH): run tests/run"
        );
    }
    eprintln!("SKIPPED {test}: needs helm; run via tests/run or set STOWAGE_HELM=/path/to/helm");
    None
}

/// The values matrix: `None` for the chart's defaults, then each `ci/*.yaml`.
fn values_matrix() -> Vec<Option<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(chart_dir().join("ci"))
        .expect("charts/stowage/ci")
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(
        files.len() >= 3,
        "the values matrix is too small: {files:?}"
    );
    std::iter::once(None)
        .chain(files.into_iter().map(Some))
        .collect()
}

fn case_name(values: &Option<PathBuf>) -> String {
    values
        .as_ref()
        .map_or("default values".into(), |p| p.display().to_string())
}

fn run_helm(helm: &Path, args: &[&str], values: &Option<PathBuf>) -> Result<String, String> {
    let mut command = Command::new(helm);
    command.args(args);
    if let Some(file) = values {
        command.arg("--values").arg(file);
    }
    let output = command.output().expect("running helm");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    if output.status.success() {
        Ok(stdout)
    } else {
        Err(format!("{stdout}{stderr}"))
    }
}

fn template(helm: &Path, values: &Option<PathBuf>) -> Result<String, String> {
    let chart = chart_dir();
    run_helm(
        helm,
        &[
            "template",
            RELEASE,
            chart.to_str().unwrap(),
            "--namespace",
            NAMESPACE,
        ],
        values,
    )
}

fn parse_yaml(text: &str) -> Vec<Value> {
    serde_saphyr::from_multiple::<Value>(text)
        .unwrap_or_else(|e| panic!("rendered YAML does not parse: {e}"))
        .into_iter()
        .filter(|doc| !doc.is_null())
        .collect()
}

/// The chart's values.yaml with a values file merged over it (maps merge, the rest replaces).
fn values(file: &Option<PathBuf>) -> Value {
    let read = |path: &Path| -> Value {
        let docs = parse_yaml(&std::fs::read_to_string(path).unwrap());
        docs.into_iter().next().unwrap_or(json!({}))
    };
    fn merge(base: &mut Value, over: Value) {
        match (base, over) {
            (Value::Object(base), Value::Object(over)) => {
                for (key, value) in over {
                    merge(base.entry(key).or_insert(Value::Null), value);
                }
            }
            (base, over) => *base = over,
        }
    }
    let mut merged = read(&chart_dir().join("values.yaml"));
    if let Some(file) = file {
        merge(&mut merged, read(file));
    }
    merged
}

struct Rendered {
    case: String,
    values: Value,
    objects: Vec<Value>,
}

impl Rendered {
    fn of_kind(&self, kind: &str) -> impl Iterator<Item = &Value> + use<'_> {
        let kind = kind.to_owned();
        self.objects
            .iter()
            .filter(move |o| o["kind"] == kind.as_str())
    }

    fn one(&self, kind: &str) -> &Value {
        let found: Vec<_> = self.of_kind(kind).collect();
        assert_eq!(found.len(), 1, "{}: expected one {kind}", self.case);
        found[0]
    }

    fn named(&self, kind: &str, name: &str) -> Option<&Value> {
        self.of_kind(kind).find(|o| o["metadata"]["name"] == name)
    }
}

/// Renders every case of the matrix (lint first); `None` when helm is absent.
fn render_all(test: &str) -> Option<Vec<Rendered>> {
    let helm = helm(test)?;
    let chart = chart_dir();
    let mut rendered = Vec::new();
    for case in values_matrix() {
        let name = case_name(&case);
        let lint = run_helm(&helm, &["lint", "--strict", chart.to_str().unwrap()], &case)
            .unwrap_or_else(|e| panic!("helm lint with {name} failed:\n{e}"));
        assert!(
            !lint.contains("[WARNING]") && !lint.contains("[ERROR]"),
            "helm lint with {name}:\n{lint}"
        );
        let text = template(&helm, &case)
            .unwrap_or_else(|e| panic!("helm template with {name} failed:\n{e}"));
        let objects = parse_yaml(&text);
        assert!(!objects.is_empty(), "{name}: nothing rendered");
        rendered.push(Rendered {
            case: name,
            values: values(&case),
            objects,
        });
    }
    Some(rendered)
}

// ---------------------------------------------------------------------------
// Every manifest is a valid object of its type, with no field the type lacks.
// ---------------------------------------------------------------------------

fn drop_nulls(value: &mut Value) {
    match value {
        Value::Object(map) => {
            map.retain(|_, v| !v.is_null());
            map.values_mut().for_each(drop_nulls);
        }
        Value::Array(items) => items.iter_mut().for_each(drop_nulls),
        _ => {}
    }
}

/// Paths where `original` has something `typed` lost or changed.
fn differences(path: &str, original: &Value, typed: &Value, out: &mut Vec<String>) {
    match (original, typed) {
        (Value::Object(a), Value::Object(b)) => {
            for (key, value) in a {
                let path = format!("{path}.{key}");
                match b.get(key) {
                    Some(other) => differences(&path, value, other, out),
                    None => out.push(format!("{path}: not a field of the type (dropped)")),
                }
            }
            for key in b.keys().filter(|k| !a.contains_key(*k)) {
                out.push(format!("{path}.{key}: added by the type"));
            }
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                differences(&format!("{path}[{i}]"), x, y, out);
            }
        }
        (a, b) if a == b => {}
        (a, b) => out.push(format!("{path}: {a} became {b}")),
    }
}

fn round_trip<T: DeserializeOwned + Serialize>(object: &Value) -> Result<(), String> {
    let typed: T = serde_path_to_error::deserialize(object.clone())
        .map_err(|e| format!("does not deserialize at {}: {}", e.path(), e.inner()))?;
    let mut back = serde_json::to_value(&typed).unwrap();
    drop_nulls(&mut back);
    let mut original = object.clone();
    drop_nulls(&mut original);
    let mut out = Vec::new();
    differences("", &original, &back, &mut out);
    if out.is_empty() {
        Ok(())
    } else {
        Err(out.join("\n  "))
    }
}

fn check_typed(object: &Value) -> Result<(), String> {
    use k8s_openapi::api::{
        apps::v1 as apps, core::v1 as core, policy::v1 as policy, rbac::v1 as rbac,
        storage::v1 as storage,
    };
    let api_version = object["apiVersion"].as_str().unwrap_or_default();
    let kind = object["kind"].as_str().unwrap_or_default();
    match (api_version, kind) {
        ("v1", "ServiceAccount") => round_trip::<core::ServiceAccount>(object),
        ("v1", "Service") => round_trip::<core::Service>(object),
        ("apps/v1", "Deployment") => round_trip::<apps::Deployment>(object),
        ("apps/v1", "DaemonSet") => round_trip::<apps::DaemonSet>(object),
        ("apps/v1", "StatefulSet") => round_trip::<apps::StatefulSet>(object),
        ("policy/v1", "PodDisruptionBudget") => round_trip::<policy::PodDisruptionBudget>(object),
        ("rbac.authorization.k8s.io/v1", "ClusterRole") => round_trip::<rbac::ClusterRole>(object),
        ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
            round_trip::<rbac::ClusterRoleBinding>(object)
        }
        ("rbac.authorization.k8s.io/v1", "Role") => round_trip::<rbac::Role>(object),
        ("rbac.authorization.k8s.io/v1", "RoleBinding") => round_trip::<rbac::RoleBinding>(object),
        ("storage.k8s.io/v1", "StorageClass") => round_trip::<storage::StorageClass>(object),
        ("storage.k8s.io/v1", "CSIDriver") => round_trip::<storage::CSIDriver>(object),
        ("apiextensions.k8s.io/v1", "CustomResourceDefinition") => {
            round_trip::<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition>(object)
        }
        ("snapshot.storage.k8s.io/v1", "VolumeSnapshotClass") => {
            round_trip::<stowage_loops::snapshots::types::VolumeSnapshotClass>(object)
        }
        _ => Err(format!(
            "{api_version} {kind}: not a type this test knows; add it to check_typed"
        )),
    }
}

#[test]
fn every_manifest_is_its_kubernetes_type_without_unknown_fields() {
    let Some(all) = render_all("every_manifest_is_its_kubernetes_type_without_unknown_fields")
    else {
        return;
    };
    let mut failures = Vec::new();
    for rendered in &all {
        let mut names = BTreeSet::new();
        for object in &rendered.objects {
            let id = format!(
                "{} {}/{}",
                object["kind"].as_str().unwrap_or("?"),
                object["metadata"]["namespace"].as_str().unwrap_or("-"),
                object["metadata"]["name"].as_str().unwrap_or("?"),
            );
            if !names.insert(id.clone()) {
                failures.push(format!("{}: {id} rendered twice", rendered.case));
            }
            let namespaced = !matches!(
                object["kind"].as_str(),
                Some(
                    "ClusterRole"
                        | "ClusterRoleBinding"
                        | "StorageClass"
                        | "CSIDriver"
                        | "CustomResourceDefinition"
                        | "VolumeSnapshotClass"
                )
            );
            if namespaced && object["metadata"]["namespace"] != NAMESPACE {
                failures.push(format!(
                    "{}: {id} is not in the release namespace",
                    rendered.case
                ));
            }
            if let Err(e) = check_typed(object) {
                failures.push(format!("{}: {id}:\n  {e}", rendered.case));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

// ---------------------------------------------------------------------------
// Command lines and environment of the stowage containers.
// ---------------------------------------------------------------------------

/// Pod templates of the workloads, by workload name.
fn pod_specs(rendered: &Rendered) -> Vec<(String, &Value)> {
    rendered
        .objects
        .iter()
        .filter(|o| {
            matches!(
                o["kind"].as_str(),
                Some("Deployment" | "DaemonSet" | "StatefulSet")
            )
        })
        .map(|o| {
            (
                format!(
                    "{} {}",
                    o["kind"].as_str().unwrap(),
                    o["metadata"]["name"].as_str().unwrap()
                ),
                &o["spec"]["template"]["spec"],
            )
        })
        .collect()
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .map(|items| {
            items
                .iter()
                .map(|i| i.as_str().expect("a string").to_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// `--flag=value` or a bare `--flag`: the value of a flag in an argument list.
fn flag(args: &[String], name: &str) -> Option<String> {
    let prefix = format!("--{name}=");
    args.iter().find_map(|arg| {
        if arg == &format!("--{name}") {
            Some(String::new())
        } else {
            arg.strip_prefix(&prefix).map(str::to_owned)
        }
    })
}

fn container<'a>(pod: &'a Value, name: &str) -> Option<&'a Value> {
    pod["containers"]
        .as_array()?
        .iter()
        .find(|c| c["name"] == name)
}

/// The containers running the stowage binary (by name); every other container must be
/// a sidecar this test knows.
const STOWAGE_CONTAINERS: &[&str] = &["stowage", "nfs-server"];
const SIDECARS: &[&str] = &["node-driver-registrar", "node-driver-registrar-nfs"];
/// Environment the templates set that is not a flag's env fallback: the tracing filter,
/// NODE_NAME, used as `--node-id=$(NODE_NAME)`, and the API server's address, read by
/// the in-cluster config (kube's `Config::incluster_env`) in place of kubelet's values.
const EXTRA_ENV: &[&str] = &[
    "RUST_LOG",
    "NODE_NAME",
    "KUBERNETES_SERVICE_HOST",
    "KUBERNETES_SERVICE_PORT",
];

/// Long flags and env fallbacks one subcommand accepts (its own and the global ones).
fn accepted(subcommand: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let mut root = Cli::command();
    root.build();
    let sub = root
        .find_subcommand(subcommand)
        .unwrap_or_else(|| panic!("stowage has no subcommand {subcommand}"));
    let mut flags = BTreeSet::new();
    let mut envs = BTreeSet::new();
    for arg in sub.get_arguments().chain(root.get_arguments()) {
        if let Some(long) = arg.get_long() {
            flags.insert(long.to_owned());
        }
        if let Some(env) = arg.get_env() {
            envs.insert(env.to_string_lossy().into_owned());
        }
    }
    (flags, envs)
}

/// Expands `$(VAR)` from the container's env the way kubelet does, with a stand-in
/// for values set from fields.
fn expand(arg: &str, env: &BTreeMap<String, String>) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = arg;
    while let Some(start) = rest.find("$(") {
        out.push_str(&rest[..start]);
        let end = rest[start..]
            .find(')')
            .ok_or_else(|| format!("unclosed $( in {arg}"))?;
        let name = &rest[start + 2..start + end];
        out.push_str(
            env.get(name)
                .ok_or_else(|| format!("{arg}: $({name}) is not in the container's env"))?,
        );
        rest = &rest[start + end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

fn container_env(container: &Value) -> BTreeMap<String, String> {
    container["env"]
        .as_array()
        .map(|vars| {
            vars.iter()
                .map(|v| {
                    let name = v["name"].as_str().unwrap().to_owned();
                    let value = v["value"].as_str().unwrap_or("from-field").to_owned();
                    (name, value)
                })
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn stowage_command_lines_exist_in_the_cli_and_parse() {
    let Some(all) = render_all("stowage_command_lines_exist_in_the_cli_and_parse") else {
        return;
    };
    let mut failures = Vec::new();
    let mut subcommands_seen = BTreeSet::new();
    for rendered in &all {
        for (workload, pod) in pod_specs(rendered) {
            for c in pod["containers"].as_array().unwrap() {
                let name = c["name"].as_str().unwrap();
                let at = format!("{}: {workload} container {name}", rendered.case);
                if SIDECARS.contains(&name) {
                    continue;
                }
                if !STOWAGE_CONTAINERS.contains(&name) {
                    failures.push(format!("{at}: a container this test does not know"));
                    continue;
                }
                assert!(
                    c["command"].is_null(),
                    "{at}: set args, keep the image's entrypoint"
                );
                let args = strings(&c["args"]);
                let Some(subcommand) = args.iter().find(|a| !a.starts_with('-')) else {
                    failures.push(format!("{at}: no subcommand in {args:?}"));
                    continue;
                };
                subcommands_seen.insert(subcommand.clone());
                let (flags, envs) = accepted(subcommand);
                for arg in args.iter().filter(|a| a.starts_with("--")) {
                    let long = arg.trim_start_matches("--").split('=').next().unwrap();
                    if !flags.contains(long) {
                        failures.push(format!("{at}: `stowage {subcommand}` has no flag --{long}"));
                    }
                }
                let env = container_env(c);
                for var in env.keys() {
                    if !envs.contains(var) && !EXTRA_ENV.contains(&var.as_str()) {
                        failures.push(format!(
                            "{at}: env {var} is read by no flag of `stowage {subcommand}`"
                        ));
                    }
                }
                let expanded: Result<Vec<String>, String> =
                    args.iter().map(|a| expand(a, &env)).collect();
                match expanded {
                    Err(e) => failures.push(format!("{at}: {e}")),
                    Ok(expanded) => {
                        let argv = std::iter::once("stowage".to_owned()).chain(expanded);
                        if let Err(e) = stowage::config::parse_from(argv) {
                            failures.push(format!("{at}: stowage rejects {args:?}:\n{e}"));
                        }
                    }
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    for expected in ["controller", "node", "nfs-server"] {
        assert!(
            subcommands_seen.contains(expected),
            "no case of the matrix runs `stowage {expected}`"
        );
    }
}

// ---------------------------------------------------------------------------
// Driver name, sockets and paths agree with the code.
// ---------------------------------------------------------------------------

fn volume_host_path<'a>(pod: &'a Value, volume: &str) -> Option<&'a str> {
    pod["volumes"]
        .as_array()?
        .iter()
        .find(|v| v["name"] == volume)?["hostPath"]["path"]
        .as_str()
}

fn mount<'a>(container: &'a Value, path: &str) -> Option<&'a Value> {
    container["volumeMounts"]
        .as_array()?
        .iter()
        .find(|m| m["mountPath"] == path)
}

fn str_at<'a>(value: &'a Value, pointer: &str) -> &'a str {
    value
        .pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or_default()
}

#[test]
fn driver_name_sockets_and_paths_agree_with_the_code() {
    let Some(all) = render_all("driver_name_sockets_and_paths_agree_with_the_code") else {
        return;
    };
    for r in &all {
        let case = &r.case;
        let driver = r.values["driverName"].as_str().unwrap();
        let kubelet_dir = r.values["node"]["kubeletDir"]
            .as_str()
            .unwrap()
            .trim_end_matches('/');
        if r.case == "default values" {
            assert_eq!(driver, DEFAULT_DRIVER_NAME, "values.yaml driverName");
            assert_eq!(kubelet_dir, DEFAULT_KUBELET_DIR);
        }

        // CSIDriver: the name and the spec the code is built for. Attach is required
        // exactly when a backend attaches volumes (EBS): without one the controller has
        // no PUBLISH_UNPUBLISH_VOLUME, and kubelet must not wait for VolumeAttachments.
        // NFS volumes have a name of their own that never attaches (nfsDriverName).
        let backends = r.values["backends"].as_array().unwrap();
        let attaches = backends.contains(&json!("ebs"));
        let nfs_name = r.values["nfsDriverName"]
            .as_str()
            .filter(|n| !n.is_empty() && *n != driver && backends.contains(&json!("nfs")));
        if r.case == "default values" {
            assert_eq!(
                nfs_name,
                Some(DEFAULT_NFS_DRIVER_NAME),
                "values.yaml nfsDriverName"
            );
        }
        let drivers: Vec<&Value> = r.of_kind("CSIDriver").collect();
        let expected: Vec<(&str, bool)> = std::iter::once((driver, attaches))
            .chain(nfs_name.map(|n| (n, false)))
            .collect();
        assert_eq!(
            drivers.len(),
            expected.len(),
            "{case}: one CSIDriver per name"
        );
        for (name, attach_required) in expected {
            let csi_driver = r.named("CSIDriver", name).expect("the name's CSIDriver");
            assert_eq!(
                csi_driver["spec"],
                json!({
                    "attachRequired": attach_required,
                    "podInfoOnMount": false,
                    "fsGroupPolicy": "File",
                    "volumeLifecycleModes": ["Persistent"],
                }),
                "{case}: CSIDriver {name} spec"
            );
        }
        // An NFS class (`backend: nfs`, or none while nfs is the first backend) is the
        // NFS name's; every other class the main name's.
        for class in r.of_kind("StorageClass") {
            let backend = class["parameters"]["backend"]
                .as_str()
                .or(backends[0].as_str())
                .unwrap();
            let wanted = match nfs_name {
                Some(nfs) if backend == "nfs" => nfs,
                _ => driver,
            };
            assert_eq!(
                class["provisioner"], wanted,
                "{case}: {}",
                class["metadata"]["name"]
            );
        }

        // Snapshot classes: a default is per driver name, so each has an NFS twin.
        for class in r.of_kind("VolumeSnapshotClass") {
            let name = class["metadata"]["name"].as_str().unwrap();
            if class["driver"] == driver {
                if let Some(nfs) = nfs_name {
                    let twin = r
                        .named("VolumeSnapshotClass", &format!("{name}-nfs"))
                        .unwrap_or_else(|| panic!("{case}: no NFS twin of {name}"));
                    assert_eq!(twin["driver"], nfs, "{case}: {name}-nfs");
                    assert_eq!(twin["deletionPolicy"], class["deletionPolicy"], "{case}");
                    assert_eq!(
                        twin["metadata"]["annotations"], class["metadata"]["annotations"],
                        "{case}: {name}-nfs is default as {name} is"
                    );
                }
            } else {
                assert_eq!(class["driver"].as_str(), nfs_name, "{case}: {name}");
            }
        }

        // Node plugin: the socket is the code's default for the driver, under the kubelet
        // directory, which is shared with Bidirectional propagation.
        let daemonset = r.one("DaemonSet");
        let pod = &daemonset["spec"]["template"]["spec"];
        let node = container(pod, "stowage").expect("node container");
        let args = strings(&node["args"]);
        assert_eq!(args.first().map(String::as_str), Some("node"), "{case}");
        assert_eq!(
            flag(&args, "driver-name").as_deref(),
            Some(driver),
            "{case}"
        );
        assert_eq!(
            flag(&args, "nfs-driver-name").as_deref(),
            Some(nfs_name.unwrap_or_default()),
            "{case}: the NFS name, or none"
        );
        let endpoint = flag(&args, "endpoint").expect("node --endpoint");
        let socket = format!("{kubelet_dir}/plugins/{driver}/csi.sock");
        assert_eq!(
            endpoint,
            format!("unix://{socket}"),
            "{case}: node --endpoint"
        );
        if kubelet_dir == DEFAULT_KUBELET_DIR {
            assert_eq!(endpoint, default_endpoint("node", driver), "{case}");
        }
        assert_eq!(node["securityContext"]["privileged"], true, "{case}");
        let kubelet_mount =
            mount(node, kubelet_dir).expect("kubelet dir mounted in the node container");
        assert_eq!(kubelet_mount["mountPropagation"], "Bidirectional", "{case}");
        assert_eq!(
            volume_host_path(pod, kubelet_mount["name"].as_str().unwrap()),
            Some(kubelet_dir),
            "{case}"
        );
        let dev = mount(node, "/dev").expect("/dev mounted in the node container");
        assert_eq!(
            volume_host_path(pod, dev["name"].as_str().unwrap()),
            Some("/dev")
        );
        if !r.values["backends"]
            .as_array()
            .unwrap()
            .contains(&json!("ebs"))
        {
            assert_eq!(
                flag(&args, "node-id").as_deref(),
                Some("$(NODE_NAME)"),
                "{case}"
            );
            let node_name = node["env"]
                .as_array()
                .unwrap()
                .iter()
                .find(|e| e["name"] == "NODE_NAME")
                .expect("NODE_NAME env");
            assert_eq!(
                str_at(node_name, "/valueFrom/fieldRef/fieldPath"),
                "spec.nodeName"
            );
        }
        assert_eq!(
            pod["automountServiceAccountToken"], false,
            "{case}: node pods need no token"
        );
        assert_eq!(
            pod["tolerations"], r.values["node"]["tolerations"],
            "{case}: node tolerations"
        );

        // The plugin's command line as the code reads it.
        let env = container_env(node);
        let argv = std::iter::once("stowage".to_owned())
            .chain(args.iter().map(|a| expand(a, &env).unwrap()));
        let stowage::config::Command::Node(node_args) =
            stowage::config::parse_from(argv).unwrap().command
        else {
            panic!("{case}: not `stowage node`")
        };
        assert_eq!(
            node_args.kubelet_dir,
            Path::new(kubelet_dir),
            "{case}: node paths confined to the kubelet dir"
        );

        // Registration: the plugin's own socket in kubelet's registration dir (seen
        // through the kubelet-dir mount at the host's path), one container; or, with
        // the registrar enabled, node-driver-registrar and the plugin's own turned off.
        let registrar = container(pod, "node-driver-registrar");
        if r.values["node"]["registrar"]["enabled"] == true {
            assert!(!node_args.kubelet_registration, "{case}: registered twice");
            let registrar = registrar.expect("registrar sidecar");
            // Dials the same socket through the plugin dir and registers the host path
            // of it in kubelet's registration dir.
            let registrar_args = strings(&registrar["args"]);
            assert_eq!(
                flag(&registrar_args, "kubelet-registration-path").as_deref(),
                Some(socket.as_str()),
                "{case}"
            );
            let csi_address = flag(&registrar_args, "csi-address").expect("--csi-address");
            let (csi_dir, file) = csi_address.rsplit_once('/').unwrap();
            assert_eq!(file, "csi.sock");
            let plugin_mount =
                mount(registrar, csi_dir).expect("plugin dir mounted in the registrar");
            assert_eq!(
                volume_host_path(pod, plugin_mount["name"].as_str().unwrap()),
                Some(socket.rsplit_once('/').unwrap().0),
                "{case}: plugin dir"
            );
            let registration = mount(registrar, "/registration").expect("registration dir mounted");
            assert_eq!(
                volume_host_path(pod, registration["name"].as_str().unwrap()),
                Some(format!("{kubelet_dir}/{REGISTRATION_DIR}").as_str()),
                "{case}: registration dir"
            );
            // The NFS name's socket, where the plugin serves it, by a registrar of its own.
            let nfs_registrar = container(pod, "node-driver-registrar-nfs");
            match nfs_name {
                Some(nfs) => {
                    let nfs_registrar = nfs_registrar.expect("the NFS name's registrar");
                    let nfs_args = strings(&nfs_registrar["args"]);
                    let nfs_socket = stowage::config::node_socket(&node_args.kubelet_dir, nfs);
                    assert_eq!(
                        flag(&nfs_args, "kubelet-registration-path").as_deref(),
                        nfs_socket.to_str(),
                        "{case}"
                    );
                    let csi_address = flag(&nfs_args, "csi-address").expect("--csi-address");
                    let (csi_dir, _) = csi_address.rsplit_once('/').unwrap();
                    let plugin_mount = mount(nfs_registrar, csi_dir).expect("its plugin dir");
                    assert_eq!(
                        volume_host_path(pod, plugin_mount["name"].as_str().unwrap()),
                        nfs_socket.parent().and_then(Path::to_str),
                        "{case}: the NFS name's plugin dir"
                    );
                }
                None => assert!(nfs_registrar.is_none(), "{case}: no NFS name to register"),
            }
        } else {
            assert!(
                registrar.is_none(),
                "{case}: registrar sidecar while the plugin registers itself"
            );
            assert_eq!(
                pod["containers"].as_array().unwrap().len(),
                1,
                "{case}: the node pod has one container"
            );
            assert!(
                node_args.kubelet_registration,
                "{case}: nobody registers the plugin"
            );
            let registration_socket = stowage_driver::csi::registration::registration_socket(
                &node_args.kubelet_dir,
                &node_args.common.driver_name,
            );
            assert_eq!(
                registration_socket,
                Path::new(&format!(
                    "{kubelet_dir}/{REGISTRATION_DIR}/{driver}-reg.sock"
                )),
                "{case}"
            );
            // What kubelet is told to dial: the --endpoint path, the same on the host.
            assert_eq!(node_args.kubelet_registration_path, None, "{case}");
        }
        if r.case == "default values" {
            assert_eq!(
                stowage_driver::csi::registration::registration_socket(
                    Path::new(kubelet_dir),
                    driver
                ),
                Path::new("/var/lib/kubelet/plugins_registry/stowage.csi.dev-reg.sock")
            );
        }

        // Controller: one container (the loops run in it, no sidecars), the code's
        // default socket on an emptyDir, health and metrics on its --http-addr.
        let deployment = r.one("Deployment");
        let pod = &deployment["spec"]["template"]["spec"];
        assert_eq!(
            pod["containers"].as_array().unwrap().len(),
            1,
            "{case}: no sidecars"
        );
        let controller = container(pod, "stowage").unwrap();
        let args = strings(&controller["args"]);
        assert_eq!(
            args.first().map(String::as_str),
            Some("controller"),
            "{case}"
        );
        assert_eq!(
            flag(&args, "driver-name").as_deref(),
            Some(driver),
            "{case}"
        );
        let endpoint = flag(&args, "endpoint").unwrap();
        assert_eq!(endpoint, default_endpoint("controller", driver), "{case}");
        let socket_dir = endpoint
            .trim_start_matches("unix://")
            .rsplit_once('/')
            .unwrap()
            .0;
        let socket_mount = mount(controller, socket_dir).expect("socket dir mounted");
        let socket_volume = pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == socket_mount["name"])
            .unwrap();
        assert!(
            socket_volume["emptyDir"].is_object(),
            "{case}: socket on an emptyDir"
        );
        assert_eq!(
            deployment["spec"]["replicas"], r.values["controller"]["replicas"],
            "{case}"
        );
        let mut loops: Vec<String> = strings(&r.values["controller"]["loops"]);
        if r.values["snapshots"]["controller"] == true {
            loops.push("snapshot-controller".to_owned());
        }
        assert_eq!(flag(&args, "loops"), Some(loops.join(",")), "{case}");
        let port = flag(&args, "http-addr")
            .expect("controller --http-addr")
            .rsplit_once(':')
            .unwrap()
            .1
            .parse::<u16>()
            .unwrap();
        let ports = controller["ports"].as_array().unwrap();
        let http = ports
            .iter()
            .find(|p| p["name"] == "http")
            .expect("http port");
        assert_eq!(http["containerPort"], port, "{case}");
        // Alive while it serves; ready while the API server answers.
        for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
            assert_eq!(
                controller[probe]["httpGet"]["path"], path,
                "{case}: {probe}"
            );
            assert_eq!(
                controller[probe]["httpGet"]["port"], "http",
                "{case}: {probe}"
            );
        }
        assert_eq!(
            u64::from(port),
            r.values["controller"]["httpPort"].as_u64().unwrap(),
            "{case}: controller.httpPort"
        );
        // The host's network when asked (Services may not route to the API server),
        // with cluster DNS kept; the API server's address for the in-cluster config.
        let host_network = r.values["controller"]["hostNetwork"] == true;
        assert_eq!(
            pod["hostNetwork"] == true,
            host_network,
            "{case}: hostNetwork"
        );
        if host_network {
            assert_eq!(pod["dnsPolicy"], "ClusterFirstWithHostNet", "{case}");
        } else {
            assert!(pod["dnsPolicy"].is_null(), "{case}: dnsPolicy");
        }
        assert_eq!(
            pod["hostAliases"].as_array().cloned().unwrap_or_default(),
            r.values["controller"]["hostAliases"]
                .as_array()
                .cloned()
                .unwrap_or_default(),
            "{case}: hostAliases"
        );
        let env = container_env(controller);
        let api_host = r.values["controller"]["apiServer"]["host"]
            .as_str()
            .unwrap_or_default();
        if api_host.is_empty() {
            assert!(
                !env.contains_key("KUBERNETES_SERVICE_HOST")
                    && !env.contains_key("KUBERNETES_SERVICE_PORT"),
                "{case}: kubelet's KUBERNETES_SERVICE_* left alone"
            );
        } else {
            assert_eq!(env["KUBERNETES_SERVICE_HOST"], api_host, "{case}");
            assert_eq!(
                env["KUBERNETES_SERVICE_PORT"],
                r.values["controller"]["apiServer"]["port"].to_string(),
                "{case}"
            );
        }
        if r.values["controller"]["leaderElection"]["enabled"] == true {
            assert_eq!(
                flag(&args, "leader-election").as_deref(),
                Some(""),
                "{case}"
            );
            let env = controller["env"].as_array().unwrap();
            for (name, field) in [
                ("LEADER_ELECTION_NAMESPACE", "metadata.namespace"),
                ("POD_NAME", "metadata.name"),
            ] {
                let var = env.iter().find(|e| e["name"] == name).expect(name);
                assert_eq!(
                    str_at(var, "/valueFrom/fieldRef/fieldPath"),
                    field,
                    "{case}: {name}"
                );
            }
        } else {
            assert_eq!(flag(&args, "leader-election"), None, "{case}");
        }

        // In-cluster NFS server: its StorageClass points at its Service, on the export
        // path the embedded server announces, with the one port for NFS and MOUNT.
        if r.values["nfsServer"]["enabled"] == true {
            let statefulset = r.one("StatefulSet");
            let name = statefulset["metadata"]["name"].as_str().unwrap();
            let service = r.named("Service", name).expect("the NFS server's Service");
            let port = r.values["nfsServer"]["port"].as_u64().unwrap();
            let service_ports: BTreeSet<u64> = service["spec"]["ports"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p["port"].as_u64().unwrap())
                .collect();
            assert_eq!(service_ports, BTreeSet::from([port, 111]), "{case}");
            let pod = &statefulset["spec"]["template"]["spec"];
            let server = container(pod, "nfs-server").unwrap();
            let args = strings(&server["args"]);
            assert_eq!(args.first().map(String::as_str), Some("nfs-server"));
            assert_eq!(
                flag(&args, "bind"),
                Some(format!("0.0.0.0:{port}")),
                "{case}"
            );
            let data_dir = flag(&args, "data-dir").unwrap();
            let data_mount = mount(server, &data_dir).expect("data dir mounted");
            let templates = statefulset["spec"]["volumeClaimTemplates"]
                .as_array()
                .unwrap();
            assert!(
                templates
                    .iter()
                    .any(|t| t["metadata"]["name"] == data_mount["name"]),
                "{case}: the export is on the volumeClaimTemplate"
            );
            let class = r
                .of_kind("StorageClass")
                .find(|c| c["metadata"]["labels"]["app.kubernetes.io/component"] == "nfs-server")
                .expect("the NFS server's StorageClass");
            let host = format!(
                "{name}.{NAMESPACE}.svc.{}",
                r.values["clusterDomain"].as_str().unwrap()
            );
            assert_eq!(class["parameters"]["server"], host, "{case}");
            assert_eq!(
                class["parameters"]["share"], "/",
                "{case}: the embedded server exports /"
            );
            let options = strings(&class["mountOptions"]);
            for option in [
                "nfsvers=3".to_owned(),
                format!("port={port}"),
                format!("mountport={port}"),
                "nolock".to_owned(),
            ] {
                assert!(
                    options.contains(&option),
                    "{case}: mountOptions lack {option}"
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------
// RBAC: least privilege, split by loop.
// ---------------------------------------------------------------------------

type Grants = BTreeMap<(String, String), BTreeSet<String>>;

fn grants(rules: &[(&str, &[&str], &[&str])]) -> Grants {
    let mut out = Grants::new();
    for (group, resources, verbs) in rules {
        for resource in *resources {
            out.entry((group.to_string(), resource.to_string()))
                .or_default()
                .extend(verbs.iter().map(|v| v.to_string()));
        }
    }
    out
}

/// What each loop calls, exactly.
fn expected_grants(role: &str, secrets: bool) -> Grants {
    const READ: &[&str] = &["get", "list", "watch"];
    const EVENTS: &[&str] = &["create", "patch"];
    let mut g = match role {
        "provisioner" => grants(&[
            (
                "",
                &["persistentvolumes"],
                &["get", "list", "watch", "create", "patch", "delete"],
            ),
            ("", &["persistentvolumes/status"], &["patch"]),
            (
                "",
                &["persistentvolumeclaims"],
                &["get", "list", "watch", "patch"],
            ),
            ("", &["persistentvolumeclaims/status"], &["patch"]),
            ("storage.k8s.io", &["storageclasses", "csinodes"], READ),
            ("", &["nodes"], READ),
            ("storage.k8s.io", &["volumeattachments"], &["list", "watch"]),
            ("events.k8s.io", &["events"], EVENTS),
            ("", &["events"], EVENTS),
            (
                "snapshot.storage.k8s.io",
                &[
                    "volumesnapshots",
                    "volumesnapshotcontents",
                    "volumesnapshotclasses",
                ],
                READ,
            ),
            ("storage.k8s.io", &["volumeattributesclasses"], &["get"]),
        ]),
        "attacher" => grants(&[
            (
                "storage.k8s.io",
                &["volumeattachments"],
                &["get", "list", "watch", "patch"],
            ),
            ("storage.k8s.io", &["volumeattachments/status"], &["patch"]),
            ("", &["persistentvolumes"], READ),
            ("storage.k8s.io", &["csinodes"], READ),
            ("", &["nodes"], READ),
        ]),
        "resizer" => grants(&[
            (
                "",
                &["persistentvolumeclaims"],
                &["get", "list", "watch", "patch"],
            ),
            ("", &["persistentvolumeclaims/status"], &["patch"]),
            (
                "",
                &["persistentvolumes"],
                &["get", "list", "watch", "patch"],
            ),
            ("storage.k8s.io", &["storageclasses"], READ),
            ("storage.k8s.io", &["volumeattributesclasses"], &["get"]),
            ("events.k8s.io", &["events"], EVENTS),
            ("", &["events"], EVENTS),
        ]),
        "snapshotter" => grants(&[
            (
                "snapshot.storage.k8s.io",
                &["volumesnapshotcontents"],
                &["get", "list", "watch", "patch"],
            ),
            (
                "snapshot.storage.k8s.io",
                &["volumesnapshotcontents/status"],
                &["patch"],
            ),
            (
                "snapshot.storage.k8s.io",
                &["volumesnapshots", "volumesnapshotclasses"],
                READ,
            ),
            ("events.k8s.io", &["events"], EVENTS),
            ("", &["events"], EVENTS),
        ]),
        "snapshot-controller" => grants(&[
            (
                "snapshot.storage.k8s.io",
                &["volumesnapshots"],
                &["get", "list", "watch", "patch"],
            ),
            (
                "snapshot.storage.k8s.io",
                &["volumesnapshots/status"],
                &["patch"],
            ),
            (
                "snapshot.storage.k8s.io",
                &["volumesnapshotcontents"],
                &["get", "list", "watch", "create", "patch", "delete"],
            ),
            ("snapshot.storage.k8s.io", &["volumesnapshotclasses"], READ),
            (
                "",
                &["persistentvolumeclaims"],
                &["get", "list", "watch", "patch"],
            ),
            ("", &["persistentvolumes"], READ),
            ("events.k8s.io", &["events"], EVENTS),
            ("", &["events"], EVENTS),
        ]),
        "leader-election" => grants(&[(
            "coordination.k8s.io",
            &["leases"],
            &["get", "list", "watch", "create", "update", "patch"],
        )]),
        other => panic!("no expectation for role {other}"),
    };
    if role == "provisioner" && secrets {
        g.extend(grants(&[("", &["secrets"], &["get"])]));
    }
    g
}

fn rendered_grants(role: &Value) -> Grants {
    let mut out = Grants::new();
    for rule in role["rules"].as_array().unwrap() {
        assert!(rule["resourceNames"].is_null() && rule["nonResourceURLs"].is_null());
        for group in strings(&rule["apiGroups"]) {
            for resource in strings(&rule["resources"]) {
                out.entry((group.clone(), resource))
                    .or_default()
                    .extend(strings(&rule["verbs"]));
            }
        }
    }
    out
}

#[test]
fn rbac_is_split_by_loop_with_only_the_verbs_each_uses() {
    let Some(all) = render_all("rbac_is_split_by_loop_with_only_the_verbs_each_uses") else {
        return;
    };
    let mut secrets_granted_somewhere = false;
    for r in &all {
        let case = &r.case;
        let secrets = r.values["rbac"]["provisionerSecrets"] == true;
        let mut loops = strings(&r.values["controller"]["loops"]);
        if r.values["snapshots"]["controller"] == true {
            loops.push("snapshot-controller".to_owned());
        }
        let controller_sa = r.one("Deployment")["spec"]["template"]["spec"]["serviceAccountName"]
            .as_str()
            .unwrap()
            .to_owned();
        let node_sa = r.one("DaemonSet")["spec"]["template"]["spec"]["serviceAccountName"]
            .as_str()
            .unwrap()
            .to_owned();

        let roles: Vec<&Value> = r.of_kind("ClusterRole").chain(r.of_kind("Role")).collect();
        for role in &roles {
            let name = role["metadata"]["name"].as_str().unwrap();
            for rule in role["rules"].as_array().unwrap() {
                for field in ["verbs", "resources", "apiGroups"] {
                    assert!(
                        !strings(&rule[field]).iter().any(|s| s.contains('*')),
                        "{case}: {name} has a wildcard in {field}"
                    );
                }
                if strings(&rule["resources"])
                    .iter()
                    .any(|s| s.starts_with("secrets"))
                {
                    assert_eq!(
                        strings(&rule["verbs"]),
                        ["get"],
                        "{case}: {name}: Secrets only get"
                    );
                    assert!(
                        secrets,
                        "{case}: {name} reads Secrets though rbac.provisionerSecrets is off"
                    );
                    secrets_granted_somewhere = true;
                }
            }
        }

        // One ClusterRole per loop that runs, bound to the controller's account only.
        let cluster_roles: BTreeSet<String> = r
            .of_kind("ClusterRole")
            .map(|c| c["metadata"]["name"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(
            cluster_roles.len(),
            loops.len(),
            "{case}: {cluster_roles:?} for loops {loops:?}"
        );
        for name in &cluster_roles {
            let role = r.named("ClusterRole", name).unwrap();
            let loop_name = loops
                .iter()
                .find(|l| name.ends_with(&format!("-{l}")))
                .unwrap_or_else(|| panic!("{case}: ClusterRole {name} is for no loop that runs"));
            assert_eq!(
                rendered_grants(role),
                expected_grants(loop_name, secrets),
                "{case}: ClusterRole {name}"
            );
        }
        let leader_election = r.values["controller"]["leaderElection"]["enabled"] == true;
        let role_names: Vec<&str> = r
            .of_kind("Role")
            .map(|role| role["metadata"]["name"].as_str().unwrap())
            .collect();
        if leader_election {
            assert_eq!(role_names.len(), 1, "{case}: one Role, for the Lease");
            let role = r.one("Role");
            assert_eq!(
                rendered_grants(role),
                expected_grants("leader-election", false)
            );
        } else {
            assert!(role_names.is_empty(), "{case}: no Lease, no Role");
        }

        let bindings: Vec<&Value> = r
            .of_kind("ClusterRoleBinding")
            .chain(r.of_kind("RoleBinding"))
            .collect();
        assert_eq!(
            bindings.len(),
            cluster_roles.len() + role_names.len(),
            "{case}"
        );
        for binding in bindings {
            let name = binding["metadata"]["name"].as_str().unwrap();
            let role_kind = binding["roleRef"]["kind"].as_str().unwrap();
            let role_name = binding["roleRef"]["name"].as_str().unwrap();
            assert!(
                r.named(role_kind, role_name).is_some(),
                "{case}: {name} binds a missing {role_kind}"
            );
            assert_eq!(
                binding["subjects"],
                json!([{"kind": "ServiceAccount", "name": controller_sa, "namespace": NAMESPACE}]),
                "{case}: {name} binds the controller's account only"
            );
            assert_ne!(controller_sa, node_sa, "{case}");
        }
    }
    assert!(
        secrets_granted_somewhere,
        "no case of the matrix sets rbac.provisionerSecrets: the Secret rule is untested"
    );
}

// ---------------------------------------------------------------------------
// Values that must fail.
// ---------------------------------------------------------------------------

fn render_with(helm: &Path, values_yaml: &str) -> Result<String, String> {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("values.yaml");
    std::fs::write(&file, values_yaml).unwrap();
    template(helm, &Some(file))
}

#[test]
fn bad_values_fail_before_anything_is_applied() {
    let Some(helm) = helm("bad_values_fail_before_anything_is_applied") else {
        return;
    };
    for (values, expected) in [
        ("replicaCount: 3\n", "replicaCount"),
        ("controller:\n  replicas: two\n", "/controller/replicas"),
        ("backends: [nfs, s3]\n", "/backends/1"),
        ("node:\n  hostNetwork: \"yes\"\n", "/node/hostNetwork"),
        (
            "storageClasses:\n  - name: x\n    enabled: true\n    parameters: [a]\n",
            "parameters",
        ),
        ("nfs:\n  server: 10.0.0.1\n", "set both"),
        (
            "storageClasses:\n  - name: x\n    enabled: true\n    parameters:\n      csi.storage.k8s.io/provisioner-secret-name: s\n",
            "rbac.provisionerSecrets",
        ),
        (
            "nfsServer:\n  enabled: true\n  storageClass:\n    parameters:\n      server: x\n",
            "set by the chart",
        ),
        (
            "storageClasses:\n  - {name: a, enabled: true}\n  - {name: b, enabled: true}\n  - {name: a, enabled: true}\n",
            "StorageClass \"a\" is defined twice, by storageClasses[0] and by storageClasses[2]",
        ),
        (
            "nfsServer:\n  enabled: true\n  storageClass:\n    name: shared\nstorageClasses:\n  - {name: shared, enabled: true}\n",
            "StorageClass \"shared\" is defined twice, by storageClasses[0] and by the in-cluster NFS server",
        ),
    ] {
        match render_with(&helm, values) {
            Ok(_) => panic!("helm template accepted bad values:\n{values}"),
            Err(e) => assert!(
                e.contains(expected),
                "values:\n{values}\nerror does not name {expected}:\n{e}"
            ),
        }
    }
    // And the good ones still render: the schema is not simply rejecting everything.
    render_with(&helm, "controller:\n  replicas: 3\n").unwrap();
}

/// Every StorageClass the chart makes has its own name with the defaults: the in-cluster
/// NFS server's class (named after its Service) beside every example of values.yaml
/// enabled, under the release name a new user picks (`stowage`, whose fullname is just
/// `stowage`). Two objects of one name would render, and the API server would keep
/// only the last one applied.
#[test]
fn default_storage_class_names_never_collide() {
    let Some(helm) = helm("default_storage_class_names_never_collide") else {
        return;
    };
    let mut examples = values(&None)["storageClasses"].clone();
    for class in examples.as_array_mut().unwrap() {
        class["enabled"] = json!(true);
    }
    let overrides = json!({"nfsServer": {"enabled": true}, "storageClasses": examples});
    // JSON is YAML: the values file is the object as JSON.
    let text = render_with(&helm, &overrides.to_string())
        .unwrap_or_else(|e| panic!("helm template failed:\n{e}"));
    let classes: Vec<String> = parse_yaml(&text)
        .into_iter()
        .filter(|o| o["kind"] == "StorageClass")
        .map(|o| o["metadata"]["name"].as_str().unwrap().to_owned())
        .collect();
    let unique: BTreeSet<&String> = classes.iter().collect();
    assert_eq!(
        classes.len(),
        examples.as_array().unwrap().len() + 1,
        "every example and the NFS server's class: {classes:?}"
    );
    assert_eq!(unique.len(), classes.len(), "a name twice: {classes:?}");
    assert!(
        classes.contains(&format!("{RELEASE}-nfs-server")),
        "the in-cluster class is named after its Service: {classes:?}"
    );
}

// ---------------------------------------------------------------------------
// Against a real API server, when one is given.
// ---------------------------------------------------------------------------

/// `kubectl apply --dry-run=server` of every case: no error and no warning. Runs when
/// STOWAGE_E2E_KUBECONFIG names a cluster's kubeconfig (e.g. one started by
/// shared/e2e-cluster); kubectl from STOWAGE_KUBECTL, /opt/k8s/bin or next to helm.
#[test]
fn api_server_accepts_every_case_without_warnings() {
    let test = "api_server_accepts_every_case_without_warnings";
    let Some(kubeconfig) = std::env::var_os("STOWAGE_E2E_KUBECONFIG") else {
        eprintln!("SKIPPED {test}: set STOWAGE_E2E_KUBECONFIG to a cluster's kubeconfig");
        return;
    };
    let Some(helm) = helm(test) else {
        return;
    };
    let kubectl = std::env::var_os("STOWAGE_KUBECTL")
        .map(PathBuf::from)
        .into_iter()
        .chain([
            PathBuf::from("/opt/k8s/bin/kubectl"),
            helm.with_file_name("kubectl"),
        ])
        .find(|p| p.is_file())
        .expect("STOWAGE_E2E_KUBECONFIG is set but no kubectl was found");
    for case in values_matrix() {
        let name = case_name(&case);
        let manifests = template(&helm, &case).unwrap();
        let mut child = Command::new(&kubectl)
            .args(["apply", "--dry-run=server", "-f", "-"])
            .env("KUBECONFIG", &kubeconfig)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(manifests.as_bytes())
            .unwrap();
        let output = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            output.status.success() && stderr.trim().is_empty(),
            "{name}: kubectl apply --dry-run=server:\n{stderr}"
        );
        let applied = String::from_utf8_lossy(&output.stdout).lines().count();
        let rendered = parse_yaml(&manifests).len();
        assert_eq!(
            applied, rendered,
            "{name}: {applied} of {rendered} objects accepted"
        );
    }
}

// ---------------------------------------------------------------------------
// The snapshot CRDs the chart installs hold every field the loops read and write.
// ---------------------------------------------------------------------------

/// Every JSON path of `value` (objects' keys; arrays and maps of strings as leaves).
fn json_paths(value: &Value, path: &str, out: &mut Vec<String>) {
    if let Value::Object(map) = value {
        for (key, child) in map {
            let below = format!("{path}.{key}");
            out.push(below.clone());
            json_paths(child, &below, out);
        }
    }
}

/// Does the CRD schema `schema` admit the path `.a.b.c`?
fn schema_admits(schema: &Value, path: &str) -> bool {
    let mut at = schema;
    for key in path.trim_start_matches('.').split('.') {
        if at["x-kubernetes-preserve-unknown-fields"] == true
            || at["type"] == "object"
                && at["properties"].is_null()
                && !at["additionalProperties"].is_null()
        {
            return true;
        }
        match at["properties"].get(key) {
            Some(next) => at = next,
            None if key == "metadata" => return true,
            None => return false,
        }
    }
    true
}

#[test]
fn snapshot_crds_hold_every_field_the_loops_write() {
    use stowage_loops::snapshots::types::*;
    let Some(all) = render_all("snapshot_crds_hold_every_field_the_loops_write") else {
        return;
    };
    let rendered = all
        .iter()
        .find(|r| r.values["snapshots"]["installCRDs"] == true)
        .expect("a ci case installs the snapshot CRDs");
    let crd = |plural: &str| {
        let name = format!("{plural}.{GROUP}");
        let crd = rendered
            .named("CustomResourceDefinition", &name)
            .unwrap_or_else(|| panic!("no CRD {name}"));
        assert_eq!(crd["spec"]["versions"][0]["name"], VERSION);
        // The API server refuses a CRD in a *.k8s.io group unless it names the
        // approval of its API (apiextensions' protected-group rule).
        let approval = crd["metadata"]["annotations"]["api-approved.kubernetes.io"]
            .as_str()
            .unwrap_or_default();
        assert!(
            approval.starts_with("https://"),
            "{name} lacks api-approved.kubernetes.io: the API server refuses it"
        );
        crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone()
    };
    let time =
        k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now());
    let error = VolumeSnapshotError {
        time: Some(time.clone()),
        message: Some("m".into()),
    };
    let snapshot = VolumeSnapshot {
        spec: VolumeSnapshotSpec {
            source: VolumeSnapshotSource {
                persistent_volume_claim_name: Some("c".into()),
                volume_snapshot_content_name: Some("c".into()),
            },
            volume_snapshot_class_name: Some("x".into()),
        },
        status: Some(VolumeSnapshotStatus {
            bound_volume_snapshot_content_name: Some("c".into()),
            creation_time: Some(time),
            ready_to_use: Some(true),
            restore_size: Some(k8s_openapi::apimachinery::pkg::api::resource::Quantity(
                "1Gi".into(),
            )),
            error: Some(error.clone()),
        }),
        ..Default::default()
    };
    let content = VolumeSnapshotContent {
        spec: VolumeSnapshotContentSpec {
            volume_snapshot_ref: k8s_openapi::api::core::v1::ObjectReference {
                api_version: Some("v".into()),
                kind: Some("k".into()),
                name: Some("n".into()),
                namespace: Some("ns".into()),
                uid: Some("u".into()),
                resource_version: Some("1".into()),
                field_path: None,
            },
            deletion_policy: DELETE.into(),
            driver: "d".into(),
            volume_snapshot_class_name: Some("x".into()),
            source: VolumeSnapshotContentSource {
                volume_handle: Some("v".into()),
                snapshot_handle: Some("s".into()),
            },
            source_volume_mode: Some("Filesystem".into()),
        },
        status: Some(VolumeSnapshotContentStatus {
            snapshot_handle: Some("s".into()),
            creation_time: Some(1),
            restore_size: Some(1),
            ready_to_use: Some(true),
            error: Some(error),
        }),
        ..Default::default()
    };
    let class = VolumeSnapshotClass {
        driver: "d".into(),
        parameters: Some([("k".to_owned(), "v".to_owned())].into()),
        deletion_policy: DELETE.into(),
        ..Default::default()
    };
    let mut missing = Vec::new();
    for (plural, value) in [
        ("volumesnapshots", serde_json::to_value(&snapshot).unwrap()),
        (
            "volumesnapshotcontents",
            serde_json::to_value(&content).unwrap(),
        ),
        (
            "volumesnapshotclasses",
            serde_json::to_value(&class).unwrap(),
        ),
    ] {
        let schema = crd(plural);
        let mut paths = Vec::new();
        json_paths(&value, "", &mut paths);
        for path in paths {
            if !schema_admits(&schema, &path) {
                missing.push(format!("{plural}: {path}"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "fields the CRDs lack:\n{}",
        missing.join("\n")
    );
}
