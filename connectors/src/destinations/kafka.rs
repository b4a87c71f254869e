//! The `kafka` destination: each change produced to a topic with the
//! idempotent producer, acks awaited; JSON as it comes, or Avro
//! ([`crate::avro`]) with `format: avro`.

use std::sync::Arc;
use std::time::Duration;

use cdp_pipeline::{Sink, SinkRecord};
use futures::future::BoxFuture;
use futures::FutureExt;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

use super::telemetry::DeliveryTelemetry;
use super::KAFKA_DELIVERY_ID_HEADER;
use crate::avro::AvroCodec;

/// Produces each record (key and value) to a topic and waits for the acks.
#[derive(Clone)]
pub struct KafkaSink {
    id: String,
    producer: FutureProducer,
    topic: String,
    /// `Some`: values are re-encoded as Avro before they are produced.
    avro: Option<Arc<AvroCodec>>,
    telemetry: DeliveryTelemetry,
}

impl std::fmt::Debug for KafkaSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSink")
            .field("id", &self.id)
            .field("topic", &self.topic)
            .field("avro", &self.avro.as_ref().map(|c| c.framing()))
            .finish()
    }
}

impl KafkaSink {
    pub fn new(id: &str, producer: FutureProducer, topic: String) -> Self {
        KafkaSink {
            id: id.to_string(),
            producer,
            topic,
            avro: None,
            telemetry: DeliveryTelemetry::new(id),
        }
    }

    /// Produce Avro encoded with `codec` instead of the JSON values.
    pub fn with_avro(mut self, codec: Arc<AvroCodec>) -> Self {
        self.avro = Some(codec);
        self
    }
}

impl Sink for KafkaSink {
    fn name(&self) -> &str {
        &self.id
    }

    fn deliver(&self, records: Vec<SinkRecord>) -> BoxFuture<'static, Vec<Result<(), String>>> {
        let this = self.clone();
        let in_flight = this.telemetry.in_flight(records.len() as i64);
        async move {
            let _in_flight = in_flight;
            // Enqueue in batch order (the idempotent producer keeps that order
            // per partition), then await every ack.
            // A change that cannot be encoded fails alone (dead letter).
            let payloads: Vec<Result<std::borrow::Cow<'_, [u8]>, String>> = records
                .iter()
                .map(|r| match &this.avro {
                    None => Ok(std::borrow::Cow::Borrowed(r.value.as_slice())),
                    Some(codec) => codec
                        .encode_json(&r.value)
                        .map(std::borrow::Cow::Owned)
                        .map_err(|e| format!("avro encoding failed: {e}")),
                })
                .collect();
            let mut pending = Vec::with_capacity(records.len());
            for (r, payload) in records.iter().zip(&payloads) {
                let Ok(payload) = payload else {
                    continue;
                };
                this.telemetry.attempt(1);
                let headers = OwnedHeaders::new().insert(Header {
                    key: KAFKA_DELIVERY_ID_HEADER,
                    value: Some(r.delivery_id.as_bytes()),
                });
                let mut record = FutureRecord::to(&this.topic)
                    .payload(payload.as_ref())
                    .headers(headers);
                if let Some(k) = &r.key {
                    record = record.key(k.as_slice());
                }
                // `send` waits (up to the message timeout) while the local
                // queue is full instead of failing at once.
                pending.push(this.producer.send(record, Duration::from_secs(30)));
            }
            let mut outcomes = futures::future::join_all(pending).await.into_iter();
            let mut results = Vec::with_capacity(records.len());
            for (r, payload) in records.iter().zip(&payloads) {
                let result = match payload {
                    Err(reason) => Err(reason.clone()),
                    Ok(_) => match outcomes.next() {
                        Some(Ok(_)) => Ok(()),
                        Some(Err((e, _))) => Err(kafka_reason(&e)),
                        None => Err("no produce outcome".to_string()),
                    },
                };
                match &result {
                    Ok(()) => this.telemetry.delivered(&r.value),
                    Err(_) => this.telemetry.dead_lettered(1),
                }
                results.push(result);
            }
            results
        }
        .boxed()
    }
}

fn kafka_reason(e: &KafkaError) -> String {
    format!("produce failed: {e}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::destinations::testing::{dest, record, TestResult};
    use crate::destinations::{build_sink, DestinationKind};
    use cdp_pipeline::ClientFactory;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_topic_the_broker_does_not_know_fails_the_destination_at_once() -> TestResult {
        let mock = rdkafka::mocking::MockCluster::new(1)?;
        let factory = ClientFactory::new(cdp_pipeline::KafkaConfig {
            brokers: mock.bootstrap_servers(),
            ..Default::default()
        })?;
        let mut d = dest("topic-out", DestinationKind::Kafka);
        d.topic = Some("no-such-topic".into());
        match build_sink(&d, &factory) {
            Ok(_) => Err("a sink for a topic that does not exist".into()),
            Err(e) => {
                assert_eq!(
                    e.to_string(),
                    "destination topic-out: topic no-such-topic does not exist: create it with `cdp topics create`"
                );
                Ok(())
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn kafka_sink_produces_key_value_and_delivery_id() -> TestResult {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        use rdkafka::message::Headers;
        use rdkafka::Message;

        let mock = rdkafka::mocking::MockCluster::new(1)?;
        let topic = format!("out-{}", uuid::Uuid::new_v4().simple());
        mock.create_topic(&topic, 1, 1)?;
        let factory = ClientFactory::new(cdp_pipeline::KafkaConfig {
            brokers: mock.bootstrap_servers(),
            ..Default::default()
        })?;
        let mut d = dest("topic-out", DestinationKind::Kafka);
        d.topic = Some(topic.clone());
        let sink = build_sink(&d, &factory)?;
        let results = tokio::time::timeout(
            Duration::from_secs(15),
            sink.deliver(vec![record("p1", 1), record("p2", 2)]),
        )
        .await?;
        assert_eq!(results, vec![Ok(()), Ok(())]);

        let consumer: BaseConsumer =
            factory.plain_consumer(&format!("test-{}", uuid::Uuid::new_v4().simple()))?;
        let mut tpl = rdkafka::TopicPartitionList::new();
        tpl.add_partition_offset(&topic, 0, rdkafka::Offset::Beginning)?;
        consumer.assign(&tpl)?;
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        let mut seen = Vec::new();
        while seen.len() < 2 && std::time::Instant::now() < deadline {
            let message = tokio::task::block_in_place(|| consumer.poll(Duration::from_millis(200)));
            if let Some(message) = message {
                let message = message?;
                let id = message.headers().and_then(|h| {
                    h.iter()
                        .find(|h| h.key == KAFKA_DELIVERY_ID_HEADER)
                        .and_then(|h| h.value)
                        .map(<[u8]>::to_vec)
                });
                seen.push((
                    message.key().map(<[u8]>::to_vec),
                    message.payload().map(<[u8]>::to_vec),
                    id,
                ));
            }
        }
        assert_eq!(
            seen,
            vec![
                (
                    Some(b"p1".to_vec()),
                    Some(record("p1", 1).value),
                    Some(b"audiences:0/1/1/0".to_vec())
                ),
                (
                    Some(b"p2".to_vec()),
                    Some(record("p2", 2).value),
                    Some(b"audiences:0/1/2/0".to_vec())
                ),
            ]
        );
        Ok(())
    }
}
