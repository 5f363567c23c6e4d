//! What the idempotency layer keeps and replays: a request's typed [`Outcome`] (a
//! success and its body, or the final problem), and [`StoredOutcome`], the one
//! serialised form the memory and Redis stores hold for every answer type.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::{Problem, ProblemCode};

/// A request's answer as the idempotency layer keeps and replays it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome<T> {
    /// A success (`200`, `202`, `207`) and its body.
    Success { status: u16, body: T },
    /// A failure, as the problem it was answered with. Only final ones (`404`, `422`)
    /// are kept; transient ones release the key.
    Failure(StoredProblem),
}

impl<T> Outcome<T> {
    pub fn success(status: u16, body: T) -> Self {
        Self::Success { status, body }
    }

    pub fn status(&self) -> u16 {
        match self {
            Self::Success { status, .. } => *status,
            Self::Failure(problem) => problem.status,
        }
    }
}

impl<T: Serialize> Outcome<T> {
    pub(super) fn encode(&self) -> Result<StoredOutcome, serde_json::Error> {
        Ok(match self {
            Self::Success { status, body } => StoredOutcome {
                status: *status,
                content_type: SUCCESS_CONTENT_TYPE.to_owned(),
                body: serde_json::to_string(body)?,
            },
            Self::Failure(problem) => StoredOutcome {
                status: problem.status,
                content_type: PROBLEM_CONTENT_TYPE.to_owned(),
                body: serde_json::to_string(problem)?,
            },
        })
    }
}

impl<T: DeserializeOwned> Outcome<T> {
    pub(super) fn decode(stored: &StoredOutcome) -> Result<Self, serde_json::Error> {
        Ok(if (200..300).contains(&stored.status) {
            Self::Success {
                status: stored.status,
                body: serde_json::from_str(&stored.body)?,
            }
        } else {
            Self::Failure(serde_json::from_str(&stored.body)?)
        })
    }
}

/// An outcome, and whether it is the stored answer to an earlier request with the same
/// key (answered with `Idempotent-Replayed: true`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answered<T> {
    pub outcome: Outcome<T>,
    pub replayed: bool,
}

impl<T> Answered<T> {
    /// Answered now, by running the request.
    pub fn fresh(outcome: Outcome<T>) -> Self {
        Self {
            outcome,
            replayed: false,
        }
    }

    /// The same answer with its success body converted (to a wire type, say).
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Answered<U> {
        let outcome = match self.outcome {
            Outcome::Success { status, body } => Outcome::Success {
                status,
                body: f(body),
            },
            Outcome::Failure(problem) => Outcome::Failure(problem),
        };
        Answered {
            outcome,
            replayed: self.replayed,
        }
    }
}

/// An RFC 9457 problem as it was answered, member for member (the owned twin of
/// [`Problem`], which can be kept and read back).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredProblem {
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    pub code: ProblemCode,
    pub detail: String,
}

impl From<Problem> for StoredProblem {
    fn from(problem: Problem) -> Self {
        Self {
            kind: problem.kind,
            title: problem.title.to_owned(),
            status: problem.status,
            code: problem.code,
            detail: problem.detail,
        }
    }
}

const SUCCESS_CONTENT_TYPE: &str = "application/json";
const PROBLEM_CONTENT_TYPE: &str = "application/problem+json";

/// An [`Outcome`] serialised for the stores: one form for every answer type, and the
/// record earlier versions wrote (status, content type, body as JSON text), so answers
/// retained across an upgrade, in Redis above all, still replay.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredOutcome {
    pub status: u16,
    pub content_type: String,
    pub body: String,
}

impl StoredOutcome {
    pub(super) fn size(&self) -> usize {
        self.content_type.len() + self.body.len() + 16
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ApiError;

    #[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
    struct Body {
        message_id: String,
        routed: bool,
    }

    #[test]
    fn a_success_is_stored_as_its_json_body_and_read_back() {
        let success = Outcome::success(
            202,
            Body {
                message_id: "m".into(),
                routed: true,
            },
        );
        let stored = success.encode().unwrap();
        assert_eq!(
            stored,
            StoredOutcome {
                status: 202,
                content_type: "application/json".into(),
                body: r#"{"message_id":"m","routed":true}"#.into(),
            }
        );
        assert_eq!(Outcome::<Body>::decode(&stored).unwrap(), success);
    }

    #[test]
    fn a_final_failure_is_stored_as_its_problem_byte_for_byte() {
        let error = ApiError::ExchangeNotFound("nope".into());
        let failure = Outcome::<Body>::Failure(error.problem().into());
        let stored = failure.encode().unwrap();
        assert_eq!(stored.status, 404);
        assert_eq!(stored.content_type, "application/problem+json");
        assert_eq!(
            stored.body,
            serde_json::to_string(&error.problem()).unwrap()
        );
        assert_eq!(Outcome::<Body>::decode(&stored).unwrap(), failure);
    }

    #[test]
    fn records_written_before_typed_outcomes_still_read() {
        let stored: StoredOutcome = serde_json::from_str(
            r#"{"status":422,"content_type":"application/problem+json","body":"{\"type\":\"https://warren.dev/problems/unroutable\",\"title\":\"Unroutable\",\"status\":422,\"code\":\"unroutable\",\"detail\":\"no route\"}"}"#,
        )
        .unwrap();
        let Outcome::<Body>::Failure(problem) = Outcome::decode(&stored).unwrap() else {
            panic!("a 422 is a failure")
        };
        assert_eq!(problem.code, ProblemCode::Unroutable);
        assert_eq!(problem.detail, "no route");
        assert_eq!(serde_json::to_string(&problem).unwrap(), stored.body);
    }
}
