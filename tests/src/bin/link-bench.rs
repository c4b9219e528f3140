//! Benchmark of the link (run by `scripts/bench-link`, release build):
//!
//! 1. Requests per second and latency percentiles for cached answers (the host's plaintext
//!    `auths`) over one link with 1, 16 and 256 requests in flight, over a unix link and over
//!    hybrid vsock (the host's `CONNECT`/`OK` dial through a userspace stand-in for the VMM).
//!    Each request is what a helper does: connect to the helper socket, one call, one answer.
//! 2. The host agent's resident memory with 1, 100 and 1000 simulated VMs (each a handshake
//!    and heartbeats over its own unix socket).
//!
//! `link-bench BIN_DIR [SECONDS]`: BIN_DIR holds finch-guest-agent and finch-host-agent.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::print_stdout)]

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use finch_shared::codec::{decode, encode};
use finch_shared::frame::{read_frame, write_frame};
use finch_shared::handshake::GuestHandshake;
use finch_shared::key::LinkKey;
use finch_shared::message::{HELPER_VERSION, Handshake, HelperCall, HelperReply, LinkMsg, Request};
use finch_tests::{Proc, wait_until, write_key};

const REGISTRY: &str = "bench.example";

fn get(helper: &Path) -> Option<Duration> {
    let started = Instant::now();
    let mut s = UnixStream::connect(helper).ok()?;
    let call =
        HelperCall { version: HELPER_VERSION, request: Request::Get { server: REGISTRY.into() } };
    write_frame(&mut s, &encode(&call).ok()?).ok()?;
    let reply: HelperReply = decode(&read_frame(&mut s).ok()?).ok()?;
    reply.outcome.ok()?;
    Some(started.elapsed())
}

/// Runs `in_flight` clients for `secs`; prints rate and percentiles.
fn load(label: &str, helper: &Path, in_flight: usize, secs: u64) {
    let stop = Arc::new(AtomicBool::new(false));
    let samples = Arc::new(Mutex::new(Vec::new()));
    let failures = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let started = Instant::now();
    let threads: Vec<_> = (0..in_flight)
        .map(|_| {
            let (stop, samples, failures, helper) =
                (stop.clone(), samples.clone(), failures.clone(), helper.to_owned());
            std::thread::spawn(move || {
                let mut mine = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    match get(&helper) {
                        Some(d) => mine.push(d),
                        None => {
                            failures.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                samples.lock().unwrap().extend(mine);
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(secs));
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    let elapsed = started.elapsed().as_secs_f64();
    let mut s = samples.lock().unwrap().clone();
    s.sort();
    let pct = |p: f64| s[((s.len() as f64 * p) as usize).min(s.len() - 1)].as_secs_f64() * 1000.0;
    println!(
        "{label:<8} {in_flight:>3} in flight: {:>7.0} req/s  p50 {:.3} ms  p90 {:.3} ms  p99 {:.3} ms  ({} requests, {} failed)",
        s.len() as f64 / elapsed,
        pct(0.5),
        pct(0.9),
        pct(0.99),
        s.len(),
        failures.load(Ordering::Relaxed)
    );
}

/// A VMM stand-in for hybrid vsock: `CONNECT p\n` → `OK 1\n`, then splices to `guest`.
fn vmm(listener: UnixListener, guest: PathBuf) {
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut host) = conn else { continue };
            let guest = guest.clone();
            std::thread::spawn(move || {
                let mut line = Vec::new();
                let mut b = [0u8; 1];
                while host.read_exact(&mut b).is_ok() && b[0] != b'\n' {
                    line.push(b[0]);
                }
                let Ok(mut g) = UnixStream::connect(&guest) else { return };
                if host.write_all(b"OK 1\n").is_err() {
                    return;
                }
                let (mut h2, mut g2) = (host.try_clone().unwrap(), g.try_clone().unwrap());
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut g2, &mut h2);
                    let _ = h2.shutdown(std::net::Shutdown::Both);
                });
                let _ = std::io::copy(&mut host, &mut g);
                let _ = g.shutdown(std::net::Shutdown::Both);
            });
        }
    });
}

fn host_agent(bin: &Path, dir: &Path, name: &str, config: &Path) -> Proc {
    let mut cmd = Command::new(bin.join("finch-host-agent"));
    cmd.arg("run")
        .arg("--config")
        .arg(config)
        .arg("--docker-config")
        .arg(dir.join("docker"))
        .arg("--state-dir")
        .arg(dir.join(format!("state-{name}")))
        .env("RUST_LOG", "warn");
    Proc::spawn(name, cmd, &dir.join(format!("{name}.log")))
}

