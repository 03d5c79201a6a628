//! The host comes first: signals of every kind release the server at once, a broken stderr
//! never turns clean-up into a crash, the server's filesystem is never filled, server
//! settings that cut statements short or change quoting do not break a backup, a live run
//! is recognised by its lock, a password leaves the command line, restore refuses damaged
//! or linked backups, and install-deps leaves running servers alone.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use mysql::prelude::Queryable;
use sandbox::Server;

use crate::common::db::*;
use crate::common::*;

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn small_server() -> Server {
    let server = Server::start();
    server.exec(
        "CREATE DATABASE app; USE app; CREATE TABLE app.t (id INT PRIMARY KEY, v VARCHAR(20)) ENGINE=ROCKSDB;
         INSERT INTO app.t SELECT seq, 'x' FROM seq_1_to_1000;
         CREATE TABLE app.m (id INT PRIMARY KEY) ENGINE=MyISAM; INSERT INTO app.m VALUES (1)",
    );
    server
}

/// A small server with a backup user `bk` whose password is `Sekr1t-pw`.
fn server_with_password_user() -> Server {
    let server = small_server();
    server.exec(
        "CREATE USER bk@localhost IDENTIFIED BY 'Sekr1t-pw';
         GRANT RELOAD, SUPER, BINLOG MONITOR, SELECT ON *.* TO bk@localhost",
    );
    server
}

/// A second backup goes through: no BACKUP STAGE is held by the first.
fn assert_server_released(server: &Server, tmp: &Path) {
    backup_ok(backup_cmd(server, &[]), &tmp.join("again.tar"), 0);
}

#[test]
fn sighup_cleans_up_like_sigterm() {
    let server = small_server();
    let tmp = tempfile::tempdir().unwrap();
    let ckpt_parent = server.datadir.join("#myrocks_hotbackup");
    let mut child = backup_paused_before_consistent_point(
        &server,
        &tmp.path().join("go"),
        &tmp.path().join("b.tar"),
    );
    assert_eq!(leftovers(&ckpt_parent).len(), 1);
    unsafe { libc::kill(child.id() as i32, libc::SIGHUP) };
    assert_eq!(child.wait().unwrap().code(), Some(130));
    assert!(!ckpt_parent.exists(), "{:?}", leftovers(&ckpt_parent));
    assert_server_released(&server, tmp.path());

    // Under nohup (SIGHUP ignored when the tool starts), a hang-up changes nothing.
    let signal = tmp.path().join("go-nohup");
    let stream = tmp.path().join("nohup.tar");
    let mut cmd = backup_cmd(&server, &["--debug-signal-file", signal.to_str().unwrap()]);
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            libc::signal(libc::SIGHUP, libc::SIG_IGN);
            Ok(())
        });
    }
    let child = cmd
        .stdout(File::create(&stream).unwrap())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while leftovers(&ckpt_parent).is_empty() {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    unsafe { libc::kill(child.id() as i32, libc::SIGHUP) };
    unsafe { libc::kill(child.id() as i32, libc::SIGHUP) };
    std::thread::sleep(Duration::from_millis(300));
    File::create(&signal).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    extract_ok(&stream, &tmp.path().join("nohup-x"));
}

#[test]
fn a_signal_while_block_ddl_waits_takes_effect_at_once() {
    let server = small_server();
    let tmp = tempfile::tempdir().unwrap();
    // A client holds a write lock on a MyISAM table: BLOCK_DDL waits for it.
    let mut locker = server.conn();
    locker.query_drop("LOCK TABLES app.m WRITE").unwrap();
    let child = backup_cmd(&server, &["--lock-wait-timeout", "300"])
        .stdout(File::create(tmp.path().join("b.tar")).unwrap())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until the backup's statement waits on the server.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let waiting = server.value(
            "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE INFO LIKE 'BACKUP STAGE%'",
        );
        if waiting == "1" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the backup never reached BACKUP STAGE"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(300));
    let signalled = Instant::now();
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    let took = signalled.elapsed();
    assert_eq!(out.status.code(), Some(130), "{}", stderr(&out));
    assert!(
        took < Duration::from_secs(10),
        "the signal waited for the statement: {took:?}"
    );
    assert!(stderr(&out).contains("SIGTERM"), "{}", stderr(&out));
    assert_eq!(
        server.value(
            "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE INFO LIKE 'BACKUP STAGE%'"
        ),
        "0"
    );
    assert!(!server.datadir.join("#myrocks_hotbackup").exists());
    locker.query_drop("UNLOCK TABLES").unwrap();
    assert_server_released(&server, tmp.path());
}

