#!/usr/bin/env bash
# Start blockd on a default local image: ./disk.qcow2 (1 GiB, created if missing), QMP on
# ./blockd.sock, NBD on ./nbd.sock. Builds the daemon first if needed.
set -euo pipefail
cd "$(dirname "$0")"
if ! command -v qemu-img >/dev/null; then
    if [ "$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq qemu-utils
fi
[ -e disk.qcow2 ] || qemu-img create -q -f qcow2 disk.qcow2 1G
cargo build --release -q -p blockd
exec "${CARGO_TARGET_DIR:-target}/release/blockd" --image disk.qcow2 --qmp "$PWD/blockd.sock" --nbd "$PWD/nbd.sock" "$@"
