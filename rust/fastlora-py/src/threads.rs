//! Which threads run the kernels' parallel loops (`fastlora_core::parallel`).
//!
//! Where torch runs on OpenMP (the PyPI wheels: `libgomp` in `torch/lib`), the loops run on
//! torch's own OpenMP team through the runtime's `GOMP_parallel` entry point, so a kernel
//! called right after a torch op finds those threads awake and spinning instead of
//! competing with them for the cores. The runtime is the one torch already loaded, found by
//! the Python side and opened with `RTLD_NOLOAD` (never a second copy). Elsewhere, and in a
//! forked child, a rayon pool sized by `set_num_threads` runs them; jobs too small to be
//! worth a wake-up run on the calling thread.

use std::ffi::{c_uint, c_void};
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use fastlora_core::parallel::{self, Serial, Team};
use fastlora_core::Error;
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;

/// Jobs costing less than this many element operations (one dequantized element each) run on
/// the calling thread: waking other threads costs more than they would save
/// (benches/CPU_NOTES.md has the measurements). Torch's OpenMP team is usually awake
/// (spinning after torch's last op), so far smaller jobs pay for it than for rayon's
/// sleeping pool.
const INLINE_MAX_OPS: usize = 1 << 18;
const OPENMP_INLINE_MAX_OPS: usize = 1 << 12;
/// Jobs this small (a 64x64 one-row product) run with the GIL held and without looking at
/// the thread setup: releasing and retaking the GIL, the settings lock and the fork check
/// (a `getpid` system call) cost more than the work.
pub const HELD_GIL_MAX_OPS: usize = 1 << 11;

static THREADS: Mutex<usize> = Mutex::new(0);

/// The thread count set by `set_num_threads`, else the cores available (asked once: the
/// question reads cgroup files).
fn threads() -> PyResult<usize> {
    static CORES: OnceLock<usize> = OnceLock::new();
    let wanted = *THREADS.lock().map_err(|_| PyRuntimeError::new_err("thread setting poisoned"))?;
    Ok(if wanted == 0 {
        *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
    } else {
        wanted
    })
}

type GompParallel = unsafe extern "C" fn(extern "C" fn(*mut c_void), *mut c_void, c_uint, c_uint);

/// The OpenMP runtime torch loaded.
struct OpenMpRuntime {
    parallel: GompParallel,
    pid: u32,
    path: String,
    _library: Box<dyn std::any::Any + Send + Sync>,
}

static OPENMP: OnceLock<OpenMpRuntime> = OnceLock::new();

/// Torch's OpenMP team, `threads` wide.
struct OpenMp<'a> {
    runtime: &'a OpenMpRuntime,
    threads: usize,
}

/// What the team's threads share during one loop.
struct Job<'a> {
    task: &'a (dyn Fn(usize) + Sync),
    tasks: usize,
    next: AtomicUsize,
    panic: Mutex<Option<Box<dyn std::any::Any + Send>>>,
}

