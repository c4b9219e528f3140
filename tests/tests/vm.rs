//! A real VM with real vsock: a Debian kernel under QEMU (TCG) with `vhost-user-vsock-pci`
//! backed by `vhost-device-vsock`; a busybox initramfs holding the guest agent, the helper and
//! `vsock-probe`, all static. The guest agent listens on vsock; the host agent on this machine
//! dials it through the hybrid-vsock unix socket. Every socket on this side is a unix socket:
//! AF_VSOCK is never opened on this machine.
//!
//! Inside the guest `/init` installs the guest side with `lima/guest/install.sh` from a bundle
//! like the one `wire-lima-vm` makes (checksums, key, docker config), then runs store/get/list/erase through the helper, a call from uid 4242
//! (refused), a vsock_loopback connection to the agent (dropped: not the host), an impostor
//! agent with a wrong key on the link port (the host serves it nothing), and a scan of every
//! file for the secret; outside, the host agent is SIGKILLed and restarted mid-run. The guest
//! prints `FINCH-STEP name ok|fail`; the console log is kept on failure.
//!
//! `tests/vm/prepare` (run by `.ci/run`) puts the kernel, modules and static binaries in
//! `$FINCH_VM_DIR` (default `/var/cache/finch-ci/vm`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use finch_tests::{Proc, bin, run_ok, wait_until, write_key};

const REGISTRY: &str = "vm.registry.test:5000";
/// Assembled at run time inside the guest, so no file there holds it.
const SECRET: &str = "vm-s3c-ret-42";
const STEPS: &[&str] = &[
    "installed",
    "docker-config",
    "link",
    "store",
    "get",
    "list",
    "uid-refused",
    "loopback-refused",
    "relinked",
    "get-after-relink",
    "impostor-gets-nothing",
    "back",
    "get-after-impostor",
    "erase",
    "no-secret-in-files",
];

fn vm_dir() -> PathBuf {
    std::env::var_os("FINCH_VM_DIR")
        .map_or_else(|| PathBuf::from("/var/cache/finch-ci/vm"), PathBuf::from)
}

const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
mkdir -p /run && mount -t tmpfs run /run
step() { if [ "$2" = 0 ]; then echo "FINCH-STEP $1 ok"; else echo "FINCH-STEP $1 fail"; fi; }
for m in $(cat /lib/modules/order); do insmod "/lib/modules/$m.ko" || echo "FINCH-STEP insmod-$m fail"; done
REG=@REGISTRY@
SECRET="vm-s3c-$(echo cmV0LTQy | base64 -d)"
NF="credentials not found in native keychain"
export FINCH_GUEST_AGENT_SOCKET=/run/finch/helper.sock
# The guest side goes in with the same install.sh a Lima VM runs (no systemd here: --init none).
sh /bundle/install.sh --bundle /bundle --init none --link-listen vsock://-1:6127 --docker-config /root/.docker >/run/install.log 2>&1
rc=$?; step installed $rc; [ "$rc" = 0 ] || cat /run/install.log
grep -q '"credsStore": "finchhost"' /root/.docker/config.json; step docker-config $?
. /etc/default/finch-guest-agent
start_agent() { # log agent-args...
  log=$1; shift
  finch-guest-agent serve "$@" --helper-socket /run/finch/helper.sock --heartbeat-ms 1000 --link-wait-ms 3000 >> "$log" 2>&1 &
  AGENT=$!
}
links() { c=$(grep -c "host link up" /run/agent.log 2>/dev/null); echo "${c:-0}"; }
wait_links() { # count seconds
  i=0; while [ "$(links)" -lt "$1" ] && [ "$i" -lt "$2" ]; do sleep 1; i=$((i+1)); done
  [ "$(links)" -ge "$1" ]
}
has_secret() { case "$1" in *"\"Secret\":\"$SECRET\""*) return 0;; *) return 1;; esac; }

# shellcheck disable=SC2086
start_agent /run/agent.log $FINCH_GUEST_AGENT_ARGS
wait_links 1 180; rc=$?; step link $rc; [ "$rc" = 0 ] || tail -5 /run/agent.log
printf '{"ServerURL":"%s","Username":"vmuser","Secret":"%s"}' "$REG" "$SECRET" | docker-credential-finchhost store; step store $?
has_secret "$(printf %s "$REG" | docker-credential-finchhost get)"; step get $?
case "$(docker-credential-finchhost list)" in *"\"$REG\":\"vmuser\""*) step list 0;; *) step list 1;; esac
[ "$(printf %s "$REG" | vsock-probe as-uid 4242 /bin/docker-credential-finchhost get 2>/dev/null)" = "$NF" ]; step uid-refused $?
[ "$(vsock-probe connect 1 6127)" = closed ] && grep -q "not from the host" /run/agent.log; step loopback-refused $?

