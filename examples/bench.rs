//! The benchmark: this tool against the original `myrocks_hotbackup`, `mariabackup` and the
//! limits (zero-copy `sendfile` of the same files into the same pipe, `cat`, `cp -r`), on the
//! same data, in one run. Run it with `bench/run`; see `bench/README.md`.
//!
//! For each data set it starts a sandbox server, loads the data, then times every case in
//! turn (alternating, `--runs` times each) while a probe commits single rows, and reports
//! medians and spreads of wall time, CPU time, peak memory, throughput, the ratio to the
//! limit and the longest commit. Cases are grouped by mode: stream backups, extraction,
//! directory backups, verify, compression, restore; then the throttle's accuracy, the page
//! cache left to the server, backups over a long, slow network path (large files only: ours
//! against `tar | nc` and `tar | ssh`, and the throttle over it), and the commit stall
//! against the number of SSTs; last, backups into a repository in S3 (SeaweedFS) against
//! `rclone copy` of the same files. `--only network` and `--only repository` run one of those
//! sections alone.
//!
//! `bench --sendfile` is the zero-copy limit itself: it sends the NUL-separated files named
//! on stdin to stdout with `sendfile`, through a pipe enlarged to 1 MiB.

use std::fmt::Write as _;
use std::fs;
use std::io::{BufRead, BufReader, Write as _};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use mysql::prelude::Queryable;
use sandbox::net::{self, Sshd};
use sandbox::s3::S3;
use sandbox::workload::StallProbe;
use sandbox::{binary, built_binary, Server};

struct Options {
    scale: f64,
    runs: usize,
    output: PathBuf,
    /// `--only network`: that section alone (on the large files), for its development.
    only_network: bool,
    /// `--only repository`: that section alone (on its own data), for its development.
    only_repository: bool,
    /// `--only mixed`: the mixed-server section alone.
    only_mixed: bool,
    /// `--only pitr`: the point-in-time recovery section alone.
    only_pitr: bool,
    /// `--net-mbit N`: the network section's rate, for its development.
    net_mbit: u32,
    /// `--dailies N`: the backups in the repository section's week (the full one included).
    dailies: usize,
}

fn options() -> Options {
    let mut o = Options {
        scale: 1.0,
        runs: 3,
        output: PathBuf::from("docs/BENCHMARKS.md"),
        only_network: false,
        only_repository: false,
        only_mixed: false,
        only_pitr: false,
        net_mbit: NET_MBIT,
        dailies: REPO_DAILIES,
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
            "--only" => match value().as_str() {
                "network" => o.only_network = true,
                "repository" => o.only_repository = true,
                "mixed" => o.only_mixed = true,
                "pitr" => o.only_pitr = true,
                other => panic!("--only takes: network, repository, mixed, pitr (not {other})"),
            },
            "--net-mbit" => o.net_mbit = value().parse().expect("--net-mbit takes a whole number"),
            "--dailies" => {
                o.dailies = value().parse().expect("--dailies takes a whole number");
                assert!(o.dailies >= 2, "--dailies takes 2 or more");
            }
            other => panic!(
                "unknown flag {other}; flags: --scale F --runs N --output FILE --only network|repository|mixed|pitr \
                 --net-mbit N --dailies N"
            ),
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
    /// CPU seconds of our backup process alone, from its `--report`.
    own_cpu: Option<f64>,
}

/// Runs `script` with bash and returns wall time, CPU time and peak RSS of the whole
/// pipeline (wait4 accounts for every process the shell waited for).
fn measure(script: &str, env_path: &str) -> Sample {
    measure_fed(script, env_path, None)
}

/// [`measure`], with `input` on the script's standard input when given.
fn measure_fed(script: &str, env_path: &str, input: Option<&str>) -> Sample {
    measure_with(script, env_path, input, &[])
}

/// [`measure`], with these variables added to the script's environment.
fn measure_env(script: &str, env_path: &str, envs: &[(String, String)]) -> Sample {
    measure_with(script, env_path, None, envs)
}

#[allow(clippy::zombie_processes)] // reaped by wait4 below, which also reports its usage
fn measure_with(
    script: &str,
    env_path: &str,
    input: Option<&str>,
    envs: &[(String, String)],
) -> Sample {
    let start = Instant::now();
    let mut child = Command::new("bash")
        .arg("-o")
        .arg("pipefail")
        .arg("-c")
        .arg(script)
        .env("PATH", env_path)
        .envs(envs.iter().map(|(k, v)| (k, v)))
        .stdin(match input {
            Some(_) => Stdio::piped(),
            None => Stdio::inherit(),
        })
        .spawn()
        .expect("cannot run bash");
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        // A script that exits without reading it is a failure seen below.
        let _ = writeln!(stdin, "{text}");
    }
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
        own_cpu: None,
    }
}

/// A thing to time: a name and a bash script (`{OUT}`-free: output goes to /dev/null).
struct Case {
    name: &'static str,
    script: String,
    /// Cleans up after a run (not timed).
    after: Option<String>,
    /// The `--report` file our backup writes, read for its own CPU time.
    report: Option<PathBuf>,
}

impl Case {
    fn new(name: &'static str, script: String) -> Case {
        Case {
            name,
            script,
            after: None,
            report: None,
        }
    }

    fn then(mut self, after: String) -> Case {
        self.after = Some(after);
        self
    }

    /// Our backup, with `--report` into `work`.
    fn ours(name: &'static str, script: &str, work: &Path) -> Case {
        let file: String = name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        let report = work.join(format!("report-{file}.json"));
        Case {
            name,
            script: script.replace("{REPORT}", &format!("--report {}", report.display())),
            after: None,
            report: Some(report),
        }
    }
}

struct DataSet {
    name: &'static str,
    /// The database holding its tables.
    db: &'static str,
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
        "large",
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
        "many",
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

fn finish_dataset(server: Server, name: &'static str, db: &'static str, what: String) -> DataSet {
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
        db,
        server,
        bytes,
        description,
    }
}

/// Lists, when it runs, the files a backup reads (RocksDB's, and the databases' table
/// files), NUL-separated; a file compacted away between listing and reading is skipped.
fn list_script(server: &Server) -> String {
    let d = server.datadir.display();
    format!(
        "find {d} -mindepth 2 -maxdepth 2 -type f \\( -path '*/#rocksdb/*' ! -name 'LOG*' ! -name LOCK \
         -o -name '*.frm' -o -name '*.opt' -o -name '*.MAD' -o -name '*.MAI' \\) -print0"
    )
}

/// `cat` of the files a backup reads, through a pipe.
fn cat_script(server: &Server) -> String {
    format!(
        "{{ {} | xargs -0 cat -- 2>/dev/null; true; }} | cat > /dev/null",
        list_script(server)
    )
}

/// The zero-copy limit: `sendfile` of the same files into a 1 MiB pipe, read by `cat`.
fn sendfile_script(server: &Server) -> String {
    let me = std::env::current_exe().unwrap();
    format!(
        "{} | {} --sendfile | cat > /dev/null",
        list_script(server),
        me.display()
    )
}

/// `bench --sendfile`: every NUL-separated file named on stdin, to stdout by `sendfile`.
fn sendfile_files() {
    use std::io::Read;
    use std::os::unix::io::AsRawFd;
    let mut names = Vec::new();
    std::io::stdin().read_to_end(&mut names).unwrap();
    unsafe { libc::fcntl(1, libc::F_SETPIPE_SZ, 1 << 20) };
    for name in names.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let path = Path::new(std::ffi::OsStr::from_bytes(name));
        let Ok(f) = fs::File::open(path) else {
            continue;
        };
        let mut left = f.metadata().unwrap().len() as usize;
        while left > 0 {
            let n = unsafe { libc::sendfile(1, f.as_raw_fd(), std::ptr::null_mut(), left) };
            assert!(n > 0, "sendfile: {}", std::io::Error::last_os_error());
            left -= n as usize;
        }
    }
}

fn backup_cases(server: &Server, tool: &Path, work: &Path) -> Vec<Case> {
    let sock = server.socket.display();
    let ckpt = server.datadir.join("orig-ckpt");
    fs::create_dir_all(&ckpt).unwrap();
    let mb_target = work.join("mariabackup-tmp");
    let tool = tool.display();
    let original = "/usr/bin/myrocks_hotbackup";
    let ours = |format: &str| {
        format!("{tool} backup --stream {format} --socket {sock} --user root {{REPORT}} 2>/dev/null | cat > /dev/null")
    };
    let original_case = |format: &str| {
        format!(
            "cd {} && {original} --user=root --socket={sock} --stream={format} --checkpoint_dir={} 2>/dev/null | cat > /dev/null",
            work.display(),
            ckpt.display()
        )
    };
    vec![
        Case::new("limit: sendfile", sendfile_script(server)),
        Case::new("cat, 64 KiB pipes", cat_script(server)),
        Case::ours("myrocks-hotbackup xbstream", &ours("xbstream"), work),
        Case::ours("myrocks-hotbackup tar", &ours("tar"), work),
        Case::new("original xbstream", original_case("xbstream")),
        Case::new("original tar", original_case("tar")),
        Case::new(
            "mariabackup xbstream",
            format!(
                "mkdir -p {t} && mariabackup --backup --stream=xbstream --user=root --socket={sock} --target-dir={t} 2>/dev/null | cat > /dev/null",
                t = mb_target.display()
            ),
        )
        .then(format!("rm -rf {}", mb_target.display())),
    ]
}

