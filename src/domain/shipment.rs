//! Grouping orders into shipments by destination.

use uuid::Uuid;

use super::{Order, OrderId};

/// Orders that leave together for one destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shipment {
    pub id: Uuid,
    pub destination: String,
    pub orders: Vec<Order>,
}

/// Orders for one destination, ready to ship together.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub destination: String,
    pub order_ids: Vec<OrderId>,
}

/// Collects orders per destination and hands out a batch as soon as a destination has `batch_size`.
#[derive(Debug)]
pub struct ShipmentBatches {
    batch_size: usize,
    /// Open batches in the order their destination first appeared, so flushing is deterministic.
    open: Vec<Batch>,
}

impl ShipmentBatches {
    pub fn new(batch_size: usize) -> Self {
        Self {
            batch_size: batch_size.max(1),
            open: Vec::new(),
        }
    }

    /// Whether `id` waits in an open batch.
    pub fn contains(&self, id: OrderId) -> bool {
        self.open.iter().any(|batch| batch.order_ids.contains(&id))
    }

    /// Adds an order; returns its destination's batch once it is full.
    pub fn add(&mut self, destination: &str, id: OrderId) -> Option<Batch> {
        let index = match self
            .open
            .iter()
            .position(|batch| batch.destination == destination)
        {
            Some(index) => index,
            None => {
                self.open.push(Batch {
                    destination: destination.to_owned(),
                    order_ids: Vec::with_capacity(self.batch_size),
                });
                self.open.len() - 1
            }
        };
        self.open[index].order_ids.push(id);
        (self.open[index].order_ids.len() >= self.batch_size).then(|| self.open.remove(index))
    }

    /// The batches that never filled up, oldest destination first.
    pub fn flush(self) -> Vec<Batch> {
        self.open
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emits_a_batch_when_a_destination_is_full_and_flushes_the_rest() {
        let ids: Vec<OrderId> = (0..5).map(|_| OrderId::generate()).collect();
        let mut batches = ShipmentBatches::new(2);
        assert_eq!(batches.add("Oslo", ids[0]), None);
        assert_eq!(batches.add("Rome", ids[1]), None);
        assert!(batches.contains(ids[1]));
        let full = batches.add("Oslo", ids[2]).expect("Oslo is full");
        assert_eq!(full.destination, "Oslo");
        assert_eq!(full.order_ids, [ids[0], ids[2]]);
        assert!(!batches.contains(ids[0]));
        assert_eq!(batches.add("Lima", ids[3]), None);
        assert_eq!(batches.add("Oslo", ids[4]), None);

        let rest = batches.flush();
        let destinations: Vec<_> = rest.iter().map(|b| b.destination.as_str()).collect();
        assert_eq!(destinations, ["Rome", "Lima", "Oslo"]);
    }

    #[test]
    fn a_batch_size_of_one_ships_every_order_at_once() {
        let mut batches = ShipmentBatches::new(1);
        assert!(batches.add("Oslo", OrderId::generate()).is_some());
        assert!(batches.flush().is_empty());
    }
}
