//! Grants: (exchange, routing-key pattern) pairs with AMQP topic semantics, matched
//! against publish routing keys and checked for coverage of subscription binding keys.

use std::collections::{HashSet, VecDeque};
use std::fmt;

/// Splits a key into dot-separated words; as in RabbitMQ, `""` has no words at all.
fn split_words(key: &str) -> impl Iterator<Item = &str> {
    key.split('.').filter(move |_| !key.is_empty())
}

/// One word of a topic pattern.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Word {
    /// `*`: exactly one word.
    One,
    /// `#`: zero or more words.
    Any,
    Literal(String),
}

/// A parsed AMQP topic pattern (`order.*`, `#`, `audit.#.done`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantPattern {
    source: String,
    words: Vec<Word>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    #[error("must be at most 255 bytes")]
    TooLong,
    #[error(
        "word {0:?} mixes a wildcard with other characters; `*` and `#` must stand alone between dots"
    )]
    MixedWildcard(String),
}

impl GrantPattern {
    pub fn parse(source: &str) -> Result<Self, PatternError> {
        if source.len() > 255 {
            return Err(PatternError::TooLong);
        }
        let words = split_words(source)
            .map(|w| match w {
                "*" => Ok(Word::One),
                "#" => Ok(Word::Any),
                w if w.contains(['*', '#']) => Err(PatternError::MixedWildcard(w.to_owned())),
                w => Ok(Word::Literal(w.to_owned())),
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            source: source.to_owned(),
            words,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// Does this pattern match the concrete routing key?
    pub fn matches(&self, routing_key: &str) -> bool {
        let mut states = self.closure_of_start();
        for word in split_words(routing_key) {
            states = self.step(&states, Some(word));
            if states.is_empty() {
                return false;
            }
        }
        states.contains(&self.words.len())
    }

    /// Does this pattern match every routing key that `binding` matches? A binding
    /// `order.*` is covered by `order.#`; `#` is not covered by `order.#`.
    ///
    /// Decided exactly as regular-language inclusion over an alphabet of the literals
    /// in both patterns plus one word that is in neither (every such word behaves alike).
    pub fn covers(&self, binding: &GrantPattern) -> bool {
        let mut alphabet: Vec<Option<&str>> = self
            .literals()
            .chain(binding.literals())
            .map(Some)
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        alphabet.push(None);

        let start = (binding.closure_of_start(), self.closure_of_start());
        let mut seen: HashSet<(Vec<usize>, Vec<usize>)> = HashSet::new();
        let mut queue = VecDeque::from([start]);
        // Patterns are at most 255 bytes, so this is generous; past it we deny.
        const LIMIT: usize = 100_000;
        while let Some((b, g)) = queue.pop_front() {
            if b.contains(&binding.words.len()) && !g.contains(&self.words.len()) {
                return false;
            }
            if !seen.insert((b.clone(), g.clone())) {
                continue;
            }
            if seen.len() > LIMIT {
                return false;
            }
            for symbol in &alphabet {
                let next_b = binding.step(&b, *symbol);
                if next_b.is_empty() {
                    continue;
                }
                queue.push_back((next_b, self.step(&g, *symbol)));
            }
        }
        true
    }

    fn literals(&self) -> impl Iterator<Item = &str> {
        self.words.iter().filter_map(|w| match w {
            Word::Literal(s) => Some(s.as_str()),
            _ => None,
        })
    }

    /// NFA states are word positions; position `len` accepts. A `#` at `i` may be skipped.
    fn closure(&self, mut states: Vec<usize>) -> Vec<usize> {
        let mut i = 0;
        while i < states.len() {
            let s = states[i];
            if matches!(self.words.get(s), Some(Word::Any)) && !states.contains(&(s + 1)) {
                states.push(s + 1);
            }
            i += 1;
        }
        states.sort_unstable();
        states.dedup();
        states
    }

    fn closure_of_start(&self) -> Vec<usize> {
        self.closure(vec![0])
    }

    /// Consumes one word; `None` is a word that equals no literal of this pattern.
    fn step(&self, states: &[usize], word: Option<&str>) -> Vec<usize> {
        let mut next = Vec::new();
        for &s in states {
            match self.words.get(s) {
                Some(Word::Any) => next.push(s),
                Some(Word::One) => next.push(s + 1),
                Some(Word::Literal(l)) if Some(l.as_str()) == word => next.push(s + 1),
                _ => {}
            }
        }
        self.closure(next)
    }
}

impl fmt::Display for GrantPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

/// Which exchanges a grant applies to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExchangeMatch {
    /// `*`: every exchange, including the default exchange `""`.
    Any,
    Exact(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub exchange: ExchangeMatch,
    pub pattern: GrantPattern,
}

impl Grant {
    pub fn new(exchange: String, pattern: GrantPattern) -> Self {
        let exchange = if exchange == "*" {
            ExchangeMatch::Any
        } else {
            ExchangeMatch::Exact(exchange)
        };
        Self { exchange, pattern }
    }

    fn exchange_matches(&self, exchange: &str) -> bool {
        match &self.exchange {
            ExchangeMatch::Any => true,
            ExchangeMatch::Exact(name) => name == exchange,
        }
    }
}

/// Is publishing to `exchange` with `routing_key` allowed by any of `grants`?
pub fn allows_publish(grants: &[Grant], exchange: &str, routing_key: &str) -> bool {
    grants
        .iter()
        .any(|g| g.exchange_matches(exchange) && g.pattern.matches(routing_key))
}

/// Is binding `binding_key` on `exchange` covered by any of `grants`?
pub fn allows_subscribe(grants: &[Grant], exchange: &str, binding_key: &GrantPattern) -> bool {
    grants
        .iter()
        .any(|g| g.exchange_matches(exchange) && g.pattern.covers(binding_key))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> GrantPattern {
        GrantPattern::parse(s).unwrap()
    }

    #[test]
    fn publish_matching_table() {
        let table: &[(&str, &str, bool)] = &[
            ("order.created", "order.created", true),
            ("order.created", "order.updated", false),
            ("order.*", "order.created", true),
            ("order.*", "order", false),
            ("order.*", "order.created.eu", false),
            ("order.#", "order", true),
            ("order.#", "order.created", true),
            ("order.#", "order.created.eu.west", true),
            ("order.#", "orders.created", false),
            ("order.#", "invoice.order", false),
            ("#", "", true),
            ("#", "anything.at.all", true),
            ("*", "one", true),
            ("*", "one.two", false),
            ("*", "", false), // like RabbitMQ, the empty key has no words
            ("#.done", "done", true),
            ("#.done", "a.b.done", true),
            ("#.done", "a.b.done.not", false),
            ("a.#.z", "a.z", true),
            ("a.#.z", "a.b.c.z", true),
            ("a.#.z", "a.b.c", false),
            ("a.*.#", "a", false),
            ("a.*.#", "a.b", true),
            ("a.*.#", "a.b.c.d", true),
            ("#.#", "x", true),
            ("*.*", "x.y", true),
            ("*.*", "x", false),
            ("", "", true),
            ("", "x", false),
            ("a..b", "a..b", true),
        ];
        for (pattern, key, expected) in table {
            assert_eq!(
                p(pattern).matches(key),
                *expected,
                "pattern {pattern:?} key {key:?}"
            );
        }
    }

    #[test]
    fn subscribe_coverage_table() {
        // (grant, binding, covered)
        let table: &[(&str, &str, bool)] = &[
            ("order.#", "order.*", true),
            ("order.#", "order.#", true),
            ("order.#", "order.created", true),
            ("order.#", "order", true),
            ("order.#", "#", false),
            ("order.#", "*.created", false),
            ("order.#", "orders.*", false),
            ("order.*", "order.*", true),
            ("order.*", "order.#", false),
            ("order.*", "order.created", true),
            ("order.*", "order.created.eu", false),
            ("#", "#", true),
            ("#", "anything.*.#", true),
            ("*", "#", false),
            ("*", "*", true),
            ("*.#", "#.*", true),
            ("#.*", "*.#", true),
            ("*.#", "#", false),
            ("a.#.z", "a.b.#.z", true),
            ("a.#.z", "a.#", false),
            ("a.*.z", "a.#.z", false),
            ("#.z", "a.#.z", true),
            ("a.#", "a.b.*", true),
            ("order.created", "order.created", true),
            ("order.created", "order.*", false),
        ];
        for (grant, binding, expected) in table {
            assert_eq!(
                p(grant).covers(&p(binding)),
                *expected,
                "grant {grant:?} binding {binding:?}"
            );
        }
    }

    #[test]
    fn invalid_patterns() {
        assert!(matches!(
            GrantPattern::parse("order.#x"),
            Err(PatternError::MixedWildcard(_))
        ));
        assert!(matches!(
            GrantPattern::parse("a*"),
            Err(PatternError::MixedWildcard(_))
        ));
        assert_eq!(
            GrantPattern::parse(&"a".repeat(256)),
            Err(PatternError::TooLong)
        );
    }

    #[test]
    fn exchange_scoping() {
        let grants = vec![
            Grant::new("events".into(), p("order.#")),
            Grant::new("*".into(), p("public.*")),
        ];
        assert!(allows_publish(&grants, "events", "order.created"));
        assert!(!allows_publish(&grants, "billing", "order.created"));
        assert!(allows_publish(&grants, "billing", "public.news"));
        assert!(allows_publish(&grants, "", "public.news"));
        assert!(!allows_publish(&[], "events", "order.created"));
        assert!(allows_subscribe(&grants, "events", &p("order.*")));
        assert!(!allows_subscribe(&grants, "events", &p("#")));
        assert!(!allows_subscribe(&grants, "other", &p("order.*")));
    }
}
