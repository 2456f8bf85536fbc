//! Reading PostgreSQL's binary jsonb in place, so the meter processor takes only
//! the fields its rules use from each record, without printing the record as text
//! and parsing it again (PostgreSQL's `src/include/utils/jsonb.h` describes the
//! format). Numbers are converted by `numeric_out`, so they stay exact.
//!
//! Everything is bounds-checked: malformed bytes read as null, never as a panic.

use std::collections::BTreeMap;

use pgrx::pg_sys;
use serde_json::{Map, Number, Value};

use crate::record::FieldPath;

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

    fn length(&self, index: usize) -> usize {
        let entry = self.entry(index);
        if entry & JENTRY_HAS_OFF != 0 {
            ((entry & JENTRY_OFFLENMASK) as usize).saturating_sub(self.offset(index))
        } else {
            (entry & JENTRY_OFFLENMASK) as usize
        }
    }

    fn node(&self, index: usize) -> Node<'a> {
        let entry = self.entry(index);
        let offset = self.offset(index);
        let start = self.data_start() + offset;
        let length = self.length(index);
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
        match self.node(index) {
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
            match candidate.len().cmp(&wanted.len()).then_with(|| candidate.cmp(wanted)) {
                std::cmp::Ordering::Equal => return Some(self.node(count + mid)),
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
            }
        }
        None
    }

    /// The elements of an array (the one element of a scalar root).
    pub fn elements(self) -> impl Iterator<Item = Node<'a>> {
        let count = if self.is_object() { 0 } else { self.len() };
        (0..count).map(move |i| self.node(i))
    }

    fn pairs(self) -> impl Iterator<Item = (&'a [u8], Node<'a>)> {
        let count = if self.is_object() { self.len() } else { 0 };
        (0..count).map(move |i| (self.key(i), self.node(count + i)))
    }
}

/// The exact text of a numeric varlena, by PostgreSQL's own `numeric_out`.
fn numeric_text(varlena: &[u8]) -> Option<String> {
    use pgrx::{AnyNumeric, FromDatum};
    // Copied to palloc'd (aligned) memory; detoasting inside handles a short header.
    unsafe {
        let copy = pg_sys::palloc(varlena.len()) as *mut u8;
        std::ptr::copy_nonoverlapping(varlena.as_ptr(), copy, varlena.len());
        let numeric = AnyNumeric::from_polymorphic_datum(pg_sys::Datum::from(copy), false, pg_sys::NUMERICOID)?;
        Some(numeric.to_string())
    }
}

/// A node as a serde value (whole subtree). Each level checks PostgreSQL's stack
/// depth limit: jsonb nests as deep as its parser allowed, and a recursion that
/// ran past the stack would take the backend down instead of raising an error.
pub fn to_value(node: Node) -> Value {
    if matches!(node, Node::Container(_)) {
        // SAFETY: raises an ordinary ERROR (54001), which pgrx turns into an unwind.
        unsafe { pg_sys::check_stack_depth() };
    }
    match node {
        Node::Null => Value::Null,
        Node::Bool(b) => Value::Bool(b),
        Node::String(bytes) => Value::String(String::from_utf8_lossy(bytes).into_owned()),
        Node::Number(varlena) => numeric_text(varlena)
            .and_then(|text| text.parse::<Number>().ok())
            .map_or(Value::Null, Value::Number),
        Node::Container(c) if c.is_scalar() => c.elements().next().map_or(Value::Null, to_value),
        Node::Container(c) if c.is_object() => Value::Object(
            c.pairs()
                .map(|(k, v)| (String::from_utf8_lossy(k).into_owned(), to_value(v)))
                .collect::<Map<_, _>>(),
        ),
        Node::Container(c) => Value::Array(c.elements().map(to_value).collect()),
    }
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

/// The dotted paths a stream's processing reads, as a tree of keys.
#[derive(Debug, Default, Clone)]
pub struct Projection {
    children: BTreeMap<String, Projection>,
    /// The whole value at this point is wanted (a path ends here).
    whole: bool,
}

impl Projection {
    pub fn of<'p>(paths: impl IntoIterator<Item = &'p FieldPath>) -> Projection {
        let mut root = Projection::default();
        for path in paths {
            let mut node = &mut root;
            for part in path.as_str().split('.') {
                node = node.children.entry(part.to_string()).or_default();
            }
            node.whole = true;
        }
        root
    }

    /// The record reduced to the projected paths, shaped as the record is, so
    /// `FieldPath::get` finds every projected field as in the full record. A root
    /// that is not an object is returned whole (it is rejected as such).
    pub fn apply(&self, root: Container) -> Value {
        if !root.is_object() {
            return to_value(Node::Container(root));
        }
        self.object(root)
    }

    fn object(&self, container: Container) -> Value {
        let mut map = Map::new();
        for (key, wanted) in &self.children {
            let Some(node) = container.get(key) else { continue };
            let value = match node {
                _ if wanted.whole => to_value(node),
                Node::Container(c) if c.is_object() => wanted.object(c),
                // A path through a non-object finds nothing; keep the key so the
                // shape stays (its value is not what the path wants).
                _ => continue,
            };
            map.insert(key.clone(), value);
        }
        Value::Object(map)
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
