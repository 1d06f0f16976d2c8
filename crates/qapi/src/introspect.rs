//! `query-qmp-schema`: the schema as a list of `SchemaInfo` objects, shaped like QEMU's.
//!
//! Like QEMU: only types reachable from a command or event appear; type names are masked as
//! decimal strings ("0", "1", ...; arrays "[N]"), commands and events keep their names; every
//! integer width is the builtin `int`; an optional member carries `"default": null`; object
//! types without members (and union cases without a branch) all use one empty object type.

use std::collections::{HashMap, VecDeque};

use serde_json::{json, Map, Value};

use crate::model::{Builtin, Model, TypeId, TypeKind, TypeRef};

/// Builds the `query-qmp-schema` return value.
pub(crate) fn introspect(model: &Model) -> Value {
    let mut gen = Gen {
        model,
        masked: HashMap::new(),
        empty: None,
        arrays: Vec::new(),
        builtins: Vec::new(),
        queue: VecDeque::new(),
        next: 0,
    };
    let mut out = Vec::new();
    for cmd in &model.commands {
        let arg = match cmd.args {
            Some(id) => gen.named(id),
            None => gen.empty_name(),
        };
        let ret = match &cmd.returns {
            Some(t) => gen.name(t),
            None => gen.empty_name(),
        };
        let mut e = Map::new();
        e.insert("name".into(), json!(cmd.name));
        e.insert("meta-type".into(), json!("command"));
        e.insert("arg-type".into(), json!(arg));
        e.insert("ret-type".into(), json!(ret));
        if cmd.allow_oob {
            e.insert("allow-oob".into(), json!(true));
        }
        add_features(&mut e, &cmd.features);
        out.push(Value::Object(e));
    }
    for ev in &model.events {
        let arg = match ev.data {
            Some(id) => gen.named(id),
            None => gen.empty_name(),
        };
        let mut e = Map::new();
        e.insert("name".into(), json!(ev.name));
        e.insert("meta-type".into(), json!("event"));
        e.insert("arg-type".into(), json!(arg));
        add_features(&mut e, &ev.features);
        out.push(Value::Object(e));
    }
    while let Some(id) = gen.queue.pop_front() {
        out.push(gen.type_entity(id));
    }
    if let Some(empty) = &gen.empty {
        out.push(json!({"name": empty, "meta-type": "object", "members": []}));
    }
    for (name, elem) in &gen.arrays {
        out.push(json!({"name": name, "meta-type": "array", "element-type": elem}));
    }
    for b in &gen.builtins {
        out.push(json!({"name": b.introspection_name(), "meta-type": "builtin", "json-type": b.json_type()}));
    }
    Value::Array(out)
}

fn add_features(e: &mut Map<String, Value>, features: &[String]) {
    if !features.is_empty() {
        e.insert("features".into(), json!(features));
    }
}

struct Gen<'m> {
    model: &'m Model,
    /// Masked name of each emitted named type.
    masked: HashMap<TypeId, String>,
    /// Masked name of the shared empty object type, once used.
    empty: Option<String>,
    /// Array entities: (name, element type name).
    arrays: Vec<(String, String)>,
    /// Builtins in use (one entry per introspection name).
    builtins: Vec<Builtin>,
    /// Named types whose entity is still to be written.
    queue: VecDeque<TypeId>,
    next: usize,
}

impl Gen<'_> {
    fn fresh(&mut self) -> String {
        let n = self.next.to_string();
        self.next += 1;
        n
    }

    fn empty_name(&mut self) -> String {
        if let Some(e) = &self.empty {
            return e.clone();
        }
        let n = self.fresh();
        self.empty = Some(n.clone());
        n
    }

    fn is_empty_object(&self, id: TypeId) -> bool {
        matches!(&self.model.types[id].kind, TypeKind::Object(o) if o.members.is_empty() && o.variants.is_none())
            && self.model.types[id].features.is_empty()
    }

    fn named(&mut self, id: TypeId) -> String {
        if self.is_empty_object(id) {
            return self.empty_name();
        }
        if let Some(n) = self.masked.get(&id) {
            return n.clone();
        }
        let n = self.fresh();
        self.masked.insert(id, n.clone());
        self.queue.push_back(id);
        n
    }

    fn name(&mut self, t: &TypeRef) -> String {
        match t {
            TypeRef::Builtin(b) => {
                let name = b.introspection_name();
                if !self.builtins.iter().any(|x| x.introspection_name() == name) {
                    self.builtins.push(*b);
                }
                name.to_owned()
            }
            TypeRef::Named(id) => self.named(*id),
            TypeRef::Array(elem) => {
                let e = self.name(elem);
                let n = format!("[{e}]");
                if !self.arrays.iter().any(|(a, _)| *a == n) {
                    self.arrays.push((n.clone(), e));
                }
                n
            }
        }
    }

    fn type_entity(&mut self, id: TypeId) -> Value {
        let model = self.model;
        let def = &model.types[id];
        let mut e = Map::new();
        e.insert("name".into(), json!(self.masked[&id]));
        match &def.kind {
            TypeKind::Enum(values) => {
                e.insert("meta-type".into(), json!("enum"));
                let members: Vec<Value> = values
                    .iter()
                    .map(|v| {
                        let mut m = Map::new();
                        m.insert("name".into(), json!(v.name));
                        add_features(&mut m, &v.features);
                        Value::Object(m)
                    })
                    .collect();
                e.insert("members".into(), Value::Array(members));
                e.insert(
                    "values".into(),
                    json!(values.iter().map(|v| &v.name).collect::<Vec<_>>()),
                );
            }
            TypeKind::Alternate(branches) => {
                e.insert("meta-type".into(), json!("alternate"));
                let members: Vec<Value> = branches
                    .iter()
                    .map(|b| json!({"type": self.name(&b.ty)}))
                    .collect();
                e.insert("members".into(), Value::Array(members));
            }
            TypeKind::Object(obj) => {
                e.insert("meta-type".into(), json!("object"));
                let mut members = Vec::new();
                for m in &obj.members {
                    let mut mm = Map::new();
                    mm.insert("name".into(), json!(m.name));
                    mm.insert("type".into(), json!(self.name(&m.ty)));
                    if m.optional {
                        mm.insert("default".into(), Value::Null);
                    }
                    add_features(&mut mm, &m.features);
                    members.push(Value::Object(mm));
                }
                e.insert("members".into(), Value::Array(members));
                if let Some(v) = &obj.variants {
                    e.insert("tag".into(), json!(v.tag));
                    let cases: Vec<Value> = v
                        .cases
                        .iter()
                        .map(|(case, branch)| {
                            let t = match branch {
                                Some(b) => self.named(*b),
                                None => self.empty_name(),
                            };
                            json!({"case": case, "type": t})
                        })
                        .collect();
                    e.insert("variants".into(), Value::Array(cases));
                }
            }
        }
        add_features(&mut e, &def.features);
        Value::Object(e)
    }
}
