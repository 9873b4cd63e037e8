//! Pod IP allocation over the node's pod CIDR (Node.spec.podCIDR, a /24 of
//! 10.42.0.0/16 by default).
//!
//! Every allocation (IP → pod UID) is persisted in a JSON file in the
//! agent's data directory before it is handed out, so an agent restart
//! never hands a running pod's IP to another pod. Writes are atomic: a
//! temporary file, fsync, rename, fsync of the directory.
//!
//! Reserved: the network address (.0), the first host (.1, kept for a
//! future node-side gateway address) and the broadcast address (.255).
//! Allocation is next-fit (continues after the last IP handed out), so a
//! freed IP is not reused at once: a connection to a deleted pod does not
//! land in its successor.

use serde::{Deserialize, Serialize};
use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    io::Write,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    str::FromStr,
};

/// An IPv4 prefix such as `10.42.7.0/24`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ipv4Cidr {
    /// The network address (host bits are cleared on parse).
    pub addr: Ipv4Addr,
    pub prefix_len: u8,
}

impl Ipv4Cidr {
    pub fn new(addr: Ipv4Addr, prefix_len: u8) -> Result<Self, IpamError> {
        if prefix_len > 32 {
            return Err(IpamError::InvalidCidr(
                format!("{addr}/{prefix_len}"),
                "the prefix length is above 32",
            ));
        }
        Ok(Self {
            addr: Ipv4Addr::from(u32::from(addr) & Self::mask(prefix_len)),
            prefix_len,
        })
    }

    fn mask(len: u8) -> u32 {
        if len == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(len))
        }
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & Self::mask(self.prefix_len) == u32::from(self.addr)
    }

    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) | !Self::mask(self.prefix_len))
    }
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

impl FromStr for Ipv4Cidr {
    type Err = IpamError;

    fn from_str(s: &str) -> Result<Self, IpamError> {
        let bad = |why| IpamError::InvalidCidr(s.to_owned(), why);
        let (addr, len) = s.split_once('/').ok_or_else(|| bad("no /prefix length"))?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| bad("not an IPv4 address"))?;
        let len: u8 = len.parse().map_err(|_| bad("bad prefix length"))?;
        Self::new(addr, len)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    #[error("invalid pod CIDR `{0}`: {1}")]
    InvalidCidr(String, &'static str),
    #[error(
        "no free pod IP left in {cidr}: all {allocated} usable addresses are taken (.0, .1 and the broadcast address are reserved)"
    )]
    Exhausted { cidr: Ipv4Cidr, allocated: usize },
    #[error(
        "the IPAM state file {path} is corrupt ({detail}); it was moved aside to {moved_to} and the next open starts empty"
    )]
    Corrupt {
        path: PathBuf,
        moved_to: PathBuf,
        detail: String,
    },
    #[error("IPAM state file {path}: {action} failed: {source}")]
    Io {
        path: PathBuf,
        action: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// The file's format.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct StateFile {
    version: u32,
    #[serde(rename = "podCIDR")]
    pod_cidr: String,
    /// The IP handed out last (next-fit continues after it).
    last: Option<Ipv4Addr>,
    /// IP → pod UID.
    allocations: BTreeMap<Ipv4Addr, String>,
}

const VERSION: u32 = 1;

/// The allocator. Not thread-safe by itself: the agent keeps it behind a
/// mutex (each change is one small fsynced write).
#[derive(Debug)]
pub struct Ipam {
    path: PathBuf,
    cidr: Ipv4Cidr,
    last: Option<Ipv4Addr>,
    by_ip: BTreeMap<Ipv4Addr, String>,
    by_uid: HashMap<String, Ipv4Addr>,
    reset_from: Option<String>,
}

