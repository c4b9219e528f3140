//! The guest binaries for Finch on Apple Silicon: static `aarch64-unknown-linux-musl` builds
//! of `finch-guest-agent` and `docker-credential-finchhost`, run under `qemu-aarch64-static`
//! (user-mode emulation: real aarch64 code, this machine's kernel), linked over a unix socket
//! to the x86_64 host agent, answering `get`, `store` and `list`.
//!
//! The binaries come from `$FINCH_AARCH64_BIN_DIR`, default
//! `<target>/aarch64-unknown-linux-musl/release` (`.ci/run` builds them).

use std::path::PathBuf;

use finch_tests::{Bridge, in_ci, require, which};

fn aarch64_bins() -> Option<PathBuf> {
    let dir = std::env::var_os("FINCH_AARCH64_BIN_DIR").map(PathBuf::from).unwrap_or_else(|| {
        let target = finch_tests::bin_dir().parent().expect("target dir").to_path_buf();
        target.join("aarch64-unknown-linux-musl/release")
    });
    let wanted = ["finch-guest-agent", "docker-credential-finchhost"];
    if wanted.iter().all(|f| dir.join(f).is_file()) {
        return Some(dir);
    }
    let build = "CARGO_TARGET_AARCH64_UNKNOWN_LINUX_MUSL_LINKER=rust-lld CC_aarch64_unknown_linux_musl=aarch64-linux-gnu-gcc cargo build --release --target aarch64-unknown-linux-musl -p finch-guest-agent";
    assert!(
        !in_ci(),
        "aarch64 guest binaries missing in {}: .ci/run must run `{build}`",
        dir.display()
    );
    eprintln!("SKIPPED aarch64: binaries missing in {} (run `{build}`)", dir.display());
    None
}

#[test]
fn aarch64_guest_binaries_answer_through_an_x86_64_host_agent() {
    if !require("aarch64", &["qemu-aarch64-static", "file"]) {
        return;
    }
    let Some(dir) = aarch64_bins() else { return };
    for name in ["finch-guest-agent", "docker-credential-finchhost"] {
        let out = std::process::Command::new("file").arg(dir.join(name)).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("ARM aarch64") && text.contains("statically linked"), "{text}");
    }
    let auth = "YXJtLXVzZXI6YXJtLXNlY3JldA=="; // arm-user:arm-secret
    let mut b = Bridge::new(&format!(r#"{{"auths":{{"arm.example":{{"auth":"{auth}"}}}}}}"#));
    b.guest_exec = Some((which("qemu-aarch64-static").unwrap(), dir));
    b.start();
    let r = b.helper("get", "arm.example");
    assert_eq!(
        (r.out(), r.code),
        (
            "{\"ServerURL\":\"arm.example\",\"Username\":\"arm-user\",\"Secret\":\"arm-secret\"}\n",
            0
        ),
        "{r:?}\n--- guest\n{}\n--- host\n{}",
        b.guest_log(),
        b.host_log()
    );
    let r = b.helper("store", r#"{"ServerURL":"arm2.example","Username":"u2","Secret":"s2"}"#);
    assert_eq!(r.code, 0, "{r:?}");
    let r = b.helper("list", "");
    assert!(
        r.out().contains("\"arm2.example\":\"u2\"")
            && r.out().contains("\"arm.example\":\"arm-user\""),
        "{r:?}"
    );
    let r = b.helper("version", "");
    assert_eq!(r.code, 0, "{r:?}");
}
