//! The "zoo": one of every kind of object a MariaDB datadir holds beside RocksDB tables —
//! partitions, a trigger, a view, routines, an event, a user with grants, MyISAM, Aria
//! (crash-safe and not), CSV, ARCHIVE, MERGE, a sequence and persistent statistics — and
//! writers that keep the non-transactional ones busy, so a backup has to get each of them
//! right at its consistent point.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use mysql::prelude::Queryable;

use crate::Server;

/// The account created with `SELECT` on the zoo, and its password.
pub const READER: &str = "zoo_reader";
pub const READER_PASSWORD: &str = "zoo-pw";

/// Rows each table starts with; the writers update ids in `1..=INITIAL_ROWS`.
pub const INITIAL_ROWS: u64 = 500;

/// The first value of `zoo.seq`, above every id the writers and the initial rows use in
/// `zoo.my`, which takes its new ids from the sequence.
const SEQ_START: u64 = 1_000_000;

/// Tables `ANALYZE ... PERSISTENT FOR ALL` runs on, again and again, while the writers run.
/// Before each ANALYZE, the same connection adds a row to `analyzed`: no other connection
/// writes that table, so its statistics follow its rows exactly (see
/// [`assert_statistics_consistent`]). The other tables are written by another connection
/// while they are analysed.
pub const ANALYZED: &[&str] = &["analyzed", "my", "aria_t", "aria_nt", "m1"];

/// Tables whose statistics depend only on the statements before the ANALYZE in the binary
/// log: a replica that re-runs the replicated ANALYZE computes the same rows. `parted` and
/// `ranged` are analysed once, before any writer starts, and `analyzed` is written only by
/// the connection that analyses it.
///
/// The statistics of the other analysed tables legitimately differ on a replica. ANALYZE
/// reads one table after the other and is written to the binary log when it ends, so
/// writes of another connection that land after ANALYZE read a table, but before it ends,
/// precede the ANALYZE in the binary log: the replica's ANALYZE counts them, the source's
/// did not. (A RocksDB table is even read from a snapshot while others commit.)
pub const STABLE_STATISTICS: &[&str] = &["analyzed", "parted", "ranged"];

