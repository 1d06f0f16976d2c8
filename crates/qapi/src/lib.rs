//! qapi: blockd's QMP schema — argument checking, introspection and typed commands.
//!
//! The schema lives in `qapi-schema/` at the workspace root, written in QEMU's QAPI schema
//! language and following qemu-storage-daemon 10.0.2 member for member. It is compiled into
//! the crate (see `build.rs`) and parsed once, on first use of [`Schema::get`]. Nothing here
//! does I/O at run time.
//!
//! What the daemon does with it:
//! * [`types::parse_command`] turns a QMP command name and its arguments into a typed
//!   [`types::Command`], after checking the arguments exactly as QEMU would (same error
//!   texts); handlers never see raw JSON.
//! * [`Schema::introspect`] answers `query-qmp-schema`; [`Schema::commands`] answers
//!   `query-commands`.
//! * [`parse_keyval`] and [`Schema::coerce_keyval`] read command-line options such as
//!   `--blockdev driver=file,node-name=f,filename=/x`.
//! * [`types`] also holds the reply and event payload structs.
//!
//! # Layout
//! * `reader` — reads the schema language into JSON values.
//! * `model` — resolves names, flattens bases, builds implicit argument types.
//! * `check` — the input visitor: QMP (typed JSON) and keyval (string leaves) modes.
//! * `keyval` — `key=value,...` parsing and QEMU's number/size/bool syntax.
//! * `introspect` — `query-qmp-schema` output.
//! * `unexpected` — which of several stray members QEMU names (replays its hash tables).
//! * `types` — typed commands (one module per schema family), replies and events.
//! * `error` — [`QapiError`], a QMP error class plus description.

#![warn(missing_docs)]

mod check;
mod error;
mod introspect;
mod keyval;
mod model;
mod reader;
pub mod types;
mod unexpected;

use std::sync::OnceLock;

use serde_json::{Map, Value};

pub use error::{QapiError, COMMAND_NOT_FOUND, GENERIC_ERROR};
pub use keyval::parse_keyval;

use check::{Checker, Mode};
use model::Model;

mod files {
    include!(concat!(env!("OUT_DIR"), "/schema_files.rs"));
}

/// The root module of the schema.
const ROOT: &str = "qapi-schema.json";

/// The parsed schema: every command, event and type blockd knows.
#[derive(Debug)]
pub struct Schema {
    model: Model,
}

