//! Helpers for tests that back up and restore real servers.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use sandbox::Server;

use super::{bin, require, run_ok};

/// `backup` against `server` over its socket, with extra arguments.
pub fn backup_cmd(server: &Server, args: &[&str]) -> Command {
    let mut cmd = Command::new(bin());
    cmd.arg("backup")
        .arg("--socket")
        .arg(&server.socket)
        .args(["--user", "root"])
        .args(args);
    cmd
}

/// Runs a backup into `out`, reading the stream at most `bytes_per_sec` (0: no limit).
/// Returns the process output (stderr and status).
pub fn run_backup(mut cmd: Command, out: &Path, bytes_per_sec: u64) -> Output {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stream = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let err_reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        stderr.read_to_end(&mut s).unwrap();
        s
    });
    let mut file = File::create(out).unwrap();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = stream.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        file.write_all(&buf[..n]).unwrap();
        if bytes_per_sec > 0 {
            std::thread::sleep(Duration::from_secs_f64(n as f64 / bytes_per_sec as f64));
        }
    }
    let status = child.wait().unwrap();
    Output {
        status,
        stdout: Vec::new(),
        stderr: err_reader.join().unwrap(),
    }
}

/// Like [`run_backup`], asserting success.
pub fn backup_ok(cmd: Command, out: &Path, bytes_per_sec: u64) -> String {
    let res = run_backup(cmd, out, bytes_per_sec);
    let stderr = String::from_utf8_lossy(&res.stderr).into_owned();
    assert!(
        res.status.success(),
        "backup failed ({}):\n{stderr}",
        res.status
    );
    stderr
}

/// Extracts a stream with our `extract`, `mbstream -x` or `tar -x`.
pub fn extract_with(tool: &str, stream: &Path, target: &Path) {
    fs::create_dir_all(target).unwrap();
    match tool {
        "ours" => {
            run_ok(
                Command::new(bin())
                    .arg("extract")
                    .arg("-C")
                    .arg(target)
                    .arg(stream),
            );
        }
        "mbstream" => {
            run_ok(
                Command::new(require("mbstream"))
                    .arg("-x")
                    .arg("-C")
                    .arg(target)
                    .stdin(File::open(stream).unwrap()),
            );
        }
        "tar" => {
            run_ok(
                Command::new(require("tar"))
                    .arg("-xf")
                    .arg(stream)
                    .arg("-C")
                    .arg(target),
            );
        }
        other => panic!("unknown extractor {other}"),
    }
}

/// `move-back` of an extracted backup into a new datadir.
pub fn move_back(backup: &Path, datadir: &Path) -> Output {
    Command::new(bin())
        .arg("move-back")
        .arg("--backup-dir")
        .arg(backup)
        .arg("--datadir")
        .arg(datadir)
        .output()
        .unwrap()
}

/// `move-back` or `copy-back` (`command`) of `backup` into `datadir` with extra arguments,
/// asserting success. Returns its log.
pub fn restore_ok(command: &str, backup: &Path, datadir: &Path, args: &[&str]) -> String {
    let out = Command::new(bin())
        .arg(command)
        .arg("--backup-dir")
        .arg(backup)
        .arg("--datadir")
        .arg(datadir)
        .args(args)
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "{command} failed ({}):\n{log}",
        out.status
    );
    log
}

/// The backup's manifest, parsed.
pub fn manifest(backup_dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&fs::read(backup_dir.join("myrocks_hotbackup.json")).unwrap()).unwrap()
}

/// Directories left in a checkpoint directory (there should be none after a run).
pub fn leftovers(dir: &Path) -> Vec<PathBuf> {
    fs::read_dir(dir)
        .map(|rd| rd.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default()
}

/// Starts a backup that waits at the debug signal file, and returns once it waits there.
pub fn backup_paused_before_consistent_point(server: &Server, signal: &Path, out: &Path) -> Child {
    let mut cmd = backup_cmd(server, &["--debug-signal-file", signal.to_str().unwrap()]);
    cmd.stdout(File::create(out).unwrap());
    spawn_until_waiting(cmd)
}

/// Starts a backup given `--debug-signal-file`, and returns once it waits there.
pub fn spawn_until_waiting(mut cmd: Command) -> Child {
    let mut child = cmd.stderr(Stdio::piped()).spawn().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let mut seen = Vec::new();
    let mut byte = [0u8; 1];
    while !String::from_utf8_lossy(&seen).contains("Waiting until") {
        assert_eq!(
            stderr.read(&mut byte).unwrap(),
            1,
            "backup ended early: {}",
            String::from_utf8_lossy(&seen)
        );
        seen.push(byte[0]);
    }
    // Keep draining stderr so the backup never blocks on it.
    std::thread::spawn(move || std::io::copy(&mut stderr, &mut std::io::sink()));
    child
}

/// A tmpfs of `mib` MiB mounted for the test, unmounted when dropped.
pub struct Mount(pub PathBuf);

impl Mount {
    pub fn tmpfs(at: &Path, mib: u64) -> Mount {
        assert!(
            unsafe { libc::geteuid() } == 0,
            "this test mounts a small tmpfs and must run as root"
        );
        fs::create_dir_all(at).unwrap();
        run_ok(
            Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
                .arg(at),
        );
        Mount(at.to_path_buf())
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Makes a server started on a restored datadir replicate from `source` from the
/// backup's GTID, and checks that it converges to the source's checksums.
pub fn assert_replicates_from_backup_gtid(copy: &Server, source: &Server, gtid: &str) {
    sandbox::workload::assert_bank_consistent(copy);
    catch_up_from(copy, source, gtid);
    assert_eq!(copy.checksums("bank"), source.checksums("bank"));
    assert_eq!(copy.logged_errors(), Vec::<String>::new());
}

/// Makes `copy` replicate from `source` from `gtid`, and waits until it has applied all
/// that `source` has written.
pub fn catch_up_from(copy: &Server, source: &Server, gtid: &str) {
    copy.exec(&format!(
        "SET GLOBAL gtid_slave_pos = '{gtid}';
         CHANGE MASTER TO MASTER_HOST = '127.0.0.1', MASTER_PORT = {}, MASTER_USER = 'root', MASTER_USE_GTID = slave_pos;
         START SLAVE",
        source.port
    ));
    let end = source.value("SELECT @@gtid_binlog_pos");
    assert_eq!(
        copy.value(&format!("SELECT MASTER_GTID_WAIT('{end}', 120)")),
        "0",
        "the restored copy did not catch up from {gtid}"
    );
}
