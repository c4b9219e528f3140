//! Native ECR through the whole chain, against the project's own fake token endpoint
//! (`tests/fake_ecr.py`: ECR Public, future expiries, refresh-ahead, throttling, failures)
//! and against `moto_server` (profiles, assumed roles through its STS, rejected keys).

use std::time::{Duration, Instant};

use finch_tests::aws::{FakeEcr, Moto};
use finch_tests::{Bridge, HelperRun, assert_no_secret, wait_until};

pub(crate) const PRIVATE: &str = "123456789012.dkr.ecr.us-west-2.amazonaws.com";
const PUBLIC: &str = "public.ecr.aws";
pub(crate) const SECRET_KEY: &str = "fake-secret-key-do-not-log";

fn ecr_bridge(docker_config: &str, host_config: &str, fake: &FakeEcr) -> Bridge {
    let mut b = Bridge::new(docker_config);
    std::fs::write(b.host_config(), host_config).unwrap();
    b.host_env = vec![
        ("AWS_ENDPOINT_URL".into(), fake.url()),
        ("AWS_ACCESS_KEY_ID".into(), "AKIAFAKEFAKEFAKE".into()),
        ("AWS_SECRET_ACCESS_KEY".into(), SECRET_KEY.into()),
    ];
    b.start();
    b
}

fn secret(run: &HelperRun) -> String {
    assert_eq!(run.code, 0, "get failed: {}{}", run.out(), run.stderr);
    let v: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
    assert_eq!(v["Username"], "AWS");
    v["Secret"].as_str().unwrap().to_owned()
}

fn not_found(run: &HelperRun) -> &str {
    assert_eq!(
        (run.code, run.out()),
        (1, "credentials not found in native keychain\n"),
        "{}",
        run.stderr
    );
    &run.stderr
}

