//! The interface between the protocol and whoever implements the commands.

use std::future::Future;
use std::pin::Pin;

use serde_json::{Map, Value};

use crate::error::QmpError;

/// The result of one command, produced asynchronously.
pub type DispatchFuture = Pin<Box<dyn Future<Output = Result<Value, QmpError>> + Send>>;

/// Implements the QMP commands. The server handles `qmp_capabilities` itself and asks the
/// dispatcher about everything else, only after negotiation.
///
/// **Commands run one at a time across all connections and monitors of a
/// [`Server`](crate::Server)**, as in QEMU's monitor: the server holds a lock from before
/// `dispatch` is called until its future completes. A command that must wait for something
/// long (a job) should start it and return, as QEMU's commands do. Events emitted while a
/// command runs reach its client before the command's reply.
///
/// A panic inside a command's future is caught: the client gets a `GenericError` and the
/// daemon carries on.
pub trait Dispatcher: Send + Sync + 'static {
    /// Is this command known? For an unknown one the server itself replies `CommandNotFound`
    /// "The command X has not been found".
    fn has_command(&self, name: &str) -> bool;

    /// Runs a known command. `args` is the `arguments` object (`{}` when absent) with every
    /// object in it ordered in QEMU's `QDict` walk order, so a checker that reports the first
    /// offending member in map order names the member QEMU would. Argument checking against
    /// the schema is the dispatcher's job.
    ///
    /// For `quit`: return `Ok({})` and arrange for [`Server::shutdown`](crate::Server::shutdown)
    /// to be called (from elsewhere, it waits for this very command). Calling
    /// [`Server::begin_shutdown`](crate::Server::begin_shutdown) from inside the command makes
    /// sure no other command starts after it; the reply is delivered either way.
    fn dispatch(&self, name: &str, args: Map<String, Value>) -> DispatchFuture;

    /// Does this command run without the server-wide command lock? Only for a command whose
    /// handler is safe against every other command running meanwhile (blockd: the graph
    /// commands that wait on disk I/O, which reserve or claim what they need under locks of
    /// their own, and the queries). Default: no command does.
    fn runs_unserialised(&self, name: &str) -> bool {
        let _ = name;
        false
    }
}
