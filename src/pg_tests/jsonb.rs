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

    /// `ingest` checks a record's user id, id and timestamp on its jsonb bytes, and
    /// gives the answer a run's check of the record read whole gives: the same
    /// record id, or the same rejection with the same reason.
    #[pg_test]
    fn ingests_check_on_jsonb_bytes_agrees_with_the_runs_check() {
        use crate::inbox::check_object;
        use crate::record::{extract, Clock, FieldMap};
        let fields = FieldMap::default();
        let clock = Clock {
            now: "2026-06-01T12:00:00Z".parse().unwrap(),
            future_tolerance: jiff::SignedDuration::from_mins(5),
        };
        let checked = Projection::of([&fields.user_id, &fields.timestamp, &fields.id]);
        let long = "x".repeat(crate::record::MAX_ID_LEN + 1);
        let cases = [
            json!({"userId": "u1", "id": "r1", "timestamp": "2026-06-01T11:00:00Z", "value": 3}),
            json!({"userId": "u1", "timestamp": "2026-06-01T11:00:00.123+02:00"}),
            json!({"userId": "u1", "id": "r2", "timestamp": "2026-06-01 11:00:00"}),
            json!({"userId": "u1", "id": "r3", "timestamp": "1780000000000"}),
            json!({"userId": "u1", "id": "r4", "timestamp": null}),
            json!({"userId": "u1", "id": null}),
            json!({"userId": "u1", "id": 42}),
            json!({"userId": 7, "id": "r5"}),
            json!({"userId": 7.50, "id": -0.5}),
            json!({"userId": "u1", "id": "r6", "timestamp": 1780000000000_i64}),
            json!({"userId": "u1", "id": "r6b", "timestamp": 1780000000000.5}),
            json!({"userId": "u1", "id": "r7", "timestamp": "2026-06-01T12:06:00Z"}),
            json!({"userId": "u1", "id": "r8", "timestamp": "yesterday"}),
            json!({"userId": "u1", "id": "r8b", "timestamp": "a timestamp of more than forty characters, quoted"}),
            json!({"userId": "u1", "id": "r8c", "timestamp": 1.2345678901234568e44}),
            json!({"userId": "u1", "id": "r8d", "timestamp": true}),
            json!({"userId": "  ", "id": "r9"}),
            json!({"userId": "u1", "id": ""}),
            json!({"userId": "u1", "id": long}),
            json!({"userId": false, "id": "r10b"}),
            json!({"id": "r11"}),
            json!({"userId": null, "id": "r12"}),
            json!({"userId": {"nested": 1}, "id": "r13"}),
            json!({"userId": "u1", "id": ["r14"]}),
            json!({"userId": "smörgåsbord ✓", "id": "🚀"}),
        ];
        let mut outcomes = Vec::new();
        for record in cases {
            let datum =
                Spi::get_one_with_args::<jsonb::RawJsonb>("SELECT $1::text::jsonb", &[record.to_string().into()])
                    .unwrap()
                    .unwrap()
                    .0;
            let bytes = unsafe { jsonb::datum_bytes(datum) };
            let object = Container::from_varlena(&bytes).unwrap();
            let on_bytes = check_object(object, &fields, &checked, &clock);
            let by_run = checked
                .apply(object)
                .and_then(|projected| extract(&projected, &fields, &clock).map(|extracted| extracted.record_id));
            assert_eq!(on_bytes, by_run, "{record}");
            outcomes.push(on_bytes.map_err(|rejection| rejection.to_string()));
        }
        let id = |text: &str| Ok(Some(text.to_string()));
        assert_eq!(outcomes[0], id("r1"));
        assert_eq!(outcomes[1], Ok(None));
        assert_eq!(outcomes[6], id("42"));
        assert_eq!(outcomes[8], id("-0.5"));
        assert_eq!(outcomes[9], id("r6"));
        assert_eq!(outcomes[24], id("🚀"));
        let rejected = |at: usize| outcomes[at].clone().unwrap_err();
        assert!(rejected(11).contains("future"), "{}", rejected(11));
        assert!(rejected(12).contains("\"yesterday\""), "{}", rejected(12));
        assert!(rejected(13).contains("a long string"), "{}", rejected(13));
        assert!(rejected(15).contains("a boolean"), "{}", rejected(15));
        assert!(
            rejected(19).contains("a boolean: use a string or a number"),
            "{}",
            rejected(19)
        );
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
