//! A device's image as layers make it: base ⊕ app layers, as a flat map of paths, and back
//! to trees. The appliance's dry run and the agent's apply compute the same target with
//! these functions, so what the dry run promises is what the apply writes.
//!
//! Paths are absolute as seen from the protected root (`/usr/bin/curl`); the root itself
//! has no entry. A directory's entry carries its metadata; its `content` is rebuilt by
//! [`build`].

use std::collections::{BTreeMap, HashMap};

use crate::Id;
use crate::tree::{Content, Entry, Kind, Tree};

/// Every entry below a root, by absolute path.
pub type Flat = BTreeMap<Vec<u8>, Entry>;

/// `path` joined with a child name.
pub fn child_path(dir: &[u8], name: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(dir.len() + 1 + name.len());
    p.extend_from_slice(dir);
    p.push(b'/');
    p.extend_from_slice(name);
    p
}

/// Whether `path` is `top` or below it.
pub fn is_within(path: &[u8], top: &[u8]) -> bool {
    path.starts_with(top) && (path.len() == top.len() || path[top.len()] == b'/')
}

/// Removes `path` and everything below it.
pub fn remove_under(flat: &mut Flat, path: &[u8]) {
    let below: Vec<Vec<u8>> = flat
        .range(path.to_vec()..)
        .take_while(|(p, _)| p.starts_with(path))
        .filter(|(p, _)| is_within(p, path))
        .map(|(p, _)| p.clone())
        .collect();
    for p in below {
        flat.remove(&p);
    }
}

/// Lays an app layer over `image`: its removed paths go first, then its entries replace or
/// join what is there. A path whose kind changes loses what was below it.
pub fn overlay(image: &mut Flat, layer: Flat, deletions: &[Vec<u8>]) {
    for d in deletions {
        remove_under(image, d);
    }
    for (path, entry) in layer {
        if let Some(old) = image.get(&path)
            && old.kind != entry.kind
        {
            remove_under(image, &path);
        }
        image.insert(path, entry);
    }
}

/// The image a set of layers makes: the base with each app layer laid over it in order,
/// without the do-not-override paths; with those of them the layers have.
pub fn target(
    base: Flat,
    apps: Vec<(Flat, &[Vec<u8>])>,
    do_not_override: &[Vec<u8>],
) -> (Flat, Vec<Vec<u8>>) {
    let mut image = base;
    for (app, deletions) in apps {
        overlay(&mut image, app, deletions);
    }
    let mut kept = Vec::new();
    for p in do_not_override {
        if image.contains_key(p) {
            kept.push(p.clone());
        }
        remove_under(&mut image, p);
    }
    (image, kept)
}

/// Trees for `flat`: the root's id and every tree (new or not) by id. Entries whose parent
/// is missing or not a directory are left out (an overlay cannot place them).
pub fn build(flat: &Flat) -> (Id, HashMap<Id, Tree>) {
    let mut children: HashMap<&[u8], Vec<&Vec<u8>>> = HashMap::new();
    for path in flat.keys() {
        let parent = match path.iter().rposition(|&c| c == b'/') {
            Some(i) => &path[..i],
            None => continue,
        };
        children.entry(parent).or_default().push(path);
    }
    let mut trees = HashMap::new();
    let root = build_dir(flat, &children, b"", &mut trees);
    (root, trees)
}

fn build_dir(
    flat: &Flat,
    children: &HashMap<&[u8], Vec<&Vec<u8>>>,
    dir: &[u8],
    trees: &mut HashMap<Id, Tree>,
) -> Id {
    let mut tree = Tree::default();
    for path in children.get(dir).into_iter().flatten() {
        let mut entry = flat[*path].clone();
        if entry.kind == Some(Kind::Dir) {
            entry.content = Content::Tree(build_dir(flat, children, path, trees));
        }
        tree.entries.push(entry);
    }
    tree.sort();
    let (id, _) = tree.seal();
    trees.insert(id, tree);
    id
}

/// Whether two entries hold the same thing at a path (content, kind, target, mode and
/// owner), ignoring times: what "changed" means to a dry run.
pub fn same_content(a: &Entry, b: &Entry) -> bool {
    a.kind == b.kind
        && a.mode == b.mode
        && a.uid == b.uid
        && a.gid == b.gid
        && a.symlink_target == b.symlink_target
        && (a.kind == Some(Kind::Dir) || (a.size == b.size && a.content == b.content))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(name: &str, data: &[u8]) -> Entry {
        Entry {
            name: name.as_bytes().to_vec(),
            kind: Some(Kind::File),
            mode: 0o644,
            size: data.len() as u64,
            content: Content::Inline(data.to_vec()),
            ..Entry::default()
        }
    }

    fn dir(name: &str) -> Entry {
        Entry {
            name: name.as_bytes().to_vec(),
            kind: Some(Kind::Dir),
            mode: 0o755,
            ..Entry::default()
        }
    }

    fn flat(entries: &[(&str, Entry)]) -> Flat {
        entries
            .iter()
            .map(|(p, e)| (p.as_bytes().to_vec(), e.clone()))
            .collect()
    }

    #[test]
    fn overlay_replaces_adds_and_removes() {
        let mut image = flat(&[
            ("/etc", dir("etc")),
            ("/etc/a", file("a", b"base")),
            ("/opt", dir("opt")),
            ("/opt/old", dir("old")),
            ("/opt/old/x", file("x", b"x")),
        ]);
        let app = flat(&[
            ("/etc", dir("etc")),
            ("/etc/a", file("a", b"app")),
            ("/etc/b", file("b", b"new")),
            ("/opt", dir("opt")),
            ("/opt/old", file("old", b"now a file")),
        ]);
        overlay(&mut image, app, &[b"/etc/gone".to_vec()]);
        let paths: Vec<&[u8]> = image.keys().map(|k| k.as_slice()).collect();
        assert_eq!(
            paths,
            [&b"/etc"[..], b"/etc/a", b"/etc/b", b"/opt", b"/opt/old"]
        );
        assert_eq!(
            image[&b"/etc/a".to_vec()].content,
            Content::Inline(b"app".to_vec())
        );
        overlay(&mut image, Flat::new(), &[b"/etc".to_vec()]);
        assert_eq!(image.len(), 2);
    }

    #[test]
    fn build_makes_the_trees_a_scan_would() {
        let image = flat(&[
            ("/etc", dir("etc")),
            ("/etc/a", file("a", b"1")),
            ("/etc/sub", dir("sub")),
            ("/etc/sub/b", file("b", b"2")),
            ("/z", file("z", b"3")),
            ("/orphan/x", file("x", b"no parent")),
        ]);
        let (root, trees) = build(&image);
        let top = &trees[&root];
        let names: Vec<&[u8]> = top.entries.iter().map(|e| e.name.as_slice()).collect();
        assert_eq!(names, [&b"etc"[..], b"z"]);
        let Content::Tree(etc) = top.entries[0].content else {
            panic!("etc is a directory")
        };
        assert_eq!(trees[&etc].entries.len(), 2);
        // The same image builds the same ids.
        assert_eq!(build(&image).0, root);
    }
}
