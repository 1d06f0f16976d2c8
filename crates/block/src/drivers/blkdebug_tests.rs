//! Rule-engine and driver tests of blkdebug (behaviour observed on QEMU 10.0, see
//! shared/reference/blkdebug.md).

use std::sync::Arc;

use super::*;
use crate::drivers::file::FileDriver;
use crate::node::{Node, NodeFlags};

fn inject(event: &str) -> InjectRule {
    InjectRule {
        event: event.to_string(),
        state: 0,
        iotype: None,
        errno: 5,
        sector: -1,
        once: false,
        immediately: true,
    }
}

fn set_state(event: &str, state: i64, new_state: i64) -> SetStateRule {
    SetStateRule {
        event: event.to_string(),
        state,
        new_state,
    }
}

fn engine(inject: Vec<InjectRule>, set_state: Vec<SetStateRule>) -> Engine {
    Engine::new(&BlkdebugOptions {
        inject,
        set_state,
        ..BlkdebugOptions::default()
    })
}

fn errno_of(e: &mut Engine, offset: u64, len: u64, t: IoType) -> Option<i32> {
    e.check(offset, len, t).map(|(errno, _)| errno)
}

#[test]
fn nothing_fails_before_the_event() {
    let mut e = engine(vec![inject("write_aio")], vec![]);
    assert_eq!(errno_of(&mut e, 0, 512, IoType::Write), None);
    e.event("read_aio");
    assert_eq!(errno_of(&mut e, 0, 512, IoType::Write), None);
    e.event("write_aio");
    assert_eq!(errno_of(&mut e, 0, 512, IoType::Write), Some(5));
    // Armed rules stay armed, and the default iotypes include reads but not block-status.
    assert_eq!(errno_of(&mut e, 0, 512, IoType::Write), Some(5));
    assert_eq!(errno_of(&mut e, 0, 512, IoType::Read), Some(5));
    assert_eq!(errno_of(&mut e, 0, 0, IoType::Flush), Some(5));
    assert_eq!(errno_of(&mut e, 0, 512, IoType::BlockStatus), None);
}

#[test]
fn first_listed_rule_wins_and_once_removes_it() {
    let mut a = inject("write_aio");
    a.once = true;
    let mut b = inject("write_aio");
    b.errno = 28;
    let mut e = engine(vec![a, b], vec![]);
    e.event("write_aio");
    assert_eq!(errno_of(&mut e, 0, 512, IoType::Write), Some(5));
    assert_eq!(errno_of(&mut e, 0, 512, IoType::Write), Some(28));
    assert_eq!(errno_of(&mut e, 0, 512, IoType::Write), Some(28));
    // The removed rule is gone for good, also from later arming.
    e.event("write_aio");
    assert_eq!(errno_of(&mut e, 0, 512, IoType::Write), Some(28));
}

#[test]
fn arming_replaces_the_active_set() {
    // A(read_aio, flush) + B(write_aio, read): write arms B, read arms A (B dropped), flush → 5.
    let mut a = inject("read_aio");
    a.iotype = Some(IoType::Flush);
    let mut b = inject("write_aio");
    b.iotype = Some(IoType::Read);
    let mut e = engine(vec![a, b], vec![]);
    e.event("write_aio");
    e.event("read_aio");
    assert_eq!(errno_of(&mut e, 0, 512, IoType::Read), None);
    assert_eq!(errno_of(&mut e, 0, 0, IoType::Flush), Some(5));
}

#[test]
fn sector_must_lie_in_the_request() {
    let mut r = inject("none");
    r.sector = 16;
    let mut e = engine(vec![r], vec![]);
    e.event("none");
    assert_eq!(errno_of(&mut e, 0, 8192, IoType::Read), None);
    assert_eq!(errno_of(&mut e, 8192, 1, IoType::Read), Some(5));
    assert_eq!(errno_of(&mut e, 4096, 4097, IoType::Read), Some(5));
    assert_eq!(errno_of(&mut e, 8193, 512, IoType::Read), None);
    // Zero-length requests (flush) match only rules without a sector.
    assert_eq!(errno_of(&mut e, 0, 0, IoType::Flush), None);
    // Other negative sectors never match.
    let mut r = inject("none");
    r.sector = -2;
    let mut e = engine(vec![r], vec![]);
    e.event("none");
    assert_eq!(errno_of(&mut e, 0, u64::MAX / 2, IoType::Read), None);
}

