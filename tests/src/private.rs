//! A PostgreSQL cluster and a RabbitMQ node of a test's own, on their own ports and in
//! temporary folders, so that the test can restart them mid-import without disturbing the
//! tests running beside it on the machine's shared servers (which are never stopped).
//!
//! Both run as their system users (`postgres`, `rabbitmq`; PostgreSQL refuses root) through
//! `runuser`, so the tests need root, as the rest of the fault tests do. The RabbitMQ node
//! shares the machine's `epmd` and Erlang cookie (`/var/lib/rabbitmq`) but nothing else: its
//! own node name, AMQP and distribution ports, database and logs, and no plugins.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};

/// A free loopback port (bound and released: another process could take it in between,
/// which a failed start then reports).
fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A temporary folder owned by `user` (its parent, /tmp, lets anyone through).
fn owned_tempdir(prefix: &str, user: &str) -> anyhow::Result<tempfile::TempDir> {
    let dir = tempfile::Builder::new().prefix(prefix).tempdir()?;
    let status = std::process::Command::new("chown")
        .args(["-R", &format!("{user}:{user}")])
        .arg(dir.path())
        .status()?;
    if !status.success() {
        bail!("chown {user} {}", dir.path().display());
    }
    Ok(dir)
}

/// Runs `program args` as `user` with exactly `env`; fails with its output.
async fn run_as(
    user: &str,
    program: &Path,
    args: &[&str],
    env: &[(String, String)],
) -> anyhow::Result<String> {
    let out = tokio::process::Command::new("runuser")
        .args(["-u", user, "--"])
        .arg(program)
        .args(args)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .current_dir("/")
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .with_context(|| format!("running {}", program.display()))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        bail!(
            "{} {args:?} failed ({}): {text}",
            program.display(),
            out.status
        );
    }
    Ok(text)
}

async fn port_open(port: u16) -> bool {
    tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_ok()
}

/// A PostgreSQL cluster of the test's own (initdb into a temporary folder, trust auth for
/// `postgres` on 127.0.0.1, fsync off), stopped and removed when dropped.
#[derive(Debug)]
pub struct PrivatePostgres {
    /// Its port on 127.0.0.1.
    pub port: u16,
    bin: PathBuf,
    dir: tempfile::TempDir,
}

impl PrivatePostgres {
    /// Creates and starts the cluster.
    pub async fn start() -> anyhow::Result<Self> {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .context("PostgreSQL's binaries in /usr/lib/postgresql")?
            .flatten()
            .map(|e| e.path().join("bin"))
            .filter(|b| b.join("initdb").exists())
            .max()
            .context("no initdb under /usr/lib/postgresql/*/bin")?;
        let dir = owned_tempdir("mui-pg-", "postgres")?;
        let data = dir.path().join("data");
        let data_s = data.display().to_string();
        run_as(
            "postgres",
            &bin.join("initdb"),
            &["-D", &data_s, "-U", "postgres", "--auth=trust", "--no-sync"],
            &[],
        )
        .await?;
        let pg = Self {
            port: free_port()?,
            bin,
            dir,
        };
        pg.pg_ctl(&["start"]).await?;
        Ok(pg)
    }

    async fn pg_ctl(&self, action: &[&str]) -> anyhow::Result<String> {
        let data = self.dir.path().join("data").display().to_string();
        let socket = self.dir.path().display().to_string();
        let opts = format!(
            "-p {} -k {socket} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=100",
            self.port
        );
        let log = self.dir.path().join("log").display().to_string();
        let mut args = vec!["-D", &data, "-o", &opts, "-l", &log, "-w", "-t", "60"];
        args.extend_from_slice(action);
        run_as("postgres", &self.bin.join("pg_ctl"), &args, &[]).await
    }

