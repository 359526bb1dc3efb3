//! Original destination of a connection redirected by iptables REDIRECT:
//! `SO_ORIGINAL_DST` (IPv4) and `IP6T_SO_ORIGINAL_DST` (IPv6), read from the
//! accepted socket. Explicit listeners never call this: their destination is
//! configured.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::AsRawFd;

/// `SO_ORIGINAL_DST` from `<linux/netfilter_ipv4.h>`.
const SO_ORIGINAL_DST: libc::c_int = 80;
/// `IP6T_SO_ORIGINAL_DST` from `<linux/netfilter_ipv6/ip6_tables.h>` (same value).
const IP6T_SO_ORIGINAL_DST: libc::c_int = 80;

/// The socket has no original destination (it was not redirected by NAT).
#[derive(Debug, thiserror::Error)]
#[error("no original destination: {0}")]
pub struct NoOriginalDst(#[source] pub std::io::Error);

/// Reads the pre-NAT destination of an accepted, redirected socket.
pub fn original_dst(sock: &impl AsRawFd, local: SocketAddr) -> Result<SocketAddr, NoOriginalDst> {
    let fd = sock.as_raw_fd();
    match local {
        SocketAddr::V4(_) => orig_v4(fd),
        // An IPv4 connection accepted on a dual-stack socket shows a mapped address.
        SocketAddr::V6(v6) if v6.ip().to_ipv4_mapped().is_some() => orig_v4(fd),
        SocketAddr::V6(_) => orig_v6(fd),
    }
}

fn orig_v4(fd: libc::c_int) -> Result<SocketAddr, NoOriginalDst> {
    // SAFETY: sockaddr_in is plain old data; the kernel writes at most `len` bytes.
    let mut addr: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: `fd` is a valid socket owned by the caller; `addr`/`len` are valid for writes.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_IP,
            SO_ORIGINAL_DST,
            (&mut addr as *mut libc::sockaddr_in).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(NoOriginalDst(std::io::Error::last_os_error()));
    }
    let ip = Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr));
    Ok(SocketAddr::V4(SocketAddrV4::new(
        ip,
        u16::from_be(addr.sin_port),
    )))
}

fn orig_v6(fd: libc::c_int) -> Result<SocketAddr, NoOriginalDst> {
    // SAFETY: sockaddr_in6 is plain old data; the kernel writes at most `len` bytes.
    let mut addr: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t;
    // SAFETY: as above.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_IPV6,
            IP6T_SO_ORIGINAL_DST,
            (&mut addr as *mut libc::sockaddr_in6).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(NoOriginalDst(std::io::Error::last_os_error()));
    }
    let ip = Ipv6Addr::from(addr.sin6_addr.s6_addr);
    Ok(SocketAddr::V6(SocketAddrV6::new(
        ip,
        u16::from_be(addr.sin6_port),
        addr.sin6_flowinfo,
        addr.sin6_scope_id,
    )))
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
