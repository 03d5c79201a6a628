// scratch: measure a Path
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};
use std::thread;
use sandbox::net::Path;

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let mbit: u32 = a[1].parse().unwrap();
    let rtt: u32 = a[2].parse().unwrap();
    let streams: usize = a[3].parse().unwrap();
    let secs: f64 = a[4].parse().unwrap();
    let p = Path::new(mbit, rtt);
    let addr = SocketAddr::from((p.rx_addr, 7000));
    let l = p.in_rx(|| TcpListener::bind(addr).unwrap());
    // rtt
    let echo = thread::spawn(move || {
        let mut total = 0u64;
        let mut hs = vec![];
        for _ in 0..(streams + 1) {
            let (mut c, _) = l.accept().unwrap();
            hs.push(thread::spawn(move || {
                let mut buf = vec![0u8; 1 << 20];
                let mut t = 0u64;
                loop { let n = c.read(&mut buf).unwrap(); if n == 0 { break; } t += n as u64; if t < 10 { c.write_all(&buf[..n]).unwrap(); } }
                t
            }));
        }
        for h in hs { total += h.join().unwrap(); }
        total
    });
    let t = Instant::now();
    let mut s = p.in_tx(|| TcpStream::connect(addr).unwrap());
    println!("connect {:?}", t.elapsed());
    for _ in 0..3 {
        let t = Instant::now();
        s.write_all(b"x").unwrap();
        let mut b = [0u8; 1];
        s.read_exact(&mut b).unwrap();
        println!("rtt {:?}", t.elapsed());
    }
    drop(s);
    let start = Instant::now();
    let senders: Vec<_> = (0..streams).map(|_| {
        let mut c = p.in_tx(|| TcpStream::connect(addr).unwrap());
        thread::spawn(move || {
            let buf = vec![7u8; 1 << 20];
            let mut sent = 0u64;
            while start.elapsed().as_secs_f64() < secs { c.write_all(&buf).unwrap(); sent += buf.len() as u64; }
            sent
        })
    }).collect();
    let sent: u64 = senders.into_iter().map(|h| h.join().unwrap()).sum();
    let got = echo.join().unwrap();
    let el = start.elapsed().as_secs_f64();
    println!("streams {streams}: sent {sent} got {got} in {el:.2}s = {:.1} Mbit/s", got as f64 * 8.0 / el / 1e6);
    println!("{:?}", p.stats());
    let _ = Duration::from_secs(0);
}
