//! Argument checking the way QEMU's QObject input visitor does it, with QEMU's error texts.
//!
//! One walker serves both input forms:
//! * [`Mode::Qmp`]: JSON from a QMP client or a `--blockdev '{...}'` option. JSON types must
//!   match; negative integers given for unsigned members wrap around as in QEMU.
//! * [`Mode::Keyval`]: the output of [`crate::parse_keyval`], whose leaves are strings; each
//!   leaf is converted to the member's type (integers, sizes with suffixes, booleans).
//!
//! Members are visited in schema order (base members, then the selected branch), so the first
//! error is the one QEMU reports; members nobody asked for are reported after that. Naming
//! follows QEMU: "missing", "unexpected" and JSON-type errors use the full dotted path
//! (`file.filename`, `bitmaps[0].name`, keyval `children.0.driver`), while integer-range,
//! enum-value and alternate errors use the bare member name (`null` for list elements).

use serde_json::{Map, Number, Value};

use crate::error::QapiError;
use crate::keyval::{parse_bool, parse_i64, parse_size, parse_u64};
use crate::model::{Builtin, IntKind, Model, ObjectDef, TypeKind, TypeRef};

/// The input form being checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Typed JSON (QMP).
    Qmp,
    /// String leaves from the command line.
    Keyval,
}

/// Walks a value against a type; returns the value converted (keyval) or normalised (QMP).
pub(crate) struct Checker<'m> {
    pub model: &'m Model,
    pub mode: Mode,
}

/// QEMU's name for a member of `parent` (empty `parent` = the top level).
fn child(parent: &str, name: &str) -> String {
    if parent.is_empty() {
        name.to_owned()
    } else {
        format!("{parent}.{name}")
    }
}

/// QEMU's name for a value with no name of its own (the top level in a full-path context).
fn full_or_anon(full: &str) -> &str {
    if full.is_empty() {
        "<anonymous>"
    } else {
        full
    }
}

