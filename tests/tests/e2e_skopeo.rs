//! End to end with real parts: Debian's docker-registry (TLS + htpasswd) on 127.0.0.1,
//! Debian's skopeo configured with `credHelpers` → `finchhost`, and the host's store being
//! gnome-keyring in a private D-Bus session, served by the host agent's native Secret Service
//! source (`credsStore: secretservice`); Debian's docker-credential-secretservice confirms
//! what landed in the keyring.
//!
//! `skopeo login` stores through the chain into the keyring; `copy` and `inspect`
//! authenticate through it; `logout` erases; the next `inspect` is refused by the registry.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use finch_tests::keyring::{secretservice, start_keyring};
use finch_tests::{Bridge, Proc, STARTUP, run_ok, run_with_input, wait_until};
use sha2::{Digest, Sha256};

const PASSWORD: &str = "e2e-Pa55word-7f3a";
const USER: &str = "finchtester";

const TOOLS: &[&str] = &[
    "docker-registry",
    "skopeo",
    "htpasswd",
    "openssl",
    "tar",
    "dbus-run-session",
    "gnome-keyring-daemon",
    "docker-credential-secretservice",
];

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// Writes a docker-registry config serving TLS for `san` (`IP:…` or `DNS:…`) on `addr`,
/// with htpasswd `user`/`password`; returns the config file and the CA dir for clients.
pub(crate) fn registry_files(
    dir: &Path,
    addr: &str,
    san: &str,
    user: &str,
    password: &str,
) -> (PathBuf, PathBuf) {
    let certs = dir.join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    let (cert, key) = (certs.join("ca.crt"), dir.join("registry.key"));
    finch_tests::self_signed_cert(&cert, &key, san, &[]);
    let htpasswd = dir.join("htpasswd");
    let out = Command::new("htpasswd").args(["-Bbn", user, password]).output().unwrap();
    assert!(out.status.success());
    std::fs::write(&htpasswd, out.stdout).unwrap();
    let config = dir.join("registry.yml");
    std::fs::write(
        &config,
        format!(
            "version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n    rootdirectory: {root}\n\
             http:\n  addr: {addr}\n  tls:\n    certificate: {cert}\n    key: {key}\n\
             auth:\n  htpasswd:\n    realm: finch-e2e\n    path: {htpasswd}\n",
            root = dir.join("registry-data").display(),
            cert = cert.display(),
            key = key.display(),
            htpasswd = htpasswd.display(),
        ),
    )
    .unwrap();
    (config, certs)
}

/// Starts docker-registry with TLS and htpasswd on 127.0.0.1; returns it and its CA dir.
fn start_registry(dir: &Path, port: u16) -> (Proc, PathBuf) {
    let (config, certs) =
        registry_files(dir, &format!("127.0.0.1:{port}"), "IP:127.0.0.1", USER, PASSWORD);
    let mut cmd = Command::new("docker-registry");
    cmd.arg("serve").arg(&config);
    let proc = Proc::spawn("docker-registry", cmd, &dir.join("registry.log"));
    let up = wait_until(STARTUP, || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
    assert!(up, "docker-registry did not listen:\n{}", proc.output());
    (proc, certs)
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// A one-layer OCI image layout at `dir`, tag `v1`, holding `hello.txt`.
pub(crate) fn make_oci_image(dir: &Path, work: &Path) {
    let content = work.join("layer-content");
    std::fs::create_dir_all(&content).unwrap();
    std::fs::write(content.join("hello.txt"), "hello from the finch credential bridge\n").unwrap();
    make_oci_image_of(dir, &content, work);
}

/// A one-layer OCI image layout at `dir`, tag `v1`, whose layer is the tree `content`.
pub(crate) fn make_oci_image_of(dir: &Path, content: &Path, work: &Path) {
    make_oci_image_layers(dir, &[content], work);
}

/// An OCI image layout at `dir`, tag `v1`, with one layer per tree in `contents`.
pub(crate) fn make_oci_image_layers(dir: &Path, contents: &[&Path], work: &Path) {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let put = |bytes: &[u8]| {
        let hex = sha256_hex(bytes);
        std::fs::write(blobs.join(&hex), bytes).unwrap();
        (format!("sha256:{hex}"), bytes.len())
    };
    let mut layers = Vec::new();
    for (i, content) in contents.iter().enumerate() {
        let image = dir.file_name().and_then(|n| n.to_str()).unwrap_or("image");
        let layer_tar = work.join(format!("layer-{image}-{i}.tar"));
        run_ok(
            Command::new("tar")
                .arg("-C")
                .arg(content)
                .args(["--owner=0", "--group=0", "-cf"])
                .arg(&layer_tar)
                .arg("."),
            "tar",
        );
        layers.push(put(&std::fs::read(&layer_tar).unwrap()));
    }
    let diff_ids: Vec<&String> = layers.iter().map(|(d, _)| d).collect();
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux", "config": {},
        "rootfs": {"type": "layers", "diff_ids": diff_ids}
    });
    let (config_digest, config_size) = put(config.to_string().as_bytes());
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config_size},
        "layers": layers.iter().map(|(digest, size)| serde_json::json!(
            {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": digest, "size": size}
        )).collect::<Vec<_>>()
    });
    let (manifest_digest, manifest_size) = put(manifest.to_string().as_bytes());
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest, "size": manifest_size,
            "annotations": {"org.opencontainers.image.ref.name": "v1"}
        }]
    });
    std::fs::write(dir.join("index.json"), index.to_string()).unwrap();
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
}

