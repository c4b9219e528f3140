//! Registry names the way docker/cli spells them, and the other spellings clients use.
//!
//! docker/cli keys credentials by the registry's hostname (scheme and path stripped, port
//! kept), except Docker Hub, which is always `https://index.docker.io/v1/`. nerdctl, BuildKit,
//! containers-image and `docker logout` each send or store other spellings of the same
//! registry; [`spellings`] lists them so that a credential stored under one is found under all.

/// The key docker/cli uses for Docker Hub.
pub const DOCKER_HUB_KEY: &str = "https://index.docker.io/v1/";

const DOCKER_HUB_HOSTS: &[&str] =
    &["docker.io", "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com"];

/// Strips one leading `http://` or `https://` and everything from the first `/`
/// (docker/cli's `ConvertToHostname`). The port is kept.
pub fn hostname(server: &str) -> &str {
    let stripped = server
        .strip_prefix("http://")
        .or_else(|| server.strip_prefix("https://"))
        .unwrap_or(server);
    stripped.split('/').next().unwrap_or(stripped)
}

/// Whether `server` names Docker Hub.
pub fn is_docker_hub(server: &str) -> bool {
    server == DOCKER_HUB_KEY || {
        let host = hostname(server);
        DOCKER_HUB_HOSTS.iter().any(|h| h.eq_ignore_ascii_case(host))
    }
}

/// The key under which docker/cli stores the credential for `server`.
pub fn registry_key(server: &str) -> String {
    if is_docker_hub(server) { DOCKER_HUB_KEY.to_owned() } else { hostname(server).to_owned() }
}

/// Splits `host[:port]` (IPv6 in brackets) into the host and the port, if any.
pub fn split_port(hostport: &str) -> (&str, Option<&str>) {
    if let Some(rest) = hostport.strip_prefix('[') {
        if let Some(end) = rest.find(']') {
            let host_len = end + 2;
            let tail = &hostport[host_len..];
            if let Some(port) = tail.strip_prefix(':')
                && !port.is_empty()
                && port.bytes().all(|b| b.is_ascii_digit())
            {
                return (&hostport[..host_len], Some(port));
            }
        }
        return (hostport, None);
    }
    match hostport.rsplit_once(':') {
        Some((host, port))
            if !port.is_empty()
                && port.bytes().all(|b| b.is_ascii_digit())
                && !host.contains(':') =>
        {
            (host, Some(port))
        }
        _ => (hostport, None),
    }
}

/// Every spelling under which a credential for `server` may have been stored, most specific
/// first and without duplicates: the string as given, docker/cli's key, then the variants
/// nerdctl tries (`host:443`, `https://host:443`, `http://host:443`, `host`, `https://host`,
/// `http://host`) and those `docker logout` erases.
pub fn spellings(server: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(10);
    let mut push = |s: String| {
        if !s.is_empty() && !out.contains(&s) {
            out.push(s);
        }
    };
    push(server.to_owned());
    push(registry_key(server));
    if is_docker_hub(server) {
        for host in DOCKER_HUB_HOSTS {
            push((*host).to_owned());
            push(format!("https://{host}"));
        }
        return out;
    }
    let host = hostname(server);
    let (bare, port) = split_port(host);
    let mut hosts = vec![host.to_owned()];
    match port {
        None => hosts.insert(0, format!("{bare}:443")),
        Some("443") => hosts.push(bare.to_owned()),
        Some(_) => {}
    }
    for h in hosts {
        push(h.clone());
        push(format!("https://{h}"));
        push(format!("http://{h}"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_docker_cli() {
        let table = [
            ("registry.example", "registry.example"),
            ("registry.example:5000", "registry.example:5000"),
            ("https://registry.example:5000/v2/", "registry.example:5000"),
            ("http://registry.example/path", "registry.example"),
            ("docker.io", DOCKER_HUB_KEY),
            ("index.docker.io", DOCKER_HUB_KEY),
            ("https://index.docker.io/v1/", DOCKER_HUB_KEY),
            ("registry-1.docker.io", DOCKER_HUB_KEY),
            ("[::1]:5000", "[::1]:5000"),
            ("localhost:5000", "localhost:5000"),
        ];
        for (input, key) in table {
            assert_eq!(registry_key(input), key, "{input}");
        }
    }

    #[test]
    fn split_port_cases() {
        assert_eq!(split_port("h:5000"), ("h", Some("5000")));
        assert_eq!(split_port("h"), ("h", None));
        assert_eq!(split_port("[::1]:5000"), ("[::1]", Some("5000")));
        assert_eq!(split_port("[::1]"), ("[::1]", None));
        assert_eq!(split_port("::1"), ("::1", None));
        assert_eq!(split_port("h:"), ("h:", None));
    }

    #[test]
    fn spellings_cover_nerdctl_and_logout() {
        let s = spellings("registry.example");
        for want in [
            "registry.example",
            "registry.example:443",
            "https://registry.example:443",
            "http://registry.example:443",
            "https://registry.example",
            "http://registry.example",
        ] {
            assert!(s.iter().any(|x| x == want), "{want} missing from {s:?}");
        }
        assert_eq!(s[0], "registry.example");
        let s = spellings("https://registry.example:443");
        assert_eq!(s[0], "https://registry.example:443");
        assert!(s.contains(&"registry.example".to_owned()));
        let s = spellings("h:5000");
        assert_eq!(s, vec!["h:5000", "https://h:5000", "http://h:5000"]);
        let s = spellings("docker.io");
        assert_eq!(s[1], DOCKER_HUB_KEY);
        let mut dedup = s.clone();
        dedup.dedup();
        assert_eq!(dedup.len(), s.len());
    }
}
