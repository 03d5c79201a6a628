//! Mixed servers: InnoDB user tables read from the consistent point beside the RocksDB copy.
//! A bank whose transfers cross engines in one transaction stays whole after a hot backup
//! and restore, and the copy replicates from its coordinates to equal checksums on both
//! engines; mariabackup passes the same test. Every destination carries the tables.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use sandbox::workload::{assert_mixed_consistent, load_mixed_bank, Load};
use sandbox::Server;

use crate::common::db::*;
use crate::common::*;

/// InnoDB tables of every awkward kind, in `inno_zoo`: values that the text protocol would
/// round (FLOAT), bytes that need escaping, spatial and bit values, generated and invisible
/// columns, a partitioned table, a sequence, foreign keys with cascades, triggers with
/// bodies of several lines, names that need quoting.
fn create_inno_zoo(server: &Server) {
    server.exec(
        "CREATE DATABASE inno_zoo; USE inno_zoo;
         CREATE TABLE parent (id INT PRIMARY KEY, name VARCHAR(30) CHARACTER SET utf8mb4, children INT NOT NULL DEFAULT 0) ENGINE=InnoDB;
         CREATE TABLE child (id INT AUTO_INCREMENT PRIMARY KEY, pid INT NOT NULL, note TEXT, KEY (note(10)),
           FOREIGN KEY (pid) REFERENCES parent (id) ON DELETE CASCADE) ENGINE=InnoDB AUTO_INCREMENT=100;
         CREATE TRIGGER child_ai AFTER INSERT ON child FOR EACH ROW UPDATE parent SET children = children + 1 WHERE id = NEW.pid;
         CREATE TRIGGER child_bi BEFORE INSERT ON child FOR EACH ROW
         BEGIN
           IF NEW.note IS NULL THEN
             SET NEW.note = 'none';
           END IF;
         END;
         INSERT INTO parent VALUES (1, 'één 🐬', 0), (2, 'tab\there', 0);
         INSERT INTO child (pid, note) VALUES (1, 'a\\nb\\\\c'), (1, NULL), (2, CONCAT('x', CHAR(0), 'y'));
         CREATE TABLE types (id INT PRIMARY KEY, b BIT(10), g GEOMETRY, p POINT NOT NULL, f FLOAT, d DOUBLE,
           j JSON, e ENUM('x','y'), s SET('p','q'), y YEAR, tm TIME(3), ts TIMESTAMP(6) NULL, dt DATETIME,
           da DATE, de DECIMAL(30,10), bl BLOB, v INT AS (id * 2) VIRTUAL, st INT AS (id * 3) STORED,
           inv INT INVISIBLE DEFAULT 7) ENGINE=InnoDB;
         INSERT INTO types (id, b, g, p, f, d, j, e, s, y, tm, ts, dt, da, de, bl, inv) VALUES
           (1, b'1000000101', ST_GeomFromText('LINESTRING(0 0,1 1)'), POINT(1, 2), 0.1234567, 1e-300,
            '{\"a\": [1, \"\\\\t\"]}', 'y', 'p,q', 2024, '-838:59:59.5', '2020-01-01 10:00:00.123456',
            '2021-02-03 00:00:00', '0000-00-00', -12345678901234567890.0123456789, RANDOM_BYTES(1000), 9),
           (2, NULL, NULL, POINT(0, 0), NULL, NULL, NULL, NULL, NULL, 0, NULL, NULL, NULL, NULL, NULL, '', 8);
         CREATE TABLE parted (id INT PRIMARY KEY, v INT) ENGINE=InnoDB PARTITION BY RANGE (id)
           (PARTITION p0 VALUES LESS THAN (500), PARTITION p1 VALUES LESS THAN MAXVALUE);
         INSERT INTO parted SELECT seq, seq * 2 FROM seq_1_to_1000;
         CREATE SEQUENCE sq ENGINE=InnoDB;
         SELECT NEXTVAL(sq), NEXTVAL(sq);
         CREATE TABLE empty_t (id INT PRIMARY KEY) ENGINE=InnoDB;
         CREATE TABLE `we ird``name` (`col umn` INT PRIMARY KEY) ENGINE=InnoDB;
         INSERT INTO `we ird``name` VALUES (5);
         CREATE TRIGGER child_ai_first AFTER INSERT ON child FOR EACH ROW PRECEDES child_ai SET @seen = NEW.id;",
    );
    // A definition longer than a line of the bootstrap's input.
    let values: Vec<String> = (0..3000).map(|i| format!("'value {i:04}'")).collect();
    server.exec(&format!(
        "CREATE TABLE inno_zoo.wide (id INT PRIMARY KEY, e ENUM({})) ENGINE=InnoDB;
         INSERT INTO inno_zoo.wide VALUES (1, 'value 2999'), (2, 'value 0000')",
        values.join(",")
    ));
}

