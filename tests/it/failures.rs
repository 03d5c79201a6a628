//! Every way a backup or restore can be refused or interrupted: a clear error, a non-zero
//! exit, no checkpoint left on the server, the backup stage released, nothing lost.

use std::fs;
use std::io::Read;
use std::process::{Command, Stdio};

use sandbox::Server;

use crate::common::db::*;
use crate::common::*;

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A server with a password-protected backup user, anonymous accounts dropped.
fn server_with_backup_user() -> Server {
    let server = Server::start();
    server.exec(
        "DROP USER IF EXISTS ''@'localhost'; DROP USER IF EXISTS ''@'%';
         CREATE USER bk@localhost IDENTIFIED BY 'Sekr1t-pw';
         GRANT RELOAD, SUPER, BINLOG MONITOR, SELECT ON *.* TO bk@localhost;
         CREATE DATABASE app; CREATE TABLE app.t (id INT PRIMARY KEY) ENGINE=ROCKSDB; INSERT INTO app.t VALUES (1), (2)",
    );
    server
}

fn backup_as(
    server: &Server,
    args: &[&str],
    envs: &[(&str, &str)],
    ckpt: &std::path::Path,
) -> std::process::Output {
    let mut cmd = Command::new(bin());
    cmd.arg("backup")
        .arg("--socket")
        .arg(&server.socket)
        .arg("--checkpoint-dir")
        .arg(ckpt)
        .args(args)
        .env_remove("MYSQL_PWD")
        .envs(envs.iter().copied())
        .env("HOME", ckpt.parent().unwrap())
        .stdout(Stdio::piped());
    cmd.output().unwrap()
}

#[test]
fn credentials_from_flags_mysql_pwd_and_option_files_and_never_printed() {
    let server = server_with_backup_user();
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = tmp.path().join("ckpt");

    let wrong = backup_as(&server, &["-u", "bk", "-p", "wrong-Sekr1t"], &[], &ckpt);
    assert_eq!(wrong.status.code(), Some(1));
    assert!(
        stderr(&wrong).contains("access denied for user \"bk\""),
        "{}",
        stderr(&wrong)
    );
    assert!(!stderr(&wrong).contains("wrong-Sekr1t"));
    assert!(wrong.stdout.is_empty());
    assert!(!ckpt.exists(), "nothing may be left behind");

    let env = backup_as(&server, &["-u", "bk"], &[("MYSQL_PWD", "Sekr1t-pw")], &ckpt);
    assert!(env.status.success(), "{}", stderr(&env));
    assert!(!stderr(&env).contains("Sekr1t") && !env.stdout.windows(9).any(|w| w == b"Sekr1t-pw"));

    let cnf = tmp.path().join("backup.cnf");
    fs::write(&cnf, "[client]\nuser=bk\npassword=\"Sekr1t-pw\"\n").unwrap();
    let file = backup_as(
        &server,
        &["--defaults-file", cnf.to_str().unwrap()],
        &[],
        &ckpt,
    );
    assert!(file.status.success(), "{}", stderr(&file));

    fs::write(
        tmp.path().join(".my.cnf"),
        "[client]\nuser=bk\npassword=Sekr1t-pw\n",
    )
    .unwrap();
    let home = backup_as(&server, &[], &[], &ckpt);
    assert!(home.status.success(), "~/.my.cnf: {}", stderr(&home));
    assert!(!stderr(&home).contains("Sekr1t"));
}

#[test]
fn tcp_stays_tcp() {
    let server = server_with_backup_user();
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(bin())
        .args(["backup", "--host", "127.0.0.1", "--user", "root"])
        .arg("--port")
        .arg(server.port.to_string())
        .arg("--checkpoint-dir")
        .arg(tmp.path().join("c"))
        .stdout(Stdio::piped())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    // Over TCP to a port where nothing listens: a connection error, not a silent socket.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = Command::new(bin())
        .args([
            "backup",
            "--host",
            "127.0.0.1",
            "--user",
            "root",
            "--port",
            &closed.to_string(),
        ])
        .stdout(Stdio::piped())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains(&format!(
            "cannot connect to the server at 127.0.0.1:{closed}"
        )),
        "{}",
        stderr(&out)
    );
}

#[test]
fn missing_privileges_are_named() {
    let server = server_with_backup_user();
    server.exec(
        "CREATE USER weak@localhost IDENTIFIED BY 'pw'; GRANT SELECT ON *.* TO weak@localhost",
    );
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = tmp.path().join("ckpt");
    let out = backup_as(&server, &["-u", "weak", "-p", "pw"], &[], &ckpt);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("RELOAD") && err.contains("SUPER") && err.contains("BINLOG MONITOR"),
        "{err}"
    );
    assert!(
        err.contains("GRANT RELOAD, SUPER, BINLOG MONITOR ON *.* TO 'weak'@'localhost'"),
        "{err}"
    );
    assert!(!ckpt.exists());
}

