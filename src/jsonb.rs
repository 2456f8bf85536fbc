//! Reading PostgreSQL's binary jsonb in place, so the meter processor takes only
//! the fields its rules use from each record, without printing the record as text
//! and parsing it again (PostgreSQL's `src/include/utils/jsonb.h` describes the
//! format). Numbers are converted by `numeric_out`, so they stay exact.
//!
//! Everything is bounds-checked: malformed bytes read as null, never as a panic.

use std::borrow::Cow;
use std::rc::Rc;

use pgrx::pg_sys;
use serde_json::{Map, Number, Value};

use jiff::Timestamp;

use crate::record::{parse_timestamp, parse_timestamp_text, FieldPath, FieldValue, Projected, Rejection, NO_SLOT};

const JB_CMASK: u32 = 0x0FFF_FFFF;
const JB_FSCALAR: u32 = 0x1000_0000;
const JB_FOBJECT: u32 = 0x2000_0000;
const JENTRY_OFFLENMASK: u32 = 0x0FFF_FFFF;
const JENTRY_TYPEMASK: u32 = 0x7000_0000;
const JENTRY_HAS_OFF: u32 = 0x8000_0000;
const JENTRY_ISSTRING: u32 = 0x0000_0000;
const JENTRY_ISNUMERIC: u32 = 0x1000_0000;
const JENTRY_ISBOOL_FALSE: u32 = 0x2000_0000;
const JENTRY_ISBOOL_TRUE: u32 = 0x3000_0000;
const JENTRY_ISNULL: u32 = 0x4000_0000;
const JENTRY_ISCONTAINER: u32 = 0x5000_0000;

/// A jsonb container (object or array) in its binary form.
#[derive(Clone, Copy)]
pub struct Container<'a> {
    bytes: &'a [u8],
}

