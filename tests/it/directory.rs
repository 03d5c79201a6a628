//! Directory backups, compression, `verify` and `info`: what a DBA keeping backups in cron
//! sees. Restored copies are started and must equal the source at the recorded GTID.

use std::fs;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use sandbox::workload::{assert_bank_consistent, load_bank, Load};
use sandbox::Server;

use crate::common::db::*;
use crate::common::*;

/// Every file restored from a compressed backup is what was read from the server: its
/// CRC-32 is the one the manifest recorded for the original (but for what the restore's
/// bootstrap rewrites: the Aria log and the mysql schema; and the SSTs compaction made
/// obsolete during the rounds, which are not restored).
fn assert_restored_as_read(m: &serde_json::Value, restored: &Path) {
    let obsolete: Vec<String> = m["backup"]["obsolete_sst"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| format!("#rocksdb/{}", n.as_str().unwrap()))
        .collect();
    let mut compared = 0;
    for f in m["files"].as_array().unwrap() {
        let Some(o) = f.get("original") else { continue };
        let name = o["path"].as_str().unwrap();
        if name.starts_with("aria_log")
            || name.starts_with("mysql/")
            || obsolete.iter().any(|n| n == name)
        {
            continue;
        }
        let path = match name.strip_prefix("#rocksdb/") {
            Some(n) => restored.join("#rocksdb").join(n),
            None => restored.join(name),
        };
        let bytes = fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(bytes.len() as u64, o["size"].as_u64().unwrap(), "{name}");
        assert_eq!(
            u64::from(crc32fast::hash(&bytes)),
            o["crc32"].as_u64().unwrap(),
            "{name}"
        );
        compared += 1;
    }
    assert!(compared > 10, "only {compared} files compared");
}

/// Runs our binary with `args`.
fn ours(args: &[&str]) -> Output {
    Command::new(bin()).args(args).output().unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `backup --target-dir DIR` with extra arguments, asserting success; returns its log.
fn dir_backup(server: &Server, dir: &Path, args: &[&str]) -> String {
    let mut cmd = backup_cmd(server, &["--target-dir", dir.to_str().unwrap()]);
    let out = cmd.args(args).output().unwrap();
    let log = stderr(&out);
    assert!(
        out.status.success(),
        "backup failed ({}):\n{log}",
        out.status
    );
    log
}

fn verify_json(target: &[&str]) -> (Option<i32>, serde_json::Value) {
    let mut args = vec!["verify", "--json"];
    args.extend_from_slice(target);
    let out = ours(&args);
    let json = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("verify --json printed no JSON ({e}):\n{}", stderr(&out)));
    (out.status.code(), json)
}