#[test]
fn skopeo_login_copy_inspect_logout_through_the_bridge() {
    if !finch_tests::require("skopeo_login_copy_inspect_logout_through_the_bridge", TOOLS) {
        return;
    }
    let mut b = Bridge::new(r#"{"credsStore":"secretservice"}"#);
    let dir = b.dir.path().to_owned();
    let keyring = start_keyring(&dir);
    b.host_env = keyring.env.clone();
    b.start();

    let port = free_port();
    let (registry, certs) = start_registry(&dir, port);
    let registry_name = format!("127.0.0.1:{port}");
    let image = format!("docker://{registry_name}/finch/hello:v1");

    // skopeo's world: our helper on PATH, credHelpers → finchhost, its own HOME.
    let client_home = dir.join("client-home");
    std::fs::create_dir_all(&client_home).unwrap();
    let authfile = dir.join("auth.json");
    std::fs::write(&authfile, format!(r#"{{"credHelpers":{{"{registry_name}":"finchhost"}}}}"#))
        .unwrap();
    let policy = dir.join("policy.json");
    std::fs::write(&policy, r#"{"default":[{"type":"insecureAcceptAnything"}]}"#).unwrap();
    let oci = dir.join("oci-image");
    make_oci_image(&oci, &dir);
    let skopeo = |args: &[&str]| {
        let mut c = Command::new("skopeo");
        c.arg("--policy")
            .arg(&policy)
            .args(args)
            .env("PATH", finch_tests::path_with(&finch_tests::bin_dir()))
            .env("HOME", &client_home)
            .env("FINCH_GUEST_AGENT_SOCKET", b.helper_socket())
            .env_remove("DBUS_SESSION_BUS_ADDRESS")
            .env_remove("REGISTRY_AUTH_FILE");
        c
    };
    let authfile_s = authfile.display().to_string();
    let certs_s = certs.display().to_string();
    let mut outputs: Vec<(String, String)> = Vec::new();
    let mut record = |what: &str, r: &finch_tests::HelperRun| {
        outputs
            .push((what.to_owned(), format!("{}{}", String::from_utf8_lossy(&r.stdout), r.stderr)));
    };

    // Anonymous access is refused: the rest of the test proves credentials flowed.
    let inspect_args = ["inspect", "--authfile", &authfile_s, "--cert-dir", &certs_s, &image];
    let r = run_with_input(skopeo(&inspect_args), b"", Duration::from_secs(120));
    record("anonymous inspect", &r);
    assert_ne!(r.code, 0, "the registry must require authentication");

    // login: get (not found) then store, through the chain into gnome-keyring.
    let r = run_with_input(
        skopeo(&[
            "login",
            "--authfile",
            &authfile_s,
            "--cert-dir",
            &certs_s,
            "--username",
            USER,
            "--password-stdin",
            &registry_name,
        ]),
        PASSWORD.as_bytes(),
        Duration::from_secs(120),
    );
    record("login", &r);
    assert_eq!(r.code, 0, "skopeo login failed: {}\n--- host\n{}", r.stderr, b.host_log());
    // The credential is in the host's keychain, where the reference helper finds it…
    let stored = secretservice(&keyring, "get", &registry_name);
    assert_eq!(stored.code, 0, "not in the keyring: {}", stored.out());
    let v: serde_json::Value = serde_json::from_slice(&stored.stdout).unwrap();
    assert_eq!(v["Username"], USER);
    assert!(v["Secret"] == PASSWORD, "the keyring holds a different secret");
    // …and not in the client's auth file.
    assert!(!std::fs::read_to_string(&authfile).unwrap().contains(PASSWORD));

    // copy (push) and inspect authenticate through the chain.
    let dest = format!("oci:{}:v1", oci.display());
    let r = run_with_input(
        skopeo(&["copy", "--authfile", &authfile_s, "--dest-cert-dir", &certs_s, &dest, &image]),
        b"",
        Duration::from_secs(180),
    );
    record("copy", &r);
    assert_eq!(r.code, 0, "skopeo copy failed: {}", r.stderr);
    let r = run_with_input(skopeo(&inspect_args), b"", Duration::from_secs(120));
    record("inspect", &r);
    assert_eq!(r.code, 0, "skopeo inspect failed: {}", r.stderr);
    let v: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap();
    assert!(v["Digest"].as_str().unwrap_or_default().starts_with("sha256:"));

    // logout erases through the chain; the registry then refuses.
    let r = run_with_input(
        skopeo(&["logout", "--authfile", &authfile_s, &registry_name]),
        b"",
        Duration::from_secs(120),
    );
    record("logout", &r);
    assert_eq!(r.code, 0, "skopeo logout failed: {}", r.stderr);
    let gone = secretservice(&keyring, "get", &registry_name);
    assert_eq!(gone.out(), "credentials not found in native keychain\n");
    let r = run_with_input(skopeo(&inspect_args), b"", Duration::from_secs(120));
    record("inspect after logout", &r);
    assert_ne!(r.code, 0, "inspect succeeded after logout");
    let text = format!("{}{}", String::from_utf8_lossy(&r.stdout), r.stderr);
    assert!(
        text.contains("unauthorized") || text.contains("authentication required"),
        "expected the registry to refuse: {text}"
    );

    // Each operation reached the host and was audited.
    let host_log = b.host_log();
    for op in ["op=\"store\"", "op=\"get\"", "op=\"erase\""] {
        assert!(host_log.contains(op), "no audit line with {op}");
    }
    assert!(
        host_log.contains("source=\"keychain:secretservice\""),
        "not served natively:\n{host_log}"
    );

    // The secret is in no log and no output the test collected.
    let registry_log = registry.output();
    let mut texts: Vec<(&str, &str)> =
        vec![("host log", &host_log), ("registry log", &registry_log)];
    let guest_log = b.guest_log();
    texts.push(("guest log", &guest_log));
    for (what, text) in &outputs {
        texts.push((what, text));
    }
    finch_tests::assert_no_secret(PASSWORD, &texts);
}

/// Every file under `dir` whose bytes hold `needle`.
fn files_holding(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else { return found };
    for entry in entries.flatten() {
        let path = entry.path();
        match entry.file_type() {
            Ok(t) if t.is_dir() => found.extend(files_holding(&path, needle)),
            Ok(t) if t.is_file() => {
                let bytes = std::fs::read(&path).unwrap_or_default();
                if bytes.windows(needle.len()).any(|w| w == needle) {
                    found.push(path);
                }
            }
            _ => {}
        }
    }
    found
}

/// Item 12 of the boundary issue: with what `install.sh` writes for containers-image tools,
/// a `podman login` the host refuses fails, and no file on the VM side holds the password
/// (podman would otherwise fall back to `containers-auth.json` and say `Login Succeeded!`).
#[test]
fn a_podman_login_the_host_refuses_fails_and_leaves_no_secret_in_the_vm() {
    let tools = ["podman", "docker-registry", "htpasswd", "openssl", "tar"];
    if !finch_tests::require("a_podman_login_the_host_refuses_fails", &tools) {
        return;
    }
    // The guest side as install.sh lays it out, on a scratch root.
    let scratch = crate::provision::scratch();
    let out = crate::provision::install(&scratch, "none");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let fragment = std::fs::read_to_string(
        scratch.root.join("etc/containers/registries.conf.d/50-finch-credential-helpers.conf"),
    )
    .unwrap();

    let mut b = Bridge::new("{}");
    std::fs::write(b.host_config(), "[vm.itvm.policy]\nstore = []\n").unwrap();
    b.start();
    let dir = b.dir.path().to_owned();
    let port = free_port();
    let (_registry, certs) = start_registry(&dir, port);
    let registry_name = format!("127.0.0.1:{port}");
    let vm_side = dir.join("vm-side");
    let (home, runtime) = (vm_side.join("home"), vm_side.join("run"));
    for d in [&home, &runtime] {
        std::fs::create_dir_all(d).unwrap();
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700)).unwrap();
    }
    let registries = vm_side.join("registries.conf");
    std::fs::write(&registries, &fragment).unwrap();
    let mut podman = Command::new("podman");
    podman
        .arg("--root")
        .arg(vm_side.join("storage"))
        .arg("--runroot")
        .arg(vm_side.join("runroot"))
        .args(["--storage-driver", "vfs", "login", "--cert-dir"])
        .arg(&certs)
        .args(["--username", USER, "--password-stdin", &registry_name])
        .env("PATH", finch_tests::path_with(&finch_tests::bin_dir()))
        .env("HOME", &home)
        .env("XDG_RUNTIME_DIR", &runtime)
        .env("CONTAINERS_REGISTRIES_CONF", &registries)
        .env("FINCH_GUEST_AGENT_SOCKET", b.helper_socket())
        .env_remove("REGISTRY_AUTH_FILE")
        .env_remove("DOCKER_CONFIG");
    let r = run_with_input(podman, PASSWORD.as_bytes(), Duration::from_secs(120));
    let said = format!("{}{}", String::from_utf8_lossy(&r.stdout), r.stderr);
    assert_ne!(r.code, 0, "podman login succeeded although the host refused the store: {said}");
    assert!(!said.contains("Login Succeeded"), "{said}");
    assert!(said.contains("denied"), "podman did not report the host's refusal: {said}");
    // The refusal reached the host (the registry accepted the password first).
    assert!(b.host_log().contains("result=\"denied\""), "{}", b.host_log());
    let encoded = base64_of(&format!("{USER}:{PASSWORD}"));
    for needle in [PASSWORD.as_bytes(), encoded.as_bytes()] {
        let found = files_holding(&vm_side, needle);
        assert!(found.is_empty(), "the password is in VM-side files: {found:?}");
    }
}

fn base64_of(text: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(text)
}
