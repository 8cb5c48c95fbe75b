//! Concurrency and bandwidth limits for fetches.

use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// Bounds how many range requests run at once.
///
/// Background (prefetch) fetches leave one slot free when there is more than one, so that a read a
/// process is blocked on never queues behind a whole batch of prefetches.
pub struct FetchSlots {
    free: Mutex<usize>,
    cond: Condvar,
    reserve: usize,
}

/// A held slot; released on drop.
pub struct Slot<'a>(&'a FetchSlots);

impl FetchSlots {
    /// `total` slots (at least one).
    pub fn new(total: usize) -> FetchSlots {
        let total = total.max(1);
        FetchSlots {
            free: Mutex::new(total),
            cond: Condvar::new(),
            reserve: usize::from(total > 1),
        }
    }

    /// Waits for a slot; `background` ones do not take the reserved slot.
    pub fn acquire(&self, background: bool) -> Slot<'_> {
        let need = if background { self.reserve + 1 } else { 1 };
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        while *free < need {
            free = self.cond.wait(free).unwrap_or_else(|e| e.into_inner());
        }
        *free -= 1;
        Slot(self)
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        *self.0.free.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        self.0.cond.notify_all();
    }
}

/// A token bucket in bytes per second; 0 means unlimited.
///
/// The bucket holds at most one second of tokens. A take larger than what is there leaves the balance
/// negative and sleeps until it is paid back, so chunks larger than the rate still pass, at the rate.
pub struct TokenBucket {
    rate: u64,
    state: Mutex<(f64, Instant)>,
}

impl TokenBucket {
    /// A bucket refilling at `rate` bytes per second (0 = no limit), starting full.
    pub fn new(rate: u64) -> TokenBucket {
        TokenBucket {
            rate,
            state: Mutex::new((rate as f64, Instant::now())),
        }
    }

    /// How long a caller must wait before sending `bytes`; the tokens are taken now.
    pub fn reserve(&self, bytes: u64) -> Duration {
        if self.rate == 0 {
            return Duration::ZERO;
        }
        let rate = self.rate as f64;
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let (tokens, last) = &mut *state;
        *tokens = (*tokens + now.duration_since(*last).as_secs_f64() * rate).min(rate);
        *last = now;
        *tokens -= bytes as f64;
        if *tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-*tokens / rate)
        }
    }

    /// Takes `bytes` tokens, sleeping as long as the rate requires.
    pub fn take(&self, bytes: u64) {
        let wait = self.reserve(bytes);
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unlimited_bucket_never_waits() {
        let b = TokenBucket::new(0);
        assert_eq!(b.reserve(u64::MAX), Duration::ZERO);
    }

    #[test]
    fn bucket_paces_to_the_rate() {
        let b = TokenBucket::new(1000);
        assert_eq!(b.reserve(1000), Duration::ZERO);
        let wait = b.reserve(500);
        assert!(
            wait > Duration::from_millis(400) && wait <= Duration::from_millis(500),
            "{wait:?}"
        );
        let wait = b.reserve(2000);
        assert!(wait > Duration::from_millis(2400), "{wait:?}");
    }

    #[test]
    fn background_leaves_a_slot_for_reads() {
        let slots = FetchSlots::new(2);
        let _bg = slots.acquire(true);
        // A second background fetch would block here; a demand fetch still gets the reserved slot.
        let _demand = slots.acquire(false);
        assert_eq!(*slots.free.lock().unwrap(), 0);
    }
}
