//! The claim rules tokens are checked against besides their signature, as plain data
//! (the config builds them from `[auth]`).

/// What tokens are checked for besides their signature, and what minted tokens carry
/// (`[auth]`: `tenant_claim`, `leeway_s`, `issuer`, `audience`).
#[derive(Debug, Clone)]
pub struct ClaimRules {
    pub tenant_claim: String,
    pub leeway_s: u64,
    pub issuer: Option<String>,
    pub audience: Option<String>,
}
