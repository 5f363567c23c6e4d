//! Grants: (exchange, routing-key pattern) pairs with AMQP topic semantics, matched
//! against publish routing keys and checked for coverage of subscription binding keys.
//!
//! Over 500 lines because of its tests: the code is ~340 lines; the rest pins every
//! matching and coverage case, since these rules are the boundary between tenants.

use std::collections::HashSet;
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

    /// `#`: every routing key.
    pub fn every_key() -> Self {
        Self {
            source: "#".to_owned(),
            words: vec![Word::Any],
        }
    }

    /// Matches every routing key (`#`, `#.#`, ...).
    pub fn matches_every_key(&self) -> bool {
        !self.words.is_empty() && self.words.iter().all(|w| *w == Word::Any)
    }

    /// Does this pattern match the concrete routing key? Linear in the key's words.
    pub fn matches(&self, routing_key: &str) -> bool {
        let mut set = self.close(States::single(0));
        for word in split_words(routing_key) {
            set = self.advance(set, Some(word));
            if set.is_empty() {
                return false;
            }
        }
        set.has(self.words.len())
    }

    /// Does this pattern match every routing key that `binding` matches? A binding
    /// `order.*` is covered by `order.#`; `#` is not covered by `order.#`.
    ///
    /// `None` when the binding has too many wildcard combinations to decide within
    /// [`MAX_COVERAGE_SETS`] (the caller refuses it as too complex, never allows it).
    ///
    /// Decided exactly, in time and memory polynomial in the pattern sizes: a word that
    /// is in no literal of this pattern (`z`) is matched by fewer of its positions than
    /// any other word, so the binding's `*` can stand for `z` and its `#` for `z`-runs
    /// of every length; the runs are walked until the grant's state sets repeat. Each
    /// state set is pruned to what decides acceptance (positions before an active `#`
    /// and supersets of another set never do), and their number is capped.
    pub fn covers(&self, binding: &GrantPattern) -> Option<bool> {
        if self.matches_every_key() {
            return Some(true);
        }
        let accept = self.words.len();
        let mut frontier = vec![self.close(States::single(0))];
        for token in &binding.words {
            let mut next: HashSet<States> = HashSet::new();
            for &set in &frontier {
                match token {
                    Word::Literal(word) => {
                        next.insert(self.advance(set, Some(word)));
                    }
                    Word::One => {
                        next.insert(self.advance(set, None));
                    }
                    // Every run length: the z-steps from `set` are deterministic, so
                    // the walk stops at the first set already seen.
                    Word::Any => {
                        let mut run = set;
                        while next.insert(run) {
                            if next.len() > MAX_COVERAGE_SETS {
                                return None;
                            }
                            run = self.advance(run, None);
                        }
                    }
                }
                if next.len() > MAX_COVERAGE_SETS {
                    return None;
                }
            }
            // An expansion of the binding that no continuation can match.
            if next.iter().any(States::is_empty) {
                return Some(false);
            }
            frontier = minimal(next);
        }
        Some(frontier.iter().all(|set| set.has(accept)))
    }

    /// Adds the positions after each `#` (which may match nothing), then drops every
    /// position before the last active `#`: whatever matches from an earlier position
    /// also matches from that `#`, which absorbs the difference.
    fn close(&self, mut set: States) -> States {
        for (i, word) in self.words.iter().enumerate() {
            if *word == Word::Any && set.has(i) {
                set.insert(i + 1);
            }
        }
        if let Some(last) = (0..self.words.len())
            .rev()
            .find(|&i| set.has(i) && self.words[i] == Word::Any)
        {
            set.clear_below(last);
        }
        set
    }

    /// Consumes one word; `None` is a word that equals no literal of this pattern.
    fn advance(&self, set: States, word: Option<&str>) -> States {
        let mut next = States::default();
        for (i, w) in self.words.iter().enumerate() {
            if !set.has(i) {
                continue;
            }
            match w {
                Word::Any => next.insert(i),
                Word::One => next.insert(i + 1),
                Word::Literal(l) if Some(l.as_str()) == word => next.insert(i + 1),
                Word::Literal(_) => {}
            }
        }
        self.close(next)
    }
}

/// At most this many grant state sets are tracked while checking one coverage; past it
/// the binding is refused as too complex. Bounds the time (sets × words² per word of the
/// binding) and memory of a check whatever a client sends.
pub const MAX_COVERAGE_SETS: usize = 256;