fn info_json(dir: &Path) -> serde_json::Value {
    let out = ours(&["info", "--json", dir.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Plain and compressed directory backups under the bank workload: verified, described by
/// `info`, reported by `--report`, restored with `copy-back` and `move-back`, started, and
/// equal to the source at their GTIDs.
#[test]
fn directory_backups_plain_and_compressed_restore_exactly_under_load() {
    let source = Server::start();
    load_bank(&source, 60_000);
    let tmp = tempfile::tempdir().unwrap();
    let load = Load::start(&source);
    std::thread::sleep(Duration::from_millis(300));

    let plain = tmp.path().join("plain");
    let report = tmp.path().join("report.json");
    let log = dir_backup(
        &source,
        &plain,
        &["--parallel", "4", "--report", report.to_str().unwrap()],
    );
    assert!(log.contains("backup completed OK!"), "{log}");
    let packed = tmp.path().join("packed");
    let log = dir_backup(
        &source,
        &packed,
        &[
            "--compress=zstd:3",
            "--compress-threads",
            "2",
            "--interval",
            "1",
        ],
    );
    assert!(log.contains("Compressed "), "{log}");
    let commits_during = load.commits();
    assert!(commits_during > 0, "the load must run during the backups");

    // Both verify, and say so in JSON.
    for dir in [&plain, &packed] {
        let (code, v) = verify_json(&[dir.to_str().unwrap()]);
        assert_eq!(code, Some(0), "{v}");
        assert_eq!(v["ok"], true);
        assert_eq!(v["complete"], true);
        assert!(v["files_checked"].as_u64().unwrap() > 10, "{v}");
        assert_eq!(v["problems"].as_array().unwrap().len(), 0);
    }

    // info: what each holds; the compressed one stores SSTs as .zst, with both sizes.
    let info = info_json(&plain);
    assert_eq!(info["complete"], true);
    assert!(
        info["kinds"]["sst"]["files"].as_u64().unwrap() > 0,
        "{info}"
    );
    assert!(info["commit_stall_ms"].as_f64().unwrap() > 0.0);
    assert_eq!(info["compression"], serde_json::Value::Null);
    let gtid_plain = info["gtid_binlog_pos"].as_str().unwrap().to_string();
    let info_packed = info_json(&packed);
    assert_eq!(info_packed["compression"], "zstd:3");
    let sst = &info_packed["kinds"]["sst"];
    assert!(
        sst["stored_bytes"].as_u64().unwrap() < sst["bytes"].as_u64().unwrap(),
        "{info_packed}"
    );
    let m = manifest(&packed);
    let zst = m["files"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["kind"] == "sst")
        .unwrap();
    assert!(zst["path"].as_str().unwrap().ends_with(".sst.zst"), "{zst}");
    assert!(zst["original"]["path"].as_str().unwrap().ends_with(".sst"));
    assert!(packed.join(zst["path"].as_str().unwrap()).is_file());
    // The coordinates stay readable by scripts: metadata is never compressed.
    let coords = fs::read_to_string(packed.join("xtrabackup_binlog_info")).unwrap();
    let gtid_packed = info_packed["gtid_binlog_pos"].as_str().unwrap().to_string();
    assert!(coords.ends_with(&format!("\t{gtid_packed}\n")), "{coords}");

    // --report: the same summary, with the run's speed, as JSON for monitoring.
    let r: serde_json::Value = serde_json::from_slice(&fs::read(&report).unwrap()).unwrap();
    assert_eq!(r["gtid_binlog_pos"], info["gtid_binlog_pos"]);
    assert!(r["duration_secs"].as_f64().unwrap() > 0.0);
    assert!(r["bytes_per_sec"].as_f64().unwrap() > 0.0);
    assert_eq!(r["files"], info["files"]);

    // copy-back of the plain one (the backup stays), move-back of the compressed one
    // (decoded on the way).
    let restored = tmp.path().join("restored");
    restore_ok("copy-back", &plain, &restored, &[]);
    let (code, _) = verify_json(&[plain.to_str().unwrap()]);
    assert_eq!(code, Some(0), "copy-back must leave the backup as it was");
    let restored_packed = tmp.path().join("restored-packed");
    let packed_manifest = manifest(&packed);
    restore_ok("move-back", &packed, &restored_packed, &[]);
    assert_restored_as_read(&packed_manifest, &restored_packed);
    assert!(
        walk(&restored_packed).iter().all(|p| !p.ends_with(".zst")),
        "every file is decoded"
    );

    std::thread::sleep(Duration::from_millis(300));
    let commits = load.stop();
    assert!(commits > commits_during);
    let copy = Server::start_on(&restored, &["--skip-slave-start"]);
    assert_replicates_from_backup_gtid(&copy, &source, &gtid_plain);
    let copy2 = Server::start_on(&restored_packed, &["--skip-slave-start"]);
    assert_replicates_from_backup_gtid(&copy2, &source, &gtid_packed);
}

/// A target that is not empty is refused and left as it was; an interrupted directory
/// backup is removed, and one killed outright is never taken for a complete one.
#[test]
fn directory_backups_refuse_a_non_empty_target_and_are_never_taken_for_complete_when_cut() {
    let source = Server::start();
    load_bank(&source, 5_000);
    let tmp = tempfile::tempdir().unwrap();

    let busy = tmp.path().join("busy");
    put(&busy, "precious", b"keep me", 0o640, 1_700_000_000);
    let before = snapshot(&busy);
    let out = backup_cmd(&source, &["--target-dir", busy.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("is not empty"), "{}", stderr(&out));
    assert_unchanged(&before, &busy);

    // Stopped by SIGTERM while it waits before the consistent point: everything it wrote
    // is removed, the directory too (it created it).
    let signal = tmp.path().join("go");
    let cut = tmp.path().join("cut");
    let mut cmd = backup_cmd(
        &source,
        &[
            "--target-dir",
            cut.to_str().unwrap(),
            "--debug-signal-file",
            signal.to_str().unwrap(),
        ],
    );
    cmd.stdout(std::process::Stdio::null());
    let child = spawn_until_waiting(cmd);
    assert!(cut.join("myrocks_hotbackup.begin").is_file());
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130));
    assert!(!cut.exists(), "an interrupted backup leaves nothing behind");

    // Killed outright: the files stay, without a manifest. verify, info and copy-back all
    // say it is incomplete.
    let mut cmd = backup_cmd(
        &source,
        &[
            "--target-dir",
            cut.to_str().unwrap(),
            "--debug-signal-file",
            signal.to_str().unwrap(),
        ],
    );
    cmd.stdout(std::process::Stdio::null());
    let mut child = spawn_until_waiting(cmd);
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(cut.join("myrocks_hotbackup.begin").is_file());
    let (code, v) = verify_json(&[cut.to_str().unwrap()]);
    assert_eq!(code, Some(3), "{v}");
    assert_eq!(v["complete"], false);
    assert_eq!(info_json(&cut)["complete"], false);
    let target = tmp.path().join("never");
    let out = ours(&[
        "copy-back",
        "--backup-dir",
        cut.to_str().unwrap(),
        "--datadir",
        target.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(stderr(&out).contains("incomplete"), "{}", stderr(&out));
    assert!(!target.exists());
}

/// `verify` names each kind of damage with exit 3, `copy-back` refuses each, and
/// `verify --stream` checks streams.
#[test]
fn verify_names_every_damage_and_copy_back_refuses_it() {
    let source = Server::start();
    load_bank(&source, 20_000);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("b");
    dir_backup(&source, &dir, &[]);
    let d = dir.to_str().unwrap();
    let sst = walk(&dir)
        .into_iter()
        .filter(|p| p.ends_with(".sst"))
        .max_by_key(|p| fs::metadata(dir.join(p)).unwrap().len())
        .unwrap();
    let frm = walk(&dir)
        .into_iter()
        .find(|p| p.starts_with("bank/") && p.ends_with(".frm"))
        .unwrap();
    let wal = walk(&dir)
        .into_iter()
        .find(|p| p.starts_with("#rocksdb/") && p.ends_with(".log"))
        .unwrap_or_else(|| "#rocksdb/CURRENT".into());

    type Damage = Box<dyn Fn(&Path)>;
    type Repair = Box<dyn Fn(&Path)>;
    let keep = |p: &str| (p.to_string(), fs::read(dir.join(p)).unwrap());
    let (sst_bytes, frm_bytes, wal_bytes) = (keep(&sst), keep(&frm), keep(&wal));
    let restore = |(p, b): &(String, Vec<u8>)| {
        let (p, b) = (p.clone(), b.clone());
        Box::new(move |dir: &Path| fs::write(dir.join(&p), &b).unwrap()) as Repair
    };
    let cases: Vec<(&str, String, Damage, Repair)> = vec![
        (
            "altered",
            sst.clone(),
            Box::new({
                let sst = sst.clone();
                move |dir: &Path| {
                    let mut b = fs::read(dir.join(&sst)).unwrap();
                    let mid = b.len() / 2;
                    b[mid] ^= 0x10;
                    fs::write(dir.join(&sst), b).unwrap();
                }
            }),
            restore(&sst_bytes),
        ),
        (
            "truncated",
            wal.clone(),
            Box::new({
                let wal = wal.clone();
                move |dir: &Path| {
                    let f = fs::File::options()
                        .write(true)
                        .open(dir.join(&wal))
                        .unwrap();
                    let len = f.metadata().unwrap().len();
                    f.set_len(len / 2).unwrap();
                }
            }),
            restore(&wal_bytes),
        ),
        (
            "missing",
            frm.clone(),
            Box::new({
                let frm = frm.clone();
                move |dir: &Path| fs::remove_file(dir.join(&frm)).unwrap()
            }),
            restore(&frm_bytes),
        ),
        (
            "extra",
            "#rocksdb/999999.log".into(),
            Box::new(|dir: &Path| fs::write(dir.join("#rocksdb/999999.log"), b"stray").unwrap()),
            Box::new(|dir: &Path| fs::remove_file(dir.join("#rocksdb/999999.log")).unwrap()),
        ),
    ];
    for (problem, path, damage, repair) in &cases {
        damage(&dir);
        let out = ours(&["verify", d]);
        assert_eq!(out.status.code(), Some(3), "{problem}: {}", stderr(&out));
        assert!(
            stderr(&out).contains(&format!("{path}: {problem}")),
            "verify must name {path} as {problem}:\n{}",
            stderr(&out)
        );
        let target = tmp.path().join("target");
        let out = ours(&[
            "copy-back",
            "--backup-dir",
            d,
            "--datadir",
            target.to_str().unwrap(),
        ]);
        assert_eq!(
            out.status.code(),
            Some(3),
            "copy-back of a backup with {problem}: {}",
            stderr(&out)
        );
        assert!(!target.exists(), "nothing restored");
        repair(&dir);
    }
    let (code, _) = verify_json(&[d]);
    assert_eq!(code, Some(0), "repaired");

    // All four at once: JSON lists each.
    for (_, _, damage, _) in &cases {
        damage(&dir);
    }
    let (code, v) = verify_json(&[d]);
    assert_eq!(code, Some(3));
    assert_eq!(v["ok"], false);
    let mut found: Vec<(String, String)> = v["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["problem"].as_str().unwrap().into(),
                p["path"].as_str().unwrap().into(),
            )
        })
        .collect();
    found.sort();
    let mut expected: Vec<(String, String)> = cases
        .iter()
        .map(|(p, path, _, _)| (p.to_string(), path.clone()))
        .collect();
    expected.sort();
    assert_eq!(found, expected);

    // Streams: a good one verifies, a truncated or damaged one does not.
    let stream = tmp.path().join("b.xb");
    backup_ok(
        backup_cmd(&source, &["--stream", "xbstream", "--compress"]),
        &stream,
        0,
    );
    let s = stream.to_str().unwrap();
    let (code, v) = verify_json(&["--stream", s]);
    assert_eq!(
        (code, &v["ok"]),
        (Some(0), &serde_json::Value::Bool(true)),
        "{v}"
    );
    let bytes = fs::read(&stream).unwrap();
    let cut = tmp.path().join("cut.xb");
    fs::write(&cut, &bytes[..bytes.len() * 2 / 3]).unwrap();
    let (code, v) = verify_json(&["--stream", cut.to_str().unwrap()]);
    assert_eq!(
        (code, &v["complete"]),
        (Some(3), &serde_json::Value::Bool(false)),
        "{v}"
    );
    let out = Command::new(bin())
        .args(["verify", "--stream", "-"])
        .stdin(fs::File::open(&stream).unwrap())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "verify --stream - reads stdin: {}",
        stderr(&out)
    );
}

/// A compressed xbstream restores byte for byte, whether extracted by us or by
/// `mbstream -x` (which leaves `.zst` files that move-back decodes).
#[test]
fn compressed_streams_restore_byte_for_byte_through_mbstream_and_ours() {
    let source = Server::start();
    load_bank(&source, 20_000);
    let tmp = tempfile::tempdir().unwrap();
    let stream = tmp.path().join("b.xb");
    backup_ok(
        backup_cmd(&source, &["--stream", "xbstream", "--compress=zstd:1"]),
        &stream,
        0,
    );
    let out = backup_cmd(&source, &["--stream", "tar", "--compress"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "tar cannot carry compressed files: {}",
        stderr(&out)
    );

    for tool in ["mbstream", "ours", "ours, --keep-compressed"] {
        let extracted = tmp.path().join(format!("x-{}", tool.len()));
        match tool {
            "ours, --keep-compressed" => {
                let out = Command::new(bin())
                    .args(["extract", "--keep-compressed", "-C"])
                    .arg(&extracted)
                    .arg(&stream)
                    .output()
                    .unwrap();
                assert!(out.status.success(), "{}", stderr(&out));
            }
            tool => extract_with(tool, &stream, &extracted),
        }
        let m = manifest(&extracted);
        let stored = walk(&extracted).iter().any(|p| p.ends_with(".sst.zst"));
        // Our extract decodes as it goes, unless told to keep the files as stored.
        assert_eq!(stored, tool != "ours", "{tool}");
        let (code, v) = verify_json(&[extracted.to_str().unwrap()]);
        assert_eq!(code, Some(0), "{tool}: {v}");
        let restored = tmp.path().join(format!("r-{tool}"));
        restore_ok("move-back", &extracted, &restored, &[]);
        assert_restored_as_read(&m, &restored);
        let copy = Server::start_on(&restored, &["--skip-slave-start"]);
        assert_bank_consistent(&copy);
        assert_eq!(copy.checksums("bank"), source.checksums("bank"));
        assert_eq!(copy.logged_errors(), Vec::<String>::new());
    }
}

/// `--avg-mbytes-per-sec` holds the read rate (generous bounds: the benchmark measures
/// accuracy).
#[test]
fn the_throttle_holds_the_read_rate() {
    let source = Server::start();
    load_bank(&source, 60_000);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("slow");
    let report = tmp.path().join("r.json");
    dir_backup(
        &source,
        &dir,
        &[
            "--avg-mbytes-per-sec",
            "4",
            "--report",
            report.to_str().unwrap(),
        ],
    );
    let r: serde_json::Value = serde_json::from_slice(&fs::read(&report).unwrap()).unwrap();
    let bytes = r["bytes"].as_f64().unwrap();
    let secs = r["duration_secs"].as_f64().unwrap();
    let cap = 4.0 * 1048576.0;
    assert!(
        bytes > 2.0 * cap,
        "the data set must take seconds at the cap: {bytes} bytes"
    );
    assert!(
        bytes / secs <= cap * 1.15,
        "{bytes} bytes in {secs:.2} s is over the cap of 4 MiB/s"
    );
    assert!(
        secs >= bytes / cap * 0.9,
        "{bytes} bytes in {secs:.2} s: the throttle did not slow the backup"
    );
}

/// On a terminal, the backup draws a live bar (bytes, rate, percentage, ETA) and clears it
/// at the end; checked in a real terminal, a tmux pane on a private tmux server.
#[test]
fn the_progress_bar_draws_in_a_real_terminal() {
    let tmux = require("tmux");
    let source = Server::start();
    load_bank(&source, 60_000);
    let tmp = tempfile::tempdir().unwrap();
    let socket = format!("myrocks-hotbackup-test-{}", std::process::id());
    let tmux_cmd = |args: &[&str]| {
        Command::new(&tmux)
            .args(["-L", &socket, "-f", "/dev/null"])
            .args(args)
            .output()
            .unwrap()
    };
    struct Kill<'a>(&'a dyn Fn(&[&str]) -> Output);
    impl Drop for Kill<'_> {
        fn drop(&mut self) {
            (self.0)(&["kill-server"]);
        }
    }
    let _kill = Kill(&tmux_cmd);
    let script = format!(
        "'{}' backup --socket '{}' --user root --target-dir '{}' --avg-mbytes-per-sec 8; echo EXIT=$?; sleep 60",
        bin().display(),
        source.socket.display(),
        tmp.path().join("b").display()
    );
    let out = tmux_cmd(&[
        "new-session",
        "-d",
        "-s",
        "t",
        "-x",
        "150",
        "-y",
        "40",
        &script,
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let pane = || {
        String::from_utf8_lossy(&tmux_cmd(&["capture-pane", "-p", "-t", "t"]).stdout).into_owned()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut bar = None;
    let mut screen = String::new();
    while std::time::Instant::now() < deadline {
        screen = pane();
        if let Some(line) = screen
            .lines()
            .find(|l| l.contains("% ") && l.contains("ETA") && l.contains("MiB/s"))
        {
            bar = Some(line.to_string());
        }
        if screen.contains("EXIT=") {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let bar = bar.unwrap_or_else(|| panic!("no progress bar was drawn:\n{screen}"));
    assert!(bar.contains('[') && bar.contains(']'), "{bar}");
    assert!(screen.contains("EXIT=0"), "{screen}");
    assert!(screen.contains("backup completed OK!"), "{screen}");
    // The bar is cleared once done: the last lines are the log and the exit status.
    let before_exit: Vec<&str> = screen
        .lines()
        .take_while(|l| !l.contains("EXIT="))
        .collect();
    assert!(
        before_exit.iter().all(|l| !l.contains("ETA")),
        "the bar stays on the screen:\n{screen}"
    );
}

/// A target filesystem that fills up: the backup fails with the reason, removes every file
/// it wrote, and the server is untouched (its checkpoints are gone too).
#[test]
fn a_full_target_disk_fails_cleanly_and_leaves_nothing() {
    let source = Server::start();
    load_bank(&source, 60_000);
    let tmp = tempfile::tempdir().unwrap();
    let small = Mount::tmpfs(&tmp.path().join("small"), 4);
    let target = small.0.join("b");
    let out = backup_cmd(&source, &["--target-dir", target.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("No space left on device"),
        "{}",
        stderr(&out)
    );
    assert!(!target.exists(), "the backup removed what it wrote");
    assert_eq!(fs::read_dir(&small.0).unwrap().count(), 0);
    assert!(
        leftovers(&source.datadir.join("#myrocks_hotbackup")).is_empty(),
        "no checkpoint left behind"
    );
    assert_bank_consistent(&source);
}

/// A report file inside the backup would be a stray file the manifest does not list.
#[test]
fn a_report_inside_the_target_is_refused_before_anything_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let target = tmp.path().join("b");
    let out = ours(&[
        "backup",
        "--socket",
        "/nonexistent.sock",
        "--target-dir",
        target.to_str().unwrap(),
        "--report",
        target.join("report.json").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("inside the backup"),
        "{}",
        stderr(&out)
    );
    assert!(!target.exists());
}
