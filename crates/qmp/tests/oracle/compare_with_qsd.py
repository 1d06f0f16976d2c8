#!/usr/bin/env python3
"""Differential check: the same raw QMP byte sessions against qemu-storage-daemon and
against this crate's `mini_qsd` example; every reply must be byte-identical.

    cargo build -p qmp --example mini_qsd
    MINI_QSD=$CARGO_TARGET_DIR/debug/examples/mini_qsd python3 crates/qmp/tests/oracle/compare_with_qsd.py

Exits non-zero on any difference. Known, deliberate differences are not exercised here
(see the crate docs): a float literal beyond f64 range, limits, several clients at once.
"""
import socket, time, subprocess, os, sys, tempfile
QSD = lambda p: ["qemu-storage-daemon","--chardev",f"socket,id=m,path={p},server=on,wait=off","--monitor","chardev=m"]
MINE = lambda p: [os.environ.get("MINI_QSD", "target/debug/examples/mini_qsd"), p]
def run(cmd, sessions):
    p = os.path.join(tempfile.mkdtemp(prefix="qmp-oracle-"), "d.sock")
    if os.path.exists(p): os.unlink(p)
    proc = subprocess.Popen(cmd(p), stderr=subprocess.DEVNULL)
    for _ in range(200):
        if os.path.exists(p): break
        time.sleep(0.02)
    time.sleep(0.1)
    outs=[]
    try:
        for chunks in sessions:
            s = socket.socket(socket.AF_UNIX); s.connect(p); s.settimeout(0.25)
            res=[]
            def rd():
                out=b""
                try:
                    while True:
                        d=s.recv(65536)
                        if not d: out+=b"<EOF>"; break
                        out+=d
                except socket.timeout: pass
                return out
            res.append(rd())
            for c in chunks:
                s.sendall(c); res.append(rd())
            s.close()
            outs.append(res)
    finally:
        proc.kill(); proc.wait()
    return outs
NEG=b'{"execute":"qmp_capabilities"}'
OOB=b'{"execute":"qmp_capabilities","arguments":{"enable":["oob"]}}'
CASES = [
    b'{"a" 1}',
    b'{"a":1 "b":2}',
    b'{1:2}',
    b'[1 2]',
    b'{"a":1,"a":2}',
    b'{"a":foo}',
    b'{"a":"\\x"}',
    b'{"a":"\\uD800"}',
    b'{"a":"\\uD800\\u0041"}',
    b'{"a":"\\uDC00"}',
    b'{"a":"\\uZZZZ"}',
    b'{"a":"\\u12"}',
    b'{"a":"\\uFFFF"}',
    b'{"a":"\\uFDD0"}',
    b'{"a":"\\u0000"}',
    b'{"a":"\xff"}',
    b'{"a":"\xc3"}',
    b'{"a":"\xef\xbf\xbf"}',
    b'{"a":"\xc0\x80"}',
    b'{"a":"\xed\xa0\x80"}',
    b'{"a":"\xf4\x90\x80\x80"}',
    b'{"a":"\xe0\x80\xaf"}',
    b'{"a":01}',
    b'{"a":-}',
    b'{"a":1.}',
    b'{"a":TRUE}',
    b'{"a":[}]',
    b'{"a":1}}',
    b'{"a":,}',
    b'{,}',
    b'{"a":1,}',
    b'[1,]',
    b'{"a":"\t"}',
    b'{"a":1}\x00',
    b'\xff{"a":1}',
    b'{"a":1e5}x',
    b'@@@ {"execute":"query-version"}',
    b'{"execute":"query-version"}@',
    b'{"a":1 @}',
    b'["x",1e999]',
    b'{"a":"\\/\\b\\f\\n\\r\\t\\\'\\"\x7f"}',
    b'{"execute" : "query-version" , "id" : [ ] }',
]
extra=[b'{"execute":"query-version","id":{"b":1,"a":2,"id":3,"execute":4}}', b'{"execute":"query-version","arguments":{}}', b'{"execute":"query-version","arguments":{"x":1}}',
 b'{"execute":"query-version","id":"\xc3\xa9\x7f\\u0001\\ud83d\\ude00"}', b'{"execute":"query-version","id":[0.1,1e300,-0.0,1.5,18446744073709551616]}',
 b'{}', b'[]', b'"s" ', b'{"execute":42}', b'{"arguments":[],"bogus":1}', b'{"execute":"qmp_capabilities","arguments":{"enable":["oob"],"x":1},"id":1}',
 b'{"exec-oob":"query-version"}', b'{"execute":"nosuch","id":null}']
sessions=[[NEG]+CASES+extra, [OOB, b'{"exec-oob":"query-version","id":1}', b'{"exec-oob":"nosuch"}', b'{"execute":"a","exec-oob":"b"}', b'{"execute":42,"exec-oob":"b"}', b'{"execute":"a","exec-oob":42}'],
 [b'{"execute":"query-version"}', b'{"execute":"qmp_capabilities","arguments":{"enable":["x"]}}', b'{"execute":"x","bogus":1}', b'{"exec-oob":"x"}', b'{}', b'{"execute":"qmp_capabilities","arguments":{"enable":[1]},"id":[1]}', NEG, NEG]]
a=run(QSD, sessions); b=run(MINE, sessions)
bad=0
for si,(sa,sb) in enumerate(zip(a,b)):
    for ci,(x,y) in enumerate(zip(sa,sb)):
        if x!=y:
            bad+=1
            inp = sessions[si][ci-1] if ci else b'<connect>'
            print("DIFF session",si,"input",inp); print("  qsd :",x); print("  mine:",y)
print("compared", sum(len(s) for s in a), "exchanges;", bad, "differences")
sys.exit(1 if bad else 0)
