//! Upload-policy areas: which endpoint paths a [`RuleSet`] covers.
//!
//! Paths are byte strings as seen from the protected root, always starting with `/`
//! (`/home/alice/.cache`). A pattern is a glob in which `*`, `?` and `[…]` stay inside one
//! path component, `**` crosses components and `{a,b}` is alternation. A path is in the area
//! when a rule matches it or any folder above it, unless an exception matches it or any
//! folder above it: excluding `/home/*/.cache` excludes everything beneath, and excepting
//! `/home/alice` keeps all of Alice's home, cache included.
//!
//! Macros expand before matching: `%home%` is every user's home folder (`/home/*` and
//! `/root`).
//!
//! The factory rules ([`FACTORY_UNPROTECTED`], added by [`Area::unprotected`]) are beyond
//! exceptions: no policy can protect `/proc` or a cache, so an exception beneath one of
//! them has no effect there.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};

use crate::control::RuleSet;

/// Every user's home folder.
pub const HOME_MACRO: &str = "%home%";
const HOME_EXPANSIONS: [&str; 2] = ["/home/*", "/root"];

/// What no policy can upload: kernel and runtime file systems, temporary files, caches,
/// swap, and the agent's own state (the agent adds its state directory when it lies
/// elsewhere under the protected root).
pub const FACTORY_UNPROTECTED: &[&str] = &[
    "/proc",
    "/sys",
    "/dev",
    "/run",
    "/tmp",
    "/var/tmp",
    "/var/cache",
    "/var/lib/morgana-agent",
    "/lost+found",
    "/swapfile",
    "/swap.img",
    "%home%/.cache",
];

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PolicyError {
    #[error("rule {rule:?} is not usable: {why}")]
    BadRule { rule: String, why: String },
}

/// A compiled [`RuleSet`].
#[derive(Clone, Debug)]
pub struct Area {
    /// Rules no exception lifts (the factory rules).
    forced: GlobSet,
    rules: GlobSet,
    exceptions: GlobSet,
    /// The literal start of each exception pattern (up to its first glob character): a
    /// folder in the area can be skipped whole unless an exception may match beneath it.
    exception_prefixes: Vec<Vec<u8>>,
}

/// Where a path stands, computed from its parent's standing by [`Area::child`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Standing {
    forced_above: bool,
    rule_above: bool,
    exception_above: bool,
}

impl Standing {
    pub fn in_area(self) -> bool {
        self.forced_above || (self.rule_above && !self.exception_above)
    }
}

impl Area {
    pub fn compile(set: &RuleSet) -> Result<Area, PolicyError> {
        Self::compile_with(set, &[])
    }

    /// The unprotected area: the factory rules plus the policy's own.
    pub fn unprotected(set: &RuleSet) -> Result<Area, PolicyError> {
        Self::compile_with(set, FACTORY_UNPROTECTED)
    }

    fn compile_with(set: &RuleSet, forced: &[&str]) -> Result<Area, PolicyError> {
        let mut exception_prefixes = Vec::new();
        for e in &set.exceptions {
            for expanded in expand(e)? {
                let literal_end = expanded
                    .find(['*', '?', '[', '{', '\\'])
                    .unwrap_or(expanded.len());
                exception_prefixes.push(expanded.as_bytes()[..literal_end].to_vec());
            }
        }
        Ok(Area {
            forced: glob_set(forced.iter().copied())?,
            rules: glob_set(set.rules.iter().map(String::as_str))?,
            exceptions: glob_set(set.exceptions.iter().map(String::as_str))?,
            exception_prefixes,
        })
    }

    /// The standing of `path` (whose parent folder has standing `parent`; the root's parent
    /// has the default standing).
    pub fn child(&self, parent: Standing, path: &[u8]) -> Standing {
        let p = OsStr::from_bytes(path);
        Standing {
            forced_above: parent.forced_above || self.forced.is_match(p),
            rule_above: parent.rule_above || self.rules.is_match(p),
            exception_above: parent.exception_above || self.exceptions.is_match(p),
        }
    }