n=$(links)
echo "FINCH-WAIT kill-host"
wait_links $((n+1)) 180; step relinked $?
has_secret "$(printf %s "$REG" | docker-credential-finchhost get)"; step get-after-relink $?

kill "$AGENT"; wait "$AGENT"
start_agent /run/impostor.log --link-listen vsock://-1:6127 --link-key-file /etc/wrong.key
IMPOSTOR=$AGENT
sleep 10
out=$(printf %s "$REG" | docker-credential-finchhost get 2>/dev/null)
[ "$out" = "$NF" ] && ! grep -q "host link up" /run/impostor.log; step impostor-gets-nothing $?
kill "$IMPOSTOR"; wait "$IMPOSTOR"
n=$(links)
# shellcheck disable=SC2086
start_agent /run/agent.log $FINCH_GUEST_AGENT_ARGS
wait_links $((n+1)) 180; step back $?
has_secret "$(printf %s "$REG" | docker-credential-finchhost get)"; step get-after-impostor $?
printf %s "$REG" | docker-credential-finchhost erase && [ "$(printf %s "$REG" | docker-credential-finchhost get 2>/dev/null)" = "$NF" ]; step erase $?

found=$(find / /run -xdev -type f 2>/dev/null | xargs grep -l -F "$SECRET" 2>/dev/null)
[ -z "$found" ]; step no-secret-in-files $?
[ -n "$found" ] && echo "FINCH-LEAK $found"
echo FINCH-DONE
poweroff -f
"#;

/// Builds the initramfs in `dir` from the prepared parts and returns its path.
fn initramfs(dir: &Path, parts: &Path) -> PathBuf {
    let root = dir.join("root");
    for sub in ["bin", "lib/modules", "etc", "bundle", "proc", "sys", "dev", "run", "tmp", "root"] {
        std::fs::create_dir_all(root.join(sub)).unwrap();
    }
    let copy = |from: &Path, to: &Path| {
        std::fs::copy(from, to).unwrap_or_else(|e| panic!("copy {}: {e}", from.display()));
    };
    copy(&finch_tests::which("busybox").unwrap(), &root.join("bin/busybox"));
    // The bundle a Lima VM gets: binaries, SHA256SUMS, install script, key.
    for b in ["finch-guest-agent", "docker-credential-finchhost"] {
        copy(&parts.join("bin").join(b), &root.join("bundle").join(b));
        copy(&parts.join("bin").join(b), &root.join("bin").join(b));
    }
    copy(&parts.join("bin/vsock-probe"), &root.join("bin/vsock-probe"));
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    copy(&repo.join("lima/guest/install.sh"), &root.join("bundle/install.sh"));
    run_ok(
        Command::new("sh")
            .arg("-c")
            .arg("sha256sum finch-guest-agent docker-credential-finchhost > SHA256SUMS")
            .current_dir(root.join("bundle")),
        "sha256sum",
    );
    for entry in std::fs::read_dir(parts.join("modules")).unwrap() {
        let p = entry.unwrap().path();
        copy(&p, &root.join("lib/modules").join(p.file_name().unwrap()));
    }
    copy(&dir.join("link.key"), &root.join("bundle/link.key"));
    write_key(&root.join("etc/wrong.key"), 99);
    std::fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/:/bin/sh\nuser:x:4242:4242::/:/bin/sh\n",
    )
    .unwrap();
    let init = root.join("init");
    std::fs::write(&init, INIT.replace("@REGISTRY@", REGISTRY)).unwrap();
    std::fs::set_permissions(&init, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    assert!(!std::fs::read_to_string(&init).unwrap().contains(SECRET));
    let out = dir.join("initramfs.gz");
    run_ok(
        Command::new("sh").arg("-c").arg(format!(
            "cd {} && find . | cpio -o -H newc --quiet | gzip -1 > {}",
            root.display(),
            out.display()
        )),
        "cpio",
    );
    out
}

fn host_agent(dir: &Path) -> Proc {
    let mut cmd = Command::new(bin("finch-host-agent"));
    cmd.arg("run")
        .arg("--config")
        .arg(dir.join("host-agent.toml"))
        .arg("--vm")
        .arg(format!(
            "vm=hybrid://{}:6127,key={}",
            dir.join("vm.vsock").display(),
            dir.join("link.key").display()
        ))
        .arg("--docker-config")
        .arg(dir.join("docker"))
        .arg("--state-dir")
        .arg(dir.join("state"))
        .args(["--heartbeat-ms", "1000", "--reconnect-max-ms", "500"])
        .env("RUST_LOG", "debug");
    Proc::spawn("host-agent", cmd, &dir.join("host.log"))
}

