//! Servers that are not plain primaries or not laid out by default: a replica (with its
//! binary log off) whose copy resumes replication from the recorded files alone, a
//! MyRocks-only server running without InnoDB, backed up and restored without InnoDB
//! anywhere, and an Aria log kept outside the datadir.

use std::fs;
use std::time::Duration;

use sandbox::workload::{assert_bank_consistent, load_bank, Load};
use sandbox::Server;

use crate::common::db::*;

/// A server running without InnoDB needs another default engine.
const NO_INNODB: &[&str] = &["--skip-innodb", "--default-storage-engine=MyISAM"];

fn start_replication(replica: &Server, source: &Server) {
    replica.exec(&format!(
        "CHANGE MASTER TO MASTER_HOST = '127.0.0.1', MASTER_PORT = {}, MASTER_USER = 'root', \
         MASTER_USE_GTID = slave_pos; START SLAVE",
        source.port
    ));
}

fn wait_for(replica: &Server, source: &Server) {
    let end = source.value("SELECT @@gtid_binlog_pos");
    assert_eq!(
        replica.value(&format!("SELECT MASTER_GTID_WAIT('{end}', 120)")),
        "0",
        "the replica did not catch up with {end}: {:?}",
        replica.logged_errors()
    );
}

#[test]
fn a_copy_of_a_replica_resumes_replication_from_the_recorded_files() {
    let source = Server::start();
    load_bank(&source, 20_000);
    // A replica with its binary log off: no binary log coordinates of its own to record.
    let replica = Server::start_with(&["--skip-log-bin"]);
    assert_eq!(replica.value("SELECT @@log_bin"), "0");
    start_replication(&replica, &source);
    wait_for(&replica, &source);
    let load = Load::start(&source);
    std::thread::sleep(Duration::from_millis(500));

    let tmp = tempfile::tempdir().unwrap();
    let stream = tmp.path().join("replica.xb");
    let log = backup_ok(backup_cmd(&replica, &["--stream", "xbstream"]), &stream, 0);
    assert!(log.contains("replication position"), "{log}");
    let x = tmp.path().join("x");
    extract_with("mbstream", &stream, &x);
    let m = manifest(&x);
    assert!(m["backup"]["binlog"].is_null(), "{m}");
    let recorded = m["backup"]["replica"]["gtid_slave_pos"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(recorded.starts_with("0-"), "{m}");
    let slave_info = fs::read_to_string(x.join("xtrabackup_slave_info")).unwrap();
    assert_eq!(
        slave_info,
        format!(
            "SET GLOBAL gtid_slave_pos = '{recorded}';\nCHANGE MASTER TO master_use_gtid = slave_pos;\n"
        )
    );
    assert!(!x.join("xtrabackup_binlog_info").exists());

    let restored = tmp.path().join("restored");
    restore_ok("move-back", &x, &restored, &[]);
    let copy = Server::start_on(&restored, &["--skip-slave-start"]);
    assert_eq!(copy.logged_errors(), Vec::<String>::new());
    // The rows of mysql.gtid_slave_pos came back: the copy knows where it stands.
    assert_eq!(copy.value("SELECT @@gtid_slave_pos"), recorded);
    assert_bank_consistent(&copy);

    // Resume with the recorded statements and the source's address only.
    copy.exec(&slave_info);
    start_replication(&copy, &source);
    std::thread::sleep(Duration::from_millis(500));
    assert!(load.stop() > 0);
    wait_for(&copy, &source);
    wait_for(&replica, &source);
    assert_eq!(copy.checksums("bank"), source.checksums("bank"));
    assert_eq!(copy.checksums("bank"), replica.checksums("bank"));
    assert_eq!(copy.logged_errors(), Vec::<String>::new());
}

#[test]
fn a_server_without_innodb_is_backed_up_and_restored_without_innodb() {
    // Installed as usual (the mysql schema has its InnoDB tables' .frm files), then run
    // with InnoDB disabled, as some MyRocks deployments and MariaDB's test suites run.
    let source = Server::start_split(&[], NO_INNODB);
    assert!(source
        .rows("SELECT SUPPORT FROM information_schema.ENGINES WHERE ENGINE = 'InnoDB'")
        .iter()
        .all(|r| r[0] != "YES" && r[0] != "DEFAULT"));
    source.exec(
        "CREATE DATABASE app; USE app;
         CREATE TABLE t (id INT PRIMARY KEY, v INT) ENGINE=ROCKSDB;
         INSERT INTO t SELECT seq, seq FROM seq_1_to_5000",
    );
    let tmp = tempfile::tempdir().unwrap();
    let stream = tmp.path().join("b.tar");
    backup_ok(backup_cmd(&source, &[]), &stream, 0);
    let x = tmp.path().join("x");
    extract_with("tar", &stream, &x);
    assert!(x.join("mysql/innodb_index_stats.frm").exists());
    assert!(!x.join("myrocks_hotbackup_innodb.sql").exists());

    // No mariadbd is needed: there is nothing for InnoDB to re-create.
    let restored = tmp.path().join("r");
    restore_ok(
        "copy-back",
        &x,
        &restored,
        &["--mariadbd", "/nonexistent/mariadbd"],
    );
    let copy = Server::start_on(&restored, NO_INNODB);
    assert_eq!(copy.value("SELECT SUM(v) FROM app.t"), "12502500");
    assert_eq!(source.logged_errors(), Vec::<String>::new());
    assert_eq!(copy.logged_errors(), Vec::<String>::new());
}

#[test]
fn the_aria_log_is_taken_from_aria_log_dir_path() {
    let tmp = tempfile::tempdir().unwrap();
    let aria_dir = tmp.path().join("aria-logs");
    fs::create_dir(&aria_dir).unwrap();
    let opt = format!("--aria-log-dir-path={}", aria_dir.display());
    let source = Server::start_with(&[&opt]);
    source.exec(
        "CREATE DATABASE app; USE app;
         CREATE TABLE a (id INT PRIMARY KEY, v INT) ENGINE=Aria TRANSACTIONAL=1;
         INSERT INTO a SELECT seq, seq FROM seq_1_to_3000",
    );
    assert!(aria_dir.join("aria_log_control").exists());
    assert!(!source.datadir.join("aria_log_control").exists());
    let stream = tmp.path().join("b.tar");
    backup_ok(backup_cmd(&source, &[]), &stream, 0);
    let x = tmp.path().join("x");
    extract_with("ours", &stream, &x);
    assert!(x.join("aria_log_control").exists() && x.join("aria_log.00000001").exists());
    let restored = tmp.path().join("r");
    assert!(move_back(&x, &restored).status.success());
    // The restore puts the Aria log in the datadir, where a default server looks for it.
    let copy = Server::start_on(&restored, &[]);
    assert_eq!(copy.value("SELECT SUM(v) FROM app.a"), "4501500");
    let check = copy.rows("CHECK TABLE app.a");
    assert_eq!(check.last().unwrap()[3], "OK", "{check:?}");
    assert_eq!(copy.logged_errors(), Vec::<String>::new());
}