/// Makes `copy` replicate from `source` from `gtid` and checks that both engines' tables
/// converge to the source's checksums.
fn assert_converges(copy: &Server, source: &Server, gtid: &str) {
    catch_up_from(copy, source, gtid);
    assert_eq!(copy.checksums("mixed"), source.checksums("mixed"));
    assert_mixed_consistent(copy);
    assert_eq!(copy.logged_errors(), Vec::<String>::new());
}

/// The tables of the zoo are the source's, and behave as they did.
fn assert_zoo_restored(copy: &Server, source: &Server) {
    assert_eq!(copy.checksums("inno_zoo"), source.checksums("inno_zoo"));
    assert_eq!(copy.value("SELECT NEXTVAL(inno_zoo.sq)"), "1001");
    assert_eq!(
        copy.value("SELECT GROUP_CONCAT(inv, '/', y ORDER BY id) FROM inno_zoo.types"),
        "9/2024,8/0000"
    );
    assert_eq!(
        copy.value("SELECT GROUP_CONCAT(TRIGGER_NAME ORDER BY ACTION_ORDER) FROM information_schema.TRIGGERS WHERE EVENT_OBJECT_TABLE = 'child' AND ACTION_TIMING = 'AFTER'"),
        "child_ai_first,child_ai"
    );
    assert_eq!(
        copy.value("SELECT ENGINE FROM information_schema.TABLES WHERE TABLE_SCHEMA = 'inno_zoo' AND TABLE_NAME = 'child'"),
        "InnoDB"
    );
    // The foreign key, its cascade and both triggers work on the copy.
    copy.exec("INSERT INTO inno_zoo.child (pid) VALUES (2)");
    assert_eq!(
        copy.value("SELECT CONCAT(id, ':', note) FROM inno_zoo.child WHERE pid = 2 ORDER BY id DESC LIMIT 1"),
        "103:none"
    );
    assert_eq!(
        copy.value("SELECT children FROM inno_zoo.parent WHERE id = 2"),
        "2"
    );
    copy.exec("DELETE FROM inno_zoo.parent WHERE id = 2");
    assert_eq!(
        copy.value("SELECT COUNT(*) FROM inno_zoo.child WHERE pid = 2"),
        "0"
    );
    assert_eq!(
        copy.rows("SELECT PARTITION_NAME, TABLE_ROWS > 0 FROM information_schema.PARTITIONS WHERE TABLE_SCHEMA = 'inno_zoo' AND TABLE_NAME = 'parted' ORDER BY 1")
            .len(),
        2
    );
}

fn logical_tables(backup: &Path) -> Vec<String> {
    manifest(backup)["backup"]["innodb_logical"]["tables"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            format!(
                "{}.{}",
                t["schema"].as_str().unwrap(),
                t["name"].as_str().unwrap()
            )
        })
        .collect()
}

