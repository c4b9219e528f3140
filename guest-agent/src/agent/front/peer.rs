//! Who is on the other end of a loopback TCP connection. A TCP socket carries no peer
//! credentials, but on loopback both ends live in this network namespace: the kernel lists
//! the peer's socket in `/proc/net/tcp` (or `tcp6`) with its owner's uid, its local address
//! being our peer's and its remote address ours.

use std::io::{BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Most lines read from a socket table before giving up (a namespace with more sockets
/// than this is not one the front serves).
const MAX_LINES: usize = 1 << 20;
/// `TCP_TIME_WAIT` and `TCP_LISTEN` in the table's `st` column: never the live peer.
const TIME_WAIT: u8 = 0x06;
const LISTEN: u8 = 0x0a;

/// The uid owning the socket at `peer` connected to `local`, if the table lists it.
pub fn loopback_peer_uid(local: SocketAddr, peer: SocketAddr) -> std::io::Result<Option<u32>> {
    let table = match peer.ip() {
        IpAddr::V4(_) => "/proc/net/tcp",
        IpAddr::V6(_) => "/proc/net/tcp6",
    };
    let file = std::fs::File::open(table)?;
    find(BufReader::new(file), local, peer)
}

/// [`loopback_peer_uid`] over a table's text.
fn find(table: impl BufRead, local: SocketAddr, peer: SocketAddr) -> std::io::Result<Option<u32>> {
    for line in table.lines().skip(1).take(MAX_LINES) {
        let line = line?;
        let mut fields = line.split_whitespace();
        let (Some(_), Some(from), Some(to), Some(state)) =
            (fields.next(), fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        // tx_queue:rx_queue, tr:tm->when, retrnsmt, then the uid.
        let uid = fields.nth(3);
        let state = u8::from_str_radix(state, 16).unwrap_or(TIME_WAIT);
        if state == TIME_WAIT || state == LISTEN {
            continue;
        }
        if parse_addr(from) == Some(peer) && parse_addr(to) == Some(local) {
            return Ok(uid.and_then(|u| u.parse().ok()));
        }
    }
    Ok(None)
}

/// A table address, `0100007F:1F90`: the address as the kernel's words print it (each
/// 32-bit word in this machine's byte order), then the port.
fn parse_addr(text: &str) -> Option<SocketAddr> {
    let (ip, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |i: usize| -> Option<[u8; 4]> {
        let hex = ip.get(i * 8..i * 8 + 8)?;
        Some(u32::from_str_radix(hex, 16).ok()?.to_ne_bytes())
    };
    let ip = match ip.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(0)?)),
        32 => {
            let mut bytes = [0u8; 16];
            for i in 0..4 {
                bytes[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            IpAddr::V6(Ipv6Addr::from(bytes))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_peers_own_line_gives_its_uid() {
        // Written as a little-endian kernel prints them.
        let ours = if cfg!(target_endian = "little") { "0100007F" } else { "7F000001" };
        let table = format!(
            "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
             0: {ours}:17E0 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1\n\
             1: {ours}:17E0 {ours}:9C40 01 00000000:00000000 00:00000000 00000000     0        0 2 1\n\
             2: {ours}:9C40 {ours}:17E0 06 00000000:00000000 00:00000000 00000000     0        0 0 1\n\
             3: {ours}:9C40 {ours}:17E0 01 00000000:00000000 00:00000000 00000000  1000        0 3 1\n"
        );
        let local: SocketAddr = "127.0.0.1:6112".parse().unwrap();
        let peer: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        assert_eq!(find(table.as_bytes(), local, peer).unwrap(), Some(1000));
        let stranger: SocketAddr = "127.0.0.1:40001".parse().unwrap();
        assert_eq!(find(table.as_bytes(), local, stranger).unwrap(), None);
    }

    #[test]
    fn a_real_loopback_connection_is_found_with_this_processs_uid() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (_server, peer) = listener.accept().unwrap();
        assert_eq!(peer, client.local_addr().unwrap());
        let uid = loopback_peer_uid(listener.local_addr().unwrap(), peer).unwrap();
        assert_eq!(uid, Some(nix::unistd::getuid().as_raw()));

        let listener6 = std::net::TcpListener::bind("[::1]:0").unwrap();
        let _client6 = std::net::TcpStream::connect(listener6.local_addr().unwrap()).unwrap();
        let (_server6, peer6) = listener6.accept().unwrap();
        let uid6 = loopback_peer_uid(listener6.local_addr().unwrap(), peer6).unwrap();
        assert_eq!(uid6, Some(nix::unistd::getuid().as_raw()));
    }
}
