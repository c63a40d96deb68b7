//! OCI seccomp profiles compiled to BPF with `seccompiler`, in the agent (so problems are
//! typed errors and unknown syscalls are logged), and installed in the container process.
//!
//! A seccompiler filter has one match action, an OCI profile one action per rule. So a
//! profile becomes several filters, which the kernel runs together, taking the most
//! restrictive verdict:
//! - the default filter (unless the default is ALLOW): every syscall the profile names,
//!   with its argument conditions, is allowed; everything else gets the default action;
//! - one filter per other non-ALLOW action: its syscalls get that action, the rest is allowed.

use std::collections::BTreeMap;

use oci_spec::runtime::{
    LinuxSeccomp, LinuxSeccompAction, LinuxSeccompArg, LinuxSeccompFilterFlag, LinuxSeccompOperator,
};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use serde::{Deserialize, Serialize};

use super::spec::SpecError;

#[cfg(target_arch = "x86_64")]
mod table_x86_64;

/// The number of a syscall on this architecture.
pub fn syscall_number(name: &str) -> Option<i64> {
    #[cfg(target_arch = "x86_64")]
    {
        let t = table_x86_64::SYSCALLS;
        t.binary_search_by(|(n, _)| (*n).cmp(name))
            .ok()
            .map(|i| t[i].1)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = name;
        None
    }
}

/// Compiled filters, ready to install in order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Program {
    /// BPF programs as (code, jt, jf, k).
    pub filters: Vec<Vec<(u16, u8, u8, u32)>>,
    /// SECCOMP_FILTER_FLAG_* for seccomp(2).
    pub flags: u32,
}

const FIELD: &str = "spec.linux.seccomp";

fn action(
    field: &str,
    a: LinuxSeccompAction,
    errno: Option<u32>,
) -> Result<SeccompAction, SpecError> {
    Ok(match a {
        LinuxSeccompAction::ScmpActKill | LinuxSeccompAction::ScmpActKillThread => {
            SeccompAction::KillThread
        }
        LinuxSeccompAction::ScmpActKillProcess => SeccompAction::KillProcess,
        LinuxSeccompAction::ScmpActTrap => SeccompAction::Trap,
        LinuxSeccompAction::ScmpActErrno => {
            SeccompAction::Errno(errno.unwrap_or(libc::EPERM as u32))
        }
        LinuxSeccompAction::ScmpActTrace => {
            SeccompAction::Trace(errno.unwrap_or(libc::EPERM as u32))
        }
        LinuxSeccompAction::ScmpActLog => SeccompAction::Log,
        LinuxSeccompAction::ScmpActAllow => SeccompAction::Allow,
        LinuxSeccompAction::ScmpActNotify => {
            return Err(SpecError::new(
                field,
                "SCMP_ACT_NOTIFY (a seccomp agent) is not supported",
            ))
        }
    })
}

fn condition(field: &str, a: &LinuxSeccompArg) -> Result<SeccompCondition, SpecError> {
    let (op, value) = match a.op() {
        LinuxSeccompOperator::ScmpCmpNe => (SeccompCmpOp::Ne, a.value()),
        LinuxSeccompOperator::ScmpCmpLt => (SeccompCmpOp::Lt, a.value()),
        LinuxSeccompOperator::ScmpCmpLe => (SeccompCmpOp::Le, a.value()),
        LinuxSeccompOperator::ScmpCmpEq => (SeccompCmpOp::Eq, a.value()),
        LinuxSeccompOperator::ScmpCmpGe => (SeccompCmpOp::Ge, a.value()),
        LinuxSeccompOperator::ScmpCmpGt => (SeccompCmpOp::Gt, a.value()),
        // value is the mask, valueTwo the expected masked value.
        LinuxSeccompOperator::ScmpCmpMaskedEq => (
            SeccompCmpOp::MaskedEq(a.value()),
            a.value_two().unwrap_or(0),
        ),
    };
    if a.index() > 5 {
        return Err(SpecError::new(
            format!("{field}.index"),
            format!("{} is not a syscall argument index (0..=5)", a.index()),
        ));
    }
    SeccompCondition::new(a.index() as u8, SeccompCmpArgLen::Qword, op, value)
        .map_err(|e| SpecError::new(field, e.to_string()))
}

