//! Named stop points for the fault tests: a test runs a service as a process of its own
//! (`tests/src/bin/mui-service.rs`) with `MUI_STOP_AT=<point>[,<point>…]`, waits for the
//! process to say it reached the point (`FailPointReached point=<name>` on stderr), and kills
//! it there with SIGKILL, so a crash lands exactly in the window the test is about.
//!
//! Compiled in only with this crate's `failpoints` feature, which only the tests crate turns
//! on: without it [`stop`] is an empty function and [`configure_from_env`] does nothing, so
//! the services' own binaries carry no stop point (build them with `-p`, as
//! `scripts/run.sh` and the deploy notes do). Configuring is per process (the `fail` crate's
//! registry is process-global), which is why the tests use it only in child processes and
//! never in the services they run in-process side by side.
//!
//! The points, in the order a file meets them:
//!
//! | point | where |
//! | --- | --- |
//! | `ingest.after_register` | the file is registered (and checked), none of its chunks queued yet |
//! | `ingest.before_archive` | every chunk queued or published, the file not yet moved to `bak/` |
//! | `ingest.after_archive` | the file moved into `bak/`, that not yet recorded |
//! | `worker.mid_copy` | a chunk's `COPY` into the staging table started, its rows being sent |
//! | `worker.after_commit` | a chunk's transaction committed, its delivery not yet acknowledged |
//! | `notifier.after_accept` | the SMTP server accepted the report (250), the `sent` mark not yet written |

/// The environment variable naming the points to stop at.
pub const ENV: &str = "MUI_STOP_AT";

/// The line a process writes (to stderr) when it stops at `point`.
pub fn reached_line(point: &str) -> String {
    format!("FailPointReached point={point}")
}

/// Stops here for good if this process was told to stop at `point` (see the module docs):
/// says so on stderr and blocks the calling thread until the process is killed. Does
/// nothing otherwise, and nothing at all without the `failpoints` feature.
#[inline(always)]
pub fn stop(point: &'static str) {
    #[cfg(feature = "failpoints")]
    fail::fail_point!(point);
    #[cfg(not(feature = "failpoints"))]
    let _ = point;
}

/// Arms the points named in [`ENV`] (comma-separated). Called by the tests' `mui-service`
/// only; a build without the `failpoints` feature ignores the variable.
pub fn configure_from_env() -> Result<(), String> {
    #[cfg(feature = "failpoints")]
    if let Ok(points) = std::env::var(ENV) {
        for point in points.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let line = reached_line(point);
            fail::cfg_callback(point, move || {
                use std::io::Write;
                let mut err = std::io::stderr().lock();
                let _ = writeln!(err, "{line}");
                let _ = err.flush();
                drop(err);
                // Held here until SIGKILL: nothing after the point runs in this thread.
                loop {
                    std::thread::park();
                }
            })
            .map_err(|e| format!("{ENV}: stop point {point:?}: {e}"))?;
        }
    }
    Ok(())
}
