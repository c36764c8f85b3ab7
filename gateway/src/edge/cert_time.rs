//! The notAfter of an X.509 certificate, read from its DER: what the
//! expiry gauge (`flashgate_tls_cert_expiry_seconds`, see `edge::tls`)
//! needs, and nothing else.
//!
//! rustls and webpki do not expose a certificate's validity. `x509-parser`
//! is in Cargo.lock (through `rcgen`) but not built: turning it on turns on
//! `syn` features (`visit`, `extra-traits`, through `synstructure`) that
//! rebuild every proc macro and with them most of the dependency tree, for
//! one field at a fixed place. So this reads that field itself: the
//! certificate is a SEQUENCE whose first member, the TBSCertificate, holds
//! an optional `[0]` version, the serial number, the signature algorithm,
//! the issuer, then `validity` (notBefore, notAfter); each time is a
//! UTCTime (`YYMMDDHHMMSSZ`, years 1950-2049) or a GeneralizedTime
//! (`YYYYMMDDHHMMSSZ`), as RFC 5280 section 4.1.2.5 requires. The input
//! has already been parsed by webpki when a pair loads; every read here is
//! bounds-checked anyway and answers an error, never a panic.

use crate::config::units::days_from_civil;

/// Why the validity could not be read.
pub type Error = &'static str;

/// One DER element: its tag, its contents and what follows it.
fn element(input: &[u8]) -> Result<(u8, &[u8], &[u8]), Error> {
    let (&tag, rest) = input.split_first().ok_or("truncated: no tag")?;
    if tag & 0x1f == 0x1f {
        return Err("high tag numbers are not used in a certificate's header");
    }
    let (&first, rest) = rest.split_first().ok_or("truncated: no length")?;
    let (len, rest) = match first {
        0..=0x7f => (usize::from(first), rest),
        0x81..=0x84 => {
            let n = usize::from(first & 0x7f);
            if rest.len() < n {
                return Err("truncated length");
            }
            let len = rest[..n]
                .iter()
                .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
            (len, &rest[n..])
        }
        _ => return Err("indefinite or oversized length"),
    };
    if rest.len() < len {
        return Err("truncated contents");
    }
    Ok((tag, &rest[..len], &rest[len..]))
}

const SEQUENCE: u8 = 0x30;
const VERSION: u8 = 0xa0;
const UTC_TIME: u8 = 0x17;
const GENERALIZED_TIME: u8 = 0x18;

/// notAfter of a DER-encoded certificate, in seconds since the Unix epoch.
pub fn not_after(der: &[u8]) -> Result<i64, Error> {
    let (tag, cert, _) = element(der)?;
    if tag != SEQUENCE {
        return Err("a certificate is a SEQUENCE");
    }
    let (tag, tbs, _) = element(cert)?;
    if tag != SEQUENCE {
        return Err("the TBSCertificate is a SEQUENCE");
    }
    let (tag, _, mut rest) = element(tbs)?;
    if tag == VERSION {
        // The serial number follows the version.
        rest = element(rest)?.2;
    }
    // signature, issuer, then validity.
    let rest = element(rest)?.2;
    let rest = element(rest)?.2;
    let (tag, validity, _) = element(rest)?;
    if tag != SEQUENCE {
        return Err("validity is a SEQUENCE");
    }
    let (_, _, after) = element(validity)?;
    let (tag, time, _) = element(after)?;
    parse_time(tag, time)
}

fn digits(s: &[u8]) -> Result<i64, Error> {
    if s.is_empty() || !s.iter().all(u8::is_ascii_digit) {
        return Err("a time has digits where its fields are");
    }
    Ok(s.iter().fold(0, |acc, d| acc * 10 + i64::from(d - b'0')))
}

/// A UTCTime or GeneralizedTime in the form RFC 5280 requires (UTC,
/// seconds, `Z`), as seconds since the Unix epoch.
fn parse_time(tag: u8, t: &[u8]) -> Result<i64, Error> {
    let (year, rest) = match (tag, t.len()) {
        (UTC_TIME, 13) => {
            let yy = digits(&t[..2])?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, &t[2..])
        }
        (GENERALIZED_TIME, 15) => (digits(&t[..4])?, &t[4..]),
        _ => return Err("notAfter is not a UTCTime or GeneralizedTime in RFC 5280's form"),
    };
    if rest[10] != b'Z' {
        return Err("notAfter is not in UTC");
    }
    let field = |i: usize| digits(&rest[i..i + 2]);
    let (month, day, hour, min, sec) = (field(0)?, field(2)?, field(4)?, field(6)?, field(8)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || min > 59 || sec > 60 {
        return Err("notAfter is not a valid date and time");
    }
    Ok(days_from_civil(year, month, day) * 86_400 + hour * 3600 + min * 60 + sec)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(not_after: Option<(i32, u8, u8)>) -> Vec<u8> {
        let mut params = rcgen::CertificateParams::new(vec!["a.test".to_string()]).unwrap();
        if let Some((y, m, d)) = not_after {
            params.not_after = rcgen::date_time_ymd(y, m, d);
        }
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn civil_days() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(days_from_civil(2030, 1, 1) * 86_400, 1_893_456_000);
    }

    #[test]
    fn utc_time_and_generalized_time() {
        // Before 2050: UTCTime.
        assert_eq!(not_after(&cert(Some((2030, 1, 1)))), Ok(1_893_456_000));
        // From 2050: GeneralizedTime (rcgen's default is 4096-01-01).
        assert_eq!(
            not_after(&cert(Some((2051, 6, 1)))),
            Ok(days_from_civil(2051, 6, 1) * 86_400)
        );
        assert_eq!(
            not_after(&cert(None)),
            Ok(days_from_civil(4096, 1, 1) * 86_400)
        );
        assert_eq!(parse_time(UTC_TIME, b"491231235959Z"), Ok(2_524_607_999));
        assert_eq!(parse_time(UTC_TIME, b"500101000000Z"), Ok(-631_152_000));
    }

    #[test]
    fn broken_input_is_an_error_not_a_panic() {
        let der = cert(Some((2030, 1, 1)));
        for cut in 0..der.len() {
            let _ = not_after(&der[..cut]);
        }
        for i in 0..der.len().min(400) {
            let mut bad = der.clone();
            bad[i] ^= 0xff;
            let _ = not_after(&bad);
        }
        assert!(not_after(&[]).is_err());
        assert!(not_after(&[0x30, 0x80]).is_err());
        assert!(parse_time(UTC_TIME, b"301301000000Z").is_err());
        assert!(parse_time(UTC_TIME, b"3001010000+0Z").is_err());
        assert!(parse_time(GENERALIZED_TIME, b"20300101000000+").is_err());
    }
}
