//! Integration tests against the real RabbitMQ on 127.0.0.1:5672 (see README).

mod auth;
mod batch;
mod broker_faults;
mod cli;
mod cloudevents;
mod common;
mod deploy;
mod faults;
mod idempotency;
mod isolation;
mod keys;
mod load;
mod openapi;
mod poison;
mod properties;
mod publish;
mod queues;
mod request;
mod security;
mod shutdown;
mod sse;
mod streams;
mod tenancy;
mod topology;
mod transport;
mod ws;
