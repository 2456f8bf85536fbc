//! The binary jsonb reader against PostgreSQL's own text output.

use pgrx::prelude::*;

#[pg_schema]
mod tests {
    use crate::jsonb::{self, Container, Node, Projection};
    use crate::record::{FieldPath, RecordRef};
    use pgrx::prelude::*;
    use serde_json::{json, Value};

    /// (binary read, text parse) of every value a query returns.
    fn both(query: &str) -> Vec<(Value, Value)> {
        Spi::connect(|client| {
            let mut out = Vec::new();
            for row in client
                .select(&format!("SELECT v, v::text FROM ({query}) q(v)"), None, &[])
                .unwrap()
            {
                let datum = row.get::<jsonb::RawJsonb>(1).unwrap().unwrap().0;
                let bytes = unsafe { jsonb::datum_bytes(datum) };
                let binary = jsonb::to_value(Node::Container(Container::from_varlena(&bytes).unwrap()));
                let text: Value = serde_json::from_str(&row.get::<String>(2).unwrap().unwrap()).unwrap();
                out.push((binary, text));
            }
            out
        })
    }

    /// `ingest`'s check of a record read in place takes the records it can judge on
    /// their bytes (string fields) and gives the full check's answer for them; it
    /// leaves every other record (numbers, bad or missing fields) to the full check.
    #[pg_test]
    fn the_in_place_check_agrees_with_the_full_check() {
        use crate::inbox::{check_object, checked_in_place};
        use crate::record::{Clock, FieldMap};
        let fields = FieldMap::default();
        let clock = Clock {
            now: "2026-06-01T12:00:00Z".parse().unwrap(),
            future_tolerance: jiff::SignedDuration::from_mins(5),
        };
        let checked = Projection::of([&fields.user_id, &fields.timestamp, &fields.id]);
        let long = "x".repeat(crate::record::MAX_ID_LEN + 1);
        // (record, whether the in-place check judges it)
        let cases = [
            (
                json!({"userId": "u1", "id": "r1", "timestamp": "2026-06-01T11:00:00Z", "value": 3}),
                true,
            ),
            (
                json!({"userId": "u1", "timestamp": "2026-06-01T11:00:00.123+02:00"}),
                true,
            ),
            (
                json!({"userId": "u1", "id": "r2", "timestamp": "2026-06-01 11:00:00"}),
                true,
            ),
            (json!({"userId": "u1", "id": "r3", "timestamp": "1780000000000"}), true),
            (json!({"userId": "u1", "id": "r4", "timestamp": null}), true),
            (json!({"userId": "u1", "id": null}), true),
            (json!({"userId": "u1", "id": 42}), false),
            (json!({"userId": 7, "id": "r5"}), false),
            (
                json!({"userId": "u1", "id": "r6", "timestamp": 1780000000000_i64}),
                false,
            ),
            (
                json!({"userId": "u1", "id": "r7", "timestamp": "2026-06-01T12:06:00Z"}),
                false,
            ),
            (json!({"userId": "u1", "id": "r8", "timestamp": "yesterday"}), false),
            (json!({"userId": "  ", "id": "r9"}), false),
            (json!({"userId": "u1", "id": ""}), false),
            (json!({"userId": "u1", "id": long}), false),
            (json!({"id": "r11"}), false),
            (json!({"userId": null, "id": "r12"}), false),
            (json!({"userId": {"nested": 1}, "id": "r13"}), false),
            (json!({"userId": "u1", "id": ["r14"]}), false),
        ];
        for (record, judged) in cases {
            let datum =
                Spi::get_one_with_args::<jsonb::RawJsonb>("SELECT $1::text::jsonb", &[record.to_string().into()])
                    .unwrap()
                    .unwrap()
                    .0;
            let bytes = unsafe { jsonb::datum_bytes(datum) };
            let object = Container::from_varlena(&bytes).unwrap();
            let in_place = checked_in_place(object, &fields, &clock);
            let full = check_object(object, &fields, &checked, &clock);
            assert_eq!(in_place.is_some(), judged, "{record}");
            if let Some(record_id) = in_place {
                assert_eq!(full, Ok(record_id), "{record}");
            }
        }
    }

