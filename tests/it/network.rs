//! Backups over the network between two hosts made of network namespaces: `receive` on
//! one, `backup --to` on the other, under the bank workload; the original `--stream=wdt`
//! invocation and `clone` through a real sshd; a cut path and a killed sender that both
//! finish; a bit flipped in transit; strangers, wrong tokens, wrong keys and second senders
//! refused with nothing written.

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sandbox::net::{FlipRelay, Link, Sshd};
use sandbox::workload::{
    assert_bank_consistent, assert_mixed_consistent, load_bank, load_mixed_bank, Load,
};
use sandbox::Server;

use crate::common::db::*;
use crate::common::*;

/// A running `receive`: its URL (the one line of its stdout) and its log.
struct Receiving {
    stdout: BufReader<std::process::ChildStdout>,
    child: Child,
    url: String,
    log: Arc<Mutex<String>>,
}

fn receive(mut cmd: Command) -> Receiving {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let log = Arc::new(Mutex::new(String::new()));
    let stderr = child.stderr.take().unwrap();
    let sink = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(|l| l.ok()) {
            let mut log = sink.lock().unwrap();
            log.push_str(&line);
            log.push('\n');
        }
    });
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut url = String::new();
    stdout.read_line(&mut url).unwrap();
    assert!(
        url.starts_with("mhb://"),
        "receive printed {url:?}: {}",
        log.lock().unwrap()
    );
    Receiving {
        stdout,
        child,
        url: url.trim().to_string(),
        log,
    }
}

