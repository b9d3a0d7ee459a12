use std::process::ExitCode;

use observer::{cli::Command, cli::StateDirArg, cli::check::check, cli::run::run, kernel::loader::chain};

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
        Command::Cleanup(args) => {
            let StateDirArg::Dir(dir) = &args.state_dir else {
                println!("observer cleanup: no state directory given; nothing to remove");
                return ExitCode::SUCCESS;
            };
            match observer::kernel::state::cleanup(dir) {
                Ok(removed) => {
                    for path in &removed {
                        println!("removed {}", path.display());
                    }
                    println!("observer cleanup: {} removed from {}", removed.len(), dir.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("observer: error: {}", chain(&e));
                    ExitCode::from(e.exit_code())
                }
            }
        }
        Command::Run(args) => {
            observer::pipeline::memory::limit_arenas();
            // Before any other thread: what the threads keep once the programs
            // are attached. The runtime's threads drop to it as they start
            // (they never load or attach); this one after attaching.
            observer::kernel::privileges::prepare();
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .on_thread_start(observer::kernel::privileges::drop_in_this_thread)
                .build()
            {
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