    #[pg_test]
    fn binary_reads_equal_text_parses() {
        let cases = both(
            r#"VALUES ('{"a": 1, "bb": "x", "c": [1, 2.50, -3e-7, 1e40], "d": {"e": null, "f": true, "g": false}}'::jsonb),
                      ('[]'), ('{}'), ('"scalar"'), ('42.000'), ('null'), ('true'),
                      ('{"unicode": "smörgåsbord ✓ 🚀", "escapes": "tab\tquote\"backslash\\"}'),
                      ('{"big": 123456789012345678901234567890.123456789012345678901234567890}'),
                      ('[[[[[[1]]]]]]')"#,
        );
        for (binary, text) in &cases {
            assert_eq!(binary, text);
        }
        // Long containers use stored offsets every 32 entries; long strings and
        // many keys exercise the length/offset arithmetic.
        let generated = both(
            "SELECT jsonb_build_object(
                        'arr', (SELECT jsonb_agg(CASE WHEN i % 3 = 0 THEN to_jsonb(i * 1.5) WHEN i % 3 = 1 THEN to_jsonb('s' || repeat('x', i)) ELSE jsonb_build_object('k', i) END) FROM generate_series(1, n) i),
                        'obj', (SELECT jsonb_object_agg('key' || i, i) FROM generate_series(1, n) i),
                        'n', n)
               FROM generate_series(1, 80, 7) n",
        );
        assert_eq!(generated.len(), 12);
        for (binary, text) in &generated {
            assert_eq!(binary, text);
        }
    }

    #[pg_test]
    fn numerics_decode_as_numeric_out_prints_them() {
        // Both signs, weights either side of the point, trailing zeros, scales
        // past the short format's 63 and weights past its ±63, thousand-digit values.
        let array = Spi::get_one::<jsonb::RawJsonb>(
            "SELECT jsonb_agg(to_jsonb(v)) FROM (
                 SELECT ((i * 7919) % 100003)::numeric / 10::numeric ^ (i % 30) * (1 - 2 * (i % 2)) FROM generate_series(0, 400) i
                 UNION ALL SELECT 10::numeric ^ e * 1.5 FROM generate_series(-300, 300, 7) e
                 UNION ALL SELECT v::numeric FROM unnest(ARRAY['0', '0.000', '-0.5', '9999', '10000', '99999999.99990000',
                     '47.2900000000000000', '1e1000', '-1.5e-200', '0.00000000000000000000000000000000000000000000000000000000000000000001',
                     '123456789012345678901234567890.123456789012345678901234567890', '-9223372036854775808']) v) q(v)",
        )
        .unwrap()
        .unwrap();
        let bytes = unsafe { jsonb::datum_bytes(array.0) };
        let root = Container::from_varlena(&bytes).unwrap();
        let mut checked = 0;
        for node in root.elements() {
            let Node::Number(numeric) = node else {
                panic!("a number")
            };
            let printed = jsonb::numeric_out_text(numeric).unwrap();
            assert_eq!(jsonb::decode_numeric(numeric).as_deref(), Some(printed.as_str()));
            // The same numeric with a 1-byte varlena header.
            let size = (u32::from_ne_bytes(numeric[..4].try_into().unwrap()) >> 2) as usize;
            if numeric[0] & 0x03 == 0 && size - 3 < 128 {
                let mut short = vec![(((size - 3) << 1) | 1) as u8];
                short.extend_from_slice(&numeric[4..size]);
                assert_eq!(jsonb::decode_numeric(&short).as_deref(), Some(printed.as_str()));
            }
            checked += 1;
        }
        assert_eq!(checked, 401 + 86 + 12);
        // Truncated or malformed bytes are not decoded (numeric_out gets them).
        assert_eq!(jsonb::decode_numeric(&[]), None);
        assert_eq!(jsonb::decode_numeric(&[0x01, 0, 0]), None);
        assert_eq!(jsonb::decode_numeric(&[0x20, 0, 0, 0, 0x00, 0xC0]), None);
    }

    #[pg_test]
    fn projections_keep_exactly_the_named_paths() {
        // Keys of one length interleaved with wanted ones (jsonb sorts by length,
        // then bytes) test the merge of pairs and wanted keys.
        let paths: Vec<FieldPath> = [
            "userId",
            "device.os",
            "meta",
            "missing.deep",
            "scalar.x",
            "b",
            "ab",
            "c.zz",
            // A path inside another one wanted whole gets its own value too.
            "meta.a",
        ]
        .iter()
        .map(|p| FieldPath::parse(p).unwrap())
        .collect();
        let projection = Projection::of(&paths);
        let record = json!({"userId": 7, "device": {"os": "ios", "model": "x"}, "meta": {"a": [1, {"b": 2}]}, "scalar": 5, "other": 1,
                            "a": 1, "b": 2, "aa": 3, "ab": 4, "ba": 5, "c": {"z": 6, "zy": 7, "zz": 8, "zzz": 9}});
        // Read in one pass over a small record's pairs, looked up one by one in a
        // record of many more fields (past the 32 entries that store an offset).
        let mut wide = record.clone();
        for i in 0..100 {
            wide[format!("extra{i}")] = json!(format!("value {i}"));
        }
        for record in [record, wide] {
            let projected = Spi::connect(|client| {
                let row = client
                    .select("SELECT $1::jsonb", None, &[pgrx::JsonB(record.clone()).into()])
                    .unwrap()
                    .first()
                    .get::<jsonb::RawJsonb>(1)
                    .unwrap()
                    .unwrap()
                    .0;
                let bytes = unsafe { jsonb::datum_bytes(row) };
                projection.apply(Container::from_varlena(&bytes).unwrap()).unwrap()
            });
            let projected = RecordRef::from(&projected);
            for path in &paths {
                assert_eq!(projected.get(path), path.get(&record), "{path}");
            }
            assert_eq!(projected.get(&paths[1]), Some(&json!("ios")));
            assert_eq!(projected.get(&paths[8]), Some(&json!([1, {"b": 2}])));
            assert_eq!(projected.get(&paths[3]), None);
            // Fields not named are not read.
            for unnamed in ["device.model", "other", "a", "c.z", "c"] {
                let path = FieldPath::parse(unnamed).unwrap();
                assert!(path.get(&record).is_some(), "{unnamed}");
                assert_eq!(projected.get(&path), None, "{unnamed}");
            }
        }
    }
}
