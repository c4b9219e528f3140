//! Scoped tokens end to end (issue 22): containerd in the VM gets short-lived tokens cut to
//! the host's policy, never the password. Real parts: Debian's containerd and `ctr` in a
//! network namespace of the test's own (the VM: guest agent with its registry front,
//! containerd, the hosts.toml install.sh writes), Debian's docker-registry with `auth: token`
//! on a veth address the namespace reaches, the test's token server on the host's
//! 127.0.0.1 (which the namespace cannot reach), and the host agent outside, holding the
//! password.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Instant;

use finch_tests::aws::Moto;
use finch_tests::{Bridge, Netns, Proc, STARTUP, run_ok, wait_until};

use crate::e2e_skopeo::make_oci_image_layers;
use crate::ecr::PRIVATE;
use crate::tokens::{PASSWORD, TokenServer, USER, self_signed, token_log};

const TOOLS: &[&str] = &[
    "ip",
    "tc",
    "containerd",
    "ctr",
    "podman",
    "docker-registry",
    "openssl",
    "python3",
    "tar",
    "curl",
    "setpriv",
];
/// The tokens' lifetime: a pull of several layers outlives it.
const LIFETIME: u32 = 5;
/// The front's address in the namespace (its own loopback).
const FRONT: &str = "127.0.0.1:6128";
/// The front's answer deadline here, in seconds.
const ANSWER_DEADLINE: u64 = 3;

/// The VM: a network namespace with the guest agent (front on [`FRONT`]) and containerd.
struct Vm {
    ns: Netns,
    /// The host's end of the veth pair (rate-limited for the slow pull).
    veth: String,
    sock: PathBuf,
    hosts_dir: PathBuf,
    root: PathBuf,
    /// The front's certificates (`--front-certs-dir`): what the VM's own clients hold.
    certs: PathBuf,
    _containerd: Proc,
}

impl Vm {
    /// `ctr` in the namespace, in containerd namespace `namespace`.
    fn ctr(&self, namespace: &str, args: &[&str]) -> Output {
        let mut cmd = self.ns.cmd("ctr");
        cmd.arg("--address").arg(&self.sock).args(["-n", namespace]).args(args);
        cmd.output().unwrap()
    }

    /// `ctr … images push|pull --hosts-dir` through the front, with `more` flags.
    fn through_front(&self, namespace: &str, verb: &str, image: &str, more: &[&str]) -> Output {
        let hosts = self.hosts_dir.display().to_string();
        let mut args = vec!["images", verb, "--hosts-dir", &hosts];
        if verb == "pull" {
            args.extend(["--snapshotter", "native"]);
        }
        args.extend(more);
        args.push(image);
        self.ctr(namespace, &args)
    }

    /// `curl` in the namespace as one of the VM's own clients: trusting the front's CA and
    /// holding the clients' certificate.
    fn front_curl(&self) -> Command {
        let mut cmd = self.ns.cmd("curl");
        cmd.arg("--cacert").arg(self.certs.join("ca.crt"));
        cmd.arg("--cert").arg(self.certs.join("client.cert"));
        cmd.arg("--key").arg(self.certs.join("client.key"));
        cmd
    }

    /// `curl` in the namespace, as [`Vm::front_curl`]: the status, then the body.
    fn curl(&self, method: &str, url: &str, bearer: Option<&str>) -> (String, String) {
        let mut cmd = self.front_curl();
        if let Some(token) = bearer {
            cmd.arg("-H").arg(format!("Authorization: Bearer {token}"));
        }
        self.curl_with(cmd.args(["-X", method, url]))
    }

    /// Runs `cmd` (a `curl` with its arguments) with the status written after the body.
    fn curl_with(&self, cmd: &mut Command) -> (String, String) {
        let out = cmd.args(["-s", "-w", "\n%{http_code}"]).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, status) = text.rsplit_once('\n').unwrap_or(("", &text));
        (status.to_owned(), body.to_owned())
    }

    /// A token from the front's `/token`, as containerd would ask for it.
    fn token(&self, registry: &str, scope: &str) -> String {
        let url = format!("https://{FRONT}/token/{registry}?service=x&scope={scope}");
        let (status, body) = self.curl("GET", &url, None);
        assert_eq!(status, "200", "{body}");
        let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
        answer["token"].as_str().unwrap().to_owned()
    }
}

