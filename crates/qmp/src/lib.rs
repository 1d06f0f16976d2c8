//! qmp: the QMP wire protocol server (framing, greeting, negotiation, events). Knows nothing of blocks.
