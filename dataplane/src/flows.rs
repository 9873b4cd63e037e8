//! Flow events from the pod hooks: every new connection a hook admitted
//! and every packet it dropped (policy, service without backends), read
//! from the `SKEP_FLOWS` ring buffer the load balancer's loader pins.
//!
//! A ring buffer has one consumer position: two readers would each see
//! only part of the events. The agent owns the one [`FlowReader`] of a
//! node and fans the flows out to its clients (`skep ctl flows`, the flows
//! service); tools must not open their own.

use std::{
    net::Ipv4Addr,
    path::Path,
    time::{Duration, SystemTime},
};

use aya::maps::{Map, MapData, RingBuf};
use skep_ebpf_common::{
    DROP_NO_BACKEND, DROP_POLICY_EGRESS, DROP_POLICY_INGRESS, FlowEvent, OBS_TO_POD, OBS_XDP,
    VERDICT_DROPPED, names,
};
use tokio::io::{Interest, unix::AsyncFd};

use crate::DataplaneError;

/// What happened to the flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FlowVerdict {
    Forwarded,
    Dropped,
}

impl FlowVerdict {
    pub fn as_str(&self) -> &'static str {
        match self {
            FlowVerdict::Forwarded => "FORWARDED",
            FlowVerdict::Dropped => "DROPPED",
        }
    }
}

/// Why a flow was dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// Not dropped.
    None,
    /// The source pod's egress policy has no rule for it.
    PolicyEgress,
    /// The destination pod's ingress policy has no rule for it.
    PolicyIngress,
    /// A service without ready endpoints (refused).
    NoBackend,
}

impl DropReason {
    pub fn as_str(&self) -> &'static str {
        match self {
            DropReason::None => "none",
            DropReason::PolicyEgress => "policy-denied-egress",
            DropReason::PolicyIngress => "policy-denied-ingress",
            DropReason::NoBackend => "no-backend",
        }
    }
}

/// Which hook saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Observation {
    /// The source pod's hook (its egress), after the service DNAT.
    FromPod,
    /// The destination pod's hook (its ingress).
    ToPod,
    /// The node's external interface (XDP early drop).
    Xdp,
}

impl Observation {
    pub fn as_str(&self) -> &'static str {
        match self {
            Observation::FromPod => "from-pod",
            Observation::ToPod => "to-pod",
            Observation::Xdp => "xdp",
        }
    }
}

/// One flow event.
#[derive(Clone, Debug, PartialEq)]
pub struct Flow {
    pub time: SystemTime,
    pub src: Ipv4Addr,
    /// After DNAT: the backend when the flow went through a service.
    pub dst: Ipv4Addr,
    pub sport: u16,
    pub dport: u16,
    /// The service frontend (VIP, port) the source addressed, if any.
    pub service: Option<(Ipv4Addr, u16)>,
    pub proto: u8,
    pub tcp_flags: u8,
    pub verdict: FlowVerdict,
    pub drop_reason: DropReason,
    pub observation: Observation,
    pub src_identity: u32,
    pub dst_identity: u32,
    /// The NetworkPolicy that allowed it (`POLICY_ID_NONE` when the pod is
    /// not isolated in that direction, `POLICY_ID_HOST` for the own node).
    pub policy_id: u32,
    /// Host-side interface of the hook.
    pub ifindex: u32,
}

impl Flow {
    fn from_event(ev: &FlowEvent, mono_to_wall_ns: i128) -> Flow {
        let ip = |v: u32| Ipv4Addr::from(v.to_ne_bytes());
        let wall = i128::from(ev.time_ns) + mono_to_wall_ns;
        let time = u64::try_from(wall)
            .map(|ns| SystemTime::UNIX_EPOCH + Duration::from_nanos(ns))
            .unwrap_or(SystemTime::UNIX_EPOCH);
        Flow {
            time,
            src: ip(ev.saddr),
            dst: ip(ev.daddr),
            sport: u16::from_be(ev.sport),
            dport: u16::from_be(ev.dport),
            service: (ev.orig_daddr != 0).then(|| (ip(ev.orig_daddr), u16::from_be(ev.orig_dport))),
            proto: ev.proto,
            tcp_flags: ev.tcp_flags,
            verdict: if ev.verdict == VERDICT_DROPPED {
                FlowVerdict::Dropped
            } else {
                FlowVerdict::Forwarded
            },
            drop_reason: match ev.drop_reason {
                DROP_POLICY_EGRESS => DropReason::PolicyEgress,
                DROP_POLICY_INGRESS => DropReason::PolicyIngress,
                DROP_NO_BACKEND => DropReason::NoBackend,
                _ => DropReason::None,
            },
            observation: match ev.observation {
                OBS_TO_POD => Observation::ToPod,
                OBS_XDP => Observation::Xdp,
                _ => Observation::FromPod,
            },
            src_identity: ev.src_identity,
            dst_identity: ev.dst_identity,
            policy_id: ev.policy_id,
            ifindex: ev.ifindex,
        }
    }
}

fn clock_ns(clock: libc::clockid_t) -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we pass.
    if unsafe { libc::clock_gettime(clock, &mut ts) } != 0 {
        return 0;
    }
    i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec)
}

fn ring_err(detail: String) -> DataplaneError {
    DataplaneError::Map {
        map: names::MAP_FLOWS,
        detail,
    }
}

