//! Sending one batch and deciding the fate of each item in it, splitting refused batches so that
//! one bad item never fails its neighbours.

use crate::response::Classified;
use crate::wire::Item;
use std::time::Duration;

/// What the transport made of one request: the receiver's classified answer, and the response's
/// id (`x-request-id` or the destination's `response_id_header`) when it gave one.
pub type SendResult = (Classified, Option<String>);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ItemOutcome {
    Sent,
    /// The receiver will not take this item as it is: not retried until its document changes.
    Rejected {
        status: Option<u16>,
        error: String,
    },
    /// Try again after the retry interval.
    Retry {
        status: Option<u16>,
        error: String,
    },
}

impl ItemOutcome {
    /// The stable code of a failed outcome, as logged by the worker (docs/operations.md, "Error
    /// codes"); None for a delivered item.
    pub fn error_code(&self) -> Option<&'static str> {
        match self {
            ItemOutcome::Sent => None,
            ItemOutcome::Rejected { status: Some(_), .. } => Some("CDE-201"),
            ItemOutcome::Rejected { status: None, .. } => Some("CDE-202"),
            ItemOutcome::Retry { status: Some(408 | 429), .. } => Some("CDE-203"),
            ItemOutcome::Retry { status: Some(_), .. } => Some("CDE-204"),
            ItemOutcome::Retry { status: None, .. } => Some("CDE-205"),
        }
    }

    /// The code logged when a destination is held as misconfigured (401, 404, TLS...).
    pub const MISCONFIGURED_CODE: &'static str = "CDE-207";

    pub fn error(&self) -> Option<&str> {
        match self {
            ItemOutcome::Sent => None,
            ItemOutcome::Rejected { error, .. } | ItemOutcome::Retry { error, .. } => Some(error),
        }
    }
}

