//! Every flag of every subcommand does what it says or is refused (#25). The test walks
//! clap's command tree; each flag, given a value other than its default, is parsed in
//! a few configurations of its subcommand (the defaults, every backend and loop on, an
//! NFS export of one's own …) and must there either change what the subcommand runs
//! with — the resolved settings (`stowage::settings`, the only input of `run`; for
//! `bench` its resolved plan; for `nfs-server` its three flags, all read) — or be
//! refused by the parser with a conflict that names it. A flag added to a shared group
//! and ignored by one subcommand fails here, not in a user's hands. Every flag must
//! show its effect in at least one configuration, unless listed in ALWAYS_REFUSED.

use std::collections::{BTreeMap, BTreeSet};

use clap::CommandFactory;
use clap::error::ErrorKind;
use stowage::config::{Cli, Command, parse_from};

/// A value other than the default for each flag (by clap id), as command-line words.
/// A flag missing here fails the test: add one.
fn sample(id: &str) -> Option<&'static [&'static str]> {
    Some(match id {
        "log_format" => &["--log-format", "json"],
        "endpoint" => &["--endpoint", "unix:///tmp/flags-test/other.sock"],
        "driver_name" => &["--driver-name", "other.csi.example"],
        "nfs_driver_name" => &["--nfs-driver-name", "nfs.other.csi.example"],
        "http_addr" => &["--http-addr", "127.0.0.1:9999"],
        "shutdown_grace" => &["--shutdown-grace", "3s"],
        "backends" => &["--backend", "ebs"],
        "nfs_server" | "nfs_share" => &["--nfs-server", "10.0.0.9", "--nfs-share", "/other"],
        "nfs_timeout" => &["--nfs-timeout", "3s"],
        "nfs_connections" => &["--nfs-connections", "3"],
        "region" => &["--region", "eu-west-1"],
        "ebs_endpoint" => &["--ebs-endpoint", "http://127.0.0.1:1"],
        "cluster_id" => &["--cluster-id", "other"],
        "ec2_max_attempts" => &["--ec2-max-attempts", "7"],
        "ec2_timeout" => &["--ec2-timeout", "3s"],
        "zone" => &["--zone", "eu-west-1a"],
        "instance_id" => &["--instance-id", "i-0123"],
        "instance_type" => &["--instance-type", "m5.large"],
        "max_volumes" => &["--max-volumes", "9"],
        "by_id_dir" => &["--by-id-dir", "/other/by-id"],
        "node_id" => &["--node-id", "other-node"],
        "kubelet_dir" => &["--kubelet-dir", "/other/kubelet"],
        "kubelet_registration" => &["--kubelet-registration", "false"],
        "kubelet_registration_path" => &["--kubelet-registration-path", "/other/csi.sock"],
        "data_dir" => &["--data-dir", "/other/data"],
        "nfs_bind" => &["--nfs-bind", "127.0.0.1:2050"],
        "bind" => &["--bind", "127.0.0.1:2050"],
        "kubeconfig" => &["--kubeconfig", "/other/kubeconfig"],
        "csi_address" => &["--csi-address", "unix:///other/csi.sock"],
        "loops" => &["--loops", "provisioner"],
        "no_loops" => &["--no-loops"],
        "leader_election" => &["--leader-election"],
        "leader_election_namespace" => &["--leader-election-namespace", "other"],
        "leader_election_identity" => &["--leader-election-identity", "other"],
        "leader_election_owner_uid" => &["--leader-election-owner-uid", "0000-1111"],
        "leader_election_lease_duration" => &["--leader-election-lease-duration", "33s"],
        "leader_election_renew_deadline" => &["--leader-election-renew-deadline", "22s"],
        "leader_election_retry_period" => &["--leader-election-retry-period", "3s"],
        "kube_api_qps" => &["--kube-api-qps", "7"],
        "kube_api_burst" => &["--kube-api-burst", "7"],
        "max_csi_calls" => &["--max-csi-calls", "7"],
        "retry_interval_start" => &["--retry-interval-start", "3s"],
        "retry_interval_max" => &["--retry-interval-max", "3m"],
        "annotation_grace" => &["--annotation-grace", "1s"],
        "csi_timeout" => &["--csi-timeout", "3s"],
        "stuck_after" => &["--stuck-after", "3m"],
        "backend_check_interval" => &["--backend-check-interval", "3s"],
        "gc_interval" => &["--gc-interval", "5m"],
        "gc_delete_older_than" => &["--gc-interval", "5m", "--gc-delete-older-than", "2h"],
        "delete" => &["--delete"],
        "older_than" => &["--older-than", "3h"],
        "output" => &["--output", "json"],
        "controller_url" => &["--controller-url", "http://127.0.0.1:1"],
        "count" => &["--count", "5"],
        "warmup" => &["--warmup", "5"],
        "volumes" => &["--volumes", "5"],
        "claims" => &["--claims", "5"],
        "namespace" => &["--namespace", "other"],
        "controller_args" => &["--controller-arg", "--kube-api-qps=1"],
        "keep" => &["--keep"],
        "other_volumes" => &["--other-volumes", "5"],
        "fill_only" => &["--fill-only"],
        "clean" => &["--clean"],
        "csi_provisioner" => &["--csi-provisioner", "/p", "--hostpathplugin", "/h"],
        "hostpathplugin" => &["--hostpathplugin", "/h", "--csi-provisioner", "/p"],
        "csi_provisioner_args" => &[
            "--csi-provisioner",
            "/p",
            "--hostpathplugin",
            "/h",
            "--csi-provisioner-arg",
            "--kube-api-qps=200",
        ],
        "results" => &["--results", "/r"],
        "svg" => &["--results", "/r", "--svg", "/s"],
        _ => return None,
    })
}