/// The rules of one syscall entry: all conditions ANDed, or, when an argument index is
/// repeated, one rule per condition (ORed), as libseccomp does. Empty = unconditional.
fn rules(field: &str, args: &[LinuxSeccompArg]) -> Result<Vec<SeccompRule>, SpecError> {
    if args.is_empty() {
        return Ok(Vec::new());
    }
    let conds = args
        .iter()
        .enumerate()
        .map(|(i, a)| condition(&format!("{field}.args[{i}]"), a))
        .collect::<Result<Vec<_>, _>>()?;
    let mut idx: Vec<usize> = args.iter().map(|a| a.index()).collect();
    idx.sort_unstable();
    let repeated = idx.windows(2).any(|w| w[0] == w[1]);
    let groups = if repeated {
        conds.into_iter().map(|c| vec![c]).collect()
    } else {
        vec![conds]
    };
    groups
        .into_iter()
        .map(|g| SeccompRule::new(g).map_err(|e| SpecError::new(field, e.to_string())))
        .collect()
}

type RuleMap = BTreeMap<i64, Option<Vec<SeccompRule>>>;

/// Adds rules for a syscall; None means "unconditional", which absorbs any conditions.
fn add(map: &mut RuleMap, nr: i64, r: Vec<SeccompRule>) {
    let entry = map.entry(nr).or_insert_with(|| Some(Vec::new()));
    match (entry.as_mut(), r.is_empty()) {
        (None, _) => {}
        (Some(_), true) => *entry = None,
        (Some(v), false) => v.extend(r),
    }
}

fn to_filter_rules(map: RuleMap) -> BTreeMap<i64, Vec<SeccompRule>> {
    map.into_iter()
        .map(|(nr, r)| (nr, r.unwrap_or_default()))
        .collect()
}

fn target_arch() -> Result<TargetArch, SpecError> {
    TargetArch::try_from(std::env::consts::ARCH).map_err(|_| {
        SpecError::new(
            FIELD,
            format!("seccomp is not supported on {}", std::env::consts::ARCH),
        )
    })
}

fn build(
    rules: RuleMap,
    mismatch: SeccompAction,
    matched: SeccompAction,
    arch: TargetArch,
) -> Result<Vec<(u16, u8, u8, u32)>, SpecError> {
    let f = SeccompFilter::new(to_filter_rules(rules), mismatch, matched, arch)
        .map_err(|e| SpecError::new(FIELD, e.to_string()))?;
    let prog: BpfProgram = f
        .try_into()
        .map_err(|e: seccompiler::BackendError| SpecError::new(FIELD, e.to_string()))?;
    Ok(prog.iter().map(|i| (i.code, i.jt, i.jf, i.k)).collect())
}