/// The subnet of test `k`: `(id, 10.231.N.1, 10.231.N.2)`, one per test and process.
fn subnet(k: u32) -> (u32, String, String) {
    let n = std::process::id() % 100 * 2 + k + 20;
    (n, format!("10.231.{n}.1"), format!("10.231.{n}.2"))
}

impl Vm {
    /// The bridge and the VM: a namespace (`tag`, subnet `net`, its hosts file mapping
    /// `names`) reached over a veth pair; `upstream` starts the registries on the host's side
    /// (and may set the host agent's environment) and returns the CA the VM trusts; the host agent holds `auths` under `host_config`
    /// (with `host_env`); install.sh `--scoped registry` wires the VM, whose guest agent runs
    /// the front in the namespace; containerd runs there too.
    fn start(
        tag: &str,
        net: u32,
        auths: &str,
        host_config: &str,
        registry: &str,
        names: &[&str],
        upstream: impl FnOnce(&mut Bridge, &Path) -> (PathBuf, Vec<Proc>),
    ) -> (Bridge, Vm, Vec<Proc>) {
        let mut b = Bridge::new(auths);
        let dir = b.path("front");
        std::fs::create_dir_all(&dir).unwrap();
        let outside = format!("10.231.{net}.1");
        let hosts: Vec<(&str, &str)> = names.iter().map(|n| (outside.as_str(), *n)).collect();
        let mut ns = Netns::new(tag, &hosts);
        let veth = ns.veth(net, &outside, &format!("10.231.{net}.2"));
        let (ca, procs) = upstream(&mut b, &dir);
        std::fs::write(b.host_config(), host_config).unwrap();

        // The VM's side, wired by install.sh --scoped; the agent runs in the namespace.
        let vm_root = dir.join("vm-root");
        std::fs::create_dir_all(&vm_root).unwrap();
        let bundle = bundle(&dir);
        let install = Path::new(env!("CARGO_MANIFEST_DIR")).join("../lima/guest/install.sh");
        let mut cmd = Command::new("sh");
        cmd.arg(&install).arg("--bundle").arg(&bundle).arg("--root").arg(&vm_root);
        let certs = dir.join("front-certs");
        cmd.arg("--front-certs-dir").arg(&certs);
        let said = run_ok(cmd.args(["--init", "none", "--scoped", registry]), "install.sh");
        assert!(said.contains("scoped:"), "{said}");
        let defaults =
            std::fs::read_to_string(vm_root.join("etc/default/finch-guest-agent")).unwrap();
        assert!(defaults.contains(&format!("--front-listen {FRONT}")), "{defaults}");
        let runner = dir.join("in-vm");
        finch_tests::write_script(&runner, &format!("exec ip netns exec {} \"$@\"", ns.name));
        b.guest_exec = Some((runner, finch_tests::bin_dir()));
        // A short answer deadline, so the hung upstream below costs little.
        b.guest_flags = vec![
            "--front-listen".into(),
            FRONT.into(),
            "--front-answer-timeout-secs".into(),
            ANSWER_DEADLINE.to_string(),
            "--front-certs-dir".into(),
            certs.display().to_string(),
        ];
        for env in [&mut b.guest_env, &mut b.host_env] {
            env.push(("SSL_CERT_FILE".into(), ca.display().to_string()));
            env.push(("RUST_LOG".into(), "trace".into()));
        }
        b.start();
        let (containerd, sock) = start_containerd(&ns, &dir.join("containerd"));
        let vm = Vm {
            ns,
            veth,
            sock,
            hosts_dir: vm_root.join("etc/containerd/certs.d"),
            root: dir.join("containerd"),
            certs,
            _containerd: containerd,
        };
        (b, vm, procs)
    }
}

