//! `verify`: re-reads a backup, a directory or a stream, and checks every file against the
//! manifest. Every problem is named; any problem means exit 3.

use std::fs::File;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::cli::VerifyArgs;
use crate::error::{Error, IoContext, Result};
use crate::format::manifest::Problem;
use crate::log::human;
use crate::restore::backup_dir::BackupDir;
use crate::restore::extract;
use crate::{error, info};

#[derive(Debug, Serialize)]
struct Outcome {
    backup: PathBuf,
    /// False when the manifest is missing: the backup was interrupted or is partial.
    complete: bool,
    ok: bool,
    files_checked: usize,
    bytes_checked: u64,
    problems: Vec<Problem>,
}

pub fn run(args: VerifyArgs) -> Result<()> {
    if let Some(repo) = &args.repo {
        let repo = crate::cli::RepoArgs {
            repo: repo.clone(),
            key_file: args.key_file.clone(),
        };
        return super::repo::verify(&repo, args.snapshot.as_deref(), args.read_data, args.json);
    }
    let cancel = super::on_signals()?;
    let outcome = match (&args.dir, &args.stream) {
        (_, Some(stream)) => verify_stream(stream)?,
        (Some(dir), None) => verify_dir(dir, &cancel)?,
        (None, None) => {
            return Err(Error::Usage(
                "verify needs a backup directory or --stream".into(),
            ))
        }
    };
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&outcome).expect("serialisable")
        );
    }
    for p in &outcome.problems {
        error!("{p}");
    }
    if outcome.ok {
        info!(
            "Verified {} files, {}, in {}: the backup matches its manifest; completed OK!",
            outcome.files_checked,
            human(outcome.bytes_checked),
            outcome.backup.display()
        );
        Ok(())
    } else {
        Err(Error::Corrupt(format!(
            "{} is {}: {} problem{} found",
            outcome.backup.display(),
            if outcome.complete {
                "damaged"
            } else {
                "incomplete"
            },
            outcome.problems.len(),
            if outcome.problems.len() == 1 { "" } else { "s" }
        )))
    }
}

fn verify_dir(dir: &Path, cancel: &crate::cancel::Cancel) -> Result<Outcome> {
    let backup = BackupDir::open(dir)?;
    if backup.manifest.is_none() {
        let problem = Problem {
            path: crate::format::layout::MANIFEST_NAME.into(),
            problem: "missing",
            detail: backup
                .manifest()
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default(),
        };
        return Ok(Outcome {
            backup: dir.to_path_buf(),
            complete: false,
            ok: false,
            files_checked: 0,
            bytes_checked: 0,
            problems: vec![problem],
        });
    }
    let checked = backup.check(cancel)?;
    Ok(Outcome {
        backup: dir.to_path_buf(),
        complete: true,
        ok: checked.problems.is_empty(),
        files_checked: checked.files,
        bytes_checked: checked.bytes,
        problems: checked.problems,
    })
}

fn verify_stream(path: &Path) -> Result<Outcome> {
    let scanned = match path.as_os_str() == "-" {
        true => extract::scan(&mut super::stdio::stdin()?),
        false => extract::scan(&mut File::open(path).with_path("open", path)?),
    }?;
    Ok(Outcome {
        backup: path.to_path_buf(),
        complete: scanned.complete,
        ok: scanned.problems.is_empty(),
        files_checked: scanned.files,
        bytes_checked: scanned.bytes,
        problems: scanned.problems,
    })
}
