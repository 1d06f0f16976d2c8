#!/usr/bin/env bash
# Start blockd on a default local image: disk.qcow2 (1 GiB, created by blockd itself if
# missing), QMP on blockd.sock, NBD on nbd.sock, all in this directory (or $BLOCKD_RUN_DIR).
# Builds the daemon first, unless $BLOCKD names a binary. Needs nothing but the Rust toolchain.
set -euo pipefail
cd "$(dirname "$0")"
if [ -z "${BLOCKD:-}" ]; then
    cargo build --release -q -p blockd
    BLOCKD="${CARGO_TARGET_DIR:-target}/release/blockd"
fi
case "$BLOCKD" in /*) ;; *) BLOCKD="$PWD/$BLOCKD" ;; esac
cd "${BLOCKD_RUN_DIR:-.}"
exec "$BLOCKD" --image disk.qcow2 --create 1G --qmp "$PWD/blockd.sock" --nbd "$PWD/nbd.sock" "$@"
