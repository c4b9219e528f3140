//! The front's TLS, with client certificates: what tells the VM's own clients from a
//! container. A container on the host's network (`nerdctl run --network host`) reaches the
//! VM's loopback, and one run by root connects as uid 0, which the socket table cannot tell
//! from containerd; with the default capabilities (`CAP_NET_RAW`) it can also read loopback
//! traffic. So the front speaks TLS only, and serves only a client that presents a
//! certificate from its own CA, whose key is a file of the VM's (`client.key`, root's) that no
//! container sees: containerd's `hosts.toml` names it (`ca`, `client`), and containers-image
//! finds it in `/etc/containers/certs.d/HOST:PORT/`, which install.sh links to the directory.
//!
//! The directory ([`DEFAULT_CERTS_DIR`], on the VM's `/run`: gone at shutdown, never on disk)
//! holds `ca.crt`, `client.cert` and `client.key`; the front's own certificate and key are in
//! its `server/` subdirectory (0700). The CA's key signs both certificates and is dropped. A
//! set already there is kept (containerd reads the files at every pull, so an agent restart
//! changes nothing under it) when a TLS handshake between its parts, in memory, succeeds for
//! the front's address; otherwise a new set is made.

use std::io::{Read as _, Write as _};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use pki_types::pem::PemObject;
use pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_rustls::rustls;

/// Where the front's certificates are, unless `--front-certs-dir` says otherwise.
pub const DEFAULT_CERTS_DIR: &str = "/run/finch-guest-agent/front";
/// The CA clients verify the front against (containers-image reads `*.crt` as CAs).
pub const CA_FILE: &str = "ca.crt";
/// The clients' certificate (containers-image pairs `NAME.cert` with `NAME.key`).
pub const CLIENT_CERT_FILE: &str = "client.cert";
/// The clients' key: root's (or the `--socket-group`'s, read-only).
pub const CLIENT_KEY_FILE: &str = "client.key";
/// The front's own certificate and key, in a subdirectory no client reads.
const SERVER_DIR: &str = "server";
const SERVER_CERT_FILE: &str = "front.crt";
const SERVER_KEY_FILE: &str = "front.key";
/// Most bytes of one of the files read back.
const MAX_PEM: u64 = 64 * 1024;

/// The files of one set, in `dir`.
struct Files {
    ca: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
    server_dir: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
}

impl Files {
    fn in_dir(dir: &Path) -> Files {
        let server_dir = dir.join(SERVER_DIR);
        Files {
            ca: dir.join(CA_FILE),
            client_cert: dir.join(CLIENT_CERT_FILE),
            client_key: dir.join(CLIENT_KEY_FILE),
            server_cert: server_dir.join(SERVER_CERT_FILE),
            server_key: server_dir.join(SERVER_KEY_FILE),
            server_dir,
        }
    }
}

/// A set's parts, as PEM text.
struct Set {
    ca: String,
    client_cert: String,
    client_key: String,
    server_cert: String,
    server_key: String,
}

/// The front's TLS server config for address `ip`, from the set in `dir` when it holds
/// together, else from a new one written there; `group` may read the client's key. Says
/// whether the set is new.
pub fn server_config(
    dir: &Path,
    ip: IpAddr,
    group: Option<u32>,
) -> anyhow::Result<(Arc<rustls::ServerConfig>, bool)> {
    let files = Files::in_dir(dir);
    if let Some(set) = read_set(&files)
        && let Ok(config) = checked(&set, ip)
    {
        return Ok((config, false));
    }
    let set = make_set(ip)?;
    write_set(dir, &files, &set, group)?;
    let config = checked(&set, ip).context("the front's new certificates do not hold together")?;
    Ok((config, true))
}

fn read_set(files: &Files) -> Option<Set> {
    let read = |path: &Path| -> Option<String> {
        let mut text = String::new();
        std::fs::File::open(path).ok()?.take(MAX_PEM).read_to_string(&mut text).ok()?;
        Some(text)
    };
    Some(Set {
        ca: read(&files.ca)?,
        client_cert: read(&files.client_cert)?,
        client_key: read(&files.client_key)?,
        server_cert: read(&files.server_cert)?,
        server_key: read(&files.server_key)?,
    })
}

