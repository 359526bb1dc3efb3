//! Original destination of a connection redirected by iptables REDIRECT:
//! `SO_ORIGINAL_DST` (IPv4) and `IP6T_SO_ORIGINAL_DST` (IPv6), read from the
//! accepted socket. Explicit listeners never call this: their destination is
//! configured.

use std::net::SocketAddr;
use std::os::fd::AsFd;

use socket2::SockRef;

/// The socket has no original destination (it was not redirected by NAT).
#[derive(Debug, thiserror::Error)]
#[error("no original destination: {0}")]
pub struct NoOriginalDst(#[source] pub std::io::Error);

/// Reads the pre-NAT destination of an accepted, redirected socket
/// (`getsockopt` through socket2, which owns the one `unsafe` call).
pub fn original_dst(sock: &impl AsFd, local: SocketAddr) -> Result<SocketAddr, NoOriginalDst> {
    let sock = SockRef::from(sock);
    let addr = match local {
        SocketAddr::V4(_) => sock.original_dst_v4(),
        // An IPv4 connection accepted on a dual-stack socket shows a mapped address.
        SocketAddr::V6(v6) if v6.ip().to_ipv4_mapped().is_some() => sock.original_dst_v4(),
        SocketAddr::V6(_) => sock.original_dst_v6(),
    }
    .map_err(NoOriginalDst)?;
    addr.as_socket().ok_or_else(|| {
        NoOriginalDst(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "original destination is not an IP socket address",
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_socket_has_no_original_dst() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let _c = std::net::TcpStream::connect(addr).unwrap();
        let (s, _) = l.accept().unwrap();
        // Without NAT the kernel has no conntrack original tuple to report,
        // or reports the socket's own address; either way it must not panic.
        if let Ok(a) = original_dst(&s, s.local_addr().unwrap()) {
            assert_eq!(a, addr);
        }
    }
}
