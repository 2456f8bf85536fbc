//! The flushed meter record (SPEC §8), built as jsonb from the meter's columns as a
//! flush reads them. `meter.record_json` (sql/meter_record.sql) builds the same
//! record for the inspector with `jsonb_build_object`, which looks up every
//! argument's type and prints and parses every value: that was most of a flush's
//! cost. A pg_test holds the two to the same JSON.

use pgrx::pg_sys::{self, jbvType, JsonbPair, JsonbValue};
use pgrx::FromDatum;

use crate::convert::{from_pg_micros, iso_utc};
use crate::jsonb::{datum_bytes, decode_numeric, numeric_out_text, numeric_text, Container, Node};

/// The `meter.meters` columns a record is built from, in the order `read` takes
/// them, for a flush's SELECT list.
pub const COLUMNS: &str = "id, meter_type_id, user_id, timezone, value, unit, created_at, updated_at, period_start, \
                           groups, carry_first, carry_last, delete_on_reset, first_record_at, last_record_at, \
                           record_count";

/// One meter as its flush reads it. Numeric and jsonb columns are kept as their
/// bytes (4-byte varlena headers), to go into the record as they are.
/// Its timestamps are kept as the record's ISO-8601 text.
pub struct MeterRecord {
    pub id: i64,
    pub meter_type_id: i64,
    pub user_id: String,
    timezone: String,
    value: Option<MeterValue>,
    unit: String,
    created_at: Option<String>,
    updated_at: Option<String>,
    period_start: Option<String>,
    groups: Vec<u8>,
    carry_first: Vec<u8>,
    carry_last: Vec<u8>,
    pub delete_on_reset: bool,
    first_record_at: Option<String>,
    last_record_at: Option<String>,
    pub record_count: i64,
}

/// What a record takes from outside its meter row.
pub struct RecordContext<'a> {
    pub meter_type_name: &'a str,
    pub meter_key: &'a str,
    /// The period end the flush gives the record (ISO-8601): the meter's own,
    /// or (a flush by stream execution, a meter without an end) when the flush
    /// happened.
    pub period_end: &'a str,
}

impl MeterRecord {
    /// Reads `COLUMNS` from a row's deformed columns, starting at index `first`.
    ///
    /// # Safety
    /// `values` and `nulls` must be a row of a statement selecting `COLUMNS` from
    /// `meter.meters`, alive while this runs.
    pub unsafe fn read(values: &[pg_sys::Datum], nulls: &[bool], first: usize) -> MeterRecord {
        let column = |n: usize| (!nulls[first + n]).then(|| values[first + n]);
        let int = |n: usize| column(n).map_or(0, |d| d.value() as i64);
        let timestamp = |n: usize| column(n).and_then(|d| from_pg_micros(d.value() as i64)).map(iso_utc);
        let text = |n: usize| column(n).and_then(|d| String::from_datum(d, false)).unwrap_or_default();
        let bytes = |n: usize| column(n).map(|d| datum_bytes(d));
        MeterRecord {
            id: int(0),
            meter_type_id: int(1),
            user_id: text(2),
            timezone: text(3),
            value: bytes(4).map(MeterValue::of),
            unit: text(5),
            created_at: timestamp(6),
            updated_at: timestamp(7),
            period_start: timestamp(8),
            groups: bytes(9).unwrap_or_default(),
            carry_first: bytes(10).unwrap_or_default(),
            carry_last: bytes(11).unwrap_or_default(),
            delete_on_reset: column(12).is_some_and(|d| d.value() != 0),
            first_record_at: timestamp(13),
            last_record_at: timestamp(14),
            record_count: int(15),
        }
    }

