//! Logging: `tracing` events as text for terminals or as JSON lines for collectors.
//!
//! Every session runs in a `session` span carrying its `id` and `peer`, so each line of a session
//! names it (in JSON: the `span` and `spans` objects). Per-frame events are `trace!` only: at the
//! default `info` level a session logs a handful of lines however long it streams.

use tracing::Subscriber;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;

/// The subscriber `voxflow` logs through; `json` selects JSON lines (`--log-format json`).
pub fn subscriber<W>(json: bool, filter: EnvFilter, writer: W) -> Box<dyn Subscriber + Send + Sync>
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    if json {
        Box::new(builder.json().finish())
    } else {
        Box::new(builder.finish())
    }
}
