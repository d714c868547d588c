//! The kernels' parallel loops, run on whichever thread team the caller installs.
//!
//! A kernel cuts its work into tasks and hands them to [`for_each_task`] or one of the
//! chunked helpers below; the tasks run on the [`Team`] that [`install`] put in place for the
//! calling thread, and serially when there is none. The crate thus makes no threads of its
//! own: the Python binding installs torch's OpenMP team (whose threads are awake right after
//! a torch op), a rayon pool where torch has no OpenMP, or nothing for small jobs.
//! Every task's result depends on its index only, never on which thread ran it or how many
//! there were, so results are the same on every team.

use std::cell::Cell;

/// Threads that run the tasks of one parallel loop.
pub trait Team: Sync {
    /// Threads a loop is split for.
    fn threads(&self) -> usize;
    /// Calls `task(i)` for every `i` in `0..tasks` and returns when all have returned.
    fn run(&self, tasks: usize, task: &(dyn Fn(usize) + Sync));
}

/// The calling thread alone.
pub struct Serial;

impl Team for Serial {
    fn threads(&self) -> usize {
        1
    }

    fn run(&self, tasks: usize, task: &(dyn Fn(usize) + Sync)) {
        (0..tasks).for_each(task);
    }
}

impl Team for rayon::ThreadPool {
    fn threads(&self) -> usize {
        self.current_num_threads()
    }

    fn run(&self, tasks: usize, task: &(dyn Fn(usize) + Sync)) {
        use rayon::prelude::*;
        self.install(|| (0..tasks).into_par_iter().for_each(task));
    }
}