impl Ipam {
    /// Loads the state in `path` for the node's `cidr` (creating an empty
    /// one when there is no file). A state made for another CIDR (the node
    /// was registered again with a new podCIDR) is dropped: none of its IPs
    /// can be used any more; [`Ipam::reset_from`] tells the old CIDR.
    ///
    /// A file that cannot be read as IPAM state is moved aside (see
    /// [`IpamError::Corrupt`]); it is never overwritten.
    pub fn open(
        path: impl Into<PathBuf>,
        cidr_addr: Ipv4Addr,
        prefix_len: u8,
    ) -> Result<Self, IpamError> {
        let path = path.into();
        let cidr = Ipv4Cidr::new(cidr_addr, prefix_len)?;
        if cidr.prefix_len > 30 {
            return Err(IpamError::InvalidCidr(
                cidr.to_string(),
                "too small for pods (at most /30)",
            ));
        }
        let mut ipam = Self {
            path,
            cidr,
            last: None,
            by_ip: BTreeMap::new(),
            by_uid: HashMap::new(),
            reset_from: None,
        };
        let bytes = match std::fs::read(&ipam.path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                ipam.persist()?;
                return Ok(ipam);
            }
            Err(source) => return Err(ipam.io("reading", source)),
        };
        let state = match serde_json::from_slice::<StateFile>(&bytes) {
            Ok(s) if s.version == VERSION => s,
            Ok(s) => return Err(ipam.corrupt(format!("unknown version {}", s.version))),
            Err(e) => return Err(ipam.corrupt(e.to_string())),
        };
        let old: Ipv4Cidr = match state.pod_cidr.parse() {
            Ok(c) => c,
            Err(e) => return Err(ipam.corrupt(e.to_string())),
        };
        if old != cidr {
            tracing::warn!(old = %old, new = %cidr, dropped = state.allocations.len(),
                "the node's pod CIDR changed; starting pod IP allocation afresh");
            ipam.reset_from = Some(old.to_string());
            ipam.persist()?;
            return Ok(ipam);
        }
        ipam.last = state.last.filter(|ip| cidr.contains(*ip));
        for (ip, uid) in state.allocations {
            if !ipam.usable(ip) {
                tracing::warn!(%ip, %uid, "dropping an IPAM entry outside the usable range");
                continue;
            }
            if ipam.by_uid.contains_key(&uid) {
                tracing::warn!(%ip, %uid, "dropping a second IP of one pod");
                continue;
            }
            ipam.by_uid.insert(uid.clone(), ip);
            ipam.by_ip.insert(ip, uid);
        }
        Ok(ipam)
    }

    pub fn cidr(&self) -> Ipv4Cidr {
        self.cidr
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The CIDR of a state dropped at open because the node's CIDR changed.
    pub fn reset_from(&self) -> Option<&str> {
        self.reset_from.as_deref()
    }

    /// The IP of a pod, if it has one.
    pub fn get(&self, uid: &str) -> Option<Ipv4Addr> {
        self.by_uid.get(uid).copied()
    }

    /// Every allocation, by IP.
    pub fn allocations(&self) -> impl Iterator<Item = (Ipv4Addr, &str)> {
        self.by_ip.iter().map(|(ip, uid)| (*ip, uid.as_str()))
    }

    /// How many IPs the range offers in all.
    pub fn capacity(&self) -> usize {
        let first = u32::from(self.first());
        let last = u32::from(self.cidr.broadcast()) - 1;
        (last - first + 1) as usize
    }

    /// The IP of pod `uid`: the one it already holds, else the next free
    /// one (persisted before it is returned).
    pub fn allocate(&mut self, uid: &str) -> Result<Ipv4Addr, IpamError> {
        let mut ips = self.allocate_batch(&[uid.to_owned()])?;
        ips.pop().ok_or(IpamError::Exhausted {
            cidr: self.cidr,
            allocated: self.by_ip.len(),
        })
    }

    /// IPs for several pods with one write to disk (a group commit: many
    /// pods starting together cost one fsync, not one each). All or
    /// nothing: when the write fails, none of the new IPs is handed out.
    pub fn allocate_batch(&mut self, uids: &[String]) -> Result<Vec<Ipv4Addr>, IpamError> {
        let prev_last = self.last;
        let mut added: Vec<(String, Ipv4Addr)> = Vec::new();
        let mut out = Vec::with_capacity(uids.len());
        for uid in uids {
            if let Some(ip) = self.get(uid) {
                out.push(ip);
                continue;
            }
            match self.next_free() {
                Ok(free) => {
                    self.last = Some(free);
                    self.by_ip.insert(free, uid.clone());
                    self.by_uid.insert(uid.clone(), free);
                    added.push((uid.clone(), free));
                    out.push(free);
                }
                Err(e) => {
                    self.undo(&added, prev_last);
                    return Err(e);
                }
            }
        }
        if added.is_empty() {
            return Ok(out);
        }
        if let Err(e) = self.persist() {
            // Not on disk, so not handed out.
            self.undo(&added, prev_last);
            return Err(e);
        }
        Ok(out)
    }

    fn next_free(&self) -> Result<Ipv4Addr, IpamError> {
        let first = u32::from(self.first());
        let end = u32::from(self.cidr.broadcast()) - 1;
        let start = match self.last.map(u32::from) {
            Some(l) if l >= first && l < end => l + 1,
            _ => first,
        };
        (start..=end)
            .chain(first..start)
            .map(Ipv4Addr::from)
            .find(|ip| !self.by_ip.contains_key(ip))
            .ok_or(IpamError::Exhausted {
                cidr: self.cidr,
                allocated: self.by_ip.len(),
            })
    }

    fn undo(&mut self, added: &[(String, Ipv4Addr)], prev_last: Option<Ipv4Addr>) {
        for (uid, ip) in added {
            self.by_ip.remove(ip);
            self.by_uid.remove(uid);
        }
        self.last = prev_last;
    }

    /// Frees the IP of pod `uid` (nothing to do when it has none).
    pub fn release(&mut self, uid: &str) -> Result<(), IpamError> {
        let Some(ip) = self.by_uid.remove(uid) else {
            return Ok(());
        };
        self.by_ip.remove(&ip);
        if let Err(e) = self.persist() {
            self.by_uid.insert(uid.to_owned(), ip);
            self.by_ip.insert(ip, uid.to_owned());
            return Err(e);
        }
        Ok(())
    }

    /// Frees every IP whose pod is not in `live` (after a crash or a missed
    /// delete); returns what was freed as (UID, IP).
    pub fn reconcile<I>(&mut self, live: I) -> Result<Vec<(String, Ipv4Addr)>, IpamError>
    where
        I: IntoIterator,
        I::Item: AsRef<str>,
    {
        let live: std::collections::HashSet<String> =
            live.into_iter().map(|u| u.as_ref().to_owned()).collect();
        let freed: Vec<(String, Ipv4Addr)> = self
            .by_uid
            .iter()
            .filter(|(uid, _)| !live.contains(uid.as_str()))
            .map(|(uid, ip)| (uid.clone(), *ip))
            .collect();
        if freed.is_empty() {
            return Ok(freed);
        }
        for (uid, ip) in &freed {
            self.by_uid.remove(uid);
            self.by_ip.remove(ip);
        }
        if let Err(e) = self.persist() {
            for (uid, ip) in &freed {
                self.by_uid.insert(uid.clone(), *ip);
                self.by_ip.insert(*ip, uid.clone());
            }
            return Err(e);
        }
        let mut freed = freed;
        freed.sort_by_key(|(_, ip)| *ip);
        Ok(freed)
    }

    /// The first allocatable address: network + 2 (.1 is reserved).
    fn first(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.cidr.addr) + 2)
    }

    fn usable(&self, ip: Ipv4Addr) -> bool {
        self.cidr.contains(ip) && ip >= self.first() && ip < self.cidr.broadcast()
    }

    fn io(&self, action: &'static str, source: std::io::Error) -> IpamError {
        IpamError::Io {
            path: self.path.clone(),
            action,
            source,
        }
    }

    /// Moves an unreadable file aside so nothing is lost and the next open
    /// starts clean.
    fn corrupt(&self, detail: String) -> IpamError {
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let mut moved = self.path.clone().into_os_string();
        moved.push(format!(".corrupt-{stamp}"));
        let moved_to = PathBuf::from(moved);
        if let Err(e) = std::fs::rename(&self.path, &moved_to) {
            return self.io("moving the corrupt file aside", e);
        }
        tracing::error!(path = %self.path.display(), moved_to = %moved_to.display(), %detail,
            "corrupt IPAM state moved aside");
        IpamError::Corrupt {
            path: self.path.clone(),
            moved_to,
            detail,
        }
    }

    fn persist(&self) -> Result<(), IpamError> {
        let state = StateFile {
            version: VERSION,
            pod_cidr: self.cidr.to_string(),
            last: self.last,
            allocations: self.by_ip.clone(),
        };
        let bytes = serde_json::to_vec_pretty(&state)
            .map_err(|e| self.io("encoding", std::io::Error::other(e)))?;
        let dir = match self.path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&dir).map_err(|e| self.io("creating the directory", e))?;
        let mut tmp = self.path.clone().into_os_string();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let mut file =
            std::fs::File::create(&tmp).map_err(|e| self.io("creating the temporary file", e))?;
        file.write_all(&bytes)
            .and_then(|()| file.sync_all())
            .map_err(|e| self.io("writing the temporary file", e))?;
        drop(file);
        std::fs::rename(&tmp, &self.path).map_err(|e| self.io("renaming the temporary file", e))?;
        // The rename itself is durable only once the directory is synced.
        std::fs::File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| self.io("syncing the directory", e))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn cidr_parsing_and_ranges() {
        let c: Ipv4Cidr = "10.42.7.9/24".parse().unwrap();
        assert_eq!(c.to_string(), "10.42.7.0/24");
        assert_eq!(c.broadcast(), Ipv4Addr::new(10, 42, 7, 255));
        assert!(c.contains(Ipv4Addr::new(10, 42, 7, 200)));
        assert!(!c.contains(Ipv4Addr::new(10, 42, 8, 1)));
        assert!("10.42.7.0".parse::<Ipv4Cidr>().is_err());
        assert!("10.42.7.0/33".parse::<Ipv4Cidr>().is_err());
        assert!("x/24".parse::<Ipv4Cidr>().is_err());
        let all: Ipv4Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(Ipv4Addr::new(1, 2, 3, 4)));
    }
}
