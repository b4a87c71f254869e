//! What a profile-keyed stage reads of an event, and a parse that builds
//! only that.
//!
//! An event is ~0.7 KB of JSON of which the configured traits read a few
//! fields (`type`, `event`, the times, `messageId`, the traits' property
//! paths, an identify's `traits`) and the audiences fewer (`type`, `event`
//! and their conditions' properties); the rest (`context.userAgent`,
//! `context.library`, …) was parsed into a tree per record only to be
//! dropped. [`EventPaths`] is the set of paths a stage reads, built from
//! the config; [`EventPaths::parse`] builds the event's tree with those
//! paths alone, skipping the others without allocating. The traits stage
//! forwards the event as its text
//! ([`EventJson`](crate::messages::EventJson)) and the audiences stage
//! forwards no event, so a partial tree is never written anywhere.
//!
//! Guarantee: for every path in the set, [`EventRead::lookup`] on the partial
//! tree answers what it answers on the full one (a property test below
//! compares them); a path's value is kept whole (`traits` with every
//! trait). A top-level value that is not an object is parsed whole.

use std::fmt;

use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::Value;

use cdp_pipeline::json::CowStr;

use crate::messages::{self, EventRead};
use crate::traits::{PropertyCondition, TraitDef};

/// Paths every event is read at, whatever the traits: its name and type,
/// its times, its `messageId` (the update's cause) and an identify's
/// traits (Segment's `traits`, RudderStack's `context.traits`).
const ALWAYS_READ: [&str; 8] = [
    "type",
    "event",
    "timestamp",
    "receivedAt",
    "originalTimestamp",
    "messageId",
    "traits",
    "context.traits",
];

/// A set of dotted paths (`properties.revenue`) as a tree of names.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct EventPaths {
    /// The value here is read whole.
    whole: bool,
    /// The named children, sorted by name. A node has a handful, so a
    /// lookup compares them in order (a length check rejects most) where a
    /// B-tree's search made ~3 string compares per key of the event: ~200
    /// instructions a key, 2.6% of the traits stage in the chain.
    children: Vec<(String, EventPaths)>,
}

impl EventPaths {
    /// What the stage reads for `defs`: [`ALWAYS_READ`], each trait's
    /// property and the properties its conditions name.
    pub(crate) fn of_traits<'a>(defs: impl IntoIterator<Item = &'a TraitDef>) -> Self {
        let read = defs.into_iter().flat_map(|def| {
            let conditions = def.conditions().iter().map(|c| c.property.as_str());
            def.property().into_iter().chain(conditions)
        });
        Self::of(ALWAYS_READ.into_iter().chain(read))
    }

    /// What the audiences stage reads: the event's name (`type`, `event`)
    /// and the properties its event filters' conditions name. The event's
    /// time comes with the update, not from the event.
    pub(crate) fn of_conditions<'a>(
        conditions: impl IntoIterator<Item = &'a PropertyCondition>,
    ) -> Self {
        let read = conditions.into_iter().map(|c| c.property.as_str());
        Self::of(["type", "event"].into_iter().chain(read))
    }

    fn of<'a>(paths: impl IntoIterator<Item = &'a str>) -> Self {
        let mut set = EventPaths::default();
        for path in paths {
            set.add(path);
        }
        set
    }

    /// Read `path` whole. A node read whole keeps no children (they are
    /// read with it), so a set has one form whatever the order of its
    /// paths.
    fn add(&mut self, path: &str) {
        let mut node = self;
        for part in path.split('.') {
            if node.whole {
                return;
            }
            let at = match node
                .children
                .binary_search_by(|(name, _)| name.as_str().cmp(part))
            {
                Ok(at) => at,
                Err(at) => {
                    node.children
                        .insert(at, (part.to_owned(), EventPaths::default()));
                    at
                }
            };
            node = &mut node.children[at].1;
        }
        node.whole = true;
        node.children.clear();
    }

    /// The child called `name`, if the set reads anything under it.
    fn child(&self, name: &str) -> Option<&EventPaths> {
        self.children
            .iter()
            .find(|(child, _)| child.len() == name.len() && child == name)
            .map(|(_, paths)| paths)
    }

    /// The event in `text` with the values at these paths only (and the
    /// objects that lead to them).
    pub(crate) fn parse(&self, text: &str) -> Result<EventTree, serde_json::Error> {
        let mut de = serde_json::Deserializer::from_str(text);
        let value = Partial(self).deserialize(&mut de)?;
        de.end()?;
        Ok(value)
    }

    /// The set that reads what either reads.
    pub(crate) fn union(&self, other: &EventPaths) -> EventPaths {
        let (mine, theirs) = (self.paths(), other.paths());
        Self::of(mine.iter().chain(&theirs).map(String::as_str))
    }

    /// Every path read whole, dotted, in order.
    fn paths(&self) -> Vec<String> {
        let mut out = Vec::new();
        self.collect_paths(&mut String::new(), &mut out);
        out
    }

    fn collect_paths(&self, at: &mut String, out: &mut Vec<String>) {
        if self.whole {
            out.push(at.clone());
            return;
        }
        for (name, child) in &self.children {
            let len = at.len();
            if !at.is_empty() {
                at.push('.');
            }
            at.push_str(name);
            child.collect_paths(at, out);
            at.truncate(len);
        }
    }
}

