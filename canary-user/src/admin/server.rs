//! The agent side of the admin socket.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context as _, Result, bail};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;

use super::protocol::{Request, Response};

/// Anything that answers admin requests (the agent's state).
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, request: Request) -> Response;
}

/// Binds the socket with mode 0600. Refuses to steal the socket of an agent
/// that is still answering on it.
pub fn bind(path: &Path) -> Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!(
                "another canary agent is answering on {}; stop it first",
                path.display()
            );
        }
        std::fs::remove_file(path)?;
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Serves requests until the listener fails. Each connection is one
/// request line and one response line.
pub async fn serve(listener: UnixListener, handler: Arc<dyn Handler>) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "admin accept failed");
                continue;
            }
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            let (read, mut write) = stream.into_split();
            let mut line = String::new();
            let mut reader = BufReader::new(read);
            if reader.read_line(&mut line).await.is_err() {
                return;
            }
            let response = match serde_json::from_str::<Request>(&line) {
                Ok(request) => {
                    let handler = handler.clone();
                    tokio::task::spawn_blocking(move || handler.handle(request))
                        .await
                        .unwrap_or_else(|e| Response::error(format!("internal error: {e}")))
                }
                Err(e) => Response::error(format!(
                    "malformed admin request ({e}); valid: {{\"cmd\":\"status\"}}, \
                     {{\"cmd\":\"weights\",\"host\":..,\"route\":null,\"weights\":[[\"v1\",90]]}}, \
                     {{\"cmd\":\"reset\",\"host\":..}}"
                )),
            };
            let mut out = serde_json::to_string(&response).unwrap_or_else(|e| {
                format!("{{\"ok\":false,\"error\":\"cannot encode response: {e}\"}}")
            });
            out.push('\n');
            let _ = write.write_all(out.as_bytes()).await;
        });
    }
}

/// Removes the socket file on drop.
pub struct SocketGuard(pub PathBuf);

impl Drop for SocketGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
