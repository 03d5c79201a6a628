//! A tiny run of the benchmark, so that the script cannot rot. No timing is asserted.

use std::process::Command;

use crate::common::bin;

#[test]
fn the_benchmark_runs_every_case_on_tiny_data() {
    let bench = bin().parent().unwrap().join("examples/bench");
    assert!(
        bench.exists(),
        "cargo test builds the examples; {} is missing",
        bench.display()
    );
    let tmp = tempfile::tempdir().unwrap();
    let report = tmp.path().join("BENCHMARKS.md");
    let out = Command::new(&bench)
        .args(["--scale", "0.002", "--runs", "1", "--output"])
        .arg(&report)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&report).unwrap();
    for row in [
        "| limit: sendfile |",
        "| cat, 64 KiB pipes |",
        "| myrocks-hotbackup --target-dir |",
        "| mariabackup --target-dir |",
        "| zstd:3, all cores |",
        "| myrocks-hotbackup verify |",
        "| myrocks-hotbackup copy-back |",
        "| mariabackup --copy-back |",
        "| myrocks-hotbackup xbstream |",
        "| myrocks-hotbackup tar |",
        "| original xbstream |",
        "| original tar |",
        "| mariabackup xbstream |",
        "| mbstream -x |",
        "| tar -x |",
        "| myrocks-hotbackup extract (xbstream) |",
    ] {
        assert_eq!(
            text.matches(row).count(),
            2,
            "{row} should appear once per data set:\n{text}"
        );
    }
    assert!(
        text.contains("## large files") && text.contains("## many files"),
        "{text}"
    );
    assert_eq!(text.matches("### Throttle accuracy").count(), 2, "{text}");
    assert_eq!(
        text.matches("| 1. full backup into an empty repository / prefix |")
            .count(),
        1,
        "{text}"
    );
    assert_eq!(
        text.matches("| myrocks-hotbackup, xbstream | ").count(),
        2,
        "{text}"
    );
    for row in [
        "| myrocks-hotbackup --target-dir (InnoDB rows read logically) |",
        "| myrocks-hotbackup copy-back (loads the InnoDB rows) |",
        "| mariadb-dump --single-transaction (InnoDB part only) |",
        "| mariadb < dump (InnoDB part only, binary log off) |",
    ] {
        assert_eq!(text.matches(row).count(), 1, "{row}:\n{text}");
    }
    assert!(
        text.contains("## Commit stall against the number of SSTs"),
        "{text}"
    );
    let stall = text.split("## Commit stall").nth(1).unwrap();
    let stall = stall.split("\n## ").next().unwrap();
    let rows = stall
        .lines()
        .filter(|l| l.starts_with("| ") && l[2..].starts_with(|c: char| c.is_ascii_digit()))
        .count();
    assert_eq!(rows, 2, "one row per SST count:\n{stall}");
}
