//! Counts between nodes: each node publishes an event's counts when they change (throttled)
//! on one Redis channel, and every node forwards what it hears to its own actor of that event,
//! which tells its WebSocket listeners and its edge.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

use super::{Cluster, Counts, RemoteCounts};
use crate::actors::Registry;
use crate::domain::EventId;

/// Wait before subscribing again after the connection dropped.
const RESUBSCRIBE: Duration = Duration::from_millis(500);

#[derive(Serialize, Deserialize)]
struct Message {
    event: i64,
    #[serde(flatten)]
    counts: Counts,
    #[serde(default)]
    event_changed: bool,
}

pub fn encode(event: EventId, counts: Counts, event_changed: bool) -> String {
    let message = Message {
        event: event.get(),
        counts,
        event_changed,
    };
    serde_json::to_string(&message).unwrap_or_default()
}

/// Subscribes to the counts channel for the life of the process, resubscribing after losses.
pub fn spawn_bridge(cluster: Arc<Cluster>, registry: Arc<Registry>) {
    actix_rt::spawn(async move {
        loop {
            if let Err(error) = listen(&cluster, &registry).await {
                tracing::warn!(
                    error = format!("{error:#}"),
                    "lost the counts channel; resubscribing"
                );
            }
            tokio::time::sleep(RESUBSCRIBE).await;
        }
    });
}

async fn listen(cluster: &Cluster, registry: &Registry) -> anyhow::Result<()> {
    let mut pubsub = cluster.client().get_async_pubsub().await?;
    pubsub.subscribe(cluster.live_channel()).await?;
    let mut messages = pubsub.on_message();
    while let Some(message) = messages.next().await {
        let Ok(payload) = message.get_payload::<String>() else {
            continue;
        };
        let Ok(message) = serde_json::from_str::<Message>(&payload) else {
            tracing::debug!(payload, "ignoring a malformed counts message");
            continue;
        };
        registry.remote(
            EventId::from_db(message.event),
            RemoteCounts {
                counts: message.counts,
                event_changed: message.event_changed,
            },
        );
    }
    anyhow::bail!("the subscription ended")
}
