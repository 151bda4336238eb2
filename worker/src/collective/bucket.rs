//! Gradient buckets: backward announces the parameter ranges whose gradients are final (in
//! the reverse layer order it produces them), and [`Bucketer`] cuts that stream into buckets
//! of a fixed number of elements, so the collective can average each bucket while backward
//! goes on. Every rank announces the same ranges in the same order, so every rank cuts the
//! same buckets.

use std::ops::Range;

/// Groups announced ranges into buckets of `cap` elements (the last may be smaller),
/// splitting a range where a bucket fills up.
pub struct Bucketer {
    cap: usize,
    open: Vec<Range<usize>>,
    open_len: usize,
}

impl Bucketer {
    /// Buckets of `cap` elements (at least 1).
    pub fn new(cap: usize) -> Self {
        Bucketer { cap: cap.max(1), open: Vec::new(), open_len: 0 }
    }

    /// Adds the elements `r`; calls `full` with each bucket this completes.
    pub fn push(&mut self, mut r: Range<usize>, full: &mut impl FnMut(&[Range<usize>])) {
        while !r.is_empty() {
            let take = r.len().min(self.cap - self.open_len);
            let part = r.start..r.start + take;
            match self.open.last_mut() {
                // Adjacent ranges merge, so a bucket is as few copies as possible.
                Some(last) if last.end == part.start => last.end = part.end,
                _ => self.open.push(part),
            }
            self.open_len += take;
            r.start += take;
            if self.open_len == self.cap {
                self.flush(full);
            }
        }
    }

    /// Hands over the last, partly filled bucket, if any.
    pub fn flush(&mut self, full: &mut impl FnMut(&[Range<usize>])) {
        if self.open_len > 0 {
            full(&self.open);
        }
        self.open.clear();
        self.open_len = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cut(cap: usize, ranges: &[Range<usize>]) -> Vec<Vec<Range<usize>>> {
        let mut out = Vec::new();
        let mut b = Bucketer::new(cap);
        let mut full = |x: &[Range<usize>]| out.push(x.to_vec());
        for r in ranges {
            b.push(r.clone(), &mut full);
        }
        b.flush(&mut full);
        out
    }

    #[test]
    #[allow(clippy::single_range_in_vec_init)]
    fn a_range_larger_than_a_bucket_is_split_and_the_tail_bucket_is_smaller() {
        assert_eq!(cut(4, &[10..20]), vec![vec![10..14], vec![14..18], vec![18..20]]);
    }

    #[test]
    fn bucket_boundaries_fall_inside_ranges_and_adjacent_ranges_merge() {
        let got = cut(5, &[0..3, 3..4, 20..23, 7..9]);
        assert_eq!(got, vec![vec![0..4, 20..21], vec![21..23, 7..9]]);
    }

    #[test]
    fn every_element_lands_in_exactly_one_bucket_in_order() {
        let ranges = [100..350, 0..7, 7..90, 400..401, 350..400];
        for cap in [1, 3, 64, 1000] {
            let flat: Vec<usize> = cut(cap, &ranges).concat().into_iter().flatten().collect();
            let want: Vec<usize> = ranges.iter().cloned().flatten().collect();
            assert_eq!(flat, want, "cap {cap}");
            let sizes: Vec<usize> =
                cut(cap, &ranges).iter().map(|b| b.iter().map(|r| r.len()).sum()).collect();
            assert!(sizes[..sizes.len() - 1].iter().all(|&s| s == cap), "cap {cap}: {sizes:?}");
        }
    }

    #[test]
    #[allow(clippy::single_range_in_vec_init)]
    fn nothing_announced_gives_no_bucket() {
        assert!(cut(8, &[]).is_empty());
        assert!(cut(8, &[5..5]).is_empty());
    }
}