/// One value inside a container.
#[derive(Clone, Copy)]
pub enum Node<'a> {
    Null,
    Bool(bool),
    /// A numeric varlena (possibly with a short header).
    Number(&'a [u8]),
    String(&'a [u8]),
    Container(Container<'a>),
}

fn u32_at(bytes: &[u8], at: usize) -> Option<u32> {
    bytes
        .get(at..at + 4)
        .map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
}

fn intalign(n: usize) -> usize {
    (n + 3) & !3
}

impl<'a> Container<'a> {
    /// The root container of a detoasted jsonb datum's bytes (header included).
    pub fn from_varlena(varlena: &'a [u8]) -> Option<Container<'a>> {
        varlena.get(4..).map(|bytes| Container { bytes })
    }

    fn header(&self) -> u32 {
        u32_at(self.bytes, 0).unwrap_or(0)
    }

    pub fn len(&self) -> usize {
        (self.header() & JB_CMASK) as usize
    }

    pub fn is_object(&self) -> bool {
        self.header() & JB_FOBJECT != 0
    }

    /// A top-level scalar is stored as a one-element array flagged scalar.
    pub fn is_scalar(&self) -> bool {
        self.header() & JB_FSCALAR != 0
    }

    fn entries(&self) -> usize {
        if self.is_object() {
            self.len() * 2
        } else {
            self.len()
        }
    }

    fn entry(&self, index: usize) -> u32 {
        u32_at(self.bytes, 4 + 4 * index).unwrap_or(JENTRY_ISNULL)
    }

    fn data_start(&self) -> usize {
        4 + 4 * self.entries()
    }

    fn offset(&self, index: usize) -> usize {
        let mut offset = 0usize;
        for i in (0..index).rev() {
            let entry = self.entry(i);
            offset += (entry & JENTRY_OFFLENMASK) as usize;
            if entry & JENTRY_HAS_OFF != 0 {
                break;
            }
        }
        offset
    }

    /// Where entry `index`'s data ends, given where it starts (both from the
    /// data start): an entry stores either its length or its end.
    fn end(&self, index: usize, offset: usize) -> usize {
        let entry = self.entry(index);
        if entry & JENTRY_HAS_OFF != 0 {
            ((entry & JENTRY_OFFLENMASK) as usize).max(offset)
        } else {
            offset + (entry & JENTRY_OFFLENMASK) as usize
        }
    }

    fn node(&self, index: usize) -> Node<'a> {
        self.node_at(index, self.offset(index))
    }

    /// Entry `index`, whose data starts at `offset` (from the data start).
    fn node_at(&self, index: usize, offset: usize) -> Node<'a> {
        let entry = self.entry(index);
        let start = self.data_start() + offset;
        let length = self.end(index, offset) - offset;
        let slice = |from: usize, to: usize| self.bytes.get(from..to);
        match entry & JENTRY_TYPEMASK {
            JENTRY_ISSTRING => slice(start, start + length).map_or(Node::Null, Node::String),
            JENTRY_ISNUMERIC => {
                let aligned = self.data_start() + intalign(offset);
                slice(aligned, start + length).map_or(Node::Null, Node::Number)
            }
            JENTRY_ISBOOL_FALSE => Node::Bool(false),
            JENTRY_ISBOOL_TRUE => Node::Bool(true),
            JENTRY_ISCONTAINER => {
                let aligned = self.data_start() + intalign(offset);
                slice(aligned, start + length).map_or(Node::Null, |bytes| Node::Container(Container { bytes }))
            }
            _ => Node::Null,
        }
    }

    fn key(&self, index: usize) -> &'a [u8] {
        self.key_at(index, self.offset(index))
    }

    fn key_at(&self, index: usize, offset: usize) -> &'a [u8] {
        match self.node_at(index, offset) {
            Node::String(key) => key,
            _ => &[],
        }
    }

    /// The value of `key` in an object (keys are sorted by length, then bytes).
    pub fn get(&self, key: &str) -> Option<Node<'a>> {
        if !self.is_object() {
            return None;
        }
        let count = self.len();
        let wanted = key.as_bytes();
        let (mut lo, mut hi) = (0usize, count);
        while lo < hi {
            let mid = (lo + hi) / 2;
            let candidate = self.key(mid);
            match key_order(candidate, wanted) {
                std::cmp::Ordering::Equal => return Some(self.node(count + mid)),
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
            }
        }
        None
    }

    /// The container as a jsonb datum's bytes: a 4-byte varlena header, then the
    /// container as it is (how PostgreSQL makes a datum of a nested container).
    pub fn to_varlena(self) -> Vec<u8> {
        let size = 4 + self.bytes.len();
        // SET_VARSIZE of a 4-byte header.
        let header = if cfg!(target_endian = "little") {
            (size as u32) << 2
        } else {
            size as u32 & 0x3FFF_FFFF
        };
        let mut varlena = Vec::with_capacity(size);
        varlena.extend_from_slice(&header.to_ne_bytes());
        varlena.extend_from_slice(self.bytes);
        varlena
    }

    /// The value a root container holds: a scalar root's one element, or the
    /// container itself.
    pub fn value(self) -> Node<'a> {
        if self.is_scalar() {
            self.elements().next().unwrap_or(Node::Null)
        } else {
            Node::Container(self)
        }
    }

    /// The elements of an array (the one element of a scalar root).
    pub fn elements(self) -> impl Iterator<Item = Node<'a>> {
        let count = if self.is_object() { 0 } else { self.len() };
        let mut offset = 0;
        (0..count).map(move |i| {
            let node = self.node_at(i, offset);
            offset = self.end(i, offset);
            node
        })
    }

    /// An object's (key, value) pairs in stored order, each entry's offset found
    /// once, as `elements` does (`node` walks back over earlier entries for each).
    pub fn pairs(self) -> impl Iterator<Item = (&'a [u8], Node<'a>)> {
        let count = if self.is_object() { self.len() } else { 0 };
        // Values are stored after every key.
        let values_start = (0..count).fold(0, |offset, i| self.end(i, offset));
        let (mut key_offset, mut value_offset) = (0, values_start);
        (0..count).map(move |i| {
            let key = self.key_at(i, key_offset);
            let value = self.node_at(count + i, value_offset);
            key_offset = self.end(i, key_offset);
            value_offset = self.end(count + i, value_offset);
            (key, value)
        })
    }
}

