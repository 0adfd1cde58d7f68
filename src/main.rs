//! The `voxflow` command: parse the CLI, set up logging and signals, hand over to the library.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use voxflow::config::Config;

#[derive(Parser)]
#[command(version, about = "A gateway for live speech transcription")]
struct Cli {
    /// Log format: `text` for terminals, `json` for collectors.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true, env = "VOXFLOW_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Serve WebSocket sessions.
    Serve {
        /// TOML configuration; without it the embedded defaults apply. `VOXFLOW_*` variables
        /// override either (e.g. `VOXFLOW_SERVER__LISTEN=0.0.0.0:8080`).
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        match cli.command {
            Command::Serve { config } => serve(config).await,
        }
    })
}

async fn serve(config: Option<PathBuf>) -> anyhow::Result<()> {
    let config = Config::load(config.as_deref())?;
    let settings = config.validate()?;
    let engine = voxflow::server::engine(&settings).context("cannot start the STT engine")?;
    voxflow::run(settings, engine, shutdown_signal()).await
}

fn init_logging(format: LogFormat) {
    use tracing_subscriber::util::SubscriberInitExt as _;
    let filter = tracing_subscriber::EnvFilter::try_from_env("VOXFLOW_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let json = matches!(format, LogFormat::Json);
    voxflow::logging::subscriber(json, filter, std::io::stdout).init();
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler installs");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("Shutdown requested.");
}