fn extract_cases(tool: &Path, work: &Path, xb: &Path, tar: &Path) -> Vec<Case> {
    let out = work.join("extracted");
    let (tool, out_d, xb, tar) = (tool.display(), out.display(), xb.display(), tar.display());
    let clean = format!("rm -rf {out_d}");
    // Every case ends with sync: ours syncs before it reports success, the others do not.
    vec![
        Case::new(
            "myrocks-hotbackup extract (xbstream)",
            format!("{tool} extract -C {out_d} {xb} 2>/dev/null && sync"),
        )
        .then(clean.clone()),
        Case::new(
            "mbstream -x",
            format!("mkdir -p {out_d} && mbstream -x -C {out_d} < {xb} && sync"),
        )
        .then(clean.clone()),
        Case::new(
            "myrocks-hotbackup extract (tar)",
            format!("{tool} extract -C {out_d} {tar} 2>/dev/null && sync"),
        )
        .then(clean.clone()),
        Case::new(
            "tar -x",
            format!("mkdir -p {out_d} && tar -xf {tar} -C {out_d} && sync"),
        )
        .then(clean),
    ]
}

/// Directory backups: ours against `cp -r` of the same directories and mariabackup, into
/// `target` (another filesystem than the data's, as a backup disk is). Every case ends with
/// its files synced (ours syncs each file; the others are followed by `sync`).
fn directory_cases(
    server: &Server,
    db: &str,
    tool: &Path,
    work: &Path,
    target: &Path,
) -> Vec<Case> {
    let sock = server.socket.display();
    let d = server.datadir.display();
    let out = target.join("dir-out");
    let o = out.display();
    let tool = tool.display();
    let clean = format!("rm -rf {o}");
    vec![
        Case::new(
            "limit: cp -r",
            format!("mkdir {o} && cp -r '{d}/#rocksdb' {d}/{db} {d}/mysql {o}/ && sync"),
        )
        .then(clean.clone()),
        Case::ours(
            "myrocks-hotbackup --target-dir",
            &format!("{tool} backup --target-dir {o} --socket {sock} --user root {{REPORT}} 2>/dev/null"),
            work,
        )
        .then(clean.clone()),
        Case::new(
            "mariabackup --target-dir",
            format!("mariabackup --backup --target-dir={o} --user=root --socket={sock} 2>/dev/null && sync"),
        )
        .then(clean),
    ]
}

/// Compression into a directory, on one core and on all of them.
fn compression_cases(server: &Server, tool: &Path, work: &Path, target: &Path) -> Vec<Case> {
    let sock = server.socket.display();
    let out = target.join("zst-out");
    let o = out.display();
    let tool = tool.display();
    let clean = format!("rm -rf {o}");
    let case = |name, args: &str| {
        Case::ours(
            name,
            &format!("{tool} backup --target-dir {o} {args} --socket {sock} --user root {{REPORT}} 2>/dev/null"),
            work,
        )
        .then(clean.clone())
    };
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
    let all = format!("--compress --compress-threads {cpus}");
    vec![
        case("no compression", ""),
        case("zstd:3, 1 thread", "--compress --compress-threads 1"),
        case("zstd:3, all cores", &all),
        case(
            "zstd:1, all cores",
            &all.replace("--compress ", "--compress=zstd:1 "),
        ),
    ]
}

/// `verify` of a directory backup against reading its files with `cat`.
fn verify_cases(tool: &Path, dir: &Path) -> Vec<Case> {
    let d = dir.display();
    vec![
        Case::new(
            "limit: cat of the backup's files",
            format!("find {d} -type f -print0 | xargs -0 cat > /dev/null"),
        ),
        Case::new(
            "myrocks-hotbackup verify",
            format!("{} verify {d} 2>/dev/null", tool.display()),
        ),
    ]
}

