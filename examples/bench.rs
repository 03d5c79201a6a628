//! The benchmark: this tool against the original `myrocks_hotbackup`, `mariabackup` and the
//! hardware limit (`cat` of the same files through the same pipe), on the same data, in one
//! run. Run it with `bench/run`; see `bench/README.md`.
//!
//! For each data set it starts a sandbox server, loads the data, then times every case in
//! turn (alternating, `--runs` times each) while a probe commits single rows, and reports
//! medians and spreads of wall time, CPU time, peak memory, throughput, the ratio to the
//! limit and the longest commit. Cases are grouped by mode (stream backups, extraction);
//! later modes (directory backups against `cp -r`, network, object storage) add a group.

use std::fmt::Write as _;
use std::fs;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use mysql::prelude::Queryable;
use sandbox::workload::StallProbe;
use sandbox::{binary, built_binary, Server};

struct Options {
    scale: f64,
    runs: usize,
    output: PathBuf,
}

fn options() -> Options {
    let mut o = Options {
        scale: 1.0,
        runs: 3,
        output: PathBuf::from("docs/BENCHMARKS.md"),
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let mut value = || {
            it.next()
                .unwrap_or_else(|| panic!("{flag} needs a value"))
                .clone()
        };
        match flag.as_str() {
            "--scale" => {
                o.scale = value()
                    .parse()
                    .expect("--scale takes a number, 1 = 2 GiB + 1 GiB")
            }
            "--runs" => o.runs = value().parse().expect("--runs takes a whole number"),
            "--output" => o.output = PathBuf::from(value()),
            other => panic!("unknown flag {other}; flags: --scale F --runs N --output FILE"),
        }
    }
    o
}

/// One measured run.
#[derive(Clone, Copy)]
struct Sample {
    wall: f64,
    cpu: f64,
    peak_mib: f64,
    longest_commit_ms: f64,
}

/// Runs `script` with bash and returns wall time, CPU time and peak RSS of the whole
/// pipeline (wait4 accounts for every process the shell waited for).
#[allow(clippy::zombie_processes)] // reaped by wait4 below, which also reports its usage
fn measure(script: &str, env_path: &str) -> Sample {
    let start = Instant::now();
    let child = Command::new("bash")
        .arg("-o")
        .arg("pipefail")
        .arg("-c")
        .arg(script)
        .env("PATH", env_path)
        .spawn()
        .expect("cannot run bash");
    let mut status = 0;
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let pid = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut usage) };
    let wall = start.elapsed().as_secs_f64();
    assert!(pid > 0, "wait4 failed");
    let exit = std::process::ExitStatus::from_raw(status);
    assert!(exit.success(), "`{script}` failed: {exit}");
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Sample {
        wall,
        cpu: secs(usage.ru_utime) + secs(usage.ru_stime),
        peak_mib: usage.ru_maxrss as f64 / 1024.0,
        longest_commit_ms: 0.0,
    }
}

/// A thing to time: a name and a bash script (`{OUT}`-free: output goes to /dev/null).
struct Case {
    name: &'static str,
    script: String,
    /// Cleans up after a run (not timed).
    after: Option<String>,
}

struct DataSet {
    name: &'static str,
    server: Server,
    bytes: u64,
    description: String,
}

/// Few large SSTs: `tables` bulk-loaded tables of `rows_per_table` 1000-byte rows, one SST each.
fn large_files(scale: f64) -> DataSet {
    let server = Server::start();
    let tables = 8;
    let rows_per_table = ((256u64 << 20) as f64 * scale / 1000.0).max(100.0) as u64;
    bulk_load(&server, "large", tables, rows_per_table);
    finish_dataset(
        server,
        "large files",
        format!("{tables} tables, one SST each"),
    )
}

/// Many small SSTs: 2000 tables (scaled), each bulk-loaded into its own ~512 KiB SST.
fn many_files(scale: f64) -> DataSet {
    let server = Server::start();
    let tables = ((2000.0 * scale) as u64).clamp(20, 2000);
    let rows_per_table = ((1u64 << 30) as f64 * scale / 1000.0 / tables as f64).max(10.0) as u64;
    bulk_load(&server, "many", tables, rows_per_table);
    finish_dataset(
        server,
        "many files",
        format!("{tables} tables, one SST each"),
    )
}

