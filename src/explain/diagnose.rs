//! The diagnosis, pure: from what was read ([`Facts`]) to the chain claim → class →
//! provisioner → binding mode → selected node → stowage's last attempt → PV →
//! VolumeAttachment → node, and the first broken link named with its fix.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod};
use k8s_openapi::api::storage::v1::{StorageClass, VolumeAttachment};
use serde::Serialize;
use stowage_api::keys::DriverNames;
use stowage_loops::activity::Report as Attempts;
use stowage_loops::rules;

/// What `explain` was asked about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Claim { namespace: String, name: String },
    Volume { name: String },
    Attachment { name: String },
}

impl Target {
    /// `pvc/NAME`, `pv/NAME`, `volumeattachment/NAME` (and their long and short names).
    pub fn parse(text: &str, namespace: &str) -> Result<Target, String> {
        let (kind, name) = text.split_once('/').ok_or_else(|| {
            format!("{text:?}: expected pvc/NAME, pv/NAME or volumeattachment/NAME")
        })?;
        if name.is_empty() || name.contains('/') {
            return Err(format!("{text:?}: expected one name after the kind"));
        }
        let name = name.to_owned();
        match kind.to_ascii_lowercase().as_str() {
            "pvc" | "persistentvolumeclaim" | "persistentvolumeclaims" => Ok(Target::Claim {
                namespace: namespace.to_owned(),
                name,
            }),
            "pv" | "persistentvolume" | "persistentvolumes" => Ok(Target::Volume { name }),
            "va" | "volumeattachment" | "volumeattachments" => Ok(Target::Attachment { name }),
            other => Err(format!(
                "{other:?} is not something explain follows: pvc, pv or volumeattachment"
            )),
        }
    }
}

/// Who holds the controller's leader Lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Leader {
    /// A replica renewed it within its duration.
    Held { namespace: String, holder: String },
    /// No Lease of that name in any namespace.
    Missing { name: String },
    /// A Lease nobody holds, or whose holder stopped renewing.
    Lapsed {
        namespace: String,
        name: String,
        holder: Option<String>,
        seconds_since_renewal: Option<i64>,
    },
    /// The Leases could not be read.
    Unknown(String),
}

/// Everything `explain` read, for one target.
#[derive(Debug, Clone)]
pub struct Facts {
    pub driver: DriverNames,
    pub target: Target,
    pub claim: Option<PersistentVolumeClaim>,
    /// The claim's class, if it names one that exists.
    pub class: Option<StorageClass>,
    /// The pods in the claim's namespace that use the claim.
    pub pods: Vec<Pod>,
    pub volume: Option<PersistentVolume>,
    /// VolumeAttachments of the PV (or the one asked about).
    pub attachments: Vec<VolumeAttachment>,
    /// For each node that matters: does its CSINode list the driver? `None`: no CSINode.
    pub csinodes: BTreeMap<String, Option<bool>>,
    pub leader: Leader,
    /// The controller's last attempts at the objects, or why they could not be read.
    pub attempts: Result<Attempts, String>,
    /// The objects' Warning events, oldest first.
    pub warnings: Vec<String>,
}

impl Facts {
    /// stowage's driver names, quoted: `` `a` `` or `` `a` or `b` ``.
    fn ours(&self) -> String {
        self.driver
            .iter()
            .map(|name| format!("`{name}`"))
            .collect::<Vec<_>>()
            .join(" or ")
    }

    /// The driver name a node must have registered for this target: its PV's, else
    /// its class's (when one of stowage's), else the main name.
    pub fn node_driver(&self) -> &str {
        let pv_driver = self
            .volume
            .as_ref()
            .and_then(|pv| pv.spec.as_ref())
            .and_then(|s| s.csi.as_ref())
            .map(|csi| csi.driver.as_str());
        let class_driver = self.class.as_ref().map(|c| c.provisioner.as_str());
        pv_driver
            .or(class_driver)
            .filter(|name| self.driver.contains(name))
            .unwrap_or(&self.driver.main)
    }
}

/// How one link of the chain stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Ok,
    Broken,
    /// Not reached yet (a later link of a claim still waiting).
    Waiting,
    /// Could not tell.
    Unknown,
}

/// One link: `class  fast`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Link {
    pub link: &'static str,
    pub value: String,
    pub state: State,
}

/// The answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Explanation {
    /// `pvc/db/data-db-0`.
    pub object: String,
    pub phase: String,
    /// The first broken link (or what everything waits for); `None`: nothing wrong.
    pub problem: Option<String>,
    pub fix: Option<String>,
    pub chain: Vec<Link>,
    /// The objects' Warning events, oldest first.
    pub warnings: Vec<String>,
}