    /// Whether `path` is in the area, looking at it and every folder above it.
    pub fn contains(&self, path: &[u8]) -> bool {
        self.standing(path).in_area()
    }

    /// The standing of the absolute `path`, from every folder above it.
    pub fn standing(&self, path: &[u8]) -> Standing {
        let mut standing = Standing::default();
        for (i, &b) in path.iter().enumerate() {
            if b == b'/' && i > 0 {
                standing = self.child(standing, &path[..i]);
            }
        }
        self.child(standing, path)
    }

    /// Whether everything at and beneath the folder `dir` (with standing `standing`) is in
    /// the area, so a walk can skip it without looking inside.
    pub fn covers_subtree(&self, standing: Standing, dir: &[u8]) -> bool {
        standing.forced_above
            || (standing.in_area()
                && !self.exception_prefixes.iter().any(|prefix| {
                    // An exception may match beneath `dir` if one of them is a prefix of the
                    // other.
                    let n = prefix.len().min(dir.len());
                    prefix[..n] == dir[..n]
                }))
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty() && self.forced.is_empty()
    }
}

fn glob_set<'a>(patterns: impl Iterator<Item = &'a str>) -> Result<GlobSet, PolicyError> {
    let mut builder = GlobSetBuilder::new();
    for pattern in patterns {
        for expanded in expand(pattern)? {
            let glob = GlobBuilder::new(&expanded)
                .literal_separator(true)
                .backslash_escape(true)
                .build()
                .map_err(|e| PolicyError::BadRule {
                    rule: pattern.to_owned(),
                    why: e.kind().to_string(),
                })?;
            builder.add(glob);
        }
    }
    builder.build().map_err(|e| PolicyError::BadRule {
        rule: String::new(),
        why: e.to_string(),
    })
}

/// Checks one pattern and expands its macros.
fn expand(pattern: &str) -> Result<Vec<String>, PolicyError> {
    let bad = |why: &str| PolicyError::BadRule {
        rule: pattern.to_owned(),
        why: why.to_owned(),
    };
    if pattern.contains('\0') {
        return Err(bad("it contains a NUL byte"));
    }
    let trimmed = pattern.trim_end_matches('/');
    if trimmed.is_empty() {
        return Err(bad(
            "it would cover the whole endpoint; name folders such as /var/cache",
        ));
    }
    let expanded: Vec<String> = match trimmed.strip_prefix(HOME_MACRO) {
        Some(rest) => HOME_EXPANSIONS
            .iter()
            .map(|h| format!("{h}{rest}"))
            .collect(),
        None => vec![trimmed.to_owned()],
    };
    for p in &expanded {
        if !p.starts_with('/') {
            return Err(bad(
                "it must start with / (a path from the protected root) or with %home%",
            ));
        }
        if p.contains(HOME_MACRO) {
            return Err(bad("%home% may only start a pattern"));
        }
        if p.split('/').any(|c| c == "." || c == "..") {
            return Err(bad("it contains a . or .. component"));
        }
        if p.contains("//") {
            return Err(bad("it contains an empty component (//)"));
        }
    }
    Ok(expanded)
}

