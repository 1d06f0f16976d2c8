"""``block-export-del`` (mode ``safe``) right after an NBD client hung up succeeds: a client
that has closed its socket never makes the export "still in use", even when the server has not
yet read its disconnect (observed on QSD 10.0.2: 100 of 100 in a row succeed). The
deterministic form of the race, which blockd used to lose (the client gone while the server
still counts it), is in crates/nbd/tests/removal_race.rs.
"""

from __future__ import annotations

import pytest

from data_nbd import WireClient, export, start_unix_server
from iotests import create_image


@pytest.mark.parametrize("how", ["disc", "close"])
def test_export_del_right_after_the_client_hung_up_succeeds(make_daemon, tmp_path, how):
    img = create_image(tmp_path / "a.raw", 1 << 20)
    d = make_daemon("--blockdev", f"file,node-name=f,filename={img}")
    sock = start_unix_server(d)
    for i in range(100):
        eid = f"e{i}"
        export(d, "f", eid, eid)
        c = WireClient(sock)
        c.go(eid)
        if how == "disc":
            c.disconnect()
        else:
            c.close()

        r = d.cmd("block-export-del", id=eid)

        assert r == {"return": {}}, (i, r)
        assert d.event_wait("BLOCK_EXPORT_DELETED", match={"id": eid})["data"] == {"id": eid}
    assert d.ok("query-block-exports") == []