/// Creates the `zoo` database and its user, loads the ARCHIVE engine (recorded in
/// `mysql.plugin`, so a server started on a copy loads it too) and collects persistent
/// statistics.
pub fn create(server: &Server) {
    if server.value("SELECT COUNT(*) FROM information_schema.ENGINES WHERE ENGINE = 'ARCHIVE'")
        == "0"
    {
        server.exec("INSTALL SONAME 'ha_archive'");
    }
    server.exec(&format!(
        "CREATE DATABASE zoo; USE zoo;
         CREATE TABLE parted (id INT PRIMARY KEY, v INT NOT NULL, note VARCHAR(100)) ENGINE=ROCKSDB
           PARTITION BY HASH (id) PARTITIONS 4;
         CREATE TABLE ranged (id INT PRIMARY KEY, v INT NOT NULL) ENGINE=ROCKSDB
           PARTITION BY RANGE (id) (PARTITION p_low VALUES LESS THAN (10000),
                                    PARTITION p_high VALUES LESS THAN (1000000),
                                    PARTITION p_max VALUES LESS THAN MAXVALUE);
         CREATE TABLE my (id BIGINT PRIMARY KEY, v INT NOT NULL, note VARCHAR(100)) ENGINE=MyISAM;
         CREATE TABLE audit (id INT AUTO_INCREMENT PRIMARY KEY, what VARCHAR(20) NOT NULL, n BIGINT NOT NULL) ENGINE=MyISAM;
         CREATE TRIGGER my_audit AFTER INSERT ON my FOR EACH ROW INSERT INTO audit (what, n) VALUES ('my', NEW.id);
         CREATE TABLE aria_t (id INT PRIMARY KEY, v INT NOT NULL, note VARCHAR(100)) ENGINE=Aria TRANSACTIONAL=1;
         CREATE TABLE aria_nt (id INT PRIMARY KEY, v INT NOT NULL, note VARCHAR(100)) ENGINE=Aria TRANSACTIONAL=0;
         CREATE TABLE csv_t (id INT NOT NULL, v INT NOT NULL, note VARCHAR(100) NOT NULL) ENGINE=CSV;
         CREATE TABLE arch (id INT NOT NULL, note VARCHAR(100)) ENGINE=ARCHIVE;
         CREATE TABLE analyzed (id INT AUTO_INCREMENT PRIMARY KEY, v INT NOT NULL, KEY (v)) ENGINE=MyISAM;
         CREATE TABLE m1 (id INT NOT NULL, v INT NOT NULL, KEY (id)) ENGINE=MyISAM;
         CREATE TABLE m2 (id INT NOT NULL, v INT NOT NULL, KEY (id)) ENGINE=MyISAM;
         CREATE TABLE merged (id INT NOT NULL, v INT NOT NULL, KEY (id)) ENGINE=MERGE UNION=(m1, m2) INSERT_METHOD=LAST;
         CREATE SEQUENCE seq START WITH {SEQ_START} NOCACHE ENGINE=Aria;
         CREATE VIEW v_parted AS SELECT COUNT(*) AS n, SUM(v) AS total FROM parted;
         CREATE PROCEDURE bump(IN k INT) MODIFIES SQL DATA UPDATE parted SET v = v + 1 WHERE id = k;
         CREATE FUNCTION twice(x INT) RETURNS INT DETERMINISTIC RETURN 2 * x;
         CREATE EVENT ev ON SCHEDULE EVERY 1 HOUR STARTS '2037-01-01 00:00:00' DISABLE
           DO INSERT INTO zoo.audit (what, n) VALUES ('event', 0);
         CREATE USER '{READER}'@'localhost' IDENTIFIED BY '{READER_PASSWORD}';
         GRANT SELECT ON zoo.* TO '{READER}'@'localhost';
         INSERT INTO parted SELECT seq, seq, 'initial' FROM seq_1_to_{n};
         INSERT INTO ranged SELECT seq, seq FROM seq_1_to_{n};
         INSERT INTO my SELECT seq, seq, 'initial' FROM seq_1_to_{n};
         INSERT INTO aria_t SELECT seq, seq, 'initial' FROM seq_1_to_{n};
         INSERT INTO aria_nt SELECT seq, seq, 'initial' FROM seq_1_to_{n};
         INSERT INTO csv_t SELECT seq, seq, 'initial' FROM seq_1_to_{n};
         INSERT INTO arch SELECT seq, 'initial' FROM seq_1_to_{n};
         INSERT INTO analyzed (v) SELECT seq FROM seq_1_to_{n};
         INSERT INTO m1 SELECT seq, seq FROM seq_1_to_{n};
         INSERT INTO m2 SELECT seq + {n}, seq FROM seq_1_to_{n};",
        n = INITIAL_ROWS
    ));
    analyze(server, &["parted", "ranged"]);
    analyze(server, ANALYZED);
}

/// Panics unless the persistent statistics of `zoo.analyzed` match its rows: the analyser
/// adds a row, then analyses, so at any consistent point the recorded cardinality is the
/// row count or one less. Statistics copied at another moment than the table break it.
pub fn assert_statistics_consistent(server: &Server) {
    let rows: i64 = server
        .value("SELECT COUNT(*) FROM zoo.analyzed")
        .parse()
        .unwrap();
    let recorded = server.value(
        "SELECT cardinality FROM mysql.table_stats WHERE db_name = 'zoo' AND table_name = 'analyzed'",
    );
    assert!(
        recorded
            .parse::<i64>()
            .is_ok_and(|c| c == rows || c == rows - 1),
        "mysql.table_stats says zoo.analyzed has {recorded} rows, it has {rows}: \
         the statistics were copied at another point in time than the table"
    );
}

fn analyze(server: &Server, tables: &[&str]) {
    analyze_on(&mut server.conn(), tables).unwrap_or_else(|e| panic!("{e}"));
}

/// `ANALYZE TABLE ... PERSISTENT FOR ALL`, failing on an error row (ANALYZE reports most
/// errors as rows of its result, not as an error of the statement).
fn analyze_on(conn: &mut mysql::Conn, tables: &[&str]) -> Result<(), String> {
    let list: Vec<String> = tables.iter().map(|t| format!("zoo.{t}")).collect();
    let sql = format!("ANALYZE TABLE {} PERSISTENT FOR ALL", list.join(", "));
    let rows: Vec<(String, String, String, String)> =
        conn.query(&sql).map_err(|e| format!("{sql}: {e}"))?;
    match rows.iter().find(|r| r.2 == "error") {
        Some(bad) => Err(format!("{sql}: {bad:?}")),
        None => Ok(()),
    }
}

