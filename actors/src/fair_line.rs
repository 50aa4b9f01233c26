//! `FairLine`: a cluster's ready line, shared fairly between clients.
//!
//! Each client (its address, see [`ClientId`]) has a lane of its own, and turns go
//! round-robin across the clients with something ready: one item from the first
//! client, one from the next, and so on. Every item costs the same (one CUCM call: one
//! slot and one rate token), so plain round-robin is deficit round-robin with equal
//! quanta. A client sending a flood therefore waits behind its own requests, while a
//! client sending a few is served within one round however long the flood's lane is.
//!
//! Urgent items (a device retrying after CUCM said busy, an operation's next stage)
//! go before every lane: they had their turn already.
//!
//! Pure and generic (no clock, no I/O): the scheduler keeps device names in it.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::net::IpAddr;

/// Who asked for an operation, for sharing the ready line: the client's address as the
/// access rules judged it (behind a trusted proxy, the forwarded one). Requests
/// without a known address share one lane.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct ClientId(Option<IpAddr>);

impl ClientId {
    pub fn address(address: IpAddr) -> Self {
        Self(Some(address.to_canonical()))
    }
}

#[derive(Debug)]
pub struct FairLine<K, T> {
    urgent: VecDeque<T>,
    lanes: HashMap<K, VecDeque<T>>,
    /// Clients with a non-empty lane, in turn order; each at most once.
    turns: VecDeque<K>,
    len: usize,
}

impl<K, T> Default for FairLine<K, T> {
    fn default() -> Self {
        Self {
            urgent: VecDeque::new(),
            lanes: HashMap::new(),
            turns: VecDeque::new(),
            len: 0,
        }
    }
}

impl<K: Copy + Eq + Hash, T> FairLine<K, T> {
    /// At the back of `client`'s lane; a client new to the line gets the last turn.
    pub fn push_back(&mut self, client: K, item: T) {
        let lane = self.lanes.entry(client).or_default();
        if lane.is_empty() {
            self.turns.push_back(client);
        }
        lane.push_back(item);
        self.len += 1;
    }

    /// Before everyone.
    pub fn push_front(&mut self, item: T) {
        self.urgent.push_front(item);
        self.len += 1;
    }

    /// What `pop_front` would take.
    pub fn front(&self) -> Option<&T> {
        if let Some(item) = self.urgent.front() {
            return Some(item);
        }
        let client = self.turns.front()?;
        self.lanes.get(client)?.front()
    }

    /// The next item: an urgent one, else the front of the lane whose turn it is; that
    /// client's turn then passes to the next.
    pub fn pop_front(&mut self) -> Option<T> {
        if let Some(item) = self.urgent.pop_front() {
            self.len -= 1;
            return Some(item);
        }
        let client = self.turns.pop_front()?;
        let lane = self.lanes.get_mut(&client)?;
        let item = lane.pop_front();
        if lane.is_empty() {
            self.lanes.remove(&client);
        } else {
            self.turns.push_back(client);
        }
        if item.is_some() {
            self.len -= 1;
        }
        item
    }

