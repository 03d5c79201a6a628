//! The zoo: a hot backup of a server that holds every kind of object MariaDB keeps beside
//! RocksDB tables (see `sandbox::zoo`), taken while all of them are being written, and
//! restored with the RocksDB WAL in a directory of its own. The copy must start without
//! errors, pass CHECK TABLE, hold every object of the source and a consistent bank, and,
//! replicating from the GTID the backup recorded, end equal to the source table by table,
//! `mysql` included. The same checks run on a copy made by mariabackup, the reference.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;
use std::fs;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use sandbox::workload::{assert_bank_consistent, load_bank, Load};
use sandbox::zoo::{self, ZooWriters};
use sandbox::Server;

use crate::common::db::*;
use crate::common::*;

const FILLER_ROWS: u64 = 20_000;

#[test]
fn zoo_backed_up_by_us_restores_every_object_exactly() {
    let run = Run::new("ours");
    let (source, writers) = run.source();
    let stream = run.dir("zoo.xb");
    backup_ok(
        backup_cmd(&source, &["--stream", "xbstream", "--interval", "2"]),
        &stream,
        0,
    );
    let writers = writers.backup_done();
    run.phase("backup");

    let backup = run.dir("backup");
    extract_with("ours", &stream, &backup);
    let gtid = manifest(&backup)["backup"]["binlog"]["gtid_binlog_pos"]
        .as_str()
        .expect("the manifest records the GTID position")
        .to_string();
    let carried = wal_files(&backup.join("#rocksdb"));
    eprintln!("zoo[ours]: WAL files in the backup: {carried:?}");
    let (datadir, wal) = (run.dir("restored"), run.dir("restored-wal"));
    run_ok(
        Command::new(bin())
            .arg("move-back")
            .arg("--backup-dir")
            .arg(&backup)
            .arg("--datadir")
            .arg(&datadir)
            .arg("--rocksdb-waldir")
            .arg(&wal),
    );
    let mut problems = Problems::new(run.tool);
    let misplaced = wal_files(&datadir.join("#rocksdb"));
    problems.check(
        misplaced.is_empty(),
        format!("move-back put WAL files in the RocksDB data directory: {misplaced:?}"),
    );
    problems.check(
        wal_files(&wal) == carried,
        format!(
            "move-back put {:?} in the WAL directory, the backup has {carried:?}",
            wal_files(&wal)
        ),
    );
    run.phase("extract and move-back");

    let copy = run.start_copy(&datadir, &wal);
    check_copy(&run, &source, &copy, &gtid, writers, &[], &mut problems);
    problems.assert_none(&run);
}

/// The reference: mariabackup's own backup, prepare and copy-back pass the same checks.
///
/// mariabackup knows nothing of a separate RocksDB WAL directory: it reads only
/// `@@rocksdb_datadir` and has no option for one. It takes its RocksDB checkpoint while
/// commits are blocked and puts the whole checkpoint (WAL files too, when it has any) under
/// `#rocksdb/` of the backup; `--copy-back` puts all of `#rocksdb/` into the RocksDB data
/// directory (`--rocksdb-datadir`, default `DATADIR/#rocksdb`), where a server that reads
/// its WAL elsewhere would not see them. So after a copy-back an operator moves any `*.log`
/// from there into the WAL directory, as done here.
#[test]
fn zoo_backed_up_by_mariabackup_passes_the_same_checks() {
    let run = Run::new("mariabackup");
    let (source, writers) = run.source();
    let backup = run.dir("backup");
    mariabackup(&[
        "--backup".into(),
        format!("--target-dir={}", backup.display()),
        "--user=root".into(),
        format!("--socket={}", source.socket.display()),
    ]);
    let writers = writers.backup_done();
    run.phase("backup");

    mariabackup(&[
        "--prepare".into(),
        format!("--target-dir={}", backup.display()),
    ]);
    let coords = fs::read_to_string(backup.join("xtrabackup_binlog_info")).unwrap();
    let gtid = coords
        .trim_end()
        .split('\t')
        .nth(2)
        .unwrap_or_else(|| panic!("no GTID in xtrabackup_binlog_info: {coords:?}"))
        .to_string();
    let (datadir, wal) = (run.dir("restored"), run.dir("restored-wal"));
    mariabackup(&[
        "--copy-back".into(),
        format!("--target-dir={}", backup.display()),
        format!("--datadir={}", datadir.display()),
    ]);
    fs::create_dir_all(&wal).unwrap();
    let moved = wal_files(&datadir.join("#rocksdb"));
    for name in &moved {
        fs::rename(datadir.join("#rocksdb").join(name), wal.join(name)).unwrap();
    }
    eprintln!(
        "zoo[mariabackup]: WAL files copy-back put in the RocksDB data directory, moved to the WAL directory: {moved:?}"
    );
    run.phase("prepare and copy-back");

    let copy = run.start_copy(&datadir, &wal);
    let mut problems = Problems::new(run.tool);
    check_copy(
        &run,
        &source,
        &copy,
        &gtid,
        writers,
        MARIABACKUP_KNOWN_ERRORS,
        &mut problems,
    );
    problems.assert_none(&run);
}

