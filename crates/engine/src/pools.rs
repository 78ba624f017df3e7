//! Thread pools kept per thread count, and workers that poll for work for a while instead of
//! sleeping.
//!
//! On the virtual machines nodes typically run on, waking a sleeping thread costs tens of
//! microseconds: on the 2-core development VM, 26-44 µs per hand-off to a new scoped thread, a
//! channel or a sleeping rayon thread, against about 2 µs to a thread that is polling. That is
//! more than a small model's whole inference. A [`PollingPool`] therefore keeps its threads
//! polling for [`KEEP_POLLING`] after each use, as onnxruntime's spinning thread pool does, so
//! back-to-back inferences never wait for a wake-up.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

/// Most threads one run may use.
pub const MAX_THREADS: usize = 256;

/// Below about 2^17 products (as the executors estimate them from their shapes), a batch runs
/// faster undivided: `vouch-bench engine --threads 2` on the digit CNN, whose rows cost about
/// 6,000 estimated products, gains from 32 rows (about 57 -> 42 µs on the exact path) and loses
/// at 4 (12 -> 15 µs), as handing a block to another thread and joining the blocks costs a few
/// microseconds.
pub(crate) const BLOCK_WORTHY_PRODUCTS: usize = 1 << 17;

/// How a value relates to the batch rows of a program's inputs, when a batch is cut into blocks
/// of rows that run on their own threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Rows {
    /// Axis 0 holds the batch rows: each block computes its own rows.
    Batched,
    /// The same in every block (constants, values that do not depend on batched inputs).
    Shared,
}

/// The row ranges, in order, of the blocks that a batch of `rows` rows is cut into on `threads`
/// threads, or `None` to run it undivided: on one thread, for one row, or below `min_products`
/// estimated products for the whole batch.
pub(crate) fn row_blocks(
    rows: usize,
    threads: usize,
    products_per_row: usize,
    min_products: usize,
) -> Option<Vec<Range<usize>>> {
    if threads < 2 || rows < 2 || products_per_row.saturating_mul(rows) < min_products {
        return None;
    }
    let blocks = threads.min(rows).min(MAX_THREADS);
    Some(
        (0..blocks)
            .map(|b| rows * b / blocks..rows * (b + 1) / blocks)
            .collect(),
    )
}

/// Pools kept, one per thread count recently asked for (a caller asking for ever new counts
/// cannot make the process hold more threads than this many pools).
const KEPT_POOLS: usize = 4;

/// How long a pool's threads keep polling for work after it was last used.
pub(crate) const KEEP_POLLING: Duration = Duration::from_millis(1);

/// Values made per thread count, kept for the [`KEPT_POOLS`] counts used last.
#[derive(Debug)]
pub(crate) struct PerThreadCount<T> {
    /// Most recently used last.
    kept: Mutex<Vec<(usize, T)>>,
}

impl<T> Default for PerThreadCount<T> {
    fn default() -> Self {
        Self {
            kept: Mutex::new(Vec::new()),
        }
    }
}

impl<T: Clone> PerThreadCount<T> {
    /// The value kept for `threads`, made by `make` when there is none.
    pub(crate) fn get<E>(&self, threads: usize, make: impl FnOnce() -> Result<T, E>) -> Result<T, E> {
        // Losing or reordering kept pools only costs speed, so a lock poisoned by a panicking
        // caller is still safe to use.
        let mut kept = self.kept.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(index) = kept.iter().position(|(count, _)| *count == threads) {
            let entry = kept.remove(index);
            let value = entry.1.clone();
            kept.push(entry);
            return Ok(value);
        }
        let value = make()?;
        if kept.len() == KEPT_POOLS {
            kept.remove(0);
        }
        kept.push((threads, value.clone()));
        Ok(value)
    }

    /// The counts kept, most recently used last.
    #[cfg(test)]
    pub(crate) fn counts(&self) -> Vec<usize> {
        self.kept
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(count, _)| *count)
            .collect()
    }
}

/// A rayon pool whose threads poll for work for [`KEEP_POLLING`] after each use.
#[derive(Debug)]
pub(crate) struct PollingPool {
    pool: rayon::ThreadPool,
    started: Instant,
    /// Nanoseconds after `started` until which the threads keep polling.
    poll_until_ns: AtomicU64,
    /// Threads now polling.
    polling: AtomicUsize,
}

