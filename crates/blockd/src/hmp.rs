//! `human-monitor-command`: the `qemu-io` subset QEMU's iotests use, printing what qemu-io prints.
//!
//! `qemu-io NODE "write -P 0x5a 0 64k"` runs one qemu-io command against a node. Supported:
//! `read [-P pat] [-v] off len`, `write [-P pat] [-z] off len`, `discard off len`,
//! `aio_write [-P pat] [-z] off len`, `aio_read ...`, `aio_flush`, `flush`. The aio variants complete
//! before the command returns (the monitor is synchronous), so `aio_flush` has nothing to wait for.

use std::fmt::Write as _;
use std::time::Instant;

use block::error::strerror;
use block::NodeRef;

/// Split an HMP command line into words, honouring double quotes.
pub fn split_words(line: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(e) => cur.push(e),
                            None => return Err("unterminated string".into()),
                        },
                        Some(x) => cur.push(x),
                        None => return Err("unterminated string".into()),
                    }
                }
            }
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            c => {
                in_word = true;
                cur.push(c);
            }
        }
    }
    if in_word {
        words.push(cur);
    }
    Ok(words)
}

/// Parse a qemu-io number: decimal, 0x hex, with optional k/m/g/t/p/e (powers of 1024) or b suffix.
pub fn parse_size(s: &str) -> Option<u64> {
    let lower = s.to_ascii_lowercase();
    let (num, mult) = match lower.chars().last()? {
        'k' => (&lower[..lower.len() - 1], 1u64 << 10),
        'm' => (&lower[..lower.len() - 1], 1 << 20),
        'g' => (&lower[..lower.len() - 1], 1 << 30),
        't' => (&lower[..lower.len() - 1], 1 << 40),
        'p' => (&lower[..lower.len() - 1], 1 << 50),
        'e' => (&lower[..lower.len() - 1], 1 << 60),
        'b' if !lower.starts_with("0x") => (&lower[..lower.len() - 1], 1),
        _ => (lower.as_str(), 1),
    };
    let v = if let Some(hex) = num.strip_prefix("0x") {
        u64::from_str_radix(hex, 16).ok()?
    } else {
        num.parse::<u64>().ok()?
    };
    v.checked_mul(mult)
}

fn parse_pattern(s: &str) -> Option<u8> {
    let v = if let Some(hex) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        i64::from_str_radix(hex, 16).ok()?
    } else {
        s.parse::<i64>().ok()?
    };
    Some(v as u8)
}

/// qemu-io's size text: "%.3f" with a binary unit, ".000" dropped.
fn cvtstr(value: f64) -> String {
    const UNITS: [(f64, &str); 6] = [
        (1152921504606846976.0, " EiB"),
        (1125899906842624.0, " PiB"),
        (1099511627776.0, " TiB"),
        (1073741824.0, " GiB"),
        (1048576.0, " MiB"),
        (1024.0, " KiB"),
    ];
    let (v, suffix) = UNITS
        .iter()
        .find(|(u, _)| value >= *u)
        .map(|(u, s)| (value / u, *s))
        .unwrap_or((value, " bytes"));
    let mut s = format!("{v:.3}");
    if let Some(stripped) = s.strip_suffix(".000") {
        s = stripped.to_string();
    }
    s + suffix
}

fn report(out: &mut String, op: &str, offset: u64, len: u64, start: Instant) {
    let secs = start.elapsed().as_secs_f64().max(1e-9);
    let _ = writeln!(out, "{op} {len}/{len} bytes at offset {offset}");
    let whole = secs.floor() as u64;
    let centi = ((secs - whole as f64) * 100.0) as u64;
    let _ = writeln!(
        out,
        "{}, 1 ops; {:02}.{:02} sec ({}/sec and {:.4} ops/sec)",
        cvtstr(len as f64),
        whole,
        centi,
        cvtstr(len as f64 / secs),
        1.0 / secs
    );
}

fn dump(out: &mut String, offset: u64, data: &[u8]) {
    for (i, line) in data.chunks(16).enumerate() {
        let _ = write!(out, "{:08x}:  ", offset + (i as u64) * 16);
        for b in line {
            let _ = write!(out, "{b:02x} ");
        }
        for _ in line.len()..16 {
            out.push_str("   ");
        }
        out.push(' ');
        for b in line {
            out.push(if (0x20..0x7f).contains(b) {
                *b as char
            } else {
                '.'
            });
        }
        out.push('\n');
    }
}

