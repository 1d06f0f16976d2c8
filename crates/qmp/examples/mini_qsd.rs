//! A minimal QMP daemon answering only `query-version`, for comparing this crate's wire
//! behaviour byte for byte with qemu-storage-daemon:
//!
//! ```text
//! cargo run -p qmp --example mini_qsd -- /tmp/qmp.sock
//! ```

use std::sync::Arc;

use qmp::{DispatchFuture, Dispatcher, EventBus, Greeting, QmpError, Server};
use serde_json::{json, Map, Value};

const PACKAGE: &str = "Debian 1:10.0.2+ds-2+deb13u1~bpo12+1";

struct VersionOnly;

impl Dispatcher for VersionOnly {
    fn has_command(&self, name: &str) -> bool {
        name == "query-version"
    }

    fn dispatch(&self, name: &str, args: Map<String, Value>) -> DispatchFuture {
        let name = name.to_string();
        Box::pin(async move {
            if let Some(key) = args.keys().next() {
                return Err(QmpError::generic(format!(
                    "Parameter '{key}' is unexpected"
                )));
            }
            match name.as_str() {
                "query-version" => Ok(json!({
                    "qemu": {"major": 10, "minor": 0, "micro": 2},
                    "package": PACKAGE
                })),
                _ => Err(QmpError::command_not_found(format!(
                    "The command {name} has not been found"
                ))),
            }
        })
    }
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let path = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "/tmp/qmp.sock".into());
    let _ = std::fs::remove_file(&path);
    let greeting = Greeting {
        major: 10,
        minor: 0,
        micro: 2,
        package: PACKAGE.into(),
    };
    let server = Server::new(Arc::new(VersionOnly), EventBus::new(), greeting);
    server.add_unix_monitor(tokio::net::UnixListener::bind(&path)?, Some(path.into()));
    tokio::signal::ctrl_c().await?;
    server.shutdown().await;
    Ok(())
}