/// Writers for the zoo, run during a backup: one writes every table of the zoo (inserts and
/// updates; ARCHIVE takes inserts only), with a trigger firing, a procedure called and the
/// sequence advanced; one adds a row to `analyzed` and repeats `ANALYZE TABLE ...
/// PERSISTENT FOR ALL`. Every statement is binary-logged, so a replica of a copy ends equal
/// to the source (statistics aside: see [`STABLE_STATISTICS`]).
pub struct ZooWriters {
    stop: Arc<AtomicBool>,
    ops: Arc<AtomicU64>,
    threads: Vec<JoinHandle<Result<(), String>>>,
}

impl ZooWriters {
    pub fn start(server: &Server) -> ZooWriters {
        let stop = Arc::new(AtomicBool::new(false));
        let ops = Arc::new(AtomicU64::new(0));
        let connect = || mysql::Conn::new(server.opts("root").db_name(Some("zoo"))).unwrap();
        let tables = {
            let (stop, ops, mut conn) = (stop.clone(), ops.clone(), connect());
            std::thread::spawn(move || {
                let mut i: u64 = 0;
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    for sql in table_writes(i) {
                        conn.query_drop(&sql).map_err(|e| format!("{sql}: {e}"))?;
                    }
                    ops.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(5));
                }
                Ok(())
            })
        };
        let analyzer = {
            let (stop, ops, mut conn) = (stop.clone(), ops.clone(), connect());
            std::thread::spawn(move || {
                let mut i: u64 = 0;
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    let sql = format!("INSERT INTO analyzed (v) VALUES ({i})");
                    conn.query_drop(&sql).map_err(|e| format!("{sql}: {e}"))?;
                    analyze_on(&mut conn, ANALYZED)?;
                    ops.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(100));
                }
                Ok(())
            })
        };
        ZooWriters {
            stop,
            ops,
            threads: vec![tables, analyzer],
        }
    }

    /// Rounds of writes (and of ANALYZE) done so far.
    pub fn ops(&self) -> u64 {
        self.ops.load(Ordering::Relaxed)
    }

    /// Stops the writers, joins them and returns the rounds done; panics with the first
    /// statement that failed.
    pub fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        let errors: Vec<String> = self
            .threads
            .into_iter()
            .filter_map(|t| t.join().expect("a zoo writer panicked").err())
            .collect();
        assert!(errors.is_empty(), "zoo writers failed: {errors:?}");
        self.ops.load(Ordering::Relaxed)
    }
}

/// Round `i` of the table writer: new rows with new ids, updates of initial rows.
fn table_writes(i: u64) -> Vec<String> {
    let k = 1 + i % INITIAL_ROWS;
    let new = INITIAL_ROWS * 4 + i;
    let mut sql = vec![
        // The id from the sequence; the trigger adds a row to `audit`.
        format!("INSERT INTO my (id, v, note) VALUES (NEXTVAL(seq), {i}, 'writer')"),
        format!("UPDATE my SET v = v + 1 WHERE id = {k}"),
        "SELECT NEXTVAL(seq)".to_string(),
        format!("INSERT INTO aria_t VALUES ({new}, {i}, 'writer')"),
        format!("UPDATE aria_t SET v = v + 1 WHERE id = {k}"),
        format!("INSERT INTO aria_nt VALUES ({new}, {i}, 'writer')"),
        format!("UPDATE aria_nt SET v = v + 1 WHERE id = {k}"),
        format!("INSERT INTO csv_t VALUES ({new}, {i}, 'writer')"),
        format!("INSERT INTO arch VALUES ({new}, 'writer')"),
        format!("INSERT INTO m1 VALUES ({new}, {i})"),
        // Through the MERGE table: INSERT_METHOD=LAST puts the row into m2.
        format!("INSERT INTO merged VALUES ({}, {i})", new + 1_000_000),
        format!(
            "UPDATE merged SET v = v + 1 WHERE id = {}",
            k + INITIAL_ROWS
        ),
        format!("UPDATE parted SET v = v + 1, note = 'writer' WHERE id = {k}"),
        format!("CALL bump({})", INITIAL_ROWS + 1 - k),
        format!("INSERT INTO ranged VALUES ({}, {i})", 10_000 * i),
    ];
    // CSV rewrites its whole file on UPDATE: now and then is enough.
    if i.is_multiple_of(10) {
        sql.push(format!("UPDATE csv_t SET v = v + 1 WHERE id = {k}"));
    }
    sql
}