/// qemu-io's largest request (QEMU's `BDRV_REQUEST_MAX_BYTES`): longer ones are refused.
const MAX_REQUEST: u64 = 2_147_483_136;

/// Reads and pattern writes go through a buffer of at most this size, so memory does not
/// follow the length a command names.
const CHUNK: u64 = 1 << 20;

/// `read -v` prints every byte; blockd bounds the dump (beyond qemu-io, which has no bound).
const MAX_DUMP: u64 = 1 << 20;

struct Args {
    unmap: bool,
    compressed: bool,
    pattern: Option<u8>,
    zero: bool,
    verbose: bool,
    offset: u64,
    len: u64,
    /// The length as written, for qemu-io's messages.
    len_text: String,
}

/// qemu-io's refusal of a request longer than [`MAX_REQUEST`]: the `aio_*` commands parse
/// their lengths as a vector and say so differently.
fn check_len(cmd: &str, a: &Args) -> Result<(), String> {
    if a.len <= MAX_REQUEST {
        return Ok(());
    }
    let given = &a.len_text;
    Err(match cmd {
        "aio_read" | "aio_write" => {
            format!("Argument '{given}' exceeds maximum size {MAX_REQUEST}")
        }
        "write" => format!("length cannot exceed {MAX_REQUEST} without -n, given {given}"),
        _ => format!("length cannot exceed {MAX_REQUEST}, given {given}"),
    })
}

fn parse_args(cmd: &str, words: &[String], flags: &str) -> Result<Args, String> {
    let mut a = Args {
        unmap: false,
        compressed: false,
        pattern: None,
        zero: false,
        verbose: false,
        offset: 0,
        len: 0,
        len_text: String::new(),
    };
    let mut pos = Vec::new();
    let mut i = 0;
    while i < words.len() {
        let w = &words[i];
        if w.len() > 1 && w.starts_with('-') && w.as_bytes()[1].is_ascii_alphabetic() {
            let flag = &w[1..];
            match flag {
                "P" if flags.contains('P') => {
                    i += 1;
                    let p = words.get(i).ok_or_else(|| {
                        format!(
                            "bad argument count {} to {cmd}, expected at least 2 arguments",
                            words.len()
                        )
                    })?;
                    a.pattern =
                        Some(parse_pattern(p).ok_or_else(|| format!("non-numeric pattern: {p}"))?);
                }
                "z" if flags.contains('z') => a.zero = true,
                "u" if flags.contains('u') => a.unmap = true,
                "c" if flags.contains('c') => a.compressed = true,
                "v" if flags.contains('v') => a.verbose = true,
                "q" => {}
                _ => return Err(format!("{cmd}: invalid option -- '{flag}'")),
            }
        } else {
            pos.push(w.clone());
        }
        i += 1;
    }
    if pos.len() != 2 {
        return Err(format!(
            "bad argument count {} to {cmd}, expected at least 2 arguments",
            pos.len()
        ));
    }
    let num = |s: &str| {
        parse_size(s).ok_or_else(|| {
            format!("Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- {s}")
        })
    };
    a.offset = num(&pos[0])?;
    a.len = num(&pos[1])?;
    a.len_text = pos[1].clone();
    Ok(a)
}

/// A BlockBackend refuses requests past the end with EIO; qemu-io prints that.
fn check_end(node: &NodeRef, what: &str, a: &Args) -> Result<(), String> {
    match a.offset.checked_add(a.len) {
        Some(end) if end <= node.size() => Ok(()),
        _ => Err(format!("{what} failed: Input/output error")),
    }
}

/// Run one qemu-io command on a node (blocking I/O) and return qemu-io's output.
pub fn qemu_io(node: &NodeRef, command: &str) -> String {
    let words = match split_words(command) {
        Ok(w) => w,
        Err(e) => return format!("{e}\n"),
    };
    let Some((name, rest)) = words.split_first() else {
        return String::new();
    };
    let mut out = String::new();
    let result = match name.as_str() {
        "read" | "aio_read" => cmd_read(node, name, rest, &mut out),
        "write" | "aio_write" => cmd_write(node, name, rest, &mut out),
        "discard" | "aio_discard" => cmd_discard(node, rest, &mut out),
        "flush" | "aio_flush" => node
            .flush()
            .map_err(|e| format!("{name} failed: {}", strerror(&e))),
        "length" => {
            let _ = writeln!(out, "{}", cvtstr(node.size() as f64));
            Ok(())
        }
        other => Err(format!("command \"{other}\" not found")),
    };
    if let Err(msg) = result {
        out.push_str(&msg);
        out.push('\n');
    }
    out
}

