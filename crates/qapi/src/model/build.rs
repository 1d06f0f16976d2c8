//! Building the [`Model`] from the schema's expressions: includes followed, names resolved,
//! struct bases flattened, implicit types made for inline arguments and union bases.

use std::collections::{HashMap, HashSet};

use serde_json::{Map, Value};

use super::*;
use crate::reader::{read_exprs, Expr};

/// A located expression: file name, line and the object.
pub(super) struct Located {
    file: String,
    line: usize,
    value: Map<String, Value>,
}

impl Located {
    fn at(&self) -> String {
        format!("{}:{}", self.file, self.line)
    }
}

pub(super) fn collect(
    files: &[(&str, &str)],
    name: &str,
    seen: &mut HashSet<String>,
    out: &mut Vec<Located>,
) -> Result<(), String> {
    if !seen.insert(name.to_owned()) {
        return Ok(());
    }
    let text = files
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, t)| *t)
        .ok_or_else(|| format!("schema file {name} not found"))?;
    for Expr { value, line } in read_exprs(name, text)? {
        if let Some(inc) = value.get("include") {
            let inc = inc
                .as_str()
                .ok_or_else(|| format!("{name}:{line}: include needs a file name"))?;
            collect(files, inc, seen, out)?;
        } else if value.contains_key("pragma") {
            // Pragmas only steer QEMU's code generator.
        } else {
            out.push(Located {
                file: name.to_owned(),
                line,
                value,
            });
        }
    }
    Ok(())
}

/// Raw definition of an object type before flattening.
enum RawObject {
    Struct {
        base: Option<String>,
        data: Map<String, Value>,
    },
    Union {
        base: Value,
        discriminator: String,
        data: Map<String, Value>,
    },
}

#[derive(Default)]
pub(super) struct Builder {
    types: Vec<TypeDef>,
    type_index: HashMap<String, TypeId>,
    /// Object types still to be resolved, by id.
    raw: HashMap<TypeId, (RawObject, String)>,
    /// Ids being flattened (cycle detection for bases).
    resolving: HashSet<TypeId>,
    /// Ids already flattened.
    done: HashSet<TypeId>,
}

fn features_of(v: Option<&Value>, at: &str) -> Result<Vec<String>, String> {
    let Some(v) = v else { return Ok(Vec::new()) };
    let list = v
        .as_array()
        .ok_or_else(|| format!("{at}: 'features' must be a list"))?;
    list.iter()
        .map(|f| match f {
            Value::String(s) => Ok(s.clone()),
            Value::Object(o) => o
                .get("name")
                .and_then(Value::as_str)
                .map(str::to_owned)
                .ok_or_else(|| format!("{at}: feature needs a name")),
            _ => Err(format!("{at}: bad feature")),
        })
        .collect()
}

fn check_keys(loc: &Located, allowed: &[&str]) -> Result<(), String> {
    for k in loc.value.keys() {
        if !allowed.contains(&k.as_str()) {
            return Err(format!("{}: unknown key '{k}'", loc.at()));
        }
    }
    Ok(())
}

impl Builder {
    fn add_type(
        &mut self,
        name: &str,
        kind: TypeKind,
        features: Vec<String>,
        at: &str,
    ) -> Result<TypeId, String> {
        if Builtin::from_name(name).is_some() || self.type_index.contains_key(name) {
            return Err(format!("{at}: type '{name}' defined twice"));
        }
        let id = self.types.len();
        self.types.push(TypeDef {
            name: name.to_owned(),
            kind,
            features,
        });
        self.type_index.insert(name.to_owned(), id);
        Ok(id)
    }

    fn placeholder() -> TypeKind {
        TypeKind::Object(ObjectDef {
            members: Vec::new(),
            variants: None,
        })
    }

