//! Taking a backend's own parameters (the TLS ones) out of a database URL's query string,
//! leaving every other parameter exactly as written for the driver: the URL is not re-encoded
//! (a `%20` must not become a `+`, which the drivers read as a plus) and need not be one the
//! `url` crate accepts (`postgres://h1:5432,h2:5432/db` lists several hosts).

/// Splits `url` into the URL without the parameters `ours` picks and those parameters, decoded
/// (`%XX` only: a `+` stays a plus, as libpq and the mysql client read it).
pub fn take(url: &str, ours: impl Fn(&str) -> bool) -> (String, Vec<(String, String)>) {
    let Some((base, query)) = url.split_once('?') else {
        return (url.to_string(), Vec::new());
    };
    let decode = crate::config::percent_decode;
    let mut kept = Vec::new();
    let mut taken = Vec::new();
    for segment in query.split('&').filter(|s| !s.is_empty()) {
        let (name, value) = segment.split_once('=').unwrap_or((segment, ""));
        match ours(&decode(name)) {
            true => taken.push((decode(name), decode(value))),
            false => kept.push(segment),
        }
    }
    let rest = match kept.is_empty() {
        true => base.to_string(),
        false => format!("{base}?{}", kept.join("&")),
    };
    (rest, taken)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn other_parameters_stay_as_written() {
        let (rest, taken) = take(
            "postgres://h1:5432,h2:5432/db?options=-c%20search_path%3Dapp&sslmode=verify-full&sslrootcert=/etc/a%2Bb.pem&application_name=my+svc",
            |name| name.starts_with("ssl"),
        );
        assert_eq!(
            rest,
            "postgres://h1:5432,h2:5432/db?options=-c%20search_path%3Dapp&application_name=my+svc"
        );
        assert_eq!(
            taken,
            vec![
                ("sslmode".to_string(), "verify-full".to_string()),
                ("sslrootcert".to_string(), "/etc/a+b.pem".to_string())
            ]
        );
        assert_eq!(
            take("mysql://h/db?ssl-mode=DISABLED", |_| true).0,
            "mysql://h/db"
        );
        assert_eq!(take("mysql://h/db", |_| true).0, "mysql://h/db");
    }
}
