//! The value types operators write as strings: durations (`"250ms"`), sizes
//! (`"64MiB"`) and rates (`"20/s"`). Each parses in its serde impl, so a bad
//! value is reported at its own key path.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// A duration written with a unit: `ms`, `s`, `m` or `h` (`"1.5s"` works).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Dur(pub Duration);

impl FromStr for Dur {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let split = s
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| {
                format!("duration {s:?} has no unit (write e.g. \"250ms\", \"5s\", \"1m\")")
            })?;
        let (num, unit) = s.split_at(split);
        let n: f64 = num
            .parse()
            .map_err(|_| format!("invalid duration {s:?}: {num:?} is not a number"))?;
        let secs = match unit {
            "ms" => n / 1000.0,
            "s" => n,
            "m" => n * 60.0,
            "h" => n * 3600.0,
            _ => {
                return Err(format!(
                    "invalid duration {s:?}: unknown unit {unit:?} (use ms, s, m or h)"
                ))
            }
        };
        if !secs.is_finite() || secs > 365.0 * 24.0 * 3600.0 {
            return Err(format!("duration {s:?} is out of range"));
        }
        Ok(Dur(Duration::from_secs_f64(secs)))
    }
}

impl fmt::Display for Dur {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

/// A byte size: `"512B"`, `"64KiB"`, `"1MiB"`, `"2GiB"`, SI `"10KB"`, or a
/// bare integer of bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Size(pub u64);

impl FromStr for Size {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let n: u64 = num.parse().map_err(|_| {
            format!("invalid size {s:?}: expected a whole number and a unit like \"64KiB\"")
        })?;
        let mult: u64 = match unit.trim() {
            "" | "B" => 1,
            "KB" => 1_000,
            "KiB" => 1 << 10,
            "MB" => 1_000_000,
            "MiB" => 1 << 20,
            "GB" => 1_000_000_000,
            "GiB" => 1 << 30,
            u => {
                return Err(format!(
                    "invalid size {s:?}: unknown unit {u:?} (use B, KiB, MiB, GiB, KB, MB, GB)"
                ))
            }
        };
        n.checked_mul(mult)
            .map(Size)
            .ok_or_else(|| format!("size {s:?} is out of range"))
    }
}

/// A rate: `"20/s"`, `"600/m"`, `"10000/h"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub count: u32,
    pub per: Duration,
}

impl FromStr for Rate {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (n, unit) = s
            .trim()
            .split_once('/')
            .ok_or_else(|| format!("invalid rate {s:?}: write it like \"20/s\""))?;
        let count: u32 = n
            .trim()
            .parse()
            .map_err(|_| format!("invalid rate {s:?}: {n:?} is not a whole number"))?;
        if count == 0 {
            return Err(format!("invalid rate {s:?}: must be above zero"));
        }
        let per = match unit.trim() {
            "s" => Duration::from_secs(1),
            "m" => Duration::from_secs(60),
            "h" => Duration::from_secs(3600),
            u => {
                return Err(format!(
                    "invalid rate {s:?}: unknown unit {u:?} (use s, m or h)"
                ))
            }
        };
        Ok(Rate { count, per })
    }
}

/// Lets the types above be written as TOML strings (and sizes as integers).
macro_rules! deserialize_from_str {
    ($t:ty, $expect:literal) => {
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl<'de> serde::de::Visitor<'de> for V {
                    type Value = $t;
                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        f.write_str($expect)
                    }
                    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<$t, E> {
                        v.parse().map_err(E::custom)
                    }
                    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<$t, E> {
                        v.to_string().parse().map_err(E::custom)
                    }
                }
                d.deserialize_any(V)
            }
        }
    };
}

deserialize_from_str!(Dur, "a duration string such as \"250ms\"");
deserialize_from_str!(Size, "a size such as \"64KiB\"");
deserialize_from_str!(Rate, "a rate such as \"20/s\"");

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's
/// `days_from_civil`): the one calendar sum behind the RFC 3339 times of
/// the config and the certificate dates read at the edge.
pub fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(
            "250ms".parse::<Dur>().unwrap().0,
            Duration::from_millis(250)
        );
        assert_eq!(
            "1.5s".parse::<Dur>().unwrap().0,
            Duration::from_millis(1500)
        );
        assert_eq!("2m".parse::<Dur>().unwrap().0, Duration::from_secs(120));
        assert_eq!("1h".parse::<Dur>().unwrap().0, Duration::from_secs(3600));
        assert!("5".parse::<Dur>().unwrap_err().contains("no unit"));
        assert!("5x".parse::<Dur>().unwrap_err().contains("unknown unit"));
        assert!("ms".parse::<Dur>().is_err());
        assert!("1..2s".parse::<Dur>().is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!("64KiB".parse::<Size>().unwrap().0, 65536);
        assert_eq!("1MiB".parse::<Size>().unwrap().0, 1 << 20);
        assert_eq!("10KB".parse::<Size>().unwrap().0, 10_000);
        assert_eq!("512".parse::<Size>().unwrap().0, 512);
        assert!("1.5MiB".parse::<Size>().is_err());
        assert!("3 potatoes".parse::<Size>().is_err());
        assert!("99999999999GiB".parse::<Size>().is_err());
    }

    #[test]
    fn rates() {
        let r: Rate = "20/s".parse().unwrap();
        assert_eq!((r.count, r.per), (20, Duration::from_secs(1)));
        assert_eq!(
            "600/m".parse::<Rate>().unwrap().per,
            Duration::from_secs(60)
        );
        assert!("0/s".parse::<Rate>().is_err());
        assert!("20".parse::<Rate>().is_err());
        assert!("20/d".parse::<Rate>().is_err());
    }
}
