//! Packet capture inside a pod: an `AF_PACKET` socket opened by a thread
//! that joined the pod's network namespace, parsing Ethernet, IPv4/IPv6
//! and TCP just enough to record payload bytes.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Which way a payload went, relative to the captured port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Towards the port (usually client to server).
    ToPort,
    /// From the port (usually server to client).
    FromPort,
}

/// The first payload seen in each direction.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FirstPayloads {
    /// First bytes sent to the port.
    pub to_port: Option<Vec<u8>>,
    /// First bytes sent from the port.
    pub from_port: Option<Vec<u8>>,
}

/// One TCP segment's payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    /// Which way it went.
    pub direction: Direction,
    /// Its payload (never empty).
    pub bytes: Vec<u8>,
}

/// A running capture; stops on drop.
pub struct Capture {
    segments: Arc<Mutex<Vec<Segment>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// Whether `bytes` start like a TLS record of a handshake (content type 22,
/// major version 3), as every TLS connection's first bytes do.
pub fn looks_like_tls(bytes: &[u8]) -> bool {
    bytes.len() >= 5 && bytes[0] == 0x16 && bytes[1] == 0x03
}

impl Capture {
    /// Starts capturing on `iface` of the namespace at `netns`; returns once
    /// the socket is bound, so traffic sent afterwards is seen.
    pub(crate) fn start(netns: PathBuf, iface: &str, tcp_port: u16) -> Capture {
        let segments = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = mpsc::channel();
        let iface = iface.to_owned();
        let thread = {
            let (segments, stop) = (segments.clone(), stop.clone());
            std::thread::spawn(move || {
                super::net::enter_netns(&netns);
                let socket = match PacketSocket::bind(&iface) {
                    Ok(socket) => socket,
                    Err(e) => {
                        let _ = ready_tx.send(Err(format!("capture on {iface}: {e}")));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(()));
                let mut frame = vec![0u8; 65536];
                while !stop.load(Ordering::Relaxed) {
                    let Some(len) = socket.recv(&mut frame) else {
                        continue;
                    };
                    if let Some(segment) = tcp_payload(&frame[..len], tcp_port) {
                        segments.lock().expect("capture lock").push(segment);
                    }
                }
            })
        };
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("{e}"),
            Err(_) => panic!("capture thread died before it was ready"),
        }
        Capture {
            segments,
            stop,
            thread: Some(thread),
        }
    }

    /// Every non-empty TCP payload seen so far, in order.
    pub fn payloads(&self) -> Vec<Segment> {
        self.segments.lock().expect("capture lock").clone()
    }