/// An event as a profile stage parsed it: the values at the paths it
/// reads ([`EventPaths`]), and the objects that lead to them as plain
/// lists of their kept fields.
///
/// `serde_json`'s objects are `IndexMap`s (the workspace keeps key order):
/// building one hashes every key with SipHash and allocates a table beside
/// its entries, and a lookup here compared keys in order anyway
/// ([`messages::field`]). An event's partial objects hold a handful of
/// fields, so a list is all they need.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum EventTree {
    /// A value read whole (or a value where an object was expected:
    /// kept whole, as `serde_json` builds it).
    Whole(Value),
    /// An object, with the fields the set reads under it, in the order
    /// they came (a repeated key keeps its last value in its first place).
    Object(Vec<(String, EventTree)>),
}

impl EventTree {
    /// Whether the event is a JSON object (every Segment event is).
    pub(crate) fn is_object(&self) -> bool {
        match self {
            EventTree::Object(_) => true,
            EventTree::Whole(value) => value.is_object(),
        }
    }

    /// The tree as a `serde_json` value holding the same fields.
    pub(crate) fn into_value(self) -> Value {
        match self {
            EventTree::Whole(value) => value,
            EventTree::Object(fields) => Value::Object(
                fields
                    .into_iter()
                    .map(|(name, tree)| (name, tree.into_value()))
                    .collect(),
            ),
        }
    }

    /// The subtree under `key` of an object.
    fn child(&self, key: &str) -> Option<&EventTree> {
        match self {
            EventTree::Object(fields) => fields
                .iter()
                .find_map(|(name, tree)| (name.as_str() == key).then_some(tree)),
            EventTree::Whole(_) => None,
        }
    }
}

/// Paths the tree was parsed for answer as on the whole event; a path that
/// ends at an object the set does not read whole answers nothing.
impl EventRead for EventTree {
    fn lookup(&self, path: &str) -> Option<&Value> {
        let mut at = self;
        let mut rest = path;
        loop {
            if let EventTree::Whole(value) = at {
                return messages::lookup(value, rest);
            }
            match messages::split_path(rest) {
                (part, Some(more)) => {
                    at = at.child(part)?;
                    rest = more;
                }
                (last, None) => return at.field(last),
            }
        }
    }

    fn field(&self, key: &str) -> Option<&Value> {
        match self {
            EventTree::Whole(value) => messages::field(value, key),
            EventTree::Object(_) => match self.child(key)? {
                EventTree::Whole(value) => Some(value),
                EventTree::Object(_) => None,
            },
        }
    }
}

/// Builds the tree at a node: whole when the node is read whole, else the
/// object with the node's children only.
struct Partial<'a>(&'a EventPaths);

impl<'de> DeserializeSeed<'de> for Partial<'_> {
    type Value = EventTree;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<EventTree, D::Error> {
        if self.0.whole {
            return Value::deserialize(deserializer).map(EventTree::Whole);
        }
        deserializer.deserialize_any(self)
    }
}

