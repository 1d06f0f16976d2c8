//! Test helpers: a qemu-storage-daemon oracle and a structural comparison of introspection
//! output that looks through QEMU's masked type names.

#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

#[path = "../../../../tests/oracles.rs"]
pub mod oracles;

/// Path of qemu-storage-daemon (`QSD_BINARY` overrides). When it is not installed the test
/// fails (see [`oracles`]), unless the developer opted out: then `None`.
pub fn qsd_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("QSD_BINARY") {
        return Some(PathBuf::from(p));
    }
    oracles::require("qemu-storage-daemon")
}

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// A scratch directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("qapi-test-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running qemu-storage-daemon with one negotiated QMP connection.
pub struct Qsd {
    child: Child,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    pub dir: TempDir,
}

impl Qsd {
    /// Starts QSD with a QMP monitor plus `extra` arguments; `None` only when
    /// qemu-storage-daemon is not installed and the developer opted out (see [`oracles`]).
    pub fn start(extra: &[&str]) -> Option<Qsd> {
        let bin = qsd_binary()?;
        let dir = TempDir::new("qsd");
        let sock = dir.0.join("qmp.sock");
        let chardev = format!("socket,id=m,path={},server=on,wait=off", sock.display());
        let child = Command::new(bin)
            .args(["--chardev", &chardev, "--monitor", "chardev=m"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn qemu-storage-daemon");
        let stream = connect(&sock);
        let writer = stream.try_clone().expect("clone socket");
        let mut qsd = Qsd {
            child,
            reader: BufReader::new(stream),
            writer,
            dir,
        };
        let greeting = qsd.read_message();
        assert!(greeting.get("QMP").is_some(), "no greeting: {greeting}");
        // A client that connects while QSD is still starting can be greeted twice (the
        // monitor replays the chardev's open); a second greeting is not an answer.
        let mut r = qsd.execute("qmp_capabilities", json!({}));
        while r.get("QMP").is_some() {
            r = qsd.read_message();
        }
        assert!(r.get("return").is_some(), "negotiation failed: {r}");
        Some(qsd)
    }

    fn read_message(&mut self) -> Value {
        let mut line = String::new();
        loop {
            line.clear();
            let n = self.reader.read_line(&mut line).expect("read from QSD");
            assert!(n > 0, "QSD closed the connection");
            let v: Value = serde_json::from_str(&line).expect("QSD sent JSON");
            if v.get("event").is_none() {
                return v;
            }
        }
    }

    /// Sends a command and returns the whole reply (`{"return": ..}` or `{"error": ..}`).
    pub fn execute(&mut self, name: &str, args: Value) -> Value {
        let msg = json!({"execute": name, "arguments": args});
        self.writer
            .write_all(msg.to_string().as_bytes())
            .expect("write to QSD");
        self.read_message()
    }

    /// The error of a reply as (class, desc), or `None` for success.
    pub fn error_of(reply: &Value) -> Option<(String, String)> {
        let e = reply.get("error")?;
        Some((
            e["class"].as_str()?.to_owned(),
            e["desc"].as_str()?.to_owned(),
        ))
    }
}

fn connect(sock: &Path) -> UnixStream {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match UnixStream::connect(sock) {
            Ok(s) => {
                s.set_read_timeout(Some(Duration::from_secs(20)))
                    .expect("set timeout");
                return s;
            }
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("cannot connect to QSD at {}: {e}", sock.display()),
        }
    }
}

impl Drop for Qsd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An introspection result indexed by entity name.
pub struct Introspection {
    pub by_name: HashMap<String, Map<String, Value>>,
}

impl Introspection {
    pub fn new(list: &Value) -> Introspection {
        let by_name = list
            .as_array()
            .expect("SchemaInfo list")
            .iter()
            .map(|e| {
                let o = e.as_object().expect("SchemaInfo object").clone();
                (o["name"].as_str().expect("name").to_owned(), o)
            })
            .collect();
        Introspection { by_name }
    }

    pub fn entity(&self, name: &str) -> &Map<String, Value> {
        self.by_name
            .get(name)
            .unwrap_or_else(|| panic!("no entity named {name}"))
    }
}

fn features(o: &Map<String, Value>) -> Vec<String> {
    let mut f: Vec<String> = o
        .get("features")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    f.sort();
    f
}

/// Compares two type trees of two introspection results, looking through masked names.
/// Returns the list of differences, each with the path where it was found.
pub struct Comparer<'a> {
    pub ours: &'a Introspection,
    pub theirs: &'a Introspection,
    seen: HashSet<(String, String)>,
    pub diffs: Vec<String>,
}

impl<'a> Comparer<'a> {
    pub fn new(ours: &'a Introspection, theirs: &'a Introspection) -> Self {
        Comparer {
            ours,
            theirs,
            seen: HashSet::new(),
            diffs: Vec::new(),
        }
    }

    fn diff(&mut self, path: &str, what: String) {
        self.diffs.push(format!("{path}: {what}"));
    }

    /// Compares a command or event entity with the same name in both.
    pub fn entity(&mut self, name: &str) {
        let (a, b) = (
            self.ours.entity(name).clone(),
            self.theirs.entity(name).clone(),
        );
        if a["meta-type"] != b["meta-type"] {
            return self.diff(
                name,
                format!("meta-type {} vs {}", a["meta-type"], b["meta-type"]),
            );
        }
        if features(&a) != features(&b) {
            self.diff(
                name,
                format!("features {:?} vs {:?}", features(&a), features(&b)),
            );
        }
        if a.get("allow-oob") != b.get("allow-oob") {
            self.diff(name, "allow-oob differs".into());
        }
        self.types(
            &format!("{name}.arg"),
            a["arg-type"].as_str().unwrap_or(""),
            b["arg-type"].as_str().unwrap_or(""),
        );
        if a["meta-type"] == "command" {
            self.types(
                &format!("{name}.ret"),
                a["ret-type"].as_str().unwrap_or(""),
                b["ret-type"].as_str().unwrap_or(""),
            );
        }
    }

