//! Hot backups of a live server, restored and started: the copy is transactionally
//! consistent, equals the source at the recorded coordinates (proved by replicating from
//! them), and every extractor yields the same files.

use std::time::Duration;

use mysql::prelude::Queryable;
use sandbox::workload::{assert_bank_consistent, load_bank, Load};
use sandbox::Server;

use crate::common::db::*;
use crate::common::*;

#[test]
fn hot_backup_under_write_load_is_exact_at_its_coordinates() {
    let source = Server::start();
    load_bank(&source, 60_000);
    let tmp = tempfile::tempdir().unwrap();
    let load = Load::start(&source);
    std::thread::sleep(Duration::from_millis(500));

    // xbstream, read by mbstream and by us.
    let stream = tmp.path().join("backup.xb");
    let log = backup_ok(
        backup_cmd(&source, &["--stream", "xbstream", "--interval", "2"]),
        &stream,
        0,
    );
    let (by_mbstream, by_us) = (tmp.path().join("mb"), tmp.path().join("ours"));
    extract_with("mbstream", &stream, &by_mbstream);
    extract_with("ours", &stream, &by_us);
    assert_same_tree(&by_us, &by_mbstream, false);

    // tar, read by GNU tar and by us.
    let tar_stream = tmp.path().join("backup.tar");
    backup_ok(backup_cmd(&source, &["--stream", "tar"]), &tar_stream, 0);
    let (by_tar, by_us_tar) = (tmp.path().join("tar"), tmp.path().join("ours-tar"));
    extract_with("tar", &tar_stream, &by_tar);
    extract_with("ours", &tar_stream, &by_us_tar);
    assert_same_tree(&by_us_tar, &by_tar, true);
    let commits_during = load.commits();

    let m = manifest(&by_mbstream);
    let gtid = m["backup"]["binlog"]["gtid_binlog_pos"]
        .as_str()
        .unwrap()
        .to_string();
    let stall = m["backup"]["commit_stall_ms"].as_f64().unwrap();
    assert!(!gtid.is_empty() && stall > 0.0, "{m}");
    let coords = std::fs::read_to_string(by_mbstream.join("xtrabackup_binlog_info")).unwrap();
    assert!(coords.ends_with(&format!("\t{gtid}\n")), "{coords}");
    assert!(log.contains("commits were blocked for"), "{log}");

    // Restore the mbstream copy and start a server on it.
    let restored_dir = tmp.path().join("restored");
    let res = move_back(&by_mbstream, &restored_dir);
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    let copy = Server::start_on(&restored_dir, &["--skip-slave-start"]);
    assert_eq!(
        copy.logged_errors(),
        Vec::<String>::new(),
        "the restored server logged errors"
    );
    assert_bank_consistent(&copy);
    assert_eq!(copy.value("SELECT COUNT(*) FROM bank.filler"), "60000");

    // The copy is the source at the recorded GTID: replicate from there and compare.
    copy.exec(&format!(
        "SET GLOBAL gtid_slave_pos = '{gtid}';
         CHANGE MASTER TO MASTER_HOST = '127.0.0.1', MASTER_PORT = {}, MASTER_USER = 'root', MASTER_USE_GTID = slave_pos;
         START SLAVE",
        source.port
    ));
    std::thread::sleep(Duration::from_millis(500));
    let commits = load.stop();
    assert!(
        commits > commits_during && commits_during > 0,
        "the load must run during the backups"
    );
    let end = source.value("SELECT @@gtid_binlog_pos");
    assert_eq!(
        copy.value(&format!("SELECT MASTER_GTID_WAIT('{end}', 120)")),
        "0",
        "replica did not catch up"
    );
    assert_eq!(copy.checksums("bank"), source.checksums("bank"));
    assert_eq!(copy.logged_errors(), Vec::<String>::new());
    assert_bank_consistent(&source);

    // The tar copy, extracted by us, restores to a consistent server as well.
    let restored_tar = tmp.path().join("restored-tar");
    let res = move_back(&by_us_tar, &restored_tar);
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    let copy2 = Server::start_on(&restored_tar, &["--skip-slave-start"]);
    assert_bank_consistent(&copy2);
    assert_eq!(copy2.logged_errors(), Vec::<String>::new());
}

