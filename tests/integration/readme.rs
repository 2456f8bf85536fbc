//! The README, executed: every fenced `sql` block runs in order, in one psql
//! session, against a fresh database, and a `text` block right after a `sql`
//! block is the output it must print. Blocks fenced `sql signature` are function
//! signatures (not statements) and are only checked to name meter functions.
//!
//! Output is compared cell by cell (psql's column widths and rule lines are
//! ignored) with times and PIDs masked; `…` in the README stands for any text
//! within a line, or for any lines when it is alone on its line.

use std::path::Path;
use std::process::Command;

use crate::support::{connect, port};

struct Block {
    line: usize,
    sql: String,
    expected: Option<String>,
}

/// The README's fenced blocks as (line, info string, body).
fn fences(readme: &str) -> Vec<(usize, String, String)> {
    let mut blocks = Vec::new();
    let mut open: Option<(usize, String, String)> = None;
    for (number, line) in readme.lines().enumerate() {
        match open.take() {
            None => {
                if let Some(info) = line.strip_prefix("```") {
                    open = Some((number + 1, info.trim().to_string(), String::new()));
                }
            }
            Some((start, info, mut body)) => {
                if line.trim_end() == "```" {
                    blocks.push((start, info, body));
                } else {
                    body.push_str(line);
                    body.push('\n');
                    open = Some((start, info, body));
                }
            }
        }
    }
    blocks
}

/// The `sql` blocks with the `text` block that follows each one directly (only
/// blank lines between), and the signature blocks.
fn sql_blocks(readme: &str) -> (Vec<Block>, Vec<(usize, String)>) {
    let lines: Vec<&str> = readme.lines().collect();
    let fenced = fences(readme);
    let mut blocks = Vec::new();
    let mut signatures = Vec::new();
    for (i, (line, info, body)) in fenced.iter().enumerate() {
        match info.as_str() {
            "sql" => {
                let closing = line + body.lines().count() + 1;
                let expected = fenced.get(i + 1).and_then(|(next, next_info, next_body)| {
                    let between = &lines[closing..next - 1];
                    (next_info == "text" && between.iter().all(|l| l.trim().is_empty())).then(|| next_body.clone())
                });
                blocks.push(Block {
                    line: *line,
                    sql: body.clone(),
                    expected,
                });
            }
            "sql signature" => signatures.push((*line, body.clone())),
            _ => {}
        }
    }
    (blocks, signatures)
}

/// One line as compared: table rows as their trimmed cells, rules dropped,
/// times and PIDs masked.
fn normalize(line: &str) -> Option<String> {
    let trimmed = line.trim_end();
    if !trimmed.is_empty() && trimmed.chars().all(|c| c == '-' || c == '+') {
        return None;
    }
    let cells = if trimmed.contains(" | ") || trimmed.ends_with(" |") {
        trimmed.split('|').map(str::trim).collect::<Vec<_>>().join("|")
    } else {
        trimmed.trim().to_string()
    };
    Some(mask(&cells))
}

fn mask(text: &str) -> String {
    let times = mask_times(text);
    let mut out = String::new();
    let mut rest = times.as_str();
    while let Some(at) = rest.find("PID ") {
        out.push_str(&rest[..at + 4]);
        rest = rest[at + 4..].trim_start_matches(|c: char| c.is_ascii_digit());
        out.push_str("<pid>");
    }
    out.push_str(rest);
    out
}

/// Replaces timestamps (`2026-11-22 10:56:10.64344+00`, `2026-11-22T10:23:32.621Z`,
/// `2026-12-01 00:00:00`) with `<time>`.
fn mask_times(text: &str) -> String {
    let bytes = text.as_bytes();
    let digits =
        |from: usize, n: usize| from + n <= bytes.len() && bytes[from..from + n].iter().all(u8::is_ascii_digit);
    let mut out = String::new();
    let mut i = 0;
    while i < bytes.len() {
        let is_time = digits(i, 4)
            && bytes.get(i + 4) == Some(&b'-')
            && digits(i + 5, 2)
            && bytes.get(i + 7) == Some(&b'-')
            && digits(i + 8, 2)
            && matches!(bytes.get(i + 10), Some(b' ') | Some(b'T'))
            && digits(i + 11, 2)
            && bytes.get(i + 13) == Some(&b':');
        if !is_time {
            let c = text[i..].chars().next().unwrap();
            out.push(c);
            i += c.len_utf8();
            continue;
        }
        let mut end = i + 16;
        while end < bytes.len() && (bytes[end].is_ascii_digit() || matches!(bytes[end], b':' | b'.')) {
            end += 1;
        }
        if bytes.get(end) == Some(&b'Z') {
            end += 1;
        } else if matches!(bytes.get(end), Some(b'+')) && digits(end + 1, 2) {
            end += 3;
        }
        out.push_str("<time>");
        i = end;
    }
    out
}

