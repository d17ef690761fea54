//! `mui-fuzz`: a bounded fuzz run of the file-parsing check on the stable toolchain (see
//! `mui_tests::fuzzing`). First every kept regression input, then mutations of the corpus
//! until the time is up. A failing input is shrunk and written into the regressions folder
//! (`crash-<sha256 prefix>`), and the run fails: commit the file with the fix.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use sha2::Digest;

/// Bounded fuzz run of the CSV parsing and row checks.
#[derive(Debug, Parser)]
#[command(name = "mui-fuzz")]
struct Cli {
    /// How long to mutate, in seconds.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// Folder of seed files (`.expect` files are skipped).
    #[arg(long, default_value = "tests/fixtures/corpus")]
    corpus: PathBuf,
    /// Folder of inputs that once failed: each is checked first; new failures go there.
    #[arg(long, default_value = "tests/fixtures/fuzz-regressions")]
    regressions: PathBuf,
    /// Seed of the mutations (default: from the clock; printed, to repeat a run).
    #[arg(long)]
    seed: Option<u64>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // Panics are expected and caught while shrinking: keep their messages out of the log.
    std::panic::set_hook(Box::new(|_| {}));
    let regressions = mui_tests::fuzzing::load_dir(&cli.regressions)?;
    for (path, bytes) in &regressions {
        if std::panic::catch_unwind(|| mui_tests::fuzzing::parse_and_check(bytes)).is_err() {
            anyhow::bail!("regression input {} fails again", path.display());
        }
    }
    let corpus: Vec<Vec<u8>> = mui_tests::fuzzing::load_dir(&cli.corpus)?
        .into_iter()
        .chain(regressions)
        .map(|(_, b)| b)
        .collect();
    anyhow::ensure!(
        !corpus.is_empty(),
        "no seed files in {}",
        cli.corpus.display()
    );
    let seed = cli.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    });
    let report = mui_tests::fuzzing::run(&corpus, Duration::from_secs(cli.seconds), seed);
    match report.failure {
        None => {
            println!(
                "mui-fuzz: {} inputs from {} seed files, seed {seed}, {} s: no failure",
                report.cases,
                corpus.len(),
                cli.seconds
            );
            Ok(())
        }
        Some((input, why)) => {
            let name = format!("crash-{}", &hex::encode(sha2::Sha256::digest(&input))[..16]);
            let path = cli.regressions.join(name);
            std::fs::write(&path, &input)?;
            anyhow::bail!(
                "input {} ({} bytes, seed {seed}) fails: {why}",
                path.display(),
                input.len()
            )
        }
    }
}
