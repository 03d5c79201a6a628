//! Repositories of incremental backups: into a real S3 store (SeaweedFS) and into a
//! directory. Snapshots restore into servers that replicate from their coordinates; SSTs
//! are uploaded once; concurrent backups and prunes, killed backups, a store that goes
//! down, damaged objects and a wrong key behave.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use sandbox::s3::S3;
use sandbox::workload::{load_bank, Load};
use sandbox::Server;

use crate::common::bin;
use crate::common::db::{assert_replicates_from_backup_gtid, leftovers};

/// A repository and how to reach it.
struct Repo {
    url: String,
    key: PathBuf,
    env: Vec<(String, String)>,
}

impl Repo {
    fn s3(s3: &S3, prefix: &str, key: &Path) -> Repo {
        Repo {
            url: s3.url(prefix),
            key: key.to_path_buf(),
            env: s3.env(),
        }
    }

    fn dir(path: &Path, key: &Path) -> Repo {
        Repo {
            url: path.display().to_string(),
            key: key.to_path_buf(),
            env: Vec::new(),
        }
    }

    /// `myrocks-hotbackup ARGS --repo URL --key-file KEY`.
    fn cmd(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(bin());
        cmd.args(args)
            .args(["--repo", &self.url, "--key-file"])
            .arg(&self.key)
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd
    }

    fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "{args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn backup_cmd(&self, server: &Server, args: &[&str]) -> Command {
        let mut cmd = self.cmd(&["backup"]);
        cmd.arg("--socket")
            .arg(&server.socket)
            .args(["--user", "root"])
            .args(args);
        cmd
    }

    /// Backs up `server`; returns the snapshot id and the `--report`.
    fn backup(&self, server: &Server, report: &Path, args: &[&str]) -> (String, serde_json::Value) {
        let out = self
            .backup_cmd(server, args)
            .arg("--report")
            .arg(report)
            .output()
            .unwrap();
        let log = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "backup failed: {log}");
        let id = String::from_utf8(out.stdout).unwrap().trim().to_string();
        assert_eq!(id.len(), 16, "the snapshot id on stdout: {id:?}");
        let report: serde_json::Value = serde_json::from_slice(&fs::read(report).unwrap()).unwrap();
        (id, report)
    }

    fn snapshots(&self) -> Vec<serde_json::Value> {
        let out = self.ok(&["snapshots", "--json"]);
        serde_json::from_str::<serde_json::Value>(&out)
            .unwrap()
            .as_array()
            .unwrap()
            .clone()
    }

    /// Restores snapshot `id` (chosen by `select`, `--snapshot ID` when empty), starts a
    /// server on it and checks it replicates from its GTID.
    fn restore_and_replicate(&self, id: &str, select: &[&str], datadir: &Path, source: &Server) {
        let mut args = vec!["restore", "--datadir", datadir.to_str().unwrap()];
        match select.is_empty() {
            true => args.extend(["--snapshot", id]),
            false => args.extend(select),
        }
        self.ok(&args);
        let gtid = self
            .snapshots()
            .into_iter()
            .find(|s| s["id"] == id)
            .unwrap()["gtid"]
            .as_str()
            .unwrap()
            .to_string();
        let copy = Server::start_on(datadir, &["--skip-slave-start"]);
        assert_replicates_from_backup_gtid(&copy, source, &gtid);
    }
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Writes a key file the way an operator would (umask 077).
fn key_file(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}

/// Updates `percent` % of the filler rows (a run of them, as recent rows are the ones
/// that change), then flushes the memtable into new SSTs.
fn churn(server: &Server, rows: u64, percent: u64) {
    let n = rows * percent / 100;
    let first = rows / 3;
    server.exec(&format!(
        "SET SESSION rocksdb_max_row_locks = 10000000;
         UPDATE bank.filler SET pad = RANDOM_BYTES(500) WHERE id BETWEEN {first} AND {};
         SET GLOBAL rocksdb_force_flush_memtable_now = 1",
        first + n - 1
    ));
}

/// A server whose SST files are as small, next to its data, as a production server's are
/// next to its terabytes: a compaction rewrites only the files its keys fall in.
fn server() -> Server {
    Server::start_with(&[
        "--rocksdb-default-cf-options=target_file_size_base=2m;write_buffer_size=8m",
    ])
}