/// Many small SSTs, a slow reader and a short interval: several rounds, no SST sent twice,
/// DDL during the rounds, an exact restore, and no checkpoint left behind.
#[test]
fn rounds_renew_checkpoints_and_never_send_an_sst_twice() {
    let source = Server::start_with(&[
        "--rocksdb-default-cf-options=write_buffer_size=1m;target_file_size_base=1m",
    ]);
    source.exec(
        "CREATE DATABASE r; USE r;
         CREATE TABLE big (id INT PRIMARY KEY, pad VARBINARY(600)) ENGINE=ROCKSDB;
         CREATE TABLE doomed (id INT PRIMARY KEY) ENGINE=ROCKSDB;
         INSERT INTO doomed SELECT seq FROM seq_1_to_100;",
    );
    // Many small transactions: one big one would become one big memtable and one SST.
    let load: String = (0..60)
        .map(|k| {
            format!(
                "INSERT INTO r.big SELECT seq + {}, RANDOM_BYTES(500) FROM seq_1_to_1000;",
                k * 1000
            )
        })
        .collect();
    source.exec(&format!(
        "USE r; {load} SET GLOBAL rocksdb_force_flush_memtable_now = 1"
    ));
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = tmp.path().join("ckpt");
    std::fs::create_dir(&ckpt).unwrap();
    let ddl = {
        let conn_opts = source.opts("root").db_name(Some("r"));
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(1500));
            let mut c = mysql::Conn::new(conn_opts).unwrap();
            for sql in [
                "CREATE TABLE born (id INT PRIMARY KEY, v INT) ENGINE=ROCKSDB",
                "INSERT INTO born SELECT seq, seq FROM seq_1_to_500",
                "ALTER TABLE born ADD COLUMN w INT DEFAULT 7",
                "DROP TABLE doomed",
                "INSERT INTO big SELECT seq + 60000, RANDOM_BYTES(500) FROM seq_1_to_5000",
            ] {
                c.query_drop(sql).unwrap();
            }
        })
    };
    let stream = tmp.path().join("b.xb");
    let args = [
        "--stream",
        "xbstream",
        "--interval",
        "1",
        "--checkpoint-dir",
        ckpt.to_str().unwrap(),
    ];
    let log = backup_ok(backup_cmd(&source, &args), &stream, 8 << 20);
    ddl.join().unwrap();
    assert_eq!(
        leftovers(&ckpt),
        Vec::<std::path::PathBuf>::new(),
        "checkpoints left behind"
    );

    let out = tmp.path().join("x");
    extract_with("ours", &stream, &out);
    let m = manifest(&out);
    let rounds = m["backup"]["rounds"].as_array().unwrap();
    assert!(
        rounds.len() >= 3,
        "expected several rounds: {rounds:?}\n{log}"
    );
    let ssts: Vec<&str> = m["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["path"].as_str().unwrap())
        .filter(|p| p.ends_with(".sst"))
        .collect();
    let unique: std::collections::BTreeSet<_> = ssts.iter().collect();
    assert_eq!(unique.len(), ssts.len(), "an SST was sent twice");
    assert!(ssts.len() > 20, "expected many SSTs, got {}", ssts.len());
    eprintln!(
        "rounds test: {} rounds, {} SST files, each sent once",
        rounds.len(),
        ssts.len()
    );

    let restored = tmp.path().join("restored");
    let res = move_back(&out, &restored);
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    let copy = Server::start_on(&restored, &["--skip-slave-start"]);
    assert_eq!(copy.logged_errors(), Vec::<String>::new());
    assert_eq!(copy.checksums("r"), source.checksums("r"));
    assert_eq!(
        copy.value("SELECT COUNT(*) FROM information_schema.TABLES WHERE TABLE_SCHEMA = 'r'"),
        "2"
    );
    assert_eq!(copy.value("SELECT SUM(w) FROM r.born"), "3500");
}