impl PollingPool {
    /// A pool of `threads` threads named `name-N`.
    pub(crate) fn new(name: &'static str, threads: usize) -> Result<Arc<Self>, rayon::ThreadPoolBuildError> {
        let pool = rayon::ThreadPoolBuilder::new()
            .thread_name(move |index| format!("{name}-{index}"))
            .num_threads(threads)
            .build()?;
        Ok(Arc::new(Self {
            pool,
            started: Instant::now(),
            poll_until_ns: AtomicU64::new(0),
            polling: AtomicUsize::new(0),
        }))
    }

    /// The pool itself.
    pub(crate) fn pool(&self) -> &rayon::ThreadPool {
        &self.pool
    }

    fn now_ns(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// Keeps every thread of the pool polling for work for [`KEEP_POLLING`] from now. A polling
    /// thread runs the jobs that arrive meanwhile itself, through `rayon::yield_now`.
    /// A pool that, with the caller's thread, has more threads than the machine has cores does
    /// not poll: its pollers would take the cores the work needs.
    pub(crate) fn keep_polling(self: &Arc<Self>) {
        // Asked once: the standard library reads cgroup files to answer.
        static CORES: OnceLock<usize> = OnceLock::new();
        let cores = *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        if self.pool.current_num_threads() >= cores {
            return;
        }
        let until = self.now_ns().saturating_add(KEEP_POLLING.as_nanos() as u64);
        self.poll_until_ns.fetch_max(until, Ordering::AcqRel);
        // One poller per thread at most: a poller would otherwise run the next one through
        // `yield_now`, nesting them.
        while self
            .polling
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.pool.current_num_threads()).then_some(n + 1)
            })
            .is_ok()
        {
            let pool = Arc::clone(self);
            self.pool.spawn(move || {
                while pool.now_ns() < pool.poll_until_ns.load(Ordering::Acquire) {
                    if rayon::yield_now() != Some(rayon::Yield::Executed) {
                        std::hint::spin_loop();
                    }
                }
                pool.polling.fetch_sub(1, Ordering::AcqRel);
            });
        }
    }
}

/// Counts a finished task when dropped.
struct Finished<'a>(&'a AtomicUsize);

impl Drop for Finished<'_> {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::AcqRel);
    }
}

/// Runs `tasks` and returns their results in order: the first on the caller's thread, the
/// others on a polling pool (one per count of other tasks, kept for the process), the caller
/// polling for them rather than sleeping. Should the pool's threads fail to start, the caller runs every task.
pub(crate) fn run_polling<T: Send + Sync, F: FnOnce() -> T + Send>(tasks: Vec<F>) -> Vec<T> {
    static POOLS: OnceLock<PerThreadCount<Arc<PollingPool>>> = OnceLock::new();
    let workers = tasks.len().saturating_sub(1);
    let pool = match workers {
        0 => None,
        _ => POOLS
            .get_or_init(PerThreadCount::default)
            .get(workers, || PollingPool::new("vouch-worker", workers))
            .ok(),
    };
    let Some(pool) = pool else {
        return tasks.into_iter().map(|task| task()).collect();
    };
    let mut tasks = tasks.into_iter();
    let Some(first_task) = tasks.next() else {
        return Vec::new();
    };
    let results: Vec<OnceLock<T>> = (0..workers).map(|_| OnceLock::new()).collect();
    let finished = AtomicUsize::new(0);
    let first = pool.pool().in_place_scope(|scope| {
        for (slot, task) in results.iter().zip(tasks) {
            let finished = &finished;
            scope.spawn(move |_| {
                // Counted even if the task panics (the scope then passes the panic on), so the
                // wait below always ends.
                let _finished = Finished(finished);
                let _ = slot.set(task());
            });
        }
        let first = first_task();
        // A caller that is itself one of the pool's threads (a task dividing its work again)
        // runs the tasks it queued, which no other thread may be free to take.
        let in_a_pool = rayon::current_thread_index().is_some();
        while finished.load(Ordering::Acquire) < workers {
            if !in_a_pool || rayon::yield_local() != Some(rayon::Yield::Executed) {
                std::hint::spin_loop();
            }
        }
        first
    });
    pool.keep_polling();
    std::iter::once(first)
        .chain(results.into_iter().filter_map(OnceLock::into_inner))
        .collect()
}

