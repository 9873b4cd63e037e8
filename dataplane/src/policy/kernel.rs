//! The real [`PolicyDatapath`]: the policy maps the pod hooks read, opened
//! from the pins the load balancer's loader made (`<root>/maps/SKEP_*`,
//! see `lb::kernel`), so the rules outlive the agent and a restarted agent
//! re-adopts them.
//!
//! `apply` diffs the wanted state against what this handle last wrote
//! (read back from the maps on open, so the first apply after a restart
//! only writes the difference). Writes are ordered so that a connection
//! allowed before and after an apply is never denied in between: new
//! ipcache entries and rules first, then endpoints (which may turn
//! isolation on), then removals of endpoints, rules and ipcache entries.
//! The LPM tries have no batch update in the kernel, so each key is one
//! bpf(2) call (a few µs each).
//!
//! Every apply ends by bumping the policy generation (`SKEP_POLICY_GEN`),
//! also when it failed half-way: `xdp_policy` caches denials tagged with
//! the generation it read before deciding, and ignores entries of an
//! older one, so the first packet after an apply is judged on the new
//! maps. `apply_maps` is the only code that writes the three maps, and it
//! is only reached through `apply`, which bumps after it.

use std::{
    collections::HashMap as StdHashMap,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use aya::maps::{
    Array, HashMap, Map, MapData, MapError,
    lpm_trie::{Key, LpmTrie},
};
use skep_ebpf_common::{
    CFG_F_FLOWS, CFG_F_POLICY, CtKey, DIR_EGRESS, DIR_INGRESS, EP_F_EGRESS_ISOLATED,
    EP_F_INGRESS_ISOLATED, EndpointValue, IPPROTO_TCP, IpcacheValue, LbConfig, PCT_F_CLOSING,
    POLICY_PREFIX_ANY_PORT, POLICY_PREFIX_ANY_PROTO, PolicyCtValue, PolicyKey, PolicyValue, names,
};

use super::{ApplyStats, PolicyDatapath, PolicyDirection, PolicyRule, PolicyState, PortMatch};
use crate::DataplaneError;

/// The data bytes of a policy trie key (everything after `prefix_len`).
type RuleData = [u8; 12];

/// The policy maps in the kernel. One per agent: it assumes it is the only
/// writer of the policy maps (it diffs against what it wrote).
pub struct KernelPolicy {
    ipcache: LpmTrie<MapData, u32, IpcacheValue>,
    endpoints: HashMap<MapData, u32, EndpointValue>,
    rules: LpmTrie<MapData, RuleData, PolicyValue>,
    config: Array<MapData, LbConfig>,
    /// The policy generation: one u64, bumped after every write of the
    /// three maps above.
    generation: Array<MapData, u64>,
    /// What the maps hold: (prefix length, network-order address).
    ipcache_now: StdHashMap<(u32, u32), IpcacheValue>,
    endpoints_now: StdHashMap<u32, EndpointValue>,
    rules_now: StdHashMap<PolicyKey, PolicyValue>,
    /// Whether enforcement is wanted (set_enforcement).
    enforce: bool,
    /// A full state is in the maps (applied by this handle, or found
    /// enforced by a previous agent), so enforcement may be on.
    complete: bool,
}

impl std::fmt::Debug for KernelPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelPolicy")
            .field("ipcache", &self.ipcache_now.len())
            .field("endpoints", &self.endpoints_now.len())
            .field("rule_keys", &self.rules_now.len())
            .field("enforce", &self.enforce)
            .finish_non_exhaustive()
    }
}

fn map_err(map: &'static str) -> impl Fn(MapError) -> DataplaneError {
    move |e| DataplaneError::Map {
        map,
        detail: e.to_string(),
    }
}