fn bulk_load(server: &Server, db: &str, tables: u64, rows: u64) {
    let mut conn = server.conn();
    conn.query_drop(format!("CREATE DATABASE {db}")).unwrap();
    conn.query_drop(format!("USE {db}")).unwrap();
    for t in 0..tables {
        conn.query_drop(format!(
            "CREATE TABLE t{t} (id INT PRIMARY KEY, pad VARBINARY(1100)) ENGINE=ROCKSDB"
        ))
        .unwrap();
        conn.query_drop("SET SESSION rocksdb_bulk_load = 1")
            .unwrap();
        conn.query_drop(format!(
            "INSERT INTO t{t} SELECT seq, RANDOM_BYTES(1000) FROM seq_1_to_{rows}"
        ))
        .unwrap();
        conn.query_drop("SET SESSION rocksdb_bulk_load = 0")
            .unwrap();
    }
}

fn finish_dataset(server: Server, name: &'static str, what: String) -> DataSet {
    server.exec("SET GLOBAL rocksdb_force_flush_memtable_now = 1");
    let rocks = server.datadir.join("#rocksdb");
    let mut ssts = 0;
    let mut bytes = 0;
    for e in fs::read_dir(&rocks).unwrap() {
        let e = e.unwrap();
        if e.file_name().to_string_lossy().ends_with(".sst") {
            ssts += 1;
            bytes += e.metadata().unwrap().len();
        }
    }
    let description = format!(
        "{what}: {ssts} SST files, {:.2} GiB",
        bytes as f64 / (1u64 << 30) as f64
    );
    DataSet {
        name,
        server,
        bytes,
        description,
    }
}

/// Lists, when it runs, the files a backup reads (RocksDB's, and the databases' table
/// files) and cats them; a file compacted away between listing and reading is skipped.
fn cat_script(server: &Server) -> String {
    let d = server.datadir.display();
    format!(
        "{{ find {d} -mindepth 2 -maxdepth 2 -type f \\( -path '*/#rocksdb/*' ! -name 'LOG*' ! -name LOCK \
         -o -name '*.frm' -o -name '*.opt' -o -name '*.MAD' -o -name '*.MAI' \\) -print0 \
         | xargs -0 cat -- 2>/dev/null; true; }} | cat > /dev/null"
    )
}

fn backup_cases(server: &Server, tool: &Path, work: &Path) -> Vec<Case> {
    let sock = server.socket.display();
    let ckpt = server.datadir.join("orig-ckpt");
    fs::create_dir_all(&ckpt).unwrap();
    let mb_target = work.join("mariabackup-tmp");
    let tool = tool.display();
    let original = "/usr/bin/myrocks_hotbackup";
    vec![
        Case {
            name: "limit: cat",
            script: cat_script(server),
            after: None,
        },
        Case {
            name: "myrocks-hotbackup xbstream",
            script: format!("{tool} backup --stream xbstream --socket {sock} --user root 2>/dev/null | cat > /dev/null"),
            after: None,
        },
        Case {
            name: "myrocks-hotbackup tar",
            script: format!("{tool} backup --stream tar --socket {sock} --user root 2>/dev/null | cat > /dev/null"),
            after: None,
        },
        Case {
            name: "original xbstream",
            script: format!(
                "cd {} && {original} --user=root --socket={sock} --stream=xbstream --checkpoint_dir={} 2>/dev/null | cat > /dev/null",
                work.display(),
                ckpt.display()
            ),
            after: None,
        },
        Case {
            name: "original tar",
            script: format!(
                "cd {} && {original} --user=root --socket={sock} --stream=tar --checkpoint_dir={} 2>/dev/null | cat > /dev/null",
                work.display(),
                ckpt.display()
            ),
            after: None,
        },
        Case {
            name: "mariabackup xbstream",
            script: format!(
                "mkdir -p {t} && mariabackup --backup --stream=xbstream --user=root --socket={sock} --target-dir={t} 2>/dev/null | cat > /dev/null",
                t = mb_target.display()
            ),
            after: Some(format!("rm -rf {}", mb_target.display())),
        },
    ]
}

