fn main() -> std::process::ExitCode {
    labelfool::cli::main()
}
