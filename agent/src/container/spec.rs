//! Validation of an OCI runtime spec before anything is created.
//!
//! Every error names the offending field the way it is spelled in `config.json`
//! (`spec.process.args`, `spec.mounts[2].destination`, ...), so the runtime can show
//! the user what to fix.

use std::{collections::HashSet, path::Path};

use oci_spec::runtime::{LinuxNamespaceType, Process, Spec};

/// A spec (or an exec'd process) that the engine cannot run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct SpecError {
    /// The field, e.g. `spec.process.args`.
    pub field: String,
    /// What is wrong with it.
    pub problem: String,
}

impl SpecError {
    pub fn new(field: impl Into<String>, problem: impl Into<String>) -> Self {
        SpecError {
            field: field.into(),
            problem: problem.into(),
        }
    }
}

fn absolute(field: impl Into<String>, p: &Path) -> Result<(), SpecError> {
    if p.is_absolute() {
        Ok(())
    } else {
        Err(SpecError::new(
            field,
            format!("must be an absolute path, got {p:?}"),
        ))
    }
}

/// Checks a spec for everything the engine relies on. Does not touch the system.
pub fn validate(spec: &Spec) -> Result<(), SpecError> {
    let process = spec
        .process()
        .as_ref()
        .ok_or_else(|| SpecError::new("spec.process", "missing"))?;
    validate_process("spec.process", process)?;

    for (i, m) in spec.mounts().iter().flatten().enumerate() {
        absolute(format!("spec.mounts[{i}].destination"), m.destination())?;
        if m.typ().as_deref() == Some("bind") || is_bind(m.options().as_deref()) {
            match m.source() {
                Some(s) if s.is_absolute() => {}
                Some(s) => {
                    return Err(SpecError::new(
                        format!("spec.mounts[{i}].source"),
                        format!("a bind mount's source must be an absolute path, got {s:?}"),
                    ))
                }
                None => {
                    return Err(SpecError::new(
                        format!("spec.mounts[{i}].source"),
                        "a bind mount needs a source",
                    ))
                }
            }
        }
        if let Some(opts) = m.options() {
            for o in opts {
                if o.contains(',') {
                    return Err(SpecError::new(
                        format!("spec.mounts[{i}].options"),
                        format!("option {o:?} contains a comma; give one option per entry"),
                    ));
                }
            }
        }
    }

    let linux = spec.linux().as_ref();
    let mut seen = HashSet::new();
    let mut has_mnt = false;
    let mut has_uts = false;
    for (i, ns) in linux
        .and_then(|l| l.namespaces().as_ref())
        .into_iter()
        .flatten()
        .enumerate()
    {
        let field = format!("spec.linux.namespaces[{i}]");
        if !seen.insert(ns.typ()) {
            return Err(SpecError::new(
                field,
                format!("namespace {} is listed twice", ns.typ()),
            ));
        }
        match ns.typ() {
            LinuxNamespaceType::User => {
                return Err(SpecError::new(
                    field,
                    "user namespaces are not supported (the microVM is the isolation boundary)",
                ))
            }
            LinuxNamespaceType::Time => {
                return Err(SpecError::new(field, "time namespaces are not supported"))
            }
            LinuxNamespaceType::Mount => {
                if ns.path().is_some() {
                    return Err(SpecError::new(
                        format!("{field}.path"),
                        "joining an existing mount namespace is not supported",
                    ));
                }
                has_mnt = true;
            }
            LinuxNamespaceType::Uts => has_uts = ns.path().is_none() || has_uts,
            _ => {}
        }
        if let Some(p) = ns.path() {
            absolute(format!("{field}.path"), p)?;
        }
    }
    if !has_mnt {
        return Err(SpecError::new(
            "spec.linux.namespaces",
            "a mount namespace is required",
        ));
    }
    if spec.hostname().as_deref().is_some_and(|h| !h.is_empty()) && !has_uts {
        return Err(SpecError::new(
            "spec.hostname",
            "setting a hostname needs a new uts namespace in spec.linux.namespaces",
        ));
    }
    if spec.domainname().as_deref().is_some_and(|h| !h.is_empty()) && !has_uts {
        return Err(SpecError::new(
            "spec.domainname",
            "setting a domainname needs a new uts namespace in spec.linux.namespaces",
        ));
    }
    if let Some(h) = spec.hostname() {
        if h.len() > 64 {
            return Err(SpecError::new("spec.hostname", "longer than 64 bytes"));
        }
    }

    if let Some(linux) = linux {
        for (i, d) in linux.devices().iter().flatten().enumerate() {
            absolute(format!("spec.linux.devices[{i}].path"), d.path())?;
        }
        for (i, p) in linux.masked_paths().iter().flatten().enumerate() {
            absolute(format!("spec.linux.maskedPaths[{i}]"), Path::new(p))?;
        }
        for (i, p) in linux.readonly_paths().iter().flatten().enumerate() {
            absolute(format!("spec.linux.readonlyPaths[{i}]"), Path::new(p))?;
        }
        for key in linux.sysctl().iter().flat_map(|m| m.keys()) {
            if key.is_empty() || key.contains("..") || key.starts_with(['/', '.']) {
                return Err(SpecError::new(
                    format!("spec.linux.sysctl[{key:?}]"),
                    "not a valid sysctl name",
                ));
            }
        }
        if let Some(p) = linux.rootfs_propagation() {
            if !matches!(
                p.as_str(),
                "" | "private"
                    | "rprivate"
                    | "slave"
                    | "rslave"
                    | "shared"
                    | "rshared"
                    | "unbindable"
                    | "runbindable"
            ) {
                return Err(SpecError::new(
                    "spec.linux.rootfsPropagation",
                    format!("unknown propagation {p:?}"),
                ));
            }
        }
        if linux.uid_mappings().as_ref().is_some_and(|m| !m.is_empty())
            || linux.gid_mappings().as_ref().is_some_and(|m| !m.is_empty())
        {
            return Err(SpecError::new(
                "spec.linux.uidMappings",
                "id mappings need a user namespace, which is not supported",
            ));
        }
    }
    Ok(())
}

