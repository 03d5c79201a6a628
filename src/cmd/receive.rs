//! `receive`: listens for a backup sent with `backup --to`, prints the URL to send to (the
//! one line on stdout), and writes what arrives into the target directory; with
//! `--restore-to`, restores it there too and writes the statements that make the restored
//! server a replica of the source.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::cancel::Cancel;
use crate::cli::{ReceiveArgs, RestoreArgs};
use crate::error::{Error, IoContext, Result};
use crate::info;
use crate::net::receive::{Options, Received, Receiver};
use crate::restore::{self, Mode};

pub fn run(args: ReceiveArgs) -> Result<()> {
    let cancel = super::on_signals()?;
    let setup = match &args.restore_to {
        Some(datadir) => {
            restore::check_empty(datadir)?;
            let setup = setup_path(datadir)?;
            if setup.exists() {
                return Err(Error::Refused(format!(
                    "{} exists: move it away, or restore elsewhere",
                    setup.display()
                )));
            }
            Some(setup)
        }
        None => None,
    };
    let receiver = Receiver::bind(&Options {
        target: args.target_dir.clone(),
        listen: args.listen.clone(),
        streams: usize::from(args.streams),
        wait: Duration::from_secs(args.wait),
    })?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{}", receiver.url().reveal())
            .and_then(|()| out.flush())
            .context(|| "cannot print the URL".into())?;
    }
    info!(
        "Receiving into {} on port {}; waiting up to {} s for a sender",
        args.target_dir.display(),
        receiver.url().port,
        args.wait
    );
    if let (Some(datadir), Some(setup)) = (args.restore_to.clone(), setup) {
        let restore = RestoreArgs {
            backup_dir: args.target_dir.clone(),
            datadir,
            rocksdb_datadir: args.rocksdb_datadir.clone(),
            rocksdb_waldir: args.rocksdb_waldir.clone(),
            defaults_file: args.defaults_file.clone(),
            mariadbd: args.mariadbd.clone(),
            binlog_dir: None,
            until: Default::default(),
            replay_threads: None,
            skip_bootstrap: false,
        };
        let cancel = cancel.clone();
        receiver.after_commit(Box::new(move |received| {
            restore_and_set_up(received, &restore, &setup, &cancel)
        }));
    }
    let received = receiver.run(&cancel)?;
    if received.resent_blocks > 0 {
        info!(
            "{} blocks arrived twice (sent again after lost connections)",
            received.resent_blocks
        );
    }
    info!(
        "Receive done: the backup in {} is complete and verified",
        args.target_dir.display()
    );
    Ok(())
}

/// `replica-setup.sql`, beside the datadir.
fn setup_path(datadir: &Path) -> Result<PathBuf> {
    let absolute = std::path::absolute(datadir).with_path("resolve", datadir)?;
    let parent = absolute.parent().ok_or_else(|| {
        Error::Usage(format!("--restore-to {}: not a datadir", datadir.display()))
    })?;
    Ok(parent.join("replica-setup.sql"))
}

fn restore_and_set_up(
    received: &Received,
    args: &RestoreArgs,
    setup: &Path,
    cancel: &Cancel,
) -> Result<Vec<String>> {
    restore::run(args, Mode::Move, cancel).map_err(|e| {
        Error::Refused(format!(
            "the backup in {} is complete and verified, but restoring it into {} failed: {e}",
            args.backup_dir.display(),
            args.datadir.display()
        ))
    })?;
    let mut report = vec![format!("restored into {}", args.datadir.display())];
    let backup = &received.manifest.backup;
    let gtid = backup["binlog"]["gtid_binlog_pos"]
        .as_str()
        .or(backup["replica"]["gtid_slave_pos"].as_str())
        .filter(|g| !g.is_empty());
    let Some(gtid) = gtid else {
        report.push(
            "the source recorded no GTID position (binary log off): no replica-setup.sql".into(),
        );
        return Ok(report);
    };
    let port = backup["server"]["port"].as_u64().unwrap_or(3306);
    let host = received.sender;
    let sql = format!(
        "-- Written by myrocks-hotbackup on {here}: makes the server restored into {datadir}\n\
         -- a replica of {source} ({host}:{port}), from the backup's consistent point.\n\
         -- Start the server on {datadir}, run this file with the mariadb client, then give the\n\
         -- replication account and start:\n\
         --   CHANGE MASTER TO MASTER_USER = '...', MASTER_PASSWORD = '...'; START SLAVE;\n\
         SET GLOBAL gtid_slave_pos = '{gtid}';\n\
         CHANGE MASTER TO MASTER_HOST = '{host}', MASTER_PORT = {port}, MASTER_USE_GTID = slave_pos;\n",
        here = crate::sys::hostname(),
        datadir = args.datadir.display(),
        source = received.sender_host,
    );
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(setup)
        .with_path("create", setup)?;
    file.write_all(sql.as_bytes())
        .and_then(|()| file.sync_all())
        .with_path("write", setup)?;
    info!("Wrote {}", setup.display());
    report.push(format!(
        "replication set-up in {}: SET GLOBAL gtid_slave_pos = '{gtid}'; CHANGE MASTER TO MASTER_HOST = '{host}', MASTER_PORT = {port}, MASTER_USE_GTID = slave_pos",
        setup.display()
    ));
    report.push(format!(
        "next, on that host: start mariadbd on {}, run {} with the mariadb client, then CHANGE MASTER TO MASTER_USER = '...', MASTER_PASSWORD = '...'; START SLAVE",
        args.datadir.display(),
        setup.display()
    ));
    Ok(report)
}