#[test]
fn a_server_without_rocksdb_is_refused() {
    let server = Server::start_with(&["--rocksdb=OFF"]);
    let tmp = tempfile::tempdir().unwrap();
    let out = backup_as(&server, &["-u", "root"], &[], &tmp.path().join("c"));
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("RocksDB plugin"), "{}", stderr(&out));
}

/// An InnoDB table whose trigger writes into a RocksDB table.
const INNO_TABLE_WITH_TRIGGER: &str =
    "CREATE TABLE app.inno (id INT PRIMARY KEY) ENGINE=InnoDB; INSERT INTO app.inno VALUES (1);
     CREATE TABLE app.audit (id INT PRIMARY KEY) ENGINE=ROCKSDB;
     CREATE TRIGGER app.inno_ai AFTER INSERT ON app.inno FOR EACH ROW INSERT INTO app.audit VALUES (NEW.id)";

#[test]
fn innodb_user_tables_are_refused_or_skipped_when_asked() {
    let server = server_with_backup_user();
    server.exec(INNO_TABLE_WITH_TRIGGER);
    server.exec(
        "CREATE TRIGGER app.t_ai AFTER INSERT ON app.t FOR EACH ROW INSERT INTO app.audit VALUES (NEW.id + 1000)",
    );
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = tmp.path().join("ckpt");
    let out = backup_as(&server, &["-u", "root", "--innodb=refuse"], &[], &ckpt);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("app.inno") && stderr(&out).contains("--skip-innodb-tables"),
        "{}",
        stderr(&out)
    );
    assert!(!ckpt.exists());

    // --innodb=skip says the same as --skip-innodb-tables.
    let stream = tmp.path().join("b.tar");
    backup_ok(backup_cmd(&server, &["--innodb=skip"]), &stream, 0);
    backup_ok(backup_cmd(&server, &["--skip-innodb-tables"]), &stream, 0);
    let x = tmp.path().join("x");
    extract_with("ours", &stream, &x);
    assert_eq!(
        manifest(&x)["backup"]["skipped_innodb_tables"],
        serde_json::json!(["app.inno"])
    );
    assert!(manifest(&x)["backup"].get("innodb_logical").is_none());
    let info = run_ok(Command::new(bin()).arg("info").arg(&x));
    assert!(
        String::from_utf8_lossy(&info.stdout).contains("left out (--skip-innodb-tables): app.inno"),
        "{}",
        String::from_utf8_lossy(&info.stdout)
    );
    // Nothing of the skipped table is left: no definition, no trigger files.
    for gone in ["app/inno.frm", "app/inno.TRG", "app/inno_ai.TRN"] {
        assert!(!x.join(gone).exists(), "{gone} was copied");
    }
    // The triggers of the other tables are kept.
    assert!(x.join("app/t.TRG").exists() && x.join("app/t_ai.TRN").exists());
    let restored = tmp.path().join("r");
    assert!(move_back(&x, &restored).status.success());
    let copy = Server::start_on(&restored, &[]);
    assert_eq!(copy.value("SELECT COUNT(*) FROM app.t"), "2");
    assert_eq!(copy.logged_errors(), Vec::<String>::new());
}

#[test]
fn innodb_tables_that_cannot_be_copied_whole_are_refused_before_the_rounds() {
    let server = server_with_backup_user();
    server.exec(INNO_TABLE_WITH_TRIGGER);
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = tmp.path().join("ckpt");
    // Without the TRIGGER privilege the server hides the trigger: refused, not lost.
    let out = backup_as(&server, &["-u", "bk"], &[("MYSQL_PWD", "Sekr1t-pw")], &ckpt);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("app.inno") && stderr(&out).contains("TRIGGER ON *.*"),
        "{}",
        stderr(&out)
    );
    assert!(
        !stderr(&out).contains("Starting backup round"),
        "{}",
        stderr(&out)
    );
    assert!(!ckpt.exists());
    // A system-versioned table's history cannot be loaded back.
    server.exec("CREATE TABLE app.hist (id INT PRIMARY KEY) ENGINE=InnoDB WITH SYSTEM VERSIONING");
    let out = backup_as(&server, &["-u", "root"], &[], &ckpt);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("system-versioned") && stderr(&out).contains("app.hist"),
        "{}",
        stderr(&out)
    );
    assert!(!ckpt.exists());

    // With the privilege, the table and its trigger are copied and work on the copy.
    server.exec("DROP TABLE app.hist; GRANT TRIGGER ON *.* TO bk@localhost");
    let out = backup_as(
        &server,
        &[
            "-u",
            "bk",
            "--target-dir",
            tmp.path().join("b").to_str().unwrap(),
        ],
        &[("MYSQL_PWD", "Sekr1t-pw")],
        &ckpt,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let restored = tmp.path().join("r");
    restore_ok("copy-back", &tmp.path().join("b"), &restored, &[]);
    let copy = Server::start_on(&restored, &[]);
    copy.exec("INSERT INTO app.inno VALUES (2)");
    assert_eq!(copy.value("SELECT GROUP_CONCAT(id) FROM app.audit"), "2");
    assert_eq!(copy.value("SELECT COUNT(*) FROM app.inno"), "2");
}

