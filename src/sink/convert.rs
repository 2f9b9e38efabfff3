//! Converting Redis field values (bytes) to SQL values by column type.
//!
//! The database's declared type decides: integers must parse as integers, decimals and floats
//! as numbers, text must be UTF-8 and fit its declared length, binary columns take the bytes as
//! they are, dates and times are passed as text for the database to check. A value that does not
//! fit is refused here, with a reason, identically for every backend (SQLite would otherwise
//! store text in an INTEGER column).

/// The kind of a column, from its declared type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ColumnType {
    Integer {
        unsigned: bool,
    },
    Decimal,
    Float,
    /// DATE, DATETIME, TIMESTAMP, TIME, YEAR: text the database validates.
    Temporal,
    Text {
        max_chars: Option<u64>,
    },
    Binary {
        max_bytes: Option<u64>,
    },
    /// Anything else (JSON, ENUM, SET, BIT, ...): UTF-8 text when it is, else bytes.
    Other,
}

impl ColumnType {
    /// From MySQL/MariaDB `information_schema.COLUMNS` (`DATA_TYPE`, `COLUMN_TYPE`,
    /// `CHARACTER_MAXIMUM_LENGTH`).
    pub fn from_mysql(data_type: &str, column_type: &str, max_length: Option<u64>) -> ColumnType {
        let unsigned = column_type.to_ascii_lowercase().contains("unsigned");
        match data_type.to_ascii_lowercase().as_str() {
            "tinyint" | "smallint" | "mediumint" | "int" | "integer" | "bigint" => {
                ColumnType::Integer { unsigned }
            }
            "decimal" | "numeric" => ColumnType::Decimal,
            "float" | "double" | "real" => ColumnType::Float,
            "date" | "datetime" | "timestamp" | "time" | "year" => ColumnType::Temporal,
            "char" | "varchar" | "tinytext" | "text" | "mediumtext" | "longtext" => {
                ColumnType::Text {
                    max_chars: max_length,
                }
            }
            "binary" | "varbinary" | "tinyblob" | "blob" | "mediumblob" | "longblob" => {
                ColumnType::Binary {
                    max_bytes: max_length,
                }
            }
            _ => ColumnType::Other,
        }
    }

    /// From a SQLite declared type, by SQLite's affinity rules; `VARCHAR(n)`/`CHAR(n)` lengths,
    /// which SQLite itself ignores, are enforced here.
    pub fn from_sqlite(declared: &str) -> ColumnType {
        let upper = declared.to_ascii_uppercase();
        let length = upper
            .split_once('(')
            .and_then(|(_, rest)| rest.split([')', ',']).next())
            .and_then(|n| n.trim().parse().ok());
        if upper.contains("INT") {
            ColumnType::Integer {
                unsigned: upper.contains("UNSIGNED"),
            }
        } else if upper.contains("CHAR") || upper.contains("CLOB") || upper.contains("TEXT") {
            ColumnType::Text { max_chars: length }
        } else if upper.contains("BLOB") || upper.is_empty() {
            ColumnType::Binary { max_bytes: None }
        } else if upper.contains("REAL") || upper.contains("FLOA") || upper.contains("DOUB") {
            ColumnType::Float
        } else if upper.contains("DATE") || upper.contains("TIME") {
            ColumnType::Temporal
        } else if upper.contains("DEC") || upper.contains("NUMERIC") {
            ColumnType::Decimal
        } else {
            ColumnType::Other
        }
    }
}

/// A value ready to bind.
#[derive(Debug, Clone, PartialEq)]
pub enum SqlValue {
    Null,
    Int(i64),
    UInt(u64),
    Float(f64),
    Text(String),
    Bytes(Vec<u8>),
}

fn shown(value: &[u8]) -> String {
    let text = String::from_utf8_lossy(value);
    let mut shown: String = text.chars().take(40).collect();
    if text.chars().count() > 40 {
        shown.push_str("...");
    }
    shown
}

fn is_decimal(text: &str) -> bool {
    let body = text.strip_prefix(['+', '-']).unwrap_or(text);
    let (mantissa, exponent) = match body.split_once(['e', 'E']) {
        Some((m, e)) => (m, Some(e)),
        None => (body, None),
    };
    let (whole, fraction) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    let mantissa_ok =
        (!whole.is_empty() || !fraction.is_empty()) && digits(whole) && digits(fraction);
    let exponent_ok = exponent.is_none_or(|e| {
        let e = e.strip_prefix(['+', '-']).unwrap_or(e);
        !e.is_empty() && digits(e)
    });
    mantissa_ok && exponent_ok
}

/// Why a value cannot be written to its column: the row is dead-lettered with this reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Refusal(pub String);

impl Refusal {
    pub fn contains(&self, text: &str) -> bool {
        self.0.contains(text)
    }
}