/// `out`'s text, failing the test (with the guest agent's last log lines) unless it exited 0.
fn ok(b: &Bridge, out: &Output, what: &str) -> String {
    let text =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        let tail = |log: String| {
            let mut lines: Vec<String> = log.lines().rev().take(30).map(str::to_owned).collect();
            lines.reverse();
            lines.join("\n")
        };
        let (guest, host) = (tail(b.guest_log()), tail(b.host_log()));
        panic!("{what} failed:\n{text}\nguest agent:\n{guest}\nhost agent:\n{host}");
    }
    text
}

/// Starts containerd in `ns` with everything under `dir`; content is not shared between
/// containerd namespaces, so each pull fetches for real.
fn start_containerd(ns: &Netns, dir: &Path) -> (Proc, PathBuf) {
    std::fs::create_dir_all(dir).unwrap();
    let sock = dir.join("containerd.sock");
    let config = dir.join("containerd.toml");
    std::fs::write(
        &config,
        format!(
            "version = 2\nroot = \"{root}\"\nstate = \"{state}\"\n\
             disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
             [grpc]\n  address = \"{sock}\"\n\
             [plugins.\"io.containerd.metadata.v1.bolt\"]\n  content_sharing_policy = \"isolated\"\n",
            root = dir.join("root").display(),
            state = dir.join("state").display(),
            sock = sock.display(),
        ),
    )
    .unwrap();
    let mut cmd = ns.cmd("containerd");
    cmd.arg("--config").arg(&config);
    let proc = Proc::spawn("containerd", cmd, &dir.join("containerd.log"));
    assert!(wait_until(STARTUP, || sock.exists()), "containerd:\n{}", proc.output());
    (proc, sock)
}

/// The guest bundle install.sh takes: this build's binaries, their sums, a key.
fn bundle(dir: &Path) -> PathBuf {
    let bundle = dir.join("bundle");
    std::fs::create_dir_all(&bundle).unwrap();
    for name in ["finch-guest-agent", "docker-credential-finchhost"] {
        std::fs::copy(finch_tests::bin(name), bundle.join(name)).unwrap();
    }
    finch_tests::write_key(&bundle.join("link.key"), 7);
    run_ok(
        Command::new("sh")
            .current_dir(&bundle)
            .args(["-c", "sha256sum finch-guest-agent docker-credential-finchhost > SHA256SUMS"]),
        "sha256sum",
    );
    bundle
}

/// An image layout of `layers` layers, each a file of `size` random bytes, as a tar
/// `ctr images import` reads.
fn image_tar(dir: &Path, name: &str, layers: usize, size: usize) -> PathBuf {
    let work = dir.join(format!("{name}-work"));
    let contents: Vec<PathBuf> = (0..layers)
        .map(|i| {
            let content = work.join(format!("layer{i}"));
            std::fs::create_dir_all(&content).unwrap();
            // Bytes that differ per layer and per image (xorshift), so no blob is shared.
            let mut x = 0x9e37_79b9_7f4a_7c15_u64 ^ ((i as u64 + 1) << 32) ^ name.len() as u64;
            let bytes: Vec<u8> = (0..size)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            std::fs::write(content.join("data.bin"), bytes).unwrap();
            content
        })
        .collect();
    let layout = dir.join(name);
    let refs: Vec<&Path> = contents.iter().map(PathBuf::as_path).collect();
    make_oci_image_layers(&layout, &refs, &work);
    let tar = dir.join(format!("{name}.tar"));
    run_ok(Command::new("tar").arg("-C").arg(&layout).arg("-cf").arg(&tar).arg("."), "tar");
    tar
}