    /// The record's fields, in jsonb's key order (shorter first, then bytewise):
    /// the one list both the jsonb and its text are made from.
    fn fields<'a>(&'a self, context: &'a RecordContext) -> [(&'static str, Field<'a>); 17] {
        let time = |t: &'a Option<String>| t.as_deref().map_or(Field::Null, Field::Time);
        [
            ("id", Field::Int(self.id)),
            ("unit", Field::String(self.unit.as_bytes())),
            ("value", self.value.as_ref().map_or(Field::Null, Field::Value)),
            ("groups", Field::Jsonb(&self.groups)),
            ("userId", Field::String(self.user_id.as_bytes())),
            ("meterKey", Field::String(context.meter_key.as_bytes())),
            ("timezone", Field::String(self.timezone.as_bytes())),
            ("carryLast", Field::Jsonb(&self.carry_last)),
            ("createdAt", time(&self.created_at)),
            ("periodEnd", Field::Time(context.period_end)),
            ("updatedAt", time(&self.updated_at)),
            ("carryFirst", Field::Jsonb(&self.carry_first)),
            ("meterTypeId", Field::Int(self.meter_type_id)),
            ("periodStart", time(&self.period_start)),
            ("deleteOnReset", Field::Bool(self.delete_on_reset)),
            (
                "meterMetaData",
                Field::MetaData(Box::new([
                    ("recordCount", Field::Int(self.record_count)),
                    ("lastMatchedAt", time(&self.last_record_at)),
                    ("firstMatchedAt", time(&self.first_record_at)),
                ])),
            ),
            ("meterTypeName", Field::String(context.meter_type_name.as_bytes())),
        ]
    }

    /// The record as a jsonb datum in the current memory context.
    ///
    /// The record is laid out here as the `JsonbValue` tree `jsonb_build_object`
    /// would end with, its keys already in order, and converted to jsonb in one
    /// call; the meter's jsonb columns are read into the tree in Rust.
    pub fn to_jsonb(&self, context: &RecordContext) -> *mut pg_sys::Jsonb {
        let mut tree = Tree::default();
        let fields = self.fields(context).map(|(key, field)| (key, tree.field(field)));
        let mut record = tree.object(fields.into());
        // SAFETY: a complete tree whose strings, numerics and nodes all live
        // (in `self`, `context` and `tree`) until the conversion returns.
        unsafe { pg_sys::JsonbValueToJsonb(&mut record) }
    }

    /// Appends the record's text, as `jsonb_out` prints `to_jsonb`'s jsonb, to
    /// `out`, with `first` (a `"key": value` text) put before its own fields.
    pub fn write_text(&self, context: &RecordContext, first: Option<&[u8]>, out: &mut Vec<u8>) {
        out.push(b'{');
        if let Some(first) = first {
            out.extend_from_slice(first);
            out.extend_from_slice(b", ");
        }
        write_fields(&self.fields(context), out);
        out.push(b'}');
    }
}

/// The text of a jsonb datum, as `jsonb_out` prints it.
///
/// # Safety
/// `jsonb` must be a valid jsonb datum with a 4-byte header.
#[cfg(any(test, feature = "pg_test"))]
pub unsafe fn jsonb_text(jsonb: *mut pg_sys::Jsonb) -> Vec<u8> {
    let length = crate::jsonb::datum_slice(pg_sys::Datum::from(jsonb)).len();
    let text = pg_sys::JsonbToCString(std::ptr::null_mut(), &raw mut (*jsonb).root, length as i32);
    std::ffi::CStr::from_ptr(text).to_bytes().to_vec()
}

