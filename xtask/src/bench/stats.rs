//! The few statistics the report needs.

/// Median; the mean of the two middle values for an even count.
pub fn median(xs: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(v[n / 2]),
        _ => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}

/// (min, max).
pub fn spread(xs: &[f64]) -> Option<(f64, f64)> {
    let min = xs.iter().copied().min_by(f64::total_cmp)?;
    let max = xs.iter().copied().max_by(f64::total_cmp)?;
    Some((min, max))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_even_and_empty() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0]), Some(3.0));
        assert_eq!(median(&[5.0, 1.0, 3.0]), Some(3.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
    }

    #[test]
    fn spread_is_min_and_max() {
        assert_eq!(spread(&[]), None);
        assert_eq!(spread(&[0.98, 1.01, 0.99]), Some((0.98, 1.01)));
    }
}
