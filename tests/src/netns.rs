//! Another "host" on this machine: a network namespace of its own (its own loopback, its own
//! address) joined to the host by a veth pair on a /30 subnet, for tests that run services
//! as if on other machines (`tests/tests/hosts.rs`). Needs root and the `ip` command
//! (Debian package `iproute2`). Everything it creates is removed when it is dropped, also
//! when the test panics.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

/// The `ip` command, or an error saying what to install.
pub fn ip_command() -> anyhow::Result<PathBuf> {
    find_program("ip").ok_or_else(|| {
        anyhow::anyhow!(
            "the `ip` command is missing (Debian package iproute2; scripts/setup.sh installs \
             it): the multi-host tests need it to make network namespaces"
        )
    })
}

/// The absolute path of `name` in the usual system folders (tests run services with a
/// cleared environment, so without PATH).
pub fn find_program(name: &str) -> Option<PathBuf> {
    ["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
        .iter()
        .map(|dir| Path::new(dir).join(name))
        .find(|p| p.is_file())
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A network namespace joined to the host by a veth pair: the host side has
/// [`NetNs::host_ip`], the namespace's side [`NetNs::ns_ip`], on a /30 of their own.
/// Inside, 127.0.0.1 is the namespace's own loopback: the host's servers are reachable only
/// through what listens on `host_ip`.
#[derive(Debug)]
pub struct NetNs {
    /// The namespace's name (`ip netns exec <name>`).
    pub name: String,
    /// The veth interface on the host.
    pub host_if: String,
    /// The veth interface in the namespace.
    pub ns_if: String,
    /// The host's address on the link.
    pub host_ip: Ipv4Addr,
    /// The namespace's address on the link.
    pub ns_ip: Ipv4Addr,
    ip: PathBuf,
    /// The blackhole route that keeps the subnet's packets on this machine while the link
    /// is down (otherwise they would follow the default route out of it).
    blackhole: Option<String>,
}

impl NetNs {
    /// Creates the namespace, its loopback (up), the veth pair and the addresses.
    pub fn create() -> anyhow::Result<Self> {
        let ip = ip_command()?;
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let pid = std::process::id();
        // Interface names: at most 15 characters ("mh" + up to 7 digits of pid + "n" + n).
        let tag = format!("{pid}n{n}");
        let (host_ip, ns_ip) = free_subnet(&ip, pid, n)?;
        let mut ns = Self {
            name: format!("mui{tag}"),
            host_if: format!("mh{tag}"),
            ns_if: format!("mw{tag}"),
            host_ip,
            ns_ip,
            ip,
            blackhole: None,
        };
        anyhow::ensure!(
            ns.host_if.len() <= 15,
            "interface name {} too long",
            ns.host_if
        );
        // From here on, Drop removes whatever was made.
        ns.ip(&["netns", "add", &ns.name])?;
        ns.ip(&["-n", &ns.name, "link", "set", "lo", "up"])?;
        ns.ip(&[
            "link",
            "add",
            &ns.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &ns.ns_if,
            "netns",
            &ns.name,
        ])?;
        let subnet = format!("{}/30", Ipv4Addr::from(u32::from(host_ip) - 1));
        ns.ip(&["addr", "add", &format!("{host_ip}/30"), "dev", &ns.host_if])?;
        ns.ip(&["link", "set", &ns.host_if, "up"])?;
        let (nsname, nsif) = (ns.name.clone(), ns.ns_if.clone());
        ns.ip(&[
            "-n",
            &nsname,
            "addr",
            "add",
            &format!("{ns_ip}/30"),
            "dev",
            &nsif,
        ])?;
        ns.ip(&["-n", &nsname, "link", "set", &nsif, "up"])?;
        ns.ip(&["route", "add", "blackhole", &subnet, "metric", "4000"])?;
        ns.blackhole = Some(subnet);
        Ok(ns)
    }

    fn ip(&self, args: &[&str]) -> anyhow::Result<()> {
        let out = Command::new(&self.ip).args(args).output()?;
        anyhow::ensure!(
            out.status.success(),
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(())
    }

    /// The command line that runs a program inside the namespace (`ip netns exec <name>`,
    /// which also gives it a mount namespace of its own), with each folder of `hide` covered
    /// by an empty read-only tmpfs there (as if this host had no such folder), as user
    /// `uid`/`gid` if given (through `setpriv`, supplementary groups cleared).
    pub fn exec_prefix(
        &self,
        user: Option<(u32, u32)>,
        hide: &[&Path],
    ) -> anyhow::Result<Vec<String>> {
        let program = |name: &str| {
            find_program(name)
                .map(|p| p.display().to_string())
                .ok_or_else(|| anyhow::anyhow!("{name} is missing"))
        };
        let mut prefix = vec![
            self.ip.display().to_string(),
            "netns".into(),
            "exec".into(),
            self.name.clone(),
        ];
        if !hide.is_empty() {
            // sh -c SCRIPT $0 MOUNT N PATH… COMMAND…: mounts over the N paths, then execs.
            prefix.extend([
                program("sh")?,
                "-c".into(),
                "set -e; m=$1; n=$2; shift 2; \
                 while [ \"$n\" -gt 0 ]; do \
                 \"$m\" -t tmpfs -o ro,size=4k,mode=0555 mui-hidden \"$1\"; shift; n=$((n-1)); \
                 done; exec \"$@\""
                    .into(),
                "mui-netns".into(),
                program("mount")?,
                hide.len().to_string(),
            ]);
            prefix.extend(hide.iter().map(|p| p.display().to_string()));
        }
        if let Some((uid, gid)) = user {
            prefix.extend([
                program("setpriv")?,
                format!("--reuid={uid}"),
                format!("--regid={gid}"),
                "--clear-groups".into(),
                "--".into(),
            ]);
        }
        Ok(prefix)
    }

    /// Runs `program args…` inside the namespace as [`NetNs::exec_prefix`] would start it,
    /// and returns its output.
    pub fn run(
        &self,
        user: Option<(u32, u32)>,
        hide: &[&Path],
        program: &str,
        args: &[&str],
    ) -> anyhow::Result<Output> {
        let prefix = self.exec_prefix(user, hide)?;
        Ok(Command::new(&prefix[0])
            .args(&prefix[1..])
            .arg(program)
            .args(args)
            .output()?)
    }

    /// Cuts the link: both ends of the veth pair down. Nothing more goes in or out, and no
    /// one is told (no FIN, no RST), as when a host loses its network or its power.
    pub fn cut(&self) -> anyhow::Result<()> {
        self.ip(&["link", "set", &self.host_if, "down"])?;
        self.ip(&["-n", &self.name, "link", "set", &self.ns_if, "down"])
    }

    /// Mends a [`cut`](Self::cut) link: both ends up again. The addresses stayed, so the
    /// kernel puts the link's routes back; connections the servers dropped meanwhile stay
    /// dropped, and the program inside has to connect again, as after a real outage.
    pub fn restore(&self) -> anyhow::Result<()> {
        self.ip(&["-n", &self.name, "link", "set", &self.ns_if, "up"])?;
        self.ip(&["link", "set", &self.host_if, "up"])
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Deleting the namespace deletes its end of the veth pair, and so the pair; the
        // host end is deleted as well in case the namespace is still held by a process.
        let _ = Command::new(&self.ip)
            .args(["netns", "del", &self.name])
            .output();
        let _ = Command::new(&self.ip)
            .args(["link", "del", &self.host_if])
            .output();
        if let Some(subnet) = &self.blackhole {
            let _ = Command::new(&self.ip)
                .args(["route", "del", "blackhole", subnet])
                .output();
        }
    }
}

/// A /30 in 10.128.0.0/10 that no interface of this machine uses (chosen from the process
/// id and a counter, so tests running beside each other pick different ones): the host's
/// and the namespace's addresses.
fn free_subnet(ip: &Path, pid: u32, n: u32) -> anyhow::Result<(Ipv4Addr, Ipv4Addr)> {
    let used = Command::new(ip).args(["-4", "-o", "addr"]).output()?;
    let used = String::from_utf8_lossy(&used.stdout).into_owned();
    let routes = Command::new(ip).args(["-4", "route"]).output()?;
    let routes = String::from_utf8_lossy(&routes.stdout).into_owned();
    // 2^20 /30 subnets in 10.128.0.0/10 (only 10.128.0.0 – 10.191.255.252).
    let start = (pid.wrapping_mul(64).wrapping_add(n)) % (1 << 20);
    for k in 0..1024u32 {
        let index = (start + k * 7919) % (1 << 20);
        let base = u32::from(Ipv4Addr::new(10, 128, 0, 0)) + index * 4;
        let host = Ipv4Addr::from(base + 1);
        let subnet = Ipv4Addr::from(base);
        if !used.contains(&format!(" {host}/")) && !routes.contains(&format!("{subnet}/30")) {
            return Ok((host, Ipv4Addr::from(base + 2)));
        }
    }
    anyhow::bail!("no free /30 subnet in 10.128.0.0/10")
}
