//! Kubernetes resource quantities (`10Gi`, `1.5G`, `500M`, `1e9`) as bytes, rounded up: a claim for `1.5Ki` gets
//! at least 1536 bytes, never less. Milli-bytes (`m`) and negative values are refused: they are never a size.

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
#[error("{input:?} is not a size in bytes: {why}")]
pub struct InvalidQuantity {
    pub input: String,
    pub why: &'static str,
}

/// Bytes of a quantity, rounded up to a whole byte.
pub fn bytes(input: &str) -> Result<u64, InvalidQuantity> {
    let err = |why| InvalidQuantity { input: input.to_owned(), why };
    let s = input.trim();
    let number_end = s.find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+')).unwrap_or(s.len());
    let (number, suffix) = s.split_at(number_end);
    let number = number.strip_prefix('+').unwrap_or(number);
    if number.is_empty() || number.starts_with('.') && number.len() == 1 {
        return Err(err("no number"));
    }
    let (int_part, frac_part) = number.split_once('.').unwrap_or((number, ""));
    if !int_part.bytes().chain(frac_part.bytes()).all(|b| b.is_ascii_digit()) || int_part.len() + frac_part.len() > 30 {
        return Err(err("malformed number"));
    }
    // (base, power): the multiplier is base^power.
    let (base, power): (u128, i32) = match suffix {
        "" => (10, 0),
        "Ki" => (2, 10),
        "Mi" => (2, 20),
        "Gi" => (2, 30),
        "Ti" => (2, 40),
        "Pi" => (2, 50),
        "Ei" => (2, 60),
        "k" => (10, 3),
        "M" => (10, 6),
        "G" => (10, 9),
        "T" => (10, 12),
        "P" => (10, 15),
        "E" => (10, 18),
        "m" => return Err(err("milli-units are not bytes")),
        e if e.starts_with(['e', 'E']) => match e[1..].parse::<i32>() {
            Ok(exp) if (0..=18).contains(&exp) => (10, exp),
            _ => return Err(err("exponent out of range")),
        },
        _ => return Err(err("unknown suffix (use Ki, Mi, Gi, Ti, Pi, Ei or k, M, G, T, P, E)")),
    };
    // value = digits / 10^frac_len * base^power, computed exactly in integers and rounded up.
    let digits: u128 = format!("{int_part}{frac_part}").parse().map_err(|_| err("malformed number"))?;
    let multiplier = base.checked_pow(power as u32).ok_or_else(|| err("too large"))?;
    let numerator = digits.checked_mul(multiplier).ok_or_else(|| err("too large"))?;
    let denominator = 10u128.pow(frac_part.len() as u32);
    let value = numerator.div_ceil(denominator);
    u64::try_from(value).map_err(|_| err("too large"))
}

/// A byte count as a quantity: with the largest binary suffix that divides it exactly (`10Gi`, `1536Ki`), else
/// plain bytes. What users read in `kubectl get pv`.
pub fn format(bytes: u64) -> String {
    const SUFFIXES: [(&str, u32); 6] = [("Ei", 60), ("Pi", 50), ("Ti", 40), ("Gi", 30), ("Mi", 20), ("Ki", 10)];
    for (suffix, shift) in SUFFIXES {
        if bytes != 0 && bytes.trailing_zeros() >= shift {
            return format!("{}{suffix}", bytes >> shift);
        }
    }
    bytes.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_with_the_largest_exact_binary_suffix() {
        assert_eq!(format(10 << 30), "10Gi");
        assert_eq!(format(1536 << 10), "1536Ki");
        assert_eq!(format((3 << 29) + 1), "1610612737");
        assert_eq!(format(0), "0");
        for n in [1u64, 1023, 1 << 20, 5 << 40, 123_456_789] {
            assert_eq!(bytes(&format(n)), Ok(n), "round trip of {n}");
        }
    }

    #[test]
    fn suffixes_decimals_and_exponents() {
        assert_eq!(bytes("1Gi"), Ok(1 << 30));
        assert_eq!(bytes("1G"), Ok(1_000_000_000));
        assert_eq!(bytes("1.5Gi"), Ok(3 << 29));
        assert_eq!(bytes("12345"), Ok(12345));
        assert_eq!(bytes("1e3"), Ok(1000));
        assert_eq!(bytes("+2Ki"), Ok(2048));
        assert_eq!(bytes("0.5"), Ok(1), "rounded up to a whole byte");
        assert_eq!(bytes("1.0000001Ki"), Ok(1025));
        assert_eq!(bytes("0"), Ok(0));
    }

    #[test]
    fn refuses_what_is_not_a_byte_count() {
        for bad in ["", "-1", "1m", "500mi", "1.5.5Gi", "abc", "1Zi", "20Ei", "1e99", ".", "1 Gi", "Gi"] {
            assert!(bytes(bad).is_err(), "{bad:?} accepted as {:?}", bytes(bad));
        }
    }
}
