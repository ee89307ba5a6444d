//! The runtime image is described once: the Dockerfile's runtime stage (Debian release,
//! ENTRYPOINT, where the binary goes) and `image/runtime-packages` (the packages it
//! installs; `image/runtime-excludes`, what they pull in that is removed again).
//! `tests/e2e/image`, which builds the same image without a registry, reads
//! both; these tests check that it reads them as the Dockerfile means them, and that
//! the list holds what the node plugin runs.
//!
//! Building the image for real takes minutes and root (debootstrap): run
//! `tests/e2e/image --import` by hand or from the e2e runner, not here.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;

const PACKAGE_FILE: &str = "image/runtime-packages";
const EXCLUDE_FILE: &str = "image/runtime-excludes";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The package names of `image/runtime-packages` (comments and blanks dropped).
fn listed_packages() -> Vec<String> {
    list(PACKAGE_FILE)
}

/// The package names of a list file (comments and blanks dropped).
fn list(file: &str) -> Vec<String> {
    std::fs::read_to_string(repo().join(file))
        .unwrap()
        .lines()
        .map(|line| line.split('#').next().unwrap())
        .flat_map(str::split_whitespace)
        .map(str::to_owned)
        .collect()
}

/// The Dockerfile's instructions, continuation lines joined and comments dropped.
fn instructions(dockerfile: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in dockerfile.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(head) => {
                current.push_str(head.trim_end());
                current.push(' ');
            }
            None => {
                current.push_str(trimmed);
                out.push(std::mem::take(&mut current));
            }
        }
    }
    out
}

/// What the Dockerfile's runtime stage (after the last FROM) says.
struct RuntimeStage {
    release: String,
    base: String,
    runs: Vec<String>,
    copies: Vec<String>,
    entrypoint: Vec<String>,
}

fn runtime_stage() -> RuntimeStage {
    let text = std::fs::read_to_string(repo().join("Dockerfile")).unwrap();
    let all = instructions(&text);
    let release = all
        .iter()
        .find_map(|i| i.strip_prefix("ARG DEBIAN="))
        .expect("ARG DEBIAN=<release> in the Dockerfile")
        .trim()
        .to_owned();
    let last_from = all
        .iter()
        .rposition(|i| i.starts_with("FROM "))
        .expect("a FROM");
    let stage = &all[last_from..];
    let base = stage[0]["FROM ".len()..].trim().to_owned();
    let of = |keyword: &str| -> Vec<String> {
        stage
            .iter()
            .filter_map(|i| i.strip_prefix(keyword))
            .map(|rest| rest.trim().to_owned())
            .collect()
    };
    let entrypoints = of("ENTRYPOINT ");
    assert_eq!(entrypoints.len(), 1, "one ENTRYPOINT in the runtime stage");
    let entrypoint: Vec<String> = serde_json::from_str(&entrypoints[0])
        .unwrap_or_else(|e| panic!("ENTRYPOINT is not exec form ({e}): {}", entrypoints[0]));
    RuntimeStage {
        release,
        base,
        runs: of("RUN "),
        copies: of("COPY "),
        entrypoint,
    }
}

