//! The ranks of a job meet over TCP at `MASTER_ADDR:MASTER_PORT`: rank 0 listens, the others connect
//! (retrying until the rendezvous timeout, since rank 0 may start last), and each sends a handshake
//! that rank 0 checks: the protocol version, the world size, the run id and that no rank comes twice.
//! When every rank is in, rank 0 answers each "ready"; a rank that does not arrive in time, or a
//! handshake that does not match, ends every rank with an error that names the rank and its address.
//!
//! The connections stay open as the star of a [`TcpTransport`] (rank 0 in the middle).
//!
//! `safedpo launch` binds the port itself and hands the listening socket to rank 0 (its descriptor in
//! [`INHERITED_LISTENER_VAR`]), so no other process can take the port between the launcher choosing
//! it and rank 0 listening; the other ranks' connections wait in the socket's backlog meanwhile.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

use super::env::RankEnv;
use super::tcp::{Peer, TcpTransport};

/// Names a listening socket rank 0 inherited (its file descriptor, on the master port): rank 0
/// accepts on it instead of binding the port.
pub const INHERITED_LISTENER_VAR: &str = "SAFEDPO_RENDEZVOUS_FD";
/// Changes whenever the handshake or the frames change, so that two builds never mix.
pub const PROTOCOL_VERSION: u32 = 1;
const MAGIC: &[u8; 8] = b"safedpo\0";
/// How long the ranks wait for each other at the rendezvous unless `SAFEDPO_RENDEZVOUS_TIMEOUT`
/// (seconds) says otherwise.
pub const DEFAULT_RENDEZVOUS_TIMEOUT: Duration = Duration::from_secs(300);
/// How long a rank waits for the others at a collective unless `SAFEDPO_COLLECTIVE_TIMEOUT`
/// (seconds) says otherwise: long enough for rank 0 to write a large checkpoint meanwhile.
pub const DEFAULT_COLLECTIVE_TIMEOUT: Duration = Duration::from_secs(1800);
/// A connection that says nothing for this long is not a rank (a port scan, a health check).
const HANDSHAKE_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// One rank's side of a rendezvous.
#[derive(Clone, Debug)]
pub struct Rendezvous {
    pub rank: usize,
    pub world_size: usize,
    /// Rank 0's host and port.
    pub master_addr: String,
    pub master_port: u16,
    /// Every rank must give the same (see [`RankEnv::run_id`]).
    pub run_id: String,
    /// The whole rendezvous, connecting and waiting for the others included.
    pub timeout: Duration,
    /// Each collective of the transport it makes.
    pub collective_timeout: Duration,
}

impl Rendezvous {
    /// The rendezvous `env` describes, with the timeouts of `SAFEDPO_RENDEZVOUS_TIMEOUT` and
    /// `SAFEDPO_COLLECTIVE_TIMEOUT` (seconds) or the defaults.
    pub fn from_env(env: &RankEnv) -> Result<Self> {
        Ok(Self {
            rank: env.rank,
            world_size: env.world_size,
            master_addr: env.master_addr.clone(),
            master_port: env.master_port,
            run_id: env.run_id.clone(),
            timeout: seconds_var("SAFEDPO_RENDEZVOUS_TIMEOUT")?.unwrap_or(DEFAULT_RENDEZVOUS_TIMEOUT),
            collective_timeout: seconds_var("SAFEDPO_COLLECTIVE_TIMEOUT")?.unwrap_or(DEFAULT_COLLECTIVE_TIMEOUT),
        })
    }

    fn master(&self) -> String {
        format!("{}:{}", self.master_addr, self.master_port)
    }

    /// Joins the group: rank 0 listens on the master port, the others connect to it.
    pub fn join(&self) -> Result<TcpTransport> {
        if self.rank == 0 {
            let listener = self.listen()?;
            self.join_as_root(listener)
        } else {
            self.join_as_peer()
        }
    }

