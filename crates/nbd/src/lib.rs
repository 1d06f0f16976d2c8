//! nbd: an NBD server (fixed newstyle) over a small export trait. Knows nothing of JSON or the graph.
