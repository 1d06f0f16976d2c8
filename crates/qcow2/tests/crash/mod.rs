//! The crash-image harness shared by the crash tests: a storage layer that records every write
//! and flush of a run, the power-cut states built from such a record, and the check each state
//! must pass (every bitmap consistent and holding every acknowledged write).
#![allow(dead_code)]

use std::sync::{mpsc, Arc, Mutex};

use super::common::*;
use qcow2::{CreateOptions, MemStorage, OpenOptions, Qcow2, Storage, StoreBitmap};

/// One storage operation of a run.
#[derive(Debug, Clone)]
pub enum Op {
    Write(u64, Vec<u8>),
    Flush,
    Truncate(u64),
}

/// A storage that serves the current contents from memory and records every operation.
pub struct Recorder {
    cur: MemStorage,
    ops: Mutex<Vec<Op>>,
    /// Armed by [`Recorder::hold_next_flush`]: the next flush reports that it started and
    /// waits for the release.
    hold: Mutex<Option<(mpsc::Sender<()>, mpsc::Receiver<()>)>>,
}

impl Recorder {
    pub fn new(base: Vec<u8>) -> Recorder {
        Recorder {
            cur: MemStorage::from_bytes(base),
            ops: Mutex::new(Vec::new()),
            hold: Mutex::new(None),
        }
    }

    /// Make the next flush block: the returned receiver gets a message when it has started, and
    /// the flush completes (and is recorded) once the returned sender sends.
    pub fn hold_next_flush(&self) -> (mpsc::Receiver<()>, mpsc::Sender<()>) {
        let (started_tx, started_rx) = mpsc::channel();
        let (release_tx, release_rx) = mpsc::channel();
        *self.hold.lock().expect("hold") = Some((started_tx, release_rx));
        (started_rx, release_tx)
    }

    /// The current contents: the state a power cut right now leaves if every write landed.
    pub fn contents(&self) -> Vec<u8> {
        self.cur.to_bytes()
    }

    pub fn len(&self) -> usize {
        self.ops.lock().expect("ops").len()
    }

    pub fn ops(&self) -> Vec<Op> {
        self.ops.lock().expect("ops").clone()
    }
}

impl Storage for Recorder {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.cur.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.cur.write_at(buf, offset)?;
        self.ops
            .lock()
            .expect("ops")
            .push(Op::Write(offset, buf.to_vec()));
        Ok(())
    }
    fn size(&self) -> std::io::Result<u64> {
        self.cur.size()
    }
    fn truncate(&self, size: u64) -> std::io::Result<()> {
        self.cur.truncate(size)?;
        self.ops.lock().expect("ops").push(Op::Truncate(size));
        Ok(())
    }
    fn flush(&self) -> std::io::Result<()> {
        let hold = self.hold.lock().expect("hold").take();
        if let Some((started, release)) = hold {
            started.send(()).expect("test waits for the held flush");
            release.recv().expect("test releases the held flush");
        }
        self.ops.lock().expect("ops").push(Op::Flush);
        Ok(())
    }
}

/// What a power cut after `cut` operations may leave: flushed writes kept, each later write
/// kept with probability 1/2 (in issue order); one in four kept writes is torn: only a random
/// subset of its 512-byte sectors lands.
pub fn crash_state(base: &[u8], ops: &[Op], cut: usize, rng: &mut Rng) -> Vec<u8> {
    let durable = ops[..cut]
        .iter()
        .rposition(|o| matches!(o, Op::Flush))
        .unwrap_or(0);
    let mut img = base.to_vec();
    for (i, op) in ops[..cut].iter().enumerate() {
        match op {
            Op::Write(off, data) if i < durable || rng.below(2) == 0 => {
                let end = *off as usize + data.len();
                if img.len() < end {
                    img.resize(end, 0);
                }
                let torn = i >= durable && data.len() > 512 && rng.below(4) == 0;
                for (k, sector) in data.chunks(512).enumerate() {
                    if torn && rng.below(2) == 0 {
                        continue;
                    }
                    let at = *off as usize + k * 512;
                    img[at..at + sector.len()].copy_from_slice(sector);
                }
            }
            Op::Truncate(size) => img.resize(*size as usize, 0),
            _ => {}
        }
    }
    img
}

/// A power cut after `cut` operations with no torn write: the flushed writes kept, and the
/// later ones too when `keep_unflushed`.
pub fn durable_state(base: &[u8], ops: &[Op], cut: usize, keep_unflushed: bool) -> Vec<u8> {
    let durable = ops[..cut]
        .iter()
        .rposition(|o| matches!(o, Op::Flush))
        .unwrap_or(0);
    let mut img = base.to_vec();
    for (i, op) in ops[..cut].iter().enumerate() {
        match op {
            Op::Write(off, data) if i < durable || keep_unflushed => {
                let end = *off as usize + data.len();
                if img.len() < end {
                    img.resize(end, 0);
                }
                img[*off as usize..end].copy_from_slice(data);
            }
            Op::Truncate(size) => img.resize(*size as usize, 0),
            _ => {}
        }
    }
    img
}

