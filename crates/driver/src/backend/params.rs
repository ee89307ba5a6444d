//! StorageClass parameter rules shared by every backend (the reserved key names are
//! `stowage_api::keys`): `${pvc.metadata.*}` templates, path-component checks,
//! and serde helpers for values that arrive as strings. Backends declare their own typed
//! parameter structs (with `deny_unknown_fields`) and parse them with [`parse`].

use std::collections::BTreeMap;

use serde::de::{DeserializeOwned, Error as _};
use serde::{Deserialize, Deserializer};

use stowage_api::keys::{PV_NAME, PVC_NAME, PVC_NAMESPACE, RESERVED_PREFIX};

/// Parse a typed parameter struct from string parameters. Reserved keys other than
/// `keep_reserved` are skipped (Kubernetes owns them); every other unknown key is an
/// error that names the key and lists the known ones (serde's `deny_unknown_fields`).
pub fn parse<T: DeserializeOwned>(
    parameters: &BTreeMap<String, String>,
    keep_reserved: &[&str],
) -> Result<T, String> {
    let object: serde_json::Map<String, serde_json::Value> = parameters
        .iter()
        .filter(|(k, _)| !k.starts_with(RESERVED_PREFIX) || keep_reserved.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
        .collect();
    serde_path_to_error::deserialize(serde_json::Value::Object(object)).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." || inner.to_string().starts_with("unknown field") {
            format!("invalid StorageClass parameters: {inner}")
        } else {
            format!("invalid StorageClass parameter `{path}`: {inner}")
        }
    })
}

/// serde helper: a number written as a string ("1000").
pub fn from_str<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: std::str::FromStr,
    T::Err: std::fmt::Display,
{
    let s = String::deserialize(deserializer)?;
    s.trim()
        .parse()
        .map_err(|e| D::Error::custom(format!("{s:?} is not valid: {e}")))
}

/// serde helper: an optional number written as a string.
pub fn opt_from_str<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: std::str::FromStr,
    T::Err: std::fmt::Display,
{
    from_str(deserializer).map(Some)
}

/// serde helper: an optional octal file mode ("0777", "755"), at most 0o7777.
pub fn opt_octal_mode<'de, D>(deserializer: D) -> Result<Option<u32>, D::Error>
where
    D: Deserializer<'de>,
{
    let s = String::deserialize(deserializer)?;
    let mode = u32::from_str_radix(s.trim(), 8)
        .ok()
        .filter(|m| *m <= 0o7777)
        .ok_or_else(|| D::Error::custom(format!("{s:?} is not an octal mode like 0750")))?;
    Ok(Some(mode))
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

/// The template variables: the `${…}` spelling (csi-driver-nfs `subDir`), the Go-template
/// field aws-ebs-csi-driver documents for tag values (`{{ .PVCName }}`), and the parameter
/// the provisioner fills with the value.
const VARIABLES: [(&str, &str, &str); 3] = [
    ("${pvc.metadata.name}", ".PVCName", PVC_NAME),
    ("${pvc.metadata.namespace}", ".PVCNamespace", PVC_NAMESPACE),
    ("${pv.metadata.name}", ".PVName", PV_NAME),
];

/// Which template spellings a renderer accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Syntax {
    /// `${pvc.metadata.name}` only.
    Dollar,
    /// `${pvc.metadata.name}` and `{{ .PVCName }}`.
    DollarAndGo,
}

fn known_templates(syntax: Syntax) -> String {
    let mut known: Vec<String> = VARIABLES.iter().map(|(v, _, _)| (*v).to_owned()).collect();
    if syntax == Syntax::DollarAndGo {
        known.extend(
            VARIABLES
                .iter()
                .map(|(_, field, _)| format!("{{{{ {field} }}}}")),
        );
    }
    known.join(", ")
}

/// Replaces every template variable in `template` with its value from `parameters`;
/// `check` vets each substituted value. Anything that looks like a template but is not
/// a known variable is an error naming `key`.
fn substitute(
    key: &str,
    template: &str,
    parameters: &BTreeMap<String, String>,
    syntax: Syntax,
    check: &dyn Fn(&str) -> Result<(), String>,
) -> Result<String, String> {
    let mut rendered = String::with_capacity(template.len());
    let mut rest = template;
    loop {
        let go = (syntax == Syntax::DollarAndGo)
            .then(|| rest.find("{{"))
            .flatten();
        let Some(start) = [rest.find("${"), go].into_iter().flatten().min() else {
            break;
        };
        rendered.push_str(&rest[..start]);
        let tail = &rest[start..];
        let found = if tail.starts_with("${") {
            VARIABLES
                .iter()
                .find(|(v, _, _)| tail.starts_with(v))
                .map(|(v, _, source)| (*v, v.len(), *source))
        } else {
            tail.find("}}").and_then(|end| {
                let field = tail[2..end].trim();
                VARIABLES
                    .iter()
                    .find(|(_, f, _)| *f == field)
                    .map(|(_, _, source)| (&tail[..end + 2], end + 2, *source))
            })
        };
        let Some((variable, length, source)) = found else {
            let close = if tail.starts_with("${") { "}" } else { "}}" };
            let end = tail.find(close).map_or(tail.len(), |i| i + close.len());
            return Err(format!(
                "parameter `{key}`: {} is not a known template (known: {}; functions and pipelines are not supported)",
                &tail[..end],
                known_templates(syntax)
            ));
        };
        let value = parameters.get(source).ok_or_else(|| {
            format!(
                "parameter `{key}` uses {variable} but the request has no `{source}` (the provisioner adds it; run external-provisioner with --extra-create-metadata)"
            )
        })?;
        check(value).map_err(|e| format!("parameter `{key}`: {variable} = {e}"))?;
        rendered.push_str(value);
        rest = &tail[length..];
    }
    rendered.push_str(rest);
    Ok(rendered)
}

