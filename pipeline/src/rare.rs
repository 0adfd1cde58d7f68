//! A future that is polled only after it asked to be woken.
//!
//! `select!` polls every branch each time its task wakes. A session's task wakes for every
//! audio frame, and beside the socket it waits on things that almost never happen (shutdown,
//! the idle and duration timers, egress ending): polling those each time (a mutex in the
//! cancellation token, waker registration in the timer and the join handle) cost ~3% of a loaded
//! gateway's CPU. Wrapped in [`Rare`], such a future is polled once, and then only after its
//! own waker fired; in between, a poll is a pointer comparison and an atomic load.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};

/// See the [module](self) documentation.
pub struct Rare<F> {
    inner: Pin<Box<F>>,
    signal: Arc<Signal>,
    /// The waker handed to `inner`: it sets the flag, then wakes the task.
    waker: Waker,
    /// The task's waker last registered, to skip registering it again.
    registered: Option<Waker>,
    /// Poll `inner` at the next poll whatever the flag says.
    due: bool,
}

struct Signal {
    woken: AtomicBool,
    /// The task to wake. Kept (not taken) on a wake-up: the task's waker rarely changes, so
    /// a poll registers it only when it does.
    task: Mutex<Option<Waker>>,
}

impl Signal {
    fn task(&self) -> std::sync::MutexGuard<'_, Option<Waker>> {
        self.task
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Wake for Signal {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        if let Some(task) = self.task().as_ref() {
            task.wake_by_ref();
        }
    }
}

impl<F: Future> Rare<F> {
    pub fn new(inner: F) -> Rare<F> {
        let signal = Arc::new(Signal {
            woken: AtomicBool::new(false),
            task: Mutex::new(None),
        });
        Rare {
            inner: Box::pin(inner),
            waker: Waker::from(Arc::clone(&signal)),
            signal,
            registered: None,
            due: true,
        }
    }

    /// The wrapped future, e.g. to reset a timer; it is polled at the next poll.
    pub fn inner_mut(&mut self) -> Pin<&mut F> {
        self.due = true;
        self.inner.as_mut()
    }
}

impl<F: Future> Future for Rare<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = &mut *self;
        // Registered before the flag is read: a wake-up in between wakes this task.
        if !this
            .registered
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()))
        {
            *this.signal.task() = Some(cx.waker().clone());
            this.registered = Some(cx.waker().clone());
        }
        if !this.due && !this.signal.woken.load(Ordering::Acquire) {
            return Poll::Pending;
        }
        this.due = false;
        this.signal.woken.store(false, Ordering::Release);
        // A wake-up from here on sets the flag again: at worst one poll too many.
        this.inner
            .as_mut()
            .poll(&mut Context::from_waker(&this.waker))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    use super::*;

    /// Counts its polls; ready at the `ready_at`-th.
    struct Counted {
        polls: Arc<AtomicUsize>,
        ready_at: usize,
    }

    impl Future for Counted {
        type Output = ();
        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            let n = self.polls.fetch_add(1, Ordering::Relaxed) + 1;
            if n >= self.ready_at {
                return Poll::Ready(());
            }
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    }

    #[tokio::test]
    async fn polled_once_then_only_after_its_own_wake_up() {
        let polls = Arc::new(AtomicUsize::new(0));
        // A future that never wakes itself: polled exactly once, however often the task wakes.
        let mut quiet = Rare::new(std::future::pending::<()>());
        let mut cx = Context::from_waker(Waker::noop());
        for _ in 0..100 {
            assert!(Pin::new(&mut quiet).poll(&mut cx).is_pending());
        }
        // One that wakes itself at every poll is polled at every poll, until ready.
        let busy = Rare::new(Counted {
            polls: Arc::clone(&polls),
            ready_at: 3,
        });
        busy.await;
        assert_eq!(polls.load(Ordering::Relaxed), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_timer_inside_fires_and_a_reset_one_fires_at_its_new_deadline() {
        let started = tokio::time::Instant::now();
        let mut timer = Rare::new(tokio::time::sleep(Duration::from_millis(50)));
        tokio::select! {
            () = &mut timer => {}
            () = tokio::time::sleep(Duration::from_millis(10)) => {
                timer.inner_mut().reset(started + Duration::from_millis(20));
            }
        }
        (&mut timer).await;
        assert_eq!(started.elapsed(), Duration::from_millis(20));
    }
}
