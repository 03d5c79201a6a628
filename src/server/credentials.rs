//! Where to connect and as whom, resolved as the MySQL client tools do it: the command line
//! first, then option files (`[client]`, `[client-server]`, `[client-mariadb]` and
//! `[myrocks-hotbackup]` groups, `!include` and `!includedir` followed), then `MYSQL_PWD`.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use crate::cli::ConnectionArgs;
use crate::error::{Error, Result};

/// Where the MariaDB client library looks for a socket when it is given none.
const DEFAULT_SOCKET: &str = "/run/mysqld/mysqld.sock";
const GROUPS: &[&str] = &[
    "client",
    "client-server",
    "client-mariadb",
    "myrocks-hotbackup",
];

/// How to reach the server.
#[derive(Clone, PartialEq, Eq)]
pub enum Endpoint {
    Socket(PathBuf),
    Tcp { host: String, port: u16 },
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        match self {
            Endpoint::Socket(p) => write!(f, "socket {}", p.display()),
            Endpoint::Tcp { host, port } => write!(f, "{host}:{port} (TCP)"),
        }
    }
}

/// Resolved connection settings. The password is never printed: no Debug, no Display.
#[derive(Clone)]
pub struct Credentials {
    pub endpoint: Endpoint,
    pub user: String,
    pub password: Option<String>,
}

/// Resolves the command line, option files and environment into connection settings.
pub fn resolve(args: &ConnectionArgs) -> Result<Credentials> {
    let files = option_file_values(args)?;
    let mut args = args.clone();
    if args.password == Some(None) {
        args.password = Some(Some(prompt_password()?));
    }
    resolve_with(&args, &files, std::env::var("MYSQL_PWD").ok())
}

/// `-p` with no value: ask on the terminal, without echo, as the MySQL clients do.
fn prompt_password() -> Result<String> {
    rpassword::prompt_password("Enter password: ").map_err(|e| {
        Error::Usage(format!(
            "-p without a value asks for the password on a terminal, and there is none ({e}): \
             use an option file (--defaults-file) or MYSQL_PWD instead"
        ))
    })
}

fn resolve_with(
    args: &ConnectionArgs,
    files: &HashMap<String, String>,
    env_password: Option<String>,
) -> Result<Credentials> {
    let from_files = |key: &str| files.get(key).cloned();
    let user = args
        .user
        .clone()
        .or_else(|| from_files("user"))
        .unwrap_or_else(login_name);
    let password = args
        .password
        .clone()
        .flatten()
        .or_else(|| from_files("password"))
        .or(env_password);
    let port = match args.port {
        Some(p) => Some(p),
        None => from_files("port")
            .map(|p| {
                p.parse::<u16>().map_err(|_| {
                    Error::Usage(format!("option files: port={p} is not a port number"))
                })
            })
            .transpose()?,
    };
    // As the MySQL clients: "localhost" (or no host) means the socket. A port given on the
    // command line without a host or socket means TCP on 127.0.0.1, which is what was meant.
    let socket = args.socket.clone();
    let host = args.host.clone().or_else(|| {
        (socket.is_none() && args.port.is_some())
            .then(|| "127.0.0.1".to_string())
            .or_else(|| from_files("host"))
    });
    let endpoint = match (socket, host) {
        (Some(s), _) => Endpoint::Socket(s),
        (None, Some(h)) if h != "localhost" => Endpoint::Tcp {
            host: h,
            port: port.unwrap_or(3306),
        },
        _ => Endpoint::Socket(
            from_files("socket")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET)),
        ),
    };
    Ok(Credentials {
        endpoint,
        user,
        password,
    })
}

fn login_name() -> String {
    std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "root".into())
}

/// The merged values of our groups in the option files, later files winning.
pub fn option_values(args: &ConnectionArgs) -> Result<HashMap<String, String>> {
    option_file_values(args)
}