fn ip_ne(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

fn open_pinned<T>(
    root: &Path,
    name: &'static str,
    convert: impl FnOnce(Map) -> Result<T, MapError>,
) -> Result<T, DataplaneError> {
    let path: PathBuf = root.join("maps").join(name);
    let data = MapData::from_pin(&path).map_err(|e| DataplaneError::Pin {
        path: path.clone(),
        detail: format!(
            "cannot open the pinned policy map ({e}); the load balancer datapath \
             (KernelDatapath::open) creates it and must run first"
        ),
    })?;
    let map = Map::from_map_data(data).map_err(map_err(name))?;
    convert(map).map_err(map_err(name))
}

/// Remove, treating "already gone" as done.
fn gone(r: Result<(), MapError>) -> Result<(), MapError> {
    match r {
        Err(MapError::KeyNotFound) => Ok(()),
        other => other,
    }
}

impl KernelPolicy {
    /// Opens the policy maps pinned under `pin_root` (the same root as
    /// `LbSettings::pin_root`) and reads what they hold.
    pub fn open(pin_root: &Path) -> Result<KernelPolicy, DataplaneError> {
        let ipcache: LpmTrie<MapData, u32, IpcacheValue> =
            open_pinned(pin_root, names::MAP_IPCACHE, LpmTrie::try_from)?;
        let endpoints: HashMap<MapData, u32, EndpointValue> =
            open_pinned(pin_root, names::MAP_ENDPOINTS, HashMap::try_from)?;
        let rules: LpmTrie<MapData, RuleData, PolicyValue> =
            open_pinned(pin_root, names::MAP_POLICY, LpmTrie::try_from)?;
        let config: Array<MapData, LbConfig> =
            open_pinned(pin_root, names::MAP_CONFIG, Array::try_from)?;
        let generation: Array<MapData, u64> =
            open_pinned(pin_root, names::MAP_POLICY_GEN, Array::try_from)?;

        let mut ipcache_now = StdHashMap::new();
        for item in ipcache.iter() {
            let (k, v) = item.map_err(map_err(names::MAP_IPCACHE))?;
            ipcache_now.insert((k.prefix_len(), k.data()), v);
        }
        let mut endpoints_now = StdHashMap::new();
        for item in endpoints.iter() {
            let (k, v) = item.map_err(map_err(names::MAP_ENDPOINTS))?;
            endpoints_now.insert(k, v);
        }
        let mut rules_now = StdHashMap::new();
        for item in rules.iter() {
            let (k, v) = item.map_err(map_err(names::MAP_POLICY))?;
            rules_now.insert(key_from_data(k.prefix_len(), &k.data()), v);
        }
        let flags = config.get(&0, 0).map_err(map_err(names::MAP_CONFIG))?.flags;
        tracing::info!(
            ipcache = ipcache_now.len(),
            endpoints = endpoints_now.len(),
            rule_keys = rules_now.len(),
            enforcing = flags & CFG_F_POLICY != 0,
            "policy maps open"
        );
        let mut policy = KernelPolicy {
            ipcache,
            endpoints,
            rules,
            config,
            generation,
            ipcache_now,
            endpoints_now,
            rules_now,
            enforce: true,
            complete: flags & CFG_F_POLICY != 0,
        };
        // A previous agent may have died between writing the maps and
        // bumping: denials cached since then must not be believed.
        policy.bump_generation()?;
        Ok(policy)
    }

    /// The current policy generation (see the module documentation).
    pub fn generation(&self) -> Result<u64, DataplaneError> {
        self.generation
            .get(&0, 0)
            .map_err(map_err(names::MAP_POLICY_GEN))
    }

    /// Invalidates every denial `xdp_policy` cached until now. This handle
    /// is the only writer, so read-then-write cannot lose a bump.
    fn bump_generation(&mut self) -> Result<(), DataplaneError> {
        let next = self.generation()?.wrapping_add(1);
        self.generation
            .set(0, next, 0)
            .map_err(map_err(names::MAP_POLICY_GEN))
    }

    /// Turns enforcement on or off (flows keep being reported). Off takes
    /// effect at once; on takes effect at once if a full state has been
    /// applied, else with the first successful [`PolicyDatapath::apply`].
    /// A failed config write is logged and retried by the next apply.
    pub fn set_enforcement(&mut self, on: bool) {
        self.enforce = on;
        if (!on || self.complete)
            && let Err(e) = self.write_flags()
        {
            tracing::warn!(error = %e, on, "cannot switch policy enforcement");
        }
    }

    /// Whether the hooks enforce policy now (reads the config).
    pub fn enforcing(&self) -> Result<bool, DataplaneError> {
        let cfg = self.config.get(&0, 0).map_err(map_err(names::MAP_CONFIG))?;
        Ok(cfg.flags & CFG_F_POLICY != 0)
    }

    fn write_flags(&mut self) -> Result<(), DataplaneError> {
        let mut cfg = self.config.get(&0, 0).map_err(map_err(names::MAP_CONFIG))?;
        let mut flags = cfg.flags;
        if self.complete {
            flags |= CFG_F_FLOWS;
        }
        if self.enforce && self.complete {
            flags |= CFG_F_POLICY;
        } else {
            flags &= !CFG_F_POLICY;
        }
        if flags != cfg.flags {
            cfg.flags = flags;
            self.config
                .set(0, cfg, 0)
                .map_err(map_err(names::MAP_CONFIG))?;
            tracing::info!(
                enforcing = flags & CFG_F_POLICY != 0,
                "policy enforcement switched"
            );
        }
        Ok(())
    }

    fn apply_maps(&mut self, state: &PolicyState) -> Result<ApplyStats, DataplaneError> {
        let mut stats = ApplyStats::default();
        let ipcache = wanted_ipcache(state);
        let endpoints = wanted_endpoints(state);
        let rules = wanted_rules(state);

        // Additions and changes that can only admit more: ipcache, rules.
        for (&(len, addr), v) in &ipcache {
            if self.ipcache_now.get(&(len, addr)) != Some(v) {
                self.ipcache
                    .insert(&Key::new(len, addr), *v, 0)
                    .map_err(map_err(names::MAP_IPCACHE))?;
                self.ipcache_now.insert((len, addr), *v);
                stats.ipcache_written += 1;
            }
        }
        for (k, v) in &rules {
            if self.rules_now.get(k) != Some(v) {
                self.rules
                    .insert(&Key::new(k.prefix_len, key_data(k)), *v, 0)
                    .map_err(map_err(names::MAP_POLICY))?;
                self.rules_now.insert(*k, *v);
                stats.rule_keys_written += 1;
            }
        }
        for (&addr, v) in &endpoints {
            if self.endpoints_now.get(&addr) != Some(v) {
                self.endpoints
                    .insert(addr, *v, 0)
                    .map_err(map_err(names::MAP_ENDPOINTS))?;
                self.endpoints_now.insert(addr, *v);
                stats.endpoints_written += 1;
            }
        }
        // Removals.
        let stale: Vec<u32> = self
            .endpoints_now
            .keys()
            .filter(|a| !endpoints.contains_key(a))
            .copied()
            .collect();
        for addr in stale {
            gone(self.endpoints.remove(&addr)).map_err(map_err(names::MAP_ENDPOINTS))?;
            self.endpoints_now.remove(&addr);
            stats.endpoints_deleted += 1;
        }
        let stale: Vec<PolicyKey> = self
            .rules_now
            .keys()
            .filter(|k| !rules.contains_key(k))
            .copied()
            .collect();
        for k in stale {
            gone(self.rules.remove(&Key::new(k.prefix_len, key_data(&k))))
                .map_err(map_err(names::MAP_POLICY))?;
            self.rules_now.remove(&k);
            stats.rule_keys_deleted += 1;
        }
        let stale: Vec<(u32, u32)> = self
            .ipcache_now
            .keys()
            .filter(|k| !ipcache.contains_key(k))
            .copied()
            .collect();
        for (len, addr) in stale {
            gone(self.ipcache.remove(&Key::new(len, addr))).map_err(map_err(names::MAP_IPCACHE))?;
            self.ipcache_now.remove(&(len, addr));
            stats.ipcache_deleted += 1;
        }
        Ok(stats)
    }
}

impl PolicyDatapath for KernelPolicy {
    fn apply(&mut self, state: &PolicyState) -> Result<ApplyStats, DataplaneError> {
        let applied = self.apply_maps(state);
        // After the writes, whether or not all of them succeeded (a failed
        // apply may still have changed some keys).
        let bumped = self.bump_generation();
        let stats = applied?;
        bumped?;
        self.complete = true;
        self.write_flags()?;
        if stats != ApplyStats::default() {
            tracing::debug!(?stats, "policy state applied");
        }
        Ok(stats)
    }
}

fn wanted_ipcache(state: &PolicyState) -> StdHashMap<(u32, u32), IpcacheValue> {
    state
        .ipcache
        .iter()
        .map(|(cidr, e)| {
            // Normalized again: Cidr's fields are public.
            let len = cidr.len.min(32);
            let addr = super::Cidr::new(cidr.addr, len).map_or(cidr.addr, |c| c.addr);
            (
                (u32::from(len), ip_ne(addr)),
                IpcacheValue {
                    identity: e.identity,
                    cidr_identity: e.cidr_identity,
                },
            )
        })
        .collect()
}

fn wanted_endpoints(state: &PolicyState) -> StdHashMap<u32, EndpointValue> {
    state
        .endpoints
        .iter()
        .map(|(addr, e)| {
            let mut flags = 0;
            if e.ingress_isolated {
                flags |= EP_F_INGRESS_ISOLATED;
            }
            if e.egress_isolated {
                flags |= EP_F_EGRESS_ISOLATED;
            }
            (
                ip_ne(*addr),
                EndpointValue {
                    endpoint: e.endpoint,
                    identity: e.identity,
                    flags,
                    _pad: 0,
                },
            )
        })
        .collect()
}

/// Every trie key of every rule; when two rules give the same key the
/// lower policy id wins (as in `PolicyState::rules`).
fn wanted_rules(state: &PolicyState) -> StdHashMap<PolicyKey, PolicyValue> {
    let mut out: StdHashMap<PolicyKey, PolicyValue> = StdHashMap::new();
    for (rule, &policy_id) in &state.rules {
        for key in rule_keys(rule) {
            out.entry(key)
                .and_modify(|v| v.policy_id = v.policy_id.min(policy_id))
                .or_insert(PolicyValue { policy_id, _pad: 0 });
        }
    }
    out
}

/// The trie keys of one rule: one for `Any`/`AnyPort`, the fewest port
/// prefixes covering a range.
pub fn rule_keys(rule: &PolicyRule) -> Vec<PolicyKey> {
    let direction = match rule.direction {
        PolicyDirection::Ingress => DIR_INGRESS,
        PolicyDirection::Egress => DIR_EGRESS,
    };
    let key = |prefix_len: u32, proto: u8, port: u16| PolicyKey {
        prefix_len,
        endpoint: rule.endpoint.to_be(),
        identity: rule.identity.to_be(),
        direction,
        proto,
        port: port.to_be(),
    };
    match rule.ports {
        PortMatch::Any => vec![key(POLICY_PREFIX_ANY_PROTO, 0, 0)],
        PortMatch::AnyPort { proto } => vec![key(POLICY_PREFIX_ANY_PORT, proto, 0)],
        PortMatch::Range { proto, first, last } => port_prefixes(first, last)
            .into_iter()
            .map(|(port, bits)| key(POLICY_PREFIX_ANY_PORT + u32::from(bits), proto, port))
            .collect(),
    }
}

/// The fewest (port, prefix bits) blocks covering `first..=last` (empty
/// when first > last).
pub fn port_prefixes(first: u16, last: u16) -> Vec<(u16, u8)> {
    let mut out = Vec::new();
    let (mut start, end) = (u32::from(first), u32::from(last));
    while start <= end {
        // The largest aligned block starting at `start` that fits.
        let mut size_bits = start.trailing_zeros().min(16);
        while start + (1u32 << size_bits) - 1 > end {
            size_bits -= 1;
        }
        // start < 2^16 and size_bits <= 16, so both fit.
        out.push((start as u16, (16 - size_bits) as u8));
        start += 1 << size_bits;
    }
    out
}

/// The 12 data bytes of a policy key, as documented on [`PolicyKey`].
fn key_data(k: &PolicyKey) -> RuleData {
    let mut d = [0u8; 12];
    d[0..4].copy_from_slice(&k.endpoint.to_ne_bytes());
    d[4..8].copy_from_slice(&k.identity.to_ne_bytes());
    d[8] = k.direction;
    d[9] = k.proto;
    d[10..12].copy_from_slice(&k.port.to_ne_bytes());
    d
}

fn key_from_data(prefix_len: u32, d: &RuleData) -> PolicyKey {
    PolicyKey {
        prefix_len,
        endpoint: u32::from_ne_bytes([d[0], d[1], d[2], d[3]]),
        identity: u32::from_ne_bytes([d[4], d[5], d[6], d[7]]),
        direction: d[8],
        proto: d[9],
        port: u16::from_ne_bytes([d[10], d[11]]),
    }
}

/// Removes policy conntrack entries idle for longer than
/// `timeout(proto, closing)` ns (both directions of a connection share one
/// entry, touched by either). Called by the load balancer's conntrack GC,
/// so the agent's existing sweep covers policy too; the LRU evicts on top
/// when the map fills. Returns how many entries went.
pub(crate) fn sweep_policy_ct(
    map: &mut HashMap<MapData, CtKey, PolicyCtValue>,
    now: u64,
    timeout: impl Fn(u8, bool) -> u64,
) -> Result<usize, DataplaneError> {
    let mut stale = Vec::new();
    for item in map.iter() {
        let (k, v) = item.map_err(map_err(names::MAP_POLICY_CT))?;
        let closing = k.proto == IPPROTO_TCP && v.flags & PCT_F_CLOSING != 0;
        if now.saturating_sub(v.last_seen_ns) > timeout(k.proto, closing) {
            stale.push(k);
        }
    }
    let n = stale.len();
    for k in stale {
        // Already gone (LRU eviction) is fine.
        let _ = map.remove(&k);
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use skep_ebpf_common::POLICY_PREFIX_EXACT;

    fn covered(blocks: &[(u16, u8)]) -> Vec<u32> {
        let mut ports: Vec<u32> = blocks
            .iter()
            .flat_map(|&(p, bits)| {
                let size = 1u32 << (16 - u32::from(bits));
                (u32::from(p)..u32::from(p) + size).collect::<Vec<_>>()
            })
            .collect();
        ports.sort();
        ports
    }

    #[test]
    fn port_ranges_become_minimal_prefixes() {
        assert_eq!(port_prefixes(80, 80), vec![(80, 16)]);
        assert_eq!(port_prefixes(0, 65535), vec![(0, 0)]);
        assert_eq!(port_prefixes(8000, 8007), vec![(8000, 13)]);
        assert_eq!(port_prefixes(1, 0), vec![]);
        assert_eq!(port_prefixes(65535, 65535), vec![(65535, 16)]);
        for (a, b) in [(1, 65535), (1000, 2000), (32768, 60999), (5, 6), (0, 1)] {
            let blocks = port_prefixes(a, b);
            assert_eq!(
                covered(&blocks),
                (u32::from(a)..=u32::from(b)).collect::<Vec<_>>()
            );
            // At most two blocks per bit length.
            assert!(blocks.len() <= 32, "{a}-{b}: {blocks:?}");
        }
        assert_eq!(port_prefixes(1, 65535).len(), 16);
    }

    #[test]
    fn key_bytes_follow_the_documented_layout() {
        let rule = PolicyRule {
            endpoint: 0x0102_0304,
            direction: PolicyDirection::Egress,
            identity: 0x0a0b_0c0d,
            ports: PortMatch::Range {
                proto: 6,
                first: 443,
                last: 443,
            },
        };
        let keys = rule_keys(&rule);
        assert_eq!(keys.len(), 1);
        let d = key_data(&keys[0]);
        assert_eq!(
            d,
            [
                1, 2, 3, 4, 0x0a, 0x0b, 0x0c, 0x0d, DIR_EGRESS, 6, 0x01, 0xbb
            ]
        );
        assert_eq!(keys[0].prefix_len, POLICY_PREFIX_EXACT);
        assert_eq!(key_from_data(keys[0].prefix_len, &d), keys[0]);
    }
}