    pub(super) fn build(mut self, exprs: Vec<Located>) -> Result<Model, String> {
        // Pass 1: declare every named type so that references can be resolved in any order.
        let mut pending_enums = Vec::new();
        let mut pending_alts = Vec::new();
        let mut pending_cmds = Vec::new();
        let mut pending_events = Vec::new();
        for loc in &exprs {
            let v = &loc.value;
            let at = loc.at();
            let name_of = |key: &str| v.get(key).and_then(Value::as_str).map(str::to_owned);
            if let Some(name) = name_of("enum") {
                check_keys(loc, &["enum", "data", "prefix", "features"])?;
                let id = self.add_type(
                    &name,
                    TypeKind::Enum(Vec::new()),
                    features_of(v.get("features"), &at)?,
                    &at,
                )?;
                pending_enums.push((id, loc));
            } else if let Some(name) = name_of("struct") {
                check_keys(loc, &["struct", "data", "base", "features"])?;
                let data = v
                    .get("data")
                    .and_then(Value::as_object)
                    .cloned()
                    .unwrap_or_default();
                let base = v
                    .get("base")
                    .map(|b| {
                        b.as_str()
                            .map(str::to_owned)
                            .ok_or(format!("{at}: struct base must be a type name"))
                    })
                    .transpose()?;
                let id = self.add_type(
                    &name,
                    Self::placeholder(),
                    features_of(v.get("features"), &at)?,
                    &at,
                )?;
                self.raw.insert(id, (RawObject::Struct { base, data }, at));
            } else if let Some(name) = name_of("union") {
                check_keys(loc, &["union", "data", "base", "discriminator", "features"])?;
                let data = v
                    .get("data")
                    .and_then(Value::as_object)
                    .cloned()
                    .ok_or(format!("{at}: union needs 'data'"))?;
                let base = v
                    .get("base")
                    .cloned()
                    .ok_or(format!("{at}: union needs 'base'"))?;
                let discriminator =
                    name_of("discriminator").ok_or(format!("{at}: union needs 'discriminator'"))?;
                let id = self.add_type(
                    &name,
                    Self::placeholder(),
                    features_of(v.get("features"), &at)?,
                    &at,
                )?;
                self.raw.insert(
                    id,
                    (
                        RawObject::Union {
                            base,
                            discriminator,
                            data,
                        },
                        at,
                    ),
                );
            } else if let Some(name) = name_of("alternate") {
                check_keys(loc, &["alternate", "data", "features"])?;
                let id = self.add_type(
                    &name,
                    TypeKind::Alternate(Vec::new()),
                    features_of(v.get("features"), &at)?,
                    &at,
                )?;
                pending_alts.push((id, loc));
            } else if v.contains_key("command") {
                check_keys(
                    loc,
                    &[
                        "command",
                        "data",
                        "returns",
                        "boxed",
                        "features",
                        "allow-oob",
                    ],
                )?;
                pending_cmds.push(loc);
            } else if v.contains_key("event") {
                check_keys(loc, &["event", "data", "boxed", "features"])?;
                pending_events.push(loc);
            } else {
                return Err(format!("{at}: unknown definition"));
            }
        }

        for (id, loc) in pending_enums {
            let at = loc.at();
            let data = loc
                .value
                .get("data")
                .and_then(Value::as_array)
                .ok_or(format!("{at}: enum needs 'data' list"))?;
            let mut values = Vec::new();
            let mut names = HashSet::new();
            for item in data {
                let (name, features) = match item {
                    Value::String(s) => (s.clone(), Vec::new()),
                    Value::Object(o) => (
                        o.get("name")
                            .and_then(Value::as_str)
                            .ok_or(format!("{at}: enum value needs a name"))?
                            .to_owned(),
                        features_of(o.get("features"), &at)?,
                    ),
                    _ => return Err(format!("{at}: bad enum value")),
                };
                if !names.insert(name.clone()) {
                    return Err(format!("{at}: enum value '{name}' twice"));
                }
                values.push(EnumValue { name, features });
            }
            self.types[id].kind = TypeKind::Enum(values);
        }

        for (id, loc) in pending_alts {
            let at = loc.at();
            let data = loc
                .value
                .get("data")
                .and_then(Value::as_object)
                .ok_or(format!("{at}: alternate needs 'data'"))?;
            let mut branches = Vec::new();
            for (_, t) in data {
                let t = match t {
                    Value::Object(o) => o.get("type").cloned().unwrap_or(Value::Null),
                    other => other.clone(),
                };
                let ty = self.type_ref(&t, &at)?;
                if matches!(ty, TypeRef::Array(_)) {
                    return Err(format!("{at}: alternate branches cannot be arrays"));
                }
                branches.push(AltBranch { ty });
            }
            self.types[id].kind = TypeKind::Alternate(branches);
        }

        let ids: Vec<TypeId> = self.raw.keys().copied().collect();
        for id in ids {
            self.flatten(id)?;
        }

        let mut commands = Vec::new();
        let mut command_index = HashMap::new();
        for loc in pending_cmds {
            let at = loc.at();
            let v = &loc.value;
            let name = v["command"]
                .as_str()
                .ok_or(format!("{at}: command name must be a string"))?
                .to_owned();
            let boxed = v.get("boxed").and_then(Value::as_bool).unwrap_or(false);
            let args = self.arg_type(&name, v.get("data"), boxed, &at)?;
            let returns = v
                .get("returns")
                .map(|r| self.type_ref(r, &at))
                .transpose()?;
            let allow_oob = v.get("allow-oob").and_then(Value::as_bool).unwrap_or(false);
            let features = features_of(v.get("features"), &at)?;
            if command_index.insert(name.clone(), commands.len()).is_some() {
                return Err(format!("{at}: command '{name}' defined twice"));
            }
            commands.push(CommandDef {
                name,
                args,
                returns,
                allow_oob,
                features,
            });
        }

        let mut events = Vec::new();
        let mut event_index = HashMap::new();
        for loc in pending_events {
            let at = loc.at();
            let v = &loc.value;
            let name = v["event"]
                .as_str()
                .ok_or(format!("{at}: event name must be a string"))?
                .to_owned();
            let boxed = v.get("boxed").and_then(Value::as_bool).unwrap_or(false);
            let data = self.arg_type(&name, v.get("data"), boxed, &at)?;
            let features = features_of(v.get("features"), &at)?;
            if event_index.insert(name.clone(), events.len()).is_some() {
                return Err(format!("{at}: event '{name}' defined twice"));
            }
            events.push(EventDef {
                name,
                data,
                features,
            });
        }

        Ok(Model {
            types: self.types,
            type_index: self.type_index,
            commands,
            command_index,
            events,
            event_index,
        })
    }