/// Compiles an OCI seccomp profile. Unknown syscall names are skipped (debug log).
pub fn compile(profile: &LinuxSeccomp) -> Result<Program, SpecError> {
    #[cfg(not(target_arch = "x86_64"))]
    return Err(SpecError::new(
        FIELD,
        format!("seccomp is not supported on {}", std::env::consts::ARCH),
    ));
    let arch = target_arch()?;
    let default = action(
        "spec.linux.seccomp.defaultAction",
        profile.default_action(),
        profile.default_errno_ret(),
    )?;
    // Every named syscall (for the default filter), and the syscalls of each other action.
    let mut named = RuleMap::new();
    let mut by_action: BTreeMap<u32, (SeccompAction, RuleMap)> = BTreeMap::new();
    for (i, sc) in profile.syscalls().iter().flatten().enumerate() {
        let field = format!("spec.linux.seccomp.syscalls[{i}]");
        let act = action(&format!("{field}.action"), sc.action(), sc.errno_ret())?;
        let r = rules(&field, sc.args().as_deref().unwrap_or_default())?;
        for name in sc.names() {
            let Some(nr) = syscall_number(name) else {
                tracing::debug!(syscall = %name, "seccomp: unknown syscall, skipped");
                continue;
            };
            add(&mut named, nr, r.clone());
            if act != SeccompAction::Allow {
                let key = u32::from(act.clone());
                let slot = by_action
                    .entry(key)
                    .or_insert_with(|| (act.clone(), RuleMap::new()));
                add(&mut slot.1, nr, r.clone());
            }
        }
    }
    let mut filters = Vec::new();
    if default != SeccompAction::Allow {
        filters.push(build(named, default.clone(), SeccompAction::Allow, arch)?);
    }
    for (_, (act, rules)) in by_action {
        if act == default && rules.values().all(Option::is_none) {
            // Already what the default filter does for them.
            continue;
        }
        filters.push(build(rules, SeccompAction::Allow, act, arch)?);
    }
    let mut flags = 0u32;
    for f in profile.flags().iter().flatten() {
        flags |= match f {
            LinuxSeccompFilterFlag::SeccompFilterFlagLog => libc::SECCOMP_FILTER_FLAG_LOG as u32,
            LinuxSeccompFilterFlag::SeccompFilterFlagSpecAllow => {
                libc::SECCOMP_FILTER_FLAG_SPEC_ALLOW as u32
            }
            // Meaningless for a single-threaded process without a listener.
            LinuxSeccompFilterFlag::SeccompFilterFlagTsync
            | LinuxSeccompFilterFlag::SeccompFilterFlagWaitKillableRecv => 0,
        };
    }
    Ok(Program { filters, flags })
}

/// The filters as the kernel's instructions.
pub fn to_kernel(p: &Program) -> Vec<Vec<libc::sock_filter>> {
    p.filters
        .iter()
        .map(|f| {
            f.iter()
                .map(|&(code, jt, jf, k)| libc::sock_filter { code, jt, jf, k })
                .collect()
        })
        .collect()
}

/// Installs the filters in the calling process. The caller has set no_new_privs or has
/// CAP_SYS_ADMIN.
pub fn apply(p: &Program) -> Result<(), std::io::Error> {
    install(&to_kernel(p), p.flags)
}