#[test]
fn a_broken_stderr_never_crashes_the_run() {
    let server = small_server();
    let tmp = tempfile::tempdir().unwrap();
    // A full stderr: the backup still completes and the stream is whole.
    let stream = tmp.path().join("b.tar");
    let status = backup_cmd(&server, &[])
        .stdout(File::create(&stream).unwrap())
        .stderr(File::options().write(true).open("/dev/full").unwrap())
        .status()
        .unwrap();
    assert!(status.success(), "{status}");
    extract_ok(&stream, &tmp.path().join("x"));

    // A stderr whose reader went away, on a failing run (a bad password): a clean error
    // exit (1), not a panic (101), and nothing left behind.
    let ckpt = tmp.path().join("ckpt");
    let mut child = backup_cmd(&server, &["--password", "wrong"])
        .arg("--checkpoint-dir")
        .arg(&ckpt)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stderr.take());
    assert_eq!(child.wait().unwrap().code(), Some(1));
    assert!(!ckpt.exists());

    // The same on a run stopped by a signal in the middle.
    let mut child = backup_cmd(
        &server,
        &[
            "--debug-signal-file",
            tmp.path().join("never").to_str().unwrap(),
        ],
    )
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let ckpt_parent = server.datadir.join("#myrocks_hotbackup");
    let deadline = Instant::now() + Duration::from_secs(30);
    while leftovers(&ckpt_parent).is_empty() {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(child.stderr.take());
    std::thread::sleep(Duration::from_millis(1500));
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert_eq!(child.wait().unwrap().code(), Some(130));
    assert!(!ckpt_parent.exists());
}

/// Fills the filesystem of `dir` until `free_mib` MiB are left; returns the filler file.
fn fill_until(dir: &Path, free_mib: u64) -> PathBuf {
    let filler = dir.join("filler");
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    let c = std::ffi::CString::new(dir.to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut st) }, 0);
    let free = st.f_bavail * st.f_frsize;
    let want = free.saturating_sub(free_mib << 20);
    let f = File::options()
        .create(true)
        .append(true)
        .open(&filler)
        .unwrap();
    let chunk = vec![0xabu8; 1 << 20];
    use std::io::Write;
    let mut w = std::io::BufWriter::new(f);
    for _ in 0..(want >> 20) {
        w.write_all(&chunk).unwrap();
    }
    w.flush().unwrap();
    filler
}