/// The node's flow event reader (see the module docs: one per node, owned
/// by the agent).
pub struct FlowReader {
    ring: AsyncFd<RingBuf<MapData>>,
    /// Wall clock minus CLOCK_MONOTONIC (the events' clock), computed once
    /// at open: later wall clock steps do not move event times.
    mono_to_wall_ns: i128,
}

impl std::fmt::Debug for FlowReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlowReader").finish_non_exhaustive()
    }
}

impl FlowReader {
    /// Opens the ring buffer pinned under `pin_root` (the root given to
    /// `LbSettings::pin_root`). Must be called inside a tokio runtime.
    pub fn open(pin_root: &Path) -> Result<FlowReader, DataplaneError> {
        let path = pin_root.join("maps").join(names::MAP_FLOWS);
        let data = MapData::from_pin(&path).map_err(|e| DataplaneError::Pin {
            path: path.clone(),
            detail: format!(
                "cannot open the flow ring buffer ({e}); the load balancer datapath \
                 (KernelDatapath::open) creates it and must run first"
            ),
        })?;
        let map = Map::from_map_data(data).map_err(|e| ring_err(e.to_string()))?;
        let ring = RingBuf::try_from(map).map_err(|e| ring_err(e.to_string()))?;
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(ring_err(
                "FlowReader::open must be called inside a tokio runtime".into(),
            ));
        }
        // SAFETY: the ring buffer owns the map's fd (its MapData) and keeps
        // it open, always returning the same fd, until it is dropped, which
        // happens only with the AsyncFd that owns it.
        let ring =
            unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }.map_err(|e| {
                ring_err(format!(
                    "registering with the runtime: {}",
                    e.into_parts().1
                ))
            })?;
        Ok(FlowReader {
            ring,
            mono_to_wall_ns: clock_ns(libc::CLOCK_REALTIME) - clock_ns(libc::CLOCK_MONOTONIC),
        })
    }

    /// The next flow, waiting for one. Cancel-safe: an event is only taken
    /// from the ring when it is returned.
    pub async fn next(&mut self) -> Result<Flow, DataplaneError> {
        loop {
            if let Some(flow) = self.pop() {
                return Ok(flow);
            }
            let mut guard = self
                .ring
                .readable_mut()
                .await
                .map_err(|e| ring_err(format!("waiting for events: {e}")))?;
            // Only forget the readiness once the ring is seen empty; tokio
            // keeps any wakeup that raced with this check.
            let item = guard.get_inner_mut().next().map(|i| read_event(&i));
            match item {
                Some(Some(ev)) => return Ok(Flow::from_event(&ev, self.mono_to_wall_ns)),
                Some(None) => {}
                None => guard.clear_ready(),
            }
        }
    }

    /// A flow already in the ring, without waiting.
    pub fn try_next(&mut self) -> Option<Flow> {
        self.pop()
    }

    fn pop(&mut self) -> Option<Flow> {
        loop {
            let ev = {
                let item = self.ring.get_mut().next()?;
                read_event(&item)
            };
            // A record of another size is not ours (skipped).
            if let Some(ev) = ev {
                return Some(Flow::from_event(&ev, self.mono_to_wall_ns));
            }
        }
    }
}

fn read_event(bytes: &[u8]) -> Option<FlowEvent> {
    if bytes.len() < std::mem::size_of::<FlowEvent>() {
        return None;
    }
    // SAFETY: at least size_of::<FlowEvent>() bytes are readable; FlowEvent
    // is plain integers, valid for any bytes; the read is unaligned-safe.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<FlowEvent>()) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reader_and_flows_can_move_between_tasks() {
        fn send<T: Send + 'static>() {}
        send::<FlowReader>();
        send::<Flow>();
    }

    #[test]
    fn events_convert_to_flows() {
        let ev = FlowEvent {
            time_ns: 5_000_000_000,
            saddr: u32::from_ne_bytes([10, 42, 0, 10]),
            daddr: u32::from_ne_bytes([10, 42, 0, 13]),
            orig_daddr: u32::from_ne_bytes([10, 43, 0, 100]),
            sport: 40000u16.to_be(),
            dport: 8080u16.to_be(),
            orig_dport: 80u16.to_be(),
            proto: 6,
            tcp_flags: 2,
            verdict: VERDICT_DROPPED,
            drop_reason: DROP_POLICY_INGRESS,
            observation: OBS_TO_POD,
            _pad: 0,
            src_identity: 1000,
            dst_identity: 1003,
            policy_id: 0,
            ifindex: 7,
        };
        let f = Flow::from_event(&ev, 1_000_000_000);
        assert_eq!(
            f.time,
            SystemTime::UNIX_EPOCH + Duration::from_secs(6),
            "monotonic + offset"
        );
        assert_eq!(
            (f.src, f.dst, f.sport, f.dport),
            (
                Ipv4Addr::new(10, 42, 0, 10),
                Ipv4Addr::new(10, 42, 0, 13),
                40000,
                8080
            )
        );
        assert_eq!(f.service, Some((Ipv4Addr::new(10, 43, 0, 100), 80)));
        assert_eq!(
            (
                f.verdict.as_str(),
                f.drop_reason.as_str(),
                f.observation.as_str()
            ),
            ("DROPPED", "policy-denied-ingress", "to-pod")
        );
    }
}