    /// `postgres://postgres@127.0.0.1:<port>/postgres`.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// `pg_ctl restart -m fast`: every session is ended, the server shuts down and starts
    /// again; returns once it accepts connections.
    pub async fn restart(&self) -> anyhow::Result<()> {
        self.pg_ctl(&["restart", "-m", "fast"]).await.map(|_| ())
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let data = self.dir.path().join("data");
        let _ = std::process::Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(&data)
            .args(["stop", "-m", "immediate", "-w"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// A RabbitMQ node of the test's own (see the module docs), stopped and removed when
/// dropped.
#[derive(Debug)]
pub struct PrivateRabbit {
    /// Its AMQP port on 127.0.0.1.
    pub port: u16,
    /// Its Erlang node name.
    pub node: String,
    env: Vec<(String, String)>,
    dir: tempfile::TempDir,
}

const RABBIT_BIN: &str = "/usr/lib/rabbitmq/bin";

impl PrivateRabbit {
    /// Starts the node and waits (up to 120 s) until it accepts AMQP connections.
    pub async fn start() -> anyhow::Result<Self> {
        let dir = owned_tempdir("mui-rmq-", "rabbitmq")?;
        let p = dir.path();
        std::fs::write(p.join("enabled_plugins"), "[].\n")?;
        std::fs::write(p.join("rabbitmq.conf"), "loopback_users = none\n")?;
        for sub in ["mnesia", "log"] {
            std::fs::create_dir(p.join(sub))?;
        }
        // owned_tempdir chowned the folder before these were made.
        let status = std::process::Command::new("chown")
            .args(["-R", "rabbitmq:rabbitmq"])
            .arg(p)
            .status()?;
        if !status.success() {
            bail!("chown rabbitmq {}", p.display());
        }
        let port = free_port()?;
        let dist = free_port()?;
        let node = format!(
            "mui-t-{}@localhost",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        );
        let path = |s: &str| p.join(s).display().to_string();
        let env: Vec<(String, String)> = [
            ("HOME", "/var/lib/rabbitmq".to_owned()),
            ("RABBITMQ_NODENAME", node.clone()),
            ("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1".to_owned()),
            ("RABBITMQ_NODE_PORT", port.to_string()),
            ("RABBITMQ_DIST_PORT", dist.to_string()),
            ("RABBITMQ_MNESIA_BASE", path("mnesia")),
            ("RABBITMQ_LOG_BASE", path("log")),
            ("RABBITMQ_ENABLED_PLUGINS_FILE", path("enabled_plugins")),
            ("RABBITMQ_CONFIG_FILE", path("rabbitmq.conf")),
            ("RABBITMQ_PID_FILE", path("pid")),
            ("ERL_EPMD_ADDRESS", "127.0.0.1".to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        let rabbit = Self {
            port,
            node,
            env,
            dir,
        };
        run_as(
            "rabbitmq",
            &Path::new(RABBIT_BIN).join("rabbitmq-server"),
            &["-detached"],
            &rabbit.env,
        )
        .await?;
        rabbit.wait_up().await?;
        Ok(rabbit)
    }

    async fn wait_up(&self) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        while !port_open(self.port).await {
            if tokio::time::Instant::now() > deadline {
                let logs = self.dir.path().join("log");
                bail!(
                    "RabbitMQ node {} not listening on {} after 120 s (logs in {})",
                    self.node,
                    self.port,
                    logs.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Ok(())
    }

    async fn ctl(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut all = vec!["-n", self.node.as_str()];
        all.extend_from_slice(args);
        run_as(
            "rabbitmq",
            &Path::new(RABBIT_BIN).join("rabbitmqctl"),
            &all,
            &self.env,
        )
        .await
    }

    /// `amqp://guest:guest@127.0.0.1:<port>/%2f`.
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// `rabbitmqctl stop_app`: the broker stops (every connection closed, the port shut),
    /// the Erlang node stays.
    pub async fn stop_app(&self) -> anyhow::Result<()> {
        self.ctl(&["stop_app"]).await?;
        Ok(())
    }

    /// `rabbitmqctl start_app`, until it accepts connections. (Started right after
    /// `stop_app`, the listener can still be closing: it is tried again.)
    pub async fn start_app(&self) -> anyhow::Result<()> {
        let mut last = None;
        for _ in 0..10 {
            match self.ctl(&["start_app"]).await {
                Ok(_) => return self.wait_up().await,
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("start_app")))
    }
}

impl Drop for PrivateRabbit {
    fn drop(&mut self) {
        // The node's own pid, written once it runs; before that, ask the node to stop.
        match std::fs::read_to_string(self.dir.path().join("pid")) {
            Ok(pid) if !pid.trim().is_empty() => {
                let _ = std::process::Command::new("kill")
                    .args(["-KILL", pid.trim()])
                    .status();
            }
            _ => {
                let _ = std::process::Command::new("runuser")
                    .args(["-u", "rabbitmq", "--"])
                    .arg(Path::new(RABBIT_BIN).join("rabbitmqctl"))
                    .args(["-n", &self.node, "stop"])
                    .env_clear()
                    .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
                    .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .status();
            }
        }
    }
}