impl Schema {
    /// The schema, parsed on first use.
    ///
    /// # Panics
    /// If the embedded schema does not parse: that is a bug in `qapi-schema/`, caught by the
    /// crate's tests.
    pub fn get() -> &'static Schema {
        static SCHEMA: OnceLock<Schema> = OnceLock::new();
        SCHEMA.get_or_init(|| match Model::load(files::FILES, ROOT) {
            Ok(model) => Schema { model },
            Err(e) => panic!("qapi-schema is invalid: {e}"),
        })
    }

    /// Every command name, in schema order (the answer to `query-commands`).
    pub fn commands(&self) -> Vec<&str> {
        self.model
            .commands
            .iter()
            .map(|c| c.name.as_str())
            .collect()
    }

    /// Whether `name` is a command.
    pub fn has_command(&self, name: &str) -> bool {
        self.model.command_index.contains_key(name)
    }

    /// Every event name, in schema order.
    pub fn events(&self) -> Vec<&str> {
        self.model.events.iter().map(|e| e.name.as_str()).collect()
    }

    /// Checks a command's arguments as QEMU's input visitor does, with QEMU's error texts:
    /// "Parameter 'x' is unexpected", "Parameter 'name' is missing",
    /// "Invalid parameter type for 'name', expected: string", "Parameter 'granularity' expects
    /// uint32_t", "Parameter 'mode' does not accept value 'foo'", nested members as
    /// `file.filename` or `bitmaps[0].name`. An unknown command is `CommandNotFound`.
    pub fn check_command(&self, name: &str, args: &Map<String, Value>) -> Result<(), QapiError> {
        self.normalize_command(name, args).map(|_| ())
    }

    /// Like [`Schema::check_command`], returning the arguments as QEMU reads them: the same
    /// object except that negative integers given for unsigned members have wrapped around
    /// (QEMU accepts `-1` for a `uint64` as 2^64-1). Defaults are not filled in.
    pub fn normalize_command(
        &self,
        name: &str,
        args: &Map<String, Value>,
    ) -> Result<Map<String, Value>, QapiError> {
        let &index = self
            .model
            .command_index
            .get(name)
            .ok_or_else(|| QapiError::command_not_found(name))?;
        let checker = Checker {
            model: &self.model,
            mode: Mode::Qmp,
        };
        match self.model.commands[index]
            .args
            .and_then(|id| self.model.object(id))
        {
            Some(obj) => checker.object(obj, "", args),
            None => {
                let input: Vec<&str> = args.keys().map(String::as_str).collect();
                match unexpected::first_unexpected(&input, &[]) {
                    Some(extra) => Err(QapiError::unexpected(extra)),
                    None => Ok(Map::new()),
                }
            }
        }
    }

    /// Checks any value against a named type (e.g. `BlockdevOptions` for `--blockdev '{...}'`).
    pub fn check_type(&self, type_name: &str, value: &Value) -> Result<(), QapiError> {
        self.normalize_type(type_name, value).map(|_| ())
    }

    /// Like [`Schema::check_type`], returning the value as QEMU reads it (see
    /// [`Schema::normalize_command`]).
    pub fn normalize_type(&self, type_name: &str, value: &Value) -> Result<Value, QapiError> {
        let ty = self
            .model
            .resolve_name(type_name)
            .ok_or_else(|| QapiError::generic(format!("Unknown type '{type_name}'")))?;
        Checker {
            model: &self.model,
            mode: Mode::Qmp,
        }
        .visit(&ty, "", None, value)
    }

    /// Converts command-line keyval input (nested objects and arrays whose leaves are strings,
    /// as [`parse_keyval`] returns) to typed JSON for `type_name`, checking it on the way:
    /// integers in decimal, `0x` hex or `0` octal; `size` members also with suffixes
    /// (`1G`, `1.5k`); booleans `on/off`, `yes/no`, `true/false`, `y/n`. Error texts are
    /// QEMU's keyval ones ("Parameter 'size' expects integer", "Parameter 'read-only' expects
    /// 'on' or 'off'", list elements named `children.0`).
    pub fn coerce_keyval(&self, type_name: &str, value: Value) -> Result<Value, QapiError> {
        let ty = self
            .model
            .resolve_name(type_name)
            .ok_or_else(|| QapiError::generic(format!("Unknown type '{type_name}'")))?;
        Checker {
            model: &self.model,
            mode: Mode::Keyval,
        }
        .visit(&ty, "", None, &value)
    }

    /// The `query-qmp-schema` reply: a list of `SchemaInfo`, shaped and masked like QEMU's.
    pub fn introspect(&self) -> Value {
        introspect::introspect(&self.model)
    }

    /// The name of a command's argument type (implicit ones are `q_obj_<command>-arg`), or
    /// `None` for commands without arguments or unknown commands.
    pub fn command_arg_type(&self, name: &str) -> Option<&str> {
        let &i = self.model.command_index.get(name)?;
        self.model.commands[i]
            .args
            .map(|id| self.model.types[id].name.as_str())
    }

    /// The name of an event's data type, or `None` for events without data or unknown events.
    pub fn event_data_type(&self, name: &str) -> Option<&str> {
        let &i = self.model.event_index.get(name)?;
        self.model.events[i]
            .data
            .map(|id| self.model.types[id].name.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_schema_parses() {
        let s = Schema::get();
        assert!(s.has_command("blockdev-add"));
        assert!(s.events().contains(&"JOB_STATUS_CHANGE"));
    }
}
