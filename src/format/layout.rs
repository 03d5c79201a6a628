//! The names of a backup's own files and directories, shared by the code that writes a
//! backup and the code that reads one back.

/// Where RocksDB files go in the backup.
pub const ROCKSDB_DIR: &str = "#rocksdb";
/// First file of every backup: says the backup was written by this tool, so that a
/// missing manifest means "incomplete".
pub const BEGIN_NAME: &str = "myrocks_hotbackup.begin";
/// Last file of every backup: the manifest. A backup without it is incomplete.
pub const MANIFEST_NAME: &str = "myrocks_hotbackup.json";
/// mariabackup's file with `file<TAB>position<TAB>gtid`, read by replica-provisioning scripts.
pub const BINLOG_INFO_NAME: &str = "xtrabackup_binlog_info";
/// mariabackup's `--slave-info` file: the statements that make a copy of a replica resume.
pub const SLAVE_INFO_NAME: &str = "xtrabackup_slave_info";
/// `SHOW CREATE TABLE` of the InnoDB tables in `mysql`, and the rows of
/// `mysql.gtid_slave_pos`: run at restore, with `USE mysql` first.
pub const INNODB_SQL_NAME: &str = "myrocks_hotbackup_innodb.sql";
/// The rows of the InnoDB user tables, one file per table (see `format::logical`).
pub const INNODB_DIR: &str = "#innodb";
/// The suffix of a file stored compressed with zstd, as xtrabackup names them.
pub const ZSTD_SUFFIX: &str = ".zst";
