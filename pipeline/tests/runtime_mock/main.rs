//! The runtime against a real Kafka-protocol broker (librdkafka's mock
//! cluster, in process, real TCP), one concern per module: processing,
//! dead letters, dedupe by position, ticks and restore ([`processing`]);
//! a broker that lost its data and the documented reset ([`recovery`]);
//! fencing, claims and repairs between owners ([`ownership`]); timers
//! derived from state ([`timers`]); the size of a poll round ([`rounds`]).
//! [`support`] holds the operator, stage specs and readers they share.

#[path = "../common/mod.rs"]
mod common;

mod ownership;
mod processing;
mod recovery;
mod rounds;
mod support;
mod timers;
