//! A real OpenSSH server for the SFTP tests, configured with the production fragment
//! (`deploy/sftp/mui-sftp.conf`) and with tenant accounts made by the production script
//! (`deploy/sftp/mui-sftp-account`), on a random loopback port; and the real clients
//! (`sftp`, `curl`) to upload through it.
//!
//! Needs root (sshd chroots, the script adds Unix accounts) and the Debian packages
//! `openssh-server`, `openssh-client` and `curl`, which `scripts/setup.sh` installs. Each
//! server has its own folder under [`BASE`], its own host key, keys folder and accounts;
//! dropping it stops sshd and removes the accounts.
//!
//! (Over 400 lines: the sshd, the account script and the clients must agree on one
//! configuration; they are kept in one file.)

use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// Where chroot-ready folders are made: root-owned and not writable by others all the way up.
pub const BASE: &str = "/var/lib/mui-tests";

/// The repository's `deploy/sftp` folder.
pub fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/sftp")
}

/// A fresh folder under [`BASE`] (mode 0700, root-owned), removed when dropped.
pub fn chroot_ready_tempdir() -> anyhow::Result<tempfile::TempDir> {
    std::fs::create_dir_all(BASE).with_context(|| format!("creating {BASE}"))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(BASE, std::fs::Permissions::from_mode(0o755))?;
    Ok(tempfile::Builder::new().prefix("t").tempdir_in(BASE)?)
}

/// One tenant's SFTP login.
#[derive(Debug, Clone)]
pub struct Account {
    /// Unix account name.
    pub user: String,
    /// The tenant's slug.
    pub tenant: String,
}

/// A running sshd with its accounts.
#[derive(Debug)]
pub struct SftpServer {
    child: Option<Child>,
    /// Loopback port it listens on.
    pub port: u16,
    /// Its own folder (config, host key, client key, keys folder, log).
    pub dir: tempfile::TempDir,
    drop_root: PathBuf,
    accounts: Vec<Account>,
}

