//! Workloads for a sandbox server: a bank whose invariants prove a copy is transactionally
//! consistent, writers that keep it busy, and a probe that measures how long single-row
//! commits wait (the commit stall a backup causes).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mysql::prelude::Queryable;

use crate::Server;

pub const ACCOUNTS: u64 = 2000;
pub const INITIAL_BALANCE: u64 = 1000;
pub const WRITERS: u64 = 6;

/// Creates the `bank` database: accounts, a ledger, per-writer counters, and `filler_rows`
/// rows of 500 random bytes (loaded in many small transactions, as real data arrives).
pub fn load_bank(server: &Server, filler_rows: u64) {
    server.exec(&format!(
        "CREATE DATABASE bank; USE bank;
         CREATE TABLE accounts (id INT PRIMARY KEY, balance BIGINT NOT NULL) ENGINE=ROCKSDB;
         CREATE TABLE ledger (id BIGINT AUTO_INCREMENT PRIMARY KEY, src INT, dst INT, writer INT, note VARCHAR(200)) ENGINE=ROCKSDB;
         CREATE TABLE counters (writer INT PRIMARY KEY, n BIGINT NOT NULL) ENGINE=ROCKSDB;
         CREATE TABLE filler (id INT PRIMARY KEY, pad VARBINARY(600)) ENGINE=ROCKSDB;
         INSERT INTO accounts SELECT seq, {INITIAL_BALANCE} FROM seq_1_to_{ACCOUNTS};
         INSERT INTO counters SELECT seq, 0 FROM seq_1_to_{WRITERS};"
    ));
    let batch = 5000;
    let mut conn = server.conn();
    conn.query_drop("USE bank").unwrap();
    for start in (0..filler_rows).step_by(batch as usize) {
        let n = batch.min(filler_rows - start);
        conn.query_drop(format!(
            "INSERT INTO filler SELECT seq + {start}, RANDOM_BYTES(500) FROM seq_1_to_{n}"
        ))
        .unwrap();
    }
}

/// Runs `sql` (several statements) and returns the first error of any of them: the server
/// stops a batch at its first error, and only reading every result set shows it.
fn run_batch(conn: &mut mysql::Conn, sql: &str) -> mysql::Result<()> {
    let mut result = conn.query_iter(sql)?;
    while let Some(set) = result.iter() {
        for row in set {
            row?;
        }
    }
    Ok(())
}

/// Writers moving money between accounts; each transfer also logs a ledger row and bumps
/// its writer's counter, all in one transaction.
pub struct Load {
    stop: Arc<AtomicBool>,
    commits: Arc<AtomicU64>,
    threads: Vec<JoinHandle<()>>,
}

/// One transfer of the bank: from account `lo` to `hi`, by writer `w`.
fn bank_transfer(w: u64, lo: u64, hi: u64) -> String {
    format!(
        "START TRANSACTION;
         UPDATE accounts SET balance = balance - 1 WHERE id = {lo};
         UPDATE accounts SET balance = balance + 1 WHERE id = {hi};
         INSERT INTO ledger (src, dst, writer, note) VALUES ({lo}, {hi}, {w}, REPEAT('x', 150));
         UPDATE counters SET n = n + 1 WHERE writer = {w};
         COMMIT"
    )
}