#[derive(Debug, Default)]
pub struct Delivery {
    pub outcomes: Vec<Option<ItemOutcome>>,
    /// The id of the response that decided each item (delivered or rejected it), for support
    /// tickets with the receiving service.
    pub response_ids: Vec<Option<String>>,
    /// The status of the last response, if any answered.
    pub last_status: Option<u16>,
    /// `Retry-After` from the receiver: hold the whole feed back this long.
    pub hold: Option<Duration>,
    /// The destination is misconfigured (401, 404, TLS...): (status, reason, error). The items
    /// not delivered before it stay pending, none is rejected or counted as an attempt.
    pub misconfigured: Option<(Option<u16>, &'static str, String)>,
    pub requests: u64,
    pub failed_requests: u64,
}

/// Deliver `items` as one batch through `send`, which performs one request for the items it is
/// given. A refused batch (400, 409, 413, 422...) of more than one item is split in halves and
/// each half is sent again; a refused single item is rejected. The first retryable failure stops
/// all sending for this batch: the receiver is unwell, so every item not yet delivered is marked
/// for retry. A misconfigured destination (401, 404...) stops it too, and leaves those items
/// pending: splitting would cost twice the batch in requests for nothing.
pub fn deliver_with_split(items: &[Item], send: &mut dyn FnMut(&[Item]) -> SendResult) -> Delivery {
    let mut d = Delivery { outcomes: vec![None; items.len()], response_ids: vec![None; items.len()], ..Default::default() };
    let mut stop: Option<(Option<u16>, String)> = None;
    deliver_range(items, 0, items.len(), send, &mut d, &mut stop);
    if let Some((status, error)) = stop {
        for o in d.outcomes.iter_mut().filter(|o| o.is_none()) {
            *o = Some(ItemOutcome::Retry { status, error: error.clone() });
        }
    }
    d
}

fn deliver_range(
    items: &[Item],
    start: usize,
    end: usize,
    send: &mut dyn FnMut(&[Item]) -> SendResult,
    d: &mut Delivery,
    stop: &mut Option<(Option<u16>, String)>,
) {
    if stop.is_some() || d.misconfigured.is_some() || start == end {
        return;
    }
    d.requests += 1;
    let (answer, response_id) = send(&items[start..end]);
    d.last_status = match &answer {
        Classified::Accepted { .. } => Some(200),
        Classified::Refused { status, .. } => Some(*status),
        Classified::Misconfigured { status, .. } | Classified::Retryable { status, .. } => *status,
    };
    match answer {
        Classified::Accepted { rejected } => {
            for i in start..end {
                d.outcomes[i] = Some(ItemOutcome::Sent);
                d.response_ids[i] = response_id.clone();
            }
            for r in rejected {
                d.outcomes[start + r.index] = Some(ItemOutcome::Rejected { status: None, error: r.error });
            }
        }
        Classified::Refused { status, error } => {
            d.failed_requests += 1;
            if end - start == 1 {
                d.outcomes[start] = Some(ItemOutcome::Rejected { status: Some(status), error });
                d.response_ids[start] = response_id;
            } else {
                let mid = start + (end - start) / 2;
                deliver_range(items, start, mid, send, d, stop);
                deliver_range(items, mid, end, send, d, stop);
            }
        }
        Classified::Misconfigured { status, reason, error } => {
            d.failed_requests += 1;
            d.misconfigured = Some((status, reason, error));
        }
        Classified::Retryable { status, error, retry_after } => {
            d.failed_requests += 1;
            d.hold = retry_after;
            *stop = Some((status, error));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::response::Rejection;

    fn items(n: usize) -> Vec<Item> {
        (0..n).map(|i| Item { key: i.to_string(), deleted: false, doc: Some("{}".into()) }).collect()
    }

    #[test]
    fn error_codes_are_stable() {
        let r = |status| ItemOutcome::Retry { status, error: String::new() };
        assert_eq!(ItemOutcome::Sent.error_code(), None);
        assert_eq!(ItemOutcome::Rejected { status: Some(422), error: String::new() }.error_code(), Some("CDE-201"));
        assert_eq!(ItemOutcome::Rejected { status: None, error: String::new() }.error_code(), Some("CDE-202"));
        assert_eq!(r(Some(429)).error_code(), Some("CDE-203"));
        assert_eq!(r(Some(408)).error_code(), Some("CDE-203"));
        assert_eq!(r(Some(503)).error_code(), Some("CDE-204"));
        assert_eq!(r(None).error_code(), Some("CDE-205"));
    }

    #[test]
    fn all_sent() {
        let its = items(5);
        let d = deliver_with_split(&its, &mut |_| (Classified::Accepted { rejected: vec![] }, Some("r1".into())));
        assert!(d.response_ids.iter().all(|r| r.as_deref() == Some("r1")));
        assert_eq!(d.requests, 1);
        assert!(d.outcomes.iter().all(|o| *o == Some(ItemOutcome::Sent)));
    }

    #[test]
    fn per_item_rejections_from_a_2xx() {
        let its = items(3);
        let d = deliver_with_split(&its, &mut |_| {
            (Classified::Accepted { rejected: vec![Rejection { index: 2, error: "no".into() }] }, None)
        });
        assert_eq!(d.outcomes[0], Some(ItemOutcome::Sent));
        assert_eq!(d.outcomes[2], Some(ItemOutcome::Rejected { status: None, error: "no".into() }));
    }

    #[test]
    fn one_bad_item_is_isolated_by_splitting() {
        let its = items(8);
        let mut sizes = vec![];
        let d = deliver_with_split(&its, &mut |b: &[Item]| {
            sizes.push(b.len());
            let answer = if b.iter().any(|i| i.key == "5") {
                Classified::Refused { status: 422, error: "HTTP 422: bad".into() }
            } else {
                Classified::Accepted { rejected: vec![] }
            };
            (answer, Some(format!("req-{}", sizes.len())))
        });
        for (i, o) in d.outcomes.iter().enumerate() {
            if i == 5 {
                assert_eq!(*o, Some(ItemOutcome::Rejected { status: Some(422), error: "HTTP 422: bad".into() }));
            } else {
                assert_eq!(*o, Some(ItemOutcome::Sent), "item {i}");
            }
        }
        // 8 -> 4 (ok) + 4 -> 2 + 1 (ok) + 1 (rejected) + 2 (ok): log2(n) levels, not n requests.
        assert_eq!(sizes, vec![8, 4, 4, 2, 1, 1, 2]);
        assert_eq!(d.response_ids[5].as_deref(), Some("req-6"), "the response that rejected it");
        assert_eq!(d.response_ids[0].as_deref(), Some("req-2"), "the response that delivered it");
        assert_eq!(d.requests, 7);
    }

    #[test]
    fn a_misconfigured_destination_costs_one_request_and_rejects_nothing() {
        let its = items(100);
        let mut calls = 0;
        let d = deliver_with_split(&its, &mut |_| {
            calls += 1;
            (Classified::Misconfigured { status: Some(401), reason: "unauthorized", error: "unauthorized (HTTP 401): no".into() }, None)
        });
        assert_eq!((calls, d.requests, d.failed_requests), (1, 1, 1));
        assert!(d.outcomes.iter().all(Option::is_none), "every item stays pending");
        assert_eq!(d.misconfigured.map(|m| (m.0, m.1)), Some((Some(401), "unauthorized")));
    }

    #[test]
    fn retryable_stops_sending_and_marks_the_rest() {
        let its = items(4);
        let mut calls = 0;
        let d = deliver_with_split(&its, &mut |b: &[Item]| {
            calls += 1;
            let answer = if b.len() == 4 {
                Classified::Refused { status: 400, error: "x".into() }
            } else {
                Classified::Retryable { status: Some(503), error: "down".into(), retry_after: Some(Duration::from_secs(2)) }
            };
            (answer, None)
        });
        assert_eq!(calls, 2, "after the first retryable failure nothing more is sent");
        assert_eq!(d.hold, Some(Duration::from_secs(2)));
        assert!(d.outcomes.iter().all(|o| matches!(o, Some(ItemOutcome::Retry { status: Some(503), .. }))));
    }
}
