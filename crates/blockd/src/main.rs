//! blockd: a QMP block daemon compatible with qemu-storage-daemon, centred on incremental backup.
//!
//! # Layout
//! - [`cli`]: the command line (QSD's options in order, plus a short form).
//! - [`startup`]: applies the options: sockets, nodes, NBD, exports, pidfile, daemonize.
//! - [`dispatch`]: the QMP dispatcher: schema check, typed command, one `match` to the handlers,
//!   and the one place where a core error becomes a QMP error class.
//! - [`daemon`], [`exports`]: the state and the handlers that call the core.
//! - [`info`]: query results; [`hmp`]: the `qemu-io` subset of `human-monitor-command`;
//!   [`export`]: a node as an NBD export.

mod backup;
mod checkpoint;
mod claims;
mod cli;
mod convert;
mod daemon;
mod dispatch;
mod export;
mod exports;
mod hmp;
mod image;
mod info;
mod internal_snapshot;
mod reopen;
mod snapshot;
mod startup;
mod transaction;
mod wire;

use std::process::ExitCode;

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn main() -> ExitCode {
    // Before anything else: a SIGTERM/SIGINT/SIGHUP from here on waits (pending) until start-up
    // has its handlers, instead of killing the process with sockets and images half set up.
    startup::hold_termination_signals();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let opts = match cli::parse(&args) {
        Ok(cli::Parsed::Help) => {
            print!("{}", cli::HELP);
            return ExitCode::SUCCESS;
        }
        Ok(cli::Parsed::Version) => {
            println!("blockd version {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Ok(cli::Parsed::Run(opts)) => opts,
        Err(e) => {
            eprintln!("blockd: {e}");
            eprintln!("Try 'blockd --help' for more information.");
            return ExitCode::from(1);
        }
    };
    init_logging();
    // Fork before any thread exists: the parent waits for the child to report readiness.
    let ready = if opts.contains(&cli::Opt::Daemonize) {
        match startup::daemonize() {
            Ok(r) => Some(r),
            Err(e) => {
                eprintln!("blockd: --daemonize: {e}");
                return ExitCode::from(1);
            }
        }
    } else {
        None
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("blockd: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    runtime.block_on(startup::run(opts, ready))
}
