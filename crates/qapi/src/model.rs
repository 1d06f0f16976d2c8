//! The schema's meaning: named types, commands and events, with every reference resolved.
//!
//! Built once from the expressions of [`crate::reader`]. Struct bases are flattened (a
//! struct's member list starts with its base's members), inline command and event arguments
//! and inline union bases become implicit object types, and every union case (every value of
//! the discriminator enum) knows its branch or that it has none.

use std::collections::{HashMap, HashSet};

mod build;
use build::{collect, Builder};

/// Width and signedness of an integer type; all of them are `int` in introspection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum IntKind {
    I8,
    I16,
    I32,
    I64,
    U8,
    U16,
    U32,
    U64,
    /// `size`: a `uint64` that the command line also accepts with k/M/G/... suffixes.
    Size,
}

impl IntKind {
    /// The C type QEMU names in range errors ("expects uint32_t"), for the narrow kinds.
    pub(crate) fn c_name(self) -> &'static str {
        match self {
            IntKind::I8 => "int8_t",
            IntKind::I16 => "int16_t",
            IntKind::I32 => "int32_t",
            IntKind::I64 => "int64_t",
            IntKind::U8 => "uint8_t",
            IntKind::U16 => "uint16_t",
            IntKind::U32 => "uint32_t",
            IntKind::U64 | IntKind::Size => "uint64_t",
        }
    }

    /// Whether the kind is unsigned.
    pub(crate) fn unsigned(self) -> bool {
        matches!(
            self,
            IntKind::U8 | IntKind::U16 | IntKind::U32 | IntKind::U64 | IntKind::Size
        )
    }

    /// Inclusive range for signed kinds.
    pub(crate) fn signed_range(self) -> (i64, i64) {
        match self {
            IntKind::I8 => (i8::MIN.into(), i8::MAX.into()),
            IntKind::I16 => (i16::MIN.into(), i16::MAX.into()),
            IntKind::I32 => (i32::MIN.into(), i32::MAX.into()),
            _ => (i64::MIN, i64::MAX),
        }
    }

    /// Largest value of unsigned kinds.
    pub(crate) fn unsigned_max(self) -> u64 {
        match self {
            IntKind::U8 => u8::MAX.into(),
            IntKind::U16 => u16::MAX.into(),
            IntKind::U32 => u32::MAX.into(),
            _ => u64::MAX,
        }
    }
}

/// A builtin type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Builtin {
    Str,
    Int(IntKind),
    Number,
    Bool,
    Null,
    Any,
}

impl Builtin {
    fn from_name(name: &str) -> Option<Builtin> {
        Some(match name {
            "str" => Builtin::Str,
            "int" | "int64" => Builtin::Int(IntKind::I64),
            "int8" => Builtin::Int(IntKind::I8),
            "int16" => Builtin::Int(IntKind::I16),
            "int32" => Builtin::Int(IntKind::I32),
            "uint8" => Builtin::Int(IntKind::U8),
            "uint16" => Builtin::Int(IntKind::U16),
            "uint32" => Builtin::Int(IntKind::U32),
            "uint64" => Builtin::Int(IntKind::U64),
            "size" => Builtin::Int(IntKind::Size),
            "number" => Builtin::Number,
            "bool" => Builtin::Bool,
            "null" => Builtin::Null,
            "any" => Builtin::Any,
            _ => return None,
        })
    }

    /// Name in introspection: every integer width is `int`.
    pub(crate) fn introspection_name(self) -> &'static str {
        match self {
            Builtin::Str => "str",
            Builtin::Int(_) => "int",
            Builtin::Number => "number",
            Builtin::Bool => "bool",
            Builtin::Null => "null",
            Builtin::Any => "any",
        }
    }

    /// The `json-type` introspection reports for the builtin.
    pub(crate) fn json_type(self) -> &'static str {
        match self {
            Builtin::Str => "string",
            Builtin::Int(_) => "int",
            Builtin::Number => "number",
            Builtin::Bool => "boolean",
            Builtin::Null => "null",
            Builtin::Any => "value",
        }
    }
}

