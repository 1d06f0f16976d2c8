//! Progress for people (a bar with rate and time left on a terminal) and for programs
//! (`--json`: one JSON object per line on stdout).

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};

/// Where progress goes.
pub struct Progress {
    /// Emit JSON lines instead of human output.
    json: bool,
    /// The bar while a transfer runs (terminal only).
    bar: Mutex<Option<ProgressBar>>,
    /// Bytes done in the current transfer.
    done: AtomicU64,
    /// Bytes to do in the current transfer.
    total: AtomicU64,
    /// When the current transfer started.
    start: Mutex<Instant>,
    /// Last JSON progress line, to print at most ~4 a second.
    last: Mutex<Instant>,
}

impl Progress {
    /// A reporter; `json` selects JSON lines.
    pub fn new(json: bool) -> Progress {
        Progress {
            json,
            bar: Mutex::new(None),
            done: AtomicU64::new(0),
            total: AtomicU64::new(0),
            start: Mutex::new(Instant::now()),
            last: Mutex::new(Instant::now()),
        }
    }

    /// A message for people (stderr), or an event object for programs.
    pub fn event(&self, kind: &str, msg: &str, data: Value) {
        if self.json {
            let mut v = json!({"event": kind, "message": msg});
            if let (Some(o), Value::Object(d)) = (v.as_object_mut(), data) {
                o.extend(d);
            }
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{v}");
            let _ = out.flush();
        } else if let Some(b) = self.bar.lock().ok().and_then(|g| g.clone()) {
            b.println(msg);
        } else {
            eprintln!("{msg}");
        }
    }

    /// Start a transfer of `total` bytes described by `what`.
    pub fn start(&self, what: &str, total: u64) {
        self.done.store(0, Ordering::Relaxed);
        self.total.store(total, Ordering::Relaxed);
        if let Ok(mut s) = self.start.lock() {
            *s = Instant::now();
        }
        if !self.json && std::io::stderr().is_terminal() {
            let b = ProgressBar::new(total);
            let style = ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
            )
            .map(|s| s.progress_chars("=> "));
            if let Ok(style) = style {
                b.set_style(style);
            }
            b.set_message(what.to_string());
            if let Ok(mut g) = self.bar.lock() {
                *g = Some(b);
            }
        }
        self.tick(true);
    }

    /// `n` more bytes done.
    pub fn add(&self, n: u64) {
        self.done.fetch_add(n, Ordering::Relaxed);
        if let Some(b) = self.bar.lock().ok().and_then(|g| g.clone()) {
            b.inc(n);
        }
        self.tick(false);
    }

    /// Print a JSON progress line (rate limited unless `force`).
    fn tick(&self, force: bool) {
        if !self.json {
            return;
        }
        let Ok(mut last) = self.last.lock() else {
            return;
        };
        if !force && last.elapsed().as_millis() < 250 {
            return;
        }
        *last = Instant::now();
        let done = self.done.load(Ordering::Relaxed);
        let total = self.total.load(Ordering::Relaxed);
        let secs = self
            .start
            .lock()
            .map(|s| s.elapsed().as_secs_f64())
            .unwrap_or(0.0);
        let rate = if secs > 0.0 { done as f64 / secs } else { 0.0 };
        let eta = if rate > 0.0 {
            (total.saturating_sub(done)) as f64 / rate
        } else {
            0.0
        };
        let v = json!({"event": "progress", "done": done, "total": total,
                       "rate": rate as u64, "eta_secs": eta.round() as u64});
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{v}");
        let _ = out.flush();
    }

    /// The transfer ended.
    pub fn finish(&self) {
        self.tick(true);
        if let Some(b) = self.bar.lock().ok().and_then(|mut g| g.take()) {
            b.finish_and_clear();
        }
    }
}