/// Restores: our copy-back of a directory backup against `cp -r` of it and mariabackup's
/// copy-back of its own (prepared) backup.
fn restore_cases(tool: &Path, ours: &Path, mb: &Path, work: &Path) -> Vec<Case> {
    let target = work.join("restored");
    let t = target.display();
    let clean = format!("rm -rf {t}");
    vec![
        Case::new(
            "limit: cp -r",
            format!("cp -r {} {t} && sync", ours.display()),
        )
        .then(clean.clone()),
        Case::new(
            "myrocks-hotbackup copy-back",
            format!(
                "{} copy-back --backup-dir {} --datadir {t} 2>/dev/null",
                tool.display(),
                ours.display()
            ),
        )
        .then(clean.clone()),
        Case::new(
            "mariabackup --copy-back",
            format!(
                "mariabackup --copy-back --target-dir={} --datadir={t} 2>/dev/null && sync",
                mb.display()
            ),
        )
        .then(clean),
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
            if let Some(report) = &case.report {
                let r: serde_json::Value =
                    serde_json::from_slice(&fs::read(report).unwrap()).unwrap();
                s.own_cpu = r["cpu_secs"].as_f64();
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
    let mut t = format!(
        "| tool | wall s (median) | spread | CPU s | peak MiB | MiB/s | × {limit} | our process: CPU s/GiB |"
    );
    t.push_str(if with_commits {
        " longest commit ms |\n|---|---|---|---|---|---|---|---|---|\n"
    } else {
        "\n|---|---|---|---|---|---|---|---|\n"
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
        let own: Vec<f64> = s.iter().filter_map(|x| x.own_cpu).collect();
        match own.is_empty() {
            true => t.push_str(" – |"),
            false => {
                let _ = write!(
                    t,
                    " {:.3} |",
                    median(own) / (bytes as f64 / (1u64 << 30) as f64)
                );
            }
        }
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

/// The server's data files: RocksDB's and the data set's tables.
fn server_files(ds: &DataSet) -> Vec<PathBuf> {
    [
        ds.server.datadir.join("#rocksdb"),
        ds.server.datadir.join(ds.db),
    ]
    .iter()
    .flat_map(|d| fs::read_dir(d).unwrap().map(|e| e.unwrap().path()))
    .filter(|p| p.is_file())
    .collect()
}

/// Percentage of the pages of `files` in the page cache.
fn residency(files: &[PathBuf]) -> f64 {
    let (mut resident, mut total) = (0usize, 0usize);
    for path in files {
        let Ok(f) = fs::File::open(path) else {
            continue;
        };
        let len = f.metadata().unwrap().len();
        if let Some(pages) = myrocks_hotbackup::sys::resident_pages(&f, len) {
            resident += pages.iter().filter(|&&r| r).count();
            total += pages.len();
        }
    }
    resident as f64 * 100.0 / total.max(1) as f64
}

fn evict(files: &[PathBuf]) {
    for path in files {
        if let Ok(f) = fs::File::open(path) {
            myrocks_hotbackup::sys::drop_cache(&f, 0, 0);
        }
    }
}

/// How much of the server's files each tool leaves in the page cache, from a cold cache
/// (none of it cached) and from a hot one (all of it cached).
fn page_cache_section(ds: &DataSet, tool: &Path, target: &Path, path: &str) -> String {
    let files = server_files(ds);
    let sock = ds.server.socket.display();
    let out = target.join("cache-out");
    let o = out.display();
    let cases = [
        (
            "myrocks-hotbackup, directory",
            format!(
                "{} backup --target-dir {o} --socket {sock} --user root 2>/dev/null",
                tool.display()
            ),
        ),
        (
            "myrocks-hotbackup, xbstream",
            format!(
                "{} backup --stream xbstream --socket {sock} --user root 2>/dev/null > /dev/null",
                tool.display()
            ),
        ),
        (
            "mariabackup, directory",
            format!(
                "mariabackup --backup --target-dir={o} --user=root --socket={sock} 2>/dev/null"
            ),
        ),
        (
            "cp -r",
            format!(
                "mkdir {o} && cp -r '{}/#rocksdb' {o}/",
                ds.server.datadir.display()
            ),
        ),
    ];
    let mut t = String::from(
        "\n### Page cache of the server's files\n\n\
         Share of the pages of the server's data files (RocksDB's and the tables') in the page cache after \
         each tool ran: from a cold cache (the files evicted first) and from a hot one (all read first). \
         A light touch leaves the cold cache cold and the hot cache hot.\n\n\
         | tool | cold: cached after | hot: cached after |\n|---|---|---|\n",
    );
    for (name, script) in &cases {
        evict(&files);
        let before_cold = residency(&files);
        measure(script, path);
        let cold = residency(&files);
        measure(&format!("rm -rf {o}"), path);
        measure(
            &format!(
                "cat '{}'/#rocksdb/* > /dev/null",
                ds.server.datadir.display()
            ),
            path,
        );
        let before_hot = residency(&files);
        measure(script, path);
        let hot = residency(&files);
        measure(&format!("rm -rf {o}"), path);
        eprintln!("  page cache {name}: cold {before_cold:.0}% -> {cold:.0}%, hot {before_hot:.0}% -> {hot:.0}%");
        let _ = writeln!(
            t,
            "| {name} | {cold:.1}% (from {before_cold:.1}%) | {hot:.1}% (from {before_hot:.1}%) |"
        );
    }
    t
}

/// The throttle's accuracy: a directory backup capped so that it takes about 25 s; the
/// bytes the process read (`rchar`) are sampled every 250 ms, and the highest rate over any
/// 10-second window is compared with the cap.
fn throttle_section(ds: &DataSet, tool: &Path, work: &Path) -> String {
    let cap_mib = ((ds.bytes >> 20) / 25).max(1);
    let out = work.join("throttle-out");
    let mut child = Command::new(tool)
        .args([
            "backup",
            "--user",
            "root",
            "--avg-mbytes-per-sec",
            &cap_mib.to_string(),
            "--socket",
        ])
        .arg(&ds.server.socket)
        .arg("--target-dir")
        .arg(&out)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let io = format!("/proc/{}/io", child.id());
    let start = Instant::now();
    let mut samples: Vec<(f64, u64)> = Vec::new();
    while child.try_wait().unwrap().is_none() {
        if let Ok(text) = fs::read_to_string(&io) {
            let rchar = text
                .lines()
                .find_map(|l| l.strip_prefix("rchar: "))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            samples.push((start.elapsed().as_secs_f64(), rchar));
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let secs = start.elapsed().as_secs_f64();
    fs::remove_dir_all(&out).unwrap();
    let cap = (cap_mib << 20) as f64;
    let mut worst: f64 = 0.0;
    for (i, &(t0, b0)) in samples.iter().enumerate() {
        if let Some(&(t1, b1)) = samples[i..].iter().find(|(t, _)| *t >= t0 + 10.0) {
            worst = worst.max((b1 - b0) as f64 / (t1 - t0));
        }
    }
    let total = samples.last().map_or(0, |s| s.1) as f64;
    format!(
        "\n### Throttle accuracy\n\n`--avg-mbytes-per-sec {cap_mib}`: {:.2} GiB read in {secs:.1} s, {:.1} MiB/s on average \
         ({:+.1}% against the cap); the fastest 10-second window ran at {:.1} MiB/s ({:+.1}%).\n",
        total / (1u64 << 30) as f64,
        total / secs / (1 << 20) as f64,
        (total / secs / cap - 1.0) * 100.0,
        worst / (1 << 20) as f64,
        (worst / cap - 1.0) * 100.0,
    )
}

/// The network section's path: its rate each way and its round-trip time. The path's delay
/// line passes every packet through this process, at a CPU cost that limits the rate this
/// 2-core machine emulates: about 420 Mbit/s with both cores busy and nothing else running
/// (8 TCP streams); 300 Mbit/s leaves CPU to the tools measured.
const NET_MBIT: u32 = 300;
const NET_RTT_MS: u32 = 50;
/// Runs of each network case, at most: each one sends the whole data set at the path's
/// rate (a minute at scale 1), so the section keeps to about five minutes.
const NET_RUNS: usize = 1;

/// A transfer across the path: receivers started in rx (program and arguments each), then a
/// sender script whose network programs run in tx through `ip netns exec`. With `url`, the
/// first receiver prints a URL on its first line, given to the sender on its standard input.
struct NetCase {
    name: &'static str,
    receivers: Vec<Vec<String>>,
    /// Ports the receivers listen on, waited for before the sender starts.
    ports: Vec<u16>,
    url: bool,
    script: String,
    /// The `--report` file our backup writes.
    report: Option<PathBuf>,
    /// Cleans up after a run (not timed).
    after: Option<String>,
}

/// One timed transfer: wall time from the sender's start until the last receiver exited,
/// CPU and peak memory of the sender's pipeline (in `sample`), the receivers' peak memory.
struct NetSample {
    sample: Sample,
    receiver_peak_mib: Option<f64>,
    receiver_cpu: Option<f64>,
    /// Share of the packets the path's delay line passed on more than 1 ms late, in percent.
    late_pct: f64,
    /// Packets the delay line dropped (it did not keep up).
    line_drops: u64,
    /// Our report's `network` figures.
    network: Option<serde_json::Value>,
    /// Our snapshot rounds (the SSTs): seconds from the start, and MiB sent.
    sst_phase: Option<(f64, f64)>,
}

/// Our snapshot rounds, from the backup's log: the last "Snapshot round finished. Elapsed
/// Time: S." and the size of every "round N sent K SST files, 1.23 GiB)" (two decimals).
fn sst_phase(log: &str) -> Option<(f64, f64)> {
    let (mut secs, mut mib) = (None, 0.0);
    for line in log.lines() {
        let Some(rest) = line.split("Snapshot round finished. Elapsed Time: ").nth(1) else {
            continue;
        };
        secs = rest.split(' ').next()?.trim_end_matches('.').parse().ok();
        let mut size = rest.split(" SST files, ").nth(1)?.split([' ', ')']);
        let value: f64 = size.next()?.parse().ok()?;
        let unit = size.next()?;
        let unit = ["B", "KiB", "MiB", "GiB", "TiB"]
            .iter()
            .position(|u| *u == unit)?;
        mib += value * 1024f64.powi(unit as i32 - 2);
    }
    Some((secs?, mib))
}

/// Receivers still running: killed (and reaped) when dropped, as after a failed sender.
struct Receivers(Vec<std::process::Child>);

impl Drop for Receivers {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Waits (10 s at most) until something listens on each of `ports` in the rx namespace.
fn wait_listening(net: &net::Path, ports: &[u16]) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = net.rx("ss").arg("-Hltn").output().expect("cannot run ss");
        let listening = String::from_utf8_lossy(&out.stdout).into_owned();
        if ports.iter().all(|p| listening.contains(&format!(":{p} "))) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "nothing listens on {ports:?} in rx:\n{listening}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Times one transfer of `case` across `net`. The receivers' standard error goes to `log`,
/// shown if one fails; the sender's is read from `sender_log`, where its script put it.
fn transfer(
    net: &net::Path,
    case: &NetCase,
    env_path: &str,
    log: &Path,
    sender_log: &Path,
) -> NetSample {
    let before = net.stats();
    let mut receivers = Receivers(Vec::new());
    for (i, argv) in case.receivers.iter().enumerate() {
        let stderr = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let piped = case.url && i == 0;
        let child = net
            .rx(&argv[0])
            .args(&argv[1..])
            .stdin(Stdio::null())
            .stdout(if piped { Stdio::piped() } else { Stdio::null() })
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {argv:?}: {e}"));
        receivers.0.push(child);
    }
    let url = case.url.then(|| {
        let mut line = String::new();
        let stdout = receivers.0[0].stdout.take().unwrap();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        assert!(
            line.starts_with("mhb://"),
            "the receiver printed {line:?}:\n{}",
            fs::read_to_string(log).unwrap_or_default()
        );
        line.trim().to_string()
    });
    wait_listening(net, &case.ports);
    let start = Instant::now();
    let mut sample = measure_fed(&case.script, env_path, url.as_deref());
    // Then every receiver must finish, with success, within two minutes.
    let deadline = Instant::now() + Duration::from_secs(120);
    let (mut peak, mut cpu): (f64, f64) = (0.0, 0.0);
    while let Some(child) = receivers.0.first() {
        let pid = child.id() as i32;
        let mut status = 0;
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        let got = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut usage) };
        if got == pid {
            // Reaped: not to be killed by the guard.
            std::mem::forget(receivers.0.remove(0));
            let exit = std::process::ExitStatus::from_raw(status);
            assert!(
                exit.success(),
                "the receiver of {} failed ({exit}):\n{}",
                case.name,
                fs::read_to_string(log).unwrap_or_default()
            );
            let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
            peak = peak.max(usage.ru_maxrss as f64 / 1024.0);
            cpu += secs(usage.ru_utime) + secs(usage.ru_stime);
            continue;
        }
        assert!(
            Instant::now() < deadline,
            "the receiver of {} did not finish within 2 minutes of its sender:\n{}",
            case.name,
            fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    sample.wall = start.elapsed().as_secs_f64();
    let after = net.stats();
    let packets = (after.packets - before.packets).max(1) as f64;
    let mut network = None;
    if let Some(report) = &case.report {
        let r: serde_json::Value = serde_json::from_slice(&fs::read(report).unwrap()).unwrap();
        sample.own_cpu = r["cpu_secs"].as_f64();
        network = Some(r["network"].clone());
    }
    if let Some(after) = &case.after {
        measure(after, env_path);
    }
    let sender_log = fs::read_to_string(sender_log).unwrap_or_default();
    NetSample {
        sst_phase: case.report.as_ref().and_then(|_| sst_phase(&sender_log)),
        sample,
        receiver_peak_mib: (!case.receivers.is_empty()).then_some(peak),
        receiver_cpu: (!case.receivers.is_empty()).then_some(cpu),
        late_pct: (after.late_packets - before.late_packets) as f64 * 100.0 / packets,
        line_drops: after.line_drops - before.line_drops,
        network,
    }
}

/// The round-trip time from tx to rx: the fastest of five TCP connections to `port` (one
/// round trip each).
fn connect_rtt_ms(net: &net::Path, port: u16) -> f64 {
    let addr = std::net::SocketAddr::from((net.rx_addr, port));
    (0..5)
        .map(|_| {
            net.in_tx(|| {
                let start = Instant::now();
                std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
                start.elapsed().as_secs_f64() * 1e3
            })
        })
        .fold(f64::MAX, f64::min)
}

/// Backups over a long, slow path: ours (`receive` on the far host, `backup --to` here)
/// against the server's files through one TCP stream (`tar | nc`) and through ssh, on a
/// path of `NET_MBIT` each way and `NET_RTT_MS` round trip whose raw capacity is measured
/// first; then the throttle's accuracy over the path.
fn network_section(
    ds: &DataSet,
    tool: &Path,
    work: &Path,
    target: &Path,
    env_path: &str,
    opts: &Options,
) -> String {
    let mbit = opts.net_mbit;
    let net = net::Path::new(mbit, NET_RTT_MS);
    let sshd = Sshd::start(&net);
    let rtt = connect_rtt_ms(&net, sshd.port());
    let runs = opts.runs.min(NET_RUNS);
    let (tx, rx) = (&net.tx_ns, net.rx_addr);
    let link = f64::from(mbit) / 8.0; // MB/s
    let log = work.join("net-receiver.log");
    let sender_log = work.join("net-sender.log");
    // A failed sender shows what it said.
    let sender = |script: String| {
        format!(
            "{{ {script}; }} 2>{l} || {{ s=$?; cat {l} >&2; exit $s; }}",
            l = sender_log.display()
        )
    };
    let nc = |port: u16| vec!["nc".to_string(), "-l".to_string(), port.to_string()];

    // Raw capacity: eight TCP streams of zeros, about 10 s at the rate (less at small scales).
    let secs = (10.0 * opts.scale).clamp(2.0, 10.0);
    let ports: Vec<u16> = (5100..5108).collect();
    let each = (link * 1e6 * secs / ports.len() as f64) as u64;
    let raw = NetCase {
        name: "8 nc streams",
        receivers: ports.iter().map(|&p| nc(p)).collect(),
        ports: ports.clone(),
        url: false,
        script: sender(format!(
            "{} for p in $w; do wait $p || exit 1; done",
            ports
                .iter()
                .map(|p| format!(
                    "head -c {each} /dev/zero | ip netns exec {tx} nc -N {rx} {p} & w=\"$w $!\";"
                ))
                .collect::<String>()
        )),
        report: None,
        after: None,
    };
    eprintln!("  network: raw capacity, {}", raw.name);
    // The bytes the router passes on to rx, every 250 ms meanwhile: the best 2-second
    // window is the path's capacity, without TCP's ramp-up and the streams' uneven ends.
    let done = std::sync::atomic::AtomicBool::new(false);
    let (capacity, counts) = std::thread::scope(|s| {
        let sampler = s.spawn(|| {
            let mut counts = Vec::new();
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                counts.push((Instant::now(), net.stats().to_rx_bytes));
                std::thread::sleep(Duration::from_millis(250));
            }
            counts
        });
        let capacity = transfer(&net, &raw, env_path, &log, &sender_log);
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        (capacity, sampler.join().unwrap())
    });
    let raw_mb = (each * ports.len() as u64) as f64 / 1e6 / capacity.sample.wall;
    let mut wire_mbit: f64 = 0.0;
    for (i, &(t0, b0)) in counts.iter().enumerate() {
        if let Some(&(t1, b1)) = counts[i..]
            .iter()
            .find(|(t, _)| *t >= t0 + Duration::from_secs(2))
        {
            wire_mbit = wire_mbit.max((b1 - b0) as f64 * 8.0 / 1e6 / (t1 - t0).as_secs_f64());
        }
    }

    // The cases: the files a backup reads, from tx to rx.
    let received = target.join("net-received");
    let files = format!(
        "{} | tar -cf - --null -T - 2>/dev/null",
        list_script(&ds.server)
    );
    let ours = |name: &'static str, extra: &str| {
        let report = work.join(format!("report-net-{}.json", name.len()));
        NetCase {
            name,
            receivers: vec![vec![
                tool.display().to_string(),
                "receive".into(),
                "--target-dir".into(),
                received.display().to_string(),
                "--listen".into(),
                rx.to_string(),
            ]],
            ports: vec![],
            url: true,
            script: sender(format!(
                "ip netns exec {tx} {} backup --socket {} --user root --to - --report {}{extra}",
                tool.display(),
                ds.server.socket.display(),
                report.display()
            )),
            report: Some(report),
            after: Some(format!("rm -rf {}", received.display())),
        }
    };
    let cases = [
        ours("myrocks-hotbackup backup --to", ""),
        NetCase {
            name: "tar to nc (one TCP stream)",
            receivers: vec![nc(5200)],
            ports: vec![5200],
            url: false,
            script: sender(format!("{files} | ip netns exec {tx} nc -N {rx} 5200")),
            report: None,
            after: None,
        },
        NetCase {
            name: "tar to ssh (cat > /dev/null)",
            receivers: vec![],
            ports: vec![],
            url: false,
            script: sender(format!(
                "{files} | ip netns exec {tx} {} root@{rx} 'cat > /dev/null'",
                sshd.ssh_command()
            )),
            report: None,
            after: None,
        },
    ];
    let mut samples: Vec<Vec<NetSample>> = cases.iter().map(|_| Vec::new()).collect();
    for run in 0..runs {
        for (i, case) in cases.iter().enumerate() {
            eprintln!("  network run {}/{runs}: {}", run + 1, case.name);
            samples[i].push(transfer(&net, case, env_path, &log, &sender_log));
        }
    }

    let packet_us = 1514.0 * 8.0 / f64::from(mbit);
    let mut t = format!(
        "\n### Over the network\n\n\
         From one host to another through a router (three network namespaces, `sandbox::net::Path`): \
         {mbit} Mbit/s ({link:.1} MB/s) each way, {NET_RTT_MS} ms round trip (measured: {rtt:.1} ms \
         for a TCP connection), MTU 1500, the bottleneck's queue one bandwidth-delay product; the round \
         trip is a delay line in the benchmark's own process, which copies every packet: this 2-core \
         machine emulates about 420 Mbit/s at most, with both cores busy and nothing else running, \
         and 1 Gbit/s not at all. \
         Raw capacity: 8 `nc` streams of zeros carried {raw_mb:.1} MB/s ({:.2} × rate) over {:.1} s, \
         TCP's ramp-up and the streams' uneven ends included; at best, over 2 seconds, the path carried \
         {wire_mbit:.0} Mbit/s of whole packets ({:.2} × rate). Headers take 4.4% of a full packet \
         (66 of 1514 bytes), so the data of a TCP stream can reach 0.96 × rate at most. \
         Each case sends the files a backup reads from the sandbox server on the first host: ours as \
         `receive --listen` on the far host and `backup --to -` (the receiver's URL on standard input) \
         with its default streams; the others as a tar of the same files through one TCP stream \
         (`nc`) and through ssh (OpenSSH, default cipher, into `cat > /dev/null`). Ours receives into a \
         tmpfs and syncs every file. MB/s = 10^6 bytes of SST data per second of wall time, from the \
         sender's start until the receiver exited; \"× rate\" is that against the path's rate. CPU \
         and peak memory are the sending pipeline's, \"receiver\" ones the receiving process's \
         (not measured for ssh: sshd's session). \"late\" is the share of packets the delay line passed \
         on more than 1 ms after they were due: it fell behind, for want of CPU or with a burst of \
         packets to pass on at once (each costs it about 20 µs of CPU, a full packet takes {packet_us:.0} µs \
         at the rate: most of a burst waits in the bottleneck's queue anyway). Medians of {runs} runs \
         (each sends the whole data set).\n\n\
         | tool | wall s (median) | spread | MB/s | × rate | CPU s | peak MiB | receiver CPU s | receiver peak MiB | our process: CPU s/GiB | late |\n\
         |---|---|---|---|---|---|---|---|---|---|---|\n",
        raw_mb / link,
        capacity.sample.wall,
        wire_mbit / f64::from(mbit),
    );
    let gib = ds.bytes as f64 / (1u64 << 30) as f64;
    for (case, s) in cases.iter().zip(&samples) {
        let walls: Vec<f64> = s.iter().map(|x| x.sample.wall).collect();
        let wall = median(walls.clone());
        let mb = ds.bytes as f64 / 1e6 / wall;
        let own: Vec<f64> = s.iter().filter_map(|x| x.sample.own_cpu).collect();
        let receiver = s
            .iter()
            .filter_map(|x| x.receiver_peak_mib)
            .reduce(f64::max);
        let receiver_cpu: Vec<f64> = s.iter().filter_map(|x| x.receiver_cpu).collect();
        let _ = writeln!(
            t,
            "| {} | {wall:.2} | {} | {mb:.1} | {:.2} | {:.2} | {:.1} | {} | {} | {} | {:.2}% |",
            case.name,
            spread(&walls),
            mb / link,
            median(s.iter().map(|x| x.sample.cpu).collect()),
            s.iter().map(|x| x.sample.peak_mib).fold(0.0, f64::max),
            match receiver_cpu.is_empty() {
                true => "–".to_string(),
                false => format!("{:.2}", median(receiver_cpu)),
            },
            receiver.map_or("–".to_string(), |m| format!("{m:.1}")),
            match own.is_empty() {
                true => "–".to_string(),
                false => format!("{:.3}", median(own) / gib),
            },
            s.iter().map(|x| x.late_pct).fold(0.0, f64::max),
        );
    }
    let drops: u64 = samples.iter().flatten().map(|x| x.line_drops).sum();
    let last = samples[0].last().unwrap();
    if let Some(n) = &last.network {
        let mib = |k: &str| n[k].as_f64().unwrap_or(0.0) / (1 << 20) as f64;
        let _ = write!(
            t,
            "\nOurs (last run): {} streams, {:.1} MiB sent, {:.1} MiB resent, {} reconnects; ",
            n["streams"],
            mib("bytes_sent"),
            mib("bytes_resent"),
            n["reconnects"]
        );
    }
    match last.sst_phase {
        Some((secs, mib)) => {
            let mb = mib * (1 << 20) as f64 / 1e6 / secs;
            let _ = write!(
                t,
                "its snapshot round sent the SSTs ({mib:.1} MiB) in {secs:.1} s, {mb:.1} MB/s ({:.2} × rate); \
                 everything else took {:.1} s more until the receiver was done.",
                mb / link,
                last.sample.wall - secs
            );
        }
        None => t.push_str("no snapshot round in its log, so no rate of its SSTs alone."),
    }
    let _ = writeln!(
        t,
        " The delay line dropped {drops} packets over all the runs."
    );

    // The throttle over the path: 40 MiB/s, or 80% of the rate if that is less.
    let cap_mib = 40u64.min((link * 0.8 * 1e6) as u64 >> 20).max(1);
    let throttled = ours("throttled", &format!(" --avg-mbytes-per-sec {cap_mib}"));
    eprintln!("  network: throttled to {cap_mib} MiB/s");
    let s = transfer(&net, &throttled, env_path, &log, &sender_log);
    let r: serde_json::Value =
        serde_json::from_slice(&fs::read(throttled.report.as_ref().unwrap()).unwrap()).unwrap();
    let bytes = r["bytes"].as_f64().unwrap_or(0.0);
    let own_rate = bytes / r["duration_secs"].as_f64().unwrap_or(f64::MAX) / (1 << 20) as f64;
    let wall_rate = bytes / s.sample.wall / (1 << 20) as f64;
    let _ = write!(
        t,
        "\nThrottle over the path: `--avg-mbytes-per-sec {cap_mib}`: {:.2} GiB in {:.1} s until the \
         receiver was done, {wall_rate:.1} MiB/s ({:+.1}% against the cap); the backup's own report: \
         {own_rate:.1} MiB/s ({:+.1}%)",
        bytes / (1u64 << 30) as f64,
        s.sample.wall,
        (wall_rate / cap_mib as f64 - 1.0) * 100.0,
        (own_rate / cap_mib as f64 - 1.0) * 100.0,
    );
    match s.sst_phase {
        Some((secs, mib)) => {
            let _ = writeln!(
                t,
                "; its SSTs alone ({mib:.1} MiB in {secs:.1} s): {:.1} MiB/s ({:+.1}%).",
                mib / secs,
                (mib / secs / cap_mib as f64 - 1.0) * 100.0
            );
        }
        None => t.push_str("; no snapshot round in its log, so no rate of its SSTs alone.\n"),
    }
    t
}

/// The repository section's week: this many backups, the full one and the dailies after it.
const REPO_DAILIES: usize = 7;
/// The repository section's tables; its data is about 1 GiB × scale in all.
const REPO_TABLES: u64 = 4;

/// Rows in each of the repository section's tables (1000-byte rows).
fn repo_rows(scale: f64) -> u64 {
    ((1u64 << 30) as f64 * scale / 1000.0 / REPO_TABLES as f64).max(100.0) as u64
}

/// Small SSTs, as a server's are next to its terabytes (8 MiB at scale 1: a hundred or
/// more), of incompressible rows, compacted and settled: a server long past its load.
fn repository_data(scale: f64) -> DataSet {
    let target = ((8u64 << 20) as f64 * scale).max((1u64 << 20) as f64) as u64;
    let cf = format!(
        "--rocksdb-default-cf-options=target_file_size_base={target};write_buffer_size={}",
        4 * target
    );
    let server = Server::start_with(&[&cf]);
    let rows = repo_rows(scale);
    bulk_load(&server, "repo", REPO_TABLES, rows);
    server.exec(
        "SET GLOBAL rocksdb_force_flush_memtable_now = 1; SET GLOBAL rocksdb_compact_cf = 'default'",
    );
    settle(&server);
    finish_dataset(
        server,
        "repository",
        "repo",
        format!(
            "{REPO_TABLES} tables of 1000-byte random rows, target_file_size_base {:.1} MiB, compacted",
            target as f64 / (1 << 20) as f64
        ),
    )
}

/// One day's churn: 1% of the rows, a contiguous run of the first table (recent rows are
/// the ones that change; each day another run), rewritten, then the memtable flushed and
/// the compactions it starts waited for.
fn repo_churn(server: &Server, scale: f64, day: u64) {
    let rows = repo_rows(scale);
    let n = (rows * REPO_TABLES / 100).max(1);
    let first = 1 + (rows / 4 + day * n) % rows;
    server.exec(&format!(
        "SET SESSION rocksdb_max_row_locks = 100000000;
         UPDATE repo.t0 SET pad = RANDOM_BYTES(1000) WHERE id BETWEEN {first} AND {};
         SET GLOBAL rocksdb_force_flush_memtable_now = 1",
        first + n - 1
    ));
    settle(server);
}

/// The names of the server's SST files.
fn sst_names(server: &Server) -> std::collections::BTreeSet<String> {
    fs::read_dir(server.datadir.join("#rocksdb"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".sst"))
        .collect()
}

/// Bytes and number of the files below `dir`.
fn dir_size(dir: &Path) -> (u64, u64) {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let m = e.metadata().unwrap();
            if m.is_dir() {
                dir_size(&e.path())
            } else {
                (m.len(), 1)
            }
        })
        .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
}

/// rclone's remote `sw:` for the S3 sandbox, configured through the environment alone
/// (rclone runs with `--config /dev/null`: it reads and writes no configuration file).
fn rclone_env(s3: &S3) -> Vec<(String, String)> {
    [
        ("TYPE", "s3"),
        ("PROVIDER", "SeaweedFS"),
        ("ENDPOINT", &s3.endpoint),
        ("ACCESS_KEY_ID", &s3.access_key),
        ("SECRET_ACCESS_KEY", &s3.secret_key),
        ("REGION", &s3.region),
    ]
    .into_iter()
    .map(|(k, v)| (format!("RCLONE_CONFIG_SW_{k}"), v.to_string()))
    .collect()
}

/// rclone's last stats (`--use-json-log`): bytes transferred, files transferred, files
/// checked (found the same, by size and modification time, and skipped).
fn rclone_stats(log: &str) -> (u64, u64, u64) {
    log.lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find_map(|v| {
            let s = &v["stats"];
            Some((
                s["bytes"].as_u64()?,
                s["transfers"].as_u64()?,
                s["checks"].as_u64()?,
            ))
        })
        .unwrap_or_else(|| panic!("no stats in rclone's log:\n{log}"))
}

/// The download part of our restore, from its log: "Downloaded and checked 1.02 GiB in 9.1 s".
fn download_secs(log: &str) -> Option<f64> {
    let rest = log.split("Downloaded and checked ").nth(1)?;
    rest.split(" in ").nth(1)?.split(' ').next()?.parse().ok()
}

/// Backups into a repository in S3 (a SeaweedFS sandbox on loopback) against `rclone copy`
/// of the same files to the same store: a full backup, one after 1% churn, a restore, and
/// what a week of daily backups stores.
fn repository_section(
    tool: &Path,
    work: &Path,
    target: &Path,
    env_path: &str,
    opts: &Options,
) -> String {
    let ds = repository_data(opts.scale);
    eprintln!("data set {}: {}", ds.name, ds.description);
    let s3 = S3::start();
    let mut env = s3.env();
    env.extend(rclone_env(&s3));
    let (tool, sock) = (tool.display(), ds.server.socket.display());
    let log = work.join("repository.log");
    // Every step starts with the page cache's dirty pages written (the store's too), and a
    // failed one shows what it said; its standard error is kept in `log`.
    let run = |script: String| {
        measure_env("sync", env_path, &[]);
        measure_env(
            &format!(
                "{{ {script}; }} 2>{l} || {{ s=$?; cat {l} >&2; exit $s; }}",
                l = log.display()
            ),
            env_path,
            &env,
        )
    };
    // A timed step, logged.
    let timed = |what: &str, script: String| {
        let s = run(script);
        eprintln!("    {what}: {:.2} s, CPU {:.2} s", s.wall, s.cpu);
        s
    };
    let said = || fs::read_to_string(&log).unwrap_or_default();
    // AWS_CA_BUNDLE, where set, breaks rclone's S3 client (its HTTP transport is its own);
    // the store is plain HTTP on loopback anyway.
    let rclone =
        "env -u AWS_CA_BUNDLE rclone --config /dev/null --use-json-log --stats-log-level NOTICE";
    let remote = |prefix: &str| format!("sw:{}/{prefix}", s3.bucket);
    let stored = |prefix: &str| -> u64 {
        let out = Command::new("rclone")
            .args(["--config", "/dev/null", "size", "--json"])
            .arg(remote(prefix))
            .envs(env.iter().map(|(k, v)| (k, v)))
            .env_remove("AWS_CA_BUNDLE")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "rclone size: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["bytes"].as_u64().unwrap()
    };
    // Ours: the run, and the bytes it uploaded.
    let backup = |repo: &str, key: &Path, name: &str| -> (Sample, u64) {
        let report = work.join(format!("repository-{name}.json"));
        let s = timed(&format!("ours {name}"), format!(
            "{tool} backup --repo {repo} --key-file {} --socket {sock} --user root --report {} > /dev/null",
            key.display(),
            report.display()
        ));
        let r: serde_json::Value = serde_json::from_slice(&fs::read(&report).unwrap()).unwrap();
        (s, r["repository"]["bytes_new"].as_u64().unwrap())
    };
    // A directory backup of the server as it is now (untimed): the files rclone copies.
    let dir_backup = |name: &str| -> PathBuf {
        let d = target.join(name);
        run(format!(
            "{tool} backup --target-dir {} --socket {sock} --user root",
            d.display()
        ));
        d
    };
    let runs = opts.runs;
    let last = runs - 1;

    // 1, 2. Full backups: ours into an empty repository, rclone of the same files to an
    // empty prefix, alternating; the last run's repository and prefix go on.
    let d0 = dir_backup("repository-dir-0");
    let (dir0_bytes, dir0_files) = dir_size(&d0);
    let (mut ours_full, mut rclone_full) = (vec![], vec![]);
    let (mut ours_full_bytes, mut rclone_full_bytes) = (0, 0);
    for r in 0..runs {
        eprintln!("  repository run {}/{runs}: full backups", r + 1);
        let key = work.join(format!("repository-key-{r}"));
        let repo = s3.url(&format!("ours-{r}"));
        run(format!(
            "{tool} repo init --repo {repo} --key-file {}",
            key.display()
        ));
        let (s, bytes) = backup(&repo, &key, &format!("full-{r}"));
        ours_full.push(s);
        ours_full_bytes = bytes;
        rclone_full.push(timed(
            "rclone full",
            format!(
                "{rclone} copy {} {}",
                d0.display(),
                remote(&format!("rclone/full-{r}"))
            ),
        ));
        rclone_full_bytes = rclone_stats(&said()).0;
    }
    fs::remove_dir_all(&d0).unwrap();
    let (repo, key) = (
        s3.url(&format!("ours-{last}")),
        work.join(format!("repository-key-{last}")),
    );
    let stored_full = stored(&format!("ours-{last}"));

    // 3. 1% churn, then ours into the same repository; rclone of the new files to a new
    // prefix, and onto the first one (where it skips the files of the same size and time).
    eprintln!("  repository: 1% churn, incremental backups");
    let ssts_before = sst_names(&ds.server);
    repo_churn(&ds.server, opts.scale, 0);
    let (ours_incr, ours_incr_bytes) = backup(&repo, &key, "incremental");
    // SSTs the server made since the backup before, each day.
    let mut ssts = sst_names(&ds.server);
    let mut new_ssts = vec![ssts.difference(&ssts_before).count()];
    let d1 = dir_backup("repository-dir-1");
    let rclone_new = timed(
        "rclone to a new prefix",
        format!(
            "{rclone} copy {} {}",
            d1.display(),
            remote("rclone/after-churn")
        ),
    );
    let rclone_new_bytes = rclone_stats(&said()).0;
    let rclone_onto = timed(
        "rclone onto the first prefix",
        format!(
            "{rclone} copy {} {}",
            d1.display(),
            remote(&format!("rclone/full-{last}"))
        ),
    );
    let (rclone_onto_bytes, onto_sent, onto_skipped) = rclone_stats(&said());
    fs::remove_dir_all(&d1).unwrap();

    // 4. Restore of the latest snapshot against rclone's download of the same files.
    let restored = work.join("repository-restored");
    let restored_bytes = {
        let out = Command::new(tool.to_string())
            .args(["snapshots", "--json", "--repo", &repo, "--key-file"])
            .arg(&key)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "snapshots: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v.as_array().unwrap().last().unwrap()["bytes_total"]
            .as_u64()
            .unwrap()
    };
    let (mut ours_restore, mut download, mut rclone_restore) = (vec![], vec![], vec![]);
    let mut rclone_restore_bytes = 0;
    for r in 0..runs {
        eprintln!("  repository run {}/{runs}: restores", r + 1);
        ours_restore.push(timed(
            "ours restore",
            format!(
                "{tool} restore --repo {repo} --key-file {} --snapshot latest --datadir {}",
                key.display(),
                restored.display()
            ),
        ));
        download.push(download_secs(&said()).unwrap_or_else(|| {
            panic!(
                "no \"Downloaded and checked\" in the restore's log:\n{}",
                said()
            )
        }));
        fs::remove_dir_all(&restored).unwrap();
        rclone_restore.push(timed(
            "rclone download",
            format!(
                "{rclone} copy {} {} && sync",
                remote("rclone/after-churn"),
                restored.display()
            ),
        ));
        rclone_restore_bytes = rclone_stats(&said()).0;
        fs::remove_dir_all(&restored).unwrap();
    }

    // 5. The rest of the week: 1% churn (another run of rows each day), then a backup.
    let mut dailies = vec![(ours_incr, ours_incr_bytes)];
    for day in 1..opts.dailies as u64 - 1 {
        eprintln!("  repository: day {} of {}", day + 2, opts.dailies);
        repo_churn(&ds.server, opts.scale, day);
        dailies.push(backup(&repo, &key, &format!("day-{}", day + 2)));
        let now = sst_names(&ds.server);
        new_ssts.push(now.difference(&ssts).count());
        ssts = now;
    }
    let stored_week = stored(&format!("ours-{last}"));
    let ssts_kept = ssts.intersection(&ssts_before).count();
    let uploaded_week: u64 = ours_full_bytes + dailies.iter().map(|d| d.1).sum::<u64>();
    let n = opts.dailies as u64;

    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    let wall = |s: &[Sample]| median(s.iter().map(|x| x.wall).collect());
    let cpu = |s: &[Sample]| median(s.iter().map(|x| x.cpu).collect());
    let mut t = format!(
        "\n## Repository in S3 against rclone\n\n\
         Data: {}; as a directory backup, {:.2} GiB in {} files. The store: SeaweedFS (`weed mini`, \
         `sandbox::s3`) on loopback, on the same 2 cores. Ours: `backup --repo s3://…` into an \
         encrypted repository, with its defaults (zstd:3 for all but SSTs, which RocksDB compresses: its full backup is {:.1}% \
         smaller than the directory backup; AES-256-GCM). rclone {}: `rclone copy` (its defaults: 4 transfers) of a directory backup of \
         the server at the same point (its `#rocksdb`, tables and system tables: the same files), \
         configured through the environment alone. MiB = what was uploaded or downloaded: ours \
         `bytes_new` of its report (sealed bytes), rclone's own stats; MiB/s = MiB / wall s; CPU s = the \
         tool's, the store's not counted. Each step starts after a `sync`; downloads end synced \
         (ours syncs every file, rclone is followed by `sync`). Full backups and restores: {}; \
         the incremental and the week run once.\n\n\
         | step | ours s | ours MiB/s | rclone s | rclone MiB/s | ours/rclone s | ours MiB | rclone MiB | ours/rclone MiB | ours CPU s | rclone CPU s |\n\
         |---|---|---|---|---|---|---|---|---|---|---|\n",
        ds.description,
        dir0_bytes as f64 / (1u64 << 30) as f64,
        dir0_files,
        (1.0 - ours_full_bytes as f64 / dir0_bytes as f64) * 100.0,
        rclone_version(),
        match runs {
            1 => "one run".to_string(),
            _ => format!("medians of {runs} runs"),
        },
    );
    let mut row = |step: &str, ours: &[Sample], ours_b: u64, theirs: &[Sample], their_b: u64| {
        let (o, r) = (wall(ours), wall(theirs));
        let _ = writeln!(
            t,
            "| {step} | {o:.2} | {:.1} | {r:.2} | {:.1} | {:.2} | {:.1} | {:.1} | {:.3} | {:.2} | {:.2} |",
            mib(ours_b) / o,
            mib(their_b) / r,
            o / r,
            mib(ours_b),
            mib(their_b),
            ours_b as f64 / their_b.max(1) as f64,
            cpu(ours),
            cpu(theirs),
        );
    };
    row(
        "1. full backup into an empty repository / prefix",
        &ours_full,
        ours_full_bytes,
        &rclone_full,
        rclone_full_bytes,
    );
    row(
        "2. after 1% churn: ours incremental, rclone a full copy to a new prefix",
        &[ours_incr],
        ours_incr_bytes,
        &[rclone_new],
        rclone_new_bytes,
    );
    row(
        "3. after 1% churn: ours incremental, rclone copied onto the first prefix",
        &[ours_incr],
        ours_incr_bytes,
        &[rclone_onto],
        rclone_onto_bytes,
    );
    row(
        "4. restore of that state into an empty directory",
        &ours_restore,
        restored_bytes,
        &rclone_restore,
        rclone_restore_bytes,
    );
    let _ = writeln!(
        t,
        "| 5. stored after {n} daily backups: ours one repository, rclone {n} full copies | – | – | – | – | – | {:.1} | {:.1} | {:.3} | – | – |",
        mib(stored_week),
        mib(n * rclone_full_bytes),
        stored_week as f64 / (n * rclone_full_bytes) as f64,
    );
    let incr: Vec<f64> = dailies.iter().map(|d| d.0.wall).collect();
    let incr_mib: Vec<f64> = dailies.iter().map(|d| mib(d.1)).collect();
    let dl = median(download);
    let new_lo = new_ssts.iter().min().unwrap();
    let new_hi = new_ssts.iter().max().unwrap();
    let others = dir0_files.saturating_sub(ssts_before.len() as u64);
    let _ = writeln!(
        t,
        "\nRow 3: rclone skipped {onto_skipped} files of the same size and modification time and sent \
         {onto_sent}; a copy, not a sync: files the server has since deleted stay. Row 4: ours restores \
         the latest snapshot (`--snapshot latest`: the state of rows 2 and 3) and then bootstraps it with \
         mariadbd; its download alone (\"Downloaded and checked\", every file checked and synced) took \
         {dl:.2} s, {:.1} MiB/s; rclone downloads the prefix of row 2. Row 5: the full backup and {} \
         dailies, each after 1% churn (another run of rows each day, the first of them row 2's), in one \
         repository: the bucket's objects under its prefix (`rclone size`), against {n} × rclone's full \
         copy; {n} × our own first full backup ({:.1} MiB stored) would be {:.1} MiB, ratio {:.3}. The \
         snapshots' `bytes_new` add up to {:.1} MiB. The dailies took {:.2} s (median; spread {}) and \
         uploaded {:.1} MiB (median; spread {} MiB); the server made {:.0} new SSTs a day (median; spread \
         {new_lo}–{new_hi}), and the {others} other files (small) go into a pack each time. Over the week \
         the server went from {} SSTs to {}, {ssts_kept} of them the same files: of those the full \
         backup read, RocksDB rewrote {}.",
        mib(restored_bytes) / dl,
        n - 1,
        mib(stored_full),
        mib(n * stored_full),
        stored_week as f64 / (n * stored_full) as f64,
        mib(uploaded_week),
        median(incr.clone()),
        spread(&incr),
        median(incr_mib.clone()),
        spread(&incr_mib),
        median(new_ssts.iter().map(|&f| f as f64).collect()),
        ssts_before.len(),
        ssts.len(),
        ssts_before.len() - ssts_kept,
    );
    t
}

/// `rclone version`'s first line, e.g. "v1.60.1-DEV".
fn rclone_version() -> String {
    Command::new("rclone")
        .args(["--config", "/dev/null", "version"])
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(|l| l.trim_start_matches("rclone ").to_string())
        })
        .unwrap_or_default()
}

/// Compression ratios by kind, from the report of a compressed backup.
fn ratios(report: &Path) -> String {
    let r: serde_json::Value = serde_json::from_slice(&fs::read(report).unwrap()).unwrap();
    let kinds = r["kinds"].as_object().unwrap();
    let parts: Vec<String> = kinds
        .iter()
        .map(|(k, v)| {
            format!(
                "{k} {:.2} ({:.1} MiB)",
                v["compression_ratio"].as_f64().unwrap_or(1.0),
                v["bytes"].as_f64().unwrap_or(0.0) / (1 << 20) as f64
            )
        })
        .collect();
    format!(
        "Compression ratio (zstd:3) {:.2} overall; by kind: {}.\n",
        r["compression_ratio"].as_f64().unwrap_or(1.0),
        parts.join(", ")
    )
}

fn main() {
    if std::env::args().nth(1).as_deref() == Some("--sendfile") {
        return sendfile_files();
    }
    let opts = options();
    let tool = built_binary("myrocks-hotbackup");
    let work = tempfile::Builder::new()
        .prefix("myrocks-bench-")
        .tempdir()
        .unwrap();
    // Directory backups go to another filesystem than the data's, as onto a backup disk:
    // the tmpfs of /dev/shm where there is one. (On the data's own filesystem mariabackup
    // hard-links the SSTs instead of copying them.)
    let target = tempfile::Builder::new()
        .prefix("myrocks-bench-")
        .tempdir_in(if Path::new("/dev/shm").is_dir() {
            "/dev/shm"
        } else {
            "/tmp"
        })
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
         spread = min–max). Stream backups go through a pipe into `cat > /dev/null`; their limit is zero-copy: \
         `sendfile` of the same files into a pipe enlarged to 1 MiB, read by `cat > /dev/null` (\"cat, 64 KiB \
         pipes\" copies them through default pipes). Directory backups, extraction and restores end with their files synced \
         (ours syncs each file; the others are followed by `sync`); their limit is `cp -r` of the same files. \
         Directory backups write to a tmpfs (`/dev/shm`), another filesystem than the data's, as a backup disk \
         is: on the data's own filesystem mariabackup hard-links the SSTs, which copies nothing (and shares \
         their inodes with the live database). \
         \"our process: CPU s/GiB\" is the CPU time of the backup process alone (from its `--report`), per GiB \
         of data: what a busy database host pays. \
         \"longest commit\" is the slowest of single-row commits made every 2 ms during the run.\n\n\
         Machine: {}. Server: {}.\n",
        opts.scale,
        opts.runs,
        machine(),
        Command::new(binary("mariadbd")).arg("--version").output().map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string()).unwrap_or_default(),
    );
    let only_one = opts.only_network || opts.only_repository || opts.only_mixed || opts.only_pitr;
    let sets: &[fn(f64) -> DataSet] = match (opts.only_network, only_one) {
        (true, _) => &[large_files],
        (false, true) => &[],
        (false, false) => &[large_files, many_files],
    };
    for make in sets {
        let ds = make(opts.scale);
        eprintln!("data set {}: {}", ds.name, ds.description);
        let dir = work.path().join(ds.name.replace(' ', "-"));
        fs::create_dir(&dir).unwrap();
        measure(
            &format!("cat {}/#rocksdb/* > /dev/null", ds.server.datadir.display()),
            &path,
        ); // warm the cache
        if opts.only_network {
            let _ = write!(report, "\n## {}: {}\n", ds.name, ds.description);
            report.push_str(&network_section(
                &ds,
                &tool,
                &dir,
                target.path(),
                &path,
                &opts,
            ));
            continue;
        }

        let cases = backup_cases(&ds.server, &tool, &dir);
        let samples = run_cases(&cases, opts.runs, Some(&ds.server), &path);
        let _ = write!(
            report,
            "\n## {}: {}\n\n### Stream backup\n\n",
            ds.name, ds.description
        );
        report.push_str(&table(&cases, &samples, ds.bytes, "limit: sendfile", true));

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

        let cases = directory_cases(&ds.server, ds.db, &tool, &dir, target.path());
        let samples = run_cases(&cases, opts.runs, Some(&ds.server), &path);
        report.push_str("\n### Directory backup\n\n");
        report.push_str(&table(&cases, &samples, ds.bytes, "limit: cp -r", true));

        let cases = compression_cases(&ds.server, &tool, &dir, target.path());
        let samples = run_cases(&cases, opts.runs, None, &path);
        report.push_str("\n### Compression (directory backup)\n\n");
        report.push_str(&table(&cases, &samples, ds.bytes, "no compression", false));
        report.push('\n');
        report.push_str(&ratios(cases[2].report.as_ref().unwrap()));

        let (ours_dir, mb_dir) = (dir.join("ours-dir"), dir.join("mb-dir"));
        measure(
            &format!(
                "{} backup --target-dir {} --socket {sock} --user root 2>/dev/null",
                tool.display(),
                ours_dir.display()
            ),
            &path,
        );
        measure(
            &format!(
                "mariabackup --backup --target-dir={m} --user=root --socket={sock} 2>/dev/null && \
                 mariabackup --prepare --target-dir={m} 2>/dev/null",
                m = mb_dir.display()
            ),
            &path,
        );
        let cases = verify_cases(&tool, &ours_dir);
        let samples = run_cases(&cases, opts.runs, None, &path);
        report.push_str("\n### Verify\n\n");
        report.push_str(&table(
            &cases,
            &samples,
            ds.bytes,
            "limit: cat of the backup's files",
            false,
        ));
        let cases = restore_cases(&tool, &ours_dir, &mb_dir, &dir);
        let samples = run_cases(&cases, opts.runs, None, &path);
        report.push_str("\n### Restore\n\n");
        report.push_str(&table(&cases, &samples, ds.bytes, "limit: cp -r", false));
        measure(
            &format!("rm -rf {} {}", ours_dir.display(), mb_dir.display()),
            &path,
        );

        report.push_str(&throttle_section(&ds, &tool, &dir));
        report.push_str(&page_cache_section(&ds, &tool, target.path(), &path));
        if ds.name == "large files" {
            report.push_str(&network_section(
                &ds,
                &tool,
                &dir,
                target.path(),
                &path,
                &opts,
            ));
        }
    }
    if !only_one {
        report.push_str(&stall_section(&opts, &tool, work.path(), &path));
    }
    if !only_one || opts.only_mixed {
        report.push_str(&mixed_section(
            &tool,
            work.path(),
            target.path(),
            &path,
            &opts,
        ));
    }
    if !only_one || opts.only_pitr {
        report.push_str(&pitr_section(&tool, work.path(), &path, &opts));
    }
    if !only_one || opts.only_repository {
        report.push_str(&repository_section(
            &tool,
            work.path(),
            target.path(),
            &path,
            &opts,
        ));
    }
    if let Some(dir) = opts.output.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir).unwrap();
    }
    fs::write(&opts.output, &report).unwrap();
    println!("{report}");
    eprintln!("written to {}", opts.output.display());
}

