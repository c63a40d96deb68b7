//! Capabilities of a container process: OCI names to the `caps` crate, and the order of
//! operations around the uid switch.

use std::{collections::HashSet, str::FromStr};

use caps::{CapSet, Capability as Cap, CapsHashSet};
use oci_spec::runtime::{Capabilities, LinuxCapabilities};

use super::channel::ChildError;

/// The kernel's capabilities named by an OCI set; ones this kernel/crate does not know are
/// skipped.
pub fn to_caps(set: Option<&Capabilities>) -> CapsHashSet {
    set.into_iter()
        .flatten()
        .filter_map(|c| {
            let name = format!("CAP_{c}");
            Cap::from_str(&name).ok()
        })
        .collect::<HashSet<_>>()
}

fn caps_err(step: &str, e: caps::errors::CapsError) -> ChildError {
    ChildError::new(step, e.to_string())
}

/// Shrinks the bounding set to the spec's. Before the uid switch (needs CAP_SETPCAP).
pub fn drop_bounding(c: &LinuxCapabilities) -> Result<(), ChildError> {
    let keep = to_caps(c.bounding().as_ref());
    // Only what the running kernel knows (newer capabilities than the kernel's are errors).
    for cap in caps::runtime::thread_all_supported() {
        if !keep.contains(&cap) {
            caps::drop(None, CapSet::Bounding, cap)
                .map_err(|e| caps_err(&format!("dropping {cap} from the bounding set"), e))?;
        }
    }
    Ok(())
}

/// Sets inheritable, permitted, effective and ambient after the uid switch (made with
/// PR_SET_KEEPCAPS, so permitted is still full).
pub fn set_sets(c: &LinuxCapabilities) -> Result<(), ChildError> {
    let supported = caps::runtime::thread_all_supported();
    let only = |s: CapsHashSet| -> CapsHashSet { s.intersection(&supported).copied().collect() };
    let inh = only(to_caps(c.inheritable().as_ref()));
    let perm = only(to_caps(c.permitted().as_ref()));
    let eff = only(to_caps(c.effective().as_ref()));
    caps::set(None, CapSet::Inheritable, &inh)
        .map_err(|e| caps_err("setting the inheritable capabilities", e))?;
    // Effective before permitted: capset refuses an effective set outside the permitted one.
    caps::set(None, CapSet::Effective, &eff)
        .map_err(|e| caps_err("setting the effective capabilities", e))?;
    caps::set(None, CapSet::Permitted, &perm)
        .map_err(|e| caps_err("setting the permitted capabilities", e))?;
    caps::clear(None, CapSet::Ambient).map_err(|e| caps_err("clearing the ambient set", e))?;
    for cap in only(to_caps(c.ambient().as_ref())) {
        caps::raise(None, CapSet::Ambient, cap)
            .map_err(|e| caps_err(&format!("raising ambient {cap}"), e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn oci_names_map_to_kernel_caps() {
        let c: LinuxCapabilities = serde_json::from_value(json!({
            "bounding": ["CAP_CHOWN", "CAP_NET_BIND_SERVICE", "CAP_SYS_ADMIN"],
            "effective": ["CAP_KILL"]
        }))
        .unwrap();
        let b = to_caps(c.bounding().as_ref());
        assert_eq!(b.len(), 3);
        assert!(b.contains(&Cap::CAP_NET_BIND_SERVICE));
        assert!(b.contains(&Cap::CAP_SYS_ADMIN));
        assert_eq!(
            to_caps(c.effective().as_ref()),
            [Cap::CAP_KILL].into_iter().collect()
        );
        assert!(to_caps(c.ambient().as_ref()).is_empty());
    }
}
