//! Pool of confirm-mode channels over a vhost's connections, each with a confirm
//! sequencer. A channel is borrowed only to queue a publish; its confirms are then
//! tracked in publish order by the channel's sequencer, which also attributes
//! `basic.return`s to the message they belong to.
//!
//! Why the sequencer: lapin hands a returned message to whichever confirm resolves
//! next, not to the message it returns. With many publishes in flight per channel, an
//! ack for an earlier routed message (or a multiple-ack) can carry a later message's
//! return, so "unroutable" would land on the wrong request. The broker always sends a
//! message's return before its ack, so by the time a message's confirm resolves, its
//! return has been attached to some confirm that is already resolved: the sequencer
//! looks at all of those and matches returns by (message id, exchange, routing key).

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use deadpool::managed::{self, Metrics, RecycleError, RecycleResult};
use futures::FutureExt;
use lapin::options::ConfirmSelectOptions;
use lapin::{Channel, Confirmation, PublisherConfirm};
use tokio::sync::{mpsc, oneshot};
use tokio_util::task::TaskTracker;

use super::BrokerError;
use super::connection::Connections;

/// What identifies a returned message: equal keys route alike, so a mix-up between
/// two messages with the same key cannot change any answer.
pub type ReturnKey = (String, String, String);

pub fn return_key(message_id: &str, exchange: &str, routing_key: &str) -> ReturnKey {
    (
        message_id.to_owned(),
        exchange.to_owned(),
        routing_key.to_owned(),
    )
}

/// Writing a publish's frames, then awaiting its confirm.
pub type ConfirmFuture = Pin<Box<dyn Future<Output = lapin::Result<Confirmation>> + Send>>;

/// The outcome of one publish as the sequencer saw it.
#[derive(Debug)]
pub enum Outcome {
    Acked,
    /// Acked, but the broker returned it (mandatory and unroutable).
    Returned(String),
    Nacked,
    NotConfirmed,
    Failed(lapin::Error),
}

/// One publish handed to a channel's sequencer, in publish order.
pub struct Tracked {
    pub key: ReturnKey,
    pub confirm: ConfirmFuture,
    pub reply: oneshot::Sender<(Outcome, Instant)>,
}

/// A pooled channel and the sender to its sequencer.
pub struct PublishChannel {
    pub channel: Channel,
    pub sequencer: mpsc::UnboundedSender<Tracked>,
}

pub struct ChannelManager {
    connections: Arc<Connections>,
    /// The broker's tasks: each channel's sequencer runs on it.
    tasks: TaskTracker,
}

impl ChannelManager {
    pub fn new(connections: Arc<Connections>, tasks: TaskTracker) -> Self {
        Self { connections, tasks }
    }
}

impl managed::Manager for ChannelManager {
    type Type = PublishChannel;
    type Error = BrokerError;

    async fn create(&self) -> Result<PublishChannel, BrokerError> {
        let connection = self.connections.pick().ok_or(BrokerError::NotConnected)?;
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let (sequencer, tracked) = mpsc::unbounded_channel();
        self.tasks.spawn(sequence(tracked));
        Ok(PublishChannel { channel, sequencer })
    }

    /// A channel the broker closed (404, access refused) or whose connection died is
    /// replaced, never handed out again.
    async fn recycle(
        &self,
        publish: &mut PublishChannel,
        _: &Metrics,
    ) -> RecycleResult<BrokerError> {
        if publish.channel.status().connected() && !publish.sequencer.is_closed() {
            Ok(())
        } else {
            Err(RecycleError::message("channel is closed"))
        }
    }
}

enum State {
    Waiting(ConfirmFuture),
    Done(Box<lapin::Result<Confirmation>>, Instant),
}

struct Entry {
    key: ReturnKey,
    state: State,
    reply: oneshot::Sender<(Outcome, Instant)>,
}

