//! Properties of query expressions: printing a query and parsing the text gives a query that
//! matches exactly the same entries, and the one-pass evaluation agrees with a direct
//! recursive reading of the tree. Entries and queries draw from a few field names and small
//! values of every type, so comparisons hit equal, unequal and incomparable values often.

use std::cmp::Ordering;

use proptest::collection::vec;
use proptest::prelude::*;
use tessera_protocol::query::{check_query, parse_query, Bound, FieldValue, Query, QueryNode, F64};

const FIELDS: [&str; 3] = ["a", "b", "c"];

fn value() -> impl Strategy<Value = FieldValue> {
    prop_oneof![
        prop_oneof![Just(""), Just("x"), Just("xy"), Just("y"), Just("a\"b")]
            .prop_map(|text| FieldValue::Str(text.to_owned())),
        (-3_i64..=3).prop_map(FieldValue::I64),
        prop_oneof![
            Just(-1.5),
            Just(0.0),
            Just(1.0),
            Just(2.5),
            Just(f64::INFINITY)
        ]
        .prop_map(|number| FieldValue::F64(F64::new(number).expect("not NaN"))),
        any::<bool>().prop_map(FieldValue::Bool),
        (-2_i64..=2).prop_map(FieldValue::Timestamp),
    ]
}

fn field() -> impl Strategy<Value = String> {
    prop::sample::select(FIELDS.to_vec()).prop_map(str::to_owned)
}

fn bound() -> impl Strategy<Value = Bound> {
    prop_oneof![
        Just(Bound::Unbounded),
        value().prop_map(Bound::Included),
        value().prop_map(Bound::Excluded),
    ]
}

/// A predicate tree.
#[derive(Debug, Clone)]
enum Tree {
    Leaf(QueryNode),
    And(Vec<Tree>),
    Or(Vec<Tree>),
    Not(Box<Tree>),
}

fn comparison() -> impl Strategy<Value = QueryNode> {
    prop_oneof![
        (field(), value()).prop_map(|(field, value)| QueryNode::Equal { field, value }),
        (field(), vec(value(), 1..4)).prop_map(|(field, values)| QueryNode::In { field, values }),
        (field(), bound(), bound()).prop_map(|(field, lower, upper)| QueryNode::Range {
            field,
            lower,
            upper
        }),
        (field(), prop_oneof![Just(""), Just("x"), Just("y")]).prop_map(|(field, prefix)| {
            QueryNode::Prefix {
                field,
                prefix: prefix.to_owned(),
            }
        }),
    ]
}

fn tree() -> impl Strategy<Value = Tree> {
    comparison()
        .prop_map(Tree::Leaf)
        .prop_recursive(4, 24, 3, |inner| {
            prop_oneof![
                vec(inner.clone(), 1..4).prop_map(Tree::And),
                vec(inner.clone(), 1..4).prop_map(Tree::Or),
                inner.prop_map(|tree| Tree::Not(Box::new(tree))),
            ]
        })
}

/// The tree as a flat query, operands first.
fn flatten(tree: &Tree, nodes: &mut Vec<QueryNode>) -> u16 {
    let node = match tree {
        Tree::Leaf(node) => node.clone(),
        Tree::And(children) => QueryNode::And(children.iter().map(|c| flatten(c, nodes)).collect()),
        Tree::Or(children) => QueryNode::Or(children.iter().map(|c| flatten(c, nodes)).collect()),
        Tree::Not(child) => QueryNode::Not(flatten(child, nodes)),
    };
    nodes.push(node);
    u16::try_from(nodes.len() - 1).expect("small")
}

type Entry = Vec<(String, FieldValue)>;

fn entry() -> impl Strategy<Value = Entry> {
    vec((field(), value()), 0..4).prop_map(|mut pairs| {
        // One value per field: the first drawn.
        let mut seen = Vec::new();
        pairs.retain(|(name, _)| {
            let fresh = !seen.contains(name);
            seen.push(name.clone());
            fresh
        });
        pairs
    })
}

fn lookup<'a>(entry: &'a Entry) -> impl Fn(&str) -> Option<&'a FieldValue> + 'a {
    move |name| {
        entry
            .iter()
            .find(|(field, _)| field == name)
            .map(|(_, value)| value)
    }
}

/// The tree's meaning, read directly.
fn holds(tree: &Tree, entry: &Entry) -> bool {
    let field = lookup(entry);
    let equal = |a: &FieldValue, b: &FieldValue| a.compare(b) == Some(Ordering::Equal);
    match tree {
        Tree::And(children) => children.iter().all(|child| holds(child, entry)),
        Tree::Or(children) => children.iter().any(|child| holds(child, entry)),
        Tree::Not(child) => !holds(child, entry),
        Tree::Leaf(QueryNode::Equal { field: name, value }) => {
            field(name).is_some_and(|found| equal(found, value))
        }
        Tree::Leaf(QueryNode::In {
            field: name,
            values,
        }) => field(name).is_some_and(|found| values.iter().any(|value| equal(found, value))),
        Tree::Leaf(QueryNode::Range {
            field: name,
            lower,
            upper,
        }) => field(name).is_some_and(|found| {
            let above = match lower {
                Bound::Unbounded => true,
                Bound::Included(low) => {
                    matches!(found.compare(low), Some(o) if o != Ordering::Less)
                }
                Bound::Excluded(low) => found.compare(low) == Some(Ordering::Greater),
            };
            let below = match upper {
                Bound::Unbounded => true,
                Bound::Included(high) => {
                    matches!(found.compare(high), Some(o) if o != Ordering::Greater)
                }
                Bound::Excluded(high) => found.compare(high) == Some(Ordering::Less),
            };
            above && below
        }),
        Tree::Leaf(QueryNode::Prefix {
            field: name,
            prefix,
        }) => {
            matches!(field(name), Some(FieldValue::Str(text)) if text.starts_with(prefix.as_str()))
        }
        Tree::Leaf(_) => unreachable!("leaves are comparisons"),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn evaluation_matches_the_tree_and_survives_printing(
        tree in tree(),
        entries in vec(entry(), 1..8),
    ) {
        let mut nodes = Vec::new();
        flatten(&tree, &mut nodes);
        let query = Query { nodes };
        check_query(&query).expect("a generated query is valid");
        let text = query.to_text();
        let parsed = parse_query(&text).unwrap_or_else(|error| panic!("{text}: {error}"));
        for entry in &entries {
            let expected = holds(&tree, entry);
            prop_assert_eq!(query.matches(lookup(entry)), expected, "{} on {:?}", text, entry);
            prop_assert_eq!(parsed.matches(lookup(entry)), expected, "reparsed {} on {:?}", text, entry);
        }
    }
}
