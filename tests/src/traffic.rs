//! Bounded test traffic inside namespaces: a TCP/UDP server that answers with its own
//! address, and clients that make one request each. Every call has a timeout.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use nix::sched::{CloneFlags, setns};

use crate::netns::Netns;

/// How long any single test connection may take.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);

fn enter(ns_path: &str) {
    let f = std::fs::File::open(ns_path).unwrap_or_else(|e| panic!("open {ns_path}: {e}"));
    setns(f.as_fd(), CloneFlags::CLONE_NEWNET).unwrap_or_else(|e| panic!("setns {ns_path}: {e}"));
}

/// A server in a namespace answering every TCP connection (and UDP datagram) on `addr` with
/// `"<peer> -> <local>\n"`: the client learns which source address the server saw.
pub struct Server {
    stop: Arc<AtomicBool>,
    served: Arc<AtomicU64>,
    threads: Vec<JoinHandle<()>>,
}

impl Server {
    /// Starts a TCP server on `addr` inside `ns`.
    pub fn tcp(ns: &Netns, addr: SocketAddr) -> Server {
        let (stop, served) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicU64::new(0)),
        );
        let path = ns.path();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (s, n) = (stop.clone(), served.clone());
        let t = std::thread::spawn(move || {
            enter(&path);
            let l = TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
            l.set_nonblocking(true).expect("nonblocking");
            let _ = ready_tx.send(());
            while !s.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((mut c, peer)) => {
                        let _ = c.set_nonblocking(false);
                        let _ = c.set_read_timeout(Some(IO_TIMEOUT));
                        let mut buf = [0u8; 4096];
                        let _ = c.read(&mut buf);
                        let local = c.local_addr().map(|a| a.to_string()).unwrap_or_default();
                        let _ = c.write_all(format!("{peer} -> {local}\n").as_bytes());
                        n.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        ready_rx.recv_timeout(IO_TIMEOUT).expect("server ready");
        Server {
            stop,
            served,
            threads: vec![t],
        }
    }

    /// Starts a TCP echo server on `addr` inside `ns`: each connection is served on its own
    /// thread and stays open until the client closes it (for long-lived connection tests).
    pub fn tcp_echo(ns: &Netns, addr: SocketAddr) -> Server {
        let (stop, served) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicU64::new(0)),
        );
        let path = ns.path();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (s, n) = (stop.clone(), served.clone());
        let t = std::thread::spawn(move || {
            enter(&path);
            let l = TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
            l.set_nonblocking(true).expect("nonblocking");
            let _ = ready_tx.send(());
            while !s.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((mut c, _)) => {
                        n.fetch_add(1, Ordering::Relaxed);
                        let stop = s.clone();
                        std::thread::spawn(move || {
                            let _ = c.set_nonblocking(false);
                            let _ = c.set_read_timeout(Some(Duration::from_millis(200)));
                            let mut buf = [0u8; 4096];
                            while !stop.load(Ordering::Relaxed) {
                                match c.read(&mut buf) {
                                    Ok(0) => break,
                                    Ok(k) => {
                                        if c.write_all(&buf[..k]).is_err() {
                                            break;
                                        }
                                    }
                                    Err(e)
                                        if e.kind() == std::io::ErrorKind::WouldBlock
                                            || e.kind() == std::io::ErrorKind::TimedOut => {}
                                    Err(_) => break,
                                }
                            }
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        ready_rx.recv_timeout(IO_TIMEOUT).expect("server ready");
        Server {
            stop,
            served,
            threads: vec![t],
        }
    }

    /// Starts a UDP server on `addr` inside `ns` (answers each datagram; `reply_size` pads the
    /// answer, e.g. to force IP fragmentation).
    pub fn udp(ns: &Netns, addr: SocketAddr, reply_size: usize) -> Server {
        let (stop, served) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicU64::new(0)),
        );
        let path = ns.path();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (s, n) = (stop.clone(), served.clone());
        let t = std::thread::spawn(move || {
            enter(&path);
            let sock = UdpSocket::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
            sock.set_read_timeout(Some(Duration::from_millis(50)))
                .expect("timeout");
            let _ = ready_tx.send(());
            let mut buf = [0u8; 65536];
            while !s.load(Ordering::Relaxed) {
                if let Ok((_, peer)) = sock.recv_from(&mut buf) {
                    let mut msg = format!("{peer} -> {addr}\n").into_bytes();
                    if msg.len() < reply_size {
                        msg.resize(reply_size, b'.');
                    }
                    let _ = sock.send_to(&msg, peer);
                    n.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        ready_rx.recv_timeout(IO_TIMEOUT).expect("server ready");
        Server {
            stop,
            served,
            threads: vec![t],
        }
    }

    /// Requests answered so far.
    pub fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// One TCP request from inside `ns` to `to`; returns the server's answer ("peer -> local").
pub fn tcp_request(ns: &Netns, to: SocketAddr) -> std::io::Result<String> {
    tcp_request_from(ns, to).map(|(_, answer)| answer)
}

/// [`tcp_request`], also returning the client's own address:port (its side of the connection).
pub fn tcp_request_from(ns: &Netns, to: SocketAddr) -> std::io::Result<(SocketAddr, String)> {
    tcp_request_closed(ns, to, false)
}

/// [`tcp_request_from`], closed with a reset once the answer is read (see
/// [`HeldConnection::reset`]).
pub fn tcp_request_reset(ns: &Netns, to: SocketAddr) -> std::io::Result<(SocketAddr, String)> {
    tcp_request_closed(ns, to, true)
}

fn tcp_request_closed(
    ns: &Netns,
    to: SocketAddr,
    reset: bool,
) -> std::io::Result<(SocketAddr, String)> {
    ns.run(move || {
        let mut c = TcpStream::connect_timeout(&to, IO_TIMEOUT)?;
        let local = c.local_addr()?;
        c.set_read_timeout(Some(IO_TIMEOUT))?;
        c.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
        let mut out = String::new();
        c.read_to_string(&mut out)?;
        if reset {
            set_linger_zero(&c)?;
        }
        Ok((local, out))
    })
}

/// One UDP request from inside `ns` to `to`; returns the answer (first line).
pub fn udp_request(ns: &Netns, to: SocketAddr) -> std::io::Result<String> {
    udp_request_from(ns, to).map(|(_, answer)| answer)
}

/// [`udp_request`], also returning the client's own address:port (the kernel picks the port at
/// random, so two requests may share one: to IPVS they are then one connection).
pub fn udp_request_from(ns: &Netns, to: SocketAddr) -> std::io::Result<(SocketAddr, String)> {
    ns.run(move || {
        let bind: SocketAddr = if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }
            .parse()
            .expect("addr");
        let s = UdpSocket::bind(bind)?;
        s.set_read_timeout(Some(IO_TIMEOUT))?;
        s.send_to(b"ping", to)?;
        let local = s.local_addr()?;
        let mut buf = vec![0u8; 65536];
        let (n, _) = s.recv_from(&mut buf)?;
        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
        Ok((local, text.lines().next().unwrap_or_default().to_string()))
    })
}

/// Parses "peer -> local" into the source address the server saw.
pub fn seen_source(answer: &str) -> Option<SocketAddr> {
    answer.split(" -> ").next()?.trim().parse().ok()
}

/// An open TCP connection made from inside a namespace (the socket keeps its namespace and can
/// be used from any thread).
pub struct HeldConnection {
    stream: TcpStream,
}

impl HeldConnection {
    pub fn open(ns: &Netns, to: SocketAddr) -> std::io::Result<HeldConnection> {
        let stream = ns.run(move || TcpStream::connect_timeout(&to, IO_TIMEOUT))?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        Ok(HeldConnection { stream })
    }

    /// Sends `msg` and reads the echo back: proves the connection still carries data.
    pub fn echo(&mut self, msg: &str) -> std::io::Result<String> {
        self.stream.write_all(msg.as_bytes())?;
        let mut buf = vec![0u8; msg.len()];
        self.stream.read_exact(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    }

    /// The local (client) address of the connection.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.stream.local_addr()
    }

    /// [`HeldConnection::open`] from a chosen local port (bound before the connect, with
    /// `SO_REUSEADDR`), IPv4.
    pub fn open_from(
        ns: &Netns,
        port: u16,
        to: std::net::SocketAddrV4,
    ) -> std::io::Result<HeldConnection> {
        let stream = ns.run(move || connect_from(port, to))?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        Ok(HeldConnection { stream })
    }

    /// Closes the connection with a reset (`SO_LINGER` 0): IPVS's CLOSE state (10 s), and no
    /// TIME_WAIT on the client, whose port is free again at once.
    pub fn reset(self) -> std::io::Result<()> {
        set_linger_zero(&self.stream)
    }
}

fn os_result(ret: libc::c_int) -> std::io::Result<libc::c_int> {
    if ret < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// `SO_LINGER` 0 on `stream`: its close sends a reset.
fn set_linger_zero(stream: &TcpStream) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket and a `linger` of the size given.
    os_result(unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
        )
    })?;
    Ok(())
}

/// A TCP connection from local port `port` to `to` (the calling thread's namespace), the
/// connect bounded by [`IO_TIMEOUT`] (`SO_SNDTIMEO`).
fn connect_from(port: u16, to: std::net::SocketAddrV4) -> std::io::Result<TcpStream> {
    use std::os::fd::{FromRawFd, OwnedFd};
    let sockaddr = |a: std::net::SocketAddrV4| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*a.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    let len = size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: plain socket calls on a descriptor this function owns (`fd`), with arguments of
    // the sizes given.
    unsafe {
        let raw = os_result(libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0))?;
        let fd = OwnedFd::from_raw_fd(raw);
        let one: libc::c_int = 1;
        os_result(libc::setsockopt(
            raw,
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            (&raw const one).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        ))?;
        let timeout = libc::timeval {
            tv_sec: IO_TIMEOUT.as_secs() as libc::time_t,
            tv_usec: 0,
        };
        os_result(libc::setsockopt(
            raw,
            libc::SOL_SOCKET,
            libc::SO_SNDTIMEO,
            (&raw const timeout).cast(),
            size_of::<libc::timeval>() as libc::socklen_t,
        ))?;
        let local = sockaddr(std::net::SocketAddrV4::new(
            std::net::Ipv4Addr::UNSPECIFIED,
            port,
        ));
        os_result(libc::bind(raw, (&raw const local).cast(), len))?;
        let remote = sockaddr(to);
        os_result(libc::connect(raw, (&raw const remote).cast(), len))?;
        Ok(TcpStream::from(fd))
    }
}

/// One plain HTTP/1.1 GET of `path` at `addr` from inside `ns`: the raw response.
pub fn http_get(ns: &Netns, addr: &str, path: &str) -> std::io::Result<String> {
    let (addr, path) = (addr.to_owned(), path.to_owned());
    ns.run(move || {
        let a: SocketAddr = addr.parse().expect("addr");
        let mut c = TcpStream::connect_timeout(&a, Duration::from_secs(2))?;
        c.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(
            c,
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )?;
        let mut out = String::new();
        c.read_to_string(&mut out)?;
        Ok(out)
    })
}
