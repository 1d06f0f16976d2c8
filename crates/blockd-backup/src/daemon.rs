//! Starting a storage daemon of our own: for a stopped disk (an image file instead of a QMP
//! socket) and for `mount`. blockd by default (`target/release/blockd` beside this binary,
//! else `blockd` on PATH); `BLOCKD_BACKUP_DAEMON` names another (e.g. qemu-storage-daemon,
//! which takes the same command line).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};

use crate::error::{Error, Kind, Result};
use crate::qmp::Qmp;

/// A daemon we started; `quit` on drop (stores persistent bitmaps), killed if it hangs.
pub struct Daemon {
    /// The process.
    child: Child,
    /// Its QMP socket.
    pub qmp_path: PathBuf,
}

/// The daemon binary to run.
pub fn binary() -> PathBuf {
    if let Some(p) = std::env::var_os("BLOCKD_BACKUP_DAEMON") {
        return PathBuf::from(p);
    }
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
    {
        let b = dir.join("blockd");
        if b.exists() {
            return b;
        }
    }
    PathBuf::from("blockd")
}

/// "qcow2" or "raw", by the file's magic.
pub fn probe_format(path: &Path) -> Result<&'static str> {
    use std::io::Read;
    let mut magic = [0u8; 4];
    let mut f = std::fs::File::open(path)
        .map_err(|e| Error::io(e, format!("opening {}", path.display())))?;
    let n = f
        .read(&mut magic)
        .map_err(|e| Error::io(e, format!("reading {}", path.display())))?;
    Ok(if n == 4 && &magic == b"QFI\xfb" {
        "qcow2"
    } else {
        "raw"
    })
}

/// A node-name made from a file name (letters, digits, `-`, `_`; starting with a letter).
pub fn disk_name_for(path: &Path) -> String {
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut s: String = stem
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if !s.starts_with(|c: char| c.is_ascii_alphabetic()) {
        s.insert(0, 'd');
    }
    s
}