/// Installs filters with seccomp(2); allocates nothing (safe after fork).
pub fn install(filters: &[Vec<libc::sock_filter>], flags: u32) -> Result<(), std::io::Error> {
    for insns in filters {
        let prog = libc::sock_fprog {
            len: insns.len() as u16,
            filter: insns.as_ptr() as *mut libc::sock_filter,
        };
        // SAFETY: `prog` points at `insns`, which outlives the call; the kernel copies the
        // program and keeps no pointer to it.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_SET_MODE_FILTER,
                flags as libc::c_ulong,
                &prog as *const libc::sock_fprog,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn profile(v: serde_json::Value) -> LinuxSeccomp {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn syscall_names_resolve() {
        assert_eq!(syscall_number("read"), Some(0));
        assert_eq!(syscall_number("write"), Some(1));
        assert_eq!(syscall_number("mkdirat"), Some(258));
        assert_eq!(syscall_number("_sysctl"), Some(156));
        assert_eq!(syscall_number("no_such_call"), None);
        let t = table_x86_64::SYSCALLS;
        assert!(t.windows(2).all(|w| w[0].0 < w[1].0), "table sorted");
    }

    #[test]
    fn allow_list_is_one_filter() {
        let p = compile(&profile(json!({
            "defaultAction": "SCMP_ACT_ERRNO",
            "syscalls": [{"names": ["read", "write", "no_such_call"], "action": "SCMP_ACT_ALLOW"}]
        })))
        .unwrap();
        assert_eq!(p.filters.len(), 1);
        assert_eq!(p.flags, 0);
        // The default action is ERRNO(EPERM) somewhere in the program.
        let errno = 0x0005_0000 | libc::EPERM as u32;
        assert!(p.filters[0].iter().any(|i| i.3 == errno));
    }

    #[test]
    fn deny_list_with_default_allow() {
        let p = compile(&profile(json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [
                {"names": ["mkdirat", "mkdir"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38},
                {"names": ["reboot"], "action": "SCMP_ACT_KILL_PROCESS"}
            ],
            "flags": ["SECCOMP_FILTER_FLAG_LOG"]
        })))
        .unwrap();
        assert_eq!(p.filters.len(), 2);
        assert_eq!(p.flags, libc::SECCOMP_FILTER_FLAG_LOG as u32);
        assert!(p
            .filters
            .iter()
            .any(|f| f.iter().any(|i| i.3 == 0x0005_0000 | 38)));
        assert!(p
            .filters
            .iter()
            .any(|f| f.iter().any(|i| i.3 == 0x8000_0000)));
    }

    #[test]
    fn args_become_conditions() {
        let p = compile(&profile(json!({
            "defaultAction": "SCMP_ACT_ERRNO",
            "syscalls": [
                {"names": ["personality"], "action": "SCMP_ACT_ALLOW",
                 "args": [{"index": 0, "value": 0, "op": "SCMP_CMP_EQ"}]},
                {"names": ["clone"], "action": "SCMP_ACT_ALLOW",
                 "args": [{"index": 0, "value": 2114060288, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}]}
            ]
        })))
        .unwrap();
        assert_eq!(p.filters.len(), 1);
        let e = compile(&profile(json!({
            "defaultAction": "SCMP_ACT_ERRNO",
            "syscalls": [{"names": ["read"], "action": "SCMP_ACT_ALLOW",
                          "args": [{"index": 9, "value": 0, "op": "SCMP_CMP_EQ"}]}]
        })))
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "spec.linux.seccomp.syscalls[0].args[0].index: 9 is not a syscall argument index (0..=5)"
        );
    }

    #[test]
    fn notify_is_rejected_with_the_field() {
        let e = compile(&profile(json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [{"names": ["read"], "action": "SCMP_ACT_ALLOW"},
                         {"names": ["mount"], "action": "SCMP_ACT_NOTIFY"}]
        })))
        .unwrap_err();
        assert!(e
            .to_string()
            .starts_with("spec.linux.seccomp.syscalls[1].action: SCMP_ACT_NOTIFY"));
    }

    #[test]
    fn default_allow_without_rules_is_no_filter() {
        let p = compile(&profile(json!({"defaultAction": "SCMP_ACT_ALLOW"}))).unwrap();
        assert!(p.filters.is_empty());
    }

    #[test]
    fn a_filter_really_blocks() {
        // Install in a forked child: mkdirat fails with ENOSYS, everything else works.
        let p = compile(&profile(json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [{"names": ["mkdirat", "mkdir"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38}]
        })))
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let target = std::ffi::CString::new(dir.path().join("x").to_str().unwrap()).unwrap();
        let filters = to_kernel(&p);
        // SAFETY: the child only makes raw syscalls (prctl, seccomp, mkdir), allocates nothing
        // and _exits.
        match unsafe { nix::unistd::fork() }.unwrap() {
            nix::unistd::ForkResult::Child => {
                // SAFETY: prctl with integer arguments.
                unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
                let code = if install(&filters, p.flags).is_err() {
                    1
                } else {
                    // SAFETY: `target` is a valid C string.
                    let rc = unsafe { libc::mkdir(target.as_ptr(), 0o755) };
                    let errno = std::io::Error::last_os_error().raw_os_error();
                    if rc == -1 && errno == Some(libc::ENOSYS) {
                        0
                    } else {
                        2
                    }
                };
                // SAFETY: _exit is async-signal-safe and ends the forked child.
                unsafe { libc::_exit(code) };
            }
            nix::unistd::ForkResult::Parent { child } => {
                let st = nix::sys::wait::waitpid(child, None).unwrap();
                assert_eq!(st, nix::sys::wait::WaitStatus::Exited(child, 0));
                assert!(!dir.path().join("x").exists());
            }
        }
    }
}
