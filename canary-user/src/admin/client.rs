//! The CLI side of the admin socket.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};

use super::protocol::{Request, Response};

/// Sends one request and returns the agent's answer. An `ok: false`
/// answer becomes an error carrying the agent's message.
pub fn call(socket: &Path, request: &Request) -> Result<Response> {
    let mut stream = UnixStream::connect(socket).with_context(|| {
        format!(
            "cannot reach the canary agent at {} (is `canary agent` running? \
             use --admin-socket to point elsewhere)",
            socket.display()
        )
    })?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut line = serde_json::to_string(request)?;
    line.push('\n');
    stream.write_all(line.as_bytes())?;
    let mut answer = String::new();
    BufReader::new(stream)
        .read_line(&mut answer)
        .context("reading the agent's answer")?;
    let response: Response =
        serde_json::from_str(&answer).context("the agent's answer is not valid JSON")?;
    if !response.ok {
        bail!(
            "{}",
            response
                .error
                .unwrap_or_else(|| "the agent refused the request".into())
        );
    }
    Ok(response)
}