/// Checks a process (the container's, or one to exec); `field` is its path in the spec.
pub fn validate_process(field: &str, p: &Process) -> Result<(), SpecError> {
    match p.args() {
        Some(a) if !a.is_empty() && !a[0].is_empty() => {}
        _ => return Err(SpecError::new(format!("{field}.args"), "must not be empty")),
    }
    for (i, a) in p.args().iter().flatten().enumerate() {
        if a.contains('\0') {
            return Err(SpecError::new(
                format!("{field}.args[{i}]"),
                "contains a NUL byte",
            ));
        }
    }
    absolute(format!("{field}.cwd"), p.cwd())?;
    for (i, e) in p.env().iter().flatten().enumerate() {
        if e.contains('\0') {
            return Err(SpecError::new(
                format!("{field}.env[{i}]"),
                "contains a NUL byte",
            ));
        }
        match e.split_once('=') {
            Some((k, _)) if !k.is_empty() => {}
            _ => {
                return Err(SpecError::new(
                    format!("{field}.env[{i}]"),
                    format!("{e:?} is not of the form KEY=VALUE"),
                ))
            }
        }
    }
    let mut seen = HashSet::new();
    for (i, r) in p.rlimits().iter().flatten().enumerate() {
        if r.soft() > r.hard() {
            return Err(SpecError::new(
                format!("{field}.rlimits[{i}]"),
                format!(
                    "soft limit {} is above the hard limit {}",
                    r.soft(),
                    r.hard()
                ),
            ));
        }
        if !seen.insert(r.typ().to_string()) {
            return Err(SpecError::new(
                format!("{field}.rlimits[{i}]"),
                format!("{} is set twice", r.typ()),
            ));
        }
    }
    if let Some(adj) = p.oom_score_adj() {
        if !(-1000..=1000).contains(&adj) {
            return Err(SpecError::new(
                format!("{field}.oomScoreAdj"),
                format!("{adj} is outside -1000..=1000"),
            ));
        }
    }
    Ok(())
}