    /// The argument type of a command or event: inline members become an implicit type.
    fn arg_type(
        &mut self,
        owner: &str,
        data: Option<&Value>,
        boxed: bool,
        at: &str,
    ) -> Result<Option<TypeId>, String> {
        match data {
            None => Ok(None),
            Some(Value::String(name)) => {
                let id = *self
                    .type_index
                    .get(name)
                    .ok_or(format!("{at}: unknown type '{name}'"))?;
                match &self.types[id].kind {
                    TypeKind::Object(o) if o.variants.is_none() || boxed => Ok(Some(id)),
                    TypeKind::Object(_) => {
                        Err(format!("{at}: a union as arguments needs 'boxed': true"))
                    }
                    _ => Err(format!("{at}: arguments must be an object type")),
                }
            }
            Some(Value::Object(members)) if !boxed => {
                let members = self.members(members, at)?;
                let name = format!("q_obj_{owner}-arg");
                let id = self.add_type(
                    &name,
                    TypeKind::Object(ObjectDef {
                        members,
                        variants: None,
                    }),
                    Vec::new(),
                    at,
                )?;
                Ok(Some(id))
            }
            Some(_) => Err(format!("{at}: bad 'data'")),
        }
    }

    fn type_ref(&self, v: &Value, at: &str) -> Result<TypeRef, String> {
        match v {
            Value::String(name) => {
                if let Some(b) = Builtin::from_name(name) {
                    return Ok(TypeRef::Builtin(b));
                }
                self.type_index
                    .get(name)
                    .map(|&id| TypeRef::Named(id))
                    .ok_or(format!("{at}: unknown type '{name}'"))
            }
            Value::Array(items) if items.len() == 1 => {
                Ok(TypeRef::Array(Box::new(self.type_ref(&items[0], at)?)))
            }
            _ => Err(format!("{at}: bad type {v}")),
        }
    }

    fn members(&self, data: &Map<String, Value>, at: &str) -> Result<Vec<Member>, String> {
        data.iter()
            .map(|(key, spec)| {
                let (name, optional) = match key.strip_prefix('*') {
                    Some(n) => (n.to_owned(), true),
                    None => (key.clone(), false),
                };
                let (ty, features) = match spec {
                    Value::Object(o) => (
                        self.type_ref(o.get("type").unwrap_or(&Value::Null), at)?,
                        features_of(o.get("features"), at)?,
                    ),
                    other => (self.type_ref(other, at)?, Vec::new()),
                };
                Ok(Member {
                    name,
                    ty,
                    optional,
                    features,
                })
            })
            .collect()
    }