/// The configurations each subcommand's flags are tried in (words after its name).
fn configurations(path: &[&str]) -> Vec<Vec<&'static str>> {
    match path {
        ["controller"] => vec![vec![], vec!["--backend", "nfs,ebs", "--leader-election"]],
        ["node"] => vec![vec![], vec!["--backend", "nfs,ebs"]],
        ["local"] => vec![
            vec![],
            vec![
                "--backend",
                "nfs,ebs",
                "--kubeconfig",
                "/k",
                "--leader-election",
            ],
            vec!["--kubeconfig", "/k"],
            vec!["--nfs-server", "10.0.0.1", "--nfs-share", "/x"],
        ],
        ["bench"] => vec![vec![], vec!["--ebs-endpoint", "http://127.0.0.1:2"]],
        ["bench", "provision"] | ["bench", "scale"] => vec![vec!["--kubeconfig", "/k"]],
        ["gc"] => vec![vec![], vec!["--backend", "nfs,ebs", "--delete"]],
        ["explain"] => vec![vec!["pvc/data-db-0"]],
        _ => vec![vec![]],
    }
}

/// Flags that do nothing in any configuration of their subcommand, and say so.
const ALWAYS_REFUSED: &[(&str, &str)] = &[
    // `local` runs the loops only with --kubeconfig, which --no-loops conflicts with.
    ("local", "no_loops"),
];

/// What a command line runs with, or the parser's refusal.
fn outcome(words: &[String]) -> Result<String, clap::Error> {
    let cli = parse_from(std::iter::once("stowage".to_owned()).chain(words.iter().cloned()))?;
    let settings = match &cli.command {
        Command::Controller(args) => format!("{:?}", stowage::settings::controller(args)),
        Command::Node(args) => format!("{:?}", stowage::settings::node(args)),
        Command::Local(args) => format!("{:?}", stowage::settings::local(args)),
        Command::NfsServer(args) => format!("{args:?}"),
        Command::Bench(args) => format!("{:?}", stowage::bench::Bench::of(args)),
        Command::Gc(args) => format!("{:?}", stowage::settings::gc(args)),
        // Every flag of explain is read by it as given.
        Command::Explain(args) => format!("{args:?}"),
    };
    Ok(format!("{:?} {settings}", cli.log_format))
}

/// `words` with `sample` in place of any value `words` already gives the same flag.
fn with_sample(words: &[&str], sample: &[&str]) -> Vec<String> {
    let replaced: BTreeSet<&str> = sample
        .iter()
        .filter(|w| w.starts_with("--"))
        .copied()
        .collect();
    let mut out = Vec::new();
    let mut skip_value = false;
    for word in words {
        if skip_value && !word.starts_with("--") {
            skip_value = false;
            continue;
        }
        skip_value = false;
        if replaced.contains(word) {
            skip_value = true;
            continue;
        }
        out.push((*word).to_owned());
    }
    out.extend(sample.iter().map(|w| (*w).to_owned()));
    out
}

/// Every (subcommand path, clap command) of the tree below the root.
fn subcommands(
    command: &clap::Command,
    path: Vec<String>,
    out: &mut Vec<(Vec<String>, clap::Command)>,
) {
    for sub in command.get_subcommands().filter(|s| s.get_name() != "help") {
        let mut below = path.clone();
        below.push(sub.get_name().to_owned());
        out.push((below.clone(), sub.clone()));
        subcommands(sub, below, out);
    }
}

