//! myrocks-hotbackup: hot backup and restore for MyRocks.
//!
//! The layout follows the data. [`cmd`] runs one command of the [`cli`]. A backup is driven
//! by [`engine`] (rounds of checkpoints, then the consistent point), which talks to the
//! database through [`server`] and hands files to a [`pipeline`] of reader threads and
//! compression workers, which store them in a [`sink`]: a tar or xbstream stream, a
//! directory, a receiver over the network ([`net`]), or a repository of incremental snapshots
//! in an object store ([`repo`]). [`format`] is what a backup looks like (names, manifest, tar, xbstream);
//! [`restore`] reads backups back: `extract`, `verify`, `info`, `copy-back`, `move-back`.
//! [`sys`] holds every system call the standard library lacks.

pub mod binlog;
pub mod cancel;
pub mod cli;
pub mod cmd;
mod engine;
pub mod error;
pub mod format;
pub mod log;
pub mod net;
pub mod pipeline;
pub mod repo;
mod restore;
mod server;
pub mod sink;
pub mod sys;
