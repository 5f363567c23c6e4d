//! The topology commands over every configured tenant: `plan`, `apply` (plan all
//! tenants first; apply only when none has a conflict), `redrive`; and the check that
//! `topology.apply_on_start` runs at `warren serve`. Reports are text for operators
//! (they may quote the broker); the startup reason given to `/readyz` does not.

use std::fmt::Write as _;

use lapin::Connection;

use super::{Applied, Plan, State, TopologyError, apply, plan, redrive::redrive};
use crate::broker::connect_once;
use crate::config::{AmqpConfig, ResolvedTenant};

/// How a command ended, for its exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Clean,
    /// `plan` found conflicts, or `apply` refused because of them.
    Conflicts,
    /// The broker failed, or an apply failed part way.
    Failed,
}

async fn connect(amqp: &AmqpConfig, tenant: &ResolvedTenant) -> Result<Connection, TopologyError> {
    connect_once(&tenant.urls, &tenant.vhost, amqp)
        .await
        .map_err(|e| TopologyError(format!("cannot connect to vhost {:?}: {e}", tenant.vhost)))
}

fn label(state: &State) -> &'static str {
    match state {
        State::Exists => "exists",
        State::Missing => "missing",
        State::Conflict { .. } => "CONFLICT",
        State::Bind => "bind",
        State::Unresolved(_) => "UNRESOLVED",
        State::Outdated(_) => "outdated",
    }
}

fn write_plan(out: &mut String, tenant: &ResolvedTenant, plan: &Plan) {
    let _ = writeln!(out, "tenant {} (vhost {:?})", tenant.name, tenant.vhost);
    for item in &plan.items {
        let _ = match &item.state {
            State::Conflict { argument, detail } => writeln!(
                out,
                "  {:<10} {}: argument {argument} differs ({detail})",
                label(&item.state),
                item.object
            ),
            State::Unresolved(why) | State::Outdated(why) => {
                writeln!(out, "  {:<10} {}: {why}", label(&item.state), item.object)
            }
            state => writeln!(out, "  {:<10} {}", label(state), item.object),
        };
    }
    let _ = writeln!(
        out,
        "  {} exist, {} missing, {} conflicting, {} bindings",
        plan.count(|s| *s == State::Exists),
        plan.count(|s| *s == State::Missing),
        plan.blockers().count(),
        plan.count(|s| *s == State::Bind),
    );
    for push in &tenant.push {
        // The URL without its query (which may carry a token).
        let mut url = push.url.clone();
        url.set_query(None);
        let _ = writeln!(
            out,
            "  {:<10} {:?}: queue {:?} -> {url} ({}, {} in flight{}, retries {:?} ms then {:?})",
            "push",
            push.name,
            push.queue,
            match push.format {
                crate::config::PushFormat::Warren => "warren frames",
                crate::config::PushFormat::CloudEvents => "CloudEvents binary",
            },
            push.max_in_flight,
            if push.ordered { ", ordered" } else { "" },
            push.retry.delays_ms,
            push.retry.dlq(),
        );
    }
}

/// The tenants with a topology, optionally only `only`.
fn selected<'a>(
    tenants: impl Iterator<Item = &'a ResolvedTenant>,
    only: Option<&str>,
) -> Vec<&'a ResolvedTenant> {
    tenants
        .filter(|t| only.is_none_or(|name| t.name == name))
        .filter(|t| !t.topology.is_empty())
        .collect()
}

async fn plan_all(
    amqp: &AmqpConfig,
    tenants: &[&ResolvedTenant],
) -> Result<Vec<(Connection, Plan)>, TopologyError> {
    let mut plans = Vec::with_capacity(tenants.len());
    for tenant in tenants {
        let planned = match connect(amqp, tenant).await {
            Ok(connection) => match plan(&connection, &tenant.topology).await {
                Ok(plan) => Ok((connection, plan)),
                Err(e) => {
                    let _ = connection.close(200, "done".into()).await;
                    Err(e)
                }
            },
            Err(e) => Err(e),
        };
        match planned {
            Ok(planned) => plans.push(planned),
            Err(e) => {
                // The connections already open must not outlive a failed plan (the
                // startup apply retries it).
                close(plans).await;
                return Err(e);
            }
        }
    }
    Ok(plans)
}

async fn close(plans: Vec<(Connection, Plan)>) {
    for (connection, _) in plans {
        let _ = connection.close(200, "done".into()).await;
    }
}

/// `warren topology plan`: what exists, is missing and conflicts, per tenant.
pub async fn plan_command<'a>(
    amqp: &AmqpConfig,
    tenants: impl Iterator<Item = &'a ResolvedTenant>,
    only: Option<&str>,
) -> (Verdict, String) {
    let tenants = selected(tenants, only);
    let mut out = String::new();
    let plans = match plan_all(amqp, &tenants).await {
        Ok(plans) => plans,
        Err(e) => return (Verdict::Failed, format!("plan failed: {e}\n")),
    };
    let mut verdict = Verdict::Clean;
    for (tenant, (_, plan)) in tenants.iter().zip(&plans) {
        write_plan(&mut out, tenant, plan);
        if !plan.is_clean() {
            verdict = Verdict::Conflicts;
        }
    }
    if tenants.is_empty() {
        out.push_str("no tenant declares any topology\n");
    }
    close(plans).await;
    (verdict, out)
}