/// The first problem found and its fix.
struct Finding {
    problem: String,
    fix: String,
}

fn finding(problem: impl Into<String>, fix: impl Into<String>) -> Option<Finding> {
    Some(Finding {
        problem: problem.into(),
        fix: fix.into(),
    })
}

/// The diagnosis.
pub fn diagnose(facts: &Facts) -> Explanation {
    match &facts.target {
        Target::Claim { namespace, name } => claim(facts, namespace, name),
        Target::Volume { name } => volume(facts, name),
        Target::Attachment { name } => attachment(facts, name),
    }
}

/// Builds the chain and keeps the first finding.
struct Chain {
    links: Vec<Link>,
    first: Option<Finding>,
}

impl Chain {
    fn new() -> Self {
        Chain {
            links: vec![],
            first: None,
        }
    }

    fn ok(&mut self, link: &'static str, value: impl Into<String>) {
        self.links.push(Link {
            link,
            value: value.into(),
            state: State::Ok,
        });
    }

    fn state(&mut self, link: &'static str, value: impl Into<String>, state: State) {
        self.links.push(Link {
            link,
            value: value.into(),
            state,
        });
    }

    /// A broken link; the first one found is the answer.
    fn broken(&mut self, link: &'static str, value: impl Into<String>, found: Option<Finding>) {
        self.state(link, value, State::Broken);
        if self.first.is_none() {
            self.first = found;
        }
    }

    /// Something everything after waits for (not an error, but the answer if nothing
    /// is broken).
    fn waiting(&mut self, link: &'static str, value: impl Into<String>, found: Option<Finding>) {
        self.state(link, value, State::Waiting);
        if self.first.is_none() {
            self.first = found;
        }
    }

    fn explain(self, object: String, phase: String, facts: &Facts) -> Explanation {
        Explanation {
            object,
            phase,
            problem: self.first.as_ref().map(|f| f.problem.clone()),
            fix: self.first.map(|f| f.fix),
            chain: self.links,
            warnings: facts.warnings.clone(),
        }
    }
}

fn claim_phase(pvc: &PersistentVolumeClaim) -> String {
    pvc.status
        .as_ref()
        .and_then(|s| s.phase.clone())
        .unwrap_or_else(|| "Pending".to_owned())
}

fn claim_size(pvc: &PersistentVolumeClaim) -> String {
    pvc.spec
        .as_ref()
        .and_then(|s| s.resources.as_ref())
        .and_then(|r| r.requests.as_ref())
        .and_then(|r| r.get("storage"))
        .map(|q| q.0.clone())
        .unwrap_or_else(|| "no size".to_owned())
}

/// The controller link: who leads, and its last attempt at `objects`.
fn controller(chain: &mut Chain, facts: &Facts, objects: &[String]) {
    match &facts.leader {
        Leader::Held { namespace, holder } => {
            chain.ok("controller", format!("{holder} leads (Lease in {namespace})"));
        }
        Leader::Missing { name } => chain.broken(
            "controller",
            format!("no Lease {name}"),
            finding(
                format!("no stowage controller holds the leader Lease `{name}` (none exists): nothing provisions, attaches or resizes for {}", facts.driver),
                "start the controller (`kubectl -n <namespace> get deploy,pods -l app.kubernetes.io/component=controller`; after `helm install` it takes the Lease within seconds)",
            ),
        ),
        Leader::Lapsed {
            namespace,
            name,
            holder,
            seconds_since_renewal,
        } => chain.broken(
            "controller",
            format!(
                "Lease {namespace}/{name}: {}",
                match (holder, seconds_since_renewal) {
                    (Some(h), Some(s)) => format!("{h} stopped renewing {s}s ago"),
                    _ => "held by nobody".to_owned(),
                }
            ),
            finding(
                format!("no stowage controller holds the leader Lease `{namespace}/{name}`: nothing provisions, attaches or resizes for {}", facts.driver),
                format!("check the controller pods: `kubectl -n {namespace} get pods -l app.kubernetes.io/component=controller` and their logs"),
            ),
        ),
        Leader::Unknown(why) => chain.state("controller", format!("unknown: {why}"), State::Unknown),
    }
    match &facts.attempts {
        Ok(attempts) => {
            let failures: Vec<_> = attempts
                .failures
                .iter()
                .filter(|f| objects.contains(&f.object))
                .collect();
            if let Some(last) = failures.last() {
                let code = last
                    .code
                    .as_deref()
                    .map(|c| format!("{c}: "))
                    .unwrap_or_default();
                chain.broken(
                    "last attempt",
                    format!(
                        "{} failed {}x: {code}{} (next retry {})",
                        last.loop_name,
                        last.failures,
                        last.message,
                        last.next_retry.as_deref().unwrap_or("?")
                    ),
                    finding(
                        format!("stowage's {} keeps failing: {code}{}", last.loop_name, last.message),
                        "fix what the message names; the controller retries by itself (backoff up to --retry-interval-max)",
                    ),
                );
            } else if let Some(working) = attempts
                .in_flight
                .iter()
                .find(|w| objects.contains(&w.object))
            {
                chain.ok(
                    "last attempt",
                    format!(
                        "{} working on it for {}s",
                        working.loop_name, working.seconds
                    ),
                );
            } else {
                chain.ok("last attempt", "no failure recorded");
            }
        }
        Err(why) => chain.state(
            "last attempt",
            format!("controller not asked: {why}"),
            State::Unknown,
        ),
    }
}

