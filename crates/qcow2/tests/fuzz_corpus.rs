//! Runs the fuzz corpus, and deterministic mutations of it, through the fuzz entry point.

mod common;

use common::Rng;

/// The seed corpus files.
fn corpus() -> Vec<(String, Vec<u8>)> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/open_read");
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .expect("corpus dir")
        .map(|e| {
            let p = e.expect("entry").path();
            (p.display().to_string(), std::fs::read(&p).expect("read"))
        })
        .collect();
    out.sort();
    out
}

#[test]
fn corpus_images_open_and_read_without_panicking() {
    let files = corpus();
    assert!(files.len() >= 5, "corpus is missing");
    for (name, bytes) in files {
        eprintln!("{name}");
        qcow2::fuzzing::open_and_read(&bytes);
        qcow2::fuzzing::open_and_write(&bytes);
    }
}

#[test]
fn mutated_corpus_images_never_panic() {
    for (name, bytes) in corpus() {
        let mut rng = Rng(bytes.len() as u64 ^ 0xfeed);
        for _ in 0..300 {
            let mut m = bytes.clone();
            for _ in 0..1 + rng.below(4) {
                // Mostly the header cluster, sometimes anywhere (tables, directory, data).
                let pos = if rng.below(3) == 0 {
                    rng.below(m.len() as u64)
                } else {
                    rng.below(512.min(m.len() as u64))
                } as usize;
                match rng.below(4) {
                    0 => m[pos] ^= 1 << rng.below(8),
                    1 => m[pos] = 0xff,
                    2 => m[pos] = 0,
                    _ => m[pos] = rng.next() as u8,
                }
            }
            if rng.below(20) == 0 {
                let cut = rng.below(m.len() as u64) as usize;
                m.truncate(cut);
            }
            qcow2::fuzzing::open_and_read(&m);
            qcow2::fuzzing::open_and_write(&m);
        }
        eprintln!("{name}: 300 mutations ok");
    }
}