/// The exact text of a numeric varlena, as `numeric_out` prints it.
pub(crate) fn numeric_text(varlena: &[u8]) -> Option<String> {
    decode_numeric(varlena).or_else(|| numeric_out_text(varlena))
}

/// The text `numeric_out` prints, decoded here from the numeric's base-10000
/// digits (`src/backend/utils/adt/numeric.c`, `get_str_from_var`): calling
/// `numeric_out` for every record's value cost more than the rest of reading it.
/// `None` for NaN and the infinities (JSON has neither) and for anything this
/// does not recognise, which `numeric_out` then prints.
pub(crate) fn decode_numeric(varlena: &[u8]) -> Option<String> {
    if !cfg!(target_endian = "little") {
        return None;
    }
    let first = *varlena.first()?;
    let (header_len, size) = match first & 0x03 {
        // A 1-byte header (0x01 alone is a toast pointer, never in a jsonb).
        0x01 | 0x03 if first != 0x01 => (1, (first >> 1) as usize),
        0x00 => (4, (u32_at(varlena, 0)? >> 2) as usize),
        _ => return None,
    };
    let body = varlena.get(header_len..size)?;
    let n_header = u16::from_ne_bytes([*body.first()?, *body.get(1)?]);
    let (negative, scale, weight, digits) = match n_header & 0xC000 {
        0xC000 => return None, // NaN, ±Infinity
        0x8000 => {
            // Short format: sign, display scale and a 7-bit weight in the header.
            let weight = (n_header & 0x003F) as i16 | if n_header & 0x0040 != 0 { !0x003F } else { 0 };
            (
                n_header & 0x2000 != 0,
                ((n_header & 0x1F80) >> 7) as usize,
                weight,
                body.get(2..)?,
            )
        }
        sign => {
            let weight = i16::from_ne_bytes([*body.get(2)?, *body.get(3)?]);
            (sign == 0x4000, (n_header & 0x3FFF) as usize, weight, body.get(4..)?)
        }
    };
    if digits.len() % 2 != 0 {
        return None;
    }
    let count = (digits.len() / 2) as i64;
    let digit = |d: i64| -> u16 {
        if (0..count).contains(&d) {
            let at = 2 * d as usize;
            u16::from_ne_bytes([digits[at], digits[at + 1]])
        } else {
            0
        }
    };
    if (0..count).any(|d| digit(d) >= 10_000) {
        return None;
    }
    let push_four = |out: &mut String, dig: u16| {
        for unit in [1000, 100, 10, 1] {
            out.push(char::from(b'0' + (dig / unit % 10) as u8));
        }
    };
    let mut out = String::with_capacity(2 + 4 * (count as usize + 1) + scale);
    if negative {
        out.push('-');
    }
    let weight = i64::from(weight);
    let mut d = 0;
    if weight < 0 {
        out.push('0');
        d = weight + 1;
    } else {
        while d <= weight {
            if d == 0 {
                // The first base-10000 digit without its leading zeros.
                out.push_str(&digit(0).to_string());
            } else {
                push_four(&mut out, digit(d));
            }
            d += 1;
        }
    }
    if scale > 0 {
        out.push('.');
        let end = out.len() + scale;
        while out.len() < end {
            push_four(&mut out, digit(d));
            d += 1;
        }
        out.truncate(end);
    }
    Some(out)
}

/// The exact text of a numeric varlena, by PostgreSQL's own `numeric_out`.
pub(crate) fn numeric_out_text(varlena: &[u8]) -> Option<String> {
    use pgrx::{AnyNumeric, FromDatum};
    // Copied to palloc'd (aligned) memory; detoasting inside handles a short header.
    unsafe {
        let copy = pg_sys::palloc(varlena.len()) as *mut u8;
        std::ptr::copy_nonoverlapping(varlena.as_ptr(), copy, varlena.len());
        let numeric = AnyNumeric::from_polymorphic_datum(pg_sys::Datum::from(copy), false, pg_sys::NUMERICOID)?;
        Some(numeric.to_string())
    }
}