/// Runs `work` on every part, on up to `threads` threads (the caller's among them), each
/// thread taking the next part no thread has taken yet, so that a thread that starts late or
/// runs slow takes fewer parts instead of holding the others up. Returns the first error a
/// part gave, once every thread has stopped.
pub(crate) fn run_parts<P: Send, E: Send + Sync>(
    parts: Vec<P>,
    threads: usize,
    work: impl Fn(P) -> Result<(), E> + Sync,
) -> Result<(), E> {
    let threads = threads.min(parts.len()).min(MAX_THREADS);
    if threads < 2 {
        return parts.into_iter().try_for_each(work);
    }
    let queue = Mutex::new(parts.into_iter());
    let (queue, work) = (&queue, &work);
    let tasks: Vec<_> = (0..threads)
        .map(|_| {
            move || loop {
                // A task that panicked while holding the lock left the queue whole.
                let next = queue.lock().unwrap_or_else(PoisonError::into_inner).next();
                match next {
                    Some(part) => work(part)?,
                    None => return Ok(()),
                }
            }
        })
        .collect();
    run_polling(tasks).into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_counts_used_last_are_kept() {
        let kept = PerThreadCount::default();
        for threads in 2..=9 {
            kept.get(threads, || Ok::<_, ()>(threads * 10)).expect("made");
        }
        assert_eq!(kept.get(6, || Err(())), Ok(60), "kept, not made again");
        assert_eq!(
            kept.counts(),
            vec![7, 8, 9, 6],
            "the counts used last, most recent last"
        );
        assert_eq!(kept.get(2, || Ok::<_, ()>(21)), Ok(21), "forgotten, made again");
    }

    #[test]
    fn a_pool_as_large_as_the_machine_does_not_poll() {
        // With the caller, its threads would outnumber the cores the work needs.
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let pool = PollingPool::new("vouch-test", cores).expect("pool");
        pool.keep_polling();
        assert_eq!(pool.polling.load(Ordering::Acquire), 0);
    }

    #[test]
    fn every_part_runs_once_and_the_first_error_is_returned() {
        for threads in [1, 2, 3, 8] {
            let done: Vec<AtomicUsize> = (0..20).map(|_| AtomicUsize::new(0)).collect();
            let outcome = run_parts((0..20).collect(), threads, |p: usize| {
                done[p].fetch_add(1, Ordering::AcqRel);
                Ok::<(), String>(())
            });
            assert_eq!(outcome, Ok(()));
            assert!(done.iter().all(|d| d.load(Ordering::Acquire) == 1), "on {threads}");
            let failed = run_parts((0..20).collect(), threads, |p: usize| match p {
                7 => Err(format!("part {p}")),
                _ => Ok(()),
            });
            assert_eq!(failed, Err("part 7".to_string()), "on {threads}");
        }
    }

    #[test]
    fn polling_threads_run_jobs_and_stop_polling() {
        let pool = PollingPool::new("vouch-test", 1).expect("pool");
        pool.keep_polling();
        pool.keep_polling();
        assert!(
            pool.polling.load(Ordering::Acquire) <= 1,
            "one poller per thread at most"
        );
        let sum = AtomicUsize::new(0);
        pool.pool().in_place_scope(|scope| {
            for i in 1..=10 {
                let sum = &sum;
                scope.spawn(move |_| {
                    sum.fetch_add(i, Ordering::AcqRel);
                });
            }
        });
        assert_eq!(sum.load(Ordering::Acquire), 55);
        let squares = run_polling((0..5).map(|i| move || i * i).collect());
        assert_eq!(squares, vec![0, 1, 4, 9, 16], "results in the tasks' order");
        // A task dividing its own work again, on the same one-thread pool as the outer tasks:
        // the pool's thread waits for tasks only it can run, so it must run them itself.
        let nested = run_polling(
            (0..2)
                .map(|i| move || run_polling((0..2).map(|j| move || 10 * i + j).collect()))
                .collect(),
        );
        assert_eq!(nested, vec![vec![0, 1], vec![10, 11]]);
        let deadline = Instant::now() + Duration::from_secs(10);
        while pool.polling.load(Ordering::Acquire) > 0 {
            assert!(Instant::now() < deadline, "pollers stop once their time is over");
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}
