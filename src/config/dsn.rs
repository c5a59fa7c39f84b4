//! `email.STATE_DSN`: where the shared state database is. Read here with the rest of the INI
//! file into `Settings::state_dsn`; `crate::state` opens the database it is given.

use std::path::PathBuf;

use crate::config::Secret;
use crate::error::Result;

/// What to do when a password holds a character the DSN reads as a separator.
const PASSWORD_HINT: &str = "percent-encode ? # @ / in the password (%3F %23 %40 %2F)";

/// Where the database is: `mysql://USER:PASSWORD@HOST:PORT/DATABASE[?ssl=required&ca=PATH]`.
#[derive(Clone, PartialEq, Eq)]
pub struct Dsn {
    pub user: String,
    pub password: Secret,
    pub host: String,
    pub port: u16,
    pub database: String,
    /// `ssl=required` (or a `ca`): TLS, with the server's certificate verified.
    pub ssl: bool,
    pub ca: Option<PathBuf>,
}

impl std::fmt::Debug for Dsn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.label())
    }
}

fn percent_decode(text: &str) -> std::result::Result<String, String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| "has a % not followed by two hex digits".to_string())?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "is not UTF-8 once %-decoded".to_string())
}

impl Dsn {
    /// Reads a DSN. `reveal` turns the password as written (possibly `ENC:v1:...`) into the
    /// password. Errors say what is wrong without repeating the value.
    pub fn parse(
        text: &str,
        reveal: impl FnOnce(&str) -> Result<Secret>,
    ) -> std::result::Result<Dsn, String> {
        let text = text.trim();
        let rest = text
            .strip_prefix("mysql://")
            .or_else(|| text.strip_prefix("mariadb://"))
            .ok_or("must start with mysql:// (mysql://USER:PASSWORD@HOST:PORT/DATABASE)")?;
        let (main, query) = rest.split_once('?').unwrap_or((rest, ""));
        // An `@` after the `?`: an unencoded `?` in the password started the query early, so
        // the rest may be the password's tail; nothing of it is repeated.
        if query.contains('@') {
            return Err(format!("has an @ after the ?; {PASSWORD_HINT}"));
        }
        let at = main
            .rfind('@')
            .ok_or_else(|| format!("has no USER:PASSWORD@ before the host; {PASSWORD_HINT}"))?;
        let (userinfo, hostpart) = (&main[..at], &main[at + 1..]);
        let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
        let user = percent_decode(user).map_err(|e| format!("user {e}"))?;
        if user.is_empty() {
            return Err("has no user name".into());
        }
        let password = if super::secrets::is_encrypted(password) {
            reveal(password).map_err(|e| format!("password: {e}"))?
        } else {
            Secret::new(percent_decode(password).map_err(|e| format!("password {e}"))?)
        };
        let (hostport, database) = hostpart
            .split_once('/')
            .ok_or("has no /DATABASE after the host")?;
        let database = percent_decode(database).map_err(|e| format!("database {e}"))?;
        if database.is_empty() || database.contains('`') {
            return Err("has no usable database name after the host".into());
        }
        let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
            let (h, p) = v6.split_once(']').ok_or("has an unclosed [ in the host")?;
            (h.to_string(), p.strip_prefix(':').unwrap_or(""))
        } else {
            match hostport.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), p),
                None => (hostport.to_string(), ""),
            }
        };
        if host.is_empty() {
            return Err("has no host".into());
        }
        let port = match port {
            "" => 3306,
            p => p
                .parse::<u16>()
                .ok()
                .filter(|p| *p > 0)
                .ok_or("has a port that is not a number from 1 to 65535")?,
        };
        let (mut ssl, mut ca) = (false, None);
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let known = ["ssl", "ssl-mode", "sslmode", "ca", "ssl-ca", "sslca"].contains(&k);
            let v = percent_decode(v).map_err(|e| match known {
                true => format!("{k} {e}"),
                false => format!("has a parameter that {e}; {PASSWORD_HINT}"),
            })?;
            match k {
                "ssl" | "ssl-mode" | "sslmode" => {
                    ssl = match v.to_ascii_lowercase().as_str() {
                        "required" | "require" | "true" | "1" | "on" | "verify_identity"
                        | "verify-full" => true,
                        "disabled" | "disable" | "false" | "0" | "off" => false,
                        _ => return Err("has an ssl value other than required or disabled".into()),
                    }
                }
                "ca" | "ssl-ca" | "sslca" => {
                    ssl = true;
                    ca = Some(PathBuf::from(v));
                }
                // Never repeated: it could be the tail of a password with an unencoded `?`.
                _ => {
                    return Err(format!(
                        "has an unknown parameter after the ? (known: ssl, ca); {PASSWORD_HINT}"
                    ))
                }
            }
        }
        Ok(Dsn {
            user,
            password,
            host,
            port,
            database,
            ssl,
            ca,
        })
    }

    /// The DSN without its password, for messages.
    pub fn label(&self) -> String {
        format!(
            "mysql://{}@{}:{}/{}{}",
            self.user,
            self.host,
            self.port,
            self.database,
            if self.ssl { "?ssl=required" } else { "" }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plain(text: &str) -> std::result::Result<Dsn, String> {
        Dsn::parse(text, |_| panic!("not encrypted"))
    }

    #[test]
    fn a_dsn_is_read_and_its_label_hides_the_password() {
        let d =
            plain("mysql://pcr:s%40cret:x@db.example.edu:3307/pcr360?ssl=required&ca=/etc/ca.pem")
                .unwrap();
        assert_eq!(
            (
                d.user.as_str(),
                d.password.expose(),
                d.host.as_str(),
                d.port
            ),
            ("pcr", "s@cret:x", "db.example.edu", 3307)
        );
        assert_eq!(d.database, "pcr360");
        assert!(d.ssl);
        assert_eq!(d.ca.as_deref(), Some(std::path::Path::new("/etc/ca.pem")));
        assert_eq!(
            d.label(),
            "mysql://pcr@db.example.edu:3307/pcr360?ssl=required"
        );
        assert!(!format!("{d:?}").contains("cret"));
        let d = plain("mysql://u:p@127.0.0.1/db").unwrap();
        assert_eq!((d.port, d.ssl), (3306, false));
        for bad in [
            "postgres://u:p@h/db",
            "mysql://u:p@h",
            "mysql://u:p@h:0/db",
            "mysql://u:p@h/db?sslx=1",
            "mysql://h/db",
        ] {
            let e = plain(bad).unwrap_err();
            assert!(!e.contains(":p@"), "{e}");
        }
    }

    #[test]
    fn no_part_of_a_password_with_separators_is_repeated_in_the_error() {
        for (text, tail) in [
            ("mysql://pcr:p@s/s?tail@db.example.edu/pcr360", "tail"),
            ("mysql://pcr:xq?ssl=Zsecr3t@db.example.edu/pcr360", "secr3t"),
            ("mysql://pcr:xq?Zsecr3t", "secr3t"),
            ("mysql://pcr:p@h/d?Zsecr3t=1", "secr3t"),
            ("mysql://pcr:p@h/d?ssl=Zsecr3t", "secr3t"),
            ("mysql://pcr:p@h/d?Zsecr3t=%zz", "secr3t"),
        ] {
            let err = plain(text).unwrap_err();
            assert!(!err.contains(tail), "{text}: {err}");
            assert!(!err.contains("@db"), "{text}: {err}");
            assert!(
                err.contains("percent-encode ? # @ / in the password") || err.contains("ssl"),
                "{text}: {err}"
            );
        }
    }

    #[test]
    fn an_encrypted_password_is_revealed() {
        let d = Dsn::parse("mysql://u:ENC:v1:k:abc=@h/db", |v| {
            assert_eq!(v, "ENC:v1:k:abc=");
            Ok(Secret::new("real".to_string()))
        })
        .unwrap();
        assert_eq!(d.password.expose(), "real");
    }
}