/// How many levels of arrays and objects a record may nest along the fields its
/// stream reads (the record itself is the first). Deeper, the record is rejected
/// (`too_deep`): PostgreSQL parses jsonb as deep as its stack allows, and reading
/// such a value here, or storing it in a meter, would fail the whole run instead of
/// the one record. Fields nobody reads may nest as deep as PostgreSQL allows.
pub const MAX_READ_DEPTH: usize = 64;

/// A node as a serde value (whole subtree), however deep. Past PostgreSQL's
/// stack depth limit, an ERROR (54001).
pub fn to_value(node: Node) -> Value {
    value_within(node, usize::MAX).unwrap_or(Value::Null)
}

/// A node as a serde value (whole subtree), or `None` if it nests more than
/// `levels` arrays and objects. Each level checks PostgreSQL's stack depth limit:
/// jsonb nests as deep as its parser allowed, and a recursion that ran past the
/// stack would take the backend down instead of raising an error.
fn value_within(node: Node, levels: usize) -> Option<Value> {
    if matches!(node, Node::Container(_)) {
        // SAFETY: raises an ordinary ERROR (54001), which pgrx turns into an unwind.
        unsafe { pg_sys::check_stack_depth() };
    }
    Some(match node {
        Node::Null => Value::Null,
        Node::Bool(b) => Value::Bool(b),
        Node::String(bytes) => Value::String(String::from_utf8_lossy(bytes).into_owned()),
        Node::Number(varlena) => numeric_text(varlena)
            .and_then(|text| text.parse::<Number>().ok())
            .map_or(Value::Null, Value::Number),
        Node::Container(c) if c.is_scalar() => {
            return c
                .elements()
                .next()
                .map_or(Some(Value::Null), |n| value_within(n, levels));
        }
        Node::Container(_) if levels == 0 => return None,
        Node::Container(c) if c.is_object() => Value::Object(
            c.pairs()
                .map(|(k, v)| Some((String::from_utf8_lossy(k).into_owned(), value_within(v, levels - 1)?)))
                .collect::<Option<Map<_, _>>>()?,
        ),
        Node::Container(c) => Value::Array(
            c.elements()
                .map(|v| value_within(v, levels - 1))
                .collect::<Option<Vec<_>>>()?,
        ),
    })
}

/// The node at `path` in an object, in place; none when the path finds nothing
/// (a path through a non-object finds nothing).
pub fn node_at<'a>(object: Container<'a>, path: &FieldPath) -> Option<Node<'a>> {
    let mut node = Node::Container(object);
    for key in path.parts() {
        node = match node {
            Node::Container(c) if c.is_object() => c.get(key)?,
            _ => return None,
        };
    }
    Some(node)
}

/// A node reduced to its kind, containers left empty: enough to reject a record
/// that is not an object, without reading (or recursing into) what it holds.
pub fn shallow_value(node: Node) -> Value {
    match node {
        Node::Container(c) if c.is_scalar() => c.elements().next().map_or(Value::Null, to_value),
        Node::Container(c) if c.is_object() => Value::Object(Map::new()),
        Node::Container(_) => Value::Array(Vec::new()),
        scalar => to_value(scalar),
    }
}

/// A scalar read in place, checked as a record's user id, id or timestamp: its
/// text borrowed from the jsonb bytes where it is a string.
impl FieldValue for Node<'_> {
    fn id_text(&self) -> Option<Cow<'_, str>> {
        match *self {
            Node::String(bytes) => Some(String::from_utf8_lossy(bytes)),
            Node::Number(varlena) => numeric_text(varlena).map(Cow::Owned),
            _ => None,
        }
    }

    fn timestamp(&self) -> Option<Timestamp> {
        match *self {
            Node::String(bytes) => parse_timestamp_text(&String::from_utf8_lossy(bytes)),
            other => parse_timestamp(&shallow_value(other)),
        }
    }

    fn shown(&self) -> Cow<'_, Value> {
        Cow::Owned(shallow_value(*self))
    }
}

/// jsonb's order of an object's keys: shorter first, then by bytes.
fn key_order(a: &[u8], b: &[u8]) -> std::cmp::Ordering {
    a.len().cmp(&b.len()).then_with(|| a.cmp(b))
}

