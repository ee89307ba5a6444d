//! StorageClass parameter rules shared by every backend (the reserved key names are
//! `stowage_api::keys`): the one error type for parameters ([`ParameterError`]), the
//! one case rule for keys ([`canonical_keys`]), `${pvc.metadata.*}` templates
//! ([`substitute`]; NFS renders paths with them, EBS tag values), and serde helpers for
//! values that arrive as strings.
//! Backends declare their own typed parameter structs (with `deny_unknown_fields`)
//! and parse them with [`parse`].

use std::collections::BTreeMap;

use serde::de::{DeserializeOwned, Error as _};
use serde::{Deserialize, Deserializer};

use stowage_api::keys::{PV_NAME, PVC_NAME, PVC_NAMESPACE, RESERVED_PREFIX};

use super::BackendError;

/// Why a StorageClass's parameters can't make a volume, in either backend. The message
/// names the key and what would be accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParameterError {
    /// A key or value that can never work.
    #[error("{0}")]
    Invalid(String),
    /// A size, IOPS or throughput outside what the storage allows.
    #[error("{0}")]
    OutOfRange(String),
}

impl From<ParameterError> for BackendError {
    fn from(error: ParameterError) -> Self {
        match error {
            ParameterError::Invalid(message) => BackendError::InvalidParameter(message),
            ParameterError::OutOfRange(message) => BackendError::OutOfRange(message),
        }
    }
}

/// The case rule for keys, the same in every backend: keys are case-insensitive, as
/// aws-ebs-csi-driver and csi-driver-nfs read them. Each key is rewritten to its
/// spelling in `known`; two spellings of one key are an error; reserved
/// `csi.storage.k8s.io/*` keys are exact; unknown keys stay as they are, for [`parse`]
/// to name.
pub fn canonical_keys(
    parameters: &BTreeMap<String, String>,
    known: &[&str],
) -> Result<BTreeMap<String, String>, ParameterError> {
    let mut canonical = BTreeMap::new();
    let mut spelled = BTreeMap::<&str, &str>::new();
    for (key, value) in parameters {
        let name = known
            .iter()
            .filter(|k| !k.starts_with(RESERVED_PREFIX))
            .find(|k| k.eq_ignore_ascii_case(key));
        let name = match name {
            Some(name) if !key.starts_with(RESERVED_PREFIX) => *name,
            _ => {
                canonical.insert(key.clone(), value.clone());
                continue;
            }
        };
        if let Some(other) = spelled.insert(name, key) {
            return Err(ParameterError::Invalid(format!(
                "parameters `{other}` and `{key}` both set `{name}` (keys are case-insensitive); keep one"
            )));
        }
        canonical.insert(name.to_owned(), value.clone());
    }
    Ok(canonical)
}

/// Parse a typed parameter struct from string parameters whose keys are `known` (in
/// any case, [`canonical_keys`]). Reserved keys other than `keep_reserved` are skipped
/// (Kubernetes owns them); every other unknown key is an error that names the key and
/// lists the known ones (serde's `deny_unknown_fields`).
pub fn parse<T: DeserializeOwned>(
    parameters: &BTreeMap<String, String>,
    known: &[&str],
    keep_reserved: &[&str],
) -> Result<T, ParameterError> {
    let object: serde_json::Map<String, serde_json::Value> = canonical_keys(parameters, known)?
        .into_iter()
        .filter(|(k, _)| !k.starts_with(RESERVED_PREFIX) || keep_reserved.contains(&k.as_str()))
        .map(|(k, v)| (k, serde_json::Value::String(v)))
        .collect();
    serde_path_to_error::deserialize(serde_json::Value::Object(object)).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        ParameterError::Invalid(if let Some(unknown) = unknown_field(&inner) {
            let hint = did_you_mean(unknown, known)
                .map(|k| format!(" (did you mean `{k}`?)"))
                .unwrap_or_default();
            format!("invalid StorageClass parameters: unknown parameter `{unknown}`{hint}; {inner}")
        } else if path == "." {
            format!("invalid StorageClass parameters: {inner}")
        } else {
            format!("invalid StorageClass parameter `{path}`: {inner}")
        })
    })
}

