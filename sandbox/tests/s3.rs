//! The S3 sandbox itself, through a client of its own (curl's SigV4 signing): objects go in,
//! come out and are listed, a conditional PUT on an existing key fails, a stopped store
//! refuses connections and a restarted one still has its data, two stores run side by side
//! on loopback only, and multipart uploads (with S3's 5 MiB part minimum and conditional
//! completion), ranged GETs and DeleteObjects work.
//!
//! curl 7.88 signs a request body only when told how: every request here carries
//! `x-amz-content-sha256: UNSIGNED-PAYLOAD`, and a query parameter without a value is
//! written `name=` (`?uploads=`), and a `/` in a query value `%2F`, or the signatures do
//! not match.

use std::io::ErrorKind;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sandbox::s3::S3;

/// An answer: the HTTP status, the headers (lower-case names) and the body.
struct Reply {
    status: u16,
    headers: String,
    body: Vec<u8>,
}

impl Reply {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    fn header(&self, name: &str) -> Option<String> {
        self.headers.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    }
}

/// One signed request with curl: `path_and_query` after the endpoint, extra curl arguments
/// (method, headers, body) in `args`.
fn request(s3: &S3, path_and_query: &str, args: &[&str]) -> Reply {
    request_as(s3, &s3.access_key, &s3.secret_key, path_and_query, args)
}

/// Like [`request`], signed with other credentials.
fn request_as(s3: &S3, key: &str, secret: &str, path_and_query: &str, args: &[&str]) -> Reply {
    let dir = tempfile::tempdir().unwrap();
    let (head, body) = (dir.path().join("head"), dir.path().join("body"));
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "30"])
        .arg("--aws-sigv4")
        .arg(format!("aws:amz:{}:s3", s3.region))
        .arg("--user")
        .arg(format!("{key}:{secret}"))
        .args(["-H", "x-amz-content-sha256: UNSIGNED-PAYLOAD"])
        .arg("-D")
        .arg(&head)
        .arg("-o")
        .arg(&body)
        .args(["-w", "%{http_code}"])
        .args(args)
        .arg(format!("{}{path_and_query}", s3.endpoint))
        .stdin(Stdio::null())
        .output()
        .expect("cannot run curl: install it (scripts/install-deps does)");
    assert!(
        out.status.success(),
        "curl {path_and_query}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Reply {
        status: String::from_utf8_lossy(&out.stdout).trim().parse().unwrap(),
        headers: std::fs::read_to_string(&head).unwrap_or_default(),
        body: std::fs::read(&body).unwrap_or_default(),
    }
}

/// PUTs `data` at `key` of the sandbox's bucket (extra curl arguments in `args`).
fn put(s3: &S3, key: &str, data: &[u8], args: &[&str]) -> Reply {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("data");
    std::fs::write(&file, data).unwrap();
    put_file(s3, &format!("/{}/{key}", s3.bucket), &file, args)
}

fn put_file(s3: &S3, path_and_query: &str, file: &Path, args: &[&str]) -> Reply {
    let mut all = vec!["-T", file.to_str().unwrap()];
    all.extend_from_slice(args);
    request(s3, path_and_query, &all)
}

fn get(s3: &S3, key: &str) -> Reply {
    request(s3, &format!("/{}/{key}", s3.bucket), &[])
}

/// The keys of a ListObjectsV2 answer.
fn keys(xml: &str) -> Vec<String> {
    xml.split("<Key>")
        .skip(1)
        .map(|s| s.split("</Key>").next().unwrap().to_string())
        .collect()
}

/// The keys under a prefix (of letters, digits and slashes).
fn list(s3: &S3, prefix: &str) -> Vec<String> {
    let prefix = prefix.replace('/', "%2F");
    let reply = request(
        s3,
        &format!("/{}?list-type=2&prefix={prefix}", s3.bucket),
        &[],
    );
    assert_eq!(reply.status, 200, "{}", reply.text());
    keys(&reply.text())
}

fn s3_port(s3: &S3) -> u16 {
    s3.endpoint.rsplit(':').next().unwrap().parse().unwrap()
}