impl Checker<'_> {
    /// Checks `v` against `ty`. `full` is the dotted path, `bare` the member's own name
    /// (`None` for list elements and the top level).
    pub(crate) fn visit(
        &self,
        ty: &TypeRef,
        full: &str,
        bare: Option<&str>,
        v: &Value,
    ) -> Result<Value, QapiError> {
        match ty {
            TypeRef::Builtin(b) => self.builtin(*b, full, bare, v),
            TypeRef::Array(elem) => {
                let Value::Array(items) = v else {
                    return Err(QapiError::invalid_type(full_or_anon(full), "array"));
                };
                let mut out = Vec::with_capacity(items.len());
                for (i, item) in items.iter().enumerate() {
                    let path = match self.mode {
                        Mode::Qmp => format!("{full}[{i}]"),
                        Mode::Keyval => format!("{full}.{i}"),
                    };
                    out.push(self.visit(elem, &path, None, item)?);
                }
                Ok(Value::Array(out))
            }
            TypeRef::Named(id) => {
                let def = &self.model.types[*id];
                match &def.kind {
                    TypeKind::Enum(values) => {
                        let s = self.string_leaf(full, v)?;
                        if values.iter().any(|e| e.name == s) {
                            Ok(Value::String(s.to_owned()))
                        } else {
                            Err(QapiError::bad_enum_value(bare.unwrap_or("null"), s))
                        }
                    }
                    TypeKind::Object(obj) => {
                        let Value::Object(map) = v else {
                            return Err(QapiError::invalid_type(full_or_anon(full), "object"));
                        };
                        self.object(obj, full, map).map(Value::Object)
                    }
                    TypeKind::Alternate(branches) => {
                        let pick = branches.iter().find(|b| self.alt_accepts(&b.ty, v));
                        match pick {
                            Some(b) => self.visit(&b.ty, full, bare, v),
                            None => Err(QapiError::invalid_type(bare.unwrap_or("null"), &def.name)),
                        }
                    }
                }
            }
        }
    }

    /// Checks an object's members, then reports the first member nobody asked for.
    pub(crate) fn object(
        &self,
        obj: &ObjectDef,
        full: &str,
        map: &Map<String, Value>,
    ) -> Result<Map<String, Value>, QapiError> {
        let mut out = Map::new();
        self.members(obj, full, map, &mut out)?;
        let strays = map.keys().filter(|k| !out.contains_key(*k)).count();
        if strays > 0 {
            // With several, name the one QEMU's hash tables put first.
            let input: Vec<&str> = map.keys().map(String::as_str).collect();
            let consumed: Vec<&str> = out.keys().map(String::as_str).collect();
            let extra = crate::unexpected::first_unexpected(&input, &consumed)
                .or_else(|| {
                    map.keys()
                        .map(String::as_str)
                        .find(|k| !out.contains_key(*k))
                })
                .unwrap_or_default();
            return Err(QapiError::unexpected(&child(full, extra)));
        }
        Ok(out)
    }

    fn members(
        &self,
        obj: &ObjectDef,
        full: &str,
        map: &Map<String, Value>,
        out: &mut Map<String, Value>,
    ) -> Result<(), QapiError> {
        for m in &obj.members {
            match map.get(&m.name) {
                None if m.optional => {}
                None => return Err(QapiError::missing(&child(full, &m.name))),
                Some(v) => {
                    let converted = self.visit(&m.ty, &child(full, &m.name), Some(&m.name), v)?;
                    out.insert(m.name.clone(), converted);
                }
            }
        }
        if let Some(variants) = &obj.variants {
            let tag = out.get(&variants.tag).and_then(Value::as_str);
            let branch = variants
                .cases
                .iter()
                .find(|(case, _)| Some(case.as_str()) == tag)
                .and_then(|(_, b)| *b);
            if let Some(branch) = branch.and_then(|id| self.model.object(id)) {
                self.members(branch, full, map, out)?;
            }
        }
        Ok(())
    }

    /// Whether an alternate branch of type `ty` takes `v` (QEMU picks by JSON type).
    fn alt_accepts(&self, ty: &TypeRef, v: &Value) -> bool {
        let named_kind = |ty: &TypeRef| match ty {
            TypeRef::Named(id) => Some(&self.model.types[*id].kind),
            _ => None,
        };
        match v {
            Value::Object(_) => matches!(named_kind(ty), Some(TypeKind::Object(_))),
            Value::String(_) => {
                matches!(ty, TypeRef::Builtin(Builtin::Str))
                    || matches!(named_kind(ty), Some(TypeKind::Enum(_)))
            }
            _ if self.mode == Mode::Keyval => false,
            Value::Bool(_) => matches!(ty, TypeRef::Builtin(Builtin::Bool)),
            Value::Null => matches!(ty, TypeRef::Builtin(Builtin::Null)),
            Value::Number(n) => match ty {
                TypeRef::Builtin(Builtin::Int(_)) => !n.is_f64(),
                TypeRef::Builtin(Builtin::Number) => true,
                _ => false,
            },
            Value::Array(_) => false,
        }
    }

    /// The string of a scalar leaf: QMP needs a JSON string; keyval leaves are strings and an
    /// object or array where a scalar belongs means stray sub-keys.
    fn string_leaf<'v>(&self, full: &str, v: &'v Value) -> Result<&'v str, QapiError> {
        match v {
            Value::String(s) => Ok(s),
            Value::Object(_) | Value::Array(_) if self.mode == Mode::Keyval => {
                Err(QapiError::generic(format!(
                    "Parameters '{}.*' are unexpected",
                    full_or_anon(full)
                )))
            }
            _ => Err(QapiError::invalid_type(full_or_anon(full), "string")),
        }
    }

    fn builtin(
        &self,
        b: Builtin,
        full: &str,
        bare: Option<&str>,
        v: &Value,
    ) -> Result<Value, QapiError> {
        if b == Builtin::Any {
            return Ok(v.clone());
        }
        match self.mode {
            Mode::Qmp => self.builtin_qmp(b, full, bare, v),
            Mode::Keyval => {
                let s = self.string_leaf(full, v)?;
                self.builtin_keyval(b, full, bare, s)
            }
        }
    }

    fn builtin_qmp(
        &self,
        b: Builtin,
        full: &str,
        bare: Option<&str>,
        v: &Value,
    ) -> Result<Value, QapiError> {
        let name = full_or_anon(full);
        match b {
            Builtin::Str => match v {
                Value::String(_) => Ok(v.clone()),
                _ => Err(QapiError::invalid_type(name, "string")),
            },
            Builtin::Bool => match v {
                Value::Bool(_) => Ok(v.clone()),
                _ => Err(QapiError::invalid_type(name, "boolean")),
            },
            Builtin::Number => match v {
                Value::Number(_) => Ok(v.clone()),
                _ => Err(QapiError::invalid_type(name, "number")),
            },
            Builtin::Null => match v {
                Value::Null => Ok(Value::Null),
                _ => Err(QapiError::invalid_type(name, "null")),
            },
            Builtin::Any => Ok(v.clone()),
            Builtin::Int(kind) if kind.unsigned() => {
                let n = match v {
                    Value::Number(n) if n.is_u64() => n.as_u64(),
                    // QEMU accepts negative values for unsigned members and wraps them.
                    Value::Number(n) if n.is_i64() => n.as_i64().map(|i| i as u64),
                    _ => None,
                };
                let n = n.ok_or_else(|| QapiError::expects(name, "uint64"))?;
                check_unsigned(kind, n, bare)
            }
            Builtin::Int(kind) => {
                let n = match v {
                    Value::Number(n) if n.is_i64() => n.as_i64(),
                    _ => None,
                };
                let n = n.ok_or_else(|| QapiError::invalid_type(name, "integer"))?;
                check_signed(kind, n, bare)
            }
        }
    }

    fn builtin_keyval(
        &self,
        b: Builtin,
        full: &str,
        bare: Option<&str>,
        s: &str,
    ) -> Result<Value, QapiError> {
        let name = full_or_anon(full);
        match b {
            Builtin::Str => Ok(Value::String(s.to_owned())),
            Builtin::Bool => parse_bool(s)
                .map(Value::Bool)
                .ok_or_else(|| QapiError::expects(name, "'on' or 'off'")),
            Builtin::Number => s
                .trim_start()
                .parse::<f64>()
                .ok()
                .filter(|f| f.is_finite())
                .and_then(Number::from_f64)
                .map(Value::Number)
                .ok_or_else(|| QapiError::invalid_type(name, "number")),
            Builtin::Null => {
                if s.is_empty() {
                    Ok(Value::Null)
                } else {
                    Err(QapiError::invalid_type(name, "null"))
                }
            }
            Builtin::Any => Ok(Value::String(s.to_owned())),
            Builtin::Int(IntKind::Size) => parse_size(s)
                .map(|n| Value::Number(n.into()))
                .ok_or_else(|| QapiError::expects(name, "size")),
            Builtin::Int(kind) if kind.unsigned() => {
                let n = parse_u64(s).ok_or_else(|| QapiError::expects(name, "integer"))?;
                check_unsigned(kind, n, bare)
            }
            Builtin::Int(kind) => {
                let n = parse_i64(s).ok_or_else(|| QapiError::expects(name, "integer"))?;
                check_signed(kind, n, bare)
            }
        }
    }
}

fn check_unsigned(kind: IntKind, n: u64, bare: Option<&str>) -> Result<Value, QapiError> {
    if n > kind.unsigned_max() {
        return Err(QapiError::expects(bare.unwrap_or("null"), kind.c_name()));
    }
    Ok(Value::Number(n.into()))
}

fn check_signed(kind: IntKind, n: i64, bare: Option<&str>) -> Result<Value, QapiError> {
    let (lo, hi) = kind.signed_range();
    if n < lo || n > hi {
        return Err(QapiError::expects(bare.unwrap_or("null"), kind.c_name()));
    }
    Ok(Value::Number(n.into()))
}
