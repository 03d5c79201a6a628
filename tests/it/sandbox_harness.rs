//! The real-server harness itself: a throwaway MariaDB with RocksDB starts, serves RocksDB
//! tables, and is gone afterwards.

use sandbox::Server;

#[test]
fn sandbox_server_serves_rocksdb_and_cleans_up() {
    let server = Server::start();
    server.exec(
        "CREATE DATABASE d; CREATE TABLE d.t (id INT PRIMARY KEY, v VARCHAR(20)) ENGINE=ROCKSDB; \
         USE d; INSERT INTO t SELECT seq, 'x' FROM seq_1_to_1000",
    );
    assert_eq!(server.value("SELECT COUNT(*) FROM d.t"), "1000");
    assert_eq!(
        server.value("SELECT ENGINE FROM information_schema.TABLES WHERE TABLE_NAME='t'"),
        "ROCKSDB"
    );
    assert!(server.value("SELECT @@log_bin").contains('1'));
    let datadir = server.datadir.clone();
    assert!(datadir.join("#rocksdb").is_dir());
    server.stop();
    assert!(!datadir.exists(), "the sandbox directory must be removed");
}
