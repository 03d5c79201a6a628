//! `backup`: builds the sink (a stream on stdout or a directory), the pipeline and the
//! progress display from the command line, runs the engine, and reports.

use std::io::IsTerminal;
use std::time::Instant;

use serde::Serialize;

use super::info::Summary;
use crate::cli::{BackupArgs, ProgressMode};
use crate::error::{Error, IoContext, Result};
use crate::format::tar::TarWriter;
use crate::format::xbstream::XbstreamWriter;
use crate::format::{Encoder, Format};
use crate::log::human;
use crate::net::ssh::RemoteReceiver;
use crate::net::Url;
use crate::pipeline::compress::Compression;
use crate::pipeline::progress::{Bar, Lines, Progress, Quiet};
use crate::pipeline::{Options, Pipeline};
use crate::sink::dir::DirSink;
use crate::sink::net::{Figures, NetSink};
use crate::sink::repo::{Figures as RepoFigures, RepoSink};
use crate::sink::stream::StreamSink;
use crate::sink::Sink;
use crate::{engine, info, warn};

/// Where the backup goes.
enum Destination {
    Dir(DirSink),
    Stream(StreamSink),
    /// A receiver, and the ssh session that started it, if this run did.
    Net(Box<NetSink>, Option<RemoteReceiver>),
    Repo(Box<RepoSink>),
}

impl Destination {
    fn sink(&self) -> &dyn Sink {
        match self {
            Destination::Dir(s) => s,
            Destination::Stream(s) => s,
            Destination::Net(s, _) => &**s,
            Destination::Repo(s) => &**s,
        }
    }
}

/// The receiver's URL from `--to`: `@FILE`, `-` (standard input), or, discouraged, itself.
fn read_url(to: &str) -> Result<Url> {
    let text = match to {
        "-" => {
            let mut line = String::new();
            std::io::stdin()
                .read_line(&mut line)
                .context(|| "cannot read the receiver's URL from standard input".into())?;
            line
        }
        _ => match to.strip_prefix('@') {
            Some(path) => {
                let path = std::path::Path::new(path);
                let text = std::fs::read_to_string(path)
                    .with_path("read the receiver's URL from", path)?;
                if std::fs::metadata(path).is_ok_and(|m| {
                    std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o077 != 0
                }) {
                    warn!(
                        "{} can be read by other users, and the URL in it is a secret: create it with umask 077",
                        path.display()
                    );
                }
                text
            }
            None => {
                warn!("the receiver's URL was given on the command line, where other users of this host may read it: pass it as --to @FILE or --to - instead");
                to.to_string()
            }
        },
    };
    let line = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
    Url::parse(line)
}

/// The `--report` file: the backup's summary, and how fast it went.
#[derive(Serialize)]
struct Report<'a> {
    #[serde(flatten)]
    summary: &'a Summary,
    destination: String,
    /// Transfer figures of a backup sent to a receiver.
    #[serde(skip_serializing_if = "Option::is_none")]
    network: Option<Figures>,
    /// What a backup into a repository reused and uploaded.
    #[serde(skip_serializing_if = "Option::is_none")]
    repository: Option<RepoFigures>,
    duration_secs: f64,
    bytes_per_sec: f64,
    /// CPU seconds (user and system) of the backup process.
    cpu_secs: f64,
    peak_memory_bytes: u64,
}

