//! Redrive: moves up to N messages from `<queue>.dlq` back to the queue, each one
//! published (confirmed, mandatory) before its dead letter is acknowledged, so a
//! failure part way leaves every message in one of the two queues.

use lapin::Confirmation;
use lapin::Connection;
use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicNackOptions, BasicPublishOptions, ConfirmSelectOptions,
};

use super::TopologyError;
use super::retry::for_republish;

/// Moves at most `limit` messages from `dlq` to `queue` (through the default exchange)
/// and returns how many moved. `x-warren-attempt` is removed, so the queue's retry
/// policy starts over; `x-death` stays; `CC` and `BCC` go ([`for_republish`]).
pub async fn redrive(
    connection: &Connection,
    dlq: &str,
    queue: &str,
    limit: u64,
) -> Result<u64, TopologyError> {
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let mut moved = 0;
    while moved < limit {
        let Some(message) = channel
            .basic_get(dlq.into(), BasicGetOptions { no_ack: false })
            .await?
        else {
            break;
        };
        let tag = message.delivery.delivery_tag;
        let properties = for_republish(&message.delivery.properties, None);
        let confirm = channel
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                &message.delivery.data,
                properties,
            )
            .await?
            .await?;
        let refused = match confirm {
            Confirmation::Ack(None) => None,
            Confirmation::Ack(Some(_)) => Some("was returned: the queue does not exist"),
            Confirmation::Nack(_) | Confirmation::NotRequested => Some("was refused by the broker"),
        };
        if let Some(why) = refused {
            let requeue = BasicNackOptions {
                multiple: false,
                requeue: true,
            };
            channel.basic_nack(tag, requeue).await?;
            return Err(TopologyError(format!(
                "the message for queue {queue:?} {why}; it stays in {dlq:?} ({moved} moved before it)"
            )));
        }
        channel.basic_ack(tag, BasicAckOptions::default()).await?;
        moved += 1;
    }
    let _ = channel.close(200, "redriven".into()).await;
    Ok(moved)
}
