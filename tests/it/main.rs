//! Integration tests: one binary, run by `scripts/test`. Tests that need a real server get
//! one from the `sandbox` crate; archive tests use the real `tar` and `mbstream`.

mod common;

mod archive_tools;
mod backup_restore;
mod bench_smoke;
mod directory;
mod extract_safety;
mod failures;
mod mixed;
mod network;
mod pitr;
mod properties;
mod replica;
mod repository;
mod safety;
mod sandbox_harness;
mod zoo;