/// Converts a field value for a column; the error is the reason the row is refused.
pub fn convert(kind: &ColumnType, column: &str, value: Option<&[u8]>) -> Result<SqlValue, Refusal> {
    let Some(value) = value else {
        return Ok(SqlValue::Null);
    };
    let text = || {
        std::str::from_utf8(value).map_err(|_| {
            Refusal(format!(
                "column `{column}`: value `{}` is not valid UTF-8",
                shown(value)
            ))
        })
    };
    match kind {
        ColumnType::Integer { unsigned: false } => {
            text()?.parse::<i64>().map(SqlValue::Int).map_err(|_| {
                Refusal(format!(
                    "column `{column}`: `{}` is not an integer",
                    shown(value)
                ))
            })
        }
        ColumnType::Integer { unsigned: true } => {
            text()?.parse::<u64>().map(SqlValue::UInt).map_err(|_| {
                Refusal(format!(
                    "column `{column}`: `{}` is not an unsigned integer",
                    shown(value)
                ))
            })
        }
        ColumnType::Decimal => {
            let t = text()?;
            if is_decimal(t) {
                Ok(SqlValue::Text(t.to_string()))
            } else {
                Err(Refusal(format!(
                    "column `{column}`: `{}` is not a decimal number",
                    shown(value)
                )))
            }
        }
        ColumnType::Float => match text()?.parse::<f64>() {
            Ok(f) if f.is_finite() => Ok(SqlValue::Float(f)),
            _ => Err(Refusal(format!(
                "column `{column}`: `{}` is not a finite number",
                shown(value)
            ))),
        },
        ColumnType::Temporal => Ok(SqlValue::Text(text()?.to_string())),
        ColumnType::Text { max_chars } => {
            let t = text()?;
            let chars = t.chars().count() as u64;
            match max_chars {
                Some(max) if chars > *max => Err(Refusal(format!(
                    "column `{column}`: {chars} characters, longer than its {max}"
                ))),
                _ => Ok(SqlValue::Text(t.to_string())),
            }
        }
        ColumnType::Binary { max_bytes } => match max_bytes {
            Some(max) if value.len() as u64 > *max => Err(Refusal(format!(
                "column `{column}`: {} bytes, longer than its {max}",
                value.len()
            ))),
            _ => Ok(SqlValue::Bytes(value.to_vec())),
        },
        ColumnType::Other => Ok(match std::str::from_utf8(value) {
            Ok(t) => SqlValue::Text(t.to_string()),
            Err(_) => SqlValue::Bytes(value.to_vec()),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_convert_by_column_type() {
        let int = ColumnType::Integer { unsigned: false };
        assert_eq!(convert(&int, "age", Some(b"42")), Ok(SqlValue::Int(42)));
        assert!(convert(&int, "age", Some(b"forty"))
            .unwrap_err()
            .contains("`forty` is not an integer"));
        assert!(convert(&ColumnType::Integer { unsigned: true }, "n", Some(b"-1")).is_err());
        assert_eq!(convert(&int, "age", None), Ok(SqlValue::Null));
        assert_eq!(
            convert(&ColumnType::Decimal, "p", Some(b"-12.50")),
            Ok(SqlValue::Text("-12.50".into()))
        );
        assert!(convert(&ColumnType::Decimal, "p", Some(b"1.2.3")).is_err());
        assert!(convert(&ColumnType::Float, "f", Some(b"inf")).is_err());
        let short = ColumnType::Text { max_chars: Some(3) };
        assert!(convert(&short, "c", Some("héé".as_bytes())).is_ok());
        assert!(convert(&short, "c", Some(b"long"))
            .unwrap_err()
            .contains("longer than its 3"));
        assert!(convert(&short, "c", Some(b"\xff"))
            .unwrap_err()
            .contains("UTF-8"));
        assert_eq!(
            convert(&ColumnType::Binary { max_bytes: None }, "b", Some(b"\xff")),
            Ok(SqlValue::Bytes(vec![0xff]))
        );
    }

    #[test]
    fn declared_types_map_to_kinds() {
        assert_eq!(
            ColumnType::from_sqlite("VARCHAR(20)"),
            ColumnType::Text {
                max_chars: Some(20)
            }
        );
        assert_eq!(
            ColumnType::from_sqlite("bigint"),
            ColumnType::Integer { unsigned: false }
        );
        assert_eq!(
            ColumnType::from_sqlite(""),
            ColumnType::Binary { max_bytes: None }
        );
        assert_eq!(
            ColumnType::from_mysql("int", "int(10) unsigned", None),
            ColumnType::Integer { unsigned: true }
        );
        assert_eq!(
            ColumnType::from_mysql("varchar", "varchar(5)", Some(5)),
            ColumnType::Text { max_chars: Some(5) }
        );
    }
}