fn cmd_read(node: &NodeRef, name: &str, rest: &[String], out: &mut String) -> Result<(), String> {
    let a = parse_args(name, rest, "Pv")?;
    check_len(name, &a)?;
    if a.verbose && a.len > MAX_DUMP {
        return Err(format!(
            "read -v prints at most {MAX_DUMP} bytes in blockd, given {}",
            a.len_text
        ));
    }
    check_end(node, "read", &a)?;
    let start = Instant::now();
    let mut buf = vec![0u8; a.len.min(CHUNK) as usize];
    let mut mismatch = false;
    let mut done = 0;
    while done < a.len {
        let n = (a.len - done).min(CHUNK) as usize;
        let chunk = &mut buf[..n];
        node.read(a.offset + done, chunk)
            .map_err(|e| format!("read failed: {}", strerror(&e)))?;
        if let Some(p) = a.pattern {
            mismatch |= chunk.iter().any(|b| *b != p);
        }
        if a.verbose {
            dump(out, a.offset + done, chunk);
        }
        done += n as u64;
    }
    if mismatch {
        // qemu-io prints this before the dump; the dump (at most MAX_DUMP) is one chunk.
        let line = format!(
            "Pattern verification failed at offset {}, {} bytes\n",
            a.offset, a.len
        );
        out.insert_str(0, &line);
    }
    report(out, "read", a.offset, a.len, start);
    Ok(())
}

fn cmd_write(node: &NodeRef, name: &str, rest: &[String], out: &mut String) -> Result<(), String> {
    let a = parse_args(name, rest, "Pzuc")?;
    if a.zero && a.pattern.is_some() {
        return Err("-z and -P cannot be specified at the same time".into());
    }
    check_len(name, &a)?;
    check_end(node, "write", &a)?;
    let start = Instant::now();
    // qemu-io: -z wins over -c (a write-zeroes request).
    if a.zero {
        node.write_zeroes(a.offset, a.len, a.unmap)
            .map_err(|e| format!("write failed: {}", strerror(&e)))?;
    } else {
        // Compressed writes go in whole clusters: chunks of the largest cluster size keep
        // every chunk boundary on a cluster boundary.
        let chunk = if a.compressed { 2 * CHUNK } else { CHUNK };
        let buf = vec![a.pattern.unwrap_or(0xcd); a.len.min(chunk) as usize];
        let mut done = 0;
        while done < a.len {
            let n = (a.len - done).min(chunk) as usize;
            let r = if a.compressed {
                node.write_compressed(a.offset + done, &buf[..n])
            } else {
                node.write(a.offset + done, &buf[..n])
            };
            r.map_err(|e| format!("write failed: {}", strerror(&e)))?;
            done += n as u64;
        }
    }
    report(out, "wrote", a.offset, a.len, start);
    Ok(())
}

fn cmd_discard(node: &NodeRef, rest: &[String], out: &mut String) -> Result<(), String> {
    let a = parse_args("discard", rest, "")?;
    check_len("discard", &a)?;
    check_end(node, "discard", &a)?;
    let start = Instant::now();
    node.discard(a.offset, a.len)
        .map_err(|e| format!("discard failed: {}", strerror(&e)))?;
    report(out, "discard", a.offset, a.len, start);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_like_qemu_io() {
        assert_eq!(parse_size("64k"), Some(65536));
        assert_eq!(parse_size("0x10"), Some(16));
        assert_eq!(parse_size("1M"), Some(1 << 20));
        assert_eq!(parse_size("abc"), None);
    }

    #[test]
    fn size_text_drops_zero_decimals() {
        assert_eq!(cvtstr(65536.0), "64 KiB");
        assert_eq!(cvtstr(3.0), "3 bytes");
        assert_eq!(cvtstr(1536.0), "1.500 KiB");
    }

    #[test]
    fn quoted_words_split() {
        assert_eq!(
            split_words(r#"qemu-io drive0 "write -P 0x5a 0 64k""#).unwrap(),
            vec!["qemu-io", "drive0", "write -P 0x5a 0 64k"]
        );
    }
}
