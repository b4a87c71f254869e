//! An operator wrapper that re-encodes the audience changes another
//! operator emits to one output as Avro: how the audiences stage writes
//! `<p>.audiences` in Avro without the audiences operator knowing formats.

use std::sync::Arc;

use cdp_pipeline::store::StoreError;
use cdp_pipeline::{Context, Operator, OperatorError, Record};

use super::AvroCodec;

/// Reason code of an emitted change the codec could not encode (a bug:
/// the audiences operator emits only well-formed changes).
pub const AVRO_ENCODE_FAILED: &str = "avro_encode_failed";

/// Wraps `inner`; what it emits to `output` is re-encoded with `codec`.
pub struct EncodeOutput {
    inner: Box<dyn Operator>,
    output: &'static str,
    codec: Arc<AvroCodec>,
}

impl EncodeOutput {
    pub fn new(inner: Box<dyn Operator>, output: &'static str, codec: Arc<AvroCodec>) -> Self {
        EncodeOutput {
            inner,
            output,
            codec,
        }
    }

    fn encode_since(&self, from: usize, ctx: &mut Context<'_>) -> Result<(), OperatorError> {
        for e in ctx.emitted_since(from) {
            if e.output == self.output {
                e.value = self
                    .codec
                    .encode_json(&e.value)
                    .map_err(|err| OperatorError::rejected(AVRO_ENCODE_FAILED, err.to_string()))?;
            }
        }
        Ok(())
    }
}

impl Operator for EncodeOutput {
    fn process(&mut self, record: &Record<'_>, ctx: &mut Context<'_>) -> Result<(), OperatorError> {
        let from = ctx.emitted_len();
        self.inner.process(record, ctx)?;
        self.encode_since(from, ctx)
    }

    fn on_timer(&mut self, key: &[u8], ctx: &mut Context<'_>) -> Result<(), OperatorError> {
        let from = ctx.emitted_len();
        self.inner.on_timer(key, ctx)?;
        self.encode_since(from, ctx)
    }

    fn end_batch(&mut self, ctx: &mut Context<'_>) -> Result<(), StoreError> {
        self.inner.end_batch(ctx)
    }
}