/// `warren topology apply`: plans every tenant; when none conflicts, declares what is
/// missing; otherwise applies nothing and lists the conflicts.
pub async fn apply_command<'a>(
    amqp: &AmqpConfig,
    tenants: impl Iterator<Item = &'a ResolvedTenant>,
    only: Option<&str>,
) -> (Verdict, String) {
    let tenants = selected(tenants, only);
    let mut out = String::new();
    let plans = match plan_all(amqp, &tenants).await {
        Ok(plans) => plans,
        Err(e) => {
            return (
                Verdict::Failed,
                format!("apply failed, nothing applied: {e}\n"),
            );
        }
    };
    if plans.iter().any(|(_, p)| !p.is_clean()) {
        for (tenant, (_, plan)) in tenants.iter().zip(&plans) {
            for item in plan.blockers() {
                let why = match &item.state {
                    State::Conflict { argument, detail } => {
                        format!("argument {argument} differs ({detail})")
                    }
                    State::Unresolved(why) => why.clone(),
                    _ => String::new(),
                };
                let _ = writeln!(out, "tenant {}: {}: {why}", tenant.name, item.object);
            }
        }
        out.push_str("refused: the topology conflicts with the broker; nothing was applied\n");
        close(plans).await;
        return (Verdict::Conflicts, out);
    }
    let mut verdict = Verdict::Clean;
    for (tenant, (connection, plan)) in tenants.iter().zip(&plans) {
        let _ = writeln!(out, "tenant {} (vhost {:?})", tenant.name, tenant.vhost);
        match apply(connection, &tenant.topology, plan).await {
            Ok(Applied { declared, failed }) => {
                for object in &declared {
                    let _ = writeln!(out, "  applied    {object}");
                }
                let _ = writeln!(
                    out,
                    "  {} declared, {} unchanged",
                    declared
                        .iter()
                        .filter(|o| !matches!(o, super::Object::Binding(_)))
                        .count(),
                    plan.count(|s| *s == State::Exists)
                );
                if let Some((object, error)) = failed {
                    let _ = writeln!(
                        out,
                        "  FAILED     {object}: {error}\nstopped: only what is listed as applied above was applied"
                    );
                    verdict = Verdict::Failed;
                    break;
                }
            }
            Err(e) => {
                let _ = writeln!(
                    out,
                    "  FAILED: {e}\nstopped: only what is listed as applied above was applied"
                );
                verdict = Verdict::Failed;
                break;
            }
        }
    }
    close(plans).await;
    (verdict, out)
}

/// `warren topology redrive`: moves up to `limit` messages of `<queue>.dlq` back.
pub async fn redrive_command(
    amqp: &AmqpConfig,
    tenant: &ResolvedTenant,
    queue: &str,
    limit: u64,
) -> Result<u64, TopologyError> {
    let connection = connect(amqp, tenant).await?;
    let dlq = tenant
        .topology
        .retry
        .get(queue)
        .map_or_else(|| format!("{queue}.dlq"), |p| p.dlq());
    let result = redrive(&connection, &dlq, queue, limit).await;
    let _ = connection.close(200, "done".into()).await;
    result
}

/// Why `topology.apply_on_start` did not succeed: the reason for `/readyz` (object and
/// argument names only: no vhost, no broker text; the log gets the full report), and
/// whether trying again may help (the broker was unreachable or refused a declaration)
/// or not (a conflict, which needs an operator).
#[derive(Debug, Clone)]
pub struct StartFailure {
    pub reason: String,
    pub retryable: bool,
}

/// `topology.apply_on_start`: applies every tenant's topology.
pub async fn apply_on_start<'a>(
    amqp: &AmqpConfig,
    tenants: impl Iterator<Item = &'a ResolvedTenant> + Clone,
) -> Result<(), StartFailure> {
    let (verdict, report) = apply_command(amqp, tenants.clone(), None).await;
    match verdict {
        Verdict::Clean => {
            tracing::info!(report = %report, "Topology applied.");
            Ok(())
        }
        Verdict::Conflicts => {
            tracing::error!(report = %report, "The topology conflicts with the broker; not ready.");
            let mut reasons = Vec::new();
            for tenant in selected(tenants, None) {
                // Planned again only to phrase the reason without the broker's text.
                let Ok(connection) = connect(amqp, tenant).await else {
                    continue;
                };
                if let Ok(plan) = plan(&connection, &tenant.topology).await {
                    for item in plan.blockers() {
                        let why = match &item.state {
                            State::Conflict { argument, .. } => {
                                format!("argument {argument} differs")
                            }
                            _ => "refers to an exchange or queue that does not exist".to_owned(),
                        };
                        reasons.push(format!("tenant {}: {}: {why}", tenant.name, item.object));
                    }
                }
                let _ = connection.close(200, "done".into()).await;
            }
            Err(StartFailure {
                reason: format!("topology conflicts with the broker: {}", reasons.join("; ")),
                retryable: false,
            })
        }
        Verdict::Failed => {
            tracing::warn!(report = %report, "The topology could not be applied yet; retrying.");
            Err(StartFailure {
                reason: "the topology could not be applied yet (the log says why); retrying"
                    .to_owned(),
                retryable: true,
            })
        }
    }
}