/// The dotted paths a stream's processing reads, as a tree of keys, each path
/// with a slot of its own in a `Projected` record.
#[derive(Debug, Default, Clone)]
pub struct Projection {
    root: Wanted,
    /// Slot by path id (`FieldPath::id`); `NO_SLOT` for paths not read.
    slots: Rc<[u32]>,
    slot_count: usize,
}

#[derive(Debug, Default, Clone)]
struct Wanted {
    /// The keys wanted here, in jsonb's key order (`key_order`), so that an
    /// object's pairs, stored in that order, are matched in one merge pass.
    children: Vec<(String, Wanted)>,
    /// The whole value at this point is wanted (a path ends here), into this slot.
    slot: Option<u32>,
}

impl Projection {
    pub fn of<'p>(paths: impl IntoIterator<Item = &'p FieldPath>) -> Projection {
        let mut root = Wanted::default();
        let mut slots: Vec<u32> = Vec::new();
        let mut slot_count = 0;
        for path in paths {
            let mut node = &mut root;
            for part in path.parts() {
                node = node.child(part);
            }
            let slot = *node.slot.get_or_insert_with(|| {
                slot_count += 1;
                (slot_count - 1) as u32
            });
            let id = path.id() as usize;
            if slots.len() <= id {
                slots.resize(id + 1, NO_SLOT);
            }
            slots[id] = slot;
        }
        Projection {
            root,
            slots: slots.into(),
            slot_count,
        }
    }

    /// The projected paths' values in an object record. A projected field that
    /// nests deeper than `MAX_READ_DEPTH` rejects the record (`too_deep`, naming
    /// the field). A root that is not an object has none of them (the caller
    /// rejects it as such).
    pub fn apply(&self, root: Container) -> Result<Projected, Rejection> {
        let mut values = vec![None; self.slot_count];
        if root.is_object() {
            self.root.fill(root, 1, &mut values).map_err(|mut path| {
                path.reverse();
                Rejection::TooDeep {
                    field: path.join("."),
                    limit: MAX_READ_DEPTH,
                }
            })?;
        }
        Ok(Projected::new(values, self.slots.clone()))
    }
}

impl Wanted {
    fn child(&mut self, key: &str) -> &mut Wanted {
        let at = match self
            .children
            .binary_search_by(|(k, _)| key_order(k.as_bytes(), key.as_bytes()))
        {
            Ok(at) => at,
            Err(at) => {
                self.children.insert(at, (key.to_string(), Wanted::default()));
                at
            }
        };
        &mut self.children[at].1
    }

    /// Fills the slots wanted in `container` (at `depth` levels); `Err` is the
    /// path to a value nested too deep, innermost key first.
    fn fill(&self, container: Container, depth: usize, values: &mut [Option<Value>]) -> Result<(), Vec<String>> {
        let mut too_deep = None;
        let mut take = |key: &str, wanted: &Wanted, node: Node| {
            if let Some(slot) = wanted.slot {
                match value_within(node, MAX_READ_DEPTH.saturating_sub(depth)) {
                    // Null is missing, as `FieldPath::get` has it.
                    Some(Value::Null) => {}
                    Some(value) => values[slot as usize] = Some(value),
                    None => {
                        too_deep.get_or_insert_with(|| vec![key.to_string()]);
                        return;
                    }
                }
            }
            // A path through a non-object finds nothing.
            if let Node::Container(c) = node {
                if !wanted.children.is_empty() && c.is_object() {
                    if let Err(mut path) = wanted.fill(c, depth + 1, values) {
                        path.push(key.to_string());
                        too_deep.get_or_insert(path);
                    }
                }
            }
        };
        if container.len() <= 4 * self.children.len() + 8 {
            // A record of about the fields wanted: one merge pass over its pairs
            // and the wanted keys, both in jsonb's key order.
            let mut wanted = self.children.iter().peekable();
            for (key, node) in container.pairs() {
                while let Some((name, projection)) = wanted.peek() {
                    match key_order(name.as_bytes(), key) {
                        std::cmp::Ordering::Less => {
                            wanted.next();
                        }
                        std::cmp::Ordering::Equal => {
                            take(name, projection, node);
                            wanted.next();
                            break;
                        }
                        std::cmp::Ordering::Greater => break,
                    }
                }
                if wanted.peek().is_none() {
                    break;
                }
            }
        } else {
            // Many more fields than wanted: look each wanted one up.
            for (key, wanted) in &self.children {
                if let Some(node) = container.get(key) {
                    take(key, wanted, node);
                }
            }
        }
        match too_deep {
            Some(path) => Err(path),
            None => Ok(()),
        }
    }
}

