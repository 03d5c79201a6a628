//! The main job end to end on throwaway servers: load a MyRocks database, keep writing to it,
//! back it up hot, extract and restore the backup into a second server, check that the copy
//! is consistent and equals the source at the recorded binary log coordinates (by
//! replicating from them), keep two backups in an incremental repository, undo a mistake by
//! a point-in-time restore from the archived binary logs, and print a short report. Run it
//! with `scripts/demo`.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sandbox::workload::{
    assert_bank_consistent, assert_mixed_consistent, load_bank, load_mixed_bank, Load,
};
use sandbox::Server;

fn tool() -> PathBuf {
    sandbox::built_binary("myrocks-hotbackup")
}

fn step(what: &str) {
    println!("==> {what}");
    std::io::stdout().flush().unwrap();
}

fn main() {
    let rows: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(400_000);
    let work = tempfile::Builder::new()
        .prefix("myrocks-demo-")
        .tempdir()
        .unwrap();

    step("starting a sandbox MariaDB server with MyRocks");
    let source = Server::start();
    step(&format!(
        "loading {rows} rows (about {} MiB) into RocksDB tables",
        (rows * 500) >> 20
    ));
    load_bank(&source, rows);
    step("and a mixed bank: accounts half in RocksDB, half in InnoDB");
    load_mixed_bank(&source, rows / 20);

    step("archiving the binary logs as they are written (binlog archive, a replica)");
    let archive = work.path().join("binlogs");
    let mut archiver = Command::new(tool())
        .args(["binlog", "archive", "--user", "root", "--socket"])
        .arg(&source.socket)
        .arg("--target-dir")
        .arg(&archive)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();

    step("starting 6 + 6 writers (transfers between accounts, across engines in the mixed bank)");
    let load = Load::start(&source);
    let mixed_load = Load::start_mixed(&source);
    std::thread::sleep(Duration::from_secs(1));

    step("hot backup | extract, while the writers keep going");
    let backup_dir = work.path().join("backup");
    let started = Instant::now();
    let mut backup = Command::new(tool())
        .args([
            "backup",
            "--stream",
            "xbstream",
            "--user",
            "root",
            "--interval",
            "5",
            "--socket",
        ])
        .arg(&source.socket)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let extract = Command::new(tool())
        .arg("extract")
        .arg("-C")
        .arg(&backup_dir)
        .stdin(backup.stdout.take().unwrap())
        .status()
        .unwrap();
    let backed_up = backup.wait().unwrap();
    let elapsed = started.elapsed();
    assert!(
        backed_up.success() && extract.success(),
        "backup or extract failed"
    );
    let commits_during = load.commits();

    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(backup_dir.join("myrocks_hotbackup.json")).unwrap())
            .unwrap();
    let bytes: u64 = manifest["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["size"].as_u64().unwrap())
        .sum();
    let gtid = manifest["backup"]["binlog"]["gtid_binlog_pos"]
        .as_str()
        .unwrap()
        .to_string();

    step("hot backup into a directory, zstd-compressed, with a JSON report; then verify it");
    let dir_backup = work.path().join("backup-dir");
    let report_path = work.path().join("report.json");
    let status = Command::new(tool())
        .args([
            "backup",
            "--compress",
            "--user",
            "root",
            "--progress",
            "none",
            "--socket",
        ])
        .arg(&source.socket)
        .arg("--target-dir")
        .arg(&dir_backup)
        .arg("--report")
        .arg(&report_path)
        .status()
        .unwrap();
    assert!(status.success(), "directory backup failed");
    let verified = Command::new(tool())
        .arg("verify")
        .arg(&dir_backup)
        .status()
        .unwrap();
    assert!(verified.success(), "verify failed");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&report_path).unwrap()).unwrap();

    step("two backups into an encrypted repository: the second stores only what changed");
    let repo = work.path().join("repo");
    let key = work.path().join("repo.key");
    let in_repo = |args: &[&str]| {
        let out = Command::new(tool())
            .args(args)
            .arg("--repo")
            .arg(&repo)
            .arg("--key-file")
            .arg(&key)
            .stderr(Stdio::inherit())
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?} failed");
        out
    };
    in_repo(&["repo", "init"]);
    let mut uploaded = Vec::new();
    for n in 1..=2 {
        let report = work.path().join(format!("repo-{n}.json"));
        in_repo(&[
            "backup",
            "--user",
            "root",
            "--progress",
            "none",
            "--socket",
            source.socket.to_str().unwrap(),
            "--report",
            report.to_str().unwrap(),
        ]);
        let r: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
        uploaded.push(r["repository"]["bytes_new"].as_u64().unwrap());
    }
    in_repo(&["verify", "--read-data"]);

    step("move-back into a new datadir and start a second server on it");
    let restored = work.path().join("restored");
    let status = Command::new(tool())
        .args(["move-back", "--backup-dir"])
        .arg(&backup_dir)
        .arg("--datadir")
        .arg(&restored)
        .status()
        .unwrap();
    assert!(status.success(), "move-back failed");
    let copy = Server::start_on(&restored, &["--skip-slave-start"]);
    let errors = copy.logged_errors();
    assert!(
        errors.is_empty(),
        "the restored server logged errors: {errors:?}"
    );

    step("verifying: every transaction all-or-nothing in the copy, across engines too");
    assert_bank_consistent(&copy);
    assert_mixed_consistent(&copy);

    step(&format!(
        "verifying: replicate from the recorded GTID {gtid}, then compare checksums"
    ));
    copy.exec(&format!(
        "SET GLOBAL gtid_slave_pos = '{gtid}';
         CHANGE MASTER TO MASTER_HOST = '127.0.0.1', MASTER_PORT = {}, MASTER_USER = 'root', MASTER_USE_GTID = slave_pos;
         START SLAVE",
        source.port
    ));
    let commits = load.stop() + mixed_load.stop();
    let end = source.value("SELECT @@gtid_binlog_pos");
    assert_eq!(
        copy.value(&format!("SELECT MASTER_GTID_WAIT('{end}', 300)")),
        "0",
        "the copy did not catch up"
    );
    for db in ["bank", "mixed"] {
        assert_eq!(
            copy.checksums(db),
            source.checksums(db),
            "the copy differs from the source in {db}"
        );
    }

    step("a mistake (DELETE FROM bank.ledger); then the directory backup restored with the archived binary logs up to just before it");
    let sums = (source.checksums("bank"), source.checksums("mixed"));
    source.exec("DELETE FROM bank.ledger");
    let archived_to = |gtid: &str| {
        let out = Command::new(tool())
            .args(["binlog", "list", "--json", "--target-dir"])
            .arg(&archive)
            .output()
            .unwrap();
        let listing: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        listing["ranges"][0]["end_gtid"] == gtid
    };
    let after_mistake = source.value("SELECT @@gtid_binlog_pos");
    while !archived_to(&after_mistake) {
        std::thread::sleep(Duration::from_millis(100));
    }
    unsafe { libc::kill(archiver.id() as i32, libc::SIGTERM) };
    assert!(archiver.wait().unwrap().success(), "the archiver failed");
    let pitr = work.path().join("pitr");
    let out = Command::new(tool())
        .args(["copy-back", "--backup-dir"])
        .arg(&dir_backup)
        .arg("--datadir")
        .arg(&pitr)
        .arg("--binlog-dir")
        .arg(&archive)
        .args(["--until-gtid", &end])
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "point-in-time copy-back failed: {log}"
    );
    let replayed = log
        .lines()
        .find(|l| l.contains("Replayed "))
        .map(|l| l.split(" INFO ").nth(1).unwrap_or(l).to_string())
        .unwrap_or_default();
    let recovered = Server::start_on(&pitr, &[]);
    assert_eq!(
        (recovered.checksums("bank"), recovered.checksums("mixed")),
        sums,
        "the point-in-time copy differs from the source before the mistake"
    );
    recovered.stop();

    let mib = bytes as f64 / (1 << 20) as f64;
    println!();
    println!("Report");
    println!(
        "  backed up            {mib:.1} MiB, {} files, in {:.2} s ({:.0} MiB/s)",
        manifest["files"].as_array().unwrap().len(),
        elapsed.as_secs_f64(),
        mib / elapsed.as_secs_f64()
    );
    println!(
        "  checkpoint rounds    {}",
        manifest["backup"]["rounds"].as_array().unwrap().len()
    );
    println!(
        "  commits blocked      {:.1} ms (BACKUP STAGE BLOCK_COMMIT to END)",
        manifest["backup"]["commit_stall_ms"].as_f64().unwrap()
    );
    println!(
        "  binlog coordinates   {}:{} GTID {gtid}",
        manifest["backup"]["binlog"]["file"].as_str().unwrap(),
        manifest["backup"]["binlog"]["position"]
    );
    println!(
        "  writes               {commits_during} transactions during the backup, {commits} in all"
    );
    println!(
        "  restored copy        consistent; replicated from its coordinates to equal checksums"
    );
    println!(
        "  directory backup     {:.1} MiB stored as {:.1} MiB (zstd, ratio {:.2}) in {:.2} s, {:.2} CPU s; verified",
        report["bytes"].as_f64().unwrap() / (1 << 20) as f64,
        report["stored_bytes"].as_f64().unwrap() / (1 << 20) as f64,
        report["compression_ratio"].as_f64().unwrap(),
        report["duration_secs"].as_f64().unwrap(),
        report["cpu_secs"].as_f64().unwrap()
    );
    println!(
        "  repository           first backup stored {:.1} MiB, the second {:.1} MiB; verified",
        uploaded[0] as f64 / (1 << 20) as f64,
        uploaded[1] as f64 / (1 << 20) as f64
    );
    println!("  point in time        {replayed}; equal to the source before the DELETE");
    println!("OK");
}
