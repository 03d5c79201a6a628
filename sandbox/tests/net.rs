//! The network harness itself: a link connects its two namespaces and nothing else, a cut
//! is silent and an established connection outlives it, shaping throttles, a path has its
//! round-trip time and its rate, the sshd lets the test key in (over a link and over a
//! path), and the relay flips exactly one bit of its first connection.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use sandbox::net::{FlipRelay, Link, Path, Sshd, FLIP_MASK};

/// Runs a command, returning its standard output; panics if it fails.
fn output(cmd: &mut Command) -> String {
    let out = cmd.stdin(Stdio::null()).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// An echo server bound in the rx namespace (on a thread of this process).
fn echo_server(link: &Link, port: u16) -> SocketAddr {
    let addr = SocketAddr::from((link.rx_addr, port));
    let listener = link.in_rx(|| TcpListener::bind(addr).unwrap());
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = conn.read(&mut buf) {
                    if n == 0 || conn.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

fn ping(stream: &mut TcpStream, message: &[u8], timeout: Duration) -> std::io::Result<Vec<u8>> {
    stream.set_read_timeout(Some(timeout))?;
    stream.write_all(message)?;
    let mut got = vec![0u8; message.len()];
    stream.read_exact(&mut got)?;
    Ok(got)
}

#[test]
fn link_connects_cuts_silently_and_mends() {
    let link = Link::new();
    assert_ne!(link.tx_ns, link.rx_ns);
    assert_eq!(link.tx_addr.octets()[..3], link.rx_addr.octets()[..3]);

    // A program in rx (socat echoes), a client in tx.
    let mut socat = link
        .rx("socat")
        .arg(format!(
            "TCP-LISTEN:7000,bind={},fork,reuseaddr",
            link.rx_addr
        ))
        .arg("PIPE")
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let got = loop {
        let out = link
            .tx("sh")
            .arg("-c")
            .arg(format!(
                "echo hello | socat -t 2 - TCP:{}:7000,connect-timeout=1",
                link.rx_addr
            ))
            .output()
            .unwrap();
        if out.status.success() || Instant::now() > deadline {
            break String::from_utf8_lossy(&out.stdout).into_owned();
        }
        thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(got, "hello\n");

    // The namespaces route nowhere but to each other, and their loopback is their own.
    // (The host may well reach an address 10.x.y.2 of its own network: not the link's.)
    for ns in [&link.tx_ns, &link.rx_ns] {
        let routes = output(Command::new("ip").args(["-n", ns, "-4", "route", "show"]));
        let [a, b, c, _] = link.rx_addr.octets();
        let subnet = format!("{a}.{b}.{c}.0/24");
        assert_eq!(routes.lines().count(), 1, "{routes}");
        assert!(routes.starts_with(&subnet), "{routes}");
    }
    let probe = TcpListener::bind("0.0.0.0:0").unwrap();
    let host_port = probe.local_addr().unwrap().port();
    assert!(link
        .in_tx(|| TcpStream::connect_timeout(
            &SocketAddr::from(([127, 0, 0, 1], host_port)),
            Duration::from_secs(1)
        ))
        .is_err());

    // An established connection from tx, made on a thread of this process.
    let echo = echo_server(&link, 7001);
    let mut stream = link.in_tx(|| TcpStream::connect(echo).unwrap());
    assert_eq!(
        ping(&mut stream, b"one", Duration::from_secs(5)).unwrap(),
        b"one"
    );

    link.cut();
    // Silent: a new connection neither succeeds nor is refused; it times out.
    let started = Instant::now();
    let err = link
        .in_tx(|| TcpStream::connect_timeout(&echo, Duration::from_secs(2)))
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::TimedOut, "{err}");
    assert!(started.elapsed() >= Duration::from_millis(1900));
    // The established one gets no answer, and no error either.
    let err = ping(&mut stream, b"two", Duration::from_secs(2)).unwrap_err();
    assert!(
        matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
        "{err}"
    );
    // Cutting twice is one cut.
    link.cut();

    link.mend();
    // The retransmission of "two" arrives, the connection goes on.
    let mut got = vec![0u8; 3];
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    stream.read_exact(&mut got).unwrap();
    assert_eq!(got, b"two");
    assert_eq!(
        ping(&mut stream, b"three", Duration::from_secs(5)).unwrap(),
        b"three"
    );
    let mut fresh =
        link.in_tx(|| TcpStream::connect_timeout(&echo, Duration::from_secs(5)).unwrap());
    assert_eq!(
        ping(&mut fresh, b"four", Duration::from_secs(5)).unwrap(),
        b"four"
    );
    // Mending twice is harmless.
    link.mend();

    let _ = socat.kill();
    let _ = socat.wait();
}

#[test]
fn link_shapes_throughput() {
    let link = Link::new();
    let addr = SocketAddr::from((link.rx_addr, 7002));
    let listener = link.in_rx(|| TcpListener::bind(addr).unwrap());
    let (done, seconds) = mpsc::channel();
    thread::spawn(move || {
        for conn in listener.incoming() {
            let mut conn = conn.unwrap();
            let started = Instant::now();
            let mut buf = vec![0u8; 65536];
            let mut total = 0;
            while total < 1_000_000 {
                let n = conn.read(&mut buf).unwrap();
                assert!(n > 0);
                total += n;
            }
            done.send(started.elapsed().as_secs_f64()).unwrap();
        }
    });
    let send = || {
        let mut stream = link.in_tx(|| TcpStream::connect(addr).unwrap());
        stream.write_all(&vec![7u8; 1_000_000]).unwrap();
        seconds.recv_timeout(Duration::from_secs(30)).unwrap()
    };
    let free = send();
    // 1 MB at 4 Mbit/s: 2 s (the bucket's burst lets a little through at once).
    link.shape(4);
    let shaped = send();
    link.unshape();
    let unshaped = send();
    assert!(free < 0.5, "unshaped: {free} s");
    assert!(
        (1.6..3.0).contains(&shaped),
        "1 MB at 4 Mbit/s took {shaped} s"
    );
    assert!(unshaped < 0.5, "after unshape: {unshaped} s");
}

#[test]
fn path_has_its_round_trip_and_rate() {
    let (mbit, rtt_ms) = (40, 60);
    let path = Path::new(mbit, rtt_ms);
    let names = [path.tx_ns.clone(), path.mid_ns.clone(), path.rx_ns.clone()];
    let addr = SocketAddr::from((path.rx_addr, 7003));
    let listener = path.in_rx(|| TcpListener::bind(addr).unwrap());
    // The first connection echoes; the second is counted, its first byte to its last.
    let (done, got) = mpsc::channel();
    thread::spawn(move || {
        let (mut echo, _) = listener.accept().unwrap();
        let mut buf = [0u8; 64];
        while let Ok(n) = echo.read(&mut buf) {
            if n == 0 || echo.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let (mut sink, _) = listener.accept().unwrap();
        let mut buf = vec![0u8; 1 << 16];
        let (mut total, mut first) = (0usize, None);
        loop {
            let n = sink.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            first.get_or_insert_with(Instant::now);
            total += n;
        }
        done.send((total, first.unwrap().elapsed())).unwrap();
    });

    // The round trip: a byte there and back, the fastest of five.
    let started = Instant::now();
    let mut echo = path.in_tx(|| TcpStream::connect(addr).unwrap());
    let connect = started.elapsed();
    let rtt = (0..5)
        .map(|_| {
            let started = Instant::now();
            assert_eq!(ping(&mut echo, b"x", Duration::from_secs(5)).unwrap(), b"x");
            started.elapsed()
        })
        .min()
        .unwrap();
    let expected = Duration::from_millis(rtt_ms.into());
    for (what, took) in [("connect", connect), ("echo", rtt)] {
        assert!(
            took >= expected - Duration::from_millis(1)
                && took < expected + Duration::from_millis(20),
            "{what} took {took:?} on a path of {rtt_ms} ms"
        );
    }
    drop(echo);

    // One stream, 6 MB: no faster than the rate (whole packets count against it, headers
    // too), and not much slower either (TCP's ramp-up takes a few round trips).
    let mut stream = path.in_tx(|| TcpStream::connect(addr).unwrap());
    stream.write_all(&vec![7u8; 6_000_000]).unwrap();
    drop(stream);
    let (total, took) = got.recv_timeout(Duration::from_secs(60)).unwrap();
    assert_eq!(total, 6_000_000);
    let got_mbit = total as f64 * 8.0 / 1e6 / took.as_secs_f64();
    assert!(
        got_mbit <= f64::from(mbit) && got_mbit > f64::from(mbit) * 0.4,
        "one stream: {got_mbit:.1} Mbit/s on a path of {mbit} Mbit/s"
    );
    let stats = path.stats();
    assert!(stats.packets > 4000, "{stats:?}");
    assert!(stats.to_rx_bytes > 6_000_000, "{stats:?}");

    // An sshd on the far host of the path.
    let sshd = Sshd::start(&path);
    let line = sshd.ssh_command();
    let mut words = line.split_whitespace();
    let said = output(
        path.tx(words.next().unwrap())
            .args(words)
            .arg(format!("root@{}", sshd.host()))
            .arg("echo ok"),
    );
    assert_eq!(said, "ok\n");
    drop(sshd);

    // Dropped, the path leaves no namespace behind.
    drop(path);
    let listed = output(Command::new("ip").args(["netns", "list"]));
    for name in names {
        assert!(!listed.contains(&name), "{name} is left:\n{listed}");
    }
}

#[test]
fn sshd_lets_the_test_key_in() {
    let link = Link::new();
    let sshd = Sshd::start(&link);
    assert_eq!(sshd.host(), link.rx_addr.to_string());
    // As the tool under test does: split the command line on whitespace, append the login
    // and the remote command, run it in tx.
    let line = sshd.ssh_command();
    let mut words = line.split_whitespace();
    let run = |remote: &str| {
        output(
            link.tx(words.clone().next().unwrap())
                .args(words.clone().skip(1))
                .arg(format!("root@{}", sshd.host()))
                .arg(remote),
        )
    };
    assert_eq!(run("echo ok"), "ok\n");
    let path = run("echo $PATH");
    for dir in ["/usr/sbin", "/usr/bin", "/bin"] {
        assert!(
            path.trim().split(':').any(|d| d == dir),
            "remote PATH: {path}"
        );
    }
    // The remote command runs in rx, whose address it sees.
    let addrs = run("ip -o -4 addr show");
    assert!(addrs.contains(&sshd.host()), "{addrs}");
    // Standard input goes through.
    let mut child = link
        .tx(words.next().unwrap())
        .args(words)
        .arg(format!("root@{}", sshd.host()))
        .arg("wc -c")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(&[1u8; 100_000])
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "100000");
    assert!(
        sshd.log().contains("Accepted publickey for root"),
        "{}",
        sshd.log()
    );

    // A second server on the same link listens on another port.
    let second = Sshd::start(&link);
    assert_ne!(second.port(), sshd.port());
}

/// A sink that records, for each connection, all the bytes it got, then answers "done".
fn sink() -> (SocketAddr, mpsc::Receiver<Vec<u8>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for conn in listener.incoming() {
            let mut conn = conn.unwrap();
            let tx = tx.clone();
            thread::spawn(move || {
                let mut got = Vec::new();
                conn.read_to_end(&mut got).unwrap();
                conn.write_all(b"done").unwrap();
                tx.send(got).unwrap();
            });
        }
    });
    (addr, rx)
}

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Sends `data` through the relay, half-closes, and checks the answer comes back.
fn send(relay: &FlipRelay, data: &[u8], sink: &mpsc::Receiver<Vec<u8>>) -> Vec<u8> {
    let mut stream = TcpStream::connect(relay.addr()).unwrap();
    // Written in odd-sized pieces, so the flipped byte is rarely at a read boundary.
    for chunk in data.chunks(100_003) {
        stream.write_all(chunk).unwrap();
    }
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).unwrap();
    assert_eq!(answer, b"done");
    sink.recv_timeout(Duration::from_secs(30)).unwrap()
}