fn option_file_values(args: &ConnectionArgs) -> Result<HashMap<String, String>> {
    let mut values = HashMap::new();
    if args.no_defaults {
        return Ok(values);
    }
    let explicit = |p: &PathBuf| -> Result<PathBuf> {
        if p.is_file() {
            Ok(p.clone())
        } else {
            Err(Error::Usage(format!(
                "option file {} does not exist",
                p.display()
            )))
        }
    };
    // (file, named on the command line): a named file must be readable.
    let mut files = Vec::new();
    match &args.defaults_file {
        Some(f) => files.push((explicit(f)?, true)),
        None => {
            files.extend(["/etc/my.cnf", "/etc/mysql/my.cnf"].map(|f| (PathBuf::from(f), false)));
            if let Some(home) = std::env::var_os("HOME") {
                files.push((Path::new(&home).join(".my.cnf"), false));
            }
        }
    }
    if let Some(f) = &args.defaults_extra_file {
        files.push((explicit(f)?, true));
    }
    for (f, named) in &files {
        read_option_file(f, &mut values, 0, *named)?;
    }
    Ok(values)
}

/// Reads one option file into `values`. Files the client library would skip silently
/// (missing or unreadable system and included files) are skipped; a file named on the
/// command line must be readable.
fn read_option_file(
    path: &Path,
    values: &mut HashMap<String, String>,
    depth: u32,
    named: bool,
) -> Result<()> {
    if depth > 10 {
        return Err(Error::Usage(format!(
            "option files include each other too deeply at {}",
            path.display()
        )));
    }
    let text = match fs::read_to_string(path) {
        Ok(t) => t,
        Err(e)
            if !named
                && matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied
                ) =>
        {
            return Ok(())
        }
        Err(e) => {
            return Err(Error::Usage(format!(
                "cannot read option file {}: {e}",
                path.display()
            )))
        }
    };
    let mut in_group = false;
    for line in text.lines().map(str::trim) {
        if let Some(target) = line.strip_prefix("!includedir") {
            let dir = Path::new(target.trim());
            let mut entries: Vec<PathBuf> = fs::read_dir(dir)
                .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
                .unwrap_or_default();
            entries.retain(|p| p.extension().is_some_and(|e| e == "cnf"));
            entries.sort();
            for p in entries {
                read_option_file(&p, values, depth + 1, false)?;
            }
        } else if let Some(target) = line.strip_prefix("!include") {
            read_option_file(Path::new(target.trim()), values, depth + 1, false)?;
        } else if let Some(group) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            in_group = GROUPS.contains(&group.trim().replace('_', "-").as_str());
        } else if in_group && !line.is_empty() && !line.starts_with('#') && !line.starts_with(';') {
            let (key, value) = line.split_once('=').unwrap_or((line, ""));
            values.insert(key.trim().replace('-', "_"), parse_value(value));
        }
    }
    Ok(())
}

