//! myrocks-hotbackup: hot backup and restore for MyRocks.
//!
//! The layout follows the data. [`backup`] drives a backup: it talks to the server through
//! [`server`] (credentials from [`credentials`]), takes checkpoints in a [`checkpoint`]
//! area, picks datadir files with [`datadir`], and sends every file through the one reader
//! in [`source`] into a [`destination::Destination`] (today the [`archive`] stream writers),
//! closing with a [`manifest`]. [`extract`] turns a stream back into files, [`restore`]
//! puts them into a datadir, and [`cli`] is the command line.

pub mod archive;
pub mod aside;
pub mod backup;
pub mod cancel;
pub mod checkpoint;
pub mod cli;
pub mod credentials;
pub mod datadir;
pub mod destination;
pub mod error;
pub mod extract;
pub mod log;
pub mod manifest;
pub mod pipe;
pub mod restore;
pub mod server;
pub mod source;
pub mod sys;
pub mod wal;