#[test]
fn zero_or_negative_errno_matches_without_failing() {
    let mut zero = inject("none");
    zero.errno = 0;
    let mut e = engine(vec![zero, inject("none")], vec![]);
    e.event("none");
    // The first matching rule decides: no error, and the second is not looked at.
    assert_eq!(errno_of(&mut e, 0, 512, IoType::Read), None);
    let mut neg = inject("none");
    neg.errno = -5;
    let mut e = engine(vec![neg], vec![]);
    e.event("none");
    assert_eq!(errno_of(&mut e, 0, 512, IoType::Read), None);
}

#[test]
fn states_gate_rules_and_first_set_state_wins() {
    let mut r1 = inject("write_aio");
    r1.state = 2;
    let mut e = engine(
        vec![r1],
        vec![
            set_state("read_aio", 1, 2),
            set_state("read_aio", 0, 7),
            set_state("flush_to_os", 2, 3),
        ],
    );
    assert_eq!(e.state, 1);
    e.event("write_aio");
    assert_eq!(errno_of(&mut e, 0, 512, IoType::Write), None);
    e.event("read_aio");
    assert_eq!(e.state, 2);
    e.event("write_aio");
    assert_eq!(errno_of(&mut e, 0, 512, IoType::Write), Some(5));
    e.event("flush_to_os");
    assert_eq!(e.state, 3);
    // Armed in state 2, it keeps failing in state 3 until another event re-arms.
    assert_eq!(errno_of(&mut e, 0, 512, IoType::Write), Some(5));
    e.event("read_aio");
    assert_eq!(e.state, 7);
}

#[test]
fn rules_of_one_event_see_the_state_before_it() {
    // set-state 1→2 and an inject rule for state 2 on the same event: the rule does not arm.
    let mut r = inject("write_aio");
    r.state = 2;
    let mut e = engine(vec![r], vec![set_state("write_aio", 1, 2)]);
    e.event("write_aio");
    assert_eq!(errno_of(&mut e, 0, 512, IoType::Write), None);
    e.event("write_aio");
    assert_eq!(errno_of(&mut e, 0, 512, IoType::Write), Some(5));
}

#[test]
fn limits_are_checked_with_qemus_texts() {
    let check = |f: &dyn Fn(&mut BlkdebugOptions)| {
        let mut o = BlkdebugOptions::default();
        f(&mut o);
        o.check(1)
    };
    assert_eq!(
        check(&|o| o.align = 3000),
        Err("Cannot meet constraints with align 3000".to_string())
    );
    assert_eq!(
        check(&|o| o.align = 1 << 31),
        Err("Cannot meet constraints with align 2147483648".to_string())
    );
    assert_eq!(
        check(&|o| {
            o.align = 512;
            o.max_transfer = 1000
        }),
        Err("Cannot meet constraints with max-transfer 1000".to_string())
    );
    assert_eq!(check(&|o| o.max_transfer = 100), Ok(()));
    assert_eq!(
        check(&|o| {
            o.align = 4096;
            o.opt_write_zero = 1000
        }),
        Err("Cannot meet constraints with opt-write-zero 1000".to_string())
    );
    assert_eq!(
        check(&|o| {
            o.opt_write_zero = 4096;
            o.max_write_zero = 1000
        }),
        Err("Cannot meet constraints with max-write-zero 1000".to_string())
    );
    assert_eq!(
        check(&|o| {
            o.opt_discard = 4096;
            o.max_discard = 1000
        }),
        Err("Cannot meet constraints with max-discard 1000".to_string())
    );
    assert_eq!(check(&|o| o.max_discard = 4096), Ok(()));
    assert!(check(&|o| o.align = 1 << 30).is_err_and(|e| e.contains("blockd's limit")));
    assert!(check(&|o| o.opt_write_zero = 1 << 30).is_err_and(|e| e.contains("blockd's limit")));
}