#[test]
fn real_vm_over_hybrid_vsock() {
    let test = "real_vm_over_hybrid_vsock";
    if !finch_tests::require(
        test,
        &["qemu-system-x86_64", "vhost-device-vsock", "busybox", "cpio", "gzip"],
    ) {
        return;
    }
    let parts = vm_dir();
    let prepared =
        parts.join("kernel/vmlinuz").exists() && parts.join("bin/finch-guest-agent").exists();
    if !prepared {
        assert!(
            !finch_tests::in_ci(),
            "{test}: {} is not prepared (.ci/run runs tests/vm/prepare)",
            parts.display()
        );
        eprintln!("SKIPPED {test}: run tests/vm/prepare first");
        return;
    }
    let tmp = tempfile::Builder::new().prefix("finch-vm-").tempdir().unwrap();
    let d = tmp.path();
    write_key(&d.join("link.key"), 11);
    std::fs::create_dir_all(d.join("docker")).unwrap();
    std::fs::write(d.join("docker/config.json"), "{}").unwrap();
    std::fs::write(d.join("host-agent.toml"), "").unwrap();
    let initrd = initramfs(d, &parts);

    let mut vhost = Command::new("vhost-device-vsock");
    vhost.arg("--vm").arg(format!(
        "guest-cid=3,socket={},uds-path={}",
        d.join("vhost.sock").display(),
        d.join("vm.vsock").display()
    ));
    let vhost = Proc::spawn("vhost-device-vsock", vhost, &d.join("vhost.log"));
    assert!(
        wait_until(Duration::from_secs(30), || d.join("vhost.sock").exists()),
        "vhost-device-vsock:\n{}",
        vhost.output()
    );
    let mut host = host_agent(d);

    let mut qemu = Command::new("qemu-system-x86_64");
    qemu.args(["-accel", "tcg", "-cpu", "max", "-m", "256M", "-smp", "1"])
        .args([
            "-object",
            "memory-backend-memfd,id=mem,size=256M,share=on",
            "-machine",
            "pc,memory-backend=mem",
        ])
        .arg("-chardev")
        .arg(format!("socket,id=char0,path={}", d.join("vhost.sock").display()))
        .args([
            "-device",
            "vhost-user-vsock-pci,chardev=char0",
            "-nographic",
            "-no-reboot",
            "-nodefaults",
            "-serial",
            "stdio",
        ])
        .arg("-kernel")
        .arg(parts.join("kernel/vmlinuz"))
        .arg("-initrd")
        .arg(&initrd)
        .args(["-append", "console=ttyS0 quiet panic=-1 random.trust_cpu=on"]);
    let started = Instant::now();
    let mut vm = Proc::spawn("qemu", qemu, &d.join("console.log"));

    let mut restarted = false;
    let deadline = started + Duration::from_secs(420);
    let finished = loop {
        let console = vm.output();
        if !restarted && console.contains("FINCH-WAIT kill-host") {
            host.signal(nix::sys::signal::Signal::SIGKILL);
            host.kill();
            host = host_agent(d);
            restarted = true;
        }
        if console.contains("FINCH-DONE") {
            break true;
        }
        if vm.wait_exit(Duration::from_millis(200)).is_some() || Instant::now() > deadline {
            break vm.output().contains("FINCH-DONE");
        }
    };
    let _ = vm.wait_exit(Duration::from_secs(30));
    let took = started.elapsed();
    vm.kill();
    let console = vm.output();
    let host_log = std::fs::read_to_string(d.join("host.log")).unwrap_or_default();
    let report = || {
        let kept =
            std::env::temp_dir().join(format!("finch-vm-console-{}.log", std::process::id()));
        let _ = std::fs::write(&kept, &console);
        format!(
            "console kept at {}\n--- console\n{console}\n--- host agent\n{host_log}\n--- vhost-device-vsock\n{}",
            kept.display(),
            vhost.output()
        )
    };
    assert!(finished, "the guest did not finish in {took:?}\n{}", report());
    for step in STEPS {
        assert!(
            console.contains(&format!("FINCH-STEP {step} ok")),
            "step {step} did not pass\n{}",
            report()
        );
    }
    assert!(!console.contains(" fail"), "a step failed\n{}", report());
    assert!(restarted, "the host agent was never restarted");
    assert!(
        host_log.contains("the guest was not authenticated"),
        "the impostor was not refused\n{}",
        report()
    );
    finch_tests::assert_no_secret(
        SECRET,
        &[("console", &console), ("host log", &host_log), ("vhost log", &vhost.output())],
    );
    eprintln!("real VM test: {took:?} from QEMU start to power-off");
}