/// The node link: does the node run stowage's node plugin (CSINode lists the driver)?
fn node(chain: &mut Chain, facts: &Facts, node: &str) {
    match facts.csinodes.get(node) {
        Some(Some(true)) => chain.ok("node", format!("{node} (node plugin registered)")),
        Some(Some(false)) | Some(None) => chain.broken(
            "node",
            format!("{node}: no {} in its CSINode", facts.node_driver()),
            finding(
                format!("node `{node}` has no stowage CSINode entry (node plugin not running there)"),
                format!("check the node DaemonSet's pod on {node} (`kubectl get pods -A -o wide --field-selector spec.nodeName={node}`): tolerations, nodeSelector, its registration log line"),
            ),
        ),
        None => chain.state("node", node.to_owned(), State::Unknown),
    }
}

fn claim(facts: &Facts, namespace: &str, name: &str) -> Explanation {
    let object = format!("pvc/{namespace}/{name}");
    let mut chain = Chain::new();
    let Some(pvc) = &facts.claim else {
        chain.broken(
            "claim",
            "not found",
            finding(
                format!("claim {namespace}/{name} does not exist"),
                "check the name and namespace (`kubectl get pvc -A | grep <name>`)",
            ),
        );
        return chain.explain(object, "Missing".to_owned(), facts);
    };
    let phase = claim_phase(pvc);
    let spec = pvc.spec.clone().unwrap_or_default();
    let modes = spec.access_modes.clone().unwrap_or_default().join(",");
    if pvc.metadata.deletion_timestamp.is_some() {
        let users: Vec<String> = facts
            .pods
            .iter()
            .filter_map(|p| p.metadata.name.clone())
            .collect();
        chain.broken(
            "claim",
            format!("{phase}, being deleted"),
            finding(
                if users.is_empty() {
                    format!("claim is being deleted; finalizers left: {}", pvc.metadata.finalizers.clone().unwrap_or_default().join(", "))
                } else {
                    format!("claim is being deleted and waits for the pods that use it: {}", users.join(", "))
                },
                "delete the pods that use it (kubernetes.io/pvc-protection); stowage's own finalizers go once its work on the claim is done",
            ),
        );
    } else {
        chain.ok("claim", format!("{phase}, {} {modes}", claim_size(pvc)));
    }

    let bound_volume = spec.volume_name.clone().filter(|v| !v.is_empty());
    let class_name = rules::claim_class(pvc).map(str::to_owned);
    match (&class_name, &facts.class) {
        (None, _) if bound_volume.is_none() => chain.broken(
            "class",
            "none",
            finding(
                "claim names no StorageClass and the cluster has no default one: nothing provisions it",
                "set spec.storageClassName to a class whose provisioner is stowage (`kubectl get storageclass`)",
            ),
        ),
        (None, _) => chain.ok("class", "none (bound by hand)"),
        (Some(class), None) if bound_volume.is_none() => chain.broken(
            "class",
            format!("{class}: not found"),
            finding(
                format!("StorageClass `{class}` does not exist"),
                format!("create StorageClass `{class}` with provisioner {}, or name an existing one", facts.driver.main),
            ),
        ),
        (Some(class), None) => chain.state("class", format!("{class}: gone (claim already bound)"), State::Ok),
        (Some(_), Some(sc)) => {
            let sc_name = sc.metadata.name.clone().unwrap_or_default();
            chain.ok("class", sc_name.clone());
            if !facts.driver.contains(&sc.provisioner) {
                chain.broken(
                    "provisioner",
                    sc.provisioner.clone(),
                    finding(
                        format!("StorageClass `{sc_name}` names provisioner `{}`, not {}", sc.provisioner, facts.ours()),
                        format!("use a StorageClass with `provisioner: {}` (a class's provisioner cannot be changed: create another)", facts.driver.main),
                    ),
                );
            } else {
                chain.ok("provisioner", sc.provisioner.clone());
                if bound_volume.is_none() {
                    let mut parameters: BTreeMap<String, String> =
                        sc.parameters.clone().unwrap_or_default().into_iter().collect();
                    let routed = rules::backend_for_provisioner(
                        &mut parameters,
                        &sc.provisioner,
                        &facts.driver,
                    );
                    let bytes = pvc
                        .spec
                        .as_ref()
                        .and_then(|s| s.resources.as_ref())
                        .and_then(|r| r.requests.as_ref())
                        .and_then(|r| r.get("storage"))
                        .and_then(|q| rules::parse_quantity(&q.0).ok())
                        .and_then(|b| u64::try_from(b).ok())
                        .unwrap_or(1 << 30);
                    match routed.and_then(|()| {
                        stowage_driver::backend::check_class_parameters(&parameters, bytes)
                    }) {
                        Ok(kind) => chain.ok("parameters", format!("{kind}: valid")),
                        Err(message) => chain.broken(
                            "parameters",
                            message.clone(),
                            finding(
                                format!("StorageClass `{sc_name}`: {message}"),
                                format!("StorageClass parameters cannot be edited: create a corrected class (`kubectl get sc {sc_name} -o yaml`), then recreate the claim with it"),
                            ),
                        ),
                    }
                }
            }
        }
    }

    if bound_volume.is_none() && spec.selector.is_some() {
        chain.broken(
            "selector",
            "set",
            finding(
                "claim has a selector: dynamic provisioning ignores such claims",
                "remove spec.selector (recreate the claim), or create a PV by hand that matches it",
            ),
        );
    }

    let wait_for_consumer = facts
        .class
        .as_ref()
        .and_then(|c| c.volume_binding_mode.as_deref())
        == Some(rules::BINDING_WAIT_FOR_FIRST_CONSUMER);
    chain.ok(
        "binding mode",
        if wait_for_consumer {
            "WaitForFirstConsumer"
        } else {
            "Immediate"
        },
    );
    let selected = pvc
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(rules::ANN_SELECTED_NODE))
        .filter(|n| !n.is_empty())
        .cloned();
    if wait_for_consumer && bound_volume.is_none() {
        match &selected {
            Some(node_name) => {
                chain.ok("selected node", node_name.clone());
                node(&mut chain, facts, node_name);
            }
            None if facts.pods.is_empty() => chain.waiting(
                "selected node",
                "none: no pod uses the claim",
                finding(
                    "WaitForFirstConsumer: no pod uses this claim yet, so no node is chosen and nothing is provisioned",
                    "create the pod (or StatefulSet) that uses the claim; the volume is made on the node the scheduler picks",
                ),
            ),
            None => {
                let pod = &facts.pods[0];
                let why = pod
                    .status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .and_then(|c| c.iter().find(|c| c.type_ == "PodScheduled" && c.status == "False"))
                    .and_then(|c| c.message.clone())
                    .unwrap_or_else(|| "not scheduled yet".to_owned());
                chain.waiting(
                    "selected node",
                    format!("none: pod {} not scheduled", pod.metadata.name.clone().unwrap_or_default()),
                    finding(
                        format!(
                            "WaitForFirstConsumer: pod {} is not scheduled yet: {why}",
                            pod.metadata.name.clone().unwrap_or_default()
                        ),
                        "the scheduler picks the node first; see `kubectl describe pod` for what it waits for",
                    ),
                );
            }
        }
    }

    let pv_name = bound_volume
        .clone()
        .or_else(|| rules::pv_name(pvc).ok())
        .unwrap_or_default();
    if bound_volume.is_none() {
        controller(&mut chain, facts, &[format!("{namespace}/{name}")]);
        chain.waiting(
            "PV",
            format!("{pv_name}: not made yet"),
            finding(
                "stowage has not provisioned the claim yet and reports no failure",
                "wait a few seconds; if it stays so, see `kubectl describe pvc` events and the controller's log",
            ),
        );
        return chain.explain(object, phase, facts);
    }
    match &facts.volume {
        Some(pv) => {
            let pv_phase = pv.status.as_ref().and_then(|s| s.phase.clone()).unwrap_or_default();
            chain.ok("PV", format!("{pv_name} ({pv_phase})"));
        }
        None => chain.broken(
            "PV",
            format!("{pv_name}: not found"),
            finding(
                format!("the claim is bound to PV {pv_name}, which does not exist"),
                "the PV was deleted behind the claim: restore it from a backup of the object, or recreate the claim",
            ),
        ),
    }
    attachments_and_nodes(&mut chain, facts, &pv_name);
    if chain.first.is_none() {
        controller(
            &mut chain,
            facts,
            &[format!("{namespace}/{name}"), pv_name.clone()],
        );
    }
    chain.explain(object, phase, facts)
}

