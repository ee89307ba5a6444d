//! Paths as slices of components, each checked before it is sent anywhere, and the
//! check of names a server hands back.

use super::*;

/// Check one path component before it is sent anywhere: not empty, not `.`
/// or `..`, no `/`, no NUL, at most [`MAX_COMPONENT_LEN`] bytes.
pub fn validate_component(component: &str) -> Result<(), NfsError> {
    let reason = if component.is_empty() {
        "is empty"
    } else if component == "." || component == ".." {
        "`.` and `..` are not allowed"
    } else if component.contains('/') {
        "contains `/`"
    } else if component.contains('\0') {
        "contains a NUL byte"
    } else if component.len() > MAX_COMPONENT_LEN {
        "is longer than 255 bytes"
    } else {
        return Ok(());
    };
    Err(NfsError::InvalidName {
        component: component.to_owned(),
        reason,
    })
}

pub(super) fn validate_path(path: &[&str]) -> Result<(), NfsError> {
    path.iter().try_for_each(|c| validate_component(c))
}

/// Validate a path that must name something below the root.
pub(super) fn validate_non_root(path: &[&str]) -> Result<(), NfsError> {
    if path.is_empty() {
        return Err(NfsError::InvalidName {
            component: String::new(),
            reason: "the path is empty (the export root itself can't be used here)",
        });
    }
    validate_path(path)
}

pub(super) fn join(path: &[&str]) -> String {
    path.join("/")
}

/// Is this server-supplied directory entry name usable? `false` for `.`/`..`;
/// an error for names no POSIX directory can hold.
pub(super) fn checked_entry_name(name: &[u8], dir_path: &str) -> Result<bool, NfsError> {
    if name == b"." || name == b".." {
        return Ok(false);
    }
    if name.is_empty() || name.contains(&b'/') || name.contains(&0) {
        return Err(NfsError::Protocol(format!(
            "directory `{dir_path}` lists an invalid entry name {:?}",
            String::from_utf8_lossy(name)
        )));
    }
    Ok(true)
}
