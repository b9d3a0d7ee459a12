use std::process::ExitCode;

use clap::Parser as _;
use observer::{
    check::check,
    cli::{Cli, Command},
    loader::chain,
    run::run,
};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    // clap exits with code 2 and a specific message on bad arguments.
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_env("OBSERVER_LOG").unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Command::Check(args) => {
            let (report, ok) = check(&args);
            print!("{report}");
            if ok { ExitCode::SUCCESS } else { ExitCode::from(1) }
        }
        Command::Run(args) => {
            let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("observer: error: starting the async runtime: {e}");
                    return ExitCode::from(1);
                }
            };
            match runtime.block_on(run(args)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("observer: error: {}", chain(&e));
                    ExitCode::from(e.exit_code())
                }
            }
        }
    }
}