#[test]
fn private_and_public_tokens_served_natively_and_cached() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeEcr::start(dir.path());
    fake.control(r#"{"password": "tok-{n}"}"#);
    // credsStore names a helper that does not exist: ECR hosts go native anyway (auto).
    let b = ecr_bridge(r#"{"credsStore":"nosuchhelper"}"#, "", &fake);
    assert_eq!(secret(&b.helper("get", PRIVATE)), "tok-1");
    assert_eq!(fake.calls(), (1, 0));
    // Warm, by other spellings: no second call.
    assert_eq!(
        secret(&b.helper("get", &format!("https://{}:443/v2/", PRIVATE.to_uppercase()))),
        "tok-1"
    );
    assert_eq!(fake.calls(), (1, 0));
    assert_eq!(secret(&b.helper("get", PUBLIC)), "tok-2");
    assert_eq!(secret(&b.helper("get", "https://public.ecr.aws/v2/")), "tok-2");
    assert_eq!(fake.calls(), (1, 1));

    let (_, out, _) = b.host_cli(&["status", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["cache_entries"], 2, "{out}");
    let listed = b.helper("list", "");
    let v: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(v, serde_json::json!({PRIVATE: "AWS", PUBLIC: "AWS"}), "{}", listed.stderr);
    // store/erase are accepted and change nothing.
    let store = format!(r#"{{"ServerURL":"{PRIVATE}","Username":"AWS","Secret":"x"}}"#);
    assert_eq!(b.helper("store", &store).code, 0);
    assert_eq!(b.helper("erase", PRIVATE).code, 0);
    assert_eq!(secret(&b.helper("get", PRIVATE)), "tok-1");

    let host_log = b.host_log();
    assert!(host_log.contains("source=\"ecr\""), "{host_log}");
    let logs = [("host log", host_log.as_str()), ("guest log", &b.guest_log())];
    for s in ["tok-1", "tok-2", SECRET_KEY] {
        assert_no_secret(s, &logs);
    }
}

#[test]
fn a_hundred_concurrent_cold_lookups_make_one_upstream_call() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeEcr::start(dir.path());
    fake.control(r#"{"password": "tok-{n}", "delay": 1.5}"#);
    let b = ecr_bridge("{}", "", &fake);
    let b = &b;
    let tokens: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> =
            (0..100).map(|_| s.spawn(|| secret(&b.helper("get", PRIVATE)))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(tokens.len(), 100);
    assert!(tokens.iter().all(|t| t == "tok-1"), "{tokens:?}");
    assert_eq!(fake.calls(), (1, 0));
}

#[test]
fn refreshed_ahead_of_expiry_and_never_served_expired() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeEcr::start(dir.path());
    // A 12 s life: served as is for 6 s, served and refreshed until 10.8 s, then never.
    fake.control(r#"{"password": "tok-{n}", "life": 12}"#);
    let b = ecr_bridge("{}", "", &fake);
    let first = Instant::now();
    assert_eq!(secret(&b.helper("get", PRIVATE)), "tok-1");
    // Past half its life: still served, and exactly one refresh starts behind it.
    std::thread::sleep(Duration::from_millis(6500).saturating_sub(first.elapsed()));
    assert_eq!(secret(&b.helper("get", PRIVATE)), "tok-1");
    assert!(
        wait_until(Duration::from_secs(3), || fake.calls() == (2, 0)),
        "no refresh: {:?}",
        fake.calls()
    );
    assert_eq!(secret(&b.helper("get", PRIVATE)), "tok-2");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(fake.calls(), (2, 0), "more than one refresh");

    // Upstream now fails; once tok-2 is past its last servable moment, nothing is served.
    let refreshed = Instant::now();
    fake.control(r#"{"fail": true}"#);
    std::thread::sleep(Duration::from_millis(11500).saturating_sub(refreshed.elapsed()));
    let r = b.helper("get", PRIVATE);
    let err = not_found(&r);
    assert!(err.contains("ECR (aws)") && err.contains("ServerException"), "{err}");
    assert!(!r.out().contains("tok-2"));
}

#[test]
fn throttling_is_retried_inside_the_bound() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeEcr::start(dir.path());
    fake.control(r#"{"password": "tok-{n}", "throttle": 2}"#);
    let b = ecr_bridge("{}", "", &fake);
    assert_eq!(secret(&b.helper("get", PRIVATE)), "tok-3");
    assert_eq!(fake.calls(), (3, 0));
    fake.control(r#"{"throttle": -1}"#);
    let started = Instant::now();
    let r = b.helper("get", "210987654321.dkr.ecr.us-west-2.amazonaws.com");
    assert!(not_found(&r).contains("ECR (throttled)"), "{}", r.stderr);
    assert!(started.elapsed() < Duration::from_secs(30), "{:?}", started.elapsed());
}

#[test]
fn missing_credentials_and_routing_choices() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeEcr::start(dir.path());
    // No credentials at all: an actionable error, and AWS never called.
    let mut b = Bridge::new("{}");
    b.host_env = vec![("AWS_ENDPOINT_URL".into(), fake.url())];
    b.start();
    let r = b.helper("get", PRIVATE);
    let err = not_found(&r);
    assert!(err.contains("ECR (no-credentials)") && err.contains("aws sso login"), "{err}");
    assert_eq!(fake.calls(), (0, 0));
    drop(b);

    // auto = false: credsStore serves ECR hosts too.
    let b = ecr_bridge(r#"{"credsStore":"fakestore"}"#, "[ecr]\nauto = false\n", &fake);
    b.fake_helper(
        "fakestore",
        r#"read s; printf '{"ServerURL":"%s","Username":"fromhelper","Secret":"h"}' "$s""#,
    );
    let r = b.helper("get", PRIVATE);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.out().contains("fromhelper"), "{}", r.out());
    assert_eq!(fake.calls(), (0, 0));
    drop(b);

    // credHelpers naming ecr-login is native even with auto = false.
    let docker =
        format!(r#"{{"credsStore":"fakestore","credHelpers":{{"{PRIVATE}":"ecr-login"}}}}"#);
    let b = ecr_bridge(&docker, "[ecr]\nauto = false\n", &fake);
    assert_eq!(secret(&b.helper("get", PRIVATE)), "fake-ecr-token-1");
    assert_eq!(fake.calls(), (1, 0));
}

/// moto_server on 127.0.0.1 (with `moto_env`) and a bridge whose host config is `rules`. The
/// host's AWS config has profile `dev` (keys in the credentials file) and `nokeys` (none).
/// `None` only outside CI, when moto_server is missing (the skip is printed).
fn moto_bridge(
    test: &str,
    moto_env: &[(&str, &str)],
    rules: &str,
) -> Option<(tempfile::TempDir, Moto, Bridge)> {
    if !finch_tests::require(test, &["moto_server"]) {
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let moto = Moto::start(dir.path(), moto_env);
    let mut b = Bridge::new("{}");
    moto_profiles(&mut b, &moto);
    std::fs::write(b.host_config(), rules).unwrap();
    b.start();
    Some((dir, moto, b))
}

/// The host's AWS config for moto: profile `dev` (keys in the credentials file) and `nokeys`
/// (none); the host agent asks `moto`.
pub(crate) fn moto_profiles(b: &mut Bridge, moto: &Moto) {
    std::fs::write(
        b.path("aws-config"),
        "[profile dev]\nregion = us-west-2\n\n[profile nokeys]\nregion = us-west-2\n",
    )
    .unwrap();
    std::fs::write(
        b.path("aws-credentials"),
        format!(
            "[dev]\naws_access_key_id = AKIAMOTODEVKEY\naws_secret_access_key = {SECRET_KEY}\n"
        ),
    )
    .unwrap();
    b.host_env.push(("AWS_ENDPOINT_URL".into(), moto.url()));
}

#[test]
fn moto_profiles_assumed_roles_and_expired_tokens() {
    let Some((_dir, _moto, b)) = moto_bridge(
        "moto_profiles_assumed_roles_and_expired_tokens",
        &[],
        "[[ecr.registry]]\nregistry = \"123456789012\"\nprofile = \"dev\"\n\n\
         [[ecr.registry]]\nregistry = \"210987654321\"\nprofile = \"dev\"\nrole_arn = \"arn:aws:iam::210987654321:role/pull\"\n",
    ) else {
        return;
    };
    // The profile's own account.
    assert_eq!(secret(&b.helper("get", PRIVATE)), "123456789012-auth-token");
    // The assumed role's account: the token proves the role was used.
    let cross = "210987654321.dkr.ecr.us-west-2.amazonaws.com";
    assert_eq!(secret(&b.helper("get", cross)), "210987654321-auth-token", "{}", b.host_log());
    // moto dates its tokens in 2015: used once, never cached.
    assert_eq!(secret(&b.helper("get", PRIVATE)), "123456789012-auth-token");
    let (_, out, _) = b.host_cli(&["status", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["cache_entries"], 0, "an expired token was cached: {out}");
    assert_no_secret(SECRET_KEY, &[("host log", &b.host_log())]);
}

#[test]
fn moto_rejects_unknown_keys() {
    let Some((_dir, moto, b)) = moto_bridge(
        "moto_rejects_unknown_keys",
        &[("INITIAL_NO_AUTH_ACTION_COUNT", "0")],
        "[[ecr.registry]]\nregistry = \"*\"\nprofile = \"dev\"\n",
    ) else {
        return;
    };
    let r = b.helper("get", PRIVATE);
    let err = not_found(&r);
    assert!(
        err.contains("ECR (credentials-rejected)") && err.contains("profile \"dev\""),
        "{err}\n{}",
        moto.output()
    );
    assert_no_secret(SECRET_KEY, &[("host log", &b.host_log()), ("helper", err)]);
}

#[test]
fn skopeo_pushes_and_pulls_an_ecr_named_registry_with_the_hosts_token() {
    const TOOLS: &[&str] =
        &["ip", "docker-registry", "skopeo", "htpasswd", "openssl", "tar", "bash"];
    let test = "skopeo_pushes_and_pulls_an_ecr_named_registry_with_the_hosts_token";
    if !finch_tests::require(test, TOOLS) || !finch_tests::require_root(test) {
        return;
    }
    const TOKEN: &str = "ecr-e2e-Token-5c1d";
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let fake = FakeEcr::start(d);
    fake.control(&format!(r#"{{"password": "{TOKEN}"}}"#));
    let b = ecr_bridge("{}", "", &fake);

    let ns = finch_tests::Netns::new("ecr", &[("127.0.0.1", PRIVATE)]);
    let (config, certs) = crate::e2e_skopeo::registry_files(
        d,
        "127.0.0.1:443",
        &format!("DNS:{PRIVATE}"),
        "AWS",
        TOKEN,
    );
    let mut reg = ns.cmd("docker-registry");
    reg.arg("serve").arg(&config);
    let registry = finch_tests::Proc::spawn("docker-registry", reg, &d.join("registry.log"));
    let up = wait_until(finch_tests::STARTUP, || {
        ns.cmd("bash")
            .args(["-c", "exec 3<>/dev/tcp/127.0.0.1/443"])
            .status()
            .is_ok_and(|s| s.success())
    });
    assert!(up, "registry did not listen in the namespace:\n{}", registry.output());

    let home = d.join("client-home");
    std::fs::create_dir_all(&home).unwrap();
    let authfile = d.join("auth.json");
    std::fs::write(&authfile, format!(r#"{{"credHelpers":{{"{PRIVATE}":"finchhost"}}}}"#)).unwrap();
    let anonymous = d.join("anonymous.json");
    std::fs::write(&anonymous, "{}").unwrap();
    let policy = d.join("policy.json");
    std::fs::write(&policy, r#"{"default":[{"type":"insecureAcceptAnything"}]}"#).unwrap();
    let oci = d.join("oci-image");
    crate::e2e_skopeo::make_oci_image(&oci, d);
    let image = format!("docker://{PRIVATE}/finch/hello:v1");
    let skopeo = |args: &[&str]| {
        let mut c = ns.cmd("skopeo");
        c.arg("--policy")
            .arg(&policy)
            .args(args)
            .env("PATH", finch_tests::path_with(&finch_tests::bin_dir()))
            .env("HOME", &home)
            .env("FINCH_GUEST_AGENT_SOCKET", b.helper_socket())
            .env_remove("REGISTRY_AUTH_FILE");
        finch_tests::run_with_input(c, b"", Duration::from_secs(180))
    };
    let (auth, anon, certs_s) = (
        authfile.display().to_string(),
        anonymous.display().to_string(),
        certs.display().to_string(),
    );

    let r = skopeo(&["inspect", "--authfile", &anon, "--cert-dir", &certs_s, &image]);
    assert_ne!(r.code, 0, "the registry must refuse anonymous access");
    let src = format!("oci:{}:v1", oci.display());
    let r = skopeo(&["copy", "--authfile", &auth, "--dest-cert-dir", &certs_s, &src, &image]);
    assert_eq!(r.code, 0, "push failed: {}\n--- host\n{}", r.stderr, b.host_log());
    let pulled = d.join("pulled");
    let r = skopeo(&[
        "copy",
        "--authfile",
        &auth,
        "--src-cert-dir",
        &certs_s,
        &image,
        &format!("dir:{}", pulled.display()),
    ]);
    assert_eq!(r.code, 0, "pull failed: {}", r.stderr);
    assert!(pulled.join("manifest.json").exists());
    // One token from the host's ECR source served the push and the pull.
    assert_eq!(fake.calls(), (1, 0));
    let host_log = b.host_log();
    assert!(
        host_log.contains(&format!("registry=\"{PRIVATE}\" source=\"ecr\" result=\"ok\"")),
        "{host_log}"
    );
    assert_no_secret(
        TOKEN,
        &[("host log", &host_log), ("guest log", &b.guest_log()), ("skopeo", &r.stderr)],
    );
}

#[test]
fn doctor_resolves_each_aws_identity_without_printing_it() {
    let Some((_dir, moto, b)) = moto_bridge(
        "doctor_resolves_each_aws_identity_without_printing_it",
        &[],
        "[[ecr.registry]]\nregistry = \"123456789012\"\nprofile = \"dev\"\n\n\
         [[ecr.registry]]\nregistry = \"210987654321\"\nprofile = \"nokeys\"\n",
    ) else {
        return;
    };
    let mut doctor = std::process::Command::new(finch_tests::bin("finch-host-agent"));
    doctor
        .args(["doctor", "--vm", &b.vm_arg(), "--config"])
        .arg(b.host_config())
        .arg("--state-dir")
        .arg(b.state_dir())
        .arg("--docker-config")
        .arg(&b.docker_config);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("AWS_") {
            doctor.env_remove(k);
        }
    }
    doctor
        .env("AWS_CONFIG_FILE", b.path("aws-config"))
        .env("AWS_SHARED_CREDENTIALS_FILE", b.path("aws-credentials"))
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("AWS_ENDPOINT_URL", moto.url());
    let out = doctor.output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("OK   ecr profile dev: AWS credentials resolve"), "{text}");
    assert!(text.contains("FAIL ecr profile nokeys: ECR ("), "{text}");
    assert!(text.contains("fix: configure the profile: aws configure --profile nokeys"), "{text}");
    assert_eq!(out.status.code(), Some(1));
    assert_no_secret(
        SECRET_KEY,
        &[("doctor", &text), ("doctor stderr", &String::from_utf8_lossy(&out.stderr))],
    );
}
