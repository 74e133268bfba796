//! The sagas this node wrote last, as it wrote them. A reply (or event) for one of them is decided
//! on this copy instead of reading the row, and written under the same guard as after a read:
//! only if the row is still at the version this node wrote (`store::Guard`). If another node, an
//! operator action or a timer changed it since, the write changes nothing and the saga is read
//! and decided again, so the copy saves a read when it is current and costs one statement when
//! it is not. Settled sagas are forgotten; beyond [`CAPACITY`] sagas, arbitrary ones are.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use sagas::{SagaId, SagaState};

use crate::store::Instance;

/// Most sagas kept (a few kB each, for sagas with small data).
pub(crate) const CAPACITY: usize = 10_000;

/// The copies, shared by the clones of an engine. Off until [`Recent::enable`]: an engine that
/// only starts sagas (a client) never applies a reply and keeps nothing.
#[derive(Clone, Default)]
pub(crate) struct Recent {
    on: Arc<AtomicBool>,
    sagas: Arc<Mutex<HashMap<SagaId, (Instance, i64)>>>,
}

impl Recent {
    /// Keep copies from now on.
    pub(crate) fn enable(&self) {
        self.on.store(true, Ordering::Release);
    }

    /// Take saga `id`'s copy and the row version it was written at, if kept: the caller puts it
    /// back once written ([`Self::keep`]), so a write that fails leaves no copy behind.
    pub(crate) fn take(&self, id: SagaId) -> Option<(Instance, i64)> {
        self.lock().remove(&id)
    }

    /// Keep `state` as its saga's row at `version`; a settled saga is forgotten instead.
    pub(crate) fn keep(&self, state: SagaState, traceparent: Option<String>, version: i64) {
        if !self.on.load(Ordering::Acquire) {
            return;
        }
        let mut sagas = self.lock();
        if state.status.is_settled() {
            sagas.remove(&state.id);
            return;
        }
        if sagas.len() >= CAPACITY
            && !sagas.contains_key(&state.id)
            && let Some(evicted) = sagas.keys().next().copied()
        {
            sagas.remove(&evicted);
        }
        sagas.insert(state.id, (Instance { state, traceparent }, version));
    }

    /// Forget saga `id` (it is being written some other way).
    pub(crate) fn forget(&self, id: SagaId) {
        self.lock().remove(&id);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SagaId, (Instance, i64)>> {
        self.sagas.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use sagas::{SagaStatus, Timestamp};

    use super::*;

    fn state(status: SagaStatus) -> SagaState {
        SagaState {
            id: SagaId::new(),
            definition: "d".into(),
            version: 1,
            status,
            data: serde_json::Value::Null,
            node: 0,
            steps: Vec::new(),
            completed: Vec::new(),
            compensation: None,
            past_pivot: false,
            failure: None,
            stop: None,
            created_at: Timestamp(0),
            updated_at: Timestamp(0),
            deadline_at: None,
            priority: 0,
            parent: None,
        }
    }

    #[test]
    fn keeps_running_sagas_within_capacity_and_forgets_settled_ones() {
        let recent = Recent::default();
        let running = state(SagaStatus::Running);
        recent.keep(running.clone(), None, 7);
        assert!(recent.take(running.id).is_none(), "nothing is kept until enabled");

        recent.enable();
        recent.keep(running.clone(), Some("t".into()), 7);
        let (copy, version) = recent.take(running.id).expect("kept");
        assert_eq!((copy.state.id, copy.traceparent.as_deref(), version), (running.id, Some("t"), 7));
        assert!(recent.take(running.id).is_none(), "taken");

        recent.keep(running.clone(), None, 8);
        let mut done = running.clone();
        done.status = SagaStatus::Completed;
        recent.keep(done, None, 9);
        assert!(recent.take(running.id).is_none(), "a settled saga is forgotten");

        for _ in 0..CAPACITY + 10 {
            recent.keep(state(SagaStatus::Running), None, 1);
        }
        assert_eq!(recent.len(), CAPACITY, "never more than the capacity");
        let last = state(SagaStatus::Running);
        recent.keep(last.clone(), None, 2);
        recent.forget(last.id);
        assert!(recent.take(last.id).is_none(), "forgotten");
    }
}
