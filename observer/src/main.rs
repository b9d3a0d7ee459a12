use std::process::ExitCode;

use observer::{cli::Command, cli::check::check, cli::run::run, kernel::loader::chain};

fn main() -> ExitCode {
    // Command line, OBSERVER_* environment and --config file; clap exits with
    // code 2 and a specific message on bad arguments.
    let cli = observer::cli::config::parse_from(std::env::args_os()).unwrap_or_else(|e| e.exit());
    observer::cli::logging::init(cli.command.log());
    match cli.command {
        Command::Check(args) => {
            let (report, ok) = check(&args.kernel);
            print!("{report}");
            if ok { ExitCode::SUCCESS } else { ExitCode::from(1) }
        }
        Command::Run(args) => {
            observer::pipeline::memory::limit_arenas();
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
