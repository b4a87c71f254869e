//! Outputs that are not Kafka topics: webhooks, stdout, files.
//!
//! The runtime awaits a sink exactly like a produce acknowledgement: a batch
//! commits only after every record's delivery resolved. A sink retries on its
//! own (bounded); a record it finally gives up on comes back as `Err(reason)`
//! and the runtime writes it to the dead-letter topic, so nothing is lost
//! and one dead endpoint never stalls the stage.

use futures::future::BoxFuture;

/// One record handed to a sink, with the id a receiver can dedupe on
/// (`origin/lineage/offset/index`: no epoch, so a replay of the same input by
/// a new owner carries the same id).
#[derive(Debug, Clone)]
pub struct SinkRecord {
    pub delivery_id: String,
    pub key: Option<Vec<u8>>,
    pub value: Vec<u8>,
}

pub trait Sink: Send + Sync {
    /// A name for logs and metric labels (the destination id).
    fn name(&self) -> &str;

    /// Deliver a batch; one result per record, in order.
    fn deliver(&self, records: Vec<SinkRecord>) -> BoxFuture<'static, Vec<Result<(), String>>>;
}
