"""HMP ``qemu-io`` through ``human-monitor-command`` (blockd only: QSD has no HMP,
its reply is CommandNotFound "The command human-monitor-command has not been found").

Each test runs the same qemu-io commands twice: through blockd's HMP on node
``r`` (raw over a file) and through the real ``qemu-io`` binary on an identical
raw file.  The printed text must match (timing lines removed, CR LF of the
monitor turned into LF) and so must the data left in the two files.
"""

from __future__ import annotations

import pytest

from iotests import blockd_only, create_image, filter_qemu_io, qemu_io

pytestmark = blockd_only

MiB = 1 << 20


class Pair:
    """A blockd node and a reference image that receive the same commands."""

    def __init__(self, daemon, tmp_path):
        self.d = daemon
        self.img = create_image(tmp_path / "blockd.raw", MiB)
        self.ref = create_image(tmp_path / "ref.raw", MiB)
        daemon.ok("blockdev-add", driver="raw", node_name="r", discard="unmap",
                  file={"driver": "file", "filename": str(self.img), "discard": "unmap"})

    def hmp_raw(self, cmd: str, node: str = "r") -> str:
        return self.d.ok("human-monitor-command", {"command-line": f'qemu-io {node} "{cmd}"'})

    def hmp(self, *cmds: str) -> str:
        return filter_qemu_io("".join(self.hmp_raw(c) for c in cmds).replace("\r\n", "\n"))

    def real(self, *cmds: str) -> str:
        argv = ["-f", "raw"]
        for c in cmds:
            argv += ["-c", c]
        return qemu_io(*argv, str(self.ref), check=False)

    def both(self, *cmds: str) -> str:
        """Runs ``cmds`` on both sides; asserts equal text and returns it."""
        got, want = self.hmp(*cmds), self.real(*cmds)
        assert got == want
        return got

    def assert_same_data(self) -> None:
        self.hmp_raw("flush")
        assert self.img.read_bytes() == self.ref.read_bytes()


@pytest.fixture
def pair(daemon, tmp_path):
    return Pair(daemon, tmp_path)


def test_write_pattern_prints_what_qemu_io_prints(pair):
    assert pair.both("write -P 0x5a 0 64k") == "wrote 65536/65536 bytes at offset 0\n"
    pair.assert_same_data()


def test_unaligned_write_prints_what_qemu_io_prints(pair):
    assert pair.both("write -P 0x11 1 3") == "wrote 3/3 bytes at offset 1\n"
    pair.assert_same_data()


def test_write_zeroes_prints_what_qemu_io_prints(pair):
    pair.both("write -P 0x5a 0 128k")
    assert pair.both("write -z 64k 64k") == "wrote 65536/65536 bytes at offset 65536\n"
    pair.assert_same_data()


def test_read_pattern_that_matches_prints_read_line(pair):
    pair.both("write -P 0x5a 0 64k")
    assert pair.both("read -P 0x5a 0 64k") == "read 65536/65536 bytes at offset 0\n"


def test_read_pattern_mismatch_reports_request_offset(pair):
    pair.both("write -P 0x5a 0 64k")
    assert pair.both("read -P 0x5b 0 64k") == (
        "Pattern verification failed at offset 0, 65536 bytes\nread 65536/65536 bytes at offset 0\n"
    )


def test_read_pattern_partly_mismatching_reports_whole_request(pair):
    pair.both("write -P 0x5a 0 64k")
    assert pair.both("read -P 0x5a 65024 1024") == (
        "Pattern verification failed at offset 65024, 1024 bytes\nread 1024/1024 bytes at offset 65024\n"
    )


def test_read_of_zeroes_after_write_zeroes_verifies(pair):
    pair.both("write -P 0x5a 0 64k", "write -z 0 4k")
    assert pair.both("read -P 0 0 4k", "read -P 0x5a 4k 60k") == (
        "read 4096/4096 bytes at offset 0\nread 61440/61440 bytes at offset 4096\n"
    )


def test_read_verbose_dumps_hex(pair):
    pair.both("write -P 0x5a 0 16")
    out = pair.both("read -v 0 32")
    assert out.startswith("00000000:  5a 5a")


def test_discard_prints_what_qemu_io_prints(pair):
    assert pair.both("discard 0 4k") == "discard 4096/4096 bytes at offset 0\n"