/// What mariabackup gets wrong in the zoo, tolerated in the reference test only.
///
/// The log tables: `BACKUP STAGE BLOCK_COMMIT` flushes (closes) `mysql.general_log`, which
/// leaves its `.CSM` marked clean, and mariabackup copies it right after. But statements
/// still run under BLOCK_COMMIT (a transaction's statements before its COMMIT, which is
/// what waits), and logging the next one reopens the table and marks the `.CSM` dirty
/// again. When that happens before mariabackup has copied the `.CSM`, the copy's
/// general_log is "crashed": the restored server logs this error at its first logged
/// statement, and repairs the table. It happened in one run in three to one in ten here.
const MARIABACKUP_KNOWN_ERRORS: &[&str] =
    &["[ERROR] mariadbd: Table 'general_log' is marked as crashed and should be repaired"];

/// One test's temporary directory and clock.
struct Run {
    tool: &'static str,
    tmp: tempfile::TempDir,
    started: Instant,
}

impl Run {
    fn new(tool: &'static str) -> Run {
        Run {
            tool,
            tmp: tempfile::tempdir().unwrap(),
            started: Instant::now(),
        }
    }

    fn dir(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    fn phase(&self, what: &str) {
        eprintln!(
            "zoo[{}]: {what} done at {:.1} s",
            self.tool,
            self.started.elapsed().as_secs_f64()
        );
    }

    /// The source: its RocksDB WAL in a directory of its own, the general log in
    /// `mysql.general_log`, the zoo and the bank loaded, every writer running.
    fn source(&self) -> (Server, Writers) {
        let wal = self.dir("source-wal");
        fs::create_dir(&wal).unwrap();
        let source = Server::start_with(&as_strs(&server_opts(&wal)));
        assert!(
            !wal_files(&wal).is_empty(),
            "the source does not write its WAL into {}",
            wal.display()
        );
        zoo::create(&source);
        load_bank(&source, FILLER_ROWS);
        let writers = Writers::start(&source);
        self.phase("source loaded, writers running");
        (source, writers)
    }

    /// A server on a restored datadir, with the source's options and replication off.
    fn start_copy(&self, datadir: &Path, wal: &Path) -> Server {
        fs::create_dir_all(wal).unwrap();
        let mut opts = server_opts(wal);
        opts.push("--skip-slave-start".into());
        let copy = Server::start_on(datadir, &as_strs(&opts));
        assert_eq!(
            PathBuf::from(copy.value("SELECT @@rocksdb_wal_dir")),
            wal,
            "the copy's WAL directory"
        );
        self.phase("copy started");
        copy
    }
}

/// Server options of the source and of the copies.
fn server_opts(wal: &Path) -> Vec<String> {
    vec![
        format!("--rocksdb-wal-dir={}", wal.display()),
        "--general-log=1".into(),
        "--log-output=TABLE".into(),
    ]
}

fn as_strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// RocksDB WAL files (`*.log`) in a directory.
fn wal_files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".log"))
        .collect();
    names.sort();
    names
}