fn extract_cases(tool: &Path, work: &Path, xb: &Path, tar: &Path) -> Vec<Case> {
    let out = work.join("extracted");
    let (tool, out_d, xb, tar) = (tool.display(), out.display(), xb.display(), tar.display());
    let clean = Some(format!("rm -rf {out_d}"));
    // Every case ends with sync: ours syncs before it reports success, the others do not.
    vec![
        Case {
            name: "myrocks-hotbackup extract (xbstream)",
            script: format!("{tool} extract -C {out_d} {xb} 2>/dev/null && sync"),
            after: clean.clone(),
        },
        Case {
            name: "mbstream -x",
            script: format!("mkdir -p {out_d} && mbstream -x -C {out_d} < {xb} && sync"),
            after: clean.clone(),
        },
        Case {
            name: "myrocks-hotbackup extract (tar)",
            script: format!("{tool} extract -C {out_d} {tar} 2>/dev/null && sync"),
            after: clean.clone(),
        },
        Case {
            name: "tar -x",
            script: format!("mkdir -p {out_d} && tar -xf {tar} -C {out_d} && sync"),
            after: clean,
        },
    ]
}

/// Times every case `runs` times, alternating, with a commit probe on `server` when given.
fn run_cases(cases: &[Case], runs: usize, server: Option<&Server>, path: &str) -> Vec<Vec<Sample>> {
    let mut samples = vec![Vec::new(); cases.len()];
    for run in 0..runs {
        for (i, case) in cases.iter().enumerate() {
            eprintln!("  run {}/{runs}: {}", run + 1, case.name);
            let probe = server.map(StallProbe::start);
            std::thread::sleep(Duration::from_millis(100));
            let mut s = measure(&case.script, path);
            if let Some(p) = probe {
                s.longest_commit_ms = p.stop().as_secs_f64() * 1e3;
            }
            if let Some(after) = &case.after {
                measure(after, path);
            }
            samples[i].push(s);
        }
    }
    samples
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn spread(v: &[f64]) -> String {
    let (lo, hi) = v
        .iter()
        .fold((f64::MAX, f64::MIN), |(lo, hi), &x| (lo.min(x), hi.max(x)));
    format!("{lo:.2}–{hi:.2}")
}

/// A Markdown table of the samples, wall-time ratios taken against the row named `limit`.
fn table(
    cases: &[Case],
    samples: &[Vec<Sample>],
    bytes: u64,
    limit: &str,
    with_commits: bool,
) -> String {
    let wall = |i: usize| median(samples[i].iter().map(|s| s.wall).collect());
    let limit_i = cases.iter().position(|c| c.name == limit).unwrap();
    let mut t =
        format!("| tool | wall s (median) | spread | CPU s | peak MiB | MiB/s | × {limit} |");
    t.push_str(if with_commits {
        " longest commit ms |\n|---|---|---|---|---|---|---|---|\n"
    } else {
        "\n|---|---|---|---|---|---|---|\n"
    });
    for (i, case) in cases.iter().enumerate() {
        let s = &samples[i];
        let walls: Vec<f64> = s.iter().map(|x| x.wall).collect();
        let _ = write!(
            t,
            "| {} | {:.2} | {} | {:.2} | {:.1} | {:.0} | {:.2} |",
            case.name,
            wall(i),
            spread(&walls),
            median(s.iter().map(|x| x.cpu).collect()),
            s.iter().map(|x| x.peak_mib).fold(0.0, f64::max),
            bytes as f64 / (1 << 20) as f64 / wall(i),
            wall(i) / wall(limit_i),
        );
        if with_commits {
            let _ = write!(
                t,
                " {:.1} |",
                s.iter().map(|x| x.longest_commit_ms).fold(0.0, f64::max)
            );
        }
        t.push('\n');
    }
    t
}

fn machine() -> String {
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let mem = fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| m.lines().next().map(str::to_string))
        .unwrap_or_default();
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    format!(
        "{cores} cores ({cpu}), {}, Linux {}",
        mem.replace("MemTotal:", "memory")
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" "),
        kernel.trim()
    )
}

