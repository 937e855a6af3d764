use std::process::ExitCode;

use unionfs::cli::{self, Invocation};
use unionfs::{config, daemon, image};

fn main() -> ExitCode {
    let invocation = match cli::parse(std::env::args_os().collect()) {
        Ok(invocation) => invocation,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let result = match invocation {
        Invocation::Mount(request) => {
            daemon::restart_without_malloc_thread_cache();
            // Before anything can fail, and not only in a log the caller
            // may never read.
            for warning in &request.warnings {
                eprintln!("unionfs: warning: {warning}");
            }
            config::validate(&request)
                .map_err(|e| e.to_string())
                .and_then(daemon::mount)
        }
        Invocation::Umount(args) => daemon::umount(&args),
        Invocation::Image(args) => image::run_image(args),
        Invocation::Container(args) => image::run_container(args),
        Invocation::System(args) => image::run_system(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("unionfs: {msg}");
            ExitCode::FAILURE
        }
    }
}