#[test]
fn a_checkpoint_directory_on_another_filesystem_is_refused() {
    let server = server_with_backup_user();
    let other = tempfile::tempdir_in("/dev/shm").unwrap();
    let out = backup_as(&server, &["-u", "root"], &[], &other.path().join("c"));
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("another filesystem"),
        "{}",
        stderr(&out)
    );
    assert!(!other.path().join("c").exists());
}

#[test]
fn sigterm_mid_backup_cleans_up_and_releases_the_server() {
    let server = server_with_backup_user();
    let tmp = tempfile::tempdir().unwrap();
    let signal = tmp.path().join("go");
    let ckpt_parent = server.datadir.join("#myrocks_hotbackup");
    let mut child =
        backup_paused_before_consistent_point(&server, &signal, &tmp.path().join("b.tar"));
    assert_eq!(
        leftovers(&ckpt_parent).len(),
        1,
        "the run directory exists while the backup runs"
    );
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130));
    assert!(
        !ckpt_parent.exists(),
        "checkpoints left behind: {:?}",
        leftovers(&ckpt_parent)
    );
    // No backup stage is held: another backup goes through.
    backup_ok(backup_cmd(&server, &[]), &tmp.path().join("again.tar"), 0);
}

#[test]
fn a_reader_closing_the_pipe_fails_the_backup_and_cleans_up() {
    let server = server_with_backup_user();
    server.exec("USE app; CREATE TABLE big (id INT PRIMARY KEY, pad VARBINARY(600)) ENGINE=ROCKSDB; INSERT INTO big SELECT seq, RANDOM_BYTES(500) FROM seq_1_to_40000");
    let mut child = backup_cmd(&server, &["--stream", "xbstream"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut first = vec![0u8; 100_000];
    out.read_exact(&mut first).unwrap();
    drop(out);
    let status = child.wait().unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("broken pipe"), "{err}");
    assert!(!server.datadir.join("#myrocks_hotbackup").exists());
}

#[test]
fn a_run_killed_outright_is_cleaned_up_by_the_next_one() {
    let server = server_with_backup_user();
    let tmp = tempfile::tempdir().unwrap();
    let ckpt_parent = server.datadir.join("#myrocks_hotbackup");
    let mut child = backup_paused_before_consistent_point(
        &server,
        &tmp.path().join("never"),
        &tmp.path().join("b.tar"),
    );
    child.kill().unwrap();
    child.wait().unwrap();
    let stale = leftovers(&ckpt_parent);
    assert_eq!(stale.len(), 1, "kill -9 leaves the run directory");
    // A run directory whose pid lives on as another process (pid 1, other start time).
    let recycled = ckpt_parent.join("myrocks_hotbackup-run-1-1");
    fs::create_dir(&recycled).unwrap();
    fs::write(recycled.join("owner"), "myrocks-hotbackup 1 1\n").unwrap();
    // Something that is not ours, in the same directory, must survive.
    fs::create_dir(ckpt_parent.join("not-ours")).unwrap();
    fs::write(ckpt_parent.join("not-ours/keep"), b"x").unwrap();
    let log = backup_ok(backup_cmd(&server, &[]), &tmp.path().join("again.tar"), 0);
    assert!(
        log.contains("left by an earlier run that was killed"),
        "{log}"
    );
    assert!(!stale[0].exists());
    assert!(!recycled.exists(), "a recycled pid is not a running backup");
    assert!(ckpt_parent.join("not-ours/keep").exists());

    // A backup that is really running is left alone, and a second one refuses to start.
    let mut running = backup_paused_before_consistent_point(
        &server,
        &tmp.path().join("never2"),
        &tmp.path().join("c.tar"),
    );
    let second = run_backup(backup_cmd(&server, &[]), &tmp.path().join("d.tar"), 0);
    assert_eq!(second.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&second.stderr).contains("another backup"),
        "{}",
        stderr(&second)
    );
    unsafe { libc::kill(running.id() as i32, libc::SIGTERM) };
    assert_eq!(running.wait().unwrap().code(), Some(130));
}