    /// Compares type `a` (ours) with type `b` (theirs), recursively.
    pub fn types(&mut self, path: &str, a: &str, b: &str) {
        if !self.seen.insert((a.to_owned(), b.to_owned())) {
            return;
        }
        let (Some(ea), Some(eb)) = (
            self.ours.by_name.get(a).cloned(),
            self.theirs.by_name.get(b).cloned(),
        ) else {
            return self.diff(path, format!("type {a} or {b} not found"));
        };
        let mt = ea["meta-type"].as_str().unwrap_or("").to_owned();
        if ea["meta-type"] != eb["meta-type"] {
            return self.diff(
                path,
                format!("meta-type {} vs {}", ea["meta-type"], eb["meta-type"]),
            );
        }
        if features(&ea) != features(&eb) {
            self.diff(
                path,
                format!("type features {:?} vs {:?}", features(&ea), features(&eb)),
            );
        }
        match mt.as_str() {
            "builtin" => {
                if ea["json-type"] != eb["json-type"] {
                    self.diff(
                        path,
                        format!("builtin {} vs {}", ea["json-type"], eb["json-type"]),
                    );
                }
            }
            "array" => self.types(
                &format!("{path}[]"),
                ea["element-type"].as_str().unwrap_or(""),
                eb["element-type"].as_str().unwrap_or(""),
            ),
            "enum" => {
                if ea["values"] != eb["values"] {
                    self.diff(
                        path,
                        format!("enum values {} vs {}", ea["values"], eb["values"]),
                    );
                }
                let mf = |e: &Map<String, Value>| -> Vec<(String, Vec<String>)> {
                    e["members"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|m| m.as_object())
                        .map(|m| (m["name"].as_str().unwrap_or("").to_owned(), features(m)))
                        .collect()
                };
                if mf(&ea) != mf(&eb) {
                    self.diff(path, "enum member features differ".into());
                }
            }
            "alternate" => {
                let ma = ea["members"].as_array().cloned().unwrap_or_default();
                let mb = eb["members"].as_array().cloned().unwrap_or_default();
                if ma.len() != mb.len() {
                    return self.diff(
                        path,
                        format!("alternate has {} vs {} branches", ma.len(), mb.len()),
                    );
                }
                for (i, (x, y)) in ma.iter().zip(&mb).enumerate() {
                    self.types(
                        &format!("{path}<{i}>"),
                        x["type"].as_str().unwrap_or(""),
                        y["type"].as_str().unwrap_or(""),
                    );
                }
            }
            "object" => self.objects(path, &ea, &eb),
            other => self.diff(path, format!("unexpected meta-type {other}")),
        }
    }

    fn objects(&mut self, path: &str, ea: &Map<String, Value>, eb: &Map<String, Value>) {
        let ma = ea["members"].as_array().cloned().unwrap_or_default();
        let mb = eb["members"].as_array().cloned().unwrap_or_default();
        let names = |m: &[Value]| {
            m.iter()
                .map(|x| x["name"].as_str().unwrap_or("").to_owned())
                .collect::<Vec<_>>()
        };
        if names(&ma) != names(&mb) {
            self.diff(
                path,
                format!("members {:?} vs {:?}", names(&ma), names(&mb)),
            );
        }
        for x in &ma {
            let n = x["name"].as_str().unwrap_or("");
            let Some(y) = mb.iter().find(|y| y["name"] == x["name"]) else {
                continue;
            };
            let p = format!("{path}.{n}");
            let (xo, yo) = (
                x.as_object().cloned().unwrap_or_default(),
                y.as_object().cloned().unwrap_or_default(),
            );
            if xo.contains_key("default") != yo.contains_key("default") {
                self.diff(
                    &p,
                    format!(
                        "optional {} vs {}",
                        xo.contains_key("default"),
                        yo.contains_key("default")
                    ),
                );
            }
            if features(&xo) != features(&yo) {
                self.diff(
                    &p,
                    format!("member features {:?} vs {:?}", features(&xo), features(&yo)),
                );
            }
            self.types(
                &p,
                x["type"].as_str().unwrap_or(""),
                y["type"].as_str().unwrap_or(""),
            );
        }
        if ea.get("tag") != eb.get("tag") {
            self.diff(
                path,
                format!("tag {:?} vs {:?}", ea.get("tag"), eb.get("tag")),
            );
        }
        let va = ea
            .get("variants")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let vb = eb
            .get("variants")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let cases = |v: &[Value]| {
            let mut c: Vec<String> = v
                .iter()
                .map(|x| x["case"].as_str().unwrap_or("").to_owned())
                .collect();
            c.sort();
            c
        };
        if cases(&va) != cases(&vb) {
            self.diff(
                path,
                format!("variant cases {:?} vs {:?}", cases(&va), cases(&vb)),
            );
        }
        for x in &va {
            let Some(y) = vb.iter().find(|y| y["case"] == x["case"]) else {
                continue;
            };
            let p = format!("{path}({})", x["case"].as_str().unwrap_or(""));
            self.types(
                &p,
                x["type"].as_str().unwrap_or(""),
                y["type"].as_str().unwrap_or(""),
            );
        }
    }
}