impl Receiving {
    /// The port of the URL.
    fn port(&self) -> u16 {
        let authority = self
            .url
            .trim_start_matches("mhb://")
            .split('/')
            .next()
            .unwrap();
        authority.rsplit(':').next().unwrap().parse().unwrap()
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    fn wait(mut self) -> (ExitStatus, String) {
        let mut rest = String::new();
        self.stdout.read_to_string(&mut rest).unwrap();
        assert!(
            rest.is_empty(),
            "receive printed more than its URL: {rest:?}"
        );
        let status = self.child.wait().unwrap();
        // The log thread ends with the pipe.
        std::thread::sleep(Duration::from_millis(100));
        (status, self.log())
    }

    fn wait_ok(self) -> String {
        let (status, log) = self.wait();
        assert!(status.success(), "receive failed ({status}):\n{log}");
        log
    }
}

fn receive_cmd(link: Option<&Link>, target: &Path, extra: &[&str]) -> Command {
    let mut cmd = match link {
        Some(link) => link.rx(bin()),
        None => Command::new(bin()),
    };
    let listen = link.map_or("127.0.0.1".to_string(), |l| l.rx_addr.to_string());
    cmd.args([
        "receive",
        "--target-dir",
        target.to_str().unwrap(),
        "--listen",
        &listen,
    ])
    .args(extra);
    cmd
}

/// `backup --to -` from the tx host (or this one), the URL given on its standard input.
fn send(link: Option<&Link>, server: &Server, url: &str, extra: &[&str]) -> Child {
    let mut cmd = match link {
        Some(link) => link.tx(bin()),
        None => Command::new(bin()),
    };
    cmd.args(["backup", "--user", "root", "--socket"])
        .arg(&server.socket)
        .args(["--to", "-"])
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    writeln!(stdin, "{url}").unwrap();
    child
}

fn finished(child: Child) -> (ExitStatus, String) {
    let out = child.wait_with_output().unwrap();
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn finished_ok(child: Child) -> String {
    let (status, log) = finished(child);
    assert!(status.success(), "backup failed ({status}):\n{log}");
    log
}

fn verify_ok(dir: &Path) {
    let out = Command::new(bin()).arg("verify").arg(dir).output().unwrap();
    assert!(
        out.status.success(),
        "verify {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Restores `backup`, starts it, makes it replicate from `source` from the backup's GTID,
/// and checks it converges.
fn assert_restores_and_replicates(backup: &Path, datadir: &Path, source: &Server) {
    restore_ok("copy-back", backup, datadir, &[]);
    let gtid = manifest(backup)["backup"]["binlog"]["gtid_binlog_pos"]
        .as_str()
        .unwrap()
        .to_string();
    let copy = Server::start_on(datadir, &[]);
    assert_replicates_from_backup_gtid(&copy, source, &gtid);
}

fn wait_converged(copy: &Server, source: &Server) {
    let end = source.value("SELECT @@gtid_binlog_pos");
    assert_eq!(
        copy.value(&format!("SELECT MASTER_GTID_WAIT('{end}', 120)")),
        "0",
        "the copy did not catch up with {end}: {:?}",
        copy.logged_errors()
    );
    assert_eq!(copy.checksums("bank"), source.checksums("bank"));
}

/// The report's network figures.
fn network_figures(report: &Path) -> serde_json::Value {
    let r: serde_json::Value = serde_json::from_slice(&fs::read(report).unwrap()).unwrap();
    r["network"].clone()
}

#[test]
fn backups_over_the_link_and_through_ssh_restore_and_replicate() {
    let source = Server::start();
    load_bank(&source, 40_000);
    let link = Link::new();
    let tmp = tempfile::tempdir().unwrap();
    let load = Load::start(&source);
    std::thread::sleep(Duration::from_millis(300));

    // backup --to, the URL read from standard input, over 4 connections.
    let dir = tmp.path().join("received");
    let receiver = receive(receive_cmd(Some(&link), &dir, &["--streams", "4"]));
    assert!(!receiver.url.contains("streams=8"), "{}", receiver.url);
    let report = tmp.path().join("report.json");
    let sender = send(
        Some(&link),
        &source,
        &receiver.url,
        &["--report", report.to_str().unwrap(), "--interval", "1"],
    );
    let log = finished_ok(sender);
    assert!(log.contains("backup completed OK!"), "{log}");
    assert!(log.contains("over 4 connections"), "{log}");
    assert!(
        !log.contains(&receiver.url[receiver.url.find("token=").unwrap()..]),
        "the token leaked into the log"
    );
    let rx_log = receiver.wait_ok();
    assert!(rx_log.contains("complete and verified"), "{rx_log}");
    let figures = network_figures(&report);
    assert_eq!(figures["streams"], 4, "{figures}");
    assert!(
        figures["bytes_sent"].as_u64().unwrap() > 1 << 20,
        "{figures}"
    );
    verify_ok(&dir);
    assert!(!dir.join(".myrocks_hotbackup.receiving").exists());

    // The original invocation: --stream=wdt starts the receiver over ssh.
    let sshd = Sshd::start(&link);
    let wdt_dir = tmp.path().join("wdt");
    let out = link
        .tx(bin())
        .args(["--stream=wdt", "--user=root", "--destination"])
        .arg(sshd.host())
        .arg("--backup_dir")
        .arg(&wdt_dir)
        .arg("--socket")
        .arg(&source.socket)
        .args([
            "--avg_mbytes_per_sec=200",
            "--extra_wdt_sender_options=-num_ports 4",
        ])
        .env(
            "MYROCKS_HOTBACKUP_SSH",
            format!("{} -l root", sshd.ssh_command()),
        )
        .env("MYROCKS_HOTBACKUP_REMOTE", bin())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "--stream=wdt failed:\n{log}\nsshd: {}",
        sshd.log()
    );
    assert!(
        log.contains("is ignored"),
        "the WDT option is named as ignored: {log}"
    );
    assert!(!log.contains("token="), "the token leaked: {log}");
    verify_ok(&wdt_dir);

    assert!(load.stop() > 0, "the load ran during the backups");
    assert_restores_and_replicates(&dir, &tmp.path().join("restored"), &source);
    assert_restores_and_replicates(&wdt_dir, &tmp.path().join("restored-wdt"), &source);
}

#[test]
fn clone_restores_on_the_other_host_and_writes_the_replica_set_up() {
    let source = Server::start();
    load_bank(&source, 30_000);
    // InnoDB tables too: their rows cross the link and are loaded on the other host.
    load_mixed_bank(&source, 2_000);
    let link = Link::new();
    let sshd = Sshd::start(&link);
    let tmp = tempfile::tempdir().unwrap();
    let load = Load::start(&source);
    std::thread::sleep(Duration::from_millis(300));
    let datadir = tmp.path().join("replica");
    let out = link
        .tx(bin())
        .args(["clone", "--user", "root", "--socket"])
        .arg(&source.socket)
        .args(["--to-host", &format!("root@{}", sshd.host())])
        .arg("--datadir")
        .arg(&datadir)
        .env("MYROCKS_HOTBACKUP_SSH", sshd.ssh_command())
        .env("MYROCKS_HOTBACKUP_REMOTE", bin())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "clone failed:\n{log}");
    assert!(log.contains("restored into"), "{log}");
    assert!(
        log.contains("START SLAVE"),
        "clone says what to do next: {log}"
    );
    assert!(load.stop() > 0);

    let setup = fs::read_to_string(tmp.path().join("replica-setup.sql")).unwrap();
    let staging = tmp.path().join("replica.receiving");
    let gtid = manifest(&staging)["backup"]["binlog"]["gtid_binlog_pos"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        setup.contains(&format!("SET GLOBAL gtid_slave_pos = '{gtid}';")),
        "{setup}"
    );
    assert!(
        setup.contains(&format!(
            "MASTER_HOST = '{}', MASTER_PORT = {}",
            link.tx_addr, source.port
        )),
        "{setup}"
    );
    // The replica runs the file as written; the source is reached here over loopback.
    let copy = Server::start_on(&datadir, &[]);
    assert_bank_consistent(&copy);
    assert_mixed_consistent(&copy);
    copy.exec(&setup);
    copy.exec("CHANGE MASTER TO MASTER_HOST = '127.0.0.1', MASTER_USER = 'root'; START SLAVE");
    wait_converged(&copy, &source);
    assert_eq!(copy.checksums("mixed"), source.checksums("mixed"));
}

/// A table of incompressible rows, so that transfers take a while on a shaped path.
fn load_filler(server: &Server, mib: u64) {
    server.exec("CREATE DATABASE IF NOT EXISTS filler");
    server.exec(
        "CREATE TABLE IF NOT EXISTS filler.f (id INT PRIMARY KEY, v VARBINARY(1024)) ENGINE=ROCKSDB",
    );
    let first = server.value("SELECT COALESCE(MAX(id), 0) FROM filler.f");
    server.exec(&format!(
        "INSERT INTO filler.f SELECT {first} + seq, RANDOM_BYTES(1024) FROM filler.seq_1_to_{}",
        mib * 1024
    ));
    server.exec("SET GLOBAL rocksdb_force_flush_memtable_now = 1");
}

fn bytes_under(dir: &Path) -> u64 {
    walk(dir)
        .iter()
        .filter_map(|p| fs::metadata(dir.join(p)).ok())
        .map(|m| m.len())
        .sum()
}

fn wait_for_bytes(dir: &Path, at_least: u64) {
    let start = Instant::now();
    while bytes_under(dir) < at_least {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the transfer did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Streams × window: what a sender may have to send again after a cut.
const RESEND_BOUND: u64 = 8 * (4 << 20);

#[test]
fn a_cut_link_and_a_killed_sender_both_finish_sending_little_twice() {
    let source = Server::start();
    load_bank(&source, 10_000);
    source.exec("SET GLOBAL rocksdb_force_flush_memtable_now = 1");
    load_filler(&source, 48);
    load_filler(&source, 48);
    let link = Link::new();
    link.shape(100);
    let tmp = tempfile::tempdir().unwrap();

    // The path goes silent for 10 s in the middle of the transfer (connections outlive
    // that; had they not, each would resend at most its unacknowledged window).
    let dir = tmp.path().join("cut");
    let receiver = receive(receive_cmd(Some(&link), &dir, &[]));
    let report = tmp.path().join("cut.json");
    let sender = send(
        Some(&link),
        &source,
        &receiver.url,
        &["--report", report.to_str().unwrap()],
    );
    wait_for_bytes(&dir, 20 << 20);
    link.cut();
    std::thread::sleep(Duration::from_secs(10));
    link.mend();
    finished_ok(sender);
    receiver.wait_ok();
    verify_ok(&dir);
    let figures = network_figures(&report);
    let resent = figures["bytes_resent"].as_u64().unwrap();
    eprintln!("cut for 10 s: {resent} bytes sent twice, {figures}");
    assert!(resent <= RESEND_BOUND, "{figures}");

    // A sender killed mid-transfer, run again against the same receiver.
    let dir = tmp.path().join("killed");
    let receiver = receive(receive_cmd(Some(&link), &dir, &[]));
    let first = send(Some(&link), &source, &receiver.url, &[]);
    wait_for_bytes(&dir, 30 << 20);
    let pid = first.id() as i32;
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let (status, _) = finished(first);
    assert!(!status.success());
    let report = tmp.path().join("rerun.json");
    let rerun = send(
        Some(&link),
        &source,
        &receiver.url,
        &["--report", report.to_str().unwrap()],
    );
    let log = finished_ok(rerun);
    assert!(log.contains("already holds"), "{log}");
    let rx_log = receiver.wait_ok();
    assert!(rx_log.contains("takes over"), "{rx_log}");
    verify_ok(&dir);
    let figures = network_figures(&report);
    let r: serde_json::Value = serde_json::from_slice(&fs::read(&report).unwrap()).unwrap();
    let stored = r["stored_bytes"].as_u64().unwrap();
    let held = figures["bytes_held"].as_u64().unwrap();
    let sent = figures["bytes_sent"].as_u64().unwrap();
    eprintln!("killed sender: rerun sent {sent} of {stored} bytes, {held} already held");
    assert!(
        held >= 20 << 20,
        "what arrived before the kill is not sent again: {figures}"
    );
    assert!(sent + held <= stored + RESEND_BOUND, "{figures}");

    // Both ends killed: a receiver started again on the directory keeps what its journal
    // holds (read and checked again) and offers the blocks of files cut short; a new
    // sender sends only the rest.
    let dir = tmp.path().join("both");
    let receiver = receive(receive_cmd(Some(&link), &dir, &[]));
    let first = send(Some(&link), &source, &receiver.url, &[]);
    wait_for_bytes(&dir, 60 << 20);
    unsafe { libc::kill(receiver.child.id() as i32, libc::SIGKILL) };
    unsafe { libc::kill(first.id() as i32, libc::SIGKILL) };
    let _ = finished(first);
    let (status, _) = receiver.wait();
    assert!(!status.success());
    let receiver = receive(receive_cmd(Some(&link), &dir, &[]));
    let report = tmp.path().join("both.json");
    let rerun = send(
        Some(&link),
        &source,
        &receiver.url,
        &["--report", report.to_str().unwrap()],
    );
    finished_ok(rerun);
    let rx_log = receiver.wait_ok();
    assert!(rx_log.contains("Resuming into"), "{rx_log}");
    verify_ok(&dir);
    let figures = network_figures(&report);
    eprintln!("both killed: {figures}");
    let r: serde_json::Value = serde_json::from_slice(&fs::read(&report).unwrap()).unwrap();
    let (held, sent) = (
        figures["bytes_held"].as_u64().unwrap(),
        figures["bytes_sent"].as_u64().unwrap(),
    );
    assert!(
        held >= 40 << 20,
        "what arrived is not sent again: {figures}"
    );
    assert!(
        sent + held <= r["stored_bytes"].as_u64().unwrap() + RESEND_BOUND,
        "{figures}"
    );
}

#[test]
fn a_bit_flipped_in_transit_is_detected_and_sent_again() {
    let source = Server::start();
    load_bank(&source, 20_000);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("flipped");
    let receiver = receive(receive_cmd(None, &dir, &[]));
    // The sender reaches the receiver only through the relay, which damages its first
    // connection once.
    let port = receiver.port();
    let relay = FlipRelay::start(([127, 0, 0, 1], port).into(), 256 << 10);
    let url = receiver
        .url
        .replace(&format!(":{port}/"), &format!(":{}/", relay.addr().port()));
    let report = tmp.path().join("report.json");
    let log = finished_ok(send(
        None,
        &source,
        &url,
        &["--streams", "2", "--report", report.to_str().unwrap()],
    ));
    assert!(relay.flipped(), "the relay flipped no bit");
    assert!(log.contains("reconnecting"), "{log}");
    // The damaged block, and what followed it unacknowledged, went again.
    let figures = network_figures(&report);
    let resent = figures["bytes_resent"].as_u64().unwrap();
    assert!(resent > 0 && resent <= 4 << 20, "{figures}");
    assert_eq!(figures["reconnects"], 1, "{figures}");
    let rx_log = receiver.wait_ok();
    assert!(rx_log.contains("lost a connection"), "{rx_log}");
    verify_ok(&dir);
}

#[test]
fn strangers_wrong_tokens_wrong_keys_and_second_senders_are_refused() {
    let source = Server::start();
    load_bank(&source, 10_000);
    load_filler(&source, 16);
    let tmp = tempfile::tempdir().unwrap();

    // Nobody comes: the receiver gives up, and says so.
    let lonely = receive(receive_cmd(
        None,
        &tmp.path().join("lonely"),
        &["--wait", "2"],
    ));
    let (status, log) = lonely.wait();
    assert!(!status.success());
    assert!(log.contains("no sender"), "{log}");

    let dir = tmp.path().join("target");
    let receiver = receive(receive_cmd(None, &dir, &[]));
    let port = receiver.port();
    // A stranger speaking no TLS.
    let mut stranger = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let _ = stranger.write_all(b"GET / HTTP/1.0\r\n\r\n");
    let mut answer = Vec::new();
    let _ = stranger.read_to_end(&mut answer);
    // A wrong token, and a receiver key that is not the one of the URL (a man in the middle).
    let token = &receiver.url[receiver.url.find("token=").unwrap() + 6..][..48];
    let wrong_token = receiver.url.replace(token, &"0".repeat(48));
    let (status, log) = finished(send(None, &source, &wrong_token, &[]));
    assert!(!status.success());
    assert!(log.contains("wrong session or token"), "{log}");
    let key = &receiver.url[receiver.url.find("key=").unwrap() + 4..][..64];
    let wrong_key = receiver.url.replace(key, &"a".repeat(64));
    let (status, log) = finished(send(None, &source, &wrong_key, &[]));
    assert!(!status.success());
    assert!(log.contains("not the one its URL names"), "{log}");
    assert_eq!(
        walk(&dir),
        vec![".myrocks_hotbackup.receiving".to_string()],
        "nothing written"
    );
    let rx_log = receiver.log();
    assert!(rx_log.contains("no valid TLS handshake"), "{rx_log}");
    assert!(rx_log.contains("wrong session or token"), "{rx_log}");

    // A second sender while the first transfers (slowly).
    let first = send(None, &source, &receiver.url, &["--avg-mbytes-per-sec", "1"]);
    wait_for_bytes(&dir, 1 << 20);
    let (status, log) = finished(send(None, &source, &receiver.url, &[]));
    assert!(!status.success(), "a second sender was let in:\n{log}");
    assert!(log.contains("another sender"), "{log}");
    finished_ok(first);
    receiver.wait_ok();
    verify_ok(&dir);
}

#[test]
fn a_full_disk_on_the_receiver_stops_both_ends_with_the_reason() {
    let source = Server::start();
    load_bank(&source, 40_000);
    let tmp = tempfile::tempdir().unwrap();
    let _mount = Mount::tmpfs(&tmp.path().join("small"), 2);
    let dir = tmp.path().join("small").join("target");
    let receiver = receive(receive_cmd(None, &dir, &[]));
    let (status, log) = finished(send(None, &source, &receiver.url, &["--compress"]));
    assert!(!status.success(), "{log}");
    assert!(log.contains("No space left on device"), "{log}");
    let (status, rx_log) = receiver.wait();
    assert!(!status.success(), "{rx_log}");
    assert!(rx_log.contains("No space left on device"), "{rx_log}");
    assert!(!dir.join("myrocks_hotbackup.json").exists());
}

#[test]
fn a_sender_stopped_while_its_receiver_hangs_exits_at_once() {
    let source = Server::start();
    load_bank(&source, 5_000);
    load_filler(&source, 64);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("hung");
    let receiver = receive(receive_cmd(None, &dir, &[]));
    let sender = send(None, &source, &receiver.url, &[]);
    wait_for_bytes(&dir, 1 << 20);
    // The receiver stops reading: every buffer of the sender ends up waiting for it.
    let rx = receiver.child.id() as i32;
    unsafe { libc::kill(rx, libc::SIGSTOP) };
    std::thread::sleep(Duration::from_secs(2));
    let started = Instant::now();
    unsafe { libc::kill(sender.id() as i32, libc::SIGTERM) };
    let (status, log) = finished(sender);
    let took = started.elapsed();
    unsafe { libc::kill(rx, libc::SIGKILL) };
    unsafe { libc::kill(rx, libc::SIGCONT) };
    let _ = receiver.wait();
    assert_eq!(status.code(), Some(130), "{log}");
    assert!(
        took < Duration::from_secs(12),
        "SIGTERM took {took:?} to end the backup:\n{log}"
    );
}
