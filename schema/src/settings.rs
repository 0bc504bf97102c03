//! Settings checked when a process starts: a value that makes no sense is refused
//! there, naming the setting and why, instead of being bent into shape (a spawn
//! limit of 0 made 1) or failing later (a cron expression at its first tick).
//! Used from the processes' `clap` arguments as `value_parser`s.

use std::{fmt::Display, str::FromStr};

/// A whole number of at least `min`.
pub fn at_least<T>(setting: &str, min: T, raw: &str) -> Result<T, String>
where
    T: FromStr + PartialOrd + Display + Copy,
{
    match raw.trim().parse::<T>() {
        Ok(value) if value >= min => Ok(value),
        Ok(_) => Err(format!("{setting} must be at least {min}, not {raw}")),
        Err(_) => Err(format!("{setting} must be a whole number, not {raw:?}")),
    }
}

/// A Postgres URL. A SQLite URL is refused with where SQLite is used instead.
pub fn postgres_url(setting: &str, raw: &str) -> Result<String, String> {
    let scheme = raw.split_once(':').map_or("", |(scheme, _)| scheme);
    match scheme.to_ascii_lowercase().as_str() {
        "postgres" | "postgresql" => Ok(raw.to_owned()),
        "sqlite" => Err(format!(
            "{setting} is a SQLite URL, and Berth's separate processes share a Postgres \
             database; for the embedded SQLite store run `berth up` without {setting} \
             (it keeps its database in BERTH_DATA_DIR)"
        )),
        _ => Err(format!(
            "{setting} must be a postgres:// URL (postgres://user:password@host:5432/database)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_below_their_least_and_words_are_refused_by_name() {
        assert_eq!(at_least("BERTH_X", 1_i64, "5"), Ok(5));
        assert_eq!(
            at_least("BERTH_X", 1_i64, "-5"),
            Err("BERTH_X must be at least 1, not -5".into())
        );
        assert_eq!(
            at_least("BERTH_X", 1_u32, "ten"),
            Err("BERTH_X must be a whole number, not \"ten\"".into())
        );
    }

    #[test]
    fn only_postgres_urls_pass() {
        assert!(postgres_url("BERTH_DATABASE_URL", "postgresql://h/db").is_ok());
        let sqlite = postgres_url("BERTH_DATABASE_URL", "sqlite:///tmp/b.db").unwrap_err();
        assert!(sqlite.contains("berth up"), "{sqlite}");
        assert!(postgres_url("BERTH_DATABASE_URL", "mysql://h/db").is_err());
    }
}
