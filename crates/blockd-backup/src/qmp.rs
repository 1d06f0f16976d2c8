//! A small synchronous QMP client: greeting, negotiation, commands. Events are skipped
//! (job progress and completion are polled with `query-jobs`, which cannot be missed).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::error::{Error, Kind, Result};

/// Longest QMP line accepted from the daemon.
const MAX_LINE: usize = 16 << 20;

/// A negotiated QMP connection.
pub struct Qmp {
    /// Reader half.
    rd: BufReader<UnixStream>,
    /// Writer half.
    wr: UnixStream,
}

/// A QMP error reply: class and description.
#[derive(Debug, Clone)]
pub struct QmpError {
    /// The error class ("GenericError").
    pub class: String,
    /// The description.
    pub desc: String,
}

/// Keep the class visible in debug output of the error chain (BLOCKD_BACKUP_DEBUG=1).
fn tracing_free_log(e: &QmpError) {
    if std::env::var_os("BLOCKD_BACKUP_DEBUG").is_some() {
        eprintln!("qmp error class {}: {}", e.class, e.desc);
    }
}

impl std::fmt::Display for QmpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.desc)
    }
}

impl std::error::Error for QmpError {}

impl Qmp {
    /// Connect to `path` (retrying for up to `wait`), read the greeting and negotiate.
    pub fn connect(path: &Path, wait: Duration) -> Result<Qmp> {
        let start = Instant::now();
        let s = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if start.elapsed() >= wait => {
                    return Err(Error::caused(
                        Kind::Daemon,
                        format!("connecting to QMP socket {}", path.display()),
                        e,
                    ))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        };
        let wr = s
            .try_clone()
            .map_err(|e| Error::io(e, "cloning QMP socket"))?;
        // A monitor busy with another client (QSD serves one at a time) never greets.
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(|e| Error::io(e, "setting QMP timeout"))?;
        let mut q = Qmp {
            rd: BufReader::new(s),
            wr,
        };
        let greeting = q.read_msg().map_err(|e| {
            e.context("no QMP greeting within 10 s (is another client using this monitor?)")
        })?;
        let _ = q.rd.get_ref().set_read_timeout(None);
        if greeting.get("QMP").is_none() {
            return Err(Error::new(Kind::Daemon, "no QMP greeting"));
        }
        q.execute("qmp_capabilities", json!({}))?;
        Ok(q)
    }

    /// Read one JSON message.
    fn read_msg(&mut self) -> Result<Value> {
        let mut line = Vec::new();
        loop {
            line.clear();
            let n = std::io::Read::take(&mut self.rd, MAX_LINE as u64)
                .read_until(b'\n', &mut line)
                .map_err(|e| Error::caused(Kind::Daemon, "reading from QMP", e))?;
            if n == 0 {
                return Err(Error::new(
                    Kind::Daemon,
                    "the daemon closed the QMP connection",
                ));
            }
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            return serde_json::from_slice(&line)
                .map_err(|e| Error::caused(Kind::Daemon, "parsing a QMP message", e));
        }
    }

    /// Run a command; its `return` value, or the daemon's error (kind Daemon, QmpError cause).
    pub fn execute(&mut self, cmd: &str, args: Value) -> Result<Value> {
        let msg = json!({"execute": cmd, "arguments": args});
        let mut line = serde_json::to_vec(&msg)
            .map_err(|e| Error::caused(Kind::Daemon, "serialising QMP command", e))?;
        line.push(b'\n');
        self.wr
            .write_all(&line)
            .map_err(|e| Error::caused(Kind::Daemon, format!("sending {cmd}"), e))?;
        loop {
            let m = self.read_msg()?;
            if m.get("event").is_some() {
                continue;
            }
            if let Some(r) = m.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = m.get("error") {
                let err = QmpError {
                    class: e["class"].as_str().unwrap_or("").to_string(),
                    desc: e["desc"].as_str().unwrap_or("").to_string(),
                };
                tracing_free_log(&err);
                return Err(Error::caused(Kind::Daemon, cmd.to_string(), err));
            }
        }
    }

    /// `query-named-block-nodes` (flat).
    pub fn nodes(&mut self) -> Result<Vec<Value>> {
        let v = self.execute("query-named-block-nodes", json!({"flat": true}))?;
        Ok(v.as_array().cloned().unwrap_or_default())
    }
}

/// The QMP error description of an error, if it is a daemon refusal.
pub fn qmp_desc(e: &Error) -> Option<String> {
    let src = std::error::Error::source(e)?;
    src.downcast_ref::<QmpError>().map(|q| q.desc.clone())
}
