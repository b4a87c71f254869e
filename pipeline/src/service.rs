//! What every cdp service shares: shutdown, health, and the
//! `/metrics` `/healthz` `/readyz` endpoint.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use tokio::sync::watch;

/// A shutdown signal shared by async tasks and stage threads.
#[derive(Clone)]
pub struct Shutdown {
    flag: Arc<AtomicBool>,
    tx: Arc<watch::Sender<bool>>,
}

impl Default for Shutdown {
    fn default() -> Self {
        let (tx, _) = watch::channel(false);
        Shutdown {
            flag: Arc::new(AtomicBool::new(false)),
            tx: Arc::new(tx),
        }
    }
}

impl Shutdown {
    pub fn trigger(&self) {
        self.flag.store(true, Ordering::SeqCst);
        self.tx.send_replace(true);
    }

    pub fn is_triggered(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }

    /// Resolves once [`Shutdown::trigger`] was called.
    pub async fn wait(&self) {
        let mut rx = self.tx.subscribe();
        while !*rx.borrow_and_update() {
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    /// Trigger on SIGTERM or Ctrl-C.
    pub fn trigger_on_signals(&self) {
        let this = self.clone();
        tokio::spawn(async move {
            let ctrl_c = tokio::signal::ctrl_c();
            #[cfg(unix)]
            {
                let mut term =
                    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    {
                        Ok(s) => s,
                        Err(e) => {
                            tracing::error!(error = %e, "cannot listen for SIGTERM");
                            let _ = ctrl_c.await;
                            this.trigger();
                            return;
                        }
                    };
                tokio::select! {
                    _ = ctrl_c => {},
                    _ = term.recv() => {},
                }
            }
            #[cfg(not(unix))]
            let _ = ctrl_c.await;
            tracing::info!("shutdown requested");
            this.trigger();
        });
    }
}

/// Readiness and liveness of the components of one process. `/readyz`
/// answers 200 once every registered component said it is ready; `/healthz`
/// answers 503 once any component failed for good (the process is on its
/// way out and must be restarted).
#[derive(Clone, Default)]
pub struct Health {
    components: Arc<Mutex<Vec<Component>>>,
    failed: Arc<Mutex<Option<String>>>,
}

/// A registered component: its name and readiness.
type Component = (String, Arc<AtomicBool>);

/// One component's readiness flag, and its way to report a fatal failure.
#[derive(Clone)]
pub struct ReadyFlag {
    ready: Arc<AtomicBool>,
    name: String,
    failed: Arc<Mutex<Option<String>>>,
}

impl ReadyFlag {
    pub fn set(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst)
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    /// The component cannot go on: `/healthz` fails from now on (and
    /// `/readyz` with it) until the process exits.
    pub fn fail(&self, reason: &str) {
        self.set(false);
        if let Ok(mut f) = self.failed.lock() {
            f.get_or_insert_with(|| format!("{}: {reason}", self.name));
        }
    }
}

impl Health {
    pub fn register(&self, name: &str) -> ReadyFlag {
        let flag = Arc::new(AtomicBool::new(false));
        if let Ok(mut c) = self.components.lock() {
            c.push((name.to_string(), flag.clone()));
        }
        ReadyFlag {
            ready: flag,
            name: name.to_string(),
            failed: self.failed.clone(),
        }
    }

    /// The first fatal failure a component reported, if any.
    pub fn failure(&self) -> Option<String> {
        self.failed
            .lock()
            .map(|f| f.clone())
            .unwrap_or_else(|_| Some("health registry poisoned".into()))
    }

    /// Names of the components not ready yet.
    pub fn not_ready(&self) -> Vec<String> {
        self.components
            .lock()
            .map(|c| {
                c.iter()
                    .filter(|(_, f)| !f.load(Ordering::SeqCst))
                    .map(|(n, _)| n.clone())
                    .collect()
            })
            .unwrap_or_else(|_| vec!["health registry poisoned".into()])
    }
}

/// Serve `/metrics`, `/healthz`, `/readyz` until shutdown.
pub async fn serve_admin(
    addr: SocketAddr,
    health: Health,
    shutdown: Shutdown,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    serve_admin_on(listener, health, shutdown).await
}

/// [`serve_admin`] on a listener bound already: a process binds its admin
/// address before it joins anything, so a taken port fails it at once.
pub async fn serve_admin_on(
    listener: tokio::net::TcpListener,
    health: Health,
    shutdown: Shutdown,
) -> std::io::Result<()> {
    let addr = listener.local_addr()?;
    let app = Router::new()
        .route("/metrics", get(|| async { crate::metrics::render() }))
        .route(
            "/healthz",
            get({
                let health = health.clone();
                move || {
                    let health = health.clone();
                    async move {
                        match health.failure() {
                            None => (StatusCode::OK, "ok\n".to_string()),
                            Some(reason) => (
                                StatusCode::SERVICE_UNAVAILABLE,
                                format!("failed: {reason}\n"),
                            ),
                        }
                    }
                }
            }),
        )
        .route(
            "/readyz",
            get(move || {
                let health = health.clone();
                async move {
                    let waiting = health.not_ready();
                    if waiting.is_empty() {
                        (StatusCode::OK, "ready\n".to_string())
                    } else {
                        (
                            StatusCode::SERVICE_UNAVAILABLE,
                            format!("waiting for: {}\n", waiting.join(", ")),
                        )
                    }
                }
            }),
        );
    tracing::info!(%addr, "admin endpoint listening");
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.wait().await })
        .await
}
