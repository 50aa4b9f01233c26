//! Password checks on a few threads of their own, never more at once.
//!
//! Argon2 allocates its whole memory cost (19 MiB with the defaults) for every check,
//! and glibc keeps freed memory in the arena of the thread that used it. Checks run on
//! the blocking pool (hundreds of threads) therefore cost up to 19 MiB per thread and
//! keep it: a flood of wrong passwords took the process to gigabytes. Here `threads`
//! dedicated threads do every check, so the memory is `threads` × 19 MiB at most, and a
//! check that finds them all busy is refused at once (the caller answers 503) rather
//! than queued: a wait here would only let a flood pile up.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

/// Every verifier thread is busy: refuse now, the caller may retry shortly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("every password check is busy")]
pub struct Busy;

struct Job {
    password: String,
    hash: String,
    answer: oneshot::Sender<bool>,
}

pub struct Verifier {
    jobs: SyncSender<Job>,
    in_flight: Arc<AtomicUsize>,
    threads: usize,
}

impl Verifier {
    /// `threads` threads, each running a check made by `make_check` — (password,
    /// stored hash) → whether they match, with state (memory) of its own; the threads
    /// end when the verifier is dropped.
    pub fn start<C>(threads: usize, make_check: impl Fn() -> C) -> std::io::Result<Self>
    where
        C: FnMut(&str, &str) -> bool + Send + 'static,
    {
        let threads = threads.max(1);
        // Never more jobs than threads are admitted, so sending never blocks.
        let (jobs, queue) = sync_channel::<Job>(threads);
        let queue = Arc::new(Mutex::new(queue));
        let in_flight = Arc::new(AtomicUsize::new(0));
        for index in 0..threads {
            let queue = queue.clone();
            let in_flight = in_flight.clone();
            let check = make_check();
            std::thread::Builder::new()
                .name(format!("bc-password-{index}"))
                .spawn(move || work(&queue, &in_flight, check))?;
        }
        Ok(Self {
            jobs,
            in_flight,
            threads,
        })
    }

    /// Checks `password` against `hash` on a verifier thread, or `Err(Busy)` at once
    /// when all of them are checking already.
    pub async fn verify(&self, password: String, hash: String) -> Result<bool, Busy> {
        let admitted =
            self.in_flight
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |running| {
                    (running < self.threads).then_some(running + 1)
                });
        if admitted.is_err() {
            return Err(Busy);
        }
        let (answer, matched) = oneshot::channel();
        let job = Job {
            password,
            hash,
            answer,
        };
        if self.jobs.try_send(job).is_err() {
            // The threads are gone (cannot happen while `self` lives): fail closed.
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
            return Ok(false);
        }
        // A dropped answer (a panicking check) is a mismatch.
        Ok(matched.await.unwrap_or(false))
    }

    /// Checks running now.
    #[cfg(test)]
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }
}

fn work(
    queue: &Mutex<Receiver<Job>>,
    in_flight: &AtomicUsize,
    mut check: impl FnMut(&str, &str) -> bool,
) {
    loop {
        let job = {
            let queue = queue
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            match queue.recv() {
                Ok(job) => job,
                // The verifier was dropped.
                Err(_) => return,
            }
        };
        let matched = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            check(&job.password, &job.hash)
        }))
        .unwrap_or(false);
        // Free the place before answering: the caller may send the next check at once.
        in_flight.fetch_sub(1, Ordering::AcqRel);
        let _ = job.answer.send(matched);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::time::{Duration, Instant};

    static RELEASE: AtomicBool = AtomicBool::new(false);

    /// Matches when password == hash, after RELEASE is set.
    fn held_check(password: &str, hash: &str) -> bool {
        let give_up = Instant::now() + Duration::from_secs(10);
        while !RELEASE.load(Ordering::Acquire) && Instant::now() < give_up {
            std::thread::yield_now();
        }
        password == hash
    }

    #[actix_web::test]
    async fn beyond_its_threads_a_check_is_refused_at_once_then_admitted_again() {
        let verifier = Arc::new(Verifier::start(2, || held_check).expect("threads"));
        let running: Vec<_> = (0..2)
            .map(|n| {
                let verifier = verifier.clone();
                actix_web::rt::spawn(async move {
                    verifier.verify(format!("p{n}"), format!("p{n}")).await
                })
            })
            .collect();
        let give_up = Instant::now() + Duration::from_secs(10);
        while verifier.in_flight() < 2 {
            assert!(Instant::now() < give_up, "two checks should be running");
            actix_web::rt::task::yield_now().await;
        }
        // The third is refused without waiting for the two.
        assert_eq!(verifier.verify("x".into(), "x".into()).await, Err(Busy));
        RELEASE.store(true, Ordering::Release);
        for handle in running {
            assert_eq!(handle.await.expect("joined"), Ok(true));
        }
        assert_eq!(verifier.in_flight(), 0);
        assert_eq!(verifier.verify("a".into(), "b".into()).await, Ok(false));
        assert_eq!(verifier.verify("a".into(), "a".into()).await, Ok(true));
    }
}
