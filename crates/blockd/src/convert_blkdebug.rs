//! `blkdebug` options: the schema-checked members → `block::drivers::blkdebug` options, with
//! QEMU's refusals (empty rule lists, negative limits) and blockd's own (`config` files,
//! child permissions, which blockd does not model).

use block::drivers::blkdebug::{BlkdebugOptions, InjectRule, IoType, SetStateRule};
use block::graph::DriverOptions;
use qapi::types::{BlkdebugIOType, BlockdevOptionsBlkdebug};
use serde_json::{Map, Value};

fn io_type(t: BlkdebugIOType) -> IoType {
    match t {
        BlkdebugIOType::Read => IoType::Read,
        BlkdebugIOType::Write => IoType::Write,
        BlkdebugIOType::WriteZeroes => IoType::WriteZeroes,
        BlkdebugIOType::Discard => IoType::Discard,
        BlkdebugIOType::Flush => IoType::Flush,
        BlkdebugIOType::BlockStatus => IoType::BlockStatus,
    }
}

/// A limit given as a size: negative values are out of range (QEMU's text), absent is 0.
fn size(v: Option<i64>, name: &str) -> Result<u64, String> {
    let v = v.unwrap_or(0);
    u64::try_from(v).map_err(|_| format!("Value '{v}' is out of range for parameter '{name}'"))
}

/// `blkdebug` members → driver options.
pub fn driver_options(members: &Map<String, Value>) -> Result<DriverOptions, String> {
    // QEMU's option parser never consumes an empty list, and complains about it by name.
    for key in [
        "inject-error",
        "set-state",
        "take-child-perms",
        "unshare-child-perms",
    ] {
        if matches!(members.get(key), Some(Value::Array(a)) if a.is_empty()) {
            return Err(format!(
                "Block protocol 'blkdebug' doesn't support the option '{key}'"
            ));
        }
    }
    let o = BlockdevOptionsBlkdebug::from_members(members)?;
    if o.config.is_some() {
        return Err(
            "blkdebug: 'config' rule files are not supported by blockd; \
                    give the rules as 'inject-error' and 'set-state'"
                .to_string(),
        );
    }
    for (key, list) in [
        ("take-child-perms", &o.take_child_perms),
        ("unshare-child-perms", &o.unshare_child_perms),
    ] {
        if list.is_some() {
            return Err(format!(
                "blkdebug: '{key}' is not supported by blockd (it has no permission model)"
            ));
        }
    }
    let inject = o
        .inject_error
        .iter()
        .flatten()
        .map(|r| InjectRule {
            event: r.event.clone(),
            state: r.state.unwrap_or(0),
            iotype: r.iotype.map(io_type),
            errno: r.errno.unwrap_or(i64::from(libc::EIO)),
            sector: r.sector.unwrap_or(-1),
            once: r.once.unwrap_or(false),
            immediately: r.immediately.unwrap_or(false),
        })
        .collect();
    let set_state = o
        .set_state
        .iter()
        .flatten()
        .map(|r| SetStateRule {
            event: r.event.clone(),
            state: r.state.unwrap_or(0),
            new_state: r.new_state,
        })
        .collect();
    let opts = BlkdebugOptions {
        inject,
        set_state,
        align: size(o.align, "align")?,
        max_transfer: size(o.max_transfer.map(i64::from), "max-transfer")?,
        opt_write_zero: size(o.opt_write_zero.map(i64::from), "opt-write-zero")?,
        max_write_zero: size(o.max_write_zero.map(i64::from), "max-write-zero")?,
        opt_discard: size(o.opt_discard.map(i64::from), "opt-discard")?,
        max_discard: size(o.max_discard.map(i64::from), "max-discard")?,
    };
    Ok(DriverOptions::Blkdebug {
        image: super::child_ref(&o.image)?,
        opts,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            other => panic!("not an object: {other}"),
        }
    }

    #[test]
    fn defaults_follow_qemu() {
        let d = driver_options(&members(serde_json::json!({
            "image": "n0", "inject-error": [{"event": "write_aio"}],
            "set-state": [{"event": "none", "new_state": 2}]
        })))
        .expect("valid");
        let DriverOptions::Blkdebug { opts, .. } = d else {
            panic!("not blkdebug")
        };
        let r = &opts.inject[0];
        assert_eq!(
            (r.state, r.errno, r.sector, r.once, r.iotype),
            (0, 5, -1, false, None)
        );
        assert_eq!(opts.set_state[0].new_state, 2);
    }

    #[test]
    fn refusals_name_the_option() {
        let err = |v: Value| driver_options(&members(v)).expect_err("refused");
        assert_eq!(
            err(serde_json::json!({"image": "n0", "inject-error": []})),
            "Block protocol 'blkdebug' doesn't support the option 'inject-error'"
        );
        assert_eq!(
            err(serde_json::json!({"image": "n0", "align": -1})),
            "Value '-1' is out of range for parameter 'align'"
        );
        assert_eq!(
            err(serde_json::json!({"image": "n0", "max-transfer": -1})),
            "Value '-1' is out of range for parameter 'max-transfer'"
        );
        assert!(err(serde_json::json!({"image": "n0", "config": "/x"})).contains("'config'"));
        assert!(
            err(serde_json::json!({"image": "n0", "take-child-perms": ["write"]}))
                .contains("'take-child-perms'")
        );
    }
}