/// The states a power cut right after operation `cut - 1` leaves when that operation is a
/// write of at most 8 sectors that tears: every earlier write landed, and each subset of the
/// last write's 512-byte sectors (empty when that operation is no such write).
pub fn torn_states(base: &[u8], ops: &[Op], cut: usize) -> Vec<Vec<u8>> {
    let Some(Op::Write(off, data)) = cut.checked_sub(1).map(|i| &ops[i]) else {
        return Vec::new();
    };
    let sectors = data.len().div_ceil(512);
    if !(2..=8).contains(&sectors) {
        return Vec::new();
    }
    let before = durable_state(base, ops, cut - 1, true);
    (1..(1u32 << sectors) - 1)
        .map(|subset| {
            let mut img = before.clone();
            let end = *off as usize + data.len();
            if img.len() < end {
                img.resize(end, 0);
            }
            for (k, sector) in data.chunks(512).enumerate() {
                if subset & (1 << k) != 0 {
                    let at = *off as usize + k * 512;
                    img[at..at + sector.len()].copy_from_slice(sector);
                }
            }
            img
        })
        .collect()
}

pub const DISK: u64 = 64 << 20;
pub const REGION: u64 = 1 << 20;
/// The bitmaps of the run: (name, granularity, recording).
pub const BITMAPS: &[(&str, u64, bool)] = &[
    ("b64k", 64 << 10, true),
    ("b512", 512, true),
    ("b1m", 1 << 20, true),
    ("off", 64 << 10, false),
];

/// The model of one bitmap: set granules.
pub fn mark(bits: &mut [bool], g: u64, off: u64, len: u64) {
    for i in off / g..=(off + len - 1) / g {
        bits[i as usize] = true;
    }
}

pub fn to_bytes(bits: &[bool]) -> Vec<u8> {
    let mut out = vec![0u8; bits.len().div_ceil(8)];
    for (i, &b) in bits.iter().enumerate() {
        if b {
            out[i / 8] |= 1 << (i % 8);
        }
    }
    out
}

pub fn bit(data: &[u8], i: usize) -> bool {
    data.get(i / 8).is_some_and(|b| b & (1 << (i % 8)) != 0)
}

/// A fresh image with the run's bitmaps stored (empty), as bytes.
pub fn base_image() -> Vec<u8> {
    let st = Arc::new(MemStorage::new());
    Qcow2::create(
        st.as_ref(),
        &CreateOptions {
            size: DISK,
            ..Default::default()
        },
    )
    .expect("create");
    let img = Qcow2::open(st.clone(), OpenOptions::default()).expect("open");
    let list: Vec<StoreBitmap> = BITMAPS
        .iter()
        .map(|(n, g, rec)| StoreBitmap {
            name: n.to_string(),
            granularity: *g,
            auto: *rec,
            inconsistent_keep_in_use: false,
            data: Vec::new(),
        })
        .collect();
    img.store_bitmaps(&list, false).expect("store");
    img.close().expect("close");
    st.to_bytes()
}

/// A write the run saw acknowledged: (operations recorded when it returned, offset, length).
pub type Acked = (usize, u64, u64);

/// Open a crash state and check every bitmap is consistent and covers `must` (writes acked
/// before the cut). Returns the extra dirty bytes of the 64 KiB bitmap beyond `must`, and
/// whether the bitmaps had to be recovered from the log.
pub fn check_state(state: Vec<u8>, must: &[(u64, u64)]) -> (u64, bool) {
    let st = Arc::new(MemStorage::from_bytes(state));
    let img = Qcow2::open(st, OpenOptions::default()).expect("crash state opens");
    let loaded = img.load_bitmaps().expect("crash state loads its bitmaps");
    assert_eq!(loaded.len(), BITMAPS.len());
    let mut extra = 0;
    let recovered = loaded.iter().any(|b| b.recovered);
    for (name, g, recording) in BITMAPS {
        let b = loaded
            .iter()
            .find(|b| &b.name == name)
            .expect("bitmap present");
        assert!(
            !b.inconsistent,
            "bitmap {name} came back inconsistent after a power cut"
        );
        let mut want = vec![false; DISK.div_ceil(*g) as usize];
        if *recording {
            for &(off, len) in must {
                mark(&mut want, *g, off, len);
            }
        }
        for (i, &w) in want.iter().enumerate() {
            assert!(
                !w || bit(&b.data, i),
                "bitmap {name} misses granule {i} written and acknowledged before the cut"
            );
        }
        if *g == 64 << 10 && *recording {
            let have = (0..want.len()).filter(|&i| bit(&b.data, i)).count();
            let need = want.iter().filter(|&&w| w).count();
            extra += (have - need) as u64 * g;
        }
    }
    (extra, recovered)
}

/// `qemu-img check` of a state: no errors (leaks, which any crash of a qcow2 writer may leave,
/// are counted, not failed).
pub fn qemu_check(dir: &TempDir, state: &[u8]) -> bool {
    let path = dir.path("state.qcow2");
    std::fs::write(&path, state).expect("write state");
    let out = std::process::Command::new("qemu-img")
        .args(["check", "-f", "qcow2", path.to_str().expect("p")])
        .output()
        .expect("qemu-img is required for this test");
    let text = String::from_utf8_lossy(&out.stdout);
    let code = out.status.code().unwrap_or(-1);
    assert!(
        code == 0 || code == 3,
        "qemu-img check found errors in a crash state (exit {code}):\n{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    code == 3
}

pub fn require_qemu() {
    assert!(
        std::process::Command::new("qemu-img")
            .arg("--version")
            .output()
            .is_ok(),
        "qemu-img is required (oracle of this test)"
    );
}