/// A set of positions in a pattern of at most 256 words (a 255-byte pattern has at most
/// 256, all empty), plus the accepting position after the last.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
struct States([u64; 5]);

impl States {
    fn single(i: usize) -> Self {
        let mut set = Self::default();
        set.insert(i);
        set
    }

    fn insert(&mut self, i: usize) {
        self.0[i / 64] |= 1 << (i % 64);
    }

    fn has(&self, i: usize) -> bool {
        self.0[i / 64] & (1 << (i % 64)) != 0
    }

    fn is_empty(&self) -> bool {
        self.0.iter().all(|w| *w == 0)
    }

    fn clear_below(&mut self, i: usize) {
        for (index, word) in self.0.iter_mut().enumerate() {
            let start = index * 64;
            if start + 64 <= i {
                *word = 0;
            } else if start < i {
                *word &= !((1u64 << (i - start)) - 1);
            }
        }
    }

    fn is_subset(&self, other: &Self) -> bool {
        self.0.iter().zip(other.0).all(|(a, b)| a & !b == 0)
    }

    fn len(&self) -> u32 {
        self.0.iter().map(|w| w.count_ones()).sum()
    }
}

/// Keeps the sets no other set is contained in: a superset accepts whatever its subset
/// accepts, so only the smallest sets can fail a coverage check.
fn minimal(sets: HashSet<States>) -> Vec<States> {
    let mut sets: Vec<States> = sets.into_iter().collect();
    sets.sort_by_key(States::len);
    let mut kept: Vec<States> = Vec::with_capacity(sets.len());
    for set in sets {
        if !kept.iter().any(|k| k.is_subset(&set)) {
            kept.push(set);
        }
    }
    kept
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
        Self {
            exchange: ExchangeMatch::from_name(exchange),
            pattern,
        }
    }

    fn exchange_matches(&self, exchange: &str) -> bool {
        match &self.exchange {
            ExchangeMatch::Any => true,
            ExchangeMatch::Exact(name) => name == exchange,
        }
    }
}

/// What a tenant's subscribe grants allow (SPEC §3): bindings on exchanges, consuming
/// existing queues (§11) and reading streams (§9).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SubscribeGrants {
    /// `{ exchange, routing_key }`: bind to the exchange with a covered binding key.
    pub exchanges: Vec<Grant>,
    /// `{ queue }`: consume this existing queue (`*`: every queue of the vhost).
    pub queues: Vec<ExchangeMatch>,
    /// `{ stream, routing_key? }`: read this stream; a filter (binding key) must be
    /// covered by the grant's pattern (`#` when the grant names none). The grant's
    /// "exchange" is the stream's name.
    pub streams: Vec<Grant>,
}

impl SubscribeGrants {
    /// May this queue be consumed?
    pub fn allows_queue(&self, queue: &str) -> bool {
        self.queues.iter().any(|q| match q {
            ExchangeMatch::Any => true,
            ExchangeMatch::Exact(name) => name == queue,
        })
    }
}

impl ExchangeMatch {
    /// `*` is every name; anything else is that name exactly.
    pub fn from_name(name: String) -> Self {
        if name == "*" {
            Self::Any
        } else {
            Self::Exact(name)
        }
    }
}

/// Is publishing to `exchange` with `routing_key` allowed by any of `grants`?
pub fn allows_publish(grants: &[Grant], exchange: &str, routing_key: &str) -> bool {
    grants
        .iter()
        .any(|g| g.exchange_matches(exchange) && g.pattern.matches(routing_key))
}

/// The exchanges whose type is known from their name to route without looking at the
/// binding key (`amq.fanout`; headers exchanges match on headers). A binding there
/// receives every key, so only a grant covering every key (`#`) allows it. Exchanges of
/// such types with other names are covered by Warren filtering each delivery by the
/// subscription's binding key.
pub fn ignores_binding_key(exchange: &str) -> bool {
    matches!(exchange, "amq.fanout" | "amq.headers" | "amq.match")
}

/// A binding key whose wildcard combinations are too many to check (see
/// [`GrantPattern::covers`]); refused, never allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooComplex;

