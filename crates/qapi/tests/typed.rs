//! Typed commands, replies and events agree with the schema.

use qapi::types::*;
use qapi::{Schema, COMMAND_NOT_FOUND};
use serde::Serialize;
use serde_json::{json, Map, Value};

fn obj(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        other => panic!("not an object: {other}"),
    }
}

/// A valid argument object for every command.
fn examples() -> Vec<(&'static str, Value)> {
    vec![
        ("qmp_capabilities", json!({"enable": ["oob"]})),
        ("query-version", json!({})),
        ("query-commands", json!({})),
        ("quit", json!({})),
        ("query-qmp-schema", json!({})),
        (
            "human-monitor-command",
            json!({"command-line": "qemu-io drive0 \"write 0 64k\""}),
        ),
        ("query-block", json!({})),
        ("query-named-block-nodes", json!({"flat": true})),
        (
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": "drive0", "discard": "unmap", "cache": {"direct": true},
                   "file": {"driver": "file", "filename": "/tmp/x.qcow2"}, "backing": null}),
        ),
        (
            "blockdev-reopen",
            json!({"options": [{"driver": "null-co", "node-name": "n0", "read-only": true}]}),
        ),
        ("blockdev-del", json!({"node-name": "drive0"})),
        (
            "blockdev-create",
            json!({"job-id": "c0", "options": {"driver": "qcow2", "file": "f0", "size": 1073741824u64}}),
        ),
        (
            "block-dirty-bitmap-add",
            json!({"node": "drive0", "name": "b0", "granularity": 65536, "persistent": true}),
        ),
        (
            "block-dirty-bitmap-remove",
            json!({"node": "drive0", "name": "b0"}),
        ),
        (
            "block-dirty-bitmap-clear",
            json!({"node": "drive0", "name": "b0"}),
        ),
        (
            "block-dirty-bitmap-enable",
            json!({"node": "drive0", "name": "b0"}),
        ),
        (
            "block-dirty-bitmap-disable",
            json!({"node": "drive0", "name": "b0"}),
        ),
        (
            "block-dirty-bitmap-merge",
            json!({"node": "drive0", "target": "b0", "bitmaps": ["b1", {"node": "other", "name": "b2"}]}),
        ),
        (
            "transaction",
            json!({"actions": [
                {"type": "block-dirty-bitmap-add", "data": {"node": "drive0", "name": "b0"}},
                {"type": "blockdev-backup", "data": {"device": "drive0", "target": "t", "sync": "full"}},
                {"type": "abort", "data": {}}
            ], "properties": {"completion-mode": "grouped"}}),
        ),
        (
            "x-debug-block-dirty-bitmap-sha256",
            json!({"node": "drive0", "name": "b0"}),
        ),
        ("query-block-jobs", json!({})),
        (
            "block-job-set-speed",
            json!({"device": "j0", "speed": 1048576}),
        ),
        ("block-job-cancel", json!({"device": "j0", "force": true})),
        ("block-job-pause", json!({"device": "j0"})),
        ("block-job-resume", json!({"device": "j0"})),
        ("block-job-complete", json!({"device": "j0"})),
        ("block-job-dismiss", json!({"id": "j0"})),
        ("block-job-finalize", json!({"id": "j0"})),
        (
            "blockdev-backup",
            json!({"job-id": "j0", "device": "drive0", "target": "t0", "sync": "incremental",
                   "bitmap": "b0", "bitmap-mode": "on-success", "speed": 0, "compress": false,
                   "on-source-error": "report", "on-target-error": "stop", "auto-finalize": true,
                   "auto-dismiss": false, "filter-node-name": "cbw", "discard-source": false,
                   "x-perf": {"use-copy-range": false, "max-workers": 2, "max-chunk": 0, "min-cluster-size": 65536}}),
        ),
        (
            "drive-backup",
            json!({"job-id": "j0", "device": "drive0", "target": "/tmp/b.qcow2", "sync": "full",
                   "format": "qcow2", "mode": "existing"}),
        ),
        ("query-jobs", json!({})),
        ("job-pause", json!({"id": "j0"})),
        ("job-resume", json!({"id": "j0"})),
        ("job-cancel", json!({"id": "j0"})),
        ("job-complete", json!({"id": "j0"})),
        ("job-dismiss", json!({"id": "j0"})),
        ("job-finalize", json!({"id": "j0"})),
        (
            "nbd-server-start",
            json!({"addr": {"type": "unix", "data": {"path": "/tmp/nbd.sock"}}, "max-connections": 4}),
        ),
        (
            "nbd-server-add",
            json!({"device": "drive0", "writable": true, "bitmap": "b0"}),
        ),
        (
            "nbd-server-remove",
            json!({"name": "drive0", "mode": "hard"}),
        ),
        ("nbd-server-stop", json!({})),
        (
            "block-export-add",
            json!({"type": "nbd", "id": "e0", "node-name": "drive0", "writable": true, "bitmaps": ["b0"]}),
        ),
        ("block-export-del", json!({"id": "e0", "mode": "safe"})),
        ("query-block-exports", json!({})),
        (
            "blockdev-snapshot-sync",
            json!({"node-name": "n0", "snapshot-file": "/tmp/s.qcow2",
                   "snapshot-node-name": "s0", "format": "qcow2", "mode": "absolute-paths"}),
        ),
        ("blockdev-snapshot", json!({"node": "n0", "overlay": "o0"})),
        (
            "blockdev-snapshot-internal-sync",
            json!({"device": "n0", "name": "s"}),
        ),
        (
            "blockdev-snapshot-delete-internal-sync",
            json!({"device": "n0", "id": "1", "name": "s"}),
        ),
    ]
}