/// Does `actual` match `pattern`, where `…` stands for any text?
fn matches_line(pattern: &str, actual: &str) -> bool {
    let parts: Vec<&str> = pattern.split('…').collect();
    if parts.len() == 1 {
        return pattern == actual;
    }
    let mut rest = actual;
    for (i, part) in parts.iter().enumerate() {
        if i == 0 {
            let Some(after) = rest.strip_prefix(part) else {
                return false;
            };
            rest = after;
        } else if i == parts.len() - 1 {
            return rest.ends_with(part);
        } else {
            let Some(at) = rest.find(part) else {
                return false;
            };
            rest = &rest[at + part.len()..];
        }
    }
    true
}

/// Does the output match the expected lines (a line `…` skips any lines)?
fn matches_output(expected: &[String], actual: &[String]) -> bool {
    match expected.split_first() {
        None => actual.is_empty(),
        Some((first, rest)) if first == "…" => (0..=actual.len()).any(|skip| matches_output(rest, &actual[skip..])),
        Some((first, rest)) => {
            !actual.is_empty() && matches_line(first, &actual[0]) && matches_output(rest, &actual[1..])
        }
    }
}

fn lines_of(text: &str) -> Vec<String> {
    let mut lines: Vec<String> = text.lines().filter_map(normalize).collect();
    while lines.last().is_some_and(String::is_empty) {
        lines.pop();
    }
    while lines.first().is_some_and(String::is_empty) {
        lines.remove(0);
    }
    lines
}

#[test]
fn every_sql_snippet_in_the_readme_runs_and_prints_what_it_shows() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let (blocks, signatures) = sql_blocks(&readme);
    assert!(blocks.len() > 30, "found only {} sql blocks", blocks.len());
    for (line, body) in &signatures {
        for statement in body.lines().filter(|l| !l.trim().is_empty() && !l.starts_with(' ')) {
            assert!(
                statement.starts_with("meter."),
                "README.md:{line}: a signature block holds something else: {statement}"
            );
        }
    }

    // The README's roles, consumers and cron jobs are cluster-wide or bound to the
    // cron database: this test runs alone in the one pg_cron uses.
    let _guard = crate::support::SHARED_DATABASE_LOCK
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let database = crate::support::WORKER_DATABASE;
    let mut admin = connect("postgres");
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {database} WITH (FORCE)"))
        .unwrap();
    admin.batch_execute(&format!("CREATE DATABASE {database}")).unwrap();
    admin.batch_execute("DROP ROLE IF EXISTS billing_service").unwrap();

    let mut script = String::from("\\set ON_ERROR_STOP 1\n\\pset footer off\n");
    for (i, block) in blocks.iter().enumerate() {
        script.push_str(&format!("\\echo '<<block {i}>>'\n{}\n", block.sql));
    }
    script.push_str(&format!("\\echo '<<block {}>>'\n", blocks.len()));
    let output = Command::new("psql")
        .args([
            "-X",
            "-q",
            "-h",
            "localhost",
            "-p",
            &port().to_string(),
            "-U",
            "postgres",
            "-d",
            database,
        ])
        .env("PGTZ", "UTC")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child.stdin.take().unwrap().write_all(script.as_bytes())?;
            child.wait_with_output()
        })
        .expect("running psql");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);

    let mut outputs: Vec<&str> = Vec::new();
    for (i, _) in blocks.iter().enumerate() {
        let start = stdout.find(&format!("<<block {i}>>\n"));
        let end = stdout.find(&format!("<<block {}>>\n", i + 1));
        match (start, end) {
            (Some(start), Some(end)) => outputs.push(&stdout[start + format!("<<block {i}>>\n").len()..end]),
            _ => panic!(
                "README.md:{}: the block failed:\n{}\n{stderr}\n(output so far:\n{})",
                blocks[i].line,
                blocks[i].sql,
                start.map_or("", |s| &stdout[s..])
            ),
        }
    }
    assert!(output.status.success(), "psql failed: {stderr}");
    // What the README leaves behind outside its database: cron jobs and a role.
    connect(database)
        .batch_execute("SELECT cron.unschedule(jobid) FROM cron.job; DROP ROLE billing_service")
        .unwrap();

    let mut mismatches = Vec::new();
    for (block, actual) in blocks.iter().zip(outputs) {
        if let Some(expected) = &block.expected {
            let (want, got) = (lines_of(expected), lines_of(actual));
            if !matches_output(&want, &got) {
                mismatches.push(format!(
                    "README.md:{}:\n{}--- the README shows:\n{}--- psql printed:\n{}",
                    block.line, block.sql, expected, actual
                ));
            }
        }
    }
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
}
