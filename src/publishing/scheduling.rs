//! The accept side of a scheduled publish (SPEC §15), inside the publish service: the
//! checks a publish gets at the broker (the exchange exists, is not internal, may be
//! written) done now for the exchange it will fire to, and the message swapped for its
//! ladder copy (`schedule::wrap`). Grants, quotas and idempotency are the publish
//! service's own, unchanged.

use std::collections::HashMap;

use super::{ItemResult, Prepared};
use crate::broker::{Broker, OutgoingMessage, PublishError};
use crate::error::ApiError;
use crate::schedule;
use crate::tenancy::Tenant;

/// What goes to the broker for each allowed item, whether it goes onto the ladder, and
/// the items it is for; an item refused here gets its result in `results`.
pub(super) async fn outgoing(
    tenant: &Tenant,
    broker: &Broker,
    allowed: Vec<(usize, Prepared)>,
    results: &mut [Option<ItemResult>],
) -> (Vec<OutgoingMessage>, Vec<bool>, Vec<(usize, Prepared)>) {
    if allowed.iter().all(|(_, p)| p.due.is_none()) {
        let messages = allowed.iter().map(|(_, p)| p.message.clone()).collect();
        return (messages, vec![false; allowed.len()], allowed);
    }
    let now = super::now_ms();
    let mut exchanges: HashMap<String, Result<(), PublishError>> = HashMap::new();
    let (mut messages, mut onto_ladder, mut kept) = (Vec::new(), Vec::new(), Vec::new());
    for (index, item) in allowed {
        let Some(due) = item.due else {
            messages.push(item.message.clone());
            onto_ladder.push(false);
            kept.push((index, item));
            continue;
        };
        let refused = if tenant.schedule_wake().is_none() {
            Some(ApiError::InvalidRequest(
                "delay_ms, not_before: scheduled publish is for tenants configured in [tenants]; this tenant comes from the dynamic template".to_owned(),
            ))
        } else {
            let exchange = &item.message.exchange;
            if !exchanges.contains_key(exchange) {
                let checked = broker.ensure_exchange(exchange).await;
                exchanges.insert(exchange.clone(), checked);
            }
            match exchanges.get(exchange) {
                Some(Err(error)) => Some(error.clone().into()),
                _ => None,
            }
        };
        match refused {
            Some(error) => {
                results[index] = Some(ItemResult::Failed {
                    message_id: Some(item.message_id),
                    error,
                });
            }
            None => {
                messages.push(schedule::wrap(&item, due, &tenant.name, now));
                onto_ladder.push(true);
                kept.push((index, item));
            }
        }
    }
    (messages, onto_ladder, kept)
}

/// The longest rung any of the items needs.
pub(super) fn top(items: &[(usize, Prepared)]) -> u32 {
    items
        .iter()
        .filter_map(|(_, p)| p.due.map(|d| d.top))
        .max()
        .unwrap_or(0)
}
