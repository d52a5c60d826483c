//! A [`HostTransport`] over the TCP connections of a [`Rendezvous`](super::rendezvous::Rendezvous):
//! a star through rank 0, which reads every rank's message in rank order and sends all of them back
//! to each rank. Messages are length-prefixed frames; a frame is data or an abort that carries why
//! the group ended.
//!
//! A rank that closes its connection (it exited or crashed) or says nothing within the collective
//! timeout ends the collective: rank 0 names it (rank and address) in an abort to every other rank,
//! so every rank fails with the same reason; a rank whose connection to rank 0 breaks names rank 0.
//! After a failure every later collective fails at once with the first reason.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{Context, Result};

use super::{GroupBroken, HostTransport};

const DATA: u8 = 0;
const ABORT: u8 = 1;
/// A frame longer than this is a corrupt stream, not a message.
const MAX_FRAME_BYTES: u64 = 1 << 40;

/// One end of a connection of the star, and the rank at the other end.
pub struct Peer {
    pub rank: usize,
    pub addr: SocketAddr,
    pub stream: TcpStream,
}

enum Links {
    /// Rank 0: ranks 1.. in order.
    Root(Vec<Peer>),
    /// Any other rank: its connection to rank 0.
    Leaf(Peer),
}

struct State {
    links: Links,
    /// Why the group ended, once it has.
    broken: Option<String>,
}

/// One rank's handle on a group of processes connected over TCP (made by a rendezvous).
pub struct TcpTransport {
    rank: usize,
    world_size: usize,
    timeout: Duration,
    state: Mutex<State>,
}

impl TcpTransport {
    pub(crate) fn root(peers: Vec<Peer>, timeout: Duration) -> Result<Self> {
        for peer in &peers {
            prepare(&peer.stream, timeout)?;
        }
        Ok(Self::new(0, peers.len() + 1, Links::Root(peers), timeout))
    }

    pub(crate) fn peer(rank: usize, world_size: usize, root: Peer, timeout: Duration) -> Result<Self> {
        // Longer than rank 0's wait, so that rank 0's abort naming a missing rank arrives first.
        prepare(&root.stream, timeout + timeout / 2)?;
        Ok(Self::new(rank, world_size, Links::Leaf(root), timeout))
    }

    fn new(rank: usize, world_size: usize, links: Links, timeout: Duration) -> Self {
        Self { rank, world_size, timeout, state: Mutex::new(State { links, broken: None }) }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Why reading from or writing to `peer` failed, in words that name it.
    fn describe(&self, peer: &Peer, error: &std::io::Error) -> String {
        match error.kind() {
            ErrorKind::WouldBlock | ErrorKind::TimedOut => format!(
                "rank {} ({}) did not reach the collective within {:?} (rank {} waited)",
                peer.rank, peer.addr, self.timeout, self.rank
            ),
            ErrorKind::UnexpectedEof
            | ErrorKind::ConnectionReset
            | ErrorKind::BrokenPipe
            | ErrorKind::ConnectionAborted => {
                format!("rank {} ({}) closed its connection (it exited or crashed)", peer.rank, peer.addr)
            }
            _ => format!("the connection to rank {} ({}) failed: {error}", peer.rank, peer.addr),
        }
    }
}

impl std::fmt::Debug for TcpTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TcpTransport(rank {} of {})", self.rank, self.world_size)
    }
}

fn prepare(stream: &TcpStream, timeout: Duration) -> Result<()> {
    stream.set_nodelay(true).context("TCP_NODELAY")?;
    stream.set_read_timeout(Some(timeout)).context("a read timeout")?;
    stream.set_write_timeout(Some(timeout)).context("a write timeout")?;
    Ok(())
}

fn write_frame(stream: &mut TcpStream, tag: u8, payload: &[u8]) -> std::io::Result<()> {
    let mut header = [0u8; 9];
    header[0] = tag;
    header[1..].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    stream.write_all(&header)?;
    stream.write_all(payload)
}

/// A frame: its tag and payload.
fn read_frame(stream: &mut TcpStream) -> std::io::Result<(u8, Vec<u8>)> {
    let mut header = [0u8; 9];
    stream.read_exact(&mut header)?;
    let len = u64::from_le_bytes(header[1..].try_into().expect("8 bytes"));
    if header[0] > ABORT || len > MAX_FRAME_BYTES {
        return Err(std::io::Error::new(ErrorKind::InvalidData, "a corrupt frame (not this protocol)"));
    }
    let mut payload = vec![0u8; len as usize];
    stream.read_exact(&mut payload)?;
    Ok((header[0], payload))
}

impl HostTransport for TcpTransport {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn all_gather(&self, data: &[u8]) -> Result<Vec<Vec<u8>>> {
        let mut state = self.lock();
        if let Some(why) = &state.broken {
            return Err(GroupBroken(format!("rank {}: the group is broken: {why}", self.rank)).into());
        }
        let result = match &mut state.links {
            Links::Root(peers) => self.gather_as_root(peers, data),
            Links::Leaf(root) => self.gather_as_leaf(root, data),
        };
        result.map_err(|why| {
            state.broken = Some(why.clone());
            GroupBroken(why).into()
        })
    }
}

impl TcpTransport {
    /// Every rank's message, or why the collective failed.
    fn gather_as_root(&self, peers: &mut [Peer], data: &[u8]) -> Result<Vec<Vec<u8>>, String> {
        let mut parts = vec![data.to_vec()];
        let mut failure = None;
        for peer in peers.iter_mut() {
            match read_frame(&mut peer.stream) {
                Ok((DATA, payload)) => parts.push(payload),
                Ok((_, why)) => {
                    failure = Some(format!("rank {} aborted: {}", peer.rank, String::from_utf8_lossy(&why)))
                }
                Err(e) => failure = Some(self.describe(peer, &e)),
            }
            if failure.is_some() {
                break;
            }
        }
        if failure.is_none() {
            for peer in peers.iter_mut() {
                if let Err(e) = parts.iter().try_for_each(|part| write_frame(&mut peer.stream, DATA, part)) {
                    failure = Some(self.describe(peer, &e));
                    break;
                }
            }
        }
        if let Some(why) = failure {
            // Best effort: the ranks that are still there learn who ended the group.
            for peer in peers.iter_mut() {
                let _ = write_frame(&mut peer.stream, ABORT, why.as_bytes());
            }
            return Err(format!("rank 0: {why}"));
        }
        Ok(parts)
    }

    fn gather_as_leaf(&self, root: &mut Peer, data: &[u8]) -> Result<Vec<Vec<u8>>, String> {
        let me = self.rank;
        let sent = write_frame(&mut root.stream, DATA, data);
        let mut parts = Vec::with_capacity(self.world_size);
        while parts.len() < self.world_size {
            match read_frame(&mut root.stream) {
                Ok((DATA, payload)) => parts.push(payload),
                Ok((_, why)) => {
                    return Err(format!("rank {me}: rank 0 ended the collective: {}", String::from_utf8_lossy(&why)))
                }
                Err(e) => {
                    let why = match sent {
                        Err(sent) => self.describe(root, &sent),
                        Ok(()) => self.describe(root, &e),
                    };
                    return Err(format!("rank {me}: {why}"));
                }
            }
        }
        Ok(parts)
    }
}