/// The original tool's invocation, unchanged, produces a backup that restores.
#[test]
fn the_original_invocation_backs_up_and_moves_back() {
    let source = Server::start();
    source.exec("CREATE DATABASE o; USE o; CREATE TABLE t (id INT PRIMARY KEY) ENGINE=ROCKSDB; INSERT INTO t SELECT seq FROM seq_1_to_1234");
    let tmp = tempfile::tempdir().unwrap();
    let snap = tmp.path().join("snap");
    let stream = tmp.path().join("b.tar");
    let copy_log = tmp.path().join("copy_log");
    let signal = tmp.path().join("signal");
    // As MariaDB's rocksdb_hotbackup suite does (create_table.sh): once the last line of the
    // log says the backup is waiting, create a table, then create the signal file.
    let ddl = {
        let (copy_log, signal) = (copy_log.clone(), signal.clone());
        let opts = source.opts("root").db_name(Some("o"));
        std::thread::spawn(move || {
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            loop {
                let log = std::fs::read_to_string(&copy_log).unwrap_or_default();
                if log
                    .lines()
                    .last()
                    .is_some_and(|l| l.contains("Waiting until"))
                {
                    break;
                }
                assert!(std::time::Instant::now() < deadline, "never waited:\n{log}");
                std::thread::sleep(Duration::from_millis(100));
            }
            let mut c = mysql::Conn::new(opts).unwrap();
            c.query_drop(
                "CREATE TABLE r10 (id INT PRIMARY KEY) ENGINE=ROCKSDB; INSERT INTO r10 VALUES (10)",
            )
            .unwrap();
            std::fs::File::create(&signal).unwrap();
        })
    };
    let status = std::process::Command::new(bin())
        .args(["--user=root", "--stream=tar", "--interval=5"])
        .arg(format!("--socket={}", source.socket.display()))
        .arg(format!("--checkpoint_dir={}", snap.display()))
        .arg(format!("--debug_signal_file={}", signal.display()))
        .stdout(std::fs::File::create(&stream).unwrap())
        .stderr(std::fs::File::create(&copy_log).unwrap())
        .status()
        .unwrap();
    ddl.join().unwrap();
    let log = std::fs::read_to_string(&copy_log).unwrap();
    assert!(status.success(), "{log}");
    // The original's words, in its order, for the scripts that grep them.
    let mut at = 0;
    for words in [
        "Starting backup.",
        "Starting backup round 1",
        "Created checkpoint at",
        "Sent ",
        "Waiting until",
        "Backup WAL..",
        "Backup Manifest..",
        "RocksDB Backup Done.",
        "Taking MySQL misc backups..",
        "MySQL misc backups done.",
        "All Backups Done.",
    ] {
        at += log[at..]
            .find(words)
            .unwrap_or_else(|| panic!("{words:?} missing (in order):\n{log}"));
    }
    assert!(
        log.lines().last().unwrap().contains("completed OK!"),
        "{log}"
    );
    let out = tmp.path().join("x");
    std::fs::create_dir(&out).unwrap();
    run_ok(
        std::process::Command::new(require("tar"))
            .arg("-xif")
            .arg(&stream)
            .arg("-C")
            .arg(&out),
    );
    // The restore's bootstrap honours the server's option file and binary, on the legacy
    // path too: this file asks for a 20 MiB system tablespace (12 MiB by default).
    let cnf = tmp.path().join("my.cnf");
    std::fs::write(
        &cnf,
        "[mysqld]\ninnodb-data-file-path=ibdata1:20M:autoextend\n",
    )
    .unwrap();
    let d = tmp.path().join("d");
    let rocks = d.join("#rocksdb");
    let move_back = |mariadbd: &str| {
        std::process::Command::new(bin())
            .arg("--move_back")
            .arg(format!("--datadir={}", d.display()))
            .arg(format!("--rocksdb_datadir={}", rocks.display()))
            .arg(format!("--rocksdb_waldir={}", rocks.display()))
            .arg(format!("--backup_dir={}", out.display()))
            .arg(format!("--defaults-file={}", cnf.display()))
            .arg(format!("--mariadbd={mariadbd}"))
            .output()
            .unwrap()
    };
    let res = move_back("/nonexistent/mariadbd");
    assert_eq!(
        res.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    assert!(!d.exists());
    let res = move_back(sandbox::binary("mariadbd").to_str().unwrap());
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    assert_eq!(
        std::fs::metadata(d.join("ibdata1")).unwrap().len(),
        20 << 20
    );
    let copy = Server::start_on(&d, &["--innodb-data-file-path=ibdata1:20M:autoextend"]);
    assert_eq!(copy.value("SELECT COUNT(*) FROM o.t"), "1234");
    assert_eq!(copy.value("SELECT id FROM o.r10"), "10");
    assert_eq!(copy.logged_errors(), Vec::<String>::new());
}

/// A backup written by the original Python tool (RocksDB files at the top level, one tar
/// archive per file) restores with our move-back, and the server serves its data.
#[test]
fn a_backup_made_by_the_original_tool_restores() {
    let source = Server::start();
    source.exec("CREATE DATABASE o; USE o; CREATE TABLE t (id INT PRIMARY KEY, v INT) ENGINE=ROCKSDB; INSERT INTO t SELECT seq, seq FROM seq_1_to_3000");
    let tmp = tempfile::tempdir().unwrap();
    let snap = source.datadir.join("orig-snap");
    std::fs::create_dir(&snap).unwrap();
    let stream = tmp.path().join("orig.tar");
    let out = std::process::Command::new("/usr/bin/myrocks_hotbackup")
        .arg("--user=root")
        .arg(format!("--socket={}", source.socket.display()))
        .arg("--stream=tar")
        .arg(format!("--checkpoint_dir={}", snap.display()))
        .current_dir(tmp.path())
        .stdout(std::fs::File::create(&stream).unwrap())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let x = tmp.path().join("x");
    extract_with("ours", &stream, &x);
    assert!(
        x.join("CURRENT").is_file(),
        "the original tool's layout: RocksDB files at the top"
    );
    let restored = tmp.path().join("d");
    let res = move_back(&x, &restored);
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    assert!(restored.join("#rocksdb/CURRENT").is_file() && restored.join("o/t.frm").is_file());
    assert!(
        !restored.join("#rocksdb/ddl_recovery.log").exists(),
        "ddl_recovery.log is not a WAL"
    );
    assert!(
        !restored.join("ddl_recovery.log").exists(),
        "server state is not restored"
    );
    assert!(
        x.join("ddl_recovery.log").exists(),
        "it stays in the backup directory"
    );
    let copy = Server::start_on(&restored, &[]);
    assert_eq!(copy.value("SELECT SUM(v) FROM o.t"), "4501500");
    assert_eq!(copy.logged_errors(), Vec::<String>::new());
}

/// A full compaction during the rounds makes everything sent so far obsolete: the rounds
/// stop (they could not catch up), the manifest lists the obsolete SSTs, and a restore
/// leaves them behind while the copy is still exact.
#[test]
fn compaction_during_the_rounds_is_handled_and_obsolete_ssts_are_not_restored() {
    let source = Server::start_with(&[
        "--rocksdb-default-cf-options=write_buffer_size=1m;target_file_size_base=1m",
    ]);
    source.exec("CREATE DATABASE c; CREATE TABLE c.t (id INT PRIMARY KEY, pad VARBINARY(600)) ENGINE=ROCKSDB");
    let load: String = (0..30)
        .map(|k| {
            format!(
                "INSERT INTO t SELECT seq + {}, RANDOM_BYTES(500) FROM seq_1_to_1000;",
                k * 1000
            )
        })
        .collect();
    source.exec(&format!(
        "USE c; {load} SET GLOBAL rocksdb_force_flush_memtable_now = 1"
    ));
    // Full compactions, again and again: every SST sent so far keeps becoming obsolete.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let compactor = {
        let (opts, stop) = (source.opts("root"), stop.clone());
        std::thread::spawn(move || {
            let mut conn = mysql::Conn::new(opts).unwrap();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(300));
                conn.query_drop("SET GLOBAL rocksdb_compact_cf = 'default'")
                    .unwrap();
            }
        })
    };
    let tmp = tempfile::tempdir().unwrap();
    let stream = tmp.path().join("b.xb");
    let log = backup_ok(
        backup_cmd(&source, &["--stream", "xbstream", "--interval", "1"]),
        &stream,
        4 << 20,
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    compactor.join().unwrap();
    assert!(log.contains("not catching up with compaction"), "{log}");
    let x = tmp.path().join("x");
    extract_with("ours", &stream, &x);
    let obsolete: Vec<String> = manifest(&x)["backup"]["obsolete_sst"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert!(
        !obsolete.is_empty(),
        "the compaction made the first round's SSTs obsolete"
    );
    let restored = tmp.path().join("restored");
    let res = move_back(&x, &restored);
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    for name in &obsolete {
        assert!(
            !restored.join("#rocksdb").join(name).exists(),
            "{name} restored"
        );
        assert!(
            x.join("#rocksdb").join(name).exists(),
            "{name} left in the backup"
        );
    }
    let copy = Server::start_on(&restored, &[]);
    assert_eq!(copy.logged_errors(), Vec::<String>::new());
    assert_eq!(copy.checksums("c"), source.checksums("c"));
    eprintln!(
        "compaction test: {} obsolete SSTs left behind",
        obsolete.len()
    );
}

/// With `rocksdb_manual_wal_flush` off, the final checkpoint is taken before commits are
/// blocked and the WAL brought forward to the consistent point: under write load the copy
/// is exact, and the stall has no checkpoint in it.
#[test]
fn the_wal_brought_forward_is_exact_under_load() {
    let tmp = tempfile::tempdir().unwrap();
    // Small memtables, so that every checkpoint's flush soon brings a compaction: only
    // edits that move a log number (a flush) make the checkpoint be taken again.
    let log = backup_under_load_is_exact(
        tmp.path(),
        &tmp.path().join("wal"),
        &["--rocksdb-default-cf-options=write_buffer_size=4m;level0_file_num_compaction_trigger=2"],
    );
    for line in log
        .lines()
        .filter(|l| l.contains("blocked for") || l.contains("again") || l.contains("edits after"))
    {
        eprintln!("{line}");
    }
    assert!(
        !log.contains("Took the final checkpoint again"),
        "the fast path was not taken:\n{log}"
    );
    assert!(log.contains("WAL sizes"), "{log}");
}

/// When the live WAL cannot be pinned (its directory is on another filesystem than the
/// checkpoints), the final checkpoint is taken again while commits are blocked: the copy
/// is just as exact under write load.
#[test]
fn the_checkpoint_under_the_block_fallback_is_exact_too() {
    let tmp = tempfile::tempdir().unwrap();
    let wal_fs = Mount::tmpfs(&tmp.path().join("walfs"), 512);
    let log = backup_under_load_is_exact(tmp.path(), &wal_fs.0.join("wal"), &[]);
    assert!(
        log.contains("Took the final checkpoint again while commits were blocked")
            && log.contains("another filesystem"),
        "{log}"
    );
}

/// A bank under write load, its RocksDB WAL in `wal`, backed up, restored with its own WAL
/// directory, checked consistent and made a replica that converges. Returns the backup log.
fn backup_under_load_is_exact(
    tmp: &std::path::Path,
    wal: &std::path::Path,
    extra: &[&str],
) -> String {
    let wal_dir = format!("--rocksdb-wal-dir={}", wal.display());
    let mut opts = vec![wal_dir.as_str(), "--skip-rocksdb-manual-wal-flush"];
    opts.extend_from_slice(extra);
    let source = Server::start_with(&opts);
    load_bank(&source, 20_000);
    source.exec("SET GLOBAL rocksdb_force_flush_memtable_now = 1");
    let load = Load::start(&source);
    std::thread::sleep(Duration::from_millis(300));
    let stream = tmp.join("b.xb");
    let log = backup_ok(backup_cmd(&source, &["--stream", "xbstream"]), &stream, 0);
    let x = tmp.join("x");
    extract_with("ours", &stream, &x);
    let gtid = manifest(&x)["backup"]["binlog"]["gtid_binlog_pos"]
        .as_str()
        .unwrap()
        .to_string();
    let restored = tmp.join("r");
    let restored_wal = tmp.join("r-wal");
    restore_ok(
        "move-back",
        &x,
        &restored,
        &["--rocksdb-waldir", restored_wal.to_str().unwrap()],
    );
    let copy = Server::start_on(
        &restored,
        &[
            "--skip-slave-start",
            &format!("--rocksdb-wal-dir={}", restored_wal.display()),
        ],
    );
    assert_eq!(copy.logged_errors(), Vec::<String>::new(), "{log}");
    assert_bank_consistent(&copy);
    copy.exec(&format!(
        "SET GLOBAL gtid_slave_pos = '{gtid}';
         CHANGE MASTER TO MASTER_HOST = '127.0.0.1', MASTER_PORT = {}, MASTER_USER = 'root', MASTER_USE_GTID = slave_pos;
         START SLAVE",
        source.port
    ));
    assert!(load.stop() > 0);
    let end = source.value("SELECT @@gtid_binlog_pos");
    assert_eq!(
        copy.value(&format!("SELECT MASTER_GTID_WAIT('{end}', 120)")),
        "0"
    );
    assert_eq!(copy.checksums("bank"), source.checksums("bank"));
    log
}