/// The MD5 of a file in base64 (a Content-MD5 header), from coreutils' md5sum.
fn md5_base64(file: &Path) -> String {
    let out = Command::new("md5sum").arg(file).output().unwrap();
    assert!(out.status.success());
    let hex = String::from_utf8(out.stdout).unwrap();
    let bytes: Vec<u8> = (0..16)
        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
        .collect();
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().fold(0u32, |n, b| n << 8 | u32::from(*b)) << (8 * (3 - chunk.len()));
        for i in 0..=chunk.len() {
            out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    while !out.len().is_multiple_of(4) {
        out.push('=');
    }
    out
}

#[test]
fn objects_go_in_come_out_and_are_listed() {
    let started = Instant::now();
    let s3 = S3::start();
    eprintln!("started in {:?}", started.elapsed());
    assert!(
        s3.endpoint.starts_with("http://127.0.0.1:"),
        "{}",
        s3.endpoint
    );
    assert_eq!(
        s3.url("backups/one"),
        format!("s3://{}/backups/one", s3.bucket)
    );
    let env = s3.env();
    let names: Vec<&str> = env.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        names,
        [
            "AWS_ENDPOINT_URL",
            "AWS_REGION",
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY"
        ]
    );
    assert!(env.contains(&("AWS_ENDPOINT_URL".into(), s3.endpoint.clone())));
    assert!(env.contains(&("AWS_SECRET_ACCESS_KEY".into(), s3.secret_key.clone())));

    // The very first request after start finds the bucket.
    let reply = put(&s3, "a/b.txt", b"hello", &[]);
    assert_eq!(reply.status, 200, "{}", reply.text());
    put(&s3, "a/c/d.txt", b"world", &[]);
    put(&s3, "z.txt", b"elsewhere", &[]);
    let reply = get(&s3, "a/b.txt");
    assert_eq!(reply.status, 200);
    assert_eq!(reply.body, b"hello");
    assert_eq!(list(&s3, "a/"), ["a/b.txt", "a/c/d.txt"]);
    assert_eq!(list(&s3, ""), ["a/b.txt", "a/c/d.txt", "z.txt"]);

    // A conditional PUT on an existing key is refused and changes nothing; on a new key
    // it writes.
    let reply = put(&s3, "a/b.txt", b"other", &["-H", "If-None-Match: *"]);
    assert_eq!(reply.status, 412, "{}", reply.text());
    assert!(
        reply.text().contains("PreconditionFailed"),
        "{}",
        reply.text()
    );
    assert_eq!(get(&s3, "a/b.txt").body, b"hello");
    let reply = put(&s3, "a/new.txt", b"new", &["-H", "If-None-Match: *"]);
    assert_eq!(reply.status, 200, "{}", reply.text());

    // A missing key, a wrong secret, a missing bucket.
    let reply = get(&s3, "no/such/key");
    assert_eq!(reply.status, 404);
    assert!(reply.text().contains("NoSuchKey"), "{}", reply.text());
    let path = format!("/{}/a/b.txt", s3.bucket);
    let reply = request_as(&s3, &s3.access_key, "wrong", &path, &[]);
    assert_eq!(reply.status, 403, "{}", reply.text());
    let reply = request(&s3, "/no-such-bucket/a/b.txt", &[]);
    assert_eq!(reply.status, 404, "{}", reply.text());
}

#[test]
fn a_stopped_store_refuses_and_a_restarted_one_keeps_its_data() {
    let mut s3 = S3::start();
    let endpoint = s3.endpoint.clone();
    assert_eq!(put(&s3, "kept/one", b"survives", &[]).status, 200);

    let started = Instant::now();
    s3.stop();
    eprintln!("stopped in {:?}", started.elapsed());
    assert!(s3.listening().is_empty());
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, s3_port(&s3)));
    let err = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused, "{err}");
    s3.stop(); // Stopping twice is one stop.

    let started = Instant::now();
    s3.restart();
    eprintln!("restarted in {:?}", started.elapsed());
    assert_eq!(s3.endpoint, endpoint);
    let reply = get(&s3, "kept/one");
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.body, b"survives");
    assert_eq!(put(&s3, "kept/two", b"new", &[]).status, 200);
    assert_eq!(list(&s3, "kept/"), ["kept/one", "kept/two"]);

    // Restarting a running store stops it first.
    s3.restart();
    assert_eq!(list(&s3, "kept/"), ["kept/one", "kept/two"]);
}

#[test]
fn two_stores_run_at_once_on_loopback_only() {
    let a = S3::start();
    let b = S3::start();
    assert_ne!(a.endpoint, b.endpoint);
    assert_ne!(a.bucket, b.bucket);
    assert_ne!(a.access_key, b.access_key);

    // Ten ports each, all on 127.0.0.1, none shared.
    let (la, lb) = (a.listening(), b.listening());
    assert_eq!(la.len(), 10, "{la:?}");
    assert_eq!(lb.len(), 10, "{lb:?}");
    for addr in la.iter().chain(&lb) {
        assert_eq!(addr.ip(), IpAddr::V4(Ipv4Addr::LOCALHOST), "{addr}");
        assert!(!(la.contains(addr) && lb.contains(addr)), "{addr} shared");
    }
    assert!(la.iter().any(|x| x.port() == s3_port(&a)));

    // Each has its own data.
    assert_eq!(put(&a, "only/in/a", b"a", &[]).status, 200);
    assert_eq!(put(&b, "only/in/b", b"b", &[]).status, 200);
    assert_eq!(list(&a, "only/"), ["only/in/a"]);
    assert_eq!(list(&b, "only/"), ["only/in/b"]);
    // b's credentials mean nothing to a.
    let path = format!("/{}/only/in/a", a.bucket);
    let reply = request_as(&a, &b.access_key, &b.secret_key, &path, &[]);
    assert_eq!(reply.status, 403, "{}", reply.text());
    assert_eq!(request(&a, &path, &[]).body, b"a");
}