#[test]
fn command_enum_covers_exactly_the_schema_commands() {
    let mut schema: Vec<&str> = Schema::get().commands();
    let mut typed: Vec<&str> = Command::NAMES.to_vec();
    schema.sort_unstable();
    typed.sort_unstable();
    assert_eq!(schema, typed);
}

#[test]
fn every_command_has_an_example_that_parses_to_its_variant() {
    let examples = examples();
    for name in Command::NAMES {
        let (_, args) = examples
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("no example for {name}"));
        let cmd = parse_command(name, obj(args.clone())).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(cmd.name(), *name);
    }
}

#[test]
fn typed_arguments_serialize_back_to_the_input() {
    for (name, args) in examples() {
        let cmd = parse_command(name, obj(args.clone())).unwrap();
        let back = match &cmd {
            Command::BlockdevAdd(o) => serde_json::to_value(o).unwrap(),
            Command::BlockdevCreate(o) => serde_json::to_value(o).unwrap(),
            Command::BlockdevReopen(o) => serde_json::to_value(o).unwrap(),
            Command::BlockExportAdd(o) => serde_json::to_value(o).unwrap(),
            Command::BlockDirtyBitmapMerge(o) => serde_json::to_value(o).unwrap(),
            Command::NbdServerStart(o) => serde_json::to_value(o).unwrap(),
            _ => continue,
        };
        assert_eq!(back, args, "{name}");
    }
}

#[test]
fn unknown_command_is_command_not_found() {
    let e = parse_command("no-such-command", Map::new()).unwrap_err();
    assert_eq!(e.class, COMMAND_NOT_FOUND);
    assert_eq!(e.desc, "The command no-such-command has not been found");
}

