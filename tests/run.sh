#!/usr/bin/env bash
# Run every test of blockd on a fresh Debian machine: installs what the tests need (Debian
# packages, Python packages), builds, runs the Rust tests, then the iotests against blockd and
# against qemu-storage-daemon (the oracle), so the iotests themselves stay honest.
#
#   bash tests/run.sh            everything
#   SKIP_QSD=1 bash tests/run.sh skip the iotests pass against qemu-storage-daemon
set -euo pipefail
cd "$(dirname "$0")/.."
# Every oracle tool is required here: a test whose oracle is missing fails (never skips).
unset BLOCKD_ALLOW_MISSING_ORACLES

need_apt=()
# QEMU 10.0 comes from bookworm-backports: qemu-utils (qemu-storage-daemon, qemu-img, qemu-io; the
# iotests' oracle is QSD 10.0.2) and qemu-system-x86 (blockd-backup against a running QEMU,
# iotests/test_backup_tool_qemu.py) in the same version. bookworm's own 7.2 packages would not
# do, and installing bookworm's qemu-system-x86 would replace qemu-utils 10 by 7.2.
need_bpo=()
command -v qemu-storage-daemon >/dev/null || need_bpo+=(qemu-utils)
command -v qemu-system-x86_64 >/dev/null || need_bpo+=(qemu-system-x86)
command -v nbdinfo >/dev/null || need_apt+=(libnbd-bin)
command -v python3 >/dev/null || need_apt+=(python3 python3-pip)
if [ ${#need_apt[@]} -gt 0 ] || [ ${#need_bpo[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi
    if [ ${#need_bpo[@]} -gt 0 ] &&
        ! grep -rqs '^[^#]*bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
        echo "deb http://deb.debian.org/debian bookworm-backports main" |
            $SUDO tee /etc/apt/sources.list.d/bookworm-backports.list >/dev/null
    fi
    $SUDO apt-get update -qq
    if [ ${#need_bpo[@]} -gt 0 ]; then
        echo "== installing Debian packages from bookworm-backports: ${need_bpo[*]}"
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
            -t bookworm-backports "${need_bpo[@]}"
    fi
    if [ ${#need_apt[@]} -gt 0 ]; then
        echo "== installing Debian packages: ${need_apt[*]}"
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}"
    fi
fi
if ! python3 -c 'import qemu.qmp, pytest, pytest_timeout, pytest_rerunfailures' 2>/dev/null; then
    echo "== installing Python packages"
    python3 -m pip install -q -r iotests/requirements.txt
fi

if cargo fmt --version >/dev/null 2>&1; then
    echo "== cargo fmt --check"
    cargo fmt --all -- --check
fi

echo "== cargo build (release, for the iotests)"
cargo build --release --locked -p blockd -p blockd-backup

echo "== cargo test"
cargo test --release --locked --workspace

if cargo clippy --version >/dev/null 2>&1; then
    echo "== cargo clippy"
    cargo clippy --release --locked --workspace --all-targets -- -D warnings
fi

echo "== QMP wire bytes: blockd against qemu-storage-daemon on the recorded exchanges"
BLOCKD="$PWD/target/release/blockd" python3 crates/qmp/tests/oracle/compare_with_qsd.py

echo "== iotests against blockd"
# No reruns: a blockd test that fails once fails the run.
IOTESTS_DAEMON=blockd BLOCKD="$PWD/target/release/blockd" python3 -m pytest -q iotests

if [ -z "${SKIP_QSD:-}" ]; then
    # The oracle run keeps the tests honest. QSD 10.0.2 has a rare start-up race under load
    # (see iotests.py, _qsd_settle), so a failure there is retried before it counts.
    echo "== iotests against qemu-storage-daemon"
    IOTESTS_DAEMON=qsd python3 -m pytest -q --reruns 2 iotests
fi