    /// Rank 0's listening socket: on the master address when it is a loopback address (one node),
    /// else on every interface (the others reach this host by a name it may not know itself).
    pub fn listen(&self) -> Result<TcpListener> {
        #[cfg(unix)]
        if let Some(listener) = inherited_listener(std::env::var(INHERITED_LISTENER_VAR).ok(), self.master_port)? {
            return Ok(listener);
        }
        let loopback = (self.master_addr.as_str(), self.master_port)
            .to_socket_addrs()
            .ok()
            .and_then(|mut addrs| addrs.find(|a| a.ip().is_loopback()));
        let addr = loopback.unwrap_or(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), self.master_port));
        TcpListener::bind(addr).with_context(|| {
            format!("rank 0: cannot listen on {addr} (MASTER_PORT={}; is another job using it?)", self.master_port)
        })
    }

    /// Rank 0's side, on a socket it already listens on (a test binds port 0 first).
    pub fn join_as_root(&self, listener: TcpListener) -> Result<TcpTransport> {
        ensure!(self.rank == 0, "join_as_root on rank {}", self.rank);
        let deadline = Instant::now() + self.timeout;
        listener.set_nonblocking(true).context("rendezvous: the listening socket")?;
        let mut peers: Vec<Option<Peer>> = (1..self.world_size).map(|_| None).collect();
        while peers.iter().any(Option::is_none) {
            let (mut stream, addr) = match listener.accept() {
                Ok(accepted) => accepted,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        let missing: Vec<String> = peers
                            .iter()
                            .enumerate()
                            .filter(|(_, p)| p.is_none())
                            .map(|(i, _)| (i + 1).to_string())
                            .collect();
                        let why = format!(
                            "rank(s) {} did not reach the rendezvous at {} within {:?}",
                            missing.join(", "),
                            self.master(),
                            self.timeout
                        );
                        for peer in peers.iter_mut().flatten() {
                            let _ = answer(&mut peer.stream, Err(&why));
                        }
                        bail!("rank 0: {why}");
                    }
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                }
                Err(e) => return Err(e).context("rendezvous: accepting a connection"),
            };
            stream.set_nonblocking(false)?;
            stream.set_read_timeout(Some(HANDSHAKE_READ_TIMEOUT))?;
            let Ok(hello) = read_hello(&mut stream) else {
                continue; // Not a rank of ours: ignore it.
            };
            if let Err(why) = self.check_hello(&hello, &peers) {
                let why = format!("rank {} at {addr}: {why}", hello.rank);
                let _ = answer(&mut stream, Err(&why));
                for peer in peers.iter_mut().flatten() {
                    let _ = answer(&mut peer.stream, Err(&why));
                }
                bail!("rank 0: the rendezvous failed: {why}");
            }
            peers[hello.rank - 1] = Some(Peer { rank: hello.rank, addr, stream });
        }
        let mut peers: Vec<Peer> = peers.into_iter().map(|p| p.expect("every rank arrived")).collect();
        for peer in &mut peers {
            answer(&mut peer.stream, Ok(()))
                .with_context(|| format!("rank 0: rank {} at {} left during the rendezvous", peer.rank, peer.addr))?;
        }
        TcpTransport::root(peers, self.collective_timeout)
    }

    /// Why `hello` may not join (a mismatch in the job's shape, or a rank that came twice).
    fn check_hello(&self, hello: &Hello, peers: &[Option<Peer>]) -> std::result::Result<(), String> {
        if hello.version != PROTOCOL_VERSION {
            return Err(format!(
                "speaks protocol {}, rank 0 protocol {PROTOCOL_VERSION} (different safedpo builds)",
                hello.version
            ));
        }
        if hello.world_size != self.world_size {
            return Err(format!("has WORLD_SIZE={}, rank 0 has {}", hello.world_size, self.world_size));
        }
        if hello.run_id != self.run_id {
            return Err(format!("belongs to run {:?}, rank 0 to run {:?}", hello.run_id, self.run_id));
        }
        if hello.rank == 0 || hello.rank >= self.world_size {
            return Err(format!("rank {} is not a rank of a group of {} besides rank 0", hello.rank, self.world_size));
        }
        if let Some(first) = &peers[hello.rank - 1] {
            return Err(format!("rank {} came twice (first from {})", hello.rank, first.addr));
        }
        Ok(())
    }

    /// A rank other than 0: connects (retrying until the deadline), says hello, waits for "ready".
    fn join_as_peer(&self) -> Result<TcpTransport> {
        let deadline = Instant::now() + self.timeout;
        let mut stream = self.connect(deadline)?;
        let addr = stream.peer_addr()?;
        let hello = Hello {
            version: PROTOCOL_VERSION,
            world_size: self.world_size,
            rank: self.rank,
            run_id: self.run_id.clone(),
        };
        write_hello(&mut stream, &hello).with_context(|| format!("rank {}: greeting rank 0 at {addr}", self.rank))?;
        // Rank 0 answers once every rank is in, or with why the rendezvous failed.
        let wait = deadline.saturating_duration_since(Instant::now()) + Duration::from_secs(5);
        stream.set_read_timeout(Some(wait))?;
        let answer = read_answer(&mut stream).map_err(|e| {
            anyhow::anyhow!(
                "rank {}: rank 0 at {addr} did not complete the rendezvous within {:?} ({e})",
                self.rank,
                self.timeout
            )
        })?;
        if let Err(why) = answer {
            bail!("rank {}: the rendezvous failed: {why}", self.rank);
        }
        TcpTransport::peer(self.rank, self.world_size, Peer { rank: 0, addr, stream }, self.collective_timeout)
    }

    fn connect(&self, deadline: Instant) -> Result<TcpStream> {
        let mut last_error = String::from("no address");
        loop {
            match (self.master_addr.as_str(), self.master_port).to_socket_addrs() {
                Ok(addrs) => {
                    for addr in addrs {
                        let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
                        match TcpStream::connect_timeout(&addr, left.min(Duration::from_secs(5))) {
                            Ok(stream) => return Ok(stream),
                            Err(e) => last_error = format!("{addr}: {e}"),
                        }
                    }
                }
                Err(e) => last_error = format!("resolving {}: {e}", self.master_addr),
            }
            if Instant::now() >= deadline {
                bail!(
                    "rank {}: could not reach rank 0 at {} within {:?} ({last_error})",
                    self.rank,
                    self.master(),
                    self.timeout
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn seconds_var(name: &str) -> Result<Option<Duration>> {
    match std::env::var(name) {
        Ok(text) if !text.trim().is_empty() => {
            let secs: f64 = text
                .trim()
                .parse()
                .ok()
                .filter(|s: &f64| *s > 0.0 && s.is_finite())
                .with_context(|| format!("{name}={text:?} is not a number of seconds > 0"))?;
            Ok(Some(Duration::from_secs_f64(secs)))
        }
        _ => Ok(None),
    }
}

struct Hello {
    version: u32,
    world_size: usize,
    rank: usize,
    run_id: String,
}

fn write_hello(stream: &mut TcpStream, hello: &Hello) -> std::io::Result<()> {
    let mut bytes = MAGIC.to_vec();
    for n in [hello.version, hello.world_size as u32, hello.rank as u32, hello.run_id.len() as u32] {
        bytes.extend(n.to_le_bytes());
    }
    bytes.extend(hello.run_id.as_bytes());
    stream.write_all(&bytes)
}

fn read_u32(stream: &mut TcpStream) -> std::io::Result<u32> {
    let mut bytes = [0u8; 4];
    stream.read_exact(&mut bytes)?;
    Ok(u32::from_le_bytes(bytes))
}

fn read_text(stream: &mut TcpStream) -> Result<String> {
    let len = read_u32(stream)? as usize;
    ensure!(len <= 1 << 16, "a text of {len} bytes");
    let mut bytes = vec![0u8; len];
    stream.read_exact(&mut bytes)?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

fn read_hello(stream: &mut TcpStream) -> Result<Hello> {
    let mut magic = [0u8; 8];
    stream.read_exact(&mut magic)?;
    ensure!(&magic == MAGIC, "not a safedpo rank");
    let version = read_u32(stream)?;
    let world_size = read_u32(stream)? as usize;
    let rank = read_u32(stream)? as usize;
    let run_id = read_text(stream)?;
    Ok(Hello { version, world_size, rank, run_id })
}

/// Rank 0's answer to a handshake: ready, or why not.
fn answer(stream: &mut TcpStream, result: std::result::Result<(), &str>) -> std::io::Result<()> {
    let why = result.err().unwrap_or("");
    let mut bytes = vec![u8::from(result.is_err())];
    bytes.extend((why.len() as u32).to_le_bytes());
    bytes.extend(why.as_bytes());
    stream.write_all(&bytes)
}

fn read_answer(stream: &mut TcpStream) -> Result<std::result::Result<(), String>> {
    let mut status = [0u8; 1];
    stream.read_exact(&mut status)?;
    let why = read_text(stream)?;
    Ok(if status[0] == 0 { Ok(()) } else { Err(why) })
}

/// The listening socket `value` (an [`INHERITED_LISTENER_VAR`] value) names, checked to be a TCP
/// socket on `port`; `None` when the variable is unset. A descriptor that is not such a socket is
/// an error and is left open (it belongs to someone else).
#[cfg(unix)]
fn inherited_listener(value: Option<String>, port: u16) -> Result<Option<TcpListener>> {
    use std::mem::ManuallyDrop;
    use std::os::fd::{FromRawFd, RawFd};

    let Some(value) = value else { return Ok(None) };
    let fd: RawFd = value
        .trim()
        .parse()
        .ok()
        .filter(|&fd| fd >= 0)
        .with_context(|| format!("{INHERITED_LISTENER_VAR}={value:?}: not a file descriptor"))?;
    let (mut listening, mut len): (libc::c_int, libc::socklen_t) = (0, size_of::<libc::c_int>() as libc::socklen_t);
    // SAFETY: getsockopt writes at most `len` bytes into `listening`; it fails on a descriptor that
    // is not open or not a socket.
    let got = unsafe {
        libc::getsockopt(fd, libc::SOL_SOCKET, libc::SO_ACCEPTCONN, (&raw mut listening).cast(), &raw mut len)
    };
    ensure!(got == 0 && listening == 1, "{INHERITED_LISTENER_VAR}={fd}: not a listening socket");
    // SAFETY: the descriptor is open; ManuallyDrop keeps it open whatever the checks find, until
    // it is known to be ours to own.
    let candidate = ManuallyDrop::new(unsafe { TcpListener::from_raw_fd(fd) });
    match candidate.local_addr() {
        Ok(addr) if addr.port() == port => Ok(Some(ManuallyDrop::into_inner(candidate))),
        Ok(addr) => bail!("{INHERITED_LISTENER_VAR}={fd}: a socket on port {}, not MASTER_PORT={port}", addr.port()),
        Err(e) => bail!("{INHERITED_LISTENER_VAR}={fd}: not a TCP socket ({e})"),
    }
}

#[cfg(all(test, unix))]
mod tests {
    use std::os::fd::AsRawFd;

    use super::*;

    /// A second descriptor of `listener`'s socket, as a child inherits one.
    fn dup_of(listener: &TcpListener) -> i32 {
        // SAFETY: dup of an open descriptor; the copy is owned by whoever adopts it.
        let fd = unsafe { libc::dup(listener.as_raw_fd()) };
        assert!(fd >= 0);
        fd
    }

    #[test]
    fn an_inherited_listener_on_the_master_port_is_adopted() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        // Binding the port again fails: only the inherited socket can serve it.
        assert!(TcpListener::bind(("127.0.0.1", port)).is_err());
        let adopted = inherited_listener(Some(dup_of(&listener).to_string()), port).unwrap().unwrap();
        let client = std::thread::spawn(move || TcpStream::connect(("127.0.0.1", port)).unwrap());
        adopted.accept().unwrap();
        client.join().unwrap();
        assert!(inherited_listener(None, port).unwrap().is_none());
    }

    #[test]
    fn a_descriptor_that_is_not_the_listener_is_refused_and_left_open() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let fd = dup_of(&listener);
        let wrong_port = inherited_listener(Some(fd.to_string()), port.wrapping_add(1)).unwrap_err().to_string();
        assert!(wrong_port.contains("not MASTER_PORT"), "{wrong_port}");
        // Still open and still the listener: the refusal did not close it.
        assert!(inherited_listener(Some(fd.to_string()), port).unwrap().is_some());

        let file = std::fs::File::open("/dev/null").unwrap();
        let not_socket = inherited_listener(Some(file.as_raw_fd().to_string()), port).unwrap_err().to_string();
        assert!(not_socket.contains("not a listening socket"), "{not_socket}");
        use std::io::Read;
        assert_eq!((&file).read(&mut [0u8; 1]).unwrap(), 0, "/dev/null is still open");

        let connected = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let stream = inherited_listener(Some(connected.as_raw_fd().to_string()), port).unwrap_err().to_string();
        assert!(stream.contains("not a listening socket"), "{stream}");
        for bad in ["x", "-3", ""] {
            let err = inherited_listener(Some(bad.into()), port).unwrap_err().to_string();
            assert!(err.contains(INHERITED_LISTENER_VAR), "{err}");
        }
    }
}
