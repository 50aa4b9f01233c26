//! The writer thread's CPU priority.
//!
//! On a busy core the writer's batches (a few milliseconds of CPU each) delay the requests
//! that share the core: at 5,000 cache hits/s on one core the p99 rose from ~0.5 ms to
//! ~2.4 ms, and at the cache-hit peak throughput fell to ~0.70×. Lowering the writer's nice
//! value did not help (the scheduler still lets it finish its slice); `SCHED_IDLE` does: a
//! request's thread takes the core the moment it wakes (p99 back within noise of no
//! history; 0.94–0.97× at the peak). The price is that a saturated machine leaves the
//! writer almost no CPU, so its queue fills and records are dropped (counted and alerted
//! on): the product's rule is that recording does not slow or fail requests.
//! `Normal` shares the CPU fairly instead, for sites that prefer a complete history to
//! peak throughput.

use std::fmt;

use serde::Deserialize;

/// `[history] writer_priority` (`"idle"` or `"normal"` in the config file).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WriterPriority {
    /// Run only when no request needs the CPU (Linux `SCHED_IDLE`).
    #[default]
    Idle,
    /// The scheduler's normal fair share.
    Normal,
}

impl WriterPriority {
    pub fn as_str(self) -> &'static str {
        match self {
            WriterPriority::Idle => "idle",
            WriterPriority::Normal => "normal",
        }
    }
}

impl fmt::Display for WriterPriority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Give the calling thread `priority`. Linux only; elsewhere `Idle` is not available and
/// the thread keeps its normal priority.
pub fn apply_to_current_thread(priority: WriterPriority) -> std::io::Result<()> {
    match priority {
        WriterPriority::Normal => Ok(()),
        WriterPriority::Idle => set_idle_policy(),
    }
}

/// Back to the normal policy, for the final flush on shutdown: a busy neighbour process
/// must not starve it. Linux lets only privileged threads (`CAP_SYS_NICE`, or a
/// `RLIMIT_NICE` of at least 20) leave `SCHED_IDLE`; otherwise this fails and the flush
/// runs at idle priority, on a machine the stopping gateway no longer keeps busy.
pub fn restore_normal_on_current_thread() -> std::io::Result<()> {
    set_policy(Policy::Normal)
}

fn set_idle_policy() -> std::io::Result<()> {
    set_policy(Policy::Idle)
}

enum Policy {
    Idle,
    Normal,
}

#[cfg(target_os = "linux")]
fn set_policy(policy: Policy) -> std::io::Result<()> {
    let policy = match policy {
        Policy::Idle => libc::SCHED_IDLE,
        Policy::Normal => libc::SCHED_OTHER,
    };
    let parameters = libc::sched_param { sched_priority: 0 };
    // SAFETY: pid 0 names the calling thread (Linux schedules threads), and `parameters`
    // is a valid sched_param that outlives the call.
    let result = unsafe { libc::sched_setscheduler(0, policy, &parameters) };
    if result == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
fn set_policy(policy: Policy) -> std::io::Result<()> {
    match policy {
        Policy::Normal => Ok(()),
        Policy::Idle => Err(std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            "SCHED_IDLE is Linux-only",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_is_idle_and_names_print() {
        assert_eq!(WriterPriority::default(), WriterPriority::Idle);
        assert_eq!(WriterPriority::Idle.to_string(), "idle");
        assert_eq!(WriterPriority::Normal.to_string(), "normal");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn idle_puts_only_the_calling_thread_in_sched_idle() {
        // SAFETY: sched_getscheduler(0) only reads the calling thread's policy.
        let policy = || unsafe { libc::sched_getscheduler(0) };
        let (idle, normal) = std::thread::spawn(move || {
            let normal = std::thread::spawn(move || {
                apply_to_current_thread(WriterPriority::Normal).expect("normal");
                policy()
            });
            apply_to_current_thread(WriterPriority::Idle).expect("SCHED_IDLE");
            let idle = policy();
            // Leaving SCHED_IDLE needs privilege: done as root, refused (EPERM) otherwise.
            match restore_normal_on_current_thread() {
                Ok(()) => assert_eq!(policy(), libc::SCHED_OTHER),
                Err(error) => assert_eq!(error.raw_os_error(), Some(libc::EPERM), "{error}"),
            }
            (idle, normal.join().expect("thread"))
        })
        .join()
        .expect("thread");
        assert_eq!(idle, libc::SCHED_IDLE);
        assert_eq!(normal, libc::SCHED_OTHER);
        assert_eq!(policy(), libc::SCHED_OTHER, "the test thread is untouched");
    }
}