/// A blkdebug driver over a 1 MiB host file filled with 0x11.
fn over_file(opts: BlkdebugOptions) -> (tempfile::NamedTempFile, NodeRef, BlkdebugDriver) {
    let f = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(f.path(), vec![0x11u8; 1 << 20]).expect("fill");
    let path = f.path().to_str().expect("utf-8 path").to_string();
    let driver = FileDriver::open(&path, false).expect("open");
    let child = Arc::new(Node::new(
        "f".into(),
        false,
        Box::new(driver),
        Vec::new(),
        false,
        NodeFlags::default(),
    ));
    let bd = BlkdebugDriver::new(child.clone(), opts).expect("blkdebug");
    (f, child, bd)
}

#[test]
fn event_none_is_armed_at_open() {
    let mut r = inject("none");
    r.iotype = Some(IoType::Read);
    r.sector = 8;
    let (_f, _child, bd) = over_file(BlkdebugOptions {
        inject: vec![r],
        ..BlkdebugOptions::default()
    });
    let mut buf = [0u8; 512];
    bd.read(0, &mut buf).expect("sector 0 reads");
    let e = bd.read(4096, &mut buf).expect_err("sector 8 fails");
    assert_eq!(e.raw_os_error(), Some(libc::EIO));
    bd.write(4096, &buf).expect("writes are not failed");
}

#[test]
fn flush_with_nothing_written_is_skipped() {
    let (_f, _child, bd) = over_file(BlkdebugOptions {
        inject: vec![inject("none")],
        ..BlkdebugOptions::default()
    });
    bd.flush().expect("nothing written: skipped");
    assert!(bd.write(0, &[1u8; 512]).is_err());
    let e = bd.flush().expect_err("after a write attempt");
    assert_eq!(e.raw_os_error(), Some(libc::EIO));
}

#[test]
fn unaligned_write_is_read_modify_written_with_rmw_events() {
    // A rule armed by the head RMW event fails the head read, before anything is written.
    let mut r = inject("pwritev_rmw_head");
    r.errno = 28;
    let (_f, child, bd) = over_file(BlkdebugOptions {
        inject: vec![r],
        align: 4096,
        ..BlkdebugOptions::default()
    });
    bd.write(0, &[0x22u8; 4096]).expect("aligned: no RMW");
    let e = bd.write(4097, &[0x33u8; 10]).expect_err("head RMW fails");
    assert_eq!(e.raw_os_error(), Some(libc::ENOSPC));
    let mut buf = vec![0u8; 8192];
    child.read(0, &mut buf).expect("read back");
    assert!(buf[..4096].iter().all(|&b| b == 0x22));
    assert!(buf[4096..].iter().all(|&b| b == 0x11));
}

#[test]
fn unaligned_write_keeps_the_bytes_around_it() {
    let (_f, child, bd) = over_file(BlkdebugOptions {
        align: 4096,
        max_transfer: 4096,
        ..BlkdebugOptions::default()
    });
    bd.write(4000, &[0x44u8; 5000]).expect("write");
    let mut buf = vec![0u8; 12288];
    child.read(0, &mut buf).expect("read back");
    assert!(buf[..4000].iter().all(|&b| b == 0x11));
    assert!(buf[4000..9000].iter().all(|&b| b == 0x44));
    assert!(buf[9000..].iter().all(|&b| b == 0x11));
    let mut part = [0u8; 3];
    bd.read(3999, &mut part).expect("unaligned read");
    assert_eq!(part, [0x11, 0x44, 0x44]);
}

#[test]
fn small_write_zeroes_fall_back_to_zero_writes() {
    // Only write-zeroes of whole opt-write-zero blocks reach the rule as write-zeroes.
    let mut r = inject("none");
    r.iotype = Some(IoType::WriteZeroes);
    let (_f, child, bd) = over_file(BlkdebugOptions {
        inject: vec![r],
        opt_write_zero: 65536,
        ..BlkdebugOptions::default()
    });
    bd.write_zeroes(512, 4096, false).expect("written as data");
    let mut buf = vec![0u8; 4608];
    child.read(0, &mut buf).expect("read back");
    assert!(buf[..512].iter().all(|&b| b == 0x11));
    assert!(buf[512..].iter().all(|&b| b == 0));
    let e = bd.write_zeroes(0, 65536, false).expect_err("whole block");
    assert_eq!(e.raw_os_error(), Some(libc::EIO));
}
