//! A small synchronous QMP client: greeting, negotiation, commands, and waiting for events.
//! Events that arrive while a command runs are kept (the newest [`MAX_EVENTS`]), so a wait
//! that starts after the command that caused its event still sees it.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::error::{Error, Kind, Result};

/// Longest QMP line accepted from the daemon.
const MAX_LINE: usize = 16 << 20;

/// Events kept for later waits; older ones are dropped (a wait then falls back on its timeout).
const MAX_EVENTS: usize = 4096;

/// A negotiated QMP connection.
pub struct Qmp {
    /// Reader half.
    rd: BufReader<UnixStream>,
    /// Writer half.
    wr: UnixStream,
    /// Bytes of a message not yet complete (a read that timed out keeps what it got).
    partial: Vec<u8>,
    /// Events received and not yet taken by a wait, oldest first.
    events: VecDeque<Value>,
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
            partial: Vec::new(),
            events: VecDeque::new(),
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

    /// Read one JSON message. A read error (also a read timeout) keeps the bytes of a message
    /// begun, so the next call continues it.
    fn read_msg(&mut self) -> Result<Value> {
        loop {
            let room = (MAX_LINE as u64).saturating_sub(self.partial.len() as u64);
            let n = std::io::Read::take(&mut self.rd, room)
                .read_until(b'\n', &mut self.partial)
                .map_err(|e| Error::caused(Kind::Daemon, "reading from QMP", e))?;
            if n == 0 {
                return Err(Error::new(
                    Kind::Daemon,
                    if self.partial.len() >= MAX_LINE {
                        "a QMP message from the daemon is too long"
                    } else {
                        "the daemon closed the QMP connection"
                    },
                ));
            }
            if !self.partial.ends_with(b"\n") && self.partial.len() < MAX_LINE {
                continue;
            }
            let line = std::mem::take(&mut self.partial);
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            return serde_json::from_slice(&line)
                .map_err(|e| Error::caused(Kind::Daemon, "parsing a QMP message", e));
        }
    }

    /// Keep an event for a later [`Qmp::wait_event`].
    fn keep_event(&mut self, ev: Value) {
        if self.events.len() >= MAX_EVENTS {
            self.events.pop_front();
        }
        self.events.push_back(ev);
    }

    /// Forget the kept events `matches` accepts (before a command whose own event a wait
    /// will look for, so an older one of the same kind cannot answer it).
    pub fn drop_events(&mut self, mut matches: impl FnMut(&str, &Value) -> bool) {
        self.events
            .retain(|e| !matches(e["event"].as_str().unwrap_or(""), &e["data"]));
    }

    /// Wait up to `timeout` for an event `matches` accepts (kept ones first, then new ones);
    /// it is taken out of the kept events. `None` when none came in time.
    pub fn wait_event(
        &mut self,
        timeout: Duration,
        mut matches: impl FnMut(&str, &Value) -> bool,
    ) -> Result<Option<Value>> {
        let hit = |ev: &Value, m: &mut dyn FnMut(&str, &Value) -> bool| {
            m(ev["event"].as_str().unwrap_or(""), &ev["data"])
        };
        if let Some(i) = self.events.iter().position(|e| hit(e, &mut matches)) {
            return Ok(self.events.remove(i));
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            self.rd
                .get_ref()
                .set_read_timeout(Some(left))
                .map_err(|e| Error::io(e, "setting QMP timeout"))?;
            let msg = self.read_msg();
            let _ = self.rd.get_ref().set_read_timeout(None);
            let m = match msg {
                Ok(m) => m,
                Err(e) if is_timeout(&e) => return Ok(None),
                Err(e) => return Err(e),
            };
            if m.get("event").is_none() {
                continue;
            }
            if hit(&m, &mut matches) {
                return Ok(Some(m));
            }
            self.keep_event(m);
        }
    }

    /// Run a command; its `return` value, or the daemon's error (kind Daemon, QmpError cause).
    pub fn execute(&mut self, cmd: &str, args: Value) -> Result<Value> {
        let mut all = self.execute_many(&[(cmd, args)])?;
        all.pop()
            .unwrap_or_else(|| Err(Error::new(Kind::Daemon, "no QMP reply")))
    }

    /// Send the commands `cmds` in one write and collect each one's result, in order: one
    /// round trip instead of one per command. A monitor runs the commands of a connection
    /// one after the other, in order, so a later command sees what an earlier one did (or
    /// fails as well if that one failed). The outer error is the connection's.
    pub fn execute_many(&mut self, cmds: &[(&str, Value)]) -> Result<Vec<Result<Value>>> {
        let mut buf = Vec::new();
        for (i, (cmd, args)) in cmds.iter().enumerate() {
            let msg = json!({"execute": cmd, "arguments": args, "id": i});
            serde_json::to_writer(&mut buf, &msg)
                .map_err(|e| Error::caused(Kind::Daemon, "serialising QMP command", e))?;
            buf.push(b'\n');
        }
        let what = cmds.first().map(|(c, _)| *c).unwrap_or("");
        self.wr
            .write_all(&buf)
            .map_err(|e| Error::caused(Kind::Daemon, format!("sending {what}"), e))?;
        let mut out = Vec::with_capacity(cmds.len());
        while out.len() < cmds.len() {
            let m = self.read_msg()?;
            if m.get("event").is_some() {
                self.keep_event(m);
                continue;
            }
            // Replies come in order; an id other than the next one expected is not ours.
            if m.get("id").is_some_and(|id| id != out.len()) {
                return Err(Error::new(Kind::Daemon, "a QMP reply out of order"));
            }
            let cmd = cmds[out.len()].0;
            if let Some(r) = m.get("return") {
                out.push(Ok(r.clone()));
            } else if let Some(e) = m.get("error") {
                let err = QmpError {
                    class: e["class"].as_str().unwrap_or("").to_string(),
                    desc: e["desc"].as_str().unwrap_or("").to_string(),
                };
                tracing_free_log(&err);
                out.push(Err(Error::caused(Kind::Daemon, cmd.to_string(), err)));
            }
        }
        Ok(out)
    }

    /// `query-named-block-nodes` (flat).
    pub fn nodes(&mut self) -> Result<Vec<Value>> {
        let v = self.execute("query-named-block-nodes", json!({"flat": true}))?;
        Ok(v.as_array().cloned().unwrap_or_default())
    }
}

/// Whether `e` is a read that timed out.
fn is_timeout(e: &Error) -> bool {
    std::error::Error::source(e)
        .and_then(|s| s.downcast_ref::<std::io::Error>())
        .is_some_and(|io| {
            matches!(
                io.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            )
        })
}

/// The QMP error description of an error, if it is a daemon refusal.
pub fn qmp_desc(e: &Error) -> Option<String> {
    let src = std::error::Error::source(e)?;
    src.downcast_ref::<QmpError>().map(|q| q.desc.clone())
}
