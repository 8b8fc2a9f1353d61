//! The `tollgate` binary: parse the command line and run the library.

use std::process::ExitCode;

use clap::Parser;
use tokio::signal::unix::{SignalKind, signal};
use tollgate::config::{Cli, Command, KeysCommand, ServeArgs, Settings};

/// The server allocates and frees the same few buffers and futures for
/// every connection, from the runtime's workers and the store's threads.
/// While sessions were opened and closed as fast as clients could, glibc's
/// allocator took about a tenth of the server's CPU (much of it merging
/// and splitting free chunks) and jemalloc about a fortieth, with less
/// memory per idle session too (BENCHMARKS.md has the figures).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    tollgate::telemetry::init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command.unwrap_or(Command::Serve(Box::new(cli.serve))) {
        Command::Serve(args) => serve(*args).await,
        Command::Keys(KeysCommand::Create { project, db, config }) => {
            let db = Settings::database(db, config.as_deref()).map_err(anyhow::Error::msg)?;
            let key = tollgate::create_api_key(&db, &project).await?;
            println!("{}", key.expose());
            Ok(())
        }
        Command::Keys(KeysCommand::Revoke { api_key, db, config }) => {
            let db = Settings::database(db, config.as_deref()).map_err(anyhow::Error::msg)?;
            tollgate::revoke_api_key(&db, &api_key).await?;
            println!("revoked");
            Ok(())
        }
        Command::Webhooks(args) => {
            println!("{}", tollgate::webhooks::cli::run(args).await?);
            Ok(())
        }
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let settings = Settings::load(args).map_err(anyhow::Error::msg)?;
    let server = tollgate::start(settings).await?;
    if let Some(key) = server.first_api_key() {
        println!(
            "Created project \"{}\". Its API key, shown only this once:\n\n    {}\n",
            tollgate::DEFAULT_PROJECT,
            key.expose()
        );
    }
    // Logged only after the key is printed: what waits for this line can
    // rely on standard output being complete.
    tracing::info!(address = %server.local_addr(), "listening");
    tokio::select! {
        signal = stop_signal() => signal?,
        // It stops on its own when another server took its database.
        _ = server.stopping() => {}
    }
    tokio::spawn(async {
        // A second signal means the operator will not wait for sessions to
        // close; whatever the meter has not yet recorded is lost.
        if stop_signal().await.is_ok() {
            eprintln!("error: second stop signal; exiting without waiting");
            std::process::exit(130);
        }
    });
    server.shutdown().await
}

/// Resolves on SIGTERM or Ctrl-C (SIGINT).
async fn stop_signal() -> anyhow::Result<()> {
    let mut terminate = signal(SignalKind::terminate())?;
    tokio::select! {
        _ = terminate.recv() => {}
        result = tokio::signal::ctrl_c() => result?,
    }
    Ok(())
}
