//! Pool of confirm-mode channels over a vhost's connections. A channel is borrowed
//! only while a publish frame is written; confirms are awaited after it is returned,
//! so many publishes are in flight on each channel at once.

use deadpool::managed::{self, Metrics, RecycleError, RecycleResult};
use lapin::Channel;
use lapin::options::ConfirmSelectOptions;

use std::sync::Arc;

use super::BrokerError;
use super::connection::Connections;

pub struct ChannelManager {
    connections: Arc<Connections>,
}

impl ChannelManager {
    pub fn new(connections: Arc<Connections>) -> Self {
        Self { connections }
    }
}

impl managed::Manager for ChannelManager {
    type Type = Channel;
    type Error = BrokerError;

    async fn create(&self) -> Result<Channel, BrokerError> {
        let connection = self.connections.pick().ok_or(BrokerError::NotConnected)?;
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(channel)
    }

    /// A channel the broker closed (404, access refused) or whose connection died is
    /// replaced, never handed out again.
    async fn recycle(&self, channel: &mut Channel, _: &Metrics) -> RecycleResult<BrokerError> {
        if channel.status().connected() {
            Ok(())
        } else {
            Err(RecycleError::message("channel is closed"))
        }
    }
}