impl Daemon {
    /// Start the daemon with `nodes` (blockdev JSON objects) and extra arguments; connect.
    pub fn start(work: &Path, nodes: &[Value], extra: &[String]) -> Result<(Daemon, Qmp)> {
        std::fs::create_dir_all(work)
            .map_err(|e| Error::io(e, format!("creating {}", work.display())))?;
        let qmp_path = work.join(format!("bb-qmp-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&qmp_path);
        let bin = binary();
        let mut cmd = Command::new(&bin);
        cmd.arg("--chardev")
            .arg(format!(
                "socket,id=bbm,path={},server=on,wait=off",
                qmp_path.display()
            ))
            .arg("--monitor")
            .arg("chardev=bbm")
            .arg("--pidfile")
            .arg(work.join(format!("bb-daemon-{}.pid", std::process::id())));
        for n in nodes {
            cmd.arg("--blockdev").arg(n.to_string());
        }
        cmd.args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        let child = cmd
            .spawn()
            .map_err(|e| Error::caused(Kind::Daemon, format!("starting {}", bin.display()), e))?;
        let mut d = Daemon { child, qmp_path };
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let q = loop {
            if let Ok(Some(st)) = d.child.try_wait() {
                return Err(Error::new(
                    Kind::Daemon,
                    format!("{} exited at start-up ({st})", bin.display()),
                ));
            }
            match Qmp::connect(&d.qmp_path, Duration::from_millis(200)) {
                Ok(q) => break q,
                Err(_) if d.started_recently() && std::time::Instant::now() < deadline => continue,
                Err(e) => return Err(e),
            }
        };
        Ok((d, q))
    }

    /// Whether the daemon may still be starting (bounded by the connect retries).
    fn started_recently(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Quit daemons left running by a killed run of the tool (their QMP sockets in `work`
    /// carry the dead tool's pid), so the image lock is free again. Returns what was quit.
    pub fn reap_leftovers(work: &Path) -> Vec<String> {
        let mut done = Vec::new();
        let Ok(rd) = std::fs::read_dir(work) else {
            return done;
        };
        for ent in rd.flatten() {
            let name = ent.file_name().to_string_lossy().into_owned();
            let Some(pid) = name
                .strip_prefix("bb-qmp-")
                .and_then(|r| r.strip_suffix(".sock"))
                .and_then(|p| p.parse::<i32>().ok())
            else {
                continue;
            };
            // SAFETY: kill with signal 0 only checks whether the process exists.
            if pid == std::process::id() as i32 || unsafe { libc::kill(pid, 0) } == 0 {
                continue;
            }
            let path = ent.path();
            let pidfile = work.join(format!("bb-daemon-{pid}.pid"));
            let daemon_pid = std::fs::read_to_string(&pidfile)
                .ok()
                .and_then(|s| s.trim().parse::<i32>().ok())
                .filter(|p| *p > 0);
            if let Ok(mut q) = Qmp::connect(&path, Duration::from_millis(500)) {
                let _ = q.execute("quit", json!({}));
                // Wait until the process is gone (it holds the image lock until then, and
                // stores the bitmaps as it closes): as long as a run's own daemon gets.
                wait_gone(daemon_pid, Some(&path), QUIT_WAIT_MS);
                done.push(format!("daemon left by run {pid}"));
            } else if let Some(dp) = daemon_pid.filter(|&p| started_with(p, &path)) {
                // Alive but not answering: it still holds the image; end it by signal (only
                // the process started with this socket: a pid can be reused). SIGTERM closes
                // cleanly (bitmaps stored), SIGCONT first in case it is stopped; SIGKILL only
                // if it has not gone when a clean quit would have.
                // SAFETY: signalling a process we started (its command line names our socket).
                unsafe {
                    libc::kill(dp, libc::SIGCONT);
                    libc::kill(dp, libc::SIGTERM);
                }
                if !wait_gone(Some(dp), None, QUIT_WAIT_MS) {
                    // SAFETY: as above.
                    unsafe { libc::kill(dp, libc::SIGKILL) };
                    wait_gone(Some(dp), None, 5_000);
                }
                done.push(format!(
                    "daemon left by run {pid} (not answering: terminated)"
                ));
            }
            let _ = std::fs::remove_file(&path);
            let _ = std::fs::remove_file(&pidfile);
        }
        done
    }

    /// Start on an image file: node `name` (qcow2 or raw) over a `file` node.
    pub fn on_image(
        work: &Path,
        image: &Path,
        name: &str,
        read_only: bool,
    ) -> Result<(Daemon, Qmp)> {
        let fmt = probe_format(image)?;
        let abs = std::fs::canonicalize(image)
            .map_err(|e| Error::io(e, format!("resolving {}", image.display())))?;
        let file = json!({"driver": "file", "node-name": format!("{name}-file"),
                          "filename": abs.to_string_lossy(), "read-only": read_only});
        let fmtnode = json!({"driver": fmt, "node-name": name, "file": format!("{name}-file"), "read-only": read_only});
        Daemon::start(work, &[file, fmtnode], &[])
    }

    /// The pidfile the daemon writes.
    fn pidfile(&self) -> PathBuf {
        self.qmp_path
            .with_file_name(format!("bb-daemon-{}.pid", std::process::id()))
    }

    /// Wait for the daemon to exit by itself (e.g. after a signal), polling `stop`.
    pub fn wait_until(&mut self, stop: impl Fn() -> bool) -> Result<()> {
        loop {
            if let Ok(Some(_)) = self.child.try_wait() {
                return Ok(());
            }
            if stop() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Quit cleanly (the daemon stores persistent bitmaps), then reap.
    pub fn quit(mut self, q: Option<&mut Qmp>) -> Result<()> {
        if let Some(q) = q {
            let _ = q.execute("quit", json!({}));
        }
        // Closing stores the persistent bitmaps: give a large image time.
        for _ in 0..QUIT_WAIT_MS / 100 {
            if let Ok(Some(st)) = self.child.try_wait() {
                let _ = std::fs::remove_file(&self.qmp_path);
                let _ = std::fs::remove_file(self.pidfile());
                return if st.success() {
                    Ok(())
                } else {
                    Err(Error::new(Kind::Daemon, format!("daemon exited with {st}")))
                };
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(Error::new(Kind::Daemon, "daemon did not quit"))
    }
}

/// How long a daemon may take to quit cleanly (it stores the persistent bitmaps as it closes).
const QUIT_WAIT_MS: u64 = 120_000;

/// Wait up to `ms` until process `pid` (if known) is gone and `socket` (if given) removed;
/// returns whether they are.
fn wait_gone(pid: Option<i32>, socket: Option<&Path>, ms: u64) -> bool {
    for i in 0..=ms / 50 {
        // SAFETY: signal 0 only checks whether the process exists.
        let alive = pid.is_some_and(|p| unsafe { libc::kill(p, 0) } == 0);
        if !alive && !socket.is_some_and(|s| s.exists()) {
            return true;
        }
        if i < ms / 50 {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    false
}

/// Whether process `pid` runs with `socket` on its command line (a daemon a run started).
fn started_with(pid: i32, socket: &Path) -> bool {
    let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let want = socket.to_string_lossy();
    cmd.split(|&b| b == 0)
        .any(|arg| String::from_utf8_lossy(arg).contains(want.as_ref()))
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: signalling our own child process by its pid.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
            for _ in 0..50 {
                if let Ok(Some(_)) = self.child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = std::fs::remove_file(&self.qmp_path);
    }
}
