//! The dead-letter recorder: consumes `P.dead-letters`, records every message in the
//! `dead_letters` table ([`mui_shared::deadletters::record`]) and only then acknowledges
//! it, so the operator can list and replay it with `muictl dead-letters`.
//!
//! It runs in the notifier because the notifier is the service that tells people about
//! problems, runs once or twice per deployment (not scaled out like workers), and already
//! holds the database pool; several notifiers recording at once are harmless (a dead letter
//! is recorded once, keyed by payload hash and time of death).

use std::time::Duration;

use anyhow::Context as _;
use futures::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::Connection;
use mui_shared::amqp::{self, Topology};
use mui_shared::db::{self, PgPool};
use mui_shared::deadletters;
use tokio_util::sync::CancellationToken;

/// Records dead letters until `shutdown` (returns `Ok`) or until the consumer fails.
pub async fn run(
    conn: &Connection,
    pool: PgPool,
    topology: Topology,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let channel = conn.create_channel().await?;
    channel.basic_qos(8, BasicQosOptions::default()).await?;
    let tag = format!("mui-dead-letters-{}", std::process::id());
    let mut consumer = channel
        .basic_consume(
            topology.dead_queue().as_str().into(),
            tag.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    loop {
        let delivery = tokio::select! {
            _ = shutdown.cancelled() => break,
            next = consumer.next() => match next {
                Some(Ok(d)) => d,
                Some(Err(e)) => return Err(e).context("consuming dead letters"),
                None => anyhow::bail!("the broker cancelled the dead-letter consumer"),
            },
        };
        let mut backoff = amqp::backoff_policy(None);
        loop {
            let payload = delivery.data.clone();
            let headers = delivery.properties.headers().clone();
            let topo = topology.clone();
            let result = db::run(&pool, move |conn| {
                let id = deadletters::record(conn, &topo, &payload, headers.as_ref())?;
                Ok((id, tenant_of(conn, id)?))
            })
            .await;
            match result {
                Ok((id, tenant)) => {
                    if id.is_some() {
                        metrics::counter!(
                            "mui_messages_dead_lettered_total",
                            "tenant" => tenant.unwrap_or_else(|| "unknown".to_owned())
                        )
                        .increment(1);
                    }
                    tracing::warn!(dead_letter_id = ?id, "DeadLetterRecorded");
                    if let Err(e) = delivery.ack(BasicAckOptions::default()).await {
                        tracing::warn!(error = %e, "DeadLetterAckError");
                    }
                    break;
                }
                Err(e) => {
                    let wait = backoff::backoff::Backoff::next_backoff(&mut backoff)
                        .unwrap_or(Duration::from_secs(10));
                    tracing::warn!(error = %e, cause = ?e, retry_in_ms = wait.as_millis() as u64, "DeadLetterRecordRetry");
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = shutdown.cancelled() => {
                            let _ = delivery.nack(BasicNackOptions { requeue: true, multiple: false }).await;
                            break;
                        }
                    }
                }
            }
        }
    }
    drop(consumer);
    let _ = channel.close(200, "shutdown".into()).await;
    Ok(())
}

/// The slug of the tenant a recorded dead letter is about, if it names one.
fn tenant_of(
    conn: &mut diesel::PgConnection,
    id: Option<i64>,
) -> diesel::QueryResult<Option<String>> {
    use diesel::prelude::*;
    use mui_shared::schema::{dead_letters, tenants};
    let Some(id) = id else { return Ok(None) };
    let tenant: Option<i64> = dead_letters::table
        .find(id)
        .select(dead_letters::tenant_id)
        .first::<Option<i64>>(conn)
        .optional()?
        .flatten();
    let Some(tenant) = tenant else {
        return Ok(None);
    };
    tenants::table
        .find(tenant)
        .select(tenants::slug)
        .first::<String>(conn)
        .optional()
}