/// A new CA, the front's certificate for `ip` and the clients' certificate, both signed by
/// the CA, whose key is then dropped. Keys are ECDSA P-256.
fn make_set(ip: IpAddr) -> anyhow::Result<Set> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose, SanType,
    };
    let named = |name: &str| {
        let mut p = CertificateParams::default();
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name.push(DnType::OrganizationName, "finch credential bridge");
        p.distinguished_name.push(DnType::CommonName, name);
        p
    };
    let mut ca_params = named("registry front CA (this VM only)");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
    let ca_key = KeyPair::generate()?;
    let ca = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, ca_key);

    let mut server = named("registry front");
    server.subject_alt_names = vec![SanType::IpAddress(ip)];
    server.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    server.use_authority_key_identifier_extension = true;
    let server_key = KeyPair::generate()?;
    let server_cert = server.signed_by(&server_key, &issuer)?;

    let mut client = named("registry front client");
    client.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    client.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    client.use_authority_key_identifier_extension = true;
    let client_key = KeyPair::generate()?;
    let client_cert = client.signed_by(&client_key, &issuer)?;
    Ok(Set {
        ca: ca.pem(),
        client_cert: client_cert.pem(),
        client_key: client_key.serialize_pem(),
        server_cert: server_cert.pem(),
        server_key: server_key.serialize_pem(),
    })
}

/// Writes `set`: the server's files first, the CA last, each atomically.
fn write_set(dir: &Path, files: &Files, set: &Set, group: Option<u32>) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mkdir = |d: &Path, mode: u32| -> anyhow::Result<()> {
        std::fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(mode))
            .with_context(|| format!("cannot set the mode of {}", d.display()))
    };
    mkdir(dir, 0o755)?;
    mkdir(&files.server_dir, 0o700)?;
    let put = |path: &Path, text: &str, mode: u32| -> anyhow::Result<()> {
        finch_shared::private::write_atomic(path, text.as_bytes(), mode)
            .with_context(|| format!("cannot write {}", path.display()))
    };
    put(&files.server_key, &set.server_key, 0o600)?;
    put(&files.server_cert, &set.server_cert, 0o600)?;
    put(&files.client_key, &set.client_key, if group.is_some() { 0o640 } else { 0o600 })?;
    if let Some(gid) = group {
        std::os::unix::fs::chown(&files.client_key, None, Some(gid)).with_context(|| {
            format!("cannot give {} to group {gid}", files.client_key.display())
        })?;
    }
    put(&files.client_cert, &set.client_cert, 0o644)?;
    put(&files.ca, &set.ca, 0o644)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn cert(pem: &str) -> anyhow::Result<CertificateDer<'static>> {
    CertificateDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| anyhow::anyhow!("a certificate: {e}"))
}

fn key(pem: &str) -> anyhow::Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| anyhow::anyhow!("a key: {e}"))
}

/// The server config of `set`, once a client holding the set's client certificate and
/// trusting its CA completed a handshake with it for `ip`.
fn checked(set: &Set, ip: IpAddr) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert(&set.ca)?)?;
    let roots = Arc::new(roots);
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
            .build()?;
    let server = Arc::new(
        rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(verifier)
            .with_single_cert(vec![cert(&set.server_cert)?], key(&set.server_key)?)?,
    );
    let client = Arc::new(
        rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_client_auth_cert(vec![cert(&set.client_cert)?], key(&set.client_key)?)?,
    );
    handshake(client, server.clone(), ip)?;
    Ok(server)
}

