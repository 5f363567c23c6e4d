//! Receipts: what a pull receive hands out for each leased message, and all an ack,
//! nack or extend needs. A receipt names the replica that holds the lease and the
//! lease, and carries an HMAC over both and the tenant and queue, so it cannot be
//! forged, edited or used for another tenant's or another queue's messages. Opaque to
//! clients: 64 characters of URL-safe base64. Pure.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Who holds a lease (a replica, random at each start) and which lease it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Receipt {
    pub owner: [u8; 16],
    pub lease: [u8; 16],
}

/// The key receipts are sealed with; the same on every replica. Kept as a keyed MAC,
/// cloned for each receipt.
#[derive(Clone)]
pub struct ReceiptKey(Hmac<Sha256>);

/// Bytes of the tag kept in a receipt (128 bits).
const TAG: usize = 16;

impl ReceiptKey {
    /// The key from configured secret material, or derived from the token signing
    /// secret (which replicas share), so that receipts and tokens need no second
    /// secret to be distributed.
    pub fn derive(material: &[u8]) -> Result<Self, String> {
        let mut mac = Hmac::<Sha256>::new_from_slice(material).map_err(|e| e.to_string())?;
        mac.update(b"warren pull receipts v1");
        Self::keyed(&mac.finalize().into_bytes())
    }

    pub fn random() -> Result<Self, String> {
        Self::keyed(&rand::random::<[u8; 32]>())
    }

    fn keyed(key: &[u8]) -> Result<Self, String> {
        Hmac::<Sha256>::new_from_slice(key)
            .map(Self)
            .map_err(|e| e.to_string())
    }

    fn tag(&self, tenant: &str, queue: &str, owner: &[u8; 16], lease: &[u8; 16]) -> Hmac<Sha256> {
        let mut mac = self.0.clone();
        mac.update(b"v1\0");
        mac.update(tenant.as_bytes());
        mac.update(b"\0");
        mac.update(queue.as_bytes());
        mac.update(b"\0");
        mac.update(owner);
        mac.update(lease);
        mac
    }

    pub fn seal(&self, tenant: &str, queue: &str, receipt: &Receipt) -> String {
        let tag = self
            .tag(tenant, queue, &receipt.owner, &receipt.lease)
            .finalize()
            .into_bytes();
        let mut bytes = [0u8; 32 + TAG];
        bytes[..16].copy_from_slice(&receipt.owner);
        bytes[16..32].copy_from_slice(&receipt.lease);
        bytes[32..].copy_from_slice(&tag[..TAG]);
        B64.encode(bytes)
    }

    /// The receipt, if `text` is one this key sealed for `tenant` and `queue`.
    pub fn open(&self, tenant: &str, queue: &str, text: &str) -> Option<Receipt> {
        if text.len() > 128 {
            return None;
        }
        let bytes = B64.decode(text).ok()?;
        if bytes.len() != 32 + TAG {
            return None;
        }
        let owner: [u8; 16] = bytes[..16].try_into().ok()?;
        let lease: [u8; 16] = bytes[16..32].try_into().ok()?;
        // Constant time, whatever the tag.
        self.tag(tenant, queue, &owner, &lease)
            .verify_truncated_left(&bytes[32..])
            .ok()?;
        Some(Receipt { owner, lease })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_receipt_opens_only_for_its_tenant_and_queue_and_unchanged() {
        let key = ReceiptKey::derive(b"a shared token secret of 32 bytes!!").unwrap();
        let receipt = Receipt {
            owner: [1; 16],
            lease: [2; 16],
        };
        let sealed = key.seal("acme", "jobs", &receipt);
        assert_eq!(sealed.len(), 64);
        assert_eq!(key.open("acme", "jobs", &sealed), Some(receipt));
        assert_eq!(key.open("globex", "jobs", &sealed), None, "another tenant");
        assert_eq!(key.open("acme", "other", &sealed), None, "another queue");
        let mut edited = sealed.clone().into_bytes();
        edited[20] = if edited[20] == b'A' { b'B' } else { b'A' };
        let edited = String::from_utf8(edited).unwrap();
        assert_eq!(key.open("acme", "jobs", &edited), None, "edited");
        let other_key = ReceiptKey::derive(b"another secret, another deployment").unwrap();
        assert_eq!(other_key.open("acme", "jobs", &sealed), None, "another key");
        for junk in ["", "x", "!!!!", &"A".repeat(64), &"A".repeat(500)] {
            assert_eq!(key.open("acme", "jobs", junk), None, "{junk:?}");
        }
    }
}