#[test]
fn mixed_server_is_consistent_across_engines_after_a_hot_backup() {
    let source = Server::start();
    load_mixed_bank(&source, 20_000);
    create_inno_zoo(&source);
    let tmp = tempfile::tempdir().unwrap();
    let load = Load::start_mixed(&source);
    std::thread::sleep(Duration::from_millis(500));

    // A compressed stream, unpacked by `extract` (which decodes `.zst` files on the way).
    let stream = tmp.path().join("backup.xb");
    let log = backup_ok(
        backup_cmd(&source, &["--stream", "xbstream", "--compress"]),
        &stream,
        0,
    );
    assert!(log.contains("InnoDB snapshots"), "{log}");
    assert!(
        log.contains("Read 12 InnoDB tables from the consistent snapshot"),
        "{log}"
    );
    let x = tmp.path().join("x");
    extract_with("ours", &stream, &x);
    let commits_during = load.commits();
    assert!(commits_during > 0, "the load must run during the backup");

    let tables = logical_tables(&x);
    for t in [
        "mixed.inno_ledger",
        "mixed.inno_filler",
        "inno_zoo.types",
        "inno_zoo.sq",
    ] {
        assert!(tables.contains(&t.to_string()), "{t} not in {tables:?}");
    }
    assert!(!tables
        .iter()
        .any(|t| t.starts_with("mysql.") || t == "mixed.rocks_accounts"));
    let m = manifest(&x);
    assert_eq!(m["backup"]["skipped_innodb_tables"], serde_json::json!([]));
    let gtid = m["backup"]["binlog"]["gtid_binlog_pos"]
        .as_str()
        .unwrap()
        .to_string();
    // The rows are compressed once, by the backup: no InnoDB file is in the backup.
    assert!(std::fs::read_dir(x.join("#innodb")).unwrap().count() >= 10);
    assert!(!x.join("mixed/inno_ledger.frm").exists() && !x.join("mixed/inno_ledger.ibd").exists());
    let info = run_ok(Command::new(bin()).arg("info").arg(&x));
    let info = String::from_utf8_lossy(&info.stdout);
    assert!(
        info.contains("InnoDB tables:     12 copied logically")
            && info.contains("mixed.inno_filler"),
        "{info}"
    );

    let restored = tmp.path().join("restored");
    let out = move_back(&x, &restored);
    let restore_log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{restore_log}");
    assert!(
        restore_log.contains("Loaded 12 InnoDB tables"),
        "{restore_log}"
    );
    assert!(!restored.join("#myrocks_hotbackup_load").exists());
    let copy = Server::start_on(&restored, &["--skip-slave-start"]);
    assert_eq!(copy.logged_errors(), Vec::<String>::new());
    assert_mixed_consistent(&copy);
    assert_eq!(
        copy.value("SELECT COUNT(*) FROM mixed.inno_filler"),
        "20000"
    );

    std::thread::sleep(Duration::from_millis(300));
    let commits = load.stop();
    assert!(commits > commits_during);
    assert_converges(&copy, &source, &gtid);
    assert_zoo_restored(&copy, &source);
}

#[test]
fn mariabackup_passes_the_same_test() {
    let source = Server::start();
    load_mixed_bank(&source, 5_000);
    let tmp = tempfile::tempdir().unwrap();
    let load = Load::start_mixed(&source);
    std::thread::sleep(Duration::from_millis(500));
    let target = tmp.path().join("mb");
    let socket = format!("--socket={}", source.socket.display());
    let target_arg = format!("--target-dir={}", target.display());
    run_ok(Command::new(require("mariabackup")).args([
        "--backup",
        "--user=root",
        &socket,
        &target_arg,
    ]));
    run_ok(Command::new(require("mariabackup")).args(["--prepare", &target_arg]));
    let restored = tmp.path().join("restored");
    run_ok(Command::new(require("mariabackup")).args([
        "--copy-back",
        &target_arg,
        &format!("--datadir={}", restored.display()),
    ]));
    let copy = Server::start_on(&restored, &["--skip-slave-start"]);
    assert_mixed_consistent(&copy);
    let info = std::fs::read_to_string(target.join("xtrabackup_binlog_info")).unwrap();
    let gtid = info.trim_end().split('\t').nth(2).unwrap().to_string();
    load.stop();
    assert_converges(&copy, &source, &gtid);
}

