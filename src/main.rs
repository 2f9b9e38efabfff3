use std::process::ExitCode;

fn main() -> ExitCode {
    writebehind::cli::main()
}