/// Creates the `mixed` database, a bank whose accounts live half in RocksDB
/// (`rocks_accounts`, ids 1 to 1000) and half in InnoDB (`inno_accounts`, 1001 to 2000).
/// InnoDB also holds a ledger with a foreign key to its accounts, whose trigger counts each
/// writer's rows in `inno_totals`, and `filler_rows` rows of 500 random bytes.
pub fn load_mixed_bank(server: &Server, filler_rows: u64) {
    let half = ACCOUNTS / 2;
    // One statement at a time: in one batch, the server takes the ledger for a RocksDB
    // table (and refuses its foreign key).
    let statements = format!(
        "CREATE TABLE rocks_accounts (id INT PRIMARY KEY, balance BIGINT NOT NULL) ENGINE=ROCKSDB;
         CREATE TABLE rocks_counters (writer INT PRIMARY KEY, n BIGINT NOT NULL) ENGINE=ROCKSDB;
         CREATE TABLE inno_accounts (id INT PRIMARY KEY, balance BIGINT NOT NULL, owner VARCHAR(40) CHARACTER SET utf8mb4) ENGINE=InnoDB;
         CREATE TABLE inno_ledger (id BIGINT AUTO_INCREMENT PRIMARY KEY, account INT NOT NULL, writer INT NOT NULL,
           amount INT NOT NULL, at DATETIME(6) NOT NULL, KEY (writer),
           FOREIGN KEY (account) REFERENCES inno_accounts (id)) ENGINE=InnoDB;
         CREATE TABLE inno_totals (writer INT PRIMARY KEY, n BIGINT NOT NULL) ENGINE=InnoDB;
         CREATE TRIGGER count_ledger AFTER INSERT ON inno_ledger FOR EACH ROW
           UPDATE inno_totals SET n = n + 1 WHERE writer = NEW.writer;
         CREATE TABLE inno_filler (id INT PRIMARY KEY, pad VARBINARY(600), KEY (pad(8))) ENGINE=InnoDB
           PARTITION BY HASH (id) PARTITIONS 4;
         INSERT INTO rocks_accounts SELECT seq, {INITIAL_BALANCE} FROM seq_1_to_{half};
         INSERT INTO inno_accounts SELECT seq, {INITIAL_BALANCE}, CONCAT('ówner ', seq) FROM seq_{}_to_{ACCOUNTS};
         INSERT INTO rocks_counters SELECT seq, 0 FROM seq_1_to_{WRITERS};
         INSERT INTO inno_totals SELECT seq, 0 FROM seq_1_to_{WRITERS}",
        half + 1
    );
    server.exec("CREATE DATABASE mixed");
    for statement in statements.split(";\n") {
        server.exec(&format!("USE mixed; {statement}"));
    }
    let mut conn = server.conn();
    conn.query_drop("USE mixed").unwrap();
    for start in (0..filler_rows).step_by(5000) {
        let n = 5000.min(filler_rows - start);
        conn.query_drop(format!(
            "INSERT INTO inno_filler SELECT seq + {start}, RANDOM_BYTES(500) FROM seq_1_to_{n}"
        ))
        .unwrap();
    }
}

/// One transfer of the mixed bank: between a RocksDB and an InnoDB account, with the
/// InnoDB ledger row (and its trigger) and the RocksDB counter, in one transaction.
fn mixed_transfer(w: u64, lo: u64, hi: u64) -> String {
    let half = ACCOUNTS / 2;
    let rocks = 1 + lo % half;
    let inno = half + 1 + hi % half;
    let amount = if (lo + hi).is_multiple_of(2) { 1 } else { -1 };
    format!(
        "START TRANSACTION;
         UPDATE rocks_accounts SET balance = balance - ({amount}) WHERE id = {rocks};
         UPDATE inno_accounts SET balance = balance + ({amount}) WHERE id = {inno};
         INSERT INTO inno_ledger (account, writer, amount, at) VALUES ({inno}, {w}, {amount}, NOW(6));
         UPDATE rocks_counters SET n = n + 1 WHERE writer = {w};
         COMMIT"
    )
}

/// Panics unless the mixed bank's invariants hold across both engines: every transfer
/// whole on both sides, every ledger row counted by the trigger and by the RocksDB counter.
pub fn assert_mixed_consistent(server: &Server) {
    assert_eq!(
        server.value(
            "SELECT (SELECT SUM(balance) FROM mixed.rocks_accounts) + (SELECT SUM(balance) FROM mixed.inno_accounts)"
        ),
        (ACCOUNTS * INITIAL_BALANCE).to_string(),
        "money appeared or vanished: a cross-engine transaction was copied in part"
    );
    for w in 1..=WRITERS {
        let ledger = server.value(&format!(
            "SELECT COUNT(*) FROM mixed.inno_ledger WHERE writer = {w}"
        ));
        assert_eq!(
            ledger,
            server.value(&format!(
                "SELECT n FROM mixed.rocks_counters WHERE writer = {w}"
            )),
            "InnoDB's ledger and RocksDB's counters disagree: a transaction was copied in part"
        );
        assert_eq!(
            ledger,
            server.value(&format!(
                "SELECT n FROM mixed.inno_totals WHERE writer = {w}"
            )),
            "the ledger and its trigger's totals disagree"
        );
    }
}