#[test]
fn every_flag_changes_what_runs_or_is_refused() {
    let mut root = Cli::command();
    root.build();
    // The environment fallbacks of the flags would change the baselines: none may be set.
    let mut all = Vec::new();
    subcommands(&root, Vec::new(), &mut all);
    for (_, sub) in &all {
        for arg in sub.get_arguments() {
            if let Some(env) = arg.get_env() {
                assert!(
                    std::env::var_os(env).is_none(),
                    "unset {} to run this test: it is --{}'s fallback",
                    env.to_string_lossy(),
                    arg.get_long().unwrap_or_default()
                );
            }
        }
    }

    let mut failures = Vec::new();
    let mut effective: BTreeMap<(String, String), bool> = BTreeMap::new();
    for (path, sub) in &all {
        let path_words: Vec<&str> = path.iter().map(String::as_str).collect();
        // Global flags (declared on the root) are tried with each subcommand.
        let args = sub
            .get_arguments()
            .chain(root.get_arguments().filter(|a| a.is_global_set()))
            .filter(|a| !matches!(a.get_id().as_str(), "help" | "version"))
            .filter(|a| a.get_long().is_some());
        for arg in args {
            let id = arg.get_id().as_str().to_owned();
            let key = (path.join(" "), id.clone());
            let Some(sample) = sample(&id) else {
                failures.push(format!(
                    "no sample value for --{} (id {id}): add one to sample()",
                    arg.get_long().unwrap()
                ));
                continue;
            };
            let shown = effective.entry(key).or_insert(false);
            for configuration in configurations(&path_words) {
                let switch_set = arg.get_num_args().is_some_and(|n| n.max_values() == 0)
                    && configuration.contains(&sample[0]);
                if switch_set {
                    continue;
                }
                let mut base_words: Vec<String> = path.clone();
                base_words.extend(configuration.iter().map(|w| (*w).to_owned()));
                let baseline = match outcome(&base_words) {
                    Ok(settings) => settings,
                    Err(e) => panic!("the configuration {base_words:?} must parse: {e}"),
                };
                let mut words: Vec<String> = path.clone();
                words.extend(with_sample(&configuration, sample));
                match outcome(&words) {
                    Ok(settings) if settings != baseline => *shown = true,
                    Ok(_) => failures.push(format!(
                        "`stowage {}` ignores {}: it changes nothing the subcommand runs with, and it is not refused",
                        words.join(" "),
                        sample.join(" ")
                    )),
                    Err(e)
                        if matches!(
                            e.kind(),
                            ErrorKind::ArgumentConflict | ErrorKind::MissingRequiredArgument
                        ) =>
                    {
                        let message = e.to_string();
                        let long = format!("--{}", arg.get_long().unwrap());
                        let names_it = message.contains(&long)
                            || sample.iter().any(|w| w.starts_with("--") && message.contains(w));
                        if !names_it {
                            failures.push(format!(
                                "`stowage {}` is refused without naming {long}: {message}",
                                words.join(" ")
                            ));
                        }
                    }
                    Err(e) => failures.push(format!(
                        "`stowage {}`: the sample value is not valid ({}): {e}",
                        words.join(" "),
                        e.kind()
                    )),
                }
            }
        }
    }
    for ((path, id), shown) in &effective {
        let listed = ALWAYS_REFUSED.contains(&(path.as_str(), id.as_str()));
        if !shown && !listed {
            failures.push(format!(
                "`stowage {path}`: {id} never changes anything in any configuration tried"
            ));
        }
        if *shown && listed {
            failures.push(format!(
                "`stowage {path}`: {id} is listed as always refused but has an effect"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn refusals_name_the_flag_and_say_why() {
    let refused = |words: &[&str], flag: &str, why: &str| {
        let err = parse_from(std::iter::once("stowage").chain(words.iter().copied()))
            .expect_err(&words.join(" "));
        let message = err.to_string();
        assert!(
            message.contains(flag) && message.contains(why),
            "{words:?}: {message}"
        );
    };
    refused(&["node", "--zone", "a"], "--zone", "EBS backend");
    refused(
        &["controller", "--nfs-timeout", "1s", "--backend", "ebs"],
        "--nfs-timeout",
        "NFS backend",
    );
    refused(
        &["controller", "--no-loops", "--kube-api-qps", "3"],
        "--kube-api-qps",
        "--no-loops",
    );
    refused(
        &["local", "--leader-election"],
        "--leader-election",
        "--kubeconfig",
    );
    refused(
        &[
            "local",
            "--nfs-server",
            "10.0.0.1",
            "--nfs-share",
            "/x",
            "--data-dir",
            "/d",
        ],
        "--data-dir",
        "embedded NFS server",
    );
    refused(
        &["controller", "--leader-election-retry-period", "1s"],
        "--leader-election-retry-period",
        "--leader-election",
    );
    // From the environment, an inapplicable value is left alone.
    assert!(parse_from(["stowage", "node", "--node-id", "n"]).is_ok());
}
