//! Which requests the load level sheds, by priority (see
//! `docs/overload.md`):
//!
//! | level | sheddable | normal | critical |
//! |---|---|---|---|
//! | 0 | sent | sent | sent |
//! | 1 | degraded | sent | sent |
//! | 2 | shed | degraded | sent |
//! | 3 | shed | shed | sent |
//!
//! *Degraded*: answered with a cached copy or the route's `fallback` when
//! there is one, else sent. *Shed*: the same, else `503` with
//! `retry-after`. A request bot rules marked `deprioritize` is treated one
//! level higher than the gateway is, so it goes first. Critical requests
//! are never shed by the level; they keep their share of each cluster
//! ([`super::gate`]).

use filters::Priority;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Send,
    Degrade,
    Shed,
}

pub fn decide(level: u8, priority: Priority, deprioritized: bool) -> Action {
    let from = match priority {
        Priority::Sheddable => 1,
        Priority::Normal => 2,
        Priority::Critical => return Action::Send,
    };
    let level = level + u8::from(deprioritized);
    if level > from {
        Action::Shed
    } else if level == from {
        Action::Degrade
    } else {
        Action::Send
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_of_shedding() {
        use Action::*;
        let row = |l| {
            [Priority::Sheddable, Priority::Normal, Priority::Critical].map(|p| decide(l, p, false))
        };
        assert_eq!(row(0), [Send, Send, Send]);
        assert_eq!(row(1), [Degrade, Send, Send]);
        assert_eq!(row(2), [Shed, Degrade, Send]);
        assert_eq!(row(3), [Shed, Shed, Send]);
        assert_eq!(decide(0, Priority::Sheddable, true), Degrade);
        assert_eq!(decide(1, Priority::Normal, true), Degrade);
        assert_eq!(decide(2, Priority::Normal, true), Shed);
        assert_eq!(decide(3, Priority::Critical, true), Send);
    }
}
