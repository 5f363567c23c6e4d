//! Topology as code against the broker (SPEC §11): `plan` compares a tenant's declared
//! exchanges, queues and bindings with its vhost, `apply` declares what is missing
//! only when nothing conflicts, and `redrive` moves dead letters back.
//!
//! AMQP only, no management API: Warren already holds each tenant's AMQP credentials,
//! and the management plugin may be off or behind other credentials. AMQP tells two
//! things: a passive declare says whether an object exists, and a non-passive declare
//! of an existing object with the desired settings changes nothing but fails with
//! PRECONDITION_FAILED naming the first inequivalent argument. RabbitMQ compares the
//! durable/auto-delete/internal flags, an exchange's type and `alternate-exchange`,
//! and a queue's `x-queue-type`, `x-message-ttl`, `x-expires`, `x-max-length`,
//! `x-max-length-bytes`, `x-overflow`, `x-dead-letter-exchange`,
//! `x-dead-letter-routing-key`, `x-max-priority`, `x-single-active-consumer`,
//! `x-max-age` and `x-stream-max-segment-size-bytes` (an argument set on one side only
//! counts as different). Not detected: values a policy applies (they are not queue
//! arguments), and whether a binding exists: AMQP cannot list bindings, so `plan`
//! lists each as "bind" and `apply` (re)binds them, which is idempotent.

pub mod redrive;
pub mod retry;
pub mod run;
pub mod startup;

use std::fmt;

use lapin::options::{
    ExchangeBindOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Connection, ErrorKind, ExchangeKind};

use crate::config::{ArgValue, BindingSpec, Destination, ExchangeSpec, QueueSpec, TenantTopology};

