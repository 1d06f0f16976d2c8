//! A node's users and permissions: registered users (exports, jobs), the writers count, and
//! the permissions last applied to the driver (image locks).

use std::sync::atomic::Ordering;

use super::{next_seq, Node};
use crate::perm::{Needs, Perm};

/// Something other than a parent node that uses a node (export, job, device), with the
/// permissions it holds. Registered through [`Node::add_user`] (no permissions, only keeps the
/// node from being deleted) or [`Node::attach_user`] (checked by `Graph::refresh_perms`).
#[derive(Debug, Clone)]
pub struct User {
    /// Identity for "in use by" messages and removal: "export 'e'".
    pub who: String,
    /// Description in permission conflicts: "an unnamed block device", "backup job 'j'".
    pub desc: String,
    /// The edge's name in conflicts ("root" for block devices and exports).
    pub role: String,
    /// Needs.
    pub perm: Perm,
    /// Lets others.
    pub shared: Perm,
    /// Attachment order.
    pub seq: u64,
}

impl Node {
    /// Creation order (the attachment order of this node's child edges).
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// The permissions last applied to this node (union of its edges' needs).
    pub fn applied_needs(&self) -> Needs {
        *self.applied.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Apply `needs` to the driver (image locks); remembers them on success.
    pub(crate) fn apply_needs(&self, needs: Needs) -> Result<(), String> {
        let mut applied = self.applied.lock().unwrap_or_else(|p| p.into_inner());
        if *applied == needs {
            return Ok(());
        }
        self.driver.set_perm(needs.perm, needs.shared)?;
        *applied = needs;
        Ok(())
    }

    /// Register a user holding permissions. Call `Graph::refresh_perms` afterwards and
    /// [`Node::remove_user`] if it fails.
    pub fn attach_user(&self, who: String, desc: String, perm: Perm, shared: Perm) {
        self.users
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(User {
                who,
                desc,
                role: "root".to_string(),
                perm,
                shared,
                seq: next_seq(),
            });
    }

    /// The registered users.
    pub fn users(&self) -> Vec<User> {
        self.users.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Register a user (export, job) so the node cannot be deleted under it.
    pub fn add_user(&self, who: String) {
        self.attach_user(who.clone(), who, Perm::NONE, Perm::ALL);
    }

    /// Drop a user registered with [`Node::add_user`].
    pub fn remove_user(&self, who: &str) {
        let mut users = self.users.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = users.iter().position(|u| u.who == who) {
            users.remove(i);
        }
    }

    /// Is `who` registered as a user?
    pub fn has_user(&self, who: &str) -> bool {
        self.users
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .any(|u| u.who == who)
    }

    /// First registered user, if any.
    pub fn first_user(&self) -> Option<String> {
        self.users
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .first()
            .map(|u| u.who.clone())
    }

    /// A user that writes through this node came (`true`) or went (`false`).
    pub fn set_writer(&self, came: bool) {
        if came {
            self.writers.fetch_add(1, Ordering::AcqRel);
        } else {
            self.writers.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Number of users writing through this node ([`Node::set_writer`] and users attached
    /// with the write permission).
    pub fn writers(&self) -> usize {
        let attached = self
            .users
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|u| u.perm.contains(Perm::WRITE))
            .count();
        self.writers.load(Ordering::Acquire) + attached
    }

    /// Users counted by [`Node::set_writer`] only (they hold write through one shared edge).
    pub(crate) fn legacy_writers(&self) -> usize {
        self.writers.load(Ordering::Acquire)
    }
}