impl Load {
    pub fn start(server: &Server) -> Load {
        Load::start_with(server, "bank", bank_transfer)
    }

    /// Writers on the mixed bank ([`load_mixed_bank`]).
    pub fn start_mixed(server: &Server) -> Load {
        Load::start_with(server, "mixed", mixed_transfer)
    }

    fn start_with(server: &Server, db: &str, transfer: fn(u64, u64, u64) -> String) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let commits = Arc::new(AtomicU64::new(0));
        let threads = (1..=WRITERS)
            .map(|w| {
                let (stop, commits) = (stop.clone(), commits.clone());
                let mut conn = mysql::Conn::new(server.opts("root").db_name(Some(db))).unwrap();
                std::thread::spawn(move || {
                    let mut i: u64 = w * 7919;
                    while !stop.load(Ordering::Relaxed) {
                        i = i
                            .wrapping_mul(6364136223846793005)
                            .wrapping_add(1442695040888963407);
                        let (a, b) = (1 + (i >> 33) % ACCOUNTS, 1 + (i >> 13) % ACCOUNTS);
                        let (lo, hi) = (a.min(b), a.max(b));
                        if lo == hi {
                            continue;
                        }
                        match run_batch(&mut conn, &transfer(w, lo, hi)) {
                            Ok(()) => {
                                commits.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(_) => conn.query_drop("ROLLBACK").unwrap(),
                        }
                    }
                })
            })
            .collect();
        Load {
            stop,
            commits,
            threads,
        }
    }

    /// Transactions committed so far.
    pub fn commits(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
    }

    /// Stops the writers and returns the number of committed transactions.
    pub fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().unwrap();
        }
        self.commits.load(Ordering::Relaxed)
    }
}

/// Panics unless the bank's invariants hold: no money created or lost, every transfer
/// with its ledger row and counter. A copy that holds part of a transaction breaks them.
pub fn assert_bank_consistent(server: &Server) {
    assert_eq!(
        server.value("SELECT SUM(balance) FROM bank.accounts"),
        (ACCOUNTS * INITIAL_BALANCE).to_string(),
        "money appeared or vanished: a transaction was copied in part"
    );
    for w in 1..=WRITERS {
        assert_eq!(
            server.value(&format!(
                "SELECT COUNT(*) FROM bank.ledger WHERE writer = {w}"
            )),
            server.value(&format!("SELECT n FROM bank.counters WHERE writer = {w}")),
            "ledger and counters disagree: a transaction was copied in part"
        );
    }
}

/// A steady stream of single-row commits, recording the longest wait of any of them.
pub struct StallProbe {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Duration>,
}

impl StallProbe {
    pub fn start(server: &Server) -> StallProbe {
        server.exec(
            "CREATE DATABASE IF NOT EXISTS probe;
             CREATE TABLE IF NOT EXISTS probe.t (id BIGINT AUTO_INCREMENT PRIMARY KEY, at TIMESTAMP(6)) ENGINE=ROCKSDB",
        );
        let stop = Arc::new(AtomicBool::new(false));
        let mut conn = mysql::Conn::new(server.opts("root").db_name(Some("probe"))).unwrap();
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut longest = Duration::ZERO;
            while !flag.load(Ordering::Relaxed) {
                let start = Instant::now();
                conn.query_drop("INSERT INTO t (at) VALUES (NOW(6))")
                    .unwrap();
                longest = longest.max(start.elapsed());
                std::thread::sleep(Duration::from_millis(2));
            }
            longest
        });
        StallProbe { stop, thread }
    }

    /// Stops the probe and returns the longest commit.
    pub fn stop(self) -> Duration {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}
