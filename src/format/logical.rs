//! InnoDB user tables in a backup: their definitions (in the manifest) and their rows, one
//! file per table under `#innodb/`, in `LOAD DATA`'s default text form (fields separated by
//! tabs, rows by newlines, `\` escapes, `\N` for NULL), compressed with zstd (frame
//! checksums on). The manifest records each file's rows, size and CRC-32 before
//! compression; the restore checks all three while it loads.

use serde::{Deserialize, Serialize};

/// The rows and definitions of the InnoDB user tables, taken from one consistent snapshot.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Logical {
    pub tables: Vec<LogicalTable>,
    /// Triggers of these tables, in the order they fire: created once the rows are loaded.
    pub triggers: Vec<Trigger>,
    /// Connections that read the tables at once.
    pub threads: usize,
    /// Time from the consistent point until every table was read.
    pub seconds: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LogicalTable {
    pub schema: String,
    pub name: String,
    /// `SHOW CREATE TABLE` (or `SHOW CREATE SEQUENCE`), without the schema.
    pub create: String,
    /// For a sequence: `next_not_cached_value` and `cycle_count` at the consistent point.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sequence: Option<(i64, i64)>,
    /// The columns the data file holds, in order (generated columns are left out).
    pub columns: Vec<String>,
    /// The data file's path in the backup (none for a sequence).
    pub file: Option<String>,
    pub rows: u64,
    /// Size and CRC-32 of the data file before compression.
    pub bytes: u64,
    pub crc32: u32,
    /// InnoDB's data and index bytes on the source (`information_schema.TABLES`).
    pub size_on_server: u64,
}

impl LogicalTable {
    pub fn qualified(&self) -> String {
        format!("{}.{}", ident(&self.schema), ident(&self.name))
    }
}

/// `SHOW CREATE TRIGGER`, with the session settings it must be created under.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Trigger {
    pub schema: String,
    pub name: String,
    pub sql_mode: String,
    pub character_set_client: String,
    pub collation_connection: String,
    pub statement: String,
}

/// A quoted SQL identifier (backticks mean the same in every sql_mode).
pub fn ident(s: &str) -> String {
    format!("`{}`", s.replace('`', "``"))
}

/// A quoted SQL string literal that means the same in every sql_mode.
pub fn literal(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('\'');
    for c in s.chars() {
        match c {
            '\'' => out.push_str("''"),
            '\\' => out.push_str("\\\\"),
            '\0' => out.push_str("\\0"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

/// The suffix of the data files: not `.zst`, which the restore of a compressed stream
/// decodes on the way (these files are described as stored, not as compressed).
pub const LOGICAL_SUFFIX: &str = "tsv.zstd";

/// Appends one value of a column of type `kind` in `LOAD DATA`'s text form.
pub fn encode_column(out: &mut Vec<u8>, value: &mysql::Value, kind: mysql::consts::ColumnType) {
    use mysql::consts::ColumnType;
    use std::io::Write;
    match (kind, value) {
        // YEAR 0 loads back as 2000 unless written with four digits.
        (ColumnType::MYSQL_TYPE_YEAR, mysql::Value::Int(y)) => {
            write!(out, "{y:04}").expect("to memory")
        }
        (ColumnType::MYSQL_TYPE_YEAR, mysql::Value::UInt(y)) => {
            write!(out, "{y:04}").expect("to memory")
        }
        _ => encode_value(out, value),
    }
}

/// Appends one value in `LOAD DATA`'s text form. Values come from the binary protocol, so
/// floating point numbers keep every bit (the text protocol prints FLOATs to 6 digits).
fn encode_value(out: &mut Vec<u8>, value: &mysql::Value) {
    use mysql::Value;
    use std::io::Write;
    match value {
        Value::NULL => out.extend_from_slice(b"\\N"),
        Value::Bytes(bytes) => escape(out, bytes),
        Value::Int(n) => write!(out, "{n}").expect("to memory"),
        Value::UInt(n) => write!(out, "{n}").expect("to memory"),
        // The shortest form that reads back as the same number.
        Value::Float(f) => write!(out, "{f:e}").expect("to memory"),
        Value::Double(f) => write!(out, "{f:e}").expect("to memory"),
        Value::Date(y, mo, d, h, mi, s, us) => {
            write!(out, "{y:04}-{mo:02}-{d:02}").expect("to memory");
            // A DATE column's values carry no time; a DATETIME at midnight reads the same.
            if (h, mi, s, us) != (&0, &0, &0, &0) {
                write!(out, " {h:02}:{mi:02}:{s:02}").expect("to memory");
            }
            if *us > 0 {
                write!(out, ".{us:06}").expect("to memory");
            }
        }
        Value::Time(negative, days, h, mi, s, us) => {
            let sign = if *negative { "-" } else { "" };
            let hours = u64::from(*days) * 24 + u64::from(*h);
            write!(out, "{sign}{hours:02}:{mi:02}:{s:02}").expect("to memory");
            if *us > 0 {
                write!(out, ".{us:06}").expect("to memory");
            }
        }
    }
}

fn escape(out: &mut Vec<u8>, bytes: &[u8]) {
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let esc: &[u8] = match b {
            b'\\' => b"\\\\",
            b'\t' => b"\\t",
            b'\n' => b"\\n",
            0 => b"\\0",
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        out.extend_from_slice(esc);
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use mysql::Value;

    fn enc(v: Value) -> String {
        let mut out = Vec::new();
        encode_value(&mut out, &v);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn values_take_load_data_form() {
        assert_eq!(enc(Value::NULL), "\\N");
        assert_eq!(
            enc(Value::Bytes(b"a\tb\nc\\d\0e\\N".to_vec())),
            "a\\tb\\nc\\\\d\\0e\\\\N"
        );
        assert_eq!(enc(Value::Int(-5)), "-5");
        assert_eq!(enc(Value::UInt(u64::MAX)), u64::MAX.to_string());
        assert_eq!(enc(Value::Float(0.1234567)), "1.234567e-1");
        assert_eq!(enc(Value::Double(1e-300)), "1e-300");
        assert_eq!(
            enc(Value::Date(2020, 1, 2, 3, 4, 5, 60)),
            "2020-01-02 03:04:05.000060"
        );
        assert_eq!(enc(Value::Date(0, 0, 0, 0, 0, 0, 0)), "0000-00-00");
        assert_eq!(
            enc(Value::Time(true, 34, 22, 59, 59, 500_000)),
            "-838:59:59.500000"
        );
        assert_eq!(enc(Value::Time(false, 0, 1, 2, 3, 0)), "01:02:03");
    }

    #[test]
    fn years_keep_four_digits() {
        let mut out = Vec::new();
        encode_column(
            &mut out,
            &Value::Int(0),
            mysql::consts::ColumnType::MYSQL_TYPE_YEAR,
        );
        assert_eq!(out, b"0000");
    }

    #[test]
    fn floats_read_back_exactly() {
        for f in [0.1234567f32, f32::MIN_POSITIVE, f32::MAX, -3.4e-38] {
            let text = enc(Value::Float(f));
            assert_eq!(text.parse::<f64>().unwrap() as f32, f, "{text}");
        }
    }

    #[test]
    fn literals_are_quoted() {
        assert_eq!(literal("a'b\\c\n"), "'a''b\\\\c\\n'");
        assert_eq!(ident("a`b"), "`a``b`");
    }
}