/// Index of a named type in [`Model::types`].
pub(crate) type TypeId = usize;

/// A reference to a type, as a member or element type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum TypeRef {
    Builtin(Builtin),
    Named(TypeId),
    Array(Box<TypeRef>),
}

/// A member of an object type.
#[derive(Debug, Clone)]
pub(crate) struct Member {
    pub name: String,
    pub ty: TypeRef,
    pub optional: bool,
    pub features: Vec<String>,
}

/// The variant part of a union.
#[derive(Debug, Clone)]
pub(crate) struct Variants {
    /// Name of the discriminator member (one of the base members).
    pub tag: String,
    /// For every value of the discriminator enum, in enum order: its branch, if any.
    pub cases: Vec<(String, Option<TypeId>)>,
}

/// A struct (no variants) or a union.
#[derive(Debug, Clone)]
pub(crate) struct ObjectDef {
    /// All members, base members first.
    pub members: Vec<Member>,
    pub variants: Option<Variants>,
}

/// An enum value.
#[derive(Debug, Clone)]
pub(crate) struct EnumValue {
    pub name: String,
    pub features: Vec<String>,
}

/// An alternate's branch.
#[derive(Debug, Clone)]
pub(crate) struct AltBranch {
    pub ty: TypeRef,
}

/// What a named type is.
#[derive(Debug, Clone)]
pub(crate) enum TypeKind {
    Enum(Vec<EnumValue>),
    Object(ObjectDef),
    Alternate(Vec<AltBranch>),
}

/// A named (or implicit) type.
#[derive(Debug, Clone)]
pub(crate) struct TypeDef {
    pub name: String,
    pub kind: TypeKind,
    pub features: Vec<String>,
}

/// A command.
#[derive(Debug, Clone)]
pub(crate) struct CommandDef {
    pub name: String,
    /// Object type of the arguments; `None` when the command takes none.
    pub args: Option<TypeId>,
    pub returns: Option<TypeRef>,
    pub allow_oob: bool,
    pub features: Vec<String>,
}

/// An event.
#[derive(Debug, Clone)]
pub(crate) struct EventDef {
    pub name: String,
    /// Object type of the data; `None` when the event has none.
    pub data: Option<TypeId>,
    pub features: Vec<String>,
}

/// The whole resolved schema.
#[derive(Debug)]
pub(crate) struct Model {
    pub types: Vec<TypeDef>,
    pub type_index: HashMap<String, TypeId>,
    pub commands: Vec<CommandDef>,
    pub command_index: HashMap<String, usize>,
    pub events: Vec<EventDef>,
    pub event_index: HashMap<String, usize>,
}

impl Model {
    /// Loads the schema starting from `root` (a file name in `files`), following includes.
    pub(crate) fn load(files: &[(&str, &str)], root: &str) -> Result<Model, String> {
        let mut exprs = Vec::new();
        let mut seen = HashSet::new();
        collect(files, root, &mut seen, &mut exprs)?;
        let unreached: Vec<&str> = files
            .iter()
            .map(|(n, _)| *n)
            .filter(|n| !seen.contains(*n))
            .collect();
        if !unreached.is_empty() {
            return Err(format!(
                "schema files not included from {root}: {unreached:?}"
            ));
        }
        Builder::default().build(exprs)
    }

    /// Looks a type name up, builtins included.
    pub(crate) fn resolve_name(&self, name: &str) -> Option<TypeRef> {
        if let Some(b) = Builtin::from_name(name) {
            return Some(TypeRef::Builtin(b));
        }
        self.type_index.get(name).map(|&id| TypeRef::Named(id))
    }

