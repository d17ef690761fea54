//! The three services running in-process on a test's resources, started and stopped as
//! the binaries run them.

use crate::*;
use mui_shared::files::{FileState, NotifyStatus};
use std::time::Duration;

use mui_shared::service::supervise;
use mui_shared::tenants::Tenant;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The three services running in-process.
#[derive(Debug)]
pub struct App {
    /// The test's resources.
    pub env: TestEnv,
    services: Option<Services>,
}

#[derive(Debug)]
struct Services {
    shutdown: CancellationToken,
    handles: Vec<(&'static str, JoinHandle<anyhow::Result<()>>)>,
}

/// Starts ingest, the workers and the notifier on fresh resources.
pub async fn spawn_app() -> App {
    spawn_app_with(AppOptions::default()).await
}

/// [`spawn_app`] with options.
pub async fn spawn_app_with(options: AppOptions) -> App {
    mui_shared::telemetry::init_for_tests();
    let env = TestEnv::new(options).expect("test resources");
    let mut app = App {
        env,
        services: None,
    };
    app.start();
    app
}

impl App {
    /// Starts (or restarts) the services, each under the supervisor that restarts it after a
    /// failure, as the binaries run them.
    pub fn start(&mut self) {
        assert!(self.services.is_none(), "already running");
        let shutdown = CancellationToken::new();
        let mut handles = Vec::new();
        let ingest = self.env.ingest_config();
        let token = shutdown.clone();
        handles.push((
            "ingest",
            tokio::spawn(async move {
                supervise("mui-ingest", &token, |s| mui_ingest::run(ingest.clone(), s)).await
            }),
        ));
        for _ in 0..self.env.options.workers {
            let worker = self.env.worker_config();
            let token = shutdown.clone();
            handles.push((
                "worker",
                tokio::spawn(async move {
                    supervise("mui-worker", &token, |s| mui_worker::run(worker.clone(), s)).await
                }),
            ));
        }
        let notifier = self.env.notifier_config();
        let token = shutdown.clone();
        handles.push((
            "notifier",
            tokio::spawn(async move {
                supervise("mui-notifier", &token, |s| {
                    mui_notifier::run(notifier.clone(), s)
                })
                .await
            }),
        ));
        self.services = Some(Services { shutdown, handles });
    }

    /// Stops the services gracefully and checks none of them failed.
    pub async fn stop(&mut self) {
        if let Some(s) = self.services.take() {
            s.shutdown.cancel();
            for (name, h) in s.handles {
                match tokio::time::timeout(Duration::from_secs(30), h).await {
                    Ok(Ok(Ok(()))) => {}
                    Ok(Ok(Err(e))) => panic!("{name} failed: {e:#}"),
                    Ok(Err(e)) => panic!("{name} panicked: {e}"),
                    Err(_) => panic!("{name} did not stop within 30s"),
                }
            }
        }
    }

    /// Stops the services at once, as a crash would: their tasks are dropped wherever they
    /// are (open connections close, advisory locks and unacknowledged messages go back).
    pub async fn kill(&mut self) {
        if let Some(s) = self.services.take() {
            for (_, h) in s.handles {
                h.abort();
                let _ = h.await;
            }
            s.shutdown.cancel();
        }
    }

    /// Waits until `count` files of `tenant` are finished and their email handled, whether
    /// or not they were archived (an entry that is not a regular file is left in place).
    pub async fn wait_files_finished(&self, tenant: &Tenant, count: usize) -> Vec<FileRow> {
        let what = format!("{count} file(s) of {} finished and notified", tenant.slug);
        self.env
            .wait_until(120, &what, || {
                let files = self.env.files(tenant);
                files.len() >= count
                    && files.iter().all(|f| {
                        (f.state == FileState::Done || f.state == FileState::Failed)
                            && f.notify_status != NotifyStatus::Pending
                            && f.notify_status != NotifyStatus::Sending
                    })
            })
            .await;
        self.env.files(tenant)
    }

    /// Waits until every file of `tenant` listed is finished and its email handled.
    pub async fn wait_files_settled(&self, tenant: &Tenant, count: usize) -> Vec<FileRow> {
        let env = &self.env;
        // A liveness bound, generous because the whole suite shares two cores.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        loop {
            let files = env.files(tenant);
            let settled = files.len() >= count
                && files.iter().all(|f| {
                    (f.state == FileState::Done || f.state == FileState::Failed)
                        && f.notify_status != NotifyStatus::Pending
                        && f.notify_status != NotifyStatus::Sending
                        && f.archived_name.is_some()
                });
            if settled {
                return files;
            }
            if tokio::time::Instant::now() > deadline {
                panic!(
                    "timed out after 120s waiting for {count} file(s) of {} finished and notified; files now: {files:?}",
                    tenant.slug
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