/// A jsonb datum as it is, for `SpiHeapTupleData::get` (no conversion).
pub struct RawJsonb(pub pg_sys::Datum);

impl pgrx::FromDatum for RawJsonb {
    unsafe fn from_polymorphic_datum(datum: pg_sys::Datum, is_null: bool, _: pg_sys::Oid) -> Option<Self> {
        (!is_null).then_some(RawJsonb(datum))
    }
}

pgrx::impl_sql_translatable!(RawJsonb, "jsonb");

// As pgrx does for its own argument types: unboxed through FromDatum.
unsafe impl<'fcx> pgrx::callconv::ArgAbi<'fcx> for RawJsonb {
    unsafe fn unbox_arg_unchecked(arg: pgrx::callconv::Arg<'_, 'fcx>) -> Self {
        let index = arg.index();
        unsafe {
            arg.unbox_arg_using_from_datum()
                .unwrap_or_else(|| panic!("argument {index} must not be null"))
        }
    }
}

impl pgrx::IntoDatum for RawJsonb {
    fn into_datum(self) -> Option<pg_sys::Datum> {
        Some(self.0)
    }

    fn type_oid() -> pg_sys::Oid {
        pg_sys::JSONBOID
    }
}

/// Copies a jsonb datum's bytes (detoasted) out of PostgreSQL memory.
///
/// # Safety
/// `datum` must be a valid, non-null jsonb datum.
pub unsafe fn datum_bytes(datum: pg_sys::Datum) -> Vec<u8> {
    let slice = datum_slice(datum);
    let bytes = slice.to_vec();
    if !std::ptr::eq(slice.as_ptr(), datum.cast_mut_ptr::<u8>()) {
        pg_sys::pfree(slice.as_ptr() as *mut std::ffi::c_void);
    }
    bytes
}

/// How many usage records an inbox row's jsonb holds: an array's length, or 1 for
/// anything else (what the generated column `meter.usage.records` says, which a
/// database not yet updated from 0.1.0 lacks). Only the first bytes are detoasted:
/// a batch row is compressed and stored out of line, and its header is enough.
///
/// # Safety
/// `datum` must be a valid, non-null jsonb datum.
pub unsafe fn records_in(datum: pg_sys::Datum) -> usize {
    let slice = pg_sys::pg_detoast_datum_slice(datum.cast_mut_ptr::<pg_sys::varlena>(), 0, 4);
    let bytes = std::slice::from_raw_parts(slice as *const u8, varsize(slice));
    let count = match Container::from_varlena(bytes) {
        Some(root) if !root.is_object() && !root.is_scalar() => root.len(),
        _ => 1,
    };
    pg_sys::pfree(slice.cast());
    count
}

/// A jsonb datum's bytes (detoasted) where they are: in the datum itself, or in
/// the detoasted copy PostgreSQL makes in the current memory context.
///
/// # Safety
/// `datum` must be a valid, non-null jsonb datum, and the slice must not outlive
/// it or the current memory context.
pub unsafe fn datum_slice<'a>(datum: pg_sys::Datum) -> &'a [u8] {
    let detoasted = pg_sys::pg_detoast_datum(datum.cast_mut_ptr::<pg_sys::varlena>());
    std::slice::from_raw_parts(detoasted as *const u8, varsize(detoasted))
}

/// VARSIZE of a 4-byte-header varlena (what pg_detoast_datum returns).
unsafe fn varsize(ptr: *const pg_sys::varlena) -> usize {
    let header = u32::from_ne_bytes(*(ptr as *const [u8; 4]));
    (if cfg!(target_endian = "little") {
        header >> 2
    } else {
        header & 0x3FFF_FFFF
    }) as usize
}