/// The commit stall against the number of SSTs: this tool (final checkpoint before the
/// block, WAL brought forward under it), the design before (the checkpoint created while
/// commits are blocked, timed with the same statements), and mariabackup.
fn stall_section(opts: &Options, tool: &Path, work: &Path, path: &str) -> String {
    let mut t = String::from(
        "\n## Commit stall against the number of SSTs\n\n\
         The server runs with `--skip-rocksdb-manual-wal-flush`, the setting under which the tool takes the \
         final checkpoint before commits are blocked and brings its WAL forward (with MariaDB's default, \
         the checkpoint is taken under the block, as in \"checkpoint under the block\"). \
         \"checkpoint under the block\" is the design before: `BACKUP STAGE BLOCK_COMMIT`, the RocksDB \
         checkpoint, `BACKUP STAGE END`, timed from the client (memtables flushed just before). \
         \"ours\" is the tool's own figure (BLOCK_COMMIT issued to END done), \"fallbacks\" the runs in \
         which a flush or compaction made it take the checkpoint under the block after all. \
         \"longest commit\" is the slowest single-row commit of the probe during the whole run. \
         Medians of the runs.\n\n\
         | SSTs | checkpoint under the block, ms | ours, ms | fallbacks | ours: longest commit ms | mariabackup: longest commit ms |\n\
         |---|---|---|---|---|---|\n",
    );
    for target in [2_000u64, 10_000] {
        let target = ((target as f64 * opts.scale) as u64).max(20);
        let server = Server::start_with(&["--skip-rocksdb-manual-wal-flush"]);
        let ssts = many_ssts(&server, target);
        settle(&server);
        eprintln!("stall data set: {ssts} SST files");
        let (mut before, mut ours, mut ours_commit, mut mb_commit) =
            (vec![], vec![], vec![], vec![]);
        let mut fallbacks = 0;
        let mb_target = work.join("stall-mariabackup");
        for run in 0..opts.runs {
            eprintln!(
                "  run {}/{}: commit stall at {ssts} SSTs",
                run + 1,
                opts.runs
            );
            before.push(stall_before(
                &server,
                &work.join(format!("stall-ckpt-{run}")),
            ));
            let probe = StallProbe::start(&server);
            let out = Command::new(tool)
                .args(["backup", "--stream", "tar", "--user", "root", "--socket"])
                .arg(&server.socket)
                .stdout(std::process::Stdio::null())
                .output()
                .unwrap();
            ours_commit.push(probe.stop().as_secs_f64() * 1e3);
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let log = String::from_utf8_lossy(&out.stderr);
            ours.push(stall_logged(&log));
            fallbacks += usize::from(log.contains("Took the final checkpoint again"));
            let probe = StallProbe::start(&server);
            measure(
                &format!(
                    "mkdir -p {t} && mariabackup --backup --stream=xbstream --user=root --socket={} \
                     --target-dir={t} 2>/dev/null > /dev/null; rm -rf {t}",
                    server.socket.display(),
                    t = mb_target.display()
                ),
                path,
            );
            mb_commit.push(probe.stop().as_secs_f64() * 1e3);
        }
        let _ = writeln!(
            t,
            "| {ssts} | {:.1} | {:.1} | {fallbacks} of {} | {:.1} | {:.1} |",
            median(before),
            median(ours),
            opts.runs,
            median(ours_commit),
            median(mb_commit)
        );
    }
    t
}

/// Loads one table through `n` bulk-load sessions (one SST each) over four connections.
fn many_ssts(server: &Server, n: u64) -> usize {
    server.exec("CREATE DATABASE stall");
    let threads: Vec<_> = (0..4u64)
        .map(|c| {
            let mut conn = mysql::Conn::new(server.opts("root").db_name(Some("stall"))).unwrap();
            std::thread::spawn(move || {
                conn.query_drop(format!(
                    "CREATE TABLE t{c} (id INT PRIMARY KEY, pad VARBINARY(200)) ENGINE=ROCKSDB"
                ))
                .unwrap();
                for i in (c..n).step_by(4) {
                    conn.query_drop(format!(
                        "SET SESSION rocksdb_bulk_load = 1; \
                         INSERT INTO t{c} SELECT seq + {}, RANDOM_BYTES(100) FROM seq_1_to_50; \
                         SET SESSION rocksdb_bulk_load = 0",
                        i * 50
                    ))
                    .unwrap();
                }
            })
        })
        .collect();
    threads.into_iter().for_each(|t| t.join().unwrap());
    fs::read_dir(server.datadir.join("#rocksdb"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .ends_with(".sst")
        })
        .count()
}

/// Waits until RocksDB's MANIFEST has not changed for 3 s (the compactions that follow a
/// bulk load are done), at most 5 minutes.
fn settle(server: &Server) {
    let rocks = server.datadir.join("#rocksdb");
    let manifest = || {
        let current = fs::read_to_string(rocks.join("CURRENT")).unwrap_or_default();
        fs::metadata(rocks.join(current.trim()))
            .map(|m| m.len())
            .unwrap_or(0)
    };
    let deadline = Instant::now() + Duration::from_secs(300);
    let (mut last, mut since) = (manifest(), Instant::now());
    while since.elapsed() < Duration::from_secs(3) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        let now = manifest();
        if now != last {
            (last, since) = (now, Instant::now());
        }
    }
}

