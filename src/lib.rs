//! myrocks-hotbackup: hot backup and restore for MyRocks.
//!
//! The layout follows the data: [`source`] reads backup files once and pushes them into a
//! [`destination::Destination`] (today the [`archive`] stream writers); [`extract`] turns a
//! stream back into files; [`cli`] is the command line.

pub mod archive;
pub mod cancel;
pub mod cli;
pub mod destination;
pub mod error;
pub mod extract;
pub mod log;
pub mod manifest;
pub mod pipe;
pub mod source;
