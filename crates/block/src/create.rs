//! Image creation (`blockdev-create`) as a job body.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use crate::drivers::file::FileDriver;
use crate::drivers::qcow2::NodeStorage;
use crate::error::strerror;
use crate::job::{JobBody, JobCtx};
use crate::node::NodeRef;

/// What to create.
#[derive(Clone)]
pub enum CreateSpec {
    /// A host file of `size` bytes.
    File {
        /// Path.
        filename: String,
        /// Size.
        size: u64,
    },
    /// A qcow2 image inside an existing (protocol) node.
    Qcow2 {
        /// The node to write the image into (or why it could not be found: the job fails).
        file: Result<NodeRef, String>,
        /// Options for the format.
        opts: qcow2::CreateOptions,
    },
}

/// The body of a `create` job.
pub struct CreateJob {
    spec: CreateSpec,
}

impl CreateJob {
    /// A job body creating `spec`.
    pub fn new(spec: CreateSpec) -> Arc<CreateJob> {
        Arc::new(CreateJob { spec })
    }
}

/// How a node being written by `blockdev-create` is registered as a user.
pub const CREATE_USER: &str = "blockdev-create";

/// A user registration removed when dropped.
struct InUse<'a> {
    node: &'a NodeRef,
    who: &'static str,
}

impl<'a> InUse<'a> {
    fn new(node: &'a NodeRef, who: &'static str) -> InUse<'a> {
        node.add_user(who.to_string());
        InUse { node, who }
    }
}

impl Drop for InUse<'_> {
    fn drop(&mut self) {
        self.node.remove_user(self.who);
    }
}

/// Creates `spec` now, blocking (what the job runs; also the short form's `--create`).
pub fn create(spec: &CreateSpec) -> Result<(), String> {
    match spec {
        CreateSpec::File { filename, size } => FileDriver::create(filename, *size)
            .map_err(|e| format!("Could not create '{filename}': {}", strerror(&e))),
        CreateSpec::Qcow2 { file, opts } => {
            let file = file.as_ref().map_err(Clone::clone)?;
            if opts.size % 512 != 0 {
                // qemu-img rounds up; blockdev-create refuses, as QEMU's does.
                return Err("Image size must be a multiple of 512 bytes".to_string());
            }
            if file.read_only() {
                return Err(format!("Node '{}' is read only", file.name()));
            }
            // In use while it is written (a blockdev-del of it is refused, as QEMU's is while
            // its create job holds a backend on it).
            let _user = InUse::new(file, CREATE_USER);
            let storage = NodeStorage(file.clone());
            storage_truncate(&storage)?;
            qcow2::Qcow2::create(&storage, opts).map_err(|e| e.to_string())
        }
    }
}

/// Create an image file of `format` (drive-backup's `absolute-paths` mode): a host file, then
/// the format inside it, through the same code `blockdev-create` runs.
pub fn create_image(
    filename: &str,
    format: &str,
    size: u64,
    backing: Option<(String, String)>,
) -> Result<(), String> {
    match format {
        "raw" | "file" => create(&CreateSpec::File {
            filename: filename.to_string(),
            size,
        }),
        "qcow2" => {
            create(&CreateSpec::File {
                filename: filename.to_string(),
                size: 0,
            })?;
            let driver = FileDriver::open(filename, false)
                .map_err(|e| format!("Could not open '{filename}': {}", strerror(&e)))?;
            let node = std::sync::Arc::new(crate::node::Node::new(
                "#create".to_string(),
                true,
                Box::new(driver),
                Vec::new(),
                false,
                crate::node::NodeFlags::default(),
            ));
            let (backing_file, backing_fmt) = match backing {
                Some((f, fmt)) => (Some(f), Some(fmt)),
                None => (None, None),
            };
            let opts = qcow2::CreateOptions {
                size,
                backing_file,
                backing_fmt,
                ..qcow2::CreateOptions::default()
            };
            let r = create(&CreateSpec::Qcow2 {
                file: Ok(node.clone()),
                opts,
            });
            let closed = node.close();
            r?;
            closed.map_err(|e| format!("Could not create '{filename}': {}", strerror(&e)))
        }
        other => Err(format!("Driver '{other}' does not support image creation")),
    }
}

fn storage_truncate(s: &NodeStorage) -> Result<(), String> {
    use qcow2::Storage;
    s.truncate(0)
        .map_err(|e| format!("Could not resize image: {}", strerror(&e)))
}

impl JobBody for CreateJob {
    fn run(
        self: Arc<Self>,
        ctx: JobCtx,
    ) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send>> {
        Box::pin(async move {
            ctx.set_total(1);
            let spec = self.spec.clone();
            let r = tokio::task::spawn_blocking(move || create(&spec))
                .await
                .map_err(|e| format!("creation task failed: {e}"))?;
            ctx.progress(1);
            r
        })
    }
}
