//! What every process of an image run by walt's runtime shows in its `/proc/PID/status`: the bounds the
//! runtime put on it before `execve`.

/// Docker's default capability set (14), the bounding and effective set of every image process.
pub const BOUNDED_CAPS: &str = "00000000a80425fb";

/// Checks the `CapBnd`, `CapEff`, `CapAmb`, `NoNewPrivs` and `Seccomp` lines of a `/proc/PID/status` text
/// (of `whose`, for the message): the bounded set, no ambient capability, `no_new_privs` and a seccomp
/// filter (mode 2).
pub fn assert_bounded(status: &str, whose: &str) {
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
            .map_or_else(|| panic!("no {name} line for {whose} in:\n{status}"), str::trim)
    };
    for (name, expected) in [
        ("CapBnd", BOUNDED_CAPS),
        ("CapEff", BOUNDED_CAPS),
        ("CapAmb", "0000000000000000"),
        ("NoNewPrivs", "1"),
        ("Seccomp", "2"),
    ] {
        assert_eq!(field(name), expected, "{whose}'s {name}:\n{status}");
    }
}
