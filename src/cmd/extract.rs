//! `extract`: a stream from a file or stdin into a directory.

use std::fs::File;

use crate::cli::ExtractArgs;
use crate::error::{IoContext, Result};
use crate::info;
use crate::restore::extract;

pub fn run(args: ExtractArgs) -> Result<()> {
    let summary = match args.input.as_deref().filter(|p| p.as_os_str() != "-") {
        Some(path) => {
            let mut file = File::open(path).with_path("open", path)?;
            extract::extract(&mut file, &args.directory, args.keep_compressed)?
        }
        None => extract::extract(
            &mut super::stdio::stdin()?,
            &args.directory,
            args.keep_compressed,
        )?,
    };
    info!(
        "Extracted {} files, {} bytes ({:?}) into {}",
        summary.files,
        summary.bytes,
        summary.format,
        args.directory.display()
    );
    Ok(())
}