pub fn run(args: BackupArgs) -> Result<()> {
    let format = args.stream.unwrap_or(Format::Tar);
    let to_stream = args.target_dir.is_none()
        && args.to.is_none()
        && args.via_ssh.is_none()
        && args.repo.is_none();
    if args.compress.is_some() && to_stream && format == Format::Tar {
        return Err(Error::Usage(
            "--compress needs --stream xbstream, --target-dir or --to: tar needs each file's size before its bytes, \
             and a compressed file has none until it is written"
                .into(),
        ));
    }
    if let (Some(report), Some(dir)) = (&args.report, &args.target_dir) {
        let inside = std::path::absolute(report)
            .ok()
            .zip(std::path::absolute(dir).ok())
            .is_some_and(|(r, d)| r.starts_with(d));
        if inside {
            return Err(Error::Usage(format!(
                "--report {} is inside the backup's --target-dir: put it elsewhere (a file the manifest does not list is a stray)",
                report.display()
            )));
        }
    }
    let cancel = super::on_signals()?;
    crate::sys::explain_sigbus().context(|| "cannot install a SIGBUS handler".into())?;
    // A repository keeps backups for months: its files are compressed unless told otherwise,
    // but for SSTs, compressed by RocksDB already (`--compress` compresses them too).
    let compression = args.compress.or_else(|| {
        args.repo.as_ref().map(|_| Compression {
            level: Compression::DEFAULT_LEVEL,
            ssts: false,
        })
    });
    let compress_threads = args.compress_threads.map_or(super::cpus(), usize::from);
    let mut parallel = args.parallel.map_or(super::cpus().clamp(2, 8), usize::from);
    if compression.is_some() && args.parallel.is_none() {
        // Small files are one chunk each: enough of them in flight to keep every
        // compression worker busy.
        parallel = parallel.max(2 * compress_threads);
    }
    let options = Options {
        parallel,
        compression,
        compress_threads,
        bytes_per_sec: args.avg_mbytes_per_sec.map(|m| m << 20),
    };
    let streams = args.streams.map(usize::from);
    // The server backed up, as far as this host can tell before connecting to it.
    let source = format!(
        "{}:{}",
        crate::sys::hostname(),
        match (&args.conn.socket, &args.conn.host) {
            (Some(socket), _) => socket.display().to_string(),
            (None, Some(host)) => format!("{host}:{}", args.conn.port.unwrap_or(3306)),
            (None, None) => "default socket".to_string(),
        }
    );
    let destination = match (&args.target_dir, &args.to, &args.via_ssh) {
        _ if args.repo.is_some() => {
            let url = args.repo.as_deref().unwrap_or_default();
            let options = crate::server::credentials::option_values(&args.conn)?;
            let repo = crate::repo::Repo::open(url, args.key_file.as_deref(), &options)?;
            Destination::Repo(Box::new(RepoSink::start(repo, source)?))
        }
        (Some(dir), _, _) => Destination::Dir(DirSink::create(dir)?),
        (None, Some(to), _) => Destination::Net(
            Box::new(NetSink::connect(
                &read_url(&to.0)?,
                streams,
                source,
                cancel.clone(),
            )?),
            None,
        ),
        (None, None, Some(ssh)) => {
            let remote = RemoteReceiver::start(&ssh.host, &ssh.args)?;
            Destination::Net(
                Box::new(NetSink::connect(
                    &remote.url,
                    streams,
                    source,
                    cancel.clone(),
                )?),
                Some(remote),
            )
        }
        (None, None, None) => {
            let out = super::stdio::stdout()?;
            let encoder: Box<dyn Encoder> = match format {
                Format::Tar => Box::new(TarWriter::new(out)),
                Format::Xbstream => Box::new(XbstreamWriter::new(out)),
            };
            Destination::Stream(StreamSink::new(encoder, parallel))
        }
    };
    let sink = destination.sink();
    let progress: Box<dyn Progress> = match args.progress {
        ProgressMode::Auto if std::io::stderr().is_terminal() => Box::new(Bar::new()),
        ProgressMode::Auto | ProgressMode::Log => Box::new(Lines::log()),
        ProgressMode::Bar => Box::new(Bar::new()),
        ProgressMode::Json => Box::new(Lines::json()),
        ProgressMode::None => Box::new(Quiet),
    };
    let start = Instant::now();
    let pipeline = Pipeline::new(sink, options, &*progress, cancel.clone());
    let result = engine::run(&args, pipeline, &*progress, cancel);
    progress.done();
    let manifest = match result {
        Ok(manifest) => manifest,
        Err(e) => {
            let cause = sink.abort();
            if let Some(dir) = &args.target_dir {
                info!("Removed the incomplete backup from {}", dir.display());
            }
            return Err(match (e, cause) {
                (Error::Closed, Some(cause)) => cause,
                (e, _) => e,
            });
        }
    };
    let mut repository = None;
    let (network, destination_name) = match destination {
        Destination::Repo(repo) => {
            let figures = repo.figures();
            info!(
                "Snapshot {} committed: {} files ({}) reused from the repository, {} files ({}) uploaded",
                figures.snapshot,
                figures.files_reused,
                human(figures.bytes_reused),
                figures.files_new,
                human(figures.bytes_new)
            );
            println!("{}", figures.snapshot);
            repository = Some(figures);
            (None, args.repo.clone().unwrap_or_default())
        }
        Destination::Net(net, remote) => {
            let name = format!("receiver {}:{}", net.url().host, net.url().port);
            let figures = net.figures();
            drop(net);
            if let Some(remote) = remote {
                remote.wait()?;
            }
            (Some(figures), name)
        }
        Destination::Dir(_) | Destination::Stream(_) => (
            None,
            args.target_dir
                .as_ref()
                .map_or("stdout".into(), |d| d.display().to_string()),
        ),
    };
    let secs = start.elapsed().as_secs_f64();
    let value = serde_json::to_value(&manifest.backup).expect("serialisable");
    let summary = Summary::of(&crate::format::manifest::Manifest {
        format: manifest.format,
        tool: manifest.tool.clone(),
        compression: manifest.compression.clone(),
        backup: value,
        files: manifest.files.clone(),
    });
    if summary.compression.is_some() {
        let ratios: Vec<String> = summary
            .kinds
            .iter()
            .filter(|(_, k)| k.bytes > 0)
            .map(|(name, k)| format!("{name} {:.2}", k.compression_ratio))
            .collect();
        info!(
            "Compressed {} to {} (ratio {:.2}; by kind: {})",
            human(summary.bytes),
            human(summary.stored_bytes),
            summary.compression_ratio,
            ratios.join(", ")
        );
    }
    if let Some(path) = &args.report {
        let (cpu_secs, peak_memory_bytes) = crate::sys::own_usage();
        let report = Report {
            cpu_secs,
            peak_memory_bytes,
            summary: &summary,
            destination: destination_name,
            network,
            repository,
            duration_secs: secs,
            bytes_per_sec: summary.bytes as f64 / secs.max(1e-3),
        };
        super::info::write_json(path, &report)?;
    }
    let ssts = summary.kinds.get("sst").map_or(0, |k| k.files);
    info!(
        "All Backups Done. {} files ({ssts} SST), {} in {secs:.1} s, {}/s; backup completed OK!",
        summary.files + 1,
        human(summary.bytes),
        human((summary.bytes as f64 / secs.max(1e-3)) as u64)
    );
    Ok(())
}