#[test]
fn restore_refuses_non_empty_targets_and_incomplete_backups_without_moving_anything() {
    let server = server_with_backup_user();
    let tmp = tempfile::tempdir().unwrap();
    let stream = tmp.path().join("b.xb");
    backup_ok(backup_cmd(&server, &["--stream", "xbstream"]), &stream, 0);
    let x = tmp.path().join("x");
    extract_with("ours", &stream, &x);
    let before = snapshot(&x);

    let target = tmp.path().join("busy");
    fs::create_dir(&target).unwrap();
    fs::write(target.join("precious"), b"keep me").unwrap();
    let out = move_back(&x, &target);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("not empty"), "{}", stderr(&out));
    assert_unchanged(&before, &x);
    assert_eq!(fs::read(target.join("precious")).unwrap(), b"keep me");

    // A file missing (as when mbstream skipped it): refused before anything moves.
    let sst = fs::read_dir(x.join("#rocksdb"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "sst"))
        .unwrap();
    let aside = tmp.path().join("aside.sst");
    fs::rename(&sst, &aside).unwrap();
    let out = move_back(&x, &tmp.path().join("fresh"));
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("missing (listed in the manifest"),
        "{}",
        stderr(&out)
    );
    assert!(!tmp.path().join("fresh").exists());
    fs::rename(&aside, &sst).unwrap();

    // A target that cannot be created, found after the datadir was made: all undone.
    let blocker = tmp.path().join("a-file");
    fs::write(&blocker, b"").unwrap();
    let ok = tmp.path().join("ok");
    let out = Command::new(bin())
        .arg("copy-back")
        .arg("--backup-dir")
        .arg(&x)
        .arg("--datadir")
        .arg(&ok)
        .arg("--rocksdb-datadir")
        .arg(blocker.join("rocks"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        !ok.exists(),
        "the datadir created before the failure must be removed"
    );
    assert_unchanged(&before, &x);
}

/// Regression: a move-back across filesystems copies and used to delete each source at once,
/// so a failure later (here the InnoDB bootstrap) lost the backup. Now the backup survives
/// whole and the target is left as it was.
#[test]
fn a_move_back_across_filesystems_that_fails_late_loses_nothing() {
    let server = server_with_backup_user();
    let tmp = tempfile::tempdir().unwrap();
    let stream = tmp.path().join("b.xb");
    backup_ok(backup_cmd(&server, &["--stream", "xbstream"]), &stream, 0);
    let shm = tempfile::tempdir_in("/dev/shm").unwrap();
    let x = shm.path().join("x");
    extract_with("ours", &stream, &x);
    let before = snapshot(&x);
    let bad_cnf = tmp.path().join("bad.cnf");
    fs::write(&bad_cnf, "[mysqld]\nno-such-option-anywhere = 1\n").unwrap();
    let target = tmp.path().join("target");
    fs::create_dir(&target).unwrap();
    let out = Command::new(bin())
        .arg("move-back")
        .arg("--backup-dir")
        .arg(&x)
        .arg("--datadir")
        .arg(&target)
        .arg("--defaults-file")
        .arg(&bad_cnf)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("mariadbd --bootstrap"),
        "{}",
        stderr(&out)
    );
    assert_unchanged(&before, &x);
    assert_eq!(
        leftovers(&target),
        Vec::<std::path::PathBuf>::new(),
        "the target must be empty again"
    );
}

/// BACKUP STAGE never waits unbounded (a stall on production): with another backup holding
/// the stage, ours gives up after --lock-wait-timeout, says why, and cleans up.
#[test]
fn a_blocked_backup_stage_gives_up_after_the_lock_wait_timeout() {
    use mysql::prelude::Queryable;
    let server = server_with_backup_user();
    let mut holder = server.conn();
    holder.query_drop("BACKUP STAGE START").unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let started = std::time::Instant::now();
    let res = run_backup(
        backup_cmd(&server, &["--lock-wait-timeout", "1"]),
        &tmp.path().join("b.tar"),
        0,
    );
    assert_eq!(res.status.code(), Some(1), "{}", stderr(&res));
    assert!(
        stderr(&res).contains("BACKUP STAGE START waited 1 s"),
        "{}",
        stderr(&res)
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(30));
    assert!(!server.datadir.join("#myrocks_hotbackup").exists());
    holder.query_drop("BACKUP STAGE END").unwrap();
}