/// What a plan found for one object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    Exists,
    Missing,
    /// Exists with different settings; `argument` is the broker's name for the first
    /// one that differs, `detail` the broker's words (for operators: it names the vhost).
    Conflict {
        argument: String,
        detail: String,
    },
    /// A binding: declared on apply (idempotent); AMQP cannot tell whether it exists.
    Bind,
    /// A binding whose exchange or queue neither exists nor is declared here.
    Unresolved(String),
    /// Exists as an earlier Warren declared it; works, but lacks what the note says.
    /// Not a blocker: `apply` leaves it as it is.
    Outdated(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Object {
    Exchange(String),
    Queue(String),
    Binding(BindingSpec),
}

impl fmt::Display for Object {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Exchange(name) => write!(f, "exchange {name:?}"),
            Self::Queue(name) => write!(f, "queue {name:?}"),
            Self::Binding(b) => {
                let to = match &b.destination {
                    Destination::Queue(q) => format!("queue {q:?}"),
                    Destination::Exchange(x) => format!("exchange {x:?}"),
                };
                write!(
                    f,
                    "binding exchange {:?} -> {to} key {:?}",
                    b.source, b.routing_key
                )?;
                if !b.arguments.is_empty() {
                    write!(f, " arguments {:?}", b.arguments)?;
                }
                Ok(())
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    pub object: Object,
    pub state: State,
}

/// One tenant's plan, in declaration order.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    pub items: Vec<Item>,
}

impl Plan {
    /// Conflicts and unresolved bindings: `apply` refuses while there are any.
    pub fn blockers(&self) -> impl Iterator<Item = &Item> {
        self.items
            .iter()
            .filter(|i| matches!(i.state, State::Conflict { .. } | State::Unresolved(_)))
    }

    pub fn is_clean(&self) -> bool {
        self.blockers().next().is_none()
    }

    pub fn count(&self, wanted: fn(&State) -> bool) -> usize {
        self.items.iter().filter(|i| wanted(&i.state)).count()
    }
}

/// Why a plan or apply could not finish (the broker, not the topology).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TopologyError(pub String);

impl From<lapin::Error> for TopologyError {
    fn from(error: lapin::Error) -> Self {
        Self(error.to_string())
    }
}

pub fn field_table(arguments: &std::collections::BTreeMap<String, ArgValue>) -> FieldTable {
    let mut table = FieldTable::default();
    for (name, value) in arguments {
        let value = match value {
            ArgValue::Bool(b) => AMQPValue::Boolean(*b),
            ArgValue::Int(n) => AMQPValue::LongLongInt(*n),
            ArgValue::Str(s) => AMQPValue::LongString(s.as_str().into()),
        };
        table.insert(name.as_str().into(), value);
    }
    table
}

fn exchange_kind(spec: &ExchangeSpec) -> ExchangeKind {
    ExchangeKind::Custom(spec.kind.as_str().to_owned())
}

fn exchange_options(spec: &ExchangeSpec, passive: bool) -> ExchangeDeclareOptions {
    ExchangeDeclareOptions {
        passive,
        durable: spec.durable,
        auto_delete: spec.auto_delete,
        internal: spec.internal,
        nowait: false,
    }
}

fn queue_options(spec: &QueueSpec, passive: bool) -> QueueDeclareOptions {
    QueueDeclareOptions {
        passive,
        durable: spec.durable,
        exclusive: false,
        auto_delete: false,
        nowait: false,
    }
}

/// The broker's reply code and text, when the error is a channel or connection close.
fn reply(error: &lapin::Error) -> Option<(u16, String)> {
    match error.kind() {
        ErrorKind::ProtocolError(amqp) => {
            Some((amqp.get_id(), amqp.get_message().as_str().to_owned()))
        }
        _ => None,
    }
}

/// "inequivalent arg 'x-max-priority' for queue …" → `x-max-priority`.
pub fn inequivalent_argument(text: &str) -> Option<&str> {
    let rest = text.split_once("inequivalent arg '")?.1;
    Some(rest.split_once('\'')?.0)
}

/// What the broker says about one exchange or queue: a passive declare for existence,
/// then (when it exists) a declare with the desired settings, which changes nothing
/// and fails on the first inequivalent argument. Each failure closes its channel, so
/// each check opens its own.
async fn check<P, D, FP, FD>(
    connection: &Connection,
    passive: P,
    declare: D,
) -> Result<State, TopologyError>
where
    P: FnOnce(lapin::Channel) -> FP,
    D: FnOnce(lapin::Channel) -> FD,
    FP: Future<Output = Result<(), lapin::Error>>,
    FD: Future<Output = Result<(), lapin::Error>>,
{
    let channel = connection.create_channel().await?;
    match passive(channel.clone()).await {
        Ok(()) => {}
        Err(e) => {
            return match reply(&e) {
                Some((404, _)) => Ok(State::Missing),
                Some((405, text)) => Ok(State::Conflict {
                    argument: "exclusive".to_owned(),
                    detail: text,
                }),
                _ => Err(e.into()),
            };
        }
    }
    match declare(channel.clone()).await {
        Ok(()) => {
            let _ = channel.close(200, "planned".into()).await;
            Ok(State::Exists)
        }
        Err(e) => match reply(&e) {
            Some((406, text)) => Ok(State::Conflict {
                argument: inequivalent_argument(&text).unwrap_or("unknown").to_owned(),
                detail: text,
            }),
            Some((405, text)) => Ok(State::Conflict {
                argument: "exclusive".to_owned(),
                detail: text,
            }),
            _ => Err(e.into()),
        },
    }
}

async fn check_exchange(
    connection: &Connection,
    spec: &ExchangeSpec,
) -> Result<State, TopologyError> {
    check(
        connection,
        |ch| async move {
            ch.exchange_declare(
                spec.name.as_str().into(),
                exchange_kind(spec),
                exchange_options(spec, true),
                FieldTable::default(),
            )
            .await
        },
        |ch| async move {
            ch.exchange_declare(
                spec.name.as_str().into(),
                exchange_kind(spec),
                exchange_options(spec, false),
                field_table(&spec.arguments),
            )
            .await
        },
    )
    .await
}

async fn check_queue(connection: &Connection, spec: &QueueSpec) -> Result<State, TopologyError> {
    let state = check_queue_with(connection, spec, &spec.arguments).await?;
    let Some(legacy) = &spec.legacy_arguments else {
        return Ok(state);
    };
    match &state {
        State::Conflict { argument, .. } if argument.starts_with("x-dead-letter-") => {
            Ok(match check_queue_with(connection, spec, legacy).await? {
                State::Exists => State::Outdated(
                    "declared by an earlier Warren without dead-lettering to its DLQ: a plain AMQP consumer's reject drops the message; recreate the queue or give it the dead-lettering by policy (docs/src/guides/topology.md#plain-amqp-consumers)".to_owned(),
                ),
                _ => state,
            })
        }
        _ => Ok(state),
    }
}

async fn check_queue_with(
    connection: &Connection,
    spec: &QueueSpec,
    arguments: &std::collections::BTreeMap<String, ArgValue>,
) -> Result<State, TopologyError> {
    check(
        connection,
        |ch| async move {
            ch.queue_declare(
                spec.name.as_str().into(),
                queue_options(spec, true),
                FieldTable::default(),
            )
            .await
            .map(|_| ())
        },
        |ch| async move {
            ch.queue_declare(
                spec.name.as_str().into(),
                queue_options(spec, false),
                field_table(arguments),
            )
            .await
            .map(|_| ())
        },
    )
    .await
}

/// Whether an exchange (`true`) or queue (`false`) named `name` exists.
async fn exists(
    connection: &Connection,
    name: &str,
    exchange: bool,
) -> Result<bool, TopologyError> {
    let channel = connection.create_channel().await?;
    let result = if exchange {
        channel
            .exchange_declare(
                name.into(),
                ExchangeKind::Direct,
                ExchangeDeclareOptions {
                    passive: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
    } else {
        channel
            .queue_declare(
                name.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map(|_| ())
    };
    match result {
        Ok(()) => {
            let _ = channel.close(200, "planned".into()).await;
            Ok(true)
        }
        Err(e) if matches!(reply(&e), Some((404, _))) => Ok(false),
        // Exclusive to another connection: it exists.
        Err(e) if matches!(reply(&e), Some((405, _))) => Ok(true),
        Err(e) => Err(e.into()),
    }
}

/// Compares `topology` with the vhost `connection` is on. Declares nothing new.
pub async fn plan(
    connection: &Connection,
    topology: &TenantTopology,
) -> Result<Plan, TopologyError> {
    let mut plan = Plan::default();
    for spec in &topology.exchanges {
        let state = check_exchange(connection, spec).await?;
        plan.items.push(Item {
            object: Object::Exchange(spec.name.clone()),
            state,
        });
    }
    for spec in &topology.queues {
        let state = check_queue(connection, spec).await?;
        plan.items.push(Item {
            object: Object::Queue(spec.name.clone()),
            state,
        });
    }
    for binding in &topology.bindings {
        let mut state = State::Bind;
        let (destination, is_exchange) = match &binding.destination {
            Destination::Queue(q) => (q.as_str(), false),
            Destination::Exchange(x) => (x.as_str(), true),
        };
        for (name, is_exchange) in [(binding.source.as_str(), true), (destination, is_exchange)] {
            let declared = if is_exchange {
                topology.exchanges.iter().any(|x| x.name == name)
            } else {
                topology.queues.iter().any(|q| q.name == name)
            };
            if !declared && !exists(connection, name, is_exchange).await? {
                let kind = if is_exchange { "exchange" } else { "queue" };
                state = State::Unresolved(format!(
                    "{kind} {name:?} neither exists nor is declared in this topology"
                ));
                break;
            }
        }
        plan.items.push(Item {
            object: Object::Binding(binding.clone()),
            state,
        });
    }
    Ok(plan)
}

/// What `apply` did: every object it declared or bound, in order.
#[derive(Debug, Default)]
pub struct Applied {
    pub declared: Vec<Object>,
    /// Set when a declaration failed part way: what failed and why; `declared` lists
    /// exactly what was applied before it.
    pub failed: Option<(Object, String)>,
}

/// Declares what `plan` found missing and (re)binds every binding. Refuses (declares
/// nothing) when the plan has a conflict or an unresolved binding: the caller plans
/// first and shows the blockers.
pub async fn apply(
    connection: &Connection,
    topology: &TenantTopology,
    plan: &Plan,
) -> Result<Applied, TopologyError> {
    if !plan.is_clean() {
        return Err(TopologyError(
            "the plan has conflicts; nothing was applied".to_owned(),
        ));
    }
    let missing = |object: &Object| {
        plan.items
            .iter()
            .any(|i| &i.object == object && i.state == State::Missing)
    };
    let channel = connection.create_channel().await?;
    let mut applied = Applied::default();
    // Exchanges first (bindings and alternate exchanges name them), then queues.
    let declarations = topology
        .exchanges
        .iter()
        .map(|x| Object::Exchange(x.name.clone()))
        .chain(
            topology
                .queues
                .iter()
                .map(|q| Object::Queue(q.name.clone())),
        )
        .filter(|object| missing(object));
    for object in declarations {
        let result = match &object {
            Object::Exchange(name) => match topology.exchanges.iter().find(|x| &x.name == name) {
                Some(spec) => {
                    channel
                        .exchange_declare(
                            name.as_str().into(),
                            exchange_kind(spec),
                            exchange_options(spec, false),
                            field_table(&spec.arguments),
                        )
                        .await
                }
                None => Ok(()),
            },
            Object::Queue(name) => match topology.queues.iter().find(|q| &q.name == name) {
                Some(spec) => channel
                    .queue_declare(
                        name.as_str().into(),
                        queue_options(spec, false),
                        field_table(&spec.arguments),
                    )
                    .await
                    .map(|_| ()),
                None => Ok(()),
            },
            Object::Binding(_) => Ok(()),
        };
        if let Err(e) = result {
            applied.failed = Some((object, e.to_string()));
            return Ok(applied);
        }
        applied.declared.push(object);
    }
    for binding in &topology.bindings {
        let object = Object::Binding(binding.clone());
        let arguments = field_table(&binding.arguments);
        let result = match &binding.destination {
            Destination::Queue(q) => {
                channel
                    .queue_bind(
                        q.as_str().into(),
                        binding.source.as_str().into(),
                        binding.routing_key.as_str().into(),
                        QueueBindOptions::default(),
                        arguments,
                    )
                    .await
            }
            Destination::Exchange(x) => {
                channel
                    .exchange_bind(
                        x.as_str().into(),
                        binding.source.as_str().into(),
                        binding.routing_key.as_str().into(),
                        ExchangeBindOptions::default(),
                        arguments,
                    )
                    .await
            }
        };
        if let Err(e) = result {
            applied.failed = Some((object, e.to_string()));
            return Ok(applied);
        }
        applied.declared.push(object);
    }
    let _ = channel.close(200, "applied".into()).await;
    Ok(applied)
}

#[cfg(test)]
mod tests {
    use super::inequivalent_argument;

    #[test]
    fn the_inequivalent_argument_is_read_from_the_reply_text() {
        let text = "PRECONDITION_FAILED - inequivalent arg 'x-max-priority' for queue 'q' in vhost 'v': received the value '5' of type 'signedint' but current is none";
        assert_eq!(inequivalent_argument(text), Some("x-max-priority"));
        assert_eq!(inequivalent_argument("PRECONDITION_FAILED - other"), None);
    }
}