/// An option value, read as the client library reads it: a `#` outside quotes starts a
/// comment; one pair of surrounding quotes is removed; `\n \t \r \b \s \" \' \\` are
/// escapes, and any other backslash is kept as it is.
fn parse_value(raw: &str) -> String {
    let mut quote = None;
    let mut escaped = false;
    let mut end = raw.len();
    for (i, c) in raw.char_indices() {
        match c {
            '"' | '\'' if !escaped => match quote {
                None => quote = Some(c),
                Some(q) if q == c => quote = None,
                Some(_) => {}
            },
            '#' if quote.is_none() => {
                end = i;
                break;
            }
            _ => {}
        }
        escaped = quote.is_some() && c == '\\' && !escaped;
    }
    let mut value = raw[..end].trim();
    for q in ['"', '\''] {
        if value.len() >= 2 && value.starts_with(q) && value.ends_with(q) {
            value = &value[1..value.len() - 1];
        }
    }
    let mut out = String::with_capacity(value.len());
    let mut chars = value.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\\' || chars.peek().is_none() {
            out.push(c);
            continue;
        }
        let next = chars.next().unwrap();
        match next {
            'n' => out.push('\n'),
            't' => out.push('\t'),
            'r' => out.push('\r'),
            'b' => out.push('\u{8}'),
            's' => out.push(' '),
            '"' | '\'' | '\\' => out.push(next),
            other => {
                out.push('\\');
                out.push(other);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> ConnectionArgs {
        ConnectionArgs::default()
    }

    fn files(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn command_line_beats_option_files_which_beat_mysql_pwd() {
        let f = files(&[("user", "fileuser"), ("password", "filepw")]);
        let mut a = args();
        let c = resolve_with(&a, &f, Some("envpw".into())).unwrap();
        assert_eq!(
            (c.user.as_str(), c.password.as_deref()),
            ("fileuser", Some("filepw"))
        );
        let c = resolve_with(&a, &files(&[]), Some("envpw".into())).unwrap();
        assert_eq!(c.password.as_deref(), Some("envpw"));
        a.password = Some(Some("clipw".into()));
        a.user = Some("cliuser".into());
        let c = resolve_with(&a, &f, Some("envpw".into())).unwrap();
        assert_eq!(
            (c.user.as_str(), c.password.as_deref()),
            ("cliuser", Some("clipw"))
        );
    }

    #[test]
    fn localhost_means_socket_and_a_port_alone_means_tcp() {
        let mut a = args();
        let c = resolve_with(&a, &files(&[("socket", "/s")]), None).unwrap();
        assert!(c.endpoint == Endpoint::Socket("/s".into()));
        a.host = Some("localhost".into());
        assert!(
            resolve_with(&a, &files(&[]), None).unwrap().endpoint
                == Endpoint::Socket(DEFAULT_SOCKET.into())
        );
        a.host = None;
        a.port = Some(3310);
        let c = resolve_with(&a, &files(&[]), None).unwrap();
        assert!(
            c.endpoint
                == Endpoint::Tcp {
                    host: "127.0.0.1".into(),
                    port: 3310
                }
        );
        let c = resolve_with(&args(), &files(&[("host", "db1"), ("port", "3307")]), None).unwrap();
        assert!(
            c.endpoint
                == Endpoint::Tcp {
                    host: "db1".into(),
                    port: 3307
                }
        );
    }

    #[test]
    fn option_files_groups_quotes_comments_and_includes() {
        let dir = tempfile::tempdir().unwrap();
        let inc = dir.path().join("conf.d");
        fs::create_dir(&inc).unwrap();
        fs::write(inc.join("a.cnf"), "[client]\nsocket=/from/include\n").unwrap();
        fs::write(inc.join("ignored.txt"), "[client]\nsocket=/never\n").unwrap();
        let main = dir.path().join("my.cnf");
        fs::write(
            &main,
            format!(
                "[mysqld]\nuser=mysql\n[client]\nuser = bk # the backup user\npassword=\"p#w d\"\n\
                 [myrocks_hotbackup]\nport=3308\n!includedir {}\n",
                inc.display()
            ),
        )
        .unwrap();
        let mut values = HashMap::new();
        read_option_file(&main, &mut values, 0, true).unwrap();
        assert_eq!(values["user"], "bk");
        assert_eq!(values["password"], "p#w d");
        assert_eq!(values["port"], "3308");
        assert_eq!(values["socket"], "/from/include");
    }

    #[test]
    fn values_quotes_escapes_and_comments() {
        assert_eq!(parse_value(" \"s3cret\" # the backup user"), "s3cret");
        assert_eq!(parse_value("'it\\'s'"), "it's");
        assert_eq!(
            parse_value("pw#old"),
            "pw",
            "a # outside quotes starts a comment"
        );
        assert_eq!(parse_value("pw\t# a comment"), "pw");
        assert_eq!(parse_value("\"a#b c\""), "a#b c");
        assert_eq!(
            parse_value(r"C:\data\x"),
            r"C:\data\x",
            "unknown escapes keep the backslash"
        );
        assert_eq!(parse_value("a\\sb"), "a b");
        assert_eq!(parse_value("plain"), "plain");
        assert_eq!(parse_value(""), "");
    }

    #[test]
    fn missing_includes_are_skipped_but_a_named_file_must_be_readable() {
        let dir = tempfile::tempdir().unwrap();
        let main = dir.path().join("my.cnf");
        fs::write(&main, "!include /nonexistent/x.cnf\n[client]\nuser=u\n").unwrap();
        let mut values = HashMap::new();
        read_option_file(&main, &mut values, 0, true).unwrap();
        assert_eq!(values["user"], "u");
        let missing = dir.path().join("gone.cnf");
        assert!(read_option_file(&missing, &mut values, 0, true).is_err());
        assert!(read_option_file(&missing, &mut values, 0, false).is_ok());
    }

    #[test]
    fn a_missing_explicit_option_file_is_a_usage_error() {
        let a = ConnectionArgs {
            defaults_file: Some("/nonexistent/my.cnf".into()),
            ..args()
        };
        assert!(matches!(resolve(&a), Err(Error::Usage(_))));
    }
}