/// Checks every pattern of a rule set, so a policy is refused before it is saved.
pub fn validate(set: &RuleSet) -> Result<(), PolicyError> {
    Area::compile(set).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(rules: &[&str], exceptions: &[&str]) -> RuleSet {
        RuleSet {
            rules: rules.iter().map(|s| s.to_string()).collect(),
            exceptions: exceptions.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn factory_rules_cover_runtime_and_cache_folders() {
        let area = Area::unprotected(&RuleSet::default()).unwrap();
        for p in [
            "/proc",
            "/proc/1/status",
            "/tmp/x",
            "/home/alice/.cache/thumb.png",
            "/root/.cache",
            "/swapfile",
            "/var/lib/morgana-agent/cache.db",
        ] {
            assert!(area.contains(p.as_bytes()), "{p}");
        }
        for p in [
            "/etc/hostname",
            "/home/alice/doc.txt",
            "/procfs",
            "/var/lib/dpkg",
        ] {
            assert!(!area.contains(p.as_bytes()), "{p}");
        }
    }

    #[test]
    fn rules_cover_folders_below_and_exceptions_win() {
        let area = Area::compile(&set(
            &["%home%/Downloads", "/data/**/*.iso"],
            &["/home/bob/Downloads/keep"],
        ))
        .unwrap();
        assert!(area.contains(b"/home/alice/Downloads/a/b.zip"));
        assert!(area.contains(b"/root/Downloads"));
        assert!(!area.contains(b"/home/bob/Downloads/keep/x"));
        assert!(area.contains(b"/home/bob/Downloads/other"));
        assert!(area.contains(b"/data/a/b/c.iso"));
        assert!(!area.contains(b"/data/a/b/c.txt"));
        // `*` stays inside one component.
        assert!(!area.contains(b"/home/a/b/Downloads"));
    }

    #[test]
    fn subtrees_are_skipped_only_when_no_exception_can_reach_inside() {
        let area = Area::compile(&set(&["/home"], &["/home/bob/keep"])).unwrap();
        let home = area.child(Standing::default(), b"/home");
        assert!(home.in_area());
        assert!(!area.covers_subtree(home, b"/home"));
        let alice = area.child(home, b"/home/alice");
        assert!(area.covers_subtree(alice, b"/home/alice"));
        let bob = area.child(home, b"/home/bob");
        assert!(!area.covers_subtree(bob, b"/home/bob"));
        let keep = area.child(bob, b"/home/bob/keep");
        assert!(!keep.in_area());
    }

    #[test]
    fn standing_walk_agrees_with_contains() {
        let area = Area::compile(&set(&["/a/*/c", "/x"], &["/a/b/c/d"])).unwrap();
        let paths = [
            "/a",
            "/a/b",
            "/a/b/c",
            "/a/b/c/d",
            "/a/b/c/d/e",
            "/a/b/c/z",
            "/x/y",
        ];
        let mut standing = Standing::default();
        for p in &paths[..5] {
            standing = area.child(standing, p.as_bytes());
            assert_eq!(standing.in_area(), area.contains(p.as_bytes()), "{p}");
        }
        assert!(area.contains(b"/a/b/c/z"));
        assert!(area.contains(b"/x/y"));
    }

    #[test]
    fn exceptions_do_not_lift_factory_rules() {
        // The appliance sends the factory rules merged into the policy's own.
        let mut rules = vec!["/home".to_string()];
        rules.extend(FACTORY_UNPROTECTED.iter().map(|r| r.to_string()));
        let merged = RuleSet {
            rules,
            exceptions: vec!["/home/alice".into(), "/tmp/keep".into()],
        };
        let area = Area::unprotected(&merged).unwrap();
        assert!(!area.contains(b"/home/alice/doc.txt"));
        assert!(area.contains(b"/home/bob/doc.txt"));
        assert!(area.contains(b"/home/alice/.cache/x"));
        assert!(area.contains(b"/tmp/keep/x"));
        let tmp = area.child(Standing::default(), b"/tmp");
        assert!(area.covers_subtree(tmp, b"/tmp"));
        let home = area.child(Standing::default(), b"/home");
        let alice = area.child(home, b"/home/alice");
        let cache = area.child(alice, b"/home/alice/.cache");
        assert!(!alice.in_area());
        assert!(area.covers_subtree(cache, b"/home/alice/.cache"));
    }

    #[test]
    fn bad_patterns_are_refused_with_the_reason() {
        for (rule, why) in [
            ("home/x", "must start with /"),
            ("/", "whole endpoint"),
            ("/a/../etc", ". or .."),
            ("/a//b", "empty component"),
            ("/a/[b", "unclosed"),
            ("/x%home%", "may only start"),
        ] {
            let err = validate(&set(&[rule], &[])).unwrap_err().to_string();
            assert!(err.contains(rule) && err.contains(why), "{rule}: {err}");
        }
        assert!(validate(&set(&["/ok"], &["relative"])).is_err());
    }
}
