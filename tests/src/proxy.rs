//! A TCP proxy a test can cut, between the services and the broker.

/// A TCP proxy on a random loopback port that the test can cut: every connection through it
/// is dropped at once, as a network failure or a broker restart would.
#[derive(Debug, Clone)]
pub struct TcpProxy {
    /// Port it listens on.
    pub port: u16,
    cuts: tokio::sync::watch::Sender<u64>,
}

impl TcpProxy {
    /// Starts forwarding `127.0.0.1:<port>` to `target`.
    pub fn start(target: &str) -> anyhow::Result<Self> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let port = listener.local_addr()?.port();
        let (cuts, _) = tokio::sync::watch::channel(0u64);
        let proxy = Self { port, cuts };
        let target = target.to_owned();
        let cuts = proxy.cuts.clone();
        tokio::spawn(async move {
            let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                return;
            };
            while let Ok((mut inbound, _)) = listener.accept().await {
                let target = target.clone();
                let mut cut = cuts.subscribe();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut.changed() => {}
                    }
                });
            }
        });
        Ok(proxy)
    }

    /// Drops every connection going through the proxy.
    pub fn cut(&self) {
        self.cuts.send_modify(|n| *n += 1);
    }
}