#[test]
fn a_nearly_full_server_filesystem_stops_the_backup_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let mount = Mount::tmpfs(&tmp.path().join("small"), 700);
    let rocks = mount.0.join("rocks");
    let server = Server::start_with(&[&format!("--rocksdb-datadir={}", rocks.display())]);
    server.exec(
        "CREATE DATABASE app; USE app; CREATE TABLE app.t (id INT PRIMARY KEY, pad VARBINARY(600)) ENGINE=ROCKSDB;
         INSERT INTO app.t SELECT seq, RANDOM_BYTES(500) FROM seq_1_to_20000",
    );
    let ckpt_parent = mount.0.join("#myrocks_hotbackup");

    // Too little room to start: refused, nothing created.
    let filler = fill_until(&mount.0, 100);
    let out = run_backup(backup_cmd(&server, &[]), &tmp.path().join("a.tar"), 0);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("keeps"), "{}", stderr(&out));
    assert!(stderr(&out).contains("free"), "{}", stderr(&out));
    assert!(!ckpt_parent.exists(), "{:?}", leftovers(&ckpt_parent));
    fs::remove_file(&filler).unwrap();

    // Room at the start, none left before the consistent point: stopped, cleaned up.
    let signal = tmp.path().join("go");
    let child = backup_paused_before_consistent_point(&server, &signal, &tmp.path().join("b.tar"));
    let filler = fill_until(&mount.0, 100);
    File::create(&signal).unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(!ckpt_parent.exists(), "{:?}", leftovers(&ckpt_parent));
    fs::remove_file(&filler).unwrap();

    // Room at the consistent point, none for the InnoDB rows read after it (they wait in
    // the checkpoint directory, on this filesystem): stopped, cleaned up.
    server.exec(
        "USE app; CREATE TABLE app.inno (id INT PRIMARY KEY, pad VARBINARY(600)) ENGINE=InnoDB;
         INSERT INTO app.inno SELECT seq, RANDOM_BYTES(500) FROM seq_1_to_300000",
    );
    // (RocksDB frees tens of MiB of its own as the backup starts: the rows need 150.)
    let filler = fill_until(&mount.0, 256 + 30);
    let out = run_backup(backup_cmd(&server, &[]), &tmp.path().join("d.tar"), 0);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("keeps") && stderr(&out).contains("InnoDB snapshots"),
        "{}",
        stderr(&out)
    );
    assert!(!ckpt_parent.exists(), "{:?}", leftovers(&ckpt_parent));
    fs::remove_file(&filler).unwrap();

    // And the server is fine: a backup now goes through.
    backup_ok(backup_cmd(&server, &[]), &tmp.path().join("c.tar"), 0);
    assert_eq!(server.value("SELECT COUNT(*) FROM app.t"), "20000");
    drop(server);
}

#[test]
fn server_settings_do_not_break_a_backup() {
    let server = small_server();
    let tmp = tempfile::tempdir().unwrap();
    // Statements cut after 1 ms, backslashes taken literally, double quotes as identifiers,
    // and a checkpoint path holding a quote and a backslash.
    server.exec(
        "SET GLOBAL max_statement_time = 0.001;
         SET GLOBAL sql_mode = 'NO_BACKSLASH_ESCAPES,ANSI_QUOTES'",
    );
    let ckpt = tmp.path().join("it's a \\ dir");
    let stream = tmp.path().join("b.tar");
    backup_ok(
        backup_cmd(&server, &["--checkpoint-dir", ckpt.to_str().unwrap()]),
        &stream,
        0,
    );
    assert_eq!(leftovers(&ckpt), Vec::<PathBuf>::new());
    let x = tmp.path().join("x");
    extract_ok(&stream, &x);
    let restored = tmp.path().join("r");
    let res = move_back(&x, &restored);
    assert!(res.status.success(), "{}", stderr(&res));
    let copy = Server::start_on(&restored, &[]);
    assert_eq!(copy.value("SELECT COUNT(*) FROM app.t"), "1000");
}

#[test]
fn a_live_run_is_known_by_its_lock_not_its_pid() {
    let server = small_server();
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = tmp.path().join("ckpt");
    // A run in another PID namespace: its pid means nothing here, its lock does.
    let run = ckpt.join("myrocks_hotbackup-run-1-1");
    fs::create_dir_all(&run).unwrap();
    fs::write(run.join("owner"), "myrocks-hotbackup 1\n").unwrap();
    let owner = File::open(run.join("owner")).unwrap();
    owner.lock().unwrap();
    let args = ["--checkpoint-dir", ckpt.to_str().unwrap()];
    let out = run_backup(backup_cmd(&server, &args), &tmp.path().join("a.tar"), 0);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("another backup"), "{}", stderr(&out));
    assert!(run.exists(), "a live run's directory was removed");

    // Once that run is gone (its lock released), the next run removes what it left.
    drop(owner);
    backup_ok(backup_cmd(&server, &args), &tmp.path().join("b.tar"), 0);
    assert!(!run.exists());
}