/// Each thread of the team takes the next task until none is left. A panic must not unwind
/// into the C runtime: it is kept, the remaining tasks are skipped, and the caller rethrows.
extern "C" fn run_tasks(data: *mut c_void) {
    // SAFETY: `data` is the `Job` that `OpenMp::run` keeps alive until GOMP_parallel returns.
    let job = unsafe { &*(data as *const Job<'_>) };
    loop {
        let i = job.next.fetch_add(1, Ordering::Relaxed);
        if i >= job.tasks {
            return;
        }
        if let Err(payload) = catch_unwind(AssertUnwindSafe(|| (job.task)(i))) {
            job.next.store(job.tasks, Ordering::Relaxed);
            if let Ok(mut slot) = job.panic.lock() {
                slot.get_or_insert(payload);
            }
            return;
        }
    }
}

impl Team for OpenMp<'_> {
    fn threads(&self) -> usize {
        self.threads
    }

    fn run(&self, tasks: usize, task: &(dyn Fn(usize) + Sync)) {
        let job = Job { task, tasks, next: AtomicUsize::new(0), panic: Mutex::new(None) };
        let width = self.threads.min(tasks).max(1) as c_uint;
        // SAFETY: GOMP_parallel runs `run_tasks(&job)` on `width` threads (this one included)
        // and returns after all of them have finished.
        unsafe { (self.runtime.parallel)(run_tasks, &job as *const Job<'_> as *mut c_void, width, 0) };
        if let Some(payload) = job.panic.into_inner().ok().flatten() {
            resume_unwind(payload);
        }
    }
}

/// The rayon pool used where there is no OpenMP runtime. Rebuilt when the thread count
/// changes, and in a forked child (whose copy of the parent's pool has no threads behind it).
struct Pool {
    pool: Arc<rayon::ThreadPool>,
    threads: usize,
    pid: u32,
}

static POOL: Mutex<Option<Pool>> = Mutex::new(None);

fn pool(wanted: usize) -> PyResult<Arc<rayon::ThreadPool>> {
    let mut guard = POOL.lock().map_err(|_| PyRuntimeError::new_err("thread pool poisoned"))?;
    let pid = std::process::id();
    if let Some(p) = guard.as_ref() {
        if p.threads == wanted && p.pid == pid {
            return Ok(p.pool.clone());
        }
    }
    if let Some(stale) = guard.take() {
        if stale.pid != pid {
            // Dropping a pool inherited through fork would wait on threads that do not exist.
            std::mem::forget(stale);
        }
    }
    let built = rayon::ThreadPoolBuilder::new()
        .num_threads(wanted)
        .thread_name(|i| format!("fastlora-{i}"))
        .build()
        .map_err(|e| PyRuntimeError::new_err(format!("cannot start {wanted} threads: {e}")))?;
    let built = Arc::new(built);
    *guard = Some(Pool { pool: built.clone(), threads: wanted, pid });
    Ok(built)
}

/// Torch's OpenMP runtime, unless this is a forked child of the process that opened it (an
/// OpenMP team does not survive fork).
fn openmp() -> Option<&'static OpenMpRuntime> {
    OPENMP.get().filter(|runtime| runtime.pid == std::process::id())
}

/// Runs `work` (about `ops` element operations) with the GIL released (tiny jobs keep it), its
/// parallel loops on the calling thread (small jobs), torch's OpenMP team, or the rayon pool.
pub fn run<R: Send>(py: Python<'_>, ops: usize, work: impl FnOnce() -> Result<R, Error> + Send) -> PyResult<R> {
    let to_py = |err: Error| PyValueError::new_err(err.to_string());
    if ops < HELD_GIL_MAX_OPS {
        return parallel::install(&Serial, work).map_err(to_py);
    }
    let wanted = threads()?;
    let runtime = openmp();
    let inline_max = if runtime.is_some() { OPENMP_INLINE_MAX_OPS } else { INLINE_MAX_OPS };
    if ops < inline_max || wanted == 1 {
        return py.detach(|| parallel::install(&Serial, work)).map_err(to_py);
    }
    if let Some(runtime) = runtime {
        let team = OpenMp { runtime, threads: wanted };
        return py.detach(|| parallel::install(&team, work)).map_err(to_py);
    }
    let team = pool(wanted)?;
    py.detach(|| parallel::install(&*team, work)).map_err(to_py)
}

#[pyfunction]
pub fn set_num_threads(n: usize) -> PyResult<()> {
    *THREADS.lock().map_err(|_| PyRuntimeError::new_err("thread setting poisoned"))? = n;
    Ok(())
}

#[pyfunction]
pub fn get_num_threads() -> PyResult<usize> {
    threads()
}

/// Runs the kernels' loops on the OpenMP team of the runtime at `path`, which must already
/// be loaded in this process (torch's). Only one runtime per process: a second call must
/// name the same one.
#[pyfunction]
pub fn use_openmp(path: &str) -> PyResult<()> {
    if let Some(runtime) = OPENMP.get() {
        return if runtime.path == path {
            Ok(())
        } else {
            Err(PyValueError::new_err(format!("already using the OpenMP runtime {}", runtime.path)))
        };
    }
    let (library, parallel) = open_runtime(path).map_err(PyValueError::new_err)?;
    let runtime = OpenMpRuntime { parallel, pid: std::process::id(), path: path.to_owned(), _library: library };
    let _ = OPENMP.set(runtime);
    Ok(())
}

#[cfg(unix)]
fn open_runtime(path: &str) -> Result<(Box<dyn std::any::Any + Send + Sync>, GompParallel), String> {
    use libloading::os::unix::Library;
    // SAFETY: RTLD_NOLOAD opens nothing new: it finds a library already loaded (and
    // initialized) in the process, or fails.
    let library = unsafe { Library::open(Some(path), libc::RTLD_NOW | libc::RTLD_NOLOAD) }
        .map_err(|e| format!("{path}: not an OpenMP runtime loaded in this process ({e})"))?;
    // SAFETY: GOMP_parallel has this signature in every runtime that exports it (libgomp,
    // and the GNU-compatible entry points of LLVM's libomp and Intel's libiomp5).
    let parallel = unsafe { library.get::<GompParallel>(b"GOMP_parallel\0") }
        .map(|symbol| *symbol)
        .map_err(|e| format!("{path}: has no GOMP_parallel ({e})"))?;
    Ok((Box::new(library), parallel))
}

#[cfg(not(unix))]
fn open_runtime(path: &str) -> Result<(Box<dyn std::any::Any + Send + Sync>, GompParallel), String> {
    Err(format!("{path}: torch's OpenMP team is used on Unix only"))
}

/// "openmp" when the loops run on torch's OpenMP team, else "rayon".
#[pyfunction]
pub fn thread_pool() -> &'static str {
    if openmp().is_some() {
        "openmp"
    } else {
        "rayon"
    }
}