fn script_config() -> std::collections::BTreeMap<String, String> {
    let script = repo().join("tests/e2e/image");
    let out = Command::new(&script)
        .arg("--print-config")
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", script.display()));
    assert!(
        out.status.success(),
        "tests/e2e/image --print-config: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// The Dockerfile installs exactly `image/runtime-packages` (no package named in the
/// Dockerfile itself), and the registry-free script takes the same list, the same Debian
/// release and the same entrypoint, with the binary where the entrypoint points.
#[test]
fn dockerfile_and_registry_free_image_agree() {
    let stage = runtime_stage();
    assert_eq!(
        stage.base, "debian:${DEBIAN}-slim",
        "the runtime stage is Debian slim of ARG DEBIAN"
    );
    let installs: Vec<&String> = stage
        .runs
        .iter()
        .filter(|r| r.contains("apt-get install"))
        .collect();
    assert_eq!(installs.len(), 1, "one apt-get install: {:?}", stage.runs);
    let install = installs[0];
    assert!(
        install.contains(&format!(
            "--mount=type=bind,source={PACKAGE_FILE},target=/tmp/runtime-packages"
        )) && install.contains("/tmp/runtime-packages |")
            && install.contains("xargs apt-get install -y --no-install-recommends"),
        "the runtime stage installs the list file and only it: {install}"
    );
    assert!(
        install.contains(&format!(
            "--mount=type=bind,source={EXCLUDE_FILE},target=/tmp/runtime-excludes"
        )) && install.contains("/tmp/runtime-excludes | xargs dpkg --purge --force-depends"),
        "the runtime stage removes the exclude list, after the install: {install}"
    );
    assert!(
        install.find("apt-get install") < install.find("dpkg --purge"),
        "removed after the install: {install}"
    );
    for package in listed_packages().into_iter().chain(list(EXCLUDE_FILE)) {
        let named = install
            .split(|c: char| c.is_whitespace() || c == '/')
            .any(|word| word == package);
        assert!(
            !named,
            "{package} is named in the Dockerfile: list packages only in {PACKAGE_FILE}"
        );
    }
    let binary = stage.entrypoint[0].clone();
    assert!(
        stage
            .copies
            .iter()
            .any(|c| c == &format!("--from=build /out/stowage {binary}")),
        "the binary is copied to the entrypoint {binary}: {:?}",
        stage.copies
    );
    let dockerignore = std::fs::read_to_string(repo().join(".dockerignore")).unwrap();
    for file in [PACKAGE_FILE, EXCLUDE_FILE] {
        assert!(
            dockerignore.lines().any(|l| l.trim() == format!("!{file}")),
            ".dockerignore keeps {file} in the build context"
        );
    }

    let script = script_config();
    assert_eq!(script["release"], stage.release, "Debian release");
    assert_eq!(
        script["packages"],
        listed_packages().join(" "),
        "the script's packages"
    );
    assert_eq!(
        script["excludes"],
        list(EXCLUDE_FILE).join(" "),
        "the script's excludes"
    );
    let listed: BTreeSet<String> = listed_packages().into_iter().collect();
    for package in list(EXCLUDE_FILE) {
        assert!(
            !listed.contains(&package),
            "{package} is both installed and removed"
        );
    }
    let entrypoint: Vec<String> = serde_json::from_str(&script["entrypoint"]).unwrap();
    assert_eq!(entrypoint, stage.entrypoint, "entrypoint");
    assert_eq!(script["binary_path"], binary, "where the binary goes");
}

/// Every program the node plugin runs (the driver's node/: mount, format, grow) and every file it
/// needs comes from a listed package. `mount.nfs` with `proto=tcp` (which the chart's
/// in-cluster NFS class always sets) looks `tcp` up in /etc/protocols: without netbase it
/// fails with "Failed to find 'tcp' protocol".
#[test]
fn the_runtime_packages_hold_what_the_node_plugin_runs() {
    let needed: &[(&str, &str)] = &[
        ("mount", "mount"),
        ("umount", "mount"),
        ("blkid", "util-linux"),
        ("mkfs.ext4", "e2fsprogs"),
        ("mkfs.ext3", "e2fsprogs"),
        ("resize2fs", "e2fsprogs"),
        ("mkfs.xfs", "xfsprogs"),
        ("xfs_growfs", "xfsprogs"),
        ("mount.nfs", "nfs-common"),
        ("/etc/protocols", "netbase"),
        ("/etc/ssl/certs/ca-certificates.crt", "ca-certificates"),
    ];
    let listed: BTreeSet<String> = listed_packages().into_iter().collect();
    assert_eq!(
        listed.len(),
        listed_packages().len(),
        "a package listed twice"
    );
    let missing: Vec<String> = needed
        .iter()
        .filter(|(_, package)| !listed.contains(*package))
        .map(|(what, package)| format!("{what} (package {package})"))
        .collect();
    assert!(
        missing.is_empty(),
        "{PACKAGE_FILE} lacks {}",
        missing.join(", ")
    );
    // The script checks the same tools in the rootfs it builds.
    let script = std::fs::read_to_string(repo().join("tests/e2e/image")).unwrap();
    for (what, _) in needed.iter().filter(|(what, _)| !what.starts_with('/')) {
        assert!(
            script.contains(&format!(" {what}")),
            "tests/e2e/image does not check for {what}"
        );
    }
}

/// The Dockerfile's build stage copies every top-level part of the tree the build reads:
/// the manifests, the crates, the protos (compiled by crates/api/build.rs from proto/),
/// the binary's sources.
#[test]
fn the_build_stage_copies_what_the_build_reads() {
    let dockerfile = std::fs::read_to_string(repo().join("Dockerfile")).unwrap();
    let copies: Vec<&str> = dockerfile
        .lines()
        .filter_map(|l| l.trim().strip_prefix("COPY "))
        .filter(|l| !l.starts_with("--from"))
        .collect();
    for part in ["Cargo.toml", "Cargo.lock", "crates", "proto", "src"] {
        assert!(
            copies
                .iter()
                .any(|c| c.split_whitespace().any(|w| w == part)),
            "the build stage does not copy {part}: {copies:?}"
        );
        assert!(repo().join(part).exists(), "{part} is not in the tree");
        // The build context holds it: `.dockerignore` excludes everything else.
        let dockerignore = std::fs::read_to_string(repo().join(".dockerignore")).unwrap();
        assert!(
            dockerignore
                .lines()
                .any(|l| l.trim() == format!("!{part}") || l.trim() == format!("!{part}/")),
            ".dockerignore keeps {part} out of the build context"
        );
    }
}