#[test]
fn a_password_on_the_command_line_is_scrubbed() {
    let server = server_with_password_user();
    let tmp = tempfile::tempdir().unwrap();
    for form in [
        &["--password=Sekr1t-pw"][..],
        &["-p", "Sekr1t-pw"],
        &["-pSekr1t-pw"],
    ] {
        let signal = tmp.path().join("go");
        let mut cmd = Command::new(bin());
        cmd.arg("backup")
            .arg("--socket")
            .arg(&server.socket)
            .args(["--user", "bk"])
            .args(form)
            .arg("--debug-signal-file")
            .arg(&signal)
            .stdout(Stdio::null());
        let mut child = spawn_until_waiting(cmd);
        let cmdline = fs::read(format!("/proc/{}/cmdline", child.id())).unwrap();
        let shown = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        assert!(!shown.contains("Sekr1t"), "{form:?}: {shown}");
        assert!(shown.contains("xxxx"), "{form:?}: {shown}");
        File::create(&signal).unwrap();
        assert!(child.wait().unwrap().success());
        fs::remove_file(&signal).unwrap();
    }
}

#[test]
fn copy_back_refuses_a_flipped_byte_and_a_symbolic_link() {
    let server = small_server();
    let tmp = tempfile::tempdir().unwrap();
    let stream = tmp.path().join("b.tar");
    backup_ok(backup_cmd(&server, &[]), &stream, 0);
    let x = tmp.path().join("x");
    extract_ok(&stream, &x);
    let copy_back = |target: &Path| {
        Command::new(bin())
            .arg("copy-back")
            .arg("--backup-dir")
            .arg(&x)
            .arg("--datadir")
            .arg(target)
            .output()
            .unwrap()
    };

    // One flipped byte in the middle of an SST, same size: refused before anything moves.
    let sst = fs::read_dir(x.join("#rocksdb"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "sst"))
        .max_by_key(|p| fs::metadata(p).unwrap().len())
        .unwrap();
    let good = fs::read(&sst).unwrap();
    let mut bad = good.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0x01;
    fs::write(&sst, &bad).unwrap();
    let target = tmp.path().join("r1");
    let out = copy_back(&target);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(stderr(&out).contains("altered (CRC-32"), "{}", stderr(&out));
    assert!(!target.exists());
    fs::write(&sst, &good).unwrap();

    // A symbolic link in the backup: refused.
    std::os::unix::fs::symlink("/etc/passwd", x.join("app/evil.frm")).unwrap();
    let out = copy_back(&target);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(stderr(&out).contains("symbolic link"), "{}", stderr(&out));
    assert!(!target.exists());
    fs::remove_file(x.join("app/evil.frm")).unwrap();

    // The repaired backup restores, into a target that is a filesystem's root (it holds
    // only lost+found).
    fs::create_dir_all(target.join("lost+found")).unwrap();
    let out = copy_back(&target);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("completed OK!"), "{}", stderr(&out));
    let copy = Server::start_on(&target, &[]);
    assert_eq!(copy.value("SELECT COUNT(*) FROM app.t"), "1000");
    assert_eq!(copy.logged_errors(), Vec::<String>::new());
}

#[test]
fn install_deps_leaves_a_running_server_alone() {
    let server = small_server();
    let pid = server.value("SELECT @@pid_file");
    let pid = fs::read_to_string(pid).unwrap().trim().to_string();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/install-deps");
    // In a private mount namespace, the packaged server's pid file names our server (what
    // an older install-deps killed), and the RocksDB plugin looks missing (so packages
    // would be installed while a server runs).
    let out = Command::new("unshare")
        .args(["--mount", "sh", "-c"])
        .arg(format!(
            "[ -d /run/mysqld ] && mount -t tmpfs tmpfs /run/mysqld && echo {pid} > /run/mysqld/mysqld.pid && \
             {s}; first=$?; mount -t tmpfs tmpfs /usr/lib/mysql/plugin && {s}; echo \"exits $first $?\"",
            s = script.display()
        ))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("exits 0 1"),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stderr(&out).contains("a database server is running"),
        "{}",
        stderr(&out)
    );
    // The server still answers.
    assert_eq!(server.value("SELECT COUNT(*) FROM app.t"), "1000");
}