#[test]
fn blockdev_add_nested_definition_is_typed() {
    let cmd = parse_command(
        "blockdev-add",
        obj(json!({"driver": "qcow2", "node-name": "q", "file": {"driver": "file", "filename": "/x", "aio": "native"}})),
    )
    .unwrap();
    let Command::BlockdevAdd(opts) = cmd else {
        panic!("wrong variant")
    };
    assert_eq!(opts.node_name.as_deref(), Some("q"));
    let BlockdevDriverOptions::Qcow2(q) = opts.driver else {
        panic!("not qcow2")
    };
    let BlockdevRef::Definition(file) = q.file else {
        panic!("not a definition")
    };
    let BlockdevDriverOptions::File(f) = file.driver else {
        panic!("not file")
    };
    assert_eq!(f.filename, "/x");
    assert_eq!(f.aio, Some(BlockdevAioOptions::Native));
}

#[test]
fn unimplemented_driver_is_kept_as_other_with_its_members() {
    let cmd = parse_command(
        "blockdev-add",
        obj(json!({"driver": "host_cdrom", "node-name": "c", "filename": "/dev/sr0"})),
    )
    .unwrap();
    let Command::BlockdevAdd(opts) = cmd else {
        panic!("wrong variant")
    };
    assert_eq!(
        opts.driver,
        BlockdevDriverOptions::Other {
            driver: BlockdevDriver::HostCdrom,
            options: obj(json!({"filename": "/dev/sr0"}))
        }
    );
}

#[test]
fn negative_value_for_unsigned_member_wraps_like_qemu() {
    let cmd = parse_command(
        "blockdev-add",
        obj(json!({"driver": "null-co", "node-name": "n", "latency-ns": -1})),
    )
    .unwrap();
    let Command::BlockdevAdd(opts) = cmd else {
        panic!("wrong variant")
    };
    let BlockdevDriverOptions::NullCo(n) = opts.driver else {
        panic!("not null-co")
    };
    assert_eq!(n.latency_ns, Some(u64::MAX));
}

#[test]
fn merge_accepts_local_and_external_bitmaps() {
    let cmd = parse_command(
        "block-dirty-bitmap-merge",
        obj(json!({"node": "n", "target": "t", "bitmaps": ["a", {"node": "m", "name": "b"}]})),
    )
    .unwrap();
    let Command::BlockDirtyBitmapMerge(m) = cmd else {
        panic!("wrong variant")
    };
    assert_eq!(
        m.bitmaps,
        vec![
            BlockDirtyBitmapOrStr::Local("a".into()),
            BlockDirtyBitmapOrStr::External(BlockDirtyBitmap {
                node: "m".into(),
                name: "b".into()
            })
        ]
    );
}

#[test]
fn driver_names_match_the_schema_enum() {
    let schema = Schema::get();
    let drivers: Vec<String> = schema
        .introspect()
        .as_array()
        .unwrap()
        .iter()
        .find(|e| {
            e["meta-type"] == "enum"
                && e["values"]
                    .as_array()
                    .is_some_and(|v| v.contains(&json!("qcow2")) && v.contains(&json!("vvfat")))
        })
        .map(|e| {
            e["values"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap().to_owned())
                .collect()
        })
        .unwrap();
    for name in &drivers {
        let d: BlockdevDriver = serde_json::from_value(json!(name)).unwrap();
        assert_eq!(d.as_str(), name);
    }
    assert_eq!(drivers.len(), 42);
}

fn assert_matches_type<T: Serialize>(type_name: &str, value: &T) {
    let v = serde_json::to_value(value).unwrap();
    if let Err(e) = Schema::get().check_type(type_name, &v) {
        panic!("{type_name}: {e}\n{v}");
    }
}