/// Renders a path template such as `${pvc.metadata.namespace}/${pvc.metadata.name}`
/// into checked components. Each substituted value must itself be a single valid
/// component (a namespace with `/` cannot add a level); the result is split on `/`
/// and every component is checked again.
pub fn render_path(
    key: &str,
    template: &str,
    parameters: &BTreeMap<String, String>,
) -> Result<Vec<String>, String> {
    let rendered = substitute(key, template, parameters, Syntax::Dollar, &check_component)?;
    let components: Vec<String> = rendered
        .trim_matches('/')
        .split('/')
        .map(str::to_owned)
        .collect();
    for component in &components {
        check_component(component).map_err(|e| format!("parameter `{key}` ({template:?}): {e}"))?;
    }
    Ok(components)
}

/// Renders a value template such as `team-${pvc.metadata.namespace}` (an EBS tag value)
/// into a string. Besides the `${…}` variables of [`render_path`] it accepts the three
/// Go-template fields aws-ebs-csi-driver documents for tags (`{{ .PVCName }}`,
/// `{{ .PVCNamespace }}`, `{{ .PVName }}`), so StorageClasses written for that driver
/// keep working; its template functions and pipelines are rejected. Values are not
/// path-checked: the caller checks what its target allows.
pub fn render_value(
    key: &str,
    template: &str,
    parameters: &BTreeMap<String, String>,
) -> Result<String, String> {
    substitute(key, template, parameters, Syntax::DollarAndGo, &|_| Ok(()))
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
            let err = render_path("subDir", template, &params(&[(key, value)])).unwrap_err();
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
        let err = render_path("subDir", "${pvc.metadata.uid}", &params(&[])).unwrap_err();
        assert!(
            err.contains("${pvc.metadata.uid}") && err.contains("known"),
            "{err}"
        );
        let err = render_path("subDir", "${pvc.metadata.name}", &params(&[])).unwrap_err();
        assert!(err.contains(PVC_NAME), "{err}");
    }

    #[test]
    fn renders_value_templates_in_both_spellings() {
        let p = params(&[
            (PVC_NAME, "data-db-0"),
            (PVC_NAMESPACE, "prod"),
            (PV_NAME, "pvc-1"),
        ]);
        let cases = [
            ("plain", "plain"),
            ("", ""),
            (
                "${pvc.metadata.namespace}/${pvc.metadata.name}",
                "prod/data-db-0",
            ),
            ("{{ .PVCNamespace }}-{{.PVCName}}", "prod-data-db-0"),
            ("pv={{  .PVName  }}", "pv=pvc-1"),
            ("${pv.metadata.name}{{ .PVName }}", "pvc-1pvc-1"),
            ("a $ { } b", "a $ { } b"),
        ];
        for (template, want) in cases {
            assert_eq!(
                render_value("tagSpecification_1", template, &p).unwrap(),
                want,
                "{template}"
            );
        }
        // A value is substituted once: a PVC name that looks like a template stays literal.
        let tricky = params(&[(PVC_NAME, "${pv.metadata.name}")]);
        assert_eq!(
            render_value("t", "{{ .PVCName }}", &tricky).unwrap(),
            "${pv.metadata.name}"
        );
    }

    #[test]
    fn bad_value_templates_say_what_to_fix() {
        let p = params(&[(PVC_NAMESPACE, "prod")]);
        let cases = [
            ("{{ .PVCNamespace | toUpper }}", "toUpper"),
            ("{{ .Namespace }}", ".Namespace"),
            ("{{ .PVCName", "{{ .PVCName"),
            ("${pvc.metadata.uid}", "${pvc.metadata.uid}"),
            ("{{ .PVCName }}", PVC_NAME),
        ];
        for (template, needle) in cases {
            let err = render_value("tagSpecification_3", template, &p).unwrap_err();
            assert!(
                err.contains("tagSpecification_3") && err.contains(needle),
                "{template}: {err}"
            );
        }
        // render_path keeps to the `${…}` spelling.
        let err = render_path("subDir", "{{ .PVCNamespace }}", &p);
        assert_eq!(err.unwrap(), vec!["{{ .PVCNamespace }}"]);
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Example {
        server: Option<String>,
        #[serde(
            default,
            rename = "mountPermissions",
            deserialize_with = "opt_octal_mode"
        )]
        mode: Option<u32>,
        #[serde(default, deserialize_with = "opt_from_str")]
        uid: Option<u32>,
    }

    #[test]
    fn typed_parse_names_unknown_keys_and_skips_reserved_ones() {
        let ok: Example = parse(
            &params(&[
                ("server", "s"),
                ("mountPermissions", "0750"),
                ("uid", "1000"),
                (PVC_NAME, "x"),
            ]),
            &[],
        )
        .unwrap();
        assert_eq!(
            ok,
            Example {
                server: Some("s".into()),
                mode: Some(0o750),
                uid: Some(1000)
            }
        );
        let err = parse::<Example>(&params(&[("sever", "s")]), &[]).unwrap_err();
        assert!(err.contains("`sever`") && err.contains("`server`"), "{err}");
        let err = parse::<Example>(&params(&[("mountPermissions", "rwx")]), &[]).unwrap_err();
        assert!(err.contains("octal"), "{err}");
        let err = parse::<Example>(&params(&[("uid", "-1")]), &[]).unwrap_err();
        assert!(err.contains("uid"), "{err}");
    }
}
