//! Which serving worker the current thread is.
//!
//! Each serving worker is a thread with its own event loop (see `server`). State that every
//! request touches and that need not be shared (the upstream connections) keeps one share per
//! worker, picked by this index, so two workers never contend for it.

use std::cell::Cell;

thread_local! {
    static INDEX: Cell<usize> = const { Cell::new(0) };
}

/// Marks this thread as serving worker `index`. Other threads (the admin listener, tests) count
/// as worker 0.
pub fn set_index(index: usize) {
    INDEX.with(|i| i.set(index));
}

/// This thread's worker index.
pub fn index() -> usize {
    INDEX.with(Cell::get)
}
