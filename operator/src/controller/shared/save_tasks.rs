//! The node saves running in this process (a bounded set, shared by the context).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The node saves running in this process: bounded by a semaphore
/// (`--max-concurrent-saves`), tracked by NodeSave uid.
#[derive(Debug)]
pub struct SaveTasks {
    slots: Arc<Semaphore>,
    limit: usize,
    running: Arc<Mutex<HashSet<String>>>,
}

/// A save slot: holds one permit and the uid's place in [`SaveTasks`];
/// dropping it (the task ended, however) frees both.
#[derive(Debug)]
pub struct SaveSlot {
    _permit: OwnedSemaphorePermit,
    uid: String,
    running: Arc<Mutex<HashSet<String>>>,
}

impl Drop for SaveSlot {
    fn drop(&mut self) {
        if let Ok(mut running) = self.running.lock() {
            running.remove(&self.uid);
        }
    }
}

impl SaveTasks {
    /// Room for `limit` saves at once (at least one).
    pub fn new(limit: usize) -> Self {
        let limit = limit.max(1);
        Self {
            slots: Arc::new(Semaphore::new(limit)),
            limit,
            running: Arc::new(Mutex::new(HashSet::new())),
        }
    }

    /// Whether a save of NodeSave `uid` runs in this process.
    pub fn is_running(&self, uid: &str) -> bool {
        self.running.lock().is_ok_and(|running| running.contains(uid))
    }

    /// Takes a slot for `uid`, or `None` when all are busy (or it runs already).
    pub fn try_start(&self, uid: &str) -> Option<SaveSlot> {
        let mut running = self.running.lock().ok()?;
        if running.contains(uid) {
            return None;
        }
        let permit = self.slots.clone().try_acquire_owned().ok()?;
        running.insert(uid.to_owned());
        Some(SaveSlot {
            _permit: permit,
            uid: uid.to_owned(),
            running: self.running.clone(),
        })
    }

    /// The configured limit.
    pub fn limit(&self) -> usize {
        self.limit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_bounded_and_freed() {
        let tasks = SaveTasks::new(2);
        let a = tasks.try_start("a").expect("slot a");
        assert!(tasks.try_start("a").is_none(), "a runs already");
        let b = tasks.try_start("b").expect("slot b");
        assert!(tasks.try_start("c").is_none(), "only two at once");
        assert!(tasks.is_running("a") && tasks.is_running("b"));
        drop(a);
        assert!(!tasks.is_running("a"));
        let c = tasks.try_start("c").expect("a's slot is free again");
        drop((b, c));
        assert_eq!(SaveTasks::new(0).limit(), 1);
    }
}