/// One value of the record.
enum Field<'a> {
    Null,
    Bool(bool),
    Int(i64),
    Value(&'a MeterValue),
    String(&'a [u8]),
    /// An ISO-8601 time: a string with nothing to escape.
    Time(&'a str),
    /// A jsonb varlena (empty: NULL).
    Jsonb(&'a [u8]),
    MetaData(Box<[(&'static str, Field<'a>); 3]>),
}

fn write_fields(fields: &[(&'static str, Field)], out: &mut Vec<u8>) {
    for (i, (key, field)) in fields.iter().enumerate() {
        if i > 0 {
            out.extend_from_slice(b", ");
        }
        write_plain_string(key.as_bytes(), out);
        out.extend_from_slice(b": ");
        match field {
            Field::Null => out.extend_from_slice(b"null"),
            Field::Bool(b) => write_bool(*b, out),
            Field::Int(i) => out.extend_from_slice(i.to_string().as_bytes()),
            Field::Value(MeterValue::Number { text, .. }) => out.extend_from_slice(text.as_bytes()),
            Field::Value(MeterValue::NotANumber(text)) => write_plain_string(text.as_bytes(), out),
            Field::String(text) => write_string(text, out),
            Field::Time(text) => write_plain_string(text.as_bytes(), out),
            Field::Jsonb(bytes) => write_node(Container::from_varlena(bytes).map_or(Node::Null, Container::value), out),
            Field::MetaData(fields) => {
                out.push(b'{');
                write_fields(&fields[..], out);
                out.push(b'}');
            }
        }
    }
}

/// A jsonb node as `jsonb_out` prints it.
fn write_node(node: Node, out: &mut Vec<u8>) {
    check_stack_depth(&node);
    match node {
        Node::Null => out.extend_from_slice(b"null"),
        Node::Bool(b) => write_bool(b, out),
        Node::Number(numeric) => write_numeric(numeric, out),
        Node::String(text) => write_string(text, out),
        Node::Container(container) if container.is_object() => {
            out.push(b'{');
            for (i, (key, value)) in container.pairs().enumerate() {
                if i > 0 {
                    out.extend_from_slice(b", ");
                }
                write_string(key, out);
                out.extend_from_slice(b": ");
                write_node(value, out);
            }
            out.push(b'}');
        }
        Node::Container(container) => {
            out.push(b'[');
            for (i, element) in container.elements().enumerate() {
                if i > 0 {
                    out.extend_from_slice(b", ");
                }
                write_node(element, out);
            }
            out.push(b']');
        }
    }
}

fn write_bool(b: bool, out: &mut Vec<u8>) {
    out.extend_from_slice(if b { b"true" } else { b"false" });
}

/// A numeric in a jsonb column as `numeric_out` prints it (jsonb holds no NaN
/// or infinity).
fn write_numeric(numeric: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(numeric_text(numeric).as_deref().unwrap_or("null").as_bytes());
}

/// A meter's value, classified once for both the jsonb and its text.
enum MeterValue {
    /// A number: its numeric bytes and their text.
    Number { numeric: Vec<u8>, text: String },
    /// NaN or an infinity, which JSON has no number for: the record holds the
    /// text as a string, as `jsonb_build_object` does.
    NotANumber(String),
}

impl MeterValue {
    fn of(numeric: Vec<u8>) -> MeterValue {
        // The decoder declines NaN and the infinities (and whatever it does not
        // recognise, which numeric_out then prints as digits).
        if let Some(text) = decode_numeric(&numeric) {
            return MeterValue::Number { numeric, text };
        }
        match numeric_out_text(&numeric) {
            Some(text) if !text.bytes().any(|b| b.is_ascii_alphabetic()) => MeterValue::Number { numeric, text },
            text => MeterValue::NotANumber(text.unwrap_or_else(|| "NaN".into())),
        }
    }
}

/// Checks PostgreSQL's stack depth limit before recursing into a container, as
/// `jsonb::to_value` does: a stored jsonb nests as deep as its parser allowed.
fn check_stack_depth(node: &Node) {
    if matches!(node, Node::Container(_)) {
        // SAFETY: raises an ordinary ERROR (54001), which pgrx turns into an unwind.
        unsafe { pg_sys::check_stack_depth() };
    }
}

/// A JSON string known to need no escapes (keys, times).
fn write_plain_string(text: &[u8], out: &mut Vec<u8>) {
    debug_assert!(text.iter().all(|&b| b >= 0x20 && b != b'"' && b != b'\\'));
    out.push(b'"');
    out.extend_from_slice(text);
    out.push(b'"');
}

/// A JSON string as `escape_json` writes it.
fn write_string(text: &[u8], out: &mut Vec<u8>) {
    out.reserve(text.len() + 2);
    out.push(b'"');
    let mut plain_from = 0;
    for (i, &byte) in text.iter().enumerate() {
        if byte >= 0x20 && byte != b'"' && byte != b'\\' {
            continue;
        }
        out.extend_from_slice(&text[plain_from..i]);
        match byte {
            b'\x08' => out.extend_from_slice(b"\\b"),
            b'\x0c' => out.extend_from_slice(b"\\f"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            _ => out.extend_from_slice(format!("\\u{byte:04x}").as_bytes()),
        }
        plain_from = i + 1;
    }
    out.extend_from_slice(&text[plain_from..]);
    out.push(b'"');
}

/// The nodes of a `JsonbValue` tree: each object's pairs and array's elements,
/// kept here (their buffers never move) until the tree is converted.
#[derive(Default)]
struct Tree {
    pairs: Vec<Vec<JsonbPair>>,
    elements: Vec<Vec<JsonbValue>>,
}

impl Tree {
    fn field(&mut self, field: Field) -> JsonbValue {
        match field {
            Field::Null => null_value(),
            Field::Bool(b) => bool_value(b),
            Field::Int(i) => {
                let mut value = zeroed_value(jbvType::jbvNumeric);
                // SAFETY: allocates a numeric in the current memory context.
                value.val.numeric = unsafe { pg_sys::int64_to_numeric(i) };
                value
            }
            Field::Value(MeterValue::Number { numeric, .. }) => numeric_value(numeric),
            Field::Value(MeterValue::NotANumber(text)) => string_value(text.as_bytes()),
            Field::String(text) => string_value(text),
            Field::Time(text) => string_value(text.as_bytes()),
            Field::Jsonb(bytes) => self.jsonb(bytes),
            Field::MetaData(fields) => {
                let fields = fields.map(|(key, field)| (key, self.field(field)));
                self.object(fields.into())
            }
        }
    }

    /// An object of `pairs`, which must be in jsonb's key order and unique.
    fn object(&mut self, pairs: Vec<(&'static str, JsonbValue)>) -> JsonbValue {
        let pairs = pairs
            .into_iter()
            .enumerate()
            .map(|(order, (key, value))| JsonbPair {
                key: string_value(key.as_bytes()),
                value,
                order: order as u32,
            })
            .collect();
        self.object_of(pairs)
    }

    fn object_of(&mut self, mut pairs: Vec<JsonbPair>) -> JsonbValue {
        let mut value = zeroed_value(jbvType::jbvObject);
        value.val.object.nPairs = pairs.len() as i32;
        value.val.object.pairs = pairs.as_mut_ptr();
        self.pairs.push(pairs);
        value
    }

    /// A jsonb column's bytes (4-byte header) as a value; empty bytes (a NULL
    /// column) or bytes not recognised as jsonb are a JSON null.
    fn jsonb(&mut self, bytes: &[u8]) -> JsonbValue {
        self.node(Container::from_varlena(bytes).map_or(Node::Null, Container::value))
    }

    fn node(&mut self, node: Node) -> JsonbValue {
        check_stack_depth(&node);
        match node {
            Node::Null => null_value(),
            Node::Bool(b) => bool_value(b),
            Node::Number(numeric) => numeric_value(numeric),
            Node::String(text) => string_value(text),
            Node::Container(container) => self.container(container),
        }
    }

    fn container(&mut self, container: Container) -> JsonbValue {
        if container.is_object() {
            // Stored objects are already in key order.
            let pairs = container
                .pairs()
                .enumerate()
                .map(|(order, (key, value))| JsonbPair {
                    key: string_value(key),
                    value: self.node(value),
                    order: order as u32,
                })
                .collect();
            return self.object_of(pairs);
        }
        let mut elements: Vec<JsonbValue> = container.elements().map(|n| self.node(n)).collect();
        let mut value = zeroed_value(jbvType::jbvArray);
        value.val.array.nElems = elements.len() as i32;
        value.val.array.elems = elements.as_mut_ptr();
        value.val.array.rawScalar = false;
        self.elements.push(elements);
        value
    }
}

fn zeroed_value(kind: jbvType::Type) -> JsonbValue {
    // SAFETY: JsonbValue is plain data; every kind sets the fields it uses.
    let mut value: JsonbValue = unsafe { std::mem::zeroed() };
    value.type_ = kind;
    value
}

fn null_value() -> JsonbValue {
    zeroed_value(jbvType::jbvNull)
}

fn bool_value(b: bool) -> JsonbValue {
    let mut value = zeroed_value(jbvType::jbvBool);
    value.val.boolean = b;
    value
}

/// A numeric varlena's bytes, pointed to (jsonb copies them on conversion).
fn numeric_value(numeric: &[u8]) -> JsonbValue {
    let mut value = zeroed_value(jbvType::jbvNumeric);
    value.val.numeric = numeric.as_ptr() as pg_sys::Numeric;
    value
}

/// A string's bytes, pointed to (jsonb copies them on conversion).
fn string_value(text: &[u8]) -> JsonbValue {
    let mut value = zeroed_value(jbvType::jbvString);
    value.val.string.len = text.len() as i32;
    value.val.string.val = text.as_ptr() as *mut std::ffi::c_char;
    value
}