fn mariabackup(args: &[String]) {
    let out = Command::new(require("mariabackup"))
        .arg("--no-defaults")
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "mariabackup {args:?} failed with {}:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The bank's and the zoo's writers, and their progress when the backup began and ended.
struct Writers {
    load: Load,
    zoo: ZooWriters,
    before_backup: (u64, u64),
    after_backup: (u64, u64),
}

impl Writers {
    fn start(source: &Server) -> Writers {
        let (load, zoo) = (Load::start(source), ZooWriters::start(source));
        std::thread::sleep(Duration::from_millis(500));
        let before_backup = (load.commits(), zoo.ops());
        Writers {
            load,
            zoo,
            before_backup,
            after_backup: (0, 0),
        }
    }

    fn backup_done(mut self) -> Writers {
        self.after_backup = (self.load.commits(), self.zoo.ops());
        self
    }

    /// Stops and joins every writer; asserts they all wrote during the backup.
    fn stop(self) {
        self.load.stop();
        self.zoo.stop();
        let (before, after) = (self.before_backup, self.after_backup);
        assert!(
            after.0 > before.0 && after.1 > before.1,
            "the writers must run during the backup: (bank commits, zoo rounds) {before:?} before, {after:?} after"
        );
    }
}

/// What a copy got wrong, collected so that one run reports all of it.
struct Problems {
    tool: &'static str,
    found: Vec<String>,
}

impl Problems {
    fn new(tool: &'static str) -> Problems {
        Problems {
            tool,
            found: Vec::new(),
        }
    }

    fn check(&mut self, ok: bool, what: String) {
        if !ok {
            self.found.push(what);
        }
    }

    /// Says something worth knowing that is not a problem.
    fn note(&self, what: String) {
        eprintln!("zoo[{}]: {what}", self.tool);
    }

    /// The same set of rows on both sides; names the rows that differ.
    fn same<T: Ord + Debug>(&mut self, what: &str, source: Vec<T>, copy: Vec<T>) {
        let (source, copy): (BTreeSet<T>, BTreeSet<T>) =
            (source.into_iter().collect(), copy.into_iter().collect());
        let missing: Vec<&T> = source.difference(&copy).collect();
        let extra: Vec<&T> = copy.difference(&source).collect();
        self.check(
            missing.is_empty() && extra.is_empty(),
            format!("{what}: missing on the copy {missing:?}; only on the copy {extra:?}"),
        );
    }

    /// Error log lines: each is a problem unless it contains one of `tolerated`, which is
    /// reported all the same.
    fn errors(&mut self, what: &str, lines: &[String], tolerated: &[&str]) {
        let (known, unknown): (Vec<&String>, Vec<&String>) = lines
            .iter()
            .partition(|l| tolerated.iter().any(|t| l.contains(t)));
        if !known.is_empty() {
            self.note(format!("{what}, a known limitation of the tool: {known:?}"));
        }
        self.check(unknown.is_empty(), format!("{what}: {unknown:?}"));
    }

    /// Runs a check that panics (such as `assert_bank_consistent`), recording its panic.
    fn no_panic(&mut self, what: &str, check: impl FnOnce()) {
        if let Err(e) = catch_unwind(AssertUnwindSafe(check)) {
            let msg = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            self.found.push(format!("{what}: {msg}"));
        }
    }

    fn assert_none(self, run: &Run) {
        run.phase("all checks");
        assert!(
            self.found.is_empty(),
            "zoo[{}]: {} problems with the copy:\n- {}",
            self.tool,
            self.found.len(),
            self.found.join("\n- ")
        );
    }
}

/// What each kind of object is compared by, between source and copy.
const OBJECTS: &[(&str, &str)] = &[
    (
        "tables",
        "SELECT TABLE_SCHEMA, TABLE_NAME, ENGINE, TABLE_TYPE FROM information_schema.TABLES",
    ),
    (
        "routines",
        "SELECT ROUTINE_SCHEMA, ROUTINE_NAME, ROUTINE_TYPE, DEFINER, ROUTINE_DEFINITION
         FROM information_schema.ROUTINES",
    ),
    (
        "triggers",
        "SELECT TRIGGER_SCHEMA, TRIGGER_NAME, EVENT_MANIPULATION, EVENT_OBJECT_SCHEMA,
                EVENT_OBJECT_TABLE, ACTION_TIMING, DEFINER, ACTION_STATEMENT
         FROM information_schema.TRIGGERS",
    ),
    (
        "events",
        "SELECT EVENT_SCHEMA, EVENT_NAME, STATUS, DEFINER, INTERVAL_VALUE, INTERVAL_FIELD,
                STARTS, EVENT_DEFINITION
         FROM information_schema.EVENTS",
    ),
    (
        "views",
        "SELECT TABLE_SCHEMA, TABLE_NAME, DEFINER, VIEW_DEFINITION FROM information_schema.VIEWS",
    ),
    (
        "partitions",
        "SELECT TABLE_SCHEMA, TABLE_NAME, PARTITION_NAME, PARTITION_METHOD,
                PARTITION_EXPRESSION, PARTITION_DESCRIPTION
         FROM information_schema.PARTITIONS WHERE PARTITION_NAME IS NOT NULL",
    ),
    ("accounts", "SELECT User, Host, Priv FROM mysql.global_priv"),
    ("users", "SELECT User, Host FROM mysql.user"),
];

/// Tables of `mysql` whose contents legitimately differ between the source and a replica
/// of its copy, and why. The persistent statistics are compared apart: see [`STATISTICS`].
const MYSQL_DIFFERENT: &[&str] = &[
    // The log tables: each server logs its own statements; they are not replicated.
    "general_log",
    "slow_log",
    // Replication state: the replica records the GTIDs it applied, the source none.
    "gtid_slave_pos",
    // InnoDB's persistent statistics: recomputed by each server in the background, with
    // timestamps; a restore by our tool re-creates these tables empty.
    "innodb_index_stats",
    "innodb_table_stats",
    // The persistent statistics: compared apart, row by row where they must be equal.
    "table_stats",
    "column_stats",
    "index_stats",
];

/// The persistent statistics tables, and the columns that name a row of each. ANALYZE is
/// replicated and the replica re-runs it, but only the statistics of some tables must come
/// out equal (`zoo::STABLE_STATISTICS` says which and why): the others are compared by
/// which rows exist, not by their values.
const STATISTICS: &[(&str, &str)] = &[
    ("table_stats", "db_name, table_name"),
    ("column_stats", "db_name, table_name, column_name"),
    (
        "index_stats",
        "db_name, table_name, index_name, prefix_arity",
    ),
];

/// Everything checked on a copy: the same function for our tool and for mariabackup.
/// Error log lines that contain one of `tolerated` are reported, not counted.
fn check_copy(
    run: &Run,
    source: &Server,
    copy: &Server,
    gtid: &str,
    writers: Writers,
    tolerated: &[&str],
    problems: &mut Problems,
) {
    assert_zoo_present(source);

    // The copy as restored, before it replicates anything.
    check_tables(run, copy, problems);
    for (what, sql) in OBJECTS {
        problems.same(what, source.rows(sql), copy.rows(sql));
    }
    let grants = format!("SHOW GRANTS FOR '{}'@'localhost'", zoo::READER);
    problems.same("grants", source.rows(&grants), copy.rows(&grants));
    check_objects_work(copy, problems);
    problems.no_panic("the bank on the copy", || assert_bank_consistent(copy));
    problems.no_panic("the statistics on the copy", || {
        zoo::assert_statistics_consistent(copy)
    });
    let errors_at_start = copy.logged_errors();
    problems.errors(
        "the restored server logged errors",
        &errors_at_start,
        tolerated,
    );
    run.phase("checks of the restored copy");

    // The copy replicates from its recorded GTID until it has what the source has.
    problems.check(!gtid.is_empty(), "the backup recorded no GTID".into());
    copy.exec(&format!(
        "SET GLOBAL gtid_slave_pos = '{gtid}';
         CHANGE MASTER TO MASTER_HOST = '127.0.0.1', MASTER_PORT = {}, MASTER_USER = 'root',
           MASTER_USE_GTID = slave_pos;
         START SLAVE",
        source.port
    ));
    std::thread::sleep(Duration::from_secs(1));
    writers.stop();
    let end = source.value("SELECT @@gtid_binlog_pos");
    match wait_for_gtid(copy, &end) {
        Err(e) => problems.found.push(e),
        Ok(()) => {
            run.phase("replica caught up");
            compare_contents(source, copy, problems);
        }
    }
    problems.no_panic("the bank on the source", || assert_bank_consistent(source));
    let errors: Vec<String> = copy
        .logged_errors()
        .into_iter()
        .filter(|e| !errors_at_start.contains(e))
        .collect();
    problems.errors(
        "the copy logged errors while replicating",
        &errors,
        tolerated,
    );
}

/// The source really holds the zoo (so that equal lists on both sides mean something).
fn assert_zoo_present(source: &Server) {
    let zoo_rows = |sql: &str| source.rows(&format!("{sql} ORDER BY 1, 2"));
    assert_eq!(
        zoo_rows(
            "SELECT TABLE_NAME, ENGINE, TABLE_TYPE, CREATE_OPTIONS FROM information_schema.TABLES
             WHERE TABLE_SCHEMA = 'zoo'"
        ),
        [
            ["analyzed", "MyISAM", "BASE TABLE", ""],
            ["arch", "ARCHIVE", "BASE TABLE", ""],
            ["aria_nt", "Aria", "BASE TABLE", "transactional=0"],
            ["aria_t", "Aria", "BASE TABLE", "transactional=1"],
            ["audit", "MyISAM", "BASE TABLE", ""],
            ["csv_t", "CSV", "BASE TABLE", ""],
            ["m1", "MyISAM", "BASE TABLE", ""],
            ["m2", "MyISAM", "BASE TABLE", ""],
            ["merged", "MRG_MyISAM", "BASE TABLE", ""],
            ["my", "MyISAM", "BASE TABLE", ""],
            ["parted", "ROCKSDB", "BASE TABLE", "partitioned"],
            ["ranged", "ROCKSDB", "BASE TABLE", "partitioned"],
            ["seq", "Aria", "SEQUENCE", "transactional=0"],
            ["v_parted", "NULL", "VIEW", "NULL"],
        ]
    );
    let count = |sql: &str| source.value(sql).parse::<u64>().unwrap();
    for (sql, n) in [
        ("SELECT COUNT(*) FROM information_schema.ROUTINES WHERE ROUTINE_SCHEMA = 'zoo'", 2),
        ("SELECT COUNT(*) FROM information_schema.TRIGGERS WHERE TRIGGER_SCHEMA = 'zoo'", 1),
        ("SELECT COUNT(*) FROM information_schema.EVENTS WHERE EVENT_SCHEMA = 'zoo' AND STATUS = 'DISABLED'", 1),
        ("SELECT COUNT(*) FROM information_schema.PARTITIONS WHERE TABLE_SCHEMA = 'zoo' AND PARTITION_NAME IS NOT NULL", 7),
        ("SELECT COUNT(*) FROM mysql.global_priv WHERE User = 'zoo_reader'", 1),
        ("SELECT COUNT(DISTINCT table_name) FROM mysql.table_stats WHERE db_name = 'zoo'", 7),
        ("SELECT COUNT(DISTINCT table_name) FROM mysql.column_stats WHERE db_name = 'zoo'", 7),
        ("SELECT COUNT(DISTINCT table_name) FROM mysql.index_stats WHERE db_name = 'zoo'", 7),
    ] {
        assert_eq!(count(sql), n, "{sql}");
    }
    assert!(
        count("SELECT COUNT(*) FROM mysql.general_log") > 0,
        "the general log is written"
    );
}

/// `CHECK TABLE` of every table of every schema that is not RocksDB (and not one of the
/// in-memory schemas): each must say OK. Tables whose engine cannot check are reported.
fn check_tables(run: &Run, copy: &Server, problems: &mut Problems) {
    let tables = copy.rows(
        "SELECT TABLE_SCHEMA, TABLE_NAME FROM information_schema.TABLES
         WHERE TABLE_TYPE IN ('BASE TABLE', 'SEQUENCE') AND ENGINE <> 'ROCKSDB'
           AND TABLE_SCHEMA NOT IN ('information_schema', 'performance_schema')
         ORDER BY 1, 2",
    );
    let in_db = |db: &str| tables.iter().filter(|t| t[0] == db).count();
    assert!(
        in_db("zoo") == 11 && in_db("mysql") >= 25,
        "tables missing from the check: {tables:?}"
    );
    let mut cannot = Vec::new();
    for t in &tables {
        let name = format!("`{}`.`{}`", t[0], t[1]);
        let result = copy.rows(&format!("CHECK TABLE {name}"));
        let texts: Vec<String> = result
            .iter()
            .map(|r| format!("{}: {}", r[2], r[3]))
            .collect();
        if texts.iter().any(|t| t.contains("doesn't support check")) {
            cannot.push(name);
        } else {
            problems.check(
                texts.last().is_some_and(|t| t == "status: OK"),
                format!("CHECK TABLE {name}: {texts:?}"),
            );
        }
    }
    eprintln!(
        "zoo[{}]: CHECK TABLE on {} tables; not supported by the engine of {cannot:?}",
        run.tool,
        tables.len()
    );
}

/// The zoo's objects work on the copy: routines run, the view answers, the MERGE table
/// reads both children, the user logs in with its password and holds exactly its grant.
fn check_objects_work(copy: &Server, problems: &mut Problems) {
    let mut same = |what: &str, sql: &str, expected: &str| {
        let got = copy.rows(sql);
        problems.check(
            got == [[expected]],
            format!("{what}: {sql} gave {got:?}, expected {expected}"),
        );
    };
    same("the function", "SELECT zoo.twice(21)", "42");
    same(
        "the view",
        "SELECT n = (SELECT COUNT(*) FROM zoo.parted) FROM zoo.v_parted",
        "1",
    );
    same(
        "the MERGE table",
        "SELECT (SELECT COUNT(*) FROM zoo.merged) = (SELECT COUNT(*) FROM zoo.m1) + (SELECT COUNT(*) FROM zoo.m2)",
        "1",
    );
    let reader = copy
        .opts(zoo::READER)
        .pass(Some(zoo::READER_PASSWORD))
        .db_name(Some("zoo"));
    match mysql::Conn::new(reader) {
        Err(e) => problems
            .found
            .push(format!("{} cannot log in: {e}", zoo::READER)),
        Ok(mut conn) => {
            use mysql::prelude::Queryable;
            let read: mysql::Result<Option<u64>> = conn.query_first("SELECT COUNT(*) FROM my");
            problems.check(
                matches!(read, Ok(Some(n)) if n > 0),
                format!("{} cannot read the zoo: {read:?}", zoo::READER),
            );
            let write = conn.query_drop("DELETE FROM my");
            problems.check(write.is_err(), format!("{} may write the zoo", zoo::READER));
        }
    }
}

/// Waits until the replica has applied `end`, failing early on a replication error.
fn wait_for_gtid(copy: &Server, end: &str) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if copy.value(&format!("SELECT MASTER_GTID_WAIT('{end}', 1)")) == "0" {
            return Ok(());
        }
        let status = slave_status(copy);
        let errors: Vec<String> = ["Last_IO_Error", "Last_SQL_Error"]
            .iter()
            .filter(|k| !status[**k].is_empty())
            .map(|k| format!("{k}: {}", status[*k]))
            .collect();
        if !errors.is_empty() {
            return Err(format!(
                "replication from the recorded GTID failed: {errors:?}"
            ));
        }
        if Instant::now() > deadline {
            return Err(format!(
                "the replica did not reach {end} in 120 s: at {}",
                status["Gtid_IO_Pos"]
            ));
        }
    }
}

