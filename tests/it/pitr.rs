//! Point-in-time recovery: binary logs archived by `binlog archive` while the bank workload
//! runs (across DDL in a second GTID domain, a `FLUSH BINARY LOGS`, a server restart and an
//! archiver killed with -9),
//! replayed onto a backup up to a recorded GTID, time and position; a damaged archive
//! refused. An archive in a repository (S3), restored from the newest snapshot before the
//! target; closed files copied from the server's directory.

use std::fs;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sandbox::s3::S3;
use sandbox::workload::{assert_bank_consistent, load_bank, Load};
use sandbox::Server;

use crate::common::db::{backup_cmd, leftovers, Mount};
use crate::common::*;

fn start_archiver(server: &Server, archive: &Path, log: &Path) -> Child {
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    Command::new(bin())
        .args(["binlog", "archive", "--user", "root", "--socket"])
        .arg(&server.socket)
        .arg("--target-dir")
        .arg(archive)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap()
}

fn binlog(args: &[&str], archive: &Path) -> std::process::Output {
    Command::new(bin())
        .arg("binlog")
        .args(args)
        .arg("--target-dir")
        .arg(archive)
        .output()
        .unwrap()
}

/// Waits until the archive holds the server's every transaction.
fn wait_archived(server: &Server, archive: &Path) {
    let want = server.value("SELECT @@gtid_binlog_pos");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = binlog(&["list", "--json"], archive);
        let listing: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let end = listing["ranges"]
            .as_array()
            .and_then(|r| r.last())
            .map(|r| r["end_gtid"].as_str().unwrap_or_default().to_string());
        if end.as_deref() == Some(want.as_str()) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the archive did not reach {want}: {end:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn copy_back(backup: &Path, datadir: &Path, args: &[&str]) -> std::process::Output {
    Command::new(bin())
        .arg("copy-back")
        .arg("--backup-dir")
        .arg(backup)
        .arg("--datadir")
        .arg(datadir)
        .args(args)
        .env("TZ", "UTC")
        .output()
        .unwrap()
}

#[test]
fn restores_to_a_gtid_a_time_and_a_position_under_load_across_a_flush_a_restart_and_a_kill() {
    let mut server = Server::start();
    load_bank(&server, 5_000);
    let dir = tempfile::tempdir().unwrap();
    let (archive, log) = (dir.path().join("archive"), dir.path().join("archiver.log"));
    let mut archiver = start_archiver(&server, &archive, &log);

    let load = Load::start(&server);
    std::thread::sleep(Duration::from_millis(700));
    let backup = dir.path().join("backup");
    let out = backup_cmd(&server, &["--target-dir", backup.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::thread::sleep(Duration::from_millis(500));
    // DDL and rows in a second GTID domain.
    server.exec(
        "SET SESSION gtid_domain_id = 1;
         CREATE TABLE bank.notes (id INT PRIMARY KEY, note VARCHAR(50)) ENGINE=ROCKSDB;
         INSERT INTO bank.notes VALUES (1, 'domain one');
         ALTER TABLE bank.notes ADD COLUMN n INT;
         INSERT INTO bank.notes VALUES (2, 'altered', 2)",
    );
    server.exec("FLUSH BINARY LOGS");
    std::thread::sleep(Duration::from_millis(500));
    load.stop();
    server.restart();
    let load = Load::start(&server);
    std::thread::sleep(Duration::from_millis(700));
    // Killed mid-stream, and started again: nothing lost, nothing twice.
    archiver.kill().unwrap();
    archiver.wait().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let mut archiver = start_archiver(&server, &archive, &log);
    std::thread::sleep(Duration::from_millis(700));

    // The point to come back to: writes paused, with the GTID, time, position and sums.
    load.stop();
    let gtid = server.value("SELECT @@gtid_binlog_pos");
    let status = server.rows("SHOW MASTER STATUS");
    let position = format!("{}:{}", status[0][0], status[0][1]);
    let time = server.value("SELECT DATE_FORMAT(UTC_TIMESTAMP(), '%Y-%m-%d %H:%i:%s')");
    let sums = server.checksums("bank");
    std::thread::sleep(Duration::from_millis(1_100));
    let load = Load::start(&server);
    std::thread::sleep(Duration::from_millis(700));
    load.stop();
    server.exec("DELETE FROM bank.ledger"); // the mistake to undo
    wait_archived(&server, &archive);
    unsafe { libc::kill(archiver.id() as i32, libc::SIGTERM) };
    let status = archiver.wait().unwrap();
    let archiver_log = fs::read_to_string(&log).unwrap();
    assert!(
        status.success(),
        "the archiver on SIGTERM: {status}\n{archiver_log}"
    );

    // The files the server closed are archived byte for byte.
    let files: Vec<String> = walk(&archive)
        .into_iter()
        .filter(|f| f.starts_with("binlog.") && !f.ends_with(".index"))
        .collect();
    assert!(
        files.len() >= 3,
        "a flush and a restart make 3 files at least: {files:?}"
    );
    for f in &files[..files.len() - 1] {
        assert_eq!(
            fs::read(archive.join(f)).unwrap(),
            fs::read(server.binlog_dir().join(f)).unwrap(),
            "{f} differs from the server's"
        );
    }
    let out = binlog(
        &["verify", "--backup-dir", backup.to_str().unwrap()],
        &archive,
    );
    assert!(
        out.status.success(),
        "binlog verify: {}\n{archiver_log}",
        String::from_utf8_lossy(&out.stderr)
    );

    let archive_arg = archive.to_str().unwrap();
    for until in [
        ["--until-gtid", gtid.as_str()],
        ["--until-time", time.as_str()],
        ["--until-position", position.as_str()],
    ] {
        let target = dir.path().join(format!("restored{}", until[0]));
        let out = copy_back(
            &backup,
            &target,
            &["--binlog-dir", archive_arg, until[0], until[1]],
        );
        let log = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "copy-back {until:?}: {log}");
        assert!(log.contains(&format!("stands at GTID {gtid}")), "{log}");
        assert!(!log.contains("without authentication"), "{log}");
        let restored = Server::start_on(&target, &[]);
        assert_eq!(restored.checksums("bank"), sums, "restored {until:?}");
        assert_bank_consistent(&restored);
        assert_eq!(restored.value("SELECT @@gtid_slave_pos"), gtid);
        assert!(
            restored.rows("SHOW SLAVE STATUS").is_empty(),
            "replication left set up"
        );
        assert_eq!(restored.logged_errors(), Vec::<String>::new());
        restored.stop();
        assert!(
            fs::read_dir(dir.path()).unwrap().all(|e| !e
                .unwrap()
                .file_name()
                .to_string_lossy()
                .contains("replay")),
            "the replay's temporary directory is left"
        );
    }

    // A target past the archive's end, or before the backup, is refused.
    let empty = dir.path().join("not-restored");
    let out = copy_back(
        &backup,
        &empty,
        &["--binlog-dir", archive_arg, "--until-gtid", "0-1-999999999"],
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("not in the archive"));
    assert!(!empty.exists());

    // A file lost from the archive: verify names the gap, a restore across it is refused.
    let middle = &files[1];
    fs::remove_file(archive.join(middle)).unwrap();
    fs::remove_file(archive.join(format!("{middle}.index"))).unwrap();
    let out = binlog(&["verify"], &archive);
    let text = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{text}");
    assert!(text.contains(&format!("{middle} missing")), "{text}");
    let out = copy_back(
        &backup,
        &empty,
        &["--binlog-dir", archive_arg, "--until-gtid", &gtid],
    );
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(text.contains("does not continue"), "{text}");
    assert!(!empty.exists(), "a refused restore leaves nothing");
}

#[test]
fn a_repository_restores_the_newest_snapshot_before_the_target_and_files_mode_archives_what_the_server_closed(
) {
    let s3 = S3::start();
    let server = Server::start();
    load_bank(&server, 2_000);
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key");
    let repo = |args: &[&str]| {
        let mut cmd = Command::new(bin());
        cmd.args(args)
            .args(["--repo", &s3.url("pitr"), "--key-file"])
            .arg(&key)
            .envs(s3.env());
        cmd
    };
    let ok = |mut cmd: Command| {
        let out = cmd.output().unwrap();
        let log = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{cmd:?}: {log}");
        (String::from_utf8_lossy(&out.stdout).into_owned(), log)
    };
    ok(repo(&["repo", "init"]));
    let spool = dir.path().join("spool");
    let mut archiver = repo(&[
        "binlog",
        "archive",
        "--user",
        "root",
        "--upload-interval",
        "0.3",
    ])
    .arg("--socket")
    .arg(&server.socket)
    .arg("--spool-dir")
    .arg(&spool)
    .stderr(Stdio::null())
    .spawn()
    .unwrap();
    let files = dir.path().join("files");
    let mut copier = Command::new(bin())
        .args(["binlog", "archive", "--poll", "0.3", "--from-datadir"])
        .arg(server.binlog_dir())
        .arg("--target-dir")
        .arg(&files)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let backup = |server: &Server| {
        let mut cmd = repo(&["backup", "--user", "root"]);
        cmd.arg(format!("--socket={}", server.socket.display()));
        ok(cmd).0.trim().to_string()
    };

    let load = Load::start(&server);
    std::thread::sleep(Duration::from_millis(500));
    let before = backup(&server);
    std::thread::sleep(Duration::from_millis(500));
    server.exec("FLUSH BINARY LOGS");
    std::thread::sleep(Duration::from_millis(500));
    load.stop();
    let gtid = server.value("SELECT @@gtid_binlog_pos");
    let sums = server.checksums("bank");
    let load = Load::start(&server);
    std::thread::sleep(Duration::from_millis(500));
    load.stop();
    let after = backup(&server);
    server.exec("FLUSH BINARY LOGS");
    let end = server.value("SELECT @@gtid_binlog_pos");

    // The spool's last upload and the copier's next look: then a clean stop.
    std::thread::sleep(Duration::from_millis(2_000));
    for child in [&mut archiver, &mut copier] {
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        assert!(child.wait().unwrap().success());
    }
    let (listing, _) = ok(repo(&["binlog", "list", "--json"]));
    let listing: serde_json::Value = serde_json::from_str(&listing).unwrap();
    assert_eq!(listing["ranges"][0]["end_gtid"], end.as_str(), "{listing}");
    ok(repo(&["binlog", "verify"]));

    let target = dir.path().join("restored");
    let mut cmd = repo(&["restore", "--until-gtid", &gtid]);
    cmd.arg(format!("--datadir={}", target.display()));
    let (_, log) = ok(cmd);
    assert!(log.contains(&format!("snapshot {before}")), "{log}");
    assert!(!log.contains(&after));
    let restored = Server::start_on(&target, &[]);
    assert_eq!(restored.checksums("bank"), sums);
    assert_eq!(restored.value("SELECT @@gtid_slave_pos"), gtid);
    restored.stop();
    let hidden: Vec<_> = leftovers(dir.path())
        .into_iter()
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with('.'))
        .collect();
    assert!(
        hidden.is_empty(),
        "staging, binary logs or replay left: {hidden:?}"
    );

    // Binary logs older than every snapshot go with the snapshots that needed them.
    let (_, log) = ok(repo(&["forget", "--keep-last", "1", "--prune"]));
    assert!(log.contains("Removed 1 archived binary log(s)"), "{log}");
    let (listing, _) = ok(repo(&["binlog", "list", "--json"]));
    let listing: serde_json::Value = serde_json::from_str(&listing).unwrap();
    assert_eq!(
        listing["ranges"][0]["first_file"], "binlog.000002",
        "{listing}"
    );
    ok(repo(&["binlog", "verify"]));

    // The copier took every file the server closed, as the server has it, and not the open one.
    let out = binlog(&["verify"], &files);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let copied: Vec<String> = walk(&files)
        .into_iter()
        .filter(|f| f.starts_with("binlog.") && !f.ends_with(".index"))
        .collect();
    let open = server.rows("SHOW MASTER STATUS")[0][0].clone();
    assert_eq!(copied.len(), 2, "{copied:?}");
    assert!(!copied.contains(&open));
    for f in &copied {
        assert_eq!(
            fs::read(files.join(f)).unwrap(),
            fs::read(server.binlog_dir().join(f)).unwrap()
        );
    }
}

fn archive_output(server: &Server, archive: &Path, extra: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(bin())
        .args(["binlog", "archive", "--user", "root", "--socket"])
        .arg(&server.socket)
        .arg("--target-dir")
        .arg(archive)
        .args(extra)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_archiver_refuses_clearly_and_a_full_disk_leaves_a_whole_archive() {
    let tmp = tempfile::tempdir().unwrap();
    let no_binlog = Server::start_with(&["--skip-log-bin"]);
    let (code, log) = archive_output(&no_binlog, &tmp.path().join("a"), &[]);
    assert_eq!(code, Some(1), "{log}");
    assert!(log.contains("binary log on?"), "{log}");
    drop(no_binlog);

    let server = Server::start();
    let (code, log) = archive_output(&server, &tmp.path().join("b"), &["--password=wrong"]);
    assert_eq!(code, Some(1), "{log}");
    assert!(log.contains("access denied"), "{log}");
    assert!(!log.contains("wrong"), "the password is in the log: {log}");

    // A user with only the privileges the README names, over TCP, its password from
    // MYSQL_PWD.
    server.exec(
        "CREATE USER archiver@'127.0.0.1' IDENTIFIED BY 's3cret!';
         GRANT REPLICATION SLAVE, BINLOG MONITOR ON *.* TO archiver@'127.0.0.1'",
    );
    let archive = tmp.path().join("by-user");
    let child = Command::new(bin())
        .args([
            "binlog",
            "archive",
            "--user",
            "archiver",
            "--host",
            "127.0.0.1",
            "--port",
        ])
        .arg(server.port.to_string())
        .arg("--target-dir")
        .arg(&archive)
        .env("MYSQL_PWD", "s3cret!")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    server.exec("CREATE DATABASE by_user");
    wait_archived(&server, &archive);
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert!(!log.contains("s3cret"), "the password is in the log: {log}");

    // A directory that is not an archive and not empty is refused, and left as it was.
    let other = tmp.path().join("other");
    fs::create_dir(&other).unwrap();
    fs::write(other.join("binlog.000001"), b"not ours").unwrap();
    let (code, log) = archive_output(&server, &other, &[]);
    assert_eq!(code, Some(1), "{log}");
    assert!(log.contains("not a binary log archive"), "{log}");
    assert_eq!(fs::read(other.join("binlog.000001")).unwrap(), b"not ours");

    // One archiver per directory.
    let archive = tmp.path().join("c");
    let mut first = start_archiver(&server, &archive, &tmp.path().join("c.log"));
    std::thread::sleep(Duration::from_millis(500));
    let (code, log) = archive_output(&server, &archive, &[]);
    assert_eq!(code, Some(1), "{log}");
    assert!(log.contains("another archiver"), "{log}");
    first.kill().unwrap();
    first.wait().unwrap();

    // A full disk: the archiver stops with the error; what it recorded is whole.
    let mount = Mount::tmpfs(&tmp.path().join("small"), 2);
    let small = mount.0.join("archive");
    server.exec(
        "CREATE DATABASE app; CREATE TABLE app.t (id INT PRIMARY KEY, pad VARBINARY(600)) ENGINE=ROCKSDB",
    );
    let mut archiver = start_archiver(&server, &small, &tmp.path().join("small.log"));
    for i in 0..10 {
        server.exec(&format!(
            "USE app; INSERT INTO app.t SELECT seq + {}, RANDOM_BYTES(500) FROM seq_1_to_1000",
            i * 1000
        ));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = archiver.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "the archiver did not stop on a full disk"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let log = fs::read_to_string(tmp.path().join("small.log")).unwrap();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(log.contains("No space left"), "{log}");
    let out = binlog(&["verify"], &small);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