    /// Resolves object `id`: base members first, then own members, then variants.
    fn flatten(&mut self, id: TypeId) -> Result<(), String> {
        if self.done.contains(&id) {
            return Ok(());
        }
        if !self.resolving.insert(id) {
            return Err(format!("type '{}' is its own base", self.types[id].name));
        }
        let Some((raw, at)) = self.raw.remove(&id) else {
            return Err(format!("type '{}' is not an object", self.types[id].name));
        };
        let def = match raw {
            RawObject::Struct { base, data } => {
                let mut members = match base {
                    Some(b) => self.base_members(&b, &at)?,
                    None => Vec::new(),
                };
                members.extend(self.members(&data, &at)?);
                ObjectDef {
                    members,
                    variants: None,
                }
            }
            RawObject::Union {
                base,
                discriminator,
                data,
            } => {
                let members = match &base {
                    Value::String(b) => self.base_members(b, &at)?,
                    Value::Object(inline) => self.members(inline, &at)?,
                    _ => return Err(format!("{at}: bad union base")),
                };
                let tag = members
                    .iter()
                    .find(|m| m.name == discriminator)
                    .ok_or(format!(
                        "{at}: discriminator '{discriminator}' is not a base member"
                    ))?;
                let values = match &tag.ty {
                    TypeRef::Named(e) => match &self.types[*e].kind {
                        TypeKind::Enum(values) => values.clone(),
                        _ => return Err(format!("{at}: discriminator must be an enum")),
                    },
                    _ => return Err(format!("{at}: discriminator must be an enum")),
                };
                for key in data.keys() {
                    if !values.iter().any(|v| &v.name == key) {
                        return Err(format!(
                            "{at}: branch '{key}' is not a value of the discriminator"
                        ));
                    }
                }
                // Declared branches first (in declaration order), then the values without one,
                // which is also the order QEMU's introspection lists them in.
                let mut ordered: Vec<&EnumValue> = data
                    .keys()
                    .filter_map(|k| values.iter().find(|v| &v.name == k))
                    .collect();
                ordered.extend(values.iter().filter(|v| !data.contains_key(&v.name)));
                let mut cases = Vec::new();
                for value in ordered {
                    let branch = match data.get(&value.name) {
                        None => None,
                        Some(spec) => {
                            let spec = match spec {
                                Value::Object(o) => o.get("type").cloned().unwrap_or(Value::Null),
                                other => other.clone(),
                            };
                            let bname = spec
                                .as_str()
                                .ok_or(format!("{at}: branch type must be a name"))?;
                            let bid = *self
                                .type_index
                                .get(bname)
                                .ok_or(format!("{at}: unknown type '{bname}'"))?;
                            if !matches!(self.types[bid].kind, TypeKind::Object(_)) {
                                return Err(format!(
                                    "{at}: branch type '{bname}' must be an object"
                                ));
                            }
                            self.flatten(bid)?;
                            Some(bid)
                        }
                    };
                    cases.push((value.name.clone(), branch));
                }
                ObjectDef {
                    members,
                    variants: Some(Variants {
                        tag: discriminator,
                        cases,
                    }),
                }
            }
        };
        let mut names = HashSet::new();
        for m in &def.members {
            if !names.insert(m.name.as_str()) {
                return Err(format!("{at}: member '{}' twice", m.name));
            }
        }
        self.types[id].kind = TypeKind::Object(def);
        self.resolving.remove(&id);
        self.done.insert(id);
        Ok(())
    }

    fn base_members(&mut self, base: &str, at: &str) -> Result<Vec<Member>, String> {
        let bid = *self
            .type_index
            .get(base)
            .ok_or(format!("{at}: unknown base '{base}'"))?;
        self.flatten(bid)?;
        match &self.types[bid].kind {
            TypeKind::Object(ObjectDef {
                members,
                variants: None,
            }) => Ok(members.clone()),
            _ => Err(format!("{at}: base '{base}' must be a struct")),
        }
    }
}