/// The design before: the checkpoint created while commits are blocked. Returns the stall.
fn stall_before(server: &Server, dir: &Path) -> f64 {
    let mut conn = server.conn();
    for sql in [
        "BACKUP STAGE START",
        "BACKUP STAGE FLUSH",
        "BACKUP STAGE BLOCK_DDL",
        "SET GLOBAL rocksdb_force_flush_memtable_now = 1",
    ] {
        conn.query_drop(sql).unwrap();
    }
    let blocked = Instant::now();
    conn.query_drop("BACKUP STAGE BLOCK_COMMIT").unwrap();
    conn.exec_drop(
        "SET GLOBAL rocksdb_create_checkpoint = ?",
        (dir.to_string_lossy().into_owned(),),
    )
    .unwrap();
    conn.query_drop("BACKUP STAGE END").unwrap();
    let stall = blocked.elapsed().as_secs_f64() * 1e3;
    fs::remove_dir_all(dir).unwrap();
    stall
}

/// The stall the tool logs: "commits were blocked for X ms".
fn stall_logged(log: &str) -> f64 {
    let after = log
        .split("commits were blocked for ")
        .nth(1)
        .unwrap_or_else(|| panic!("no commit stall in the log:\n{log}"));
    after.split(' ').next().unwrap().parse().unwrap()
}

fn main() {
    let opts = options();
    let tool = built_binary("myrocks-hotbackup");
    let work = tempfile::Builder::new()
        .prefix("myrocks-bench-")
        .tempdir()
        .unwrap();
    // The original tool's xbstream mode runs `xbstream`: MariaDB ships it as mbstream.
    let shim = work.path().join("bin");
    fs::create_dir(&shim).unwrap();
    std::os::unix::fs::symlink(binary("mbstream"), shim.join("xbstream")).unwrap();
    let path = format!(
        "{}:{}",
        shim.display(),
        std::env::var("PATH").unwrap_or_default()
    );

    let mut report = format!(
        "# Benchmarks\n\nProduced by `bench/run` (scale {}, {} runs per case, cases alternating; medians, \
         spread = min–max). Stream backups go through a pipe into `cat > /dev/null`; the limit is `cat` of the same \
         files through the same pipe. Extraction runs end with `sync` (ours syncs before it reports success). \
         \"longest commit\" is the slowest of single-row commits made every 2 ms during the run.\n\n\
         Machine: {}. Server: {}.\n",
        opts.scale,
        opts.runs,
        machine(),
        Command::new(binary("mariadbd")).arg("--version").output().map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string()).unwrap_or_default(),
    );
    for make in [large_files as fn(f64) -> DataSet, many_files] {
        let ds = make(opts.scale);
        eprintln!("data set {}: {}", ds.name, ds.description);
        let dir = work.path().join(ds.name.replace(' ', "-"));
        fs::create_dir(&dir).unwrap();
        measure(
            &format!("cat {}/#rocksdb/* > /dev/null", ds.server.datadir.display()),
            &path,
        ); // warm the cache

        let cases = backup_cases(&ds.server, &tool, &dir);
        let samples = run_cases(&cases, opts.runs, Some(&ds.server), &path);
        let _ = write!(
            report,
            "\n## {}: {}\n\n### Stream backup\n\n",
            ds.name, ds.description
        );
        report.push_str(&table(&cases, &samples, ds.bytes, "limit: cat", true));

        let (xb, tar) = (dir.join("stream.xb"), dir.join("stream.tar"));
        let sock = ds.server.socket.display();
        measure(
            &format!(
                "{} backup --stream xbstream --socket {sock} --user root > {} 2>/dev/null",
                tool.display(),
                xb.display()
            ),
            &path,
        );
        measure(
            &format!(
                "{} backup --stream tar --socket {sock} --user root > {} 2>/dev/null",
                tool.display(),
                tar.display()
            ),
            &path,
        );
        let cases = extract_cases(&tool, &dir, &xb, &tar);
        let samples = run_cases(&cases, opts.runs, None, &path);
        report.push_str("\n### Extraction\n\n");
        report.push_str(&table(&cases, &samples, ds.bytes, "mbstream -x", false));
        fs::remove_file(&xb).unwrap();
        fs::remove_file(&tar).unwrap();
    }
    report.push_str(&stall_section(&opts, &tool, work.path(), &path));
    if let Some(dir) = opts.output.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir).unwrap();
    }
    fs::write(&opts.output, &report).unwrap();
    println!("{report}");
    eprintln!("written to {}", opts.output.display());
}
