//! Permissions on edges of the graph, the way QEMU's block layer defines them.
//!
//! Every edge (a parent node's child, an export, a job) states what it needs from the node it
//! points at ([`Perm`] "perm") and what it lets every other user of that node do ("shared"). A
//! node's needs are the union of its parents' perms; what it may let others do is the
//! intersection of their shared sets. Two parents conflict when one needs what the other does
//! not share. A node passes needs on to its children according to the child's [`Role`]: a
//! format's `file` child needs write and resize when the format is writable, a backing child
//! only ever needs reads. At the leaves, host files hold QEMU-compatible lock bytes for the
//! union, so other processes see the same picture (see `drivers::lock`).

use std::fmt;

/// A set of permissions (QEMU's bit values).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Perm(u8);

impl Perm {
    /// Nothing.
    pub const NONE: Perm = Perm(0);
    /// Reads return what was last written (a format needs it on its metadata).
    pub const CONSISTENT_READ: Perm = Perm(0x1);
    /// Writes that change what reads return.
    pub const WRITE: Perm = Perm(0x2);
    /// Writes of data that is already there (copy-on-read, a mirror's target in sync).
    pub const WRITE_UNCHANGED: Perm = Perm(0x4);
    /// Changing the size.
    pub const RESIZE: Perm = Perm(0x8);
    /// Changing the graph below (not a lock byte; QEMU dropped it from its locks).
    pub const GRAPH_MOD: Perm = Perm(0x10);
    /// Everything.
    pub const ALL: Perm = Perm(0x1f);
    /// What a pass-through edge forwards unchanged.
    pub const PASSTHROUGH: Perm = Perm(0x0f);

    /// The raw bits.
    pub const fn bits(self) -> u8 {
        self.0
    }

    /// From raw bits (unknown bits dropped).
    pub const fn from_bits(bits: u8) -> Perm {
        Perm(bits & Perm::ALL.0)
    }

    /// Every bit of `other` is in `self`.
    pub const fn contains(self, other: Perm) -> bool {
        self.0 & other.0 == other.0
    }

    /// Any bit in common.
    pub const fn intersects(self, other: Perm) -> bool {
        self.0 & other.0 != 0
    }

    /// Empty?
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The names, joined the way QEMU lists them ("write, resize").
    pub fn names(self) -> String {
        const NAMES: [&str; 5] = [
            "consistent read",
            "write",
            "write unchanged",
            "resize",
            "change children",
        ];
        NAMES
            .iter()
            .enumerate()
            .filter(|(i, _)| self.0 & (1 << i) != 0)
            .map(|(_, n)| *n)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl std::ops::BitOr for Perm {
    type Output = Perm;
    fn bitor(self, o: Perm) -> Perm {
        Perm(self.0 | o.0)
    }
}

impl std::ops::BitOrAssign for Perm {
    fn bitor_assign(&mut self, o: Perm) {
        self.0 |= o.0;
    }
}

impl std::ops::BitAnd for Perm {
    type Output = Perm;
    fn bitand(self, o: Perm) -> Perm {
        Perm(self.0 & o.0)
    }
}

impl std::ops::BitAndAssign for Perm {
    fn bitand_assign(&mut self, o: Perm) {
        self.0 &= o.0;
    }
}

impl std::ops::Not for Perm {
    type Output = Perm;
    fn not(self) -> Perm {
        Perm(!self.0 & Perm::ALL.0)
    }
}

impl fmt::Debug for Perm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Perm({})", self.names())
    }
}

/// What a child edge is for; decides how a parent's needs pass down (QEMU's child roles).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A format's image file: data and metadata (qcow2's `file`).
    Storage,
    /// Data only, no metadata (raw with an offset or size window).
    Data,
    /// A filter's child: needs pass through unchanged (raw over the whole file, blkdebug, ...).
    Filtered,
    /// A backing file: reads only.
    Backing,
    /// copy-before-write's `file` (the source): a filter's child, but once the filter has any
    /// parent it reads it consistently and lets nobody else write or resize it (the old data
    /// must be copied before it changes; QEMU's `cbw_child_perm`).
    CbwSource,
    /// copy-before-write's `target`: written whatever the parents do; others may do all but
    /// resize (the size is checked once, at open).
    CbwTarget,
    /// A child reached only through a side API (snapshot-access over copy-before-write): takes
    /// nothing, shares everything.
    Unused,
}

impl Role {
    /// The role a child named `name` has by default (drivers may say otherwise).
    pub fn for_child(name: &str) -> Role {
        match name {
            "file" => Role::Storage,
            "backing" => Role::Backing,
            _ => Role::Filtered,
        }
    }
}

/// A parent's cumulative needs on a node: (perm, shared).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Needs {
    /// Union of the parents' perms.
    pub perm: Perm,
    /// Intersection of the parents' shared sets.
    pub shared: Perm,
}

impl Default for Needs {
    fn default() -> Needs {
        Needs {
            perm: Perm::NONE,
            shared: Perm::ALL,
        }
    }
}

impl Needs {
    /// Add one edge's needs.
    pub fn add(&mut self, perm: Perm, shared: Perm) {
        self.perm |= perm;
        self.shared &= shared;
    }
}