fn sample_image() -> ImageInfo {
    ImageInfo {
        filename: "/x.qcow2".into(),
        format: "qcow2".into(),
        dirty_flag: Some(false),
        actual_size: Some(200704),
        virtual_size: 1 << 30,
        cluster_size: Some(65536),
        encrypted: None,
        compressed: None,
        backing_filename: Some("base.qcow2".into()),
        full_backing_filename: Some("/base.qcow2".into()),
        backing_filename_format: Some("qcow2".into()),
        snapshots: Some(vec![SnapshotInfo {
            id: "1".into(),
            name: "s".into(),
            vm_state_size: 0,
            date_sec: 1,
            date_nsec: 2,
            vm_clock_sec: 0,
            vm_clock_nsec: 0,
            icount: None,
        }]),
        format_specific: Some(ImageInfoSpecific::Qcow2(ImageInfoSpecificQCow2 {
            compat: "1.1".into(),
            data_file: None,
            data_file_raw: None,
            extended_l2: Some(false),
            lazy_refcounts: Some(false),
            corrupt: Some(false),
            refcount_bits: 16,
            bitmaps: Some(vec![Qcow2BitmapInfo {
                name: "b0".into(),
                granularity: 65536,
                flags: vec![Qcow2BitmapInfoFlags::InUse, Qcow2BitmapInfoFlags::Auto],
            }]),
            compression_type: Qcow2CompressionType::Zlib,
        })),
        backing_image: Some(Box::new(ImageInfo {
            filename: "/base.qcow2".into(),
            format: "file".into(),
            dirty_flag: None,
            actual_size: None,
            virtual_size: 1 << 30,
            cluster_size: None,
            encrypted: None,
            compressed: None,
            backing_filename: None,
            full_backing_filename: None,
            backing_filename_format: None,
            snapshots: None,
            format_specific: Some(ImageInfoSpecific::File(ImageInfoSpecificFile {
                extent_size_hint: Some(1 << 20),
            })),
            backing_image: None,
        })),
    }
}

fn sample_node() -> BlockDeviceInfo {
    BlockDeviceInfo {
        file: "/x.qcow2".into(),
        node_name: Some("drive0".into()),
        ro: false,
        drv: "qcow2".into(),
        backing_file: Some("base.qcow2".into()),
        backing_file_depth: 1,
        active: true,
        encrypted: false,
        detect_zeroes: BlockdevDetectZeroesOptions::Off,
        bps: 0,
        bps_rd: 0,
        bps_wr: 0,
        iops: 0,
        iops_rd: 0,
        iops_wr: 0,
        image: sample_image(),
        bps_max: None,
        bps_rd_max: None,
        bps_wr_max: None,
        iops_max: None,
        iops_rd_max: None,
        iops_wr_max: None,
        bps_max_length: None,
        bps_rd_max_length: None,
        bps_wr_max_length: None,
        iops_max_length: None,
        iops_rd_max_length: None,
        iops_wr_max_length: None,
        iops_size: None,
        group: None,
        cache: BlockdevCacheInfo {
            writeback: true,
            direct: false,
            no_flush: false,
        },
        write_threshold: 0,
        dirty_bitmaps: Some(vec![
            BlockDirtyInfo {
                name: Some("b0".into()),
                count: 65536,
                granularity: 65536,
                recording: true,
                busy: false,
                persistent: true,
                inconsistent: None,
            },
            BlockDirtyInfo {
                name: None,
                count: 0,
                granularity: 65536,
                recording: true,
                busy: false,
                persistent: false,
                inconsistent: Some(true),
            },
        ]),
    }
}

