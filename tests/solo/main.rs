//! Tests that change the whole shared broker, so nothing else may use it meanwhile:
//! the memory alarm blocks every publisher, a restart drops every connection. Each is
//! `#[ignore]`d in the normal `cargo test` run, and scripts/test.sh runs them one at a
//! time after it: `cargo test --locked --test solo -- --ignored --test-threads=1`.
//! They drive the broker with `rabbitmqctl`, and fail when it cannot reach the broker;
//! `cluster.rs` drives a throwaway 3-node cluster (`scripts/cluster.sh`) instead.

#[allow(dead_code)]
#[path = "../integration/common.rs"]
mod common;
#[allow(dead_code)]
#[path = "../integration/load.rs"]
mod load;
#[allow(dead_code)]
#[path = "../integration/schedule_support.rs"]
mod schedule_support;

mod alarm;
mod cluster;
mod request;
mod restart;
mod schedule;

use std::process::Command;

/// Runs `rabbitmqctl` with `args`; its stdout.
fn rabbitmqctl(args: &[&str]) -> Result<String, String> {
    let out = Command::new("rabbitmqctl")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run rabbitmqctl: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// These tests cannot do their job without `rabbitmqctl`: say so rather than pass.
fn require_rabbitmqctl() {
    if let Err(error) = rabbitmqctl(&["status"]) {
        panic!("rabbitmqctl cannot reach the broker (run as a user that can): {error}");
    }
}
