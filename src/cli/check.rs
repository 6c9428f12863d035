//! TEMPORARY STUB (replaced by the manifest branch)
pub fn run(_path: &std::path::Path) -> std::process::ExitCode {
    std::process::ExitCode::from(2)
}