/// An object keeps the node's children; anything else (where a path goes
/// through a value that is not an object, which no lookup goes into) is
/// kept whole, as `serde_json` would build it.
impl<'de> Visitor<'de> for Partial<'_> {
    type Value = EventTree;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<EventTree, A::Error> {
        let mut out: Vec<(String, EventTree)> = Vec::new();
        while let Some(CowStr(key)) = map.next_key::<CowStr<'de>>()? {
            match self.0.child(key.as_ref()) {
                Some(child) => {
                    let value = map.next_value_seed(Partial(child))?;
                    // A repeated key: the last one wins, in the first
                    // one's place, as in `serde_json`'s own tree.
                    match out.iter_mut().find(|(name, _)| *name == key.as_ref()) {
                        Some((_, kept)) => *kept = value,
                        None => {
                            // At most one entry per child: sized once.
                            if out.capacity() == 0 {
                                out.reserve_exact(self.0.children.len());
                            }
                            out.push((key.into_owned(), value));
                        }
                    }
                }
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(EventTree::Object(out))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<EventTree, A::Error> {
        let mut out = Vec::new();
        while let Some(v) = seq.next_element::<Value>()? {
            out.push(v);
        }
        Ok(EventTree::Whole(Value::Array(out)))
    }

    fn visit_bool<E>(self, v: bool) -> Result<EventTree, E> {
        Ok(EventTree::Whole(Value::Bool(v)))
    }

    fn visit_i64<E>(self, v: i64) -> Result<EventTree, E> {
        Ok(EventTree::Whole(Value::from(v)))
    }

    fn visit_u64<E>(self, v: u64) -> Result<EventTree, E> {
        Ok(EventTree::Whole(Value::from(v)))
    }

    fn visit_f64<E>(self, v: f64) -> Result<EventTree, E> {
        Ok(EventTree::Whole(Value::from(v)))
    }

    fn visit_str<E>(self, v: &str) -> Result<EventTree, E> {
        Ok(EventTree::Whole(Value::String(v.to_owned())))
    }

    fn visit_string<E>(self, v: String) -> Result<EventTree, E> {
        Ok(EventTree::Whole(Value::String(v)))
    }

    fn visit_unit<E>(self) -> Result<EventTree, E> {
        Ok(EventTree::Whole(Value::Null))
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// Names drawn from a small set, so generated events and paths meet.
    fn name() -> impl Strategy<Value = String> {
        prop::sample::select(vec!["a", "b", "type", "traits", "context", "é\"x"])
            .prop_map(str::to_owned)
    }

    fn arb_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            (-1e6f64..1e6).prop_map(Value::from),
            "[a-z\"\\\\é ]{0,6}".prop_map(Value::from),
        ];
        leaf.prop_recursive(4, 40, 5, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
                prop::collection::vec((name(), inner), 0..5)
                    .prop_map(|kv| Value::Object(kv.into_iter().collect())),
            ]
        })
    }

    fn arb_path() -> impl Strategy<Value = String> {
        prop::collection::vec(name(), 1..4).prop_map(|parts| parts.join("."))
    }

    /// The text of an object with `pairs` in order (repeated keys allowed,
    /// which a `Value` cannot hold).
    fn object_text(pairs: &[(String, Value)]) -> String {
        let fields: Vec<String> = pairs
            .iter()
            .map(|(k, v)| format!("{}:{v}", Value::from(k.as_str())))
            .collect();
        format!("{{{}}}", fields.join(","))
    }

    proptest! {
        /// Every path in the set, and every prefix of one, looks up the
        /// same value in the partial tree as in `serde_json`'s full one.
        #[test]
        fn the_partial_tree_answers_every_read_path_as_the_full_one(
            pairs in prop::collection::vec((name(), arb_json()), 0..8),
            top in arb_json(),
            paths in prop::collection::vec(arb_path(), 0..5),
        ) {
            let mut set = EventPaths::default();
            for p in &paths {
                set.add(p);
            }
            for text in [object_text(&pairs), top.to_string()] {
                let full: Value = serde_json::from_str(&text).map_err(|e| TestCaseError::fail(e.to_string()))?;
                let partial = set.parse(&text).map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert_eq!(partial.is_object(), full.is_object());
                let as_value = partial.clone().into_value();
                for p in &paths {
                    let parts: Vec<&str> = p.split('.').collect();
                    for n in 1..=parts.len() {
                        let prefix = parts[..n].join(".");
                        if n < parts.len() && !set_has_whole(&set, &parts[..n]) {
                            // An inner object keeps only what leads on.
                            continue;
                        }
                        let expected = messages::lookup(&full, &prefix);
                        prop_assert_eq!(partial.lookup(&prefix), expected, "path {}", prefix);
                        // The general path reads the tree as a value.
                        prop_assert_eq!(messages::lookup(&as_value, &prefix), expected, "path {} as a value", prefix);
                        if n == 1 {
                            prop_assert_eq!(partial.field(&prefix), messages::field(&full, &prefix), "field {}", prefix);
                        }
                    }
                }
            }
        }
    }

    proptest! {
        /// The union of two sets reads every path of either whole (the
        /// traits stage parses with its own and the audiences' paths).
        #[test]
        fn the_union_reads_every_path_of_both(
            mine in prop::collection::vec(arb_path(), 0..4),
            theirs in prop::collection::vec(arb_path(), 0..4),
        ) {
            let a = EventPaths::of(mine.iter().map(String::as_str));
            let b = EventPaths::of(theirs.iter().map(String::as_str));
            let both = a.union(&b);
            for p in mine.iter().chain(&theirs) {
                let parts: Vec<&str> = p.split('.').collect();
                let covered = (1..=parts.len()).any(|n| set_has_whole(&both, &parts[..n]));
                prop_assert!(covered, "{} is read by the union", p);
            }
            prop_assert_eq!(&both, &b.union(&a));
            prop_assert_eq!(&both.union(&both), &both);
        }
    }

    fn set_has_whole(set: &EventPaths, parts: &[&str]) -> bool {
        parts
            .iter()
            .try_fold(set, |node, part| node.child(part))
            .is_some_and(|node| node.whole)
    }

    #[test]
    fn unread_fields_are_left_out_and_bad_text_is_refused() -> Result<(), serde_json::Error> {
        let mut set = EventPaths::default();
        set.add("properties.revenue");
        set.add("type");
        let text = r#"{"type":"track","context":{"userAgent":"x"},"properties":{"revenue":5,"currency":"USD"}}"#;
        assert_eq!(
            set.parse(text)?.into_value(),
            serde_json::json!({"type": "track", "properties": {"revenue": 5}})
        );
        assert!(set.parse(r#"{"type":"track"} x"#).is_err());
        assert!(set.parse(r#"{"type":"#).is_err());
        Ok(())
    }

    #[test]
    fn the_audiences_read_the_name_and_their_conditions_properties() -> Result<(), serde_json::Error>
    {
        let conditions: Vec<PropertyCondition> = serde_json::from_value(serde_json::json!([
            {"property": "properties.revenue", "gt": 100},
            {"property": "context.campaign.source", "eq": "ads"},
        ]))?;
        let set = EventPaths::of_conditions(&conditions);
        for path in [
            "type",
            "event",
            "properties.revenue",
            "context.campaign.source",
        ] {
            let parts: Vec<&str> = path.split('.').collect();
            assert!(set_has_whole(&set, &parts), "{path} is read");
        }
        let text = r#"{"type":"track","event":"Order Completed","timestamp":"t","context":{"userAgent":"x","campaign":{"source":"ads","medium":"m"}},"properties":{"revenue":5,"currency":"USD"}}"#;
        let tree = set.parse(text)?;
        assert_eq!(
            tree.clone().into_value(),
            serde_json::json!({"type": "track", "event": "Order Completed",
                "context": {"campaign": {"source": "ads"}}, "properties": {"revenue": 5}})
        );
        // What the audiences evaluate reads the same on the partial tree.
        let full: Value = serde_json::from_str(text)?;
        assert_eq!(messages::event_name(&tree), messages::event_name(&full));
        for c in &conditions {
            assert_eq!(c.matches_event(&tree), c.matches_event(&full));
        }
        Ok(())
    }
}