/// The attachments of a bound volume, and the nodes of the pods that use it.
fn attachments_and_nodes(chain: &mut Chain, facts: &Facts, pv_name: &str) {
    let mut nodes: Vec<String> = facts
        .pods
        .iter()
        .filter_map(|p| p.spec.as_ref()?.node_name.clone())
        .collect();
    nodes.sort();
    nodes.dedup();
    for attachment in &facts.attachments {
        let va_name = attachment.metadata.name.clone().unwrap_or_default();
        let status = attachment.status.clone().unwrap_or_default();
        if let Some(error) = status.attach_error.as_ref().and_then(|e| e.message.clone()) {
            chain.broken(
                "attachment",
                format!("{va_name} → {}: {error}", attachment.spec.node_name),
                finding(
                    format!(
                        "attaching {pv_name} to node {} fails: {error}",
                        attachment.spec.node_name
                    ),
                    "fix what the message names; the attacher retries by itself",
                ),
            );
        } else if status.attached {
            chain.ok(
                "attachment",
                format!("{va_name} → {} attached", attachment.spec.node_name),
            );
        } else {
            chain.waiting(
                "attachment",
                format!("{va_name} → {} not attached yet", attachment.spec.node_name),
                None,
            );
        }
        if !nodes.contains(&attachment.spec.node_name) {
            nodes.push(attachment.spec.node_name.clone());
        }
    }
    for node_name in nodes {
        node(chain, facts, &node_name);
    }
}

