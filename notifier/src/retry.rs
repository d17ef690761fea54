//! Retrying a step that failed for a transient reason, with the project's backoff, until it
//! succeeds, the policy runs out or the service stops: used for the status write after a
//! mail was accepted, so that a database blip does not let the claim lapse.

use super::*;

/// Runs `op` until it succeeds, retrying errors `is_transient` accepts with the waits of
/// `policy`; gives up (returning the last error) on any other error, when the policy runs
/// out, or when `stop` is cancelled. `event` names the log line of each retry.
pub async fn retry_transient<T, E, F, Fut>(
    mut policy: impl backoff::backoff::Backoff,
    stop: &CancellationToken,
    is_transient: impl Fn(&E) -> bool,
    event: &'static str,
    mut op: F,
) -> Result<T, E>
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    loop {
        match op().await {
            Ok(v) => return Ok(v),
            Err(e) if is_transient(&e) => {
                let Some(wait) = policy.next_backoff() else {
                    return Err(e);
                };
                tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "{event}");
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = stop.cancelled() => return Err(e),
                }
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn quick() -> backoff::ExponentialBackoff {
        backoff::ExponentialBackoff {
            current_interval: Duration::from_millis(1),
            initial_interval: Duration::from_millis(1),
            max_interval: Duration::from_millis(5),
            max_elapsed_time: Some(Duration::from_secs(30)),
            ..backoff::ExponentialBackoff::default()
        }
    }

    #[derive(Debug)]
    struct Fail(bool); // transient?

    impl std::fmt::Display for Fail {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "fail (transient: {})", self.0)
        }
    }

    #[tokio::test]
    async fn a_write_that_fails_transiently_is_retried_until_it_succeeds() {
        let calls = AtomicUsize::new(0);
        let stop = CancellationToken::new();
        let result = retry_transient(
            quick(),
            &stop,
            |e: &Fail| e.0,
            "Test",
            || async {
                match calls.fetch_add(1, Ordering::SeqCst) {
                    0..=3 => Err(Fail(true)),
                    n => Ok(n),
                }
            },
        )
        .await;
        assert_eq!(result.unwrap(), 4, "succeeded on the fifth call");
        assert_eq!(calls.load(Ordering::SeqCst), 5);
    }

    #[tokio::test]
    async fn a_permanent_error_is_not_retried() {
        let calls = AtomicUsize::new(0);
        let stop = CancellationToken::new();
        let result: Result<(), Fail> = retry_transient(
            quick(),
            &stop,
            |e: &Fail| e.0,
            "Test",
            || async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err(Fail(false))
            },
        )
        .await;
        assert!(matches!(result, Err(Fail(false))));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn retries_end_when_the_policy_runs_out_or_on_stop() {
        let calls = AtomicUsize::new(0);
        let stop = CancellationToken::new();
        let mut policy = quick();
        policy.max_elapsed_time = Some(Duration::from_millis(50));
        let result: Result<(), Fail> = retry_transient(
            policy,
            &stop,
            |e: &Fail| e.0,
            "Test",
            || async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err(Fail(true))
            },
        )
        .await;
        assert!(matches!(result, Err(Fail(true))));
        assert!(calls.load(Ordering::SeqCst) > 1, "retried before giving up");

        stop.cancel();
        let calls = AtomicUsize::new(0);
        let result: Result<(), Fail> = retry_transient(
            quick(),
            &stop,
            |e: &Fail| e.0,
            "Test",
            || async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err(Fail(true))
            },
        )
        .await;
        assert!(result.is_err());
        assert_eq!(calls.load(Ordering::SeqCst), 1, "no retry once stopped");
    }

    #[test]
    fn the_options_have_their_documented_defaults() {
        #[derive(Debug, clap::Parser)]
        struct Cli {
            #[command(flatten)]
            config: NotifierConfig,
        }
        let cli = <Cli as clap::Parser>::try_parse_from(["mui-notifier"]).unwrap();
        let c = cli.config;
        assert_eq!(c.mail_concurrency, 4);
        assert_eq!(c.smtp_timeout_secs, 30);
        assert_eq!(c.mail_limits(), MailLimits::default());
        assert_eq!(c.attach_compress_bytes, 2 * 1024 * 1024);
        assert_eq!(c.max_mail_bytes, 10 * 1024 * 1024);
    }
}