    /// The object definition of type `id` (callers only pass object ids).
    pub(crate) fn object(&self, id: TypeId) -> Option<&ObjectDef> {
        match &self.types[id].kind {
            TypeKind::Object(o) => Some(o),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<Model, String> {
        Model::load(&[("root.json", text)], "root.json")
    }

    #[test]
    fn struct_base_members_come_first() {
        let m = load("{ 'struct': 'B', 'data': { 'b': 'int' } } { 'struct': 'S', 'base': 'B', 'data': { '*s': 'str' } }").unwrap();
        let names: Vec<_> = m
            .object(m.type_index["S"])
            .unwrap()
            .members
            .iter()
            .map(|x| x.name.clone())
            .collect();
        assert_eq!(names, ["b", "s"]);
    }

    #[test]
    fn union_lists_every_enum_value_declared_branches_first() {
        let m = load(
            "{ 'enum': 'E', 'data': ['a', 'b', 'c'] }
             { 'struct': 'C', 'data': {} }
             { 'union': 'U', 'base': { 't': 'E' }, 'discriminator': 't', 'data': { 'c': 'C' } }",
        )
        .unwrap();
        let v = m
            .object(m.type_index["U"])
            .unwrap()
            .variants
            .clone()
            .unwrap();
        let cases: Vec<_> = v
            .cases
            .iter()
            .map(|(c, b)| (c.as_str(), b.is_some()))
            .collect();
        assert_eq!(cases, [("c", true), ("a", false), ("b", false)]);
    }

    #[test]
    fn unknown_type_is_an_error() {
        assert!(load("{ 'struct': 'S', 'data': { 'x': 'Nope' } }")
            .unwrap_err()
            .contains("unknown type 'Nope'"));
    }

    #[test]
    fn branch_outside_the_enum_is_an_error() {
        let e = load(
            "{ 'enum': 'E', 'data': ['a'] } { 'struct': 'C', 'data': {} }
             { 'union': 'U', 'base': { 't': 'E' }, 'discriminator': 't', 'data': { 'z': 'C' } }",
        )
        .unwrap_err();
        assert!(e.contains("branch 'z'"), "{e}");
    }

    #[test]
    fn duplicate_definitions_and_members_are_errors() {
        assert!(load("{ 'enum': 'E', 'data': ['a'] } { 'enum': 'E', 'data': ['b'] }").is_err());
        assert!(load("{ 'struct': 'B', 'data': { 'x': 'int' } } { 'struct': 'S', 'base': 'B', 'data': { 'x': 'int' } }").is_err());
        assert!(load("{ 'command': 'c' } { 'command': 'c' }").is_err());
    }

    #[test]
    fn base_cycle_is_an_error() {
        assert!(load(
            "{ 'struct': 'A', 'base': 'B', 'data': {} } { 'struct': 'B', 'base': 'A', 'data': {} }"
        )
        .is_err());
    }

    #[test]
    fn inline_command_arguments_become_an_implicit_type() {
        let m = load("{ 'command': 'c', 'data': { 'x': 'int' } }").unwrap();
        let id = m.commands[0].args.unwrap();
        assert_eq!(m.types[id].name, "q_obj_c-arg");
    }

    #[test]
    fn union_as_arguments_needs_boxed() {
        let schema = "{ 'enum': 'E', 'data': ['a'] } { 'union': 'U', 'base': { 't': 'E' }, 'discriminator': 't', 'data': {} }";
        assert!(load(&format!("{schema} {{ 'command': 'c', 'data': 'U' }}")).is_err());
        assert!(load(&format!(
            "{schema} {{ 'command': 'c', 'data': 'U', 'boxed': true }}"
        ))
        .is_ok());
    }

    #[test]
    fn file_not_included_from_the_root_is_an_error() {
        let e = Model::load(
            &[("root.json", "{ 'command': 'c' }"), ("orphan.json", "")],
            "root.json",
        )
        .unwrap_err();
        assert!(e.contains("orphan.json"), "{e}");
    }
}
