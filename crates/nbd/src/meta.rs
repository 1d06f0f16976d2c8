//! Metadata context queries (`NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`),
//! generic over the names an export offers.
//!
//! Rules (the NBD spec's `base:` rules, applied to every namespace as QEMU does for `qemu:`):
//! * an exact name selects (or lists) that context;
//! * a query ending in `:` (`base:`, `qemu:`, `qemu:dirty-bitmap:`) lists every context
//!   starting with it, but selects nothing;
//! * LIST with no queries lists everything; unknown names are silently ignored.

/// Whether the client is listing or selecting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueryMode {
    /// `NBD_OPT_LIST_META_CONTEXT`
    List,
    /// `NBD_OPT_SET_META_CONTEXT`
    Set,
}

/// Indices into `available` matched by `queries`, ascending and without duplicates.
pub fn match_contexts(available: &[String], queries: &[&[u8]], mode: QueryMode) -> Vec<usize> {
    let mut hit = vec![false; available.len()];
    if queries.is_empty() && mode == QueryMode::List {
        hit.iter_mut().for_each(|h| *h = true);
    }
    for query in queries {
        let is_prefix = query.ends_with(b":");
        for (i, name) in available.iter().enumerate() {
            let name = name.as_bytes();
            let matched = if is_prefix {
                mode == QueryMode::List && name.starts_with(query)
            } else {
                name == *query
            };
            if matched {
                hit[i] = true;
            }
        }
    }
    hit.iter()
        .enumerate()
        .filter_map(|(i, h)| h.then_some(i))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> Vec<String> {
        [
            "base:allocation",
            "qemu:allocation-depth",
            "qemu:dirty-bitmap:b0",
            "qemu:dirty-bitmap:b1",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    #[test]
    fn empty_list_query_lists_everything() {
        assert_eq!(
            match_contexts(&names(), &[], QueryMode::List),
            vec![0, 1, 2, 3]
        );
    }

    #[test]
    fn empty_set_query_selects_nothing() {
        assert!(match_contexts(&names(), &[], QueryMode::Set).is_empty());
    }

    #[test]
    fn namespace_query_lists_its_namespace() {
        assert_eq!(
            match_contexts(&names(), &[b"qemu:"], QueryMode::List),
            vec![1, 2, 3]
        );
        assert_eq!(
            match_contexts(&names(), &[b"base:"], QueryMode::List),
            vec![0]
        );
        assert_eq!(
            match_contexts(&names(), &[b"qemu:dirty-bitmap:"], QueryMode::List),
            vec![2, 3]
        );
    }

    #[test]
    fn namespace_query_selects_nothing() {
        assert!(match_contexts(&names(), &[b"qemu:", b"base:"], QueryMode::Set).is_empty());
    }

    #[test]
    fn exact_names_select_in_export_order_without_duplicates() {
        let q: [&[u8]; 3] = [
            b"qemu:dirty-bitmap:b1",
            b"base:allocation",
            b"base:allocation",
        ];
        assert_eq!(match_contexts(&names(), &q, QueryMode::Set), vec![0, 3]);
    }

    #[test]
    fn unknown_contexts_are_ignored() {
        let q: [&[u8]; 4] = [b"qemu:dirty-bitmap:nosuch", b"x-foo:bar", b"nocolon", b""];
        assert!(match_contexts(&names(), &q, QueryMode::Set).is_empty());
        assert!(match_contexts(&names(), &q, QueryMode::List).is_empty());
    }
}