#[test]
fn mixed_server_through_a_directory_a_repository_and_a_bootstrap_run_by_hand() {
    let source = Server::start();
    load_mixed_bank(&source, 5_000);
    create_inno_zoo(&source);
    let tmp = tempfile::tempdir().unwrap();
    let load = Load::start_mixed(&source);
    std::thread::sleep(Duration::from_millis(300));

    // A compressed directory backup: the rows are not compressed a second time.
    let dir = tmp.path().join("dir");
    let d = dir.to_str().unwrap();
    backup_ok(
        backup_cmd(&source, &["--target-dir", d, "--compress"]),
        Path::new("/dev/null"),
        0,
    );
    let files = &manifest(&dir)["files"];
    let logical: Vec<&serde_json::Value> = files
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["kind"] == "logical")
        .collect();
    assert!(!logical.is_empty());
    assert!(
        logical
            .iter()
            .all(|f| f["path"].as_str().unwrap().ends_with(".tsv.zstd")
                && f.get("original").is_none())
    );
    run_ok(Command::new(bin()).arg("verify").arg(&dir));

    // A repository backup, restored from the repository.
    let repo = tmp.path().join("repo");
    let repo_url = repo.to_str().unwrap();
    run_ok(Command::new(bin()).args(["repo", "init", "--no-encryption", "--repo", repo_url]));
    backup_ok(
        backup_cmd(&source, &["--repo", repo_url]),
        Path::new("/dev/null"),
        0,
    );
    load.stop();
    let from_repo = tmp.path().join("from-repo");
    run_ok(
        Command::new(bin())
            .args([
                "restore",
                "--repo",
                repo_url,
                "--snapshot",
                "latest",
                "--datadir",
            ])
            .arg(&from_repo),
    );
    let copy = Server::start_on(&from_repo, &["--skip-slave-start"]);
    assert_mixed_consistent(&copy);
    assert_zoo_restored(&copy, &source);
    copy.stop();

    // --skip-bootstrap leaves the rows and the script in the datadir; the command the
    // restore prints loads them.
    let by_hand = tmp.path().join("by-hand");
    let log = restore_ok("copy-back", &dir, &by_hand, &["--skip-bootstrap"]);
    let unpacked = by_hand.join("myrocks_hotbackup_innodb");
    assert!(unpacked.is_dir(), "{log}");
    let command = log
        .split("mariadbd ")
        .nth(1)
        .and_then(|rest| rest.split(" --user=mysql").next())
        .unwrap_or_else(|| panic!("no bootstrap command in:\n{log}"));
    let script = std::fs::File::open(by_hand.join("myrocks_hotbackup_innodb.sql")).unwrap();
    let mut bootstrap = Command::new(sandbox::binary("mariadbd"));
    bootstrap.args(command.split(' ')).stdin(script);
    if unsafe { libc::geteuid() } == 0 {
        bootstrap.arg("--user=root");
    }
    run_ok(&mut bootstrap);
    std::fs::remove_dir_all(&unpacked).unwrap();
    std::fs::remove_file(by_hand.join("myrocks_hotbackup_innodb.sql")).unwrap();
    let copy = Server::start_on(&by_hand, &["--skip-slave-start"]);
    assert_mixed_consistent(&copy);
    assert_zoo_restored(&copy, &source);

    // A bootstrap that fails half-way (a row count that does not match the rows) in move
    // mode: the target is not created, and the backup is left as it was (the tables the
    // bootstrap created in the moved directories go with them).
    let plain = tmp.path().join("plain");
    let p = plain.to_str().unwrap();
    backup_ok(
        backup_cmd(&source, &["--target-dir", p]),
        Path::new("/dev/null"),
        0,
    );
    let manifest_path = plain.join("myrocks_hotbackup.json");
    let original = std::fs::read_to_string(&manifest_path).unwrap();
    let mut m: serde_json::Value = serde_json::from_str(&original).unwrap();
    let tables = m["backup"]["innodb_logical"]["tables"]
        .as_array_mut()
        .unwrap();
    let t = tables
        .iter_mut()
        .find(|t| t["name"] == "inno_totals")
        .unwrap();
    t["rows"] = serde_json::json!(t["rows"].as_u64().unwrap() + 1);
    std::fs::write(&manifest_path, serde_json::to_vec_pretty(&m).unwrap()).unwrap();
    let failed = tmp.path().join("failed");
    let out = Command::new(bin())
        .args(["move-back", "--backup-dir", p, "--datadir"])
        .arg(&failed)
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{log}");
    assert!(log.contains("a different number was loaded"), "{log}");
    assert!(!failed.exists());
    std::fs::write(&manifest_path, original).unwrap();
    run_ok(Command::new(bin()).arg("verify").arg(&plain));

    // A damaged data file is found before anything is restored.
    let victim = dir.join(logical[0]["path"].as_str().unwrap());
    let mut bytes = std::fs::read(&victim).unwrap();
    let last = bytes.len() - 5;
    bytes[last] ^= 0x40;
    std::fs::write(&victim, bytes).unwrap();
    let target = tmp.path().join("never");
    let out = Command::new(bin())
        .args(["copy-back", "--backup-dir", d, "--datadir"])
        .arg(&target)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!target.exists());
}
