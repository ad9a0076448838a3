//! Whether one node can restore what CRIU dumps on another: the rule the agent
//! applies before it restores, and the operator before a migration freezes anything.

/// What the rule reads of a node (`NodeInfo` gives it; a checkpoint's manifest keeps
/// its source's).
#[derive(Clone, Copy, Debug)]
pub struct Facts<'a> {
    /// The node's name, for the reason.
    pub name: &'a str,
    /// `uname -r`.
    pub kernel: &'a str,
    /// CRIU's version.
    pub criu_version: &'a str,
    /// `V1` or `V2`.
    pub cgroup_version: &'a str,
    /// `/proc/cpuinfo` flags.
    pub cpu_flags: &'a [String],
}

impl<'a> From<&'a crate::pb::NodeFacts> for Facts<'a> {
    fn from(node: &'a crate::pb::NodeFacts) -> Self {
        Self {
            name: &node.name,
            kernel: &node.kernel,
            criu_version: &node.criu_version,
            cgroup_version: &node.cgroup_version,
            cpu_flags: &node.cpu_flags,
        }
    }
}

/// CPU flags that change what user-space code may run. A process dumped where one of
/// these existed may use it; a node without it would kill the process with SIGILL.
const ISA_FLAG_PREFIXES: [&str; 14] = [
    "sse",
    "ssse",
    "avx",
    "fma",
    "bmi",
    "aes",
    "sha_ni",
    "adx",
    "f16c",
    "popcnt",
    "movbe",
    "vaes",
    "vpclmulqdq",
    "gfni",
];

fn version_pair(text: &str) -> Option<(u32, u32)> {
    let start = text.find(|c: char| c.is_ascii_digit())?;
    let mut parts = text[start..]
        .split(|c: char| !c.is_ascii_digit())
        .filter(|p| !p.is_empty());
    Some((parts.next()?.parse().ok()?, parts.next().unwrap_or("0").parse().ok()?))
}

/// Whether `target` can restore what CRIU dumps on `source`: the same cgroup version,
/// a CRIU and a kernel at least as new, and every ISA extension the source has. The
/// reason names both nodes and what differs.
pub fn check(source: &Facts<'_>, target: &Facts<'_>) -> Result<(), String> {
    if source.cgroup_version != target.cgroup_version {
        return Err(format!(
            "{} runs cgroup {} and {} runs cgroup {}: CRIU restores a process only under the cgroup version it \
             was dumped on",
            source.name, source.cgroup_version, target.name, target.cgroup_version
        ));
    }
    let newer = |what: &str, s: &str, t: &str| match (version_pair(s), version_pair(t)) {
        (Some(sv), Some(tv)) if tv >= sv => Ok(()),
        (Some(_), Some(_)) => Err(format!(
            "{} has {what} {t}, older than {}'s {what} {s}",
            target.name, source.name
        )),
        _ => Err(format!("cannot compare {what} versions {s:?} and {t:?}")),
    };
    newer("CRIU", source.criu_version, target.criu_version)?;
    newer("kernel", source.kernel, target.kernel)?;
    let mut missing: Vec<&str> = source
        .cpu_flags
        .iter()
        .filter(|f| ISA_FLAG_PREFIXES.iter().any(|p| f.starts_with(p)))
        .filter(|f| !target.cpu_flags.contains(f))
        .map(String::as_str)
        .collect();
    missing.sort_unstable();
    if !missing.is_empty() {
        return Err(format!(
            "{} lacks the CPU features {} that {} has",
            target.name,
            missing.join(", "),
            source.name
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn node(criu: &'static str, kernel: &'static str, flags: &[&str]) -> (Facts<'static>, Vec<String>) {
        let facts = Facts {
            name: "node-b",
            kernel,
            criu_version: criu,
            cgroup_version: "V1",
            cpu_flags: &[],
        };
        (facts, flags.iter().map(|f| (*f).to_owned()).collect())
    }

    fn check_with(source: &(Facts<'_>, Vec<String>), target: &(Facts<'_>, Vec<String>)) -> Result<(), String> {
        let (mut s, mut t) = (source.0, target.0);
        s.name = "node-a";
        s.cpu_flags = &source.1;
        t.cpu_flags = &target.1;
        check(&s, &t)
    }

    #[test]
    fn compatibility_names_both_nodes_and_what_differs() {
        let source = node("Version: 4.2.1", "6.1.0-40-amd64", &["fpu", "avx2", "sse4_2"]);
        assert!(check_with(&source, &node("Version: 4.2.1", "6.1.0", &["avx2", "sse4_2", "vmx"])).is_ok());
        let err = check_with(&source, &node("Version: 4.1", "6.1.0", &["avx2", "sse4_2"])).unwrap_err();
        assert_eq!(
            err,
            "node-b has CRIU Version: 4.1, older than node-a's CRIU Version: 4.2.1"
        );
        let err = check_with(&source, &node("4.2", "5.15.0", &["avx2", "sse4_2"])).unwrap_err();
        assert!(err.contains("kernel 6.1.0-40-amd64"), "{err}");
        let err = check_with(&source, &node("4.3", "6.8.0", &["sse4_2"])).unwrap_err();
        assert_eq!(err, "node-b lacks the CPU features avx2 that node-a has");
        let mut v2 = node("4.2.1", "6.1.0", &["avx2", "sse4_2"]);
        v2.0.cgroup_version = "V2";
        let err = check_with(&source, &v2).unwrap_err();
        assert!(
            err.starts_with("node-a runs cgroup V1 and node-b runs cgroup V2"),
            "{err}"
        );
    }
}
