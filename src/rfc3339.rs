//! RFC 3339 timestamps: validated and read as Unix seconds, and written from them (the
//! CloudEvents `time` attribute and the AMQP `timestamp`, a publish's `not_before` and
//! `scheduled_for`, a lease's deadline). Pure.

/// The Unix seconds of an RFC 3339 `date-time` (`2026-11-29T10:00:00Z`,
/// `2026-11-29t10:00:00.5+02:00`), or `None` when it is not one. A leap second (`:60`)
/// is accepted and counted as the next second.
pub fn parse_rfc3339(text: &str) -> Option<i64> {
    let b = text.as_bytes();
    if b.len() < 20 || !matches!(b[10], b'T' | b't') {
        return None;
    }
    let digits = |range: std::ops::Range<usize>| -> Option<i64> {
        let part = b.get(range)?;
        if part.iter().all(u8::is_ascii_digit) {
            std::str::from_utf8(part).ok()?.parse().ok()
        } else {
            None
        }
    };
    if b[4] != b'-' || b[7] != b'-' || b[13] != b':' || b[16] != b':' {
        return None;
    }
    let (year, month, day) = (digits(0..4)?, digits(5..7)?, digits(8..10)?);
    let (hour, minute, second) = (digits(11..13)?, digits(14..16)?, digits(17..19)?);
    if !(1..=12).contains(&month)
        || day < 1
        || day > days_in_month(year, month)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    let mut rest = &b[19..];
    if let Some(fraction) = rest.strip_prefix(b".") {
        let n = fraction.iter().take_while(|c| c.is_ascii_digit()).count();
        if n == 0 {
            return None;
        }
        rest = &fraction[n..];
    }
    let offset = match rest {
        [b'Z' | b'z'] => 0,
        [sign @ (b'+' | b'-'), h1, h2, b':', m1, m2] => {
            let two = |a: &u8, b: &u8| -> Option<i64> {
                (a.is_ascii_digit() && b.is_ascii_digit())
                    .then(|| i64::from(a - b'0') * 10 + i64::from(b - b'0'))
            };
            let (h, m) = (two(h1, h2)?, two(m1, m2)?);
            if h > 23 || m > 59 {
                return None;
            }
            let minutes = h * 60 + m;
            if *sign == b'+' { minutes } else { -minutes }
        }
        _ => return None,
    };
    let days = days_from_civil(year, month, day);
    Some(days * 86_400 + hour * 3_600 + minute * 60 + second - offset * 60)
}

/// An AMQP timestamp (Unix seconds) as RFC 3339 in UTC: `2026-11-29T10:00:00Z`.
/// [`format_rfc3339`] with milliseconds (`2026-12-07T10:00:00.250Z`).
pub fn format_rfc3339_ms(unix_ms: u64) -> String {
    let seconds = format_rfc3339(unix_ms / 1000);
    let whole = seconds.trim_end_matches('Z');
    format!("{whole}.{:03}Z", unix_ms % 1000)
}

pub fn format_rfc3339(unix_seconds: u64) -> String {
    // u64 seconds reach far beyond year 9999; clamp to what RFC 3339 can write.
    let secs = unix_seconds.min(253_402_300_799) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3_600,
        rem % 3_600 / 60,
        rem % 60
    )
}

fn is_leap(year: i64) -> bool {
    (year % 4 == 0 && year % 100 != 0) || year % 400 == 0
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if is_leap(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_rfc3339_with_offsets_and_fractions() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_rfc3339("2026-11-29T10:00:00Z"), Some(1_795_946_400));
        assert_eq!(
            parse_rfc3339("2026-11-29T12:00:00.123456+02:00"),
            Some(1_795_946_400)
        );
        assert_eq!(
            parse_rfc3339("2026-11-29t09:30:00-00:30"),
            Some(1_795_946_400)
        );
        assert_eq!(parse_rfc3339("2024-02-29T00:00:00z"), Some(1_709_164_800));
        assert_eq!(parse_rfc3339("1969-12-31T23:59:59Z"), Some(-1));
        for bad in [
            "",
            "2026-11-29",
            "2026-11-29 10:00:00Z",
            "2026-11-29T10:00:00",
            "2026-13-01T00:00:00Z",
            "2025-02-29T00:00:00Z",
            "2026-11-31T00:00:00Z",
            "2026-11-29T24:00:00Z",
            "2026-11-29T10:00:00.Z",
            "2026-11-29T10:00:00+0200",
            "2026-11-29T10:00:00+24:00",
            "2026-11-29T10:00:00Zjunk",
            "+026-11-29T10:00:00Z",
            "2026-11-29T10:00:00\u{e9}",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
    }

    #[test]
    fn formats_and_round_trips() {
        assert_eq!(format_rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_rfc3339(1_795_946_400), "2026-11-29T10:00:00Z");
        assert_eq!(format_rfc3339(u64::MAX), "9999-12-31T23:59:59Z");
        for secs in [
            0u64,
            951_782_400,
            1_709_164_800,
            4_102_444_799,
            1_234_567_890,
        ] {
            assert_eq!(
                parse_rfc3339(&format_rfc3339(secs)),
                Some(secs as i64),
                "{secs}"
            );
        }
    }
}