fn volume(facts: &Facts, name: &str) -> Explanation {
    let object = format!("pv/{name}");
    let mut chain = Chain::new();
    let Some(pv) = &facts.volume else {
        chain.broken(
            "PV",
            "not found",
            finding(
                format!("PV {name} does not exist"),
                "check the name (`kubectl get pv`)",
            ),
        );
        return chain.explain(object, "Missing".to_owned(), facts);
    };
    let phase = pv
        .status
        .as_ref()
        .and_then(|s| s.phase.clone())
        .unwrap_or_default();
    let spec = pv.spec.clone().unwrap_or_default();
    match &spec.csi {
        Some(csi) if facts.driver.contains(&csi.driver) => {
            chain.ok("PV", format!("{phase}, handle {}", csi.volume_handle));
        }
        Some(csi) => chain.broken(
            "driver",
            csi.driver.clone(),
            finding(
                format!(
                    "PV {name} belongs to driver `{}`, not {}",
                    csi.driver,
                    facts.ours()
                ),
                "ask that driver's tools",
            ),
        ),
        None => chain.broken(
            "driver",
            "not a CSI volume",
            finding(
                format!("PV {name} is not a CSI volume"),
                "stowage only manages CSI volumes of its driver",
            ),
        ),
    }
    match &spec.claim_ref {
        Some(claim) => chain.ok(
            "claim",
            format!(
                "{}/{}",
                claim.namespace.clone().unwrap_or_default(),
                claim.name.clone().unwrap_or_default()
            ),
        ),
        None => chain.ok("claim", "none"),
    }
    if phase == "Released" || phase == "Failed" {
        let policy = spec
            .persistent_volume_reclaim_policy
            .clone()
            .unwrap_or_default();
        if policy == "Delete" {
            chain.waiting(
                "deletion",
                "reclaim policy Delete",
                finding(
                    format!("PV is {phase}: stowage deletes its volume, then the PV"),
                    "if it stays, see the controller's last attempt below and the PV's events",
                ),
            );
        } else {
            chain.ok("deletion", format!("reclaim policy {policy}: kept"));
        }
    }
    attachments_and_nodes(&mut chain, facts, name);
    controller(&mut chain, facts, &[name.to_owned()]);
    chain.explain(object, phase, facts)
}