/// Resolves a channel's confirms in publish order and pairs returns with their
/// messages. Ends when the pool drops the channel and nothing is left in flight.
pub(super) async fn sequence(mut incoming: mpsc::UnboundedReceiver<Tracked>) {
    let mut queue: VecDeque<Entry> = VecDeque::new();
    // Returns seen but not yet matched to their message's confirm, by key (a count,
    // since equal keys may be in flight more than once).
    let mut returned: HashMap<ReturnKey, (usize, String)> = HashMap::new();
    loop {
        if queue.is_empty() {
            match incoming.recv().await {
                Some(tracked) => queue.push_back(entry(tracked)),
                None => return,
            }
        }
        let Some(front) = queue.front_mut() else {
            continue;
        };
        if let State::Waiting(confirm) = &mut front.state {
            let result = confirm.await;
            front.state = State::Done(Box::new(result), Instant::now());
        }
        // Whatever arrived meanwhile may hold a return: take it in, and look at every
        // confirm already resolved. Entries resolved by the end of the first pass have
        // their returns on confirms resolved no later than theirs, so the second pass
        // has seen all of them, and those entries can all be answered now. (One pass
        // would not do: a confirm can resolve after the pass looked at it and before
        // the pass reached a later one it carries the return for.)
        while let Ok(tracked) = incoming.try_recv() {
            queue.push_back(entry(tracked));
        }
        collect(&mut queue, &mut returned);
        let ready = queue
            .iter()
            .take_while(|e| matches!(e.state, State::Done(..)))
            .count();
        collect(&mut queue, &mut returned);
        for front in queue.drain(..ready) {
            let State::Done(result, at) = front.state else {
                continue;
            };
            let outcome = match *result {
                Ok(Confirmation::Ack(_)) => match returned.get_mut(&front.key) {
                    Some((count, reply_text)) => {
                        let reply_text = reply_text.clone();
                        *count -= 1;
                        if *count == 0 {
                            returned.remove(&front.key);
                        }
                        Outcome::Returned(reply_text)
                    }
                    None => Outcome::Acked,
                },
                Ok(Confirmation::Nack(_)) => Outcome::Nacked,
                Ok(Confirmation::NotRequested) => Outcome::NotConfirmed,
                Err(error) => Outcome::Failed(error),
            };
            // The caller may have given up (timeout); nobody to tell then.
            let _ = front.reply.send((outcome, at));
        }
    }
}

/// Polls every unresolved confirm once and files the returned messages that resolved
/// confirms carry, by key.
fn collect(queue: &mut VecDeque<Entry>, returned: &mut HashMap<ReturnKey, (usize, String)>) {
    for entry in queue.iter_mut() {
        if let State::Waiting(confirm) = &mut entry.state
            && let Some(result) = confirm.as_mut().now_or_never()
        {
            entry.state = State::Done(Box::new(result), Instant::now());
        }
        if let State::Done(result, _) = &mut entry.state
            && let Ok(Confirmation::Ack(returned_message) | Confirmation::Nack(returned_message)) =
                result.as_mut()
            && let Some(message) = returned_message.take()
        {
            let props = &message.delivery.properties;
            let key = return_key(
                props
                    .message_id()
                    .as_ref()
                    .map(|s| s.as_str())
                    .unwrap_or_default(),
                message.delivery.exchange.as_str(),
                message.delivery.routing_key.as_str(),
            );
            let slot = returned
                .entry(key)
                .or_insert_with(|| (0, message.reply_text.to_string()));
            slot.0 += 1;
        }
    }
}

fn entry(tracked: Tracked) -> Entry {
    Entry {
        key: tracked.key,
        state: State::Waiting(tracked.confirm),
        reply: tracked.reply,
    }
}

/// Turns the write-then-confirm of one publish into the sequencer's future.
pub fn confirm_future(
    write: impl Future<Output = lapin::Result<PublisherConfirm>> + Send + 'static,
) -> ConfirmFuture {
    Box::pin(async move {
        let confirm = write.await?;
        confirm.await
    })
}

#[cfg(test)]
mod tests {
    //! The sequencer against fake confirm futures: each test resolves confirms in an
    //! order of its choosing and checks what every publish is told.

    use std::time::Duration;

    use lapin::BasicProperties;
    use lapin::message::{BasicReturnMessage, Delivery};

    use super::*;

    /// A publish handed to a running sequencer, whose confirm the test resolves.
    struct Fake {
        confirm: Option<oneshot::Sender<lapin::Result<Confirmation>>>,
        outcome: oneshot::Receiver<(Outcome, Instant)>,
    }

    impl Fake {
        fn resolve(&mut self, result: lapin::Result<Confirmation>) {
            let confirm = self.confirm.take().expect("resolved once");
            assert!(
                confirm.send(result).is_ok(),
                "the sequencer holds the confirm"
            );
        }

        fn answered(&mut self) -> bool {
            !matches!(
                self.outcome.try_recv(),
                Err(oneshot::error::TryRecvError::Empty)
            )
        }

        async fn outcome(self) -> Outcome {
            tokio::time::timeout(Duration::from_secs(5), self.outcome)
                .await
                .expect("answered in time")
                .expect("answered, not dropped")
                .0
        }
    }

    fn start() -> (mpsc::UnboundedSender<Tracked>, tokio::task::JoinHandle<()>) {
        let (sequencer, tracked) = mpsc::unbounded_channel();
        (sequencer, tokio::spawn(sequence(tracked)))
    }