/// containerd pushes and pulls through the front with tokens the host got for it: the
/// password reaches the token server only from the host; a pull-only repository refuses the
/// push and the registry holds nothing new; a pull token is refused for push and for another
/// repository; tokens living 5 s carry a pull that takes longer; the VM's helper gets no
/// password; nothing secret in any log or file of the VM.
#[test]
fn containerd_pushes_and_pulls_through_the_front_with_scoped_tokens_only() {
    let test = "containerd_pushes_and_pulls_through_the_front_with_scoped_tokens_only";
    if !finch_tests::require(test, TOOLS) || !finch_tests::require_root(test) {
        return;
    }
    let (net, outside, inside) = subnet(0);
    let registry = format!("{outside}:5000");
    let auth = {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASSWORD}"))
    };
    let auths = format!(r#"{{"auths":{{"{registry}":{{"auth":"{auth}"}}}}}}"#);
    let host_config = format!(
        "[vm.itvm.policy]\nget = []\npull = [\"{registry}/a\", \"{registry}/b\", \"{registry}/slow\"]\n\
         push = [\"{registry}/a\", \"{registry}/slow\"]\n"
    );
    let mut issuer = None;
    let mut tls_files = None;
    // The registry on the host's veth address; the token server on the host's loopback.
    let (b, vm, mut upstream) =
        Vm::start("front", net, &auths, &host_config, &registry, &[], |_, dir| {
            let (tls, tls_key) = self_signed(dir, "tls", &format!("IP:{outside},IP:127.0.0.1"));
            let server = TokenServer::start(dir, &tls, &tls_key, LIFETIME);
            let registry_proc = server.registry(dir, &registry, &tls, &tls_key);
            issuer = Some(server);
            tls_files = Some((tls.clone(), tls_key));
            (tls, vec![registry_proc])
        });
    let issuer = issuer.unwrap();
    let (tls_cert, tls_key) = tls_files.unwrap();
    upstream.push(issuer.proc);
    let dir = b.path("front");
    let vm_root = dir.join("vm-root");

    // Push `a` and pull it back in another containerd namespace, through the front.
    let image_a = format!("{registry}/a:v1");
    let tar = image_tar(&dir, "small", 1, 64 * 1024);
    let base = format!("{registry}/a");
    let tar_arg = tar.display().to_string();
    ok(
        &b,
        &vm.ctr("push", &["images", "import", "--all-platforms", "--base-name", &base, &tar_arg]),
        "import",
    );
    ok(&b, &vm.through_front("push", "push", &image_a, &[]), "push a");
    ok(&b, &vm.through_front("pull", "pull", &image_a, &[]), "pull a");
    let listed = ok(&b, &vm.ctr("pull", &["images", "ls", "-q"]), "ls");
    assert!(listed.contains(&image_a), "{listed}");

    // podman pulls `a` through the front too, as a mirror (install.sh's registries.conf.d):
    // its own path to the registry would get nothing (the VM's `get` rule is empty).
    let tokens_before = b.guest_log().matches("registry front: token").count();
    // A registries.conf named by CONTAINERS_REGISTRIES_CONF reads no drop-in directory:
    // install.sh's drop-ins, in their order, make the whole file.
    let drop_ins = vm_root.join("etc/containers/registries.conf.d");
    let conf = dir.join("registries.conf");
    let mut text = String::new();
    for name in ["50-finch-credential-helpers.conf", "60-finch-bridge-scoped.conf"] {
        text += &std::fs::read_to_string(drop_ins.join(name)).unwrap();
    }
    std::fs::write(&conf, text).unwrap();
    let podman_dir = dir.join("podman");
    let mut podman = vm.ns.cmd("podman");
    podman
        .arg("--root")
        .arg(podman_dir.join("root"))
        .arg("--runroot")
        .arg(podman_dir.join("run"))
        .args(["--storage-driver", "vfs", "--cgroup-manager", "cgroupfs"])
        .args(["--events-backend", "file", "pull", "--quiet"])
        // install.sh's certs.d links to the front's certificates (podman reads the VM's
        // /etc/containers/certs.d; here the scratch root's, named).
        .arg("--cert-dir")
        .arg(vm_root.join(format!("etc/containers/certs.d/{FRONT}")))
        .arg(&image_a)
        .env("CONTAINERS_REGISTRIES_CONF", &conf)
        .env("PATH", finch_tests::path_with(&finch_tests::bin_dir()))
        .env("FINCH_GUEST_AGENT_SOCKET", b.helper_socket())
        .env("HOME", &podman_dir);
    ok(&b, &podman.output().unwrap(), "podman pull through the mirror");
    let guest_log = b.guest_log();
    assert!(guest_log.matches("registry front: token").count() > tokens_before, "{guest_log}");
    assert!(guest_log.contains("granted=[\"repository:a:pull\"]"), "{guest_log}");

    // `b` may be pulled, not pushed: the push fails and the registry holds no `b`.
    let image_b = format!("{registry}/b:v1");
    ok(&b, &vm.ctr("push", &["images", "tag", &image_a, &image_b]), "tag");
    let refused = vm.through_front("push", "push", &image_b, &[]);
    assert!(!refused.status.success(), "a push the policy does not grant succeeded");
    let b_pull = vm.token(&registry, "repository:b:pull");
    let (status, body) =
        vm.curl("GET", &format!("https://{FRONT}/v2/b/tags/list?ns={registry}"), Some(&b_pull));
    assert_eq!(status, "404", "the registry holds a b: {body}");

    // What a container on the VM's network is (`--network host`, root: uid 0, as allowed as
    // containerd): a client without the front's client certificate. It gets no handshake, so
    // no token and no forward, however it asks; the token server hears nothing of it.
    let heard = token_log(&issuer.log).len();
    let tokens = b.guest_log().matches("registry front: token").count();
    let token_url = format!("https://{FRONT}/token/{registry}?scope=repository:a:pull");
    let mut no_cert = vm.ns.cmd("curl");
    no_cert.arg("--cacert").arg(vm.certs.join("ca.crt"));
    let (status, body) = vm.curl_with(no_cert.arg(&token_url));
    assert_eq!(status, "000", "a client without the certificate was answered: {body}");
    let mut insecure = vm.ns.cmd("curl");
    let (status, _) =
        vm.curl_with(insecure.args(["--insecure", &format!("https://{FRONT}/r/{registry}/v2/")]));
    assert_eq!(status, "000", "a client that trusts anything was answered");
    let mut plain = vm.ns.cmd("curl");
    let (status, _) = vm.curl_with(plain.arg(format!("http://{FRONT}/token/{registry}")));
    assert_eq!(status, "000", "plain HTTP was answered");
    // A certificate of its own, from a CA of its own, is no better.
    let (own, own_key) = self_signed(&dir, "own-client", "IP:127.0.0.1");
    let mut forged = vm.ns.cmd("curl");
    forged.arg("--cacert").arg(vm.certs.join("ca.crt")).arg("--cert").arg(&own);
    let (status, _) = vm.curl_with(forged.arg("--key").arg(&own_key).arg(&token_url));
    assert_eq!(status, "000", "a client certificate of another CA was answered");
    let log = b.guest_log();
    assert!(log.contains("registry front: TLS handshake refused"), "{log}");
    assert_eq!(log.matches("registry front: token").count(), tokens, "a token was given");
    assert_eq!(token_log(&issuer.log).len(), heard, "the token server was asked");

    // The front's own bounds: a caller whose uid is not allowed gets no answer at all, even
    // holding the certificate (copies it may read); a request head over 16 KiB and a token
    // form over 8 KiB are refused.
    let open_copies = tempfile::tempdir().unwrap();
    let readable = open_copies.path();
    std::fs::set_permissions(readable, std::fs::Permissions::from_mode(0o755)).unwrap();
    for name in ["ca.crt", "client.cert", "client.key"] {
        std::fs::copy(vm.certs.join(name), readable.join(name)).unwrap();
        std::fs::set_permissions(readable.join(name), std::fs::Permissions::from_mode(0o644))
            .unwrap();
    }
    let mut nobody = vm.ns.cmd("setpriv");
    nobody.args(["--reuid=65534", "--regid=65534", "--clear-groups", "curl"]);
    nobody.arg("--cacert").arg(readable.join("ca.crt"));
    nobody.arg("--cert").arg(readable.join("client.cert"));
    nobody.arg("--key").arg(readable.join("client.key"));
    let (status, _) = vm.curl_with(nobody.arg(format!("https://{FRONT}/v2/")));
    assert_eq!(status, "000", "an uid that is not allowed was answered");
    assert!(b.guest_log().contains("registry front: uid not allowed"));
    let mut big_head = vm.front_curl();
    big_head.arg("-H").arg(format!("X-Filler: {}", "x".repeat(20 * 1024)));
    let (status, _) = vm.curl_with(big_head.arg(format!("https://{FRONT}/r/{registry}/v2/")));
    assert_eq!(status, "431");
    let mut big_form = vm.front_curl();
    big_form.arg("--data-binary").arg(format!("scope={}", "x".repeat(9 * 1024)));
    let (status, body) = vm.curl_with(big_form.arg(format!("https://{FRONT}/token/{registry}")));
    assert_eq!(status, "400", "{body}");

    // 64 connections at once: a 65th caller waits (in the backlog) until one goes; a
    // connection that sends nothing is closed after 30 s.
    let hold = "import socket, sys\n\
                held = [socket.create_connection(('127.0.0.1', 6128)) for _ in range(64)]\n\
                print('held', flush=True)\nsys.stdin.read()\n";
    let mut holder = vm
        .ns
        .cmd("python3")
        .args(["-c", hold])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(holder.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line.trim(), "held");
    let mut waits = vm.front_curl();
    waits.args(["--max-time", "2"]).arg(format!("https://{FRONT}/v2/"));
    let (status, _) = vm.curl_with(&mut waits);
    assert_eq!(status, "000", "a 65th connection was served");
    drop(holder.stdin.take());
    holder.wait().unwrap();
    let (status, _) = vm.curl("GET", &format!("https://{FRONT}/v2/"), None);
    assert_eq!(status, "401", "the front did not serve again");

    // Upstreams that misbehave, in the VM's namespace: one that accepts and never speaks is
    // answered 502 at the deadline; one whose answer head is 1 MB, 502 at once (hyper reads
    // at most about twice its 64 KiB buffer before it gives up on an incomplete head); the
    // front serves on.
    let silent_port = finch_tests::free_port();
    let silent = format!(
        "import socket\ns = socket.socket()\ns.bind(('127.0.0.1', {silent_port}))\ns.listen()\n\
         held = []\nwhile True:\n    held.append(s.accept())\n"
    );
    let mut cmd = vm.ns.cmd("python3");
    cmd.args(["-c", &silent]);
    let _silent = Proc::spawn("silent", cmd, &dir.join("silent.log"));
    let huge_port = finch_tests::free_port();
    let huge = dir.join("huge-challenge");
    std::fs::write(&huge, format!("Bearer realm=\"https://x/{}\"", "a".repeat(1_000_000))).unwrap();
    let stub = Path::new(env!("CARGO_MANIFEST_DIR")).join("tokens/stub_registry.py");
    let mut cmd = vm.ns.cmd("python3");
    cmd.arg(&stub).arg(huge_port.to_string()).args([&tls_cert, &tls_key, &huge]);
    let _huge = Proc::spawn("huge", cmd, &dir.join("huge.log"));
    let listening = |port: u16| {
        vm.ns
            .cmd("python3")
            .args([
                "-c",
                &format!("import socket; socket.create_connection(('127.0.0.1', {port}))"),
            ])
            .status()
            .is_ok_and(|s| s.success())
    };
    assert!(wait_until(STARTUP, || listening(silent_port) && listening(huge_port)));
    let (status, body) =
        vm.curl("GET", &format!("https://{FRONT}/r/127.0.0.1:{silent_port}/v2/"), None);
    assert_eq!(status, "502", "{body}");
    assert!(body.contains(&format!("did not answer within {ANSWER_DEADLINE} s")), "{body}");
    let (status, body) =
        vm.curl("GET", &format!("https://{FRONT}/r/127.0.0.1:{huge_port}/v2/"), None);
    assert_eq!(status, "502", "{body}");

    // A token for `a:pull` is good for that only: not for `b`, not for a push.
    let a_pull = vm.token(&registry, "repository:a:pull");
    let (status, _) =
        vm.curl("GET", &format!("https://{FRONT}/v2/a/tags/list?ns={registry}"), Some(&a_pull));
    assert_eq!(status, "200");
    let (status, _) =
        vm.curl("GET", &format!("https://{FRONT}/v2/b/tags/list?ns={registry}"), Some(&a_pull));
    assert_eq!(status, "401");
    let upload = format!("https://{FRONT}/v2/a/blobs/uploads/?ns={registry}");
    let (status, _) = vm.curl("POST", &upload, Some(&a_pull));
    assert_eq!(status, "401");

    // Tokens living 5 s carry a pull that takes longer: five 4 MiB layers at 8 Mbit/s, one
    // after the other. (containerd 1.6 keeps a token until a 401, and distribution accepts
    // one 60 s past its expiry: the pull needs no second token.) The next client, later,
    // gets a fresh token: the host never hands out one that has expired.
    let image_slow = format!("{registry}/slow:v1");
    let tar = image_tar(&dir, "slow", 5, 4 << 20);
    let base = format!("{registry}/slow");
    let tar_arg = tar.display().to_string();
    ok(
        &b,
        &vm.ctr("push", &["images", "import", "--all-platforms", "--base-name", &base, &tar_arg]),
        "import slow",
    );
    ok(&b, &vm.through_front("push", "push", &image_slow, &[]), "push slow");
    let before = token_log(&issuer.log).len();
    run_ok(
        Command::new("tc")
            .args(["qdisc", "add", "dev", &vm.veth, "root", "tbf", "rate", "8mbit"])
            .args(["burst", "64kb", "latency", "2s"]),
        "tc",
    );
    let started = Instant::now();
    let one_at_a_time = ["--max-concurrent-downloads", "1"];
    let pulled = vm.through_front("slow", "pull", &image_slow, &one_at_a_time);
    let took = started.elapsed();
    let _ = Command::new("tc").args(["qdisc", "del", "dev", &vm.veth, "root"]).status();
    ok(&b, &pulled, "the slow pull");
    let lifetimes = took.as_secs() / u64::from(LIFETIME);
    assert!(lifetimes >= 3, "the pull did not outlive its token ({took:?})");
    ok(&b, &vm.through_front("slow-again", "pull", &image_slow, &[]), "the second pull");
    let slow_grants: Vec<serde_json::Value> = token_log(&issuer.log)[before..]
        .iter()
        .filter(|l| l["asked"].to_string().contains("slow"))
        .cloned()
        .collect();
    assert_eq!(slow_grants.len(), 2, "a token past its life was handed out: {slow_grants:?}");

    // The password went to the token server from the host only, and the VM's namespace
    // never reached it at all.
    let lines = token_log(&issuer.log);
    assert!(lines.iter().any(|l| l["password"] == true), "{lines:?}");
    for line in &lines {
        assert_eq!(line["peer"], "127.0.0.1", "{line}");
        assert_ne!(line["peer"], inside.as_str());
    }
    // The VM's helper gets no password for the registry.
    let mut helper = vm.ns.cmd(finch_tests::bin("docker-credential-finchhost"));
    helper.env("FINCH_GUEST_AGENT_SOCKET", b.helper_socket()).arg("get");
    let got = finch_tests::run_with_input(helper, registry.as_bytes(), STARTUP);
    assert_eq!(got.code, 1, "{}", got.out());
    assert!(got.stderr.contains("denied"), "{}", got.stderr);

    // `status` says which path the registry took: tokens only.
    let (_, status, _) = b.host_cli(&["status"]);
    assert!(status.contains(&format!("  {registry}: scoped tokens (")), "{status}");

    let host_log = b.host_log();
    assert!(host_log.contains("op=\"token\""), "{host_log}");
    assert!(
        host_log.contains("refused=[\"repository:b:push\"]")
            || host_log.contains("repository:b:pull,push"),
        "{host_log}"
    );
    let guest_log = b.guest_log();
    assert!(guest_log.contains(" TRACE "), "trace was not in force");
    assert!(
        !guest_log.contains("TRACE hyper") && !guest_log.contains("TRACE rustls"),
        "the HTTP and TLS crates logged below warn"
    );
    assert!(guest_log.contains("registry front: token"), "{guest_log}");
    let secrets = [PASSWORD, &auth, &b_pull, &a_pull];
    let logs = [("host log", host_log.as_str()), ("guest log", guest_log.as_str())];
    for (what, text) in logs {
        for s in secrets {
            assert!(!text.contains(s), "a secret in the {what}");
        }
    }
    // No file of the VM holds the password: containerd's root and state, the VM's /etc.
    for tree in [&vm.root, &vm_root] {
        let out = Command::new("grep")
            .args(["-rlF", "-e", PASSWORD, "-e", &auth])
            .arg(tree)
            .output()
            .unwrap();
        assert!(out.stdout.is_empty(), "the password in {}", String::from_utf8_lossy(&out.stdout));
    }
}