#[test]
fn reply_structs_match_their_schema_types() {
    assert_matches_type(
        "VersionInfo",
        &VersionInfo {
            qemu: VersionTriple {
                major: 10,
                minor: 0,
                micro: 2,
            },
            package: "blockd".into(),
        },
    );
    assert_matches_type(
        "CommandInfo",
        &CommandInfo {
            name: "quit".into(),
        },
    );
    assert_matches_type("BlockDeviceInfo", &sample_node());
    assert_matches_type(
        "BlockInfo",
        &BlockInfo {
            device: "drive0".into(),
            qdev: None,
            device_type: "unknown".into(),
            removable: false,
            locked: false,
            inserted: Some(sample_node()),
            tray_open: None,
            io_status: Some(BlockDeviceIoStatus::Ok),
        },
    );
    assert_matches_type(
        "JobInfo",
        &JobInfo {
            id: "j".into(),
            job_type: JobType::Backup,
            status: JobStatus::Running,
            current_progress: 1,
            total_progress: 2,
            error: Some("x".into()),
        },
    );
    let mut bj = BlockJobInfo {
        job_type: JobType::Backup,
        device: "j".into(),
        len: 2,
        offset: 1,
        busy: true,
        paused: false,
        speed: 0,
        io_status: BlockDeviceIoStatus::Ok,
        ready: false,
        status: JobStatus::Running,
        auto_finalize: true,
        auto_dismiss: true,
        error: None,
        actively_synced: None,
    };
    assert_matches_type("BlockJobInfo", &bj);
    bj.job_type = JobType::Mirror;
    bj.actively_synced = Some(false);
    assert_matches_type("BlockJobInfo", &bj);
    assert_matches_type(
        "BlockExportInfo",
        &BlockExportInfo {
            id: "e".into(),
            export_type: BlockExportType::Nbd,
            node_name: "n".into(),
            shutting_down: false,
        },
    );
    assert_matches_type(
        "BlockDirtyBitmapSha256",
        &BlockDirtyBitmapSha256 {
            sha256: "00".into(),
        },
    );
}

fn sample_events() -> Vec<Event> {
    let progress = BlockJobProgress {
        job_type: JobType::Backup,
        device: "j".into(),
        len: 10,
        offset: 5,
        speed: 0,
    };
    vec![
        Event::JobStatusChange(JobStatusChange {
            id: "j".into(),
            status: JobStatus::Concluded,
        }),
        Event::BlockJobCompleted(BlockJobCompleted {
            job_type: JobType::Backup,
            device: "j".into(),
            len: 10,
            offset: 10,
            speed: 0,
            error: Some("Input/output error".into()),
        }),
        Event::BlockJobCancelled(progress.clone()),
        Event::BlockJobError(BlockJobError {
            device: "j".into(),
            operation: IoOperationType::Write,
            action: BlockErrorAction::Report,
        }),
        Event::BlockJobReady(progress),
        Event::BlockJobPending(BlockJobPending {
            job_type: JobType::Backup,
            id: "j".into(),
        }),
        Event::BlockExportDeleted(BlockExportDeleted { id: "e".into() }),
        Event::BlockImageCorrupted(BlockImageCorrupted {
            device: "".into(),
            node_name: Some("q".into()),
            msg: "bad".into(),
            offset: Some(512),
            size: Some(512),
            fatal: true,
        }),
    ]
}

#[test]
fn event_enum_covers_exactly_the_schema_events() {
    let mut schema: Vec<&str> = Schema::get().events();
    let mut typed: Vec<&str> = Event::NAMES.to_vec();
    schema.sort_unstable();
    typed.sort_unstable();
    assert_eq!(schema, typed);
    let mut sampled: Vec<&str> = sample_events().iter().map(Event::name).collect();
    sampled.sort_unstable();
    assert_eq!(sampled, typed);
}

#[test]
fn event_payloads_match_their_schema_types() {
    let schema = Schema::get();
    for ev in sample_events() {
        let ty = schema.event_data_type(ev.name()).unwrap();
        schema
            .check_type(ty, &Value::Object(ev.data()))
            .unwrap_or_else(|e| panic!("{}: {e}", ev.name()));
    }
}

#[test]
fn explicit_null_backing_differs_from_absent_backing() {
    let parse = |v: Value| match parse_command("blockdev-add", obj(v)).unwrap() {
        Command::BlockdevAdd(BlockdevOptions {
            driver: BlockdevDriverOptions::Qcow2(q),
            ..
        }) => q.backing,
        _ => panic!("not qcow2"),
    };
    assert_eq!(
        parse(json!({"driver": "qcow2", "node-name": "q", "file": "f", "backing": null})),
        Some(BlockdevRefOrNull::Null)
    );
    assert_eq!(
        parse(json!({"driver": "qcow2", "node-name": "q", "file": "f"})),
        None
    );
}