fn is_bind(options: Option<&[String]>) -> bool {
    options
        .unwrap_or_default()
        .iter()
        .any(|o| o == "bind" || o == "rbind")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn base() -> serde_json::Value {
        json!({
            "ociVersion": "1.0.2",
            "process": {"args": ["sh"], "cwd": "/", "user": {"uid": 0, "gid": 0},
                        "env": ["PATH=/bin"]},
            "root": {"path": "rootfs"},
            "hostname": "box",
            "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"}],
            "linux": {"namespaces": [{"type": "pid"}, {"type": "mount"}, {"type": "uts"}]}
        })
    }

    fn check(v: serde_json::Value) -> Result<(), SpecError> {
        let spec: Spec = serde_json::from_value(v).unwrap();
        validate(&spec)
    }

    fn err(v: serde_json::Value) -> String {
        check(v).unwrap_err().to_string()
    }

    #[test]
    fn a_plain_spec_is_fine() {
        check(base()).unwrap();
    }

    #[test]
    fn process_is_required() {
        let mut v = base();
        v.as_object_mut().unwrap().remove("process");
        assert_eq!(err(v), "spec.process: missing");
    }

    #[test]
    fn args_must_not_be_empty() {
        let mut v = base();
        v["process"]["args"] = json!([]);
        assert_eq!(err(v), "spec.process.args: must not be empty");
        let mut v = base();
        v["process"].as_object_mut().unwrap().remove("args");
        assert_eq!(err(v), "spec.process.args: must not be empty");
    }

    #[test]
    fn cwd_must_be_absolute() {
        let mut v = base();
        v["process"]["cwd"] = json!("tmp");
        assert!(err(v).starts_with("spec.process.cwd: must be an absolute path"));
    }

    #[test]
    fn env_must_be_key_value() {
        let mut v = base();
        v["process"]["env"] = json!(["A=1", "oops"]);
        assert_eq!(
            err(v),
            "spec.process.env[1]: \"oops\" is not of the form KEY=VALUE"
        );
    }

    #[test]
    fn mount_destination_must_be_absolute() {
        let mut v = base();
        v["mounts"] = json!([{"destination": "/proc", "type": "proc"},
                             {"destination": "data", "type": "tmpfs"}]);
        assert!(err(v).starts_with("spec.mounts[1].destination: must be an absolute path"));
    }

    #[test]
    fn bind_mount_needs_absolute_source() {
        let mut v = base();
        v["mounts"] =
            json!([{"destination": "/x", "type": "bind", "source": "rel", "options": ["rbind"]}]);
        assert!(err(v).starts_with("spec.mounts[0].source:"));
        let mut v = base();
        v["mounts"] = json!([{"destination": "/x", "options": ["bind"]}]);
        assert_eq!(err(v), "spec.mounts[0].source: a bind mount needs a source");
    }

    #[test]
    fn namespaces() {
        let mut v = base();
        v["linux"]["namespaces"] = json!([{"type": "pid"}, {"type": "uts"}]);
        assert_eq!(
            err(v),
            "spec.linux.namespaces: a mount namespace is required"
        );
        let mut v = base();
        v["linux"]["namespaces"] = json!([{"type": "mount"}, {"type": "user"}]);
        assert!(err(v).starts_with("spec.linux.namespaces[1]: user namespaces are not supported"));
        let mut v = base();
        v["linux"]["namespaces"] = json!([{"type": "mount"}, {"type": "pid"}, {"type": "pid"}]);
        assert_eq!(
            err(v),
            "spec.linux.namespaces[2]: namespace pid is listed twice"
        );
        let mut v = base();
        v["linux"]["namespaces"] = json!([{"type": "mount"}, {"type": "network", "path": "netns"}]);
        assert!(err(v).starts_with("spec.linux.namespaces[1].path: must be an absolute path"));
    }

    #[test]
    fn hostname_needs_uts() {
        let mut v = base();
        v["linux"]["namespaces"] = json!([{"type": "mount"}]);
        assert!(err(v).starts_with("spec.hostname: setting a hostname needs a new uts namespace"));
    }

    #[test]
    fn rlimits() {
        let mut v = base();
        v["process"]["rlimits"] = json!([{"type": "RLIMIT_NOFILE", "soft": 10, "hard": 5}]);
        assert_eq!(
            err(v),
            "spec.process.rlimits[0]: soft limit 10 is above the hard limit 5"
        );
    }

    #[test]
    fn oom_score_adj_range() {
        let mut v = base();
        v["process"]["oomScoreAdj"] = json!(2000);
        assert_eq!(
            err(v),
            "spec.process.oomScoreAdj: 2000 is outside -1000..=1000"
        );
    }

    #[test]
    fn masked_paths_absolute() {
        let mut v = base();
        v["linux"]["maskedPaths"] = json!(["/proc/kcore", "sys"]);
        assert!(err(v).starts_with("spec.linux.maskedPaths[1]: must be an absolute path"));
    }

    #[test]
    fn id_mappings_rejected() {
        let mut v = base();
        v["linux"]["uidMappings"] = json!([{"containerID": 0, "hostID": 1000, "size": 1}]);
        assert!(err(v).starts_with("spec.linux.uidMappings:"));
    }
}