/// The key serde's "unknown field `x`, expected …" names.
fn unknown_field(message: &str) -> Option<&str> {
    message.strip_prefix("unknown field `")?.split('`').next()
}

/// The known key closest to `unknown` (case-insensitive edit distance of at most a
/// third of its length, and at most 3), if one is.
pub fn did_you_mean<'a>(unknown: &str, known: &[&'a str]) -> Option<&'a str> {
    let wanted = unknown.to_ascii_lowercase();
    known
        .iter()
        .filter(|k| !k.starts_with(RESERVED_PREFIX))
        .map(|k| (strsim::levenshtein(&wanted, &k.to_ascii_lowercase()), *k))
        .filter(|(distance, _)| *distance <= 3 && *distance * 3 <= unknown.len().max(3))
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, k)| k)
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
pub(crate) enum Syntax {
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
pub(crate) fn substitute(
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
) -> Result<String, ParameterError> {
    substitute(key, template, parameters, Syntax::DollarAndGo, &|_| Ok(()))
        .map_err(ParameterError::Invalid)
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
            let err = render_value("tagSpecification_3", template, &p)
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("tagSpecification_3") && err.contains(needle),
                "{template}: {err}"
            );
        }
        // The `${…}` syntax (NFS paths) keeps Go templates as they are.
        let literal = substitute("subDir", "{{ .PVCNamespace }}", &p, Syntax::Dollar, &|_| {
            Ok(())
        });
        assert_eq!(literal.unwrap(), "{{ .PVCNamespace }}");
    }

    const EXAMPLE_KEYS: &[&str] = &["server", "mountPermissions", "uid"];

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
            EXAMPLE_KEYS,
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
        let err = |pairs: &[(&str, &str)]| {
            parse::<Example>(&params(pairs), EXAMPLE_KEYS, &[])
                .unwrap_err()
                .to_string()
        };
        let e = err(&[("sever", "s")]);
        assert!(
            e.contains("unknown parameter `sever` (did you mean `server`?)"),
            "{e}"
        );
        let e = err(&[("mountPermisions", "0750")]);
        assert!(e.contains("(did you mean `mountPermissions`?)"), "{e}");
        // Nothing close: no guess, the known keys are listed.
        let e = err(&[("color", "blue")]);
        assert!(!e.contains("did you mean") && e.contains("`uid`"), "{e}");
        assert!(err(&[("mountPermissions", "rwx")]).contains("octal"));
        assert!(err(&[("uid", "-1")]).contains("uid"));
    }

    #[test]
    fn keys_are_case_insensitive_and_one_key_is_set_once() {
        let ok: Example = parse(
            &params(&[("SERVER", "s"), ("mountpermissions", "0700")]),
            EXAMPLE_KEYS,
            &[],
        )
        .unwrap();
        assert_eq!(ok.server.as_deref(), Some("s"));
        assert_eq!(ok.mode, Some(0o700));
        let twice = parse::<Example>(
            &params(&[("server", "a"), ("Server", "b")]),
            EXAMPLE_KEYS,
            &[],
        )
        .unwrap_err();
        assert!(
            matches!(&twice, ParameterError::Invalid(m) if m.contains("`Server`") && m.contains("`server`")),
            "{twice}"
        );
        // Reserved keys stay exact: a differently cased one is unknown, not reserved.
        let reserved = canonical_keys(
            &params(&[("CSI.storage.k8s.io/pvc/name", "x")]),
            &[PVC_NAME],
        );
        assert!(
            reserved
                .unwrap()
                .contains_key("CSI.storage.k8s.io/pvc/name")
        );
    }
}