fn slave_status(copy: &Server) -> BTreeMap<String, String> {
    use mysql::prelude::Queryable;
    let row: mysql::Row = copy
        .conn()
        .query_first("SHOW SLAVE STATUS")
        .unwrap()
        .expect("the copy is a replica");
    row.columns_ref()
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let v = match row.as_ref(i) {
                Some(mysql::Value::Bytes(b)) => String::from_utf8_lossy(b).into_owned(),
                _ => String::new(),
            };
            (c.name_str().into_owned(), v)
        })
        .collect()
}

/// After replication: every table of zoo, bank and mysql holds what the source holds.
fn compare_contents(source: &Server, copy: &Server, problems: &mut Problems) {
    for db in ["zoo", "bank", "mysql"] {
        let skip = if db == "mysql" { MYSQL_DIFFERENT } else { &[] };
        let sums = |server: &Server| -> BTreeMap<String, (u64, u64)> {
            let mut s = server.checksums(db);
            s.retain(|t, _| !skip.contains(&t.as_str()));
            s
        };
        let (a, b) = (sums(source), sums(copy));
        assert!(a.len() >= 4, "too few tables in {db}: {a:?}");
        let tables: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
        for t in tables {
            problems.check(
                a.get(t) == b.get(t),
                format!(
                    "{db}.{t} differs after replication: (checksum, rows) source {:?}, copy {:?}",
                    a.get(t),
                    b.get(t)
                ),
            );
        }
    }
    let stable = zoo::STABLE_STATISTICS
        .iter()
        .map(|t| format!("'{t}'"))
        .collect::<Vec<_>>()
        .join(", ");
    for (table, key) in STATISTICS {
        let rows = format!("SELECT {key} FROM mysql.{table}");
        problems.same(
            &format!("mysql.{table}"),
            source.rows(&rows),
            copy.rows(&rows),
        );
        let values = format!(
            "SELECT * FROM mysql.{table} WHERE db_name = 'zoo' AND table_name IN ({stable})"
        );
        problems.same(
            &format!("mysql.{table} of {stable}"),
            source.rows(&values),
            copy.rows(&values),
        );
        // Reported, not counted: the tables whose statistics came out different.
        let all = format!("SELECT * FROM mysql.{table}");
        let (a, b): (BTreeSet<_>, BTreeSet<_>) = (
            source.rows(&all).into_iter().collect(),
            copy.rows(&all).into_iter().collect(),
        );
        let differ: BTreeSet<String> = a
            .symmetric_difference(&b)
            .map(|r| format!("{}.{}", r[0], r[1]))
            .collect();
        problems.note(format!(
            "mysql.{table} differs, legitimately, for {differ:?}"
        ));
    }
    // A sequence is no base table: `checksums` leaves it out.
    let seq = "SELECT * FROM zoo.seq";
    problems.same("the sequence", source.rows(seq), copy.rows(seq));
}
