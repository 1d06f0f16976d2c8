#!/usr/bin/env python3
"""Differential check: the same raw QMP byte sessions against qemu-storage-daemon and
against blockd (tests/run.sh runs this); every reply must be byte-identical, except the
free-form ``package`` string of the version (blockd names itself there), which is masked.

    BLOCKD=target/release/blockd python3 crates/qmp/tests/oracle/compare_with_qsd.py

or, against this crate's `mini_qsd` example instead of the daemon:

    cargo build -p qmp --example mini_qsd
    MINI_QSD=$CARGO_TARGET_DIR/debug/examples/mini_qsd python3 crates/qmp/tests/oracle/compare_with_qsd.py

Exits non-zero on any difference, and when either side did not answer (a daemon that did not
start must not compare equal to another). Known, deliberate differences are not exercised here
(see the crate docs): a float literal beyond f64 range, limits, several clients at once.
"""
import re, socket, time, subprocess, os, sys, tempfile
QSD_BIN = os.environ.get("QSD", "qemu-storage-daemon")
def qsd_style(binary):
    return lambda p: [binary, "--chardev", f"socket,id=m,path={p},server=on,wait=off", "--monitor", "chardev=m"]
QSD = qsd_style(QSD_BIN)
if os.environ.get("BLOCKD"):
    MINE = qsd_style(os.environ["BLOCKD"])
elif os.environ.get("MINI_QSD"):
    MINE = lambda p: [os.environ["MINI_QSD"], p]
else:
    sys.exit("set BLOCKD (the daemon) or MINI_QSD (the qmp crate's example) to the binary to compare")
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
PACKAGE = re.compile(rb'"package": "(?:[^"\\]|\\.)*"')
def mask(outs):
    return [[PACKAGE.sub(b'"package": "*"', x) for x in s] for s in outs]
a=mask(run(QSD, sessions)); b=mask(run(MINE, sessions))
for name, outs in (("qsd", a), ("mine", b)):
    for si, s in enumerate(outs):
        if not s or not s[0].startswith(b'{"QMP": '):
            sys.exit(f"{name}: no QMP greeting in session {si} (did the daemon start?): {s[:1]}")
        if len(s) != len(sessions[si]) + 1:
            sys.exit(f"{name}: session {si} has {len(s)} exchanges, wanted {len(sessions[si]) + 1}")
bad=0
for si,(sa,sb) in enumerate(zip(a,b)):
    for ci,(x,y) in enumerate(zip(sa,sb)):
        if x!=y:
            bad+=1
            inp = sessions[si][ci-1] if ci else b'<connect>'
            print("DIFF session",si,"input",inp); print("  qsd :",x); print("  mine:",y)
print("compared", sum(len(s) for s in a), "exchanges;", bad, "differences")
sys.exit(1 if bad else 0)