/// Is binding `binding_key` on `exchange` covered by any of `grants`?
pub fn allows_subscribe(
    grants: &[Grant],
    exchange: &str,
    binding_key: &GrantPattern,
) -> Result<bool, TooComplex> {
    let every_key;
    let binding_key = if ignores_binding_key(exchange) {
        every_key = GrantPattern::every_key();
        &every_key
    } else {
        binding_key
    };
    let mut too_complex = false;
    for grant in grants.iter().filter(|g| g.exchange_matches(exchange)) {
        match grant.pattern.covers(binding_key) {
            Some(true) => return Ok(true),
            Some(false) => {}
            None => too_complex = true,
        }
    }
    if too_complex {
        Err(TooComplex)
    } else {
        Ok(false)
    }
}

/// May a subscriber holding `grants` see a message routed through `exchange` with
/// `routing_key`? Checked on deliveries from queues that other bindings may feed.
pub fn allows_delivery(grants: &[Grant], exchange: &str, routing_key: &str) -> bool {
    grants.iter().any(|g| {
        g.exchange_matches(exchange)
            && if ignores_binding_key(exchange) {
                g.pattern.matches_every_key()
            } else {
                g.pattern.matches(routing_key)
            }
    })
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
                Some(*expected),
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
        assert_eq!(allows_subscribe(&grants, "events", &p("order.*")), Ok(true));
        assert_eq!(allows_subscribe(&grants, "events", &p("#")), Ok(false));
        assert_eq!(allows_subscribe(&grants, "other", &p("order.*")), Ok(false));
    }

    /// The shape of the reported attack (`#`, many `*` and literals mixed, ~160 bytes)
    /// against several grants: answered at once, and right where the answer is known.
    #[test]
    fn adversarial_bindings_are_decided_fast() {
        let attack: String = (0..20)
            .map(|i| format!("#.*.w{i}"))
            .collect::<Vec<_>>()
            .join(".");
        let nasty = [
            "#.*.*.#.a.*.#.b.*.*.#",
            "*.#.*.#.*.#.*",
            "a.#.*.*.*.*.*.*.#.b",
            "#",
        ];
        let started = std::time::Instant::now();
        for binding in [
            attack.as_str(),
            "#.*.#.*.#.*.#.*.#.*.#.*.#.*.#.*.#.*.#.*.#.*",
        ] {
            let b = p(binding);
            assert_eq!(p("#").covers(&b), Some(true), "# covers {binding}");
            assert_eq!(p("#.#").covers(&b), Some(true));
            for grant in nasty {
                let _ = p(grant).covers(&b);
            }
            assert_eq!(p("w0.#").covers(&b), Some(false));
        }
        // Too many partial matches to track: refused (None), within the same bound.
        let offsets: String = vec!["a.#.*"; 50].join(".");
        let grant = format!("#.a.{}.#", vec!["*"; 18].join("."));
        assert_eq!(p(&grant).covers(&p(&offsets[..255])), None);
        let long_stars = vec!["*"; 120].join(".");
        assert_eq!(p(&long_stars).covers(&p(&long_stars)), Some(true));
        assert_eq!(p("#.*").covers(&p(&format!("{long_stars}.#"))), Some(true));
        assert!(
            started.elapsed() < std::time::Duration::from_secs(2),
            "took {:?}",
            started.elapsed()
        );
    }

    #[test]
    fn exhaustive_grants_against_mixed_bindings() {
        // `*.#` = at least one word; `#.*.*` = at least two.
        assert_eq!(p("#.*.*").covers(&p("*.#.*")), Some(true));
        assert_eq!(p("#.*.*.*").covers(&p("*.#.*")), Some(false));
        assert_eq!(p("#.a.#").covers(&p("*.#.a.*")), Some(true));
        assert_eq!(p("#.a.*.#").covers(&p("#.a.#")), Some(false));
    }

    #[test]
    fn non_filtering_exchanges_need_a_grant_for_every_key() {
        let narrow = vec![Grant::new("*".into(), p("eu.*"))];
        let wide = vec![Grant::new("amq.fanout".into(), p("#"))];
        for exchange in ["amq.fanout", "amq.headers", "amq.match"] {
            assert_eq!(allows_subscribe(&narrow, exchange, &p("eu.x")), Ok(false));
            assert!(!allows_delivery(&narrow, exchange, "eu.x"));
        }
        assert_eq!(allows_subscribe(&wide, "amq.fanout", &p("eu.x")), Ok(true));
        assert!(allows_delivery(&wide, "amq.fanout", "us.secret"));
        assert!(allows_delivery(&narrow, "events", "eu.x"));
        assert!(!allows_delivery(&narrow, "events", "us.secret"));
    }
}
