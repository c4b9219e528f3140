//! A host credential helper for the Wine test, built for Windows. What it does depends on
//! the name it is installed under:
//!
//! * `docker-credential-winetest.exe get`: answers `helper.example` with a fixed test
//!   credential, not-found for anything else;
//! * `docker-credential-winehang.exe ACTION`: starts a child (itself, `child`), then never
//!   answers. The child touches `winehang.beat` next to the program every 100 ms, so the
//!   test can see whether the host agent's timeout killed the child too.

use std::io::{Read, Write};
use std::time::Duration;

fn main() -> std::process::ExitCode {
    let exe = std::env::current_exe().unwrap_or_default();
    let dir = exe.parent().map(std::path::Path::to_path_buf).unwrap_or_default();
    let hang = exe.file_stem().is_some_and(|s| s.to_string_lossy().ends_with("winehang"));
    let action = std::env::args().nth(1).unwrap_or_default();
    if action == "child" {
        let mut n = 0u64;
        loop {
            n += 1;
            let _ = std::fs::write(dir.join("winehang.beat"), n.to_string());
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    if hang {
        let _ = std::process::Command::new(&exe).arg("child").spawn();
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
    let mut input = String::new();
    let _ = std::io::stdin().read_to_string(&mut input);
    let mut out = std::io::stdout();
    match (action.as_str(), input.trim()) {
        ("get", "helper.example") => {
            let _ = out.write_all(
                br#"{"ServerURL":"helper.example","Username":"wine-user","Secret":"wine-helper-secret"}"#,
            );
            std::process::ExitCode::SUCCESS
        }
        ("list", _) => {
            let _ = out.write_all(br#"{"helper.example":"wine-user"}"#);
            std::process::ExitCode::SUCCESS
        }
        _ => {
            let _ = out.write_all(b"credentials not found in native keychain\n");
            std::process::ExitCode::FAILURE
        }
    }
}