    /// The first payload in each direction, waiting up to `within` for
    /// both to appear.
    pub fn first_payloads(&self, within: Duration) -> FirstPayloads {
        let deadline = Instant::now() + within;
        loop {
            let mut first = FirstPayloads::default();
            for Segment { direction, bytes } in self.payloads() {
                let slot = match direction {
                    Direction::ToPort => &mut first.to_port,
                    Direction::FromPort => &mut first.from_port,
                };
                slot.get_or_insert(bytes);
            }
            let complete = first.to_port.is_some() && first.from_port.is_some();
            if complete || Instant::now() >= deadline {
                return first;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// An `AF_PACKET` socket bound to one interface, with a short receive
/// timeout so the loop notices `stop`.
struct PacketSocket {
    fd: std::os::fd::OwnedFd,
}

impl PacketSocket {
    // rustix has no `sockaddr_ll` (AF_PACKET) address, so this one socket
    // is made with libc directly.
    #[allow(
        unsafe_code,
        reason = "AF_PACKET socket, bind to sockaddr_ll and SO_RCVTIMEO through libc"
    )]
    fn bind(iface: &str) -> std::io::Result<PacketSocket> {
        use std::os::fd::{AsRawFd, FromRawFd};
        let name = std::ffi::CString::new(iface).map_err(std::io::Error::other)?;
        let protocol = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain syscalls on values we own; every pointer passed
        // points to a live, correctly sized value.
        unsafe {
            let index = libc::if_nametoindex(name.as_ptr());
            if index == 0 {
                return Err(std::io::Error::last_os_error());
            }
            let raw = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(protocol));
            if raw < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let fd = std::os::fd::OwnedFd::from_raw_fd(raw);
            let mut addr: libc::sockaddr_ll = std::mem::zeroed();
            addr.sll_family = libc::AF_PACKET as u16;
            addr.sll_protocol = protocol;
            addr.sll_ifindex = index as i32;
            let addr_ptr = (&raw const addr).cast::<libc::sockaddr>();
            if libc::bind(
                fd.as_raw_fd(),
                addr_ptr,
                size_of::<libc::sockaddr_ll>() as u32,
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            let timeout = libc::timeval {
                tv_sec: 0,
                tv_usec: 50_000,
            };
            let timeout_ptr = (&raw const timeout).cast::<libc::c_void>();
            let len = size_of::<libc::timeval>() as u32;
            if libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                timeout_ptr,
                len,
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(PacketSocket { fd })
        }
    }

    /// One frame, or None on timeout.
    fn recv(&self, frame: &mut [u8]) -> Option<usize> {
        // A timeout (EAGAIN) or an interrupted call reads as no frame.
        rustix::net::recv(&self.fd, frame, rustix::net::RecvFlags::empty())
            .ok()
            .map(|(n, _)| n)
    }
}

/// The TCP payload of an Ethernet frame, when it is TCP to or from `port`
/// and carries data.
fn tcp_payload(frame: &[u8], port: u16) -> Option<Segment> {
    let ethertype = u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]);
    let ip = frame.get(14..)?;
    let (protocol, header_len, total_len) = match ethertype {
        0x0800 => {
            let header_len = usize::from(ip.first()? & 0x0f) * 4;
            let total_len = usize::from(u16::from_be_bytes([*ip.get(2)?, *ip.get(3)?]));
            (*ip.get(9)?, header_len, total_len)
        }
        // Extension headers are not followed: the tests do not send any.
        0x86dd => {
            let payload_len = usize::from(u16::from_be_bytes([*ip.get(4)?, *ip.get(5)?]));
            (*ip.get(6)?, 40, 40 + payload_len)
        }
        _ => return None,
    };
    const TCP: u8 = 6;
    if protocol != TCP {
        return None;
    }
    let tcp = ip.get(header_len..total_len.min(ip.len()))?;
    let src = u16::from_be_bytes([*tcp.first()?, *tcp.get(1)?]);
    let dst = u16::from_be_bytes([*tcp.get(2)?, *tcp.get(3)?]);
    let data_offset = usize::from(tcp.get(12)? >> 4) * 4;
    let payload = tcp.get(data_offset..)?;
    let direction = if dst == port {
        Direction::ToPort
    } else if src == port {
        Direction::FromPort
    } else {
        return None;
    };
    (!payload.is_empty()).then(|| Segment {
        direction,
        bytes: payload.to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_an_ipv4_tcp_frame() {
        let mut frame = vec![0u8; 12];
        frame.extend([0x08, 0x00]);
        // IPv4 header: 20 bytes, total length 20 + 20 + 3, protocol TCP.
        frame.extend([
            0x45, 0, 0, 43, 0, 0, 0, 0, 64, 6, 0, 0, 10, 213, 1, 2, 10, 213, 1, 3,
        ]);
        // TCP header: 40000 -> 8080, data offset 5 words.
        frame.extend([
            0x9c, 0x40, 0x1f, 0x90, 0, 0, 0, 0, 0, 0, 0, 0, 0x50, 0x18, 0, 0, 0, 0, 0, 0,
        ]);
        frame.extend(b"abc");
        // Ethernet padding after the IP packet is not payload.
        frame.extend([0, 0, 0]);
        let segment = |direction| {
            Some(Segment {
                direction,
                bytes: b"abc".to_vec(),
            })
        };
        assert_eq!(tcp_payload(&frame, 8080), segment(Direction::ToPort));
        assert_eq!(tcp_payload(&frame, 40000), segment(Direction::FromPort));
        assert_eq!(tcp_payload(&frame, 9), None);
    }
}