#[test]
fn incremental_forever_into_s3_under_load_restores_both_snapshots() {
    let s3 = S3::start();
    let tmp = tempfile::tempdir().unwrap();
    let repo = Repo::s3(&s3, "fleet", &key_file(tmp.path(), "key"));
    let rows = 150_000;
    // Automatic compactions off: under the writers, level-0 files that span several tables
    // made a compaction rewrite a third of the data between the two backups in one run of
    // three (measured). Which SSTs RocksDB rewrites is its business; what this test checks
    // is that the backup uploads only the SSTs it does not hold.
    let source = Server::start_with(&[
        "--rocksdb-default-cf-options=target_file_size_base=2m;write_buffer_size=8m;disable_auto_compactions=true",
    ]);
    load_bank(&source, rows);
    // Settled, as a server long past its bulk load is: no compaction still rewriting it.
    source.exec("SET GLOBAL rocksdb_force_flush_memtable_now = 1; SET GLOBAL rocksdb_compact_cf = 'default'");
    let init = repo.run(&["repo", "init"]);
    assert!(init.status.success(), "{}", stderr(&init));
    assert!(
        stderr(&init).contains("Created a new key"),
        "{}",
        stderr(&init)
    );

    let load = Load::start(&source);
    std::thread::sleep(Duration::from_millis(300));
    let (first, r1) = repo.backup(&source, &tmp.path().join("r1.json"), &["--interval", "1"]);
    churn(&source, rows, 1);
    let (second, r2) = repo.backup(&source, &tmp.path().join("r2.json"), &[]);
    assert!(load.commits() > 0, "the load runs during the backups");

    // The second backup reads and uploads only what changed.
    let new1 = r1["repository"]["bytes_new"].as_u64().unwrap();
    let new2 = r2["repository"]["bytes_new"].as_u64().unwrap();
    let reused2 = r2["repository"]["bytes_reused"].as_u64().unwrap();
    assert!(new1 > 50 << 20, "{r1}");
    assert!(
        new2 * 20 <= new1,
        "the second uploaded {new2} of {new1} bytes: {r2}"
    );
    assert!(reused2 > 0, "{r2}");
    eprintln!(
        "first: {new1} bytes in {} s; second: {new2} bytes in {} s",
        r1["duration_secs"], r2["duration_secs"]
    );

    let listed = repo.snapshots();
    assert_eq!(listed.len(), 2, "{listed:?}");
    assert_eq!(listed[0]["id"], first.as_str());
    assert_eq!(listed[1]["id"], second.as_str());
    assert_eq!(listed[1]["gtid"], r2["gtid_binlog_pos"]);
    assert!(listed[0]["bytes_total"].as_u64().unwrap() > 50 << 20);
    let table = repo.ok(&["snapshots"]);
    assert!(table.contains(&first) && table.contains(&second), "{table}");
    repo.ok(&["verify", "--read-data"]);

    std::thread::sleep(Duration::from_millis(300));
    load.stop();
    for (id, name) in [(&first, "first"), (&second, "second")] {
        repo.restore_and_replicate(id, &[], &tmp.path().join(name), &source);
    }
    // Nothing of the staging left beside the datadirs.
    let left: Vec<String> = fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("restoring"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn two_servers_back_up_at_once_and_a_prune_during_a_backup_keeps_every_snapshot_whole() {
    let s3 = S3::start();
    let tmp = tempfile::tempdir().unwrap();
    let repo = Repo::s3(&s3, "", &key_file(tmp.path(), "key"));
    repo.ok(&["repo", "init"]);
    let (a, b) = (server(), server());
    load_bank(&a, 40_000);
    load_bank(&b, 40_000);
    let (load_a, load_b) = (Load::start(&a), Load::start(&b));

    // Both at once.
    let report = |n: &str| tmp.path().join(format!("{n}.json"));
    std::thread::scope(|s| {
        s.spawn(|| repo.backup(&a, &report("a1"), &[]));
        s.spawn(|| repo.backup(&b, &report("b1"), &[]));
    });
    let (a2, _) = repo.backup(&a, &report("a2"), &[]);
    assert_eq!(repo.snapshots().len(), 3);

    // B backs up slowly while A's older snapshot is forgotten and pruned.
    let mut slow = repo.backup_cmd(&b, &["--avg-mbytes-per-sec", "2", "--compress", "zstd:1"]);
    let slow = slow
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(3));
    let a_source = repo
        .snapshots()
        .into_iter()
        .find(|s| s["id"] == a2.as_str())
        .unwrap()["source"]
        .as_str()
        .unwrap()
        .to_string();
    let out = repo.run(&["forget", "--host", &a_source, "--keep-last", "1", "--prune"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let log = stderr(&out);
    assert!(log.contains("Forgot 1 snapshot"), "{log}");
    assert!(
        log.contains("kept for now"),
        "a backup runs: the trash waits: {log}"
    );
    let out = slow.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let b2 = String::from_utf8(out.stdout).unwrap().trim().to_string();
    // Now nothing runs: the next prune deletes what the forgotten snapshot alone used.
    let out = repo.run(&["prune"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        !stderr(&out).contains("Pruned 0 object"),
        "{}",
        stderr(&out)
    );

    load_a.stop();
    load_b.stop();
    let left = repo.snapshots();
    assert_eq!(left.len(), 3, "{left:?}");
    repo.ok(&["verify", "--read-data"]);
    let nowhere = tmp.path().join("nowhere");
    let out = repo.run(&[
        "restore",
        "--host",
        "nowhere",
        "--datadir",
        nowhere.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("no snapshot latest of nowhere"),
        "{}",
        stderr(&out)
    );
    repo.restore_and_replicate(&a2, &[], &tmp.path().join("a2"), &a);
    let b_source = left.iter().find(|s| s["id"] == b2.as_str()).unwrap()["source"]
        .as_str()
        .unwrap()
        .to_string();
    let latest_of_b = ["--snapshot", "latest", "--host", &b_source];
    repo.restore_and_replicate(&b2, &latest_of_b, &tmp.path().join("b2"), &b);
}

/// Waits until the backup stored four SSTs in the repository, then kills it.
fn kill_mid_upload(child: Child, repo_dir: Option<&Path>) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        std::thread::sleep(Duration::from_millis(200));
        let uploaded = repo_dir.is_none_or(|d| {
            crate::common::walk(&d.join("data"))
                .iter()
                .filter(|f| !f.contains(".partial-"))
                .count()
                >= 4
        });
        if uploaded || Instant::now() > deadline {
            break;
        }
    }
    let mut child = child;
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn a_killed_backup_leaves_no_snapshot_and_its_rerun_uploads_only_what_is_missing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("repo");
    let repo = Repo::dir(&dir, &key_file(tmp.path(), "key"));
    repo.ok(&["repo", "init"]);
    let source = server();
    load_bank(&source, 60_000);
    // Settled, then one small SST more: no compaction replaces files between the killed
    // run and its rerun (four files in level 0 would start one).
    source.exec(
        "SET GLOBAL rocksdb_force_flush_memtable_now = 1; SET GLOBAL rocksdb_compact_cf = 'default'",
    );
    churn(&source, 60_000, 5);
    let child = repo
        .backup_cmd(&source, &["--avg-mbytes-per-sec", "8", "--parallel", "2"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    kill_mid_upload(child, Some(&dir));
    assert!(
        repo.snapshots().is_empty(),
        "a killed backup commits nothing"
    );
    let (_, report) = repo.backup(&source, &tmp.path().join("r.json"), &[]);
    let reused = report["repository"]["bytes_reused"].as_u64().unwrap();
    let new = report["repository"]["bytes_new"].as_u64().unwrap();
    eprintln!("rerun: {reused} bytes reused, {new} bytes uploaded");
    assert!(
        reused > 2 << 20,
        "the rerun reuses what the killed run uploaded: {report}"
    );
    repo.ok(&["verify", "--read-data"]);
    // The lock of the killed run is stale only after ten minutes: a prune now keeps its
    // objects (they are used by the rerun anyway) and never fails.
    repo.ok(&["prune"]);
    repo.ok(&["verify", "--read-data"]);
}

#[test]
fn a_store_that_goes_down_mid_backup_fails_it_clearly_and_commits_nothing() {
    let mut s3 = S3::start();
    let tmp = tempfile::tempdir().unwrap();
    let mut repo = Repo::s3(&s3, "down", &key_file(tmp.path(), "key"));
    repo.env
        .push(("MYROCKS_HOTBACKUP_S3_RETRY_SECS".into(), "5".into()));
    repo.ok(&["repo", "init"]);
    let source = server();
    load_bank(&source, 60_000);
    let child = repo
        .backup_cmd(&source, &["--avg-mbytes-per-sec", "4"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(4));
    s3.stop();
    let started = Instant::now();
    let out = child.wait_with_output().unwrap();
    let log = stderr(&out);
    assert!(!out.status.success(), "{log}");
    assert!(
        started.elapsed() < Duration::from_secs(90),
        "gave up after {:?}",
        started.elapsed()
    );
    assert!(log.contains("s3://"), "the error names the store: {log}");
    assert!(!log.contains(&s3.secret_key), "no secret in the log");
    let checkpoints = source.datadir.join("#myrocks_hotbackup");
    assert!(
        leftovers(&checkpoints).is_empty(),
        "{:?}",
        leftovers(&checkpoints)
    );
    s3.restart();
    assert!(
        repo.snapshots().is_empty(),
        "no snapshot after a failed backup"
    );
    // An unreachable store: a clear error, at once for a wrong endpoint port.
    let mut gone = Repo::s3(&s3, "down", &repo.key);
    gone.env = vec![
        ("AWS_ENDPOINT_URL".into(), "http://127.0.0.1:9".into()),
        ("AWS_ACCESS_KEY_ID".into(), "x".into()),
        ("AWS_SECRET_ACCESS_KEY".into(), "y".into()),
        ("MYROCKS_HOTBACKUP_S3_RETRY_SECS".into(), "2".into()),
    ];
    let out = gone.run(&["snapshots"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
}

#[test]
fn damaged_and_missing_objects_are_named_and_refused_and_a_wrong_key_opens_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("repo");
    let repo = Repo::dir(&dir, &key_file(tmp.path(), "key"));
    repo.ok(&["repo", "init"]);
    let source = server();
    load_bank(&source, 20_000);
    source.exec(
        "CREATE DATABASE secretdb; CREATE TABLE secretdb.secrettable (id INT PRIMARY KEY, v TEXT) ENGINE=ROCKSDB;
         INSERT INTO secretdb.secrettable VALUES (1, 'secretvalue');
         SET GLOBAL rocksdb_force_flush_memtable_now = 1",
    );
    let (id, _) = repo.backup(&source, &tmp.path().join("r.json"), &[]);

    // Names say nothing, and neither do the bytes.
    let names = crate::common::walk(&dir);
    for name in &names {
        let ok = name == "config"
            || name.starts_with("snapshots/")
            || name.starts_with("packs/")
            || name.starts_with("data/");
        assert!(ok, "{name}");
        assert!(!name.contains("secret") && !name.contains("bank"), "{name}");
        let bytes = fs::read(dir.join(name)).unwrap();
        assert!(
            !bytes.windows(11).any(|w| w == b"secrettable"),
            "{name} holds a table name in clear"
        );
    }

    // A wrong key: refused, nothing read.
    let other = tmp.path().join("other-key");
    fs::write(&other, format!("{}\n", "ab".repeat(32))).unwrap();
    let wrong = Repo::dir(&dir, &other);
    let out = wrong.run(&["snapshots"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("is not the key of"),
        "{}",
        stderr(&out)
    );
    let out = Command::new(bin())
        .args(["snapshots", "--repo", dir.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("--key-file"), "{}", stderr(&out));

    // One SST object damaged, one pack deleted.
    let sst = names.iter().find(|n| n.starts_with("data/")).unwrap();
    let pack = names.iter().find(|n| n.starts_with("packs/")).unwrap();
    let path = dir.join(sst);
    let mut bytes = fs::read(&path).unwrap();
    let at = bytes.len() / 3;
    bytes[at] ^= 0x20;
    fs::write(&path, bytes).unwrap();
    fs::remove_file(dir.join(pack)).unwrap();

    let out = repo.run(&["verify", "--read-data", "--json"]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let problems = v["problems"].to_string();
    assert!(problems.contains(sst.as_str()), "{problems}");
    assert!(problems.contains(pack.as_str()), "{problems}");
    assert!(problems.contains("missing"), "{problems}");
    assert!(problems.contains("damaged"), "{problems}");
    // Without --read-data the missing pack is found, the flipped byte is not looked at.
    let out = repo.run(&["verify"]);
    assert_eq!(out.status.code(), Some(3));

    let target = tmp.path().join("restored");
    let out = repo.run(&[
        "restore",
        "--snapshot",
        &id,
        "--datadir",
        target.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(
        !target.exists() || fs::read_dir(&target).unwrap().next().is_none(),
        "a refused restore leaves the target empty"
    );
    let staging: Vec<_> = fs::read_dir(tmp.path())
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .contains("restoring")
        })
        .collect();
    assert!(staging.is_empty(), "the staging directory is removed");

    // Unencrypted, the CRCs of the manifest find the damage (in the compressed bytes).
    let plain_dir = tmp.path().join("plain");
    let out = Command::new(bin())
        .args([
            "repo",
            "init",
            "--no-encryption",
            "--repo",
            plain_dir.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let plain_cmd = |args: &[&str]| {
        Command::new(bin())
            .args(args)
            .args(["--repo", plain_dir.to_str().unwrap()])
            .output()
            .unwrap()
    };
    let out = Command::new(bin())
        .args(["backup", "--user", "root", "--socket"])
        .arg(&source.socket)
        .args(["--repo", plain_dir.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let sst = crate::common::walk(&plain_dir)
        .into_iter()
        .filter(|n| n.starts_with("data/"))
        .max_by_key(|n| fs::metadata(plain_dir.join(n)).unwrap().len())
        .unwrap();
    let path = plain_dir.join(&sst);
    let mut bytes = fs::read(&path).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x01;
    fs::write(&path, bytes).unwrap();
    let out = plain_cmd(&["verify", "--read-data"]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(stderr(&out).contains(&sst), "{}", stderr(&out));
    let target = tmp.path().join("restored-plain");
    let out = plain_cmd(&["restore", "--datadir", target.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
}