def test_aio_write_then_aio_flush_prints_what_qemu_io_prints(pair):
    cmds = ("aio_write -P 0x11 0 4k", "aio_write -P 0x22 4k 4k", "aio_flush")
    # Completion order of the two requests is not fixed, in qemu-io either.
    got, want = pair.hmp(*cmds), pair.real(*cmds)
    assert sorted(got.splitlines()) == sorted(want.splitlines()) == [
        "wrote 4096/4096 bytes at offset 0", "wrote 4096/4096 bytes at offset 4096"]
    pair.assert_same_data()


def test_flush_prints_nothing(pair):
    assert pair.both("flush") == ""


def test_write_past_end_fails_like_qemu_io(pair):
    assert pair.both("write -P 0x5a 1M 512") == "write failed: Input/output error\n"


def test_read_past_end_fails_like_qemu_io(pair):
    assert pair.both("read 1048064 1024") == "read failed: Input/output error\n"


def test_unknown_qemu_io_command_is_reported_like_qemu_io(pair):
    assert pair.both("bogus") == 'command "bogus" not found\n'


def test_missing_arguments_are_reported_like_qemu_io(pair):
    assert pair.both("write") == "bad argument count 0 to write, expected at least 2 arguments\n"


def test_bad_number_is_reported_like_qemu_io(pair):
    assert pair.both("write 1 x") == (
        "Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- x\n"
    )


def test_monitor_output_lines_end_with_crlf(pair):
    # QEMU's monitor turns every "\n" of HMP output into "\r\n".
    raw = pair.hmp_raw("write -P 0x5a 0 512")
    assert raw.startswith("wrote 512/512 bytes at offset 0\r\n")
    assert raw.endswith("\r\n") and "\n" not in raw.replace("\r\n", "")


def test_hmp_write_marks_dirty_bitmap(pair):
    pair.d.ok("block-dirty-bitmap-add", node="r", name="b", granularity=512)
    pair.hmp("write -P 0x5a 511 2")
    assert pair.d.bitmap("r", "b")["count"] == 1024


def test_qemu_io_on_unknown_node_prints_error_text(daemon):
    # From QEMU's source (hmp_qemu_io + hmp_handle_error), not observed: HMP
    # errors are text in the return value, not QMP errors.
    out = daemon.ok("human-monitor-command", {"command-line": 'qemu-io nosuch "read 0 512"'})
    assert out == "Error: Cannot find device='nosuch' nor node-name='nosuch'\r\n"


def test_unknown_hmp_command_prints_error_text(daemon):
    # From QEMU's source (monitor/hmp.c), not observed.
    out = daemon.ok("human-monitor-command", {"command-line": "nosuchcommand"})
    assert out == "unknown command: 'nosuchcommand'\r\n"


@pytest.mark.parametrize("cmd", ["read 0 3G", "write -P 0x5a 0 3G", "write -z 0 2147483137",
                                 "aio_read 0 3G", "aio_write 0 3G", "discard 0 3G"])
def test_request_longer_than_qemu_io_allows_is_refused_like_qemu_io(pair, cmd):
    # qemu-io's bound (BDRV_REQUEST_MAX_BYTES, 2 GiB - 512) and its texts, checked before the
    # end of the disk is.
    out = pair.both(cmd)
    assert "2147483136" in out and "failed" not in out, out


def _peak_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise AssertionError("no VmHWM in /proc/PID/status")


def test_longest_request_does_not_allocate_its_length(daemon):
    # 2 GiB - 512 is allowed, as in qemu-io, but goes through a bounded buffer: the daemon's
    # peak memory stays far below the request's length.
    daemon.ok("blockdev-add", driver="null-co", node_name="z", size=4 << 30, read_zeroes=True)
    out = filter_qemu_io(daemon.ok("human-monitor-command",
                                   {"command-line": 'qemu-io z "read -P 0 0 2147483136"'}))
    assert out == "read 2147483136/2147483136 bytes at offset 0\r\n"
    out = filter_qemu_io(daemon.ok("human-monitor-command",
                                   {"command-line": 'qemu-io z "write -P 0x5a 0 2147483136"'}))
    assert out == "wrote 2147483136/2147483136 bytes at offset 0\r\n"
    assert _peak_rss_kib(daemon.proc.pid) < 256 * 1024


def test_read_dump_is_bounded(pair):
    out = pair.hmp("read -v 0 2M")
    assert out == "read -v prints at most 1048576 bytes in blockd, given 2M\n"
