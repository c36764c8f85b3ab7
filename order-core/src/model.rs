//! The order core's vocabulary: what a checkout asks for, what an order is,
//! and the outcomes the state machine can reach. Shared by every store and
//! publisher so the demo and production answer the same way.

use serde::{Deserialize, Serialize};

use crate::error::CoreError;

/// Longest SKU, user id or idempotency key accepted. Keys go into Redis key
/// names, so they are bounded and restricted to characters that cannot
/// break a hash tag (`{`, `}`) or the order id format (`.`).
pub const MAX_ID_LEN: usize = 128;

/// A checked SKU: 1..=64 of `[A-Za-z0-9_-]`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Sku(String);

impl Sku {
    pub fn parse(s: &str) -> Result<Sku, CoreError> {
        let ok = !s.is_empty()
            && s.len() <= 64
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if ok {
            Ok(Sku(s.to_string()))
        } else {
            Err(CoreError::bad_input(
                "sku must be 1-64 characters of A-Z a-z 0-9 - _",
            ))
        }
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Sku {
    type Error = CoreError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Sku::parse(&s)
    }
}

impl From<Sku> for String {
    fn from(s: Sku) -> String {
        s.0
    }
}

impl std::fmt::Display for Sku {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Checks a user id or idempotency key: 1..=128 visible ASCII characters
/// other than `{` and `}` (they would change a Redis Cluster hash tag).
pub fn check_token(what: &str, s: &str) -> Result<(), CoreError> {
    let ok = !s.is_empty()
        && s.len() <= MAX_ID_LEN
        && s.bytes()
            .all(|b| b.is_ascii_graphic() && b != b'{' && b != b'}');
    if ok {
        Ok(())
    } else {
        Err(CoreError::bad_input(format!(
            "{what} must be 1-{MAX_ID_LEN} visible ASCII characters without braces"
        )))
    }
}

/// An order id names its SKU (`<sku>.<32 hex>`), so a lookup by id finds the
/// SKU's hash slot without a global index.
pub fn new_order_id(sku: &Sku) -> String {
    format!("{}.{:032x}", sku, rand::random::<u128>())
}

/// A fresh transaction id for one checkout attempt (the fence's key).
pub fn new_txn_id() -> String {
    format!("t{:032x}", rand::random::<u128>())
}

/// The SKU inside an order id, if the id is well formed.
pub fn sku_of_order(order_id: &str) -> Option<Sku> {
    let (sku, hex) = order_id.rsplit_once('.')?;
    if hex.len() != 32 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    Sku::parse(sku).ok()
}

/// Where an order is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OrderStatus {
    /// Stock is held; payment has not confirmed it yet.
    Pending,
    /// Confirmed: the stock is sold for good.
    Paid,
    /// Not confirmed within the window: stock went back.
    Cancelled,
}

impl OrderStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            OrderStatus::Pending => "pending",
            OrderStatus::Paid => "paid",
            OrderStatus::Cancelled => "cancelled",
        }
    }
    pub fn parse(s: &str) -> Option<OrderStatus> {
        match s {
            "pending" => Some(OrderStatus::Pending),
            "paid" => Some(OrderStatus::Paid),
            "cancelled" => Some(OrderStatus::Cancelled),
            _ => None,
        }
    }
}

/// An order as stored and as answered to clients.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Order {
    pub id: String,
    pub sku: Sku,
    pub user: String,
    pub qty: u32,
    pub status: OrderStatus,
    /// The transaction id of the checkout attempt that created it.
    pub txn: String,
    pub idempotency_key: String,
    pub created_ms: u64,
    /// After this instant a still pending order is cancelled.
    pub expires_ms: u64,
}

/// The message sent through the queue: what downstream needs to act on an
/// order. Built before the local transaction runs (the half message goes
/// first), so it carries only what the request already knows.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderEvent {
    pub order_id: String,
    pub sku: Sku,
    pub user: String,
    pub qty: u32,
    pub txn: String,
}

/// One checkout attempt, fully decided before it reaches a store.
#[derive(Clone, Debug)]
pub struct CheckoutCmd {
    pub order_id: String,
    pub txn: String,
    pub sku: Sku,
    pub user: String,
    pub qty: u32,
    pub idempotency_key: String,
    /// Most units one user may hold of this SKU.
    pub per_user_limit: u32,
    pub now_ms: u64,
    pub expires_ms: u64,
}

impl CheckoutCmd {
    pub fn event(&self) -> OrderEvent {
        OrderEvent {
            order_id: self.order_id.clone(),
            sku: self.sku.clone(),
            user: self.user.clone(),
            qty: self.qty,
            txn: self.txn.clone(),
        }
    }

    /// The order this command creates when it succeeds.
    pub fn order(&self) -> Order {
        Order {
            id: self.order_id.clone(),
            sku: self.sku.clone(),
            user: self.user.clone(),
            qty: self.qty,
            status: OrderStatus::Pending,
            txn: self.txn.clone(),
            idempotency_key: self.idempotency_key.clone(),
            created_ms: self.now_ms,
            expires_ms: self.expires_ms,
        }
    }
}

/// What the atomic local transaction decided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Stock deducted, order recorded: commit the message.
    Created(Order),
    /// The idempotency key was used before: the earlier order, nothing changed.
    Replay(Order),
    /// Not enough stock: nothing changed.
    SoldOut,
    /// The user would exceed the per-user limit: nothing changed.
    OverLimit,
    /// The broker's check-back already rolled this transaction back: nothing
    /// changed, and nothing ever will for this transaction id.
    Fenced,
}

impl Outcome {
    /// Whether the half message must be committed.
    pub fn commits(&self) -> bool {
        matches!(self, Outcome::Created(_))
    }
}

/// The check-back's verdict on a transaction id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TxnVerdict {
    Commit,
    Rollback,
}

/// Stock as the admin API reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StockInfo {
    /// Units still for sale.
    pub stock: i64,
    /// Live (not cancelled) orders.
    pub orders: i64,
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_ids_name_their_sku() {
        let sku = Sku::parse("demo-sneaker").unwrap();
        let id = new_order_id(&sku);
        assert_eq!(sku_of_order(&id), Some(sku));
        assert_eq!(sku_of_order("demo-sneaker.xyz"), None);
        assert_eq!(sku_of_order("no-dot"), None);
    }

    #[test]
    fn ids_that_would_break_a_hash_tag_are_refused() {
        assert!(Sku::parse("a{b}").is_err());
        assert!(Sku::parse("").is_err());
        assert!(check_token("user", "u{1}").is_err());
        assert!(check_token("user", "u 1").is_err());
        assert!(check_token("user", "user-1").is_ok());
    }
}
