//! QEMU's dictionary iteration order.
//!
//! QEMU keeps JSON objects in a `QDict`: a hash table of 512 buckets, each bucket a list with
//! the newest member at its head. Walking a `QDict` therefore visits members by ascending
//! bucket, and within one bucket from the last inserted to the first. That walk decides
//!
//! * the order of members in everything QEMU prints (`{"id": 1, "error": ...}` but
//!   `{"return": ..., "id": 1}`; `{"micro": 2, "minor": 0, "major": 10}`), and
//! * which member QEMU complains about when a request has several bad ones
//!   (`{"execute": 42, "bogus": 1}` reports `bogus`).
//!
//! We reproduce the walk so that our output is byte-for-byte what QEMU prints and our errors
//! name the same member. The bucket of a key is a fixed function of its bytes (checked against
//! qemu-storage-daemon 10.0.2 for every envelope and reply key).

use serde_json::{Map, Value};

/// Number of buckets in a QEMU `QDict`.
const BUCKETS: u32 = 512;

/// The bucket QEMU files `key` under.
pub fn bucket(key: &str) -> u32 {
    let bytes = key.as_bytes();
    // The seed depends on the length; every byte is added shifted by (5 * index) mod 24.
    let mut value = 0x238F_13AFu32.wrapping_mul(bytes.len() as u32);
    for (i, &b) in bytes.iter().enumerate() {
        let shift = (i as u32).wrapping_mul(5) % 24;
        value = value.wrapping_add(u32::from(b) << shift);
    }
    let hash = 1_103_515_243u32.wrapping_mul(value).wrapping_add(12345);
    hash % BUCKETS
}

/// Indices of `keys` (given in insertion order) in the order QEMU walks them.
pub fn walk_order<'a, I>(keys: I) -> Vec<usize>
where
    I: IntoIterator<Item = &'a str>,
{
    let mut order: Vec<(u32, usize)> = keys
        .into_iter()
        .enumerate()
        .map(|(i, k)| (bucket(k), i))
        .collect();
    // Ascending bucket; inside a bucket the most recently inserted member comes first.
    order.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
    order.into_iter().map(|(_, i)| i).collect()
}

/// The members of `map` (insertion order = the order QEMU would have inserted them) in the
/// order QEMU walks them.
pub fn walk(map: &Map<String, Value>) -> Vec<(&String, &Value)> {
    let entries: Vec<(&String, &Value)> = map.iter().collect();
    walk_order(entries.iter().map(|(k, _)| k.as_str()))
        .into_iter()
        .map(|i| entries[i])
        .collect()
}

/// Rebuilds every object inside `value` so that its iteration order is QEMU's walk order.
///
/// Input objects are taken to be in the order the client wrote them (the order QEMU's parser
/// inserts them). Nesting depth is bounded by the parser that produced `value`.
pub fn into_walk_order(value: Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(map_into_walk_order(map)),
        Value::Array(items) => Value::Array(items.into_iter().map(into_walk_order).collect()),
        other => other,
    }
}

/// [`into_walk_order`] for an object.
pub fn map_into_walk_order(map: Map<String, Value>) -> Map<String, Value> {
    let order = walk_order(map.keys().map(String::as_str));
    let mut slots: Vec<Option<(String, Value)>> = map.into_iter().map(Some).collect();
    let mut out = Map::new();
    for i in order {
        if let Some((k, v)) = slots[i].take() {
            out.insert(k, into_walk_order(v));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_match_qemu_for_envelope_keys() {
        // Values computed from QEMU's hash and confirmed by the member order QSD prints.
        assert_eq!(bucket("execute"), 299);
        assert_eq!(bucket("arguments"), 447);
        assert_eq!(bucket("id"), 486);
        assert_eq!(bucket("bogus"), 136);
        assert_eq!(bucket("exec-oob"), 162);
        assert_eq!(bucket("error"), 489);
        assert_eq!(bucket("return"), 401);
        assert_eq!(bucket("micro"), 225);
        assert_eq!(bucket("minor"), 225);
        assert_eq!(bucket("major"), 481);
    }

    #[test]
    fn same_bucket_members_walk_newest_first() {
        let order = walk_order(["major", "minor", "micro"]);
        assert_eq!(order, vec![2, 1, 0]);
    }

    #[test]
    fn walk_reorders_like_qsd_echoes_an_object_id() {
        // QSD echoed {"b":1,"a":2,"id":3,"execute":4} as {"a", "execute", "b", "id"}.
        let v: Value = serde_json::json!({"b": 1, "a": 2, "id": 3, "execute": 4});
        let Value::Object(map) = into_walk_order(v) else {
            panic!("object expected")
        };
        let keys: Vec<&str> = map.keys().map(String::as_str).collect();
        assert_eq!(keys, ["a", "execute", "b", "id"]);
    }
}
