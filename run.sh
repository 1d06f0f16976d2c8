#!/usr/bin/env bash
# Start blockd on a default local image: ./disk.qcow2 (1 GiB, created if missing), QMP on
# ./blockd.sock, NBD on ./nbd.sock. Builds the daemon first if needed.
set -euo pipefail
cd "$(dirname "$0")"
command -v qemu-img >/dev/null || { sudo apt-get update -qq && sudo apt-get install -y -qq qemu-utils; }
[ -e disk.qcow2 ] || qemu-img create -q -f qcow2 disk.qcow2 1G
cargo build --release -q -p blockd
exec target/release/blockd --image disk.qcow2 --qmp "$PWD/blockd.sock" --nbd "$PWD/nbd.sock" "$@"
