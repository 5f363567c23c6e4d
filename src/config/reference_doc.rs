//! The configuration reference (docs/src/reference/configuration.md) against the config
//! types: every key the code accepts is shown in one of the page's TOML examples, and
//! every example is accepted by the parser.
//!
//! The keys come from the parser itself, not from a list kept here: every config
//! struct denies unknown fields, so deserializing a probe key at a place in the tree
//! fails with serde's `unknown_field` error, which carries the struct's field names
//! (the `FIELDS` constant serde derives). Probing each field in turn with a table, an
//! array of tables and a map of tables walks the whole tree, so a key added to a
//! struct (or a new section) shows up here without anyone listing it.
//!
//! A struct used in several places (the grants of `publish` and `subscribe`, the
//! `limits` of a tenant and of dynamic tenants, a binding) needs each of its keys shown
//! once, in any of them: structs are told apart by their set of field names.

use std::collections::{BTreeMap, BTreeSet};

use figment::Figment;
use figment::error::Kind;
use figment::providers::{Format, Serialized, Toml};
use figment::value::Value;
use serde_json::json;

use super::Config;

const PAGE: &str = include_str!("../../docs/src/reference/configuration.md");
const PROBE: &str = "zzz_reference_probe";
/// How a map key (a tenant's name, a header's name) is written in key paths.
const ANY_NAME: &str = "<name>";

#[derive(Debug)]
enum Node {
    /// A table with these keys (a struct denying unknown fields).
    Table(BTreeMap<String, Node>),
    /// An array of such values (`[[tenants.acme.queues]]`).
    Array(Box<Node>),
    /// A table with keys of the user's choosing (`[tenants.<name>]`).
    Map(Box<Node>),
    /// A value: a string, a number, a list of numbers, an untagged enum, ...
    Leaf,
}

#[derive(Clone)]
enum Step {
    Key(String),
    Element,
    AnyName,
}

/// What the parser says about `probe` placed at `path`: the field names of the struct
/// there, if it is one; `Ok(None)` when the parser accepted it (a map taking any key).
fn probe(path: &[Step], probe: serde_json::Value) -> Result<Option<Vec<String>>, ()> {
    let mut value = probe;
    for step in path.iter().rev() {
        value = match step {
            Step::Key(key) => json!({ key.as_str(): value }),
            Step::Element => json!([value]),
            Step::AnyName => json!({ ANY_NAME: value }),
        };
    }
    match Figment::from(Serialized::defaults(value)).extract::<Config>() {
        Ok(_) => Ok(None),
        Err(error) => error
            .into_iter()
            .find_map(|e| match e.kind {
                Kind::UnknownField(found, expected) if found == PROBE => {
                    Some(Some(expected.iter().map(|s| (*s).to_owned()).collect()))
                }
                _ => None,
            })
            .ok_or(()),
    }
}

fn classify(path: &mut Vec<Step>, depth: usize) -> Node {
    assert!(depth < 12, "the config tree is deeper than expected");
    let table = || json!({ PROBE: 1 });
    match probe(path, table()) {
        Ok(Some(fields)) => {
            let mut keys = BTreeMap::new();
            for field in fields {
                path.push(Step::Key(field.clone()));
                keys.insert(field, classify(path, depth + 1));
                path.pop();
            }
            return Node::Table(keys);
        }
        Ok(None) => {
            // Any key is taken: a map of values the probe's `1` fits.
            path.push(Step::AnyName);
            let inner = classify(path, depth + 1);
            path.pop();
            return Node::Map(Box::new(inner));
        }
        Err(()) => {}
    }
    for (step, wrap) in [(Step::Element, true), (Step::AnyName, false)] {
        let mut inner_path = path.clone();
        inner_path.push(step);
        if let Ok(Some(_)) = probe(&inner_path, table()) {
            let inner = classify(&mut inner_path, depth + 1);
            return if wrap {
                Node::Array(Box::new(inner))
            } else {
                Node::Map(Box::new(inner))
            };
        }
    }
    Node::Leaf
}

/// A struct's identity here: its field names.
fn signature(fields: &BTreeMap<String, Node>) -> String {
    fields.keys().cloned().collect::<Vec<_>>().join(",")
}