fn links_bench(bin: &Path, dir: &Path, secs: u64) {
    let key = dir.join("link.key");
    write_key(&key, 5);
    let mut guest = Command::new(bin.join("finch-guest-agent"));
    guest
        .arg("serve")
        .arg("--helper-socket")
        .arg(dir.join("helper.sock"))
        .arg("--link-listen")
        .arg(format!("unix://{}", dir.join("link.sock").display()))
        .arg("--link-key-file")
        .arg(&key)
        .env("RUST_LOG", "info");
    let guest = Proc::spawn("guest", guest, &dir.join("guest.log"));
    assert!(wait_until(Duration::from_secs(20), || dir.join("link.sock").exists()));
    vmm(UnixListener::bind(dir.join("vm.vsock")).unwrap(), dir.join("link.sock"));
    for (label, endpoint) in [
        ("unix", format!("unix://{}", dir.join("link.sock").display())),
        ("hybrid", format!("hybrid://{}:6127", dir.join("vm.vsock").display())),
    ] {
        let config = dir.join(format!("{label}.toml"));
        std::fs::write(
            &config,
            format!("[vm.bench]\nendpoint = \"{endpoint}\"\nkey = \"{}\"\n", key.display()),
        )
        .unwrap();
        let before = guest.output().matches("host link up").count();
        let mut host = host_agent(bin, dir, label, &config);
        assert!(
            wait_until(Duration::from_secs(20), || guest.output().matches("host link up").count()
                > before),
            "no link over {label}:\n{}",
            host.output()
        );
        assert!(get(&dir.join("helper.sock")).is_some(), "no answer over {label}");
        for n in [1, 16, 256] {
            load(label, &dir.join("helper.sock"), n, secs);
        }
        host.kill();
    }
}

/// A simulated guest: answers one handshake, then pongs every ping, forever.
fn fake_guest(listener: UnixListener, key: LinkKey) {
    std::thread::Builder::new()
        .stack_size(64 * 1024)
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut s) = conn else { continue };
                let Ok(hello) = read_frame(&mut s).map(|f| decode::<Handshake>(&f)) else {
                    continue;
                };
                let Ok(hello) = hello else { continue };
                let Ok((guest, answer)) = GuestHandshake::answer(key.clone(), "bench-boot", hello)
                else {
                    continue;
                };
                if write_frame(&mut s, &encode(&answer).unwrap()).is_err() {
                    continue;
                }
                let Ok(Ok(proof)) = read_frame(&mut s).map(|f| decode::<Handshake>(&f)) else {
                    continue;
                };
                let Ok((_, mut session)) = guest.finish(proof) else { continue };
                while let Ok(frame) = read_frame(&mut s) {
                    let Ok(plain) = session.opener.open(&frame) else { break };
                    if let Ok(LinkMsg::Ping { seq }) = decode::<LinkMsg>(&plain) {
                        let pong = encode(&LinkMsg::Pong { seq }).unwrap();
                        let sealed = session.sealer.seal(&pong).unwrap();
                        if write_frame(&mut s, &sealed).is_err() {
                            break;
                        }
                    }
                }
            }
        })
        .unwrap();
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .unwrap()
        .trim()
        .trim_end_matches(" kB")
        .trim()
        .parse()
        .unwrap()
}

fn memory_bench(bin: &Path, dir: &Path) {
    let key_file = dir.join("mem.key");
    write_key(&key_file, 6);
    let key = LinkKey::load(&key_file).unwrap();
    let mut listeners = 0;
    for n in [1usize, 100, 1000] {
        while listeners < n {
            let path = dir.join(format!("g{listeners}.sock"));
            fake_guest(UnixListener::bind(&path).unwrap(), key.clone());
            listeners += 1;
        }
        let config = dir.join(format!("mem{n}.toml"));
        let mut text = String::new();
        for i in 0..n {
            text.push_str(&format!(
                "[vm.g{i}]\nendpoint = \"unix://{}\"\nkey = \"{}\"\n",
                dir.join(format!("g{i}.sock")).display(),
                key_file.display()
            ));
        }
        std::fs::write(&config, text).unwrap();
        let mut host = host_agent(bin, dir, &format!("mem{n}"), &config);
        let started = Instant::now();
        let state = dir.join(format!("state-mem{n}"));
        let up = wait_until(Duration::from_secs(60), || {
            let out = Command::new(bin.join("finch-host-agent"))
                .args(["status", "--json", "--state-dir"])
                .arg(&state)
                .arg("--config")
                .arg(&config)
                .output()
                .unwrap();
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
            v["vms"]
                .as_object()
                .is_some_and(|m| m.len() == n && m.values().all(|vm| vm["up"] == true))
        });
        assert!(up, "not all {n} links came up:\n{}", host.output());
        let took = started.elapsed();
        std::thread::sleep(Duration::from_secs(2));
        println!(
            "memory   {n:>4} VMs: host agent RSS {} KiB (all links up in {} ms)",
            rss_kib(host.pid()),
            took.as_millis()
        );
        host.kill();
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let bin = PathBuf::from(args.next().expect("usage: link-bench BIN_DIR [SECONDS]"));
    let secs: u64 = args.next().map_or(5, |s| s.parse().expect("seconds"));
    let dir = tempfile::Builder::new().prefix("finch-link-bench-").tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("docker")).unwrap();
    let token = "YmVuY2g6YmVuY2gtc2VjcmV0"; // bench:bench-secret
    std::fs::write(
        dir.path().join("docker/config.json"),
        format!(r#"{{"auths":{{"{REGISTRY}":{{"auth":"{token}"}}}}}}"#),
    )
    .unwrap();
    links_bench(&bin, dir.path(), secs);
    memory_bench(&bin, dir.path());
}