    fn publish(sequencer: &mpsc::UnboundedSender<Tracked>, id: &str) -> Fake {
        let (confirm, resolved) = oneshot::channel();
        let (reply, outcome) = oneshot::channel();
        let future: ConfirmFuture =
            Box::pin(async move { resolved.await.unwrap_or(Ok(Confirmation::NotRequested)) });
        let tracked = Tracked {
            key: return_key(id, "ex", "rk"),
            confirm: future,
            reply,
        };
        assert!(sequencer.send(tracked).is_ok(), "the sequencer runs");
        Fake {
            confirm: Some(confirm),
            outcome,
        }
    }

    /// What the broker hands back for an unroutable mandatory publish of `id`.
    fn returned(id: &str) -> Option<BasicReturnMessage> {
        let mut delivery = Delivery::mock(0, "ex".into(), "rk".into(), false, Vec::new());
        delivery.properties = BasicProperties::default().with_message_id(id.into());
        Some(BasicReturnMessage {
            delivery,
            reply_code: 312,
            reply_text: "NO_ROUTE".into(),
        })
    }

    /// Lets the sequencer task run until it has nothing left to do.
    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn answers_in_publish_order_whatever_order_confirms_resolve_in() {
        let (sequencer, _task) = start();
        let mut first = publish(&sequencer, "a");
        let mut second = publish(&sequencer, "b");
        second.resolve(Ok(Confirmation::Ack(None)));
        settle().await;
        assert!(
            !second.answered(),
            "the second publish waits for the first one's confirm"
        );
        first.resolve(Ok(Confirmation::Nack(None)));
        assert!(matches!(first.outcome().await, Outcome::Nacked));
        assert!(matches!(second.outcome().await, Outcome::Acked));
    }

    #[tokio::test]
    async fn a_return_carried_by_an_earlier_ack_goes_to_its_own_message() {
        // lapin attaches a return to whichever confirm resolves next: here the routed
        // message "a" carries the return of the unroutable message "b".
        let (sequencer, _task) = start();
        let mut routed = publish(&sequencer, "a");
        let mut unroutable = publish(&sequencer, "b");
        let mut after = publish(&sequencer, "c");
        routed.resolve(Ok(Confirmation::Ack(returned("b"))));
        unroutable.resolve(Ok(Confirmation::Ack(None)));
        after.resolve(Ok(Confirmation::Ack(None)));
        assert!(matches!(routed.outcome().await, Outcome::Acked));
        match unroutable.outcome().await {
            Outcome::Returned(reply_text) => assert_eq!(reply_text, "NO_ROUTE"),
            other => panic!("the return belongs to b: {other:?}"),
        }
        assert!(matches!(after.outcome().await, Outcome::Acked));
    }

    #[tokio::test]
    async fn a_return_is_matched_once_per_returned_message() {
        // Two in-flight publishes with the same key, one of them returned: exactly one
        // is told so (equal keys route alike, so which one cannot change an answer).
        let (sequencer, _task) = start();
        let mut first = publish(&sequencer, "same");
        let mut second = publish(&sequencer, "same");
        first.resolve(Ok(Confirmation::Ack(returned("same"))));
        second.resolve(Ok(Confirmation::Ack(None)));
        let outcomes = [first.outcome().await, second.outcome().await];
        let returned = outcomes
            .iter()
            .filter(|o| matches!(o, Outcome::Returned(_)))
            .count();
        let acked = outcomes
            .iter()
            .filter(|o| matches!(o, Outcome::Acked))
            .count();
        assert_eq!((returned, acked), (1, 1), "{outcomes:?}");
    }

    #[tokio::test]
    async fn failures_and_unconfirmed_publishes_are_told_as_such() {
        let (sequencer, _task) = start();
        let mut failed = publish(&sequencer, "a");
        let mut unconfirmed = publish(&sequencer, "b");
        failed.resolve(Err(lapin::Error::from(
            lapin::ErrorKind::InvalidChannelState(lapin::ChannelState::Closed, "basic.publish"),
        )));
        unconfirmed.resolve(Ok(Confirmation::NotRequested));
        assert!(matches!(failed.outcome().await, Outcome::Failed(_)));
        assert!(matches!(unconfirmed.outcome().await, Outcome::NotConfirmed));
    }

    #[tokio::test]
    async fn ends_once_its_channel_is_dropped_and_nothing_is_in_flight() {
        let (sequencer, task) = start();
        let mut pending = publish(&sequencer, "a");
        drop(sequencer);
        settle().await;
        assert!(!task.is_finished(), "a confirm is still in flight");
        pending.resolve(Ok(Confirmation::Ack(None)));
        assert!(matches!(pending.outcome().await, Outcome::Acked));
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("the sequencer ends")
            .expect("without panicking");
    }
}
