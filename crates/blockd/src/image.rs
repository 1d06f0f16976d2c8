//! The short form's `--create SIZE`: make `--image` a new qcow2 image when it is missing, with
//! the same code `blockdev-create` runs, so starting blockd needs no other tool.

use std::io::ErrorKind;

use block::create::{create, CreateSpec};
use block::graph::{DriverOptions, NodeOptions};

use crate::cli::Opt;

/// The size `--create` asks for (the last one given), checked: `None` without `--create`.
pub fn create_option(opts: &[Opt]) -> Result<Option<u64>, String> {
    let Some(text) = opts.iter().rev().find_map(|o| match o {
        Opt::Create(s) => Some(s),
        _ => None,
    }) else {
        return Ok(None);
    };
    if !opts.iter().any(|o| matches!(o, Opt::Image(_))) {
        return Err("--create needs --image (the path of the image to create)".into());
    }
    let size = crate::hmp::parse_size(text)
        .filter(|s| *s > 0)
        .ok_or_else(|| format!("--create {text}: not a size (e.g. 1G, 512M, 10737418240)"))?;
    if size % 512 != 0 {
        return Err(format!(
            "--create {text}: Image size must be a multiple of 512 bytes"
        ));
    }
    Ok(Some(size))
}

/// Creates `path` as a qcow2 image of `size` bytes unless something already exists there
/// (then nothing is touched: `create_new` makes the check and the creation one step).
/// Returns whether it created the image; a half-made image is removed.
pub fn create_if_missing(path: &str, size: u64) -> Result<bool, String> {
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
    {
        Ok(_) => {}
        Err(e) if e.kind() == ErrorKind::AlreadyExists => return Ok(false),
        Err(e) => {
            return Err(format!(
                "Could not create '{path}': {}",
                block::error::strerror(&e)
            ))
        }
    }
    let made = format_qcow2(path, size);
    if made.is_err() {
        let _ = std::fs::remove_file(path);
    }
    made.map(|_| {
        tracing::info!(path, size, "created the image");
        true
    })
}

fn format_qcow2(path: &str, size: u64) -> Result<(), String> {
    let mut graph = block::Graph::new();
    let file = graph
        .add(&NodeOptions {
            node_name: Some("create".into()),
            driver: DriverOptions::File {
                filename: path.to_string(),
                locking: true,
            },
            ..NodeOptions::default()
        })
        .map_err(|e| e.to_string())?;
    let made = create(&CreateSpec::Qcow2 {
        file: Ok(file),
        opts: qcow2::CreateOptions {
            size,
            ..qcow2::CreateOptions::default()
        },
    });
    graph.close_all();
    made
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_size_is_checked_and_needs_an_image() {
        let img = Opt::Image("x.qcow2".into());
        assert_eq!(create_option(std::slice::from_ref(&img)), Ok(None));
        assert_eq!(
            create_option(&[Opt::Create("1G".into()), img.clone()]),
            Ok(Some(1 << 30))
        );
        assert!(create_option(&[Opt::Create("1G".into())]).is_err());
        assert!(create_option(&[Opt::Create("lots".into()), img.clone()]).is_err());
        assert!(create_option(&[Opt::Create("1000".into()), img]).is_err());
    }

    #[test]
    fn creates_a_missing_image_and_never_touches_an_existing_file() {
        let dir = std::env::temp_dir().join(format!("blockd-create-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("new.qcow2");
        let path = path.to_str().expect("utf-8");
        assert_eq!(create_if_missing(path, 1 << 30), Ok(true));
        let head = std::fs::read(path).expect("read image");
        assert_eq!(&head[..4], b"QFI\xfb");
        assert_eq!(
            u64::from_be_bytes(head[24..32].try_into().unwrap()),
            1 << 30
        );
        let other = dir.join("precious");
        std::fs::write(&other, b"data").expect("write");
        let other = other.to_str().expect("utf-8");
        assert_eq!(create_if_missing(other, 1 << 30), Ok(false));
        assert_eq!(std::fs::read(other).expect("read"), b"data");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