/// A registry that asks for Basic credentials (ECR's way) under an ECR name: containerd
/// pushes and pulls through the front with nothing of its own, the front adding the host's
/// ECR token (from moto_server) itself; the token appears in no log and no file of the VM.
#[test]
fn an_ecr_registry_is_served_with_the_token_the_front_adds() {
    let test = "an_ecr_registry_is_served_with_the_token_the_front_adds";
    if !finch_tests::require(test, TOOLS)
        || !finch_tests::require(test, &["moto_server", "htpasswd"])
        || !finch_tests::require_root(test)
    {
        return;
    }
    /// What moto answers for account 123456789012.
    const ECR_TOKEN: &str = "123456789012-auth-token";
    let (net, outside, _) = subnet(1);
    let host_config = format!(
        "[[ecr.registry]]\nregistry = \"123456789012\"\nprofile = \"dev\"\n\n\
         [vm.itvm.policy]\nget = [\"{PRIVATE}\"]\n"
    );
    let mut moto = None;
    let (b, vm, _upstream) =
        Vm::start("front-ecr", net, "{}", &host_config, PRIVATE, &[PRIVATE], |b, dir| {
            let started = Moto::start(dir, &[]);
            crate::ecr::moto_profiles(b, &started);
            moto = Some(started);
            let (config, certs) = crate::e2e_skopeo::registry_files(
                dir,
                &format!("{outside}:443"),
                &format!("DNS:{PRIVATE}"),
                "AWS",
                ECR_TOKEN,
            );
            // Its certificate again, as an end entity (rustls refuses a CA in that place).
            let (cert, key) = (certs.join("ca.crt"), dir.join("registry.key"));
            let not_ca = ["basicConstraints=critical,CA:FALSE"];
            finch_tests::self_signed_cert(&cert, &key, &format!("DNS:{PRIVATE}"), &not_ca);
            let mut cmd = Command::new("docker-registry");
            cmd.arg("serve").arg(&config);
            let registry = Proc::spawn("docker-registry", cmd, &dir.join("ecr-registry.log"));
            let up = wait_until(STARTUP, || {
                std::net::TcpStream::connect((outside.as_str(), 443)).is_ok()
            });
            assert!(up, "{}", registry.output());
            (certs.join("ca.crt"), vec![registry])
        });

    let image = format!("{PRIVATE}/finch/hello:v1");
    let tar = image_tar(&b.path("front"), "ecr", 1, 64 * 1024);
    let tar_arg = tar.display().to_string();
    let base = format!("{PRIVATE}/finch/hello");
    let import = ["images", "import", "--all-platforms", "--base-name", &base, &tar_arg];
    ok(&b, &vm.ctr("push", &import), "import");
    ok(&b, &vm.through_front("push", "push", &image, &[]), "push to ECR");
    ok(&b, &vm.through_front("pull", "pull", &image, &[]), "pull from ECR");
    let guest_log = b.guest_log();
    assert!(guest_log.contains(&format!("registry={PRIVATE} status=201")), "{guest_log}");
    let (_, status, _) = b.host_cli(&["status"]);
    assert!(status.contains(&format!("  {PRIVATE}: secrets through get (")), "{status}");
    let host_log = b.host_log();
    assert!(
        host_log.contains(&format!("registry=\"{PRIVATE}\" source=\"ecr\" result=\"ok\"")),
        "{host_log}"
    );
    for (what, text) in [("host log", host_log.as_str()), ("guest log", guest_log.as_str())] {
        for secret in [ECR_TOKEN, crate::ecr::SECRET_KEY] {
            assert!(!text.contains(secret), "a secret in the {what}");
        }
    }
    let out = Command::new("grep").args(["-rlF", ECR_TOKEN]).arg(&vm.root).output().unwrap();
    assert!(out.stdout.is_empty(), "the ECR token in {}", String::from_utf8_lossy(&out.stdout));
    drop(moto);
}