/// Rows of the mixed section's InnoDB tables at `scale` (about 330 bytes each in InnoDB,
/// with two secondary indexes: 1.6 million rows are about 500 MiB).
fn mixed_inno_rows(scale: f64) -> u64 {
    ((1_600_000.0 * scale) as u64).max(20_000)
}

/// A mixed server: RocksDB tables beside InnoDB tables with secondary indexes. Our backup
/// (RocksDB files plus the InnoDB rows read from the consistent point) and its restore
/// (which loads them) against mariabackup (InnoDB files plus redo log, then prepare) and
/// `mariadb-dump --single-transaction` of the InnoDB part alone, dumped and loaded.
fn mixed_section(tool: &Path, work: &Path, target: &Path, path: &str, opts: &Options) -> String {
    let server = Server::start_with(&["--innodb-buffer-pool-size=256M"]);
    let rocks_rows = ((256u64 << 20) as f64 * opts.scale / 1000.0 / 4.0).max(100.0) as u64;
    bulk_load(&server, "mixed_rocks", 4, rocks_rows);
    let inno_rows = mixed_inno_rows(opts.scale);
    let mut conn = server.conn();
    conn.query_drop("CREATE DATABASE mixed_inno").unwrap();
    conn.query_drop("USE mixed_inno").unwrap();
    for t in 0..4 {
        conn.query_drop(format!(
            "CREATE TABLE t{t} (id INT PRIMARY KEY, a INT NOT NULL, b CHAR(32) NOT NULL, pad VARBINARY(200),
             KEY (a), KEY (b)) ENGINE=InnoDB"
        ))
        .unwrap();
        let rows = inno_rows / 4;
        for start in (0..rows).step_by(100_000) {
            let n = 100_000.min(rows - start);
            conn.query_drop(format!(
                "INSERT INTO t{t} SELECT seq + {start}, FLOOR(RAND() * 1000000), MD5(seq), RANDOM_BYTES(150)
                 FROM seq_1_to_{n}"
            ))
            .unwrap();
        }
    }
    conn.query_drop("ANALYZE TABLE t0, t1, t2, t3").unwrap();
    let inno_bytes: u64 = conn
        .query_first(
            "SELECT SUM(DATA_LENGTH + INDEX_LENGTH) FROM information_schema.TABLES WHERE TABLE_SCHEMA = 'mixed_inno'",
        )
        .unwrap()
        .unwrap();
    drop(conn);
    let ds = finish_dataset(server, "mixed", "mixed_rocks", String::new());
    let bytes = ds.bytes + inno_bytes;
    let description = format!(
        "4 RocksDB tables ({:.2} GiB of SSTs) and 4 InnoDB tables of {inno_rows} rows with two secondary \
         indexes ({:.2} GiB in InnoDB)",
        ds.bytes as f64 / (1u64 << 30) as f64,
        inno_bytes as f64 / (1u64 << 30) as f64,
    );
    eprintln!("data set mixed: {description}");
    let (t, w) = (target.display(), work.display());
    let sock = ds.server.socket.display();
    let tool = tool.display();
    let backups = vec![
        Case::ours(
            "myrocks-hotbackup --target-dir (InnoDB rows read logically)",
            &format!("{tool} backup --target-dir {t}/ours --socket {sock} --user root {{REPORT}} 2>/dev/null"),
            work,
        )
        .then(format!("rm -rf {t}/ours")),
        Case::new(
            "mariabackup --backup + --prepare",
            format!(
                "mariabackup --backup --target-dir={t}/mb --user=root --socket={sock} 2>/dev/null && \
                 mariabackup --prepare --target-dir={t}/mb 2>/dev/null && sync"
            ),
        )
        .then(format!("rm -rf {t}/mb")),
        Case::new(
            "mariadb-dump --single-transaction (InnoDB part only)",
            format!(
                "mariadb-dump --single-transaction --socket={sock} --user=root mixed_inno > {t}/dump.sql && sync"
            ),
        )
        .then(format!("rm -f {t}/dump.sql")),
    ];
    let samples = run_cases(&backups, opts.runs, Some(&ds.server), path);
    let mut report =
        format!("\n## Mixed server: InnoDB beside RocksDB\n\n{description}.\n\n### Backup\n\n");
    report.push_str(&table(
        &backups,
        &samples,
        bytes,
        "mariabackup --backup + --prepare",
        true,
    ));

    // The backups to restore, made once.
    for case in &backups {
        measure(&case.script, path);
    }
    let restore_log = work.join("mixed-restore.log");
    measure(
        &format!(
            "{tool} copy-back --backup-dir {t}/ours --datadir {w}/mixed-probe 2>{} && rm -rf {w}/mixed-probe",
            restore_log.display()
        ),
        path,
    );
    let client = format!("mariadb --socket={sock} --user=root");
    let restores = vec![
        Case::new(
            "myrocks-hotbackup copy-back (loads the InnoDB rows)",
            format!("{tool} copy-back --backup-dir {t}/ours --datadir {w}/restored 2>/dev/null"),
        )
        .then(format!("rm -rf {w}/restored")),
        Case::new(
            "mariabackup --copy-back (prepared)",
            format!("mariabackup --copy-back --target-dir={t}/mb --datadir={w}/restored 2>/dev/null && sync"),
        )
        .then(format!("rm -rf {w}/restored")),
        Case::new(
            "mariadb < dump (InnoDB part only, binary log off)",
            format!(
                "{client} -e 'CREATE DATABASE mixed_copy' && \
                 {client} --init-command='SET sql_log_bin = 0' mixed_copy < {t}/dump.sql && sync"
            ),
        )
        .then(format!("{client} -e 'DROP DATABASE mixed_copy'")),
    ];
    let samples = run_cases(&restores, opts.runs, None, path);
    report.push_str("\n### Restore\n\n");
    report.push_str(&table(
        &restores,
        &samples,
        bytes,
        "mariabackup --copy-back (prepared)",
        false,
    ));
    let log = fs::read_to_string(&restore_log).unwrap_or_default();
    let load_secs: Option<f64> = log
        .lines()
        .find(|l| l.contains("InnoDB tables ("))
        .and_then(|l| l.rsplit(" in ").next())
        .and_then(|s| s.trim_end_matches(" s").parse().ok());
    if let Some(secs) = load_secs {
        let _ = writeln!(
            report,
            "\nOur restore loaded the InnoDB rows in {secs:.1} s: {:.1} MiB of InnoDB data per second \
             (the warning for large InnoDB tables is drawn from this rate).",
            inno_bytes as f64 / (1 << 20) as f64 / secs
        );
    }
    measure(&format!("rm -rf {t}/ours {t}/mb {t}/dump.sql"), path);
    report
}