    /// Takes up to `max` items for which `wanted` holds, looking at the first
    /// `window` items in the order they would be served (urgent ones, then round by
    /// round across the lanes). The rest keep their places and turns.
    pub fn take_where(
        &mut self,
        window: usize,
        max: usize,
        mut wanted: impl FnMut(&T) -> bool,
    ) -> Vec<T> {
        // (lane, index): lane None = urgent.
        let mut chosen: Vec<(Option<K>, usize)> = Vec::new();
        let mut seen = 0;
        for (index, item) in self.urgent.iter().enumerate() {
            if seen == window || chosen.len() == max {
                break;
            }
            seen += 1;
            if wanted(item) {
                chosen.push((None, index));
            }
        }
        let mut round = 0;
        'rounds: while seen < window && chosen.len() < max {
            let mut any = false;
            for client in &self.turns {
                let Some(item) = self.lanes.get(client).and_then(|lane| lane.get(round)) else {
                    continue;
                };
                any = true;
                if seen == window || chosen.len() == max {
                    break 'rounds;
                }
                seen += 1;
                if wanted(item) {
                    chosen.push((Some(*client), round));
                }
            }
            if !any {
                break;
            }
            round += 1;
        }
        // Remove from the back of each container so earlier indexes stay valid, then
        // restore the service order.
        let mut taken: Vec<(usize, T)> = Vec::with_capacity(chosen.len());
        for (order, (lane, index)) in chosen.iter().enumerate().rev() {
            let item = match lane {
                None => self.urgent.remove(*index),
                Some(client) => self.lanes.get_mut(client).and_then(|l| l.remove(*index)),
            };
            if let Some(item) = item {
                taken.push((order, item));
            }
        }
        self.len -= taken.len();
        let emptied: Vec<K> = self
            .lanes
            .iter()
            .filter(|(_, lane)| lane.is_empty())
            .map(|(client, _)| *client)
            .collect();
        for client in emptied {
            self.lanes.remove(&client);
            self.turns.retain(|c| *c != client);
        }
        taken.sort_by_key(|(order, _)| *order);
        taken.into_iter().map(|(_, item)| item).collect()
    }

    /// `client` now also waits for `item` (an operation of its own queued behind it):
    /// when `item` would be served sooner at the back of `client`'s lane than where it
    /// is, it moves there — so a flood's item on a device another client needs is
    /// served in that client's turn, not at the end of the flood. Returns whether it
    /// moved. Scans the lanes: bounded by the line's length.
    pub fn promote(&mut self, item: &T, client: K) -> bool
    where
        T: PartialEq,
    {
        let target = self.lane_len(&client);
        let found = self.lanes.iter().find_map(|(owner, lane)| {
            lane.iter()
                .position(|queued| queued == item)
                .map(|index| (*owner, index))
        });
        let Some((owner, index)) = found else {
            return false;
        };
        if owner == client || index <= target {
            return false;
        }
        let Some(lane) = self.lanes.get_mut(&owner) else {
            return false;
        };
        // `index > target >= 0`: the owner's lane keeps its front, and its turn.
        let Some(moved) = lane.remove(index) else {
            return false;
        };
        self.len -= 1;
        self.push_back(client, moved);
        true
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn clear(&mut self) {
        self.urgent.clear();
        self.lanes.clear();
        self.turns.clear();
        self.len = 0;
    }

    /// Items in `client`'s lane.
    pub fn lane_len(&self, client: &K) -> usize {
        self.lanes.get(client).map_or(0, VecDeque::len)
    }

    /// Clients with items in the line.
    pub fn clients(&self) -> usize {
        self.turns.len()
    }

    /// How many items would be served before a new item of `client` (pushed now):
    /// the urgent ones, and from each lane at most as many as `client` has ahead of
    /// it plus one (round-robin). Decides whether that item can meet its deadline.
    pub fn ahead_of_new(&self, client: &K) -> usize {
        let own = self.lane_len(client);
        self.urgent.len()
            + own
            + self
                .lanes
                .iter()
                .filter(|(other, _)| *other != client)
                .map(|(_, lane)| lane.len().min(own + 1))
                .sum::<usize>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(line: &mut FairLine<char, u32>) -> Vec<u32> {
        std::iter::from_fn(|| line.pop_front()).collect()
    }

    #[test]
    fn turns_go_round_the_clients_each_in_its_own_order() {
        let mut line = FairLine::default();
        // A floods 1..=5, then B and C send one each.
        for n in 1..=5 {
            line.push_back('A', n);
        }
        line.push_back('B', 10);
        line.push_back('C', 20);
        line.push_back('B', 11);
        assert_eq!(line.len(), 8);
        assert_eq!(line.front(), Some(&1));
        assert_eq!(drain(&mut line), [1, 10, 20, 2, 11, 3, 4, 5]);
        assert!(line.is_empty());
        assert_eq!(line.clients(), 0);
    }

    #[test]
    fn a_newcomer_is_served_within_one_round_however_long_the_flood() {
        let mut line = FairLine::default();
        for n in 0..10_000 {
            line.push_back('F', n);
        }
        // Some of the flood is served meanwhile.
        for _ in 0..3 {
            line.pop_front();
        }
        assert_eq!(line.ahead_of_new(&'G'), 1, "one of F's, then its own turn");
        line.push_back('G', 99);
        let served: Vec<u32> = (0..2).filter_map(|_| line.pop_front()).collect();
        assert_eq!(served, [3, 99]);
    }

    #[test]
    fn urgent_items_go_first_and_keep_the_turns() {
        let mut line = FairLine::default();
        line.push_back('A', 1);
        line.push_back('B', 2);
        line.push_front(7);
        line.push_front(8);
        assert_eq!(line.front(), Some(&8));
        assert_eq!(drain(&mut line), [8, 7, 1, 2]);
    }

    #[test]
    fn taking_matching_items_follows_the_service_order_and_keeps_the_turns() {
        let mut line = FairLine::default();
        for n in [1, 2, 3, 4] {
            line.push_back('A', n);
        }
        for n in [10, 12] {
            line.push_back('B', n);
        }
        line.push_front(100);
        // Even numbers, in service order: 100, 10 (B's first), 2, 12, 4.
        assert_eq!(line.take_where(100, 3, |n| n % 2 == 0), [100, 10, 2]);
        assert_eq!(line.len(), 4);
        // A's turn is still first; B keeps 12.
        assert_eq!(drain(&mut line), [1, 12, 3, 4]);
        // The window bounds the scan.
        for n in 1..=10 {
            line.push_back('A', n);
        }
        assert_eq!(line.take_where(3, 10, |_| true), [1, 2, 3]);
        assert_eq!(line.take_where(100, 10, |n| *n > 8), [9, 10]);
        assert_eq!(drain(&mut line), [4, 5, 6, 7, 8]);
        // A lane emptied by taking loses its turn.
        line.push_back('A', 1);
        line.push_back('B', 2);
        assert_eq!(line.take_where(10, 10, |n| *n == 1), [1]);
        assert_eq!(line.clients(), 1);
        assert_eq!(drain(&mut line), [2]);
    }

    #[test]
    fn the_wait_ahead_of_a_new_item_counts_each_lane_up_to_the_clients_own() {
        let mut line = FairLine::default();
        for n in 0..100 {
            line.push_back('F', n);
        }
        line.push_back('G', 1);
        line.push_front(0);
        // G has 1 queued: its next goes after F's first two, its own one and the urgent.
        assert_eq!(line.ahead_of_new(&'G'), 1 + 1 + 2);
        // F waits behind its whole lane, and G's one.
        assert_eq!(line.ahead_of_new(&'F'), 1 + 100 + 1);
        assert_eq!(line.ahead_of_new(&'H'), 1 + 1 + 1);
        line.clear();
        assert_eq!((line.len(), line.ahead_of_new(&'G')), (0, 0));
    }

    #[test]
    fn an_item_another_client_waits_for_moves_to_its_lane_when_that_is_sooner() {
        let mut line = FairLine::default();
        for n in 1..=5 {
            line.push_back('F', n);
        }
        line.push_back('G', 10);
        // G now needs F's item 4 done first: sooner at the back of G's lane.
        assert!(line.promote(&4, 'G'));
        // G needs F's 1 too: already at the front of F's lane, stays.
        assert!(!line.promote(&1, 'G'));
        assert!(!line.promote(&99, 'G'), "not in the line");
        assert_eq!(line.len(), 6);
        assert_eq!(drain(&mut line), [1, 10, 2, 4, 3, 5]);
    }

    #[test]
    fn client_ids_treat_mapped_ipv4_as_ipv4() {
        let v4: IpAddr = "192.0.2.1".parse().unwrap();
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        assert_eq!(ClientId::address(v4), ClientId::address(mapped));
        assert_ne!(ClientId::address(v4), ClientId::default());
    }
}
