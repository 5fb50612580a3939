//! Cutting pending items into requests of at most `max_items` items and `max_bytes` bytes.

use crate::wire::Item;

/// A run of items that fits one request, by index into the slice that was cut.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub start: usize,
    pub end: usize,
    /// The one item of this batch is larger than `max_bytes` on its own. It is sent alone anyway
    /// (the receiver may accept it, or refuse it with 413, which rejects that item only), so an
    /// oversized document never blocks the feed behind it.
    pub oversized: bool,
}

/// Cut `items` in order into batches. Every item lands in exactly one batch; no batch is empty.
pub fn cut_batches(items: &[Item], max_items: usize, max_bytes: usize) -> Vec<Batch> {
    let max_items = max_items.max(1);
    let mut out = Vec::new();
    let mut start = 0;
    let mut bytes = 2; // the brackets
    for (i, item) in items.iter().enumerate() {
        let len = item.encoded_len();
        let count = i - start;
        if count > 0 && (count >= max_items || bytes + len > max_bytes) {
            out.push(Batch { start, end: i, oversized: false });
            start = i;
            bytes = 2;
        }
        bytes += len;
        if i == start && bytes > max_bytes {
            out.push(Batch { start, end: i + 1, oversized: true });
            start = i + 1;
            bytes = 2;
        }
    }
    if start < items.len() {
        out.push(Batch { start, end: items.len(), oversized: false });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn items(sizes: &[usize]) -> Vec<Item> {
        sizes
            .iter()
            .enumerate()
            .map(|(i, n)| Item { key: i.to_string(), deleted: false, doc: Some(format!("\"{}\"", "x".repeat(*n))) })
            .collect()
    }

    fn covers(batches: &[Batch], n: usize) {
        let mut next = 0;
        for b in batches {
            assert_eq!(b.start, next);
            assert!(b.end > b.start);
            next = b.end;
        }
        assert_eq!(next, n);
    }

    #[test]
    fn cuts_by_count() {
        let its = items(&[1; 10]);
        let b = cut_batches(&its, 4, usize::MAX);
        covers(&b, 10);
        assert_eq!(b.iter().map(|b| b.end - b.start).collect::<Vec<_>>(), vec![4, 4, 2]);
    }

    #[test]
    fn cuts_by_bytes() {
        let its = items(&[100; 10]);
        let one = its[0].encoded_len();
        let b = cut_batches(&its, 1000, 2 + one * 3);
        covers(&b, 10);
        assert_eq!(b.iter().map(|b| b.end - b.start).collect::<Vec<_>>(), vec![3, 3, 3, 1]);
        for batch in &b {
            let body = crate::wire::Body::build(&its[batch.start..batch.end]);
            assert!(body.0.len() <= 2 + one * 3);
        }
    }

    #[test]
    fn oversized_item_goes_alone_and_does_not_block() {
        let its = items(&[10, 5000, 10, 10]);
        let b = cut_batches(&its, 100, 1000);
        covers(&b, 4);
        assert_eq!(b[0], Batch { start: 0, end: 1, oversized: false });
        assert_eq!(b[1], Batch { start: 1, end: 2, oversized: true });
        assert_eq!(b[2], Batch { start: 2, end: 4, oversized: false });
    }

    #[test]
    fn empty_input_no_batches() {
        assert!(cut_batches(&[], 10, 10).is_empty());
    }
}