fn attachment(facts: &Facts, name: &str) -> Explanation {
    let object = format!("volumeattachment/{name}");
    let mut chain = Chain::new();
    let Some(va) = facts.attachments.first() else {
        chain.broken(
            "attachment",
            "not found",
            finding(
                format!("VolumeAttachment {name} does not exist"),
                "check the name (`kubectl get volumeattachment`)",
            ),
        );
        return chain.explain(object, "Missing".to_owned(), facts);
    };
    let phase = if va.status.as_ref().is_some_and(|s| s.attached) {
        "Attached"
    } else {
        "Detached"
    };
    if !facts.driver.contains(&va.spec.attacher) {
        chain.broken(
            "attacher",
            va.spec.attacher.clone(),
            finding(
                format!(
                    "VolumeAttachment {name} belongs to `{}`, not {}",
                    va.spec.attacher,
                    facts.ours()
                ),
                "ask that driver's tools",
            ),
        );
        return chain.explain(object, phase.to_owned(), facts);
    }
    let pv_name = va
        .spec
        .source
        .persistent_volume_name
        .clone()
        .unwrap_or_default();
    match &facts.volume {
        Some(_) => chain.ok("PV", pv_name.clone()),
        None => chain.broken(
            "PV",
            format!("{pv_name}: not found"),
            finding(
                format!("VolumeAttachment {name} is for PV {pv_name}, which does not exist"),
                "the attach/detach controller deletes it once no pod needs it",
            ),
        ),
    }
    attachments_and_nodes(&mut chain, facts, &pv_name);
    controller(&mut chain, facts, &[name.to_owned()]);
    chain.explain(object, phase.to_owned(), facts)
}