#[test]
fn p_without_a_value_asks_on_the_terminal_and_only_there() {
    let server = server_with_password_user();
    let tmp = tempfile::tempdir().unwrap();
    let stream = tmp.path().join("b.tar");
    let backup = format!(
        "{} backup --socket {} --user bk -p --stream tar > {} 2> {}",
        bin().display(),
        server.socket.display(),
        stream.display(),
        tmp.path().join("log").display()
    );
    // On a terminal (a pseudo-terminal that `script` makes), the password typed is read.
    let out = Command::new("script")
        .args(["-qec", &backup, "/dev/null"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            std::thread::sleep(Duration::from_millis(500));
            child.stdin.take().unwrap().write_all(b"Sekr1t-pw\n")?;
            child.wait_with_output()
        })
        .unwrap();
    let log = fs::read_to_string(tmp.path().join("log")).unwrap_or_default();
    assert!(out.status.success(), "{log}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("Enter password"));
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("Sekr1t"),
        "echoed"
    );
    extract_ok(&stream, &tmp.path().join("x"));

    // Without a terminal: a usage error that says what to do instead, nothing done.
    let ckpt = tmp.path().join("ckpt");
    let out = Command::new("setsid")
        .arg("--wait")
        .arg(bin())
        .args(["backup", "--user", "bk", "-p", "--socket"])
        .arg(&server.socket)
        .arg("--checkpoint-dir")
        .arg(&ckpt)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("MYSQL_PWD"), "{}", stderr(&out));
    assert!(!ckpt.exists());
}

#[test]
fn skip_bootstrap_restores_the_files_and_prints_the_command_that_finishes() {
    let server = small_server();
    server.exec("SET GLOBAL gtid_slave_pos = '0-1-42'");
    let tmp = tempfile::tempdir().unwrap();
    let stream = tmp.path().join("b.tar");
    backup_ok(backup_cmd(&server, &[]), &stream, 0);
    let x = tmp.path().join("x");
    extract_ok(&stream, &x);
    let target = tmp.path().join("it's here");
    let out = Command::new(bin())
        .args(["copy-back", "--skip-bootstrap", "--backup-dir"])
        .arg(&x)
        .arg("--datadir")
        .arg(&target)
        .env("PATH", "/nonexistent") // no mariadbd on this host
        .output()
        .unwrap();
    let log = stderr(&out);
    assert!(out.status.success(), "{log}");
    assert!(!target.join("ibdata1").exists());
    // Run what it printed, as the DBA would on the database host (here as root: the test's
    // directories are not the mysql user's to enter).
    let line = log
        .lines()
        .find(|l| l.contains("--skip-bootstrap"))
        .unwrap();
    let command = line.split("as root, run: ").nth(1).unwrap();
    let command = command
        .split_once(" && ")
        .unwrap()
        .1
        .replace("--user=mysql", "--user=root");
    let done = Command::new("sh").arg("-c").arg(&command).output().unwrap();
    assert!(done.status.success(), "{command}: {}", stderr(&done));
    assert!(!target.join("myrocks_hotbackup_innodb.sql").exists());
    let copy = Server::start_on(&target, &[]);
    assert_eq!(copy.logged_errors(), Vec::<String>::new());
    assert_eq!(copy.value("SELECT @@gtid_slave_pos"), "0-1-42");
    assert_eq!(copy.value("SELECT COUNT(*) FROM app.t"), "1000");
}