thread_local! {
    /// The team installed on this thread (lifetime erased; `install` keeps it alive).
    static CURRENT: Cell<Option<*const (dyn Team + 'static)>> = const { Cell::new(None) };
}

/// Runs `work` with its parallel loops on `team`.
pub fn install<R>(team: &dyn Team, work: impl FnOnce() -> R) -> R {
    struct Restore(Option<*const (dyn Team + 'static)>);
    impl Drop for Restore {
        fn drop(&mut self) {
            CURRENT.with(|current| current.set(self.0));
        }
    }
    // SAFETY: only the lifetime is erased; the pointer is removed again (by `Restore`, also
    // on unwinding) before `team`'s borrow ends.
    let erased: *const (dyn Team + 'static) = unsafe { std::mem::transmute(team as *const dyn Team) };
    let _restore = Restore(CURRENT.with(|current| current.replace(Some(erased))));
    work()
}

fn with_team<R>(f: impl FnOnce(&dyn Team) -> R) -> R {
    match CURRENT.with(Cell::get) {
        // SAFETY: set by `install`, whose caller holds the team borrowed while it is set.
        Some(team) => f(unsafe { &*team }),
        None => f(&Serial),
    }
}

/// Threads the current team splits loops for (1 outside `install`).
pub fn threads() -> usize {
    with_team(|team| team.threads())
}

/// Calls `task(i)` for every `i` in `0..tasks` on the current team.
pub fn for_each_task(tasks: usize, task: impl Fn(usize) + Sync) {
    if tasks <= 1 {
        (0..tasks).for_each(task);
    } else {
        with_team(|team| team.run(tasks, &task));
    }
}

/// A slice that tasks write in disjoint chunks.
struct Chunks<T> {
    ptr: *mut T,
    len: usize,
    chunk: usize,
}

// SAFETY: tasks only reach the elements through `get`, whose chunks never overlap.
unsafe impl<T: Send> Sync for Chunks<T> {}

impl<T> Chunks<T> {
    fn new(data: &mut [T], chunk: usize) -> Self {
        Chunks { ptr: data.as_mut_ptr(), len: data.len(), chunk: chunk.max(1) }
    }

    fn count(&self) -> usize {
        self.len.div_ceil(self.chunk)
    }

    /// # Safety
    /// Each `i` below `count()` must be passed by one task only, while the slice is borrowed.
    #[allow(clippy::mut_from_ref)]
    unsafe fn get(&self, i: usize) -> &mut [T] {
        let start = i * self.chunk;
        std::slice::from_raw_parts_mut(self.ptr.add(start), self.chunk.min(self.len - start))
    }
}

/// Calls `f(i, chunk)` for every consecutive `chunk`-long piece of `data` (the last may be
/// shorter), in parallel.
pub fn for_each_chunk_mut<T: Send>(data: &mut [T], chunk: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    let chunks = Chunks::new(data, chunk);
    // SAFETY: task i alone takes chunk i.
    for_each_task(chunks.count(), |i| f(i, unsafe { chunks.get(i) }));
}

/// Like [`for_each_chunk_mut`] over two slices cut into the same number of chunks.
pub fn for_each_chunk_mut2<A: Send, B: Send>(
    a: &mut [A],
    a_chunk: usize,
    b: &mut [B],
    b_chunk: usize,
    f: impl Fn(usize, &mut [A], &mut [B]) + Sync,
) {
    let (a, b) = (Chunks::new(a, a_chunk), Chunks::new(b, b_chunk));
    assert_eq!(a.count(), b.count(), "the two slices must have as many chunks");
    // SAFETY: task i alone takes chunk i of each.
    for_each_task(a.count(), |i| f(i, unsafe { a.get(i) }, unsafe { b.get(i) }));
}

/// `[f(0), f(1), ..., f(tasks - 1)]`, computed in parallel.
pub fn map_tasks<R: Send>(tasks: usize, f: impl Fn(usize) -> R + Sync) -> Vec<R> {
    let mut out: Vec<Option<R>> = (0..tasks).map(|_| None).collect();
    for_each_chunk_mut(&mut out, 1, |i, slot| slot[0] = Some(f(i)));
    out.into_iter().map(|r| r.expect("every task ran")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn pool(threads: usize) -> rayon::ThreadPool {
        rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap()
    }

    #[test]
    fn chunks_cover_the_slice_once_on_every_team() {
        for team in [&Serial as &dyn Team, &pool(3)] {
            for (len, chunk) in [(0, 4), (1, 4), (10, 3), (12, 4), (7, 100)] {
                let mut data = vec![0usize; len];
                install(team, || {
                    for_each_chunk_mut(&mut data, chunk, |i, c| c.iter_mut().for_each(|v| *v += i + 1));
                });
                let want: Vec<usize> = (0..len).map(|j| j / chunk + 1).collect();
                assert_eq!(data, want, "len {len} chunk {chunk}");
            }
        }
    }

    #[test]
    fn two_slices_and_maps() {
        let team = pool(2);
        let (mut a, mut b) = (vec![0u8; 9], vec![0u32; 3]);
        install(&team, || {
            for_each_chunk_mut2(&mut a, 4, &mut b, 1, |i, ca, cb| {
                ca.fill(i as u8 + 1);
                cb[0] = ca.len() as u32;
            })
        });
        assert_eq!(a, [1, 1, 1, 1, 2, 2, 2, 2, 3]);
        assert_eq!(b, [4, 4, 1]);
        assert_eq!(install(&team, || map_tasks(5, |i| i * i)), vec![0, 1, 4, 9, 16]);
    }

    #[test]
    fn the_installed_team_is_used_and_restored() {
        let team = pool(4);
        assert_eq!(threads(), 1);
        let ran = AtomicUsize::new(0);
        install(&team, || {
            assert_eq!(threads(), 4);
            for_each_task(100, |_| {
                ran.fetch_add(1, Ordering::Relaxed);
            });
            install(&Serial, || assert_eq!(threads(), 1));
            assert_eq!(threads(), 4);
        });
        assert_eq!((ran.into_inner(), threads()), (100, 1));
        let unwound = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| install(&team, || panic!("inside"))));
        assert!(unwound.is_err());
        assert_eq!(threads(), 1);
    }
}