/// The explanation as a person reads it: the verdict first, one line.
pub fn render(explanation: &Explanation) -> String {
    let mut out = format!(
        "{}: {}\n",
        explanation.object,
        explanation
            .problem
            .as_deref()
            .unwrap_or(match explanation.phase.as_str() {
                "Bound" | "Attached" => "nothing wrong: every link holds",
                _ => "no problem found",
            })
    );
    if let Some(fix) = &explanation.fix {
        out.push_str(&format!("  fix: {fix}\n"));
    }
    out.push_str(&format!("  phase: {}\n", explanation.phase));
    for link in &explanation.chain {
        let mark = match link.state {
            State::Ok => "ok  ",
            State::Broken => "FAIL",
            State::Waiting => "wait",
            State::Unknown => "?   ",
        };
        out.push_str(&format!("  {mark} {:<14} {}\n", link.link, link.value));
    }
    if !explanation.warnings.is_empty() {
        out.push_str("  recent warnings:\n");
        for warning in explanation.warnings.iter().rev().take(5).rev() {
            out.push_str(&format!("    {warning}\n"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{
        CSIPersistentVolumeSource, PersistentVolumeClaimSpec, PersistentVolumeClaimVolumeSource,
        PersistentVolumeSpec, PodSpec, Volume as PodVolume, VolumeResourceRequirements,
    };
    use k8s_openapi::api::storage::v1::{
        VolumeAttachmentSource, VolumeAttachmentSpec, VolumeAttachmentStatus, VolumeError,
    };
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
    use kube::api::ObjectMeta;
    use stowage_loops::activity::Failure;

    const DRIVER: &str = "stowage.csi.dev";

    fn claim(class: &str) -> PersistentVolumeClaim {
        PersistentVolumeClaim {
            metadata: ObjectMeta {
                name: Some("data-db-0".into()),
                namespace: Some("db".into()),
                uid: Some("u-1".into()),
                ..Default::default()
            },
            spec: Some(PersistentVolumeClaimSpec {
                storage_class_name: Some(class.into()),
                access_modes: Some(vec!["ReadWriteOnce".into()]),
                resources: Some(VolumeResourceRequirements {
                    requests: Some([("storage".to_owned(), Quantity("1Gi".into()))].into()),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn class(name: &str, provisioner: &str, parameters: &[(&str, &str)]) -> StorageClass {
        StorageClass {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            provisioner: provisioner.into(),
            parameters: Some(
                parameters
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
            ),
            ..Default::default()
        }
    }

    fn lease_held() -> Leader {
        Leader::Held {
            namespace: "kube-system".into(),
            holder: "stowage-controller-abc".into(),
        }
    }

    fn facts(pvc: PersistentVolumeClaim, sc: Option<StorageClass>) -> Facts {
        Facts {
            driver: DriverNames::new(DRIVER, "nfs.stowage.csi.dev"),
            target: Target::Claim {
                namespace: "db".into(),
                name: "data-db-0".into(),
            },
            claim: Some(pvc),
            class: sc,
            pods: vec![],
            volume: None,
            attachments: vec![],
            csinodes: BTreeMap::new(),
            leader: lease_held(),
            attempts: Ok(Attempts::default()),
            warnings: vec![],
        }
    }

    fn problem(facts: &Facts) -> String {
        let explanation = diagnose(facts);
        let first_line = render(&explanation).lines().next().unwrap().to_owned();
        assert_eq!(
            Some(first_line.split_once(": ").unwrap().1),
            explanation.problem.as_deref(),
            "the first line is the problem"
        );
        explanation.problem.unwrap_or_default()
    }

    fn pod_using(name: &str, node: Option<&str>) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("db".into()),
                ..Default::default()
            },
            spec: Some(PodSpec {
                node_name: node.map(str::to_owned),
                volumes: Some(vec![PodVolume {
                    name: "data".into(),
                    persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                        claim_name: "data-db-0".into(),
                        read_only: None,
                    }),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_class_of_another_provisioner_is_named_with_both_names() {
        let f = facts(claim("fast"), Some(class("fast", "ebs.csi.aws.com", &[])));
        assert_eq!(
            problem(&f),
            "StorageClass `fast` names provisioner `ebs.csi.aws.com`, not `stowage.csi.dev` or `nfs.stowage.csi.dev`"
        );
    }

    #[test]
    fn a_class_of_the_nfs_name_asking_for_ebs_is_named() {
        let f = facts(
            claim("fast"),
            Some(class("fast", "nfs.stowage.csi.dev", &[("backend", "ebs")])),
        );
        let found = problem(&f);
        assert!(
            found.contains("serves NFS volumes only")
                && found.contains("use provisioner stowage.csi.dev for ebs volumes"),
            "{found}"
        );
    }

    #[test]
    fn a_selector_is_named() {
        let mut pvc = claim("nfs");
        pvc.spec.as_mut().unwrap().selector = Some(LabelSelector::default());
        let f = facts(pvc, Some(class("nfs", DRIVER, &[])));
        assert_eq!(
            problem(&f),
            "claim has a selector: dynamic provisioning ignores such claims"
        );
    }

    #[test]
    fn a_typo_in_a_class_key_is_named_with_the_key_it_meant() {
        let f = facts(
            claim("gp3"),
            Some(class(
                "gp3",
                DRIVER,
                &[("type", "gp3"), ("throughtput", "250")],
            )),
        );
        let p = problem(&f);
        assert!(p.starts_with("StorageClass `gp3`: "), "{p}");
        assert!(
            p.contains("unknown parameter `throughtput` (did you mean `throughput`?)"),
            "{p}"
        );
    }

    #[test]
    fn a_missing_class_is_named() {
        let f = facts(claim("nope"), None);
        assert_eq!(problem(&f), "StorageClass `nope` does not exist");
    }

    #[test]
    fn wait_for_first_consumer_without_a_pod_says_so() {
        let mut sc = class("late", DRIVER, &[]);
        sc.volume_binding_mode = Some("WaitForFirstConsumer".into());
        let f = facts(claim("late"), Some(sc));
        assert!(
            problem(&f).starts_with("WaitForFirstConsumer: no pod uses this claim yet"),
            "{}",
            problem(&f)
        );
    }

    #[test]
    fn no_leader_names_the_lease() {
        let mut f = facts(claim("nfs"), Some(class("nfs", DRIVER, &[])));
        f.leader = Leader::Missing {
            name: "stowage-csi-dev".into(),
        };
        f.attempts = Err("no controller leads".into());
        assert!(
            problem(&f)
                .starts_with("no stowage controller holds the leader Lease `stowage-csi-dev`"),
            "{}",
            problem(&f)
        );
        f.leader = Leader::Lapsed {
            namespace: "kube-system".into(),
            name: "stowage-csi-dev".into(),
            holder: Some("stowage-controller-abc".into()),
            seconds_since_renewal: Some(90),
        };
        let p = problem(&f);
        assert!(
            p.starts_with(
                "no stowage controller holds the leader Lease `kube-system/stowage-csi-dev`"
            ),
            "{p}"
        );
        let chain = diagnose(&f).chain;
        assert!(
            chain
                .iter()
                .any(|l| l.value.contains("stopped renewing 90s ago")),
            "{chain:?}"
        );
    }

    #[test]
    fn a_selected_node_without_the_node_plugin_is_named() {
        let mut sc = class("late", DRIVER, &[]);
        sc.volume_binding_mode = Some("WaitForFirstConsumer".into());
        let mut pvc = claim("late");
        pvc.metadata.annotations =
            Some([(rules::ANN_SELECTED_NODE.to_owned(), "n1".to_owned())].into());
        let mut f = facts(pvc, Some(sc));
        f.csinodes.insert("n1".into(), Some(false));
        assert_eq!(
            problem(&f),
            "node `n1` has no stowage CSINode entry (node plugin not running there)"
        );
        f.csinodes.insert("n1".into(), None);
        assert!(problem(&f).starts_with("node `n1` has no stowage CSINode entry"));
    }

    #[test]
    fn the_controllers_last_failure_is_the_answer_with_its_code() {
        let mut f = facts(claim("nfs"), Some(class("nfs", DRIVER, &[])));
        f.attempts = Ok(Attempts {
            leading: true,
            failures: vec![Failure {
                loop_name: "provisioner".into(),
                object: "db/data-db-0".into(),
                code: Some("RESOURCE_EXHAUSTED".into()),
                message: "CreateVolume: no room in us-east-1a".into(),
                failures: 3,
                at: "2026-12-07T10:00:00Z".into(),
                next_retry: Some("2026-12-07T10:00:08Z".into()),
            }],
            in_flight: vec![],
        });
        assert_eq!(
            problem(&f),
            "stowage's provisioner keeps failing: RESOURCE_EXHAUSTED: CreateVolume: no room in us-east-1a"
        );
        let chain = diagnose(&f).chain;
        let last = chain.iter().find(|l| l.link == "last attempt").unwrap();
        assert!(
            last.value.contains("failed 3x")
                && last.value.contains("next retry 2026-12-07T10:00:08Z"),
            "{last:?}"
        );
    }

    #[test]
    fn an_attach_error_of_a_bound_claim_is_named() {
        let mut pvc = claim("ebs");
        pvc.spec.as_mut().unwrap().volume_name = Some("pvc-u-1".into());
        pvc.status = Some(k8s_openapi::api::core::v1::PersistentVolumeClaimStatus {
            phase: Some("Bound".into()),
            ..Default::default()
        });
        let mut f = facts(pvc, Some(class("ebs", DRIVER, &[("type", "gp3")])));
        f.volume = Some(PersistentVolume {
            metadata: ObjectMeta {
                name: Some("pvc-u-1".into()),
                ..Default::default()
            },
            spec: Some(PersistentVolumeSpec {
                csi: Some(CSIPersistentVolumeSource {
                    driver: DRIVER.into(),
                    volume_handle: "vol-1".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        });
        f.pods = vec![pod_using("db-0", Some("n1"))];
        f.csinodes.insert("n1".into(), Some(true));
        f.attachments = vec![VolumeAttachment {
            metadata: ObjectMeta {
                name: Some("csi-abc".into()),
                ..Default::default()
            },
            spec: VolumeAttachmentSpec {
                attacher: DRIVER.into(),
                node_name: "n1".into(),
                source: VolumeAttachmentSource {
                    persistent_volume_name: Some("pvc-u-1".into()),
                    ..Default::default()
                },
            },
            status: Some(VolumeAttachmentStatus {
                attached: false,
                attach_error: Some(VolumeError {
                    message: Some("InvalidVolume.ZoneMismatch".into()),
                    ..Default::default()
                }),
                ..Default::default()
            }),
        }];
        assert_eq!(
            problem(&f),
            "attaching pvc-u-1 to node n1 fails: InvalidVolume.ZoneMismatch"
        );
        // Healthy once attached.
        f.attachments[0].status = Some(VolumeAttachmentStatus {
            attached: true,
            ..Default::default()
        });
        let healthy = diagnose(&f);
        assert_eq!(healthy.problem, None, "{healthy:?}");
        assert!(render(&healthy).starts_with("pvc/db/data-db-0: nothing wrong"));
    }

    #[test]
    fn a_missing_claim_is_named() {
        let mut f = facts(claim("x"), None);
        f.claim = None;
        assert_eq!(problem(&f), "claim db/data-db-0 does not exist");
    }

    #[test]
    fn targets_parse_as_kubectl_writes_them() {
        assert_eq!(
            Target::parse("pvc/data", "db"),
            Ok(Target::Claim {
                namespace: "db".into(),
                name: "data".into()
            })
        );
        assert_eq!(
            Target::parse("persistentvolume/pvc-1", "db"),
            Ok(Target::Volume {
                name: "pvc-1".into()
            })
        );
        assert_eq!(
            Target::parse("volumeattachment/csi-1", "db"),
            Ok(Target::Attachment {
                name: "csi-1".into()
            })
        );
        assert!(Target::parse("pod/x", "db").is_err());
        assert!(Target::parse("data", "db").is_err());
    }
}