/// A TLS handshake between `client` and `server`, in memory.
fn handshake(
    client: Arc<rustls::ClientConfig>,
    server: Arc<rustls::ServerConfig>,
    ip: IpAddr,
) -> anyhow::Result<()> {
    let mut c = rustls::ClientConnection::new(client, ServerName::IpAddress(ip.into()))?;
    let mut s = rustls::ServerConnection::new(server)?;
    fn pass<A, B>(
        from: &mut rustls::ConnectionCommon<A>,
        to: &mut rustls::ConnectionCommon<B>,
    ) -> anyhow::Result<()> {
        let mut wire = Vec::new();
        while from.wants_write() {
            from.write_tls(&mut wire)?;
        }
        let mut rest = &wire[..];
        while !rest.is_empty() {
            to.read_tls(&mut rest)?;
            to.process_new_packets()?;
        }
        Ok(())
    }
    for _ in 0..8 {
        pass(&mut *c, &mut *s)?;
        pass(&mut *s, &mut *c)?;
        if !c.is_handshaking() && !s.is_handshaking() {
            // Data both ways proves the keys on both sides.
            c.writer().write_all(b"ping")?;
            pass(&mut *c, &mut *s)?;
            let mut got = [0u8; 4];
            s.reader().read_exact(&mut got)?;
            anyhow::ensure!(&got == b"ping", "the front's certificates: a handshake garbled data");
            return Ok(());
        }
    }
    anyhow::bail!("the front's certificates: no handshake")
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOOPBACK: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    #[test]
    fn a_set_is_made_once_and_kept_while_it_holds_together() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("front");
        let (_, made) = server_config(&dir, LOOPBACK, None).unwrap();
        assert!(made);
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &str| std::fs::metadata(dir.join(p)).unwrap().permissions().mode() & 0o777;
        assert_eq!(
            [mode(CA_FILE), mode(CLIENT_CERT_FILE), mode(CLIENT_KEY_FILE), mode(SERVER_DIR)],
            [0o644, 0o644, 0o600, 0o700]
        );
        let ca = std::fs::read(dir.join(CA_FILE)).unwrap();
        let (_, made) = server_config(&dir, LOOPBACK, None).unwrap();
        assert!(!made, "a set that holds together is kept");
        assert_eq!(std::fs::read(dir.join(CA_FILE)).unwrap(), ca);

        // Another address: the front's certificate does not name it, so a new set.
        let (_, made) = server_config(&dir, "::1".parse().unwrap(), None).unwrap();
        assert!(made);
        assert_ne!(std::fs::read(dir.join(CA_FILE)).unwrap(), ca);
    }

    #[test]
    fn a_broken_or_mixed_set_is_made_again() {
        let t = tempfile::tempdir().unwrap();
        let (a, b) = (t.path().join("a"), t.path().join("b"));
        server_config(&a, LOOPBACK, None).unwrap();
        server_config(&b, LOOPBACK, None).unwrap();
        // b's client certificate under a's CA: a client of b could not be told apart.
        std::fs::copy(b.join(CLIENT_CERT_FILE), a.join(CLIENT_CERT_FILE)).unwrap();
        std::fs::copy(b.join(CLIENT_KEY_FILE), a.join(CLIENT_KEY_FILE)).unwrap();
        assert!(server_config(&a, LOOPBACK, None).unwrap().1, "a mixed set is replaced");
        std::fs::write(b.join(CA_FILE), "not a certificate").unwrap();
        assert!(server_config(&b, LOOPBACK, None).unwrap().1, "a broken set is replaced");
        std::fs::remove_file(b.join(SERVER_DIR).join(SERVER_KEY_FILE)).unwrap();
        assert!(server_config(&b, LOOPBACK, None).unwrap().1, "a missing file: replaced");
    }

    #[test]
    fn a_client_without_the_clients_certificate_gets_no_handshake() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("front");
        let (server, _) = server_config(&dir, LOOPBACK, None).unwrap();
        let set = read_set(&Files::in_dir(&dir)).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert(&set.ca).unwrap()).unwrap();
        let anonymous = Arc::new(
            rustls::ClientConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth(),
        );
        let err = handshake(anonymous, server, LOOPBACK).unwrap_err();
        assert!(format!("{err:#}").to_lowercase().contains("certificate"), "{err:#}");
    }
}