/// Every (struct, field) of the tree, with the first key path it has.
fn code_keys(node: &Node, prefix: &str, keys: &mut BTreeMap<(String, String), String>) {
    match node {
        Node::Table(fields) => {
            let sig = signature(fields);
            for (name, child) in fields {
                let key = join(prefix, name);
                keys.entry((sig.clone(), name.clone()))
                    .or_insert_with(|| key.clone());
                code_keys(child, &key, keys);
            }
        }
        Node::Array(child) => code_keys(child, &format!("{prefix}[]"), keys),
        Node::Map(child) => code_keys(child, &join(prefix, ANY_NAME), keys),
        Node::Leaf => {}
    }
}

fn documented_keys(
    value: &Value,
    node: &Node,
    prefix: &str,
    keys: &mut BTreeSet<(String, String)>,
    unknown: &mut Vec<String>,
) {
    match (node, value) {
        (Node::Table(fields), Value::Dict(_, dict)) => {
            let sig = signature(fields);
            for (name, child) in dict {
                let key = join(prefix, name);
                match fields.get(name) {
                    Some(field) => {
                        keys.insert((sig.clone(), name.clone()));
                        documented_keys(child, field, &key, keys, unknown);
                    }
                    None => unknown.push(key),
                }
            }
        }
        (Node::Array(inner), Value::Array(_, items)) => {
            for item in items {
                documented_keys(item, inner, &format!("{prefix}[]"), keys, unknown);
            }
        }
        (Node::Map(inner), Value::Dict(_, dict)) => {
            for child in dict.values() {
                documented_keys(child, inner, &join(prefix, ANY_NAME), keys, unknown);
            }
        }
        _ => {}
    }
}

fn join(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_owned()
    } else {
        format!("{prefix}.{name}")
    }
}

/// The page's ```toml blocks, each with the line it starts on.
fn toml_blocks(page: &str) -> Vec<(usize, String)> {
    let mut blocks = Vec::new();
    let mut current: Option<(usize, String)> = None;
    for (number, line) in page.lines().enumerate() {
        match &mut current {
            None if line.trim_start().starts_with("```toml") => {
                current = Some((number + 1, String::new()));
            }
            Some(_) if line.trim_start().starts_with("```") => {
                blocks.extend(current.take());
            }
            Some((_, text)) => {
                text.push_str(line);
                text.push('\n');
            }
            None => {}
        }
    }
    blocks
}

#[test]
fn the_configuration_reference_shows_every_key_and_parses() {
    let tree = classify(&mut Vec::new(), 0);
    let mut in_code = BTreeMap::new();
    code_keys(&tree, "", &mut in_code);
    // The probe found the sections and the nested tables, arrays and maps.
    for key in [
        "server.tls.cert_file",
        "tenants.<name>.vhost",
        "tenants.<name>.queues[].retry.delays_ms",
        "tenants.<name>.push[].headers",
        "auth.hs_secrets[].kid",
    ] {
        assert!(
            in_code.values().any(|k| k == key),
            "{key} not found in {in_code:?}"
        );
    }

    let blocks = toml_blocks(PAGE);
    assert!(
        !blocks.is_empty(),
        "the configuration reference has no TOML example"
    );
    let mut documented = BTreeSet::new();
    let mut unknown = Vec::new();
    for (line, text) in &blocks {
        let figment = Figment::from(Toml::string(text));
        if let Err(e) = figment.extract::<Config>() {
            panic!("configuration.md, the TOML example at line {line} does not parse: {e}");
        }
        let value: Value = figment.extract().expect("a TOML document");
        documented_keys(&value, &tree, "", &mut documented, &mut unknown);
    }
    assert!(
        unknown.is_empty(),
        "configuration.md shows keys the config types do not have: {unknown:?}"
    );
    let missing: Vec<_> = in_code
        .iter()
        .filter(|(id, _)| !documented.contains(*id))
        .map(|(_, key)| key)
        .collect();
    assert!(
        missing.is_empty(),
        "config keys without an example in docs/src/reference/configuration.md (add each to \
         a ```toml block there, with a comment saying what it does): {missing:?}"
    );
}
