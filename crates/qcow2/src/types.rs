//! Newtypes for the address spaces of a qcow2 image, and the geometry that converts between them.
//!
//! Guest offsets (positions on the virtual disk) and host offsets (positions in the image file)
//! are different types, so one cannot be passed where the other is expected.

/// A byte position on the virtual disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct GuestOffset(pub u64);

/// A byte position in the image file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct HostOffset(pub u64);

/// The index of a cluster in the image file (host offset / cluster size).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct HostCluster(pub u64);

/// The index of a cluster of the virtual disk (guest offset / cluster size).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct GuestCluster(pub u64);

/// Cluster-size dependent arithmetic of one image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// log2 of the cluster size (9..=21).
    pub cluster_bits: u32,
    /// log2 of the refcount width in bits (0..=6).
    pub refcount_order: u32,
}

impl Geometry {
    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Number of 8-byte entries in an L2 table (one cluster).
    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() / 8
    }

    /// Bytes of virtual disk covered by one L2 table.
    pub fn l2_coverage(&self) -> u64 {
        self.cluster_size() * self.l2_entries()
    }

    /// Number of refcount entries in a refcount block.
    pub fn refblock_entries(&self) -> u64 {
        (self.cluster_size() * 8) >> self.refcount_order
    }

    /// Largest refcount value representable.
    pub fn max_refcount(&self) -> u64 {
        if self.refcount_order >= 6 {
            u64::MAX
        } else {
            (1u64 << (1u32 << self.refcount_order)) - 1
        }
    }

    /// Byte offset inside its cluster.
    pub fn in_cluster(&self, off: u64) -> u64 {
        off & (self.cluster_size() - 1)
    }

    /// The guest cluster containing `off`.
    pub fn guest_cluster(&self, off: GuestOffset) -> GuestCluster {
        GuestCluster(off.0 >> self.cluster_bits)
    }

    /// L1 index of a guest cluster.
    pub fn l1_index(&self, c: GuestCluster) -> usize {
        (c.0 / self.l2_entries()) as usize
    }

    /// L2 index of a guest cluster.
    pub fn l2_index(&self, c: GuestCluster) -> usize {
        (c.0 % self.l2_entries()) as usize
    }

    /// The host cluster containing a host offset.
    pub fn host_cluster(&self, off: HostOffset) -> HostCluster {
        HostCluster(off.0 >> self.cluster_bits)
    }

    /// The first byte of a host cluster.
    pub fn host_offset(&self, c: HostCluster) -> HostOffset {
        HostOffset(c.0 << self.cluster_bits)
    }

    /// Number of clusters needed to hold `bytes`.
    pub fn clusters_for(&self, bytes: u64) -> u64 {
        bytes.div_ceil(self.cluster_size())
    }

    /// Number of L1 entries needed for a virtual size.
    pub fn l1_entries_for(&self, virtual_size: u64) -> u64 {
        virtual_size.div_ceil(self.l2_coverage())
    }

    /// Whether a host offset is cluster aligned.
    pub fn is_aligned(&self, off: u64) -> bool {
        self.in_cluster(off) == 0
    }
}
