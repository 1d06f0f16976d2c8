//! Declaring on-disk structures once, with their byte offsets, and loading/storing them.
//!
//! [`on_disk_struct!`] takes a struct whose fields carry their big-endian byte offset and
//! generates the struct, its `SIZE`, a bounds-checked `load` and a `store`. A compile-time check
//! rejects a field that does not fit in the declared size.

/// A value that lives big-endian at a fixed offset of an on-disk structure.
pub(crate) trait BeField: Sized + Copy {
    /// Encoded width in bytes.
    const LEN: usize;
    /// Decode from `buf[off..off + LEN]` (the caller has checked the length).
    fn get(buf: &[u8], off: usize) -> Self;
    /// Encode into `buf[off..off + LEN]` (the caller has checked the length).
    fn put(self, buf: &mut [u8], off: usize);
}

/// Implements [`BeField`] for the unsigned integer types.
macro_rules! be_int {
    ($($t:ty),*) => {$(
        impl BeField for $t {
            const LEN: usize = std::mem::size_of::<$t>();
            fn get(buf: &[u8], off: usize) -> Self {
                let mut b = [0u8; std::mem::size_of::<$t>()];
                b.copy_from_slice(&buf[off..off + Self::LEN]);
                <$t>::from_be_bytes(b)
            }
            fn put(self, buf: &mut [u8], off: usize) {
                buf[off..off + Self::LEN].copy_from_slice(&self.to_be_bytes());
            }
        }
    )*};
}
be_int!(u8, u16, u32, u64);

/// Declare an on-disk structure: `offset => field: type` per field, all big-endian.
macro_rules! on_disk_struct {
    (
        $(#[$meta:meta])*
        $vis:vis struct $name:ident [$size:expr] {
            $( $(#[$fmeta:meta])* $off:literal => $field:ident : $ty:ty ),* $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
        $vis struct $name {
            $( $(#[$fmeta])* pub $field: $ty, )*
        }

        // Every field must fit inside the declared size.
        const _: () = { $( assert!($off + <$ty as $crate::ondisk::BeField>::LEN <= $size); )* };

        impl $name {
            /// Encoded size in bytes.
            pub const SIZE: usize = $size;

            /// Decode from the start of `buf`; `None` if `buf` is shorter than `SIZE`.
            pub fn load(buf: &[u8]) -> Option<$name> {
                if buf.len() < Self::SIZE {
                    return None;
                }
                Some($name { $( $field: <$ty as $crate::ondisk::BeField>::get(buf, $off), )* })
            }

            /// Encode into the start of `buf`, which must hold at least `SIZE` bytes.
            pub fn store(&self, buf: &mut [u8]) {
                debug_assert!(buf.len() >= Self::SIZE);
                $( <$ty as $crate::ondisk::BeField>::put(self.$field, buf, $off); )*
            }

            /// Encode into a fresh `SIZE`-byte vector.
            #[allow(dead_code)]
            pub fn to_bytes(self) -> Vec<u8> {
                let mut v = vec![0u8; Self::SIZE];
                self.store(&mut v);
                v
            }
        }
    };
}
pub(crate) use on_disk_struct;

/// Read a big-endian u64 at index `i` of a table of u64s held as bytes.
pub(crate) fn be64_at(buf: &[u8], i: usize) -> u64 {
    u64::get(buf, i * 8)
}

/// Write a big-endian u64 at index `i` of a table of u64s held as bytes.
pub(crate) fn put_be64_at(buf: &mut [u8], i: usize, v: u64) {
    v.put(buf, i * 8)
}

/// Decode a whole table of big-endian u64s.
pub(crate) fn decode_u64_table(buf: &[u8]) -> Vec<u64> {
    buf.chunks_exact(8).map(|c| u64::get(c, 0)).collect()
}

/// Encode a table of u64s big-endian.
pub(crate) fn encode_u64_table(table: &[u64]) -> Vec<u8> {
    let mut out = vec![0u8; table.len() * 8];
    for (i, v) in table.iter().enumerate() {
        put_be64_at(&mut out, i, *v);
    }
    out
}