#[test]
fn multipart_uploads_ranged_gets_and_delete_objects_work() {
    let s3 = S3::start();
    let dir = tempfile::tempdir().unwrap();
    // 5 MiB (the smallest part but the last) and a small last part.
    let part1: Vec<u8> = (0..5 << 20).map(|i: u32| (i * 7 % 251) as u8).collect();
    let part2 = b"the end".to_vec();
    let (f1, f2) = (dir.path().join("p1"), dir.path().join("p2"));
    std::fs::write(&f1, &part1).unwrap();
    std::fs::write(&f2, &part2).unwrap();
    let object = format!("/{}/big/object", s3.bucket);

    let upload = |parts: &[&Path], complete: &[&str]| -> Reply {
        let reply = request(&s3, &format!("{object}?uploads="), &["-X", "POST"]);
        assert_eq!(reply.status, 200, "{}", reply.text());
        let id = reply
            .text()
            .split("<UploadId>")
            .nth(1)
            .and_then(|s| s.split("</UploadId>").next())
            .unwrap()
            .to_string();
        let mut xml = String::from("<CompleteMultipartUpload>");
        for (n, part) in parts.iter().enumerate() {
            let n = n + 1;
            let reply = put_file(
                &s3,
                &format!("{object}?partNumber={n}&uploadId={id}"),
                part,
                &[],
            );
            assert_eq!(reply.status, 200, "{}", reply.text());
            let etag = reply.header("etag").unwrap();
            xml += &format!("<Part><PartNumber>{n}</PartNumber><ETag>{etag}</ETag></Part>");
        }
        xml += "</CompleteMultipartUpload>";
        let file = dir.path().join("complete.xml");
        std::fs::write(&file, xml).unwrap();
        let body = format!("@{}", file.display());
        let mut args = vec!["-X", "POST", "--data-binary", &body];
        args.extend_from_slice(complete);
        request(&s3, &format!("{object}?uploadId={id}"), &args)
    };

    // A part below 5 MiB that is not the last is refused at completion.
    let reply = upload(&[&f2, &f2], &[]);
    assert_eq!(reply.status, 400, "{}", reply.text());
    assert!(reply.text().contains("EntityTooSmall"), "{}", reply.text());

    let reply = upload(&[&f1, &f2], &[]);
    assert_eq!(reply.status, 200, "{}", reply.text());
    let whole = [part1.as_slice(), &part2].concat();
    let reply = get(&s3, "big/object");
    assert_eq!(reply.status, 200);
    assert!(reply.body == whole, "the object differs from its parts");

    // A ranged GET across the parts' border.
    let start = part1.len() - 3;
    let range = format!("Range: bytes={start}-{}", start + 5);
    let reply = request(&s3, &object, &["-H", &range]);
    assert_eq!(reply.status, 206, "{}", reply.text());
    assert_eq!(reply.body, whole[start..start + 6]);

    // A conditional completion on an existing key is refused and changes nothing.
    let reply = upload(&[&f2], &["-H", "If-None-Match: *"]);
    assert_eq!(reply.status, 412, "{}", reply.text());
    assert!(get(&s3, "big/object").body == whole);
    put(&s3, "big/other", b"x", &[]);

    // DeleteObjects (its body needs a Content-MD5).
    let xml = "<Delete><Object><Key>big/object</Key></Object>\
               <Object><Key>big/other</Key></Object></Delete>";
    let file = dir.path().join("delete.xml");
    std::fs::write(&file, xml).unwrap();
    let hello = dir.path().join("hello");
    std::fs::write(&hello, "hello").unwrap();
    assert_eq!(md5_base64(&hello), "XUFAKrxLKna5cZ2REBfFkg==");
    let header = format!("Content-MD5: {}", md5_base64(&file));
    let body = format!("@{}", file.display());
    let reply = request(
        &s3,
        &format!("/{}?delete=", s3.bucket),
        &["-X", "POST", "-H", &header, "--data-binary", &body],
    );
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(
        reply.text().matches("<Deleted>").count(),
        2,
        "{}",
        reply.text()
    );
    assert!(list(&s3, "big/").is_empty());
}