#[test]
fn flip_relay_flips_one_bit_of_the_first_connection() {
    const MIB: usize = 1 << 20;
    let (target, got) = sink();
    let relay = FlipRelay::start(target, 3 * MIB as u64);
    assert!(!relay.flipped());
    let first = pattern(4 * MIB, 1);
    let received = send(&relay, &first, &got);
    assert!(relay.flipped());
    assert_eq!(received.len(), first.len());
    let differing: Vec<usize> = (0..first.len())
        .filter(|&i| first[i] != received[i])
        .collect();
    assert_eq!(differing, [3 * MIB]);
    assert_eq!(first[3 * MIB] ^ received[3 * MIB], FLIP_MASK);

    let second = pattern(4 * MIB, 2);
    assert!(send(&relay, &second, &got) == second);
    assert_eq!(relay.connections(), 2);

    // A first connection shorter than the offset is not flipped, nor any after it.
    let relay = FlipRelay::start(target, 3 * MIB as u64);
    let short = pattern(MIB, 3);
    assert!(send(&relay, &short, &got) == short);
    assert!(send(&relay, &second, &got) == second);
    assert!(!relay.flipped());
    assert_eq!(relay.connections(), 2);
}

#[test]
fn links_in_parallel_do_not_collide() {
    let links: Vec<Link> = thread::scope(|s| {
        let handles: Vec<_> = (0..4).map(|_| s.spawn(Link::new)).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, a) in links.iter().enumerate() {
        for b in &links[i + 1..] {
            assert_ne!(a.rx_ns, b.rx_ns);
            assert_ne!(a.rx_addr, b.rx_addr);
        }
    }
    let names: Vec<String> = links.iter().map(|l| l.tx_ns.clone()).collect();
    // A process left in a namespace is killed when the link is dropped.
    let mut sleeper = links[0].rx("sleep").arg("600").spawn().unwrap();
    drop(links);
    let status = sleeper.wait().unwrap();
    assert!(!status.success());
    let listed = output(Command::new("ip").args(["netns", "list"]));
    for name in names {
        assert!(!listed.contains(&name), "{name} is left:\n{listed}");
    }
}