/// Point-in-time recovery: the archiver's lag behind commits under the bank workload (the
/// recovery point objective), and the replay of the archived binary logs onto a backup by
/// ours (the archive served to the restored server, parallel appliers) against
/// `mariadb-binlog | mariadb` of the same files into the same restored backup.
fn pitr_section(tool: &Path, work: &Path, path: &str, opts: &Options) -> String {
    use myrocks_hotbackup::binlog::archive;
    use myrocks_hotbackup::binlog::event::Gtid;
    use sandbox::workload::{load_bank, Load};

    let server = Server::start();
    load_bank(&server, 20_000);
    let dir = work.join("pitr");
    fs::create_dir(&dir).unwrap();
    let (archive_dir, backup) = (dir.join("archive"), dir.join("backup"));
    let mut archiver = Command::new(tool)
        .args(["binlog", "archive", "--user", "root", "--socket"])
        .arg(&server.socket)
        .arg("--target-dir")
        .arg(&archive_dir)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    measure(
        &format!(
            "{} backup --target-dir {} --socket {} --user root 2>/dev/null",
            tool.display(),
            backup.display(),
            server.socket.display()
        ),
        path,
    );
    let load = Load::start(&server);
    // The probe: a row committed every 100 ms, and the time until the archive records it.
    let seconds = (60.0 * opts.scale).max(10.0);
    let mut conn = server.conn();
    conn.query_drop("CREATE TABLE bank.probe (id INT AUTO_INCREMENT PRIMARY KEY) ENGINE=ROCKSDB")
        .unwrap();
    let mut lags = Vec::new();
    let started = Instant::now();
    while started.elapsed().as_secs_f64() < seconds {
        conn.query_drop("INSERT INTO bank.probe VALUES ()").unwrap();
        let committed = Instant::now();
        let gtid: String = conn.query_first("SELECT @@last_gtid").unwrap().unwrap();
        let gtid: Gtid = gtid.parse().unwrap();
        loop {
            let files = archive::load(&archive_dir).unwrap_or_default();
            if files.last().is_some_and(|f| f.end.contains(&gtid)) {
                break;
            }
            assert!(
                committed.elapsed() < Duration::from_secs(60),
                "the archive stalled"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        lags.push(committed.elapsed().as_secs_f64() * 1000.0);
        std::thread::sleep(Duration::from_millis(100));
    }
    let commits = load.stop();
    let end = server.value("SELECT @@gtid_binlog_pos");
    loop {
        let files = archive::load(&archive_dir).unwrap();
        if files.last().is_some_and(|f| f.end.position_text() == end) {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    unsafe { libc::kill(archiver.id() as i32, libc::SIGTERM) };
    archiver.wait().unwrap();
    let sums = server.checksums("bank");
    lags.sort_by(f64::total_cmp);
    let pct = |p: f64| lags[((lags.len() - 1) as f64 * p) as usize];
    let bytes: u64 = archive::load(&archive_dir)
        .unwrap()
        .iter()
        .map(|f| f.size)
        .sum();
    let mut report = format!(
        "\n## Point-in-time recovery\n\n{seconds:.0} s of the bank workload ({} writers, {commits} transfers of \
         3 statements each, {:.1} MiB of binary log) while `binlog archive` ran.\n\n\
         ### Archive lag (RPO)\n\nFrom a probe row's commit on the server to the archive's index recording it \
         (synced): {} probes, median {:.0} ms, 99th percentile {:.0} ms, longest {:.0} ms.\n",
        sandbox::workload::WRITERS,
        bytes as f64 / (1 << 20) as f64,
        lags.len(),
        pct(0.5),
        pct(0.99),
        lags[lags.len() - 1],
    );

    // Replay: ours serial (the default) and with 4 parallel appliers, against
    // mariadb-binlog | mariadb.
    let (coords_file, coords_pos) = {
        let text = fs::read_to_string(backup.join("xtrabackup_binlog_info")).unwrap();
        let f: Vec<&str> = text.trim().split('\t').collect();
        (f[0].to_string(), f[1].to_string())
    };
    let files: Vec<String> = archive::load(&archive_dir)
        .unwrap()
        .into_iter()
        .map(|f| f.name)
        .skip_while(|n| *n != coords_file)
        .collect();
    let mut rows = Vec::new();
    for threads in [0, 4] {
        let mut secs = Vec::new();
        for run in 0..opts.runs {
            let target = dir.join(format!("ours-{threads}-{run}"));
            let log = dir.join("replay.log");
            measure(
                &format!(
                    "{} copy-back --backup-dir {} --datadir {} --binlog-dir {} --until-gtid {end} \
                     --replay-threads {threads} 2> {}",
                    tool.display(),
                    backup.display(),
                    target.display(),
                    archive_dir.display(),
                    log.display()
                ),
                path,
            );
            let text = fs::read_to_string(&log).unwrap();
            let line = text.lines().find(|l| l.contains("Replayed ")).unwrap();
            let s: f64 = line
                .split(" in ")
                .nth(1)
                .unwrap()
                .split(' ')
                .next()
                .unwrap()
                .parse()
                .unwrap();
            secs.push(s);
            if run == 0 {
                let restored = Server::start_on(&target, &[]);
                assert_eq!(restored.checksums("bank"), sums, "our replay differs");
                restored.stop();
            }
            measure(&format!("rm -rf {}", target.display()), path);
        }
        rows.push((threads, median(secs.clone()), spread(&secs)));
    }
    let mut base = Vec::new();
    for run in 0..opts.runs {
        let target = dir.join(format!("base-{run}"));
        measure(
            &format!(
                "{} copy-back --backup-dir {} --datadir {} 2>/dev/null",
                tool.display(),
                backup.display(),
                target.display()
            ),
            path,
        );
        let restored = Server::start_on(
            &target,
            &[
                "--skip-log-bin",
                "--innodb-flush-log-at-trx-commit=0",
                "--rocksdb-flush-log-at-trx-commit=0",
            ],
        );
        let names: Vec<String> = files
            .iter()
            .map(|n| archive_dir.join(n).display().to_string())
            .collect();
        let sample = measure(
            &format!(
                "mariadb-binlog --start-position={coords_pos} {} | mariadb --socket={} --user=root",
                names.join(" "),
                restored.socket.display()
            ),
            path,
        );
        base.push(sample.wall);
        if run == 0 {
            assert_eq!(
                restored.checksums("bank"),
                sums,
                "mariadb-binlog | mariadb differs"
            );
        }
        restored.stop();
        measure(&format!("rm -rf {}", target.display()), path);
    }
    let base_median = median(base.clone());
    let _ = write!(
        report,
        "\n### Replay onto the backup\n\nThe {commits} transfers archived after the backup, replayed onto it \
         (restored with `copy-back`); both results checked against the server's checksums. Ours counts from \
         the start of the two throwaway servers to their clean shutdown; `mariadb-binlog | mariadb` counts \
         the pipe alone, into a server already started on the restored backup with the same durability \
         settings (binary log off, no flush at commit).\n\n\
         | replay | seconds (median) | spread | transactions/s | vs mariadb-binlog \\| mariadb |\n\
         |---|---|---|---|---|\n\
         | mariadb-binlog \\| mariadb | {base_median:.2} | {} | {:.0} | 1.00 |\n",
        spread(&base),
        commits as f64 / base_median,
    );
    for (threads, secs, spr) in rows {
        let _ = writeln!(
            report,
            "| ours, {} | {secs:.2} | {spr} | {:.0} | {:.2}× faster |",
            match threads {
                0 => "applied by the replication thread (default)".to_string(),
                n => format!("{n} parallel appliers (--replay-threads {n})"),
            },
            commits as f64 / secs,
            base_median / secs
        );
    }
    measure(&format!("rm -rf {}", dir.display()), path);
    report
}