fn run(cmd: &mut Command) -> anyhow::Result<Output> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl SftpServer {
    /// Starts sshd for tenants whose folders are under `drop_root` (a
    /// [`chroot_ready_tempdir`]).
    pub fn start(drop_root: &Path) -> anyhow::Result<Self> {
        let dir = chroot_ready_tempdir()?;
        let d = dir.path();
        // sshd's privilege-separation folder (Debian makes it at boot, containers may not).
        std::fs::create_dir_all("/run/sshd")?;
        run(Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(d.join("host_key")))?;
        run(Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(d.join("client_key")))?;
        let keys_dir = d.join("authorized_keys");
        let fragment = std::fs::read_to_string(deploy_dir().join("mui-sftp.conf"))?.replace(
            "/etc/mui-sftp/authorized_keys",
            &keys_dir.display().to_string(),
        );
        if !fragment.contains(&keys_dir.display().to_string()) {
            bail!("mui-sftp.conf no longer names /etc/mui-sftp/authorized_keys");
        }
        let port = free_port()?;
        let config = format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {hk}\nPidFile {pid}\nUsePAM no\n\
             PasswordAuthentication yes\nKbdInteractiveAuthentication no\nPermitRootLogin no\n\
             StrictModes yes\nLogLevel VERBOSE\nSubsystem sftp internal-sftp\n\
             MaxStartups 100\nMaxSessions 100\n{fragment}",
            hk = d.join("host_key").display(),
            pid = d.join("sshd.pid").display(),
        );
        std::fs::write(d.join("sshd_config"), config)?;
        run(Command::new("/usr/sbin/sshd")
            .arg("-t")
            .arg("-f")
            .arg(d.join("sshd_config")))?;
        let log = std::fs::File::create(d.join("sshd.log"))?;
        let child = Command::new("/usr/sbin/sshd")
            .arg("-D")
            .arg("-e")
            .arg("-f")
            .arg(d.join("sshd_config"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting /usr/sbin/sshd")?;
        let server = SftpServer {
            child: Some(child),
            port,
            drop_root: drop_root.to_path_buf(),
            dir,
            accounts: Vec::new(),
        };
        let until = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > until {
                bail!("sshd did not listen on port {port}: {}", server.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(server)
    }

    /// sshd's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("sshd.log")).unwrap_or_default()
    }

    /// A tenant's drop folder, `DROP_ROOT/<tenant>/upload` (`/upload` in its chroot).
    pub fn upload_dir(&self, tenant: &str) -> PathBuf {
        self.drop_root.join(tenant).join("upload")
    }

    /// The client's private key.
    pub fn client_key(&self) -> PathBuf {
        self.dir.path().join("client_key")
    }

    /// Runs `deploy/sftp/mui-sftp-account` with this server's settings.
    pub fn account_script(&self, args: &[&str]) -> anyhow::Result<Output> {
        Command::new(deploy_dir().join("mui-sftp-account"))
            .args(args)
            .env("DROP_ROOT", &self.drop_root)
            .env("MUI_SFTP_KEYS_DIR", self.dir.path().join("authorized_keys"))
            .stdin(Stdio::null())
            .output()
            .context("running mui-sftp-account")
    }

    /// Adds an SFTP account for `tenant` (whose folder must not exist yet or be the
    /// tenant's), logging in with [`Self::client_key`].
    pub fn add_account(&mut self, tenant: &str) -> anyhow::Result<Account> {
        let user = format!("mt{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
        let key = format!("{}.pub", self.client_key().display());
        let out = self.account_script(&["add", tenant, "--user", &user, "--key", &key])?;
        if !out.status.success() {
            bail!(
                "mui-sftp-account add failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let account = Account {
            user,
            tenant: tenant.to_owned(),
        };
        self.accounts.push(account.clone());
        Ok(account)
    }

    /// Runs `sftp` in batch mode logging in with the private key `key` instead.
    pub fn sftp_with_key(&self, account: &Account, key: &Path, commands: &str) -> SftpRun {
        let mut cmd = self.sftp_command_with_key(account, key, &[]);
        SftpRun::from(cmd.output_with_stdin(commands))
    }

    fn ssh_options(&self, key: &Path) -> Vec<String> {
        [
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "LogLevel=ERROR",
            "-i",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain([key.display().to_string()])
        .collect()
    }

    /// Runs the OpenSSH `sftp` client in batch mode with `commands` (one per line; batch mode
    /// stops at the first failing command unless it starts with `-`). `extra` goes before
    /// the destination (e.g. `-l 200` to limit the bandwidth).
    pub fn sftp(&self, account: &Account, extra: &[&str], commands: &str) -> SftpRun {
        let out = self
            .sftp_command(account, extra)
            .output_with_stdin(commands);
        SftpRun::from(out)
    }

    /// The `sftp` command, ready to spawn (batch commands on its standard input).
    pub fn sftp_command(&self, account: &Account, extra: &[&str]) -> Command {
        self.sftp_command_with_key(account, &self.client_key(), extra)
    }

    fn sftp_command_with_key(&self, account: &Account, key: &Path, extra: &[&str]) -> Command {
        let mut cmd = Command::new("sftp");
        cmd.args(["-b", "-", "-P", &self.port.to_string()])
            .args(self.ssh_options(key))
            .args(extra)
            .arg(format!("{}@127.0.0.1", account.user))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd
    }

    /// Sends one SFTP extended request `name` with string arguments `args` straight to the
    /// server (`ssh -s … sftp`, speaking SFTP version 3 itself), whether or not the server
    /// advertises the extension (the `sftp` client does not send what is not advertised).
    /// Returns the reply's status code (0 OK, 3 permission denied, 8 unsupported) and message.
    pub fn raw_extended_request(
        &self,
        account: &Account,
        name: &str,
        args: &[&str],
    ) -> anyhow::Result<(u32, String)> {
        use std::io::Read;
        fn put_string(buf: &mut Vec<u8>, s: &[u8]) -> anyhow::Result<()> {
            buf.extend_from_slice(&u32::try_from(s.len())?.to_be_bytes());
            buf.extend_from_slice(s);
            Ok(())
        }
        fn packet(kind: u8, body: &[u8]) -> anyhow::Result<Vec<u8>> {
            let mut p = u32::try_from(body.len() + 1)?.to_be_bytes().to_vec();
            p.push(kind);
            p.extend_from_slice(body);
            Ok(p)
        }
        fn read_packet(r: &mut impl Read) -> anyhow::Result<(u8, Vec<u8>)> {
            let mut len = [0u8; 4];
            r.read_exact(&mut len).context("reading an SFTP packet")?;
            let len = u32::from_be_bytes(len) as usize;
            if len == 0 || len > 1 << 20 {
                bail!("SFTP packet of {len} bytes");
            }
            let mut body = vec![0u8; len];
            r.read_exact(&mut body)?;
            let kind = body.remove(0);
            Ok((kind, body))
        }
        fn take_u32(b: &[u8], at: usize) -> anyhow::Result<u32> {
            let bytes: [u8; 4] = b
                .get(at..at + 4)
                .and_then(|s| s.try_into().ok())
                .context("short SFTP packet")?;
            Ok(u32::from_be_bytes(bytes))
        }

        let mut child = Command::new("ssh")
            .args(["-p", &self.port.to_string()])
            .args(self.ssh_options(&self.client_key()))
            .arg("-s")
            .arg(format!("{}@127.0.0.1", account.user))
            .arg("sftp")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting ssh -s sftp")?;
        let result = (|| {
            let mut stdin = child.stdin.take().context("ssh's stdin")?;
            let mut stdout = child.stdout.take().context("ssh's stdout")?;
            // SSH_FXP_INIT, version 3; the answer is SSH_FXP_VERSION.
            stdin.write_all(&packet(1, &3u32.to_be_bytes())?)?;
            let (kind, _) = read_packet(&mut stdout)?;
            if kind != 2 {
                bail!("expected SSH_FXP_VERSION, got packet type {kind}");
            }
            // SSH_FXP_EXTENDED: id, request name, its arguments.
            let mut body = 7u32.to_be_bytes().to_vec();
            put_string(&mut body, name.as_bytes())?;
            for a in args {
                put_string(&mut body, a.as_bytes())?;
            }
            stdin.write_all(&packet(200, &body)?)?;
            let (kind, reply) = read_packet(&mut stdout)?;
            // SSH_FXP_STATUS: id, code, message.
            if kind != 101 || take_u32(&reply, 0)? != 7 {
                bail!("expected SSH_FXP_STATUS for request 7, got packet type {kind}");
            }
            let code = take_u32(&reply, 4)?;
            let msg_len = take_u32(&reply, 8)? as usize;
            let msg = reply
                .get(12..12 + msg_len)
                .map(|m| String::from_utf8_lossy(m).into_owned())
                .unwrap_or_default();
            Ok((code, msg))
        })();
        let _ = child.kill();
        let out = child.wait_with_output()?;
        result.with_context(|| format!("ssh: {}", String::from_utf8_lossy(&out.stderr)))
    }

    /// Uploads `local` with curl (libssh2) to `remote` (absolute in the chroot, e.g.
    /// `/upload/x.csv`), then runs curl's post-quote `commands` (e.g. `rename a b`, which
    /// libssh2 sends as a plain SFTP rename: OpenSSH does it as link + unlink).
    pub fn curl_upload(
        &self,
        account: &Account,
        local: &Path,
        remote: &str,
        commands: &[&str],
    ) -> SftpRun {
        let mut cmd = self.curl_command(account, local, remote, &[]);
        for c in commands {
            cmd.arg("-Q").arg(format!("-{c}"));
        }
        SftpRun::from(cmd.output().map_err(anyhow::Error::from))
    }

    /// The curl command uploading `local` to `remote`, with `extra` options (e.g.
    /// `--limit-rate 20k` for a slow upload), ready to spawn.
    pub fn curl_command(
        &self,
        account: &Account,
        local: &Path,
        remote: &str,
        extra: &[&str],
    ) -> Command {
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "--insecure", "--key"])
            .arg(self.client_key())
            .arg("--pubkey")
            .arg(format!("{}.pub", self.client_key().display()))
            .args(extra)
            .arg("-T")
            .arg(local)
            .arg(format!(
                "sftp://{}@127.0.0.1:{}{remote}",
                account.user, self.port
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd
    }
}

trait OutputWithStdin {
    fn output_with_stdin(&mut self, input: &str) -> anyhow::Result<Output>;
}

impl OutputWithStdin for Command {
    fn output_with_stdin(&mut self, input: &str) -> anyhow::Result<Output> {
        let mut child = self.spawn().context("starting sftp")?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(input.as_bytes())?;
        }
        Ok(child.wait_with_output()?)
    }
}

/// What a client run printed.
#[derive(Debug)]
pub struct SftpRun {
    /// Whether it exited with 0.
    pub ok: bool,
    /// Standard output and error, together.
    pub output: String,
}

impl From<anyhow::Result<Output>> for SftpRun {
    fn from(out: anyhow::Result<Output>) -> Self {
        match out {
            Ok(o) => SftpRun {
                ok: o.status.success(),
                output: format!(
                    "{}{}",
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                ),
            },
            Err(e) => SftpRun {
                ok: false,
                output: format!("{e:#}"),
            },
        }
    }
}

impl Drop for SftpServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        for a in std::mem::take(&mut self.accounts) {
            let _ = self.account_script(&["remove", &a.tenant, "--user", &a.user, "--keep-files"]);
        }
    }
}
