//! block: the block-graph core (nodes, drivers, bitmaps, jobs). Knows nothing of JSON.