/// What a node whose own parents need `parent` asks from a child in `role`. `writable`: the
/// node itself is read-write (a format may then write metadata even when nobody above writes).
/// `has_parents`: the node has at least one parent edge or user, whatever it needs.
pub fn child_needs(role: Role, writable: bool, has_parents: bool, parent: Needs) -> Needs {
    // Filters forward the passthrough permissions and share what their parents share.
    let mut perm = parent.perm & Perm::PASSTHROUGH;
    let mut shared = (parent.shared & Perm::PASSTHROUGH) | (Perm::ALL & !Perm::PASSTHROUGH);
    match role {
        Role::Filtered => {}
        Role::CbwSource => {
            if has_parents {
                perm |= Perm::CONSISTENT_READ;
                shared &= !(Perm::WRITE | Perm::RESIZE);
            }
        }
        Role::CbwTarget => {
            perm = Perm::WRITE;
            shared = Perm::ALL & !Perm::RESIZE;
        }
        Role::Unused => {
            perm = Perm::NONE;
            shared = Perm::ALL;
        }
        Role::Backing => {
            perm &= Perm::CONSISTENT_READ;
            shared = if parent.shared.contains(Perm::WRITE) {
                Perm::WRITE | Perm::RESIZE
            } else {
                Perm::NONE
            };
            shared |= Perm::CONSISTENT_READ | Perm::GRAPH_MOD | Perm::WRITE_UNCHANGED;
        }
        Role::Storage | Role::Data => {
            if role == Role::Storage {
                // Metadata: written whenever the format is writable, always read consistently,
                // and nobody else may change it under the format.
                if writable {
                    perm |= Perm::WRITE | Perm::RESIZE;
                }
                perm |= Perm::CONSISTENT_READ;
                shared &= !(Perm::WRITE | Perm::RESIZE);
            }
            // The format may rely on the size, and rewrites data where others only "keep" it.
            shared &= !Perm::RESIZE;
            if perm.contains(Perm::WRITE_UNCHANGED) {
                perm |= Perm::WRITE;
            }
            if perm.contains(Perm::WRITE) {
                perm |= Perm::RESIZE;
            }
        }
    }
    Needs { perm, shared }
}

/// One edge into a node, as the permission check sees it.
#[derive(Debug, Clone)]
pub struct ParentEdge {
    /// Who: "node 'q'", "an unnamed block device", "backup job 'j'".
    pub who: String,
    /// The edge's name at the parent: "file", "backing", "root".
    pub role: String,
    /// Needs.
    pub perm: Perm,
    /// Lets others.
    pub shared: Perm,
    /// Attachment order; newer edges are checked first, as QEMU lists parents newest first.
    pub seq: u64,
}

/// Check the parents of node `node` pairwise; QEMU's message for the first conflict.
/// `parents` must be newest first.
pub fn check_parents(node: &str, parents: &[ParentEdge]) -> Result<(), String> {
    for a in parents {
        for b in parents {
            if std::ptr::eq(a, b) {
                continue;
            }
            let clash = b.perm & !a.shared;
            if !clash.is_empty() {
                return Err(format!(
                    "Permission conflict on node '{node}': permissions '{}' are both required by {} (uses node '{node}' as '{}' child) and unshared by {} (uses node '{node}' as '{}' child).",
                    clash.names(),
                    b.who,
                    b.role,
                    a.who,
                    a.role
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writable_format_takes_write_and_resize_and_shares_only_reads() {
        let n = child_needs(Role::Storage, true, false, Needs::default());
        assert_eq!(n.perm, Perm::CONSISTENT_READ | Perm::WRITE | Perm::RESIZE);
        assert_eq!(
            n.shared,
            Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED | Perm::GRAPH_MOD
        );
    }

    #[test]
    fn unused_filter_needs_nothing_and_shares_everything() {
        let n = child_needs(Role::Filtered, true, false, Needs::default());
        assert_eq!(n, Needs::default());
    }

    #[test]
    fn cbw_source_is_a_plain_filter_child_until_the_filter_is_used() {
        let idle = child_needs(Role::CbwSource, true, false, Needs::default());
        assert_eq!(idle, Needs::default());
        let used = child_needs(Role::CbwSource, true, true, Needs::default());
        assert_eq!(used.perm, Perm::CONSISTENT_READ);
        assert_eq!(used.shared, Perm::ALL & !(Perm::WRITE | Perm::RESIZE));
        let target = child_needs(Role::CbwTarget, true, false, Needs::default());
        assert_eq!(target.perm, Perm::WRITE);
        assert_eq!(target.shared, Perm::ALL & !Perm::RESIZE);
        let mut writer = Needs::default();
        writer.add(
            Perm::CONSISTENT_READ | Perm::WRITE,
            Perm::ALL & !Perm::RESIZE,
        );
        assert_eq!(
            child_needs(Role::Unused, true, true, writer),
            Needs::default()
        );
    }

    #[test]
    fn conflict_message_is_qemus() {
        let q2 = ParentEdge {
            who: "node 'q2'".into(),
            role: "file".into(),
            perm: Perm::CONSISTENT_READ | Perm::WRITE | Perm::RESIZE,
            shared: Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED,
            seq: 1,
        };
        let q3 = ParentEdge {
            who: "node 'q3'".into(),
            seq: 2,
            ..q2.clone()
        };
        assert_eq!(
            check_parents("f2", &[q3, q2]).unwrap_err(),
            "Permission conflict on node 'f2': permissions 'write, resize' are both required by node 'q2' (uses node 'f2' as 'file' child) and unshared by node 'q3' (uses node 'f2' as 'file' child)."
        );
    }
}
